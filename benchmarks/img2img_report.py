"""The image-to-image evidence's report: tables, verdicts and plots from `img2img_evidence.py`'s results, and the
rewrite of its section of docs/benchmarks.md between its markers.

Error bars are the D sweep's (`aug_dim_sweep.statistics.Estimate`): a figure is the mean over seeds ± (half the range
over the seeds + the standard error over the images of the seed mean); a difference counts only when it is larger
than the sum of both error bars.
"""

import argparse

from aug_dim_sweep import plots as sweep_plots
from aug_dim_sweep.report import rewrite_section
from aug_dim_sweep.statistics import Estimate

START_MARKER = "<!-- img2img-evidence:start -->"
END_MARKER = "<!-- img2img-evidence:end -->"
# task: its section's markers, plot-name prefix and heading, and the symbol of the measurement's error level (the
# level the hijack's start is matched to): sigma_y for denoising, the RMS of y - x (sigma_m) for super-resolution.
TASKS = {
    "denoise": dict(
        markers=(START_MARKER, END_MARKER),
        prefix="img2img_",
        heading="## Evidence: does a small D help image-to-image? (PPFM at CPU scale)",
        level="σ_y",
    ),
    "superres": dict(
        markers=("<!-- img2img-evidence-superres:start -->", "<!-- img2img-evidence-superres:end -->"),
        prefix="img2img_superres_",
        heading="### The same on super-resolution",
        level="σ_m",
    ),
}
# metric: (label, scale, format)
METRICS = {
    "psnr": ("PSNR (dB)", 1.0, "{:.2f}"),
    "ssim": ("SSIM", 1.0, "{:.3f}"),
    "accuracy": ("label acc. (%)", 100.0, "{:.1f}"),
}
PRIOR_NFE = 35


def task_of(results) -> dict:
    """The `TASKS` entry of a run (a results JSON from before `--task` is a denoising run)."""
    return TASKS[results["settings"].get("task", "denoise")]


def dim_name(aug_dim) -> str:
    return "∞" if aug_dim in (None, "inf") else str(aug_dim)


def estimate(runs, metric, scale=1.0) -> Estimate:
    """The seeds' `metric` as an Estimate (each run's standard error over its images is `metric + "_sem"`)."""
    return Estimate.of([scale * r[metric] for r in runs], [scale * r[f"{metric}_sem"] for r in runs])


def show(value: Estimate, metric) -> str:
    fmt = METRICS[metric][2]
    return f"{fmt.format(value.mean)} ± {fmt.format(value.error)}"


def select(results, aug_dim, sampler="hijack", start=None, nfe=None) -> list:
    """The per-seed runs of one model and sampling setting, ordered by seed."""
    runs = [
        r
        for r in results["runs"]
        if r["aug_dim"] == aug_dim
        and r["sampler"] == sampler
        and (sampler != "hijack" or (r["start"], r["nfe"]) == (start, nfe))
    ]
    if not runs:
        raise ValueError(f"no runs for D={dim_name(aug_dim)}, {sampler}, start={start}, nfe={nfe}")
    return sorted(runs, key=lambda r: r["seed"])


def dims_of(results) -> list:
    return list(dict.fromkeys(r["aug_dim"] for r in results["runs"]))


def measurement_line(results) -> str:
    """The degraded input's own figures (the same digits and noise for every model of a seed)."""
    runs = [r for r in results["runs"] if r["aug_dim"] == dims_of(results)[0] and r["sampler"] == "prior_heun"]
    parts = [f"{METRICS[m][0]} {show(estimate(runs, 'degraded_' + m, METRICS[m][1]), m)}" for m in METRICS]
    return "The measurement y itself: " + ", ".join(parts) + "."


def nfe_table(results, metric) -> list[str]:
    """Rows D × start level, columns NFE (hijack) and the prior's Heun 35."""
    settings = results["settings"]
    nfes, scale, level = settings["nfes"], METRICS[metric][1], task_of(results)["level"]
    lines = [
        f"| D | start / {level} | {' | '.join(f'NFE {n}' for n in nfes)} | prior, Heun {PRIOR_NFE} |",
        "|---|---|" + "---|" * (len(nfes) + 1),
    ]
    for aug_dim in dims_of(results):
        prior = show(estimate(select(results, aug_dim, "prior_heun"), metric, scale), metric)
        for factor in settings["start_factors"]:
            cells = [
                show(estimate(select(results, aug_dim, start=factor, nfe=n), metric, scale), metric) for n in nfes
            ]
            last = prior if factor == 1.0 else ""
            lines.append(f"| {dim_name(aug_dim)} | {factor:g} | " + " | ".join(cells) + f" | {last} |")
    return lines


