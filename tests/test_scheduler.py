"""PFGMScheduler: the diffusers contract, the EDM limit, and sampling against exact answers (math.md §4)."""

import inspect
import json
import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from exact_networks import exact_network, run_loop
from scipy import stats

from pfgm_diffusers import PFGMFieldScheduler, PFGMScheduler, PFGMSchedulerOutput
from pfgm_diffusers.perturbation import kernel_noise
from pfgm_diffusers.scheduling_pfgm import SOLVERS

ORACLE = Path(__file__).resolve().parent / "oracle"  # the official code's outputs (see oracle/README.md)


# ----- the EDM limit: aug_dim=None is EDMEulerScheduler to the last bit -----


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_infinite_D_full_loop_equals_edm_euler(prediction_type, schedule):
    config = dict(prediction_type=prediction_type, sigma_schedule=schedule)
    edm, ours = EDMEulerScheduler(**config), PFGMScheduler(aug_dim=None, solver="euler", **config)
    edm.set_timesteps(12)
    ours.set_timesteps(12)
    assert torch.equal(edm.sigmas, ours.sigmas) and torch.equal(edm.timesteps, ours.timesteps)
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * edm.init_noise_sigma
    assert edm.init_noise_sigma == ours.init_noise_sigma

    def model(x, t, _):
        return torch.tanh(x) * torch.cos(t)

    a, b = start.clone(), start.clone()
    for t in edm.timesteps:
        out_e = edm.step(model(edm.scale_model_input(a, t), t, None), t, a)
        out_o = ours.step(model(ours.scale_model_input(b, t), t, None), t, b)
        assert torch.equal(out_e.prev_sample, out_o.prev_sample)
        assert torch.equal(out_e.pred_original_sample, out_o.pred_original_sample)
        a, b = out_e.prev_sample, out_o.prev_sample


def test_infinite_D_add_noise_equals_edm():
    edm, ours = EDMEulerScheduler(), PFGMScheduler(aug_dim=None)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = edm.timesteps[torch.tensor([0, 10, 500, 999])]
    assert torch.equal(edm.add_noise(x, noise, t), ours.add_noise(x, noise, t))
    sigmas = torch.tensor([0.01, 0.5, 3.0, 70.0])
    assert torch.equal(ours.add_noise(x, noise, sigmas=sigmas), x + noise * sigmas[:, None, None, None])


def test_large_D_approaches_edm():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    sigmas = torch.tensor([0.3, 20.0])
    edm = PFGMScheduler(aug_dim=None).add_noise(x, noise, sigmas=sigmas)
    torch.testing.assert_close(
        PFGMScheduler(aug_dim=10**9).add_noise(x, noise, sigmas=sigmas), edm, rtol=1e-4, atol=1e-4
    )
    assert (PFGMScheduler(aug_dim=8).add_noise(x, noise, sigmas=sigmas) - edm).abs().max() > 0.1


# ----- config swaps with the EDM schedulers -----


