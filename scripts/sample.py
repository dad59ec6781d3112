#!/usr/bin/env python
"""Sample a saved PFGM / PFGM++ pipeline into a PNG grid and/or a folder of PNGs.

    python scripts/sample.py --model path/or/hub-id --num_images 64 --output grid.png
    python scripts/sample.py --model outputs/pfgm --solver rk45 --output_dir samples/ --device cuda --dtype bf16
    python scripts/sample.py --model outputs/digits-cond --class_labels 7 --num_images 8 --output sevens.png
    # image-to-image: a model trained on pairs restores its conditions (one image per file, in order); any model
    # starts from given images with --strength (diffusers' img2img: SDEdit, PPFM's start from the measurement)
    python scripts/sample.py --model pfgm-superres --conditioning_image low_res/ --output restored.png
    python scripts/sample.py --model pfgm-digits --image noisy/ --strength 0.3 --output_dir restored/

Image i is drawn with its own generator seeded `seed + i`, so a given image does not depend on `--batch_size`
(for the scheduler's solvers; RK45 adapts its steps to each batch). The grid is drawn as the trainer's sample grids
are: tiles 1 px apart, small images enlarged to at least 32 px (8x8 digits 4x: 64 of them make a 292-px grid),
`--grid_scale` to choose; the PNGs of `--output_dir` keep the model's size. See docs/pipeline.md.
"""

import argparse
import math
import os

import numpy as np
import PIL.Image
import torch

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, flow, image_grid
from pfgm_diffusers.data import HIGH_BIT_DEPTH_RANGES, open_image, pixel_value_problem
from pfgm_diffusers.files import check_output_file, check_output_folder
from pfgm_diffusers.restart import blocks_from_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Grid tiles are drawn at least this many pixels wide, as training/train_pfgm.py draws its sample grids.
GRID_TILE_PIXELS = 32


