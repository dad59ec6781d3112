"""Metrics while training (--eval_steps): metrics.jsonl, the trackers' eval/..., the model card, two processes."""

import json
import os
import sys
import types

import pytest
import torch
from test_train import fail_if_called, in_process, run_training, tiny_args

from pfgm_diffusers.data import ImageTransform, load_image_folder
from pfgm_diffusers.training import metrics

DIGITS_KEYS = {"step", "num_images", "metric", "frechet_distance", "class_coverage", "class_kl"}


def digits_args(unet_config, out, **overrides):
    flags = {**dict(train_data_dir=None, eval_steps=2, eval_num_images=6, eval_batch_size=4), **overrides}
    return tiny_args(None, unet_config, out, **flags)


def read_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_eval_steps_append_one_line_per_evaluation_and_fill_the_model_card(tmp_path, unet_config):
    out = tmp_path / "out"
    log = run_training(tmp_path, digits_args(unet_config, out, max_train_steps=4))
    lines = read_lines(out)
    assert [line["step"] for line in lines] == [2, 4]  # every 2 steps; the last step is one of them
    for line in lines:
        assert DIGITS_KEYS <= set(line) and line["num_images"] == 6 and line["metric"] == "DigitsMetrics"
        assert line["frechet_distance"] > 0
    assert "Evaluation at step 4" in log
    card = (out / "README.md").read_text()
    assert "accelerate launch training/train_pfgm.py" in card and "--eval_steps 2" in card
    assert "PFGM++, D = 128" in card  # the digits default
    assert f"| frechet_distance | {lines[-1]['frechet_distance']:.6g} |" in card
    assert "![samples](samples.png)" in card and (out / "samples.png").exists()


def test_two_processes_give_one_line_per_evaluation_and_grids_can_be_off(tmp_path, unet_config):
    out = tmp_path / "out"
    args = digits_args(unet_config, out, max_train_steps=2, eval_num_images=7, save_images_steps=0)
    run_training(tmp_path, args, num_processes=2)
    lines = read_lines(out)
    assert len(lines) == 1 and lines[0]["step"] == 2 and lines[0]["num_images"] == 7  # 4 + 4 sampled, 7 kept
    assert not (out / "samples").exists() and not (out / "samples.png").exists()  # no grid, not even at the end
    assert "![samples]" not in (out / "README.md").read_text()


def test_own_data_without_torch_fidelity_is_refused_at_start_up(tmp_path, unet_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # absent, whether installed or not
    folder = tmp_path / "images"
    folder.mkdir()
    args = [str(a) for a in tiny_args(folder, unet_config, tmp_path / "out", eval_steps=2)]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.load_images = fail_if_called
        with pytest.raises(ValueError) as error:
            train_pfgm.main(args, loss=fail_if_called)
    assert "--eval_steps on your own data measures FID/KID: FID/KID need torch-fidelity" in str(error.value)
    assert 'pip install -e ".[eval]"' in str(error.value) and "torchvision==0." in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(eval_steps=0), "--eval_steps must be >= 1, got 0"),
        (dict(eval_num_images=1), "--eval_num_images must be >= 2 (a covariance needs two images), got 1"),
        (dict(save_images_steps=-1), "--save_images_steps must be >= 0 (0: no sample grids), got -1"),
    ],
)
def test_bad_eval_flags(tmp_path, unet_config, overrides, message):
    args = [str(a) for a in digits_args(unet_config, tmp_path / "out", **overrides)]
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(ValueError) as error:
            train_pfgm.main(args, loss=fail_if_called)
    assert message in str(error.value)


