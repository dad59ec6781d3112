"""The evidence report: aggregate the per-model results over seeds, decide each claim from the numbers, write the
markdown section of docs/benchmarks.md and its plots.

Error bars: a figure of several seeds is their mean +- (half the range over the seeds + the standard error over the
images of the mean, sqrt(sum se_i^2) / S). A difference counts as resolved only when it is larger than the sum of
the two error bars.
"""

import math
import os
import re

import numpy as np

START_MARKER = "<!-- evidence:start -->"
END_MARKER = "<!-- evidence:end -->"
METRICS = {
    "frechet_distance": ("Fréchet distance", "{:.2f}"),
    "confident_share": ("confident share", "{:.3f}"),
    "class_coverage": ("class coverage", "{:.2f}"),
}
MATPLOTLIB_MISSING = "the evidence plots need matplotlib: pip install matplotlib (or pip install -e '.[plots]')"


# ---------------------------------------------------------------------- statistics over seeds


class Estimate:
    """The mean of per-seed values with its error bar: half the range over seeds + the bootstrap standard error of
    the mean (sqrt(sum se_i^2) / S)."""

    def __init__(self, values, standard_errors=None):
        self.values = [float(v) for v in values]
        ses = [0.0] * len(self.values) if standard_errors is None else [float(s) for s in standard_errors]
        self.mean = float(np.mean(self.values))
        self.spread = (max(self.values) - min(self.values)) / 2
        self.se = math.sqrt(sum(s * s for s in ses)) / len(ses)
        self.error = self.spread + self.se

    def __format__(self, spec):
        return f"{self.mean:{spec}} ± {self.error:{spec}}"

    def less_than(self, other) -> bool:
        """Whether this is below `other` by more than the sum of both error bars."""
        return other.mean - self.mean > self.error + other.error


def estimate(points, key) -> Estimate:
    """The estimate of `key` over a list of per-seed result dicts (each with `key` and `key_se`)."""
    return Estimate([p[key] for p in points], [p.get(f"{key}_se", 0.0) for p in points])


def difference(points_a, points_b, key) -> Estimate:
    """Per-seed differences a - b (paired by seed), with the bootstrap errors of both added in quadrature."""
    values = [a[key] - b[key] for a, b in zip(points_a, points_b, strict=True)]
    ses = [
        math.hypot(a.get(f"{key}_se", 0.0), b.get(f"{key}_se", 0.0)) for a, b in zip(points_a, points_b, strict=True)
    ]
    return Estimate(values, ses)


def group_by_model(results):
    """{model name: [result of each seed, sorted by seed]} in the sweep's order of models."""
    groups = {}
    for result in results:
        groups.setdefault(result["name"], []).append(result)
    return {name: sorted(group, key=lambda r: r["seed"]) for name, group in groups.items()}


def solver_point(result, solver, num_inference_steps):
    for point in result["solvers"].get(solver, []):
        if point["num_inference_steps"] == num_inference_steps:
            return point
    raise KeyError(f"{result['name']} seed {result['seed']}: no {solver} point at {num_inference_steps} steps")


def reference_points(group, reference_steps):
    """Each seed's point at the reference setting: Heun with `reference_steps` steps."""
    return [solver_point(result, "heun", reference_steps) for result in group]


def level_points(group, rows, field, level):
    """Each seed's point of the robustness table `rows` ("noise" or "quantization") at `field` == `level`."""
    return [next(point for point in result[rows] if point[field] == level) for result in group]


# ---------------------------------------------------------------------- the claims, decided from the numbers

# The figures each digits claim is decided on, and their sign as "badness" (lower is better) to compare them
CLAIM_METRICS = {"frechet_distance": 1.0, "confident_share": -1.0}
TOY_METRICS = {"nll_gap": "NLL − true NLL", "sliced_wasserstein": "sliced W2"}


def badness(points, key) -> Estimate:
    """`key` over seeds, negated where higher is better, so that lower is always better."""
    sign = CLAIM_METRICS.get(key, 1.0)
    return Estimate([sign * p[key] for p in points], [p.get(f"{key}_se", 0.0) for p in points])


