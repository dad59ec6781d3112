"""The pure ODE solvers of `ode.py` (sample_euler, sample_heun, solve_rk45, solve_log_likelihood): closed forms,
orders of convergence, both directions, evaluation counts, and agreement with the scheduler's own steps."""

import math

import pytest
import torch
from exact_networks import exact_network, run_loop

from pfgm_diffusers import PFGMFieldScheduler, flow, ode, scheduling_pfgm
from pfgm_diffusers.field import ideal_denoiser
from pfgm_diffusers.scheduling_pfgm import PFGMScheduler

MU, S = 0.1, 0.3  # data ~ N(MU, S^2 I)


def gaussian_denoiser(x, sigma):
    """The exact denoiser of N(MU, S^2 I) data under Gaussian noise: MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_flow(x0, sigma0, sigma):
    """The exact ODE solution for that denoiser: x(sigma) - MU = (x0 - MU) sqrt((S^2 + sigma^2) / (S^2 + sigma0^2))."""
    return MU + (x0 - MU) * math.sqrt((S**2 + sigma**2) / (S**2 + sigma0**2))


def counting(denoise):
    calls = []

    def counted(x, sigma):
        calls.append(sigma)
        return denoise(x, sigma)

    return counted, calls


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return ((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho).tolist()


X0 = MU + S * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("direction", ["sample", "invert"])
def test_heun_is_second_order_and_euler_first_order_in_both_directions(direction):
    def max_error(sampler, n):
        sigmas = karras(n)[::-1] if direction == "invert" else karras(n)
        start = X0 if direction == "invert" else gaussian_flow(X0, 0.002, 80.0)
        exact = gaussian_flow(X0, 0.002, 80.0) if direction == "invert" else X0
        return ((sampler(gaussian_denoiser, start, sigmas) - exact) / (exact - MU)).abs().max().item()

    heun = [max_error(ode.sample_heun, n) for n in (18, 72)]
    euler = [max_error(ode.sample_euler, n) for n in (18, 72)]
    assert heun[0] < 0.1 and 10 < heun[0] / heun[1] < 25  # 4x the steps: 16x smaller
    assert 2.5 < euler[0] / euler[1] < 6  # 4x smaller
    assert heun[1] < euler[1] / 10


def test_evaluation_counts():
    levels = karras(10)
    denoise, calls = counting(gaussian_denoiser)
    ode.sample_heun(denoise, X0, levels[::-1])  # inversion: 10 levels > 0
    assert len(calls) == 2 * (10 - 1)
    calls.clear()
    ode.sample_heun(denoise, X0, levels + [0.0])  # sampling: EDM's final Euler step to 0
    assert len(calls) == 2 * 10 - 1 and calls[-1] == levels[-1]
    calls.clear()
    ode.sample_euler(denoise, X0, levels + [0.0])
    assert len(calls) == 10


def test_a_step_to_zero_returns_the_denoised_sample():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for sampler in (ode.sample_heun, ode.sample_euler):
        torch.testing.assert_close(sampler(gaussian_denoiser, x, [0.5, 0.0]), gaussian_denoiser(x, 0.5))


@pytest.mark.parametrize("aug_dim", [None, 128])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_pure_samplers_equal_the_scheduler_loop(aug_dim, solver):
    """The scheduler's `step` and the pure samplers share the step functions: same path from the same prior draw."""
    charges = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9

    def denoise(x, sigma):
        return ideal_denoiser(x, sigma, charges, aug_dim)

    scheduler = PFGMScheduler(aug_dim=aug_dim, solver=solver, prediction_type="sample")
    scheduler.set_timesteps(12)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler.step_index or 0]
        x = scheduler.scale_model_input(sample, t) / scheduler.precondition_inputs(torch.ones(()), sigma)
        sample = scheduler.step(denoise(x, float(sigma)), t, sample).prev_sample
    sigmas = torch.unique_consecutive(scheduler.sigmas).tolist()
    pure = ode.SAMPLERS[solver](denoise, scheduler.prior_from_noise(noise), sigmas)
    torch.testing.assert_close(pure, sample, atol=1e-5, rtol=1e-5)


FIELD_GRID = dict(sigma_min=1e-3, sigma_max=40.0, sigma_schedule="exponential")


@pytest.mark.parametrize("field", [False, True], ids=["pfgmpp", "field"])
def test_heun_makes_the_same_calls_in_the_scheduler_and_the_pure_sampler(field):
    """One rule: the step that lands on the data (sigma = 0; z_min for the field model) is Euler, so n steps cost
    2n - 1 calls in the scheduler's loop and in `ode.sample_heun` (`data_end=flow.data_end(...)`) alike, on the same
    path; an inversion, which starts at the data and ends at sigma_max, makes Heun steps only."""
    data = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(4)) * 1.8 - 0.9
    scheduler = PFGMFieldScheduler(**FIELD_GRID) if field else PFGMScheduler(aug_dim=128, prediction_type="sample")
    scheduler.set_timesteps(8)
    x_T = scheduler.sample_prior((3, 1, 2, 2), generator=torch.Generator().manual_seed(5)).double()
    seen = []
    scheduler.set_begin_index(0)
    looped = run_loop(scheduler, x_T, exact_network(scheduler, data, record=seen))
    levels = flow.noise_levels(scheduler, 8)
    denoise, calls = counting(lambda x, sigma: ideal_denoiser(x, sigma, data.double(), scheduler.config.aug_dim))
    pure = ode.SAMPLERS["heun"](denoise, x_T, levels, data_end=flow.data_end(scheduler, levels))
    assert len(seen) == len(calls) == 2 * 8 - 1  # field: 9 levels from z_max to z_min; PFGM++: 8 and the final 0
    assert calls[-1] == levels[-2]  # the step onto the data evaluates D only at its start
    torch.testing.assert_close(pure, looped, atol=1e-6, rtol=1e-6)
    calls.clear()
    ode.SAMPLERS["heun"](denoise, looped, [sigma for sigma in levels if sigma > 0][::-1])  # as `invert` walks it
    assert len(calls) == 2 * (8 if field else 7)


