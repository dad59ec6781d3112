"""The training script launched for real: `accelerate launch` (1 and 2 CPU processes over gloo) on generated images.

Each run uses a ~2k-parameter UNet on 8x8 images for a few steps, so a launch costs mostly its start-up time.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pfgm_diffusers import PFGMScheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_DIR = os.path.join(REPO, "training")
SCRIPT = os.path.join(TRAINING_DIR, "train_pfgm.py")
TINY_UNET = {
    "block_out_channels": [4, 8],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
NUM_IMAGES = 32  # 16 per class


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HOME"] = str(tmp_path / "hf_home")  # the `datasets` cache of this test only
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    return env


def launch_command(script, num_processes):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        # Without a GPU, --multi_gpu runs the processes over gloo
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    return command + [script]


def run_training(tmp_path, args, num_processes=1, script=SCRIPT, timeout=300):
    """Launch `script` with `args`; return its combined output, failing the test with it on a non-zero exit."""
    result = subprocess.run(
        launch_command(script, num_processes) + [str(arg) for arg in args],
        env=launch_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def make_image_folder(root):
    """Two class folders of random 10x12 RGB images (so resize and crop both act), plus one corrupt file."""
    rng = np.random.default_rng(0)
    for label in ("circles", "squares"):
        os.makedirs(root / label)
        for i in range(NUM_IMAGES // 2):
            array = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / label / f"{i:03d}.png")
    (root / "squares" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def tiny_args(image_folder, unet_config, output_dir, **overrides):
    """Flags of a tiny run; `overrides` replace or add flags (value True: a bare switch, None: drop the flag)."""
    flags = {
        "train_data_dir": image_folder,
        "model_config_name_or_path": unet_config,
        "output_dir": output_dir,
        "resolution": 8,
        "train_batch_size": 4,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 100,
        "save_images_steps": 100,
        "eval_batch_size": 4,
        "num_inference_steps": 2,
        "seed": 0,
        "cache_dir": os.path.join(os.path.dirname(output_dir), "datasets_cache"),  # never the user's cache
    }
    flags.update(overrides)
    args = []
    for name, value in flags.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None:
            args += [f"--{name}", value]
    return args


def checkpoint_steps(output_dir):
    names = [name for name in os.listdir(output_dir) if name.startswith("checkpoint-")]
    return sorted(int(name.split("-")[1]) for name in names)


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------


def test_two_processes_pfgmpp_checkpoint_limit_and_saved_pipeline(tmp_path, image_folder, unet_config):
    out = tmp_path / "out"
    args = tiny_args(
        image_folder,
        unet_config,
        out,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        save_images_steps=2,
        class_conditional=True,
        aug_dim=16,
    )
    log = run_training(tmp_path, args, num_processes=2)

    assert "2 process(es) x 4" in log
    assert "skipping 1 corrupt image(s) of 33" in log  # the documented policy: skip with a warning
    assert "cropped from 12x10 (the first image) to 8x8" in log  # said once, at the start
    assert log.count("cropped from") == 1
    # One console line per checkpoint, not accelerate's six
    assert [log.count(f"Saved {out}/checkpoint-{step}\n") for step in range(1, 5)] == [1, 1, 1, 1]
    assert "Saving current state" not in log and "Random states saved" not in log
    assert checkpoint_steps(out) == [3, 4]  # 4 saved, the limit keeps the newest 2
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no partial or half-deleted folders
    assert os.path.isfile(out / "checkpoint-4" / "random_states_1.pkl")  # every process's RNG state
    assert os.path.isfile(out / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert sorted(os.listdir(out / "samples")) == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(out / "samples.png").size == (4 * (2 * 9 + 1),) * 2  # 4 images of 8x8 in a 2x2 grid, drawn 4x
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["objective"] == "pfgmpp" and saved_args["aug_dim"] == 16

    from pfgm_diffusers import PFGMPipeline, PFGMScheduler

    pipeline = PFGMPipeline.from_pretrained(out)
    assert isinstance(pipeline.scheduler, PFGMScheduler) and pipeline.scheduler.config.aug_dim == 16
    assert pipeline.unet.config.num_class_embeds == 2 and pipeline.unet.config.in_channels == 3
    assert pipeline.config.class_names == ["circles", "squares"]  # the class folders, in label order
    # The final pipeline holds the EMA weights of the last checkpoint
    ema = load_weights(out / "checkpoint-4" / "unet_ema")
    saved = load_weights(out / "unet")
    assert all(torch.equal(ema[name], saved[name]) for name in saved)
    images = pipeline(
        batch_size=2, class_labels=[0, 1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


GATHER_RECORDER = """
import os, sys
import torch
sys.path.insert(0, {training_dir!r})
import train_pfgm

