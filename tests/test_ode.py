"""The ODE step functions and DPM-Solver++(2M) against closed forms (math.md §1)."""

import math

import pytest
import torch

from pfgm_diffusers import PFGMScheduler
from pfgm_diffusers.ode import dpmpp_2m_step, sample_dpmpp_2m

MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2 I)


def gaussian_denoiser(x, sigma):
    """The ideal denoiser of Gaussian data for D = infinity: E[x_0 | x] = MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    sigma = float(sigma)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_flow(x_start, sigma_start, sigma):
    """The exact probability-flow solution for Gaussian data: x(sigma) - MU is proportional to sqrt(S^2 + sigma^2)."""
    return MU + (x_start - MU) * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma_start**2)


def test_first_order_step_is_exact_for_a_constant_denoiser():
    """D constant (one data point): x(sigma) = D + (sigma / sigma_0)(x_0 - D), in either direction (math.md §4)."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma, sigma_next in [(10.0, 2.0), (2.0, 10.0), (0.5, 0.0)]:
        torch.testing.assert_close(dpmpp_2m_step(x, D, sigma, sigma_next), D + sigma_next / sigma * (x - D))
        # the second-order correction vanishes when the previous D is the same
        torch.testing.assert_close(dpmpp_2m_step(x, D, sigma, sigma_next, D, 20.0), D + sigma_next / sigma * (x - D))
    one_point = sample_dpmpp_2m(lambda x, sigma: D, x, [0.01, 0.1, 1.0, 30.0])  # upward: the flow's inverse
    torch.testing.assert_close(one_point, D + 30.0 / 0.01 * (x - D))


def test_second_order_step_extrapolates_the_denoiser_linearly_in_log_sigma():
    """D' = D + (D - D_prev) / (2r): with D_prev one unit of ln sigma back and h = ln(sigma / sigma_next)."""
    x, D, D_prev = torch.tensor([1.0]), torch.tensor([0.2]), torch.tensor([0.6])
    sigma_prev, sigma, sigma_next = 4.0, 2.0, 0.5
    r = math.log(sigma_prev / sigma) / math.log(sigma / sigma_next)
    expected = sigma_next / sigma * x + (1 - sigma_next / sigma) * (D + (D - D_prev) / (2 * r))
    torch.testing.assert_close(dpmpp_2m_step(x, D, sigma, sigma_next, D_prev, sigma_prev), expected)
    # into sigma = 0 and over a step of length 0 it is first order (k-diffusion's and diffusers' last step)
    torch.testing.assert_close(dpmpp_2m_step(x, D, sigma, 0.0, D_prev, sigma_prev), D)
    assert torch.equal(dpmpp_2m_step(x, D, sigma, sigma, D_prev, sigma_prev), x)
    torch.testing.assert_close(dpmpp_2m_step(x, D, sigma, sigma_next, D_prev, sigma), dpmpp_2m_step(x, D, sigma, 0.5))


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_dpmpp_2m_converges_at_second_order_on_gaussian_data(schedule):
    """Errors against the closed-form flow fall 4x per doubling of the steps (measured orders 2.07-2.16 Karras,
    2.00-2.01 exponential, at 32 -> 64 -> 128 steps)."""
    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    errors = []
    for n in (32, 64, 128):
        scheduler = PFGMScheduler(aug_dim=None, solver="dpmpp_2m", sigma_schedule=schedule)
        scheduler.set_timesteps(n)
        sigmas = scheduler.sigmas[:-1].double()  # sigma_max .. sigma_min (the step into 0 is first order)
        x = sample_dpmpp_2m(gaussian_denoiser, x_T, sigmas)
        errors.append((x - gaussian_flow(x_T, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(1.8 < order < 2.3 for order in orders), (errors, orders)


def test_scheduler_steps_are_the_pure_solver():
    """`PFGMScheduler(solver="dpmpp_2m").step` calls the same step function as `sample_dpmpp_2m`: equal results."""
    scheduler = PFGMScheduler(aug_dim=None, solver="dpmpp_2m", prediction_type="sample", final_sigmas_type="sigma_min")
    scheduler.set_timesteps(40)
    x_T = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2)) * 80
    x = x_T
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(gaussian_denoiser(x, scheduler.sigmas[scheduler.step_index]), t, x).prev_sample
    assert torch.equal(x, sample_dpmpp_2m(gaussian_denoiser, x_T, scheduler.sigmas))
    torch.testing.assert_close(x, gaussian_flow(x_T, 80.0, 0.002), rtol=0, atol=0.05)