def comparisons(results) -> list[dict]:
    """Each finite D against D = ∞ for every metric, start level and NFE, and from the prior: which is better, by
    more than the error bars (higher is better for all three metrics)."""
    dims = dims_of(results)
    if None not in dims and "inf" not in dims:
        return []
    infinite = None if None in dims else "inf"
    settings, found = results["settings"], []
    cases = [("hijack", f, n) for f in settings["start_factors"] for n in settings["nfes"]] + [
        ("prior_heun", None, None)
    ]
    for aug_dim in [d for d in dims if d != infinite]:
        for metric, (_, scale, _) in METRICS.items():
            for sampler, factor, nfe in cases:
                finite = estimate(select(results, aug_dim, sampler, factor, nfe), metric, scale)
                diffusion = estimate(select(results, infinite, sampler, factor, nfe), metric, scale)
                outcome = "finite" if diffusion.less_than(finite) else "inf" if finite.less_than(diffusion) else "none"
                found.append(
                    dict(
                        aug_dim=aug_dim,
                        metric=metric,
                        sampler=sampler,
                        start=factor,
                        nfe=nfe,
                        finite=finite,
                        diffusion=diffusion,
                        outcome=outcome,
                    )
                )
    return found


def verdict_lines(results) -> list[str]:
    """Words for the two PPFM claims, decided by `comparisons`."""
    found, level = comparisons(results), task_of(results)["level"]
    if not found:
        return ["No D = ∞ model in this run: the claims compare a finite D with diffusion, nothing decided."]

    def outcome_text(case):
        what = {"finite": "finite D better", "inf": "D = ∞ better (the opposite)", "none": "not resolved"}
        metric = case["metric"]
        figures = (
            f"D={dim_name(case['aug_dim'])} {show(case['finite'], metric)} vs ∞ {show(case['diffusion'], metric)}"
        )
        return f"{what[case['outcome']]} ({figures})"

    lines = [
        "**Claim 1 (PPFM): at one network evaluation from the measurement at its true noise level, a finite D is "
        "better than diffusion.**"
    ]
    for case in found:
        if case["sampler"] == "hijack" and case["start"] == 1.0 and case["nfe"] == 1:
            lines.append(f"- D = {dim_name(case['aug_dim'])}, {METRICS[case['metric']][0]}: {outcome_text(case)}")
    lines += [
        "",
        "**Claim 2: a heavy-tailed kernel (finite D) tolerates a start level that does not match the "
        f"measurement's noise (0.5× and 2× {level}) better than diffusion.**",
    ]
    for case in found:
        if case["sampler"] == "hijack" and case["start"] != 1.0 and case["nfe"] == 1:
            lines.append(
                f"- D = {dim_name(case['aug_dim'])}, start {case['start']:g}× {level}, NFE 1, "
                f"{METRICS[case['metric']][0]}: {outcome_text(case)}"
            )
    counts = {key: sum(c["outcome"] == key for c in found) for key in ("finite", "inf", "none")}
    lines += [
        "",
        f"Over all {len(found)} comparisons of a finite D with D = ∞ (every metric, start level and NFE, and the "
        f"prior's Heun {PRIOR_NFE}): finite D better by more than the error bars in {counts['finite']}, D = ∞ better "
        f"in {counts['inf']}, not resolved in {counts['none']}.",
    ]
    opposite = [c for c in found if c["outcome"] == "inf"]
    if opposite:
        lines.append("Where D = ∞ was better: " + "; ".join(describe(c) for c in opposite) + ".")
    better = [c for c in found if c["outcome"] == "finite"]
    if better:
        lines.append("Where a finite D was better: " + "; ".join(describe(c) for c in better) + ".")
    return lines


def relation(a: Estimate, b: Estimate) -> str:
    """'above', 'below' or 'within the error bars of' (a against b, by more than the sum of both error bars)."""
    return "above" if b.less_than(a) else "below" if a.less_than(b) else "within the error bars of"


