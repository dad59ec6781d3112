#!/usr/bin/env python
"""One command for a person with one GPU: does the project work there, and how fast is it? Under 8 minutes.

    python benchmarks/gpu_check.py --json gpu_check.json            # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --smoke              # the same code path, tiny sizes (CI runs this)

It runs, in order, each part timed and its peak GPU memory recorded:

1. The CUDA-relevant tests (`tests/test_cuda.py`: timesteps and sampling on the device, the field target and the
   losses there, each checked against the CPU).
2. bf16 training throughput of the CIFAR-10 preset's UNet (pfgm_diffusers/training/configs/unet_ddpmpp_32.json,
   32x32, batch 64 per process as in `--preset cifar10`): the real trainer launched with `accelerate launch
   --mixed_precision bf16` on a generated image folder, timed through its loss seam (benchmarks/trainer_timing.py:
   the steps after the first 5),
   against a bare loop of the same UNet, batch and optimizer (forward, mean-square loss, backward, AdamW step).
3. Sampling throughput at batch 256 with that UNet (random weights: speed does not depend on them): 18 Heun steps
   (35 network evaluations) and 17 DPM-Solver++(2M) steps, images/s.
4. The field target (PFGM Algorithm 1) at the official CIFAR-10 sizes, B = 128, L = 4096, N = 3072, against its floor
   (the two plain float32 products any matrix-product form needs), medians of alternating calls.

Every figure comes with the GPU's name, the torch/CUDA versions and the spread over repeats; `--json` writes them.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

from diffusers import UNet2DModel  # noqa: E402
from machine import cpu_model, load_average  # noqa: E402

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, pfgm_perturb, poisson_field_target  # noqa: E402

CIFAR_UNET = os.path.join(REPO, "pfgm_diffusers", "training", "configs", "unet_ddpmpp_32.json")
SMOKE_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def environment(device):
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version()
        )
    else:
        info.update(cpu=cpu_model(), threads=torch.get_num_threads(), load=load_average())
    return info


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def run_tests(smoke):
    """tests/test_cuda.py in a subprocess; its summary line and return code."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.join(REPO, "tests", "test_cuda.py"),
    ]
    if smoke:
        command += ["-k", "not slow"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": result.returncode, "summary": summary}


def unet_config(smoke, resolution, channels=3):
    if smoke:
        config = dict(SMOKE_UNET)
    else:
        with open(CIFAR_UNET) as f:
            config = json.load(f)
    return dict(config, sample_size=resolution, in_channels=channels, out_channels=channels)


def make_image_folder(folder, count, resolution):
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:05d}.png")
        )


