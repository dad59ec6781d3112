"""The papers' claims, one function each, decided from the sweep's numbers and their error bars.

A claim is a dict with `claim`, `source` and `outcomes`: {metric: (outcome, figures)}, decided on each quality figure
separately: **reproduced** when the difference in the claimed direction exceeds the sum of the error bars, **opposite**
when it does in the other direction, **not resolved** otherwise. Each function returns its claims as a list (empty
where the sweep lacks the models it needs).
"""

import os
import sys

import numpy as np

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts")
)

from aug_dim_sweep.statistics import (  # noqa: E402
    Estimate,
    badness,
    compare,
    curve_points,
    degradation,
    level_points,
    plain_groups,
    reference_points,
    restart_points,
    restart_steps,
    solver_points,
    target_pairs,
)  # scripts/aug_dim_sweep: run.py puts scripts/ on the path

# The figures each digits claim is decided on: {key: higher is better}
CLAIM_METRICS = {"frechet_distance": False, "confident_share": True}
TOY_METRICS = {"nll_gap": "NLL − true NLL", "sliced_wasserstein": "sliced W2"}


def shown(value: Estimate, key) -> str:
    """A badness estimate in the metric's own sign, as mean ± error."""
    sign = -1.0 if CLAIM_METRICS.get(key, False) else 1.0
    return f"{sign * value.mean:.3g} ± {value.error:.2g}"


def plain(value: Estimate) -> str:
    return f"{value.mean:.3g} ± {value.error:.2g}"


def combine(per_level) -> str:
    """One outcome for a claim tested at several levels (noise scales, bit widths, step counts)."""
    outcomes = {outcome for _, outcome, _ in per_level}
    if outcomes == {"reproduced"}:
        return "reproduced"
    if outcomes == {"not resolved"}:
        return "not resolved"
    if "reproduced" in outcomes and "opposite" not in outcomes:
        return "partly reproduced"
    if "opposite" in outcomes and "reproduced" not in outcomes:
        return "partly opposite" if "not resolved" in outcomes else "opposite"
    return "mixed"


def _reference_steps(settings):
    return settings["digits"]["evaluation"]["reference_steps"]


def _at_reference(groups, name, key, settings):
    return badness(reference_points(groups[name], _reference_steps(settings)), key, CLAIM_METRICS[key])


def _finite(groups):
    return [name for name in groups if name.startswith("D=") and name != "D=inf"]


def _middle(groups):
    """The finite D values but the smallest."""
    finite = _finite(groups)
    return finite[1:] if len(finite) > 1 else finite


def _best_middle(groups, key, settings):
    return min(_middle(groups), key=lambda name: _at_reference(groups, name, key, settings).mean)


# ---------------------------------------------------------------------- PFGM++ Table 1: a middle D is best


def middle_d_beats_diffusion(groups, toy, settings) -> list:
    if not _middle(groups) or "D=inf" not in groups:
        return []
    outcomes = {}
    for key in CLAIM_METRICS:
        best = _best_middle(groups, key, settings)
        a, b = _at_reference(groups, best, key, settings), _at_reference(groups, "D=inf", key, settings)
        outcomes[key] = compare(best, a, "D=inf", b, lambda e, key=key: shown(e, key))
    claim = (
        f"A middle D ({', '.join(_middle(groups))}; the best of them) beats diffusion (D = ∞) at Heun "
        f"{2 * _reference_steps(settings) - 1} NFE"
    )
    source = "PFGM++ Table 1 (CIFAR-10 FID 1.91 at D = 2048, 1.92 at 128, 1.98 at ∞)"
    return [dict(claim=claim, source=source, outcomes=outcomes)]


def middle_d_beats_pfgm(groups, toy, settings) -> list:
    """Against the field model's RK45 where it finished, else its Heun at the same calls."""
    if not _middle(groups) or "D=inf" not in groups or "PFGM" not in groups:
        return []
    rk45 = all("rk45" in r["solvers"] for r in groups["PFGM"])
    pfgm = (
        [r["solvers"]["rk45"][0] for r in groups["PFGM"]]
        if rk45
        else reference_points(groups["PFGM"], _reference_steps(settings))
    )
    outcomes = {}
    for key, higher_is_better in CLAIM_METRICS.items():
        best = _best_middle(groups, key, settings)
        a, b = _at_reference(groups, best, key, settings), badness(pfgm, key, higher_is_better)
        outcomes[key] = compare(best, a, "PFGM", b, lambda e, key=key: shown(e, key))
    sampler = "its RK45 sampler" if rk45 else f"Heun at {2 * _reference_steps(settings) - 1} NFE, as PFGM++"
    claim = f"The best middle D beats the original PFGM (field model, D = 1, {sampler})"
    return [dict(claim=claim, source="PFGM++ §4–5 (PFGM++ improves on PFGM)", outcomes=outcomes)]