def degradation(perturbed, reference, key) -> Estimate:
    """How much worse `perturbed` is than `reference` (per seed, paired): a rise of the Fréchet distance, a drop of
    the confident share."""
    difference_ = difference(perturbed, reference, key)
    if CLAIM_METRICS.get(key, 1.0) < 0:
        difference_.values = [-v for v in difference_.values]
        difference_.mean = -difference_.mean
    return difference_


def shown(estimate_, key) -> str:
    """A badness estimate in the metric's own sign, as mean ± error."""
    sign = CLAIM_METRICS.get(key, 1.0)
    return f"{sign * estimate_.mean:.3g} ± {estimate_.error:.2g}"


def compare(a_name, a, b_name, b, key, as_badness=True):
    """(outcome, figures) of "a is better than b" for two badness estimates: reproduced, opposite or not resolved."""
    show = (lambda e: shown(e, key)) if as_badness else (lambda e: f"{e.mean:.3g} ± {e.error:.2g}")
    figures = f"{a_name} {show(a)}, {b_name} {show(b)}"
    if a.less_than(b):
        return "reproduced", figures
    if b.less_than(a):
        return "opposite", figures
    return "not resolved", figures


def combine(per_level):
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


def decide_claims(groups, toy, settings) -> list[dict]:
    """
    Each claim of the papers (and issue 10's goals) with its outcome at this scale, computed from `groups` (digits
    results by model) and `toy` (toy rows by dataset). A claim is a dict with `claim`, `source` and `outcomes`:
    {metric: (outcome, figures)}, decided on each quality figure separately.
    """
    evaluation = settings["digits"]["evaluation"]
    reference_steps = evaluation["reference_steps"]
    nfe_reference = 2 * reference_steps - 1
    claims = []
    finite = [name for name in groups if name.startswith("D=") and name != "D=inf"]
    middle = finite[1:] if len(finite) > 1 else finite  # all but the smallest D

    def at_reference(name, key):
        return badness(reference_points(groups[name], reference_steps), key)

    # 1. A middle D beats diffusion and PFGM (PFGM++ Table 1)
    if middle and "D=inf" in groups:
        outcomes, best_of = {}, {}
        for key in CLAIM_METRICS:
            best = min(middle, key=lambda name: at_reference(name, key).mean)
            best_of[key] = best
            outcomes[key] = compare(best, at_reference(best, key), "D=inf", at_reference("D=inf", key), key)
        claims.append(
            dict(
                claim=f"A middle D ({', '.join(middle)}; the best of them) beats diffusion (D = ∞) at Heun "
                f"{nfe_reference} NFE",
                source="PFGM++ Table 1 (CIFAR-10 FID 1.91 at D = 2048, 1.92 at 128, 1.98 at ∞)",
                outcomes=outcomes,
            )
        )
        if "PFGM" in groups:
            # Against the field model's RK45 where it finished, else its Heun at the same calls
            rk45 = all("rk45" in r["solvers"] for r in groups["PFGM"])
            pfgm = (
                [r["solvers"]["rk45"][0] for r in groups["PFGM"]]
                if rk45
                else reference_points(groups["PFGM"], reference_steps)
            )
            outcomes = {
                key: compare(best_of[key], at_reference(best_of[key], key), "PFGM", badness(pfgm, key), key)
                for key in CLAIM_METRICS
            }
            sampler = "its RK45 sampler" if rk45 else f"Heun at {nfe_reference} NFE, as PFGM++"
            claims.append(
                dict(
                    claim=f"The best middle D beats the original PFGM (field model, D = 1, {sampler})",
                    source="PFGM++ §4–5 (PFGM++ improves on PFGM)",
                    outcomes=outcomes,
                )
            )

    # 2. Robustness of small D: injected noise, quantisation, fewer steps (PFGM++ §5)
    small = finite[0] if finite else None
    if small is not None and "D=inf" in groups:

        def robustness(label, source, levels, perturbed_points, reference_points_, name_a=small):
            outcomes = {}
            for key in CLAIM_METRICS:
                per_level = []
                for level, shown_level in levels:
                    loss = {
                        name: degradation(perturbed_points(name, level), reference_points_(name), key)
                        for name in (name_a, "D=inf")
                    }
                    outcome, figures = compare(name_a, loss[name_a], "D=inf", loss["D=inf"], key, as_badness=False)
                    per_level.append((shown_level, outcome, figures))
                details = "; ".join(f"{level}: {outcome} ({figures})" for level, outcome, figures in per_level)
                outcomes[key] = (combine(per_level), details)
            return dict(claim=f"{name_a} degrades less than D = ∞ under {label}", source=source, outcomes=outcomes)

        def reference(name):
            return reference_points(groups[name], reference_steps)

        noise = [(alpha, f"α {alpha}") for alpha in evaluation["noise_scales"]]
        claims.append(
            robustness(
                "noise injected while sampling",
                "PFGM++ §5 (Fig. 5a)",
                noise,
                lambda name, alpha: level_points(groups[name], "noise", "alpha", alpha),
                reference,
            )
        )
        fewer = [(steps, f"{2 * steps - 1} NFE") for steps in evaluation["steps"]["heun"] if steps < reference_steps]
        claims.append(
            robustness(
                f"fewer Heun steps (against {nfe_reference} NFE)",
                "PFGM++ §5 (Fig. 5b)",
                fewer,
                lambda name, steps: [solver_point(r, "heun", steps) for r in groups[name]],
                reference,
            )
        )
        bits = [(b, f"{b} bits") for b in evaluation["quantization_bits"]]
        claims.append(
            robustness(
                "post-training weight quantisation",
                "PFGM++ §5 (Fig. 5c)",
                bits,
                lambda name, b: level_points(groups[name], "quantization", "bits", b),
                reference,
            )
        )

        # 3. PFGM is robust to the Euler step size (PFGM §5), against diffusion
        if "PFGM" in groups and "euler" in groups["PFGM"][0]["solvers"]:
            euler_steps = sorted(p["num_inference_steps"] for p in groups["PFGM"][0]["solvers"]["euler"])
            finest = euler_steps[-1]
            claims.append(
                robustness(
                    f"larger Euler steps (against {finest} steps)",
                    "PFGM §5 (robust to the Euler step size)",
                    [(steps, f"{steps} steps") for steps in euler_steps[:-1]],
                    lambda name, steps: [solver_point(r, "euler", steps) for r in groups[name]],
                    lambda name: [solver_point(r, "euler", finest) for r in groups[name]],
                    name_a="PFGM",
                )
            )

    # 4. Issue 10: few-step sampling
    claims += _few_step_claims(groups, settings)

    # 5. The 2-D toys: likelihood and sliced Wasserstein against D
    for dataset, rows in (toy or {}).items():
        by_dim = _toy_by_dim(rows)
        if "inf" not in by_dim or len(by_dim) < 2:
            continue
        outcomes = {}
        for metric in TOY_METRICS:
            estimates = {
                dim: Estimate([r[metric] for r in rs], [r.get(f"{metric}_se", 0.0) for r in rs])
                for dim, rs in by_dim.items()
            }
            best = min((dim for dim in estimates if dim != "inf"), key=lambda dim: estimates[dim].mean)
            outcomes[metric] = compare(f"D={best}", estimates[best], "D=∞", estimates["inf"], metric)
        claims.append(
            dict(
                claim=f"{dataset}: the best finite D fits better than D = ∞",
                source="PFGM++ §4 (a middle D balances robustness and rigidity)",
                outcomes=outcomes,
            )
        )
    return claims


