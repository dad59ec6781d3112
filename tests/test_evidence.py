"""The evidence sweep's machinery (benchmarks/evidence/): sliced Wasserstein, the toy densities and likelihood, the
sampling loop with injected noise, weight quantisation, the claims' verdicts, the docs rewrite, and one end-to-end run
of a tiny sweep through the real trainer."""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, preconditioning
from pfgm_diffusers.evaluation import sliced_wasserstein

EVIDENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence"
sys.path.insert(0, str(EVIDENCE))

import digits_sweep  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import toy2d  # noqa: E402

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


def test_toy_run_measures_a_short_training(tmp_path):
    settings = {**run.QUICK["toy"], "num_steps": 30, "num_samples": 256, "num_test": 16}
    row = toy2d.run_toy("ring", 4, 0, settings)
    assert row["nonfinite_samples"] == 0
    assert row["sliced_wasserstein"] > row["sliced_wasserstein_floor"] > 0  # 30 steps do not learn a ring
    assert math.isfinite(row["nll_gap"]) and row["nll_gap_se"] > 0


# ---------------------------------------------------------------------- digits: sampling, noise, quantisation


def tiny_pipeline(prediction_type="epsilon", aug_dim=8, seed=0):
    torch.manual_seed(seed)
    field = prediction_type == "poisson_field"
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=2 if field else 1,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    if field:
        scheduler = PFGMScheduler(
            prediction_type=field and "poisson_field", aug_dim=1, sigma_min=1e-3, sigma_max=40.0, upper_norm=3000.0
        )
    else:
        scheduler = PFGMScheduler(aug_dim=aug_dim, prediction_type=prediction_type)
    pipe = PFGMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "poisson_field"])
def test_sample_images_match_the_pipeline_from_the_same_seeds(prediction_type):
    pipe = tiny_pipeline(prediction_type)
    images, nfe = digits_sweep.sample_images(pipe, "heun", 3, num_images=3, seed=7, batch_size=2)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    expected = pipe(batch_size=3, generator=generators, num_inference_steps=3, output_type="pt")
    # Equal up to the rounding of (latents * init_noise_sigma) / init_noise_sigma at radius ~80 before the prior map
    torch.testing.assert_close(images, expected.images, atol=1e-4, rtol=0)
    assert nfe == expected.nfe == 5


class IdentityDenoiser(torch.nn.Module):
    """For `prediction_type="sample"`: D(x, sigma) = x, so every ODE step leaves x unchanged."""

    def forward(self, model_input, timestep):
        sigma = torch.exp(4 * torch.as_tensor(timestep))
        return toy2d._Output(model_input / preconditioning.c_in(sigma, 0.5))


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_noise_is_injected_after_each_completed_step_but_the_last(solver):
    # With D(x) = x the ODE stands still: the result is the start plus exactly the injected noise
    scheduler = PFGMScheduler(aug_dim=None, prediction_type="sample", solver=solver)
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    alpha, steps = 0.1, 4
    x, calls = digits_sweep.sample_loop(
        IdentityDenoiser(), scheduler, latents, steps, noise_scale=alpha, generator=torch.Generator().manual_seed(1)
    )
    grid = PFGMScheduler(aug_dim=None, solver="euler")
    grid.set_timesteps(steps)
    levels = grid.sigmas[1:steps].double()  # reached by steps 1 .. n-1; the last step (to 0) gets none
    noise_generator = torch.Generator().manual_seed(1)
    expected = latents * scheduler.init_noise_sigma
    for sigma in levels:
        expected = expected + alpha * float(sigma) * torch.randn(latents.shape, generator=noise_generator)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)  # |x| ~ 80: float32 rounding
    assert calls == (2 * steps - 1 if solver == "heun" else steps)