from pfgm_diffusers.losses import poisson_field_loss

calls = []


def recording_loss(unet, x, charges, *args, **kwargs):
    # Record what each process feeds the field target, then train as usual
    rank = int(os.environ["RANK"])
    path = os.path.join({record_dir!r}, f"rank{{rank}}_call{{len(calls)}}.pt")
    torch.save({{"x": x.clone(), "charges": charges.clone()}}, path)
    calls.append(1)
    return poisson_field_loss(unet, x, charges, *args, **kwargs)


train_pfgm.main(loss=recording_loss)
"""


def test_two_processes_poisson_field_gathers_every_process_large_batch(tmp_path, image_folder, unet_config):
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    recorder = tmp_path / "record_charges.py"
    recorder.write_text(
        GATHER_RECORDER.format(training_dir=os.path.join(REPO, "training"), record_dir=str(record_dir))
    )
    out = tmp_path / "out"
    args = tiny_args(
        image_folder, unet_config, out, objective="poisson_field", large_batch_size=8, max_train_steps=2, M=80
    )
    log = run_training(tmp_path, args, num_processes=2, script=str(recorder))
    assert "16 charges per field target" in log

    for call in range(2):
        rank0 = torch.load(record_dir / f"rank0_call{call}.pt")
        rank1 = torch.load(record_dir / f"rank1_call{call}.pt")
        charges = rank0["charges"]
        assert charges.shape == (16, 3, 8, 8)
        assert torch.equal(charges, rank1["charges"])  # both processes see the same charges
        # Process p's large batch is rows [8p, 8p + 8); its small batch is the first 4 of them
        assert torch.equal(charges[:4], rank0["x"]) and torch.equal(charges[8:12], rank1["x"])
        assert len({tuple(row.flatten().tolist()) for row in charges}) == 16  # 16 different images, no duplicates
    pipeline_config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert pipeline_config["prediction_type"] == "poisson_field" and pipeline_config["aug_dim"] == 1
    # The official sampler safeguards by default: z_exp, and the prior clipped where training stops (N = 192, M = 80)
    assert pipeline_config["z_exp"] == 1.0
    assert pipeline_config["upper_norm"] == pytest.approx(193**0.5 * 0.01 * 1.03**80, rel=1e-12)

    from pfgm_diffusers import PFGMPipeline

    pipeline = PFGMPipeline.from_pretrained(out)
    assert pipeline.unet.config.out_channels == 4  # C + 1: the field's z-component
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_resume_from_latest_equals_an_uninterrupted_run(tmp_path, image_folder, unet_config):
    # 32 images / batch 4 = 8 steps per epoch: the resume at step 4 lands mid-epoch, the hard case for data order
    common = dict(lr_scheduler="constant", checkpointing_steps=4, dataloader_num_workers=0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(tmp_path, tiny_args(image_folder, unet_config, straight, max_train_steps=6, **common))
    run_training(tmp_path, tiny_args(image_folder, unet_config, resumed, max_train_steps=4, **common))
    assert checkpoint_steps(resumed) == [4]
    log = run_training(
        tmp_path,
        tiny_args(image_folder, unet_config, resumed, max_train_steps=6, resume_from_checkpoint="latest", **common),
    )
    assert "Resumed from" in log and "checkpoint-4 at step 4" in log

    for name in ("model.safetensors",):
        from safetensors.torch import load_file

        a, b = load_file(straight / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "trained weights differ"
    a, b = load_weights(straight / "unet"), load_weights(resumed / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a), "EMA weights differ"


def test_two_processes_resumed_mid_epoch_equal_an_uninterrupted_run_through_later_epochs(
    tmp_path, image_folder, unet_config
):
    # 2 processes x 8 of 32 images = 2 steps per epoch: resumed at step 1, it goes on through epochs 1 and 2, where
    # each process's shard of the order must be the uninterrupted run's (tests/test_checkpoints.py: one process)
    common = dict(lr_scheduler="constant", train_batch_size=8, random_flip=True, dataloader_num_workers=0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(tmp_path, tiny_args(image_folder, unet_config, straight, max_train_steps=5, **common), 2)
    run_training(tmp_path, tiny_args(image_folder, unet_config, resumed, max_train_steps=1, **common), 2)
    args = tiny_args(image_folder, unet_config, resumed, max_train_steps=5, resume_from_checkpoint="latest", **common)
    assert "checkpoint-1 at step 1" in run_training(tmp_path, args, 2)
    from safetensors.torch import load_file

    a, b = (load_file(folder / "checkpoint-5" / "model.safetensors") for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "trained weights differ"


def test_sigkill_mid_training_resumes_from_the_last_complete_checkpoint(tmp_path, image_folder, unet_config):
    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=100_000, checkpointing_steps=1)
    args += ["--checkpoints_total_limit", "3"]
    process = subprocess.Popen(
        launch_command(SCRIPT, 1) + [str(arg) for arg in args],
        env=launch_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the launcher and the trainer
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or len(checkpoint_steps(out)) < 3):
            time.sleep(0.2)
        assert len(checkpoint_steps(out)) >= 3, "the run made no checkpoints"
        time.sleep(0.3)  # land somewhere in the middle of the next steps and saves
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    # Whatever the kill interrupted, every folder named checkpoint-* is complete
    for step in checkpoint_steps(out):
        folder = out / f"checkpoint-{step}"
        state = json.loads((folder / "pfgm_training_state.json").read_text())
        assert state["global_step"] == step
        for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "unet_ema/config.json"):
            assert (folder / name).is_file(), f"{folder} lacks {name}"
    last = checkpoint_steps(out)[-1]
    resume_args = tiny_args(
        image_folder,
        unet_config,
        out,
        max_train_steps=last + 2,
        checkpointing_steps=1,
        resume_from_checkpoint="latest",
    )
    log = run_training(tmp_path, resume_args)
    assert f"checkpoint-{last} at step {last}" in log
    assert f"Removing the stale lock {out}/.pfgm_train.lock of process" in log  # the killed run's
    assert checkpoint_steps(out)[-1] == last + 2
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # leftovers of the kill are gone
    assert (out / "model_index.json").is_file()


SECRET = "hf_NeverWriteMe0123456789"


@pytest.fixture
def hub_boundary(monkeypatch):
    """Intercept the Hub where bytes would leave: `create_repo`, and `upload_folder` after huggingface_hub's own
    selection of the files (its real allow/ignore filtering runs), recording each file's contents. No network."""
    import huggingface_hub

    calls = {"commits": []}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, **kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(*, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        operations = huggingface_hub.HfApi()._prepare_upload_folder_additions(
            folder_path, "", allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, token=None, repo_type=None
        )
        files = {operation.path_in_repo: open(operation.path_or_fileobj, "rb").read() for operation in operations}
        calls["commits"].append(dict(repo_id=repo_id, files=files, **kwargs))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)  # a web call
    return calls


