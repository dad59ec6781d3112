"""The trainer's data module: the embedded digits, transforms without torchvision, reproducible augmentation."""

import json
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
    assert sorted(folder.dataset["label"]) == [0, 0, 1, 1] and folder.class_names == ["a", "b"]
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


@pytest.mark.parametrize(
    "mode, values, full_scale",
    [("I;16", np.uint16, 65535), ("I", np.int32, 65535), ("F", np.float32, 1.0)],
)
def test_high_bit_depth_images_use_their_whole_range(mode, values, full_scale):
    # A 16-bit ramp over the full range: convert("L") would clip 255/256 of it to +1
    ramp = np.linspace(0, full_scale, 64).reshape(8, 8).astype(values)
    image = Image.fromarray(ramp)
    assert image.mode == mode
    tensor = ImageTransform(8, num_channels=1, center_crop=True)(image)
    expected = torch.from_numpy(ramp.astype(np.float64) / full_scale * 2 - 1).float()
    torch.testing.assert_close(tensor[0], expected, rtol=0, atol=1e-5)
    assert (tensor.abs() > 0.999).float().mean() <= 2 / 64  # only the two ends of the ramp
    rgb = ImageTransform(8, num_channels=3, center_crop=True)(image)  # a folder mixing it with colour images
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[0], tensor[0])


def test_high_bit_depth_resize_keeps_the_precision_of_16_bits():
    ramp = np.linspace(1000, 1255, 16 * 16).reshape(16, 16).astype(np.uint16)  # 256 levels within one 8-bit step
    tensor = ImageTransform(8, num_channels=1, center_crop=True)(Image.fromarray(ramp))
    assert len(torch.unique(tensor)) > 32


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((4, 4), 70000, dtype=np.int32), r"mode 'I' image with values in \[70000, 70000\]"),
        (np.full((4, 4), -1, dtype=np.int32), r"values in \[0, 65535\]"),
        (np.full((4, 4), 2.5, dtype=np.float32), r"mode 'F' image with values in \[2.5, 2.5\]: .* \[0, 1\]"),
    ],
)
def test_high_bit_depth_values_outside_the_mode_range_are_an_error(array, message):
    with pytest.raises(ValueError, match=message):
        ImageTransform(4, num_channels=1)(Image.fromarray(array))


def labelled_table(labels, label_type="string"):
    import datasets

    images = [Image.fromarray(np.full((6, 6, 3), 30 * i, dtype=np.uint8)) for i in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value(label_type)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_string_labels_become_sorted_class_ids_with_their_names(tmp_path):
    from pfgm_diffusers.data import load_hub_dataset

    labelled_table(["dog", "cat", "emu", "cat"]).save_to_disk(str(tmp_path / "saved"))
    loaded = load_hub_dataset(str(tmp_path / "saved"))
    assert loaded.class_names == ["cat", "dog", "emu"] and loaded.num_classes == 3
    assert loaded.dataset["label"] == [1, 0, 2, 0]


def test_unconditional_loading_ignores_labels_it_could_not_use(tmp_path):
    from pfgm_diffusers.data import load_hub_dataset

    labelled_table([-3, 7, -1], label_type="int64").save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="label column must hold strings, non-negative integers"):
        load_hub_dataset(str(tmp_path / "saved"))
    unlabelled = load_hub_dataset(str(tmp_path / "saved"), label_column=None)
    assert unlabelled.dataset.column_names == ["image"] and unlabelled.class_names is None


def test_save_to_disk_folders_load_through_either_flag(tmp_path):
    import datasets

    from pfgm_diffusers.data import load_hub_dataset

    table = labelled_table(["b", "a", "b", "a"])
    table.save_to_disk(str(tmp_path / "dataset"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "dict"))
    for path in ("dataset", "dict"):
        by_name = load_hub_dataset(str(tmp_path / path))
        by_folder = load_image_folder(str(tmp_path / path))
        for loaded in (by_name, by_folder):
            assert len(loaded.dataset) == 4 and loaded.class_names == ["a", "b"] and loaded.num_channels == 3
            assert loaded.dataset.column_names == ["image", "label"]
    assert load_image_folder(str(tmp_path / "dataset"), with_labels=False).class_names is None