def test_config_swaps_both_ways():
    edm = EDMEulerScheduler(sigma_max=100.0, prediction_type="v_prediction", sigma_schedule="exponential")
    ours = PFGMScheduler.from_config(edm.config, aug_dim=2048)
    assert ours.config.aug_dim == 2048
    for key in (
        "sigma_min",
        "sigma_max",
        "sigma_data",
        "sigma_schedule",
        "prediction_type",
        "rho",
        "final_sigmas_type",
    ):
        assert ours.config[key] == edm.config[key], key
    back = EDMEulerScheduler.from_config(ours.config)
    assert {k: back.config[k] for k in edm.config} == dict(edm.config)
    back.set_timesteps(7)
    ours_euler = PFGMScheduler.from_config(edm.config, aug_dim=None, solver="euler")
    ours_euler.set_timesteps(7)
    assert torch.equal(back.sigmas, ours_euler.sigmas)
    dpm = EDMDPMSolverMultistepScheduler.from_config(PFGMScheduler(aug_dim=64, sigma_max=50.0).config)
    assert dpm.config.sigma_max == 50.0
    # defaults match, so keys that from_config drops (left at default) cannot change the meaning
    default_edm, default_ours = EDMEulerScheduler().config, PFGMScheduler().config
    for key in default_edm:
        if not key.startswith("_"):
            assert default_ours[key] == default_edm[key], key
    assert set(PFGMScheduler._compatibles) == {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
    assert "EDMEulerScheduler" in [c.__name__ for c in ours.compatibles]


# ----- the diffusers contract -----


def test_save_load_round_trip(tmp_path):
    scheduler = PFGMScheduler(aug_dim=7, solver="euler", sigma_max=40.0, prediction_type="sample")
    scheduler.save_pretrained(tmp_path)
    loaded = PFGMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    scheduler.set_timesteps(5)
    loaded.set_timesteps(5)
    assert torch.equal(loaded.sigmas, scheduler.sigmas)
    # aug_dim=None (infinity) survives JSON
    PFGMScheduler(aug_dim=None).save_pretrained(tmp_path / "inf")
    assert PFGMScheduler.from_pretrained(tmp_path / "inf").config.aug_dim is None


@pytest.mark.parametrize("solver", SOLVERS)
def test_order_counts_model_calls_per_step(solver):
    """`order` is what diffusers' pipelines read: n steps take order * n - (order - 1) model calls (Heun's last step
    is a plain Euler step), one per entry of `timesteps`; `step_index` counts the calls. The denoiser D = 0 makes the
    ODE dx/dσ = (x - D)/σ (math.md §1) solvable by hand, x(σ) = x_T σ/σ_max, and every solver follows it exactly:
    call k's output is that at the level after it, sigmas[k + 1], ending at 0 (to float32 rounding)."""
    scheduler = PFGMScheduler(solver=solver, prediction_type="sample")
    assert len(scheduler) == 1000 == scheduler.config.num_train_timesteps
    for n in (1, 4, 9):
        scheduler.set_timesteps(n)
        calls = scheduler.order * n - (scheduler.order - 1)
        assert len(scheduler.timesteps) == calls and scheduler.num_inference_steps == n
        x_T = scheduler.sample_prior((1, 1, 2, 2), generator=torch.Generator().manual_seed(n)).double()
        sigmas, x = scheduler.sigmas.double(), x_T
        scheduler.set_begin_index(0)
        for k, t in enumerate(scheduler.timesteps):
            scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
            assert scheduler.step_index == k + 1
            torch.testing.assert_close(x, x_T * sigmas[k + 1] / sigmas[0], rtol=1e-6, atol=1e-6 * x_T.abs().max())
        assert x.abs().max() <= 1e-6 * x_T.abs().max()  # at sigma = 0: the denoiser's 0
    assert {PFGMScheduler(solver=name).order for name in SOLVERS} == {1, 2}


@pytest.mark.parametrize("solver", SOLVERS)
def test_step_shapes_dict_tuple_and_layout(solver):
    scheduler = PFGMScheduler(solver=solver)
    scheduler.set_timesteps(18, device="cpu")
    calls = 35 if solver == "heun" else 18
    assert len(scheduler.timesteps) == calls and scheduler.timesteps.device.type == "cpu"
    assert scheduler.sigmas.dtype == torch.float32 and scheduler.sigmas[-1] == 0
    assert (scheduler.sigmas[:-1] >= scheduler.sigmas[1:]).all()
    twin = PFGMScheduler(solver=solver)
    twin.set_timesteps(18)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    y = x.clone()
    for t in scheduler.timesteps:
        out = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x)
        tup = twin.step(torch.tanh(twin.scale_model_input(y, t)), t, y, return_dict=False)
        assert isinstance(out, PFGMSchedulerOutput) and isinstance(tup, tuple)
        assert out.prev_sample.shape == x.shape and out.pred_original_sample.shape == x.shape
        assert torch.equal(out.prev_sample, tup[0]) and torch.equal(out.pred_original_sample, tup[1])
        x, y = out.prev_sample, tup[0]
    assert scheduler.step_index == calls


# diffusers' SchedulerCommonTest (tests/schedulers/test_schedulers.py in the diffusers repository, not installed)
# checks every scheduler this way; the same contracts, written for this class:

CONTRACT_CONFIGS = [
    dict(aug_dim=None, solver="euler"),
    dict(aug_dim=128),
    dict(aug_dim=8, solver="dpmpp_2m", prediction_type="v_prediction"),
    dict(prediction_type="poisson_field", sigma_max=40.0, sigma_min=1e-3, sigma_schedule="exponential"),
]


def scheduler_for(config, **kwargs):
    """The scheduler class of a contract config: the field model's own class for `prediction_type="poisson_field"`."""
    if config.get("prediction_type") == "poisson_field":
        return PFGMFieldScheduler(**{k: v for k, v in config.items() if k != "prediction_type"}, **kwargs)
    return PFGMScheduler(**config, **kwargs)


def dummy_sample(seed=0):
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def dummy_residual(scheduler, sample):
    """0.1 * sample, with the field's extra channel where the prediction type needs it."""
    residual = 0.1 * sample
    if scheduler.config.prediction_type == "poisson_field":
        residual = torch.cat([residual, -torch.ones_like(sample[:, :1])], dim=1)
    return residual


