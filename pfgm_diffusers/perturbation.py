"""The PFGM++ perturbation kernel, the priors of PFGM and PFGM++, and the PFGM perturbation of Algorithm 2.

Every formula here is in `docs/math.md` §2–§3 (PFGM++: Xu et al., ICML 2023, eq. 4 and Appendix C;
PFGM: Xu et al., NeurIPS 2022, Algorithm 2 and Appendix A.4). Symbols follow the papers: `N` is the data dimension,
`aug_dim` is D (`None` means D = ∞, the diffusion limit), `r = sigma * sqrt(D)`.
"""

import math

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from scipy import special

from .validation import check_aug_dim

# Below this |eps_z| the official PFGM code redraws m from U[0, 0.7 M) ("restrict_M", PFGM Appendix B.1.1).
_RESTRICT_M_THRESHOLD = 0.005
# The official PFGM clamps the perturbed z from below so that log z and 1/z stay finite.
_MIN_Z = 1e-10
# The smallest positive normal float64: tail probabilities and Beta quantiles that underflow are read as this.
_TINY = np.finfo(np.float64).tiny


def _noise_levels(sigma, batch_size):
    """`sigma` (float, 0-d, (1,) or (B,) tensor) as a validated float64 CPU array of shape (B,)."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.detach().to("cpu", torch.float64).reshape(-1).numpy()
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if sigma.size not in (1, batch_size):
        raise ValueError(f"Need one noise level or one per sample ({batch_size}), got {sigma.size}.")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError(f"noise levels must be finite and >= 0, got {sigma.tolist()}.")
    return np.broadcast_to(sigma, (batch_size,))


def radius_quantiles(R, N, sigma, aug_dim):
    """(P(R' <= R), P(R' > R)) for the kernel radius R' at noise level `sigma` (float64 arrays; math.md §2).

    R^2 / (R^2 + r^2) ~ Beta(N/2, D/2) with r = sigma sqrt(D); (R / sigma)^2 ~ chi^2_N for `aug_dim=None`. Both tails
    are returned, each computed directly, so that neither loses digits where the other is close to 1.
    """
    R = np.asarray(R, dtype=np.float64)
    r = sigma if aug_dim is None else sigma * math.sqrt(aug_dim)
    with np.errstate(over="ignore", invalid="ignore"):  # (R / r)^2 = inf for R beyond 1e154 r reads as B = 1
        ratio_sq = (R / r) ** 2
        if aug_dim is None:
            return chi2_quantiles(ratio_sq, N)
        beta = np.where(np.isinf(ratio_sq), 1.0, ratio_sq / (1 + ratio_sq))  # R^2 / (R^2 + r^2)
    beta_c = 1 / (1 + ratio_sq)  # r^2 / (R^2 + r^2), with its own digits
    return special.betainc(N / 2, aug_dim / 2, beta), special.betainc(aug_dim / 2, N / 2, beta_c)


def chi2_quantiles(norm_sq, N):
    """(F(x), 1 - F(x)) of the chi-square law with N degrees of freedom at x = `norm_sq` = |eps|^2 (float64)."""
    half_sq = np.asarray(norm_sq, dtype=np.float64) / 2
    return special.gammainc(N / 2, half_sq), special.gammaincc(N / 2, half_sq)


def radius_from_quantiles(lower, upper, N, sigma, aug_dim):
    """The kernel radius R with P(R' <= R) = `lower` and P(R' > R) = `upper` (the inverse of `radius_quantiles`).

    For finite D, B = F^{-1}_{Beta(N/2, D/2)}(lower) and R = r sqrt(B / (1 - B)). B and 1 - B (Beta(D/2, N/2)) are
    both inverted from the smaller of the two tail probabilities, which keeps its digits where the other is ~1, so
    that R keeps its digits in both tails and for D << N (B ~ 1). A tail probability that underflowed to 0 (an input
    some 30 standard deviations out) is read as the smallest positive float64, and so are B and 1 - B: the radius is
    then extreme but never exactly 0 or infinite.
    """
    lower, upper = np.maximum(lower, _TINY), np.maximum(upper, _TINY)
    in_lower_tail = lower < upper
    if aug_dim is None:
        half_sq = np.where(in_lower_tail, special.gammaincinv(N / 2, lower), special.gammainccinv(N / 2, upper))
        return sigma * np.sqrt(2 * np.maximum(half_sq, _TINY))
    a, b = N / 2, aug_dim / 2
    beta = np.where(in_lower_tail, special.betaincinv(a, b, lower), special.betainccinv(a, b, upper))  # B
    beta_c = np.where(in_lower_tail, special.betainccinv(b, a, lower), special.betaincinv(b, a, upper))  # 1 - B
    return sigma * math.sqrt(aug_dim) * np.sqrt(np.maximum(beta, _TINY) / np.maximum(beta_c, _TINY))


def radius_to_normal(R, N, sigma, aug_dim):
    """The standard normal value with the same quantile as the kernel radius R (both tails kept, float64)."""
    lower, upper = radius_quantiles(R, N, sigma, aug_dim)
    lower, upper = np.maximum(lower, _TINY), np.maximum(upper, _TINY)
    return np.where(lower < upper, special.ndtri(lower), -special.ndtri(upper))


def normal_to_radius(normal, N, sigma, aug_dim):
    """The kernel radius with the same quantile as the standard normal value `normal` (inverse of radius_to_normal)."""
    normal = np.asarray(normal, dtype=np.float64)
    return radius_from_quantiles(special.ndtr(normal), special.ndtr(-normal), N, sigma, aug_dim)


def kernel_radius(norm_sq, N, sigma, aug_dim):
    """The kernel radius (float64, (B,)) with the chi-square quantile of `norm_sq` = |eps|^2: math.md §2's radial map
    q = F_{chi2_N}(|eps|^2), B = F^{-1}_{Beta(N/2, D/2)}(q), R = r sqrt(B / (1 - B)), r = sigma sqrt(D)."""
    return radius_from_quantiles(*chi2_quantiles(norm_sq, N), N, sigma, aug_dim)


def squared_norms(x: torch.Tensor) -> np.ndarray:
    """|x_b|^2 of each sample, as float64 on the CPU (B,): the one host sync of a radial map.

    One float32 pass (float64 inputs stay float64): its relative error, ~1e-7, is float32 rounding of the output
    anyway. Where that norm overflows (elements beyond ~1e19) it is redone in float64, so that inf or NaN in the result
    means inf or NaN in `x`.
    """
    x = x.detach().reshape(x.shape[0], -1)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(x, dim=1, dtype=dtype if x.dtype != dtype else None).cpu()
    if not torch.isfinite(norms).all():  # rare: tell overflow from non-finite input
        norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).cpu()
    return norms.double().numpy() ** 2


def rescale_radii(x: torch.Tensor, norm_sq: np.ndarray, radius: np.ndarray) -> torch.Tensor:
    """`x` with each sample's radius moved from sqrt(`norm_sq`) to `radius` (CPU float64 arrays, (B,)), direction kept.

    The product is taken in float32 for half-precision `x` (in float64 where the factor exceeds float32), and a radius
    that `x.dtype` cannot hold is refused rather than returned as inf.
    """
    batch_size, dtype = x.shape[0], x.dtype
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norm_sq > 0, radius / np.sqrt(norm_sq), 0.0)  # R / |x|
    largest = torch.finfo(dtype).max
    if radius.max(initial=0.0) > largest:  # only then can an element overflow: check them (a rare second sync)
        peak = x.detach().abs().reshape(batch_size, -1).amax(1).double().cpu().numpy() * scale  # (B,) max |out|
        if np.any(peak > largest):
            i = int(np.argmax(peak))
            raise ValueError(
                f"Sample {i} gets radius {radius[i]:.4g} (largest value {peak[i]:.4g}), which {dtype} cannot represent"
                f" (largest finite value {largest:.4g}): compute in float32, e.g. `dtype=torch.float32`, or clip the"
                " prior (`upper_norm`)."
            )
    compute_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if scale.max(initial=0.0) > torch.finfo(compute_dtype).max:
        compute_dtype = torch.float64
    scale = torch.from_numpy(scale).to(x.device, compute_dtype).reshape((batch_size,) + (1,) * (x.ndim - 1))
    return (x.to(compute_dtype) * scale).to(dtype)


def kernel_noise(noise: torch.Tensor, sigma, aug_dim: int | None) -> torch.Tensor:
    """Map Gaussian `noise` (B, ...) onto a draw of the PFGM++ kernel at noise level `sigma` (math.md §2).

    The direction of each sample's noise is kept and its radius is moved through the quantiles, so that
    `x + kernel_noise(randn, sigma, D)` is distributed as p_r(y | x) ∝ (|y - x|^2 + r^2)^(-(N + D)/2) with
    r = sigma * sqrt(D). Deterministic given `noise`; `aug_dim=None` returns exactly `sigma * noise` (the Gaussian).
    `sigma` is a float, or a 0-d, (1,) or (B,) tensor.
    """
    check_aug_dim(aug_dim)
    batch_size, N = noise.shape[0], noise[0].numel()
    if aug_dim is None:
        if not isinstance(sigma, torch.Tensor):
            return noise * sigma
        if sigma.numel() not in (1, batch_size):
            raise ValueError(f"Need one noise level or one per sample ({batch_size}), got {sigma.numel()}.")
        return noise * sigma.to(noise.device, noise.dtype).reshape((-1,) + (1,) * (noise.ndim - 1))
    sigma = _noise_levels(sigma, batch_size)
    norm_sq = squared_norms(noise)  # (B,)
    if not np.all(np.isfinite(norm_sq)):
        raise ValueError("`noise` contains NaN or infinite values.")
    return rescale_radii(noise, norm_sq, kernel_radius(norm_sq, N, sigma, aug_dim))


def gaussian(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard Gaussian noise through diffusers' `randn_tensor`, refusing a generator list of the wrong length."""
    shape = tuple(shape)
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(
            f"Got a list of {len(generator)} generators for a batch of {shape[0]}: pass one generator per sample."
        )
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype or torch.float32)