def all_files(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def test_push_to_hub_uploads_an_allow_list_and_no_secret(
    tmp_path, image_folder, unet_config, hub_boundary, monkeypatch, capfd
):
    import accelerate

    out = tmp_path / "out"
    out.mkdir()
    (out / ".env").write_text("HF_TOKEN=hf_private\n")  # stray files a user keeps beside the run
    (out / "notes.txt").write_text("private notes\n")
    trackers = {}
    monkeypatch.setattr(
        accelerate.Accelerator, "init_trackers", lambda self, name, config=None, **kw: trackers.update(config)
    )
    fake_tensorboard = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("tensorboard", None))
    monkeypatch.setitem(sys.modules, "tensorboard", fake_tensorboard)  # passes the "is it installed" checks
    args = tiny_args(image_folder, unet_config, out, max_train_steps=2, checkpointing_steps=1, report_to="tensorboard")
    args += ["--push_to_hub", "--hub_model_id", "me/pfgm-tiny", "--hub_private_repo", "--hub_token", SECRET]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.main([str(arg) for arg in args])

    assert hub_boundary["create_repo"] == dict(repo_id="me/pfgm-tiny", exist_ok=True, private=True, token=SECRET)
    (commit,) = hub_boundary["commits"]
    uploaded = sorted(commit["files"])
    assert commit["repo_id"] == "me/pfgm-tiny"
    expected = [
        "README.md",
        "model_index.json",
        "samples.png",
        "scheduler/scheduler_config.json",
        "training_args.json",
    ]
    expected += ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert uploaded == sorted(expected)
    assert checkpoint_steps(out) == [1, 2]  # they exist locally, they are just not uploaded
    # The token is nowhere: not in an uploaded file, a file of the run, the tracker's config or the console
    assert not [path for path, content in commit["files"].items() if SECRET.encode() in content]
    assert not [path for path in all_files(out) if SECRET.encode() in open(path, "rb").read()]
    saved_args = json.loads((out / "training_args.json").read_text())
    assert "hub_token" not in saved_args and saved_args["hub_model_id"] == "me/pfgm-tiny"
    assert trackers and "hub_token" not in trackers and SECRET not in json.dumps(trackers)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    card = commit["files"]["README.md"].decode()
    assert "library_name: pfgm_diffusers" in card and "trust_remote_code" not in card


