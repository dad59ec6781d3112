"""Image datasets for the trainer: a `datasets` Hub id or local path, an image folder, or the embedded digits.

Every loader returns a `datasets.Dataset` with an `"image"` column (PIL images) and, when labels are asked for and
the source has classes, a `"label"` column of integer class ids with the class names beside it. `ImageTransform` turns
those images into tensors in [-1, 1] without torchvision; `TrainingDataset` and `EpochSampler` give every process the
same order and augmentations, whatever the worker count or resume point.
"""

import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
# The fixed split of the 1797 digits: a permutation by np.random.default_rng(DIGITS_SPLIT_SEED), the first 20 % held
# out. The shipped classifier is trained on the rest (the real side of the digits metric's Fréchet distance), and
# every restoration evaluation scores the held-out digits. `--digits_split train` trains on the rest only.
DIGITS_SPLIT_SEED = 0
DIGITS_HELDOUT_FRACTION = 0.2
DIGITS_SPLITS = ("all", "train")
# High-bit-depth single-channel modes and the value range each is read from (mapped onto [-1, 1]): 16-bit integers,
# `I` (32-bit integers; Pillow's mode for some 16-bit PNG and TIFF files) as 16-bit data, `F` (float) as [0, 1].
HIGH_BIT_DEPTH_RANGES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
# Modes PIL uses for single-channel images; everything else is trained as RGB. An alpha channel is dropped ("LA" is
# trained as "L", "RGBA" as "RGB").
GRAYSCALE_MODES = ("1", "L", "LA", "P;L", *HIGH_BIT_DEPTH_RANGES)
# Pillow's raw mode for 16-bit grayscale+alpha PNGs (colour type 4), which it decodes as 8-bit "RGBA" (gray three
# times, the low bytes dropped). `open_image` reads them as 16-bit grayscale instead.
PNG_GRAY_ALPHA_16 = "LA;16B"
MAX_LISTED = 10
# A dataset whose encoded images take at most this many bytes (the embedded digits: 0.25 MB) is decoded once and kept
# in memory: decoding 64 small PNGs per step cost about a tenth of the default run's step.
MAX_DECODED_ONCE_BYTES = 8 * 2**20


@dataclass
class ImageDataset:
    """A loaded training set: the `datasets.Dataset`, its channel count and its class names (None: no labels)."""

    dataset: object  # datasets.Dataset, imported lazily
    num_channels: int
    class_names: list[str] | None = None
    column: str | None = None  # the dataset's column renamed to "image", where it had one: pairs of columns check it

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def digits_split(seed: int = DIGITS_SPLIT_SEED, heldout_fraction: float = DIGITS_HELDOUT_FRACTION):
    """(train_indices, heldout_indices) into the 1797 embedded digits: a seeded permutation whose first
    `round(heldout_fraction * 1797)` entries are held out. Both keep the permutation's order, so the first k held-out
    digits are a uniformly drawn subset of k."""
    with np.load(DIGITS_PATH) as npz:
        count = len(npz["labels"])
    permutation = np.random.default_rng(seed).permutation(count)
    num_heldout = round(heldout_fraction * count)
    return permutation[num_heldout:], permutation[:num_heldout]


