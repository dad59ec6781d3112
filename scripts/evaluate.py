#!/usr/bin/env python
"""Sample a saved PFGM / PFGM++ pipeline and measure its images; print a summary and write a JSON of the results.

    # offline, for models of the embedded digits: the shipped classifier's metrics (pfgm_diffusers.evaluation)
    python scripts/evaluate.py --model outputs/pfgm --num_images 1000 --num_inference_steps 18 --output results.json
    # FID/KID against a Hub dataset or an image folder, through torch-fidelity (the [eval] extra: in a checkout,
    # pip install -e ".[eval]" "torchvision==0.28.*", the torchvision of torch 2.13, so that torch stays as it is)
    python scripts/evaluate.py --model outputs/cifar --reference uoft-cs/cifar10 --num_images 10000 --device cuda

`--reference digits` (the default) needs no network: it reports the Fréchet distance in the digit classifier's
features to the real training split, the share of confidently classified images and the coverage of the 10
classes, each beside the same figure for the held-out real digits. It refuses, before sampling, a model whose images
are not 1-channel and square or whose classes are not the ten digits (an unconditional 1-channel model of other
data cannot be told apart: its figures then say only how digit-like its images are). Any other `--reference` (a
`datasets` Hub id or a folder of images, resized like the trainer does to the model's resolution) gives FID and KID
with torch-fidelity's Inception-v3, whose weights are downloaded once or read from `--inception_weights`; offline
without them it stops with one line that says what to do. Image i is drawn from a generator seeded `seed + i` (as
scripts/sample.py), so the figures do not depend on `--batch_size` (except with RK45, which adapts its steps to each
batch). The JSON holds `frechet_distance`, `nfe` (network evaluations per image), every metric, the timings and
every setting used; `--output` is checked before sampling (not a folder, not under a file, in a writable folder).

Image-to-image models of the digits: `--paired_task superres|denoise` (with `--paired_sigma_y`, `--paired_factor`)
degrades the held-out digits and restores them, from the measurement as the condition of a model trained on pairs
and/or as the start with `--strength` (any model); it reports PSNR, SSIM and the share of restorations the shipped
classifier labels as the clean digit, each beside the same figure for the measurements themselves
(`pfgm_diffusers.restoration`):

    python scripts/evaluate.py --model pfgm-superres --paired_task superres --num_images 359
    python scripts/evaluate.py --model pfgm-digits --paired_task denoise --paired_sigma_y 0.3 --strength 0.3
"""

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import pfgm_diffusers
from pfgm_diffusers import PFGMPipeline, flow, scheduling_pfgm
from pfgm_diffusers.data import ImageTransform, load_hub_dataset, load_image_folder, open_image, undecoded
from pfgm_diffusers.evaluation import DigitsMetrics, FidelityMetrics, FidelityUnavailableError, SampleMetric
from pfgm_diffusers.files import atomic_write_json, check_output_file
from pfgm_diffusers.paired import PAIRED_TASKS, Degradation
from pfgm_diffusers.restart import blocks_from_json
from pfgm_diffusers.restoration import evaluate_restoration
from pfgm_diffusers.training.arguments import degradation as training_degradation
from pfgm_diffusers.training.checkpoints import ARGS_NAME

DIGITS_REFERENCE = "digits"
IN_SAMPLE_NOTE = (
    "in-sample: the model trained on all 1797 embedded digits, these held-out ones included "
    "(train with --digits_split train to score digits it never saw)"
)


def solver_choices():
    """The pipeline-only solvers ('rk45', 'restart') and every solver the scheduler knows today (read at run time: a
    new solver needs no change here)."""
    return (*flow.SAMPLER_ONLY, *scheduling_pfgm.SOLVERS)


