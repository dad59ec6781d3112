"""PFGMScheduler: the diffusers contract, the EDM limit, and sampling against exact answers (math.md §4)."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from scipy import stats

from pfgm_diffusers import PFGMScheduler, PFGMSchedulerOutput, ideal_denoiser

ORACLE = Path(__file__).resolve().parent / "oracle"  # the official code's outputs (see oracle/README.md)


def run_loop(scheduler, x, model, generic=False):
    """A plain diffusers loop: one model call per timestep."""
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t, scheduler), t, x).prev_sample
    return x


def exact_model(data, aug_dim):
    """A 'sample'-prediction model that returns the ideal denoiser at the scheduler's current sigma."""

    def model(model_input, t, scheduler):
        sigma = scheduler.sigmas[scheduler.step_index]
        x = model_input  # prediction_type="sample" has c_in applied; undo it
        x = x / (1 / (sigma**2 + scheduler.config.sigma_data**2) ** 0.5)
        return ideal_denoiser(x, sigma, data, aug_dim)

    return model


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


def test_public_api():
    scheduler = PFGMScheduler()
    for name in (
        "order",
        "init_noise_sigma",
        "timesteps",
        "sigmas",
        "num_inference_steps",
        "step_index",
        "begin_index",
        "set_begin_index",
        "set_timesteps",
        "scale_model_input",
        "step",
        "add_noise",
        "precondition_inputs",
        "precondition_noise",
        "precondition_outputs",
        "sample_prior",
        "mark_prior_sample",
        "prior_from_noise",
    ):
        assert hasattr(scheduler, name), name
    assert len(scheduler) == 1000
    assert scheduler.order == 2 and PFGMScheduler(solver="euler").order == 1


