"""The sweep's plots (small PNGs): quality against network evaluations, during training, and under the robustness
experiments, each model in its own colour (D from small, dark, to infinity, light; the field model red)."""

import os

import numpy as np

from .statistics import estimate, fully_measured, group_by_model, level_points, reference_points

MATPLOTLIB_MISSING = "the sweep's plots need matplotlib: pip install matplotlib (or pip install -e '.[plots]')"
SOLVER_STYLES = {"heun": "-", "euler": ":", "dpmpp_2m": "--"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(names) -> dict:
    plt = pyplot()
    dims = [name for name in names if name != "PFGM"]
    result = {name: plt.get_cmap("viridis")(0.85 * i / max(len(dims) - 1, 1)) for i, name in enumerate(dims)}
    result["PFGM"] = "tab:red"
    return result


def save(fig, folder, name) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=80)
    pyplot().close(fig)
    return name


def log_axis(axis):
    """A log axis labelled at 1, 2 and 5 times a power of ten only: labelled minor ticks overlap."""
    import matplotlib.ticker

    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def errorbar(ax, x, estimates, **kwargs):
    ax.errorbar(x, [e.mean for e in estimates], yerr=[e.error for e in estimates], capsize=2, **kwargs)


def plot_nfe(groups, metrics, folder, name) -> str:
    """Each metric against the network evaluations per sample, one line per model and solver (RK45: a star)."""
    plt = pyplot()
    colour = colours(groups)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for model, group in groups.items():
        for solver, points in group[0]["solvers"].items():
            per_n = [[r["solvers"][solver][i] for r in group] for i in range(len(points))]
            nfe = [np.mean([p["nfe"] for p in ps]) for ps in per_n]
            for ax, key in zip(axes[0], metrics, strict=True):
                estimates = [estimate(ps, key) for ps in per_n]
                if solver == "rk45":
                    style = dict(marker="*", markersize=9, linestyle="none", label=f"{model} rk45")
                else:
                    label = model if solver == "heun" else f"{model} {solver}"
                    style = dict(linestyle=SOLVER_STYLES.get(solver, "-."), marker=".", label=label)
                errorbar(ax, nfe, estimates, color=colour[model], **style)
    for ax, (label, _, higher_is_better) in zip(axes[0], metrics.values(), strict=True):
        ax.set_xscale("log")
        log_axis(ax.xaxis)
        if not higher_is_better:
            ax.set_yscale("log")
            log_axis(ax.yaxis)
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle("Quality against NFE (solid Heun, dotted Euler, dashed DPM-Solver++(2M), star RK45)", fontsize=10)
    return save(fig, folder, name)


def plot_training(groups, metrics, reference_steps, folder, name) -> str:
    """Each metric after every training segment, beside the real images' figure."""
    plt = pyplot()
    colour = colours(groups)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for model, group in groups.items():
        steps = [p["steps"] for p in group[0]["curve"]]
        for ax, key in zip(axes[0], metrics, strict=True):
            estimates = [estimate([r["curve"][i] for r in group], key) for i in range(len(steps))]
            errorbar(ax, steps, estimates, color=colour[model], marker="o", markersize=3, label=model)
    last = next(iter(groups.values()))[0]["curve"][-1]
    for ax, (key, (label, _, higher_is_better)) in zip(axes[0], metrics.items(), strict=True):
        ax.axhline(last[f"heldout_{key}"], color="k", linestyle=":", linewidth=1, label="real images")
        ax.set_xlabel("training steps")
        ax.set_ylabel(label)
        if not higher_is_better:
            ax.set_yscale("log")
            log_axis(ax.yaxis)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Quality during training (Heun, {2 * reference_steps - 1} NFE)", fontsize=10)
    return save(fig, folder, name)


def plot_robustness(groups, key, label, reference_steps, folder, name) -> str:
    """`key` against the injected noise's alpha and against the weights' bits."""
    plt = pyplot()
    colour = colours(groups)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for model, group in groups.items():
        alphas = [row["alpha"] for row in group[0]["noise"]]
        noise = [reference_points(group, reference_steps)] + [level_points(group, "noise", "alpha", a) for a in alphas]
        style = dict(color=colour[model], marker="o", markersize=3, label=model)
        errorbar(axes[0], [0.0, *alphas], [estimate(ps, key) for ps in noise], **style)
        bits = [row["bits"] for row in group[0]["quantization"]]
        quantized = [level_points(group, "quantization", "bits", b) for b in bits]
        errorbar(axes[1], bits, [estimate(ps, key) for ps in quantized], **style)
    axes[0].set_xlabel("injected noise α (before every Heun step)")
    axes[1].set_xlabel("weight bits (per tensor, min–max with zero point)")
    for ax in axes:
        ax.set_ylabel(label)
        ax.set_yscale("log")
        log_axis(ax.yaxis)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Robustness (Heun, {2 * reference_steps - 1} NFE)", fontsize=10)
    return save(fig, folder, name)


def plot_sweep(results, settings, metrics, folder, prefix="sweep_") -> dict:
    """The sweep report's plots into `folder`; returns {kind: file name}."""
    groups = group_by_model(results)
    reference_steps = settings["evaluation"]["reference_steps"]
    written = {"nfe": plot_nfe(groups, metrics, folder, f"{prefix}nfe.png")}
    if len(settings["training"]["segments"]) > 1:
        written["training"] = plot_training(groups, metrics, reference_steps, folder, f"{prefix}training.png")
    first = next(iter(groups.values()))[0]
    if first.get("noise") or first.get("quantization"):
        key, (label, _, _) = next(iter(metrics.items()))
        robust = fully_measured(groups)
        written["robustness"] = plot_robustness(robust, key, label, reference_steps, folder, f"{prefix}robustness.png")
    return written