@pytest.mark.parametrize("config", CONTRACT_CONFIGS)
def test_scale_model_input_before_set_timesteps_uses_the_training_table(config):
    scheduler = scheduler_for(config, num_train_timesteps=256)
    sample = dummy_sample()
    scaled = scheduler.scale_model_input(sample, scheduler.timesteps[-1])
    assert scaled.shape == sample.shape and scheduler.step_index == len(scheduler.timesteps) - 1
    torch.testing.assert_close(scaled, scheduler.precondition_inputs(sample, scheduler.sigmas[scheduler.step_index]))
    if config.get("aug_dim", 1) is None:
        edm = EDMEulerScheduler(num_train_timesteps=256)
        assert torch.equal(scaled, edm.scale_model_input(sample, edm.timesteps[-1]))


@pytest.mark.parametrize("config", CONTRACT_CONFIGS)
def test_step_shape_and_outputs_equivalence(config, caplog):
    scheduler = scheduler_for(config)
    scheduler.set_timesteps(10)
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    sample = dummy_sample()
    out_0 = scheduler.step(dummy_residual(scheduler, sample), t0, sample).prev_sample
    out_1 = scheduler.step(dummy_residual(scheduler, sample), t1, sample).prev_sample
    assert out_0.shape == sample.shape == out_1.shape
    assert torch.isfinite(out_0).all() and out_0.abs().max() > 0  # rand() is no randn start: mapped, not degenerate
    assert "scale_model_input" in caplog.text and "set_begin_index" in caplog.text  # and both are said
    twin = scheduler_for(config)
    twin.set_timesteps(10)
    as_tuple = twin.step(dummy_residual(twin, sample), t0, sample, return_dict=False)
    assert torch.equal(as_tuple[0], out_0) and len(as_tuple) == 2


@pytest.mark.parametrize("num_train_timesteps", [10, 50, 100, 1000])
@pytest.mark.parametrize("config", CONTRACT_CONFIGS)
def test_saved_and_loaded_schedulers_step_alike(config, num_train_timesteps, tmp_path):
    scheduler = scheduler_for(config, num_train_timesteps=num_train_timesteps)
    scheduler.save_config(tmp_path)
    loaded = type(scheduler).from_pretrained(tmp_path)
    public = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    assert public == dict(loaded.config)
    sample = dummy_sample()
    outputs = []
    for s in (scheduler, loaded):
        s.set_timesteps(10)
        # diffusers' check_over_configs steps at the training table's last timestep; here that of the schedule, the
        # one the run expects (field mode's differ: another is refused, test_a_timestep_out_of_order_is_refused...)
        s.scale_model_input(sample, s.timesteps[-1])
        outputs.append(s.step(dummy_residual(s, sample), s.timesteps[-1], sample).prev_sample)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("config", CONTRACT_CONFIGS)
def test_compatibles_round_trip(config):
    scheduler = scheduler_for(config)
    assert all(c is not None for c in scheduler.compatibles)
    for compatible in scheduler.compatibles:
        other = compatible.from_config(scheduler.config)
        back = type(scheduler).from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
        extra = {k for k in back.config if k not in scheduler.config}
        assert not extra & set(inspect.signature(PFGMScheduler.__init__).parameters)


@pytest.mark.parametrize("config", CONTRACT_CONFIGS)
def test_add_noise_at_a_schedule_timestep(config):
    scheduler = scheduler_for(config)
    scheduler.set_timesteps(50)
    sample = dummy_sample()
    scaled = scheduler.scale_model_input(sample, scheduler.timesteps[-1])
    noise = torch.randn(scaled.shape, generator=torch.Generator().manual_seed(5))
    noised = scheduler.add_noise(scaled, noise, scheduler.timesteps[5][None])
    # the kernel at timesteps[5]'s own noise level: sigma * noise for D = inf (EDM's), else its radial map
    sigma, aug_dim = scheduler.sigmas[5], scheduler.config.aug_dim
    assert torch.equal(noised, scaled + kernel_noise(noise, sigma.reshape(1), aug_dim))
    ratio = (noised - scaled).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)  # R / |noise|
    if aug_dim is None:
        torch.testing.assert_close(ratio, sigma.expand(4), rtol=1e-5, atol=0)
    else:  # a heavier-tailed radius than the Gaussian's, direction kept
        assert (ratio / sigma - 1).abs().max() > 5e-3
        torch.testing.assert_close(
            torch.nn.functional.cosine_similarity((noised - scaled).flatten(1), noise.flatten(1)),
            torch.ones(4),
        )