# ---------------------------------------------------------------------- robustness (PFGM++ §5, PFGM §5)


def _robustness(groups, name_a, label, source, levels, perturbed, reference) -> dict:
    """`name_a` degrades less than D = ∞ from `reference(name)` to `perturbed(name, level)` at every level."""
    outcomes = {}
    for key, higher_is_better in CLAIM_METRICS.items():
        per_level = []
        for level, shown_level in levels:
            loss = {
                name: degradation(perturbed(name, level), reference(name), key, higher_is_better)
                for name in (name_a, "D=inf")
            }
            outcome, figures = compare(name_a, loss[name_a], "D=inf", loss["D=inf"], plain)
            per_level.append((shown_level, outcome, figures))
        details = "; ".join(f"{level}: {outcome} ({figures})" for level, outcome, figures in per_level)
        outcomes[key] = (combine(per_level), details)
    return dict(claim=f"{name_a} degrades less than D = ∞ under {label}", source=source, outcomes=outcomes)


def _small_d(groups):
    finite = _finite(groups)
    return finite[0] if finite and "D=inf" in groups else None


def small_d_robust_to_noise(groups, toy, settings) -> list:
    small, evaluation = _small_d(groups), settings["digits"]["evaluation"]
    if small is None or not evaluation.get("noise_scales"):
        return []
    return [
        _robustness(
            groups,
            small,
            "noise injected while sampling",
            "PFGM++ §5 (Fig. 5a)",
            [(alpha, f"α {alpha}") for alpha in evaluation["noise_scales"]],
            lambda name, alpha: level_points(groups[name], "noise", "alpha", alpha),
            lambda name: reference_points(groups[name], _reference_steps(settings)),
        )
    ]


def small_d_robust_to_fewer_steps(groups, toy, settings) -> list:
    small, reference_steps = _small_d(groups), _reference_steps(settings)
    fewer = [n for n in settings["digits"]["evaluation"]["steps"]["heun"] if n < reference_steps]
    if small is None or not fewer:
        return []
    return [
        _robustness(
            groups,
            small,
            f"fewer Heun steps (against {2 * reference_steps - 1} NFE)",
            "PFGM++ §5 (Fig. 5b)",
            [(n, f"{2 * n - 1} NFE") for n in fewer],
            lambda name, n: solver_points(groups[name], "heun", n),
            lambda name: reference_points(groups[name], reference_steps),
        )
    ]


def small_d_robust_to_quantization(groups, toy, settings) -> list:
    small, evaluation = _small_d(groups), settings["digits"]["evaluation"]
    if small is None or not evaluation.get("quantization_bits"):
        return []
    return [
        _robustness(
            groups,
            small,
            "post-training weight quantisation",
            "PFGM++ §5 (Fig. 5c)",
            [(b, f"{b} bits") for b in evaluation["quantization_bits"]],
            lambda name, b: level_points(groups[name], "quantization", "bits", b),
            lambda name: reference_points(groups[name], _reference_steps(settings)),
        )
    ]


def pfgm_robust_to_euler_steps(groups, toy, settings) -> list:
    """PFGM is robust to the Euler step size (PFGM §5), against diffusion."""
    if "PFGM" not in groups or "D=inf" not in groups or "euler" not in groups["PFGM"][0]["solvers"]:
        return []
    euler_steps = sorted(p["num_inference_steps"] for p in groups["PFGM"][0]["solvers"]["euler"])
    if len(euler_steps) < 2:
        return []
    finest = euler_steps[-1]
    return [
        _robustness(
            groups,
            "PFGM",
            f"larger Euler steps (against {finest} steps)",
            "PFGM §5 (robust to the Euler step size)",
            [(n, f"{n} steps") for n in euler_steps[:-1]],
            lambda name, n: solver_points(groups[name], "euler", n),
            lambda name: solver_points(groups[name], "euler", finest),
        )
    ]


