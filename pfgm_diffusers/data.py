"""Image datasets for the trainer: a `datasets` Hub id or local path, an image folder, or the embedded digits.

Every loader returns a `datasets.Dataset` with an `"image"` column (PIL images) and, when the source has classes,
a `"label"` column of integers. `ImageTransform` turns those images into tensors in [-1, 1] without torchvision;
`TrainingDataset` applies it with reproducible randomness.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
# Modes PIL uses for single-channel images; everything else is trained as RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F", "P;L")
MAX_LISTED = 10


@dataclass
class ImageDataset:
    """A loaded training set: the `datasets.Dataset`, its channel count and its number of classes (None: none)."""

    dataset: object  # datasets.Dataset, imported lazily
    num_channels: int
    num_classes: int | None


def load_digits_dataset():
    """The embedded default: scikit-learn's 1797 handwritten 8x8 digits (UCI, CC BY 4.0), grayscale, 10 classes."""
    import datasets

    with np.load(DIGITS_PATH) as npz:
        images, labels = npz["images"], npz["labels"]  # (1797, 8, 8) uint8, (1797,) uint8
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    data = {"image": [Image.fromarray(image, mode="L") for image in images], "label": labels.tolist()}
    return ImageDataset(datasets.Dataset.from_dict(data, features=features), num_channels=1, num_classes=10)


def load_hub_dataset(dataset_name, dataset_config_name=None, cache_dir=None, image_column=None, label_column="label"):
    """The train split of a `datasets` Hub id or local path, with its image column renamed to `"image"`."""
    import datasets

    dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    if image_column is None:
        image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
        if not image_columns:
            raise ValueError(
                f"--dataset_name {dataset_name!r} has no image column; its columns: {dataset.column_names}"
            )
        image_column = image_columns[0]
    elif image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column {image_column!r} is not in {dataset_name!r}; its columns: {dataset.column_names}"
        )
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if label_column != "label" and label_column in dataset.column_names:
        dataset = dataset.rename_column(label_column, "label")
    if "label" in dataset.column_names:
        dataset = dataset.select_columns(["image", "label"])
        num_classes = _count_classes(dataset)
    else:
        dataset = dataset.select_columns(["image"])
        num_classes = None
    return ImageDataset(dataset, num_channels=_channels_of_mode(dataset[0]["image"].mode), num_classes=num_classes)


def load_image_folder(train_data_dir, cache_dir=None):
    """An `imagefolder` dataset; class sub-folders become labels. Corrupt images are skipped with a warning."""
    import datasets

    image_paths = list_image_files(train_data_dir)
    readable, corrupt = [], []
    channels = set()
    for path in image_paths:
        try:
            with Image.open(path) as image:
                image.load()  # a full decode: `verify()` misses truncated JPEGs
                channels.add(_channels_of_mode(image.mode))
            readable.append(path)
        except (OSError, SyntaxError, ValueError) as error:
            corrupt.append(f"{path} ({error})")
    if not readable:
        raise ValueError(
            f"--train_data_dir {train_data_dir!r}: none of its {len(image_paths)} image files can be decoded; "
            f"first ones: {corrupt[:MAX_LISTED]}"
        )
    if corrupt:
        logger.warning(
            "--train_data_dir %r: skipping %d corrupt image(s) of %d: %s%s",
            train_data_dir,
            len(corrupt),
            len(image_paths),
            corrupt[:MAX_LISTED],
            " ..." if len(corrupt) > MAX_LISTED else "",
        )
    dataset = datasets.load_dataset("imagefolder", data_files={"train": readable}, cache_dir=cache_dir, split="train")
    num_classes = None
    if "label" in dataset.column_names:
        dataset = dataset.select_columns(["image", "label"])
        num_classes = _count_classes(dataset)
    else:
        dataset = dataset.select_columns(["image"])
    # A folder that mixes grayscale and colour images is trained in colour
    return ImageDataset(dataset, num_channels=max(channels), num_classes=num_classes)


def list_image_files(train_data_dir):
    """All image files under `train_data_dir` (recursively, sorted), or a ValueError naming what is wrong."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not os.path.isdir(train_data_dir):
        raise ValueError(f"--train_data_dir {train_data_dir!r} is not a directory")
    if not os.access(train_data_dir, os.R_OK | os.X_OK):
        raise ValueError(f"--train_data_dir {train_data_dir!r} is not readable")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    paths, unreadable = [], []
    for root, dirs, files in os.walk(train_data_dir, onerror=lambda error: unreadable.append(str(error))):
        dirs.sort()
        paths += [
            os.path.join(root, name) for name in sorted(files) if os.path.splitext(name)[1].lower() in extensions
        ]
    if unreadable:
        raise ValueError(f"--train_data_dir {train_data_dir!r}: cannot read {unreadable[:MAX_LISTED]}")
    if not paths:
        raise ValueError(
            f"--train_data_dir {train_data_dir!r} holds no image files (looked for {sorted(extensions)[:8]}... "
            "in it and its sub-folders)"
        )
    return paths


def _channels_of_mode(mode):
    return 1 if mode in GRAYSCALE_MODES else 3


def _count_classes(dataset):
    import datasets

    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    labels = dataset["label"]
    if not all(isinstance(label, int) and label >= 0 for label in labels):
        raise ValueError("the dataset's 'label' column must hold non-negative integers (or be a ClassLabel)")
    return max(labels) + 1


class ImageTransform:
    """PIL image -> float tensor (C, H, W) in [-1, 1]: shorter side resized to `resolution`, then a center or random
    square crop and an optional horizontal flip (torchvision's Resize, CenterCrop/RandomCrop, RandomHorizontalFlip,
    ToTensor, Normalize(0.5, 0.5)). Random choices come from the `generator` given with each image."""

    def __init__(self, resolution, num_channels, center_crop=False, random_flip=False):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
        self.resolution = resolution
        self.mode = "L" if num_channels == 1 else "RGB"
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image, generator=None):
        image = image.convert(self.mode)
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, resample=Image.BILINEAR)
        left_max, top_max = size[0] - self.resolution, size[1] - self.resolution
        if self.center_crop:
            left, top = int(round(left_max / 2.0)), int(round(top_max / 2.0))
        else:
            left = int(torch.randint(left_max + 1, (), generator=generator))
            top = int(torch.randint(top_max + 1, (), generator=generator))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W) or (H, W, 3)
        tensor = torch.from_numpy(array).reshape(self.resolution, self.resolution, -1).permute(2, 0, 1)  # (C, H, W)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            tensor = tensor.flip(-1)
        return tensor.contiguous()


class TrainingDataset(torch.utils.data.Dataset):
    """The transformed examples of a `datasets.Dataset` with an `"image"` (and optional `"label"`) column.

    The random crop and flip of example `index` in epoch `epoch` come from a generator seeded by (seed, epoch, index):
    the same on every run, whatever the loading order, prefetching, worker count or resume point.
    """

    def __init__(self, dataset, transform, seed=0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        rows = self.dataset[list(indices)]  # one batched read: {"image": [...], "label": [...]}
        examples = []
        for position, index in enumerate(indices):
            seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            example = {"pixel_values": self.transform(rows["image"][position], generator)}
            if "label" in rows:
                example["label"] = rows["label"][position]
            examples.append(example)
        return examples


def collate(examples):
    """Stack `"pixel_values"` (B, C, H, W) and `"label"` (B,) for a `torch.utils.data.DataLoader`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "label" in examples[0]:
        batch["label"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    return batch
