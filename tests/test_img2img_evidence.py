"""The image-to-image evidence (benchmarks/img2img_evidence.py, benchmarks/img2img_report.py): the verdicts and
tables from a small results dict, the docs rewrite between its markers, the plots, and the trainer's checkpoint
cache (a resumed run equals an uninterrupted one; a finished model is loaded, not retrained)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "scripts")]

import img2img_evidence  # noqa: E402
import img2img_report  # noqa: E402
from img2img_report import TASKS  # noqa: E402

from pfgm_diffusers.paired import Degradation  # noqa: E402
from pfgm_diffusers.restoration import degraded_digits  # noqa: E402

FACTORS, NFES = [1.0, 0.5, 2.0], [1, 2]


def fake_results(psnr_of, sem=0.05):
    """Two seeds of D = 64 and D = inf; `psnr_of(aug_dim, start, nfe, seed)` (start and nfe None: the prior)."""
    runs = []
    for aug_dim in (64, None):
        for seed in (0, 1):
            cases = [("hijack", f, n) for f in FACTORS for n in NFES] + [("prior_heun", None, None)]
            for sampler, start, nfe in cases:
                psnr = psnr_of(aug_dim, start, nfe, seed)
                runs.append(dict(
                    aug_dim=aug_dim, seed=seed, sampler=sampler, start=start, nfe=nfe,
                    psnr=psnr, psnr_sem=sem, ssim=0.5, ssim_sem=0.01, accuracy=0.9, accuracy_sem=0.02,
                    degraded_psnr=14.0, degraded_psnr_sem=0.1, degraded_ssim=0.4, degraded_ssim_sem=0.01,
                    degraded_accuracy=0.8, degraded_accuracy_sem=0.02,
                ))  # fmt: skip
    plateaus = [
        dict(aug_dim=d, seed=s, steps={"500": _figures(1.0 + s, 17.0), "1000": _figures(0.5, 18.0 + s)})
        for d in (64, None)
        for s in (0, 1)
    ]
    settings = dict(
        aug_dims=[64, "inf"], sigma_y=0.5, steps=1000, seeds=2, batch_size=64, learning_rate=2e-3,
        warmup_steps=200, num_images=10, nfes=NFES, start_factors=FACTORS,
    )  # fmt: skip
    return dict(settings=settings, reduced=False, seconds=60.0, train_minutes=3.0, runs=runs, plateaus=plateaus)


def _figures(loss, psnr):
    metric = dict(psnr=psnr, psnr_sem=0.1)
    return dict(loss=loss, hijack_nfe1=metric, prior_heun=metric, train_seconds=1.0)


def test_a_separated_finite_d_advantage_at_one_evaluation_is_reported_as_reproduced():
    # D = 64 is 2 dB better at NFE 1 matched; error bars: half range 0.5 + se 0.05/sqrt(2) each -> sum ~1.07 < 2
    def psnr(aug_dim, start, nfe, seed):
        base = 18.0 + seed  # seed spread 1 dB -> half range 0.5
        return base + 2.0 if (aug_dim == 64 and start == 1.0 and nfe == 1) else base

    text = img2img_report.section(fake_results(psnr), {"nfe": "a.png", "start": "b.png"}, "make evidence-img2img")
    assert "- D = 64, PSNR (dB): finite D better (D=64 20.50 ± 0.54 vs ∞ 18.50 ± 0.54)" in text
    assert "- D = 64, SSIM: not resolved" in text
    # 2 * 3 * 3 hijack + 3 prior comparisons; only the one PSNR case is separated
    assert "Over all 21 comparisons" in text
    assert "finite D better by more than the error bars in 1, D = ∞ better in 0, not resolved in 20" in text
    assert "Where a finite D was better: D=64 PSNR (dB) at start 1×, NFE 1." in text
    assert text.startswith(img2img_report.START_MARKER) and text.endswith(img2img_report.END_MARKER + "\n")


def test_an_advantage_within_the_error_bars_is_not_resolved_and_the_opposite_is_named():
    def psnr(aug_dim, start, nfe, seed):
        if start == 2.0 and nfe == 2:
            return 15.0 if aug_dim == 64 else 17.0  # D = inf better by 2 dB, bars ~0.04 each
        return 18.0 + seed + (0.9 if aug_dim == 64 else 0.0)  # 0.9 dB < the bars' sum ~1.07

    lines = img2img_report.verdict_lines(fake_results(psnr))
    assert "- D = 64, PSNR (dB): not resolved (D=64 19.40 ± 0.54 vs ∞ 18.50 ± 0.54)" in lines
    assert any(line.startswith("Where D = ∞ was better: D=64 PSNR (dB) at start 2×, NFE 2.") for line in lines)
    assert not any(line.startswith("Where a finite D was better") for line in lines)


def test_the_tables_give_every_nfe_and_start_level_with_error_bars_and_the_plateau():
    def psnr(aug_dim, start, nfe, seed):
        return 10.0 if start is None else 18.0 + seed + (nfe or 0) + (start or 0)

    results = fake_results(psnr)
    table = img2img_report.nfe_table(results, "psnr")
    assert table[0] == "| D | start / σ_y | NFE 1 | NFE 2 | prior, Heun 35 |"
    # D = 64, start 0.5, NFE 2: seeds 20.5 and 21.5 -> 21.00 ± (0.5 + 0.05 * sqrt(2) / 2)
    assert "| 64 | 0.5 | 20.00 ± 0.54 | 21.00 ± 0.54 |  |" in table
    assert "| ∞ | 1 | 20.50 ± 0.54 | 21.50 ± 0.54 | 10.00 ± 0.04 |" in table
    plateau = img2img_report.plateau_lines(results)
    assert "| 64 | 500 | 0.002 | 1.5000 ± 0.5000 | 17.00 ± 0.07 | 17.00 ± 0.07 |" in plateau  # a JSON without decay
    assert "| ∞ | 1000 | 0.002 | 0.5000 ± 0.0000 | 18.50 ± 0.57 | 18.50 ± 0.57 |" in plateau
    assert (
        "- D = 64: NFE 1 20.50 ± 0.54 is above the measurement 14.00 ± 0.07; NFE 2 21.50 ± 0.54 is within the error "
        "bars of NFE 1; the prior's Heun 35 10.00 ± 0.04 is below NFE 1 from y."
    ) in img2img_report.observation_lines(results)
    text = img2img_report.section(results, {"nfe": "docs/x.png", "start": "y.png"}, "CMD")
    assert "![PSNR (dB) against NFE](docs/x.png)" in text and "`CMD`" in text
    assert "The measurement y itself: PSNR (dB) 14.00 ± 0.07, SSIM 0.400 ± 0.007, label acc. (%) 80.0 ± 1.4." in text


def test_a_missing_setting_is_a_clear_error():
    results = fake_results(lambda *a: 18.0)
    results["runs"] = [r for r in results["runs"] if not (r["aug_dim"] is None and r["nfe"] == 2)]
    with pytest.raises(ValueError, match="no runs for D=∞, hijack, start=1.0, nfe=2"):
        img2img_report.nfe_table(results, "psnr")


def test_rewrite_docs_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# B\n\n<!-- evidence:start -->\nother\n<!-- evidence:end -->\ntail\n", encoding="utf-8")
    results = fake_results(lambda *a: 18.0)
    first = f"{img2img_report.START_MARKER}\none\n{img2img_report.END_MARKER}\n"
    img2img_report.rewrite_docs(str(path), first, results)
    assert path.read_text(encoding="utf-8").endswith("tail\n\n" + first)
    second = f"{img2img_report.START_MARKER}\ntwo\n{img2img_report.END_MARKER}\n"
    img2img_report.rewrite_docs(str(path), second, results)
    text = path.read_text(encoding="utf-8")
    assert "two" in text and "one" not in text and "<!-- evidence:start -->\nother\n" in text
    results["settings"].update(task="superres", factor=2, sigma_y=0.0, measurement_level=0.25)
    superres = img2img_report.section(results, {"nfe": "a.png", "start": "b.png"}, "CMD")
    img2img_report.rewrite_docs(str(path), superres, results)  # its own section, after the denoising one
    text = path.read_text(encoding="utf-8")
    assert "two" in text and text.endswith(superres) and superres.startswith(TASKS["superres"]["markers"][0])
    assert "σ_m = the RMS of y − x over the held-out digits = 0.250" in superres and "σ_y" not in superres
    assert "| D | start / σ_m |" in superres and "2×2 blocks" in superres
    path.write_text(text + first, encoding="utf-8")
    with pytest.raises(ValueError, match="holds 2 image-to-image evidence sections"):
        img2img_report.rewrite_docs(str(path), second, fake_results(lambda *a: 18.0))


def test_superres_matches_the_start_to_the_rms_error_of_its_measurement():
    args = img2img_evidence.parse_args(["--task", "superres", "--num_images", "50"])
    assert args.sigma_y == 0.0 and img2img_evidence.model_folder(args, None, 1).startswith(
        os.path.join(args.cache_dir, "superres2_sigma0_split_Dinf_seed1_")
    )
    degradation = Degradation("superres", factor=2)
    clean, y, _ = degraded_digits(degradation, 50, 8)
    expected = float(((y - clean) ** 2).mean().sqrt())
    assert 0.05 < expected < 1.0 and img2img_evidence.measurement_level(degradation, args) == pytest.approx(expected)
    denoise = img2img_evidence.parse_args([])
    assert img2img_evidence.measurement_level(Degradation("denoise", 0.5), denoise) == 0.5 == denoise.sigma_y


def test_the_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    written = img2img_report.plot_all(fake_results(lambda *a: 18.0 + a[-1]), str(tmp_path))
    assert written == {"nfe": "img2img_nfe.png", "start": "img2img_start.png"}
    for name in written.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plateau_verdict_compares_the_last_eighth_of_training_with_the_error_bar():
    results = fake_results(lambda *a: 18.0)
    results["settings"]["decay_steps"] = 400  # 1000 steps: the rate halves at step 800 and is 0 at the end
    for model in results["plateaus"]:
        model["steps"]["800"] = _figures(0.5, 18.2 + model["seed"] if model["aug_dim"] == 64 else 17.0)
    verdicts = img2img_report.plateau_verdict_lines(results)
    flat = "18.70, 18.50 ± 0.57 at steps 800, 1000: the neighbours differ from step 1000 by +0.20 dB, within its"
    rising = "17.00, 18.50 ± 0.57 at steps 800, 1000: the neighbours differ from step 1000 by -1.50 dB, beyond its"
    assert verdicts == [  # D = 64 moved 0.2 dB, under its error bar 0.57; D = inf moved 1.5 dB
        f"- D = 64: NFE-1 PSNR {flat} error bar (plateau); the prior's Heun 35 {flat} error bar (plateau).",
        f"- D = ∞: NFE-1 PSNR {rising} error bar (not a plateau); the prior's Heun 35 {rising} error bar (not a "
        "plateau).",
    ]
    results["settings"]["evaluate_step"] = 800  # a checkpoint inside the run: both neighbours
    assert img2img_report.plateau_verdict_lines(results)[0].startswith(
        "- D = 64: NFE-1 PSNR 17.00, 18.70 ± 0.57, 18.50 at steps 500, 800, 1000: the neighbours differ from step 800 "
        "by -1.70 and -0.20 dB, beyond its error bar (not a plateau);"
    )
    del results["settings"]["evaluate_step"]
    rates = [line.split(" | ")[2] for line in img2img_report.plateau_lines(results)[2:5]]
    assert rates == ["0.002", "0.001", "3.1e-08"]  # the last steps before 500, 800, 1000 of the cosine cool-down
    assert "a cosine cool-down to 0 over the last 400" in img2img_report.section(
        results, {"nfe": "a", "start": "b"}, "C"
    )


def test_an_earlier_checkpoint_is_evaluated_only_if_it_is_one():
    args = img2img_evidence.parse_args(["--steps", "1000", "--checkpoints", "500", "--evaluate_step", "500"])
    assert args.evaluate_step == 500 and img2img_evidence.parse_args(["--steps", "1000"]).evaluate_step == 1000
    with pytest.raises(ValueError, match=r"--evaluate_step=700: must be a checkpoint step, one of \[500, 1000\]"):
        img2img_evidence.parse_args(["--steps", "1000", "--checkpoints", "500", "--evaluate_step", "700"])
    results = fake_results(lambda *a: 18.0)
    results["settings"]["evaluate_step"] = 500
    assert "seeds 0–1, restoring with the EMA model of step 500. " in img2img_report.section(
        results, {"nfe": "a", "start": "b"}, "C"
    )


def test_checkpoint_steps_end_at_the_run_length():
    args = img2img_evidence.parse_args(["--steps", "1000", "--checkpoints", "500", "2000", "1000"])
    assert img2img_evidence.checkpoint_steps(args) == [500, 1000]


def test_the_learning_rate_warms_up_holds_then_cools_to_zero_and_names_its_folder():
    args = img2img_evidence.parse_args(["--steps", "1000", "--warmup_steps", "100", "--decay_steps", "400"])
    factor = [img2img_evidence.learning_rate_factor(step, args) for step in range(1001)]
    assert factor[0] == pytest.approx(0.01) and factor[99] == 1.0 and factor[600] == 1.0
    assert factor[800] == pytest.approx(0.5) and factor[1000] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factor[600:-1], factor[601:], strict=True))  # never rises again in the cool-down
    assert img2img_evidence.model_folder(args, 64, 0).endswith("_warm100_cos400of1000")
    constant = img2img_evidence.parse_args(["--steps", "1000", "--warmup_steps", "100", "--decay_steps", "0"])
    assert img2img_evidence.model_folder(constant, 64, 0).endswith("_warm100")
    assert img2img_evidence.learning_rate_factor(1000, constant) == 1.0
    with pytest.raises(ValueError, match="--decay_steps=950: must lie in \\[0, --steps - --warmup_steps = 900\\]"):
        img2img_evidence.parse_args(["--steps", "1000", "--warmup_steps", "100", "--decay_steps", "950"])


def _state(cache, step):
    folder = os.path.join(cache, "denoise0.5_split_D64_seed0_bs4_lr0.002_warm200", f"step{step}")
    return torch.load(os.path.join(folder, "state.pt"), weights_only=False)["ema"]


def test_a_resumed_training_equals_an_uninterrupted_one_and_a_finished_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main() would set the whole session's threads
    common = ["--aug_dims", "64", "--batch_size", "4", "--num_images", "2", "--decay_steps", "0", "--checkpoints", "3"]
    common += ["--train_seeds", "0"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    splits, load = [], img2img_evidence.load_digits_dataset
    monkeypatch.setattr(img2img_evidence, "load_digits_dataset", lambda *a, **k: splits.append(k) or load(*a, **k))
    img2img_evidence.main([*common, "--steps", "6", "--cache_dir", straight])
    assert splits == [{"split": "train"}]  # the models never see the held-out digits they are scored on
    img2img_evidence.main([*common, "--steps", "3", "--cache_dir", resumed])
    img2img_evidence.main([*common, "--steps", "6", "--cache_dir", resumed])
    a, b = _state(straight, 6), _state(resumed, 6)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], _state(straight, 3)[key]) for key in a)  # training moved the weights
    args = img2img_evidence.parse_args([*common[:-2], "--steps", "6", "--cache_dir", straight])
    calls = []
    monkeypatch.setattr(img2img_evidence, "pfgmpp_loss", lambda *a, **k: calls.append(1))
    pipe, plateau = img2img_evidence.train(64, 0, args, None, None)  # cached: no loss, no data, no evaluation
    assert calls == [] and sorted(plateau) == [3, 6]
    with open(tmp_path / "a" / "denoise0.5_split_D64_seed0_bs4_lr0.002_warm200" / "step6" / "metrics.json") as f:
        assert json.load(f)["loss"] == plateau[6]["loss"]
    assert pipe.config.conditioning_channels == 1


def test_report_renders_the_docs_from_a_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    results = fake_results(lambda aug_dim, start, nfe, seed: 18.0 + seed + (2.0 if aug_dim == 64 else 0.0))
    (tmp_path / "r.json").write_text(json.dumps(results), encoding="utf-8")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# B\n", encoding="utf-8")
    argv = ["--report", str(tmp_path / "r.json"), "--docs", str(docs / "benchmarks.md"), "--plots_dir", str(docs)]
    img2img_evidence.main(argv)
    text = (docs / "benchmarks.md").read_text(encoding="utf-8")
    assert text.startswith("# B\n\n" + img2img_report.START_MARKER)
    assert "![PSNR (dB) against NFE](img2img_nfe.png)" in text and (docs / "img2img_start.png").exists()
    assert "- D = 64, PSNR (dB): finite D better (D=64 20.50 ± 0.54 vs ∞ 18.50 ± 0.54)" in text
    assert "Reproduce: `make evidence-img2img`" in text
    with pytest.raises(ValueError, match="give --docs"):
        img2img_evidence.main(["--report", str(tmp_path / "r.json")])
    # a super-resolution JSON: its own section, plots and make target, whatever --task says
    results["settings"].update(task="superres", factor=2, sigma_y=0.0, measurement_level=0.45)
    (tmp_path / "r.json").write_text(json.dumps(results), encoding="utf-8")
    img2img_evidence.main(argv)
    text = (docs / "benchmarks.md").read_text(encoding="utf-8")
    assert text.count(img2img_report.START_MARKER) == 1 and "<!-- img2img-evidence-superres:end -->" in text
    assert "Reproduce: `make evidence-img2img-superres`" in text and (docs / "img2img_superres_start.png").exists()


def test_the_training_split_of_the_digits_leaves_out_the_held_out_digits():
    import numpy as np

    from pfgm_diffusers.data import DIGITS_PATH, load_digits_dataset
    from pfgm_diffusers.evaluation import digits_split

    train, heldout = digits_split()
    digits = load_digits_dataset(True, split="train")  # what the evidence and `--digits_split train` train on
    images = np.stack([np.asarray(image) for image in digits.dataset["image"]])
    with np.load(DIGITS_PATH) as npz:
        assert np.array_equal(images, npz["images"][train])  # the training split, in its order
        assert digits.dataset["label"] == npz["labels"][train].tolist()
    assert len(images) == 1438 and not set(train.tolist()) & set(heldout.tolist())
    assert len(heldout) == 359  # degraded_digits scores these (the held-out split's first num_images)
