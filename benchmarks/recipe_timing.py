#!/usr/bin/env python
"""The per-step cost table of docs/training.md's "train on your own image folder" recipe, measured as written.

    python benchmarks/recipe_timing.py            # every row (about 3 min on 2 idle cores)
    python benchmarks/recipe_timing.py --rows 8 16

Each row makes a folder of two classes (256 circles, 256 squares, RGB, at the row's size; the 8 px row is the
embedded digits, the no-argument run), then runs the recipe's command under `accelerate launch` (one process, one
thread, as `accelerate launch` sets it) through `benchmarks/trainer_timing.py`, which clocks the trainer's loss seam
from outside: CPU ms and wall seconds per optimizer step after the first 5. Grids and checkpoints are off. Prints the
CPU, torch, the load average before and after each row, and the markdown table.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe, load_average  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# resolution -> (batch sizes, timed steps): the folder's default UNet (configs/unet_by_resolution.json) at each size
ROWS = {8: ((64,), 40), 16: ((64, 32), 30), 32: ((64,), 16), 64: ((64,), 10)}


def make_shapes(folder: str, resolution: int, per_class: int = 256, seed: int = 0):
    """Two class folders, circles/ and squares/, of random RGB shapes on a random background."""
    rng = random.Random(seed)
    for name in ("circles", "squares"):
        os.makedirs(os.path.join(folder, name))
        for i in range(per_class):
            image = Image.new("RGB", (resolution, resolution), tuple(rng.randrange(256) for _ in range(3)))
            size = rng.uniform(0.3, 0.8) * resolution
            x0, y0 = (rng.uniform(0, resolution - size) for _ in range(2))
            draw = ImageDraw.Draw(image)
            shape = draw.ellipse if name == "circles" else draw.rectangle
            shape([x0, y0, x0 + size, y0 + size], fill=tuple(rng.randrange(256) for _ in range(3)))
            image.save(os.path.join(folder, name, f"{i:04d}.png"))


def time_row(resolution: int, batch: int, steps: int, work: str) -> dict:
    """CPU ms and wall s per step of the recipe's command at one size and batch."""
    flags = ["--max_train_steps", str(steps + 6), "--train_batch_size", str(batch), "--save_images_steps", "0"]
    flags += ["--checkpointing_steps", "100000", "--output_dir", os.path.join(work, f"run{resolution}_{batch}")]
    if resolution != 8:
        data = os.path.join(work, f"shapes{resolution}")
        if not os.path.isdir(data):
            make_shapes(data, resolution)
        flags += ["--train_data_dir", data, "--class_conditional"]
    times = os.path.join(work, "times.json")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    before = load_average()
    command = [*launch, os.path.join(REPO, "benchmarks", "trainer_timing.py"), times, *flags]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    with open(times) as f:
        row = json.load(f)
    return dict(row, resolution=resolution, batch=batch, load=(before, load_average()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=sorted(ROWS), choices=sorted(ROWS))
    args = parser.parse_args(argv)
    print(describe())
    results = []
    with tempfile.TemporaryDirectory() as work:
        for resolution in args.rows:
            batches, steps = ROWS[resolution]
            for batch in batches:
                row = time_row(resolution, batch, steps, work)
                results.append(row)
                print(
                    f"{resolution} px, batch {batch}: {row['cpu_ms_per_step']:.1f} CPU ms/step, "
                    f"{row['seconds_per_step']:.3f} s/step wall over {row['steps']} steps, "
                    f"load {row['load'][0]:.2f} -> {row['load'][1]:.2f}",
                    flush=True,
                )
    print("\n| `--resolution` | batch | CPU ms per step | wall s per step | 6000 steps, CPU time |")
    print("|---:|---:|---:|---:|---:|")
    for row in results:
        total = 6000 * row["cpu_ms_per_step"] / 1000 / 60
        print(
            f"| {row['resolution']} | {row['batch']} | {row['cpu_ms_per_step']:.1f} | {row['seconds_per_step']:.3f} | "
            f"{total:.0f} min |"
        )


if __name__ == "__main__":
    main()
