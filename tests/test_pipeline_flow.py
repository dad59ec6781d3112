"""The pipeline as an invertible flow, checked with exact denoisers: invert, slerp and log_likelihood."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from pfgm_diffusers import PFGMPipeline, PFGMScheduler
from pfgm_diffusers.field import ideal_denoiser
from pfgm_diffusers.perturbation import prior_log_prob

SIGMA_DATA = 0.5


class ExactUNet(torch.nn.Module):
    """Stands in for a UNet2DModel whose output the scheduler turns into a known denoiser D(x, sigma).

    PFGM++ modes use prediction_type="sample" (the output IS D): the input c_in x and the timestep ln(sigma)/4 are
    undone first. Field mode (the network sees x and the raw z) returns v_x = -(x - D)/z and v_z = -1, so that
    x - z v_x / v_z is D again (up to the official 1e-5 added to v_z).
    """

    def __init__(self, denoiser, shape, field=False):
        super().__init__()
        self.denoiser, self.field = denoiser, field
        channels, size = shape[0], shape[1]
        out_channels = channels + 1 if field else channels
        self.config = SimpleNamespace(
            in_channels=channels, out_channels=out_channels, sample_size=size, num_class_embeds=None
        )
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device

    def forward(self, sample, timestep, class_labels=None):
        timestep = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(sample.shape[0])
        view = (-1,) + (1,) * (sample.ndim - 1)
        if self.field:
            z = timestep.to(sample.dtype).reshape(view)
            v_x = -(sample - self.denoiser(sample, timestep)) / z
            return SimpleNamespace(sample=torch.cat([v_x, -torch.ones_like(sample[:, :1])], dim=1))
        sigma = torch.exp(4 * timestep)  # (B,) float64
        x = sample * torch.sqrt(sigma**2 + SIGMA_DATA**2).to(sample.dtype).reshape(view)
        return SimpleNamespace(sample=self.denoiser(x, sigma))


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
    pipe = PFGMPipeline(unet=ExactUNet(denoiser, shape, field), scheduler=PFGMScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def charges(num, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num, *shape), generator=generator) * 1.8 - 0.9  # well inside [-1, 1]


# ---------------------------------------------------------------------- invert


@pytest.mark.parametrize("solver", [None, "rk45"])
def test_invert_round_trip_pfgmpp(solver):
    shape = (3, 4, 4)
    data = charges(5, shape)
    pipe = exact_pipe(charges_denoiser(data, 128), shape, aug_dim=128)
    images = data[:3] / 2 + 0.5  # "pt" images in [0, 1]
    latents = pipe.invert(images, num_inference_steps=18, solver=solver)
    # The flow moved far from the images (a charge itself flows out only through the others' pull: not far as
    # typical prior draws, which is fine for a point of zero measure).
    assert latents.shape == images.shape and latents.flatten(1).norm(dim=1).min() > 10 * (2 * images - 1).norm()
    again = pipe(latents=latents, num_inference_steps=18, solver=solver, output_type="pt").images
    torch.testing.assert_close(again, images, atol=1e-4, rtol=0)


def test_invert_round_trip_field_mode():
    shape = (3, 4, 4)
    data = charges(5, shape, seed=1)
    scheduler = dict(prediction_type="poisson_field", aug_dim=1, sigma_min=1e-3, sigma_max=40.0)
    pipe = exact_pipe(charges_denoiser(data, 1), shape, sigma_schedule="exponential", **scheduler)
    images = data[1:4] / 2 + 0.5
    for solver in (None, "rk45"):
        latents = pipe.invert(images, num_inference_steps=30, solver=solver)
        again = pipe(latents=latents, num_inference_steps=30, solver=solver, output_type="pt").images
        # No final denoising step in field mode: the sample stops at z_min = 1e-3 near its charge.
        torch.testing.assert_close(again, images, atol=2e-3, rtol=0)


def test_invert_matches_the_closed_form_gaussian_flow():
    """For data ~ N(mu, s^2 I) the ODE is linear: x(sigma) - mu = (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)).

    Heun converges to it at second order (about 5% off at 18 steps, 0.04% at 200); RK45 meets its tolerance.
    """
    mu, s, shape = 0.1, 0.3, (1, 4, 4)
    pipe = exact_pipe(gaussian_denoiser(mu, s), shape, aug_dim=None)
    x0 = (mu + s * torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))).clamp(-0.95, 0.95)
    gain = math.sqrt((s**2 + 80.0**2) / (s**2 + 0.002**2))  # sigma_max = 80, sigma_min = 0.002

    def relative_error(latents):
        return ((latents - mu) / (x0 - mu) / gain - 1).abs().max().item()

    errors = [relative_error(pipe.invert(x0, num_inference_steps=n, do_normalize=False)) for n in (18, 72)]
    assert errors[0] < 0.06 and errors[1] < errors[0] / 10  # second order: 4x the steps, 16x smaller
    assert relative_error(pipe.invert(x0, solver="rk45", rtol=1e-5, atol=1e-5, do_normalize=False)) < 1e-4
    # Round trip through the scheduler's own Heun steps (6e-3 off at 18 steps, 7e-4 at 36, 7e-5 at 72) and RK45.
    for solver, steps, atol in ((None, 72, 2e-4), ("rk45", 1, 5e-4)):
        latents = pipe.invert(x0, num_inference_steps=steps, solver=solver, do_normalize=False)
        again = pipe(latents=latents, num_inference_steps=steps, solver=solver, output_type="pt").images
        torch.testing.assert_close(again, x0 / 2 + 0.5, atol=atol, rtol=0)


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


def _radius_beta(latents, sigma_max, aug_dim):
    radius_sq = latents.flatten(1).double().pow(2).sum(1).numpy()
    return radius_sq / (radius_sq + sigma_max**2 * aug_dim)  # ~ Beta(N/2, D/2) under the prior (math.md §2)


@pytest.mark.parametrize("aug_dim", [3, 64])
def test_slerp_keeps_the_prior_radial_law(aug_dim):
    shape, num = (1, 2, 2), 4000  # N = 4
    pipe = exact_pipe(charges_denoiser(charges(2, shape), aug_dim), shape, aug_dim=aug_dim)
    a = pipe.scheduler.sample_prior((num, *shape), generator=torch.Generator().manual_seed(0))
    b = pipe.scheduler.sample_prior((num, *shape), generator=torch.Generator().manual_seed(1))
    beta_law = stats.beta(2, aug_dim / 2).cdf
    for t in (0.3, 0.5):
        mixed = pipe.slerp(a, b, t)
        assert stats.kstest(_radius_beta(mixed, 80.0, aug_dim), beta_law).pvalue > 1e-3
        direction = mixed.flatten(1) / mixed.flatten(1).norm(dim=1, keepdim=True)
        assert direction.mean(0).abs().max() < 0.05  # uniform directions have mean 0 (sd 0.5 / sqrt(num))
    # A plain linear interpolation shrinks the radii (the test can tell).
    assert stats.kstest(_radius_beta(0.5 * a + 0.5 * b, 80.0, aug_dim), beta_law).pvalue < 1e-6


def test_slerp_endpoints_and_shapes():
    shape = (3, 4, 4)
    pipe = exact_pipe(charges_denoiser(charges(2, shape), 128), shape, aug_dim=128)
    a, b = (pipe.scheduler.sample_prior((2, *shape), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    frames = pipe.slerp(a, b, torch.linspace(0, 1, 5))
    assert frames.shape == (10, *shape)
    torch.testing.assert_close(frames[:2], a, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(frames[-2:], b, rtol=1e-6, atol=1e-4)
    middle = pipe.slerp(a, b, 0.5)
    torch.testing.assert_close(middle, frames[4:6], rtol=1e-6, atol=1e-4)
    images = pipe(latents=frames, num_inference_steps=4, output_type="np").images  # usable as latents
    assert images.shape == (10, 4, 4, 3)
    with pytest.raises(ValueError, match="t must be"):
        pipe.slerp(a, b, 1.5)
    with pytest.raises(ValueError, match="differ"):
        pipe.slerp(a, b[:1], 0.5)


def test_slerp_field_mode_respects_the_radius_clip():
    shape = (3, 4, 4)
    scheduler = dict(prediction_type="poisson_field", aug_dim=1, sigma_max=40.0, upper_norm=3000.0)
    pipe = exact_pipe(charges_denoiser(charges(2, shape), 1), shape, **scheduler)
    a = pipe.scheduler.sample_prior((200, *shape), generator=torch.Generator().manual_seed(0))
    b = pipe.scheduler.sample_prior((200, *shape), generator=torch.Generator().manual_seed(1))
    radius = pipe.slerp(a, b, 0.4).flatten(1).norm(dim=1)
    assert radius.min() >= 1 - 1e-4 and radius.max() <= 3000 * (1 + 1e-6)


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
    torch.testing.assert_close(out.latents, x_T.float(), rtol=1e-4, atol=1e-3)
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
    shape = (3, 4, 4)
    data = charges(4, shape)
    images = data[:2] / 2 + 0.5
    for aug_dim, extra in ((16, {}), (1, dict(prediction_type="poisson_field", sigma_max=40.0, sigma_min=1e-3))):
        pipe = exact_pipe(charges_denoiser(data, aug_dim), shape, aug_dim=aug_dim, **extra)
        out = pipe.log_likelihood(images, generator=torch.Generator().manual_seed(0), rtol=1e-4, atol=1e-4)
        assert torch.isfinite(out.bits_per_dim).all() and out.log_prob.dtype == torch.float64
        prior_part = prior_log_prob(out.latents.double(), pipe.scheduler.config.sigma_max, aug_dim)
        assert (out.log_prob - prior_part).abs().min() > 1  # the ODE's volume change is counted
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
    torch.testing.assert_close(out.latents, x0 * pipe.scheduler.config.sigma_max / sigma_min, rtol=1e-3, atol=1e-3)
