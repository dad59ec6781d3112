"""The trainer in a VAE's latent space, launched for real (1 and 2 CPU processes over gloo) with a tiny AutoencoderKL
saved by the test."""

import json
import os
import re
import subprocess

import pytest
from test_train import TINY_UNET, in_process, launch_command, launch_env, make_image_folder, run_training, tiny_args
from tiny_models import tiny_unet
from tiny_vae import tiny_vae

from pfgm_diffusers import PFGMPipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    tiny_vae(scaling_factor=0.5).save_pretrained(root / "model" / "vae")  # factor 2, 4 latent channels
    tiny_vae(latent_channels=2).save_pretrained(root / "vae2")
    tiny_unet().save_pretrained(root / "not_a_vae")
    (root / "unet.json").write_text(json.dumps(TINY_UNET))
    return dict(
        images=make_image_folder(root / "images"),
        vae=root / "model",
        vae2=root / "vae2",
        not_a_vae=root / "not_a_vae",
        unet=root / "unet.json",
    )


def latent_args(folders, output_dir, **overrides):
    flags = dict(pretrained_vae_model_name_or_path=folders["vae"], vae_subfolder="vae", center_crop=True)
    return tiny_args(folders["images"], folders["unet"], output_dir, **{**flags, **overrides})


def failed_run(tmp_path, args):
    result = subprocess.run(
        launch_command(os.path.join(os.path.dirname(__file__), "..", "training", "train_pfgm.py"), 1)
        + [str(arg) for arg in args],
        env=launch_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    # No training step: the training bar (in it/s; the encoding bar counts img) never moved
    assert not re.search(r"\b[1-9]\d*/\d+ \[[^\]]*(it/s|s/it)\]", result.stdout), result.stdout[-3000:]
    return result.stdout


def test_two_processes_encode_once_train_on_latents_and_save_a_latent_pipeline(tmp_path, folders):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = latent_args(folders, out, latent_cache_dir=cache, random_flip=True, class_conditional=True)
    log = run_training(tmp_path, args + ["--checkpointing_steps", "2"], num_processes=2)
    assert "latents 4x4x4" in log and "(N = 64)" in log
    assert "--aug_dim 64: power of two nearest to N / 24 for N = 64" in log
    assert "--sigma_data " in log and "root mean square of the 64 cached latents" in log  # 32 images, both flips
    assert "--sigma_max " in log and "largest distance between two cached latents" in log
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"]["random_flip"]
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["aug_dim"] == 64 and saved["sigma_data"] == pytest.approx(manifest["statistics"]["rms"], abs=1e-4)
    pipe = PFGMPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.vae.config.scaling_factor == 0.5
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels, pipe.unet.config.sample_size) == (4, 4, 4)
    assert pipe.scheduler.config.aug_dim == 64
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, class_labels="circles", output_type="pt").images
    assert images.shape == (2, 3, 8, 8)

    # A resume reuses the cache: no shard is written again
    shards = {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache) if name.startswith("shard")}
    log = run_training(tmp_path, args + ["--resume_from_checkpoint", "latest", "--max_train_steps", "6"], 2)
    assert "Resumed from" in log and "encoding latents" not in log
    assert {name: os.stat(cache / name).st_mtime_ns for name in shards} == shards


def test_the_field_objective_trains_on_latents_sized_from_the_data(tmp_path, folders):
    out = tmp_path / "out"
    sizes = dict(resolution=None, model_config_name_or_path=None)  # from the 12x10 images and the VAE's factor 2
    log = run_training(tmp_path, latent_args(folders, out, objective="poisson_field", large_batch_size=8, **sizes))
    assert "From the data (its first image is 12x10; latents 1/2 of it, the VAE's downsampling factor): " in log
    assert "--resolution 8, --model_config_name_or_path " in log and "unet_digits_8px.json (<= 8 px of latents)" in log
    assert "latents 4x4x4" in log
    pipe = PFGMPipeline.from_pretrained(out)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (4, 5)  # C + 1 for the field
    assert pipe.scheduler.config.prediction_type == "poisson_field"
    assert (out / "latent_cache" / "manifest.json").exists()  # the default cache folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(resolution=9), "resolution 9 is not a positive multiple of 2, the VAE's downsampling factor"),
        (dict(vae_subfolder=None), "holds no AutoencoderKL.*--vae_subfolder vae"),
        (dict(center_crop=None), r"image 0 is 12x10: its random crop to 8x8 changes every epoch.*--center_crop"),
        (dict(preset="cifar10", model_config_name_or_path=None), "--preset cifar10 sizes its UNet for pixels"),
        (dict(pretrained_vae_model_name_or_path=None), "--vae_subfolder is an option of latent training"),
        (dict(pretrained_vae_model_name_or_path="not_a_vae", vae_subfolder=None), "UNet2DModel, not an AutoencoderKL"),
    ],
)
def test_bad_latent_input_fails_before_training(tmp_path, folders, overrides, message):
    named = {name: folders[value] for name, value in overrides.items() if isinstance(value, str) and value in folders}
    overrides = {**overrides, **named}  # a fixture folder by its name
    log = failed_run(tmp_path, latent_args(folders, tmp_path / "out", **overrides))
    assert re.search(message, log), log[-3000:]


