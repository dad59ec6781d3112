"""Every way a sampling loop can start, driven by exact networks: where the run starts (the latent-space rule of the
`PFGMScheduler` docstring), what it lands on, and DPM-Solver++(2M) against the exact flow and diffusers."""

import logging
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, EDMDPMSolverMultistepScheduler
from exact_networks import exact_network, landed, run_loop
from scipy import stats
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMFieldScheduler, PFGMScheduler
from pfgm_diffusers.perturbation import chi2_quantiles, kernel_radius

# Four points in N = 3 (as in test_scheduler.py) and sixteen in N = 16.
DATA = torch.tensor([[1.5, 0.2, -0.4], [-1.0, 0.9, 0.3], [0.1, -1.2, 0.8], [0.4, 0.5, 1.6]]).reshape(4, 1, 1, 3)
DATA_16 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(16))
FIELD = dict(sigma_max=40.0, sigma_min=1e-5, sigma_schedule="exponential")
# (prediction type, D): every prediction type, with finite, infinite and field-mode D.
MODES = [("epsilon", 8), ("v_prediction", 128), ("sample", None), ("poisson_field", 1)]
STEPS = {"heun": 18, "euler": 40, "dpmpp_2m": 10}


def make_scheduler(prediction_type, aug_dim, solver, **config):
    if prediction_type == "poisson_field":
        return PFGMFieldScheduler(solver=solver, **FIELD, **config)
    return PFGMScheduler(aug_dim=aug_dim, prediction_type=prediction_type, solver=solver, **config)


def assert_lands_on_each_point_equally_often(x, data, aug_dim, min_landed):
    """All (or `min_landed`) samples end on a data point, each point as often (chi-square test). Field mode stops at
    z_min with no final denoising step, (z_min / z) |x - x_i| from the point on a straight field line: there "on"
    is within 1e-2 (z_min = 1e-5)."""
    ok, nearest = landed(x, data, tol=1e-2 if aug_dim == 1 else 1e-3)
    assert ok.float().mean() >= min_landed, ok.float().mean()
    counts = np.bincount(nearest[ok].numpy(), minlength=len(data))
    assert stats.chisquare(counts).pvalue > 1e-3, counts


def beta_statistic(R, r):
    """R^2 / (R^2 + r^2), Beta(N/2, D/2)-distributed for kernel radii (math.md §2)."""
    return R**2 / (R**2 + r**2)


def radii(x):
    return x.reshape(len(x), -1).double().norm(dim=1).numpy()


# D = 1 draws from the prior's far tail (R > ~50 z_max) are still far from the data at z_min on a fixed grid (why
# the official PFGM clips the prior at `upper_norm`); they are rare.
MIN_LANDED = {1: 0.97, 8: 0.99, 128: 1.0, None: 1.0}


# ----- 1. a generic diffusers loop: randn * init_noise_sigma, mapped onto the prior at the first call -----


@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp_2m"])
@pytest.mark.parametrize(("prediction_type", "aug_dim"), MODES)
def test_generic_loop_maps_its_start_onto_the_prior_and_lands(prediction_type, aug_dim, solver):
    scheduler = make_scheduler(prediction_type, aug_dim, solver)
    scheduler.set_timesteps(STEPS[solver])
    noise = torch.randn(1000, 1, 1, 3, generator=torch.Generator().manual_seed(1))
    seen = []
    x = run_loop(scheduler, noise * scheduler.init_noise_sigma, exact_network(scheduler, DATA, record=seen))
    # the first call saw the exact prior draw of this noise, prior_from_noise(sample / init_noise_sigma); with
    # D = infinity the sample as it is (EDMEulerScheduler's start)
    expected = noise * scheduler.init_noise_sigma if aug_dim is None else scheduler.prior_from_noise(noise)
    torch.testing.assert_close(seen[0].float(), expected, rtol=1e-5, atol=1e-5)
    assert_lands_on_each_point_equally_often(x, DATA, aug_dim, MIN_LANDED[aug_dim])


