"""The one denoiser composition (`denoiser.py`), the shared validation helpers, and the seams other code uses."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMFieldScheduler, PFGMPipeline, PFGMScheduler, make_denoiser, preconditioning
from pfgm_diffusers.field import field_dx_dz
from pfgm_diffusers.guidance import guided_denoiser
from pfgm_diffusers.validation import check_integer


def by_hand(unet, scheduler, x, sigma, labels=None):
    """EDM eq. 7 written out: D = c_skip x + c_out F(c_in x, c_noise), or x - z dx/dz for the field model."""
    B = x.shape[0]
    if isinstance(scheduler, PFGMFieldScheduler):
        out = unet(x, torch.full((B,), sigma), class_labels=labels).sample
        config = scheduler.config
        return x - sigma * field_dx_dz(out, sigma, config.gamma, config.z_exp, config.vz_eps)
    s = torch.tensor(sigma)
    c_in, c_noise = preconditioning.c_in(s, 0.5), preconditioning.c_noise(s)
    out = unet(x * c_in, c_noise.expand(B), class_labels=labels).sample
    return preconditioning.c_skip(s, 0.5) * x + preconditioning.c_out(s, 0.5) * out


@pytest.mark.parametrize("kind", ["pfgmpp", "field", "classes"])
def test_make_denoiser_is_the_preconditioned_network(kind):
    scheduler = PFGMFieldScheduler() if kind == "field" else PFGMScheduler(aug_dim=128)
    unet = tiny_unet(out_channels=4 if kind == "field" else 3, num_class_embeds=3 if kind == "classes" else None)
    labels = torch.tensor([2, 0]) if kind == "classes" else None
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = make_denoiser(unet, scheduler, class_labels=labels)(x, 1.7)
        torch.testing.assert_close(denoised, by_hand(unet, scheduler, x, 1.7, labels), rtol=1e-5, atol=1e-6)
        pipe = PFGMPipeline(unet, scheduler)
        assert torch.equal(pipe.denoise(x, 1.7, labels), denoised)  # the pipeline calls the same composition
        if kind == "classes":  # a bound label matters, and a per-call one is passed through
            assert (make_denoiser(unet, scheduler, class_labels=labels.flip(0))(x, 1.7) - denoised).abs().max() > 0
            assert torch.equal(make_denoiser(unet, scheduler)(x, 1.7, class_labels=labels), denoised)


@torch.no_grad()
def test_guidance_wraps_the_denoiser_in_one_batched_call():
    unet, scheduler = tiny_unet(num_class_embeds=4), PFGMScheduler(aug_dim=128)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    x, labels, null = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 3])
    denoise = make_denoiser(unet, scheduler)
    guided = guided_denoiser(denoise, {"class_labels": labels}, {"class_labels": null}, 2.0)(x, 0.9)
    assert calls == [4]  # both branches, one call
    d_cond, d_null = denoise(x, 0.9, class_labels=labels), denoise(x, 0.9, class_labels=null)
    torch.testing.assert_close(guided, d_null + 2.0 * (d_cond - d_null), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), 3])
def test_integers_are_integers_everywhere(value):
    """One rule: the pipeline used to refuse an np.int64 step count the scheduler accepted."""
    assert check_integer("n", value) == 3 and type(check_integer("n", value)) is int
    scheduler = PFGMScheduler(aug_dim=8, solver="euler")
    scheduler.set_timesteps(value)
    pipe = PFGMPipeline(tiny_unet(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=np.int64(2), num_inference_steps=value, output_type="pt")
    assert out.images.shape[0] == 2 and out.nfe == 3


@pytest.mark.parametrize("value", [0, -1, 2.0, 2.5, True, np.bool_(True), "3", None])
def test_what_is_not_an_integer_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an integer >= 1, got"):
        PFGMScheduler().set_timesteps(value)
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an integer >= 1, got"):
        PFGMPipeline(tiny_unet(), PFGMScheduler())(num_inference_steps=value)
