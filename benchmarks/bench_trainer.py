"""Trainer overhead and the PFGM field target's cost per step. A script, not a test.

1. The trainer's steps/s (training/train_pfgm.py launched for real on the embedded digits, timed through its loss
   seam by trainer_timing.py: the steps after the first 5, without sampling and checkpoints) against a bare accelerate
   loop of the same UNet, batch, optimizer and thread count (forward, a mean-square loss, backward, step; the first 5
   steps left out too). The ratio bare/trainer is the trainer's overhead
   (target <= 1.10): data loading, the PFGM++ kernel and preconditioning, clipping, the lr schedule, EMA and logging.
   Trainer and bare loop run alternately, `--repeats` times, so that load from other processes hits both alike; the
   ratio of each pair is printed, then the median and the spread (min-max). Two ratios: of wall time per step, and of
   CPU time per step (`time.process_time` of the trainer's process and of the bare loop), which other
   processes' load barely moves (they take turns on the cores, they do not add work to ours); on a machine shared
   with others, the CPU ratio is the one to read.
2. The field target of the PFGM objective (`pfgm_perturb` + `poisson_field_target`, fp32, no grad) per training step
   for large batches of 512, 2048 and 4096 charges, at CIFAR-10's size (N = 3072, small batch 128) and at the digits'
   size (N = 256, small batch 64); best of `--repeats`.

Every figure is printed with the CPU model, the thread count and the 1-minute load average before and after.

    python benchmarks/bench_trainer.py                 # both, on CPU (about 5 minutes on 2 idle cores)
    python benchmarks/bench_trainer.py --skip_field    # only the trainer against the bare loop
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

from machine import describe, load_average  # noqa: E402

TIMER = os.path.join(REPO, "benchmarks", "trainer_timing.py")  # the trainer, timed through its loss seam


def trainer_steps_per_second(steps, train_batch_size, threads):
    """Launch the trainer on the embedded digits in a fresh folder, timed through its loss seam (trainer_timing.py):
    its steps/s and CPU ms per step after the first 5 steps."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work = tempfile.mkdtemp(prefix="bench-trainer-")
    times = os.path.join(work, "times.json")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", TIMER, times]
    command += ["--output_dir", os.path.join(work, "run"), "--max_train_steps", str(steps)]
    command += ["--train_batch_size", str(train_batch_size)]
    command += ["--checkpointing_steps", str(10 * steps), "--save_images_steps", str(10 * steps)]
    command += ["--eval_batch_size", "4", "--num_inference_steps", "2", "--cpu_threads_per_process", str(threads)]
    try:
        result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the trainer failed:\n{result.stdout[-3000:]}")
        with open(times) as f:
            measured = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 / measured["seconds_per_step"], measured["cpu_ms_per_step"]


def bare_steps_per_second(steps, train_batch_size, threads):
    """The same UNet, batch and AdamW under a bare accelerate loop, with fixed data and timesteps: steps/s and CPU
    ms per step after the first 5 steps."""
    from accelerate import Accelerator
    from diffusers import UNet2DModel

    from pfgm_diffusers.training.arguments import load_unet_config
    from pfgm_diffusers.training.presets import NO_PRESET

    torch.set_num_threads(threads)
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.accelerator.is_available())  # as the trainer
    resolution = NO_PRESET["resolution"]  # the trainer's default run: its UNet at its resolution
    flags = argparse.Namespace(model_config_name_or_path=NO_PRESET["model_config_name_or_path"], resolution=resolution)
    unet = UNet2DModel.from_config(load_unet_config(flags, num_channels=1, out_channels=1, num_classes=None))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    x = torch.randn(train_batch_size, 1, resolution, resolution, device=accelerator.device)
    timestep = torch.randn(train_batch_size, device=accelerator.device)
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = unet(x, timestep).sample.square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # Leave out the first steps, which warm up allocators and caches
    return (steps - 5) / sum(times[5:]), 1000 * sum(cpu_times[5:]) / (steps - 5)


def field_target_ms(large_batch_size, train_batch_size, shape, device, repeats):
    from pfgm_diffusers.field import poisson_field_target
    from pfgm_diffusers.perturbation import pfgm_perturb

    generator = torch.Generator().manual_seed(0)
    charges = (torch.rand((large_batch_size, *shape), generator=generator) * 2 - 1).to(device)
    x = charges[:train_batch_size]
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            y, z = pfgm_perturb(x, sigma=0.01, tau=0.03, M=291)
            poisson_field_target(y, z, charges, gamma=5.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="Optimizer steps per run.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (accelerate launch's default is 1).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_trainer", action="store_true")
    parser.add_argument("--skip_field", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    results = {"machine": describe(), "threads": args.threads, "load_before": load_average()}
    print(f"{results['machine']}; {args.threads} thread(s); load average {results['load_before']:.2f}")

    if not args.skip_trainer:
        pairs = []
        for repeat in range(args.repeats):  # alternately, so that load from other processes hits both alike
            trainer, trainer_cpu = trainer_steps_per_second(args.steps, args.train_batch_size, args.threads)
            bare, bare_cpu = bare_steps_per_second(args.steps, args.train_batch_size, args.threads)
            pairs.append(
                dict(
                    trainer_steps_per_s=trainer,
                    bare_steps_per_s=bare,
                    trainer_cpu_ms=trainer_cpu,
                    bare_cpu_ms=bare_cpu,
                )
            )
            print(
                f"  run {repeat + 1}: trainer {trainer:.2f} steps/s ({trainer_cpu:.0f} CPU ms/step), bare accelerate "
                f"loop {bare:.2f} steps/s ({bare_cpu:.0f} CPU ms/step); ratio wall {bare / trainer:.3f}, CPU "
                f"{trainer_cpu / bare_cpu:.3f} (load {load_average():.2f})"
            )
        summary = {}
        for name, ratios in (
            ("wall", [pair["bare_steps_per_s"] / pair["trainer_steps_per_s"] for pair in pairs]),
            ("cpu", [pair["trainer_cpu_ms"] / pair["bare_cpu_ms"] for pair in pairs]),
        ):
            summary[name] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
            print(
                f"digits UNet, batch {args.train_batch_size}, {args.steps} steps, {args.threads} thread(s): trainer / "
                f"bare loop, {name} time per step: median {statistics.median(ratios):.3f}, spread "
                f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} alternate runs (target <= 1.10)"
            )
        results["trainer"] = dict(runs=pairs, ratios=summary)

    if not args.skip_field:
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        results["field_target_ms"] = {}
        for name, shape, train_batch_size in (("cifar10", (3, 32, 32), 128), ("digits", (1, 16, 16), 64)):
            for large_batch_size in (512, 2048, 4096):
                ms = field_target_ms(large_batch_size, train_batch_size, shape, device, args.repeats)
                results["field_target_ms"][f"{name}_L{large_batch_size}"] = ms
                print(
                    f"field target, {name} (N={shape[0] * shape[1] * shape[2]}, B={train_batch_size}), "
                    f"L={large_batch_size}: {ms:.1f} ms per step on {device.type}, best of {args.repeats}"
                )
    results["load_after"] = load_average()
    print(f"load average after: {results['load_after']:.2f}")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