def observation_lines(results) -> list[str]:
    """PSNR, per D: the measurement against one evaluation from it, one evaluation against the most (more steps from
    y sample the posterior instead of its mean), and the prior's Heun 35 against one evaluation from y."""
    settings = results["settings"]
    last = max(settings["nfes"])
    lines = ["**Other observations (PSNR, matched start):**"]
    for aug_dim in dims_of(results):
        one = estimate(select(results, aug_dim, start=1.0, nfe=1), "psnr")
        many = estimate(select(results, aug_dim, start=1.0, nfe=last), "psnr")
        prior_runs = select(results, aug_dim, "prior_heun")
        prior, measured = estimate(prior_runs, "psnr"), estimate(prior_runs, "degraded_psnr")
        lines.append(
            f"- D = {dim_name(aug_dim)}: NFE 1 {one:.2f} is {relation(one, measured)} the measurement "
            f"{measured:.2f}; NFE {last} {many:.2f} is {relation(many, one)} NFE 1; the prior's Heun "
            f"{PRIOR_NFE} {prior:.2f} is {relation(prior, one)} NFE 1 from y."
        )
    return lines


def describe(case) -> str:
    where = (
        f"prior Heun {PRIOR_NFE}"
        if case["sampler"] == "prior_heun"
        else f"start {case['start']:g}×, NFE {case['nfe']}"
    )
    return f"D={dim_name(case['aug_dim'])} {METRICS[case['metric']][0]} at {where}"


def _seeds_of(results, aug_dim) -> list:
    """The plateau records (one per seed) of the models at `aug_dim`."""
    return [p for p in results.get("plateaus") or [] if p["aug_dim"] == aug_dim]


def _checkpoint_figures(results, aug_dim, step) -> list:
    """Each seed's plateau figures of one model at `step` (the JSON keeps steps as strings)."""
    figures = [p["steps"].get(str(step), p["steps"].get(step)) for p in _seeds_of(results, aug_dim)]
    return [f for f in figures if f is not None]


def _psnr(figures, sampler="hijack_nfe1") -> Estimate:
    """The seeds' PSNR of one checkpoint: at NFE 1 from y (`"hijack_nfe1"`) or from the prior (`"prior_heun"`)."""
    return Estimate.of([f[sampler]["psnr"] for f in figures], [f[sampler]["psnr_sem"] for f in figures])


def _steps_of(results, aug_dim) -> list:
    return sorted({int(s) for p in _seeds_of(results, aug_dim) for s in p["steps"]})


