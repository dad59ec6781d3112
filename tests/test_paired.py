"""Paired data: the built-in degradations, folder matching, the shared crop and flip, the datasets column."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pfgm_diffusers.data import load_digits_dataset
from pfgm_diffusers.paired import (
    Degradation,
    PairedImages,
    PairedTrainingDataset,
    load_paired_dataset,
    load_paired_folders,
    match_paired_folders,
    paired_collate,
)


def test_superres_is_block_averages_at_the_input_size():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = Degradation("superres")(x)
    assert y.shape == x.shape
    low = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # (2, 3, 4, 4): each 2x2 block's mean
    assert torch.allclose(y, low.repeat_interleave(2, -2).repeat_interleave(2, -1), atol=1e-6)
    assert torch.allclose(Degradation("superres", factor=4)(x), F.interpolate(F.avg_pool2d(x, 4), scale_factor=4))
    with pytest.raises(ValueError, match="divisible"):
        Degradation("superres", factor=3)(x)


def test_denoise_adds_gaussian_noise_of_sigma_y_from_the_generator():
    x = torch.zeros(64, 1, 8, 8)
    y = Degradation("denoise", sigma_y=0.2)(x, torch.Generator().manual_seed(1))
    assert y.std().item() == pytest.approx(0.2, rel=0.05)
    assert torch.equal(y, Degradation("denoise", sigma_y=0.2)(x, torch.Generator().manual_seed(1)))
    noisy_superres = Degradation("superres", sigma_y=0.1)(x, torch.Generator().manual_seed(1))
    assert noisy_superres.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "deblur"}, "unknown paired task"),
        ({"task": "denoise"}, "sigma_y > 0"),
        ({"task": "denoise", "sigma_y": -0.1}, "`sigma_y` must be a number >= 0, got -0.1"),
        ({"task": "superres", "factor": 1}, "`factor` must be an integer >= 2, got 1"),
        ({"task": "denoise", "sigma_y": float("nan")}, "`sigma_y` must be a finite number, got nan"),
        ({"task": "superres", "factor": True}, "`factor` must be an integer >= 2, got True"),
    ],
)
def test_bad_degradations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Degradation(**kwargs)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folders_pair_by_name_and_refuse_unmatched_names(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "sub/c"):
        _save(tmp_path / "x" / f"{name}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        _save(tmp_path / "y" / f"{name}.jpg", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    pairs = match_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))
    assert [(p.split("/x/")[1], q.split("/y/")[1]) for p, q in pairs] == [
        ("a.png", "a.jpg"),
        ("b.png", "b.jpg"),
        ("sub/c.png", "sub/c.jpg"),
    ]
    paired = load_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))
    assert (paired.target.num_channels, paired.conditioning_channels) == (3, 1)

    _save(tmp_path / "x" / "extra.png", np.zeros((12, 12), np.uint8))
    _save(tmp_path / "y" / "lonely.png", np.zeros((12, 12), np.uint8))
    with pytest.raises(ValueError, match=r"1 image\(s\) without a condition \['extra'\].*1 condition\(s\) without "):
        match_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))
    _save(tmp_path / "y" / "extra.png", np.zeros((12, 12), np.uint8))
    _save(tmp_path / "x" / "lonely.jpg", np.zeros((12, 12), np.uint8))
    _save(tmp_path / "x" / "lonely.png", np.zeros((12, 12), np.uint8))
    with pytest.raises(ValueError, match="several images of one name"):
        match_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))


def test_a_pair_of_different_aspect_ratios_is_refused(tmp_path):
    _save(tmp_path / "x" / "a.png", np.zeros((12, 12), np.uint8))
    _save(tmp_path / "y" / "a.png", np.zeros((12, 6), np.uint8))
    with pytest.raises(ValueError, match="one aspect ratio"):
        load_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))


def test_the_condition_gets_the_targets_random_crop_and_flip(tmp_path):
    rng = np.random.default_rng(1)
    for index in range(16):  # the condition is the same picture under another name: equal after the same crop/flip
        image = rng.integers(0, 256, (12, 24, 3), dtype=np.uint8)  # resized to 8x16, then cropped at 9 offsets
        _save(tmp_path / "x" / f"{index:02d}.png", image)
        _save(tmp_path / "y" / f"{index:02d}.bmp", image)
    paired = load_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))
    indices = list(range(16))
    cropped = paired_collate(PairedTrainingDataset(paired, 8, random_flip=True, seed=3).__getitems__(indices))
    assert cropped["pixel_values"].shape == cropped["conditioning_pixel_values"].shape == (16, 3, 8, 8)
    assert torch.equal(cropped["conditioning_pixel_values"], cropped["pixel_values"])
    # the crops and flips really vary: against a centre crop without flips, most images differ
    centred = paired_collate(PairedTrainingDataset(paired, 8, center_crop=True, seed=3).__getitems__(indices))
    assert (cropped["pixel_values"] - centred["pixel_values"]).flatten(1).abs().amax(1).gt(0.1).sum() >= 8
    flipped = paired_collate(PairedTrainingDataset(paired, 12, random_flip=True, seed=3).__getitems__(indices))
    plain = paired_collate(PairedTrainingDataset(paired, 12, seed=3).__getitems__(indices))
    assert torch.equal(flipped["conditioning_pixel_values"], flipped["pixel_values"])
    assert 3 <= (flipped["pixel_values"] != plain["pixel_values"]).flatten(1).any(1).sum() <= 13


def test_a_smaller_condition_is_resized_to_the_target_before_the_shared_crop(tmp_path):
    for index in range(8):  # 2x2 blocks: PIL's bilinear 2x upscale of the 6x6 condition keeps each block's value
        image = np.full((12, 12), 20 * index, dtype=np.uint8)
        image[:6] += 100
        _save(tmp_path / "x" / f"{index}.png", image)
        _save(tmp_path / "y" / f"{index}.png", image[::2, ::2].copy())
    paired = load_paired_folders(str(tmp_path / "x"), str(tmp_path / "y"))
    batch = paired_collate(PairedTrainingDataset(paired, 12, random_flip=True, seed=0).__getitems__(list(range(8))))
    assert batch["conditioning_pixel_values"].shape == (8, 1, 12, 12)
    assert torch.allclose(batch["conditioning_pixel_values"].mean((1, 2, 3)), batch["pixel_values"].mean((1, 2, 3)))


def test_digit_tasks_degrade_the_transformed_target_with_a_fresh_draw_each_epoch():
    digits = load_digits_dataset(with_labels=True)
    superres = PairedTrainingDataset(PairedImages(digits, degradation=Degradation("superres")), resolution=8)
    batch = paired_collate(superres.__getitems__([0, 5, 9]))
    assert torch.equal(batch["conditioning_pixel_values"], Degradation("superres")(batch["pixel_values"]))
    assert batch["label"].tolist() == [digits.dataset[i]["label"] for i in (0, 5, 9)]

    denoise = PairedTrainingDataset(PairedImages(digits, degradation=Degradation("denoise", 0.3)), resolution=8)
    first = paired_collate(denoise.__getitems__([0, 1]))
    again = paired_collate(denoise.__getitems__([0, 1]))
    denoise.set_epoch(1)
    later = paired_collate(denoise.__getitems__([0, 1]))
    assert torch.equal(first["conditioning_pixel_values"], again["conditioning_pixel_values"])
    assert not torch.allclose(first["conditioning_pixel_values"], later["conditioning_pixel_values"])
    noise = first["conditioning_pixel_values"] - first["pixel_values"]
    assert 0.2 < noise.std().item() < 0.4


def test_a_dataset_with_a_conditioning_image_column(tmp_path):
    import datasets

    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
    edges = [image.convert("L") for image in images]
    features = datasets.Features(
        {"image": datasets.Image(), "edges": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    data = {"image": images, "edges": edges, "label": [0, 1, 0, 1, 0, 1]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    paired = load_paired_dataset(str(tmp_path / "saved"), "edges")
    assert (paired.target.num_channels, paired.conditioning_channels, paired.target.class_names) == (3, 1, ["a", "b"])
    dataset = PairedTrainingDataset(paired, resolution=8)
    batch = paired_collate(dataset.__getitems__([4, 1]))
    expected = torch.from_numpy(np.asarray(edges[4], dtype=np.float32) / 127.5 - 1)
    assert torch.equal(batch["conditioning_pixel_values"][0, 0], expected)
    assert batch["label"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="'nope' is not in"):
        load_paired_dataset(str(tmp_path / "saved"), "nope")
    with pytest.raises(ValueError, match="also the --image_column"):
        load_paired_dataset(str(tmp_path / "saved"), "image", image_column="image")
    with pytest.raises(ValueError, match="'image' is also the targets' column"):  # the targets' default column
        load_paired_dataset(str(tmp_path / "saved"), "image")
    assert load_paired_dataset(str(tmp_path / "saved"), "image", image_column="edges").target.column == "edges"


def test_paired_folders_of_16_bit_gray_alpha_pngs_are_grayscale_at_16_bits(tmp_path):
    from test_train_data import write_png_gray_alpha_16

    ramp = np.linspace(1000, 60000, 64).reshape(8, 8).astype(np.uint16)  # 16-bit steps an 8-bit read would merge
    for folder in ("target", "condition"):
        (tmp_path / folder).mkdir()
        write_png_gray_alpha_16(tmp_path / folder / "a.png", ramp, np.full_like(ramp, 65535))
    assert Image.open(tmp_path / "target" / "a.png").mode == "RGBA"  # how Pillow alone reads it
    paired = load_paired_folders(str(tmp_path / "target"), str(tmp_path / "condition"))
    assert paired.target.num_channels == paired.condition.num_channels == 1  # was 3: a colour model of gray pairs
    example = PairedTrainingDataset(paired, 8, center_crop=True)[0]
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535 * 2 - 1).float()[None]
    torch.testing.assert_close(example["pixel_values"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(example["conditioning_pixel_values"], expected, rtol=0, atol=1e-6)
