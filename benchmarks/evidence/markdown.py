"""The evidence section of docs/benchmarks.md, written from the sweep's results and the claims' verdicts, and its
rewrite between the markers."""

import numpy as np
from aug_dim_sweep.report import QUICK_BANNER, restart_section, rewrite_section, table, target_section
from aug_dim_sweep.statistics import (
    Estimate,
    estimate,
    fully_measured,
    group_by_model,
    level_points,
    reference_points,
)

from .claims import decide_claims, toy_by_dim

START_MARKER = "<!-- evidence:start -->"
END_MARKER = "<!-- evidence:end -->"
METRICS = {
    "frechet_distance": ("Fréchet distance", "{:.2f}"),
    "confident_share": ("confident share", "{:.3f}"),
    "class_coverage": ("class coverage", "{:.2f}"),
}


def header_lines(results, settings, environment, command) -> list[str]:
    digits = settings["digits"]
    training, evaluation = digits["training"], digits["evaluation"]
    seeds = sorted({r["seed"] for r in results})
    # A PFGM++ model's parameter count: the field model's UNet has one more output channel
    any_result = next((r for r in results if r["objective"] == "pfgmpp"), results[0])
    reused = environment.get("reused_jobs")
    return [
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
        + (f" ({reused} of the jobs reused from an earlier run)" if reused else "")
        + f"; the jobs took {environment['job_seconds'] / 60:.1f} min in all.",
        "",
        "**Setup.** The embedded digits at their native 8×8 (N = 64), the same UNet for every model "
        "(`pfgm_diffusers/training/configs/unet_digits_8px.json`, the no-argument run's UNet, "
        f"{any_result['parameters'] / 1e6:.2f}M parameters, the field model with one more output channel), trained "
        f"by `training/train_pfgm.py` with batch {training['batch_size']}, learning rate "
        f"{training['learning_rate']:g} (constant after {training['lr_warmup_steps']} warm-up steps), EMA "
        f"{training['ema_max_decay']}, in segments ending at {', '.join(map(str, training['segments']))} steps "
        "(`--resume_from_checkpoint latest`, which continues bit for bit), seeds "
        f"{', '.join(map(str, seeds))}. The field model (the original PFGM, D = 1) uses "
        + ", ".join(f"`--{k} {v}`" for k, v in training["field"].items())
        + ". Samples come from the library's solvers (`pfgm_diffusers.ode`) with the pipeline's denoiser. Quality is "
        "the offline digits metric of `pfgm_diffusers.evaluation` (a small classifier's features and predictions) on "
        f"{evaluation['num_images']} samples per point, the same latents for every model; error bars: ± half the "
        "range over the seeds + the standard error over the images (a 20-block jackknife for the Fréchet distance, "
        f"a bootstrap of {evaluation['num_bootstrap']} resamples for the shares) of the seed mean. A difference "
        "counts only when it exceeds the sum of both error bars. D/N here is D/64: D = 128 at N = 64 is as far from "
        "diffusion as D ≈ 6000 at CIFAR-10's N = 3072.",
        "",
    ]


def verdict_summary(claims) -> str:
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
    parts = [f"**{v[0].upper() + v[1:]}**: " + "; ".join(groups[v]) + "." for v in order if v in groups]
    return "In words (both figures together): " + " ".join(parts)


def seed_statement(groups, reference_steps) -> str:
    if max(len(group) for group in groups.values()) < 2:
        return "Seed spread: one seed per model, no spread measured."
    spreads = {
        name: Estimate.of([p["frechet_distance"] for p in reference_points(group, reference_steps)]).spread
        for name, group in groups.items()
    }
    name = max(spreads, key=spreads.get)
    return (
        "Seed spread (half the range of the Fréchet distance over seeds, Heun reference): "
        + ", ".join(f"{n} {s:.2f}" for n, s in spreads.items())
        + f"; the largest is {name}'s."
    )


def verdict_lines(claims, groups, reference_steps) -> list[str]:
    rows = []
    for claim in claims:
        cells = [f"**{outcome}**: {figures}" for outcome, figures in claim["outcomes"].values()]
        rows.append([claim["claim"], claim["source"], *cells, *[""] * (2 - len(cells))])
    header = ["claim", "source", "Fréchet distance (toys: NLL gap)", "confident share (toys: sliced W2)"]
    return [
        "### What reproduced at this scale",
        "",
        "Each claim is decided on the Fréchet distance and on the confident share separately (the toys: on the NLL "
        "gap and the sliced W2): **reproduced** when the difference in the claimed direction exceeds the sum of the "
        "error bars, **opposite** when it does in the other direction, **not resolved** otherwise.",
        "",
        table(header, rows),
        "",
        verdict_summary(claims),
        "",
        seed_statement(groups, reference_steps),
        "",
    ]


