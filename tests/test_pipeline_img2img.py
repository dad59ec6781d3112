"""Image-to-image: `image=` with `strength=` for every model, `conditioning_image=` for models trained on pairs,
guidance on the condition, and the bad input of each."""

import pytest
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
from diffusers.utils.torch_utils import randn_tensor
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler
from pfgm_diffusers.guidance import combine_guidance


def make_pipe(unet=None, scheduler=None, **config):
    pipe = PFGMPipeline(unet=unet or tiny_unet(), scheduler=scheduler or PFGMScheduler(aug_dim=128), **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditional_pipe(dropout=None, scheduler=None, out_channels=3):
    """A 3-channel model with a 1-channel condition: the UNet takes 4 channels."""
    unet = tiny_unet(in_channels=4, out_channels=out_channels)
    return make_pipe(unet, scheduler, conditioning_channels=1, conditioning_dropout_prob=dropout)


def record_inputs(unet):
    """The UNet's input of every call (the sample and the condition, concatenated)."""
    inputs = []
    unet.register_forward_hook(lambda module, args, output: inputs.append(args[0].clone()))
    return inputs


def images(batch=2, channels=3, seed=0):
    return torch.rand(batch, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- image= and strength=


@pytest.mark.parametrize("solver, calls", [("heun", lambda k: 2 * k - 1), ("euler", lambda k: k)])
@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25, 0.1])
def test_strength_runs_the_last_steps_of_the_grid_from_the_noised_image(solver, calls, strength):
    pipe = make_pipe(scheduler=PFGMScheduler(aug_dim=128, solver=solver))
    inputs = record_inputs(pipe.unet)
    x, latents = images(), randn_tensor((2, 3, 8, 8), generator=seeded(1))
    out = pipe(image=x, strength=strength, latents=latents, num_inference_steps=18, output_type="pt")
    steps = int(18 * strength)  # diffusers' img2img: the last int(n * strength) steps of the grid of n
    assert out.nfe == len(inputs) == calls(steps)
    # The first call sees the image noised by the exact kernel at the grid's level where those steps begin
    scheduler = PFGMScheduler(aug_dim=128)
    scheduler.set_timesteps(18)
    grid = torch.unique_consecutive(scheduler.sigmas)
    sigma = grid[18 - steps].item()
    start = scheduler.add_noise(x * 2 - 1, latents, sigmas=sigma)
    assert torch.allclose(inputs[0], scheduler.precondition_inputs(start, sigma), atol=1e-5)
    assert out.images.shape == (2, 3, 8, 8)


def test_strength_one_is_the_full_run_and_a_small_strength_stays_near_the_image():
    pipe = make_pipe()
    x, latents = images(), randn_tensor((2, 3, 8, 8), generator=seeded(1))
    full = pipe(latents=latents, output_type="pt")
    from_image = pipe(image=x, strength=1.0, latents=latents, output_type="pt")
    assert from_image.nfe == full.nfe == 35
    # at sigma_max = 80 the image moves the start by at most 1 / 80 of the prior's scale
    assert not torch.equal(from_image.images, full.images)
    slight = pipe(image=x, strength=0.1, latents=latents, output_type="pt")
    assert slight.nfe == 1  # one Euler step from the last positive level, sigma = 0.002
    assert (slight.images - x).abs().max() < 0.05


