"""The evidence plots (small PNGs): the sweep's training, NFE and robustness plots on the digits metrics, and the
2-D toys against D."""

import numpy as np
from aug_dim_sweep import plots as sweep_plots
from aug_dim_sweep.statistics import Estimate, fully_measured, group_by_model

from .claims import toy_by_dim

# The two digits figures the plots show: (label, format, higher is better)
PLOT_METRICS = {
    "frechet_distance": ("Fréchet distance", "{:.2f}", False),
    "confident_share": ("confident share", "{:.3f}", True),
}


def plot_toy(toy, folder, name) -> str:
    """Sliced W2 and NLL gap against D, one line per toy dataset, the true-sample floor dotted."""
    fig, axes = sweep_plots.pyplot().subplots(1, 2, figsize=(9, 3.4))
    for i, (dataset, rows) in enumerate(toy.items()):
        by_dim = toy_by_dim(rows)
        x = np.arange(len(by_dim))
        for ax, metric in zip(axes, ("sliced_wasserstein", "nll_gap"), strict=True):
            values = [
                Estimate.of([r[metric] for r in rs], [r.get(f"{metric}_se", 0.0) for r in rs])
                for rs in by_dim.values()
            ]
            sweep_plots.errorbar(ax, x + 0.1 * i, values, marker="o", label=dataset)
            ax.set_xticks(x, [f"{d}" for d in by_dim])
            ax.set_xlabel("D")
        axes[0].axhline(rows[0]["sliced_wasserstein_floor"], color=f"C{i}", linestyle=":", linewidth=1)
    axes[0].set_ylabel("sliced W2 to true samples")
    axes[1].set_ylabel("NLL − true NLL (nats)")
    axes[1].legend(fontsize=7)
    fig.suptitle("2-D toys: sample distance and likelihood against D (dotted: true-sample floor)", fontsize=10)
    return sweep_plots.save(fig, folder, name)


def plot_all(results, toy, settings, folder, prefix="evidence_") -> dict:
    """The PNG plots into `folder`; returns {kind: file name}."""
    groups = group_by_model(results)
    reference_steps = settings["digits"]["evaluation"]["reference_steps"]
    written = {
        "training": sweep_plots.plot_training(groups, PLOT_METRICS, reference_steps, folder, f"{prefix}training.png"),
        "nfe": sweep_plots.plot_nfe(groups, PLOT_METRICS, folder, f"{prefix}nfe.png"),
    }
    first = next(iter(groups.values()))[0]
    if first["noise"] or first["quantization"]:
        label = PLOT_METRICS["frechet_distance"][0]
        name = f"{prefix}robustness.png"
        written["robustness"] = sweep_plots.plot_robustness(
            fully_measured(groups), "frechet_distance", label, reference_steps, folder, name
        )
    if toy:
        written["toy"] = plot_toy(toy, folder, f"{prefix}toy.png")
    return written