def plateau(group) -> str:
    """'still improving' if the last segment lowered the Fréchet distance by more than its error bars."""
    if len(group[0]["curve"]) < 2:
        return "one segment"
    last = estimate([r["curve"][-1] for r in group], "frechet_distance")
    before = estimate([r["curve"][-2] for r in group], "frechet_distance")
    if last.less_than(before):
        return f"still improving ({before.mean:.2f} → {last.mean:.2f})"
    if before.less_than(last):
        return f"worse ({before.mean:.2f} → {last.mean:.2f})"
    return "flat within error bars"


def training_lines(groups, settings, plots) -> list[str]:
    evaluation, steps = settings["digits"]["evaluation"], settings["digits"]["training"]["segments"]
    rows = []
    for name, group in groups.items():
        cells = [name]
        for index in range(len(steps)):
            points = [r["curve"][index] for r in group]
            cells.append(f"{estimate(points, 'frechet_distance'):.2f} / {estimate(points, 'confident_share'):.2f}")
        rows.append([*cells, plateau(group)])
    seconds = {name: np.mean([r["train_seconds"] for r in group]) for name, group in groups.items()}
    return [
        "### Training until quality stops improving",
        "",
        f"Fréchet distance (lower is better) and confident share of {evaluation['curve_images']} samples "
        f"(Heun, {2 * evaluation['reference_steps'] - 1} NFE) after each segment.",
        "",
        table(["model", *[f"{s} steps" for s in steps], "last segment"], rows),
        "",
        *([f"![training curves]({plots['training']})", ""] if "training" in plots else []),
        "Training wall time per model (all segments, trainer start-up included): "
        + ", ".join(f"{name} {s / 60:.1f} min" for name, s in seconds.items())
        + ".",
        "",
    ]


def headline_lines(groups, reference_steps) -> list[str]:
    rows = []
    for name, group in groups.items():
        points = reference_points(group, reference_steps)
        rows.append([name, *[f"{estimate(points, k):{fmt[2:-1]}}" for k, (_, fmt) in METRICS.items()]])
    heldout = reference_points(next(iter(groups.values())), reference_steps)[0]
    rows.append(
        [f"real held-out digits ({heldout['heldout_num_images']})"]
        + [fmt.format(heldout[f"heldout_{k}"]) for k, (_, fmt) in METRICS.items()]
    )
    return [
        f"### Quality at Heun {2 * reference_steps - 1} NFE, beside real held-out digits",
        "",
        table(["model", *[label for label, _ in METRICS.values()]], rows),
        "",
        f"The Fréchet distance of a sample shrinks with its size: the held-out figure is for "
        f"{heldout['heldout_num_images']} real digits, the models' for {heldout['num_images']} samples.",
        "",
    ]


def nfe_lines(groups, plots) -> list[str]:
    lines = ["### Quality against network evaluations", ""]
    for name, group in groups.items():
        rows = []
        for solver, points in group[0]["solvers"].items():
            for index, point in enumerate(points):
                per_seed = [r["solvers"][solver][index] for r in group]
                n = point["num_inference_steps"]
                rows.append(
                    [
                        solver,
                        "adaptive" if n is None else n,
                        f"{np.mean([p['nfe'] for p in per_seed]):.0f}",
                        f"{estimate(per_seed, 'frechet_distance'):.2f}",
                        f"{estimate(per_seed, 'confident_share'):.3f}",
                    ]
                )
        header = ["solver", "steps", "NFE", "Fréchet distance", "confident share"]
        lines += [f"**{name}**", "", table(header, rows), ""]
    return lines + ([f"![quality against NFE]({plots['nfe']})", ""] if "nfe" in plots else [])


ROBUSTNESS_METHOD = (
    "Both experiments are the official PFGM++ code's (Newbeeer/pfgmpp). Injected noise (`generate_alpha.py`): x ← x + "
    "α σ_i ε before the network's first call of every Heun step, the first (at σ_max) and the last (to 0) included "
    "(z_i in the field model). Quantisation (`generate_quant.py`): the weights of the convolutions and linear layers, "
    "per tensor, asymmetric min–max with a zero point (scale = (max − min)/(2^b − 1), zp = int(clamp(−min/scale)), "
    "w ← scale·(round(clamp(zp + w/scale)) − zp)); biases, normalisation layers and the noise/class embeddings stay "
    "in full precision."
)


