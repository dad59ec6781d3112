#!/usr/bin/env python
"""Choose D for your data: train PFGM++ at several D with the project's trainer, sample each model with the library's
solvers at several step counts, and report with error bars which D is best and how each degrades with fewer steps.

    # the embedded digits (offline), D = 8, 128, 2048 and infinity, two seeds: ~40 min on 2 CPU cores
    python scripts/sweep_aug_dim.py
    # your own folder of images at 32 px, a quicker look: one seed, 2000 steps, 400 samples per point
    python scripts/sweep_aug_dim.py --train_data_dir my_images --resolution 32 --aug_dims 64 2048 inf \\
        --seeds 0 --train_steps 2000 --num_images 400
    # a Hub dataset, the original PFGM beside PFGM++, robustness to injected noise and 6-bit weights
    python scripts/sweep_aug_dim.py --dataset_name uoft-cs/cifar10 --resolution 32 --aug_dims 128 inf pfgm \\
        --noise_scales 0.1 --quantization_bits 6
    # Stable Target Field beside the plain target at equal training steps, Restart beside Heun at equal NFE
    python scripts/sweep_aug_dim.py --aug_dims 128 inf --targets clean stf --reference_batch_size 1024 \\
        --solvers heun restart --restart_steps 9 18
    # the digits part of the project's evidence (make evidence adds the papers' claims and the 2-D toys)
    python scripts/sweep_aug_dim.py --preset evidence

Each model (D, target, seed) is one job; `--jobs` run at a time, each on one thread, and a finished job's result is
kept in `--output_dir` and reused by a rerun with the same settings. Its training is kept apart
(`results/train-*.json`), so a rerun with other measurements (solvers, steps, images) measures the trained models
again without training them. The report (`report.md`), its plots (`sweep_*.png`) and every figure (`results.json`)
go into `--output_dir`; the console gets the best D and the path.

Quality: on the embedded digits the offline digits classifier (Fréchet distance in its features, the share of
confidently classified samples); on any other data the sliced 2-Wasserstein distance in pixel space to the training
images (`--metric sliced_wasserstein`, no extra dependency). Error bars: ± half the range over the seeds + the
standard error over the images; a difference counts only when it exceeds the sum of both error bars, so with one seed
the bars hold the images' noise only.
"""

import argparse
import datetime
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/aug_dim_sweep

from aug_dim_sweep import jobs, judges, models, plots, presets, report  # noqa: E402

DEFAULT_AUG_DIMS = ["8", "128", "2048", "inf"]


