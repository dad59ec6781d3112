#!/usr/bin/env python
"""Latent PFGM++ at CPU scale, end to end, against pixel-space PFGM++ at equal training wall time.

A small AutoencoderKL is trained on the embedded digits upscaled to 16 px (f = 4: 4x4x4 latents, N = 64 against
256 pixels); its latents are encoded once (the trainer's cache); then a latent PFGM++ run
(training/train_pfgm.py --pretrained_vae_model_name_or_path) and a pixel-space run of the same UNet config at 16 px
train **at the same time, one process and one thread each**, both stopped by the trainer's --max_train_seconds after
the same wall-clock budget. Concurrent rather than one after the other: on a shared machine whose load changes by the
minute, two runs side by side see the same load, and each's CPU time is reported beside its wall time. Both are
evaluated with the digits metric in pixel space (scripts/evaluate.py --reference digits: the Fréchet distance in the
shipped classifier's features, the confident share, the class coverage) on the same number of samples, and a sample
grid of each is saved side by side (latent left, pixel right).

    python scripts/demo_latent_digits.py --output_dir outputs/latent-demo --train_seconds 900 --num_images 500 \\
        --grid docs/latent_demo_digits.png          # docs/training.md's figures (with PYTHONPATH=. OMP_NUM_THREADS=1)

A VAE already in <output_dir>/vae (with vae.json) is reused, and so is the latent cache. Prints a markdown table and
writes <output_dir>/results.json, with the 1-minute load average sampled during the runs.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = os.path.join(REPO, "training", "train_pfgm.py")
# Two levels: 4x4 latents, and 16 px pixels for the pixel run
UNET_CONFIG = os.path.join(REPO, "pfgm_diffusers", "training", "configs", "unet_digits_8px.json")
RESOLUTION = 16
NEVER = 10**7  # a step count the budget ends first


def train_vae(folder, steps, batch_size, seed):
    """An AutoencoderKL with factor 4 (16 px digits -> 4 x 4 x 4 latents, N = 64 against 256 pixels), trained with
    the reconstruction error plus a small KL term; its scaling_factor set to 1 / (the latent means' std), as the
    Stable Diffusion VAE's was measured. Returns the final reconstruction mean-square error (on [-1, 1])."""
    from diffusers import AutoencoderKL

    from pfgm_diffusers.data import ImageTransform, load_digits_dataset

    torch.manual_seed(seed)
    dataset = load_digits_dataset(with_labels=False).dataset
    transform = ImageTransform(RESOLUTION, 1, center_crop=True)
    pixels = torch.stack([transform(image) for image in dataset["image"]])  # (1797, 1, 16, 16) in [-1, 1]
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,
    )
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        distribution = vae.encode(batch).latent_dist
        reconstruction = vae.decode(distribution.sample(generator)).sample
        mse = (reconstruction - batch).pow(2).mean()
        loss = mse + 1e-4 * distribution.kl().mean() / batch[0].numel()  # a light KL: a smooth, bounded latent space
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  VAE step {step}: reconstruction MSE {mse.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        reconstruction = torch.cat([vae.decode(chunk).sample for chunk in means.split(256)])
    vae.register_to_config(scaling_factor=float(1 / means.std()))
    vae.save_pretrained(folder)
    return float((reconstruction - pixels).pow(2).mean())


def child_env():
    """One thread per process, this checkout's code first."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def trainer_command(output_dir, seed, seconds, extra=()):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", TRAINER]
    command += [
        "--output_dir", output_dir, "--overwrite_output_dir", "--resolution", RESOLUTION, "--center_crop",
        "--model_config_name_or_path", UNET_CONFIG, "--max_train_steps", NEVER, "--max_train_seconds", seconds,
        "--checkpointing_steps", NEVER, "--save_images_steps", 0, "--seed", seed, "--cpu_threads_per_process", 1,
        *extra,
    ]  # fmt: skip
    return [str(arg) for arg in command]


def run_together(commands, log_paths, load_samples):
    """Start every command at once; wait for all, sampling the 1-minute load average every 15 s. Returns each
    one's (log text, wall seconds, CPU seconds of the process tree); fails naming the log of a failed one."""
    began, running, done, processes = time.perf_counter(), {}, {}, []  # processes: kept, so that none is reaped
    for name, command in commands.items():
        log = open(log_paths[name], "w")
        processes.append(subprocess.Popen(command, env=child_env(), stdout=log, stderr=subprocess.STDOUT))
        running[processes[-1].pid] = (name, log)
    next_sample = 0.0
    while running:
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            if time.perf_counter() >= next_sample:
                load_samples.append(os.getloadavg()[0])
                next_sample = time.perf_counter() + 15
            time.sleep(0.5)
            continue
        if pid not in running:
            continue
        name, log = running.pop(pid)
        log.close()
        with open(log_paths[name]) as f:
            text = f.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{name} failed (log: {log_paths[name]}):\n{text[-3000:]}")
        done[name] = (text, time.perf_counter() - began, usage.ru_utime + usage.ru_stime)
    return done


def trained_steps(output_dir, log):
    """The step the budget ended at (the last checkpoint's), the loop's wall and CPU seconds the trainer logged."""
    steps = max(int(n.split("-")[1]) for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n))
    match = re.search(r"--max_train_seconds \S+ spent after ([0-9.]+) s \(([0-9.]+) CPU s\)", log)
    if match is None:
        raise RuntimeError(f"{output_dir}: the trainer did not stop on --max_train_seconds")
    return steps, float(match.group(1)), float(match.group(2))


