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

# Below this |eps_z| the official PFGM code redraws m from U[0, 0.7 M) ("restrict_M", PFGM Appendix B.1.1).
_RESTRICT_M_THRESHOLD = 0.005
# The official PFGM clamps the perturbed z from below so that log z and 1/z stay finite.
_MIN_Z = 1e-10


def _check_aug_dim(aug_dim):
    if aug_dim is None:
        return
    if isinstance(aug_dim, bool) or not isinstance(aug_dim, (int, np.integer)) or aug_dim < 1:
        raise ValueError(f"`aug_dim` must be an integer >= 1 or None (D = infinity), got {aug_dim!r}.")


def _per_sample(value, batch_size, device):
    """`value` (float, 0-d or (B,) tensor) as a float64 CPU array of shape (B,)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).reshape(-1).numpy()
    value = np.broadcast_to(np.asarray(value, dtype=np.float64), (batch_size,))
    if not np.all(np.isfinite(value)) or np.any(value < 0):
        raise ValueError(f"noise levels must be finite and >= 0, got {value.tolist()}.")
    return value


def radius_quantiles(R, N, sigma, aug_dim):
    """(P(R' <= R), P(R' > R)) for the kernel radius R' at noise level `sigma` (float64 arrays; math.md §2).

    R^2 / (R^2 + r^2) ~ Beta(N/2, D/2) with r = sigma sqrt(D); (R / sigma)^2 ~ chi^2_N for `aug_dim=None`. Both tails
    are returned, each computed directly, so that neither loses digits where the other is close to 1.
    """
    R = np.asarray(R, dtype=np.float64)
    if aug_dim is None:
        half_sq = R**2 / (2 * sigma**2)
        return special.gammainc(N / 2, half_sq), special.gammaincc(N / 2, half_sq)
    r_sq = sigma**2 * aug_dim
    beta, beta_c = R**2 / (R**2 + r_sq), r_sq / (R**2 + r_sq)
    return special.betainc(N / 2, aug_dim / 2, beta), special.betainc(aug_dim / 2, N / 2, beta_c)


def radius_from_quantiles(lower, upper, N, sigma, aug_dim):
    """The kernel radius R with P(R' <= R) = `lower` and P(R' > R) = `upper` (the inverse of `radius_quantiles`).

    For finite D, B = F^{-1}_{Beta(N/2, D/2)}(lower) and R = r sqrt(B / (1 - B)), with 1 - B inverted from its own
    tail (1 - B ~ Beta(D/2, N/2) at probability `upper`) so that it keeps its digits for D << N (B ~ 1).
    """
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    if aug_dim is None:
        half_sq = np.where(lower < 0.5, special.gammaincinv(N / 2, lower), special.gammainccinv(N / 2, upper))
        return sigma * np.sqrt(2 * half_sq)
    beta = special.betaincinv(N / 2, aug_dim / 2, lower)  # B
    beta_c = special.betaincinv(aug_dim / 2, N / 2, upper)  # 1 - B
    return sigma * math.sqrt(aug_dim) * np.sqrt(beta / beta_c)


def radius_to_normal(R, N, sigma, aug_dim):
    """The standard normal value with the same quantile as the kernel radius R (both tails kept, float64)."""
    lower, upper = radius_quantiles(R, N, sigma, aug_dim)
    return np.where(lower < 0.5, special.ndtri(lower), -special.ndtri(upper))


def normal_to_radius(normal, N, sigma, aug_dim):
    """The kernel radius with the same quantile as the standard normal value `normal` (inverse of radius_to_normal)."""
    normal = np.asarray(normal, dtype=np.float64)
    return radius_from_quantiles(special.ndtr(normal), special.ndtr(-normal), N, sigma, aug_dim)


def kernel_noise(noise: torch.Tensor, sigma, aug_dim: int | None) -> torch.Tensor:
    """Map Gaussian `noise` (B, ...) onto a draw of the PFGM++ kernel at noise level `sigma` (math.md §2).

    The direction of each sample's noise is kept and its radius is moved through the quantiles, so that
    `x + kernel_noise(randn, sigma, D)` is distributed as p_r(y | x) ∝ (|y - x|^2 + r^2)^(-(N + D)/2) with
    r = sigma * sqrt(D). Deterministic given `noise`; `aug_dim=None` returns exactly `sigma * noise` (the Gaussian).
    """
    _check_aug_dim(aug_dim)
    batch_size, N = noise.shape[0], noise[0].numel()
    view = (batch_size,) + (1,) * (noise.ndim - 1)
    if aug_dim is None:
        if not isinstance(sigma, torch.Tensor):
            return noise * sigma
        return noise * sigma.to(noise.device, noise.dtype).reshape(view)
    sigma = _per_sample(sigma, batch_size, noise.device)
    norm_sq = noise.detach().reshape(batch_size, -1).double().pow(2).sum(1).cpu().numpy()  # (B,)
    if not np.all(np.isfinite(norm_sq)):
        raise ValueError("`noise` contains NaN or infinite values.")
    # q = F_{chi2_N}(|eps|^2), kept in both tails, then the kernel radius with the same quantile
    lower, upper = special.gammainc(N / 2, norm_sq / 2), special.gammaincc(N / 2, norm_sq / 2)
    R = radius_from_quantiles(lower, upper, N, sigma, aug_dim)  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norm_sq > 0, R / np.sqrt(norm_sq), 0.0)  # R / |eps|
    scale = torch.from_numpy(scale).to(noise.device, noise.dtype).reshape(view)
    return noise * scale


def gaussian(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard Gaussian noise through diffusers' `randn_tensor`, refusing a generator list of the wrong length."""
    shape = tuple(shape)
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(
            f"Got a list of {len(generator)} generators for a batch of {shape[0]}: pass one generator per sample."
        )
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype or torch.float32)


