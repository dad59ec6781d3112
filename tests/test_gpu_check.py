"""`benchmarks/gpu_check.py`, the one command for a person with a GPU, run in its smoke mode on the CPU so that it
cannot rot between the rare runs on a real device."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_run_on_the_cpu_writes_every_figure(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
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