def test_every_scheduler_solver_has_a_pure_sampler_and_a_stepper():
    """One table entry per name: `invert` runs the scheduler's solver as `ode.SAMPLERS[name]`, `step` as
    `ode.STEPPERS[name]`; the scheduler accepts exactly the steppers' names."""
    assert scheduling_pfgm.SOLVERS == tuple(ode.STEPPERS) == ("heun", "euler", "dpmpp_2m")
    assert set(ode.SAMPLERS) == {*ode.STEPPERS, "rk45", "restart"}
    for name in ode.STEPPERS:
        assert PFGMScheduler(solver=name).order == ode.STEPPERS[name].order
    with pytest.raises(ValueError, match="solver"):
        PFGMScheduler(solver="rk45")  # adaptive: no per-call step
    with pytest.raises(ValueError, match="solver='restart' has no scheduler step"):
        PFGMScheduler(solver="restart")  # its levels rise inside a run (docs/scheduler.md)


@pytest.mark.parametrize("carry_sigma", [False, True])
def test_rk45_meets_its_tolerance_both_ways(carry_sigma):
    x_T = gaussian_flow(X0, 0.002, 80.0)
    denoise, calls = counting(gaussian_denoiser)
    rk45 = ode.SAMPLERS["rk45"]
    back = rk45(denoise, x_T, [80.0, 0.002], rtol=1e-6, atol=1e-6, carry_sigma=carry_sigma)
    nfe = len(calls)
    assert back.shape == X0.shape and nfe > 10
    torch.testing.assert_close(back, X0, atol=1e-4, rtol=0)
    forth = rk45(gaussian_denoiser, X0, [0.002, 80.0], rtol=1e-6, atol=1e-6, carry_sigma=carry_sigma)
    torch.testing.assert_close(forth, x_T, rtol=1e-4, atol=1e-4)
    # looser tolerances, fewer evaluations
    calls.clear()
    rk45(denoise, x_T, [80.0, 0.002], rtol=1e-2, atol=1e-2, carry_sigma=carry_sigma)
    assert len(calls) < nfe


def test_rk45_stops_at_its_evaluation_budget_and_reports_each_call():
    """The seam that replaces patching a live pipeline: a budget raises before call budget + 1, naming the level
    reached; the callback sees every call."""
    x_T = gaussian_flow(X0, 0.002, 80.0)
    denoise, calls = counting(gaussian_denoiser)
    seen = []
    with pytest.raises(ode.EvaluationBudgetExceeded) as caught:
        ode.sample_rk45(denoise, x_T, [80.0, 0.002], rtol=1e-6, atol=1e-6, max_evaluations=7, callback=seen.append)
    assert len(calls) == len(seen) == caught.value.evaluations == 7
    assert [info["evaluations"] for info in seen] == list(range(1, 8))
    assert caught.value.sigma == min(info["sigma"] for info in seen) < 80.0
    assert all(torch.equal(info["denoised"], gaussian_denoiser(info["x"], info["sigma"])) for info in seen)
    # a budget it does not need changes nothing
    full = ode.sample_rk45(gaussian_denoiser, x_T, [80.0, 0.002], rtol=1e-3, atol=1e-3)
    assert torch.equal(ode.sample_rk45(gaussian_denoiser, x_T, [80.0, 0.002], rtol=1e-3, atol=1e-3,
                                       max_evaluations=10_000), full)  # fmt: skip


def test_log_likelihood_ode_counts_the_volume_change():
    """For the linear Gaussian flow, x_T - MU = (x0 - MU) k: delta = N log k exactly (one Rademacher probe is exact
    for a multiple of the identity), and x_T follows the closed form."""
    probe = torch.sign(torch.randn(X0.shape, generator=torch.Generator().manual_seed(4)))
    x_T, delta, nfe = ode.solve_log_likelihood(gaussian_denoiser, X0, probe, 0.002, 80.0, rtol=1e-6, atol=1e-6)
    k = math.sqrt((S**2 + 80.0**2) / (S**2 + 0.002**2))
    assert delta.dtype == torch.float64 and delta.shape == (4,) and nfe > 10
    torch.testing.assert_close(delta, torch.full((4,), 16 * math.log(k), dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(x_T, gaussian_flow(X0, 0.002, 80.0), rtol=1e-4, atol=1e-3)
