"""Metrics while training (`--eval_steps`): the EMA model sampled on every process's share, one figure per run.

The embedded digits are judged by the shipped digit classifier (`evaluation.DigitsMetrics`), other data by FID/KID
against the training images (`evaluation.FidelityMetrics`, the `[eval]` extra). Image i is drawn from a generator
seeded `seed + i` whatever the process count, so one process and several give the same images; the shares are
gathered, and the main process measures them, logs `eval/<name>` to the trackers and appends one JSON line to
`metrics.jsonl` in the output folder.
"""

import json
import math
import os

import numpy as np
import torch

from ..data import ImageTransform
from ..evaluation import DigitsMetrics
from ..evaluation.fidelity import FidelityMetrics, FidelityUnavailableError, import_torch_fidelity
from ..files import atomic_write, inside
from ..paired import condition_sources

METRICS_FILE = "metrics.jsonl"


def uses_digits_metric(args) -> bool:
    """The digits metric for the embedded digits (no --train_data_dir, no --dataset_name), FID/KID otherwise."""
    return args.train_data_dir is None and args.dataset_name is None


def check_metric_available(args) -> None:
    """At start-up: FID/KID for your own data need torch-fidelity; a ValueError naming the install line if absent."""
    if args.eval_steps is None:
        return
    paired = condition_sources(args)
    if paired:
        raise ValueError(
            f"--eval_steps samples from the prior without a condition; with paired data (--{paired[0]}) measure the "
            "saved model with scripts/evaluate.py's conditional evaluation instead"
        )
    if uses_digits_metric(args):
        return
    try:
        import_torch_fidelity()
    except FidelityUnavailableError as error:
        raise ValueError(f"--eval_steps on your own data measures FID/KID: {error}") from None


def reference_for(args, images, measures: bool):
    """FID's reference images for --eval_steps on your own data, on the process that `measures`; else None."""
    if args.eval_steps is None or uses_digits_metric(args) or not measures:
        return None
    return reference_images(images, args.resolution, images.num_channels)


def reference_images(images, resolution: int, num_channels: int) -> np.ndarray:
    """The training images as uint8 (M, H, W, C), center-cropped to the training resolution (FID's reference)."""
    transform = ImageTransform(resolution, num_channels, center_crop=True)
    pixels = torch.stack([transform(example["image"]) for example in images.dataset]).permute(0, 2, 3, 1)
    return ((pixels + 1) * 127.5).round().to(torch.uint8).numpy()


def build_metric(args, reference, device):
    """A fresh metric for one evaluation (metrics accumulate their images)."""
    if uses_digits_metric(args):
        return DigitsMetrics(device=device)
    return FidelityMetrics(device=device, batch_size=args.eval_batch_size).update_reference(reference)


def sample_share(pipeline, args, accelerator) -> torch.Tensor:
    """This process's share of --eval_num_images, (share, H, W, C) in [0, 1]; the last process pads its share with
    images past the count (dropped after the gather) so that every process sends the same shape."""
    share = math.ceil(args.eval_num_images / accelerator.num_processes)
    first = accelerator.process_index * share
    batches = []
    for start in range(first, first + share, args.eval_batch_size):
        indices = range(start, min(start + args.eval_batch_size, first + share))
        generators = [torch.Generator().manual_seed(args.seed + i) for i in indices]  # image i: seed + i
        images = pipeline(
            len(indices), num_inference_steps=args.num_inference_steps, generator=generators, output_type="pt"
        ).images
        batches.append(images.permute(0, 2, 3, 1))
    return torch.cat(batches).to(accelerator.device).contiguous()


def evaluate(pipeline, args, accelerator, reference, global_step):
    """Every process samples its share; the main process measures all of them and returns the record (None
    elsewhere)."""
    images = accelerator.gather(sample_share(pipeline, args, accelerator))[: args.eval_num_images]
    if not accelerator.is_main_process:
        return None
    metric = build_metric(args, reference, accelerator.device)
    metric.update(images.float().cpu().numpy())
    figures = metric.compute()
    record = {"step": global_step, "num_images": int(images.shape[0]), "metric": type(metric).__name__}
    # the metric's figures besides these three; counts stay integers (the model card prints "6 images")
    numbers = {key: value for key, value in figures.items() if _is_number(value) and key not in record}
    record.update({key: _json_number(value) for key, value in numbers.items()})
    return record


def _json_number(value):
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def append_record(output_dir: str, record: dict) -> None:
    """One JSON line more in `metrics.jsonl`: the file is rewritten whole (atomically, never through a link)."""
    path = inside(output_dir, METRICS_FILE)  # refuses a link
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
    atomic_write(path, old + (json.dumps(record) + "\n").encode(), folder=output_dir)


def last_record(output_dir: str) -> dict | None:
    """The last line of `metrics.jsonl`, or None without one."""
    path = inside(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else None


def tracker_figures(record: dict) -> dict:
    """The record's figures as `eval/<name>` for `accelerator.log`."""
    return {f"eval/{key}": value for key, value in record.items() if key not in ("step", "metric")}