def plateau_lines(results) -> list[str]:
    """The training plateau: the learning rate, the mean training loss and the NFE-1 (matched) and prior figures at
    each checkpoint."""
    from img2img_evidence import learning_rate_factor  # the schedule the models were trained with

    if not results.get("plateaus"):
        return []
    settings = argparse.Namespace(**{"decay_steps": 0, **results["settings"]})
    lines = [
        "| D | step | learning rate | training loss | PSNR, NFE 1 from y (dB) | PSNR, prior Heun 35 (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for aug_dim in dims_of(results):
        for step in _steps_of(results, aug_dim):
            figures = _checkpoint_figures(results, aug_dim, step)
            rate = settings.learning_rate * learning_rate_factor(step - 1, settings)  # the rate of the last step
            loss = Estimate.of([f["loss"] for f in figures])
            prior = _psnr(figures, "prior_heun")
            lines.append(
                f"| {dim_name(aug_dim)} | {step} | {rate:.2g} | {loss:.4f} | {_psnr(figures):.2f} | {prior:.2f} |"
            )
    return lines


def plateau_verdict_lines(results) -> list[str]:
    """Whether the evaluated models sit on a plateau: per D, the PSNR at the evaluated checkpoint E (`evaluate_step`,
    default the last) against its neighbours (the checkpoints before and after E; for the last, the last one at or
    before 7/8 of the steps), each change against E's error bar; at NFE 1 from y (what the claims compare) and from
    the prior."""
    lines = []
    for aug_dim in dims_of(results):
        steps = _steps_of(results, aug_dim)
        evaluated = results["settings"].get("evaluate_step") or steps[-1]
        if len(steps) < 2 or evaluated not in steps:
            continue
        at = steps.index(evaluated)
        if evaluated == steps[-1]:
            window = [max([s for s in steps[:-1] if s <= 7 * evaluated / 8], default=steps[-2]), evaluated]
        else:
            window = steps[max(0, at - 1) : at + 2]
        parts = []
        for sampler, name in (("hijack_nfe1", "NFE-1 PSNR"), ("prior_heun", f"the prior's Heun {PRIOR_NFE}")):
            figures = {step: _psnr(_checkpoint_figures(results, aug_dim, step), sampler) for step in window}
            changes = [figures[step].mean - figures[evaluated].mean for step in window if step != evaluated]
            flat = all(abs(change) < figures[evaluated].error for change in changes)
            shown = ", ".join(
                f"{figures[step]:.2f}" if step == evaluated else f"{figures[step].mean:.2f}" for step in window
            )
            parts.append(
                f"{name} {shown} at steps {', '.join(map(str, window))}: the neighbours differ from step {evaluated} "
                f"by {' and '.join(f'{c:+.2f}' for c in changes)} dB, {'within' if flat else 'beyond'} its error bar "
                f"({'plateau' if flat else 'not a plateau'})"
            )
        lines.append(f"- D = {dim_name(aug_dim)}: " + "; ".join(parts) + ".")
    return lines


def plot_nfe(results, folder, name, metric="psnr") -> str:
    """`metric` against NFE from the measurement, one panel per start level, one line per D; the prior's Heun 35
    as a marker at the right and the measurement dotted."""
    settings = results["settings"]
    factors, nfes, scale = settings["start_factors"], settings["nfes"], METRICS[metric][1]
    dims = dims_of(results)
    colours = sweep_plots.colours([dim_name(d) for d in dims])
    fig, axes = sweep_plots.pyplot().subplots(1, len(factors), figsize=(3.2 * len(factors), 3.0), sharey=True)
    axes = list(axes) if len(factors) > 1 else [axes]
    measured = estimate(
        [r for r in results["runs"] if r["aug_dim"] == dims[0] and r["sampler"] == "prior_heun"],
        "degraded_" + metric,
        scale,
    )
    for ax, factor in zip(axes, factors, strict=True):
        for i, aug_dim in enumerate(dims):
            values = [estimate(select(results, aug_dim, start=factor, nfe=n), metric, scale) for n in nfes]
            x = [n * (1 + 0.03 * (i - 1)) for n in nfes]
            sweep_plots.errorbar(
                ax,
                x,
                values,
                marker="o",
                markersize=3,
                color=colours[dim_name(aug_dim)],
                label=f"D={dim_name(aug_dim)}",
            )
            prior = estimate(select(results, aug_dim, "prior_heun"), metric, scale)
            sweep_plots.errorbar(
                ax,
                [PRIOR_NFE * (1 + 0.03 * (i - 1))],
                [prior],
                marker="s",
                markersize=3,
                color=colours[dim_name(aug_dim)],
            )
        ax.axhline(measured.mean, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        sweep_plots.log_axis(ax.xaxis)
        ax.set_title(f"start at {factor:g}× {task_of(results)['level']} (squares: prior, Heun 35)", fontsize=8)
        ax.set_xlabel("network evaluations")
    axes[0].set_ylabel(METRICS[metric][0] + " (dotted: y)")
    axes[0].legend(fontsize=7)
    return sweep_plots.save(fig, folder, name)


def plot_start(results, folder, name) -> str:
    """Every metric at NFE 1 against the start level (in units of the measurement's true level), one line per D."""
    settings = results["settings"]
    factors = sorted(settings["start_factors"])
    dims = dims_of(results)
    colours = sweep_plots.colours([dim_name(d) for d in dims])
    fig, axes = sweep_plots.pyplot().subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.0))
    for ax, (metric, (label, scale, _)) in zip(axes, METRICS.items(), strict=True):
        for i, aug_dim in enumerate(dims):
            values = [estimate(select(results, aug_dim, start=f, nfe=1), metric, scale) for f in factors]
            x = [f * (1 + 0.03 * (i - 1)) for f in factors]
            sweep_plots.errorbar(
                ax,
                x,
                values,
                marker="o",
                markersize=3,
                color=colours[dim_name(aug_dim)],
                label=f"D={dim_name(aug_dim)}",
            )
        ax.set_xscale("log")
        sweep_plots.log_axis(ax.xaxis)
        ax.set_xlabel(f"start level / true {task_of(results)['level']}")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("One network evaluation from the measurement, against the start level", fontsize=9)
    return sweep_plots.save(fig, folder, name)


def plot_all(results, folder) -> dict:
    prefix = task_of(results)["prefix"]
    return {
        "nfe": plot_nfe(results, folder, f"{prefix}nfe.png"),
        "start": plot_start(results, folder, f"{prefix}start.png"),
    }