def trainer_throughput(device, smoke, batch_size, steps, resolution, work):
    """The real trainer under `accelerate launch`: its steps/s after the first 5 steps, without sampling or saving,
    timed through its loss seam (trainer_timing.py)."""
    images = os.path.join(work, "images")
    make_image_folder(images, max(4 * batch_size, 64), resolution)
    config_path = os.path.join(work, "unet.json")
    with open(config_path, "w") as f:
        json.dump(
            {
                k: v
                for k, v in unet_config(smoke, resolution).items()
                if k not in ("sample_size", "in_channels", "out_channels")
            },
            f,
        )
    precision = "bf16" if device.type == "cuda" else "no"
    times = os.path.join(work, "times.json")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", precision, "--dynamo_backend", "no"] + (["--cpu"] if device.type == "cpu" else [])
    command += [os.path.join(REPO, "benchmarks", "trainer_timing.py"), times]  # the trainer, timed through its loss
    command += ["--train_data_dir", images, "--resolution", str(resolution)]
    command += ["--model_config_name_or_path", config_path, "--train_batch_size", str(batch_size)]
    command += [
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(10**6),
        "--save_images_steps",
        str(10**6),
    ]
    command += ["--eval_batch_size", "4", "--num_inference_steps", "2", "--output_dir", os.path.join(work, "run")]
    command += ["--logging_steps", "10", "--lr_warmup_steps", "0"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    env["HF_DATASETS_OFFLINE"] = "1"
    env["HF_HOME"] = os.path.join(work, "hf_home")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError("the trainer failed:\n" + (result.stdout + result.stderr)[-4000:])
    with open(times) as f:
        steps_per_second = 1 / json.load(f)["seconds_per_step"]
    return {"steps_per_second": steps_per_second, "images_per_second": steps_per_second * batch_size}


def bare_loop_throughput(device, smoke, batch_size, steps, resolution):
    """Forward, mean-square loss, backward, AdamW step of the same UNet and batch: the floor the trainer is held to."""
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(unet_config(smoke, resolution)).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    t = torch.rand(batch_size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    times = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = (unet(x, t).sample.float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= 5:
            times.append(time.perf_counter() - start)
    steps_per_second = 1 / statistics.mean(times)
    return {"steps_per_second": steps_per_second, "images_per_second": steps_per_second * batch_size}


def sampling_throughput(device, smoke, batch_size, resolution):
    unet = UNet2DModel.from_config(unet_config(smoke, resolution)).to(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    pipe = PFGMPipeline(unet=unet, scheduler=PFGMScheduler(aug_dim=2048)).to(device)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for solver, steps in (("heun", 18), ("dpmpp_2m", 17)):
        generator = torch.Generator(device).manual_seed(0)
        pipe(
            batch_size=batch_size, num_inference_steps=2, generator=generator, output_type="pt", solver=solver
        )  # warm-up
        synchronize(device)
        start = time.perf_counter()
        output = pipe(
            batch_size=batch_size, num_inference_steps=steps, generator=generator, output_type="pt", solver=solver
        )
        synchronize(device)
        elapsed = time.perf_counter() - start
        finite = bool(torch.isfinite(output.images).all())
        results[solver] = {
            "steps": steps,
            "nfe": output.nfe,
            "seconds": elapsed,
            "images_per_second": batch_size / elapsed,
            "finite": finite,
        }
    return results


def field_target_vs_floor(device, B, L, N, repeats):
    """poisson_field_target against the two plain float32 products (B, N) @ (N, L) and (B, L) @ (L, N), alternating."""
    generator = torch.Generator().manual_seed(0)
    data = (torch.rand(L, N, generator=generator) * 2 - 1).to(device)
    y, z = pfgm_perturb(data[:B].reshape(B, 1, 1, N).cpu(), generator=generator)
    y, z = y.reshape(B, N).to(device), z.to(device)
    weights = torch.rand(B, L, device=device)

    def floor():
        return (y @ data.T, weights @ data)

    def target():
        return poisson_field_target(y, z, data)

    for function in (floor, target):  # warm-up: kernels, allocator
        function()
    synchronize(device)
    ratios, floor_ms, target_ms = [], [], []
    for _ in range(repeats):
        timings = []
        for function in (floor, target):
            start = time.perf_counter()
            function()
            synchronize(device)
            timings.append(1000 * (time.perf_counter() - start))
        floor_ms.append(timings[0])
        target_ms.append(timings[1])
        ratios.append(timings[1] / timings[0])
    return {
        "B": B,
        "L": L,
        "N": N,
        "floor_ms": spread(floor_ms),
        "target_ms": spread(target_ms),
        "ratio": spread(ratios),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        default=None,
        help="Where to run: `cuda` (the default when torch sees a CUDA device), `cuda:1`, or `cpu`. Without CUDA the"
        " full workload (a CIFAR-size UNet, batch 256 sampling, B=128/L=4096 field target) would take hours on a"
        " CPU, so it is refused unless `--device cpu` is given explicitly; `--smoke` runs the tiny sizes anywhere.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Tiny sizes (an 8 px UNet, batch 4, 12 training steps): checks the code path in about a minute on any"
        " device; its figures say nothing about speed.",
    )
    parser.add_argument("--json", default=None, help="Also write every figure (with the environment) to this file.")
    parser.add_argument(
        "--skip_tests", action="store_true", help="Skip part 1 (tests/test_cuda.py), e.g. when pytest is missing."
    )
    args = parser.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available() and not args.smoke:
            parser.error(
                "torch sees no CUDA device (torch.cuda.is_available() is False): pass --smoke for the tiny check of"
                " the code path on the CPU, or --device cpu to run the full GPU workload on the CPU (hours)."
            )
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as `accelerate launch` gives the trainer, so that the bare loop is comparable
    if args.smoke:
        sizes = dict(batch_size=4, train_steps=12, resolution=8, sample_batch=8, field=(8, 64, 48), repeats=3)
    else:
        sizes = dict(
            batch_size=64, train_steps=120, resolution=32, sample_batch=256, field=(128, 4096, 3072), repeats=20
        )

    results = {"environment": environment(device), "smoke": args.smoke}
    started = time.perf_counter()

    def part(name, function, *part_args):
        reset_peak(device)
        start = time.perf_counter()
        results[name] = function(*part_args)
        results[name + "_seconds"] = time.perf_counter() - start
        results[name + "_peak_mib"] = peak_mib(device)
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    if not args.skip_tests:
        part("tests", run_tests, args.smoke)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        part(
            "trainer",
            trainer_throughput,
            device,
            args.smoke,
            sizes["batch_size"],
            sizes["train_steps"],
            sizes["resolution"],
            work,
        )
    part(
        "bare_loop",
        bare_loop_throughput,
        device,
        args.smoke,
        sizes["batch_size"],
        30 if not args.smoke else 8,
        sizes["resolution"],
    )
    results["trainer_overhead"] = results["bare_loop"]["steps_per_second"] / results["trainer"]["steps_per_second"]
    part("sampling", sampling_throughput, device, args.smoke, sizes["sample_batch"], sizes["resolution"])
    part("field_target", field_target_vs_floor, device, *sizes["field"], sizes["repeats"])
    results["total_seconds"] = time.perf_counter() - started
    print(
        f"trainer {results['trainer']['images_per_second']:.0f} img/s (overhead {results['trainer_overhead']:.2f}); "
        f"sampling (Heun, 35 NFE) {results['sampling']['heun']['images_per_second']:.0f} img/s; field target "
        f"{results['field_target']['ratio']['median']:.2f}x its floor; {results['total_seconds']:.0f} s in all"
    )
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