def parse_model(value: str) -> list:
    """An --aug_dims entry: an integer D >= 1, 'inf' (diffusion) or 'pfgm' (the original PFGM, the field objective)."""
    if value == "inf":
        return ["pfgmpp", None]
    if value == "pfgm":
        return ["poisson_field", None]
    try:
        aug_dim = int(value)
    except ValueError:
        aug_dim = 0
    if aug_dim < 1:
        raise argparse.ArgumentTypeError(
            f"each --aug_dims value must be an integer >= 1, 'inf' or 'pfgm', got {value!r}"
        )
    return ["pfgmpp", aug_dim]


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument_group("data (default: the embedded digits at 8x8)").add_argument
    add("--train_data_dir", help="A folder of images (class sub-folders allowed), as the trainer takes it.")
    add("--dataset_name", help="A `datasets` Hub id, data folder or save_to_disk folder, as the trainer takes it.")
    add("--dataset_config_name", help="The Hub dataset's configuration.")
    add("--image_column", help="The Hub dataset's image column (default: its first image column).")
    add("--resolution", type=positive_int, help="Image size the models train at (required with your own data).")
    add = parser.add_argument_group("models").add_argument
    add("--aug_dims", nargs="+", type=parse_model, help="D values: integers, 'inf', 'pfgm' (default: 8 128 2048 inf).")
    add("--seeds", nargs="+", type=int, default=[0, 1], help="Training seeds (default: 0 1).")
    add("--train_steps", nargs="+", type=positive_int, help="Training steps, measured after each (default: 4000).")
    add(
        "--model_config_name_or_path",
        help="The UNet config (default: the digits' 8 px UNet on the digits, else the trainer's).",
    )
    add("--train_batch_size", type=positive_int, default=64)
    add("--learning_rate", type=float, default=2e-3)
    add("--lr_warmup_steps", type=int, default=200)
    add("--ema_max_decay", type=float, default=0.999)
    add(
        "--targets",
        nargs="+",
        choices=("clean", "stf"),
        default=["clean"],
        help="Regression targets, each D trained with each: 'clean' (the plain target, the sample's own image) and "
        "'stf' (Stable Target Field, the trainer's --target stf). Default: clean.",
    )
    add(
        "--reference_batch_size",
        type=positive_int,
        help="STF's reference batch (the trainer's default 4096 when not given; at most the number of images).",
    )
    add(
        "--trainer_args",
        default="",
        help='More trainer flags, one string: --trainer_args="--random_flip --center_crop".',
    )
    add = parser.add_argument_group("measurement").add_argument
    add(
        "--steps",
        nargs="+",
        type=positive_int,
        default=[3, 4, 6, 9, 13, 18],
        help="Heun step counts; the largest is the reference.",
    )
    add(
        "--solvers",
        nargs="+",
        default=["heun"],
        help="Solvers measured at --steps (default heun; also euler, dpmpp_2m), and 'restart': Restart at "
        "--restart_steps, each beside Heun at the same NFE.",
    )
    add(
        "--restart_steps",
        nargs="+",
        type=positive_int,
        help="With --solvers ... restart: the Heun grids Restart runs on (default: the largest --steps).",
    )
    add(
        "--restart_blocks",
        type=json.loads,
        help="With --solvers ... restart: the blocks as JSON, e.g. '{\"0\": [3, 2, 0.14, 0.30]}' (the default, the "
        "official CIFAR-10 block: [N_restart, K, t_min, t_max]).",
    )
    add("--num_images", type=positive_int, default=700, help="Samples per point (default 700).")
    add("--batch_size", type=positive_int, default=350, help="Sampling batch size.")
    add("--metric", choices=judges.JUDGES, help="Default: digits on the embedded digits, else sliced_wasserstein.")
    add("--noise_scales", nargs="*", type=float, default=[], help="Noise injected before every Heun step (PFGM++ §5).")
    add("--quantization_bits", nargs="*", type=positive_int, default=[], help="Weight bits (PFGM++ §5).")
    add = parser.add_argument_group("run").add_argument
    add(
        "--preset",
        choices=sorted(presets.PRESETS),
        help="The project's own settings; the flags above are then ignored.",
    )
    add("--output_dir", default=os.path.join("outputs", "sweep_aug_dim"), help="Report, plots and kept results.")
    add("--jobs", type=positive_int, default=2, help="Models trained at a time, one thread each (default 2).")
    args = parser.parse_args(argv)
    if args.train_data_dir is not None and args.dataset_name is not None:
        parser.error("give at most one of --train_data_dir and --dataset_name")
    if (args.train_data_dir or args.dataset_name) and args.resolution is None and args.preset is None:
        parser.error(
            "--resolution is required with --train_data_dir or --dataset_name (8 px is the digits' default only)"
        )
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    return args


