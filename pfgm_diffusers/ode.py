"""The probability-flow ODE of every mode, dx/dsigma = (x - D(x, sigma)) / sigma (math.md §1), and its solvers.

In field mode sigma is z and D = x - z v_x / v_z. The step functions below are shared by `PFGMScheduler.step` (one
model call at a time) and the solvers, which are pure functions of a denoiser `denoise(x, sigma) -> D(x, sigma)`
(float32 tensors in and out, `sigma` a Python float) and of the noise levels to visit, k-diffusion style: the order of
`sigmas` is the direction of integration, descending to sample, ascending to invert.

- `sample_euler`, `sample_heun`: fixed steps in sigma along `sigmas`.
- `solve_rk45`: scipy's adaptive RK45 in t = ln sigma, dx/dt = x - D(x, sigma) (the original PFGM's default sampler).
- `solve_log_likelihood`: the same ODE with the log-density change, d delta/dt = div_x (x - D) (Hutchinson).

The adaptive solvers run scipy's official RK45 on a float64 copy of the state on the host: measured on CPU, about 2%
of the time per evaluation next to a 1.1M-parameter UNet (benchmarks/bench_pipeline_ode.py, docs/pipeline.md).
"""

import math

import numpy as np
import torch
from scipy import integrate


def to_d(x, denoised, sigma):
    """The ODE's slope dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 4 with s = 1; math.md §1)."""
    return (x - denoised) / sigma


def euler_step(x, d, sigma, sigma_next):
    """One Euler step of dx/dsigma = d from sigma to sigma_next (either direction)."""
    return x + (sigma_next - sigma) * d


def heun_step(x, d, d_next, sigma, sigma_next):
    """Heun's correction: the mean of the slopes at both ends of the step (EDM Algorithm 1, lines 7-8)."""
    return x + (sigma_next - sigma) * (d + d_next) / 2


def sample_euler(denoise, x: torch.Tensor, sigmas) -> torch.Tensor:
    """Euler steps from sigmas[0] through each of `sigmas` (either direction, all > 0 but the last); len - 1 calls."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = euler_step(x, to_d(x, denoise(x, sigma), sigma), sigma, sigma_next)
    return x


def sample_heun(denoise, x: torch.Tensor, sigmas) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Algorithm 1, no churn) along `sigmas`, either direction.

    Two denoiser calls per step, one for a final step to sigma = 0, which is Euler (x = D(x, sigma)): 2 (n - 1) calls
    for n levels > 0, 2n - 1 with a trailing 0.
    """
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = to_d(x, denoise(x, sigma), sigma)
        x_next = euler_step(x, d, sigma, sigma_next)
        if sigma_next != 0:
            d_next = to_d(x_next, denoise(x_next, sigma_next), sigma_next)
            x_next = heun_step(x, d, d_next, sigma, sigma_next)
        x = x_next
    return x


def solve_rk45(
    denoise, x: torch.Tensor, sigma_from: float, sigma_to: float, rtol: float, atol: float, carry_sigma: bool = False
) -> tuple[torch.Tensor, int]:
    """scipy's RK45 (`solve_ivp`) of dx/dt = x - D(x, sigma), t = ln sigma, from `sigma_from` to `sigma_to`.

    `carry_sigma=True` is the original PFGM's state layout (`sampling.py:get_rk45_sampler_pfgm`): an extra channel
    filled with z = e^t, dz/dt = z, integrated with the image so that it enters the error control as there.

    Returns:
        `tuple(torch.Tensor, int)`: x at `sigma_to` (float32, on x's device) and the number of denoiser calls.
    """
    device, batch_size, channels = x.device, x.shape[0], x.shape[1]
    state_shape = (batch_size, channels + 1, *x.shape[2:]) if carry_sigma else tuple(x.shape)

    def ode_func(t, state):
        sigma = math.exp(t)
        sample = torch.from_numpy(state.reshape(state_shape)).to(device, torch.float32)[:, :channels]
        slope = sample - denoise(sample, sigma)  # dx/dt = sigma dx/dsigma
        if carry_sigma:
            slope = torch.cat([slope, torch.full_like(slope[:, :1], sigma)], dim=1)
        return slope.double().cpu().numpy().reshape(-1)

    initial = x.double()
    if carry_sigma:
        initial = torch.cat([initial, torch.full_like(initial[:, :1], sigma_from)], dim=1)
    span = (math.log(sigma_from), math.log(sigma_to))
    solution = integrate.solve_ivp(
        ode_func, span, initial.cpu().numpy().reshape(-1), method="RK45", rtol=rtol, atol=atol
    )
    if not solution.success:
        raise RuntimeError(f"RK45 failed between sigma={sigma_from} and sigma={sigma_to}: {solution.message}")
    final = torch.from_numpy(solution.y[:, -1].reshape(state_shape)).to(device, torch.float32)
    return final[:, :channels], int(solution.nfev)


def solve_log_likelihood(
    denoise, x: torch.Tensor, probe: torch.Tensor, sigma_from: float, sigma_to: float, rtol: float, atol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The probability-flow likelihood ODE (score_sde / PFGM `likelihood.py`) with scipy's RK45 in t = ln sigma.

    Integrates [x, delta]: dx/dt = x - D(x, sigma) and d delta/dt = div_x (x - D), the divergence estimated as
    probe . J probe with one `probe` per sample (Hutchinson), J by a vector-Jacobian product. `denoise` must be
    differentiable. The state is float64; each evaluation is float32 (the network casts its own input).

    Returns:
        `tuple(torch.Tensor, torch.Tensor, int)`: x at `sigma_to` (float32), delta (B,) float64, and the number of
        denoiser calls (each a forward and a backward pass). log p(x) = log p_prior(x at sigma_to) + delta.
    """
    device, shape, batch_size = x.device, tuple(x.shape), x.shape[0]
    probe = probe.to(device, torch.float32)

    def ode_func(t, state):
        sample = torch.from_numpy(state[:-batch_size].reshape(shape)).to(device, torch.float32)
        with torch.enable_grad():
            sample.requires_grad_(True)
            slope = sample - denoise(sample, math.exp(t))
            (vjp,) = torch.autograd.grad((slope * probe).sum(), sample)
        divergence = (vjp * probe).reshape(batch_size, -1).sum(1)  # (B,)
        return np.concatenate([slope.detach().double().cpu().numpy().reshape(-1), divergence.double().cpu().numpy()])

    initial = np.concatenate([x.detach().double().cpu().numpy().reshape(-1), np.zeros(batch_size)])
    span = (math.log(sigma_from), math.log(sigma_to))
    solution = integrate.solve_ivp(ode_func, span, initial, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"RK45 failed in the likelihood ODE: {solution.message}")
    final = solution.y[:, -1]
    x_final = torch.from_numpy(final[:-batch_size].reshape(shape)).to(device, torch.float32)
    return x_final, torch.from_numpy(final[-batch_size:]).to(device), int(solution.nfev)


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
