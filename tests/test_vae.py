"""pfgm_diffusers.vae: loading an AutoencoderKL, the latent shape, the scaling conventions, precision, decoding."""

import json
import os

import pytest
import torch
from tiny_models import tiny_unet
from tiny_vae import tiny_vae

from pfgm_diffusers.vae import (
    LatentScaling,
    decode_latents,
    encode_moments,
    latent_shape,
    load_vae,
    load_vae_config,
    vae_dtype,
    vae_scale_factor,
)


def test_load_vae_from_a_folder_and_a_pipeline_subfolder(tmp_path):
    vae = tiny_vae(latent_channels=2)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    assert loaded.config.latent_channels == 2 and loaded.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert load_vae(str(tmp_path), subfolder="vae").config.latent_channels == 2


def test_a_folder_without_a_vae_is_refused_with_the_subfolder_hint(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="no config.json.*--vae_subfolder vae"):
        load_vae(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no AutoencoderKL"):
        load_vae_config(str(empty))


def test_a_model_that_is_not_an_autoencoder_kl_is_refused(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="is a UNet2DModel, not an AutoencoderKL"):
        load_vae(str(tmp_path / "unet"))
    (tmp_path / "pipe").mkdir()
    with open(tmp_path / "pipe" / "config.json", "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    with pytest.raises(ValueError, match="not an AutoencoderKL.*--vae_subfolder"):
        load_vae(str(tmp_path / "pipe"))


def test_an_unreachable_hub_id_is_a_value_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ValueError, match="cannot read an AutoencoderKL config from 'nobody/no-such-vae'"):
        load_vae("nobody/no-such-vae")


def test_latent_shape_follows_the_vae():
    vae = tiny_vae(latent_channels=3, levels=3)
    assert vae_scale_factor(vae.config) == 4
    assert latent_shape(vae.config, 16) == (3, 4, 4)
    latents = vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
    assert tuple(latents.shape[1:]) == latent_shape(vae.config, 16)  # the factor is the encoder's real one
    with pytest.raises(ValueError, match="resolution 18 is not a positive multiple of 4.*use e.g. 16 or 20"):
        latent_shape(vae.config, 18)


def test_scaling_matches_the_diffusers_pipelines():
    z = torch.randn(2, 4, 3, 3)
    sd = LatentScaling.from_config({"scaling_factor": 0.18215, "latent_channels": 4})
    torch.testing.assert_close(sd.to_model(z), z * 0.18215)  # StableDiffusionPipeline: latents * scaling_factor
    # SD3 / Flux: encode (z - shift) * scaling, decode latents / scaling + shift (pipeline_stable_diffusion_3.py)
    sd3 = LatentScaling.from_config({"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 4})
    torch.testing.assert_close(sd3.to_model(z), (z - 0.0609) * 1.5305)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sd3.to_vae(x), x / 1.5305 + 0.0609)
    # SDXL with latents_mean/std: decode latents * std / scaling + mean (pipeline_stable_diffusion_xl.py)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 4.0]
    xl = LatentScaling.from_config(
        {"scaling_factor": 0.13025, "latents_mean": mean, "latents_std": std, "latent_channels": 4}
    )
    view = dict(dtype=x.dtype)
    expected = x * torch.tensor(std, **view).view(1, 4, 1, 1) / 0.13025 + torch.tensor(mean, **view).view(1, 4, 1, 1)
    torch.testing.assert_close(xl.to_vae(x), expected)
    for scaling in (sd, sd3, xl):
        torch.testing.assert_close(scaling.to_vae(scaling.to_model(z)), z)
    torch.testing.assert_close(xl.scale_std(torch.ones(1, 4, 1, 1)).flatten(), 0.13025 / torch.tensor(std))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"scaling_factor": 0.0, "latent_channels": 4}, "scaling_factor must be a finite number > 0"),
        ({"scaling_factor": 1.0, "latents_mean": [0.0] * 4, "latent_channels": 4}, "only one of latents_mean"),
        ({"scaling_factor": 1.0, "latents_mean": [0.0], "latents_std": [1.0], "latent_channels": 4}, "need 4 values"),
    ],
)
def test_bad_scaling_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        LatentScaling.from_config(config)


def test_the_vae_stays_float32_under_fp16_unless_its_config_allows_it():
    assert vae_dtype({"force_upcast": True}, "fp16") == torch.float32
    assert vae_dtype({}, "fp16") == torch.float32  # diffusers' default is force_upcast=True
    assert vae_dtype({"force_upcast": False}, "fp16") == torch.float16
    assert vae_dtype({"force_upcast": True}, "bf16") == torch.bfloat16
    assert vae_dtype({"force_upcast": True}, "no") == torch.float32
    with pytest.raises(ValueError, match="mixed_precision must be"):
        vae_dtype({}, "fp8")


def test_decoding_in_batches_equals_decoding_at_once():
    vae = tiny_vae()
    scaling = LatentScaling.from_config(vae.config)
    pixels = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encode_moments(vae, pixels)
    # the VAE's own posterior: the mean and the standard deviation (not the variance or log-variance) of its encoding
    moments = vae.quant_conv(vae.encoder(pixels))  # (B, 2C, h, w): mean, then log-variance clamped to [-30, 20]
    expected_mean, logvar = moments.chunk(2, dim=1)
    assert mean.shape == std.shape == (5, 4, 4, 4) and mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(std, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))
    assert (std.pow(2) - std).abs().max() > 1e-3  # the standard deviation and the variance differ here
    latents = scaling.to_model(mean)
    at_once = decode_latents(vae, latents, scaling)
    torch.testing.assert_close(decode_latents(vae, latents, scaling, decode_batch_size=2), at_once)
    torch.testing.assert_close(at_once, vae.decode(mean).sample)  # to_vae undoes the scaling before decoding
    with pytest.raises(ValueError, match="decode_batch_size"):
        decode_latents(vae, latents, scaling, decode_batch_size=0)