def test_no_injected_noise_is_the_plain_loop():
    pipe = tiny_pipeline()
    plain, _ = digits_sweep.sample_images(pipe, "heun", 4, 2, seed=0, batch_size=2)
    zero, _ = digits_sweep.sample_images(pipe, "heun", 4, 2, seed=0, batch_size=2, noise_scale=0.0)
    noisy, _ = digits_sweep.sample_images(pipe, "heun", 4, 2, seed=0, batch_size=2, noise_scale=0.2)
    assert torch.equal(plain, zero)
    assert (noisy - plain).abs().max() > 1e-3


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_quantize_weights_uses_2_to_the_bits_levels_per_tensor_and_keeps_the_original(bits):
    unet = tiny_pipeline().unet
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    quantized = digits_sweep.quantize_weights(unet, bits)
    for name, parameter in quantized.named_parameters():
        original, parameter = before[name], parameter.detach()
        assert torch.equal(dict(unet.named_parameters())[name], original)
        assert parameter.unique().numel() <= 2**bits
        step = (original.max() - original.min()) / (2**bits - 1)
        assert (parameter - original).abs().max() <= step / 2 + 1e-6
        assert parameter.min().item() == pytest.approx(original.min().item(), abs=1e-6)


def test_digits_judge_gives_real_digits_their_heldout_figures_with_error_bars():
    from pfgm_diffusers.evaluation import digits_split, load_digits_images

    images, _ = load_digits_images(digits_split()[1])
    result = digits_sweep.DigitsJudge(num_bootstrap=20)(images)
    assert result["confident_share"] == result["heldout_confident_share"]
    assert result["frechet_distance"] == pytest.approx(result["heldout_frechet_distance"], rel=1e-9)
    assert 0 < result["confident_share_se"] < 0.05 and result["frechet_distance_se"] > 0


def test_trainer_command_trains_pfgmpp_and_field_models_on_the_sweep_settings(tmp_path):
    training = run.FULL["digits"]["training"]
    pfgmpp = digits_sweep.trainer_command(digits_sweep.ModelSpec("pfgmpp", None, 1), "out", 500, training)
    assert pfgmpp[pfgmpp.index("--aug_dim") + 1] == "inf"
    assert pfgmpp[pfgmpp.index("--lr_scheduler") + 1] == "constant_with_warmup"
    assert pfgmpp[pfgmpp.index("--resume_from_checkpoint") + 1] == "latest"
    field = digits_sweep.trainer_command(digits_sweep.ModelSpec("poisson_field", None, 0), "out", 500, training)
    assert "--aug_dim" not in field and "--M=356" in field


# ---------------------------------------------------------------------- claims and the docs


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


SETTINGS = {
    "digits": {
        **run.QUICK["digits"],
        "evaluation": {
            **run.QUICK["digits"]["evaluation"],
            "steps": {"heun": [3, 18], "euler": [6, 35], "other": [5]},
            "noise_scales": [0.2],
            "quantization_bits": [5, 8],
        },
    },
    "toy": run.QUICK["toy"],
}


def outcome(claims, start, metric="frechet_distance"):
    (claim,) = [c for c in claims if c["claim"].startswith(start)]
    return claim["outcomes"][metric][0]


