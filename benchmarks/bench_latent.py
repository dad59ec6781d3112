"""Latent PFGM++: the cost of a training step with the latent cache, against encoding every step and against a bare
loop over latents already in memory; the encoding pass's images/s; the peak memory of decoding. A script, not a test.

1. Three training loops of the same small UNet on the latents of the same small AutoencoderKL (random weights: the
   cost does not depend on them), the PFGM++ loss, AdamW and `accelerate`, `--steps` steps each, the first 5 left out:
   - cached: a DataLoader over `LatentDataset` (the cache's posterior means, with the trainer's sampler and collate);
   - encoding every step: a DataLoader over the images (`TrainingDataset`), then `vae.encode` and the scaling;
   - bare: a batch indexed from a tensor of latents already in memory.
   The loops run alternately, `--repeats` times; the ratios cached/bare (target <= 1.10) and encoding/cached are
   printed per run, then the median and spread, of wall time and of the process's CPU time per step.
2. The encoding pass (`build_latent_cache`, a fresh folder): images/s.
3. Peak memory of decoding `--decode_images` latents at once and with `decode_batch_size=8`: on CUDA
   `torch.cuda.max_memory_allocated`, on the CPU (Linux) the peak resident size above the resident size before the
   decode (the peak reset through /proc/self/clear_refs); each in a fresh process, after a one-image warm-up decode.

    python benchmarks/bench_latent.py                     # about 3 minutes on 2 idle cores
    python benchmarks/bench_latent.py --steps 40 --repeats 1 --num_images 64   # a quick look
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


def timed_loop(batches, step, steps):
    """Wall and CPU seconds per step of `step(batch)` over `steps` batches, the first 5 left out."""
    times, cpu_times = [], []
    iterator = iter(batches)
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(next(iterator))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return sum(times[5:]) / (steps - 5), sum(cpu_times[5:]) / (steps - 5)


def endless(dataloader, sampler, dataset):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        yield from dataloader
        epoch += 1


def training_step_costs(cache, dataset, vae, batch_size, steps, repeat=0):
    """Seconds (wall, CPU) per step of the three loops."""
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
        cached=lambda: timed_loop(loader(latents), lambda batch: train(batch["pixel_values"]), steps),
        encoding=lambda: timed_loop(loader(pixels), encoded, steps),
        bare=lambda: timed_loop(bare_batches(), train, steps),
    )
    names = list(loops)
    names = names[repeat % 3 :] + names[: repeat % 3]  # a different order each repeat: no loop always runs first
    return {name: loops[name]() for name in names}


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
    parser.add_argument("--steps", type=int, default=100)
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
            costs = training_step_costs(cache, dataset, vae, args.train_batch_size, args.steps, repeat)
            runs.append(costs)
            print(
                f"  run {repeat + 1}: ms per step (wall/CPU) cached {1000 * costs['cached'][0]:.1f}/"
                f"{1000 * costs['cached'][1]:.1f}, encoding every step {1000 * costs['encoding'][0]:.1f}/"
                f"{1000 * costs['encoding'][1]:.1f}, bare {1000 * costs['bare'][0]:.1f}/{1000 * costs['bare'][1]:.1f}"
                f" (load {load_average():.2f})"
            )
    results["runs"] = runs
    for name, clock in (("wall", 0), ("cpu", 1)):
        for label, top, bottom in (("cached / bare", "cached", "bare"), ("encoding / cached", "encoding", "cached")):
            ratios = [run[top][clock] / run[bottom][clock] for run in runs]
            results[f"{top}_over_{bottom}_{name}"] = dict(median=statistics.median(ratios), min=min(ratios),
                                                          max=max(ratios))  # fmt: skip
            target = " (target <= 1.10)" if top == "cached" else ""
            print(f"{label}, {name} time per step: median {statistics.median(ratios):.3f}, spread "
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