def test_config_attributes_and_no_deprecated_kwargs():
    scheduler = PFGMScheduler()
    scheduler.dummy_attribute = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.dummy_attribute == 5 and callable(scheduler.save_pretrained)
    scheduler.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError) as error:
        scheduler.does_not_exist  # noqa: B018
    assert str(error.value) == "'PFGMScheduler' object has no attribute 'does_not_exist'"
    assert "kwargs" not in inspect.signature(PFGMScheduler.__init__).parameters
    assert not PFGMScheduler._deprecated_kwargs
    assert "check_finite" not in scheduler.config  # an attribute, so from_config with EDM's schedulers is unchanged


def test_full_loop_no_noise_is_edm_euler_for_infinite_D():
    """diffusers' EDMEulerSchedulerTest.test_full_loop_no_noise, run against EDMEulerScheduler itself."""
    num_elems = 4 * 3 * 8 * 8
    sample_deter = (torch.arange(num_elems) / num_elems).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)

    def model(sample, t):
        t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.dtype)
        return sample * t / (t + 1)

    results = []
    ours = PFGMScheduler(num_train_timesteps=256, aug_dim=None, solver="euler")
    for scheduler in (EDMEulerScheduler(num_train_timesteps=256), ours):
        scheduler.set_timesteps(10)
        sample = sample_deter * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            sample = scheduler.step(model(scheduler.scale_model_input(sample, t), t), t, sample).prev_sample
        results.append(sample)
    assert torch.equal(results[0], results[1])
    assert abs(results[1].abs().sum().item() - 34.1855) < 1e-3  # diffusers' figure for EDMEulerScheduler


def test_heun_matches_edm_heun_sigma_grid():
    """EDM's Heun in sigma: model calls at each level, the interior ones twice, 2n - 1 calls (math.md §2)."""
    ref = np.load(ORACLE / "pfgmpp_heun_exact_denoiser_D128.npz")
    scheduler = PFGMScheduler(aug_dim=128)
    scheduler.set_timesteps(18)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), ref["D128_steps18__sigmas_evaluated"], rtol=1e-6)
    np.testing.assert_allclose(scheduler.sigmas.unique().flip(0).numpy(), ref["D128_steps18__t_steps"], rtol=1e-6)


