#!/usr/bin/env python
"""Does a small D help image-to-image? The PPFM claim (Hein et al.) at CPU scale, on the embedded digits.

PPFM trains conditional PFGM++ (the measurement concatenated to the input) and samples by "hijacking" the ODE: it
starts from the measurement itself at a noise level near the measurement's, and reports that D = 64 holds up at one
network evaluation where the diffusion model (D = infinity) fails. Here, for the built-in denoising task
(`paired.Degradation("denoise", sigma_y)`):

- models at D in {64, 128, inf} (`--aug_dims`), each trained with `--seeds` seeds by the library's own pieces
  (`losses.pfgmpp_loss` of `conditioning.with_condition(unet, y)` on `paired.PairedTrainingDataset`);
- restorations of the held-out digits from the measurement y: Euler in sigma on a Karras grid from sigma_start to
  sigma_min, then to 0 (NFE = `--nfes`), with sigma_start = sigma_y (matched) and 0.5x, 2x sigma_y (mismatched: a
  user rarely knows the noise level of a measurement), the state starting at y itself (the hijack); and from the
  prior with the pipeline's Heun, 18 steps = 35 NFE;
- scored by PSNR, SSIM and the shipped classifier's label accuracy (`restoration.evaluate_restoration`'s metrics),
  mean +- standard error over the seeds (each seed's figure is the mean over `--num_images` digits).

    python benchmarks/img2img_evidence.py --output img2img.json               # the full run (hours on 2 cores)
    python benchmarks/img2img_evidence.py --reduced --output img2img.json     # a machinery check, not evidence

The output is a JSON of every figure and a markdown table on stdout.
"""

import argparse
import json
import math
import os
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

UNET_CONFIG = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "unet_digits_8px.json")
REDUCED = dict(steps=150, seeds=2, num_images=64, nfes=(1, 2, 3, 5, 11))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aug_dims", nargs="+", default=["64", "128", "inf"], help="D values; 'inf' = EDM.")
    parser.add_argument("--sigma_y", type=float, default=0.5, help="The measurement noise (model units).")
    parser.add_argument("--steps", type=int, default=6000, help="Training steps per model (the main job's).")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--num_images", type=int, default=359, help="Held-out digits restored per model.")
    parser.add_argument("--nfes", type=int, nargs="+", default=[1, 2, 3, 5, 11])
    parser.add_argument("--start_factors", type=float, nargs="+", default=[1.0, 0.5, 2.0])
    parser.add_argument("--reduced", action="store_true", help=f"A machinery check: {REDUCED}.")
    parser.add_argument("--output", default=None, help="The JSON of every figure.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than free cores crawl).")
    args = parser.parse_args(argv)
    if args.reduced:
        args.steps, args.seeds, args.num_images, args.nfes = REDUCED.values()
    args.aug_dims = [None if value == "inf" else int(value) for value in args.aug_dims]
    return args


def train(aug_dim, seed, args, degradation):
    """A conditional PFGM++ model of the digits: the library's loss on the library's paired data; EMA weights."""
    torch.manual_seed(seed)
    with open(UNET_CONFIG) as f:
        config = {key: value for key, value in json.load(f).items() if not key.startswith("_")}
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=1, **config)
    ema = UNet2DModel.from_config(unet.config)
    ema.load_state_dict(unet.state_dict())
    scheduler = PFGMScheduler(aug_dim=aug_dim)
    dataset = PairedTrainingDataset(PairedImages(load_digits_dataset(False), degradation=degradation), 8, seed=seed)
    sampler = EpochSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=paired_collate, drop_last=True
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            network = with_condition(unet, batch["conditioning_pixel_values"])
            loss = pfgmpp_loss(network, scheduler, batch["pixel_values"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            decay = min(0.999, (1 + step) / (10 + step))  # EMA with warm-up
            with torch.no_grad():
                for averaged, current in zip(ema.parameters(), unet.parameters(), strict=True):
                    averaged.lerp_(current, 1 - decay)
            step += 1
            if step == args.steps:
                break
        epoch += 1
    pipe = PFGMPipeline(ema.eval(), scheduler, conditioning_channels=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def summarize(values):
    values = np.asarray(values, dtype=float)
    sem = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": float(values.mean()), "sem": float(sem), "per_seed": values.tolist()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    degradation = Degradation("denoise", sigma_y=args.sigma_y)
    classify = digit_classifier()
    runs = []  # one row per (D, seed, sampler, start level, NFE)
    began = time.perf_counter()
    for aug_dim in args.aug_dims:
        for seed in range(args.seeds):
            pipe = train(aug_dim, seed, args, degradation)
            for factor in args.start_factors:
                for nfe in args.nfes:
                    result = hijack(pipe, degradation, nfe, factor * args.sigma_y, args, seed, classify)
                    runs.append(dict(aug_dim=aug_dim, seed=seed, sampler="hijack", start=factor, nfe=nfe, **result))
            result = evaluate_restoration(pipe, degradation, args.num_images, seed=seed, classify=classify)
            runs.append(dict(aug_dim=aug_dim, seed=seed, sampler="prior_heun", start=None, **result))
    table = {}
    for run in runs:
        key = (run["aug_dim"], run["sampler"], run["start"], run["nfe"])
        table.setdefault(key, []).append(run)
    rows = []
    for (aug_dim, sampler, start, nfe), group in table.items():
        row = dict(aug_dim=aug_dim, sampler=sampler, start=start, nfe=nfe)
        for name in ("psnr", "ssim", "accuracy", "degraded_psnr", "degraded_accuracy"):
            row[name] = summarize([run[name] for run in group])
        rows.append(row)
    results = dict(
        settings={**vars(args), "aug_dims": [("inf" if d is None else d) for d in args.aug_dims]},
        reduced=args.reduced,
        seconds=time.perf_counter() - began,
        rows=rows,
        runs=runs,
    )
    print(markdown(results))
    if args.output is not None:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


def markdown(results):
    settings = results["settings"]
    lines = []
    if results["reduced"]:
        lines.append(
            "**Machinery check at reduced settings, not evidence**: "
            f"{settings['steps']} training steps, {settings['seeds']} seeds, {settings['num_images']} digits."
        )
    lines.append(
        f"Denoising sigma_y = {settings['sigma_y']}; mean +- standard error over {settings['seeds']} seeds "
        f"({settings['steps']} steps each); measurement: PSNR "
        f"{results['rows'][0]['degraded_psnr']['mean']:.2f} dB, label accuracy "
        f"{100 * results['rows'][0]['degraded_accuracy']['mean']:.0f} %."
    )
    lines += [
        "",
        "| D | sampler | start / sigma_y | NFE | PSNR (dB) | SSIM | label accuracy (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        d = "inf" if row["aug_dim"] is None else row["aug_dim"]
        start = "-" if row["start"] is None else f"{row['start']:g}"
        nfe = 35 if row["sampler"] == "prior_heun" else row["nfe"]
        cells = [
            f"{row[k]['mean'] * s:.3g} +- {row[k]['sem'] * s:.2g}"
            for k, s in (("psnr", 1), ("ssim", 1), ("accuracy", 100))
        ]
        lines.append(f"| {d} | {row['sampler']} | {start} | {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
