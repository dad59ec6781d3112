"""pfgm_diffusers.evaluation and scripts/evaluate.py: the Fréchet distance against closed forms, streaming statistics,
the shipped digits classifier and its metrics, the evaluation script offline, and the torch-fidelity error paths."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, evaluation, scheduling_pfgm
from pfgm_diffusers.evaluation import (
    DIGIT_CLASSIFIER_PATH,
    DIGITS_SPLIT_SEED,
    DigitsMetrics,
    FeatureStatistics,
    FidelityUnavailableError,
    digits_metrics,
    digits_split,
    fidelity_metrics,
    frechet_distance,
    load_digit_classifier,
    load_digits_images,
    to_classifier_input,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_covariance(d, rng, rank=None):
    factor = rng.standard_normal((d, d if rank is None else rank))
    return factor @ factor.T / d


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------- Fréchet distance


def test_frechet_of_a_gaussian_with_itself_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_covariance(32, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


def test_frechet_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    mu, sigma, shift = rng.standard_normal(16), random_covariance(16, rng), rng.standard_normal(16)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_of_scaled_isotropic_gaussians():
    d, a, b = 7, 0.5, 2.0  # sigma1 = a^2 I, sigma2 = b^2 I: d (a - b)^2
    mu = torch.zeros(d)  # torch inputs are accepted too
    value = frechet_distance(mu, a**2 * torch.eye(d), mu, b**2 * torch.eye(d))
    assert value == pytest.approx(d * (a - b) ** 2, rel=1e-12)


def test_frechet_of_rank_deficient_commuting_covariances_matches_the_closed_form():
    # sigma_k = U diag(lambda_k) U^T share eigenvectors: the distance is |dmu|^2 + sum (sqrt(l1) - sqrt(l2))^2.
    # Eigenvalues 0 and 1e-14 make both matrices singular or nearly so, in different directions.
    rng = np.random.default_rng(2)
    d = 24
    rotation = random_rotation(d, rng)
    lambda1, lambda2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    lambda1[:6], lambda2[4:10] = 0.0, 1e-14
    sigma1 = (rotation * lambda1) @ rotation.T
    sigma2 = (rotation * lambda2) @ rotation.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = (mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(lambda1) - np.sqrt(lambda2)) ** 2).sum()
    value = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-7)


def test_frechet_of_non_commuting_2x2_covariances_matches_the_closed_form():
    # For a 2x2 matrix M with non-negative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); sigma1 is singular.
    sigma1 = np.array([[1.0, 1.0], [1.0, 1.0]])
    sigma2 = np.array([[2.0, 0.3], [0.3, 0.5]])
    product = sigma1 @ sigma2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(max(np.linalg.det(product), 0.0)))
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2) == pytest.approx(expected, rel=1e-10)


def test_frechet_with_fewer_samples_than_features_is_finite_and_exact():
    # Covariances of 10 samples in 64 dimensions have rank 9. The nonzero eigenvalues of S1 S2 with S1 = Xc^T Xc /
    # (n - 1) are those of the small SPD matrix Xc S2 Xc^T / (n - 1): an independent route to the same trace.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((10, 64)), rng.standard_normal((10, 64)) * 1.5 + 0.2
    s1, s2 = FeatureStatistics().update(x), FeatureStatistics().update(y)
    value = frechet_distance(s1.mean, s1.covariance, s2.mean, s2.covariance)
    centred = x - x.mean(0)
    small = centred @ s2.covariance @ centred.T / (len(x) - 1)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    shift = s1.mean - s2.mean
    expected = shift @ shift + np.trace(s1.covariance) + np.trace(s2.covariance) - 2 * trace_sqrt
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(s2.mean, s2.covariance, s1.mean, s1.covariance) == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda a: {**a, "mu2": np.zeros(3)}, "mu1 and mu2"),
        (lambda a: {**a, "sigma2": np.eye(3)}, "sigma2"),
        (lambda a: {**a, "mu1": np.array([0.0, np.nan, 0.0, 0.0])}, "mu1"),
        (lambda a: {**a, "sigma1": np.triu(np.ones((4, 4)))}, "sigma1 must be a symmetric"),
        (lambda a: {**a, "sigma2": -np.eye(4)}, "sigma2 must be positive semi-definite"),
    ],
)
def test_frechet_rejects_bad_input_by_name(change, name):
    good = {"mu1": np.zeros(4), "sigma1": np.eye(4), "mu2": np.ones(4), "sigma2": np.eye(4)}
    with pytest.raises(ValueError, match=name):
        frechet_distance(**change(good))


# ---------------------------------------------------------------------- streaming statistics


def test_streaming_statistics_equal_numpy():
    rng = np.random.default_rng(4)
    data = rng.standard_normal((103, 5)) @ rng.standard_normal((5, 5)) + 1e4  # a large offset: no cancellation
    stats = FeatureStatistics()
    for start, stop in [(0, 1), (1, 1), (1, 40), (40, 41), (41, 103)]:  # a single row and an empty batch too
        stats.update(torch.from_numpy(data[start:stop]))  # torch or numpy
    np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance, np.cov(data, rowvar=False), rtol=1e-9, atol=1e-12)
    merged = FeatureStatistics().update(data[:50]).merge(FeatureStatistics().update(data[50:]))
    np.testing.assert_allclose(merged.covariance, np.cov(data, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.count == merged.count == 103
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = FeatureStatistics().update(data[:1]).covariance
    with pytest.raises(ValueError, match="5 columns"):
        stats.update(data[:3, :4])


# ---------------------------------------------------------------------- the digits classifier and its metrics


@pytest.fixture(scope="module")
def heldout():
    return load_digits_images(digits_split()[1])  # (359, 1, 16, 16) in [0, 1], labels (359,)


def test_shipped_classifier_reaches_95_percent_on_the_heldout_digits(heldout):
    """The shipped classifier must classify at least 95 % of the 359 held-out digits (seed-0 80/20 split) right."""
    from safetensors import safe_open

    images, labels = heldout
    model = load_digit_classifier()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.4f} < 0.95"
    with safe_open(DIGIT_CLASSIFIER_PATH, "pt") as file:  # trained on the split the metrics use
        assert file.metadata()["split_seed"] == str(DIGITS_SPLIT_SEED)
    train, held = digits_split()
    assert len(held) == 359 and len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 1797
    assert sum(p.numel() for p in model.parameters()) < 50_000


def test_classifier_input_from_every_pipeline_output_type_and_resolution(heldout):
    images, labels = heldout
    as_np = images.permute(0, 2, 3, 1).numpy()  # output_type="np"
    np.testing.assert_array_equal(to_classifier_input(as_np).numpy(), images.numpy())
    as_pil = [Image.fromarray(np.round(image[0].numpy() * 255).astype(np.uint8), mode="L") for image in images[:4]]
    np.testing.assert_allclose(to_classifier_input(as_pil), images[:4], atol=0.5 / 255)
    # A 32x32 model's digits: resized back to 16x16 before classification, still read right
    large = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        predictions = load_digit_classifier()(to_classifier_input(large)).argmax(1)
    assert (predictions == labels).double().mean() >= 0.95
    for bad, message in [
        (images.repeat(1, 3, 1, 1), "1-channel"),
        (images * 2 - 1, r"\[0, 1\]"),
        (images[:, :, :, :8], "square"),
        ([Image.new("RGB", (16, 16))], "grayscale"),
    ]:
        with pytest.raises(ValueError, match=message):
            to_classifier_input(bad)


def test_digits_metrics_tell_real_digits_from_noise_and_collapse(heldout):
    images, labels = heldout
    real = digits_metrics(images)
    # The held-out digits themselves reach exactly their own ceiling figures
    for key in ("frechet_distance", "confident_share", "class_coverage", "class_kl"):
        assert real[key] == pytest.approx(real["heldout_" + key], rel=1e-9, abs=1e-12)
    assert real["confident_share"] >= 0.9 and real["class_coverage"] == 1.0 and real["class_kl"] < 0.05
    assert real["heldout_num_images"] == 359 and real["heldout_accuracy"] >= 0.95

    noise = digits_metrics(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)))
    assert noise["frechet_distance"] > 20 * real["frechet_distance"]
    assert noise["confident_share"] < 0.5 and noise["class_coverage"] < 1.0 and noise["class_kl"] > 0.1

    # Perfect digits of one class: confident, but the coverage and the class KL expose the collapse
    threes = images[labels == 3]
    collapsed = digits_metrics(threes.repeat(10, 1, 1, 1)[:200])
    assert collapsed["confident_share"] >= 0.9
    assert collapsed["class_coverage"] == 0.1 and collapsed["class_kl"] > 2.0
    assert collapsed["frechet_distance"] > 20 * collapsed["heldout_frechet_distance"]


def test_digits_metrics_compare_at_equal_sample_size_and_stream(heldout):
    images, _ = heldout
    metric = DigitsMetrics()
    for start in range(0, 50, 16):
        metric.update(images[start : min(start + 16, 50)].permute(0, 2, 3, 1).numpy())
    streamed = metric.compute()
    assert streamed["num_images"] == streamed["heldout_num_images"] == 50
    at_once = digits_metrics(images[:50])["frechet_distance"]
    assert streamed["frechet_distance"] == pytest.approx(at_once, rel=1e-6)  # float32 features vary with the batch
    with pytest.raises(ValueError, match="at least 2 images"):
        DigitsMetrics().update(images[:1]).compute()


# ---------------------------------------------------------------------- scripts/evaluate.py


def save_tiny_pipeline(folder, in_channels=1, sample_size=16):
    unet = tiny_unet(in_channels=in_channels, sample_size=sample_size)
    PFGMPipeline(unet=unet, scheduler=PFGMScheduler(aug_dim=128)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def digits_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("digits_pipeline"))


def test_evaluate_script_writes_the_results_offline(digits_pipeline, tmp_path, capsys):
    script = load_script()
    output = tmp_path / "out" / "results.json"
    argv = ["--model", digits_pipeline, "--num_images", "6", "--num_inference_steps", "3", "--solver", "euler"]
    returned = script.main(argv + ["--batch_size", "4", "--seed", "7", "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["nfe"] == 3 and results["nfe_per_batch"] == [3, 3]  # Euler: one evaluation per step
    assert results["frechet_distance"] == results["metrics"]["frechet_distance"] > 0
    assert results["metrics"]["num_images"] == results["metrics"]["heldout_num_images"] == 6
    for key in ("sampling_seconds", "metric_seconds", "images_per_second"):
        assert results[key] > 0
    assert results["settings"]["seed"] == 7 and results["settings"]["solver"] == "euler"
    # The saved scheduler's config is recorded as it is; this call ran Euler (nfe == 3 above shows it)
    assert results["scheduler"]["solver"] == "heun" and results["unet"]["sample_size"] == 16
    assert results["frechet_distance"] == returned["frechet_distance"]
    printed = " ".join(capsys.readouterr().out.split())  # the notes are wrapped at 100 columns
    assert "held-out real: 6 real digits kept out of the classifier's training" in printed
    assert "Both Fréchet distances are to the classifier's 1438 real training digits" in printed
    assert results["frechet_features"] == "digit_classifier" and results["metrics"]["train_num_images"] == 1438
    assert not list(output.parent.glob(".*.tmp"))

    # Image i comes from seed + i: one batch of 6 gives the same images, hence the same figures
    again = script.main(argv + ["--batch_size", "6", "--seed", "7"])
    assert again["frechet_distance"] == pytest.approx(results["frechet_distance"], rel=1e-4)
    assert again["metrics"]["class_counts"] == results["metrics"]["class_counts"]


def test_evaluate_script_solver_choices_follow_the_scheduler(digits_pipeline, monkeypatch):
    script = load_script()
    assert set(script.solver_choices()) == {"rk45", "restart", *scheduling_pfgm.SOLVERS} >= {"heun", "dpmpp_2m"}
    blocks = script.parse_args(["--model", digits_pipeline, "--restart_blocks", '{"0": [2, 1, 0.1, 0.2]}'])
    assert blocks.restart_blocks == {"0": [2, 1, 0.1, 0.2]}
    assert script.parse_args(["--model", digits_pipeline]).solver is None  # the saved scheduler's own
    monkeypatch.setattr(scheduling_pfgm, "SOLVERS", (*scheduling_pfgm.SOLVERS, "unipc"))
    assert script.parse_args(["--model", digits_pipeline, "--solver", "unipc"]).solver == "unipc"
    for bad in (["--solver", "dpm"], ["--num_images", "1"], ["--batch_size", "0"], ["--num_inference_steps", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(["--model", digits_pipeline] + bad)


def test_evaluate_script_refuses_digits_for_a_colour_model(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "rgb", in_channels=3)
    with pytest.raises(ValueError, match="1-channel"):
        load_script().main(["--model", folder, "--num_images", "2", "--num_inference_steps", "1"])


@pytest.mark.parametrize(
    ("num_classes", "class_names", "match"),
    [
        (3, ["cat", "dog", "fox"], r"has 3 classes \['cat', 'dog', 'fox'\]"),
        (3, None, "has 3 classes: use --reference"),
        (10, [f"class{i}" for i in range(10)], r"this model's classes are \['class0'"),
        (10, [str(i) for i in reversed(range(10))], r"this model's classes are \['9'"),  # not the digits' order
    ],
)
def test_evaluate_script_refuses_digits_for_a_model_of_other_classes(
    tmp_path, monkeypatch, num_classes, class_names, match
):
    unet = tiny_unet(in_channels=1, sample_size=16, num_class_embeds=num_classes)
    pipe = PFGMPipeline(unet=unet, scheduler=PFGMScheduler(aug_dim=128), class_names=class_names)
    pipe.save_pretrained(tmp_path / "other")
    script = load_script()
    monkeypatch.setattr(script, "generate", lambda *args: pytest.fail("sampled before checking the classes"))
    with pytest.raises(ValueError, match=match):
        script.main(["--model", str(tmp_path / "other"), "--num_images", "2", "--num_inference_steps", "1"])


def test_digits_check_accepts_models_of_the_digits():
    for num_classes, class_names in ((None, None), (10, None), (10, [str(i) for i in range(10)])):
        unet = tiny_unet(in_channels=1, sample_size=8, num_class_embeds=num_classes)
        evaluation.check_digits_pipeline(PFGMPipeline(unet=unet, scheduler=PFGMScheduler(), class_names=class_names))


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ("notes.txt/results.json", r"notes.txt', which is a file, not a folder"),
        ("notes.txt/deeper/results.json", r"notes.txt', which is a file, not a folder"),
        ("a_folder", "is a folder; give the path of a file"),
    ],
)
def test_evaluate_script_checks_the_output_path_before_sampling(
    digits_pipeline, tmp_path, monkeypatch, capsys, output, match
):
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "a_folder").mkdir()
    script = load_script()
    monkeypatch.setattr(script, "generate", lambda *args: pytest.fail("sampled before checking --output"))
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", digits_pipeline, "--num_images", "2", "--output", str(tmp_path / output)])
    assert exit_info.value.code == 2 and re.search(match, capsys.readouterr().err)
    assert (tmp_path / "notes.txt").read_text() == "the user's notes"


# ---------------------------------------------------------------------- FID/KID through torch-fidelity


def fake_torch_fidelity(monkeypatch, calculate_metrics=None):
    """A stand-in torch-fidelity module (the real one is an optional extra and downloads from GitHub)."""
    module = types.ModuleType("torch_fidelity")
    module.__version__ = "0.4.0"
    module.KEY_METRIC_FID = "frechet_inception_distance"
    module.KEY_METRIC_KID_MEAN = "kernel_inception_distance_mean"
    module.KEY_METRIC_KID_STD = "kernel_inception_distance_std"
    module.calculate_metrics = calculate_metrics
    inception = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    inception.URL_INCEPTION_V3 = "https://example.invalid/weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.setitem(sys.modules, "torch_fidelity", module)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", inception)
    return module


def uint8_images(count, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 8, 8, channels), dtype=np.uint8)


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_fidelity_without_torch_fidelity_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    with pytest.raises(FidelityUnavailableError) as error:
        fidelity_metrics(uint8_images(4), uint8_images(4))
    assert_one_line(error, 'pip install -e ".[eval]" "torchvision==', "in a checkout of pfgm_diffusers")


def test_fidelity_offline_without_weights_never_touches_the_network(monkeypatch, tmp_path):
    fake_torch_fidelity(monkeypatch, calculate_metrics=lambda **kwargs: pytest.fail("must not compute"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(evaluation.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *args, **kwargs: pytest.fail("network touched"))
    with pytest.raises(FidelityUnavailableError) as error:
        fidelity_metrics(uint8_images(4), uint8_images(4))
    assert_one_line(error, "HF_HUB_OFFLINE", str(tmp_path), "--inception_weights", evaluation.INCEPTION_WEIGHTS_ENV)

    # Online, a failed download gives the same one line with the cause
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(FidelityUnavailableError) as error:
        fidelity_metrics(uint8_images(4), uint8_images(4))
    assert_one_line(error, "download failed", "Name or service not known", evaluation.INCEPTION_WEIGHTS_ENV)


def test_fidelity_passes_uint8_rgb_images_and_the_local_weights(monkeypatch, tmp_path):
    calls = []

    def calculate_metrics(**kwargs):
        calls.append(kwargs)
        return {
            "frechet_inception_distance": 12.5,
            "kernel_inception_distance_mean": 0.01,
            "kernel_inception_distance_std": 0.002,
        }

    fake_torch_fidelity(monkeypatch, calculate_metrics)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    monkeypatch.setenv(evaluation.INCEPTION_WEIGHTS_ENV, str(weights))
    generated, reference = uint8_images(5), uint8_images(30, channels=3, seed=1)
    results = fidelity_metrics(generated, reference)
    assert results == {"fid": 12.5, "kid_mean": 0.01, "kid_std": 0.002, "num_reference": 30, "kid_subset_size": 5}
    (kwargs,) = calls
    assert kwargs["feature_extractor_weights_path"] == str(weights) and kwargs["fid"] and kwargs["kid"]
    first = kwargs["input1"][2]
    assert first.dtype == torch.uint8 and first.shape == (3, 8, 8)
    assert torch.equal(first[1], torch.from_numpy(generated[2, :, :, 0]))  # grayscale repeated to RGB
    assert torch.equal(kwargs["input2"][0], torch.from_numpy(reference[0]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="uint8"):
        fidelity_metrics(generated / 255.0, reference)
    monkeypatch.setenv(evaluation.INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="missing.pth"):
        fidelity_metrics(generated, reference)


def test_evaluate_script_stops_with_one_line_before_sampling(digits_pipeline, monkeypatch, tmp_path, capsys):
    folder = tmp_path / "reference"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(uint8_images(1, seed=i)[0, :, :, 0], mode="L").save(folder / f"{i}.png")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    script = load_script()
    monkeypatch.setattr(script, "generate", lambda *args: pytest.fail("sampled before checking torch-fidelity"))
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", digits_pipeline, "--num_images", "2", "--reference", str(folder)])
    message = str(exit_info.value.code)
    assert "\n" not in message and evaluation.eval_install_line() in message


@pytest.mark.parametrize(
    ("torch_version", "torchvision"),
    [("2.13.0+cpu", "torchvision==0.28.*"), ("2.1.2", "torchvision==0.16.*"), ("2.14.0a0+git", "torchvision==0.29.*")],
)
def test_the_install_line_pins_the_torchvision_of_the_installed_torch(monkeypatch, torch_version, torchvision):
    """torchvision 0.28.0 requires torch==2.13.0 (its wheel's metadata); an unpinned one pulls the newest torch."""
    monkeypatch.setattr(torch, "__version__", torch_version)
    line = evaluation.eval_install_line()
    assert f'pip install -e ".[eval]" "{torchvision}"' in line and "pfgm_diffusers[eval]" not in line


def test_importing_the_metrics_reads_no_environment_and_imports_no_torch_fidelity(tmp_path):
    """The torch-fidelity part is imported, and its weights looked up, only when a FID/KID metric is built."""
    code = (
        "import sys; sys.modules['torch_fidelity'] = None\n"
        "import pfgm_diffusers.evaluation as evaluation\n"
        "from pfgm_diffusers.evaluation import fidelity\n"
        "assert sys.modules['torch_fidelity'] is None\n"
        "try:\n"
        "    evaluation.FidelityMetrics()\n"
        "except evaluation.FidelityUnavailableError as error:\n"
        "    print('refused:', error)\n"
    )
    env = {**os.environ, "PFGM_INCEPTION_WEIGHTS": str(tmp_path / "missing.pth"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: FID/KID need torch-fidelity")


def test_fidelity_metrics_stream_both_sides_and_check_before_sampling(monkeypatch, tmp_path):
    seen = []

    def calculate_metrics(**kwargs):
        seen.append((np.stack([kwargs["input1"][i] for i in range(len(kwargs["input1"]))]), len(kwargs["input2"])))
        return {
            "frechet_inception_distance": 3.0,
            "kernel_inception_distance_mean": 0.5,
            "kernel_inception_distance_std": 0.1,
        }

    fake_torch_fidelity(monkeypatch, calculate_metrics)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    metric = evaluation.FidelityMetrics(str(weights))
    generated = np.random.default_rng(0).random((5, 8, 8, 1))  # a pipeline's output_type="np"
    metric.update_reference(uint8_images(3)).update_reference(uint8_images(4, seed=1))
    metric.update(generated[:2]).update(generated[2:])
    results = metric.compute()
    assert results["frechet_distance"] == results["fid"] == 3.0 and results["num_images"] == 5
    images, num_reference = seen[0]
    assert num_reference == results["num_reference"] == 7
    np.testing.assert_array_equal(images[:, 0], np.round(generated[..., 0] * 255).astype(np.uint8))
    assert "FID 3.000" in metric.report(results) and metric.frechet_features == "inception_v3"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(generated * 2 - 1)
    rgba = PFGMPipeline(unet=tiny_unet(in_channels=4), scheduler=PFGMScheduler())
    with pytest.raises(ValueError, match="4 channels"):
        metric.check_pipeline(rgba)


def test_evaluate_script_measures_fid_through_the_same_interface(digits_pipeline, monkeypatch, tmp_path, capsys):
    folder = tmp_path / "reference"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(uint8_images(1, seed=i)[0, :, :, 0], mode="L").save(folder / f"{i}.png")
    inputs = []

    def calculate_metrics(**kwargs):
        inputs.append(kwargs)
        return {
            "frechet_inception_distance": 7.0,
            "kernel_inception_distance_mean": 0.2,
            "kernel_inception_distance_std": 0.05,
        }

    fake_torch_fidelity(monkeypatch, calculate_metrics)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    argv = ["--model", digits_pipeline, "--num_images", "3", "--num_inference_steps", "2", "--solver", "euler"]
    results = load_script().main(argv + ["--reference", str(folder), "--inception_weights", str(weights)])
    assert results["frechet_distance"] == 7.0 and results["frechet_features"] == "inception_v3"
    assert len(inputs[0]["input1"]) == 3 and len(inputs[0]["input2"]) == 4
    assert inputs[0]["input2"][0].shape == (3, 16, 16)  # resized to the model's 16x16 like the trainer's data
    assert "FID 7.000" in capsys.readouterr().out


def test_evaluate_script_reads_16_bit_gray_alpha_references_as_the_trainer_does(tmp_path):
    from test_train_data import write_png_gray_alpha_16

    ramp = np.linspace(1000, 60000, 64).reshape(8, 8).astype(np.uint16)  # 16-bit steps an 8-bit read would merge
    (tmp_path / "reference").mkdir()
    write_png_gray_alpha_16(tmp_path / "reference" / "a.png", ramp, np.full_like(ramp, 65535))
    args = types.SimpleNamespace(reference=str(tmp_path / "reference"), num_reference=None, dataset_config_name=None)
    reference = load_script().load_reference(args, 8, 1)
    expected = np.round(ramp.astype(np.float64) / 65535 * 255).astype(np.uint8)  # 16 bits rounded once to 8
    assert reference.shape == (1, 8, 8, 1) and reference.dtype == np.uint8
    np.testing.assert_array_equal(reference[0, :, :, 0], expected)
    assert (expected != (ramp >> 8)).any()  # an 8-bit read (Pillow's RGBA) would differ
