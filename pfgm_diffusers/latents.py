"""The pipeline's one latent space: standard Gaussian latents (B, C, H, W), and their interpolation.

The rule of where a run starts is in docs/scheduler.md ("Where a sampling run starts").

A standard Gaussian x in R^N is R u with u uniform on the sphere and R ~ chi_N independent of u. The scheduler maps
latents onto its prior radially (`PFGMScheduler.prior_from_noise`), so an interpolant that is again standard
Gaussian is again a prior draw once mapped, whatever the scheduler.
"""

import math

import numpy as np
import torch

from .perturbation import chi2_quantiles, normal_to_radius, radius_to_normal, squared_norms


def slerp_gaussian(latents_a: torch.Tensor, latents_b: torch.Tensor, t) -> torch.Tensor:
    """Interpolants of standard Gaussian latents that are again standard Gaussian (for independent endpoints).

    `t` is a float (result (B, ...)) or a 1-D sequence (result (len(t) * B, ...), weight-major); t = 0 and 1 return
    the endpoints. Zero, non-finite or opposite endpoints and weights outside [0, 1] raise a `ValueError`.
    """
    if latents_a.shape != latents_b.shape:
        raise ValueError(f"latents_a {tuple(latents_a.shape)} and latents_b {tuple(latents_b.shape)} differ.")
    scalar = isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.ndim == 0)
    weights = np.atleast_1d(np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float64))
    if weights.ndim != 1 or not np.all((weights >= 0) & (weights <= 1)):
        raise ValueError(f"t must be a float or a 1-D sequence of floats in [0, 1], got {t!r}.")
    batch_size = latents_a.shape[0]
    a, b = _flat(latents_a, "latents_a"), _flat(latents_b, "latents_b")  # (B, N) float64 on the CPU
    radius_a, radius_b = a.norm(dim=1), b.norm(dim=1)  # (B,)
    direction = _slerp_directions(a / radius_a[:, None], b / radius_b[:, None], torch.from_numpy(weights))
    radius = _interpolate_chi_radii(radius_a, radius_b, weights, a.shape[1])  # (T, B)
    out = (direction * radius[..., None]).reshape(len(weights) * batch_size, *latents_a.shape[1:])
    out = out.to(latents_a.device, latents_a.dtype)
    return out[:batch_size] if scalar else out


def _flat(latents: torch.Tensor, name: str) -> torch.Tensor:
    """(B, N) float64 copy; a zero or non-finite latent has no direction to interpolate."""
    flat = latents.detach().reshape(latents.shape[0], -1).cpu().double()
    bad = ~torch.isfinite(flat).all(1) | (flat.norm(dim=1) == 0)
    if bad.any():
        raise ValueError(f"{name}[{bad.nonzero()[0, 0].item()}] is zero or not finite: it has no direction.")
    return flat


def _slerp_directions(u_a: torch.Tensor, u_b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Unit directions (T, B, N) along the great circle from u_a to u_b (B, N): slerp is rotation-equivariant, so
    independent uniform directions give uniform interpolants."""
    cos_theta = (u_a * u_b).sum(1).clamp(-1, 1)
    theta = torch.arccos(cos_theta)[None, :, None]  # (1, B, 1)
    parallel = torch.sin(theta) < 1e-6
    if (parallel[0, :, 0] & (cos_theta < 0)).any():
        raise ValueError("latents_a and latents_b point in opposite directions: no unique great circle joins them.")
    w = weights[:, None, None]  # (T, 1, 1)
    slerped = (torch.sin((1 - w) * theta) * u_a + torch.sin(w * theta) * u_b) / torch.sin(theta)
    lerped = (1 - w) * u_a + w * u_b  # nearly equal directions: slerp's 0/0 becomes a normalised lerp
    direction = torch.where(parallel, lerped, slerped)
    return direction / direction.norm(dim=2, keepdim=True)


def _interpolate_chi_radii(radius_a, radius_b, weights: np.ndarray, N: int) -> torch.Tensor:
    """Radii (T, B) through the chi_N quantiles: n = Phi^-1(F(R)), n_t = cos(pi t / 2) n_a + sin(pi t / 2) n_b is
    N(0, 1) for independent endpoints, R_t = F^-1(Phi(n_t)) (the kernel radius maps of math.md §2, sigma = 1,
    D = infinity); the endpoints exactly, whatever the round trip through the quantiles loses."""
    n_a, n_b = radius_to_normal(radius_a.numpy(), N, 1.0, None), radius_to_normal(radius_b.numpy(), N, 1.0, None)
    angle = np.pi / 2 * weights[:, None]  # (T, 1)
    radius = torch.from_numpy(normal_to_radius(np.cos(angle) * n_a + np.sin(angle) * n_b, N, 1.0, None))
    at_a, at_b = torch.from_numpy(weights == 0)[:, None], torch.from_numpy(weights == 1)[:, None]
    return torch.where(at_a, radius_a, torch.where(at_b, radius_b, radius))


# A start whose |latents|^2 has a chi-square tail probability below this is not standard Gaussian (and one that big
# is certain to be a prior sample: sigma_max times a Gaussian's radius).
FAR_LATENTS_PROBABILITY = 1e-12


def check_standard_gaussian(latents, fix: str) -> None:
    """Refuse non-finite latents, and prior samples (what the previous release took as latents)."""
    norm_sq = squared_norms(latents)  # (B,): one host sync
    if not np.all(np.isfinite(norm_sq)):
        raise ValueError("`latents` contain NaN or infinite values.")
    N = latents[0].numel()
    _, upper = chi2_quantiles(norm_sq, N)
    if np.any((upper < FAR_LATENTS_PROBABILITY) & (norm_sq > N)):
        i = int(np.argmin(upper))
        raise ValueError(
            f"`latents` must be standard Gaussian, but latents[{i}] has radius {math.sqrt(norm_sq[i]):.4g},"
            f" {math.sqrt(norm_sq[i] / N):.3g} times a standard Gaussian's (sqrt(N) = {math.sqrt(N):.4g}): prior"
            f" samples, as the previous release took them? Convert them with {fix}."
        )
