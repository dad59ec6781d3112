"""PFGMPipeline with a vae: a latent model decodes its samples, encodes what it inverts, saves, loads and pushes its
VAE, and a pixel pipeline is unchanged."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub.utils import filter_repo_objects
from tiny_models import tiny_unet
from tiny_vae import tiny_vae

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, hub
from pfgm_diffusers.vae import encode_latents


def latent_pipe(**vae_config):
    """8 px RGB images, a factor-2 VAE with 4 latent channels: the UNet works on (4, 4, 4) latents."""
    vae = tiny_vae(**{"scaling_factor": 0.7, "shift_factor": 0.1, **vae_config})
    pipe = PFGMPipeline(unet=tiny_unet(in_channels=4, sample_size=4), scheduler=PFGMScheduler(aug_dim=16), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    return pipe(batch_size=3, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_a_decoded_latent_output_equals_the_pt_output():
    pipe = latent_pipe()
    latents, images = run(pipe, output_type="latent"), run(pipe, output_type="pt")
    assert latents.shape == (3, 4, 4, 4) and images.shape == (3, 3, 8, 8)
    decoded = pipe.vae.decode(latents / 0.7 + 0.1).sample  # the diffusers convention, shift included
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(run(pipe, output_type="pt", decode_batch_size=2), images)
    pipe.enable_vae_slicing()
    torch.testing.assert_close(run(pipe, output_type="pt"), images)
    assert run(pipe)[0].size == (8, 8)


def test_a_pixel_pipeline_is_unchanged(tmp_path):
    pipe = PFGMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(aug_dim=16))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is None
    with pytest.raises(ValueError, match=r"`output_type` must be one of \('pil', 'np', 'pt'\), got 'latent'"):
        run(pipe, output_type="latent")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]  # diffusers' "absent"
    assert PFGMPipeline.from_pretrained(tmp_path).vae is None
    (tmp_path / "model_index.json").write_text(  # a folder saved before the vae existed
        json.dumps({k: v for k, v in json.loads((tmp_path / "model_index.json").read_text()).items() if k != "vae"})
    )
    for loader in (PFGMPipeline, DiffusionPipeline):
        old = loader.from_pretrained(tmp_path)
        old.set_progress_bar_config(disable=True)
        assert old.vae is None and torch.equal(run(old, output_type="pt"), run(pipe, output_type="pt"))
    for method in (pipe.enable_vae_slicing, pipe.enable_vae_tiling):
        with pytest.raises(ValueError, match="needs a latent pipeline"):
            method()
    with pytest.raises(ValueError, match="decode_batch_size=2 needs a latent pipeline"):
        run(pipe, decode_batch_size=2)


def test_a_vae_that_does_not_fit_the_unet_is_refused():
    with pytest.raises(ValueError, match="latent_channels=2 but the UNet takes 4 input channels"):
        PFGMPipeline(tiny_unet(in_channels=4, sample_size=4), PFGMScheduler(), vae=tiny_vae(latent_channels=2))
    with pytest.raises(ValueError, match="vae must be a diffusers AutoencoderKL, got a UNet2DModel"):
        PFGMPipeline(tiny_unet(in_channels=4, sample_size=4), PFGMScheduler(), vae=tiny_unet())
    with pytest.raises(ValueError, match="decode_batch_size"):
        run(latent_pipe(), output_type="pt", decode_batch_size=0)


def test_invert_and_log_likelihood_work_on_the_encoded_images():
    pipe = latent_pipe()
    images = run(pipe, output_type="pt")
    encoded = encode_latents(pipe.vae, images * 2 - 1)
    on_latents = PFGMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)  # the same flow without the VAE
    on_latents.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        pipe.invert(images, num_inference_steps=3),
        on_latents.invert(encoded, num_inference_steps=3, do_normalize=False),
    )
    generator = torch.Generator().manual_seed(1)
    latent = pipe.log_likelihood(images[:1], generator=generator, rtol=1e-3, atol=1e-3)
    generator = torch.Generator().manual_seed(1)
    one = encode_latents(pipe.vae, images[:1] * 2 - 1)  # encoded alone: a batch of 3 rounds differently
    reference = on_latents.log_likelihood(one, generator=generator, do_normalize=False, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(latent.log_prob, reference.log_prob)
    # bits per latent dimension: no 8-bit offset
    torch.testing.assert_close(latent.bits_per_dim, -latent.log_prob / (64 * torch.log(torch.tensor(2.0)).double()))
    torch.testing.assert_close(latent.bits_per_dim, reference.bits_per_dim - 7)
    with pytest.raises(ValueError, match="dequantize=True dequantizes 8-bit pixels"):
        pipe.log_likelihood(images[:1], dequantize=True)


def test_img2img_on_a_latent_pipeline_starts_from_the_encoded_image():
    pipe = latent_pipe()
    images = run(pipe, output_type="pt")
    on_latents = PFGMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)  # the same flow without the VAE
    on_latents.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    common = dict(strength=0.5, num_inference_steps=6, latents=noise)
    out = pipe(image=images, output_type="latent", **common)
    encoded = encode_latents(pipe.vae, images * 2 - 1)
    expected = on_latents(image=encoded, do_normalize=False, output_type="pt", **common)  # a pixel pipeline's "pt"
    assert out.nfe == expected.nfe == 2 * 3 - 1  # Heun over the last 3 of 6 steps
    torch.testing.assert_close((out.images / 2 + 0.5).clamp(0, 1), expected.images)
    assert (pipe(image=1 - images, output_type="latent", **common).images - out.images).abs().max() > 1e-3


def test_save_and_load_keep_the_vae(tmp_path):
    pipe = latent_pipe()
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    for loader in (PFGMPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is PFGMPipeline and loaded.vae.config.shift_factor == 0.1
        torch.testing.assert_close(run(loaded, output_type="pt"), run(pipe, output_type="pt"))


def test_the_hub_files_include_the_vae():
    listing = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    listing += ["scheduler/scheduler_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    listing += ["vae/diffusion_pytorch_model.fp16.safetensors", "checkpoint-10/model.safetensors"]
    assert hub.pipeline_files(listing) == sorted(listing[:6])
    assert "vae/diffusion_pytorch_model.safetensors" not in hub.pipeline_files(listing[:4])  # no vae: not asked
    with pytest.raises(ValueError, match="no vae weights"):
        hub.pipeline_files(listing[:5])


def test_push_to_hub_uploads_the_vae_then_loads(tmp_path, monkeypatch):
    remote, uploads = tmp_path / "remote", []

    def fake_upload_folder(repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        source = Path(folder_path)
        files = [str(path.relative_to(source)) for path in source.rglob("*") if path.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            (remote / name).write_bytes((source / name).read_bytes())
            uploads.append(name)

    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda repo_id, **kwargs: huggingface_hub.RepoUrl(f"https://hf.co/{repo_id}")
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(remote))
    monkeypatch.setattr(
        huggingface_hub,
        "list_repo_files",
        lambda repo_id, **kwargs: [str(path.relative_to(remote)) for path in remote.rglob("*") if path.is_file()],
    )
    pipe = latent_pipe()
    pipe.push_to_hub("someone/latent-pfgmpp")
    assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= set(uploads)
    loaded = PFGMPipeline.from_pretrained("someone/latent-pfgmpp")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, output_type="pt"), run(pipe, output_type="pt"))


def test_the_image_shape_is_the_decoded_one_and_the_digits_metric_checks_it():
    from pfgm_diffusers.evaluation.digits import check_digits_pipeline

    pipe = latent_pipe()
    assert pipe.image_shape == (3, 8, 8) and run(pipe, output_type="pt").shape[1:] == pipe.image_shape
    with pytest.raises(ValueError, match="1-channel models, this one has 3 channels"):
        check_digits_pipeline(pipe)
    vae = tiny_vae(in_channels=1, levels=3)  # grayscale images, factor 4: (4, 4, 4) latents are 16 px digits
    gray = PFGMPipeline(unet=tiny_unet(in_channels=4, sample_size=4), scheduler=PFGMScheduler(), vae=vae)
    assert gray.image_shape == (1, 16, 16)
    check_digits_pipeline(gray)  # a 4-channel UNet, but 1-channel 16 px images: accepted