# ---------------------------------------------------------------------- issue 10: few-step sampling


def _fewest_calls(group, solver, target_points, budget, key):
    """(outcome, figures): the fewest calls at which `solver` is not resolved worse than `target_points`."""
    target = badness(target_points, key, CLAIM_METRICS[key])
    steps = sorted(p["num_inference_steps"] for p in group[0]["solvers"][solver])
    for n in steps:
        points = solver_points(group, solver, n)
        value = badness(points, key, CLAIM_METRICS[key])
        if not target.less_than(value):
            nfe = points[0]["nfe"]
            outcome = "reproduced" if nfe <= budget else "not reproduced"
            return outcome, f"{shown(value, key)} at {nfe:.0f} NFE vs {shown(target, key)}"
    return "not reached", f"worse up to {steps[-1]} steps ({shown(value, key)} vs {shown(target, key)})"


def dpmpp_2m_in_17_calls(groups, toy, settings) -> list:
    """DPM-Solver++(2M) reaches Heun's reference quality in 17 calls or fewer, at the best D."""
    pfgmpp = [name for name in groups if name.startswith("D=")]
    if not pfgmpp:
        return []
    reference_steps = _reference_steps(settings)
    best = min(pfgmpp, key=lambda name: _at_reference(groups, name, "frechet_distance", settings).mean)
    claim = f"DPM-Solver++(2M) reaches Heun's {2 * reference_steps - 1}-call quality in ≤ 17 calls (at {best})"
    if "dpmpp_2m" not in groups[best][0]["solvers"]:
        outcomes = dict.fromkeys(CLAIM_METRICS, ("not measured", "the sweep measured no dpmpp_2m points"))
    else:
        target = reference_points(groups[best], reference_steps)
        outcomes = {key: _fewest_calls(groups[best], "dpmpp_2m", target, 17, key) for key in CLAIM_METRICS}
    return [dict(claim=claim, source="issue 10", outcomes=outcomes)]


def field_rk45_finishes(groups, toy, settings) -> list:
    stalled = [r["rk45_stalled"] for r in groups.get("PFGM", []) if "rk45_stalled" in r]
    if not stalled:
        return []
    message = (
        "did not finish",
        f"{len(stalled)} of {len(groups['PFGM'])} seeds spent {stalled[0]['max_nfe']} calls on "
        f"{stalled[0]['num_images']} images and had reached only z = "
        + ", ".join(f"{s['sigma_reached']:.3g}" for s in stalled),
    )
    claim = "The field model's RK45 (official tolerances 1e-4) samples in ~100 calls"
    return [
        dict(
            claim=claim,
            source="PFGM §4 (≈104 NFE on CIFAR-10, math.md §3)",
            outcomes=dict.fromkeys(CLAIM_METRICS, message),
        )
    ]


def field_rk45_quality_in_half_the_calls(groups, toy, settings) -> list:
    """The field model's RK45 quality at half of RK45's calls or fewer, with each scheduler solver."""
    if "PFGM" not in groups or not all("rk45" in r["solvers"] for r in groups["PFGM"]):
        return []
    rk45 = [r["solvers"]["rk45"][0] for r in groups["PFGM"]]
    rk45_nfe = float(np.mean([p["nfe"] for p in rk45]))
    claims = []
    for solver in groups["PFGM"][0]["solvers"]:
        if solver != "rk45":
            outcomes = {k: _fewest_calls(groups["PFGM"], solver, rk45, rk45_nfe / 2, k) for k in CLAIM_METRICS}
            claim = f"The field model's RK45 quality ({rk45_nfe:.0f} NFE) with {solver} in half the calls"
            claims.append(dict(claim=claim, source="issue 10", outcomes=outcomes))
    return claims


# ---------------------------------------------------------------------- the authors' follow-ups: STF and Restart