def test_claims_follow_the_numbers_and_their_error_bars():
    results = []
    for seed, jitter in ((0, 0.0), (1, 0.1)):
        # D=8: as good as D=inf at the reference but degrades far less; PFGM clearly worse
        results.append(fake_result("D=8", seed, 2.0 + jitter, 2.5 + jitter, 2.2, 3.0))
        results.append(fake_result("D=64", seed, 1.0 + jitter, 9.0, 9.0, 9.0))
        results.append(fake_result("D=inf", seed, 2.0 - jitter, 8.0 - jitter, 7.0, 9.0))
        results.append(fake_result("PFGM", seed, 5.0 + jitter, 9.0, 9.0, 9.0))
    claims = report.decide_claims(report.group_by_model(results), {}, SETTINGS)
    assert outcome(claims, "A middle D") == "reproduced"  # D=64: 1.05 ± 0.06 against D=inf 1.95 ± 0.06
    assert outcome(claims, "A middle D", "confident_share") == "not resolved"  # every confident share is 0.9
    assert outcome(claims, "The best middle D beats the original PFGM") == "reproduced"
    assert outcome(claims, "D=8 degrades less than D = ∞ under noise") == "reproduced"
    assert outcome(claims, "D=8 degrades less than D = ∞ under fewer Heun steps") == "reproduced"
    assert outcome(claims, "D=8 degrades less than D = ∞ under post-training") == "partly reproduced"  # 5 bits only
    # Euler 6 steps: PFGM 9 against 5.05 at 35 steps, D=inf 9 against 1.95: PFGM loses less
    assert outcome(claims, "PFGM degrades less than D = ∞ under larger Euler steps") == "reproduced"
    assert outcome(claims, "DPM-Solver++(2M)") == "not measured"

    # The same ordering inside the error bars is not resolved; the reverse beyond them is opposite
    close = [fake_result("D=64", s, 1.9 + 0.3 * s, 2, 2, 2) for s in (0, 1)]
    close += [fake_result("D=inf", s, 2.0 + 0.3 * s, 2, 2, 2) for s in (0, 1)]
    assert outcome(report.decide_claims(report.group_by_model(close), {}, SETTINGS), "A middle D") == "not resolved"
    reverse = [fake_result("D=64", s, 3.0, 2, 2, 2) for s in (0, 1)] + [
        fake_result("D=inf", s, 2.0, 2, 2, 2) for s in (0, 1)
    ]
    assert outcome(report.decide_claims(report.group_by_model(reverse), {}, SETTINGS), "A middle D") == "opposite"


def test_a_stalled_rk45_is_reported_and_pfgm_is_judged_by_its_heun_instead():
    results = []
    for seed in (0, 1):
        results.append(fake_result("D=64", seed, 1.0 + 0.1 * seed, 2, 2, 2))
        results.append(fake_result("D=inf", seed, 2.0, 2, 2, 2))
        pfgm = fake_result("PFGM", seed, 5.0 + 0.1 * seed, 9, 9, 9)
        del pfgm["solvers"]["rk45"]
        pfgm["rk45_stalled"] = {"num_images": 100, "max_nfe": 1000, "sigma_reached": 4.9 + seed}
        results.append(pfgm)
    claims = report.decide_claims(report.group_by_model(results), {}, SETTINGS)
    (stall,) = [c for c in claims if c["claim"].startswith("The field model's RK45 (official")]
    assert stall["outcomes"]["frechet_distance"] == (
        "did not finish",
        "2 of 2 seeds spent 1000 calls on 100 images and had reached only z = 4.9, 5.9",
    )
    # The comparison with PFGM falls back to its Heun at the reference (5.05 against D=64's 1.05)
    (versus,) = [c for c in claims if c["claim"].startswith("The best middle D beats the original PFGM")]
    assert "Heun at 35 NFE" in versus["claim"] and versus["outcomes"]["frechet_distance"][0] == "reproduced"
    assert "PFGM 5.05" in versus["outcomes"]["frechet_distance"][1]
    assert not [c for c in claims if "RK45 quality" in c["claim"]]


def test_confident_share_claims_count_a_higher_share_as_better():
    results = []
    for seed in (0, 1):
        for name, confident in (("D=64", 0.95), ("D=inf", 0.80)):
            result = fake_result(name, seed, 2.0, 2.0, 2.0, 2.0)
            for solver_points in result["solvers"].values():
                for p in solver_points:
                    p["confident_share"] = confident
            results.append(result)
    claims = report.decide_claims(report.group_by_model(results), {}, SETTINGS)
    assert outcome(claims, "A middle D", "confident_share") == "reproduced"


