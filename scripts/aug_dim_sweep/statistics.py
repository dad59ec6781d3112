"""Estimates over seeds with error bars, and accessors of the sweep's result layout.

Error bars: a figure of several seeds is their mean ± (half the range over the seeds + the standard error over the
images of the mean, sqrt(sum se_i^2) / S). A difference counts as resolved only when it is larger than the sum of the
two error bars.
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """The mean of per-seed `values` with its error bar: half the range over the seeds + the standard error of the
    mean from the per-seed standard errors `standard_errors` (sqrt(sum se_i^2) / S). Immutable: derived estimates
    (`negated`) are new objects."""

    values: tuple
    standard_errors: tuple

    def __post_init__(self):
        if not self.values:
            raise ValueError("an Estimate needs at least one value")
        if len(self.standard_errors) != len(self.values):
            raise ValueError(f"{len(self.values)} values but {len(self.standard_errors)} standard errors")

    @classmethod
    def of(cls, values, standard_errors=None) -> "Estimate":
        values = tuple(float(v) for v in values)
        errors = (0.0,) * len(values) if standard_errors is None else tuple(float(s) for s in standard_errors)
        return cls(values, errors)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def spread(self) -> float:
        return (max(self.values) - min(self.values)) / 2

    @property
    def se(self) -> float:
        return math.sqrt(sum(s * s for s in self.standard_errors)) / len(self.standard_errors)

    @property
    def error(self) -> float:
        return self.spread + self.se

    def negated(self) -> "Estimate":
        return Estimate(tuple(-v for v in self.values), self.standard_errors)

    def __format__(self, spec):
        return f"{self.mean:{spec}} ± {self.error:{spec}}"

    def less_than(self, other: "Estimate") -> bool:
        """Whether this is below `other` by more than the sum of both error bars."""
        return other.mean - self.mean > self.error + other.error


def estimate(points, key) -> Estimate:
    """The estimate of `key` over a list of per-seed result dicts (each with `key` and optionally `key_se`)."""
    return Estimate.of([p[key] for p in points], [p.get(f"{key}_se", 0.0) for p in points])


def difference(points_a, points_b, key) -> Estimate:
    """Per-seed differences a - b (paired by seed), with the standard errors of both added in quadrature."""
    pairs = list(zip(points_a, points_b, strict=True))
    return Estimate.of(
        [a[key] - b[key] for a, b in pairs],
        [math.hypot(a.get(f"{key}_se", 0.0), b.get(f"{key}_se", 0.0)) for a, b in pairs],
    )


def badness(points, key, higher_is_better=False) -> Estimate:
    """`key` over seeds, negated where higher is better, so that lower is always better."""
    value = estimate(points, key)
    return value.negated() if higher_is_better else value


def degradation(perturbed, reference, key, higher_is_better=False) -> Estimate:
    """How much worse `perturbed` is than `reference` (per seed, paired): a rise of a lower-is-better figure, a drop
    of a higher-is-better one."""
    value = difference(perturbed, reference, key)
    return value.negated() if higher_is_better else value


def compare(a_name, a, b_name, b, show):
    """(outcome, figures) of "a is lower than b" for two estimates: reproduced, opposite or not resolved; `show`
    formats an estimate."""
    figures = f"{a_name} {show(a)}, {b_name} {show(b)}"
    if a.less_than(b):
        return "reproduced", figures
    if b.less_than(a):
        return "opposite", figures
    return "not resolved", figures


# ---------------------------------------------------------------------- the result layout


def group_by_model(results) -> dict:
    """{model name: [result of each seed, sorted by seed]} in the sweep's order of models."""
    groups = {}
    for result in results:
        groups.setdefault(result["name"], []).append(result)
    return {name: sorted(group, key=lambda r: r["seed"]) for name, group in groups.items()}


def solver_point(result, solver, num_inference_steps) -> dict:
    for point in result["solvers"].get(solver, []):
        if point["num_inference_steps"] == num_inference_steps:
            return point
    raise KeyError(f"{result['name']} seed {result['seed']}: no {solver} point at {num_inference_steps} steps")


def solver_points(group, solver, num_inference_steps) -> list:
    """Each seed's point of `solver` at `num_inference_steps`."""
    return [solver_point(result, solver, num_inference_steps) for result in group]


def reference_points(group, reference_steps) -> list:
    """Each seed's point at the reference setting: Heun with `reference_steps` steps."""
    return solver_points(group, "heun", reference_steps)


def level_points(group, rows, field, level) -> list:
    """Each seed's point of the robustness table `rows` ("noise" or "quantization") at `field` == `level`."""
    return [next(point for point in result[rows] if point[field] == level) for result in group]


def target_of(group) -> str:
    """The regression target a model trained with: "clean" (the plain target) or "stf"."""
    return group[0].get("target", "clean")


def plain_groups(groups) -> dict:
    """The models trained with the plain target (the D comparisons leave the STF models out)."""
    return {name: group for name, group in groups.items() if target_of(group) == "clean"}


def target_pairs(groups) -> list[tuple[str, str]]:
    """(plain-target model, other-target model) of every D trained with both targets, in the sweep's order."""
    plain = {(g[0]["objective"], g[0]["aug_dim"]): name for name, g in plain_groups(groups).items()}
    pairs = []
    for name, group in groups.items():
        key = (group[0]["objective"], group[0]["aug_dim"])
        if target_of(group) != "clean" and key in plain and len(group) == len(groups[plain[key]]):
            pairs.append((plain[key], name))
    return pairs


def curve_points(group, index) -> list:
    """Each seed's point of the training curve after segment `index`."""
    return [result["curve"][index] for result in group]


def restart_points(group, num_inference_steps) -> tuple[list, list]:
    """(each seed's Restart point on the grid of `num_inference_steps`, each seed's Heun point at the same NFE)."""
    rows = [
        next(row for row in result["restart"] if row["num_inference_steps"] == num_inference_steps) for result in group
    ]
    return rows, [row["heun"] for row in rows]


def restart_steps(group) -> list:
    """The grids Restart was measured on (empty where it was not)."""
    return [row["num_inference_steps"] for row in group[0].get("restart", [])]


def _measurements(result) -> set:
    """What was measured on a model: (solver, step count), ("noise", alpha) and ("bits", b) pairs."""
    pairs = {(solver, p["num_inference_steps"]) for solver, points in result["solvers"].items() for p in points}
    pairs |= {("noise", row["alpha"]) for row in result.get("noise", [])}
    return pairs | {("bits", row["bits"]) for row in result.get("quantization", [])}


def fully_measured(groups) -> dict:
    """The models measured at least as the first plain-target model was (a sweep may measure its STF models at the
    reference only: `evaluation["other_targets"] = "reference"`); the tables of steps and robustness compare these."""
    plain = plain_groups(groups) or groups
    reference = _measurements(next(iter(plain.values()))[0])
    return {name: group for name, group in groups.items() if reference <= _measurements(group[0])}
