#!/usr/bin/env python
"""Does a small D help image-to-image? The PPFM claim (Hein et al.) at CPU scale, on the embedded digits.

PPFM trains conditional PFGM++ (the measurement concatenated to the input) and samples by "hijacking" the ODE: it
starts from the measurement itself at a noise level near the measurement's, and reports that D = 64 holds up at one
network evaluation where the diffusion model (D = infinity) fails. Here, for the built-in denoising task
(`paired.Degradation("denoise", sigma_y)`) or, with `--task superres`, super-resolution (2x2 average pooling,
upsampled back; its error level sigma_m is the RMS of y - x, `measurement_level`):

- models at D in {64, 128, inf} (`--aug_dims`), each trained with `--seeds` seeds by the library's own pieces
  (`losses.pfgmpp_loss` of `conditioning.with_condition(unet, y)` on `paired.PairedTrainingDataset`); every
  checkpoint (`--checkpoints`, `--steps`) is cached under `--cache_dir` with its training state, so a rerun loads
  the models, an interrupted or longer run resumes bit for bit, and `--jobs` trains the seeds in parallel processes;
  each checkpoint records the plateau figures (training loss, PSNR at NFE 1 and from the prior);
- restorations of the held-out digits from the measurement y: Euler in sigma on a Karras grid from sigma_start to
  sigma_min, then to 0 (NFE = `--nfes`), with sigma_start = sigma_y or sigma_m (matched) and 0.5x, 2x (mismatched: a
  user rarely knows the noise level of a measurement), the state starting at y itself (the hijack); and from the
  prior with the pipeline's Heun, 18 steps = 35 NFE;
- scored by PSNR, SSIM and the shipped classifier's label accuracy (`restoration.evaluate_restoration`'s metrics),
  with the D sweep's error bars (`img2img_report`: ± half the range over seeds + the standard error over images).

    make evidence-img2img                                                      # denoising; rewrites the docs
    python benchmarks/img2img_evidence.py --jobs 2 --output img2img.json       # the same, docs untouched
    python benchmarks/img2img_evidence.py --reduced --output img2img.json      # a machinery check, not evidence

The output is a JSON of every figure (`--output`), the verdicts and the PSNR table on stdout, and with `--docs` the
section of docs/benchmarks.md between its markers and two plots in `--plots_dir`.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import UNet2DModel

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, ode
from pfgm_diffusers.conditioning import with_condition
from pfgm_diffusers.data import EpochSampler, load_digits_dataset
from pfgm_diffusers.image_metrics import RestorationMetrics, digit_classifier
from pfgm_diffusers.losses import pfgmpp_loss
from pfgm_diffusers.paired import Degradation, PairedImages, PairedTrainingDataset, paired_collate
from pfgm_diffusers.restoration import degraded_digits, evaluate_restoration

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))  # aug_dim_sweep

UNET_CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "pfgm_diffusers", "training", "configs", "unet_digits_8px.json"
)
REDUCED = dict(steps=150, seeds=2, num_images=64, nfes=(1, 2, 3, 5, 11))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aug_dims", nargs="+", default=["64", "128", "inf"], help="D values; 'inf' = EDM.")
    parser.add_argument("--task", choices=["denoise", "superres"], default="denoise", help="The built-in paired task.")
    parser.add_argument(
        "--sigma_y", type=float, default=None, help="The measurement noise (model units; default 0.5 to denoise, 0)."
    )
    parser.add_argument("--factor", type=int, default=2, help="superres: the pooling factor (8 -> 4 -> 8 px).")
    parser.add_argument("--steps", type=int, default=12000, help="Training steps per model.")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--num_images", type=int, default=359, help="Held-out digits restored per model.")
    parser.add_argument("--nfes", type=int, nargs="+", default=[1, 2, 3, 5, 11])
    parser.add_argument("--start_factors", type=float, nargs="+", default=[1.0, 0.5, 2.0])
    parser.add_argument("--reduced", action="store_true", help=f"A machinery check: {REDUCED}.")
    parser.add_argument("--output", default=None, help="The JSON of every figure.")
    parser.add_argument("--warmup_steps", type=int, default=200, help="Linear learning-rate warm-up (the main job's).")
    parser.add_argument(
        "--decay_steps",
        type=int,
        default=None,
        help="A cosine cool-down of the learning rate to 0 over the last steps (0: constant after warm-up; default: "
        "the last 3/8 of --steps, 4500 of 12000). At a constant rate the restorations still improved by 0.1 dB per "
        "1000 steps at 10000 steps; annealing the rate is what lets a model settle on a plateau in a CPU budget.",
    )
    parser.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        default=[500, 1000, 2000, 4000, 6000, 8000, 10000, 11000, 14000, 15000],
        help="Steps where the plateau is measured.",
    )
    parser.add_argument("--cache_dir", default="outputs/img2img_evidence/models", help="Cached checkpoints.")
    parser.add_argument(
        "--evaluate_step",
        type=int,
        default=None,
        help="Restore with the EMA model of this checkpoint (one of the checkpoint steps; default: the last). The "
        "digits' 1438 training images are few: past their held-out plateau the models overfit.",
    )
    parser.add_argument("--train_seeds", type=int, nargs="+", default=None, help="Train only these seeds, then exit.")
    parser.add_argument("--jobs", type=int, default=1, help="Training processes in parallel (seeds shared out).")
    parser.add_argument("--docs", default=None, help="Rewrite this file's image-to-image evidence section.")
    parser.add_argument("--plots_dir", default="docs", help="Where --docs puts its PNG plots.")
    parser.add_argument("--command", default=None, help="The command the docs name (default: the task's make target).")
    parser.add_argument("--report", default=None, help="Only write --docs from this results JSON (no training).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than free cores crawl).")
    args = parser.parse_args(argv)
    if args.reduced:
        args.steps, args.seeds, args.num_images, args.nfes = REDUCED.values()
    if args.sigma_y is None:
        args.sigma_y = 0.5 if args.task == "denoise" else 0.0
    if args.decay_steps is None:
        args.decay_steps = round(0.375 * args.steps)
    if args.decay_steps < 0 or args.decay_steps > max(0, args.steps - args.warmup_steps):
        if args.reduced:  # the machinery check keeps its own short schedule
            args.decay_steps = min(args.decay_steps, args.steps // 2)
        else:
            raise ValueError(
                f"--decay_steps={args.decay_steps}: must lie in [0, --steps - --warmup_steps = "
                f"{max(0, args.steps - args.warmup_steps)}]"
            )
    args.aug_dims = [None if value == "inf" else int(value) for value in args.aug_dims]
    if args.evaluate_step is None:
        args.evaluate_step = args.steps
    if args.evaluate_step not in checkpoint_steps(args):
        raise ValueError(
            f"--evaluate_step={args.evaluate_step}: must be a checkpoint step, one of {checkpoint_steps(args)}"
        )
    return args


def model_folder(args, aug_dim, seed):
    """Where one model's checkpoints are cached: every setting that changes the weights is in the name."""
    d = "inf" if aug_dim is None else aug_dim
    task = f"denoise{args.sigma_y:g}" if args.task == "denoise" else f"superres{args.factor}_sigma{args.sigma_y:g}"
    # "split": trained on the training split only (caches before it trained on all 1797 digits, held-out included)
    name = f"{task}_split_D{d}_seed{seed}_bs{args.batch_size}_lr{args.learning_rate:g}_warm{args.warmup_steps}"
    if args.decay_steps:  # the cool-down changes every step's rate once it begins: a model of its own
        name += f"_cos{args.decay_steps}of{args.steps}"
    return os.path.join(args.cache_dir, name)