def test_an_empty_dataset_is_an_error_naming_it(tmp_path):
    import datasets

    from pfgm_diffusers.data import load_hub_dataset

    empty = labelled_table([])
    empty.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": empty}).save_to_disk(str(tmp_path / "dict"))
    empty.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    for name in ("saved", "dict"):
        with pytest.raises(ValueError, match=rf"the dataset '.*{name}.*' has no rows"):
            load_hub_dataset(str(tmp_path / name))
    with pytest.raises(ValueError, match=r"cannot load the train split of '.*parquet'"):
        load_hub_dataset(str(tmp_path / "parquet"), cache_dir=str(tmp_path / "cache"))


def test_folder_and_digits_class_names():
    digits = load_digits_dataset()
    assert digits.class_names == [str(d) for d in range(10)]
    unlabelled = load_digits_dataset(with_labels=False)
    assert unlabelled.class_names is None and unlabelled.dataset.column_names == ["image"]


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    from pfgm_diffusers.data import EpochSampler

    sampler = EpochSampler(20, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    torch.manual_seed(0)  # the global generator plays no part
    assert list(EpochSampler(20, seed=5)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(20))


def test_a_small_dataset_decoded_once_gives_the_same_batches():
    from pfgm_diffusers.data import load_digits_dataset

    images = load_digits_dataset(with_labels=True)
    transform = ImageTransform(8, 1, random_flip=True)
    cached = TrainingDataset(images.dataset, transform, seed=5)
    assert cached.decoded is not None and len(cached.decoded["image"]) == 1797  # ~0.2 MB encoded: kept decoded
    plain = TrainingDataset(images.dataset, transform, seed=5)
    plain.decoded = None  # the per-batch read of larger datasets
    for epoch in (0, 3):
        cached.set_epoch(epoch), plain.set_epoch(epoch)
        a, b = collate(cached.__getitems__([7, 1500, 3, 3])), collate(plain.__getitems__([7, 1500, 3, 3]))
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["label"].tolist() == b["label"].tolist()


def test_an_unchanged_mode_and_size_skip_no_random_draw():
    # The fast path (no convert, no crop) must still draw the two crop offsets, or the flips would change
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)[None]
    transform = ImageTransform(8, 1, random_flip=True)
    flips = []
    for seed in range(20):
        expected = torch.Generator().manual_seed(seed)
        torch.randint(1, (), generator=expected), torch.randint(1, (), generator=expected)  # left, top
        flips.append(bool(torch.rand((), generator=expected) < 0.5))
        out = transform(image, torch.Generator().manual_seed(seed))
        assert torch.equal(out, pixels.flip(-1) if flips[-1] else pixels)
    assert 0 < sum(flips) < 20


# ---------------------------------------------------------------------------------------------------------------
# Bad or unusual data: refused by name before training, or read as what it is.