def settings_from_args(args) -> dict:
    """The sweep's settings (the layout of `presets.EVIDENCE`) from the command line."""
    if args.preset is not None:
        return presets.PRESETS[args.preset]
    data = {flag: getattr(args, flag) for flag in models.DATA_FLAGS if getattr(args, flag) is not None}
    digits = not data
    model_config = args.model_config_name_or_path or (models.UNET_CONFIG if digits else None)
    aug_dims = args.aug_dims or [parse_model(value) for value in DEFAULT_AUG_DIMS]
    steps = sorted(set(args.steps))
    solvers = [solver for solver in args.solvers if solver != "restart"]
    restart = "restart" in args.solvers
    models_ = [list(model) for model in dict.fromkeys(tuple(m) for m in aug_dims)]
    targets = list(dict.fromkeys(args.targets))
    return {
        "data": data,
        "models": [
            model + ([] if target == "clean" else [target])
            for target in targets
            for model in models_
            if target == "clean" or model[0] == "pfgmpp"
        ],
        "seeds": args.seeds,
        "training": {
            "resolution": args.resolution or 8,
            "model_config": model_config,
            "batch_size": args.train_batch_size,
            "learning_rate": args.learning_rate,
            "lr_warmup_steps": args.lr_warmup_steps,
            "ema_max_decay": args.ema_max_decay,
            "segments": sorted(set(args.train_steps or [4000])),
            "reference_batch_size": args.reference_batch_size,
            "field": {},
            "extra_args": shlex.split(args.trainer_args),
        },
        "evaluation": {
            "metric": args.metric or ("digits" if digits else "sliced_wasserstein"),
            "num_images": args.num_images,
            "curve_images": args.num_images,
            "batch_size": args.batch_size,
            "sample_seed": 0,
            "num_bootstrap": 100,
            "reference_steps": steps[-1],
            "steps": {solver: steps for solver in solvers} | {"other": []},
            "restart_steps": sorted(set(args.restart_steps or steps[-1:])) if restart else [],
            "restart_blocks": args.restart_blocks,
            "noise_scales": args.noise_scales,
            "quantization_bits": args.quantization_bits,
            "rk45_all": False,
            "rk45_images": min(100, args.num_images),
            "rk45_batch_size": min(100, args.num_images),
            "rk45_max_nfe": 1000,
        },
    }


def check_settings(settings):
    """Refuse, before any training, what the sweep cannot measure."""
    from aug_dim_sweep.sampling import scheduler_solvers

    evaluation = settings["evaluation"]
    unknown = [solver for solver in evaluation["steps"] if solver not in (*scheduler_solvers(), "other")]
    if unknown:
        raise ValueError(f"unknown solver(s) {unknown}; choose from {[*scheduler_solvers(), 'restart']}")
    for num_steps in evaluation.get("restart_steps", []):
        check_restart_grid(num_steps, evaluation.get("restart_blocks"))
    if "heun" not in settings["evaluation"]["steps"]:
        raise ValueError("the sweep ranks the models at Heun's largest step count: keep 'heun' in --solvers")
    if settings["evaluation"]["num_images"] < 6:
        raise ValueError(
            f"--num_images must be >= 6 (the jackknife's blocks), got {settings['evaluation']['num_images']}"
        )


def check_restart_grid(num_steps, blocks):
    """Refuse restart blocks that do not fit the Heun grid of `num_steps` (of the trainer's default sigma range)."""
    from pfgm_diffusers import PFGMScheduler, flow, restart

    sigmas = flow.noise_levels(PFGMScheduler(), num_steps)
    try:
        restart.restart_schedule(sigmas, restart.RESTART_CIFAR10 if blocks is None else blocks)
    except ValueError as error:
        raise ValueError(f"--restart_steps {num_steps}: {error}") from None


def command_line(argv) -> str:
    return " ".join(["python scripts/sweep_aug_dim.py", *map(shlex.quote, argv)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = settings_from_args(args)
    try:
        check_settings(settings)
        import matplotlib  # noqa: F401
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    except ImportError:
        raise SystemExit(f"error: {plots.MATPLOTLIB_MISSING}") from None
    os.makedirs(args.output_dir, exist_ok=True)
    began = time.perf_counter()
    results, info = jobs.run_all(jobs.model_jobs(settings), args.output_dir, args.jobs)
    results = list(results.values())
    environment = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "torch": torch_version()}
    environment.update(info, wall_seconds=time.perf_counter() - began)
    metrics = judges.make_judge_metrics(settings)
    written = plots.plot_sweep(results, settings, metrics, args.output_dir)
    quick = args.preset == "evidence-quick"
    text = report.markdown(results, settings, environment, command_line(argv), written, metrics, quick=quick)
    report_path = os.path.join(args.output_dir, "report.md")
    with open(report_path, "w", encoding="utf-8") as file:
        file.write(text)
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump({"settings": settings, "environment": environment, "models": results}, file, indent=1)
    if quick:
        print("MACHINERY CHECK, NOT EVIDENCE: toy-sized settings.")
    print("\n".join(report.summary_lines(results, settings, metrics)))
    print(f"report: {report_path} (plots and results.json beside it; {environment['wall_seconds'] / 60:.1f} min)")


def cpu_name() -> str:
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
