"""Metrics while training (--eval_steps): metrics.jsonl, the trackers' eval/..., the model card, two processes."""

import json
import os
import sys
import types

import pytest
from test_train import fail_if_called, in_process, run_training, tiny_args

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
    assert "--eval_steps on your own data measures FID/KID" in str(error.value)
    assert 'pip install -e ".[eval]"' in str(error.value)
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