def load_digits_dataset(with_labels=True, split="all"):
    """The embedded default: scikit-learn's 1797 handwritten 8x8 digits (UCI, CC BY 4.0), grayscale, 10 classes.
    `split="train"` keeps the 1438 digits of the training split (`digits_split`, in its order), so that the 359
    held-out digits that the evaluations score stay unseen."""
    import datasets

    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    with np.load(DIGITS_PATH) as npz:
        images, labels = npz["images"], npz["labels"]  # (1797, 8, 8) uint8, (1797,) uint8
    if split == "train":
        keep = digits_split()[0]
        images, labels = images[keep], labels[keep]
    names = [str(digit) for digit in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    data = {"image": [Image.fromarray(image, mode="L") for image in images], "label": labels.tolist()}
    dataset = datasets.Dataset.from_dict(data, features=features)
    if not with_labels:
        return ImageDataset(dataset.select_columns(["image"]), num_channels=1)
    return ImageDataset(dataset, num_channels=1, class_names=names)


def is_saved_dataset(path):
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def load_hub_dataset(dataset_name, dataset_config_name=None, cache_dir=None, image_column=None, label_column="label"):
    """The train split of a `datasets` Hub id, a local data folder or a `save_to_disk` folder, with its image column
    renamed to `"image"` and, unless `label_column` is None, its labels as class ids in `"label"`."""
    import datasets

    if is_saved_dataset(dataset_name):
        dataset = _load_saved_train_split(dataset_name)
    else:
        try:
            dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
        except ValueError as error:  # e.g. 'Instruction "train" corresponds to no data!', naming no dataset
            raise ValueError(f"cannot load the train split of {dataset_name!r}: {error}") from error
    if len(dataset) == 0:
        raise ValueError(f"the dataset {dataset_name!r} has no rows")
    if image_column is None:
        image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
        if not image_columns:
            raise ValueError(f"the dataset {dataset_name!r} has no image column; its columns: {dataset.column_names}")
        image_column = image_columns[0]
    elif image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column {image_column!r} is not in {dataset_name!r}; its columns: {dataset.column_names}"
        )
    elif not isinstance(dataset.features[image_column], datasets.Image):
        image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
        raise ValueError(
            f"--image_column {image_column!r} of {dataset_name!r} holds {dataset.features[image_column]}, not images; "
            f"its image columns: {image_columns}"
        )
    if label_column is not None and label_column not in dataset.column_names:
        label_column = None  # a dataset without labels: --class_conditional says so later
    columns = {image_column: "image"} if label_column is None else {image_column: "image", label_column: "label"}
    dataset = dataset.select_columns(list(columns))
    dataset = dataset.rename_columns({old: new for old, new in columns.items() if old != new})
    dataset, class_names = _with_class_ids(dataset) if label_column is not None else (dataset, None)
    first_image = open_image(undecoded(dataset)[0]["image"])  # its true channels: a 16-bit gray+alpha PNG is gray
    return ImageDataset(dataset, _channels_of_mode(first_image.mode), class_names, column=image_column)


def _load_saved_train_split(path):
    """A `save_to_disk` folder's dataset (its "train" split for a DatasetDict), refusing an empty one by name:
    `load_from_disk` of a dataset without rows fails with a bare IndexError."""
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(os.listdir(path))
        if "train" not in splits:
            raise ValueError(f"{path!r} is a saved DatasetDict without a 'train' split: {splits}")
        path = os.path.join(path, "train")
    with open(os.path.join(path, "state.json")) as f:
        if not json.load(f).get("_data_files"):
            raise ValueError(f"the dataset {path!r} has no rows")
    return datasets.load_from_disk(path)


def load_image_folder(train_data_dir, cache_dir=None, with_labels=True):
    """An `imagefolder` dataset; class sub-folders become labels. Corrupt images are skipped with a warning.
    A `save_to_disk` folder is loaded as a dataset instead (its `"label"` column holds the labels)."""
    import datasets

    if os.path.isdir(train_data_dir) and is_saved_dataset(train_data_dir):
        return load_hub_dataset(train_data_dir, label_column="label" if with_labels else None)
    image_paths = list_image_files(train_data_dir)
    readable, corrupt, bad_values = [], [], []
    channels = set()
    for path in image_paths:
        try:
            image = open_image({"path": path, "bytes": None})  # a full decode: `verify()` misses truncated JPEGs
        except (OSError, SyntaxError, ValueError) as error:
            corrupt.append(f"{path} ({error})")
            continue
        channels.add(_channels_of_mode(image.mode))
        readable.append(path)
        if (problem := pixel_value_problem(image)) is not None:  # checked once here, not in every batch
            bad_values.append(f"{path} ({problem})")
    if bad_values:
        raise ValueError(
            f"--train_data_dir {train_data_dir!r}: {len(bad_values)} image(s) hold pixel values that cannot be "
            f"trained on: {bad_values[:MAX_LISTED]}{' ...' if len(bad_values) > MAX_LISTED else ''}"
        )
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
    class_names = None
    if with_labels and "label" in dataset.column_names:
        dataset, class_names = _with_class_ids(dataset.select_columns(["image", "label"]))
    else:
        dataset = dataset.select_columns(["image"])
    # A folder that mixes grayscale and colour images is trained in colour
    return ImageDataset(dataset, num_channels=max(channels), class_names=class_names)


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


