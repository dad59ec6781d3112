#!/usr/bin/env python
"""Latent PFGM++ at CPU scale, end to end: a small AutoencoderKL trained on the embedded digits upscaled to 16 px,
a latent PFGM++ run with it (training/train_pfgm.py --pretrained_vae_model_name_or_path), and a pixel-space run of
the same UNet config at 16 px given the same training wall time; both evaluated with the digits metric in pixel space
(scripts/evaluate.py --reference digits).

    python scripts/demo_latent_digits.py --output_dir latent-demo                       # the full demonstration
    python scripts/demo_latent_digits.py --output_dir latent-demo --vae_steps 300 --train_steps 300 --num_images 200

Prints a markdown table (and writes results.json): the VAE's reconstruction error, each run's training time, steps
and the digits metrics (Fréchet distance in the classifier's features, confident share, class coverage). The
pixel run's steps are chosen from a 40-step pilot of its throughput so that its training time matches the latent
run's (encoding and the VAE's own training reported separately).
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
TRAINER = os.path.join(REPO, "training", "train_pfgm.py")
# Two levels: 4x4 latents, and 16 px pixels for the pixel run
UNET_CONFIG = os.path.join(REPO, "pfgm_diffusers", "training", "configs", "unet_digits_8px.json")
RESOLUTION = 16


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


def launch(args, log_path):
    """Run the trainer (one process); return its log and wall seconds."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", TRAINER] + [str(arg) for arg in args]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    began = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - began
    with open(log_path, "w") as f:
        f.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"the trainer failed (log: {log_path}):\n{result.stdout[-3000:]}")
    return result.stdout, seconds


def steps_per_second(log):
    match = re.search(r"Training throughput: ([0-9.]+) steps/s", log)
    if match is None:
        raise RuntimeError("the trainer logged no throughput line")
    return float(match.group(1))


def trainer_args(output_dir, steps, seed, extra=()):
    return [
        "--output_dir", output_dir, "--overwrite_output_dir", "--resolution", RESOLUTION, "--center_crop",
        "--model_config_name_or_path", UNET_CONFIG, "--max_train_steps", steps, "--checkpointing_steps", steps,
        "--save_images_steps", steps, "--seed", seed, *extra,
    ]  # fmt: skip


def evaluate(model, num_images, output):
    command = [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--model", model, "--reference"]
    command += ["digits", "--num_images", str(num_images), "--output", output]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(output) as f:
        return json.load(f)["metrics"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="latent-demo")
    parser.add_argument("--vae_steps", type=int, default=1500)
    parser.add_argument("--vae_batch_size", type=int, default=64)
    parser.add_argument("--train_steps", type=int, default=3000, help="Steps of the latent PFGM++ run.")
    parser.add_argument("--num_images", type=int, default=1000, help="Samples per evaluation.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    out = {name: os.path.join(args.output_dir, name) for name in ("vae", "latent", "pixel", "pilot")}

    print(f"1. VAE: {args.vae_steps} steps on the digits at {RESOLUTION} px", flush=True)
    began = time.perf_counter()
    vae_mse = train_vae(out["vae"], args.vae_steps, args.vae_batch_size, args.seed)
    vae_seconds = time.perf_counter() - began

    print(f"2. latent PFGM++: {args.train_steps} steps", flush=True)
    latent_args = ["--pretrained_vae_model_name_or_path", out["vae"]]
    log, latent_wall = launch(
        trainer_args(out["latent"], args.train_steps, args.seed, latent_args), out["latent"] + ".log"
    )
    latent_rate = steps_per_second(log)
    latent_train_seconds = args.train_steps / latent_rate

    print("3. pixel PFGM++ at the same training time", flush=True)
    log, _ = launch(trainer_args(out["pilot"], 40, args.seed), out["pilot"] + ".log")
    pixel_steps = max(10, round(latent_train_seconds * steps_per_second(log)))
    log, pixel_wall = launch(trainer_args(out["pixel"], pixel_steps, args.seed), out["pixel"] + ".log")
    pixel_train_seconds = pixel_steps / steps_per_second(log)

    print(f"4. the digits metric, {args.num_images} samples each", flush=True)
    metrics = {name: evaluate(out[name], args.num_images, out[name] + "_eval.json") for name in ("latent", "pixel")}
    results = dict(
        settings=vars(args),
        vae=dict(reconstruction_mse=vae_mse, seconds=vae_seconds),
        latent=dict(steps=args.train_steps, train_seconds=latent_train_seconds, wall_seconds=latent_wall,
                    metrics=metrics["latent"]),
        pixel=dict(steps=pixel_steps, train_seconds=pixel_train_seconds, wall_seconds=pixel_wall,
                   metrics=metrics["pixel"]),
    )  # fmt: skip
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nVAE: {vae_seconds:.0f} s, reconstruction MSE {vae_mse:.4f} on [-1, 1] (16 px digits -> 4x4x4 latents)")
    print("| run | steps | training s (launch, with encoding) | Fréchet distance | confident share | coverage |")
    print("|---|---|---|---|---|---|")
    for name in ("latent", "pixel"):
        run, m = results[name], results[name]["metrics"]
        print(f"| {name} | {run['steps']} | {run['train_seconds']:.0f} ({run['wall_seconds']:.0f}) | "
              f"{m['frechet_distance']:.2f} | {m['confident_share']:.3f} | {m['class_coverage']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
