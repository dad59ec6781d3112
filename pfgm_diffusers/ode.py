"""The probability-flow ODE of every mode, dx/dsigma = (x - D(x, sigma)) / sigma (math.md §1), and its solvers.

In field mode sigma is z and D = x - z v_x / v_z. Two tables name the solvers, one entry per name:

- `SAMPLERS`: pure functions `sampler(denoise, x, sigmas, **options) -> x` of a denoiser `denoise(x, sigma)`
  (float32 tensors in and out, `sigma` a Python float) and of the noise levels to visit, k-diffusion style: the order
  of `sigmas` is the direction of integration, descending to sample, ascending to invert. `"rk45"` visits only the
  ends, `sigmas[0]` and `sigmas[-1]`, adaptively (scipy's RK45 in t = ln sigma, the original PFGM's sampler).
  `"restart"` is Restart sampling (`restart.py`): Heun along descending `sigmas` with forward jumps drawn from
  `generator`, for PFGM++ of any `aug_dim`; it has no stepper (docs/scheduler.md says why).
- `STEPPERS`: one model call of a scheduler's run, `stepper.call(x, denoised, sigma, sigma_next, state, last)`
  returning `(x_next, state)`; `state` is what the solver carries to the next call (None at a run's first), `last`
  whether this is the run's last call. `PFGMScheduler.step` is diffusers bookkeeping around it.

`solve_log_likelihood` integrates the same ODE with the log-density change, d delta/dt = div_x (x - D) (Hutchinson).
The adaptive solvers run scipy's official RK45 on a float64 copy of the state on the host: measured on CPU, about 2%
of the time per evaluation next to a 1.1M-parameter UNet (benchmarks/bench_pipeline_ode.py, docs/pipeline.md).
"""

import math
from typing import NamedTuple

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


def sample_euler(denoise, x: torch.Tensor, sigmas, **options) -> torch.Tensor:
    """Euler steps from sigmas[0] through each of `sigmas` (either direction, all > 0 but the last); len - 1 calls."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = euler_step(x, to_d(x, denoise(x, sigma), sigma), sigma, sigma_next)
    return x


def sample_heun(denoise, x: torch.Tensor, sigmas, data_end: float = 0.0, **options) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Algorithm 1, no churn) along `sigmas`, either direction.

    One rule for every mode: two denoiser calls per step, one for the step that ends at `data_end`, the level where a
    sampling run lands on the data, which is Euler (no D is evaluated there): sigma = 0 for PFGM++ and EDM (EDM's
    final step, x = D(x, sigma)), z_min for the field model (`flow.data_end`; the official PFGM's Heun, 2n - 1 calls).
    The schedulers' Heun (`heun_call`) is the same rule: their runs end at that level, and their last call is Euler.
    2 (n - 1) calls along n levels none of which ends a step at `data_end` (an inversion, which starts there), 2n - 1
    with a trailing `data_end`.
    """
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = to_d(x, denoise(x, sigma), sigma)
        x_next = euler_step(x, d, sigma, sigma_next)
        if sigma_next != data_end:
            d_next = to_d(x_next, denoise(x_next, sigma_next), sigma_next)
            x_next = heun_step(x, d, d_next, sigma, sigma_next)
        x = x_next
    return x


class EvaluationBudgetExceeded(RuntimeError):
    """RK45 needed more denoiser calls than its `max_evaluations`; `sigma` is the level it had reached."""

    def __init__(self, evaluations: int, sigma: float):
        super().__init__(
            f"RK45 stopped after {evaluations} denoiser calls (`max_evaluations`), at sigma = {sigma:.4g}: its step"
            " size collapsed there, or the tolerances are tighter than the budget allows."
        )
        self.evaluations, self.sigma = evaluations, sigma


def sample_rk45(
    denoise,
    x: torch.Tensor,
    sigmas,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    carry_sigma: bool = False,
    max_evaluations: int | None = None,
    callback=None,
) -> torch.Tensor:
    """scipy's RK45 (`solve_ivp`) of dx/dt = x - D(x, sigma), t = ln sigma, from `sigmas[0]` to `sigmas[-1]`.

    `carry_sigma=True` is the original PFGM's state layout (`sampling.py:get_rk45_sampler_pfgm`): an extra channel
    filled with z = e^t, dz/dt = z, integrated with the image so that it enters the error control as there.
    `max_evaluations`: raise `EvaluationBudgetExceeded` instead of making call number `max_evaluations + 1`.
    `callback({"x", "sigma", "denoised", "evaluations"})` is called after every denoiser call.

    Returns:
        `torch.Tensor`: x at `sigmas[-1]` (float32, on x's device).
    """
    sigma_from, sigma_to = float(sigmas[0]), float(sigmas[-1])
    device, batch_size, channels = x.device, x.shape[0], x.shape[1]
    state_shape = (batch_size, channels + 1, *x.shape[2:]) if carry_sigma else tuple(x.shape)
    reached = [sigma_from, 0]  # (the level nearest sigma_to so far, evaluations)

    def ode_func(t, state):
        sigma = math.exp(t)
        if max_evaluations is not None and reached[1] >= max_evaluations:
            raise EvaluationBudgetExceeded(reached[1], reached[0])
        sample = torch.from_numpy(state.reshape(state_shape)).to(device, torch.float32)[:, :channels]
        denoised = denoise(sample, sigma)
        reached[:] = [sigma if abs(t - span[1]) < abs(math.log(reached[0]) - span[1]) else reached[0], reached[1] + 1]
        if callback is not None:
            callback({"x": sample, "sigma": sigma, "denoised": denoised, "evaluations": reached[1]})
        slope = sample - denoised  # dx/dt = sigma dx/dsigma
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
    return final[:, :channels]