def test_no_future_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        scheduler = PFGMScheduler.from_config(EDMEulerScheduler().config)
        scheduler.set_timesteps(3)
        x = scheduler.sample_prior((1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        scheduler.set_begin_index(0)
        run_loop(scheduler, x, lambda model_input, t: torch.zeros_like(model_input))
        scheduler.add_noise(x, torch.randn_like(x), sigmas=torch.tensor([1.0]))


# ----- sampling against exact answers -----


def test_official_pfgmpp_sampler_trajectory():
    """The official edm_sampler (pfgmpp=True, D=128, 18 steps) driven by the exact denoiser of 5 points."""
    ref = np.load(ORACLE / "pfgmpp_heun_exact_denoiser_D128.npz")
    C, H, W = ref["shape_CHW"]
    data = torch.tensor(ref["data_points"], dtype=torch.float32).reshape(-1, C, H, W)
    x = torch.tensor(ref["D128__latents"], dtype=torch.float32).reshape(-1, C, H, W)
    scheduler = PFGMScheduler(aug_dim=128, prediction_type="sample")
    scheduler.set_timesteps(18)
    scheduler.set_begin_index(0)  # the official latents are prior draws already: used as they are
    network = exact_network(scheduler, data)
    states, evaluated = [], []
    for t in scheduler.timesteps:
        evaluated.append(float(scheduler.sigmas[scheduler.index_for_timestep(t)]))
        x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        if scheduler.state_in_first_order:
            states.append(x.reshape(len(x), -1))
    np.testing.assert_allclose(evaluated, ref["D128_steps18__sigmas_evaluated"], rtol=1e-6)
    trajectory = torch.stack(states).double().numpy()
    expected = ref["D128_steps18__trajectory"]
    assert trajectory.shape == expected.shape
    assert (np.abs(trajectory - expected) / np.maximum(1, np.abs(expected))).max() < 1e-4


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_point_exact_path(solver):
    """One data point x_c: the exact path x(sigma) = x_c + (sigma / sigma_max)(x_T - x_c); every solver follows it."""
    x_c = torch.tensor([0.5, -0.25, 0.1, 0.9]).reshape(1, 1, 2, 2)
    scheduler = PFGMScheduler(aug_dim=8, solver=solver, prediction_type="sample")
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(0)
    x_T = scheduler.sample_prior((3, 1, 2, 2), generator=torch.Generator().manual_seed(6))
    x = x_T
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(x_c.expand_as(x), t, x).prev_sample
        if scheduler.state_in_first_order:
            sigma = scheduler.sigmas[scheduler.step_index]
            torch.testing.assert_close(x, x_c + sigma / 80.0 * (x_T - x_c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x_c.expand_as(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_charge_field_lines_in_field_mode(solver):
    """One charge: straight field lines, so stepping in z ends at x_c + (z_min / z_max)(x_0 - x_c) (math.md §4)."""
    x_c = torch.tensor([0.3, -0.7, 0.2, 0.5]).reshape(1, 1, 2, 2)
    N, gamma = 4, 5.0

    def field_model(x, z):
        g_x = x_c - x  # (B, 1, 2, 2)
        g_z = -z.expand(x.shape[0]).reshape(-1, 1, 1, 1)
        norm = torch.sqrt(g_x.pow(2).sum((1, 2, 3), keepdim=True) + g_z**2)
        v = math.sqrt(N) / (norm + gamma)
        return torch.cat([g_x * v, (g_z * v).expand(-1, 1, 2, 2)], dim=1)

    scheduler = PFGMFieldScheduler(
        sigma_max=40.0,
        sigma_min=1e-3,
        sigma_schedule="exponential",
        solver=solver,
        vz_eps=0.0,
    )
    scheduler.set_timesteps(12)
    assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1])  # the network sees the raw z
    torch.testing.assert_close(scheduler.sigmas[-1], torch.tensor(1e-3))
    scheduler.set_begin_index(0)
    x0 = scheduler.sample_prior((3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    x = x0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        assert torch.equal(model_input, x)  # unscaled input, as in the official code
        x = scheduler.step(field_model(model_input, t), t, x).prev_sample
    torch.testing.assert_close(x, x_c + (1e-3 / 40.0) * (x0 - x_c), rtol=1e-5, atol=1e-5)


def test_field_mode_grid_is_uniform_in_log_z():
    scheduler = PFGMFieldScheduler(sigma_max=40.0, sigma_min=1e-3, sigma_schedule="exponential", solver="euler")
    scheduler.set_timesteps(10)
    log_z = torch.log(scheduler.sigmas.double())
    assert len(scheduler.timesteps) == 10 and len(scheduler.sigmas) == 11
    torch.testing.assert_close(log_z, torch.linspace(math.log(40.0), math.log(1e-3), 11, dtype=torch.float64),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_add_noise_draws_the_kernel_at_continuous_sigma():
    N, D, n = 12, 6, 3000
    scheduler = PFGMScheduler(aug_dim=D)
    x = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(10))
    sigma = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(11)))
    noisy = scheduler.add_noise(x, torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(12)), sigmas=sigma)
    R = (noisy - x).reshape(n, -1).double().norm(dim=1)
    B = (R**2 / (R**2 + sigma.double() ** 2 * D)).numpy()
    assert stats.kstest(B, stats.beta(N / 2, D / 2).cdf).pvalue > 1e-3
    # at schedule timesteps it uses the schedule's sigma
    t = scheduler.timesteps[torch.tensor([3, 3])]
    noise = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(
        scheduler.add_noise(x[:2], noise, t), scheduler.add_noise(x[:2], noise, sigmas=scheduler.sigmas[[3, 3]])
    )


# ----- bad input -----


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(aug_dim=0), "aug_dim"),
        (dict(aug_dim=2.5), "aug_dim"),
        (dict(aug_dim=True), "aug_dim"),
        (dict(sigma_min=1.0, sigma_max=1.0), "sigma_min"),
        (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (dict(sigma_max=float("inf")), "sigma_max"),
        (dict(sigma_min=float("nan")), "sigma_min"),
        (dict(sigma_data=0.0), "sigma_data"),
        (dict(sigma_data=-0.5), "sigma_data"),
        (dict(sigma_data=float("nan")), "sigma_data"),
        (dict(rho=0.0), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(num_train_timesteps=10.5), "num_train_timesteps"),
        (dict(gamma=3.0), r"\['gamma'\] are options of the original PFGM's field model: use `PFGMFieldScheduler"),
        (dict(upper_norm=3000.0, z_exp=1.0), r"\['upper_norm', 'z_exp'\] are options .*PFGMFieldScheduler"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(solver="rk4"), "solver"),
        (dict(sigma_schedule="linear"), "sigma_schedule"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(prediction_type="poisson_field", aug_dim=4), "aug_dim=1"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PFGMScheduler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=float("nan")), "gamma"),
        (dict(gamma=-1.0), "gamma"),
        (dict(vz_eps=float("inf")), "vz_eps"),
        (dict(z_exp=float("nan")), "z_exp"),
        (dict(z_exp=0.0), "z_exp"),
        (dict(upper_norm=float("inf")), "upper_norm"),
        (dict(upper_norm=0.5), "upper_norm"),
        (dict(sigma_min=1.0, sigma_max=1.0), "sigma_min"),
        (dict(solver="rk4"), "solver"),
        (dict(aug_dim=4), "aug_dim=1"),
        (dict(prediction_type="epsilon"), "poisson_field"),
    ],
)
def test_bad_field_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PFGMFieldScheduler(**kwargs)