def test_markdown_and_plots_from_results(tmp_path):
    results = [fake_result(n, s, 2.0 + s, 3.0, 4.0, 5.0) for n in ("D=8", "D=inf", "PFGM") for s in (0, 1)]
    toy = {
        "ring": [
            {
                "aug_dim": d,
                "seed": s,
                "sliced_wasserstein": 0.03,
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
    environment = {"date": "2026-01-01", "cpu": "cpu (2 logical CPUs)", "torch": "2", "jobs": 2, "load_start": 0.1}
    environment.update(load_end=0.2, wall_seconds=60.0, reused_jobs=0, job_seconds=100.0)
    plots = report.plot_all(results, toy, SETTINGS, str(tmp_path))
    assert sorted(plots) == ["nfe", "robustness", "toy", "training"]
    for name in plots.values():
        assert 0 < os.path.getsize(tmp_path / name) < 100_000
    section = report.markdown(results, toy, SETTINGS, environment, "make evidence", plots)
    assert section.startswith(report.START_MARKER) and section.rstrip().endswith(report.END_MARKER)
    assert "### What reproduced at this scale" in section and "evidence_training.png" in section


def test_rewrite_docs_replaces_only_the_marked_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nkept ü\n")
    report.rewrite_docs(str(path), f"{report.START_MARKER}\nfirst\n{report.END_MARKER}\n")
    assert path.read_text() == f"# Benchmarks\n\nkept ü\n\n{report.START_MARKER}\nfirst\n{report.END_MARKER}\n"
    path.write_text(path.read_text() + "\n## After\n")
    report.rewrite_docs(str(path), f"{report.START_MARKER}\nsecond\n{report.END_MARKER}\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and text.endswith("\n## After\n") and "kept ü" in text
    path.write_text(text + text)
    with pytest.raises(ValueError, match="2 evidence sections"):
        report.rewrite_docs(str(path), "x")


# ---------------------------------------------------------------------- end to end, through the real trainer


def test_a_tiny_sweep_trains_in_segments_and_writes_its_report(tmp_path):
    training = {**run.QUICK["digits"]["training"], "segments": [2, 3]}
    evaluation = {
        **run.QUICK["digits"]["evaluation"],
        "num_images": 8,
        "curve_images": 8,
        "batch_size": 8,
        "num_bootstrap": 3,
        "steps": {"heun": [2, 3], "euler": [3], "other": [3]},
        "reference_steps": 3,
        "noise_scales": [0.1],
        "quantization_bits": [6],
        "rk45_batch_size": 8,
    }
    settings = {
        "digits": {"models": [["pfgmpp", 8]], "seeds": [0], "training": training, "evaluation": evaluation},
        "toy": {**run.QUICK["toy"], "aug_dims": [None], "num_steps": 5, "num_samples": 64, "num_test": 4},
    }
    digits, toy, info = run.run_all(settings, str(tmp_path), jobs=1, log=lambda message: None)
    assert info["reused_jobs"] == 0 and info["job_seconds"] > 0
    (result,) = digits
    assert [p["steps"] for p in result["curve"]] == [2, 3]
    assert sorted(os.listdir(tmp_path / "models" / "D8-seed0")).count("checkpoint-3") == 1
    assert set(result["solvers"]) == set(digits_sweep.scheduler_solvers())
    assert [p["nfe"] for p in result["solvers"]["heun"]] == [3.0, 5.0]
    # A rerun with the same settings reuses the results instead of training again
    again, _, info = run.run_all(settings, str(tmp_path), jobs=1, log=lambda message: None)
    assert again[0]["job_seconds"] == result["job_seconds"] and info["reused_jobs"] == 2
    section = report.markdown(
        digits, toy, settings, run.environment(1) | info | {"load_end": 0.0, "wall_seconds": 1.0}, "x", {}
    )
    assert "D=8" in section and "gaussian_mixture" in section


def test_rk45_within_a_budget_of_calls_stops_and_leaves_the_pipeline_as_it_was():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import tiny_unet

    scheduler = PFGMScheduler(aug_dim=1, prediction_type="poisson_field", sigma_max=40.0, upper_norm=3000.0)
    pipe = PFGMPipeline(unet=tiny_unet(in_channels=1, out_channels=2), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(digits_sweep.RK45Stalled) as stalled:
        digits_sweep.sample_rk45(pipe, 2, 0, 2, max_nfe=5)
    assert 1e-3 <= stalled.value.sigma < 40.0  # where it had got to, in z
    assert "denoise" not in vars(pipe)  # the pipeline's own method again
    images, nfe = digits_sweep.sample_rk45(pipe, 2, 0, 2)
    assert images.shape == (2, 1, 8, 8) and nfe > 5
