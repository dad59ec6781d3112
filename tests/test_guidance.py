"""Classifier-free guidance: one formula, one batched call, exact at w = 0 and w = 1; conditioning dropout."""

import pytest
import torch

from pfgm_diffusers.guidance import combine_guidance, drop_conditions, guided_denoiser


class CountingDenoiser:
    """D(x, sigma; y, labels) = x / (1 + sigma) + y * labels-dependent gain: depends on every input, counts calls."""

    def __init__(self):
        self.calls, self.batch_sizes = 0, []

    def __call__(self, x, sigma, conditioning_image, class_labels):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        gain = (1.0 + class_labels.float()).reshape(-1, 1, 1, 1)
        sigma = sigma.reshape(-1, 1, 1, 1) if isinstance(sigma, torch.Tensor) else sigma
        return x / (1 + sigma) + 0.3 * gain * conditioning_image + 0.1 * torch.sin(x * gain)


def _inputs(batch=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 4, 4, generator=generator)
    conditions = {
        "conditioning_image": torch.randn(batch, 1, 4, 4, generator=generator),
        "class_labels": torch.tensor([1, 2, 3][:batch]),
    }
    nulls = {"conditioning_image": torch.zeros(batch, 1, 4, 4), "class_labels": torch.full((batch,), 10)}
    return x, conditions, nulls


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional_exactly():
    x, conditions, nulls = _inputs()
    model = CountingDenoiser()
    assert torch.equal(guided_denoiser(model, conditions, nulls, 1.0)(x, 0.5), model(x, 0.5, **conditions))
    assert torch.equal(guided_denoiser(model, conditions, nulls, 0)(x, 0.5), model(x, 0.5, **nulls))
    assert model.batch_sizes == [3, 3, 3, 3]  # one branch each, no doubled batch


def test_other_scales_combine_both_branches_in_one_batched_call():
    x, conditions, nulls = _inputs()
    model = CountingDenoiser()
    sigma = torch.tensor([0.1, 1.0, 3.0])  # a per-image noise level follows its image into both halves
    d_cond, d_null = model(x, sigma, **conditions), model(x, sigma, **nulls)
    model.calls, model.batch_sizes = 0, []
    guided = guided_denoiser(model, conditions, nulls, 2.5)(x, sigma)
    assert model.batch_sizes == [6]
    assert torch.allclose(guided, d_null + 2.5 * (d_cond - d_null), atol=1e-6)
    assert not torch.allclose(guided, d_cond, atol=1e-3)
    assert torch.allclose(combine_guidance(d_null, d_cond, 1.0), d_cond, atol=1e-6)


def test_guidance_refuses_mismatched_conditions_and_scales():
    x, conditions, nulls = _inputs()
    with pytest.raises(ValueError, match="same keys"):
        guided_denoiser(CountingDenoiser(), conditions, {"class_labels": nulls["class_labels"]}, 2.0)
    with pytest.raises(ValueError, match="has shape"):
        guided_denoiser(CountingDenoiser(), conditions, {**nulls, "conditioning_image": torch.zeros(3, 2, 4, 4)}, 2.0)
    for bad in (float("nan"), "2", True):
        with pytest.raises(ValueError, match="guidance_scale"):
            guided_denoiser(CountingDenoiser(), conditions, nulls, bad)


def test_conditioning_dropout_replaces_whole_images_at_the_given_rate():
    batch = 4000
    conditions = {"conditioning_image": torch.ones(batch, 1, 2, 2), "class_labels": torch.arange(batch) % 10}
    nulls = {"conditioning_image": torch.zeros(1, 1, 2, 2), "class_labels": torch.tensor(10)}
    dropped = drop_conditions(conditions, nulls, 0.25, torch.Generator().manual_seed(0))
    image_dropped = dropped["conditioning_image"].flatten(1).eq(0).all(1)
    assert torch.equal(image_dropped, dropped["class_labels"] == 10)  # both conditions of an image go together
    assert dropped["conditioning_image"].flatten(1).eq(1).all(1).logical_or(image_dropped).all()
    assert 0.22 < image_dropped.float().mean() < 0.28
    assert drop_conditions(conditions, nulls, 0.0)["class_labels"] is conditions["class_labels"]
    assert drop_conditions(conditions, nulls, 1.0)["class_labels"].eq(10).all()
    with pytest.raises(ValueError, match="drop_prob"):
        drop_conditions(conditions, nulls, 1.5)