def _standard_gamma(concentration, batch_size, generator, device):
    """Gamma(concentration, 1) draws (B,) in float64 on `device`, from one generator or one per sample."""
    if isinstance(generator, list):
        alphas = [torch.full((1,), concentration, dtype=torch.float64, device=g.device) for g in generator]
        return torch.cat([torch._standard_gamma(a, g).to(device) for a, g in zip(alphas, generator, strict=True)])
    gen_device = generator.device if generator is not None else device
    alpha = torch.full((batch_size,), concentration, dtype=torch.float64, device=gen_device)
    return torch._standard_gamma(alpha, generator=generator).to(device)


def sample_kernel_noise(shape, sigma, aug_dim, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw the PFGM++ kernel perturbation y - x of shape `shape` at noise level `sigma` (math.md §2), on `device`.

    No host round trip (a training step on a GPU never waits for the CPU): the direction is a normalised Gaussian and
    the radius R = r sqrt(G_N / G_D) with G_N ~ Gamma(N/2), G_D ~ Gamma(D/2), since R^2 / r^2 = B / (1 - B) with
    B ~ Beta(N/2, D/2) is the ratio of those Gammas; the ratio keeps its digits where 1 - B would not (D << N).
    Draws: the Gaussian first, then G_N, then G_D. `aug_dim=None` is `sigma * randn`. `sigma` is a float or (B,).
    """
    check_aug_dim(aug_dim)
    noise = gaussian(shape, generator, device, dtype)
    batch_size, N = noise.shape[0], noise[0].numel()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=noise.device).reshape(-1)
    view = (-1,) + (1,) * (noise.ndim - 1)
    if aug_dim is None:
        return noise * sigma.to(noise.dtype).reshape(view)
    ratio = _standard_gamma(N / 2, batch_size, generator, noise.device) / _standard_gamma(
        aug_dim / 2, batch_size, generator, noise.device
    )  # (B,) = B / (1 - B)
    radius = sigma * math.sqrt(aug_dim) * ratio.sqrt()  # (B,) float64
    direction_scale = radius / noise.reshape(batch_size, -1).double().norm(dim=1)  # R / |eps|
    return noise * direction_scale.to(noise.dtype).reshape(view)


def prior_radius(norm_sq, N, sigma_max, aug_dim, upper_norm=None):
    """The prior radius (float64, (B,)) of Gaussian noise with squared norms `norm_sq`: the radial quantile map of
    math.md §2 at r_max = sigma_max sqrt(D), clipped to [1, upper_norm] where `upper_norm` is given (the original
    PFGM's clip of its D = 1 prior, whose radius has an infinite mean)."""
    R = kernel_radius(norm_sq, N, sigma_max, aug_dim)
    if upper_norm is None:
        return R
    if upper_norm < 1:
        raise ValueError(f"`upper_norm` must be >= 1 (the official clip is [1, upper_norm]), got {upper_norm}.")
    return np.clip(R, 1.0, upper_norm)


def prior_from_noise(noise, sigma_max, aug_dim, upper_norm=None, scale=1.0, norm_sq=None):
    """Map `noise`, a draw of `scale` times a standard Gaussian, onto the prior: the one radial prior map.

    Each sample's direction is kept and its radius moved to `prior_radius` of its chi-square quantile; `norm_sq`,
    the squared norms of `noise` (B,) when the caller has them (the one host sync of the map). `aug_dim=None` is
    `noise * sigma_max / scale`. Returns the prior sample in the dtype of `noise`, with its radii (float64, (B,)).
    """
    check_aug_dim(aug_dim)
    if aug_dim is None:
        return noise * (sigma_max if scale == 1.0 else sigma_max / scale), None
    if norm_sq is None:
        norm_sq = squared_norms(noise)  # (B,)
    if not np.all(np.isfinite(norm_sq)):
        raise ValueError("`noise` contains NaN or infinite values.")
    radius = prior_radius(norm_sq / scale**2, noise[0].numel(), sigma_max, aug_dim, upper_norm)
    return rescale_radii(noise, norm_sq, radius), radius


def pfgmpp_prior_from_noise(noise: torch.Tensor, sigma_max: float, aug_dim: int | None) -> torch.Tensor:
    """Map Gaussian `noise` onto the PFGM++ prior: the kernel centred at 0 with r_max = sigma_max * sqrt(D)."""
    return prior_from_noise(noise, sigma_max, aug_dim)[0]


def pfgmpp_noise_from_prior(x: torch.Tensor, sigma_max: float, aug_dim: int | None) -> torch.Tensor:
    """The standard Gaussian `noise` with `pfgmpp_prior_from_noise(noise, sigma_max, aug_dim) == x`: the inverse
    radial quantile map (direction kept, radius R moved to the chi_N radius of the same quantile)."""
    check_aug_dim(aug_dim)
    if aug_dim is None:
        return x / sigma_max
    R_sq = squared_norms(x)  # (B,)
    if not np.all(np.isfinite(R_sq)):
        raise ValueError("`x` contains NaN or infinite values.")
    lower, upper = radius_quantiles(np.sqrt(R_sq), x[0].numel(), sigma_max, aug_dim)
    return rescale_radii(x, R_sq, radius_from_quantiles(lower, upper, x[0].numel(), 1.0, None))


def sample_pfgmpp_prior(shape, sigma_max, aug_dim, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw the PFGM++ prior x_T = R u, R = r_max sqrt(B / (1 - B)), B ~ Beta(N/2, D/2) (math.md §2)."""
    noise = gaussian(shape, generator, device, dtype)
    return pfgmpp_prior_from_noise(noise, sigma_max, aug_dim)


def pfgm_prior_from_noise(noise: torch.Tensor, z_max: float, upper_norm: float | None = None) -> torch.Tensor:
    """Map Gaussian `noise` onto the hyperplane prior of the original PFGM at z = z_max (math.md §3).

    This is the PFGM++ prior with D = 1 and r = z_max. Its radius has an infinite mean, so the official code clips
    it to [1, upper_norm]; `upper_norm=None` applies no clip at all (the exact prior).
    """
    return prior_from_noise(noise, z_max, 1, upper_norm)[0]


def sample_pfgm_prior(shape, z_max, upper_norm=None, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw the hyperplane prior of the original PFGM (see `pfgm_prior_from_noise`)."""
    noise = gaussian(shape, generator, device, dtype)
    return pfgm_prior_from_noise(noise, z_max, upper_norm)


def prior_log_prob(x: torch.Tensor, sigma_max: float, aug_dim: int | None) -> torch.Tensor:
    """Exact log-density (B,) of the PFGM++ prior at `x` (B, ...), in float64.

    For finite D the prior is a multivariate Student-t with D degrees of freedom and scale sigma_max:
    log p = lgamma((N+D)/2) - lgamma(D/2) - N/2 log(pi r^2) - (N+D)/2 log(1 + |x|^2 / r^2), r = sigma_max sqrt(D).
    `aug_dim=None` is N(0, sigma_max^2 I).
    """
    check_aug_dim(aug_dim)
    N = x[0].numel()
    norm_sq = x.reshape(x.shape[0], -1).double().pow(2).sum(1)
    if aug_dim is None:
        return -0.5 * N * math.log(2 * math.pi * sigma_max**2) - norm_sq / (2 * sigma_max**2)
    r_sq = sigma_max**2 * aug_dim
    log_norm = math.lgamma((N + aug_dim) / 2) - math.lgamma(aug_dim / 2) - N / 2 * math.log(math.pi * r_sq)
    return log_norm - (N + aug_dim) / 2 * torch.log1p(norm_sq / r_sq)


def _uniform(shape, generator, device):
    """U[0, 1) drawn on the generator's device (so seeded runs agree across devices), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def pfgm_perturb(x: torch.Tensor, sigma=0.01, tau=0.03, M=291, restrict_M=True, generator=None):
    """Perturb clean data `x` (B, C, H, W) into augmented points (y, z): PFGM Algorithm 2 with the official details.

    m ~ U[0, M) (continuous); eps_x ~ N(0, sigma^2 I_N), eps_z ~ N(0, sigma^2); where |eps_z| < 0.005 and
    `restrict_M`, m is redrawn from U[0, floor(0.7 M)); u uniform on S^{N-1};
    y = x + |eps_x| (1 + tau)^m u, z = |eps_z| (1 + tau)^m, clamped at >= 1e-10 (math.md §3).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: y of the shape of `x` and z of shape (B,), in float32.
    """
    batch_size, device = x.shape[0], x.device
    if sigma <= 0 or tau <= 0 or M <= 0:
        raise ValueError(f"`sigma`, `tau` and `M` must be > 0, got sigma={sigma}, tau={tau}, M={M}.")
    m = _uniform((batch_size,), generator, device) * M  # (B,)
    eps_z = randn_tensor((batch_size,), generator=generator, device=device) * sigma
    if restrict_M:
        redrawn = _uniform((batch_size,), generator, device) * int(M * 0.7)
        m = torch.where(eps_z.abs() < _RESTRICT_M_THRESHOLD, redrawn, m)
    multiplier = (1 + tau) ** m  # (B,)
    eps_x_norm = randn_tensor(x.shape, generator=generator, device=device).reshape(batch_size, -1).norm(dim=1) * sigma
    direction = randn_tensor(x.shape, generator=generator, device=device).reshape(batch_size, -1)
    direction = direction / direction.norm(dim=1, keepdim=True)  # uniform on S^{N-1}
    y = x.float() + (direction * (eps_x_norm * multiplier)[:, None]).reshape(x.shape)
    z = (eps_z.abs() * multiplier).clamp(min=_MIN_Z)
    return y, z
