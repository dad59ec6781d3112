"""The D sweep (scripts/aug_dim_sweep, scripts/sweep_aug_dim.py) and the evidence (benchmarks/evidence): sliced
Wasserstein, the toy densities, training and likelihood, sampling through the pipeline, the official robustness
experiments (injected noise, quantised weights), RK45 within a budget, the judges, the statistics, the claims'
verdicts, the reports and plots, and one end-to-end run of a tiny sweep through the real trainer."""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, losses, ode, preconditioning, restart
from pfgm_diffusers.denoiser import make_denoiser
from pfgm_diffusers.evaluation import sliced_wasserstein

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "scripts"), str(Path(__file__).resolve().parent)]

import sweep_aug_dim  # noqa: E402
from aug_dim_sweep import jobs, judges, models, presets, report, sampling, statistics  # noqa: E402
from aug_dim_sweep import plots as sweep_plots  # noqa: E402
from evidence import claims, markdown, plots, run, toy2d  # noqa: E402
from tiny_models import tiny_unet  # noqa: E402

# ---------------------------------------------------------------------- sliced Wasserstein


def test_sliced_wasserstein_of_a_cloud_and_itself_is_zero():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x.clone(), 64, torch.Generator().manual_seed(1)) == 0.0


def test_sliced_wasserstein_of_a_shift_is_the_rms_projected_shift():
    # A shift keeps the order of every projection: each 1-D W2 is exactly |<theta, delta>|
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = torch.tensor([0.3, -0.4], dtype=torch.float64)
    directions = torch.randn((128, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    expected = (directions @ delta).pow(2).mean().sqrt().item()
    got = sliced_wasserstein(x + delta, x, 128, torch.Generator().manual_seed(5))
    assert got == pytest.approx(expected, rel=1e-12)
    # and |delta| / sqrt(d) in the limit of many projections
    many = sliced_wasserstein(x + delta, x, 20000, torch.Generator().manual_seed(6))
    assert many == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


def test_sliced_wasserstein_in_one_dimension_is_w2_of_the_sorted_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 1)), rng.exponential(size=(300, 1))
    expected = math.sqrt(np.mean((np.sort(a[:, 0]) - np.sort(b[:, 0])) ** 2))
    assert sliced_wasserstein(a, b, 3) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "x, y, message",
    [(np.zeros((4, 2)), np.zeros((5, 2)), "one shape"), (np.zeros(4), np.zeros(4), "one shape")],
)
def test_sliced_wasserstein_rejects_clouds_of_different_shapes(x, y, message):
    with pytest.raises(ValueError, match=message):
        sliced_wasserstein(x, y)


# ---------------------------------------------------------------------- toy densities and likelihood