def test_public_arguments_drop_every_secret_name(tmp_path):
    import argparse

    with in_process(tmp_path) as train_pfgm:
        args = argparse.Namespace(hub_token="a", wandb_api_key="b", db_password="c", client_secret="d", seed=3)
        assert train_pfgm.public_arguments(args) == {"seed": 3}


class FakeTracker:
    """What accelerate calls on a tracker, recorded."""

    def __init__(self, name):
        self.name, self.logs, self.images = name, [], []

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, values))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, values, kwargs))

    def finish(self):
        pass


@pytest.mark.parametrize("tracker_name", ["tensorboard", "wandb"])
def test_sample_grids_go_to_the_tracker_and_the_loss_every_logging_steps(
    tmp_path, image_folder, unet_config, monkeypatch, tracker_name
):
    import accelerate

    from pfgm_diffusers.losses import pfgmpp_loss

    tracker = FakeTracker(tracker_name)
    monkeypatch.setattr(
        accelerate.Accelerator, "init_trackers", lambda self, *a, **kw: setattr(self, "trackers", [tracker])
    )
    fake_module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(tracker_name, None))
    monkeypatch.setitem(sys.modules, tracker_name, fake_module)  # passes the "is it installed" check
    losses = []

    def recording_loss(*args, **kwargs):
        loss = pfgmpp_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss

    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=5, logging_steps=2, save_images_steps=2)
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.main([str(arg) for arg in args + ["--report_to", tracker_name]], loss=recording_loss)

    # The mean loss of the steps since the last log, at steps 2, 4 and the last one
    assert [step for step, _ in tracker.logs] == [2, 4, 5]
    expected = [np.mean(losses[0:2]), np.mean(losses[2:4]), losses[4]]
    assert [values["loss"] for _, values in tracker.logs] == pytest.approx(expected, rel=1e-6)
    # Each sample grid's images, as the tracker takes them
    assert [step for step, _, _ in tracker.images] == [2, 4, 5]
    step, values, kwargs = tracker.images[-1]
    grid = np.asarray(Image.open(out / "samples" / "step_0000005.png"), dtype=np.float64) / 255
    if tracker_name == "tensorboard":
        images = values["samples"]
        assert kwargs == {"dataformats": "NHWC"} and images.shape == (4, 8, 8, 3)
    else:
        assert isinstance(values["samples"], list) and len(values["samples"]) == 4
        images = np.stack(values["samples"])
    assert np.abs(images[0] - grid[4:36:4, 4:36:4]).max() <= 0.5 / 255 + 1e-6  # the grid's first image, drawn 4x


