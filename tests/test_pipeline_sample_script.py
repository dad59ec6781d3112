"""scripts/sample.py on a saved tiny pipeline: grid, folder, per-image seeds, solvers, labels, bad flags."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sample.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sample_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    unet = tiny_unet(num_class_embeds=2)
    folder = tmp_path_factory.mktemp("pipeline")
    pipe = PFGMPipeline(unet=unet, scheduler=PFGMScheduler(aug_dim=128), class_names=["zero", "one"])
    pipe.save_pretrained(folder)
    return folder


def test_grid_and_folder_with_per_image_seeds(saved_pipeline, tmp_path, capsys):
    sample = load_script()
    grid_path, folder = tmp_path / "grid.png", tmp_path / "images"
    argv = ["--model", str(saved_pipeline), "--num_images", "5", "--batch_size", "2", "--num_inference_steps", "3"]
    sample.main(
        argv + ["--output", str(grid_path), "--output_dir", str(folder), "--seed", "10", "--class_labels", "1"]
    )
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    # As the trainer's grids: 3 x 2 tiles of 8 px, 1 px apart, drawn 4x so that a tile is 32 px
    grid = np.asarray(Image.open(grid_path))
    assert grid.shape[:2] == (4 * (2 * 9 + 1), 4 * (3 * 9 + 1))
    second = np.asarray(Image.open(files[1]))  # (8, 8, 3): the model's size
    np.testing.assert_array_equal(grid[4:36, 40:72], second.repeat(4, axis=0).repeat(4, axis=1))
    assert "5 images" in capsys.readouterr().out

    # Image i comes from seed 10 + i whatever the batching.
    pipe = PFGMPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(class_labels=1, num_inference_steps=3, generator=torch.Generator().manual_seed(13)).images[0]
    difference = np.abs(np.asarray(Image.open(files[3]), dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1  # batch-of-2 vs batch-of-1 float noise can flip a rounding


def test_grid_scale(saved_pipeline, tmp_path):
    sample = load_script()
    argv = ["--model", str(saved_pipeline), "--num_images", "4", "--num_inference_steps", "2"]
    sample.main(argv + ["--output", str(tmp_path / "raw.png"), "--grid_scale", "1", "--nrow", "4"])
    assert Image.open(tmp_path / "raw.png").size == (4 * 9 + 1, 9 + 1)
    with pytest.raises(SystemExit):
        sample.parse_args(argv + ["--output", "x.png", "--grid_scale", "0"])


@pytest.mark.parametrize(
    ("flag", "path", "message"),
    [
        ("--output", "notes.txt/grid.png", "notes.txt', which is a file, not a folder"),
        ("--output", "a_folder", "is a folder; give the path of a file"),
        ("--output_dir", "notes.txt", "notes.txt' is a file, not a folder"),
        ("--output_dir", "notes.txt/images", "notes.txt', which is a file, not a folder"),
    ],
)
def test_output_paths_are_checked_before_sampling(saved_pipeline, tmp_path, monkeypatch, capsys, flag, path, message):
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "a_folder").mkdir()
    sample = load_script()
    monkeypatch.setattr(sample, "load_pipeline", lambda args: pytest.fail("loaded and sampled before the check"))
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--model", str(saved_pipeline), flag, str(tmp_path / path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "the user's notes"


def test_class_labels_by_name(saved_pipeline, tmp_path):
    sample = load_script()
    argv = ["--model", str(saved_pipeline), "--num_images", "2", "--num_inference_steps", "2"]
    by_name, _ = sample.main(argv + ["--output_dir", str(tmp_path / "names"), "--class_labels", "one", "zero"])
    by_int, _ = sample.main(argv + ["--output_dir", str(tmp_path / "ints"), "--class_labels", "1", "0"])
    other, _ = sample.main(argv + ["--output_dir", str(tmp_path / "other"), "--class_labels", "0", "0"])
    assert [np.asarray(image).tolist() for image in by_name] == [np.asarray(image).tolist() for image in by_int]
    assert np.asarray(other[0]).tolist() != np.asarray(by_int[0]).tolist()
    with pytest.raises(SystemExit, match=r"'two'.*\['zero', 'one'\]"):
        sample.main(argv + ["--output_dir", str(tmp_path / "bad"), "--class_labels", "two"])


def test_solvers_report_their_evaluations(saved_pipeline, tmp_path, capsys):
    sample = load_script()
    argv = ["--model", str(saved_pipeline), "--num_images", "2", "--output", str(tmp_path / "grid.png")]
    _, nfe = sample.main(argv + ["--num_inference_steps", "4"])
    assert nfe == 2 * 4 - 1 and "(heun)" in capsys.readouterr().out  # the saved scheduler's own solver
    _, nfe = sample.main(argv + ["--solver", "euler", "--num_inference_steps", "4"])
    assert nfe == 4
    _, nfe = sample.main(argv + ["--solver", "rk45", "--rtol", "1e-3", "--atol", "1e-3", "--dtype", "bf16"])
    assert nfe > 6 and "(rk45)" in capsys.readouterr().out
    # Restart: 2n - 1 Heun calls plus 2 K (N_restart - 1) per block
    _, nfe = sample.main(argv + ["--solver", "restart", "--num_inference_steps", "18"])
    assert nfe == 35 + 2 * 2 * 2 and "(restart)" in capsys.readouterr().out  # the official CIFAR-10 block
    blocks = ["--restart_blocks", '{"a": [4, 1, 0.14, 0.30]}']
    _, nfe = sample.main(argv + ["--solver", "restart", "--num_inference_steps", "18", *blocks])
    assert nfe == 35 + 2 * 1 * 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --output"),  # neither --output nor --output_dir
        (["--output", "x.png", "--num_images", "0"], "--num_images and --batch_size must be >= 1, got 0"),
        (["--output", "x.png", "--num_images", "3", "--class_labels", "0", "1"], "takes 1 or --num_images=3 labels"),
        (["--output", "x.png", "--dtype", "fp16", "--device", "cpu"], "fp16 runs on a GPU only"),
        (["--output", "x.png", "--solver", "dpm"], "argument --solver: .*'dpm'"),
        (["--output", "x.png", "--num_images", "two"], "argument --num_images: invalid int value: 'two'"),
        (["--output", "x.png", "--restart_blocks", "[3, 2]"], r"--restart_blocks: .*JSON object.*'\[3, 2\]'"),
    ],
)
def test_bad_flags_exit_with_their_own_message(saved_pipeline, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--model", str(saved_pipeline)] + extra)
    assert exit_info.value.code == 2  # argparse's usage error, not a crash
    assert re.search(message, capsys.readouterr().err), message
