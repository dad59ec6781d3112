"""`benchmarks/gpu_check.py`, the one command for a person with a GPU, run in its smoke mode on the CPU so that it
cannot rot between the rare runs on a real device."""

import importlib.util
import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_help_explains_the_parts_and_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_gpu_check().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("tests/test_cuda.py", "bf16 training throughput", "Sampling throughput", "field target", "--smoke"):
        assert words in text, words
    options = " ".join(text[text.index("options:") :].split())  # argparse wraps the help lines
    for flag, words in {
        "--device": "Where to run",
        "--smoke": "Tiny sizes",
        "--json": "write every figure",
        "--skip_tests": "Skip part 1",
    }.items():
        assert f"{flag}" in options and words in options.split(flag, 1)[1], flag


def test_gpu_check_without_cuda_or_smoke_is_refused_not_run_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_check = load_gpu_check()
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "no CUDA device" in error and "--smoke" in error and "--device cpu" in error
    args, device = gpu_check.parse_args(["--device", "cpu"])  # an explicit request is honoured
    assert device.type == "cpu" and not args.smoke
    assert gpu_check.parse_args(["--smoke"])[1].type == "cpu"


def test_gpu_check_smoke_run_on_the_cpu_writes_every_figure(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    output = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--smoke", "--skip_tests", "--json", str(output)])
    results = json.loads(output.read_text())
    assert results["smoke"] and results["environment"]["device"] == "cpu"
    assert results["trainer"]["images_per_second"] > 0 and results["bare_loop"]["images_per_second"] > 0
    assert results["trainer_overhead"] > 0
    assert results["sampling"]["heun"]["nfe"] == 35 and results["sampling"]["dpmpp_2m"]["nfe"] == 17
    assert results["sampling"]["heun"]["finite"] and results["sampling"]["dpmpp_2m"]["finite"]
    field = results["field_target"]
    assert field["ratio"]["runs"] == 3 and field["ratio"]["min"] <= field["ratio"]["median"] <= field["ratio"]["max"]