def _few_step_claims(groups, settings):
    """Issue 10: Heun's reference quality in 17 calls or fewer with the multistep solver (at the best D), and the
    field model's RK45 quality at half of RK45's calls or fewer, with each scheduler solver."""
    evaluation = settings["digits"]["evaluation"]
    reference_steps = evaluation["reference_steps"]
    nfe_reference = 2 * reference_steps - 1
    claims = []
    pfgmpp = [name for name in groups if name.startswith("D=")]
    if pfgmpp:
        key = "frechet_distance"
        best = min(pfgmpp, key=lambda name: badness(reference_points(groups[name], reference_steps), key).mean)
        claim = f"DPM-Solver++(2M) reaches Heun's {nfe_reference}-call quality in ≤ 17 calls (at {best})"
        if "dpmpp_2m" not in groups[best][0]["solvers"]:
            message = ("not measured", "the scheduler has no dpmpp_2m solver in this checkout")
            outcomes = dict.fromkeys(CLAIM_METRICS, message)
        else:
            target = reference_points(groups[best], reference_steps)
            outcomes = {k: _fewest_calls(groups[best], "dpmpp_2m", target, 17, k) for k in CLAIM_METRICS}
        claims.append(dict(claim=claim, source="issue 10", outcomes=outcomes))
    stalled = [r["rk45_stalled"] for r in groups.get("PFGM", []) if "rk45_stalled" in r]
    if stalled:
        message = (
            "did not finish",
            f"{len(stalled)} of {len(groups['PFGM'])} seeds spent {stalled[0]['max_nfe']} calls on "
            f"{stalled[0]['num_images']} images and had reached only z = "
            + ", ".join(f"{s['sigma_reached']:.3g}" for s in stalled),
        )
        claims.append(
            dict(
                claim="The field model's RK45 (official tolerances 1e-4) samples in ~100 calls",
                source="PFGM §4 (≈104 NFE on CIFAR-10, math.md §3)",
                outcomes=dict.fromkeys(CLAIM_METRICS, message),
            )
        )
    if "PFGM" in groups and all("rk45" in r["solvers"] for r in groups["PFGM"]):
        rk45 = [r["solvers"]["rk45"][0] for r in groups["PFGM"]]
        rk45_nfe = float(np.mean([p["nfe"] for p in rk45]))
        for solver in groups["PFGM"][0]["solvers"]:
            if solver != "rk45":
                outcomes = {k: _fewest_calls(groups["PFGM"], solver, rk45, rk45_nfe / 2, k) for k in CLAIM_METRICS}
                claims.append(
                    dict(
                        claim=f"The field model's RK45 quality ({rk45_nfe:.0f} NFE) with {solver} in half the calls",
                        source="issue 10",
                        outcomes=outcomes,
                    )
                )
    return claims