@pytest.mark.parametrize("solver", ["heun", "euler"])
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
        run_loop(scheduler, x, lambda m, t, s: torch.zeros_like(m))
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
    scheduler.mark_prior_sample()  # the official latents are prior draws already
    model = exact_model(data, 128)
    states, evaluated = [], []
    for t in scheduler.timesteps:
        evaluated.append(float(scheduler.sigmas[scheduler.index_for_timestep(t)]))
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t, scheduler), t, x).prev_sample
        if scheduler.state_in_first_order:
            states.append(x.reshape(len(x), -1))
    np.testing.assert_allclose(evaluated, ref["D128_steps18__sigmas_evaluated"], rtol=1e-6)
    trajectory = torch.stack(states).double().numpy()
    expected = ref["D128_steps18__trajectory"]
    assert trajectory.shape == expected.shape
    assert (np.abs(trajectory - expected) / np.maximum(1, np.abs(expected))).max() < 1e-4


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_one_point_exact_path(solver):
    """One data point x_c: the exact path x(sigma) = x_c + (sigma / sigma_max)(x_T - x_c); both solvers follow it."""
    x_c = torch.tensor([0.5, -0.25, 0.1, 0.9]).reshape(1, 1, 2, 2)
    scheduler = PFGMScheduler(aug_dim=8, solver=solver, prediction_type="sample")
    scheduler.set_timesteps(10)
    x_T = scheduler.sample_prior((3, 1, 2, 2), generator=torch.Generator().manual_seed(6))
    x = x_T
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(x_c.expand_as(x), t, x).prev_sample
        if scheduler.state_in_first_order:
            sigma = scheduler.sigmas[scheduler.step_index]
            torch.testing.assert_close(x, x_c + sigma / 80.0 * (x_T - x_c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x_c.expand_as(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("aug_dim", [1, 8, 128, None])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_ideal_denoiser_lands_on_each_point_equally_often(aug_dim, solver):
    g = torch.Generator().manual_seed(11)
    data = torch.tensor([[1.5, 0.2, -0.4], [-1.0, 0.9, 0.3], [0.1, -1.2, 0.8], [0.4, 0.5, 1.6]]).reshape(4, 1, 1, 3)
    scheduler = PFGMScheduler(aug_dim=aug_dim, solver=solver, prediction_type="sample")
    scheduler.set_timesteps(18 if solver == "heun" else 40)
    x = scheduler.sample_prior((2000, 1, 1, 3), generator=g)
    x = run_loop(scheduler, x, exact_model(data, aug_dim))
    dist = (x.reshape(-1, 1, 3) - data.reshape(1, 4, 3)).norm(dim=-1)
    landed = dist.min(1).values < 1e-3
    if aug_dim == 1:
        # D = 1: the prior's radius has an infinite mean; draws from its far tail (R > ~50 sigma_max here) are still
        # (sigma_min / sigma_max) R away at the last level, so a fixed grid cannot bring them in (why the official
        # PFGM clips the prior at `upper_norm`). They are rare:
        assert landed.float().mean() > 0.97
    else:
        assert landed.all()  # every sample ends on a data point
    counts = np.bincount(dist.argmin(1)[landed].numpy(), minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3, counts


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_one_charge_field_lines_in_field_mode(solver):
    """One charge: straight field lines, so stepping in z ends at x_c + (z_min / z_max)(x_0 - x_c) (math.md §4)."""
    x_c = torch.tensor([0.3, -0.7, 0.2, 0.5]).reshape(1, 1, 2, 2)
    N, gamma = 4, 5.0

    def field_model(x, z, scheduler):
        g_x = x_c - x  # (B, 1, 2, 2)
        g_z = -z.expand(x.shape[0]).reshape(-1, 1, 1, 1)
        norm = torch.sqrt(g_x.pow(2).sum((1, 2, 3), keepdim=True) + g_z**2)
        v = math.sqrt(N) / (norm + gamma)
        return torch.cat([g_x * v, (g_z * v).expand(-1, 1, 2, 2)], dim=1)

    scheduler = PFGMScheduler(
        aug_dim=1,
        prediction_type="poisson_field",
        sigma_max=40.0,
        sigma_min=1e-3,
        sigma_schedule="exponential",
        solver=solver,
        vz_eps=0.0,
    )
    scheduler.set_timesteps(12)
    assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1])  # the network sees the raw z
    torch.testing.assert_close(scheduler.sigmas[-1], torch.tensor(1e-3))
    x0 = scheduler.sample_prior((3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    x = x0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        assert torch.equal(model_input, x)  # unscaled input, as in the official code
        x = scheduler.step(field_model(model_input, t, scheduler), t, x).prev_sample
    torch.testing.assert_close(x, x_c + (1e-3 / 40.0) * (x0 - x_c), rtol=1e-5, atol=1e-5)


def test_field_mode_grid_is_uniform_in_log_z():
    scheduler = PFGMScheduler(aug_dim=1, prediction_type="poisson_field", sigma_max=40.0, sigma_min=1e-3,
                              sigma_schedule="exponential", solver="euler")  # fmt: skip
    scheduler.set_timesteps(10)
    log_z = torch.log(scheduler.sigmas.double())
    assert len(scheduler.timesteps) == 10 and len(scheduler.sigmas) == 11
    torch.testing.assert_close(log_z, torch.linspace(math.log(40.0), math.log(1e-3), 11, dtype=torch.float64),
                               rtol=0, atol=1e-6)  # fmt: skip


# ----- the prior, in generic loops and from sample_prior -----


@pytest.mark.parametrize("aug_dim", [1, 16])
def test_generic_loop_start_is_mapped_onto_the_exact_prior(aug_dim):
    N, n = 12, 3000
    scheduler = PFGMScheduler(aug_dim=aug_dim)
    scheduler.set_timesteps(4)
    start = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(8)) * scheduler.init_noise_sigma
    t0 = scheduler.timesteps[0]
    mapped = scheduler.scale_model_input(start, t0) * (80.0**2 + 0.5**2) ** 0.5
    R = mapped.reshape(n, -1).double().norm(dim=1).numpy()
    r_max = 80.0 * math.sqrt(aug_dim)
    assert stats.kstest(R**2 / (R**2 + r_max**2), stats.beta(N / 2, aug_dim / 2).cdf).pvalue > 1e-3
    cos = torch.nn.functional.cosine_similarity(mapped.reshape(n, -1), start.reshape(n, -1), dim=1)
    assert (cos > 1 - 1e-5).all()  # same direction, new radius
    # step uses the same mapped start: with a model returning 0 ("sample"), Euler gives x_T * sigma_1 / sigma_0
    euler = PFGMScheduler(aug_dim=aug_dim, solver="euler", prediction_type="sample")
    euler.set_timesteps(4)
    out = euler.step(torch.zeros_like(start), t0, start).prev_sample
    torch.testing.assert_close(out, mapped * euler.sigmas[1] / euler.sigmas[0], rtol=1e-5, atol=1e-4)


def test_sample_prior_start_is_used_as_is_and_only_once():
    scheduler = PFGMScheduler(aug_dim=4, solver="euler", prediction_type="sample")
    x = scheduler.sample_prior((2, 1, 2, 2), generator=torch.Generator().manual_seed(9))
    scheduler.set_timesteps(3)  # set_timesteps after sample_prior keeps the mark
    t0 = scheduler.timesteps[0]
    out = scheduler.step(torch.zeros_like(x), t0, x).prev_sample
    torch.testing.assert_close(out, x * scheduler.sigmas[1] / scheduler.sigmas[0])
    scheduler.set_timesteps(3)  # a new run without sample_prior maps its start again
    out = scheduler.step(torch.zeros_like(x), t0, x).prev_sample
    assert (out - x * scheduler.sigmas[1] / scheduler.sigmas[0]).abs().max() > 1e-3
    scheduler.set_timesteps(3)
    scheduler.mark_prior_sample()
    out = scheduler.step(torch.zeros_like(x), t0, x).prev_sample
    torch.testing.assert_close(out, x * scheduler.sigmas[1] / scheduler.sigmas[0])


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
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(solver="rk4"), "solver"),
        (dict(sigma_schedule="linear"), "sigma_schedule"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(prediction_type="poisson_field", aug_dim=4), "aug_dim=1"),
        (dict(upper_norm=0.5), "upper_norm"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PFGMScheduler(**kwargs)


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
    scheduler.set_timesteps(4)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        scheduler.step(bad, scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.add_noise(x, x, sigmas=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.add_noise(x, x)
    with pytest.raises(ValueError, match="s_churn"):
        scheduler.step(x, scheduler.timesteps[0], x, s_churn=1.0)


def test_field_mode_needs_the_extra_channel():
    scheduler = PFGMScheduler(aug_dim=1, prediction_type="poisson_field", sigma_max=40.0, sigma_min=1e-3)
    scheduler.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="C\\+1"):
        scheduler.step(torch.randn(2, 3, 4, 4), scheduler.timesteps[0], x)


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
