"""Trainer overhead and the PFGM field target's cost.

1. The trainer's steps/s (training/train_pfgm.py launched for real, its own "Training throughput" line, which leaves
   out sampling and checkpoints) against a bare accelerate loop of the same UNet, batch, optimizer and thread count:
   forward, a mean-square loss, backward, step. The ratio bare/trainer is the trainer's overhead (target <= 1.10).
2. The field target of the PFGM objective (`pfgm_perturb` + `poisson_field_target`, fp32, no grad) per training
   step for large batches of 512, 2048 and 4096 charges, at CIFAR-10's size (N = 3072, small batch 128) and at the
   digits' size (N = 256, small batch 64).

    python benchmarks/bench_trainer.py                 # both, on CPU (a few minutes on 2 cores)
    python benchmarks/bench_trainer.py --skip_trainer  # only the field target
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_pfgm.py")
sys.path.insert(0, REPO)


def trainer_steps_per_second(steps, train_batch_size, threads):
    """Launch the trainer on the embedded digits; parse the throughput it reports."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    output_dir = os.path.join(REPO, "outputs", "bench-trainer")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--output_dir", output_dir]
    command += ["--max_train_steps", str(steps), "--train_batch_size", str(train_batch_size)]
    command += [
        "--checkpointing_steps",
        str(10 * steps),
        "--save_images_steps",
        str(10 * steps),
        "--eval_batch_size",
        "4",
    ]
    command += ["--num_inference_steps", "2", "--cpu_threads_per_process", str(threads)]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    match = re.search(r"Training throughput: ([0-9.]+) steps/s", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"the trainer failed:\n{result.stdout[-3000:]}")
    return float(match.group(1))


def bare_steps_per_second(steps, train_batch_size, threads):
    """The same UNet, batch and AdamW under a bare accelerate loop, with fixed data and timesteps."""
    from accelerate import Accelerator
    from diffusers import UNet2DModel

    sys.path.insert(0, os.path.join(REPO, "training"))
    import train_pfgm

    torch.set_num_threads(threads)
    accelerator = Accelerator(mixed_precision="no")
    config = train_pfgm.load_unet_config(
        os.path.join(train_pfgm.CONFIG_DIR, "unet_digits.json"), 16, num_channels=1, out_channels=1, num_classes=None
    )
    unet = UNet2DModel.from_config(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    x = torch.randn(train_batch_size, 1, 16, 16, device=accelerator.device)
    timestep = torch.randn(train_batch_size, device=accelerator.device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = unet(x, timestep).sample.square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    timed = times[5:]  # as the trainer: leave out the first steps
    return len(timed) / sum(timed)


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
            target_x, target_z = poisson_field_target(y, z, charges, gamma=5.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_trainer", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    results = {}

    if not args.skip_trainer:
        trainer = trainer_steps_per_second(args.steps, args.train_batch_size, args.threads)
        bare = bare_steps_per_second(args.steps, args.train_batch_size, args.threads)
        results["trainer"] = dict(trainer_steps_per_s=trainer, bare_steps_per_s=bare, ratio=bare / trainer)
        print(
            f"digits UNet, batch {args.train_batch_size}, {args.threads} thread(s): trainer {trainer:.2f} steps/s, "
            f"bare accelerate loop {bare:.2f} steps/s, ratio {bare / trainer:.3f} (target <= 1.10)"
        )

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results["field_target_ms"] = {}
    for name, shape, train_batch_size in (("cifar10", (3, 32, 32), 128), ("digits", (1, 16, 16), 64)):
        for large_batch_size in (512, 2048, 4096):
            ms = field_target_ms(large_batch_size, train_batch_size, shape, device, args.repeats)
            results["field_target_ms"][f"{name}_L{large_batch_size}"] = ms
            print(
                f"field target, {name} (N={shape[0] * shape[1] * shape[2]}, B={train_batch_size}), "
                f"L={large_batch_size}: {ms:.1f} ms per step on {device.type}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
