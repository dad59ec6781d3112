"""The Stable Target Field target (`stable_target`) against a float64 direct form, its limits and its bad input."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pfgm_diffusers import sample_kernel_noise, stable_target


def direct_target(perturbed, sigma, reference, D):
    """sum_j w_j x_j with the weights of math.md §1 from explicit float64 differences (the official code's form)."""
    y = perturbed.reshape(perturbed.shape[0], -1).double()
    x = reference.reshape(reference.shape[0], -1).double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    N = y.shape[1]
    dist_sq = (y[:, None] - x[None]).pow(2).sum(-1)  # (B, L)
    if D is None:
        log_w = -dist_sq / (2 * sigma**2)
    else:
        log_w = -(N + D) / 2 * torch.log(dist_sq + sigma**2 * D)
    return (torch.softmax(log_w, 1) @ x).reshape(perturbed.shape)


def perturbed_batch(seed, B=12, L=48, shape=(3, 4, 4), D=128, sigmas=(0.02, 50.0)):
    """A reference batch whose first B rows are the clean images of B samples perturbed with the PFGM++ kernel at
    per-sample sigmas log-spaced over `sigmas` (the STF layout: each sample's own image is in the reference)."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(L, *shape, generator=g) * 2 - 1
    sigma = torch.logspace(math.log10(sigmas[0]), math.log10(sigmas[1]), B, dtype=torch.float64)
    noise = sample_kernel_noise((B, *shape), sigma, D, g)
    return reference[:B] + noise, sigma, reference


@pytest.mark.parametrize("D", [1, 8, 128, 2048, None])
def test_matches_the_float64_direct_form_at_every_sigma(D):
    perturbed, sigma, reference = perturbed_batch(0, D=D)
    target = stable_target(perturbed, sigma, reference, D)
    assert target.dtype == torch.float32 and target.shape == perturbed.shape
    expected = direct_target(perturbed, sigma, reference, D)
    # float32 output: the weights are float64, the far weighted sum one float32 product
    torch.testing.assert_close(target.double(), expected, rtol=0, atol=2e-6)
    # the case is not trivial: some rows are their own image, some spread over many, some near the mean
    to_own = (target.double() - reference[:12].double()).flatten(1).norm(dim=1)
    to_mean = (target.double() - reference.double().mean(0)).flatten(1).norm(dim=1)
    assert to_own.min() < 1e-3 and to_mean.min() < 0.1 and (torch.minimum(to_own, to_mean) > 0.1).any()


@pytest.mark.parametrize("D", [1, 128, None])
def test_float64_inputs_are_exact_to_float64_rounding(D):
    perturbed, sigma, reference = perturbed_batch(1, D=D)
    target = stable_target(perturbed.double(), sigma, reference.double(), D)
    assert target.dtype == torch.float64
    torch.testing.assert_close(target, direct_target(perturbed, sigma, reference, D), rtol=0, atol=1e-12)


@pytest.mark.parametrize("D", [1, 128, None])
def test_small_sigma_gives_the_samples_own_clean_image(D):
    g = torch.Generator().manual_seed(2)
    reference = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    sigma = torch.full((8,), 1e-4, dtype=torch.float64)
    perturbed = reference[:8] + sample_kernel_noise((8, 1, 8, 8), sigma, D, g)
    assert torch.equal(stable_target(perturbed, sigma, reference, D), reference[:8])


@pytest.mark.parametrize("D", [1, 128, None])
def test_huge_sigma_gives_the_reference_mean(D):
    """sigma = 1e30: every weight is the same to 1e-50; sigma = 1e200 (sigma^2 D overflows float64) too."""
    g = torch.Generator().manual_seed(3)
    reference = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    perturbed = torch.randn(4, 1, 8, 8, generator=g) * 3
    mean = reference.double().mean(0, keepdim=True).expand(4, -1, -1, -1)
    for sigma in (1e30, 1e200):
        target = stable_target(perturbed, torch.full((4,), sigma, dtype=torch.float64), reference, D)
        torch.testing.assert_close(target.double(), mean, rtol=0, atol=1e-6)


def test_large_D_tends_to_the_gaussian_posterior():
    perturbed, sigma, reference = perturbed_batch(4, D=None, sigmas=(0.3, 1.0))
    gaussian = stable_target(perturbed, sigma, reference, None)
    assert (stable_target(perturbed, sigma, reference, 10**9) - gaussian).abs().max() < 1e-5
    assert (stable_target(perturbed, sigma, reference, 4) - gaussian).abs().max() > 1e-3


def near_duplicates(seed, N=3072, B=4, L=128, multiplicity=64):
    """64 reference images 1e-3 apart per pixel around a centre, queries 0.01 from it, the rest uniform: the
    one-product expansion's rounding error (~1e-4) exceeds the gaps between their squared distances (~1e-4)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(N, generator=g) * 2 - 1
    reference = torch.rand(L, N, generator=g) * 2 - 1
    reference[:multiplicity] = centre + 1e-3 * torch.randn(multiplicity, N, generator=g)
    direction = torch.randn(B, N, generator=g)
    return centre + 0.01 * direction / direction.norm(dim=1, keepdim=True), reference


def expansion_only_target(perturbed, sigma, reference, D):
    """The weights from the one-product expansion alone, in float32 (what a plain matrix-product version computes)."""
    y, x = perturbed.float(), reference.float()
    dist_sq = (y.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1) - 2 * y @ x.T).clamp(min=0)
    N = y.shape[1]
    log_w = -dist_sq / (2 * sigma**2) if D is None else -(N + D) / 2 * torch.log(dist_sq + sigma**2 * D)
    return torch.softmax(log_w, 1) @ x


