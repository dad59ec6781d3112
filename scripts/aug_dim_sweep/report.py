"""The sweep's markdown report: which D is best at the reference setting, with error bars, and how each D degrades
with fewer steps (and, where measured, under injected noise and quantised weights)."""

import re

from pfgm_diffusers.files import atomic_write

from .statistics import (
    Estimate,
    badness,
    curve_points,
    difference,
    estimate,
    fully_measured,
    group_by_model,
    level_points,
    reference_points,
    restart_points,
    restart_steps,
    solver_points,
    target_pairs,
)

QUICK_BANNER = (
    "> **Machinery check, not evidence.** These figures come from toy-sized settings (short training, one seed, few "
    "images): they show that the machinery runs end to end, not how the models compare."
)


def rewrite_section(path, section, start_marker, end_marker, name):
    """Replace the part of the markdown file `path` between `start_marker` and `end_marker` by `section` (appended if
    the markers are absent); the rest of the file is kept byte for byte, and the file is replaced atomically. More
    than one marked `name` section is an error."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    pattern = re.compile(re.escape(start_marker) + r".*?" + re.escape(end_marker) + r"\n?", re.DOTALL)
    matches = pattern.findall(text)
    if len(matches) > 1:
        raise ValueError(f"{path} holds {len(matches)} {name} sections; expected at most one")
    text = pattern.sub(lambda _: section, text) if matches else text.rstrip("\n") + "\n\n" + section
    atomic_write(path, text)


def table(header, rows) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def formatted(value: Estimate, fmt: str) -> str:
    """`value` as mean ± error in the metric's format (`fmt` like "{:.2f}")."""
    return f"{fmt.format(value.mean)} ± {fmt.format(value.error)}"


def ranking(groups, metrics, reference_steps) -> tuple[str, dict, list]:
    """(best model, {model: badness estimate}, models not resolved from the best) on the first metric at the
    reference setting; badness is the metric negated where higher is better."""
    key, (_, _, higher_is_better) = next(iter(metrics.items()))
    scores = {
        name: badness(reference_points(group, reference_steps), key, higher_is_better)
        for name, group in groups.items()
    }
    best = min(scores, key=lambda name: scores[name].mean)
    tied = [name for name in scores if name != best and not scores[best].less_than(scores[name])]
    return best, scores, tied


def best_section(groups, metrics, reference_steps) -> list[str]:
    key, (label, _, _) = next(iter(metrics.items()))
    best, _, tied = ranking(groups, metrics, reference_steps)
    nfe = solver_points(next(iter(groups.values())), "heun", reference_steps)[0]["nfe"]
    verdict = f"**Best D: {best}** by the {label} at Heun {nfe:.0f} NFE"
    verdict += (
        f"; not resolved from it (within the error bars): {', '.join(tied)}."
        if tied
        else "; every other model is worse by more than the error bars."
    )
    rows = []
    for name, group in groups.items():
        points = reference_points(group, reference_steps)
        rows.append([name, *[formatted(estimate(points, k), fmt) for k, (_, fmt, _) in metrics.items()]])
    heldout = reference_points(next(iter(groups.values())), reference_steps)[0]
    rows.append(
        [f"real images ({heldout['heldout_num_images']})"]
        + [fmt.format(heldout[f"heldout_{k}"]) for k, (_, fmt, _) in metrics.items()]
    )
    header = ["model", *[f"{label} ({'higher' if up else 'lower'} is better)" for label, _, up in metrics.values()]]
    return [f"### Which D is best (Heun, {nfe:.0f} NFE)", "", verdict, "", table(header, rows), ""]


def steps_section(groups, metrics, solver) -> list[str]:
    """The first metric of every model at each step count of `solver`, and its change from the most steps."""
    key, (label, fmt, higher_is_better) = next(iter(metrics.items()))
    groups = fully_measured(groups)
    first = next(iter(groups.values()))[0]
    steps = sorted(p["num_inference_steps"] for p in first["solvers"].get(solver, []))
    if not steps:
        return []
    nfes = [solver_points(next(iter(groups.values())), solver, n)[0]["nfe"] for n in steps]
    rows = []
    for name, group in groups.items():
        finest = solver_points(group, solver, steps[-1])
        cells = [name]
        for n in steps:
            points = solver_points(group, solver, n)
            change = difference(points, finest, key)
            shown = "" if n == steps[-1] else f" ({change.mean:+.3g} ± {change.error:.2g})"
            cells.append(formatted(estimate(points, key), fmt) + shown)
        rows.append(cells)
    words = "higher" if higher_is_better else "lower"
    return [
        f"### {label} against steps: {solver}",
        "",
        f"{label} ({words} is better) at each step count; in brackets the change from {steps[-1]} steps (paired by "
        "seed, with its error bar).",
        "",
        table(["model", *[f"{n} steps ({nfe:.0f} NFE)" for n, nfe in zip(steps, nfes, strict=True)]], rows),
        "",
    ]


