"""Image-to-image training launched for real: the built-in digit tasks over two gloo processes with class labels and
conditioning dropout, paired folders with the field objective, a `datasets` conditioning column, bad flags."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import TINY_UNET, fail_if_called, in_process, run_training, tiny_args

from pfgm_diffusers import PFGMPipeline


@pytest.fixture
def unet_config(tmp_path):
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


def digits_args(unet_config, output_dir, **overrides):
    """A tiny run on the embedded digits (no --train_data_dir)."""
    return tiny_args(None, unet_config, output_dir, train_data_dir=None, **overrides)


def test_two_processes_train_a_class_and_image_conditional_digit_model(tmp_path, unet_config):
    out = tmp_path / "out"
    args = digits_args(
        unet_config,
        out,
        paired_task="denoise",
        paired_sigma_y=0.3,
        class_conditional=True,
        conditioning_dropout_prob=0.5,
        digits_split="train",
        max_train_steps=2,
        save_images_steps=2,
    )
    log = run_training(tmp_path, args, num_processes=2)
    assert "2 process(es)" in log
    assert ": 1438 images (1 channel(s)" in log  # the training split: the 359 held-out digits stay unseen
    assert json.loads((out / "training_args.json").read_text())["digits_split"] == "train"
    card = (out / "README.md").read_text()  # tagged image-to-image; its example passes a condition of this shape
    assert "- image-to-image" in card and "condition = torch.rand(16, 1, 8, 8)" in card
    pipe = PFGMPipeline.from_pretrained(out)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (2, 1)  # C + C_cond in, C out
    assert pipe.unet.config.num_class_embeds == 10
    assert (pipe.config.conditioning_channels, pipe.config.conditioning_dropout_prob) == (1, 0.5)
    pipe.set_progress_bar_config(disable=True)
    condition = torch.rand(3, 1, 8, 8)
    images = pipe(
        conditioning_image=condition,
        class_labels=[1, 2, 3],
        guidance_scale=2.0,
        num_inference_steps=2,
        output_type="pt",
    ).images
    assert images.shape == (3, 1, 8, 8)
    assert (out / "samples.png").is_file()


def make_pairs(root, count=8):
    rng = np.random.default_rng(0)
    for index in range(count):
        image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        os.makedirs(root / "images", exist_ok=True)
        os.makedirs(root / "edges", exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{index}.png")
        Image.fromarray(image.mean(2).astype(np.uint8)).save(root / "edges" / f"{index}.jpg")


def test_paired_folders_train_the_field_objective(tmp_path, unet_config):
    make_pairs(tmp_path)
    out = tmp_path / "out"
    args = tiny_args(
        tmp_path / "images",
        unet_config,
        out,
        conditioning_data_dir=tmp_path / "edges",
        objective="poisson_field",
        large_batch_size=8,
        random_flip=True,
        max_train_steps=2,
    )
    run_training(tmp_path, args)
    pipe = PFGMPipeline.from_pretrained(out)
    # RGB images, a grayscale condition: 3 + 1 channels in, C + 1 = 4 out (the field)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels, pipe.config.conditioning_channels) == (
        4,
        4,
        1,
    )


def test_a_conditioning_image_column(tmp_path, unet_config):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(8)]
    data = {"image": images, "hint": [image.convert("L") for image in images]}
    features = datasets.Features({"image": datasets.Image(), "hint": datasets.Image()})
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "pairs"))
    out = tmp_path / "out"
    args = tiny_args(
        None,
        unet_config,
        out,
        train_data_dir=None,
        dataset_name=tmp_path / "pairs",
        image_column="image",
        conditioning_image_column="hint",
        max_train_steps=2,
    )
    run_training(tmp_path, args)
    pipe = PFGMPipeline.from_pretrained(out)
    assert (pipe.unet.config.in_channels, pipe.config.conditioning_channels) == (4, 1)
    # The targets default to the first image column: a condition column that is that one would teach a copy
    args = tiny_args(None, unet_config, tmp_path / "copy", train_data_dir=None, dataset_name=tmp_path / "pairs")
    with in_process(tmp_path) as train_pfgm, pytest.raises(ValueError, match="'image' is also the targets' column"):
        train_pfgm.main([str(a) for a in args + ["--conditioning_image_column", "image"]], loss=fail_if_called)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(paired_task="denoise"), "the denoise task needs a noise level sigma_y > 0"),
        (dict(paired_task="superres", paired_factor=1), "`factor` must be an integer >= 2, got 1"),
        (dict(paired_sigma_y=0.1), "--paired_sigma_y is an option of --paired_task"),
        (dict(conditioning_dropout_prob=0.1), "--conditioning_dropout_prob needs paired data"),
        (dict(paired_task="superres", conditioning_dropout_prob=1.5), "must lie in [0, 1], got 1.5"),
        (dict(conditioning_image_column="hint"), "--conditioning_image_column names a column of --dataset_name"),
        (dict(train_data_dir=None, conditioning_data_dir="x"), "--conditioning_data_dir pairs with --train_data_dir"),
        (dict(paired_task="superres", conditioning_data_dir="x"), "at most one source of conditions"),
        (dict(conditioning_data_dir="./folder/"), "--conditioning_data_dir './folder/' is --train_data_dir"),
        (
            dict(paired_task="superres", pretrained_vae_model_name_or_path="vae"),
            "--paired_task (image-to-image) with --pretrained_vae_model_name_or_path is not supported",
        ),
        (dict(digits_split="train"), "--digits_split train selects the embedded digits: drop it with your own"),
    ],
)
def test_bad_paired_flags_fail_before_loading_anything(tmp_path, unet_config, overrides, message):
    args = [str(a) for a in tiny_args("folder", unet_config, tmp_path / "out", **overrides)]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.load_images = fail_if_called
        with pytest.raises(ValueError) as error:
            train_pfgm.main(args, loss=fail_if_called)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_unmatched_paired_folders_are_refused_naming_the_files(tmp_path, unet_config):
    make_pairs(tmp_path)
    os.remove(tmp_path / "edges" / "3.jpg")
    args = tiny_args(tmp_path / "images", unet_config, tmp_path / "out", conditioning_data_dir=tmp_path / "edges")
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(ValueError, match=r"1 image\(s\) without a condition \['3'\]"):
            train_pfgm.main([str(a) for a in args], loss=fail_if_called)


def test_a_resume_on_other_data_of_the_same_channels_is_refused_and_an_older_checkpoint_still_resumes(
    tmp_path, unet_config
):
    out = tmp_path / "out"
    run = dict(paired_task="denoise", paired_sigma_y=0.3, digits_split="train", max_train_steps=1)
    run.update(checkpointing_steps=1, save_images_steps=100)

    def train(**overrides):
        args = digits_args(unet_config, out, **{**run, **overrides})
        with in_process(tmp_path) as train_pfgm:
            train_pfgm.main([str(a) for a in args])

    train()
    # Each of these trains a network of the same channels on other data: nothing in the model config tells them apart
    others = [
        (dict(paired_task="superres", paired_sigma_y=None), "data setting paired_task: {'task': 'denoise', 'sigma_y'"),
        (dict(paired_sigma_y=0.5), "'sigma_y': 0.3, 'factor': 2} there, {'task': 'denoise', 'sigma_y': 0.5"),
        (dict(digits_split="all"), "data setting digits_split: 'train' there, 'all' here"),
    ]
    for overrides, message in others:
        with pytest.raises(ValueError) as error:
            train(resume_from_checkpoint="latest", max_train_steps=2, **overrides)
        assert f"checkpoint '{out}/checkpoint-1' does not match this run: data setting " in str(error.value)
        assert message in str(error.value)
        assert not (out / "checkpoint-2").exists()
    train(resume_from_checkpoint="latest", max_train_steps=2)  # the same data resumes
    assert (out / "checkpoint-2").is_dir()

    # A checkpoint written before the data settings were recorded has none: it resumes as it did then
    path = out / "checkpoint-2" / "pfgm_training_state.json"
    state = json.loads(path.read_text())
    assert state["data_config"] == {
        "digits_split": "train",
        "conditioning": "paired_task",
        "conditioning_image_column": None,
        "paired_task": {"task": "denoise", "sigma_y": 0.3, "factor": 2},
    }
    del state["data_config"]
    state["state_sha256"] = importlib.import_module("pfgm_diffusers.training.checkpoints").state_sha256(state)
    path.write_text(json.dumps(state))
    train(resume_from_checkpoint="latest", max_train_steps=3, digits_split="all")
    assert (out / "checkpoint-3").is_dir()