def robustness_lines(groups, settings, plots) -> list[str]:
    evaluation = settings["digits"]["evaluation"]
    reference_steps = evaluation["reference_steps"]
    rows = []
    for name, group in fully_measured(groups).items():
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
    return [
        "### Robustness: injected noise and quantised weights (PFGM++ §5)",
        "",
        f"Heun, {2 * reference_steps - 1} NFE. {ROBUSTNESS_METHOD} Fréchet distance:",
        "",
        table(header, rows),
        "",
        *([f"![robustness]({plots['robustness']})", ""] if "robustness" in plots else []),
    ]


def toy_lines(toy, settings, plots) -> list[str]:
    if not toy:
        return []
    toy_settings = settings["toy"]
    lines = [
        "### 2-D toys with a known density",
        "",
        f"An MLP denoiser (3 × 128 SiLU) trained with the library's `pfgmpp_loss` (the PFGM++ objective and the "
        f"scheduler's preconditioning), {toy_settings['num_steps']} Adam steps of {toy_settings['batch_size']} fresh "
        f"samples, EMA; seeds {', '.join(map(str, toy_settings['seeds']))}. Sliced W2 (256 projections) between "
        f"{toy_settings['num_samples']} samples (the library's Heun, {2 * toy_settings['num_inference_steps'] - 1} "
        "NFE) and as many fresh true samples (the floor row: two sets of true samples); NLL from the probability-flow "
        f"ODE (RK45 1e-5, exact divergence) on {toy_settings['num_test']} fresh test points, minus the true density's "
        "NLL on the same points (an estimate of KL(data ‖ model), ≥ 0 up to noise).",
        "",
    ]
    for dataset, rows_ in toy.items():
        rows = []
        for dim, rs in toy_by_dim(rows_).items():
            rows.append(
                [
                    f"D={dim}",
                    f"{Estimate.of([r['sliced_wasserstein'] for r in rs]):.4f}",
                    f"{Estimate.of([r['nll_gap'] for r in rs], [r['nll_gap_se'] for r in rs]):.4f}",
                    f"{np.mean([r['nll'] for r in rs]):.4f}",
                ]
            )
        floor = rows_[0]
        rows.append(
            ["true samples (floor)", f"{floor['sliced_wasserstein_floor']:.4f}", "0", f"{floor['true_nll']:.4f}"]
        )
        lines += [f"**{dataset}**", "", table(["model", "sliced W2", "NLL gap (nats)", "NLL (nats)"], rows), ""]
    return lines + ([f"![toys]({plots['toy']})", ""] if "toy" in plots else [])


# The two claim metrics in the layout of the sweep's report sections: {key: (label, format, higher is better)}
SECTION_METRICS = {
    "frechet_distance": ("Fréchet distance", "{:.2f}", False),
    "confident_share": ("confident share", "{:.3f}", True),
}


def followup_lines(groups, settings) -> list[str]:
    """The authors' follow-ups: STF at equal training steps and Restart at equal NFE (the sweep's report sections)."""
    digits = settings["digits"]
    reference_steps, segments = digits["evaluation"]["reference_steps"], digits["training"]["segments"]
    lines = target_section(groups, SECTION_METRICS, segments, reference_steps)
    if lines:
        lines += [
            f"STF's reference batch: {digits['training'].get('reference_batch_size') or 'the trainer default'} images "
            "per step (the official README's 1024; the code's default 4096 exceeds the 1797 digits), the training "
            "batch its first rows.",
            "",
        ]
    return lines + restart_section(groups, SECTION_METRICS)


def markdown(results, toy, settings, environment, command, plots, quick=False, banner=None) -> str:
    """The evidence section of docs/benchmarks.md, between its markers; `quick` adds the machinery-check banner,
    `banner` (markdown) another one, e.g. the reduced settings'."""
    groups = group_by_model(results)
    reference_steps = settings["digits"]["evaluation"]["reference_steps"]
    lines = [START_MARKER, "", "## Evidence: PFGM++ against D, on the digits and on 2-D toys", ""]
    lines += [QUICK_BANNER, ""] if quick else []
    lines += [banner, ""] if banner else []
    lines += header_lines(results, settings, environment, command)
    lines += verdict_lines(decide_claims(groups, toy, settings), groups, reference_steps)
    lines += training_lines(groups, settings, plots)
    lines += headline_lines(groups, reference_steps)
    lines += nfe_lines(groups, plots)
    lines += robustness_lines(groups, settings, plots)
    lines += followup_lines(groups, settings)
    lines += toy_lines(toy, settings, plots)
    return "\n".join([*lines, END_MARKER]) + "\n"


def rewrite_docs(path, section):
    """Replace the part of `path` between the evidence markers by `section` (`report.rewrite_section`)."""
    rewrite_section(path, section, START_MARKER, END_MARKER, "evidence")