def _fewest_calls(group, solver, target_points, budget, key):
    """(outcome, figures): the fewest calls at which `solver` is not resolved worse than `target_points`."""
    target = badness(target_points, key)
    steps = sorted(p["num_inference_steps"] for p in group[0]["solvers"][solver])
    for n in steps:
        points = [solver_point(r, solver, n) for r in group]
        value = badness(points, key)
        if not target.less_than(value):
            nfe = points[0]["nfe"]
            outcome = "reproduced" if nfe <= budget else "not reproduced"
            return outcome, f"{shown(value, key)} at {nfe:.0f} NFE vs {shown(target, key)}"
    return "not reached", f"worse up to {steps[-1]} steps ({shown(value, key)} vs {shown(target, key)})"


def _toy_by_dim(rows):
    by_dim = {}
    for row in rows:
        by_dim.setdefault("inf" if row["aug_dim"] is None else row["aug_dim"], []).append(row)
    return by_dim


# ---------------------------------------------------------------------- markdown


def _table(header, rows):
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results, toy, settings, environment, command, plots) -> str:
    """The evidence section of docs/benchmarks.md, between its markers."""
    groups = group_by_model(results)
    digits = settings["digits"]
    training, evaluation = digits["training"], digits["evaluation"]
    reference_steps = evaluation["reference_steps"]
    nfe_reference = 2 * reference_steps - 1
    seeds = sorted({r["seed"] for r in results})
    # A PFGM++ model's parameter count: the field model's UNet has one more output channel
    any_result = next((r for r in results if r["objective"] == "pfgmpp"), results[0])
    lines = [START_MARKER, "", "## Evidence: PFGM++ against D, on the digits and on 2-D toys", ""]
    lines += [
        "Written by `benchmarks/evidence/run.py` from its own measurements; do not edit by hand. Rerun:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Measured {environment['date']} on {environment['cpu']}, torch {environment['torch']}, "
        f"{environment['jobs']} jobs at a time of 1 thread each, 1-minute load average "
        f"{environment['load_start']:.1f} at the start and {environment['load_end']:.1f} at the end; wall time "
        f"{environment['wall_seconds'] / 60:.1f} min"
        + (
            f" ({environment['reused_jobs']} of the jobs reused from an earlier run)"
            if environment.get("reused_jobs")
            else ""
        )
        + f"; the jobs took {environment['job_seconds'] / 60:.1f} min in all.",
        "",
        "**Setup.** The embedded digits at their native 8×8 (N = 64), the same UNet for every model "
        "(`pfgm_diffusers/training/configs/unet_digits_8px.json`, the no-argument run's UNet, "
        f"{any_result['parameters'] / 1e6:.2f}M parameters, the field "
        f"model with one more output channel), trained by `training/train_pfgm.py` with batch "
        f"{training['batch_size']}, learning rate {training['learning_rate']:g} (constant after "
        f"{training['lr_warmup_steps']} warm-up steps), EMA {training['ema_max_decay']}, "
        f"in segments ending at {', '.join(map(str, training['segments']))} steps "
        "(`--resume_from_checkpoint latest`, which continues bit for bit), seeds "
        f"{', '.join(map(str, seeds))}. The field model (the original PFGM, D = 1) uses "
        + ", ".join(f"`--{k} {v}`" for k, v in training["field"].items())
        + ". Quality is the offline digits metric of `pfgm_diffusers.evaluation` (a small classifier's features and "
        f"predictions) on {evaluation['num_images']} samples per point, the same latents for every model; "
        "error bars: ± half the range over the seeds + the standard error over the images (a 20-block jackknife for "
        f"the Fréchet distance, a bootstrap of {evaluation['num_bootstrap']} resamples for the shares) of the seed "
        "mean. A difference counts only when it exceeds the sum of both error bars. "
        f"D/N here is D/64: D = 128 at N = 64 is as far from diffusion as D ≈ 6000 at CIFAR-10's N = 3072.",
        "",
    ]

    # Verdicts first
    claims = decide_claims(groups, toy, settings)
    lines += ["### What reproduced at this scale", ""]
    lines += [
        "Each claim is decided on the Fréchet distance and on the confident share separately (the toys: on the NLL "
        "gap and the sliced W2): **reproduced** when the difference in the claimed direction exceeds the sum of the "
        "error bars, **opposite** when it does in the other direction, **not resolved** otherwise.",
        "",
    ]
    rows = []
    for claim in claims:
        cells = []
        for outcome, figures in claim["outcomes"].values():
            cells.append(f"**{outcome}**: {figures}")
        if len(cells) == 1:
            cells.append("")
        rows.append([claim["claim"], claim["source"], *cells])
    lines += [
        _table(["claim", "source", "Fréchet distance (toys: NLL gap)", "confident share (toys: sliced W2)"], rows)
    ]
    lines += ["", _summary(claims), ""]
    lines += [_seed_statement(groups, reference_steps), ""]

    # Training curves
    lines += ["### Training until quality stops improving", ""]
    lines += [
        f"Fréchet distance (lower is better) and confident share of {evaluation['curve_images']} samples "
        f"(Heun, {nfe_reference} NFE) after each segment.",
        "",
    ]
    steps = training["segments"]
    rows = []
    for name, group in groups.items():
        cells = [name]
        for index in range(len(steps)):
            points = [r["curve"][index] for r in group]
            cells.append(f"{estimate(points, 'frechet_distance'):.2f} / {estimate(points, 'confident_share'):.2f}")
        cells.append(_plateau(group))
        rows.append(cells)
    lines += [_table(["model", *[f"{s} steps" for s in steps], "last segment"], rows), ""]
    lines += [f"![training curves]({plots['training']})", ""] if "training" in plots else []
    seconds = {name: np.mean([r["train_seconds"] for r in group]) for name, group in groups.items()}
    lines += [
        "Training wall time per model (all segments, trainer start-up included): "
        + ", ".join(f"{name} {s / 60:.1f} min" for name, s in seconds.items())
        + ".",
        "",
    ]

    # Headline quality beside real digits
    lines += [f"### Quality at Heun {nfe_reference} NFE, beside real held-out digits", ""]
    rows = []
    for name, group in groups.items():
        points = reference_points(group, reference_steps)
        rows.append([name, *[f"{estimate(points, k):{fmt[2:-1]}}" for k, (_, fmt) in METRICS.items()]])
    heldout = reference_points(next(iter(groups.values())), reference_steps)[0]
    rows.append(
        [f"real held-out digits ({heldout['heldout_num_images']})"]
        + [fmt.format(heldout[f"heldout_{k}"]) for k, (_, fmt) in METRICS.items()]
    )
    lines += [_table(["model", *[label for label, _ in METRICS.values()]], rows), ""]
    lines += [
        f"The Fréchet distance of a sample shrinks with its size: the held-out figure is for "
        f"{heldout['heldout_num_images']} real digits, the models' for {heldout['num_images']} samples.",
        "",
    ]

    # Quality against NFE
    lines += ["### Quality against network evaluations", ""]
    for name, group in groups.items():
        rows = []
        for solver, points in group[0]["solvers"].items():
            for point in points:
                n = point["num_inference_steps"]
                per_seed = [
                    r["solvers"][solver][[p["num_inference_steps"] for p in r["solvers"][solver]].index(n)]
                    for r in group
                ]
                rows.append(
                    [
                        solver,
                        "adaptive" if n is None else n,
                        f"{np.mean([p['nfe'] for p in per_seed]):.0f}",
                        f"{estimate(per_seed, 'frechet_distance'):.2f}",
                        f"{estimate(per_seed, 'confident_share'):.3f}",
                    ]
                )
        lines += [
            f"**{name}**",
            "",
            _table(["solver", "steps", "NFE", "Fréchet distance", "confident share"], rows),
            "",
        ]
    lines += [f"![quality against NFE]({plots['nfe']})", ""] if "nfe" in plots else []

    # Robustness
    lines += ["### Robustness: injected noise and quantised weights (PFGM++ §5)", ""]
    lines += [
        f"Heun, {nfe_reference} NFE. Injected noise: x ← x + α σ_i ε after every step but the last (σ_i the level the "
        "step reached, z in the field model). Quantisation: every parameter tensor rounded to 2^bits levels between "
        "its minimum and maximum. Fréchet distance:",
        "",
    ]
    rows = []
    for name, group in groups.items():
        cells = [name, f"{estimate(reference_points(group, reference_steps), 'frechet_distance'):.2f}"]
        for alpha in evaluation["noise_scales"]:
            cells.append(f"{estimate(level_points(group, 'noise', 'alpha', alpha), 'frechet_distance'):.2f}")
        for bits in evaluation["quantization_bits"]:
            cells.append(f"{estimate(level_points(group, 'quantization', 'bits', bits), 'frechet_distance'):.2f}")
        rows.append(cells)
    header = [
        "model",
        "reference",
        *[f"α = {a}" for a in evaluation["noise_scales"]],
        *[f"{b} bits" for b in evaluation["quantization_bits"]],
    ]
    lines += [_table(header, rows), ""]
    lines += [f"![robustness]({plots['robustness']})", ""] if "robustness" in plots else []

    # Toys
    if toy:
        toy_settings = settings["toy"]
        lines += ["### 2-D toys with a known density", ""]
        lines += [
            f"An MLP denoiser (3 × 128 SiLU) with the PFGM++ objective and the scheduler's preconditioning, "
            f"{toy_settings['num_steps']} Adam steps of {toy_settings['batch_size']} fresh samples, EMA; seeds "
            f"{', '.join(map(str, toy_settings['seeds']))}. Sliced W2 (256 projections) between "
            f"{toy_settings['num_samples']} samples (Heun, {2 * toy_settings['num_inference_steps'] - 1} NFE) and as "
            "many fresh true samples (the floor row: two sets of true samples); NLL from the probability-flow ODE "
            f"(RK45 1e-5, exact divergence) on {toy_settings['num_test']} fresh test points, minus the true density's "
            "NLL on the same points (an estimate of KL(data ‖ model), ≥ 0 up to noise).",
            "",
        ]
        for dataset, rows_ in toy.items():
            by_dim = _toy_by_dim(rows_)
            rows = []
            for dim, rs in by_dim.items():
                rows.append(
                    [
                        f"D={dim}",
                        f"{Estimate([r['sliced_wasserstein'] for r in rs]):.4f}",
                        f"{Estimate([r['nll_gap'] for r in rs], [r['nll_gap_se'] for r in rs]):.4f}",
                        f"{np.mean([r['nll'] for r in rs]):.4f}",
                    ]
                )
            floor = rows_[0]
            rows.append(
                ["true samples (floor)", f"{floor['sliced_wasserstein_floor']:.4f}", "0", f"{floor['true_nll']:.4f}"]
            )
            lines += [f"**{dataset}**", "", _table(["model", "sliced W2", "NLL gap (nats)", "NLL (nats)"], rows), ""]
        lines += [f"![toys]({plots['toy']})", ""] if "toy" in plots else []
    lines += [END_MARKER]
    return "\n".join(lines) + "\n"


