"""The PFGM++ kernel and priors against their closed forms (math.md §2, §3, §4)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pfgm_diffusers import (
    kernel_noise,
    pfgm_perturb,
    prior_log_prob,
    sample_kernel_noise,
    sample_pfgm_prior,
    sample_pfgmpp_prior,
)
from pfgm_diffusers.perturbation import chi2_quantiles, radius_from_quantiles, radius_quantiles, radius_to_normal


def radii(x):
    return x.reshape(x.shape[0], -1).double().norm(dim=1).numpy()


def beta_statistic(R, r):
    """R^2 / (R^2 + r^2), which is Beta(N/2, D/2) under the kernel."""
    return R**2 / (R**2 + r**2)


@pytest.mark.parametrize(("N", "D"), [(3, 1), (16, 8), (48, 2048), (3072, 128), (3072, 1)])
def test_kernel_radius_follows_beta_prime_law(N, D):
    sigma = 0.7
    noise = sample_kernel_noise((2000, N), sigma, D, generator=torch.Generator().manual_seed(N + D))
    B = beta_statistic(radii(noise), sigma * math.sqrt(D))
    assert stats.kstest(B, stats.beta(N / 2, D / 2).cdf).pvalue > 1e-3


def test_kernel_moments_match_closed_forms():
    N, D, sigma, n = 8, 16, 1.3, 40000
    R2 = radii(sample_kernel_noise((n, N), sigma, D, generator=torch.Generator().manual_seed(0))) ** 2
    r = sigma * math.sqrt(D)
    mean = r**2 * N / (D - 2)  # = sigma^2 N D / (D - 2)
    var = r**4 * 2 * N * (N + D - 2) / ((D - 2) ** 2 * (D - 4))
    assert abs(R2.mean() - mean) < 4 * math.sqrt(var / n)
    assert abs(R2.var() / var - 1) < 0.15


def test_kernel_direction_is_uniform_and_kept():
    noise = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    out = kernel_noise(noise, 2.0, 4)
    cos = torch.nn.functional.cosine_similarity(out, noise, dim=1)
    torch.testing.assert_close(cos, torch.ones(500), rtol=0, atol=1e-6)


def test_kernel_per_sample_sigma_and_shape():
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = kernel_noise(noise, sigma, 32)
    assert out.shape == noise.shape
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], kernel_noise(noise[i : i + 1], float(sigma[i]), 32))


def test_kernel_infinite_D_is_gaussian_and_large_D_tends_to_it():
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(kernel_noise(noise, 0.5, None), noise * 0.5)
    torch.testing.assert_close(kernel_noise(noise, 0.5, 10**9), noise * 0.5, rtol=1e-3, atol=0)
    # ... and D = 128 is visibly different at N = 192
    assert (kernel_noise(noise, 0.5, 128) - noise * 0.5).abs().max() > 1e-2


@pytest.mark.parametrize("D", [1, 128, 10**6])
def test_kernel_is_the_quantile_map_for_large_N(D):
    """The radial map of math.md §2, checked draw by draw: F_Beta(N/2, D/2)(B) of each output radius equals
    F_chi2_N(|eps|^2) of its input, in both tails (a plain Gaussian sigma * eps fails this by orders of magnitude)."""
    N, sigma = 196608, 1.0
    noise = torch.randn(4, N, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    noise[0] *= 0.99  # and two draws out in the tails, about six standard deviations out
    noise[1] *= 1.01
    out = kernel_noise(noise, sigma, D)
    R = radii(out)
    assert np.all(np.isfinite(R)) and np.all(R > 0)
    r = sigma * math.sqrt(D)
    B, B_c = beta_statistic(R, r), r**2 / (R**2 + r**2)  # 1 - B, with its digits
    norm_sq = radii(noise) ** 2
    for beta_tail, chi2_tail in [
        (stats.beta(N / 2, D / 2).cdf(B), stats.chi2(N).cdf(norm_sq)),
        (stats.beta(D / 2, N / 2).cdf(B_c), stats.chi2(N).sf(norm_sq)),
    ]:
        np.testing.assert_allclose(beta_tail, chi2_tail, rtol=1e-6, atol=1e-300)
    assert stats.chi2(N).cdf(norm_sq[0]) < 1e-6 and stats.chi2(N).sf(norm_sq[1]) < 1e-6


@pytest.mark.parametrize(("N", "D"), [(16, 1), (192, 128), (12, None)])
def test_pfgmpp_prior_radial_law(N, D):
    sigma_max = 80.0
    x = sample_pfgmpp_prior((2000, 1, N), sigma_max, D, generator=torch.Generator().manual_seed(7))
    if D is None:
        assert stats.kstest(radii(x) ** 2 / sigma_max**2, stats.chi2(N).cdf).pvalue > 1e-3
    else:
        B = beta_statistic(radii(x), sigma_max * math.sqrt(D))
        assert stats.kstest(B, stats.beta(N / 2, D / 2).cdf).pvalue > 1e-3


def test_pfgmpp_prior_second_moment():
    N, D, n = 4, 64, 20000
    x = sample_pfgmpp_prior((n, N), 80.0, D, generator=torch.Generator().manual_seed(8)).double()
    per_coordinate = x.pow(2).mean().item()
    assert abs(per_coordinate / (80.0**2 * D / (D - 2)) - 1) < 0.05


def test_pfgm_prior_and_its_official_clip():
    N, z_max = 48, 40.0
    shape = (3000, 3, 4, 4)
    exact = sample_pfgm_prior(shape, z_max, None, generator=torch.Generator().manual_seed(9))
    B = beta_statistic(radii(exact), z_max)
    assert stats.kstest(B, stats.beta(N / 2, 0.5).cdf).pvalue > 1e-3
    upper_norm = 3000.0
    clipped = sample_pfgm_prior(shape, z_max, upper_norm, generator=torch.Generator().manual_seed(9))
    R = radii(clipped)
    assert R.min() >= 1 - 1e-4 and R.max() <= upper_norm * (1 + 1e-5)
    # the clip binds with the closed-form probability P(R > upper_norm) = 1 - I_{u^2/(u^2+z^2)}(N/2, 1/2)
    expected = stats.beta(N / 2, 0.5).sf(upper_norm**2 / (upper_norm**2 + z_max**2))
    assert abs(np.mean(R > upper_norm * (1 - 1e-5)) - expected) < 4 * math.sqrt(expected * (1 - expected) / len(R))


def test_generator_lists_draw_per_sample():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = sample_pfgmpp_prior((3, 1, 4, 4), 80.0, 8, generator=gens)
    first = sample_pfgmpp_prior((1, 1, 4, 4), 80.0, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(batch[:1], first)
    with pytest.raises(ValueError, match="generators"):
        sample_pfgmpp_prior((2, 1, 4, 4), 80.0, 8, generator=gens)


@pytest.mark.parametrize("D", [1, 5, 300, None])
def test_prior_log_prob_is_the_student_t_density(D):
    N, sigma_max = 6, 3.0
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 4
    ours = prior_log_prob(x, sigma_max, D).numpy()
    if D is None:
        ref = stats.multivariate_normal(np.zeros(N), sigma_max**2 * np.eye(N)).logpdf(x.numpy())
    else:
        ref = stats.multivariate_t(np.zeros(N), sigma_max**2 * np.eye(N), df=D).logpdf(x.numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_pfgm_perturb_algorithm2():
    N, sigma = 48, 0.01
    x = torch.rand(4000, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    y, z = pfgm_perturb(x, sigma=sigma, tau=0.03, M=291, restrict_M=False, generator=torch.Generator().manual_seed(6))
    assert y.shape == x.shape and z.shape == (4000,) and (z >= 1e-10).all()
    # |y - x| and z share the multiplier (1 + tau)^m, so (|y - x| / z)^2 / N = (|eps_x|^2 / N) / eps_z^2 ~ F(N, 1)
    ratio = (radii(y - x) / z.double().numpy()) ** 2 / N
    assert stats.kstest(ratio, stats.f(N, 1).cdf).pvalue > 1e-3
    # the same generator gives the same draw
    y2, z2 = pfgm_perturb(x, sigma=sigma, restrict_M=False, generator=torch.Generator().manual_seed(6))
    assert torch.equal(y, y2) and torch.equal(z, z2)


def recover_m_and_eps_z(x, y, z, sigma=0.01, tau=0.03):
    """At N = 3072, |eps_x| = sigma sqrt(N) (1 +- 1.3%), so m and |eps_z| can be read back from (y, z)."""
    N = x[0].numel()
    m = np.log(radii(y - x) / (sigma * math.sqrt(N))) / math.log(1 + tau)
    return m, z.double().numpy() / (1 + tau) ** m


def test_pfgm_perturb_m_is_uniform_and_restricted_for_small_eps_z():
    x = torch.zeros(3000, 3, 32, 32)
    y, z = pfgm_perturb(x, sigma=0.01, tau=0.03, M=291, restrict_M=False, generator=torch.Generator().manual_seed(0))
    m, eps_z = recover_m_and_eps_z(x, y, z)
    assert stats.kstest(m, stats.uniform(0, 291).cdf).pvalue > 1e-3
    assert stats.kstest(eps_z / 0.01, stats.halfnorm().cdf).pvalue > 1e-3
    assert m[eps_z < 0.004].max() > 250  # no restriction without restrict_M

    y, z = pfgm_perturb(x, sigma=0.01, tau=0.03, M=291, restrict_M=True, generator=torch.Generator().manual_seed(0))
    m, eps_z = recover_m_and_eps_z(x, y, z)
    small = eps_z < 0.0045
    assert small.mean() > 0.3
    assert m[small].max() < int(0.7 * 291) + 1  # redrawn from U[0, floor(0.7 M))
    assert m[eps_z > 0.0055].max() > 250
    with pytest.raises(ValueError, match="tau"):
        pfgm_perturb(x, tau=0.0)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_bad_aug_dim(bad):
    with pytest.raises(ValueError, match="aug_dim"):
        kernel_noise(torch.randn(2, 3), 1.0, bad)


def test_nan_noise_is_refused():
    noise = torch.randn(2, 3)
    noise[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kernel_noise(noise, 1.0, 8)
    with pytest.raises(ValueError, match="noise levels"):
        kernel_noise(torch.randn(2, 3), torch.tensor([1.0, float("nan")]), 8)


@pytest.mark.parametrize(("N", "D"), [(3, 1), (3072, 1), (3072, 128), (48, 10**6), (196608, 2048), (12, None)])
def test_radius_quantile_round_trip_in_both_tails(N, D):
    lower = np.array([1e-12, 1e-3, 0.3, 0.5, 0.7])
    upper = np.concatenate([1 - lower[:3], [0.5, 0.3]])
    lower = np.concatenate([lower, 1 - np.array([1e-3, 1e-12])])
    upper = np.concatenate([upper, [1e-3, 1e-12]])
    R = radius_from_quantiles(lower, upper, N, 2.0, D)
    back_lower, back_upper = radius_quantiles(R, N, 2.0, D)
    small = np.where(lower < 0.5, lower, upper)
    back_small = np.where(lower < 0.5, back_lower, back_upper)
    np.testing.assert_allclose(back_small, small, rtol=1e-4)
    assert np.all(np.diff(R) > 0)


@pytest.mark.parametrize("D", [None, 8])
@pytest.mark.parametrize("sigma", [torch.tensor(0.7), torch.tensor([0.7]), 0.7])
def test_kernel_one_sigma_for_a_batch(sigma, D):
    """A 0-d or (1,) sigma applies to the whole batch (the D = None branch used to raise a reshape error)."""
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    out = kernel_noise(noise, sigma, D)
    torch.testing.assert_close(out, kernel_noise(noise, 0.7, D))
    with pytest.raises(ValueError, match="one per sample"):
        kernel_noise(noise, torch.tensor([0.7, 0.8]), D)


@pytest.mark.parametrize("D", [1, 128, None])
def test_extreme_quantiles_never_give_a_zero_or_infinite_radius(D):
    """A chi-square quantile that underflows (|eps| far below or above sqrt(N)) is read as the smallest positive
    float64: the radius is extreme, but never 0 (the start the scheduler once returned) and never inf."""
    N = 192
    lower, upper = chi2_quantiles(np.array([1e-3, 1e5]), N)
    assert lower[0] == 0 and upper[1] == 0  # both underflow
    R = radius_from_quantiles(lower, upper, N, 80.0, D)
    assert np.all(np.isfinite(R)) and R[0] > 0 and R[1] > R[0]
    z = radius_to_normal(R, N, 80.0, D)
    assert np.all(np.isfinite(z)) and z[0] < -20 and z[1] > 20  # beyond any randn draw
    noise = torch.randn(2, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise[0] *= 1e-3 / noise[0].norm()
    out = kernel_noise(noise, 80.0, D)
    assert torch.isfinite(out).all() and (out.norm(dim=1) > 0).all()


def test_low_precision_is_computed_in_float32_and_refused_where_it_cannot_hold():
    """D = 1 in float16: about 0.35 % of prior draws exceed 65504. They raise instead of coming back as inf; the
    others equal the float32 computation rounded once."""
    noise = torch.randn(20000, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    prior32 = kernel_noise(noise, 80.0, 1)
    too_big = prior32.abs().reshape(20000, -1).amax(1) > torch.finfo(torch.float16).max
    assert 0.001 < too_big.float().mean() < 0.01
    with pytest.raises(ValueError, match="float16 cannot represent"):
        kernel_noise(noise.half(), 80.0, 1)
    fits = noise[~too_big][:1000]
    half = kernel_noise(fits.half(), 80.0, 1)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half, kernel_noise(fits.half().float(), 80.0, 1).half(), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="float16 cannot represent"):
        sample_pfgmpp_prior((20000, 3, 2, 2), 80.0, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float16)
    # the hyperplane prior's clip brings every radius back into range: then float16 is fine
    clipped = sample_pfgm_prior((20000, 3, 2, 2), 80.0, 3000.0, torch.Generator().manual_seed(5), dtype=torch.float16)
    assert torch.isfinite(clipped).all()


def test_sample_kernel_noise_with_one_generator_per_sample_matches_single_draws():
    sigma = torch.tensor([0.5, 2.0, 9.0])
    batch = sample_kernel_noise((3, 4, 4), sigma, 8, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    for i in range(3):
        single = sample_kernel_noise((1, 4, 4), sigma[i : i + 1], 8, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(batch[i : i + 1], single)
