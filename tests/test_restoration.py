"""The conditional evaluation on the digits: measurements of held-out digits, restorations, their scores."""

import pytest
import torch
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler
from pfgm_diffusers.image_metrics import psnr
from pfgm_diffusers.paired import Degradation
from pfgm_diffusers.restoration import degraded_digits, evaluate_restoration


def test_measurements_of_held_out_digits_do_not_depend_on_the_count():
    degradation = Degradation("denoise", sigma_y=0.2)
    clean, degraded, labels = degraded_digits(degradation, 12, resolution=8, seed=5)
    assert clean.shape == degraded.shape == (12, 1, 8, 8) and labels.shape == (12,)
    assert clean.min() >= -1 and clean.max() <= 1
    assert 0.15 < (degraded - clean).std() < 0.25
    first = degraded_digits(degradation, 3, resolution=8, seed=5)
    assert torch.equal(first[1], degraded[:3]) and torch.equal(first[2], labels[:3])
    _, superres, _ = degraded_digits(Degradation("superres"), 12, resolution=8)
    assert torch.allclose(superres, Degradation("superres")(clean))
    with pytest.raises(ValueError, match="num_images must lie in"):
        degraded_digits(degradation, 1000, resolution=8)


def make_pipe(conditional):
    unet = tiny_unet(in_channels=2 if conditional else 1, out_channels=1)
    pipe = PFGMPipeline(unet, PFGMScheduler(aug_dim=128), conditioning_channels=1 if conditional else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_start_near_zero_noise_returns_the_measurement_and_scores_like_it():
    degradation = Degradation("superres")
    result = evaluate_restoration(make_pipe(False), degradation, num_images=40, strength=0.1, batch_size=16)
    assert result["nfe"] == 1 and result["num_images"] == 40 and not result["labels_given"]
    # one step from sigma = 0.002 barely moves the image: the restoration scores as the measurement does
    assert result["psnr"] == pytest.approx(result["degraded_psnr"], abs=0.3)
    assert result["accuracy"] == pytest.approx(result["degraded_accuracy"], abs=0.05)
    clean, degraded, _ = degraded_digits(degradation, 40, resolution=8)
    measurement = ((degraded + 1) / 2).clamp(0, 1)  # as an image shows it
    assert result["degraded_psnr"] == pytest.approx(psnr(measurement, (clean + 1) / 2).mean().item(), rel=1e-6)
    assert 0.5 < result["degraded_accuracy"] <= 1  # 4x4 digits are still mostly legible to the classifier


def test_a_conditional_model_restores_from_its_condition():
    pipe, degradation = make_pipe(True), Degradation("denoise", 0.3)
    result = evaluate_restoration(pipe, degradation, num_images=8, num_inference_steps=3, batch_size=4)
    assert result["nfe"] == 5 and {"psnr_sem", "ssim", "degraded_ssim", "accuracy_sem"} <= set(result)
    # the scores are those of the pipeline's restorations from each measurement (image i's noise seeded i)
    clean, degraded, _ = degraded_digits(degradation, 8, resolution=8)

    def restore(condition):
        generators = [torch.Generator().manual_seed(i) for i in range(8)]
        return pipe(batch_size=8, generator=generators, num_inference_steps=3, output_type="pt",
                    do_normalize=False, conditioning_image=condition).images  # fmt: skip

    restored = restore(degraded)
    assert result["psnr"] == pytest.approx(psnr(restored, (clean + 1) / 2).mean().item(), rel=1e-6)
    measurement = ((degraded + 1) / 2).clamp(0, 1)  # as an image shows it
    assert result["degraded_psnr"] == pytest.approx(psnr(measurement, (clean + 1) / 2).mean().item(), rel=1e-6)
    other = psnr(restore(degraded.roll(1, 0)), (clean + 1) / 2).mean().item()
    assert abs(other - result["psnr"]) > 1e-3  # the measurement decides the restoration
    with pytest.raises(ValueError, match="give a strength"):
        evaluate_restoration(make_pipe(False), Degradation("superres"), num_images=4)


def load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_reports_restoration_beside_the_measurement(tmp_path, capsys):
    import json

    pipe = make_pipe(True)
    pipe.save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--paired_task", "denoise", "--paired_sigma_y", "0.2"]
    args += ["--num_images", "6", "--num_inference_steps", "2", "--output", str(tmp_path / "r.json")]
    load_script("evaluate").main(args)
    printed = capsys.readouterr().out
    assert "6 held-out digits, denoise, 3.0 network evaluations per image" in printed
    assert "(measurement: " in printed and "labelled as the clean digit" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["num_images"] == 6 and results["settings"]["paired_sigma_y"] == 0.2
    assert {"psnr", "degraded_psnr", "ssim", "degraded_ssim", "accuracy", "degraded_accuracy"} <= set(results)
    # the figures are evaluate_restoration's for the flags given (the measurement noise 0.2, seed 0)
    expected = evaluate_restoration(pipe, Degradation("denoise", 0.2), num_images=6, num_inference_steps=2)
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-6), name
    assert f"psnr {expected['psnr']:.3g} dB +- " in printed
    assert f"(measurement: {expected['degraded_psnr']:.3g} dB)" in printed
    with pytest.raises(SystemExit):
        load_script("evaluate").parse_args(["--model", "m", "--strength", "0.5"])  # no --paired_task
    assert results["trained_on_heldout_digits"] is None and "in-sample" not in printed  # no training_args.json