def robustness_section(groups, metrics, reference_steps, plots) -> list[str]:
    groups = fully_measured(groups)
    first = next(iter(groups.values()))[0]
    alphas = [row["alpha"] for row in first.get("noise", [])]
    bits = [row["bits"] for row in first.get("quantization", [])]
    if not alphas and not bits:
        return []
    key, (label, fmt, _) = next(iter(metrics.items()))
    rows = []
    for name, group in groups.items():
        cells = [name, formatted(estimate(reference_points(group, reference_steps), key), fmt)]
        cells += [formatted(estimate(level_points(group, "noise", "alpha", a), key), fmt) for a in alphas]
        cells += [formatted(estimate(level_points(group, "quantization", "bits", b), key), fmt) for b in bits]
        rows.append(cells)
    header = ["model", "reference", *[f"α = {a}" for a in alphas], *[f"{b} bits" for b in bits]]
    return [
        "### Robustness (PFGM++ §5, the official code's experiments)",
        "",
        f"{label} at Heun {2 * reference_steps - 1} NFE. Injected noise: x ← x + α σ_i ε before every Heun step, the "
        "first included (`generate_alpha.py`). Quantisation: the weights of the convolutions and linear layers, per "
        "tensor, asymmetric min–max with a zero point; biases, normalisation layers and embeddings in full precision "
        "(`generate_quant.py`).",
        "",
        table(header, rows),
        "",
        *([f"![robustness]({plots['robustness']})", ""] if "robustness" in plots else []),
    ]


def curve_section(groups, metrics, segments) -> list[str]:
    if len(segments) < 2:
        return []
    key, (label, fmt, _) = next(iter(metrics.items()))
    rows = []
    for name, group in groups.items():
        rows.append(
            [name, *[formatted(estimate([r["curve"][i] for r in group], key), fmt) for i in range(len(segments))]]
        )
    return [
        "### During training",
        "",
        f"{label} after each segment.",
        "",
        table(["model", *map(str, segments)], rows),
        "",
    ]


def target_rows(groups, key, fmt, segments, reference_steps) -> list:
    """Rows (D, training steps, plain target, STF, STF − plain paired by seed) after each segment and at the final
    measurement, for every D trained with both targets."""
    rows = []
    for plain, other in target_pairs(groups):
        points = [
            (f"{steps}", curve_points(groups[plain], i), curve_points(groups[other], i))
            for i, steps in enumerate(segments)
        ]
        final = (
            f"{segments[-1]} (final, {reference_points(groups[plain], reference_steps)[0]['num_images']} images)",
            reference_points(groups[plain], reference_steps),
            reference_points(groups[other], reference_steps),
        )
        for steps, a, b in [*points, final]:
            change = difference(b, a, key)
            rows.append(
                [
                    plain,
                    steps,
                    formatted(estimate(a, key), fmt),
                    formatted(estimate(b, key), fmt),
                    formatted(change, fmt),
                ]
            )
    return rows


def target_section(groups, metrics, segments, reference_steps) -> list[str]:
    """STF (Stable Target Field) against the plain target at equal training steps, for each D trained with both."""
    if not target_pairs(groups):
        return []
    lines = [
        "### Stable Target Field against the plain target, at equal training steps",
        "",
        f"Heun at {2 * reference_steps - 1} NFE after each training segment (the curve's images), and the final "
        "measurement; in the last column the STF model minus the plain one, paired by seed, with its error bar. The "
        "STF target is the posterior-weighted mean of a reference batch (`--target stf`, "
        "`pfgm_diffusers.stable_target`).",
        "",
    ]
    for key, (label, fmt, higher_is_better) in metrics.items():
        words = "higher" if higher_is_better else "lower"
        header = ["D", "training steps", "plain target", "STF", "STF − plain"]
        lines += [
            f"{label} ({words} is better):",
            "",
            table(header, target_rows(groups, key, fmt, segments, reference_steps)),
            "",
        ]
    return lines


