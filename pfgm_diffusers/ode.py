"""The probability-flow ODE of every mode, dx/dsigma = (x - D(x, sigma)) / sigma (math.md §1), and its solvers.

In field mode sigma is z and D = x - z v_x / v_z. The step functions below are shared by `PFGMScheduler.step` (one
model call at a time) and the pipeline's solvers, which take a denoiser `denoise(x, sigma)` and a list of sigmas whose
order is the direction of integration (k-diffusion's convention).
"""

import math

import torch


def to_d(x, denoised, sigma):
    """The ODE's slope dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 4 with s = 1; math.md §1)."""
    return (x - denoised) / sigma


def euler_step(x, d, sigma, sigma_next):
    """One Euler step of dx/dsigma = d from sigma to sigma_next (either direction)."""
    return x + (sigma_next - sigma) * d


def heun_step(x, d, d_next, sigma, sigma_next):
    """Heun's correction: the mean of the slopes at both ends of the step (EDM Algorithm 1, lines 7-8)."""
    return x + (sigma_next - sigma) * (d + d_next) / 2


# DPM-Solver++(2M)


def dpmpp_2m_step(x, denoised, sigma, sigma_next, previous_denoised=None, sigma_previous=None):
    """One step of DPM-Solver++(2M) from `sigma` to `sigma_next` (Lu et al. 2022, arXiv:2211.01095, Algorithm 2).

    The ODE dx/dsigma = (x - D) / sigma is linear in x, so in t = -ln sigma it is integrated exactly apart from D:
    x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D', with D' = D (first order, DDIM) when there is no
    `previous_denoised` (taken at `sigma_previous`) or when sigma_next = 0, and otherwise the multistep's linear
    extrapolation D' = D + (D - D_previous) / (2 r), r = ln(sigma_previous / sigma) / ln(sigma / sigma_next).
    Field mode is the same in z (math.md §1). Sigmas are Python floats or CPU scalars (read on the host); the
    direction of the step is the order of `sigma` and `sigma_next`.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    denoised = denoised.to(x.dtype)
    # A step of length 0 returns x; one after a step of length 0 has no slope to extrapolate (r = 0): first order.
    second_order = previous_denoised is not None and sigma_next > 0
    if second_order and sigma_next != sigma and float(sigma_previous) != sigma:
        r = math.log(float(sigma_previous) / sigma) / math.log(sigma / sigma_next)
        denoised = torch.lerp(denoised, previous_denoised.to(x.dtype), -1 / (2 * r))  # D + (D - D_previous) / 2r
    return torch.lerp(denoised, x, sigma_next / sigma)  # (sigma_next / sigma) x + (1 - sigma_next / sigma) D'


def sample_dpmpp_2m(denoise, x, sigmas):
    """Integrate from sigmas[0] to sigmas[-1] with DPM-Solver++(2M): one `denoise(x, sigma)` call per step, each step
    second order from the previous call's denoised estimate except the first and one that ends at sigma = 0."""
    previous_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = dpmpp_2m_step(x, denoised, sigmas[i], sigmas[i + 1], previous_denoised, sigmas[i - 1] if i > 0 else None)
        previous_denoised = denoised
    return x