def test_bad_calls():
    scheduler = PFGMScheduler(aug_dim=8)
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="decreasing"):
        scheduler.set_timesteps(sigmas=[1.0, 2.0])
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="Integer timestep"):
        scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="Integer timestep"):
        scheduler.scale_model_input(x, torch.tensor(1))
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(x, torch.tensor(0.123), x)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(x, scheduler.timesteps[1].half(), x)
    with pytest.raises(ValueError, match="generators"):
        scheduler.sample_prior((3, 1, 2, 2), generator=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="finite"):
        scheduler.add_noise(x, x, sigmas=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=">= 0"):
        scheduler.add_noise(x, x, sigmas=torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.add_noise(x, x)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="s_churn"):
        scheduler.step(x, scheduler.timesteps[0], x, s_churn=1.0)
    scheduler.set_timesteps(1)
    scheduler.set_begin_index(0)
    t = scheduler.timesteps[0]
    scheduler.scale_model_input(x, t)
    scheduler.step(torch.zeros_like(x), t, x)
    with pytest.raises(ValueError, match="after the last call of this run"):
        scheduler.step(x, t, x)
    with pytest.raises(ValueError, match="sigmas. must be finite"):
        PFGMScheduler(aug_dim=None).add_noise(x, x, sigmas=torch.tensor([float("nan")]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("aug_dim", [8, None])
def test_a_non_finite_start_is_blamed_on_the_latents(aug_dim, bad):
    scheduler = PFGMScheduler(aug_dim=aug_dim, solver="euler", prediction_type="sample")
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    x[1, 0, 0, 0] = bad
    for begin_index in (None, 2):  # a generic run, and an img2img one
        scheduler.set_timesteps(4)
        if begin_index is not None:
            scheduler.set_begin_index(begin_index)
        t = scheduler.timesteps[begin_index or 0]
        with pytest.raises(ValueError, match=r"first sample of this run contains NaN or inf \(batch items \[1\]\)"):
            scheduler.scale_model_input(x, t)
        with pytest.raises(ValueError, match="first sample of this run"):
            scheduler.step(torch.zeros_like(x), t, x)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_non_finite_model_output_is_found_once_per_run(solver, bad):
    """No host sync per call: a bad model output (+inf passed the old NaN-only check) surfaces at the run's last
    call, naming the opt-in per-call check, which then finds the call."""
    scheduler = PFGMScheduler(aug_dim=8, solver=solver, prediction_type="sample")

    def run(bad_call):
        scheduler.set_timesteps(4)
        x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps):
            out = torch.zeros_like(scheduler.scale_model_input(x, t))
            if k == bad_call:
                out[0, 0, 0, 1] = bad
            x = scheduler.step(out, t, x).prev_sample
        return x

    assert torch.isfinite(run(bad_call=None)).all()
    with pytest.raises(ValueError, match="became NaN or inf during this run") as error:
        run(bad_call=1)
    assert "check_finite = True" in str(error.value)
    assert scheduler.step_index == len(scheduler.timesteps) - 1  # raised at the last call
    scheduler.check_finite = True
    with pytest.raises(ValueError, match="model output at call 1 "):
        run(bad_call=1)
    assert scheduler.step_index == 1


def test_float16_outputs_refuse_a_start_they_cannot_hold():
    """D = 1: 51 of 20,000 first-step outputs were inf in float16; now the run refuses its start at the first call."""
    scheduler = PFGMScheduler(aug_dim=1, solver="euler", prediction_type="sample")
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    x = (torch.randn(20000, 3, 2, 2, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma).half()
    model_input = scheduler.scale_model_input(x, t)
    assert model_input.dtype == torch.float16 and torch.isfinite(model_input).all()  # c_in x is small
    with pytest.raises(ValueError, match="more than torch.float16 can hold"):
        scheduler.step(torch.zeros_like(x), t, x)
    scheduler.set_timesteps(4)
    scheduler.scale_model_input(x[:100], t)
    out = scheduler.step(torch.zeros_like(x[:100]), t, x[:100]).prev_sample  # these 100 fit
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "poisson_field"])
def test_model_output_must_have_the_exact_shape(prediction_type):
    """A model output of batch 1, or of 1 channel, broadcasts silently in the arithmetic: refused (field: C + 1)."""
    if prediction_type == "poisson_field":
        scheduler = PFGMFieldScheduler(solver="euler")
    else:
        scheduler = PFGMScheduler(aug_dim=8, prediction_type=prediction_type, solver="euler")
    scheduler.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4) * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    channels = 4 if prediction_type == "poisson_field" else 3
    for shape in [(1, channels, 4, 4), (2, 1, 4, 4), (2, channels, 4, 1), (2, channels + 1, 4, 4)]:
        with pytest.raises(ValueError, match=r"model output must have shape \(2, " + str(channels)):
            scheduler.scale_model_input(x, t)
            scheduler.step(torch.zeros(shape), t, x)
    with pytest.raises(ValueError, match="model output must have shape"):
        scheduler.precondition_outputs(x, torch.zeros(1, channels, 4, 4), 1.0)
    scheduler.step(torch.zeros(2, channels, 4, 4), t, x)  # the right shape still goes through


