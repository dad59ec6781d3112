"""Paired data for image-to-image models: a target image and a condition image (a measurement) per example.

Three sources, each a `PairedImages`:

- the built-in tasks on any clean images (the embedded digits by default), the condition made on the fly by a
  `Degradation`: `"superres"` (average pooling by `factor`, then nearest upsampling back to the target's size, so
  the condition can be concatenated to the input: 8x8 -> 4x4 -> 8x8 for the digits) or `"denoise"` (Gaussian noise
  of standard deviation `sigma_y` in model space, [-1, 1]), a fresh draw every epoch;
- a `datasets` dataset with a second image column (`load_paired_dataset`, as diffusers' ControlNet scripts'
  `--conditioning_image_column`);
- two local folders whose files are matched by their path without the extension (`load_paired_folders`).

`PairedTrainingDataset` gives the target and its condition with the same random crop and flip (the condition is
resized to the target's resolution first, so both must have one aspect ratio), in the order and with the
augmentations of `data.TrainingDataset`.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .data import (
    GRAYSCALE_MODES,
    MAX_LISTED,
    ImageDataset,
    TrainingDataset,
    collate,
    list_image_files,
    load_hub_dataset,
    open_image,
    pixel_value_problem,
)
from .validation import check_integer, check_number

logger = logging.getLogger(__name__)

__all__ = [
    "PAIRED_TASKS",
    "Degradation",
    "PairedImages",
    "PairedTrainingDataset",
    "load_paired_dataset",
    "load_paired_folders",
    "match_paired_folders",
    "paired_collate",
]

PAIRED_TASKS = ("superres", "denoise")
# The trainer's flags that each give a source of conditions (at most one per run)
CONDITION_FLAGS = ("conditioning_image_column", "conditioning_data_dir", "paired_task")


def condition_sources(args) -> list[str]:
    """The names of the `CONDITION_FLAGS` given in the trainer's `args`, in that order."""
    return [name for name in CONDITION_FLAGS if getattr(args, name, None)]