@pytest.mark.parametrize("dataset", toy2d.DATASETS)
def test_toy_density_integrates_to_one_and_matches_its_sampler(dataset):
    grid = torch.linspace(-2, 2, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    density = toy2d.log_density(dataset, points).exp()
    cell = float(grid[1] - grid[0]) ** 2
    assert (density.sum() * cell).item() == pytest.approx(1.0, abs=2e-3)
    # The sampler draws from that density: E[log p] over samples equals the integral of p log p
    entropy = -(density * density.clamp_min(1e-300).log()).sum().item() * cell
    samples = toy2d.sample_data(dataset, 20000, torch.Generator().manual_seed(0))
    log_p = toy2d.log_density(dataset, samples)
    assert -log_p.mean().item() == pytest.approx(entropy, abs=4 * log_p.std().item() / math.sqrt(20000))


def test_toy_rejects_an_unknown_dataset():
    with pytest.raises(ValueError, match="unknown toy dataset"):
        toy2d.sample_data("moons", 4, torch.Generator())


class ExactGaussianModel(torch.nn.Module):
    """The EDM network F whose denoiser is the exact one of N(0, s^2 I) data: D = s^2 / (s^2 + sigma^2) x."""

    def __init__(self, std, sigma_data=0.5):
        super().__init__()
        self.std, self.sigma_data = std, sigma_data

    def forward(self, model_input, timestep):
        sigma = torch.exp(4 * torch.as_tensor(timestep, dtype=model_input.dtype)).reshape(-1, 1)  # c_noise^-1
        x = model_input / preconditioning.c_in(sigma, self.sigma_data)
        denoised = self.std**2 / (self.std**2 + sigma**2) * x
        skip = preconditioning.c_skip(sigma, self.sigma_data)
        return toy2d._Output((denoised - skip * x) / preconditioning.c_out(sigma, self.sigma_data))


def test_toy_likelihood_of_the_exact_gaussian_denoiser_is_its_linear_flow():
    # D = infinity, N(0, s^2 I) data: the flow is linear, x(sigma) = x sqrt((s^2 + sigma^2) / (s^2 + sigma_min^2)),
    # so log p(x) = log p_prior(k x) + N log k with k that ratio at sigma_max
    from pfgm_diffusers.perturbation import prior_log_prob

    std = 0.7
    scheduler = toy2d.make_scheduler(None)
    sigma_min, sigma_max = scheduler.config.sigma_min, scheduler.config.sigma_max
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    log_prob, evaluations = toy2d.log_likelihood(ExactGaussianModel(std), scheduler, x, rtol=1e-7, atol=1e-7)
    k = math.sqrt((std**2 + sigma_max**2) / (std**2 + sigma_min**2))
    expected = prior_log_prob(k * x.double(), sigma_max, None) + 2 * math.log(k)
    torch.testing.assert_close(log_prob, expected, atol=2e-5, rtol=0)
    # which is the data density N(0, (s^2 + sigma_min^2) I) up to the prior's sigma_max^2 for s^2 + sigma_max^2
    variance = std**2 + sigma_min**2
    gaussian = -x.double().pow(2).sum(1) / (2 * variance) - math.log(2 * math.pi * variance)
    torch.testing.assert_close(log_prob, gaussian, atol=2e-3, rtol=0)
    assert evaluations > 10


def test_toy_trains_with_the_library_loss():
    # The toy claims test the library's loss: no private copy of it in the evidence
    assert toy2d.pfgmpp_loss is losses.pfgmpp_loss
    assert not [name for name in vars(toy2d) if "loss" in name and name != "pfgmpp_loss"]


def test_toy_run_measures_a_short_training():
    # 150 steps learn much of the mixture: the samples and the likelihood beat the untrained model's on the same
    # evaluation draws, and the training loss falls
    settings = {**run.QUICK["toy"], "batch_size": 256, "num_samples": 512, "num_test": 16}
    untrained = toy2d.run_toy("gaussian_mixture", 4, 0, {**settings, "num_steps": 0})
    trained = toy2d.run_toy("gaussian_mixture", 4, 0, {**settings, "num_steps": 150})
    assert trained["nonfinite_samples"] == 0
    assert trained["sliced_wasserstein_floor"] == untrained["sliced_wasserstein_floor"] > 0
    assert trained["sliced_wasserstein"] < 0.6 * untrained["sliced_wasserstein"]  # measured 0.17 against 0.37
    assert trained["nll_gap"] < untrained["nll_gap"] - 0.3  # measured 1.46 against 2.04 nats
    assert trained["loss_end"] < trained["loss_start"]
    assert math.isfinite(trained["nll_gap"]) and trained["nll_gap_se"] > 0


# ---------------------------------------------------------------------- statistics


def test_estimate_is_immutable_and_its_error_bar_is_spread_plus_standard_error():
    value = statistics.Estimate.of([1.0, 2.0], [0.3, 0.4])
    assert value.mean == 1.5 and value.spread == 0.5 and value.se == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    assert value.error == pytest.approx(0.75) and f"{value:.2f}" == "1.50 ± 0.75"
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.values = (0.0, 0.0)
    negated = value.negated()
    assert negated.values == (-1.0, -2.0) and value.values == (1.0, 2.0) and negated.error == value.error
    assert statistics.Estimate.of([0.0]).less_than(statistics.Estimate.of([1.0], [0.5]))  # 1 > 0 + 0.5
    assert not statistics.Estimate.of([0.0], [0.3]).less_than(statistics.Estimate.of([1.0], [0.8]))
    with pytest.raises(ValueError, match="at least one value"):
        statistics.Estimate.of([])


def test_degradation_of_a_higher_is_better_figure_is_its_drop():
    reference = [{"share": 0.9, "share_se": 0.01}, {"share": 0.8, "share_se": 0.01}]
    perturbed = [{"share": 0.7, "share_se": 0.01}, {"share": 0.7, "share_se": 0.01}]
    drop = statistics.degradation(perturbed, reference, "share", higher_is_better=True)
    assert drop.values == pytest.approx((0.2, 0.1)) and drop.se == pytest.approx(
        math.hypot(0.01, 0.01) * math.sqrt(2) / 2
    )
    assert statistics.degradation(perturbed, reference, "share").values == pytest.approx((-0.2, -0.1))


# ---------------------------------------------------------------------- sampling, injected noise, quantisation


def tiny_pipeline(field=False, aug_dim=8):
    if field:
        scheduler = PFGMScheduler(
            prediction_type="poisson_field", aug_dim=1, sigma_min=1e-3, sigma_max=40.0, upper_norm=3000.0
        )
        unet = tiny_unet(in_channels=1, out_channels=2)
    else:
        scheduler, unet = PFGMScheduler(aug_dim=aug_dim), tiny_unet(in_channels=1)
    pipe = PFGMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("field", [False, True])
def test_sample_images_are_the_pipeline_from_the_seeds_latents(field):
    pipe = tiny_pipeline(field)
    images, nfe = sampling.sample_images(pipe, "heun", 3, num_images=3, seed=7, batch_size=2)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    expected = pipe(batch_size=3, generator=generators, num_inference_steps=3, output_type="pt")
    # Equal up to the rounding of (latents * init_noise_sigma) / init_noise_sigma at radius ~80 before the prior map
    torch.testing.assert_close(images, expected.images, atol=1e-4, rtol=0)
    assert nfe == expected.nfe == 5


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_stepwise_sampling_for_the_injected_noise_is_the_pipelines_loop(solver):
    # With a vanishing noise scale, the step-at-a-time solver of the noise experiments is the pipeline's own run
    pipe = tiny_pipeline()
    plain, nfe = sampling.sample_images(pipe, solver, 4, 2, seed=0, batch_size=2)
    stepwise, nfe_stepwise = sampling.sample_images(pipe, solver, 4, 2, seed=0, batch_size=2, noise_scale=1e-30)
    torch.testing.assert_close(stepwise, plain, atol=1e-5, rtol=0)
    assert nfe_stepwise == nfe == (7 if solver == "heun" else 4)
    noisy, _ = sampling.sample_images(pipe, solver, 4, 2, seed=0, batch_size=2, noise_scale=0.2)
    assert (noisy - plain).abs().max() > 1e-3


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_noise_is_injected_before_the_first_call_of_every_step_as_the_official_code(solver):
    # generate_alpha.py: x_cur += randn_like(x_cur) * t_cur * alpha at the top of every step i = 0 .. n-1. With
    # D(x) = x the ODE stands still: the result is the start plus exactly the injected noise, and each step's first
    # call already sees that step's noise (the first step's included).
    seen = []

    def identity(sample, sigma):
        seen.append((sigma, sample.clone()))
        return sample

    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
    sigmas, alpha = [80.0, 10.0, 1.0, 0.002, 0.0], 0.1
    x = sampling.sample_with_noise(identity, x0, sigmas, solver, alpha, torch.Generator().manual_seed(1))
    noise_generator, expected, first_inputs = torch.Generator().manual_seed(1), x0, []
    for sigma in sigmas[:-1]:
        expected = expected + torch.randn(x0.shape, generator=noise_generator) * sigma * alpha
        first_inputs.append(expected)
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-5)
    # Heun calls at sigma_i, then at sigma_i+1 (no correction on the step to 0): the first calls are every other
    firsts = [sample for _, sample in seen][:: 2 if solver == "heun" else 1]
    assert len(firsts) == 4
    for got, want in zip(firsts, first_inputs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert len(seen) == (7 if solver == "heun" else 4)


def test_noise_injection_refuses_a_multistep_solver():
    with pytest.raises(ValueError, match="single-step solver"):
        sampling.sample_with_noise(lambda x, s: x, torch.zeros(1, 1, 2, 2), [1.0, 0.0], "dpmpp_2m", 0.1, None)


def official_quantize(x, num_bits):
    """generate_quant.py (Newbeeer/pfgmpp, lines 411-437), verbatim but for the namedtuple."""
    qmin, qmax = 0.0, 2.0**num_bits - 1.0
    min_val, max_val = x.min(), x.max()
    scale = (max_val - min_val) / (qmax - qmin)
    initial_zero_point = qmin - min_val / scale
    if initial_zero_point < qmin:
        zero_point = qmin
    elif initial_zero_point > qmax:
        zero_point = qmax
    else:
        zero_point = initial_zero_point
    zero_point = int(zero_point)
    q_x = zero_point + x / scale
    q_x.clamp_(qmin, qmax).round_()
    return scale * (q_x.float() - zero_point)


@pytest.mark.parametrize("bits", [3, 5, 8])
@pytest.mark.parametrize("shift", [0.0, 0.37, 5.0, -5.0])
def test_quantize_tensor_is_the_official_min_max_with_zero_point(bits, shift):
    weight = torch.randn(64, 9, generator=torch.Generator().manual_seed(bits)) + shift
    quantized = sampling.quantize_tensor(weight, bits)
    torch.testing.assert_close(quantized, official_quantize(weight.clone(), bits), atol=0, rtol=0)
    assert quantized.unique().numel() <= 2**bits
    if shift == 0.0:  # a range holding 0: every weight within one level (the truncated zero point shifts the grid)
        scale = (weight.max() - weight.min()) / (2**bits - 1)
        assert (quantized - weight).abs().max() <= scale + 1e-6 and 0.0 in quantized


def test_quantize_weights_leaves_biases_norms_and_embeddings_in_full_precision():
    unet = tiny_unet(in_channels=1, num_class_embeds=3)
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    quantized = sampling.quantize_weights(unet, 4)
    names = set(sampling.quantized_parameter_names(unet))
    assert "conv_in.weight" in names and "down_blocks.0.resnets.0.conv1.weight" in names
    for name, parameter in quantized.named_parameters():
        assert torch.equal(dict(unet.named_parameters())[name], before[name])  # the original is untouched
        kept = any(part in name for part in ("norm", "time_embedding", "class_embedding", "time_emb_proj", "bias"))
        assert (name in names) != kept, name
        if name in names:
            assert parameter.unique().numel() <= 16 and not torch.equal(parameter, before[name])
        else:
            assert torch.equal(parameter, before[name])


def test_rk45_within_a_budget_stops_and_otherwise_is_the_pipelines_rk45():
    pipe = tiny_pipeline(field=True)
    with pytest.raises(ode.EvaluationBudgetExceeded) as stalled:
        sampling.sample_rk45(pipe, 2, 0, 2, max_nfe=5)
    assert 1e-3 <= stalled.value.sigma < 40.0  # where it had got to, in z
    assert "denoise" not in vars(pipe)  # nothing patched
    images, nfe = sampling.sample_rk45(pipe, 2, 0, 2)
    expected = pipe(latents=sampling.latents_for(2, (1, 8, 8), 0), solver="rk45", output_type="pt")
    torch.testing.assert_close(images, expected.images, atol=0, rtol=0)
    assert nfe == expected.nfe > 5


# ---------------------------------------------------------------------- judges


@pytest.mark.parametrize("aug_dim", [8, None])
def test_restart_is_the_librarys_sampler_beside_heun_at_the_same_nfe(aug_dim):
    pipe = tiny_pipeline(aug_dim=aug_dim)
    images, nfe = sampling.sample_images(pipe, "restart", 18, 4, 0, 4)
    assert nfe == 43 and sampling.heun_steps_for_nfe(pipe, nfe) == 22 and sampling.heun_nfe(pipe, 22) == 43
    assert sampling.heun_nfe(pipe, 12) == 23 and sampling.heun_steps_for_nfe(pipe, 24) == 12  # a tie: fewer steps
    # The library's Restart from the sweep's latents, its jumps for the scheduler's D from the seed's generator
    x = sampling.prior_from_noise(pipe, sampling.latents_for(4, (1, 8, 8), 0))
    sigmas, generator = sampling.noise_levels(pipe, 18), torch.Generator().manual_seed(10**6)
    expected = restart.sample_restart(make_denoiser(pipe.unet, pipe.scheduler), x, sigmas, None, aug_dim, generator)
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    heun, _ = sampling.sample_images(pipe, "heun", 18, 4, 0, 4)
    assert (images - heun).abs().max() > 1e-3  # the jumps changed the samples
    blocks = {"late": [2, 1, 0.05, 0.1]}
    images, nfe = sampling.sample_images(pipe, "restart", 18, 4, 0, 4, restart_blocks=blocks)
    assert nfe == 35 + 2


def test_digits_judge_gives_real_digits_their_heldout_figures_with_error_bars():
    from pfgm_diffusers.evaluation import digits_split, load_digits_images

    images, _ = load_digits_images(digits_split()[1])
    result = judges.DigitsJudge(num_bootstrap=20)(images)
    assert result["confident_share"] == result["heldout_confident_share"]
    assert result["frechet_distance"] == pytest.approx(result["heldout_frechet_distance"], rel=1e-9)
    assert 0 < result["confident_share_se"] < 0.05 and result["frechet_distance_se"] > 0


def test_sliced_wasserstein_judge_reads_a_folder_and_ranks_real_images_above_noise(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):  # smooth gradients with a random direction: a distribution far from uniform noise
        ramp = np.linspace(0, 1, 16)[None, :] * rng.uniform(0.5, 1) + np.linspace(0, 1, 16)[:, None] * rng.uniform(
            0, 0.5
        )
        Image.fromarray((255 * ramp / ramp.max()).astype(np.uint8), mode="L").save(tmp_path / f"{i}.png")
    real = judges.real_images({"train_data_dir": str(tmp_path)}, resolution=8)
    assert real.shape == (40, 1, 8, 8) and 0 <= real.min() and real.max() <= 1
    judge = judges.make_judge({"data": {"train_data_dir": str(tmp_path)}, "training": {"resolution": 8},
                               "evaluation": {"metric": "sliced_wasserstein"}})  # fmt: skip
    good, bad = judge(real[:20]), judge(torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert good["sliced_wasserstein"] < good["heldout_sliced_wasserstein"] + 3 * good["sliced_wasserstein_se"]
    assert (
        bad["sliced_wasserstein"]
        > good["sliced_wasserstein"] + bad["sliced_wasserstein_se"] + good["sliced_wasserstein_se"]
    )
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        judges.make_judge({"evaluation": {"metric": "fid"}})


def test_trainer_command_trains_pfgmpp_and_field_models_on_any_data():
    training = presets.EVIDENCE["training"]
    pfgmpp = models.trainer_command(models.ModelSpec("pfgmpp", None, 1), "out", 500, training)
    assert pfgmpp[pfgmpp.index("--aug_dim") + 1] == "inf"
    assert pfgmpp[pfgmpp.index("--lr_scheduler") + 1] == "constant_with_warmup"
    assert pfgmpp[pfgmpp.index("--resume_from_checkpoint") + 1] == "latest"
    assert not [flag for flag in pfgmpp if flag.startswith(("--train_data_dir", "--dataset_name"))]
    field = models.trainer_command(models.ModelSpec("poisson_field", None, 0), "out", 500, training)
    assert "--aug_dim" not in field and "--M=356" in field
    own = {**training, "model_config": None, "extra_args": ["--random_flip"]}
    command = models.trainer_command(models.ModelSpec("pfgmpp", 64, 0), "out", 9, own, {"train_data_dir": "my images"})
    assert "--train_data_dir=my images" in command and "--model_config_name_or_path" not in command
    assert command[-1] == "--random_flip"


def test_stf_models_train_with_the_trainers_stf_target():
    training = presets.EVIDENCE["training"]
    spec = models.ModelSpec.from_model(["pfgmpp", 128, "stf"], 1)
    assert (spec.name, spec.folder, spec.target) == ("D=128 STF", "D128-stf-seed1", "stf")
    command = models.trainer_command(spec, "out", 500, training)
    assert command[command.index("--target") + 1] == "stf"
    assert command[command.index("--reference_batch_size") + 1] == "1024"
    plain = models.trainer_command(models.ModelSpec.from_model(["pfgmpp", 128], 1), "out", 500, training)
    assert "--target" not in plain and "--reference_batch_size" not in plain
    default = models.trainer_command(spec, "out", 500, {**training, "reference_batch_size": None})
    assert "--target" in default and "--reference_batch_size" not in default  # the trainer's default
    assert models.ModelSpec.from_model(["pfgmpp", None], 0).folder == "Dinf-seed0"
    assert models.ModelSpec.from_model(["poisson_field", None], 0).name == "PFGM"


def test_a_models_training_is_kept_apart_from_its_measurements():
    base = presets.EVIDENCE_REDUCED
    measured = {"num_images": 50, "steps": {"heun": [18]}, "restart_steps": [], "noise_scales": [], "rk45_images": 3}
    other = {**base, "evaluation": {**base["evaluation"], **measured}}
    assert models.training_settings(other) == models.training_settings(base)
    for changed in (
        {**base, "training": {**base["training"], "segments": [500]}},
        {**base, "evaluation": {**base["evaluation"], "curve_images": 10}},
        {**base, "data": {"train_data_dir": "imgs"}},
    ):
        assert models.training_settings(changed) != models.training_settings(base)
    job_id, function, arguments = jobs.train_job(["pfgmpp", None, "stf"], 1, base)
    assert job_id == "train-Dinf-stf-seed1" and function is jobs.train_model
    assert arguments["settings"] == models.training_settings(base)
    assert [job[0] for job in jobs.train_jobs(base)][:2] == ["train-D8-seed0", "train-D8-seed1"]


# ---------------------------------------------------------------------- claims, reports and plots


def point(fd, se=0.01, confident=0.9):
    return {
        "frechet_distance": fd,
        "frechet_distance_se": se,
        "confident_share": confident,
        "confident_share_se": 0.01,
        "class_coverage": 1.0,
        "class_coverage_se": 0.0,
        "heldout_frechet_distance": 6.5,
        "heldout_confident_share": 0.955,
        "heldout_class_coverage": 1.0,
        "num_images": 100,
        "heldout_num_images": 100,
        "nfe": 35.0,
    }


def fake_result(name, seed, fd, noise_fd, quant_fd, few_fd):
    """A model's results with the sweep's layout: Fréchet distance `fd` at the reference, `noise_fd` at alpha 0.2,
    `quant_fd` at 5 bits, `few_fd` with 3 Heun steps."""
    aug_dim = None if name in ("D=inf", "PFGM") else int(name[2:])
    solvers = {
        "heun": [{**point(few_fd), "num_inference_steps": 3, "nfe": 5.0}, {**point(fd), "num_inference_steps": 18}],
        "euler": [
            {**point(few_fd), "num_inference_steps": 6, "nfe": 6.0},
            {**point(fd), "num_inference_steps": 35},
        ],
    }
    if name == "PFGM":
        solvers["rk45"] = [{**point(fd), "num_inference_steps": None, "nfe": 120.0}]
    return {
        "name": name,
        "seed": seed,
        "aug_dim": aug_dim,
        "objective": "poisson_field" if name == "PFGM" else "pfgmpp",
        "curve": [{**point(fd + 1.0), "steps": 150}, {**point(fd), "steps": 300}],
        "train_seconds": 60.0,
        "parameters": 270000,
        "solvers": solvers,
        "noise": [{**point(noise_fd), "alpha": 0.2}],
        "quantization": [{**point(quant_fd), "bits": 5}, {**point(fd), "bits": 8}],
    }


SWEEP = {
    **presets.EVIDENCE_QUICK,
    "training": {**presets.EVIDENCE_QUICK["training"], "segments": [150, 300]},
    "evaluation": {
        **presets.EVIDENCE_QUICK["evaluation"],
        "steps": {"heun": [3, 18], "euler": [6, 35], "other": [5]},
        "noise_scales": [0.2],
        "quantization_bits": [5, 8],
    },
}
SETTINGS = {"digits": SWEEP, "toy": run.QUICK["toy"]}


def decide(results):
    return claims.decide_claims(statistics.group_by_model(results), {}, SETTINGS)


def outcome(decided, start, metric="frechet_distance"):
    (claim,) = [c for c in decided if c["claim"].startswith(start)]
    return claim["outcomes"][metric][0]


def test_claims_follow_the_numbers_and_their_error_bars():
    results = []
    for seed, jitter in ((0, 0.0), (1, 0.1)):
        # D=8: as good as D=inf at the reference but degrades far less; PFGM clearly worse
        results.append(fake_result("D=8", seed, 2.0 + jitter, 2.5 + jitter, 2.2, 3.0))
        results.append(fake_result("D=64", seed, 1.0 + jitter, 9.0, 9.0, 9.0))
        results.append(fake_result("D=inf", seed, 2.0 - jitter, 8.0 - jitter, 7.0, 9.0))
        results.append(fake_result("PFGM", seed, 5.0 + jitter, 9.0, 9.0, 9.0))
    decided = decide(results)
    assert outcome(decided, "A middle D") == "reproduced"  # D=64: 1.05 ± 0.06 against D=inf 1.95 ± 0.06
    assert outcome(decided, "A middle D", "confident_share") == "not resolved"  # every confident share is 0.9
    assert outcome(decided, "The best middle D beats the original PFGM") == "reproduced"
    assert outcome(decided, "D=8 degrades less than D = ∞ under noise") == "reproduced"
    assert outcome(decided, "D=8 degrades less than D = ∞ under fewer Heun steps") == "reproduced"
    assert outcome(decided, "D=8 degrades less than D = ∞ under post-training") == "partly reproduced"  # 5 bits
    # Euler 6 steps: PFGM 9 against 5.05 at 35 steps, D=inf 9 against 1.95: PFGM loses less
    assert outcome(decided, "PFGM degrades less than D = ∞ under larger Euler steps") == "reproduced"
    assert outcome(decided, "DPM-Solver++(2M)") == "not measured"
    assert [c["claim"] for c in decided] == [c["claim"] for f in claims.CLAIMS for c in f(
        statistics.group_by_model(results), {}, SETTINGS)]  # fmt: skip

    # The same ordering inside the error bars is not resolved; the reverse beyond them is opposite
    close = [fake_result("D=64", s, 1.9 + 0.3 * s, 2, 2, 2) for s in (0, 1)]
    close += [fake_result("D=inf", s, 2.0 + 0.3 * s, 2, 2, 2) for s in (0, 1)]
    assert outcome(decide(close), "A middle D") == "not resolved"
    reverse = [fake_result("D=64", s, 3.0, 2, 2, 2) for s in (0, 1)] + [
        fake_result("D=inf", s, 2.0, 2, 2, 2) for s in (0, 1)
    ]
    assert outcome(decide(reverse), "A middle D") == "opposite"


def test_a_stalled_rk45_is_reported_and_pfgm_is_judged_by_its_heun_instead():
    results = []
    for seed in (0, 1):
        results.append(fake_result("D=64", seed, 1.0 + 0.1 * seed, 2, 2, 2))
        results.append(fake_result("D=inf", seed, 2.0, 2, 2, 2))
        pfgm = fake_result("PFGM", seed, 5.0 + 0.1 * seed, 9, 9, 9)
        del pfgm["solvers"]["rk45"]
        pfgm["rk45_stalled"] = {"num_images": 100, "max_nfe": 1000, "sigma_reached": 4.9 + seed}
        results.append(pfgm)
    decided = decide(results)
    (stall,) = [c for c in decided if c["claim"].startswith("The field model's RK45 (official")]
    assert stall["outcomes"]["frechet_distance"] == (
        "did not finish",
        "2 of 2 seeds spent 1000 calls on 100 images and had reached only z = 4.9, 5.9",
    )
    # The comparison with PFGM falls back to its Heun at the reference (5.05 against D=64's 1.05)
    (versus,) = [c for c in decided if c["claim"].startswith("The best middle D beats the original PFGM")]
    assert "Heun at 35 NFE" in versus["claim"] and versus["outcomes"]["frechet_distance"][0] == "reproduced"
    assert "PFGM 5.05" in versus["outcomes"]["frechet_distance"][1]
    assert not [c for c in decided if "RK45 quality" in c["claim"]]


def followup_results():
    """D=128 with the plain target and with STF (STF 2.0 lower after 150 steps, equal after 300), D=inf, and Restart
    1.0 below Heun at 43 NFE on both D=128 models; STF's reference figure the best of all."""
    results = []
    for s in (0, 1):
        plain = fake_result("D=128", s, 3.0 + 0.1 * s, 3.0, 4.0, 5.0) | {"target": "clean"}
        stf = fake_result("D=128", s, 1.0 + 0.1 * s, 3.0, 4.0, 5.0) | {"name": "D=128 STF", "target": "stf"}
        plain["curve"] = [{**point(4.0 + 0.1 * s), "steps": 150}, {**point(3.0 + 0.1 * s), "steps": 300}]
        stf["curve"] = [{**point(2.0 + 0.1 * s), "steps": 150}, {**point(3.0 + 0.1 * s), "steps": 300}]
        for result in (plain, stf):
            heun = {**point(3.5 + 0.1 * s), "num_inference_steps": 22, "nfe": 43.0}
            result["restart"] = [{**point(2.5 + 0.1 * s), "num_inference_steps": 18, "nfe": 43.0, "heun": heun}]
        results += [plain, stf, fake_result("D=inf", s, 4.0, 3.0, 4.0, 5.0)]
    return results


def test_stf_and_restart_claims_and_report_sections_follow_the_numbers(tmp_path):
    results = followup_results()
    decided = decide(results)
    (stf,) = [c for c in decided if "STF beats the plain target" in c["claim"]]
    assert stf["claim"].startswith("D=128: STF beats the plain target at equal training steps (150, 300)")
    assert stf["outcomes"]["frechet_distance"][0] == "partly reproduced"  # reproduced at 150, not resolved at 300
    assert "150 steps: reproduced (STF 2.05 ± 0.057, plain 4.05 ± 0.057)" in stf["outcomes"]["frechet_distance"][1]
    assert stf["outcomes"]["confident_share"][0] == "not resolved"
    (restart_claim,) = [c for c in decided if "Restart beats Heun" in c["claim"]]  # the plain-target model only
    assert restart_claim["claim"] == "D=128: Restart beats Heun at equal NFE"
    assert restart_claim["outcomes"]["frechet_distance"][0] == "reproduced"
    # The D claims compare plain-target models: STF's better figure is not "a middle D"
    assert outcome(decided, "A middle D (D=128; the best of them)") == "reproduced"
    metrics = judges.DigitsJudge.metrics
    text = report.markdown(results, SWEEP, {**ENVIRONMENT, "wall_seconds": 60.0}, "x", {}, metrics)
    assert "### Stable Target Field against the plain target, at equal training steps" in text
    assert "| D=128 | 150 | 4.05 ± 0.06 | 2.05 ± 0.06 | -2.00 ± 0.01 |" in text  # paired by seed
    assert "| D=128 | 300 | 3.05 ± 0.06 | 3.05 ± 0.06 | 0.00 ± 0.01 |" in text
    assert "| D=128 | 300 (final, 100 images) | 3.05 ± 0.06 | 1.05 ± 0.06 | -2.00 ± 0.01 |" in text
    assert "### Restart against Heun at equal NFE" in text
    row = "| D=128 | 18 steps, 43 NFE | 2.55 ± 0.06 | 22 steps, 43 NFE | 3.55 ± 0.06 | -1.00 ± 0.01 |"
    assert row in text and row.replace("D=128", "D=128 STF") in text and "| D=inf | 18 steps" not in text
    section = markdown.markdown(results, {}, SETTINGS, ENVIRONMENT, "make evidence", {})
    assert row in section and "| D=128 | 150 | 4.05 ± 0.06 | 2.05 ± 0.06 | -2.00 ± 0.01 |" in section
    assert "| D=128 | 150 | 0.900 ± 0.007 | 0.900 ± 0.007 | 0.000 ± 0.010 |" in section  # the confident share too
    assert f"| {stf['claim']} |" in section and f"| {restart_claim['claim']} |" in section
    bare = [{k: v for k, v in r.items() if k != "restart"} for r in results if r.get("target") != "stf"]
    text = report.markdown(bare, SWEEP, {**ENVIRONMENT, "wall_seconds": 1.0}, "x", {}, metrics)
    assert "Stable Target" not in text and "Restart against" not in text


def test_the_reduced_evidence_says_how_it_differs_from_the_documented_run():
    banner = run.reduced_banner(run.REDUCED)
    assert banner.startswith("> **Reduced settings, not the documented run.**")
    assert "D = 8, D = 128, D = 2048, D = ∞, D = 128 STF, D = ∞ STF" in banner and "no D = 64" in banner
    assert "1000 training steps (documented: 4000); 400 samples per point (documented: 700)" in banner
    section = markdown.markdown(followup_results(), {}, SETTINGS, ENVIRONMENT, "x", {}, banner=banner)
    assert banner in section and report.QUICK_BANNER not in section
    assert run.parse_args(["--reduced"]).workdir == os.path.join("outputs", "evidence", "reduced")
    with pytest.raises(SystemExit):
        run.parse_args(["--reduced", "--quick"])


def test_stf_models_measured_at_the_reference_only_stay_out_of_the_d_tables():
    evaluation = presets.EVIDENCE_REDUCED["evaluation"]
    cut = models.reference_only(evaluation)
    assert cut["steps"] == {"heun": [18], "other": []} and cut["noise_scales"] == cut["quantization_bits"] == []
    assert cut["restart_steps"] == [] and cut["num_images"] == evaluation["num_images"]
    results = followup_results()
    for result in results:
        if result.get("target") == "stf":
            result.update(solvers={"heun": result["solvers"]["heun"][-1:]}, noise=[], quantization=[])
            del result["restart"]
    groups = statistics.group_by_model(results)
    assert list(statistics.fully_measured(groups)) == ["D=128", "D=inf"]
    metrics = judges.DigitsJudge.metrics
    text = report.markdown(results, SWEEP, {**ENVIRONMENT, "wall_seconds": 1.0}, "x", {}, metrics)
    assert "| D=128 | 150 | 4.05 ± 0.06 | 2.05 ± 0.06 | -2.00 ± 0.01 |" in text and "| D=128 STF | 5.00" not in text
    section = markdown.markdown(results, {}, SETTINGS, ENVIRONMENT, "x", {})
    assert "| D=128 STF | 1.05 ± 0.06 |" in section  # the headline table holds every model
    # A model job's kept result does not depend on which other models the sweep has
    fewer = {**presets.EVIDENCE_REDUCED, "models": [["pfgmpp", 128]], "seeds": [0]}
    assert jobs.model_jobs(fewer)[0][2] == jobs.model_jobs(presets.EVIDENCE_REDUCED)[2][2]  # D=128 seed 0


def test_confident_share_claims_count_a_higher_share_as_better():
    results = []
    for seed in (0, 1):
        for name, confident in (("D=64", 0.95), ("D=inf", 0.80)):
            result = fake_result(name, seed, 2.0, 2.0, 2.0, 2.0)
            for solver_points in result["solvers"].values():
                for p in solver_points:
                    p["confident_share"] = confident
            results.append(result)
    assert outcome(decide(results), "A middle D", "confident_share") == "reproduced"


TOY = {
    "ring": [
        {
            "aug_dim": d,
            "seed": s,
            "sliced_wasserstein": 0.03 + 0.01 * (d is None),
            "sliced_wasserstein_floor": 0.02,
            "nll": 0.1,
            "true_nll": 0.05,
            "nll_gap": 0.05 + 0.01 * s,
            "nll_gap_se": 0.01,
        }  # fmt: skip
        for d in (2, None)
        for s in (0, 1)
    ]
}
ENVIRONMENT = {"date": "2026-01-01", "cpu": "cpu (2 logical CPUs)", "torch": "2", "jobs": 2, "load_start": 0.1,
               "load_end": 0.2, "wall_seconds": 60.0, "reused_jobs": 0, "job_seconds": 100.0}  # fmt: skip


def colour_pixels(path, colour, tolerance=6) -> int:
    """How many pixels of the PNG at `path` have the matplotlib colour `colour`."""
    from matplotlib.colors import to_rgb

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    target = np.round(np.asarray(to_rgb(colour)) * 255).astype(np.int16)
    return int((np.abs(pixels - target).max(axis=-1) <= tolerance).sum())


def test_evidence_markdown_and_plots_show_the_results(tmp_path):
    bases = {"D=8": 2.0, "D=inf": 4.0, "PFGM": 6.0}
    results = [fake_result(n, s, base + s, 3.0, 4.0 + s, 5.0) for n, base in bases.items() for s in (0, 1)]
    written = plots.plot_all(results, TOY, SETTINGS, str(tmp_path))
    assert sorted(written) == ["nfe", "robustness", "toy", "training"]
    colours = sweep_plots.colours(["D=8", "D=inf", "PFGM"])
    for kind in ("training", "nfe", "robustness"):  # every model is drawn in its colour on every digits plot
        assert 0 < os.path.getsize(tmp_path / written[kind]) < 100_000
        for name, colour in colours.items():
            assert colour_pixels(tmp_path / written[kind], colour) > 20, (kind, name)
    assert colour_pixels(tmp_path / written["toy"], (0.12, 0.47, 0.71)) > 20  # matplotlib's C0: the ring

    section = markdown.markdown(results, TOY, SETTINGS, ENVIRONMENT, "make evidence", written)
    assert section.startswith(markdown.START_MARKER) and section.rstrip().endswith(markdown.END_MARKER)
    assert "Machinery check" not in section
    # The figures in the tables are the results': seeds 2.0 and 3.0 are 2.50 ± (0.5 + 0.01 sqrt(2) / 2)
    assert "| D=8 | 2.50 ± 0.51 | 0.900 ± 0.007 | 1.00 ± 0.00 |" in section
    assert "| PFGM | 6.50 ± 0.51 | 3.00 ± 0.01 | 4.50 ± 0.51 | 6.50 ± 0.51 |" in section  # robustness row
    assert "| D=2 | 0.0300 ± 0.0000 | 0.0550 ± 0.0121 | 0.1000 |" in section  # toy row
    decided = claims.decide_claims(statistics.group_by_model(results), TOY, SETTINGS)
    assert decided and all(f"| {c['claim']} |" in section for c in decided)
    for kind, name in written.items():
        assert f"]({name})" in section, kind
    quick = markdown.markdown(results, TOY, SETTINGS, ENVIRONMENT, "make evidence-quick", written, quick=True)
    assert report.QUICK_BANNER in quick and "Machinery check, not evidence" in report.QUICK_BANNER


def test_sweep_report_says_which_d_is_best_and_how_each_degrades(tmp_path):
    results = [fake_result(n, s, fd + 0.1 * s, 3.0, 4.0, few) for n, fd, few in
               (("D=8", 3.0, 9.0), ("D=128", 1.0, 4.0), ("D=inf", 1.1, 6.0)) for s in (0, 1)]  # fmt: skip
    metrics = judges.DigitsJudge.metrics
    written = sweep_plots.plot_sweep(results, SWEEP, metrics, str(tmp_path))
    assert sorted(written) == ["nfe", "robustness", "training"]
    text = report.markdown(results, SWEEP, {**ENVIRONMENT, "wall_seconds": 60.0}, "x", written, metrics)
    # D=128 is best, D=inf within its error bars, D=8 beyond them
    assert "**Best D: D=128** by the Fréchet distance at Heun 35 NFE; not resolved from it" in text
    assert "within the error bars): D=inf." in text
    # fewer steps: D=8 loses 6.0, D=128 3.0, D=inf 4.9 from 18 to 3 Heun steps
    assert "| D=8 | 9.00 ± 0.01 (+5.95 ± 0.06) | 3.05 ± 0.06 |" in text
    assert "| D=128 | 4.00 ± 0.01 (+2.95 ± 0.06) | 1.05 ± 0.06 |" in text
    assert report.summary_lines(results, SWEEP, metrics) == [
        "best D: D=128 (Fréchet distance 1.05 ± 0.06)",
        "not resolved from it: D=inf",
    ]
    assert "Machinery check" in report.markdown(results, SWEEP, ENVIRONMENT, "x", {}, metrics, quick=True)


def test_rewrite_docs_replaces_only_the_marked_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nkept ü\n")
    markdown.rewrite_docs(str(path), f"{markdown.START_MARKER}\nfirst\n{markdown.END_MARKER}\n")
    assert path.read_text() == f"# Benchmarks\n\nkept ü\n\n{markdown.START_MARKER}\nfirst\n{markdown.END_MARKER}\n"
    path.write_text(path.read_text() + "\n## After\n")
    markdown.rewrite_docs(str(path), f"{markdown.START_MARKER}\nsecond\n{markdown.END_MARKER}\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and text.endswith("\n## After\n") and "kept ü" in text
    path.write_text(text + text)
    with pytest.raises(ValueError, match="2 evidence sections"):
        markdown.rewrite_docs(str(path), "x")


# ---------------------------------------------------------------------- the command lines


def test_quick_evidence_prints_a_summary_and_the_path_not_the_report(tmp_path, capsys, monkeypatch):
    results = [fake_result(n, s, 2.0 + s, 3.0, 4.0, 5.0) for n in ("D=8", "D=inf", "PFGM") for s in (0, 1)]
    monkeypatch.setattr(run, "run_all", lambda *args: (results, TOY, {"reused_jobs": 0, "job_seconds": 1.0}))
    monkeypatch.setattr(run, "QUICK", SETTINGS)  # the fake results' step counts
    run.main(["--quick", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.startswith("MACHINERY CHECK, NOT EVIDENCE")
    assert f"report: {tmp_path / 'report.md'}" in printed
    assert "|" not in printed and len(printed.splitlines()) < 15  # no table: one line per claim
    assert report.QUICK_BANNER in (tmp_path / "report.md").read_text()


def test_sweep_script_reads_its_arguments():
    assert sweep_aug_dim.parse_model("inf") == ["pfgmpp", None]
    assert sweep_aug_dim.parse_model("pfgm") == ["poisson_field", None]
    assert sweep_aug_dim.parse_model("64") == ["pfgmpp", 64]
    settings = sweep_aug_dim.settings_from_args(sweep_aug_dim.parse_args([]))
    assert settings["models"] == [["pfgmpp", 8], ["pfgmpp", 128], ["pfgmpp", 2048], ["pfgmpp", None]]
    assert settings["data"] == {} and settings["evaluation"]["metric"] == "digits"
    assert settings["training"]["model_config"] == models.UNET_CONFIG and settings["training"]["resolution"] == 8
    argv = ["--train_data_dir", "imgs", "--resolution", "16", "--aug_dims", "64", "inf", "64", "--steps", "9", "4"]
    own = sweep_aug_dim.settings_from_args(sweep_aug_dim.parse_args(argv + ["--trainer_args=--random_flip"]))
    assert own["data"] == {"train_data_dir": "imgs"} and own["evaluation"]["metric"] == "sliced_wasserstein"
    assert own["models"] == [["pfgmpp", 64], ["pfgmpp", None]] and own["training"]["model_config"] is None
    assert own["evaluation"]["reference_steps"] == 9 and own["evaluation"]["steps"]["heun"] == [4, 9]
    assert own["training"]["extra_args"] == ["--random_flip"]
    assert sweep_aug_dim.settings_from_args(sweep_aug_dim.parse_args(["--preset", "evidence"])) is presets.EVIDENCE
    assert settings["evaluation"]["restart_steps"] == [] and settings["training"]["reference_batch_size"] is None
    argv = ["--aug_dims", "128", "inf", "pfgm", "--targets", "clean", "stf", "--reference_batch_size", "512"]
    argv += ["--solvers", "heun", "restart", "--steps", "6", "18"]
    both = sweep_aug_dim.settings_from_args(sweep_aug_dim.parse_args(argv))
    assert both["models"] == [
        ["pfgmpp", 128], ["pfgmpp", None], ["poisson_field", None], ["pfgmpp", 128, "stf"], ["pfgmpp", None, "stf"]
    ]  # fmt: skip
    assert both["training"]["reference_batch_size"] == 512 and "restart" not in both["evaluation"]["steps"]
    assert both["evaluation"]["restart_steps"] == [18] and both["evaluation"]["restart_blocks"] is None
    blocks = '{"a": [2, 1, 0.05, 0.1]}'
    own = sweep_aug_dim.parse_args(argv + ["--restart_steps", "9", "18", "--restart_blocks", blocks])
    own = sweep_aug_dim.settings_from_args(own)
    assert own["evaluation"]["restart_steps"] == [9, 18] and own["evaluation"]["restart_blocks"] == {
        "a": [2, 1, 0.05, 0.1]
    }
    assert sweep_aug_dim.settings_from_args(sweep_aug_dim.parse_args(["--targets", "stf"]))["models"][0] == [
        "pfgmpp", 8, "stf"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--aug_dims", "0"], "integer >= 1, 'inf' or 'pfgm', got '0'"),
        (["--train_data_dir", "imgs"], "--resolution is required"),
        (["--train_data_dir", "a", "--dataset_name", "b", "--resolution", "8"], "at most one of"),
        (["--seeds", "0", "0"], "--seeds must differ"),
        (["--num_images", "0"], "must be an integer >= 1, got '0'"),
        (["--targets", "field"], "invalid choice: 'field'"),
        (["--reference_batch_size", "0"], "must be an integer >= 1, got '0'"),
    ],
)
def test_sweep_script_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_aug_dim.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [(["--solvers", "heun", "rk4"], "unknown solver(s) ['rk4']"), (["--solvers", "euler"], "keep 'heun'"),
     (["--num_images", "5"], "--num_images must be >= 6"),
     (["--solvers", "heun", "restart", "--restart_blocks", '{"0": [3, 2, 0.14, 100]}'],
      "--restart_steps 18: Restart block '0': t_min 0.14 and t_max 100.0 must satisfy"),
     (["--solvers", "heun", "restart", "--restart_blocks", '{"0": [3, 2, 0.3, 0.14]}'], "need 0 < t_min < t_max")],
)  # fmt: skip
def test_sweep_script_refuses_what_it_cannot_measure_before_training(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sweep_aug_dim.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- end to end, through the real trainer


def test_a_tiny_sweep_trains_in_segments_and_writes_its_report(tmp_path):
    training = {**presets.EVIDENCE_QUICK["training"], "segments": [2, 3]}
    evaluation = {
        **presets.EVIDENCE_QUICK["evaluation"],
        "num_images": 8,
        "curve_images": 8,
        "batch_size": 8,
        "num_bootstrap": 3,
        "steps": {"heun": [2, 3], "euler": [3], "other": [3]},
        "reference_steps": 3,
        "noise_scales": [0.1],
        "quantization_bits": [6],
        "rk45_batch_size": 8,
        "restart_steps": [18],
    }
    settings = {
        "digits": {
            **presets.EVIDENCE_QUICK,
            "models": [["pfgmpp", 8], ["pfgmpp", 8, "stf"]],
            "training": {**training, "reference_batch_size": 128},
            "evaluation": evaluation,
        },
        "toy": {**run.QUICK["toy"], "aug_dims": [None], "num_steps": 5, "num_samples": 64, "num_test": 4},
    }
    digits, toy, info = run.run_all(settings, str(tmp_path), 1, log=lambda message: None)
    assert info["reused_jobs"] == 0 and info["job_seconds"] > 0
    result, stf = digits
    assert [p["steps"] for p in result["curve"]] == [2, 3] and stf["name"] == "D=8 STF" and stf["target"] == "stf"
    stf_args = json.loads((tmp_path / "models" / "D8-stf-seed0" / "training_args.json").read_text())
    assert stf_args["target"] == "stf" and stf_args["reference_batch_size"] == 128
    (row,) = result["restart"]
    assert (row["nfe"], row["heun"]["num_inference_steps"], row["heun"]["nfe"]) == (43.0, 22, 43.0)
    assert sorted(os.listdir(tmp_path / "models" / "D8-seed0")).count("checkpoint-3") == 1
    assert set(result["solvers"]) == set(sampling.scheduler_solvers())
    assert [p["nfe"] for p in result["solvers"]["heun"]] == [3.0, 5.0]
    assert [p["alpha"] for p in result["noise"]] == [0.1] and [p["bits"] for p in result["quantization"]] == [6]
    # A rerun with the same settings reuses the results instead of training again
    again, _, info = run.run_all(settings, str(tmp_path), 1, log=lambda message: None)
    assert again[0]["job_seconds"] == result["job_seconds"] and info["reused_jobs"] == 3
    # Other measurements re-measure the trained models without training them again
    checkpoint = tmp_path / "models" / "D8-seed0" / "checkpoint-3"
    before = checkpoint.stat().st_mtime_ns
    fewer = {**settings, "digits": {**settings["digits"], "evaluation": {**evaluation, "restart_steps": []}}}
    remeasured, _, info = run.run_all(fewer, str(tmp_path), 1, log=lambda message: None)
    assert info["reused_jobs"] == 1 and "restart" not in remeasured[0]  # the toy job; both models re-measured
    assert remeasured[0]["curve"] == result["curve"] and checkpoint.stat().st_mtime_ns == before
    environment = run.environment(1) | info | {"load_end": 0.0, "wall_seconds": 1.0}
    section = markdown.markdown(digits, toy, settings, environment, "x", {})
    assert "| D=8 |" in section and "**gaussian_mixture**" in section