def test_field_mode_needs_the_extra_channel():
    scheduler = PFGMFieldScheduler(sigma_max=40.0, sigma_min=1e-3)
    scheduler.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="C\\+1"):
        scheduler.step(torch.randn(2, 3, 4, 4), scheduler.timesteps[0], x)


@pytest.mark.parametrize("aug_dim", [8, None])
def test_add_noise_shapes_must_match(aug_dim):
    """One noise for the whole batch, or a wrong number of levels, is refused (EDM broadcasts it silently)."""
    scheduler = PFGMScheduler(aug_dim=aug_dim)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        scheduler.add_noise(x, torch.randn(1, 3, 2, 2), sigmas=torch.ones(4))
    with pytest.raises(ValueError, match="noise"):
        scheduler.add_noise(x, torch.randn(4, 1, 2, 2), sigmas=torch.ones(4))
    with pytest.raises(ValueError, match="1 or 4"):
        scheduler.add_noise(x, torch.randn_like(x), sigmas=torch.ones(3))
    with pytest.raises(ValueError, match="1 or 4"):
        scheduler.add_noise(x, torch.randn_like(x), scheduler.timesteps[:2])
    # one level for the whole batch is diffusers' img2img call (timesteps[:1]) and stays allowed
    noise = torch.randn_like(x)
    one = scheduler.add_noise(x, noise, scheduler.timesteps[3:4])
    torch.testing.assert_close(one, scheduler.add_noise(x, noise, sigmas=scheduler.sigmas[3].expand(4)))


def test_custom_sigmas_are_the_noise_levels():
    scheduler = PFGMScheduler(aug_dim=16, solver="euler")
    scheduler.set_timesteps(sigmas=[10.0, 1.0, 0.1])
    assert scheduler.num_inference_steps == 3
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([10.0, 1.0, 0.1, 0.0]))
    torch.testing.assert_close(scheduler.timesteps, 0.25 * torch.log(torch.tensor([10.0, 1.0, 0.1])))
    heun = PFGMScheduler(aug_dim=16)
    heun.set_timesteps(sigmas=[10.0, 1.0, 0.1])
    torch.testing.assert_close(heun.sigmas, torch.tensor([10.0, 1.0, 1.0, 0.1, 0.1, 0.0]))
    assert len(heun.timesteps) == 5


# ----- the run's place in the schedule: begin index and the order of the timesteps -----


@pytest.mark.parametrize("begin_index", [-1, 7, 100, 2.5, True, "1", None])
def test_set_begin_index_refuses_what_is_not_a_timestep_index(begin_index):
    scheduler = PFGMScheduler(aug_dim=8, solver="euler")
    scheduler.set_timesteps(7)
    with pytest.raises(ValueError, match=re.escape("an integer in [0, 6]") + f".*got {re.escape(repr(begin_index))}"):
        scheduler.set_begin_index(begin_index)
    assert scheduler.begin_index is None


def test_set_begin_index_accepts_numpy_integers_and_the_last_index():
    scheduler = PFGMScheduler(aug_dim=8, solver="heun")
    scheduler.set_timesteps(4)  # 7 calls
    scheduler.set_begin_index(np.int64(6))
    assert scheduler.begin_index == 6 and type(scheduler.begin_index) is int


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_loop_over_reversed_timesteps_is_refused_at_its_second_call(solver):
    scheduler = PFGMScheduler(aug_dim=8, solver=solver, prediction_type="sample")
    scheduler.set_timesteps(6)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    calls = 0
    with pytest.raises(ValueError, match=r"started at timesteps\[\d+\], the last one.*reversed\(timesteps\)"):
        for t in reversed(scheduler.timesteps):
            x = scheduler.step(scheduler.scale_model_input(x, t) * 0, t, x).prev_sample
            calls += 1
    assert calls == 1