def write_png_gray_alpha_16(path, gray, alpha):
    """A 16-bit grayscale+alpha PNG (colour type 4), built by hand: Pillow cannot write one."""
    import struct
    import zlib

    height, width = gray.shape
    pixels = np.stack([gray, alpha], axis=-1).astype(">u2")  # (H, W, 2), big-endian as PNG stores them
    scanlines = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)  # bit depth 16, colour type 4
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def test_16_bit_gray_alpha_pngs_are_grayscale_at_16_bits_and_their_alpha_is_dropped(tmp_path):
    from pfgm_diffusers.data import load_hub_dataset, open_image

    ramp = np.linspace(1000, 60000, 64).reshape(8, 8).astype(np.uint16)  # 16-bit steps an 8-bit read would merge
    (tmp_path / "folder").mkdir()
    for i, alpha in enumerate((0, 65535)):  # transparent and opaque: the alpha changes nothing
        write_png_gray_alpha_16(tmp_path / "folder" / f"{i}.png", ramp, np.full_like(ramp, alpha))
    assert Image.open(tmp_path / "folder" / "0.png").mode == "RGBA"  # how Pillow alone reads it
    folder = load_image_folder(str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"), with_labels=False)
    assert folder.num_channels == 1  # it was 3: RGBA trained a colour model
    dataset = TrainingDataset(folder.dataset, ImageTransform(8, folder.num_channels, center_crop=True))
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535 * 2 - 1).float()[None]
    for index in range(2):
        torch.testing.assert_close(dataset[index]["pixel_values"], expected, rtol=0, atol=1e-6)
    # As for 8-bit grayscale+alpha, which Pillow reads as "LA": one channel, the alpha dropped
    la = Image.fromarray(np.stack([ramp >> 8, np.zeros_like(ramp)], axis=-1).astype(np.uint8), mode="LA")
    assert torch.equal(ImageTransform(8, 1)(la), ImageTransform(8, 1)(Image.fromarray((ramp >> 8).astype(np.uint8))))
    # The same file inside a `datasets` dataset (images stored as bytes) is read the same way
    import datasets

    png_bytes = (tmp_path / "folder" / "0.png").read_bytes()
    table = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes, "path": None}] * 2})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    saved = load_hub_dataset(str(tmp_path / "saved"))
    assert saved.num_channels == 1
    tensor = TrainingDataset(saved.dataset, ImageTransform(8, 1, center_crop=True))[1]["pixel_values"]
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert open_image({"path": None, "bytes": png_bytes}).mode == "I;16"


def write_float_tiff(path, array):
    Image.fromarray(array.astype(np.float32)).save(path)  # mode "F"
    return path