def _plateau(group):
    """'improving' if the last segment lowered the Fréchet distance by more than its error bars, else 'flat'."""
    if len(group[0]["curve"]) < 2:
        return "one segment"
    last = estimate([r["curve"][-1] for r in group], "frechet_distance")
    before = estimate([r["curve"][-2] for r in group], "frechet_distance")
    if last.less_than(before):
        return f"still improving ({before.mean:.2f} → {last.mean:.2f})"
    if before.less_than(last):
        return f"worse ({before.mean:.2f} → {last.mean:.2f})"
    return "flat within error bars"


def _summary(claims):
    """The claims grouped by what both figures say, in plain words."""
    groups = {}
    for claim in claims:
        outcomes = [outcome for outcome, _ in claim["outcomes"].values()]
        if len(set(outcomes)) == 1:
            verdict = outcomes[0]
        elif "reproduced" in outcomes and "opposite" in outcomes:
            verdict = "contradictory (one figure each way)"
        elif "reproduced" in outcomes:
            verdict = "reproduced on one figure, not the other"
        elif any("opposite" in outcome for outcome in outcomes):
            verdict = "opposite on one figure, not the other"
        else:
            verdict = "partly (see the table)"
        groups.setdefault(verdict, []).append(claim["claim"])
    order = ["reproduced", "reproduced on one figure, not the other", "partly reproduced", "not resolved"]
    order += [verdict for verdict in groups if verdict not in order]
    parts = [
        f"**{verdict[0].upper() + verdict[1:]}**: " + "; ".join(groups[verdict]) + "."
        for verdict in order
        if verdict in groups
    ]
    return "In words (both figures together): " + " ".join(parts)