@pytest.mark.parametrize(("prediction_type", "aug_dim"), MODES[:2] + MODES[3:])
def test_generic_start_follows_the_prior_law(prediction_type, aug_dim):
    N, n = 12, 3000
    scheduler = make_scheduler(prediction_type, aug_dim, "euler")
    scheduler.set_timesteps(4)
    start = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(8)) * scheduler.init_noise_sigma
    model_input = scheduler.scale_model_input(start, scheduler.timesteps[0])
    mapped = model_input / scheduler.precondition_inputs(torch.ones(()), scheduler.sigmas[0])  # c_in undone
    r_max = scheduler.config.sigma_max * math.sqrt(aug_dim)
    B = beta_statistic(radii(mapped), r_max)
    assert stats.kstest(B, stats.beta(N / 2, aug_dim / 2).cdf).pvalue > 1e-3
    cos = torch.nn.functional.cosine_similarity(mapped.reshape(n, -1), start.reshape(n, -1), dim=1)
    assert (cos > 1 - 1e-5).all()  # same direction, new radius


# ----- 2. a run from sample_prior with set_begin_index(0) -----


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
@pytest.mark.parametrize(("prediction_type", "aug_dim"), MODES)
def test_sample_prior_with_begin_index_is_used_as_it_is(prediction_type, aug_dim, solver):
    scheduler = make_scheduler(prediction_type, aug_dim, solver)
    x_T = scheduler.sample_prior((1000, 1, 1, 3), generator=torch.Generator().manual_seed(2))
    scheduler.set_timesteps(STEPS[solver])
    t0, sigma_0 = scheduler.timesteps[0], scheduler.sigmas[0]
    scheduler.set_begin_index(0)
    assert torch.equal(scheduler.scale_model_input(x_T, t0), scheduler.precondition_inputs(x_T, sigma_0))
    scheduler.set_timesteps(STEPS[solver])
    scheduler.set_begin_index(0)
    x = run_loop(scheduler, x_T, exact_network(scheduler, DATA))
    assert_lands_on_each_point_equally_often(x, DATA, aug_dim, MIN_LANDED[aug_dim])


def readme_v0_loop(scheduler, x, network, begin_index=None):
    """The previous README's loop: `x = scheduler.sample_prior(...)`, then the generic loop, no begin index."""
    seen = []
    scheduler.set_timesteps(6)
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        seen.append(model_input)
        x = scheduler.step(network(model_input, t), t, x).prev_sample
    return x, seen[0]


@pytest.mark.parametrize("copy", ["same tensor", "clone", "float64", "bfloat16"])
@pytest.mark.parametrize(("prediction_type", "aug_dim"), [("epsilon", 128), ("sample", 8), ("poisson_field", 1)])
def test_a_prior_draw_started_without_begin_index_is_used_as_it_is(prediction_type, aug_dim, copy):
    """The pattern of the previous README mapped the prior draw a second time (start radii off by 0.93-1.19 at
    D = 128, no warning): the scheduler now knows its prior draws, and copies of them, and runs them as
    `set_begin_index(0)` does."""
    scheduler = make_scheduler(prediction_type, aug_dim, "heun")
    network = exact_network(scheduler, DATA)
    x_T = scheduler.sample_prior((200, 1, 1, 3), generator=torch.Generator().manual_seed(21))
    start = {
        "same tensor": lambda x: x,
        "clone": lambda x: x.clone(),
        "float64": lambda x: x.double(),
        "bfloat16": lambda x: x.to(torch.bfloat16).float(),
    }[copy](x_T)
    expected, expected_first = readme_v0_loop(scheduler, start.clone(), network, begin_index=0)
    x, first = readme_v0_loop(scheduler, start, network)
    assert torch.equal(first, expected_first) and torch.equal(x, expected)
    torch.testing.assert_close(first.float(), scheduler.precondition_inputs(x_T, scheduler.sigmas[0]), rtol=1e-2,
                               atol=1e-6)  # fmt: skip