def test_push_to_hub_without_the_hub_fails_in_one_line_before_training(
    tmp_path, image_folder, unet_config, monkeypatch
):
    import huggingface_hub

    args = tiny_args(image_folder, unet_config, tmp_path / "out", push_to_hub=True, hub_model_id="me/pfgm")
    # HF_HUB_OFFLINE=1 (tests/conftest.py): huggingface_hub's own offline error, no network touched
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(ValueError) as error:
            train_pfgm.main([str(arg) for arg in args], loss=fail_if_called)
    message = str(error.value)
    assert message.startswith("--push_to_hub: the Hub is unreachable or refused to create 'me/pfgm' (")
    assert "OfflineModeIsEnabled" in message and "\n" not in message

    # Online but without a network: the DNS error, in one line too
    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known\n(and a long explanation)")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_network)
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(ValueError) as error:
            train_pfgm.main([str(arg) for arg in args], loss=fail_if_called)
    assert "(ConnectionError: [Errno -2] Name or service not known)" in str(error.value)
    assert "\n" not in str(error.value)


class in_process:
    """Import the script as a module and run `main` in this process; reset accelerate's singletons after."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    def __enter__(self):
        import importlib.util

        self.cwd = os.getcwd()
        os.chdir(self.tmp_path)
        spec = importlib.util.spec_from_file_location("train_pfgm", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.threads = torch.get_num_threads()
        return module

    def __exit__(self, *exc):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(self.threads)
        os.chdir(self.cwd)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before any data is loaded or any training step.


def fail_if_called(*args, **kwargs):
    raise AssertionError("data was loaded or training started before the bad input was reported")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="poisson_field", large_batch_size=2), "--large_batch_size (2) must be >= --train_batch_size"),
        (dict(objective="poisson_field", aug_dim=128), "`prediction_type='poisson_field'` is the original PFGM and "),
        (dict(resume_from_checkpoint="does/not/exist"), "'does/not/exist' does not exist (nor "),
        (dict(dataset_name="cifar10"), "at most one of --dataset_name and --train_data_dir"),
        (dict(train_data_dir=None, preset="ffhq64"), "--preset ffhq64 needs a dataset"),
        (dict(train_batch_size=0), "--train_batch_size must be >= 1, got 0"),
        (dict(train_batch_size=-3), "--train_batch_size must be >= 1, got -3"),
        (dict(logging_steps=0), "--logging_steps must be >= 1, got 0"),
        (dict(save_pipeline_steps=-1), "--save_pipeline_steps must be >= 1, got -1"),
        (dict(learning_rate=-1e-3), "--learning_rate must lie in (0, inf), got -0.001"),
        (dict(learning_rate="nan"), "--learning_rate must lie in (0, inf), got nan"),
        (dict(lr_warmup_steps=-5), "--lr_warmup_steps must lie in [0, inf), got -5"),
        (dict(adam_beta2=1.0), "--adam_beta2 must lie in [0, 1), got 1.0"),
        (dict(ema_max_decay=1.5), "--ema_max_decay must lie in [0, 1], got 1.5"),
        (dict(max_grad_norm=-1), "--max_grad_norm must lie in (0, inf), got -1.0"),
        (dict(max_train_seconds=-1), "--max_train_seconds must lie in [0, inf), got -1.0"),
        (dict(objective="poisson_field", tau=0), "--tau must lie in (0, inf), got 0.0"),
        (dict(sigma_min=100.0), "Need 0 < sigma_min < sigma_max, got sigma_min=100.0, sigma_max=80.0"),
        (dict(aug_dim=0), "`aug_dim` must be an integer >= 1 or None (D = infinity), got 0"),
        (dict(large_batch_size=64), "--large_batch_size is an option of --objective poisson_field"),
        (dict(z_exp=2.0), "--z_exp is an option of --objective poisson_field"),
        (dict(objective="poisson_field", z_exp=-1.0), "`z_exp` must be > 0 or None, got -1.0"),
        (dict(hub_token="hf_secret", report_to="wandb"), "--hub_token with --report_to wandb: wandb records the"),
    ],
)
def test_bad_arguments_fail_before_loading_anything(tmp_path, image_folder, unet_config, overrides, message):
    args = [str(a) for a in tiny_args(image_folder, unet_config, tmp_path / "out", **overrides)]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.load_images = fail_if_called
        with pytest.raises(ValueError) as error:
            train_pfgm.main(args, loss=fail_if_called)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--aug_dim", "big", "--aug_dim must be an integer >= 1 or 'inf', got 'big'"),
        ("--z_exp", "off", "argument --z_exp: expected a number or 'none', got 'off'"),
        ("--upper_norm", "max", "argument --upper_norm: expected a number or 'none', 'auto', got 'max'"),
        ("--objective", "pfgm", "argument --objective: invalid choice: 'pfgm'"),
        ("--train_batch_size", "4.5", "argument --train_batch_size: invalid int value: '4.5'"),
    ],
)
def test_malformed_flags_are_argparse_errors_naming_the_flag(tmp_path, capsys, flag, value, message):
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(SystemExit) as exit_info:
            train_pfgm.parse_args([flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_aug_dim_inf_is_none_from_the_command_line_to_the_kernel(tmp_path):
    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(["--aug_dim", "inf"])
        assert args.aug_dim is None and train_pfgm.build_scheduler(args).config.aug_dim is None
        default = train_pfgm.parse_args([])
        # The default is the scheduler's own
        assert default.aug_dim == PFGMScheduler().config.aug_dim == train_pfgm.build_scheduler(default).config.aug_dim


def test_help_shows_every_default(tmp_path, capsys):
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(SystemExit):
            train_pfgm.parse_args(["--help"])
    text = capsys.readouterr().out
    # One entry per flag: its help runs until the next line that starts a flag
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    flags = [entry for entry in entries if entry.startswith("--")]
    assert len(flags) > 60
    missing = [entry.split()[0] for entry in flags if "default" not in entry.lower()]
    assert missing == [], f"flags whose --help gives no default: {missing}"
    assert "--learning_rate LEARNING_RATE" in text and "(default: 0.002)" in text


def test_preset_takes_the_users_data_flag_instead_of_its_dataset(tmp_path, image_folder):
    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(["--preset", "cifar10", "--train_data_dir", str(image_folder)])
        assert args.dataset_name is None and args.train_data_dir == str(image_folder)
        assert args.aug_dim == 2048 and args.resolution == 32  # the rest of the preset stays
        assert train_pfgm.parse_args(["--preset", "cifar10"]).dataset_name == "uoft-cs/cifar10"


def test_field_objective_defaults_to_the_official_safeguards(tmp_path):
    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(["--objective", "poisson_field"])
        settings = (args.aug_dim, args.sigma_min, args.sigma_max, args.z_exp, args.upper_norm)
        assert settings == (1, 1e-3, 40.0, 1.0, "auto")
        scheduler = train_pfgm.build_scheduler(args, num_channels=3)
        args.resolution = 32  # CIFAR-10: the official rule gives about the official 3000
        assert round(train_pfgm.build_scheduler(args, num_channels=3).config.upper_norm) == 3016
        assert scheduler.config.z_exp == 1.0 and scheduler.config.prediction_type == "poisson_field"
        off = train_pfgm.parse_args(["--objective", "poisson_field", "--z_exp", "none", "--upper_norm", "none"])
        assert off.z_exp is None and off.upper_norm is None
        assert train_pfgm.build_scheduler(off, num_channels=1).config.upper_norm is None
        preset = train_pfgm.parse_args(["--preset", "pfgm-cifar10"])
        assert (preset.z_exp, preset.upper_norm, preset.sigma_max) == (5.0, 3000.0, 40.0)
        assert train_pfgm.parse_args([]).upper_norm is None  # PFGM++ has no prior clip


def test_launch_of_several_processes_without_multi_gpu_warns(tmp_path, monkeypatch, caplog):
    """The environment `accelerate launch --num_processes 2` (no --multi_gpu) gives its one process, as accelerate's
    own launcher code builds it, makes the trainer warn; a plain single-process launch does not."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    def launcher_env(num_processes):
        launch_args = launch_command_parser().parse_args(["--num_processes", str(num_processes), "x.py"])
        launch_args, _, _ = _validate_launch_command(launch_args)
        return prepare_simple_launcher_cmd_env(launch_args)[1]

    for num_processes, warns in ((2, True), (1, False)):
        for name in list(os.environ):
            if name.startswith(("ACCELERATE_", "MASTER_")) or name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
                monkeypatch.delenv(name)
        for name, value in launcher_env(num_processes).items():
            monkeypatch.setenv(name, value)
        caplog.clear()
        with in_process(tmp_path) as train_pfgm:
            train_pfgm.create_accelerator(train_pfgm.parse_args(["--output_dir", str(tmp_path / "out")]))
        assert ("add --multi_gpu" in caplog.text) == warns, (num_processes, caplog.text)