def solver_name(value: str) -> str:
    """--solver: a pipeline-only solver ("rk45", "restart") or one the scheduler accepts (it checks the name: a new
    solver needs no change here)."""
    if value not in flow.SAMPLER_ONLY:
        try:
            PFGMScheduler(solver=value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{error} Or one of {flow.SAMPLER_ONLY}.") from None
    return value


def restart_blocks(value: str) -> dict:
    """--restart_blocks: Restart's blocks as JSON (the pipeline checks their values against the schedule)."""
    try:
        return blocks_from_json(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A folder saved by save_pretrained, or a Hub repo id.")
    parser.add_argument("--num_images", type=int, help="Default: 64, or the count of --conditioning_image/--image.")
    parser.add_argument("--output", default=None, help="Path of a PNG grid of all images.")
    parser.add_argument("--output_dir", default=None, help="Folder for one PNG per image (00000.png, ...).")
    parser.add_argument("--num_inference_steps", type=int, default=18)
    parser.add_argument(
        "--solver",
        type=solver_name,
        default=None,
        help="The ODE solver; default: the saved scheduler's own. 'rk45': adaptive RK45 (--rtol, --atol); "
        "'restart': Restart sampling (--restart_blocks).",
    )
    parser.add_argument(
        "--restart_blocks",
        type=restart_blocks,
        default=None,
        help="Restart's blocks, JSON {name: [N_restart, K, t_min, t_max]}; default: the official CIFAR-10 block "
        '{"0": [3, 2, 0.14, 0.30]}.',
    )
    parser.add_argument("--rtol", type=float, default=1e-4, help="RK45 relative tolerance.")
    parser.add_argument("--atol", type=float, default=1e-4, help="RK45 absolute tolerance.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance for a class-conditional model trained with --class_dropout_prob: 1 is the "
        "conditional model, 0 the unconditional one, > 1 stronger conditioning.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="UNet weights; fp16 needs a GPU.")
    parser.add_argument(
        "--class_labels",
        nargs="+",
        default=None,
        help="Class-conditional models: one label for all images, or one per image, each a class name saved with "
        "the pipeline or an integer label (a name wins). Random if not given.",
    )
    parser.add_argument("--nrow", type=int, default=None, help="Images per grid row (default: about sqrt(n)).")
    parser.add_argument(
        "--grid_scale",
        type=int,
        default=None,
        help="Draw the grid this many times larger (nearest neighbour). Default: as the trainer's grids, small "
        f"images enlarged to at least {GRID_TILE_PIXELS} pixels (8x8 digits 4x), others as they are.",
    )
    parser.add_argument(
        "--conditioning_image",
        nargs="+",
        default=None,
        help="Image-conditional models: the condition image files, or one folder of them (sorted): "
        "one image each (--num_images, if given, must be their count).",
    )
    parser.add_argument(
        "--image", nargs="+", default=None, help="Start from these image files or this folder (with --strength)."
    )
    parser.add_argument("--strength", type=float, default=None, help="With --image: the share of steps run, (0, 1].")
    args = parser.parse_args(argv)
    for name in ("conditioning_image", "image"):
        if getattr(args, name) is not None:
            setattr(args, name, image_files(getattr(args, name), parser, name))
    counts = {len(paths) for paths in (args.conditioning_image, args.image) if paths is not None}
    if len(counts) > 1:
        parser.error(f"--image and --conditioning_image give {' and '.join(map(str, sorted(counts)))} images")
    if counts:
        count = counts.pop()
        if args.num_images not in (None, count):  # one image per file: never a silent change of the count asked for
            parser.error(f"--num_images {args.num_images} with {count} image file(s): drop it, or give as many files")
        args.num_images = count
    elif args.num_images is None:
        args.num_images = 64
    if args.output is None and args.output_dir is None:
        parser.error("give --output (a grid PNG) and/or --output_dir (one PNG per image)")
    for flag, check in (("output", check_output_file), ("output_dir", check_output_folder)):
        try:
            if getattr(args, flag) is not None:
                check(getattr(args, flag))  # before sampling, whose images a failed write would lose
        except ValueError as error:
            parser.error(f"--{flag}: {error}")
    if args.grid_scale is not None and args.grid_scale < 1:
        parser.error(f"--grid_scale must be >= 1, got {args.grid_scale}")
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images and --batch_size must be >= 1, got {args.num_images} and {args.batch_size}")
    if args.class_labels is not None and len(args.class_labels) not in (1, args.num_images):
        parser.error(f"--class_labels takes 1 or --num_images={args.num_images} labels, got {len(args.class_labels)}")
    if args.dtype == "fp16" and not args.device.startswith("cuda"):
        parser.error("--dtype fp16 runs on a GPU only (CPU kernels are missing or slow); use bf16 or fp32 on CPU")
    return args


def image_files(values, parser, name):
    """The files of --image / --conditioning_image: the given files, or the sorted image files of one folder."""
    if len(values) == 1 and os.path.isdir(values[0]):
        folder = values[0]
        values = sorted(
            os.path.join(folder, entry)
            for entry in os.listdir(folder)
            if os.path.splitext(entry)[1].lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
        )
        if not values:
            parser.error(f"--{name} {folder}: the folder holds no image files")
    missing = [value for value in values if not os.path.isfile(value)]
    if missing:
        parser.error(f"--{name}: no such file(s): {missing[:5]}")
    undecodable = []  # found before sampling, not at the batch that reads them
    for value in values:
        try:
            with PIL.Image.open(value) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            undecodable.append(f"{value} ({error})")
    if undecodable:
        parser.error(f"--{name}: {len(undecodable)} file(s) cannot be decoded as images: {undecodable[:5]}")
    return values


def read_images(paths, num_channels):
    """The files as a (B, C, H, W) float tensor in [0, 1], the pipeline's input: decoded as the trainer decodes its
    data (`data.open_image`), so a 16-bit grayscale file (or 16-bit gray+alpha PNG) keeps its 16 bits instead of
    being rounded to 8. A high-bit-depth value outside its mode's range is a ValueError naming the file."""
    mode = "L" if num_channels == 1 else "RGB"
    arrays = []
    for path in paths:
        image = open_image({"path": path, "bytes": None})
        if num_channels == 1 and image.mode in HIGH_BIT_DEPTH_RANGES:
            if (problem := pixel_value_problem(image)) is not None:
                raise ValueError(f"{path}: {problem}")
            array = np.asarray(image, dtype=np.float32) / HIGH_BIT_DEPTH_RANGES[image.mode]
        else:
            array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)  # (H, W, C)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def load_pipeline(args):
    pipe = PFGMPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    try:
        pipe.check_guidance(args.guidance_scale)  # before sampling: a model without a null class cannot guide
    except ValueError as error:
        raise SystemExit(f"--guidance_scale: {error}") from None
    return pipe


def class_labels(values: list[str], class_names: list[str] | None) -> list[int | str]:
    """--class_labels as the pipeline takes them: a class name saved with the pipeline, else an integer label."""
    labels = []
    for value in values:
        if class_names is not None and value in class_names:
            labels.append(value)
        elif value.lstrip("-").isdigit():
            labels.append(int(value))
        else:
            raise SystemExit(f"--class_labels: {value!r} is neither an integer nor a class name of {class_names}")
    return labels


def sample_grid(images, nrow=None, scale=None):
    """The images tiled as the trainer's sample grids are: 1 px apart, enlarged `scale` times by nearest neighbour
    (default: so that a tile is at least `GRID_TILE_PIXELS` wide; 8x8 digits 4x, 32x32 images as they are)."""
    grid = image_grid(images, nrow, padding=1)
    if scale is None:
        scale = max(1, GRID_TILE_PIXELS // max(images[0].size))
    return grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)


def sample(pipe, args):
    """All images, batch by batch; image i from a generator seeded seed + i. Returns (images, total NFE)."""
    images, nfe = [], 0
    generator_device = "cpu" if args.device == "mps" else args.device
    for start in range(0, args.num_images, args.batch_size):
        indices = range(start, min(start + args.batch_size, args.num_images))
        generators = [torch.Generator(generator_device).manual_seed(args.seed + i) for i in indices]
        labels = None
        if args.class_labels is not None:
            labels = [args.class_labels[0 if len(args.class_labels) == 1 else i] for i in indices]
        inputs = {}
        if args.conditioning_image is not None:
            paths = args.conditioning_image[indices.start : indices.stop]
            inputs["conditioning_image"] = read_images(paths, pipe.config.conditioning_channels)
        if args.image is not None:
            inputs["image"] = read_images(args.image[indices.start : indices.stop], pipe.num_channels)
        if args.strength is not None:
            inputs["strength"] = args.strength
        output = pipe(
            batch_size=len(indices),
            class_labels=labels,
            num_inference_steps=args.num_inference_steps,
            generator=generators,
            solver=args.solver,
            rtol=args.rtol,
            atol=args.atol,
            guidance_scale=args.guidance_scale,
            restart_blocks=args.restart_blocks,
            **inputs,
        )
        images += output.images
        nfe += output.nfe
        print(f"images {indices.start}-{indices.stop - 1}: {output.nfe} network evaluations")
    return images, nfe


def main(argv=None):
    args = parse_args(argv)
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    if args.class_labels is not None:
        args.class_labels = class_labels(args.class_labels, pipe.config.class_names)
    images, nfe = sample(pipe, args)
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(args.output_dir, f"{i:05d}.png"))
    if args.output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        sample_grid(images, args.nrow, args.grid_scale).save(args.output)
    batches = math.ceil(args.num_images / args.batch_size)
    solver = args.solver or pipe.scheduler.config.get("solver", "euler")
    print(f"{args.num_images} images, {nfe / batches:.1f} network evaluations per batch ({solver})")
    return images, nfe


if __name__ == "__main__":
    main()