def test_a_cache_or_checkpoint_from_another_vae_is_refused(tmp_path, folders):
    out, cache = tmp_path / "out", tmp_path / "cache"
    # No preset: the noise settings given win over the measured ones, which the log still names
    flags = dict(latent_cache_dir=cache, max_train_steps=2, checkpointing_steps=1, sigma_data=0.7, aug_dim=128)
    log = run_training(tmp_path, latent_args(folders, out, **flags))
    assert "--sigma_data 0.7 as given (the latents suggest " in log and "--aug_dim 128 as given (the latents" in log
    assert "--sigma_max " in log and ": largest distance between two cached latents" in log  # measured
    assert "The UNet's channels 4 (in; out +1 for the field objective) and sample_size 4: the VAE's" in log
    manifest = json.loads((cache / "manifest.json").read_text())
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["sigma_data"] == 0.7 and saved["aug_dim"] == 128
    assert manifest["statistics"]["max_pairwise_distance"] <= saved["sigma_max"] != 80  # not the pixel default
    other = dict(pretrained_vae_model_name_or_path=folders["vae2"], vae_subfolder=None)
    log = failed_run(tmp_path, latent_args(folders, tmp_path / "out2", latent_cache_dir=cache, **other))
    assert "was made from other settings" in log and "vae_config.latent_channels: 4 -> 2" in log
    log = failed_run(tmp_path, latent_args(folders, tmp_path / "out3", latent_cache_dir=cache, resolution=16))
    assert "was made from other settings" in log and "resolution: 8 -> 16" in log
    log = failed_run(tmp_path, latent_args(folders, out, resume_from_checkpoint="latest", **other))
    assert "the VAE's latent_channels=2 disagree with the UNet of" in log and "in_channels=4" in log


def test_the_latent_preset_measures_its_noise_settings_unless_given(tmp_path, folders):
    with in_process(tmp_path) as train_pfgm:
        argv = ["--preset", "ffhq256-latent", "--train_data_dir", str(folders["images"]), "--output_dir", "run"]
        args = train_pfgm.parse_args(argv)
        assert args.pretrained_vae_model_name_or_path == "stabilityai/sd-vae-ft-mse" and args.resolution == 256
        assert args.latent_defaults == ["sigma_data", "aug_dim", "sigma_max"]
        assert args.latent_cache_dir == os.path.join("run", "latent_cache")
        args = train_pfgm.parse_args(argv + ["--sigma_max=50", "--aug_dim", "inf"])
        assert args.latent_defaults == ["sigma_data"] and args.sigma_max == 50 and args.aug_dim is None
        assert train_pfgm.parse_args(["--output_dir", "pixels"]).latent_cache_dir is None


@pytest.mark.parametrize(
    "size, given, resolution, config",
    [
        ((256, 256), {}, 256, "unet_32px.json"),  # 32 x 32 latents with an f = 8 VAE
        ((300, 200), {}, 192, "unet_32px.json"),  # 25 latents down to the UNet's factor 4: 24, times f
        ((1024, 1024), {}, 512, "unet_64px.json"),  # 128 latents capped at the table's largest UNet, 64
        ((20, 20), {}, 16, "unet_digits_8px.json"),  # 2 latents: the smallest UNet's factor
        ((256, 256), {"resolution": 128}, 128, "unet_digits.json"),  # a given resolution: its 16 latents pick
    ],
)
def test_a_latent_run_on_your_own_data_sizes_its_unet_for_the_latents(tmp_path, size, given, resolution, config):
    argv = ["--train_data_dir", "photos", "--pretrained_vae_model_name_or_path", "vae"]
    argv += [f"--{key}={value}" for key, value in given.items()]
    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(argv)  # no --resolution, no UNet: both from the data and the VAE's factor
        line = train_pfgm.fill_from_the_data(args, *size, vae_factor=8)
    assert (args.resolution, os.path.basename(args.model_config_name_or_path)) == (resolution, config)
    assert line.startswith(f"From the data (its first image is {size[0]}x{size[1]}; latents 1/8 of it, the VAE's")
    assert "px of latents)" in line and (f"--resolution {resolution}" in line) == ("resolution" not in given)
