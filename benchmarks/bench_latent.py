"""Latent PFGM++: the cost of a training step with the latent cache, against encoding every step and against a bare
loop over latents already in memory; the encoding pass's images/s; the peak memory of decoding. A script, not a test.

1. Three training loops of the same small UNet on the latents of the same small AutoencoderKL (random weights: the
   cost does not depend on them), the PFGM++ loss, AdamW and `accelerate`, `--steps` steps each:
   - cached: a DataLoader over `LatentDataset` (the cache's posterior means, with the trainer's sampler and collate);
   - encoding every step: a DataLoader over the images (`TrainingDataset`), then `vae.encode` and the scaling;
   - bare: a batch indexed from a tensor of latents already in memory.
   The loops take turns in blocks of `--block` steps (8: one epoch of the cached loop, its restart included), in a
   rotating order, after a warm-up block each, so that a slow spell of a shared machine falls on all three alike
   (three whole loops one after another gave cached / bare 1.02 in one run and 1.29 in the next). Per run: each
   loop's median ms per step, and per pair the median over rounds of the ratio of the two blocks of a round (wall and
   the process's CPU time) beside the ratio of total wall times; then the median and spread over `--repeats` runs.
2. The encoding pass (`build_latent_cache`, a fresh folder): images/s.
3. Peak memory of decoding `--decode_images` latents at once and with `decode_batch_size=8`: on CUDA
   `torch.cuda.max_memory_allocated`, on the CPU (Linux) the peak resident size above the resident size before the
   decode (the peak reset through /proc/self/clear_refs); each in a fresh process, after a one-image warm-up decode.

    python benchmarks/bench_latent.py                     # about 3 minutes on 2 idle cores
    python benchmarks/bench_latent.py --steps 40 --repeats 1   # a quick look
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]

from machine import describe, load_average  # noqa: E402

RESOLUTION = 32


def small_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)  # factor 4: 32 px images -> 4 x 8 x 8 latents (N = 256, the digits' 16 px size)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    ).eval()


def small_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def images(num_images):
    import datasets
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    arrays = torch.randint(0, 256, (num_images, RESOLUTION, RESOLUTION, 3), generator=generator, dtype=torch.uint8)
    data = {"image": [Image.fromarray(array.numpy()) for array in arrays]}
    return datasets.Dataset.from_dict(data, features=datasets.Features({"image": datasets.Image()}))


def timed_blocks(loops, rounds, block):
    """Wall and CPU seconds of each block of `block` consecutive steps of every loop {name: (batches, step)}. The
    loops take turns block by block, in a different order each round, so that a slow spell of the machine (a
    neighbour, a frequency change) falls on all of them alike; round 0 is a warm-up and left out. Returns {name:
    [(wall, cpu) per round]}."""
    times = {name: [] for name in loops}
    names = list(loops)
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            batches, step = loops[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(block):
                step(next(batches))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def endless(dataloader, sampler, dataset):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        yield from dataloader
        epoch += 1


def training_step_costs(cache, dataset, vae, batch_size, steps, block=8):
    """Per loop, the seconds (wall, CPU) of each block of `block` steps (`timed_blocks`, `steps // block` rounds).
    A block of the cached loop with `block` = the batches per epoch (256 / 32 = 8 by default) holds one epoch's
    start, its sampler and its fresh data-loader iterator: that cost is counted, not averaged away."""
    from accelerate import Accelerator

    from pfgm_diffusers import PFGMScheduler
    from pfgm_diffusers.data import EpochSampler, ImageTransform, TrainingDataset, collate
    from pfgm_diffusers.latent_cache import LatentDataset
    from pfgm_diffusers.losses import pfgmpp_loss
    from pfgm_diffusers.vae import encode_moments

    accelerator = Accelerator(mixed_precision="no", cpu=not torch.accelerator.is_available())
    scheduler = PFGMScheduler(aug_dim=128, sigma_data=cache.statistics["rms"])
    unet = small_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae = vae.to(accelerator.device)

    def train(x):
        loss = pfgmpp_loss(unet, scheduler, x)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    def loader(data):
        sampler = EpochSampler(len(data), seed=0)
        dataloader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True
        )
        return endless(accelerator.prepare(dataloader), sampler, data)

    latents = LatentDataset(cache, "mean")
    pixels = TrainingDataset(dataset, ImageTransform(RESOLUTION, 3, center_crop=True))
    in_memory = cache.moments(range(len(cache)))[0].to(accelerator.device)  # (num_images, C, h, w)
    order = torch.Generator().manual_seed(0)

    def bare_batches():
        while True:
            yield in_memory[torch.randint(len(in_memory), (batch_size,), generator=order).to(accelerator.device)]

    def encoded(batch):
        train(cache.scaling.to_model(encode_moments(vae, batch["pixel_values"])[0]))

    loops = dict(
        cached=(loader(latents), lambda batch: train(batch["pixel_values"])),
        encoding=(loader(pixels), encoded),
        bare=(bare_batches(), train),
    )
    return timed_blocks(loops, steps // block, block)


def summarise(blocks, block):
    """One run's figures from its blocks: per loop the median seconds per step (wall, CPU); per pair of loops the
    median over rounds of the ratio of their blocks in one round (wall, CPU) and the ratio of total wall times."""
    figures = {
        name: {clock: statistics.median(t[i] for t in times) / block for i, clock in enumerate(("wall", "cpu"))}
        for name, times in blocks.items()
    }
    for top, bottom in (("cached", "bare"), ("encoding", "cached")):
        figures[f"{top}_over_{bottom}"] = {
            clock: statistics.median(a[i] / b[i] for a, b in zip(blocks[top], blocks[bottom], strict=True))
            for i, clock in enumerate(("wall", "cpu"))
        }
        figures[f"{top}_over_{bottom}"]["wall_total"] = sum(t[0] for t in blocks[top]) / sum(
            t[0] for t in blocks[bottom]
        )
    return figures


def decode_peak_memory(num_images, decode_batch_size):
    """Peak memory (MiB) of decoding `num_images` latents, in this process: see the module docstring."""
    from pfgm_diffusers.vae import LatentScaling, decode_latents

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = small_vae().to(device)
    scaling = LatentScaling.from_config(vae.config)
    latents = torch.randn(num_images, 4, RESOLUTION // 4, RESOLUTION // 4, device=device)
    decode_latents(vae, latents[:1], scaling)  # warm-up: weights, allocator, kernels
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        decode_latents(vae, latents, scaling, decode_batch_size)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # Linux: resets the peak resident size (VmHWM) to the current one
        f.write("5")
    base = _status_kib("VmRSS")
    decode_latents(vae, latents, scaling, decode_batch_size)
    return (_status_kib("VmHWM") - base) / 1024


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240, help="Steps per loop per run (after a warm-up block).")
    parser.add_argument("--block", type=int, default=8, help="Steps per turn of a loop (8 = one epoch of 256 / 32).")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=256, help="Images encoded into the cache.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode_images", type=int, default=64)
    parser.add_argument("--json", help="Also write the figures to this file.")
    parser.add_argument("--_decode_only", type=int, nargs="?", const=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._decode_only is not None:  # a fresh process: its peak memory is this decode's alone
        print(decode_peak_memory(args.decode_images, args._decode_only or None))
        return

    from pfgm_diffusers.latent_cache import build_latent_cache, cache_fingerprint

    results = {"machine": describe(), "threads": args.threads, "load_before": load_average()}
    print(f"{results['machine']}; {args.threads} thread(s); load average {results['load_before']:.2f}")
    dataset, vae = images(args.num_images), small_vae()
    with tempfile.TemporaryDirectory() as folder:
        fingerprint = cache_fingerprint(vae, dataset, RESOLUTION, 3, True, False, torch.float32)
        start = time.perf_counter()
        cache = build_latent_cache(os.path.join(folder, "cache"), vae, dataset, fingerprint, batch_size=32)
        seconds = time.perf_counter() - start
        results["encoding_images_per_s"] = args.num_images / seconds
        parameters = sum(p.numel() for p in vae.parameters()) / 1e6
        print(f"encoding pass: {args.num_images} images of {RESOLUTION} px in {seconds:.1f} s, "
              f"{results['encoding_images_per_s']:.0f} images/s (VAE {parameters:.2f}M parameters)")  # fmt: skip
        runs = []
        for repeat in range(args.repeats):
            blocks = training_step_costs(cache, dataset, vae, args.train_batch_size, args.steps, args.block)
            runs.append(summarise(blocks, args.block))
            ms = {name: [1000 * runs[-1][name][clock] for clock in ("wall", "cpu")] for name in blocks}
            print(
                f"  run {repeat + 1} ({len(blocks['bare'])} rounds of {args.block} steps): median ms per step "
                f"(wall/CPU) cached {ms['cached'][0]:.1f}/{ms['cached'][1]:.1f}, encoding every step "
                f"{ms['encoding'][0]:.1f}/{ms['encoding'][1]:.1f}, bare {ms['bare'][0]:.1f}/{ms['bare'][1]:.1f}; "
                f"cached / bare {runs[-1]['cached_over_bare']['wall']:.3f} (block by block), "
                f"{runs[-1]['cached_over_bare']['wall_total']:.3f} (total time) (load {load_average():.2f})"
            )
    results["runs"] = runs
    for pair in ("cached_over_bare", "encoding_over_cached"):
        for clock in ("wall", "cpu", "wall_total"):
            ratios = [run[pair][clock] for run in runs]
            results[f"{pair}_{clock}"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
            target = " (target <= 1.10)" if pair == "cached_over_bare" else ""
            label = {"wall": "wall time, block by block", "cpu": "CPU time, block by block"}.get(
                clock, "total wall time"
            )
            print(f"{pair.replace('_over_', ' / ')}, {label}: median {statistics.median(ratios):.3f}, spread "
                  f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} run(s){target}")  # fmt: skip
    results["decode_peak_mib"] = {}
    for decode_batch_size in (0, 8):
        command = [sys.executable, __file__, "--_decode_only", str(decode_batch_size), "--threads", str(args.threads)]
        command += ["--decode_images", str(args.decode_images)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1]
        label = "at once" if decode_batch_size == 0 else f"decode_batch_size={decode_batch_size}"
        results["decode_peak_mib"][label] = float(output)
        device = "CUDA allocated" if torch.cuda.is_available() else "CPU resident"
        print(
            f"decoding {args.decode_images} latents {label}: peak {float(output):.0f} MiB above the model ({device})"
        )
    results["load_after"] = load_average()
    print(f"load average after: {results['load_after']:.2f}")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