def checkpoint_steps(args):
    """Where a model is saved and its plateau figures measured: the `--checkpoints` below `--steps`, and `--steps`."""
    return sorted({step for step in args.checkpoints if 0 < step < args.steps} | {args.steps})


def cached_step(folder, args):
    """The largest cached checkpoint at most `--steps` (0 if none)."""
    done = [s for s in checkpoint_steps(args) if os.path.exists(os.path.join(folder, f"step{s}", "metrics.json"))]
    return max(done, default=0)


def measurement_level(degradation, args) -> float:
    """The measurement's error level that the hijack's start is matched to: sigma_y when denoising; for
    super-resolution the RMS of y - x over the held-out digits (the pooling's loss, plus any sigma_y)."""
    if args.task == "denoise":
        return args.sigma_y
    clean, y, _ = degraded_digits(degradation, args.num_images, 8, seed=0)
    return float((y - clean).pow(2).mean().sqrt())


def learning_rate_factor(step, args):
    """The rate's multiplier at `step`: a linear warm-up, constant, then a cosine to 0 over the last `--decay_steps`
    (a warm-up-stable-decay schedule)."""
    factor = min(1.0, (step + 1) / max(1, args.warmup_steps))
    into_decay = step - (args.steps - args.decay_steps)
    if args.decay_steps and into_decay > 0:
        factor *= 0.5 * (1 + math.cos(math.pi * min(1.0, into_decay / args.decay_steps)))
    return factor


def build_unet():
    with open(UNET_CONFIG) as f:
        config = {key: value for key, value in json.load(f).items() if not key.startswith("_")}
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=1, **config)