@pytest.mark.parametrize("D", [1, 128, None])
def test_near_ties_are_exact(D):
    """Relative to the target's distance from the query, what the loss regresses to: the float32 output resolves
    ~1e-5 of it; the expansion alone misweights the duplicates by far more."""
    perturbed, reference = near_duplicates(5)
    for sigma in (1e-4, 3e-4, 1e-3):
        target = stable_target(perturbed, torch.full((4,), sigma), reference, D).double()
        expected = direct_target(perturbed, torch.full((4,), sigma), reference, D)
        scale = (expected - perturbed.double()).abs().max()
        assert ((target - expected).abs().max() / scale).item() < 1e-4
        naive = expansion_only_target(perturbed, sigma, reference, D).double()
        assert ((naive - expected).abs().max() / scale).item() > 1e-2


class MaxTensorSize(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_memory_is_O_B_L_not_B_L_N():
    B, L, N = 32, 512, 3072
    reference = torch.rand(L, N)
    with MaxTensorSize() as probe:
        stable_target(reference[:B] + 0.3 * torch.randn(B, N), torch.rand(B) + 0.1, reference, 128)
    assert probe.max_numel <= max(L * N, B * L)  # the (L, N) reference is the largest tensor; B*L*N is 32x it


def test_no_gradient_and_exact_under_bf16_autocast():
    perturbed, sigma, reference = perturbed_batch(6)
    perturbed.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = stable_target(perturbed, sigma, reference, 128)
    assert not target.requires_grad and target.dtype == torch.float32
    torch.testing.assert_close(
        target.double(), direct_target(perturbed.detach(), sigma, reference, 128), rtol=0, atol=2e-6
    )


def test_one_sigma_for_the_batch_equals_per_sample_sigmas():
    perturbed, _, reference = perturbed_batch(7)
    one = stable_target(perturbed, 0.4, reference, 128)
    assert torch.equal(one, stable_target(perturbed, torch.full((12,), 0.4, dtype=torch.float64), reference, 128))


def test_bad_input_is_refused_naming_the_value():
    perturbed, sigma, reference = perturbed_batch(8, B=2, L=4)
    with pytest.raises(ValueError, match=r"`reference` must hold at least one charge of 48 values .* got shape \(0,"):
        stable_target(perturbed, sigma, reference[:0], 128)
    with pytest.raises(
        ValueError, match=r"`reference` must hold at least one charge of 48 .* got shape \(4, 3, 4, 5\)"
    ):
        stable_target(perturbed, sigma, torch.rand(4, 3, 4, 5), 128)
    with pytest.raises(ValueError, match=r"`perturbed` must hold at least one point .* got shape \(0, 3, 4, 4\)"):
        stable_target(perturbed[:0], sigma[:0], reference, 128)
    with pytest.raises(ValueError, match=r"`sigma` must be a number or have shape \(2,\), got shape \(3,\)"):
        stable_target(perturbed, torch.rand(3), reference, 128)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-170):
        with pytest.raises(
            ValueError, match=r"`sigma` must be finite and > 0 .* got \[" + f"{bad}" + r"\] at rows \[1\]"
        ):
            stable_target(perturbed, torch.tensor([1.0, bad], dtype=torch.float64), reference, 128)
    for bad in (0, -3, 1.5, True, "128"):
        with pytest.raises(ValueError, match=r"`aug_dim` must be an integer >= 1 or None"):
            stable_target(perturbed, sigma, reference, bad)
    broken = reference.clone()
    broken[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="`reference` must be finite, found 1 NaN or inf"):
        stable_target(perturbed, sigma, broken, 128)
    with pytest.raises(ValueError, match="`perturbed` must be finite, found 1 NaN or inf"):
        stable_target(torch.where(perturbed == perturbed[1, 2, 3, 3], math.inf, perturbed), sigma, reference, None)