@dataclass(frozen=True)
class Degradation:
    r"""
    A built-in measurement y = A(x) (+ noise) of clean images x in model space ([-1, 1]).

    Args:
        task (`str`):
            `"superres"`: average pooling by `factor`, then nearest upsampling back to the input's size;
            `"denoise"`: x plus Gaussian noise of standard deviation `sigma_y`.
        sigma_y (`float`, defaults to 0.0):
            Measurement noise (model units; 0.1 is 5 % of the [-1, 1] range), added after the operator. Must be > 0
            for `"denoise"`.
        factor (`int`, defaults to 2):
            The down-sampling factor of `"superres"` (2: 8x8 -> 4x4 -> 8x8).
    """

    task: str
    sigma_y: float = 0.0
    factor: int = 2

    def __post_init__(self):
        if self.task not in PAIRED_TASKS:
            raise ValueError(f"unknown paired task {self.task!r}: choose one of {PAIRED_TASKS}")
        check_number("sigma_y", self.sigma_y)
        if self.sigma_y < 0:
            raise ValueError(f"`sigma_y` must be a number >= 0, got {self.sigma_y!r}.")
        if self.task == "denoise" and self.sigma_y == 0:
            raise ValueError("the denoise task needs a noise level sigma_y > 0 (e.g. --paired_sigma_y 0.2)")
        check_integer("factor", self.factor, minimum=2)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The measurement of `x` (`(..., C, H, W)`, model space), of the same shape; noise from `generator`."""
        if self.task == "superres":
            height, width = x.shape[-2:]
            if height % self.factor or width % self.factor:
                raise ValueError(f"superres by {self.factor} needs H and W divisible by it, got {height}x{width}")
            flat = x.reshape(-1, *x.shape[-3:])  # (B, C, H, W)
            low = F.avg_pool2d(flat, self.factor)  # (B, C, H / f, W / f)
            y = F.interpolate(low, scale_factor=self.factor, mode="nearest").reshape(x.shape)
        else:
            y = x
        if self.sigma_y > 0:
            y = y + self.sigma_y * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return y


@dataclass
class PairedImages:
    """Targets and their conditions: an `ImageDataset` of conditions aligned row by row with the targets, or a
    `Degradation` that makes them from the targets."""

    target: ImageDataset
    condition: ImageDataset | None = None
    degradation: Degradation | None = None

    def __post_init__(self):
        if (self.condition is None) == (self.degradation is None):
            raise ValueError("PairedImages needs exactly one of `condition` and `degradation`")
        if self.condition is not None and len(self.condition.dataset) != len(self.target.dataset):
            raise ValueError(
                f"{len(self.condition.dataset)} condition images for {len(self.target.dataset)} targets: they must "
                "pair up row by row"
            )

    @property
    def conditioning_channels(self) -> int:
        """C_cond: the UNet takes C + C_cond input channels."""
        return self.target.num_channels if self.condition is None else self.condition.num_channels


def match_paired_folders(train_data_dir: str, conditioning_data_dir: str) -> list[tuple[str, str]]:
    """(target, condition) file pairs of two folders, matched by the path relative to each folder without the
    extension (`a/1.png` pairs with `a/1.jpg`), sorted. Unmatched or ambiguous names are a ValueError naming them."""
    keyed = []
    for folder in (train_data_dir, conditioning_data_dir):
        by_key = {}
        for path in list_image_files(folder):
            key = os.path.splitext(os.path.relpath(path, folder))[0]
            by_key.setdefault(key, []).append(path)
        ambiguous = sorted(paths[1] for paths in by_key.values() if len(paths) > 1)
        if ambiguous:
            raise ValueError(
                f"{folder!r} holds several images of one name (differing only in the extension), so they cannot be "
                f"paired: {ambiguous[:MAX_LISTED]}"
            )
        keyed.append({key: paths[0] for key, paths in by_key.items()})
    targets, conditions = keyed
    only_targets, only_conditions = sorted(set(targets) - set(conditions)), sorted(set(conditions) - set(targets))
    if only_targets or only_conditions:
        raise ValueError(
            f"the paired folders {train_data_dir!r} and {conditioning_data_dir!r} must hold the same file names "
            f"(extensions aside): {len(only_targets)} image(s) without a condition {only_targets[:MAX_LISTED]}, "
            f"{len(only_conditions)} condition(s) without an image {only_conditions[:MAX_LISTED]}"
        )
    return [(targets[key], conditions[key]) for key in sorted(targets)]


def load_paired_folders(train_data_dir: str, conditioning_data_dir: str) -> PairedImages:
    """Targets from `train_data_dir` and conditions from `conditioning_data_dir`, paired by file name
    (`match_paired_folders`); a pair with an undecodable file is skipped with a warning, a pair whose two images
    differ in aspect ratio is a ValueError (one crop must fit both)."""
    import datasets

    readable, corrupt, mismatched, bad_values = [], [], [], []
    channels = ([], [])
    for pair in match_paired_folders(train_data_dir, conditioning_data_dir):
        try:
            sizes = []
            for side, path in enumerate(pair):
                image = open_image({"path": path, "bytes": None})  # as training reads it (16-bit gray+alpha: gray)
                sizes.append(image.size)
                channels[side].append(1 if image.mode in GRAYSCALE_MODES else 3)
                if (problem := pixel_value_problem(image)) is not None:
                    bad_values.append(f"{path} ({problem})")
        except (OSError, SyntaxError, ValueError) as error:
            corrupt.append(f"{pair} ({error})")
            continue
        (width, height), (cond_width, cond_height) = sizes
        if width * cond_height != height * cond_width:
            mismatched.append(f"{pair[0]} {width}x{height} vs {pair[1]} {cond_width}x{cond_height}")
        readable.append(pair)
    if bad_values:
        raise ValueError(
            f"the paired folders {train_data_dir!r} and {conditioning_data_dir!r}: {len(bad_values)} image(s) hold "
            f"pixel values that cannot be trained on: {bad_values[:MAX_LISTED]}"
        )
    if mismatched:
        raise ValueError(
            "a target and its condition must have one aspect ratio (both are resized to --resolution and cropped "
            f"alike): {mismatched[:MAX_LISTED]}"
        )
    if not readable:
        raise ValueError(f"none of the image pairs of {train_data_dir!r} can be decoded: {corrupt[:MAX_LISTED]}")
    if corrupt:
        logger.warning("skipping %d pair(s) with a corrupt image: %s", len(corrupt), corrupt[:MAX_LISTED])
    features = datasets.Features({"image": datasets.Image()})
    target = datasets.Dataset.from_dict({"image": [pair[0] for pair in readable]}, features=features)
    condition = datasets.Dataset.from_dict({"image": [pair[1] for pair in readable]}, features=features)
    return PairedImages(
        target=ImageDataset(target, num_channels=max(channels[0])),
        condition=ImageDataset(condition, num_channels=max(channels[1])),
    )


def load_paired_dataset(
    dataset_name: str,
    conditioning_image_column: str,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = "label",
) -> PairedImages:
    """A `datasets` dataset (Hub id, local data folder or `save_to_disk` folder) with a target image column and a
    condition image column, loaded through `data.load_hub_dataset` once per column (the second load reads the
    `datasets` cache), so both keep its checks and its row order."""
    if image_column is not None and image_column == conditioning_image_column:
        raise ValueError(f"--conditioning_image_column {conditioning_image_column!r} is also the --image_column")
    target = load_hub_dataset(dataset_name, dataset_config_name, cache_dir, image_column, label_column)
    condition = load_hub_dataset(dataset_name, dataset_config_name, cache_dir, conditioning_image_column, None)
    if target.column == condition.column:  # the default target column is the first image column: it may be this one
        raise ValueError(
            f"--conditioning_image_column {conditioning_image_column!r} is also the targets' column (the dataset's "
            "first image column, which they default to): the model would learn to copy its condition; give "
            "--image_column the targets' column"
        )
    return PairedImages(target=target, condition=condition)


class PairedTrainingDataset(torch.utils.data.Dataset):
    """`data.TrainingDataset` examples with a `"conditioning_pixel_values"` tensor (C_cond, H, W) beside
    `"pixel_values"`: the condition column transformed with the target's random crop and flip (two
    `TrainingDataset`s seeded alike draw the same crop and flip for one (seed, epoch, index)), or the
    `Degradation` of the transformed target with noise seeded by (seed, epoch, index)."""

    def __init__(self, paired: PairedImages, resolution: int, center_crop=False, random_flip=False, seed=0):
        from .data import ImageTransform

        self.seed = seed
        self.epoch = 0
        transform = ImageTransform(resolution, paired.target.num_channels, center_crop, random_flip)
        self.target = TrainingDataset(paired.target.dataset, transform, seed=seed)
        self.degradation = paired.degradation
        self.condition = None
        if paired.condition is not None:
            transform = ImageTransform(resolution, paired.condition.num_channels, center_crop, random_flip)
            self.condition = TrainingDataset(paired.condition.dataset.select_columns(["image"]), transform, seed=seed)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.target.set_epoch(epoch)
        if self.condition is not None:
            self.condition.set_epoch(epoch)

    def __len__(self):
        return len(self.target)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        examples = self.target.__getitems__(indices)
        if self.condition is not None:
            for example, condition in zip(examples, self.condition.__getitems__(indices), strict=True):
                example["conditioning_pixel_values"] = condition["pixel_values"]
            return examples
        for index, example in zip(indices, examples, strict=True):
            # A stream of its own (the 1 at the end), so the measurement noise is not the crop's random draw
            seed = np.random.SeedSequence([self.seed, self.epoch, index, 1]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            example["conditioning_pixel_values"] = self.degradation(example["pixel_values"], generator)
        return examples


def paired_collate(examples):
    """`data.collate` plus `"conditioning_pixel_values"` (B, C_cond, H, W)."""
    batch = collate(examples)
    batch["conditioning_pixel_values"] = torch.stack([example["conditioning_pixel_values"] for example in examples])
    return batch
