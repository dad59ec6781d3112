"""The pipeline as an invertible flow, checked with exact denoisers: invert, slerp and log_likelihood."""

import math

import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler
from exact_networks import ExactUNet
from scipy import stats

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, flow
from pfgm_diffusers.field import ideal_denoiser
from pfgm_diffusers.perturbation import prior_log_prob


def charges_denoiser(data, aug_dim):
    """The exact posterior mean of a handful of points (math.md §1)."""
    return lambda x, sigma: ideal_denoiser(x, sigma, data, aug_dim)


def gaussian_denoiser(mu, s):
    """The exact denoiser of data ~ N(mu, s^2 I) under Gaussian noise: mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def denoise(x, sigma):
        shrink = (s**2 / (s**2 + sigma**2)).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return mu + shrink * (x - mu)

    return denoise


def exact_pipe(denoiser, shape, **scheduler_kwargs):
    field = scheduler_kwargs.get("prediction_type") == "poisson_field"
    if not field:
        scheduler_kwargs.setdefault("prediction_type", "sample")
    mode = "field" if field else scheduler_kwargs["prediction_type"]
    pipe = PFGMPipeline(unet=ExactUNet(denoiser, shape, mode), scheduler=PFGMScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


FIELD = dict(prediction_type="poisson_field", aug_dim=1, sigma_min=1e-3, sigma_max=40.0, sigma_schedule="exponential")
SCHEDULERS = {
    "D=128": lambda: PFGMScheduler(aug_dim=128),
    "D=inf": lambda: PFGMScheduler(aug_dim=None),
    "field": lambda: PFGMScheduler(**FIELD),
    "EDMEuler": EDMEulerScheduler,
}


def exact_pipe_with(name, data, shape):
    """The exact denoiser of the charges `data` with each scheduler (epsilon preconditioning, or field mode)."""
    scheduler = SCHEDULERS[name]()
    aug_dim = scheduler.config.get("aug_dim")
    mode = "field" if name == "field" else "epsilon"
    pipe = PFGMPipeline(unet=ExactUNet(charges_denoiser(data, aug_dim), shape, mode), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def charges(num, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num, *shape), generator=generator) * 1.8 - 0.9  # well inside [-1, 1]


# ---------------------------------------------------------------------- invert


@pytest.mark.parametrize("solver", [None, "rk45"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_invert_then_sample_round_trip(name, solver):
    """images -> invert -> standard Gaussian latents -> pipe(latents=...) -> the same images, for each scheduler."""
    shape = (3, 4, 4)
    data = charges(5, shape, seed=1 if name == "field" else 0)
    pipe = exact_pipe_with(name, data, shape)
    images = data[1:4] / 2 + 0.5  # "pt" images in [0, 1]
    steps = 30 if name == "field" else 18
    latents = pipe.invert(images, num_inference_steps=steps, solver=solver)
    assert latents.shape == images.shape and torch.isfinite(latents).all()
    if name != "field":  # the flow moved far (in field mode an image on a charge reaches z_max = 40 near it)
        start = flow.prior_from_noise(pipe.scheduler, latents)
        assert start.flatten(1).norm(dim=1).min() > 10 * (2 * images - 1).norm()
    again = pipe(latents=latents, num_inference_steps=steps, solver=solver, output_type="pt").images
    # No final denoising step in field mode: the sample stops at z_min = 1e-3 near its charge.
    torch.testing.assert_close(again, images, atol=2e-3 if name == "field" else 1e-4, rtol=0)


def test_invert_matches_the_closed_form_gaussian_flow():
    """For data ~ N(mu, s^2 I) the ODE is linear: x(sigma) - mu = (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)).

    Heun converges to it at second order (about 5% off at 18 steps, 0.04% at 200); RK45 meets its tolerance. The
    latents are x_T / sigma_max (D = infinity), so for data drawn from the model they are standard Gaussian.
    """
    mu, s, shape = 0.1, 0.3, (1, 4, 4)
    pipe = exact_pipe(gaussian_denoiser(mu, s), shape, aug_dim=None)
    x0 = (mu + s * torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))).clamp(-0.95, 0.95)
    gain = math.sqrt((s**2 + 80.0**2) / (s**2 + 0.002**2))  # sigma_max = 80, sigma_min = 0.002

    def relative_error(latents):
        return ((80.0 * latents - mu) / (x0 - mu) / gain - 1).abs().max().item()

    errors = [relative_error(pipe.invert(x0, num_inference_steps=n, do_normalize=False)) for n in (18, 72)]
    assert errors[0] < 0.06 and errors[1] < errors[0] / 10  # second order: 4x the steps, 16x smaller
    assert relative_error(pipe.invert(x0, solver="rk45", rtol=1e-5, atol=1e-5, do_normalize=False)) < 1e-4
    # Round trip through the scheduler's own Heun steps (6e-3 off at 18 steps, 7e-4 at 36, 7e-5 at 72) and RK45.
    for solver, steps, atol in ((None, 72, 2e-4), ("rk45", 1, 5e-4)):
        latents = pipe.invert(x0, num_inference_steps=steps, solver=solver, do_normalize=False)
        again = pipe(latents=latents, num_inference_steps=steps, solver=solver, output_type="pt").images
        torch.testing.assert_close(again, x0 / 2 + 0.5, atol=atol, rtol=0)
    # Data drawn from the model (mu = 0, so that the prior N(0, 80^2 I) is the true marginal): its latents are N(0, I).
    pipe = exact_pipe(gaussian_denoiser(0.0, s), shape, aug_dim=None)
    x0 = s * torch.randn((500, *shape), generator=torch.Generator().manual_seed(1))
    latents = pipe.invert(x0, solver="rk45", do_normalize=False)
    assert stats.kstest(latents.flatten().numpy(), stats.norm.cdf).pvalue > 1e-3
    assert stats.kstest((latents / 2).flatten().numpy(), stats.norm.cdf).pvalue < 1e-6  # the test can tell


def test_invert_bad_input():
    shape = (3, 4, 4)
    pipe = exact_pipe(charges_denoiser(charges(2, shape), 128), shape, aug_dim=128)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe.invert(torch.full((1, *shape), -0.5))
    with pytest.raises(ValueError, match="shape"):
        pipe.invert(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.invert(torch.zeros(1, *shape), num_inference_steps=0)
    with pytest.raises(ValueError, match="class_labels"):
        pipe.invert(torch.zeros(1, *shape), class_labels=0)


def test_invert_accepts_numpy_and_pil():
    shape = (3, 4, 4)
    data = charges(3, shape)
    pipe = exact_pipe(charges_denoiser(data, 128), shape, aug_dim=128)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    from_pt = pipe.invert(images.images, num_inference_steps=4)
    from_np = pipe.invert(images.images.permute(0, 2, 3, 1).numpy(), num_inference_steps=4)
    torch.testing.assert_close(from_np, from_pt, atol=0, rtol=0)
    pil = pipe.numpy_to_pil(images.images.permute(0, 2, 3, 1).numpy())
    assert pipe.invert(pil, num_inference_steps=4).shape == (2, *shape)


# ---------------------------------------------------------------------- slerp


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_slerp_of_gaussian_latents_is_gaussian(name):
    """Interpolants of independent N(0, I) latents are N(0, I): |x_t|^2 ~ chi^2_N (KS), uniform directions, whatever
    the scheduler (slerp does not depend on it), and they sample like any latents."""
    shape, num = (1, 2, 2), 4000  # N = 4
    pipe = exact_pipe_with(name, charges(2, shape), shape)
    a, b = (torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    chi2 = stats.chi2(4).cdf
    for t in (0.3, 0.5):
        mixed = pipe.slerp(a, b, t)
        assert stats.kstest(mixed.flatten(1).double().pow(2).sum(1).numpy(), chi2).pvalue > 1e-3
        direction = mixed.flatten(1) / mixed.flatten(1).norm(dim=1, keepdim=True)
        assert direction.mean(0).abs().max() < 0.05  # uniform directions have mean 0 (sd 0.5 / sqrt(num))
    # A plain linear interpolation shrinks the radii (the test can tell).
    assert stats.kstest((0.5 * a + 0.5 * b).flatten(1).pow(2).sum(1).numpy(), chi2).pvalue < 1e-6
    images = pipe(latents=pipe.slerp(a[:3], b[:3], 0.5), num_inference_steps=4, output_type="pt").images
    assert images.shape == (3, *shape) and torch.isfinite(images).all()


def test_slerp_endpoints_and_shapes():
    shape = (3, 4, 4)
    pipe = exact_pipe(charges_denoiser(charges(2, shape), 128), shape, aug_dim=128)
    a, b = (torch.randn((2, *shape), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    frames = pipe.slerp(a, b, torch.linspace(0, 1, 5))
    assert frames.shape == (10, *shape)
    torch.testing.assert_close(frames[:2], a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frames[-2:], b, rtol=1e-6, atol=1e-6)
    middle = pipe.slerp(a, b, 0.5)
    torch.testing.assert_close(middle, frames[4:6], rtol=1e-6, atol=1e-6)
    # on the great circle: the middle direction bisects the endpoints' directions
    u_a, u_b, u_m = (v.flatten(1) / v.flatten(1).norm(dim=1, keepdim=True) for v in (a, b, middle))
    torch.testing.assert_close(u_m, (u_a + u_b) / (u_a + u_b).norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    images = pipe(latents=frames, num_inference_steps=4, output_type="np").images  # usable as latents
    assert images.shape == (10, 4, 4, 3)


def test_slerp_bad_input():
    shape = (3, 4, 4)
    pipe = exact_pipe(charges_denoiser(charges(2, shape), 128), shape, aug_dim=128)
    a, b = (torch.randn((2, *shape), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    with pytest.raises(ValueError, match="t must be"):
        pipe.slerp(a, b, 1.5)
    with pytest.raises(ValueError, match="differ"):
        pipe.slerp(a, b[:1], 0.5)
    zero = b.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match=r"latents_b\[1\] is zero"):
        pipe.slerp(a, zero, 0.5)
    nan = a.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"latents_a\[0\] is zero or not finite"):
        pipe.slerp(nan, b, 0.5)
    with pytest.raises(ValueError, match="opposite"):
        pipe.slerp(a, -a, 0.5)


# ---------------------------------------------------------------------- log_likelihood


def test_log_likelihood_of_gaussian_data_matches_the_closed_form():
    """Data ~ N(mu, s^2 I), exact denoiser, D = infinity: the flow is linear and its log-likelihood is known.

    x_T - mu = (x0 - mu) k with k = sqrt((s^2 + sigma_max^2) / (s^2 + sigma_min^2)) and log p(x0) = log p_prior(x_T)
    + N log k. The Jacobian is a multiple of the identity, so one Rademacher probe gives the divergence exactly.
    """
    mu, s, shape = 0.2, 0.3, (1, 4, 4)
    N = 16
    pipe = exact_pipe(gaussian_denoiser(mu, s), shape, aug_dim=None)
    x0 = mu + s * torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
    out = pipe.log_likelihood(x0, do_normalize=False, generator=torch.Generator().manual_seed(1))
    k = math.sqrt((s**2 + 80.0**2) / (s**2 + 0.002**2))
    x_T = mu + (x0.double() - mu) * k
    expected = prior_log_prob(x_T, 80.0, None) + N * math.log(k)
    torch.testing.assert_close(out.log_prob, expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(out.latents, x_T.float() / 80.0, rtol=1e-4, atol=1e-5)  # standard Gaussian latents
    torch.testing.assert_close(out.bits_per_dim, -expected / (N * math.log(2)) + 7, atol=1e-3, rtol=0)
    assert out.nfe > 10

    # With mu = 0 the prior N(0, sigma_max^2 I) is (nearly) the true marginal, so this is the data's own density.
    pipe = exact_pipe(gaussian_denoiser(0.0, s), shape, aug_dim=None)
    x0 = s * torch.randn((3, *shape), generator=torch.Generator().manual_seed(2))
    out = pipe.log_likelihood(x0, do_normalize=False, generator=torch.Generator().manual_seed(3))
    true = stats.norm(0, math.sqrt(s**2 + 0.002**2)).logpdf(x0.double().flatten(1).numpy()).sum(1)
    np.testing.assert_allclose(out.log_prob.numpy(), true, atol=5e-3)


def test_log_likelihood_gaussian_probes_are_unbiased():
    mu, s, shape = 0.0, 0.3, (1, 4, 4)
    pipe = exact_pipe(gaussian_denoiser(mu, s), shape, aug_dim=None)
    x0 = s * torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).expand(64, *shape)
    exact = pipe.log_likelihood(x0[:1], do_normalize=False, generator=torch.Generator().manual_seed(0)).log_prob
    gaussian = pipe.log_likelihood(
        x0, do_normalize=False, hutchinson_type="gaussian", generator=torch.Generator().manual_seed(1), rtol=1e-4
    ).log_prob
    assert gaussian.std() > 1  # each probe alone is noisy...
    assert abs(gaussian.mean() - exact[0]) < 4 * gaussian.std() / 8  # ...but right on average


def test_log_likelihood_finite_D_and_field_mode_and_dequantisation():
    """The ODE's volume change delta = log p(x) - log p_prior(x_T) is counted with its sign: the flow from sigma_min
    to sigma_max expands, and div_x (x - D) = N - tr(dD/dx) <= N, so 0 < delta <= N ln(sigma_max / sigma_min), the
    bound a single charge reaches (x proportional to sigma). Near the charges it nearly does."""
    shape = (3, 4, 4)
    data = charges(4, shape)
    images = data[:2] / 2 + 0.5
    for aug_dim, extra in ((16, {}), (1, dict(prediction_type="poisson_field", sigma_max=40.0, sigma_min=1e-3))):
        pipe = exact_pipe(charges_denoiser(data, aug_dim), shape, aug_dim=aug_dim, **extra)
        out = pipe.log_likelihood(images, generator=torch.Generator().manual_seed(0), rtol=1e-4, atol=1e-4)
        assert torch.isfinite(out.bits_per_dim).all() and out.log_prob.dtype == torch.float64
        x_T = pipe.scheduler.prior_from_noise(out.latents)
        delta = out.log_prob - prior_log_prob(x_T.double(), pipe.scheduler.config.sigma_max, aug_dim)
        bound = 48 * math.log(pipe.scheduler.config.sigma_max / pipe.scheduler.config.sigma_min)  # 508.6
        assert (delta > 0.98 * bound).all() and (delta < bound + 1).all(), (delta, bound)
    first = pipe.log_likelihood(
        images, dequantize=True, generator=torch.Generator().manual_seed(0), rtol=1e-3, atol=1e-3
    )
    again = pipe.log_likelihood(
        images, dequantize=True, generator=torch.Generator().manual_seed(0), rtol=1e-3, atol=1e-3
    )
    other = pipe.log_likelihood(
        images, dequantize=True, generator=torch.Generator().manual_seed(1), rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(first.log_prob, again.log_prob, atol=0, rtol=0)
    assert (first.log_prob - other.log_prob).abs().max() > 0
    with pytest.raises(ValueError, match="hutchinson_type"):
        pipe.log_likelihood(images, hutchinson_type="exact")


@pytest.mark.parametrize(
    "scheduler",
    [dict(aug_dim=16), dict(aug_dim=1, prediction_type="poisson_field", sigma_min=1e-3, sigma_max=40.0)],
    ids=["D=16", "field"],
)
def test_log_likelihood_of_one_charge_is_the_kernel_density(scheduler):
    """One charge at 0: D(x, sigma) = 0, the flow is x(sigma) = x0 sigma / sigma_min (math.md §4), and the model
    density at sigma_min is the PFGM++ kernel there, a Student-t of scale sigma_min: prior_log_prob(x0, sigma_min, D).
    This checks the finite-D prior density and the field-mode path end to end."""
    shape = (3, 4, 4)
    aug_dim = scheduler["aug_dim"]
    pipe = exact_pipe(charges_denoiser(torch.zeros(1, *shape), aug_dim), shape, **scheduler)
    sigma_min = pipe.scheduler.config.sigma_min
    x0 = sigma_min * torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
    out = pipe.log_likelihood(x0, do_normalize=False, generator=torch.Generator().manual_seed(1))
    expected = prior_log_prob(x0.double(), sigma_min, aug_dim)
    # Field mode: the stand-in's v_z = -1 meets the official + 1e-5, a 1e-5 relative slip of the drift.
    torch.testing.assert_close(out.log_prob, expected, atol=1e-2, rtol=0)
    x_T = pipe.scheduler.prior_from_noise(out.latents)
    torch.testing.assert_close(x_T, x0 * pipe.scheduler.config.sigma_max / sigma_min, rtol=1e-3, atol=1e-3)