@pytest.mark.parametrize("D", [128, None])
def test_class_labels_restrict_each_posterior_to_its_class(D):
    """With labels, each row's target is the posterior over the reference images of its class only: the direct form
    on that class's images; without them (the official code) it mixes classes."""
    perturbed, sigma, reference = perturbed_batch(9, D=D, sigmas=(0.5, 50.0))
    labels = torch.arange(48) % 3
    target = stable_target(perturbed, sigma, reference, D, labels[:12], labels)
    for label in range(3):
        rows, own = labels[:12] == label, reference[labels == label]
        expected = direct_target(perturbed[rows], sigma[rows], own, D)
        torch.testing.assert_close(target[rows].double(), expected, rtol=0, atol=2e-6)
    assert (stable_target(perturbed, sigma, reference, D) - target).abs().max() > 0.1
    with pytest.raises(ValueError, match="give both `class_labels` and `reference_labels`, or neither"):
        stable_target(perturbed, sigma, reference, D, labels[:12])
    with pytest.raises(ValueError, match=r"`reference_labels` \(48,\), got \(12,\) and \(47,\)"):
        stable_target(perturbed, sigma, reference, D, labels[:12], labels[:47])
    with pytest.raises(ValueError, match="the reference batch holds no image of class 3"):
        stable_target(perturbed, sigma, reference, D, torch.where(labels[:12] == 2, 3, labels[:12]), labels)


def test_pfgmpp_loss_regresses_the_target_it_is_given():
    """`pfgmpp_loss(target=...)`: the same draws, the weighted error against target(noisy, sigma) instead of x."""
    import functools

    from pfgm_diffusers import PFGMScheduler
    from pfgm_diffusers.losses import pfgmpp_loss

    scheduler = PFGMScheduler(aug_dim=128)
    reference = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(10)) * 2 - 1
    seen = {}

    def unet(model_input, timestep, class_labels=None):
        seen["noisy"] = model_input * (timestep.exp() ** 8 + 0.25).sqrt().reshape(-1, 1, 1, 1)  # c_in undone
        seen["sigma"] = timestep.exp() ** 4  # c_noise = ln(sigma) / 4
        return type("Output", (), {"sample": torch.zeros_like(model_input)})()

    target = functools.partial(stable_target, reference=reference, aug_dim=128)
    loss = pfgmpp_loss(unet, scheduler, reference[:4], generator=torch.Generator().manual_seed(11), target=target)
    sigma, noisy = seen["sigma"].double(), seen["noisy"]
    expected_target = stable_target(noisy, sigma, reference, 128)
    denoised = scheduler.precondition_outputs(noisy, torch.zeros_like(noisy), sigma)
    weight = scheduler.loss_weight(sigma).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss, (weight * (denoised - expected_target) ** 2).mean().float(), rtol=1e-4, atol=0)
    plain = pfgmpp_loss(unet, scheduler, reference[:4], generator=torch.Generator().manual_seed(11))
    assert abs(plain.item() - loss.item()) > 1e-3 * plain.item()  # the target changed the loss