def test_a_nan_pixel_in_a_float_tiff_is_refused_before_training_naming_the_file(tmp_path):
    good = np.linspace(0, 1, 64).reshape(8, 8)
    (tmp_path / "folder").mkdir()
    for i in range(3):
        write_float_tiff(tmp_path / "folder" / f"{i}.tif", good)
    bad = good.copy()
    bad[3, 5] = np.nan
    write_float_tiff(tmp_path / "folder" / "1.tif", bad)
    with pytest.raises(ValueError) as error:
        load_image_folder(str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert "1 image(s) hold pixel values that cannot be trained on" in message
    assert f"{tmp_path / 'folder' / '1.tif'} (1 non-finite pixel value(s) (NaN or infinity))" in message
    assert "0.tif" not in message and "2.tif" not in message


def test_bad_pixel_values_in_a_dataset_are_named_once_decoded_or_when_the_batch_is_built(tmp_path, monkeypatch):
    import datasets

    from pfgm_diffusers import data

    good = np.linspace(0, 1, 64).reshape(8, 8)
    bad = good.copy()
    bad[0, 0] = np.inf
    paths = [str(write_float_tiff(tmp_path / f"{i}.tif", bad if i == 2 else good)) for i in range(4)]
    table = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    transform = ImageTransform(8, 1)
    # A small dataset is decoded once when the training set is built: the check costs nothing per step
    with pytest.raises(ValueError, match=r"1 training image\(s\) hold .*image 2 of the training data \(.*2\.tif\): "):
        TrainingDataset(table, transform)
    # A large one is read batch by batch: the batch holding the image names it
    monkeypatch.setattr(data, "MAX_DECODED_ONCE_BYTES", 0)
    dataset = TrainingDataset(table, transform)
    assert dataset.decoded is None
    collate(dataset.__getitems__([0, 1, 3]))
    with pytest.raises(ValueError, match=r"^image 2 of the training data \(.*2\.tif\): 1 non-finite pixel value"):
        dataset.__getitems__([1, 2])


def test_image_column_naming_a_column_without_images_is_refused(tmp_path):
    import datasets

    from pfgm_diffusers.data import load_hub_dataset

    images = [Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    features = datasets.Features({"caption": datasets.Value("string"), "photo": datasets.Image()})
    table = datasets.Dataset.from_dict({"caption": ["a", "b", "c"], "photo": images}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError) as error:
        load_hub_dataset(str(tmp_path / "saved"), image_column="caption")
    assert "--image_column 'caption' of" in str(error.value)
    assert "holds Value('string'), not images; its image columns: ['photo']" in str(error.value)
    assert load_hub_dataset(str(tmp_path / "saved"), image_column="photo").num_channels == 3


def test_sparse_integer_labels_are_refused_naming_them(tmp_path):
    from pfgm_diffusers.data import load_hub_dataset

    labelled_table([0, 2_000_000, 0], label_type="int64").save_to_disk(str(tmp_path / "sparse"))
    with pytest.raises(ValueError) as error:
        load_hub_dataset(str(tmp_path / "sparse"))
    assert "integer labels {0, 2000000} would make 2000001 classes (ids 0 .. 2000000" in str(error.value)
    assert "of which 2 occur" in str(error.value) and "renumber them 0 .. 1" in str(error.value)
    # Labels are class ids: a few unused ids stay (renumbering would change the ids used when sampling)
    labelled_table([0, 1, 3, 3], label_type="int64").save_to_disk(str(tmp_path / "gap"))
    gap = load_hub_dataset(str(tmp_path / "gap"))
    assert gap.class_names == ["0", "1", "2", "3"] and gap.dataset["label"] == [0, 1, 3, 3]
    # As strings, each distinct value is a named class
    labelled_table(["0", "2000000", "0"]).save_to_disk(str(tmp_path / "strings"))
    assert load_hub_dataset(str(tmp_path / "strings")).class_names == ["0", "2000000"]


def test_a_unet_config_with_another_class_count_is_refused_naming_both(tmp_path):
    from test_train import TINY_UNET, in_process, make_folder, tiny_args

    folder = make_folder(tmp_path / "three", {f"{name}/{i}.png": 40 * i for name in "abc" for i in range(2)})
    config = tmp_path / "ten_classes.json"
    config.write_text(json.dumps(dict(TINY_UNET, num_class_embeds=10)))
    for conditional, message in ((True, "the data's 3 classes"), (None, "an unconditional run")):
        args = tiny_args(folder, config, tmp_path / "out", class_conditional=conditional)
        with in_process(tmp_path) as train_pfgm:
            with pytest.raises(ValueError) as error:
                train_pfgm.main([str(arg) for arg in args])
        assert f"num_class_embeds=10 conflicts with num_class_embeds={3 if conditional else None} from" in str(
            error.value
        )
        assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Your own data: the resolution, the UNet and the output folder come from the data; the digits keep theirs.


def make_sized_folder(root, size, count):
    rng = np.random.default_rng(size)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_the_no_argument_run_keeps_the_digits_defaults_and_a_dataset_gets_its_own(tmp_path):
    from test_train import in_process

    with in_process(tmp_path) as train_pfgm:
        digits = train_pfgm.parse_args([])
        assert (digits.resolution, digits.output_dir, digits.train_batch_size, digits.max_train_steps) == (
            8,
            "pfgm-digits",
            64,
            6000,
        )
        assert os.path.basename(digits.model_config_name_or_path) == "unet_digits_8px.json"
        folder = train_pfgm.parse_args(["--train_data_dir", "data/my_photos/"])
        assert (folder.resolution, folder.model_config_name_or_path) == (None, None)  # from the data, once loaded
        assert folder.output_dir == "pfgm-my_photos"
        assert train_pfgm.parse_args(["--dataset_name", "uoft-cs/cifar10"]).output_dir == "pfgm-cifar10"
        given = train_pfgm.parse_args(["--train_data_dir", "x", "--resolution", "12", "--output_dir", "o"])
        assert (given.resolution, given.output_dir) == (12, "o")
        preset = train_pfgm.parse_args(["--preset", "cifar10"])  # the preset's settings, the data's folder name
        assert (preset.resolution, preset.output_dir) == (32, "pfgm-cifar10")
        assert os.path.basename(preset.model_config_name_or_path) == "unet_ddpmpp_32.json"


@pytest.mark.parametrize(
    "size, given, resolution, config",
    [
        ((24, 24), {}, 24, "unet_32px.json"),
        ((30, 40), {}, 28, "unet_32px.json"),  # the shorter side, down to the UNet's downsampling factor 4
        ((512, 384), {}, 64, "unet_64px.json"),  # capped at the largest UNet of the table
        ((5, 5), {}, 4, "unet_digits_8px.json"),
        ((24, 24), {"resolution": 16}, 16, "unet_digits.json"),  # a given resolution picks the UNet
        ((24, 24), {"model_config_name_or_path": "mine.json"}, 24, "mine.json"),  # a given UNet sets the factor
    ],
)
def test_resolution_and_unet_from_the_data(tmp_path, size, given, resolution, config):
    from test_train import TINY_UNET, in_process

    (tmp_path / "mine.json").write_text(json.dumps(dict(TINY_UNET, block_out_channels=[4, 8, 8])))  # factor 4
    argv = ["--train_data_dir", "photos"] + [f"--{key}={value}" for key, value in given.items()]
    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(argv)
        line = train_pfgm.fill_from_the_data(args, *size)
    assert (args.resolution, os.path.basename(args.model_config_name_or_path)) == (resolution, config)
    assert line.startswith(f"From the data (its first image is {size[0]}x{size[1]}): ")
    assert (f"--resolution {resolution}" in line) == ("resolution" not in given)
    assert line.endswith("; --output_dir pfgm-photos")


def test_a_resolution_beyond_the_table_without_a_unet_is_refused(tmp_path):
    from test_train import in_process

    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(["--train_data_dir", "photos", "--resolution", "128"])
        with pytest.raises(ValueError, match=r"--resolution 128: .*unet_by_resolution.json has UNets up to 64 px"):
            train_pfgm.fill_from_the_data(args, 128, 128)


@pytest.mark.parametrize("size, config", [(16, "unet_digits.json"), (24, "unet_32px.json")])
def test_a_run_on_a_folder_trains_at_its_image_size_into_a_folder_named_after_it(tmp_path, caplog, size, config):
    from test_train import in_process

    from pfgm_diffusers import PFGMPipeline

    folder = make_sized_folder(tmp_path / f"tiles{size}", size, count=8)
    argv = ["--train_data_dir", folder, "--train_batch_size", 4, "--max_train_steps", 1, "--eval_batch_size", 2]
    argv += ["--num_inference_steps", 1, "--cache_dir", tmp_path / "cache"]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.main([str(arg) for arg in argv])
    assert f"From the data (its first image is {size}x{size}): --resolution {size}, " in caplog.text
    assert f"{config} (<= {size if size == 16 else 32} px); --output_dir pfgm-tiles{size}" in caplog.text
    assert "Images are resized" not in caplog.text  # trained at their own size, not shrunk to 8x8
    pipeline = PFGMPipeline.from_pretrained(tmp_path / f"pfgm-tiles{size}")
    with open(os.path.join(os.path.dirname(__file__), "..", "pfgm_diffusers", "training", "configs", config)) as f:
        expected = json.load(f)
    assert pipeline.unet.config.sample_size == size and pipeline.unet.config.in_channels == 3
    assert list(pipeline.unet.config.block_out_channels) == expected["block_out_channels"]


def test_a_folder_smaller_than_one_step_says_what_to_change(tmp_path):
    from test_train import in_process

    folder = make_sized_folder(tmp_path / "few", 8, count=5)
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(ValueError) as error:
            train_pfgm.main(["--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "cache")])
    assert str(error.value) == (
        "the dataset has 5 images, fewer than one optimizer step: batches of 64 x 1 process(es) x 1 accumulation = "
        "64 images; give --train_batch_size 5 or less, use fewer processes or accumulation steps, or add images"
    )