def restart_section(groups, metrics) -> list[str]:
    """Restart against Heun at the same NFE, for every model measured with Restart."""
    measured = {name: group for name, group in groups.items() if restart_steps(group)}
    if not measured:
        return []
    lines = [
        "### Restart against Heun at equal NFE",
        "",
        'Restart (`solver="restart"`, the official restart blocks on the Heun grid of the steps shown, its exact NFE) '
        "beside Heun with the step count whose NFE is nearest (shown); in the last column Restart minus Heun, paired "
        "by seed, with its error bar.",
        "",
    ]
    for key, (label, fmt, higher_is_better) in metrics.items():
        rows = []
        for name, group in measured.items():
            for steps in restart_steps(group):
                restart, heun = restart_points(group, steps)
                rows.append(
                    [
                        name,
                        f"{steps} steps, {restart[0]['nfe']:.0f} NFE",
                        formatted(estimate(restart, key), fmt),
                        f"{heun[0]['num_inference_steps']} steps, {heun[0]['nfe']:.0f} NFE",
                        formatted(estimate(heun, key), fmt),
                        formatted(difference(restart, heun, key), fmt),
                    ]
                )
        words = "higher" if higher_is_better else "lower"
        header = ["model", "Restart", "Restart's figure", "Heun", "Heun's figure", "Restart − Heun"]
        lines += [f"{label} ({words} is better):", "", table(header, rows), ""]
    return lines


def setup_lines(settings, environment, command) -> list[str]:
    training, evaluation, data = settings["training"], settings["evaluation"], settings.get("data", {})
    source = data.get("train_data_dir") or data.get("dataset_name") or "the embedded digits"
    return [
        "```bash",
        command,
        "```",
        "",
        f"Data: {source} at {training['resolution']}×{training['resolution']}; seeds "
        f"{', '.join(map(str, settings['seeds']))}; {training['segments'][-1]} training steps (batch "
        f"{training['batch_size']}, learning rate {training['learning_rate']:g}); {evaluation['num_images']} samples "
        f"per point, the same latents for every model. Measured {environment['date']} on {environment['cpu']}, "
        f"torch {environment['torch']}, wall time {environment['wall_seconds'] / 60:.1f} min.",
        "",
        "Error bars: ± half the range over the seeds + the standard error over the images of the seed mean; a "
        "difference counts only when it exceeds the sum of both error bars.",
        "",
    ]


def markdown(results, settings, environment, command, plots, judge_metrics, quick=False) -> str:
    """The sweep's report."""
    groups = group_by_model(results)
    reference_steps = settings["evaluation"]["reference_steps"]
    lines = ["# Choosing D: a PFGM++ sweep", ""]
    lines += [QUICK_BANNER, ""] if quick else []
    lines += setup_lines(settings, environment, command)
    lines += best_section(groups, judge_metrics, reference_steps)
    for solver in next(iter(groups.values()))[0]["solvers"]:
        if solver != "rk45":
            lines += steps_section(groups, judge_metrics, solver)
    lines += [f"![quality against NFE]({plots['nfe']})", ""] if "nfe" in plots else []
    lines += restart_section(groups, judge_metrics)
    lines += robustness_section(groups, judge_metrics, reference_steps, plots)
    lines += target_section(groups, judge_metrics, settings["training"]["segments"], reference_steps)
    lines += curve_section(groups, judge_metrics, settings["training"]["segments"])
    lines += [f"![during training]({plots['training']})", ""] if "training" in plots else []
    return "\n".join(lines) + "\n"


def summary_lines(results, settings, judge_metrics) -> list[str]:
    """A few lines for the console: the best D and the ones not resolved from it."""
    groups = group_by_model(results)
    best, scores, tied = ranking(groups, judge_metrics, settings["evaluation"]["reference_steps"])
    key, (label, fmt, higher_is_better) = next(iter(judge_metrics.items()))
    shown = scores[best].negated() if higher_is_better else scores[best]
    lines = [f"best D: {best} ({label} {formatted(shown, fmt)})"]
    lines.append(
        f"not resolved from it: {', '.join(tied)}" if tied else "every other D is worse beyond the error bars"
    )
    return lines