def test_metrics_file_is_never_written_through_a_link(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere.jsonl"
    out.mkdir()
    metrics.append_record(out, {"step": 1})
    metrics.append_record(out, {"step": 2})
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    os.remove(out / "metrics.jsonl")
    elsewhere.write_text("keep\n")
    os.symlink(elsewhere, out / "metrics.jsonl")
    with pytest.raises(ValueError, match="symbolic link"):
        metrics.append_record(out, {"step": 3})
    assert elsewhere.read_text() == "keep\n"


def test_evaluations_go_to_the_tracker_as_eval_figures(tmp_path, unet_config, monkeypatch):
    import accelerate
    from test_train import FakeTracker

    tracker = FakeTracker("tensorboard")
    monkeypatch.setattr(
        accelerate.Accelerator, "init_trackers", lambda self, *a, **kw: setattr(self, "trackers", [tracker])
    )
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))  # "is it installed"
    out = tmp_path / "out"
    args = digits_args(unet_config, out, max_train_steps=2, logging_steps=100, save_images_steps=0)
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.main([str(arg) for arg in args + ["--report_to", "tensorboard"]])
    evaluations = [(step, values) for step, values in tracker.logs if "eval/frechet_distance" in values]
    assert [step for step, _ in evaluations] == [2]
    line = read_lines(out)[0]
    assert evaluations[0][1]["eval/frechet_distance"] == line["frechet_distance"]
    assert evaluations[0][1]["eval/num_images"] == 6 and "eval/step" not in evaluations[0][1]


def fake_torch_fidelity(calls):
    """A stand-in for torch-fidelity (not installable beside a CPU torch here): `calculate_metrics` records its
    arguments and returns figures computed from the images it was given, so that the test can tell where they went."""
    fake = types.ModuleType("torch_fidelity")
    fake.__version__ = "0.0-fake"
    fake.KEY_METRIC_FID, fake.KEY_METRIC_KID_MEAN, fake.KEY_METRIC_KID_STD = "fid", "kid_mean", "kid_std"

    def calculate_metrics(input1, input2, **options):
        generated = torch.stack([input1[i] for i in range(len(input1))])
        reference = torch.stack([input2[i] for i in range(len(input2))])
        calls.append(dict(generated=generated, reference=reference, **options))
        return {"fid": 1000 + generated.double().mean().item(), "kid_mean": float(len(reference)), "kid_std": 0.25}

    fake.calculate_metrics = calculate_metrics
    return fake


def test_own_data_is_measured_by_fid_and_kid_against_the_training_images(
    tmp_path, image_folder, unet_config, monkeypatch
):
    calls = []
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake_torch_fidelity(calls))
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"not read by the fake")
    monkeypatch.setenv("PFGM_INCEPTION_WEIGHTS", str(weights))
    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=4, eval_steps=2, eval_num_images=6,
                     eval_batch_size=4, save_images_steps=0)  # fmt: skip
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.main([str(arg) for arg in args])

    lines = read_lines(out)
    assert [line["step"] for line in lines] == [2, 4] and len(calls) == 2
    images = load_image_folder(str(image_folder), str(tmp_path / "datasets_cache")).dataset["image"]
    transform = ImageTransform(8, 3, center_crop=True)  # the training transform without its random crop
    reference = torch.stack([((transform(image) + 1) * 127.5).round().to(torch.uint8) for image in images])
    for line, call in zip(lines, calls, strict=True):
        # the EMA model's 6 samples against the 32 training images, center-cropped to 8 px, as 8-bit RGB
        assert call["generated"].shape == (6, 3, 8, 8) and call["generated"].dtype == torch.uint8
        assert torch.equal(call["reference"], reference)
        assert call["feature_extractor_weights_path"] == str(weights) and call["kid_subset_size"] == 6
        assert call["fid"] and call["kid"] and not call["cuda"] and call["batch_size"] == 4
        assert line == {
            "step": line["step"],
            "num_images": 6,
            "metric": "FidelityMetrics",
            "frechet_distance": 1000 + call["generated"].double().mean().item(),
            "fid": 1000 + call["generated"].double().mean().item(),
            "kid_mean": 32.0,
            "kid_std": 0.25,
            "num_reference": 32,
            "kid_subset_size": 6,
        }
        assert [type(line[key]) for key in ("num_images", "num_reference", "kid_subset_size")] == [int] * 3
    assert not torch.equal(calls[0]["generated"], calls[1]["generated"])  # the model trained in between
    card = (out / "README.md").read_text()
    assert "Figures at step 4 (FidelityMetrics, 6 images, EMA)" in card
    assert f"| fid | {lines[-1]['fid']:.6g} |" in card