def save_grid(models, path, seed, rows=6):
    """rows x rows samples of each pipeline (seeds seed..), each framed by a 1-pixel grey line (the digits fill their
    tiles' height), the grids side by side with a white gap, upscaled 3x."""
    from PIL import Image

    from pfgm_diffusers import PFGMPipeline

    tiles = []
    for model in models:
        pipe = PFGMPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(rows * rows)]
        images = pipe(batch_size=rows * rows, generator=generators, num_inference_steps=18, output_type="np").images
        images = (images[..., 0] * 255).round().clip(0, 255).astype(np.uint8)  # (n, 16, 16)
        images = np.pad(images, ((0, 0), (1, 0), (1, 0)), constant_values=96)  # a line above and left of each
        size = images.shape[1]
        tiles.append(images.reshape(rows, rows, size, size).transpose(0, 2, 1, 3).reshape(rows * size, rows * size))
    gap = np.full((tiles[0].shape[0], 6), 255, dtype=np.uint8)
    grid = np.concatenate([tiles[0], gap, *tiles[1:]], axis=1)
    image = Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, optimize=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/latent-demo")
    parser.add_argument("--vae_steps", type=int, default=1000)
    parser.add_argument("--vae_batch_size", type=int, default=64)
    parser.add_argument("--train_seconds", type=float, default=900, help="Each run's training wall-clock budget.")
    parser.add_argument("--num_images", type=int, default=500, help="Samples per evaluation.")
    parser.add_argument("--grid", default=None, help="Where to save the side-by-side sample grid (PNG).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    out = {name: os.path.join(args.output_dir, name) for name in ("vae", "encode", "latent", "pixel")}
    cache = os.path.join(args.output_dir, "latent_cache")

    vae_record = os.path.join(args.output_dir, "vae.json")
    if os.path.exists(vae_record) and os.path.exists(os.path.join(out["vae"], "config.json")):
        with open(vae_record) as f:
            vae = json.load(f)
        print(f"1. VAE: reusing {out['vae']} ({vae['steps']} steps, MSE {vae['reconstruction_mse']:.4f})")
    else:
        print(f"1. VAE: {args.vae_steps} steps on the digits at {RESOLUTION} px", flush=True)
        began = time.perf_counter()
        mse = train_vae(out["vae"], args.vae_steps, args.vae_batch_size, args.seed)
        vae = dict(reconstruction_mse=mse, seconds=time.perf_counter() - began, steps=args.vae_steps)
        vae.update(batch_size=args.vae_batch_size, seed=args.seed)
        with open(vae_record, "w") as f:
            json.dump(vae, f, indent=2)

    print("2. the latents, encoded once into the cache (a one-step latent run)", flush=True)
    latent_flags = ["--pretrained_vae_model_name_or_path", out["vae"], "--latent_cache_dir", cache]
    began = time.perf_counter()
    command = trainer_command(out["encode"], args.seed, 0, latent_flags)
    encode_log = run_together({"encode": command}, {"encode": out["encode"] + ".log"}, [])["encode"][0]
    encode_seconds = time.perf_counter() - began
    defaults = re.findall(r"(--(?:sigma_data|aug_dim|sigma_max) \S+: [^\n]*)", encode_log)

    print(f"3. latent and pixel PFGM++ side by side, {args.train_seconds:g} s of training each", flush=True)
    load = [os.getloadavg()[0]]
    commands = {
        "latent": trainer_command(out["latent"], args.seed, args.train_seconds, latent_flags),
        "pixel": trainer_command(out["pixel"], args.seed, args.train_seconds),
    }
    runs = run_together(commands, {name: out[name] + ".log" for name in commands}, load)

    print(f"4. the digits metric, {args.num_images} samples each (the two evaluations side by side)", flush=True)
    evaluations = {
        name: [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--model", out[name], "--reference",
               "digits", "--num_images", str(args.num_images), "--output", out[name] + "_eval.json"]
        for name in ("latent", "pixel")
    }  # fmt: skip
    eval_runs = run_together(evaluations, {name: out[name] + "_eval.log" for name in evaluations}, load)
    if args.grid is not None:
        save_grid([out["latent"], out["pixel"]], args.grid, args.seed)

    results = dict(settings=vars(args), vae=vae, encode_seconds=encode_seconds, defaults=defaults)
    results["load_average_1min"] = dict(min=min(load), max=max(load), mean=sum(load) / len(load), samples=len(load))
    for name in ("latent", "pixel"):
        log, wall, cpu = runs[name]
        steps, loop_seconds, loop_cpu_seconds = trained_steps(out[name], log)
        with open(out[name] + "_eval.json") as f:
            metrics = json.load(f)["metrics"]
        results[name] = dict(steps=steps, loop_seconds=loop_seconds, loop_cpu_seconds=loop_cpu_seconds,
                             launch_wall_seconds=wall, launch_cpu_seconds=cpu, eval_wall_seconds=eval_runs[name][1],
                             metrics=metrics)  # fmt: skip
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report(results)


def report(results):
    vae, load = results["vae"], results["load_average_1min"]
    print(f"\nVAE: {vae['steps']} steps in {vae['seconds']:.0f} s, reconstruction MSE "
          f"{vae['reconstruction_mse']:.4f} on [-1, 1] (16 px digits -> 4x4x4 latents); encoding pass and one step: "
          f"{results['encode_seconds']:.0f} s")  # fmt: skip
    print("Measured latent defaults:", "; ".join(results["defaults"]))
    print(f"1-minute load average during the runs: {load['min']:.1f} to {load['max']:.1f} (mean {load['mean']:.1f})")
    print("| run | steps in the budget | loop wall s (CPU s) | Fréchet distance | confident share | coverage |")
    print("|---|---|---|---|---|---|")
    for name in ("latent", "pixel"):
        run, m = results[name], results[name]["metrics"]
        print(f"| {name} | {run['steps']} | {run['loop_seconds']:.0f} ({run['loop_cpu_seconds']:.0f}) | "
              f"{m['frechet_distance']:.2f} | {m['confident_share']:.3f} | {m['class_coverage']:.2f} |")  # fmt: skip
    m = results["latent"]["metrics"]
    print(f"| held-out real digits ({m.get('heldout_num_images')}) | | | {m.get('heldout_frechet_distance', 0):.2f} "
          f"| {m.get('heldout_confident_share', 0):.3f} | {m.get('heldout_class_coverage', 0):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