SUPERRES = {"paired_task": "superres", "paired_sigma_y": None, "paired_factor": None}  # the trainer's defaults
DIGITS = {"dataset_name": None, "train_data_dir": None}


@pytest.mark.parametrize(
    "arguments, seen, trained_task",
    [
        ({**DIGITS, **SUPERRES, "digits_split": "all"}, True, {"task": "superres", "sigma_y": 0.0, "factor": 2}),
        ({**DIGITS, **SUPERRES}, True, {"task": "superres", "sigma_y": 0.0, "factor": 2}),  # before --digits_split
        ({**DIGITS, **SUPERRES, "digits_split": "train"}, False, {"task": "superres", "sigma_y": 0.0, "factor": 2}),
        ({**DIGITS, "digits_split": "train"}, False, None),  # no --paired_task: nothing to compare
        ({**DIGITS, "paired_task": "denoise", "paired_sigma_y": 0.5}, True, {"task": "denoise", "sigma_y": 0.5}),
        ({**DIGITS, **SUPERRES, "paired_factor": 4}, True, {"task": "superres", "sigma_y": 0.0, "factor": 4}),
        ({**DIGITS, "train_data_dir": "my_digits", "digits_split": "all"}, False, None),
        ({**DIGITS, "dataset_name": "user/pairs", "digits_split": "all"}, False, None),
    ],
)
def test_evaluate_script_says_what_the_model_trained_on(tmp_path, capsys, arguments, seen, trained_task):
    import json

    make_pipe(True).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "training_args.json").write_text(json.dumps(arguments))
    args = ["--model", str(tmp_path / "model"), "--paired_task", "superres", "--num_images", "2"]
    load_script("evaluate").main(args + ["--num_inference_steps", "1", "--output", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["trained_on_heldout_digits"] is seen and results["trained_task"] == trained_task
    assert results["task"] == {"task": "superres", "sigma_y": 0.0, "factor": 2}
    printed = capsys.readouterr().out
    assert ("in-sample: the model trained on all 1797 embedded digits" in printed) is seen
    other = trained_task not in (None, results["task"])
    assert (f"the model was trained on another task: {trained_task}, evaluated on " in printed) is other


def test_sample_script_restores_conditions_and_starts_from_images(tmp_path):
    import numpy as np
    from PIL import Image

    make_pipe(True).save_pretrained(tmp_path / "model")
    (tmp_path / "cond").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "cond" / f"{i}.png")
    sample = load_script("sample")
    common = ["--model", str(tmp_path / "model"), "--num_inference_steps", "2", "--batch_size", "2"]
    images, nfe = sample.main(
        common + ["--conditioning_image", str(tmp_path / "cond"), "--output", str(tmp_path / "g.png")]
    )
    assert len(images) == 3 and nfe == 2 * 3  # two batches of 3 calls
    images, nfe = sample.main(
        common
        + [
            "--conditioning_image",
            str(tmp_path / "cond"),
            "--image",
            str(tmp_path / "cond"),
            "--strength",
            "0.5",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert len(images) == 3 and nfe == 2 * 1 and len(list((tmp_path / "out").iterdir())) == 3
    with pytest.raises(SystemExit):
        sample.parse_args(common + ["--conditioning_image", str(tmp_path / "nope.png"), "--output", "x.png"])


def test_sample_script_refuses_a_count_or_a_file_that_does_not_fit_before_sampling(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    (tmp_path / "cond").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "cond" / f"{i}.png")
    sample = load_script("sample")
    common = ["--model", "m", "--output", str(tmp_path / "g.png"), "--conditioning_image"]
    assert sample.parse_args(common + [str(tmp_path / "cond")]).num_images == 3
    assert sample.parse_args(common + [str(tmp_path / "cond"), "--num_images", "3"]).num_images == 3
    assert sample.parse_args(["--model", "m", "--output", "g.png"]).num_images == 64
    with pytest.raises(SystemExit):  # never a silent change of the count asked for
        sample.parse_args(common + [str(tmp_path / "cond"), "--num_images", "5"])
    assert "--num_images 5 with 3 image file(s)" in capsys.readouterr().err
    (tmp_path / "cond" / "3.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit):  # found before any batch is sampled, not at the batch that reads it
        sample.parse_args(common + [str(tmp_path / "cond")])
    assert "1 file(s) cannot be decoded as images" in capsys.readouterr().err


def test_sample_script_reads_a_16_bit_image_with_its_16_bits(tmp_path):
    import numpy as np
    from PIL import Image

    sample = load_script("sample")
    values = np.array([[0, 257, 258, 65535]] * 4, dtype=np.uint16)  # 257 and 258 are one 8-bit level apart: 1 / 257
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode "I;16"
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(tmp_path / "flat.png")
    images = sample.read_images([str(tmp_path / "deep.png"), str(tmp_path / "flat.png")], 1)
    assert images.shape == (2, 1, 4, 4) and images.dtype == torch.float32
    assert torch.equal(images[0, 0], torch.from_numpy(values.astype(np.float32) / 65535))  # not rounded to 8 bits
    assert torch.equal(images[1], torch.full((1, 4, 4), 128 / 255))
    rgb = sample.read_images([str(tmp_path / "flat.png")], 3)
    assert rgb.shape == (1, 3, 4, 4)
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "wide.tif")  # mode "I", beyond 16 bits
    with pytest.raises(ValueError, match=r"wide\.tif: a mode 'I' image with values in \[70000, 70000\]"):
        sample.read_images([str(tmp_path / "wide.tif")], 1)
