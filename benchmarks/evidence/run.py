#!/usr/bin/env python
"""Test the PFGM / PFGM++ papers' claims at CPU scale and write the evidence section of docs/benchmarks.md.

    python benchmarks/evidence/run.py            # the full sweep (make evidence): ~45-50 min on 2 idle cores
    python benchmarks/evidence/run.py --quick    # the same machinery at toy sizes (make evidence-quick): minutes

The full sweep trains PFGM++ at D = 8, 64, 128, 2048, infinity and the original PFGM (field objective) on the embedded
digits at 8x8, two seeds each, with the project's trainer (in segments, to draw the training curve), then measures
each model with the offline digits classifier: quality against network evaluations for every scheduler solver (and
RK45 for the field model), with noise injected while sampling, and with quantised weights. It also trains MLP
denoisers on 2-D toys with a known density, for the sliced Wasserstein distance and the likelihood against D. Then it
decides, from the numbers and their error bars, which claims reproduced, and rewrites the part of docs/benchmarks.md
between `<!-- evidence:start -->` and `<!-- evidence:end -->` and the plots docs/evidence_*.png.

Jobs (one model, or one toy dataset) run `--jobs` at a time, each on one thread; each job's results are kept in
`--workdir` (results/*.json) and reused by a rerun with the same settings, so an interrupted sweep continues where it
stopped. `--quick` writes its report and plots into `--workdir` and leaves the docs alone unless `--docs` is given.
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # this folder's modules and benchmarks/machine.py
REPO = os.path.dirname(os.path.dirname(HERE))

import digits_sweep  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402

# The settings of the full sweep, chosen with pilots: every model gets the same UNet, batch, learning rate, EMA and
# steps. Time on 2 idle cores, from costs measured there: training ~30 min (60 ms per step per job, two jobs at once,
# ~7 s per trainer start), sampling ~14 min (0.31 ms per image and network call), toys ~2 min.
FULL = {
    "digits": {
        "models": [
            ["pfgmpp", 8],
            ["pfgmpp", 64],
            ["pfgmpp", 128],
            ["pfgmpp", 2048],
            ["pfgmpp", None],
            ["poisson_field", None],
        ],
        "seeds": [0, 1],
        "training": {
            "resolution": 8,
            "model_config": digits_sweep.UNET_CONFIG,
            "batch_size": 64,
            # Pilots (D = 128 and 8, seed 0, 500 samples, confident share): with 2e-3, 0.82-0.83 at 2000 steps,
            # 0.85-0.86 at 3000, 0.90 at 4500, 0.89 at 6000; 1e-3 needed 6000 steps for 0.92 and 3e-3 stalled at 0.88
            "learning_rate": 2e-3,
            "lr_warmup_steps": 200,
            "ema_max_decay": 0.999,
            "segments": [500, 1000, 2000, 3000, 4000],
            # The field model's perturbation reaches the prior's clipped radii at N = 64: sigma sqrt(N) (1 + tau)^M
            # = 0.08 * 1.03^356 ~ 3000 = upper_norm (math.md §3; CIFAR-10's M = 291 is for N = 3072)
            "field": {"M": 356, "upper_norm": 3000.0, "z_exp": 1.0},
        },
        "evaluation": {
            "num_images": 700,
            "curve_images": 400,
            "batch_size": 350,
            "sample_seed": 0,
            "num_bootstrap": 100,
            "reference_steps": 18,
            # Heun 5-35 calls, Euler, and every other scheduler solver (dpmpp_2m) up to 25 calls
            "steps": {"heun": [3, 4, 6, 9, 13, 18], "euler": [6, 12, 35], "other": [5, 7, 9, 12, 17, 25]},
            "noise_scales": [0.05, 0.1, 0.2],
            "quantization_bits": [5, 6, 7, 8, 9],
            "rk45_all": False,
            # RK45 with the official tolerances on a subset, within a budget of calls (pilot: the field models spent
            # more than 3000 calls on 8 images between z = 5 and 10 and did not finish)
            "rk45_images": 100,
            "rk45_batch_size": 100,
            "rk45_max_nfe": 1000,
        },
    },
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
# The same machinery at toy sizes: three models, one seed, short training, few images.
QUICK = {
    "digits": {
        "models": [["pfgmpp", 8], ["pfgmpp", None], ["poisson_field", None]],
        "seeds": [0],
        "training": {**FULL["digits"]["training"], "segments": [150, 300]},
        "evaluation": {
            **FULL["digits"]["evaluation"],
            "num_images": 200,
            "curve_images": 100,
            "batch_size": 200,
            "num_bootstrap": 20,
            "steps": {"heun": [3, 6, 18], "euler": [6, 35], "other": [5, 9, 17]},
            "noise_scales": [0.2],
            "quantization_bits": [5, 8],
            "rk45_images": 50,
            "rk45_batch_size": 50,
        },
    },
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Toy sizes: a few minutes; report in --workdir only.")
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
        args.workdir = os.path.join("outputs", "evidence", "quick" if args.quick else "full")
    if args.docs is None:
        args.docs = not args.quick
    return args


# ---------------------------------------------------------------------- jobs


def settings_key(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_jobs(settings):
    """(job id, kind, arguments): digits models first, the field model (the slowest to measure) before the others."""
    digits = settings["digits"]
    jobs = []
    for objective, aug_dim in sorted(digits["models"], key=lambda m: m[0] != "poisson_field"):
        for seed in digits["seeds"]:
            spec = digits_sweep.ModelSpec(objective, aug_dim, seed)
            jobs.append((f"digits-{spec.folder}", "digits", dict(objective=objective, aug_dim=aug_dim, seed=seed)))
    for dataset in settings["toy"]["datasets"]:
        jobs.append((f"toy-{dataset}", "toy", dict(dataset=dataset)))
    return jobs


def run_job(job_id, kind, arguments, settings, workdir):
    """One job in a worker process (one thread); writes results/<job_id>.json atomically and returns it."""
    import diffusers
    import torch

    torch.set_num_threads(1)
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" at every segment
    began = time.perf_counter()
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    if kind == "digits":
        spec = digits_sweep.ModelSpec(**arguments)
        result = digits_sweep.run_model(spec, os.path.join(workdir, "models"), settings["digits"], log)
    else:
        import toy2d

        toy = settings["toy"]
        result = {"rows": []}
        for aug_dim in toy["aug_dims"]:
            for seed in toy["seeds"]:
                row = toy2d.run_toy(arguments["dataset"], aug_dim, seed, toy)
                log(f"toy {arguments['dataset']} D={aug_dim} seed {seed}: sliced W2 {row['sliced_wasserstein']:.4f}, "
                    f"NLL gap {row['nll_gap']:.4f} ± {row['nll_gap_se']:.4f}")  # fmt: skip
                result["rows"].append(row)
    result["job_seconds"] = time.perf_counter() - began
    result["settings_key"] = settings_key(settings)
    path = os.path.join(workdir, "results", f"{job_id}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(result, file, indent=1)
    os.replace(path + ".tmp", path)
    return result


def load_cached(job_id, settings, workdir):
    path = os.path.join(workdir, "results", f"{job_id}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        result = json.load(file)
    return result if result.get("settings_key") == settings_key(settings) else None


def run_all(settings, workdir, jobs=2, log=print):
    """Every job (finished ones reused), `jobs` at a time; returns (digits results, toy results by dataset, {number
    of reused jobs, summed job seconds})."""
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    planned = plan_jobs(settings)
    results = {job_id: load_cached(job_id, settings, workdir) for job_id, _, _ in planned}
    todo = [job for job in planned if results[job[0]] is None]
    log(f"{len(planned)} jobs, {len(planned) - len(todo)} reused from {workdir}, {len(todo)} to run, {jobs} at a time")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_job, *job, settings, workdir): job[0] for job in todo}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            log(f"done: {futures[future]} ({results[futures[future]]['job_seconds'] / 60:.1f} min)")
    digits = [results[job_id] for job_id, kind, _ in planned if kind == "digits"]
    toy = {a["dataset"]: results[job_id]["rows"] for job_id, kind, a in planned if kind == "toy"}
    jobs_info = {
        "reused_jobs": len(planned) - len(todo),
        "job_seconds": sum(result["job_seconds"] for result in results.values()),
    }
    return digits, toy, jobs_info


# ---------------------------------------------------------------------- main


def environment(jobs):
    import torch

    return {
        "date": datetime.date.today().isoformat(),
        "cpu": machine.cpu_model(),
        "torch": torch.__version__,
        "jobs": jobs,
        "load_start": machine.load_average(),
    }


def command_line(args):
    parts = ["python benchmarks/evidence/run.py"]
    if args.quick:
        parts.append("--quick")
    if args.jobs != 2:
        parts.append(f"--jobs {args.jobs}")
    return " ".join(parts) + "   # or: make evidence" + ("-quick" if args.quick else "")


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"run.py: {report.MATPLOTLIB_MISSING}") from None
    settings = QUICK if args.quick else FULL
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    env = environment(args.jobs)
    began = time.perf_counter()
    digits, toy, jobs_info = run_all(settings, args.workdir, args.jobs)
    env.update(jobs_info)
    env["wall_seconds"] = time.perf_counter() - began
    env["load_end"] = machine.load_average()

    plot_folder = os.path.join(REPO, "docs") if args.docs else args.workdir
    plots = report.plot_all(digits, toy, settings, plot_folder)
    section = report.markdown(digits, toy, settings, env, command_line(args), plots)
    with open(os.path.join(args.workdir, "report.md"), "w", encoding="utf-8") as file:
        file.write(section)
    with open(os.path.join(args.workdir, "results.json"), "w") as file:
        json.dump({"settings": settings, "environment": env, "digits": digits, "toy": toy}, file, indent=1)
    if args.docs:
        report.rewrite_docs(os.path.join(REPO, "docs", "benchmarks.md"), section)
        print(f"rewrote the evidence section of docs/benchmarks.md and {', '.join(plots.values())} in docs/")
    print(section)
    print(f"report and plots in {args.workdir} ({env['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
