"""The training script launched for real: `accelerate launch` (1 and 2 CPU processes over gloo) on generated images.

Each run uses a ~2k-parameter UNet on 8x8 images for a few steps, so a launch costs mostly its start-up time.
"""

import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_pfgm.py")
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


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two class folders of random 10x12 RGB images (so resize and crop both act), plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("circles", "squares"):
        os.makedirs(root / label)
        for i in range(NUM_IMAGES // 2):
            array = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / label / f"{i:03d}.png")
    (root / "squares" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.fixture(scope="module")
def unet_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


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
    assert checkpoint_steps(out) == [3, 4]  # 4 saved, the limit keeps the newest 2
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no partial or half-deleted folders
    assert os.path.isfile(out / "checkpoint-4" / "random_states_1.pkl")  # every process's RNG state
    assert os.path.isfile(out / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert sorted(os.listdir(out / "samples")) == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(out / "samples.png").size == (2 * 9 + 1, 2 * 9 + 1)  # 4 images of 8x8 in a 2x2 grid
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["objective"] == "pfgmpp" and saved_args["aug_dim"] == 16

    from pfgm_diffusers import PFGMPipeline, PFGMScheduler

    pipeline = PFGMPipeline.from_pretrained(out)
    assert isinstance(pipeline.scheduler, PFGMScheduler) and pipeline.scheduler.config.aug_dim == 16
    assert pipeline.unet.config.num_class_embeds == 2 and pipeline.unet.config.in_channels == 3
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

original_loss = train_pfgm.poisson_field_loss
calls = []


def recording_loss(unet, x, charges, *args, **kwargs):
    # Record what each process feeds the field target, then train as usual
    rank = int(os.environ["RANK"])
    path = os.path.join({record_dir!r}, f"rank{{rank}}_call{{len(calls)}}.pt")
    torch.save({{"x": x.clone(), "charges": charges.clone()}}, path)
    calls.append(1)
    return original_loss(unet, x, charges, *args, **kwargs)


train_pfgm.poisson_field_loss = recording_loss
train_pfgm.main()
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
        image_folder, unet_config, out, objective="poisson_field", large_batch_size=8, max_train_steps=2, M=20
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


def test_public_arguments_drop_every_secret_name():
    import argparse

    spec = importlib.util.spec_from_file_location("train_pfgm_args", SCRIPT)
    train_pfgm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_pfgm)
    args = argparse.Namespace(hub_token="a", wandb_api_key="b", db_password="c", client_secret="d", seed=3)
    assert train_pfgm.public_arguments(args) == {"seed": 3}


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
# Bad input: a clear ValueError before any training step.


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="poisson_field", large_batch_size=2), "--large_batch_size (2) must be >= --train_batch_size"),
        (dict(objective="poisson_field", aug_dim=128), "is PFGM with D = 1"),
        (dict(resume_from_checkpoint="does/not/exist"), "does/not/exist' does not exist"),
        (dict(dataset_name="cifar10"), "at most one of --dataset_name and --train_data_dir"),
        (dict(train_data_dir=None, preset="ffhq64"), "--preset ffhq64 needs a dataset"),
        (dict(train_batch_size=0), "--train_batch_size must be >= 1"),
        (dict(sigma_min=100.0), "need 0 < --sigma_min < --sigma_max"),
        (dict(large_batch_size=64), "--large_batch_size is the charge count of --objective poisson_field"),
    ],
)
def test_bad_arguments_fail_before_loading_anything(tmp_path, image_folder, unet_config, overrides, message):
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises((ValueError, SystemExit)) as error:
            train_pfgm.parse_args(
                [str(a) for a in tiny_args(image_folder, unet_config, tmp_path / "out", **overrides)]
            )
    if error.type is SystemExit:  # argparse's own type errors
        pytest.fail(f"argparse exited instead of raising: {overrides}")
    assert message in str(error.value)


def test_aug_dim_zero_is_an_argparse_error(tmp_path, image_folder, unet_config, capsys):
    with in_process(tmp_path) as train_pfgm:
        with pytest.raises(SystemExit):
            train_pfgm.parse_args(["--aug_dim", "0"])
    assert "--aug_dim must be an integer >= 1 or 'inf', got 0" in capsys.readouterr().err


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
        ("different objective", "was trained with --objective pfgmpp, this run uses --objective poisson_field"),
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
    elif case in ("different objective", "not a checkpoint"):
        checkpoint = tmp_path / "out" / "checkpoint-3"
        checkpoint.mkdir(parents=True)
        if case == "different objective":
            (checkpoint / "pfgm_training_state.json").write_text(json.dumps({"global_step": 3, "objective": "pfgmpp"}))
        overrides.update(resume_from_checkpoint="latest", objective="poisson_field", large_batch_size=8)
    elif case == "labels":
        overrides.update(
            train_data_dir=make_folder(tmp_path / "flat", {f"{i}.png": 10 * i for i in range(8)}),
            class_conditional=True,
        )
    args = tiny_args(image_folder, unet_config, tmp_path / "out", **overrides)
    with in_process(tmp_path) as train_pfgm:
        # A training step would need the optimizer: make any step fail loudly so "before training" is checked too
        train_pfgm.pfgmpp_loss = train_pfgm.poisson_field_loss = _no_training
        with pytest.raises(ValueError) as error:
            train_pfgm.main([str(a) for a in args])
    assert message in str(error.value)


def _no_training(*args, **kwargs):
    raise AssertionError("training started before the bad input was reported")


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_argument_run_finishes_and_saves_a_pipeline(tmp_path):
    """The README's `accelerate launch training/train_pfgm.py`: embedded digits, CPU, at most 15 minutes."""
    start = time.time()
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
    assert time.time() - start < 15 * 60
    out = tmp_path / "pfgm-digits"
    assert (out / "model_index.json").is_file() and (out / "samples.png").is_file()
    assert Image.open(out / "samples.png").size == (8 * 17 + 1, 8 * 17 + 1)


@pytest.mark.slow
def test_bf16_two_processes(tmp_path, image_folder, unet_config):
    out = tmp_path / "out"
    args = tiny_args(
        image_folder, unet_config, out, objective="poisson_field", large_batch_size=8, mixed_precision="bf16"
    )
    run_training(tmp_path, args, num_processes=2)
    assert (out / "model_index.json").is_file()