def open_image(value):
    """An image of a dataset: a PIL image as is, or `datasets`' undecoded `{"path", "bytes"}` decoded as
    `datasets.Image` decodes it (EXIF orientation applied), except 16-bit grayscale+alpha PNGs, which Pillow reads as
    8-bit RGBA: they become their gray channel at 16 bits (mode "I;16"), the alpha dropped as for 8-bit "LA"."""
    if isinstance(value, Image.Image):
        return value
    path, data = value["path"], value["bytes"]
    if data is None and not os.path.isfile(path):  # a remote file: `datasets` reads it
        import datasets

        return datasets.Image().decode_example(value)
    image = Image.open(path if data is None else io.BytesIO(data))
    if image.format == "PNG" and len(image.tile) == 1 and image.tile[0].args == PNG_GRAY_ALPHA_16:
        # Decoded with the raw mode "RGBA", a pixel's 4 bytes stay as stored: gray high, gray low, alpha high, low
        image.tile = [image.tile[0]._replace(args="RGBA")]
        image.load()
        raw = np.asarray(image, dtype=np.uint16)  # (H, W, 4)
        return Image.fromarray((raw[..., 0] << 8) | raw[..., 1])  # uint16: mode "I;16"
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def undecoded(dataset):
    """`dataset` with its `"image"` column left undecoded (`{"path", "bytes"}`), for `open_image`."""
    import datasets

    if isinstance(dataset.features.get("image"), datasets.Image) and dataset.features["image"].decode:
        return dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def _channels_of_mode(mode):
    return 1 if mode in GRAYSCALE_MODES else 3


def pixel_value_problem(image):
    """Why a high-bit-depth image cannot be trained on (a value that is not finite or outside its mode's range), or
    None; 8-bit images always can."""
    if image.mode not in HIGH_BIT_DEPTH_RANGES:
        return None
    return _value_problem(image.mode, np.asarray(image, dtype=np.float64))


def _value_problem(mode, array):
    max_value = HIGH_BIT_DEPTH_RANGES[mode]
    low, high = array.min(), array.max()  # NaN if any pixel is NaN: the comparisons below are False
    if low >= 0 and high <= max_value:
        return None
    if not np.isfinite(array).all():
        return f"{np.count_nonzero(~np.isfinite(array))} non-finite pixel value(s) (NaN or infinity)"
    return (
        f"a mode {mode!r} image with values in [{low:g}, {high:g}]: this mode is read as values in "
        f"[0, {max_value:g}]; convert the image to 8 or 16 bits (or floats in [0, 1]) first"
    )


def _with_class_ids(dataset):
    """The dataset with integer class ids in `"label"`, and the class names: a ClassLabel's names, the sorted unique
    strings of a string column (`class_encode_column`), or "0" .. "K-1" for non-negative integer labels."""
    import datasets

    feature = dataset.features["label"]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        dataset = dataset.class_encode_column("label")  # sorted unique strings -> 0 .. K-1
        feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return dataset, list(feature.names)
    labels = dataset["label"]
    if not all(isinstance(label, int) and label >= 0 for label in labels):
        raise ValueError(
            "the dataset's label column must hold strings, non-negative integers or a ClassLabel; "
            f"found e.g. {labels[:3]!r}"
        )
    # Integer labels are class ids 0 .. K-1 (one embedding row each, and the ids `class_labels` takes when sampling):
    # renumbering them would silently change those ids, so labels that leave most of 0 .. K-1 unused are refused
    used = sorted(set(labels))
    if 2 * len(used) < used[-1] + 1:
        shown = ", ".join(str(label) for label in used[:MAX_LISTED]) + (", ..." if len(used) > MAX_LISTED else "")
        raise ValueError(
            f"the dataset's integer labels {{{shown}}} would make {used[-1] + 1} classes (ids 0 .. {used[-1]}, one "
            f"embedding row each) of which {len(used)} occur: integer labels are class ids; renumber them 0 .. "
            f"{len(used) - 1}, or store them as strings or a ClassLabel (each distinct value becomes a named class)"
        )
    return dataset, [str(label) for label in range(used[-1] + 1)]