def solve_rk45(denoise, x, sigma_from, sigma_to, rtol, atol, carry_sigma=False) -> tuple[torch.Tensor, int]:
    """The previous interface of `sample_rk45`, kept for callers not yet moved: x at `sigma_to` and the number of
    denoiser calls. New code calls `SAMPLERS["rk45"](denoise, x, [sigma_from, sigma_to], ...)` (a budget:
    `max_evaluations`; each call: `callback`)."""
    calls = []
    x = sample_rk45(denoise, x, [sigma_from, sigma_to], rtol, atol, carry_sigma, callback=calls.append)
    return x, len(calls)


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


def sample_dpmpp_2m(denoise, x: torch.Tensor, sigmas, **options) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1] with DPM-Solver++(2M): one `denoise(x, sigma)` call per step, each step
    second order from the previous call's denoised estimate except the first and one that ends at sigma = 0."""
    previous_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = dpmpp_2m_step(x, denoised, sigmas[i], sigmas[i + 1], previous_denoised, sigmas[i - 1] if i > 0 else None)
        previous_denoised = denoised
    return x


def sample_restart(denoise, x: torch.Tensor, sigmas, restart_blocks=None, aug_dim=None, generator=None, **options):
    """Restart sampling (Xu et al. 2023; `restart.sample_restart`) along descending `sigmas` ending at 0: EDM's Heun
    with the blocks `restart_blocks` (default `restart.RESTART_CIFAR10`), the jumps for `aug_dim` (None = EDM) drawn
    from `generator`. 2n - 1 calls for n levels > 0, plus 2 K (N_restart - 1) per block."""
    from . import restart  # restart.py builds on sample_heun: imported at the call, not at this module's load

    return restart.sample_restart(denoise, x, sigmas, restart_blocks, aug_dim, generator)


# The scheduler's steps: one model call each (diffusers' layout).


def euler_call(x, denoised, sigma, sigma_next, state, last):
    """One Euler step from `sigma` to `sigma_next`; no state."""
    return euler_step(x, to_d(x, denoised, sigma), sigma, sigma_next), None


def heun_call(x, denoised, sigma, sigma_next, state, last):
    """Half of a Heun step, in `HeunDiscreteScheduler`'s layout: the predictor (an Euler step, whose start the state
    keeps unless this is the run's last call, the step onto the data: `sample_heun`'s rule) or, with a state, the
    corrector at `sigma`."""
    d = to_d(x, denoised, sigma)  # dx/dsigma (dx/dz in field mode)
    if state is None:
        return euler_step(x, d, sigma, sigma_next), None if last else (x, d, sigma)
    x_start, d_start, sigma_start = state
    return heun_step(x_start, d_start, d, sigma_start, sigma), None


def dpmpp_2m_call(x, denoised, sigma, sigma_next, state, last):
    """One DPM-Solver++(2M) step; the state is the previous call's (D, sigma)."""
    previous_denoised, sigma_previous = (None, None) if state is None else state
    return dpmpp_2m_step(x, denoised, sigma, sigma_next, previous_denoised, sigma_previous), (denoised, sigma)


class Stepper(NamedTuple):
    """A solver as a scheduler runs it: its per-call step and how diffusers counts and lays out its calls."""

    call: object  # (x, denoised, sigma, sigma_next, state, last) -> (x_next, state)
    order: int  # model calls per step, diffusers' `scheduler.order`
    repeats_levels: bool  # interior noise levels visited twice (HeunDiscreteScheduler's layout)


STEPPERS = {
    "heun": Stepper(heun_call, order=2, repeats_levels=True),
    "euler": Stepper(euler_call, order=1, repeats_levels=False),
    "dpmpp_2m": Stepper(dpmpp_2m_call, order=1, repeats_levels=False),
}

SAMPLERS = {
    "heun": sample_heun,
    "euler": sample_euler,
    "dpmpp_2m": sample_dpmpp_2m,
    "rk45": sample_rk45,
    "restart": sample_restart,
}
