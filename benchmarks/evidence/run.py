#!/usr/bin/env python
"""Test the PFGM / PFGM++ papers' claims at CPU scale and write the evidence section of docs/benchmarks.md.

    python benchmarks/evidence/run.py            # the full sweep (make evidence): ~65 min on 2 idle cores
    python benchmarks/evidence/run.py --reduced  # fewer models, steps and samples (make evidence-reduced): ~1 h shared
    python benchmarks/evidence/run.py --quick    # the same machinery at toy sizes (make evidence-quick): minutes

The digits part is the D sweep of `scripts/sweep_aug_dim.py` (its machinery in scripts/aug_dim_sweep/) with the
settings below: PFGM++ at D = 8, 64, 128, 2048, infinity and the original PFGM (field objective) on the embedded
digits at 8x8, two seeds each, trained by the project's trainer in segments (to draw the training curve), then
measured with the offline digits classifier: quality against network evaluations for every scheduler solver (and
RK45 for the field model), with noise injected while sampling and with quantised weights (the official PFGM++
experiments). It also trains MLP denoisers with the library's `pfgmpp_loss` on 2-D toys with a known density, for the
sliced Wasserstein distance and the likelihood against D. Then it decides, from the numbers and their error bars,
which claims reproduced (`claims.py`), and rewrites the part of docs/benchmarks.md between `<!-- evidence:start -->`
and `<!-- evidence:end -->` (`markdown.py`) and the plots docs/evidence_*.png (`plots.py`).

Jobs (one model, or one toy dataset) run `--jobs` at a time, each on one thread; each job's results are kept in
`--workdir` (results/*.json) and reused by a rerun with the same settings, so an interrupted sweep continues where it
stopped. `--quick` writes its report and plots into `--workdir`, prints a short summary, and leaves the docs alone
unless `--docs` is given; its report says that it is a machinery check, not evidence.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# benchmarks/ (this package and machine.py) and scripts/ (the sweep's machinery)
sys.path[:0] = [os.path.dirname(HERE), os.path.join(REPO, "scripts")]

import machine  # noqa: E402
from aug_dim_sweep import jobs, presets  # noqa: E402
from aug_dim_sweep.plots import MATPLOTLIB_MISSING  # noqa: E402
from aug_dim_sweep.statistics import group_by_model  # noqa: E402

from evidence import markdown, plots, toy2d  # noqa: E402
from evidence.claims import decide_claims  # noqa: E402

# The digits part is the sweep's evidence preset; the toys' settings are here.
FULL = {
    "digits": presets.EVIDENCE,
    "toy": {
        "datasets": ["gaussian_mixture", "ring"],
        "aug_dims": [1, 2, 4, 8, 32, None],
        "seeds": [0, 1],
        "num_steps": 2000,
        "batch_size": 512,
        "learning_rate": 2e-3,
        "num_samples": 10000,
        "num_test": 2000,
        "num_inference_steps": 18,
        "num_projections": 256,
    },
}
# The same machinery at toy sizes (about two toys of 2 minutes): one dataset, two D, one seed, short training.
QUICK = {
    "digits": presets.EVIDENCE_QUICK,
    "toy": {
        **FULL["toy"],
        "datasets": ["gaussian_mixture"],
        "aug_dims": [2, None],
        "seeds": [0],
        "num_steps": 400,
        "num_samples": 2000,
        "num_test": 200,
    },
}


# What fits a shared 2-core machine in about an hour: the sweep's reduced preset (the toys are cheap: ~20 s of CPU per
# model, kept as documented). Its section says that it is not the documented run, and how it differs.
REDUCED = {"digits": presets.EVIDENCE_REDUCED, "toy": FULL["toy"]}
REDUCED_BANNER = (
    "> **Reduced settings, not the documented run.** The shared machine could not run `make evidence` (six D, 4000 "
    "training steps, 700 samples per point, six toy D) in the time it had. This run: {models}; seeds {seeds}; "
    "{steps} training steps (documented: 4000); {images} samples per point (documented: 700); Heun only (no Euler "
    "or DPM-Solver++ rows); injected noise at α = {alphas} (documented: 0.05, 0.1, 0.2), {bits} bits (documented: "
    "5–9); the STF models measured at Heun's reference only (their comparison is the training curve). No PFGM field "
    "model and no D = 64: their rows and claims are absent below. The 2-D toys ran as documented."
)


def reduced_banner(settings) -> str:
    digits = settings["digits"]
    names = [
        f"D = {'∞' if m[1] is None else m[1]}" + (f" {m[2].upper()}" if len(m) > 2 else "") for m in digits["models"]
    ]
    evaluation = digits["evaluation"]
    return REDUCED_BANNER.format(
        models=", ".join(names),
        seeds=", ".join(map(str, digits["seeds"])),
        steps=digits["training"]["segments"][-1],
        images=evaluation["num_images"],
        alphas=", ".join(map(str, evaluation["noise_scales"])),
        bits=", ".join(map(str, evaluation["quantization_bits"])),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="Toy sizes: a few minutes; report in --workdir only.")
    size.add_argument(
        "--reduced",
        action="store_true",
        help="Fewer models, steps and samples (~1 h on a shared 2-core machine); the docs say so.",
    )
    parser.add_argument("--jobs", type=int, default=2, help="Jobs at a time, one thread each (default 2).")
    parser.add_argument("--workdir", default=None, help="Default: outputs/evidence/full or outputs/evidence/quick.")
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Rewrite docs/benchmarks.md and docs/evidence_*.png (default: yes, but not with --quick).",
    )
    parser.add_argument("--fresh", action="store_true", help="Delete --workdir first instead of reusing its results.")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.workdir is None:
        args.workdir = os.path.join(
            "outputs", "evidence", "quick" if args.quick else "reduced" if args.reduced else "full"
        )
    if args.docs is None:
        args.docs = not args.quick
    return args


def plan_jobs(settings) -> list:
    """One job per toy dataset, then the sweep's model jobs (the toys first: they are short, and the jobs start in
    this order)."""
    toy = [
        (f"toy-{name}", toy2d.toy_job, dict(dataset=name, settings=settings["toy"]))
        for name in settings["toy"]["datasets"]
    ]
    return toy + jobs.model_jobs(settings["digits"])


def run_all(settings, workdir, n_jobs=2, log=print):
    """Every job (finished ones reused); (digits results, toy rows by dataset, {reused_jobs, job_seconds})."""
    planned = plan_jobs(settings)
    results, info = jobs.run_all(planned, workdir, n_jobs, log)
    digits = [results[job_id] for job_id, function, _ in planned if function is jobs.train_and_measure]
    toy = {a["dataset"]: results[job_id]["rows"] for job_id, function, a in planned if function is toy2d.toy_job}
    return digits, toy, info


def environment(n_jobs):
    import torch

    return {
        "date": datetime.date.today().isoformat(),
        "cpu": machine.cpu_model(),
        "torch": torch.__version__,
        "jobs": n_jobs,
        "load_start": machine.load_average(),
    }


def command_line(args):
    parts = ["python benchmarks/evidence/run.py"]
    if args.quick or args.reduced:
        parts.append("--quick" if args.quick else "--reduced")
    if args.jobs != 2:
        parts.append(f"--jobs {args.jobs}")
    return (
        " ".join(parts) + "   # or: make evidence" + ("-quick" if args.quick else "-reduced" if args.reduced else "")
    )


def console_summary(digits, toy, settings) -> list[str]:
    """One line per claim: its outcome on each figure."""
    claims = decide_claims(group_by_model(digits), toy, settings)
    return [f"- {c['claim']}: " + " / ".join(outcome for outcome, _ in c["outcomes"].values()) for c in claims]


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"run.py: {MATPLOTLIB_MISSING}") from None
    settings = QUICK if args.quick else REDUCED if args.reduced else FULL
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    env = environment(args.jobs)
    began = time.perf_counter()
    digits, toy, jobs_info = run_all(settings, args.workdir, args.jobs)
    env.update(jobs_info, wall_seconds=time.perf_counter() - began, load_end=machine.load_average())

    plot_folder = os.path.join(REPO, "docs") if args.docs else args.workdir
    written = plots.plot_all(digits, toy, settings, plot_folder)
    banner = reduced_banner(settings) if args.reduced else None
    section = markdown.markdown(digits, toy, settings, env, command_line(args), written, args.quick, banner)
    report_path = os.path.join(args.workdir, "report.md")
    with open(report_path, "w", encoding="utf-8") as file:
        file.write(section)
    with open(os.path.join(args.workdir, "results.json"), "w") as file:
        json.dump({"settings": settings, "environment": env, "digits": digits, "toy": toy}, file, indent=1)
    if args.docs:
        markdown.rewrite_docs(os.path.join(REPO, "docs", "benchmarks.md"), section)
        print(f"rewrote the evidence section of docs/benchmarks.md and {', '.join(written.values())} in docs/")
    if args.quick:
        print("MACHINERY CHECK, NOT EVIDENCE: toy-sized settings (short training, one seed, few images).")
    print("\n".join(console_summary(digits, toy, settings)))
    print(f"report: {report_path}, plots in {plot_folder} ({env['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