def plateau_figures(pipe, degradation, args, seed, classify, losses):
    """A checkpoint's figures: the mean training loss since the previous one, the hijack at NFE 1 (matched start)
    and the prior's Heun 35."""
    figures = dict(loss=float(np.mean(losses)))
    figures["hijack_nfe1"] = hijack(pipe, degradation, 1, args.measurement_level, args, seed, classify)
    figures["prior_heun"] = evaluate_restoration(pipe, degradation, args.num_images, seed=seed, classify=classify)
    return figures


def train(aug_dim, seed, args, degradation, classify):
    """A conditional PFGM++ model of the digits: the library's loss on the library's paired data; EMA weights. Each
    checkpoint (`checkpoint_steps`) is cached under `model_folder` with the training state, so a rerun loads the
    model and an interrupted run resumes from its last checkpoint. Returns the EMA pipeline and the plateau figures
    {step: figures}."""
    folder = model_folder(args, aug_dim, seed)
    done = cached_step(folder, args)
    plateau = {}
    for s in checkpoint_steps(args):
        if s <= done:
            with open(os.path.join(folder, f"step{s}", "metrics.json")) as f:
                plateau[s] = json.load(f)
    if done == args.steps:
        pipe = PFGMPipeline.from_pretrained(os.path.join(folder, f"step{done}"))
        pipe.set_progress_bar_config(disable=True)
        return pipe, plateau
    torch.manual_seed(seed)
    unet = build_unet()
    ema = UNet2DModel.from_config(unet.config)
    ema.load_state_dict(unet.state_dict())
    scheduler = PFGMScheduler(aug_dim=aug_dim)
    # The training split only: the restorations are scored on the held-out digits, which a model could memorise
    digits = load_digits_dataset(False, split="train")
    dataset = PairedTrainingDataset(PairedImages(digits, degradation=degradation), 8, seed=seed)
    sampler = EpochSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        collate_fn=paired_collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # its base seed: not drawn from the global RNG
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, args))
    step, epoch, skip = 0, 0, 0
    if done:  # resume: the weights, optimizer, RNG and the position in the epoch
        state = torch.load(os.path.join(folder, f"step{done}", "state.pt"), weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        warmup.load_state_dict(state["warmup"])
        torch.set_rng_state(state["rng"])
        step, epoch, skip = state["step"], state["epoch"], state["batch"]
    losses, began = [], time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index < skip:
                continue
            network = with_condition(unet, batch["conditioning_pixel_values"])
            loss = pfgmpp_loss(network, scheduler, batch["pixel_values"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            warmup.step()
            losses.append(loss.item())
            decay = min(0.999, (1 + step) / (10 + step))  # EMA with warm-up
            with torch.no_grad():
                for averaged, current in zip(ema.parameters(), unet.parameters(), strict=True):
                    averaged.lerp_(current, 1 - decay)
            step += 1
            if step in checkpoint_steps(args):
                pipe = PFGMPipeline(ema.eval(), scheduler, conditioning_channels=1)
                pipe.set_progress_bar_config(disable=True)
                target = os.path.join(folder, f"step{step}")
                pipe.save_pretrained(target)
                state = dict(
                    unet=unet.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                    warmup=warmup.state_dict(), rng=torch.get_rng_state(), step=step, epoch=epoch, batch=index + 1,
                )  # fmt: skip
                torch.save(state, os.path.join(target, "state.pt"))
                with torch.random.fork_rng():  # the evaluation leaves the training's RNG as it was
                    plateau[step] = plateau_figures(pipe, degradation, args, seed, classify, losses)
                plateau[step]["train_seconds"] = time.perf_counter() - began
                with open(os.path.join(target, "metrics.json"), "w") as f:  # written last: marks the step done
                    json.dump(plateau[step], f, indent=2)
                print(
                    f"D={aug_dim} seed={seed} step {step}: loss {plateau[step]['loss']:.4f}, NFE-1 PSNR "
                    f"{plateau[step]['hijack_nfe1']['psnr']:.2f}, {time.perf_counter() - began:.0f} s",
                    flush=True,
                )
                losses, began = [], time.perf_counter()
                ema.train()
            if step == args.steps:
                break
        epoch, skip = epoch + 1, 0
    return pipe, plateau


@torch.no_grad()
def hijack(pipe, degradation, nfe, sigma_start, args, seed, classify):
    """PPFM's start: the state is the measurement y at sigma_start, then Euler on a Karras grid to sigma_min and 0."""
    clean, y, labels = degraded_digits(degradation, args.num_images, 8, seed)
    scheduler = PFGMScheduler.from_config(pipe.scheduler.config, sigma_max=sigma_start)
    scheduler.set_timesteps(nfe)  # nfe levels from sigma_start down to sigma_min, then 0 (Euler: nfe calls)
    sigmas = torch.unique_consecutive(scheduler.sigmas).tolist()  # [sigma_start, ..., sigma_min, 0]
    restored = ode.sample_euler(lambda x, sigma: pipe.denoise(x, sigma, conditioning_image=y), y.clone(), sigmas)
    metrics = RestorationMetrics(classify=classify)
    metrics.update(((restored + 1) / 2).clamp(0, 1), (clean + 1) / 2, ((y + 1) / 2).clamp(0, 1), labels)
    return metrics.compute()


def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:  # re-render the docs from a finished run
        with open(args.report) as f:
            results = json.load(f)
        if args.docs is None:
            raise ValueError("--report renders the docs: give --docs (e.g. docs/benchmarks.md)")
        write_docs(results, args)
        return results
    torch.set_num_threads(args.threads)
    degradation = Degradation(args.task, sigma_y=args.sigma_y, factor=args.factor)
    args.measurement_level = measurement_level(degradation, args)
    classify = digit_classifier()
    runs = []  # one row per (D, seed, sampler, start level, NFE)
    if args.train_seeds is not None:  # a training job: fill the cache for these seeds, nothing else
        for aug_dim in args.aug_dims:
            for seed in args.train_seeds:
                train(aug_dim, seed, args, degradation, classify)
        return None
    if args.jobs > 1:  # training jobs in parallel, one per share of the seeds; they fill the cache
        shares = [list(range(args.seeds))[i :: args.jobs] for i in range(min(args.jobs, args.seeds))]
        argv = sys.argv[1:] if argv is None else list(argv)
        jobs = [subprocess.Popen([sys.executable, __file__, *argv, "--train_seeds", *map(str, s)]) for s in shares]
        if any(job.wait() for job in jobs):
            raise SystemExit("a training job failed; rerun to resume from the cached checkpoints")
    began = time.perf_counter()  # the evaluation's wall time (with any training not done by the jobs)
    plateaus = []
    for aug_dim in args.aug_dims:
        for seed in range(args.seeds):
            pipe, plateau = train(aug_dim, seed, args, degradation, classify)
            plateaus.append(dict(aug_dim=aug_dim, seed=seed, steps=plateau))
            if args.evaluate_step != args.steps:  # an earlier checkpoint's EMA model, from the cache
                folder = os.path.join(model_folder(args, aug_dim, seed), f"step{args.evaluate_step}")
                pipe = PFGMPipeline.from_pretrained(folder)
                pipe.set_progress_bar_config(disable=True)
            for factor in args.start_factors:
                for nfe in args.nfes:
                    result = hijack(pipe, degradation, nfe, factor * args.measurement_level, args, seed, classify)
                    runs.append(dict(aug_dim=aug_dim, seed=seed, sampler="hijack", start=factor, nfe=nfe, **result))
            result = evaluate_restoration(pipe, degradation, args.num_images, seed=seed, classify=classify)
            runs.append(dict(aug_dim=aug_dim, seed=seed, sampler="prior_heun", start=None, **result))
    results = dict(
        settings={**vars(args), "aug_dims": [("inf" if d is None else d) for d in args.aug_dims]},
        reduced=args.reduced,
        seconds=time.perf_counter() - began,
        runs=runs,
        plateaus=plateaus,
    )
    seconds = [f["train_seconds"] for p in plateaus for f in p["steps"].values()]
    results["train_minutes"] = sum(seconds) / 60 / max(1, len(plateaus))
    print(summary(results))
    if args.output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    if args.docs is not None:
        write_docs(results, args)
    return results


def summary(results) -> str:
    """The verdicts and the PSNR table, for the console."""
    import img2img_report

    return "\n".join([*img2img_report.verdict_lines(results), "", *img2img_report.nfe_table(results, "psnr")])


def write_docs(results, args):
    """The plots into `--plots_dir` and this evidence's section of `--docs` (docs/benchmarks.md)."""
    import img2img_report

    plots = img2img_report.plot_all(results, args.plots_dir)
    relative = os.path.relpath(args.plots_dir, os.path.dirname(os.path.abspath(args.docs)))
    plots = {kind: name if relative == "." else f"{relative}/{name}" for kind, name in plots.items()}
    task = results["settings"].get("task", "denoise")  # also for --report, whatever --task says
    target = "evidence-img2img" if task == "denoise" else f"evidence-img2img-{task}"
    command = f"make {target}" if args.command is None else args.command
    img2img_report.rewrite_docs(args.docs, img2img_report.section(results, plots, command), results)
    print(f"wrote the section of {args.docs} and {sorted(plots.values())}")


if __name__ == "__main__":
    main()