def make_folder(root, files):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            Image.fromarray(np.full((8, 8, 3), content, dtype=np.uint8)).save(path)
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "holds no image files"),
        ("missing folder", "is not a directory"),
        ("only corrupt images", "none of its 2 image files can be decoded"),
        ("resolution", "--resolution 12 is not divisible by 8"),
        ("fp16 on cpu", "--mixed_precision fp16 is not supported on CPU"),
        ("not a checkpoint", "is not a checkpoint of this trainer"),
        ("labels", "--class_conditional needs labels"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, image_folder, unet_config, case, message):
    overrides = {}
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        overrides["train_data_dir"] = tmp_path / "empty"
    elif case == "missing folder":
        overrides["train_data_dir"] = tmp_path / "nowhere"
    elif case == "only corrupt images":
        overrides["train_data_dir"] = make_folder(tmp_path / "bad", {"a/1.png": b"junk", "b/2.jpg": b"\xff\xd8junk"})
    elif case == "resolution":
        config = tmp_path / "deep.json"
        config.write_text(json.dumps(dict(TINY_UNET, block_out_channels=[4, 4, 4, 8])))
        config_dict = json.loads(config.read_text())
        config_dict["down_block_types"] = ["DownBlock2D"] * 4
        config_dict["up_block_types"] = ["UpBlock2D"] * 4
        config.write_text(json.dumps(config_dict))
        overrides.update(model_config_name_or_path=config, resolution=12)
    elif case == "fp16 on cpu":
        overrides["mixed_precision"] = "fp16"
    elif case == "not a checkpoint":
        (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
        overrides.update(resume_from_checkpoint="latest")
    elif case == "labels":
        overrides.update(
            train_data_dir=make_folder(tmp_path / "flat", {f"{i}.png": 10 * i for i in range(8)}),
            class_conditional=True,
        )
    args = tiny_args(image_folder, unet_config, tmp_path / "out", **overrides)
    with in_process(tmp_path) as train_pfgm:
        # A training step would need the optimizer: make any step fail loudly so "before training" is checked too
        with pytest.raises(ValueError) as error:
            train_pfgm.main([str(a) for a in args], loss=fail_if_called)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_argument_run_finishes_and_saves_a_pipeline(tmp_path):
    """The README's `accelerate launch training/train_pfgm.py`: embedded digits, CPU, at most 15 minutes (the timeout
    fails the test)."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT],
        env=launch_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=15 * 60,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    out = tmp_path / "pfgm-digits"
    assert (out / "model_index.json").is_file() and (out / "samples.png").is_file()
    assert Image.open(out / "samples.png").size == (4 * (8 * 9 + 1),) * 2  # 8x8 digits, 8 per row, drawn 4x
    # Its quality, as README reports it: the offline digit classifier's confident share near real digits'
    from pfgm_diffusers import PFGMPipeline
    from pfgm_diffusers.evaluation import digits_metrics

    pipe = PFGMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=300, generator=torch.Generator().manual_seed(0), output_type="np").images
    metrics = digits_metrics(images)
    assert metrics["confident_share"] > metrics["heldout_confident_share"] - 0.15, metrics
    assert metrics["class_coverage"] == 1.0, metrics


@pytest.mark.slow
def test_bf16_two_processes(tmp_path, image_folder, unet_config):
    out = tmp_path / "out"
    args = tiny_args(
        image_folder, unet_config, out, objective="poisson_field", large_batch_size=8, mixed_precision="bf16"
    )
    run_training(tmp_path, args, num_processes=2)
    assert (out / "model_index.json").is_file()


def test_a_non_finite_loss_stops_the_run_with_its_step(tmp_path, image_folder, unet_config):
    from pfgm_diffusers.losses import pfgmpp_loss

    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=6, logging_steps=2, checkpointing_steps=2)
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(RuntimeError, match="loss became nan within the 2 steps before step 2"):
            train_pfgm.main([str(arg) for arg in args], loss=lambda *a, **kw: pfgmpp_loss(*a, **kw) * float("nan"))
    assert not (out / "model_index.json").exists()  # no pipeline saved from a diverged run


def test_max_train_seconds_ends_the_run_at_the_step_that_spends_it(tmp_path, image_folder, unet_config):
    from pfgm_diffusers.losses import pfgmpp_loss

    calls = []

    def slow_loss(*args, **kwargs):  # 0.25 s a step: a 1 s budget ends within steps 1 to 4, long before 50
        calls.append(1)
        time.sleep(0.25)
        return pfgmpp_loss(*args, **kwargs)

    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=50, max_train_seconds=1, checkpointing_steps=100)
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.main([str(arg) for arg in args], loss=slow_loss)
    assert 1 <= len(calls) <= 4
    assert checkpoint_steps(out) == [len(calls)]  # the last step's checkpoint, as at --max_train_steps
    assert (out / "model_index.json").exists() and (out / "samples.png").exists()


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
FAST_LR_CASES = {("linear", 2, 1), ("constant_with_warmup", 1, 2)}  # the rest of the matrix runs with -m slow


@pytest.mark.parametrize(
    "lr_scheduler, before, after",
    [
        pytest.param(name, before, after, marks=() if (name, before, after) in FAST_LR_CASES else pytest.mark.slow)
        for name in LR_SCHEDULERS
        for before, after in ((2, 1), (1, 2))
    ],
)
def test_a_resume_on_another_process_count_continues_the_lr_schedule(
    tmp_path, image_folder, unet_config, lr_scheduler, before, after
):
    """The lr is a function of the optimizer step: after 2 steps on `before` processes and 2 more on `after`, every
    checkpoint's lr is the schedule's at its step, as for an uninterrupted run on one process."""
    from diffusers.optimization import get_scheduler

    out = tmp_path / "out"
    common = dict(lr_scheduler=lr_scheduler, lr_warmup_steps=3, checkpointing_steps=1, checkpoints_total_limit=4)
    run_training(tmp_path, tiny_args(image_folder, unet_config, out, max_train_steps=2, **common), before)
    args = tiny_args(image_folder, unet_config, out, max_train_steps=4, resume_from_checkpoint="latest", **common)
    log = run_training(tmp_path, args, after)
    assert f"The global batch changed: {4 * before} images per optimizer step ({before} process(es)) in the " in log
    assert f"checkpoint, {4 * after} ({after} process(es)) now; the lr schedule continues at optimizer step 2" in log

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    expected = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=3, num_training_steps=4)
    for step in range(1, 5):
        optimizer.step()
        expected.step()
        state = torch.load(out / f"checkpoint-{step}" / "optimizer.bin", weights_only=True)
        assert state["param_groups"][0]["lr"] == pytest.approx(expected.get_last_lr()[0], rel=1e-12, abs=1e-15), step