def sample_kernel_noise(shape, sigma, aug_dim, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw the PFGM++ kernel perturbation y - x of shape `shape` at noise level `sigma` (math.md §2)."""
    noise = gaussian(shape, generator, device, dtype)
    return kernel_noise(noise, sigma, aug_dim)


def pfgmpp_prior_from_noise(noise: torch.Tensor, sigma_max: float, aug_dim: int | None) -> torch.Tensor:
    """Map Gaussian `noise` onto the PFGM++ prior: the kernel centred at 0 with r_max = sigma_max * sqrt(D)."""
    return kernel_noise(noise, sigma_max, aug_dim)


def pfgmpp_noise_from_prior(x: torch.Tensor, sigma_max: float, aug_dim: int | None) -> torch.Tensor:
    """The standard Gaussian `noise` with `pfgmpp_prior_from_noise(noise, sigma_max, aug_dim) == x`: the inverse
    radial quantile map (direction kept, radius R moved to the chi_N radius of the same quantile)."""
    _check_aug_dim(aug_dim)
    batch_size, N = x.shape[0], x[0].numel()
    if aug_dim is None:
        return x / sigma_max
    R = x.detach().reshape(batch_size, -1).double().norm(dim=1).cpu().numpy()  # (B,)
    if not np.all(np.isfinite(R)):
        raise ValueError("`x` contains NaN or infinite values.")
    lower, upper = radius_quantiles(R, N, sigma_max, aug_dim)
    norm = radius_from_quantiles(lower, upper, N, 1.0, None)  # |noise| with the same quantile
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(R > 0, norm / R, 0.0)
    return x * torch.from_numpy(scale).to(x.device, x.dtype).reshape((batch_size,) + (1,) * (x.ndim - 1))


def sample_pfgmpp_prior(shape, sigma_max, aug_dim, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw the PFGM++ prior x_T = R u, R = r_max sqrt(B / (1 - B)), B ~ Beta(N/2, D/2) (math.md §2)."""
    noise = gaussian(shape, generator, device, dtype)
    return pfgmpp_prior_from_noise(noise, sigma_max, aug_dim)


def pfgm_prior_from_noise(noise: torch.Tensor, z_max: float, upper_norm: float | None = None) -> torch.Tensor:
    """Map Gaussian `noise` onto the hyperplane prior of the original PFGM at z = z_max (math.md §3).

    This is the PFGM++ prior with D = 1 and r = z_max. Its radius has an infinite mean, so the official code clips
    it to [1, upper_norm]; `upper_norm=None` applies no clip at all (the exact prior).
    """
    x = pfgmpp_prior_from_noise(noise, z_max, 1)
    if upper_norm is None:
        return x
    if upper_norm < 1:
        raise ValueError(f"`upper_norm` must be >= 1 (the official clip is [1, upper_norm]), got {upper_norm}.")
    norm = x.reshape(x.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * (norm.clamp(1.0, upper_norm) / norm)


def sample_pfgm_prior(shape, z_max, upper_norm=None, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw the hyperplane prior of the original PFGM (see `pfgm_prior_from_noise`)."""
    noise = gaussian(shape, generator, device, dtype)
    return pfgm_prior_from_noise(noise, z_max, upper_norm)


def prior_log_prob(x: torch.Tensor, sigma_max: float, aug_dim: int | None) -> torch.Tensor:
    """Exact log-density (B,) of the PFGM++ prior at `x` (B, ...), in float64.

    For finite D the prior is a multivariate Student-t with D degrees of freedom and scale sigma_max:
    log p = lgamma((N+D)/2) - lgamma(D/2) - N/2 log(pi r^2) - (N+D)/2 log(1 + |x|^2 / r^2), r = sigma_max sqrt(D).
    `aug_dim=None` is N(0, sigma_max^2 I). The original PFGM's hyperplane prior is `aug_dim=1, sigma_max=z_max`.
    """
    _check_aug_dim(aug_dim)
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