def section(results, plots, command) -> str:
    """The markdown section (between the markers) from `results`, the plots' file names and the command."""
    settings, task = results["settings"], task_of(results)
    level = task["level"]
    lines = [task["markers"][0], "", task["heading"], ""]
    if results.get("reduced"):
        lines += ["**Machinery check at reduced settings, not evidence.**", ""]
    dims = ", ".join(dim_name(d) for d in settings["aug_dims"])
    decay = settings.get("decay_steps", 0)
    schedule = f", a cosine cool-down to 0 over the last {decay}" if decay else ", then constant"
    step = settings.get("evaluate_step") or settings["steps"]
    evaluated = f", restoring with the EMA model of step {step}" if step != settings["steps"] else ""
    lines += [
        f"**Setup.** {task_sentence(settings)} Conditional PFGM++ (y concatenated to the "
        "network's input, PPFM's model) at "
        f"D ∈ {{{dims}}}, the D sweep's UNet (`unet_digits_8px.json`), trained by the library's loss with batch "
        f"{settings['batch_size']}, learning rate {settings['learning_rate']:g} ({settings['warmup_steps']} warm-up "
        f"steps{schedule}), EMA 0.999, {settings['steps']} steps, seeds 0–{settings['seeds'] - 1}{evaluated}. "
        f"Restorations of the {settings['num_images']} held-out digits (neither the models nor the shipped "
        "classifier saw them): PPFM's hijack (the "
        "state "
        f"starts at y itself at σ_start, Euler on a Karras grid to σ_min, then to 0) with σ_start = {level} "
        f"(matched), 0.5 {level} and 2 {level} (mismatched), at NFE "
        + ", ".join(str(n) for n in settings["nfes"])
        + "; and from the "
        f"prior with the pipeline's Heun, 18 steps = {PRIOR_NFE} NFE. Scores: PSNR and SSIM against the clean digit "
        "(in [0, 1]), and the share of restorations the shipped classifier labels as the clean digit. Error bars: ± "
        "half the range over the seeds + the standard error over the images of the seed mean; a difference counts "
        "only when it exceeds the sum of both error bars. The original PFGM (D = 1, field objective) is left out: "
        "its training target is the field of the whole unconditional batch, so a condition reaches it only through "
        "the input and it does not learn the conditional field that the hijack follows (docs/img2img.md).",
        "",
        f"Reproduce: `{command}`: {results.get('train_minutes', float('nan')):.0f} min of wall time per model "
        "to train, summed over the runs that trained it at whatever load the machine had (cached under "
        "outputs/img2img_evidence/models, so a longer run resumes and a rerun only evaluates), "
        f"{results['seconds'] / 60:.0f} min for this evaluation.",
        "",
        measurement_line(results),
        "",
        "### What reproduced, what did not, what was opposite",
        "",
        *verdict_lines(results),
        "",
        *observation_lines(results),
        "",
        "### PSNR, SSIM and label accuracy against NFE",
        "",
        f"![{METRICS['psnr'][0]} against NFE]({plots['nfe']})",
        f"![NFE 1 against the start level]({plots['start']})",
        "",
    ]
    for metric, (label, _, _) in METRICS.items():
        lines += [f"{label}:", "", *nfe_table(results, metric), ""]
    plateau = plateau_lines(results)
    if plateau:
        lines += [
            "### Training to a plateau",
            "",
            *plateau_verdict_lines(results),
            "",
            "The learning rate of each checkpoint's last step, the mean training loss since the previous checkpoint "
            "(± half range over seeds) and PSNR at each checkpoint (same error bars as above):",
            "",
            *plateau,
            "",
        ]
    return "\n".join([*lines, task["markers"][1]]) + "\n"


def task_sentence(settings) -> str:
    """The task and its measurement's error level, for the setup paragraph."""
    if settings.get("task", "denoise") == "denoise":
        return (
            "The built-in denoising task on the embedded 8×8 digits: y = x + σ_y·n with "
            f"σ_y = {settings['sigma_y']:g} in model units ([-1, 1])."
        )
    noise = f", plus σ_y·n with σ_y = {settings['sigma_y']:g}" if settings["sigma_y"] else ""
    return (
        f"The built-in super-resolution task on the embedded 8×8 digits: y = the digit averaged over "
        f"{settings['factor']}×{settings['factor']} blocks and upsampled back by nearest neighbour{noise}. Its error "
        f"level, the 'true noise' the start levels refer to, is σ_m = the RMS of y − x over the held-out digits "
        f"= {settings['measurement_level']:.3f} in model units ([-1, 1])."
    )


def rewrite_docs(path, text, results):
    """Replace the part of `path` between the markers of `results`' task by `text` (`report.rewrite_section`)."""
    rewrite_section(path, text, *task_of(results)["markers"], "image-to-image evidence")
