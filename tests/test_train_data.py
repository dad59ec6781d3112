"""The trainer's data module: the embedded digits, transforms without torchvision, reproducible augmentation."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pfgm_diffusers.data import (
    DIGITS_PATH,
    ImageTransform,
    TrainingDataset,
    collate,
    load_digits_dataset,
    load_image_folder,
)


def test_embedded_digits_are_small_real_and_labelled():
    assert os.path.getsize(DIGITS_PATH) < 100_000
    digits = load_digits_dataset()
    assert len(digits.dataset) == 1797 and digits.num_channels == 1 and digits.num_classes == 10
    example = digits.dataset[0]
    assert example["image"].size == (8, 8) and example["image"].mode == "L"
    assert example["label"] == 0
    with np.load(DIGITS_PATH) as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].max() == 255
        assert np.bincount(npz["labels"]).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_transform_resizes_the_shorter_side_crops_and_maps_to_minus_one_one():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    transform = ImageTransform(10, num_channels=3, center_crop=True)
    tensor = transform(Image.fromarray(array))
    assert tensor.shape == (3, 10, 10) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    # 20x40 -> 10x20, centre crop keeps columns 5..14: white then black
    assert (tensor[:, :, :4] == 1.0).all() and (tensor[:, :, 6:] == -1.0).all()


def test_grayscale_and_rgb_channels():
    gray = Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), mode="L")
    assert ImageTransform(8, num_channels=1)(gray).shape == (1, 8, 8)
    assert ImageTransform(8, num_channels=3)(gray).shape == (3, 8, 8)
    rgba = Image.fromarray(np.full((8, 8, 4), 200, dtype=np.uint8), mode="RGBA")
    assert ImageTransform(8, num_channels=3)(rgba).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="num_channels must be 1"):
        ImageTransform(8, num_channels=2)


def test_random_crop_and_flip_depend_only_on_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8), mode="L") for _ in range(6)]

    class Rows:  # the slice of datasets.Dataset that TrainingDataset uses
        def __len__(self):
            return len(images)

        def __getitem__(self, indices):
            return {"image": [images[i] for i in indices], "label": list(indices)}

    dataset = TrainingDataset(Rows(), ImageTransform(8, 1, random_flip=True), seed=3)
    first = collate(dataset.__getitems__([0, 1, 2, 3, 4, 5]))
    torch.manual_seed(123)  # the global generator plays no part
    again = collate([dataset[i] for i in range(6)])
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["label"].tolist() == list(range(6))
    dataset.set_epoch(1)
    other_epoch = collate(dataset.__getitems__([0, 1, 2, 3, 4, 5]))
    assert not torch.equal(first["pixel_values"], other_epoch["pixel_values"])


def test_image_folder_labels_from_class_folders_and_corrupt_files_skipped(tmp_path, caplog):
    for label, value in (("a", 0), ("b", 255)):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(tmp_path / label / f"{i}.png")
    (tmp_path / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
    folder = load_image_folder(str(tmp_path), cache_dir=str(tmp_path / ".cache"))
    assert len(folder.dataset) == 4 and folder.num_classes == 2 and folder.num_channels == 1
    assert sorted(folder.dataset["label"]) == [0, 0, 1, 1]
    assert "skipping 1 corrupt image(s) of 5" in caplog.text and "bad.jpg" in caplog.text


def test_dataset_name_accepts_a_local_path_and_finds_the_image_column(tmp_path):
    import datasets

    from pfgm_diffusers.data import load_hub_dataset

    images = [Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=3)})
    table = datasets.Dataset.from_dict({"img": images, "fine_label": [0, 1, 2, 0]}, features=features)
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train.parquet"))

    loaded = load_hub_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), label_column="fine_label")
    assert loaded.dataset.column_names == ["image", "label"]  # CIFAR-style "img" found and renamed
    assert len(loaded.dataset) == 4 and loaded.num_classes == 3 and loaded.num_channels == 3
    unlabelled = load_hub_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert unlabelled.num_classes is None and unlabelled.dataset.column_names == ["image"]
    with pytest.raises(ValueError, match="--image_column 'picture' is not in"):
        load_hub_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), image_column="picture")