class ImageTransform:
    """PIL image -> float tensor (C, H, W) in [-1, 1]: shorter side resized to `resolution`, then a center or random
    square crop and an optional horizontal flip (torchvision's Resize, CenterCrop/RandomCrop, RandomHorizontalFlip,
    ToTensor, Normalize(0.5, 0.5)). Random choices come from the `generator` given with each image.

    8-bit images map 0..255 onto [-1, 1]. High-bit-depth grayscale images keep their precision: 16-bit modes (`I;16`
    and `I`, whose values must lie in 0..65535) map 0..65535 onto [-1, 1], float images (`F`, values in [0, 1]) map
    [0, 1]; a value outside its mode's range, or not finite, is a ValueError, never clipped."""

    def __init__(self, resolution, num_channels, center_crop=False, random_flip=False):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
        self.resolution = resolution
        self.num_channels = num_channels
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image, generator=None):
        if image.mode in HIGH_BIT_DEPTH_RANGES:
            image = _float_image(image)  # mode "F" in 0..255, resized and cropped without losing bits
        elif image.mode != (mode := "L" if self.num_channels == 1 else "RGB"):
            image = image.convert(mode)
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
        if image.size != (self.resolution, self.resolution):
            image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W) or (H, W, 3)
        tensor = torch.from_numpy(array).reshape(self.resolution, self.resolution, -1).permute(2, 0, 1)  # (C, H, W)
        if tensor.shape[0] != self.num_channels:  # a grayscale high-bit-depth image in an RGB dataset
            tensor = tensor.expand(self.num_channels, -1, -1)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            tensor = tensor.flip(-1)
        return tensor.contiguous()


def _float_image(image):
    """A high-bit-depth grayscale image as a float ("F") image with its range mapped onto 0..255 (not clipped)."""
    array = np.asarray(image, dtype=np.float64)
    if (problem := _value_problem(image.mode, array)) is not None:
        raise ValueError(problem)
    return Image.fromarray((array * (255.0 / HIGH_BIT_DEPTH_RANGES[image.mode])).astype(np.float32))  # mode "F"


class TrainingDataset(torch.utils.data.Dataset):
    """The transformed examples of a `datasets.Dataset` with an `"image"` (and optional `"label"`) column.

    The random crop and flip of example `index` in epoch `epoch` come from a generator seeded by (seed, epoch, index):
    the same on every run, whatever the loading order, prefetching, worker count or resume point.
    """

    def __init__(self, dataset, transform, seed=0):
        self.dataset = undecoded(dataset) if hasattr(dataset, "features") else dataset  # decoded by open_image
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.decoded = _decode_if_small(self.dataset)  # the rows as dataset[:] returns them, decoded; or None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        if self.decoded is not None:
            rows = {column: [values[index] for index in indices] for column, values in self.decoded.items()}
        else:
            rows = self.dataset[list(indices)]  # one batched read: {"image": [...], "label": [...]}
        examples = []
        for position, index in enumerate(indices):
            seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            try:
                pixel_values = self.transform(open_image(rows["image"][position]), generator)
            except ValueError as error:  # e.g. a NaN pixel: name the image (a large dataset is not scanned first)
                raise ValueError(f"{_describe_image(self.dataset, index)}: {error}") from None
            example = {"pixel_values": pixel_values}
            if "label" in rows:
                example["label"] = rows["label"][position]
            examples.append(example)
        return examples


def _describe_image(dataset, index):
    """The words "image <index> of the training data", with its file where the dataset knows it."""
    value = dataset[index]["image"]
    path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
    return f"image {index} of the training data" + (f" ({path})" if path else "")


def _decode_if_small(dataset):
    """Every row of a small in-memory `datasets.Dataset` (image column undecoded), decoded (the transform never
    modifies an image) and its pixel values checked once; None for larger ones and for datasets that do not report
    their size."""
    nbytes = getattr(getattr(dataset, "data", None), "nbytes", None)
    if nbytes is None or nbytes > MAX_DECODED_ONCE_BYTES or len(dataset) == 0:
        return None
    rows = dataset[:]
    rows["image"] = [open_image(value) for value in rows["image"]]
    problems = [(index, pixel_value_problem(image)) for index, image in enumerate(rows["image"])]
    bad = [f"{_describe_image(dataset, index)}: {problem}" for index, problem in problems if problem is not None]
    if bad:
        raise ValueError(
            f"{len(bad)} training image(s) hold pixel values that cannot be trained on: {bad[:MAX_LISTED]}"
            + (" ..." if len(bad) > MAX_LISTED else "")
        )
    return rows


class EpochSampler(torch.utils.data.Sampler):
    """A random order that depends only on (seed, epoch): identical on every process and after a resume."""

    def __init__(self, num_samples, seed):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def collate(examples):
    """Stack `"pixel_values"` (B, C, H, W) and `"label"` (B,) for a `torch.utils.data.DataLoader`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "label" in examples[0]:
        batch["label"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    return batch