def test_a_fresh_gaussian_start_is_still_mapped_after_prior_draws_of_its_shape():
    """Remembering prior draws never takes a `randn * init_noise_sigma` start for one (no false match in 400 small
    batches, each after 32 prior draws of its shape)."""
    scheduler = PFGMScheduler(aug_dim=128, solver="euler", prediction_type="sample")
    generator = torch.Generator().manual_seed(22)
    for _ in range(32):
        scheduler.sample_prior((1, 1, 2, 2), generator=generator)
    scheduler.set_timesteps(3)
    for _ in range(400):
        noise = torch.randn(1, 1, 2, 2, generator=generator)
        scheduler.set_timesteps(3)
        model_input = scheduler.scale_model_input(noise * scheduler.init_noise_sigma, scheduler.timesteps[0])
        expected = scheduler.precondition_inputs(scheduler.prior_from_noise(noise), scheduler.sigmas[0])
        torch.testing.assert_close(model_input, expected, rtol=1e-5, atol=1e-6)


def test_prior_helpers_set_no_state():
    scheduler = PFGMScheduler(aug_dim=4, solver="euler", prediction_type="sample")
    scheduler.set_timesteps(3)
    before = dict(vars(scheduler))
    x = scheduler.sample_prior((2, 1, 2, 2), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(scheduler.prior_from_noise(scheduler.noise_from_prior(x)), x)
    after = dict(vars(scheduler))
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert not hasattr(scheduler, "mark_prior_sample")


def test_a_run_from_a_later_timestep_without_begin_index_uses_its_sample():
    """Older img2img loops find their first index from the timestep: not step 0, so not a generic start."""
    scheduler = PFGMScheduler(aug_dim=8, solver="euler", prediction_type="sample")
    scheduler.set_timesteps(6)
    x = scheduler.add_noise(DATA, torch.randn(4, 1, 1, 3), scheduler.timesteps[3:4])
    t = scheduler.timesteps[3]
    assert torch.equal(scheduler.scale_model_input(x, t), scheduler.precondition_inputs(x, scheduler.sigmas[3]))
    assert scheduler.step_index == 3 and scheduler.begin_index is None


# ----- 3. diffusers-style img2img: add_noise at timesteps[begin], then the loop with set_begin_index -----


def img2img(scheduler, image, noise, strength, num_inference_steps, network):
    """diffusers' img2img start (e.g. StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents)."""
    scheduler.set_timesteps(num_inference_steps)
    t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    begin = t_start * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    latents = scheduler.add_noise(image, noise, timesteps[:1].repeat(len(image)))
    return latents, run_loop(scheduler, latents, network)


@pytest.mark.parametrize("strength", [0.3, 1.0])
@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
@pytest.mark.parametrize(("prediction_type", "aug_dim"), MODES)
def test_img2img_start_is_the_add_noise_output(prediction_type, aug_dim, solver, strength):
    n, N = 2000, 3
    scheduler = make_scheduler(prediction_type, aug_dim, solver)
    image = DATA[torch.arange(n) % 4] + 0.05 * torch.randn(n, 1, 1, 3, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(n, 1, 1, 3, generator=torch.Generator().manual_seed(4))
    seen = []
    latents, x = img2img(scheduler, image, noise, strength, 10, exact_network(scheduler, DATA, record=seen))
    torch.testing.assert_close(seen[0].float(), latents, rtol=1e-5, atol=1e-5)  # used as it is
    assert_lands_on_each_point_equally_often(x, DATA, aug_dim, MIN_LANDED[aug_dim])
    if strength == 1.0 and aug_dim is not None:
        # the start is an exact kernel draw around each image at sigma_max (the old first-step map broke this)
        r = scheduler.config.sigma_max * math.sqrt(aug_dim)
        R = radii(seen[0] - image.double())
        assert stats.kstest(beta_statistic(R, r), stats.beta(N / 2, aug_dim / 2).cdf).pvalue > 1e-3
        law = stats.beta(N / 2, aug_dim / 2)
        expected = r * np.sqrt(law.ppf([0.01, 0.5, 0.99]) / (1 - law.ppf([0.01, 0.5, 0.99])))
        np.testing.assert_allclose(np.quantile(R, [0.01, 0.5, 0.99]), expected, rtol=0.15)


# ----- 4. a DDPMPipeline-style loop: plain randn, no init_noise_sigma, no scale_model_input -----


@pytest.mark.parametrize("aug_dim", [128, 1, None])
def test_plain_randn_start_is_never_degenerate_and_is_warned_about(aug_dim, caplog):
    """With D = 128 the first-step map once turned a plain randn start into exactly 0 (its chi-square quantile
    underflowed); now the tail probability is floored, the start keeps a positive radius, and both mistakes of the
    loop are named."""
    scheduler = PFGMScheduler(aug_dim=aug_dim, solver="euler", prediction_type="sample")
    scheduler.set_timesteps(5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    with caplog.at_level(logging.WARNING, logger="pfgm_diffusers.scheduling_pfgm"):
        t0 = scheduler.timesteps[0]
        first = scheduler.step(torch.zeros_like(x), t0, x, generator=g).prev_sample  # Euler: x_start sigma_1/sigma_0
        y = first
        for t in scheduler.timesteps[1:]:
            y = scheduler.step(torch.tanh(y), t, y, generator=g).prev_sample
    assert torch.isfinite(first).all() and torch.isfinite(y).all()
    norm_sq = x.reshape(2, -1).double().pow(2).sum(1).numpy() / scheduler.init_noise_sigma**2
    assert chi2_quantiles(norm_sq, 192)[0].max() == 0  # the quantile underflows in float64 ...
    if aug_dim is not None:
        R = kernel_radius(norm_sq, 192, 80.0, aug_dim)  # ... yet the radius it maps to is positive
        expected = R * float(scheduler.sigmas[1] / scheduler.sigmas[0])
        np.testing.assert_allclose(radii(first), expected, rtol=1e-5)
    assert (radii(first) > 0).all()
    text = caplog.text
    assert text.count("not a `randn * init_noise_sigma` draw") == 1 and "set_begin_index" in text
    assert text.count("`scale_model_input` was not called") == 1  # once per run


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_diffusers_ddpm_pipeline_runs_with_the_scheduler_swapped_in(solver, caplog):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(aug_dim=128, solver=solver))
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="pfgm_diffusers.scheduling_pfgm"):
        images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images  # fmt: skip
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all() and images.std() > 0
    assert "init_noise_sigma" in caplog.text and "scale_model_input" in caplog.text


@torch.no_grad()
def test_img2img_loop_with_a_unet_warns_of_nothing(caplog):
    scheduler = PFGMScheduler(aug_dim=128, solver="dpmpp_2m")
    unet = tiny_unet()
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def network(model_input, t):
        return unet(model_input, t).sample

    with caplog.at_level(logging.WARNING, logger="pfgm_diffusers.scheduling_pfgm"):
        for strength in (0.3, 1.0):
            latents, x = img2img(scheduler, image, noise, strength, 6, network)
            assert torch.isfinite(x).all()
    assert caplog.text == ""


# ----- DPM-Solver++(2M) -----


@pytest.mark.parametrize("aug_dim", [8, 128, None])
def test_dpmpp_2m_in_10_calls_lands_on_each_point_equally_often(aug_dim):
    scheduler = PFGMScheduler(aug_dim=aug_dim, solver="dpmpp_2m", prediction_type="sample")
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 10
    x_T = scheduler.sample_prior((2000, 1, 1, 3), generator=torch.Generator().manual_seed(11))
    scheduler.set_begin_index(0)
    x = run_loop(scheduler, x_T, exact_network(scheduler, DATA))
    assert_lands_on_each_point_equally_often(x, DATA, aug_dim, MIN_LANDED[aug_dim])


def run_from(x_T, aug_dim, solver, num_inference_steps, data):
    scheduler = PFGMScheduler(aug_dim=aug_dim, solver=solver, prediction_type="sample")
    scheduler.set_timesteps(num_inference_steps)
    scheduler.set_begin_index(0)
    return run_loop(scheduler, x_T.double(), exact_network(scheduler, data)).float()


@pytest.mark.parametrize("aug_dim", [8, 128, None])
def test_dpmpp_2m_in_10_calls_is_closer_to_the_exact_flow_than_heun_in_11(aug_dim):
    """Sixteen points in N = 16; the exact flow is Heun with 200 steps (399 calls) from the same prior draws.
    Measured (500 draws): mean distance of the end points 0.19-0.23 (DPM-Solver++(2M), 10 calls) against 0.45-0.50
    (Heun, 6 steps = 11 calls) and 0.57-0.58 (Euler, 10 calls); 4-5 % against 10-11 % end on another point."""
    x_T = PFGMScheduler(aug_dim=aug_dim).sample_prior((500, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    exact = run_from(x_T, aug_dim, "heun", 200, DATA_16)
    error = {}
    for solver, steps in (("dpmpp_2m", 10), ("heun", 6)):
        error[solver] = (run_from(x_T, aug_dim, solver, steps, DATA_16) - exact).reshape(500, -1).norm(dim=1).mean()
    assert error["dpmpp_2m"] < 0.6 * error["heun"], error


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_inference_steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers_edm_dpmsolver_step_for_step(
    prediction_type, sigma_schedule, final_sigmas_type, num_inference_steps
):
    """aug_dim=None is `EDMDPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` (its defaults:
    midpoint, lower_order_final=True, euler_at_final=False). Every difference, each checked here:

    - its schedule is computed from a float32 ramp, ours from a float64 one as `EDMEulerScheduler` does: sigmas
      differ by up to 2.3e-5 (relative 1.3e-6), so the comparison gives it our sigmas;
    - with final_sigmas_type="sigma_min" its final level is `config.sigma_min`, ours the schedule's last level (as
      `EDMEulerScheduler`): its last step is a step of ~1e-10, ours of length 0 (both return the sample within 1e-6);
    - the second-order update is the same formula written differently (diffusers: exp(-h) - 1 in float32): the
      steps agree to 2e-6 relative, not bit for bit;
    - lower_order_final: diffusers makes the last of < 15 steps first order; it is first order in both when it ends
      at 0, and of length 0 when it ends at sigma_min, so the results agree in every configuration;
    - it has no "sample" prediction type in `precondition_outputs` (it raises), and returns only `prev_sample`.
    """
    config = dict(prediction_type=prediction_type, sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type)
    ours = PFGMScheduler(aug_dim=None, solver="dpmpp_2m", **config)
    theirs = EDMDPMSolverMultistepScheduler(**config)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert ours.order == theirs.order == 1 and len(ours.timesteps) == len(theirs.timesteps)
    torch.testing.assert_close(theirs.sigmas, ours.sigmas, rtol=2e-6, atol=1e-8)
    assert ours.sigmas[-1] == (0 if final_sigmas_type == "zero" else ours.sigmas[-2])
    theirs.sigmas, theirs.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
    network = exact_network(ours, DATA)
    a = torch.randn(50, 1, 1, 3, generator=torch.Generator().manual_seed(1)) * ours.init_noise_sigma
    b = a.clone()
    for t in ours.timesteps:
        a = ours.step(network(ours.scale_model_input(a, t), t), t, a).prev_sample
        b = theirs.step(network(theirs.scale_model_input(b, t), t), t, b).prev_sample
        assert ours.step_index == theirs.step_index
        torch.testing.assert_close(a, b, rtol=5e-6, atol=5e-6)