def restart_blocks(value: str) -> dict:
    """--restart_blocks: Restart's blocks as JSON (the pipeline checks their values against the schedule)."""
    try:
        return blocks_from_json(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A folder saved by save_pretrained, or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--num_inference_steps", type=int, default=18)
    parser.add_argument(
        "--solver",
        choices=solver_choices(),
        default=None,
        help="The ODE solver; default: the saved scheduler's own. 'rk45': adaptive RK45 (--rtol, --atol); "
        "'restart': Restart sampling (--restart_blocks).",
    )
    parser.add_argument(
        "--restart_blocks",
        type=restart_blocks,
        default=None,
        help="Restart's blocks, JSON {name: [N_restart, K, t_min, t_max]}; default: the official CIFAR-10 block.",
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
    parser.add_argument(
        "--reference",
        default="digits",
        help="'digits' (offline classifier metrics), a `datasets` Hub id or a folder of images (FID/KID).",
    )
    parser.add_argument("--dataset_config_name", default=None, help="The Hub dataset's configuration, if any.")
    parser.add_argument("--num_reference", type=int, default=None, help="Use the first N reference images (all).")
    parser.add_argument("--inception_weights", default=None, help="A local torch-fidelity Inception weights file.")
    parser.add_argument("--output", default=None, help="Path of the JSON of results.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    paired = parser.add_argument_group("image-to-image on the digits (default: none, the sample metrics above)")
    paired.add_argument("--paired_task", choices=PAIRED_TASKS, help="Restore held-out digits from this measurement.")
    paired.add_argument("--paired_sigma_y", type=float, default=None, help="Measurement noise (model units).")
    paired.add_argument("--paired_factor", type=int, default=2, help="superres: the down-sampling factor.")
    paired.add_argument("--strength", type=float, default=None, help="Start from the measurement at this strength.")
    args = parser.parse_args(argv)
    if args.paired_task is None and args.strength is not None:
        parser.error("--strength belongs to a conditional evaluation: give --paired_task")
    if args.paired_task is not None:
        try:
            args.degradation = Degradation(args.paired_task, args.paired_sigma_y or 0.0, args.paired_factor)
        except ValueError as error:
            parser.error(f"--paired_task {args.paired_task}: {error}")
    for name in ("batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_images < 2:
        parser.error(f"--num_images must be >= 2 (a covariance needs two images), got {args.num_images}")
    if args.num_reference is not None and args.num_reference < 2:
        parser.error(f"--num_reference must be >= 2, got {args.num_reference}")
    if args.output is not None:
        try:
            check_output_file(args.output)  # before sampling, which may take hours
        except ValueError as error:
            parser.error(f"--output: {error}")
    return args


# ---------------------------------------------------------------------- the pipeline: the only two calls into it


def load_pipeline(args):
    pipe = PFGMPipeline.from_pretrained(args.model)
    if args.solver is None:
        args.solver = pipe.scheduler.config.get("solver", "euler")  # recorded in the results as the solver used
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.check_guidance(args.guidance_scale)  # before the metric's set-up and the sampling
    except ValueError as error:
        raise SystemExit(f"evaluate.py: --guidance_scale: {error}") from None
    return pipe.to(args.device)


def generate(pipe, generators, args):
    """One batch, one image per generator: images (B, H, W, C) in [0, 1] and the network evaluations per image."""
    output = pipe(
        batch_size=len(generators),
        num_inference_steps=args.num_inference_steps,
        generator=generators,
        output_type="np",
        solver=args.solver,
        rtol=args.rtol,
        atol=args.atol,
        guidance_scale=args.guidance_scale,
        restart_blocks=args.restart_blocks,
    )
    return output.images, output.nfe  # the batch shares its steps: its NFE is the NFE of each image


# ---------------------------------------------------------------------- sampling and measuring


def sample(pipe, args, on_batch):
    """All images batch by batch, image i seeded seed + i; `on_batch(images)` takes each batch. Returns the network
    evaluations per image of each batch, the seconds spent sampling and the seconds spent in `on_batch`."""
    generator_device = "cpu" if args.device == "mps" else args.device
    nfe_per_batch, seconds, on_batch_seconds = [], 0.0, 0.0
    with tqdm(total=args.num_images, unit="img", desc="sampling") as progress:
        for start in range(0, args.num_images, args.batch_size):
            indices = range(start, min(start + args.batch_size, args.num_images))
            generators = [torch.Generator(generator_device).manual_seed(args.seed + i) for i in indices]
            began = time.perf_counter()
            images, nfe = generate(pipe, generators, args)
            if str(args.device).startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - began
            nfe_per_batch.append(int(nfe))
            began = time.perf_counter()
            on_batch(images)
            on_batch_seconds += time.perf_counter() - began
            progress.update(len(indices))
    return nfe_per_batch, seconds, on_batch_seconds


def load_reference(args, resolution, num_channels):
    """The reference images as uint8 (M, H, W, C), resized and center-cropped like the trainer's data."""
    if os.path.isdir(args.reference):
        dataset = load_image_folder(args.reference).dataset
    else:
        dataset = load_hub_dataset(args.reference, args.dataset_config_name).dataset
    if args.num_reference is not None:
        dataset = dataset.select(range(min(args.num_reference, len(dataset))))
    transform = ImageTransform(resolution, num_channels, center_crop=True)
    # decoded as the trainer decodes them (open_image: a 16-bit gray+alpha PNG is 16-bit gray, not 8-bit RGBA)
    images = [transform(open_image(example["image"])) for example in undecoded(dataset)]  # (C, H, W) in [-1, 1]
    pixels = torch.stack(images).permute(0, 2, 3, 1)  # (M, H, W, C)
    return ((pixels + 1) * 127.5).round().to(torch.uint8).numpy()


def build_metric(args, pipe) -> SampleMetric:
    """The metric of --reference, with everything that can fail (the pipeline's fit, a missing extra, weights or
    data) checked before any sampling. The one place the references differ: the rest drives a `SampleMetric`."""
    if args.reference == DIGITS_REFERENCE:
        metric = DigitsMetrics(device=args.device)
        metric.check_pipeline(pipe)
        return metric
    metric = FidelityMetrics(args.inception_weights, device=args.device, batch_size=args.batch_size)
    metric.check_pipeline(pipe)
    channels, height, width = pipe.image_shape  # a latent model's images are its VAE's, not the UNet's samples
    return metric.update_reference(load_reference(args, height if height == width else (height, width), channels))


def unet_resolution(pipe):
    """The UNet's `sample_size`: an int, or (height, width)."""
    size = pipe.unet.config.sample_size
    return size if isinstance(size, int) else tuple(size)


def evaluate(args):
    pipe = load_pipeline(args)
    metric = build_metric(args, pipe)
    nfe_per_batch, sampling_seconds, metric_seconds = sample(pipe, args, metric.update)
    began = time.perf_counter()
    metrics = metric.compute()
    metric_seconds += time.perf_counter() - began
    return {
        "frechet_distance": metrics["frechet_distance"],
        "frechet_features": metric.frechet_features,
        "nfe": float(np.mean(nfe_per_batch)),
        "nfe_per_batch": nfe_per_batch,
        "num_images": args.num_images,
        "sampling_seconds": sampling_seconds,
        "metric_seconds": metric_seconds,
        "images_per_second": args.num_images / sampling_seconds,
        "metrics": metrics,
        "report": metric.report(metrics),
        "settings": vars(args),
        "scheduler": json.loads(pipe.scheduler.to_json_string()),
        "unet": {
            "sample_size": unet_resolution(pipe),
            "in_channels": pipe.unet.config.in_channels,
            "parameters": pipe.unet.num_parameters(),
        },
        "environment": environment(args.device),
    }


def evaluate_paired(args):
    """The conditional evaluation of --paired_task (`restoration.evaluate_restoration`), with the settings."""
    pipe = load_pipeline(args)
    began = time.perf_counter()
    metrics = evaluate_restoration(
        pipe,
        args.degradation,
        num_images=args.num_images,
        strength=args.strength,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        solver=args.solver,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    seconds = time.perf_counter() - began
    settings = {key: value for key, value in vars(args).items() if key != "degradation"}
    arguments = training_arguments(args.model)
    return {
        **metrics,
        "task": task_record(args.degradation),
        # what the model's training_args.json says of its training (null without one): the data and the task
        "trained_on_heldout_digits": None if arguments is None else trained_on_heldout_digits(arguments),
        "trained_task": None if arguments is None else trained_task(arguments),
        "seconds": seconds,
        "settings": settings,
        "environment": environment(args.device),
    }


def training_arguments(model):
    """The arguments of the run that saved `model` (its `training_args.json`), or None where there is no such file
    (a Hub id, a pipeline saved by hand)."""
    path = os.path.join(model, ARGS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def trained_on_heldout_digits(arguments):
    """Whether a run trained on the digits a paired evaluation restores: the embedded digits without
    `--digits_split train`."""
    own_data = arguments.get("dataset_name") is not None or arguments.get("train_data_dir") is not None
    return not own_data and arguments.get("digits_split", "all") != "train"  # before the flag: all 1797 digits


def trained_task(arguments):
    """The built-in task a run trained on (`task_record`), or None (no --paired_task: other conditions, or none)."""
    recorded = {name: arguments.get(name) for name in ("paired_task", "paired_sigma_y", "paired_factor")}
    task = training_degradation(argparse.Namespace(**recorded))  # the trainer's own defaults
    return None if task is None else task_record(task)


def task_record(degradation):
    """A `Degradation` as a dict, without the pooling factor of a denoising task (which ignores it)."""
    record = dataclasses.asdict(degradation)
    return record if degradation.task == "superres" else {k: v for k, v in record.items() if k != "factor"}


def paired_summary(results):
    def pair(name, scale=1.0, unit=""):
        return (
            f"{name} {scale * results[name]:.3g}{unit} +- {scale * results[name + '_sem']:.2g} "
            f"(measurement: {scale * results['degraded_' + name]:.3g}{unit})"
        )

    settings, trained = results["settings"], results["trained_task"]
    notes = [IN_SAMPLE_NOTE] if results["trained_on_heldout_digits"] else []
    if trained is not None and trained != results["task"]:
        notes.append(f"the model was trained on another task: {trained}, evaluated on {results['task']}")
    return "\n".join(
        [
            f"{results['num_images']} held-out digits, {settings['paired_task']}, {results['nfe']:.1f} network "
            f"evaluations per image, strength {settings['strength']}, guidance {settings['guidance_scale']}",
            f"{pair('psnr', unit=' dB')}, {pair('ssim')}",
            f"labelled as the clean digit: {pair('accuracy', 100, ' %')}"
            + (" (the model was given the true labels)" if results["labels_given"] else ""),
            *notes,
        ]
    )


def environment(device):
    info = {
        "pfgm_diffusers": pfgm_diffusers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def summary(results):
    return "\n".join(
        [
            f"{results['num_images']} images, {results['nfe']:.1f} network evaluations per image "
            f"({results['settings']['solver']}, {results['settings']['num_inference_steps']} steps)",
            f"sampling {results['sampling_seconds']:.1f} s ({results['images_per_second']:.2f} images/s), "
            f"metrics {results['metric_seconds']:.1f} s",
            results["report"],
        ]
    )


def write_json(results, path):
    """Write whole or not at all (`files.atomic_write_json`): a crash never leaves half a JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, results)


def main(argv=None):
    args = parse_args(argv)
    if args.paired_task is not None:
        results = evaluate_paired(args)
        print(paired_summary(results))
    else:
        try:
            results = evaluate(args)
        except FidelityUnavailableError as error:
            raise SystemExit(f"evaluate.py: {error}") from None  # one line, no traceback: the message is the fix
        print(summary(results))
    if args.output is not None:
        write_json(results, args.output)
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