def _seed_statement(groups, reference_steps):
    spreads = {
        name: Estimate([p["frechet_distance"] for p in reference_points(group, reference_steps)]).spread
        for name, group in groups.items()
    }
    if max(len(group) for group in groups.values()) < 2:
        return "Seed spread: one seed per model, no spread measured."
    name = max(spreads, key=spreads.get)
    return (
        "Seed spread (half the range of the Fréchet distance over seeds, Heun reference): "
        + ", ".join(f"{n} {s:.2f}" for n, s in spreads.items())
        + f"; the largest is {name}'s."
    )


def rewrite_docs(path, section):
    """Replace the part of `path` between the evidence markers by `section` (appended if the markers are absent); the
    rest of the file is kept byte for byte, and the file is replaced atomically."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER) + r"\n?", re.DOTALL)
    matches = pattern.findall(text)
    if len(matches) > 1:
        raise ValueError(f"{path} holds {len(matches)} evidence sections; expected at most one")
    if matches:
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


# ---------------------------------------------------------------------- plots


def plot_all(results, toy, settings, folder, prefix="evidence_") -> dict:
    """The PNG plots (small, 100 dpi) into `folder`; returns {kind: file name}."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_by_model(results)
    evaluation = settings["digits"]["evaluation"]
    reference_steps = evaluation["reference_steps"]
    # D from small (dark) to infinity (light green), the field model in red
    dims = [name for name in groups if name != "PFGM"]
    colours = {name: plt.get_cmap("viridis")(0.85 * i / max(len(dims) - 1, 1)) for i, name in enumerate(dims)}
    colours["PFGM"] = "tab:red"
    written = {}

    def save(fig, kind):
        name = f"{prefix}{kind}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=80)
        plt.close(fig)
        written[kind] = name

    def log_y(ax):
        # Labels at 1, 2 and 5 times a power of ten only: labelled minor ticks overlap on a log axis
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    def errorbar(ax, x, estimates, name, **kwargs):
        ax.errorbar(x, [e.mean for e in estimates], yerr=[e.error for e in estimates], color=colours[name],
                    capsize=2, marker="o", markersize=3, label=name, **kwargs)  # fmt: skip

    # Training curves
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, group in groups.items():
        steps = [p["steps"] for p in group[0]["curve"]]
        for ax, key in zip(axes, ("frechet_distance", "confident_share"), strict=True):
            errorbar(ax, steps, [estimate([r["curve"][i] for r in group], key) for i in range(len(steps))], name)
    heldout = group[0]["curve"][-1]
    for ax, key in zip(axes, ("frechet_distance", "confident_share"), strict=True):
        ax.axhline(heldout[f"heldout_{key}"], color="k", linestyle=":", linewidth=1, label="real held-out")
        ax.set_xlabel("training steps")
        ax.set_ylabel(METRICS[key][0])
    log_y(axes[0])
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Quality during training (Heun, {2 * reference_steps - 1} NFE)", fontsize=10)
    save(fig, "training")

    # Quality against NFE
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    styles = {"heun": "-", "euler": ":", "dpmpp_2m": "--"}
    for name, group in groups.items():
        for solver, points in group[0]["solvers"].items():
            per_n = [[r["solvers"][solver][i] for r in group] for i in range(len(points))]
            nfe = [np.mean([p["nfe"] for p in ps]) for ps in per_n]
            for ax, key in zip(axes, ("frechet_distance", "confident_share"), strict=True):
                estimates = [estimate(ps, key) for ps in per_n]
                if solver == "rk45":
                    ax.errorbar(
                        nfe,
                        [e.mean for e in estimates],
                        yerr=[e.error for e in estimates],
                        color=colours[name],
                        marker="*",
                        markersize=9,
                        linestyle="none",
                        label=f"{name} rk45",
                    )
                else:
                    ax.errorbar(
                        nfe,
                        [e.mean for e in estimates],
                        yerr=[e.error for e in estimates],
                        color=colours[name],
                        linestyle=styles.get(solver, "-."),
                        marker=".",
                        capsize=2,
                        label=f"{name} {solver}" if solver != "heun" else name,
                    )
    for ax, key in zip(axes, ("frechet_distance", "confident_share"), strict=True):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([5, 7, 10, 15, 20, 35]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(METRICS[key][0])
    log_y(axes[0])
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("Quality against NFE (solid Heun, dotted Euler, dashed DPM-Solver++(2M), star RK45)", fontsize=10)
    save(fig, "nfe")

    # Robustness
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, group in groups.items():
        reference = reference_points(group, reference_steps)
        alphas = [0.0, *evaluation["noise_scales"]]
        noise = [reference] + [
            [next(p for p in r["noise"] if p["alpha"] == a) for r in group] for a in evaluation["noise_scales"]
        ]
        errorbar(axes[0], alphas, [estimate(ps, "frechet_distance") for ps in noise], name)
        bits = evaluation["quantization_bits"]
        quantized = [level_points(group, "quantization", "bits", b) for b in bits]
        errorbar(axes[1], bits, [estimate(ps, "frechet_distance") for ps in quantized], name)
    axes[0].set_xlabel("injected noise α")
    axes[1].set_xlabel("weight bits (per-tensor min-max)")
    for ax in axes:
        ax.set_ylabel("Fréchet distance")
        log_y(ax)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Robustness (Heun, {2 * reference_steps - 1} NFE)", fontsize=10)
    save(fig, "robustness")

    # Toys
    if toy:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for i, (dataset, rows) in enumerate(toy.items()):
            by_dim = _toy_by_dim(rows)
            dims = list(by_dim)
            x = np.arange(len(dims))
            for ax, metric in zip(axes, ("sliced_wasserstein", "nll_gap"), strict=True):
                estimates = [
                    Estimate([r[metric] for r in by_dim[d]], [r.get(f"{metric}_se", 0.0) for r in by_dim[d]])
                    for d in dims
                ]
                ax.errorbar(
                    x + 0.1 * i,
                    [e.mean for e in estimates],
                    yerr=[e.error for e in estimates],
                    marker="o",
                    capsize=2,
                    label=dataset,
                )
                ax.set_xticks(x, [f"{d}" for d in dims])
                ax.set_xlabel("D")
            axes[0].axhline(rows[0]["sliced_wasserstein_floor"], color=f"C{i}", linestyle=":", linewidth=1)
        axes[0].set_ylabel("sliced W2 to true samples")
        axes[1].set_ylabel("NLL − true NLL (nats)")
        axes[1].legend(fontsize=7)
        fig.suptitle("2-D toys: sample distance and likelihood against D (dotted: true-sample floor)", fontsize=10)
        save(fig, "toy")
    return written