@pytest.mark.parametrize(
    "scheduler, out_channels, calls",
    [
        (EDMEulerScheduler(), 3, 5),
        (
            PFGMScheduler(
                prediction_type="poisson_field",
                aug_dim=1,
                sigma_min=1e-3,
                sigma_max=40.0,
                z_exp=5.0,
                upper_norm=3000.0,
                sigma_schedule="exponential",
            ),
            4,
            9,  # Heun: the last 5 steps of the field grid, 2 calls each but the last
        ),
    ],
)
def test_every_model_takes_an_image(scheduler, out_channels, calls):
    pipe = make_pipe(tiny_unet(out_channels=out_channels), scheduler)
    inputs = record_inputs(pipe.unet)
    x, latents = images(), randn_tensor((2, 3, 8, 8), generator=seeded(1))
    out = pipe(image=x, strength=0.5, latents=latents, num_inference_steps=10, output_type="pt")
    assert out.nfe == len(inputs) == calls
    # diffusers' img2img recipe, written out with a fresh scheduler of the same config: the last int(10 * 0.5) steps
    # of the grid, from the image in [-1, 1] noised by the scheduler's own add_noise at the first of them
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(10)
    begin = (10 - 5) * fresh.order
    fresh.set_begin_index(begin)
    sample = fresh.add_noise(x * 2 - 1, latents, fresh.timesteps[begin:][:1].repeat(2))
    with torch.no_grad():
        for t in fresh.timesteps[begin:]:
            sample = fresh.step(pipe.unet(fresh.scale_model_input(sample, t), t).sample, t, sample).prev_sample
    torch.testing.assert_close(out.images, (sample / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    other = pipe(image=images(seed=5), strength=0.5, latents=latents, num_inference_steps=10, output_type="pt")
    assert (other.images - out.images).abs().max() > 1e-3  # the image decides the result


@pytest.mark.parametrize("strength", [0, -0.5, 1.5, True, "0.5", float("nan")])
def test_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        make_pipe()(image=images(), strength=strength)


@pytest.mark.parametrize("strength, steps", [(0.05, 18), (0.4, 2), (1e-9, 1000)])
def test_a_strength_that_runs_no_step_is_refused_before_any_network_call(strength, steps):
    pipe = make_pipe()
    inputs = record_inputs(pipe.unet)
    with pytest.raises(ValueError, match=rf"strength={strength} runs int\({steps} \* {strength}\) = 0 of the {steps}"):
        pipe(image=images(), strength=strength, num_inference_steps=steps)
    assert inputs == []
    assert pipe(image=images(), strength=1 / steps + 1e-6, num_inference_steps=steps, output_type="pt").nfe == 1


def test_img2img_bad_input():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="without `image`"):
        pipe(strength=0.5)
    with pytest.raises(ValueError, match="RK45 has none"):
        pipe(image=images(), solver="rk45")
    with pytest.raises(ValueError, match=r"batch_size=3 does not match image of batch 2"):
        pipe(image=images(), batch_size=3)
    with pytest.raises(ValueError, match=r"latents \(1\), image \(2\)"):
        pipe(image=images(), latents=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"image must have shape \(2, 3, 8, 8\)"):
        pipe(image=torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"^image must have shape \(B, 3, H, W\)"):
        pipe(image=torch.rand(2, 1, 8, 8))


# ---------------------------------------------------------------------- conditioning_image=


def test_the_condition_is_concatenated_unnoised_at_every_call():
    pipe = conditional_pipe()
    inputs = record_inputs(pipe.unet)
    condition = images(channels=1, seed=3)
    out = pipe(conditioning_image=condition, num_inference_steps=4, generator=seeded(0), output_type="pt")
    assert out.images.shape == (2, 3, 8, 8) and len(inputs) == out.nfe == 7
    for model_input in inputs:
        assert model_input.shape == (2, 4, 8, 8)
        assert torch.equal(model_input[:, 3:], condition * 2 - 1)
    other = pipe(conditioning_image=1 - condition, num_inference_steps=4, generator=seeded(0), output_type="pt")
    assert not torch.allclose(out.images, other.images, atol=1e-4)
    # the batch comes from the condition; model-space conditions with do_normalize=False
    again = pipe(
        conditioning_image=condition * 2 - 1,
        do_normalize=False,
        num_inference_steps=4,
        generator=seeded(0),
        output_type="pt",
    )
    assert torch.equal(again.images, out.images)


def test_image_and_condition_together_and_with_rk45():
    pipe = conditional_pipe()
    condition = images(channels=1, seed=3)
    out = pipe(image=images(), strength=0.3, conditioning_image=condition, generator=seeded(0), output_type="pt")
    assert out.nfe == 2 * 5 - 1
    rk45 = pipe(conditioning_image=condition, solver="rk45", generator=seeded(0), rtol=1e-2, atol=1e-2)
    assert rk45.nfe > 2


def test_guidance_one_is_the_conditional_model_and_zero_the_zero_condition_exactly():
    pipe = conditional_pipe(dropout=0.1)
    condition = images(channels=1, seed=3)
    kwargs = dict(num_inference_steps=4, output_type="pt")
    conditional = pipe(conditioning_image=condition, generator=seeded(0), **kwargs).images
    assert torch.equal(
        pipe(conditioning_image=condition, guidance_scale=1.0, generator=seeded(0), **kwargs).images, conditional
    )
    unconditional = pipe(
        conditioning_image=torch.zeros_like(condition), do_normalize=False, generator=seeded(0), **kwargs
    ).images
    assert torch.equal(
        pipe(conditioning_image=condition, guidance_scale=0.0, generator=seeded(0), **kwargs).images, unconditional
    )
    inputs = record_inputs(pipe.unet)
    guided = pipe(conditioning_image=condition, guidance_scale=3.0, generator=seeded(0), **kwargs)
    assert guided.nfe == len(inputs) == 7 and all(model_input.shape[0] == 4 for model_input in inputs)
    assert torch.equal(inputs[0][2:, 3:], torch.zeros(2, 1, 8, 8))  # the null half: a zero condition
    assert not torch.allclose(guided.images, conditional, atol=1e-4)


def test_guided_denoise_is_the_combination_of_the_two_denoisers():
    pipe = conditional_pipe(dropout=0.1)
    x, condition = torch.randn(2, 3, 8, 8), images(channels=1, seed=3) * 2 - 1
    d_cond = pipe.denoise(x, 2.0, conditioning_image=condition)
    d_null = pipe.denoise(x, 2.0, conditioning_image=torch.zeros_like(condition))
    guided = pipe.denoise(x, 2.0, conditioning_image=condition, guidance_scale=2.5)
    assert torch.allclose(guided, combine_guidance(d_null, d_cond, 2.5), atol=1e-5)


def test_guidance_needs_a_condition_the_model_learnt_to_do_without():
    condition = images(channels=1)
    with pytest.raises(ValueError, match="trained without conditioning dropout"):
        conditional_pipe()(conditioning_image=condition, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs a conditional model"):
        make_pipe()(guidance_scale=2.0)
    # the field model guides its predicted field, as for class guidance
    field = PFGMScheduler(prediction_type="poisson_field", aug_dim=1, sigma_max=40.0, sigma_schedule="exponential")
    out = conditional_pipe(dropout=0.1, scheduler=field, out_channels=4)(
        conditioning_image=condition, guidance_scale=2.0, num_inference_steps=3, output_type="pt"
    )
    assert torch.isfinite(out.images).all()


def test_guidance_drops_only_the_conditions_trained_with_dropout():
    """A class- and image-conditional model trained with conditioning dropout but no null class: the null branch
    keeps the labels and zeroes the image."""
    unet = tiny_unet(in_channels=4, out_channels=3, num_class_embeds=3)
    pipe = make_pipe(unet, conditioning_channels=1, conditioning_dropout_prob=0.1)
    inputs = []
    unet.register_forward_hook(lambda module, args, kwargs, output: inputs.append(kwargs), with_kwargs=True)
    pipe(conditioning_image=images(channels=1), class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=2)
    assert inputs[0]["class_labels"].tolist() == [0, 2, 0, 2]


def test_condition_bad_input():
    pipe = conditional_pipe()
    with pytest.raises(ValueError, match=r"image-conditional \(conditioning_channels=1\): pass `conditioning_image`"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="takes no condition"):
        make_pipe()(conditioning_image=images(channels=1))
    with pytest.raises(ValueError, match=r"^conditioning_image must have shape \(B, 1, H, W\)"):
        pipe(conditioning_image=images(channels=3))
    # each error names the argument it is about, where both are images
    both = dict(image=images(), conditioning_image=images(channels=1), strength=0.5)
    for name, values, message in [
        ("conditioning_image", torch.full((2, 1, 8, 8), float("nan")), "contains NaN or infinite values"),
        ("image", torch.full((2, 3, 8, 8), float("nan")), "contains NaN or infinite values"),
        ("conditioning_image", images(channels=1) * 255, r"must lie in \[0, 1\]"),
        ("image", images() * 255, r"must lie in \[0, 1\]"),
        ("conditioning_image", [], "is empty"),
    ]:
        with pytest.raises(ValueError, match=f"^{name} {message}"):
            pipe(**{**both, name: values})
    with pytest.raises(ValueError, match="8x8 pixels"):
        pipe(conditioning_image=torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"image \(3\), conditioning_image \(2\)"):
        pipe(image=images(batch=3), conditioning_image=images(channels=1))
    with pytest.raises(ValueError, match="does not match conditioning_image of batch 2"):
        pipe(batch_size=3, conditioning_image=images(channels=1))
    with pytest.raises(ValueError, match="pass `conditioning_image`"):
        pipe.invert(images())
    with pytest.raises(ValueError, match="pass `conditioning_image`"):
        pipe.log_likelihood(images())
    for channels in (0, 4, 1.0, True):
        with pytest.raises(ValueError, match="conditioning_channels must be"):
            PFGMPipeline(tiny_unet(in_channels=4), PFGMScheduler(), conditioning_channels=channels)
    with pytest.raises(ValueError, match="has no condition"):
        PFGMPipeline(tiny_unet(), PFGMScheduler(), conditioning_dropout_prob=0.1)


def test_invert_and_likelihood_take_the_condition():
    pipe = conditional_pipe()
    condition, x = images(channels=1, seed=3), images(seed=4)
    latents = pipe.invert(x, conditioning_image=condition, num_inference_steps=8)
    assert not torch.allclose(latents, pipe.invert(x, conditioning_image=1 - condition, num_inference_steps=8))
    back = pipe(latents=latents, conditioning_image=condition, num_inference_steps=8, output_type="pt").images
    wrong = pipe(latents=latents, conditioning_image=1 - condition, num_inference_steps=8, output_type="pt").images
    assert (back - x).abs().mean() < 0.5 * (wrong - x).abs().mean()  # the flow is inverted for its condition
    kwargs = dict(generator=seeded(0), rtol=1e-3, atol=1e-3)
    bpd = pipe.log_likelihood(x, conditioning_image=condition, **kwargs).bits_per_dim
    other = pipe.log_likelihood(x, conditioning_image=1 - condition, **kwargs).bits_per_dim
    assert bpd.shape == (2,) and torch.isfinite(bpd).all() and not torch.allclose(bpd, other)


def test_a_conditional_pipeline_saves_and_loads(tmp_path):
    pipe = conditional_pipe(dropout=0.2)
    pipe.save_pretrained(tmp_path)
    condition = images(channels=1)
    expected = pipe(conditioning_image=condition, num_inference_steps=3, generator=seeded(0), output_type="pt")
    for loader in (PFGMPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert (loaded.config.conditioning_channels, loaded.config.conditioning_dropout_prob) == (1, 0.2)
        again = loaded(conditioning_image=condition, num_inference_steps=3, generator=seeded(0), output_type="pt")
        assert torch.equal(again.images, expected.images)
        with pytest.raises(ValueError, match="pass `conditioning_image`"):
            loaded(num_inference_steps=2)