@pytest.mark.parametrize("as_float", [False, True])
def test_a_timestep_out_of_order_is_refused_at_once(as_float):
    """The scheduler steps by its own index: a timestep that is not the one it expects would be stepped at another
    sigma than the network was told, silently."""
    scheduler = PFGMScheduler(aug_dim=8, solver="heun", prediction_type="sample")
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist() if as_float else list(scheduler.timesteps)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    x = scheduler.step(scheduler.scale_model_input(x, timesteps[0]) * 0, timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match=r"at call 1 of this run, which expects timesteps\[1\]"):
        scheduler.scale_model_input(x, timesteps[3])  # skips one
    with pytest.raises(ValueError, match=r"at call 1 of this run, which expects timesteps\[1\]"):
        scheduler.step(x, timesteps[0], x)  # repeats one
    with pytest.raises(ValueError, match="not cast"):
        scheduler.step(x, torch.as_tensor(timesteps[1]).half(), x)
    # the expected one passes, as a schedule element, a CPU copy or a float
    for t in (timesteps[1], torch.tensor(float(timesteps[1])), float(timesteps[1])):
        scheduler.scale_model_input(x, t)


def test_timesteps_in_order_run_as_floats_and_as_schedule_elements_alike():
    def run(to_timestep):
        scheduler = PFGMScheduler(aug_dim=8, solver="dpmpp_2m", prediction_type="sample")
        scheduler.set_timesteps(5)
        x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), to_timestep(t), x).prev_sample
        return x

    assert torch.equal(run(lambda t: t), run(float))


# ----- the original PFGM is its own class; v0.1 code and configs reach it -----


V0_1_FIELD_CONFIG = json.loads(
    (Path(__file__).parent / "fixtures/saved_v0_1/pfgm_field/scheduler/scheduler_config.json").read_text()
)


def test_pfgmpp_config_has_no_field_keys_and_the_field_scheduler_no_edm_ones():
    assert not {"gamma", "z_exp", "upper_norm", "vz_eps"} & set(PFGMScheduler().config)
    field = PFGMFieldScheduler()
    assert not {"sigma_data", "final_sigmas_type"} & set(field.config)
    assert (field.config.prediction_type, field.config.aug_dim) == ("poisson_field", 1)  # fixed, for readers
    assert field.num_output_channels(3) == 4 and PFGMScheduler().num_output_channels(3) == 3
    assert not hasattr(PFGMScheduler(), "_field_mode") and not hasattr(field, "loss_weight")


def test_a_v0_1_field_config_loads_as_the_field_scheduler(tmp_path, caplog):
    """What pipelines saved by v0.1 hold: `_class_name` PFGMScheduler with prediction_type="poisson_field"."""
    assert V0_1_FIELD_CONFIG["_class_name"] == "PFGMScheduler" and "sigma_data" in V0_1_FIELD_CONFIG
    (tmp_path / "scheduler_config.json").write_text(json.dumps(V0_1_FIELD_CONFIG))
    for scheduler in (PFGMScheduler.from_pretrained(tmp_path), PFGMScheduler.from_config(V0_1_FIELD_CONFIG)):
        assert type(scheduler) is PFGMFieldScheduler
        for key in ("sigma_min", "sigma_max", "sigma_schedule", "gamma", "z_exp", "upper_norm", "vz_eps", "solver"):
            assert scheduler.config[key] == V0_1_FIELD_CONFIG[key], key
    assert "sigma_data" not in caplog.text  # its PFGM++-only keys are dropped without a warning
    swapped = PFGMScheduler.from_config(V0_1_FIELD_CONFIG, solver="euler")
    assert type(swapped) is PFGMFieldScheduler and swapped.config.solver == "euler"


def test_v0_1_code_building_the_field_mode_gets_the_field_scheduler_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="pfgm_diffusers.scheduling_pfgm"):
        old = PFGMScheduler(aug_dim=1, prediction_type="poisson_field", sigma_max=40.0, z_exp=1.0, sigma_data=0.5)
    assert type(old) is PFGMFieldScheduler and "PFGMFieldScheduler(" in caplog.text
    # v0.1's defaults for what it was not given (a Karras grid from 0.002), not the new class's (official PFGM's)
    assert (old.config.sigma_min, old.config.sigma_schedule, old.config.z_exp) == (0.002, "karras", 1.0)
    # v0.1 code also gave PFGM++ schedulers the field keys at their v0.1 values, which meant nothing there
    quiet = PFGMScheduler(aug_dim=8, gamma=5.0, z_exp=None, upper_norm=None, vz_eps=1e-5)
    assert type(quiet) is PFGMScheduler and dict(quiet.config) == dict(PFGMScheduler(aug_dim=8).config)
    new = PFGMFieldScheduler(sigma_min=0.002, sigma_max=40.0, sigma_schedule="karras", z_exp=1.0)
    old.set_timesteps(5)
    new.set_timesteps(5)
    assert torch.equal(old.sigmas, new.sigmas) and torch.equal(old.timesteps, new.timesteps)