def stf_beats_plain_target(groups, toy, settings) -> list:
    """STF gives better samples than the plain target at equal training steps (every segment), one claim per D."""
    segments = settings["digits"]["training"]["segments"]
    claims = []
    for plain, stf in target_pairs(groups):
        outcomes = {}
        for key, higher_is_better in CLAIM_METRICS.items():
            per_level = []
            for index, steps in enumerate(segments):
                a = badness(curve_points(groups[stf], index), key, higher_is_better)
                b = badness(curve_points(groups[plain], index), key, higher_is_better)
                per_level.append((f"{steps} steps", *compare("STF", a, "plain", b, lambda e, key=key: shown(e, key))))
            details = "; ".join(f"{level}: {outcome} ({figures})" for level, outcome, figures in per_level)
            outcomes[key] = (combine(per_level), details)
        claim = f"{plain}: STF beats the plain target at equal training steps ({', '.join(map(str, segments))})"
        source = "STF (Xu, Tong, Jaakkola, ICLR 2023): lower target variance, better samples, most early in training"
        claims.append(dict(claim=claim, source=source, outcomes=outcomes))
    return claims


def restart_beats_heun(groups, toy, settings) -> list:
    """Restart beats Heun at the same NFE on every measured grid, one claim per plain-target model."""
    claims = []
    for name, group in plain_groups(groups).items():
        grids = restart_steps(group)
        if not grids:
            continue
        outcomes = {}
        for key, higher_is_better in CLAIM_METRICS.items():
            per_level = []
            for steps in grids:
                restart, heun = restart_points(group, steps)
                a, b = badness(restart, key, higher_is_better), badness(heun, key, higher_is_better)
                label = f"{restart[0]['nfe']:.0f} vs {heun[0]['nfe']:.0f} NFE"
                per_level.append((label, *compare("Restart", a, "Heun", b, lambda e, key=key: shown(e, key))))
            details = "; ".join(f"{level}: {outcome} ({figures})" for level, outcome, figures in per_level)
            outcomes[key] = (combine(per_level), details)
        claim = f"{name}: Restart beats Heun at equal NFE"
        source = "Restart (Xu et al., NeurIPS 2023; PFGM++ CIFAR-10 at 43 NFE)"
        claims.append(dict(claim=claim, source=source, outcomes=outcomes))
    return claims


# ---------------------------------------------------------------------- the 2-D toys


def toy_by_dim(rows) -> dict:
    by_dim = {}
    for row in rows:
        by_dim.setdefault("inf" if row["aug_dim"] is None else row["aug_dim"], []).append(row)
    return by_dim


def toy_finite_d_fits_better(groups, toy, settings) -> list:
    """The likelihood and sliced Wasserstein against D, one claim per toy dataset."""
    claims = []
    for dataset, rows in (toy or {}).items():
        by_dim = toy_by_dim(rows)
        if "inf" not in by_dim or len(by_dim) < 2:
            continue
        outcomes = {}
        for metric in TOY_METRICS:
            values = {
                dim: Estimate.of([r[metric] for r in rs], [r.get(f"{metric}_se", 0.0) for r in rs])
                for dim, rs in by_dim.items()
            }
            best = min((dim for dim in values if dim != "inf"), key=lambda dim: values[dim].mean)
            outcomes[metric] = compare(f"D={best}", values[best], "D=∞", values["inf"], plain)
        claims.append(
            dict(
                claim=f"{dataset}: the best finite D fits better than D = ∞",
                source="PFGM++ §4 (a middle D balances robustness and rigidity)",
                outcomes=outcomes,
            )
        )
    return claims


CLAIMS = (
    middle_d_beats_diffusion,
    middle_d_beats_pfgm,
    small_d_robust_to_noise,
    small_d_robust_to_fewer_steps,
    small_d_robust_to_quantization,
    pfgm_robust_to_euler_steps,
    dpmpp_2m_in_17_calls,
    field_rk45_finishes,
    field_rk45_quality_in_half_the_calls,
    toy_finite_d_fits_better,
)
# Claims about the training target or the sampler, decided on every model; the others compare D on the plain target.
ANY_TARGET_CLAIMS = (stf_beats_plain_target, restart_beats_heun)


def decide_claims(groups, toy, settings) -> list[dict]:
    """Every claim of `CLAIMS` that the sweep's models allow, from `groups` (digits results by model) and `toy` (toy
    rows by dataset)."""
    plain = plain_groups(groups)
    claims = [claim for decide in CLAIMS for claim in decide(plain, toy, settings)]
    return claims + [claim for decide in ANY_TARGET_CLAIMS for claim in decide(groups, toy, settings)]
