"""The trainer's output folder, run in process on a tiny UNet: one run per folder, exact or refused resumes, atomic and
verified checkpoints, pipelines a killed run leaves, and the export of a checkpoint to a pipeline."""

import errno
import importlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import TRAINING_DIR, in_process, load_weights, tiny_args

from pfgm_diffusers import PFGMPipeline

RUN = dict(class_conditional=True, aug_dim=16, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=3)


def train(tmp_path, args, loss=None, **patches):
    """`main(args, loss)` in this process, with module attributes of the script replaced by `patches`."""
    with in_process(tmp_path) as train_pfgm:
        for name, value in patches.items():
            setattr(train_pfgm, name, value)
        train_pfgm.main([str(arg) for arg in args], loss=loss)


def fail_if_called(*args, **kwargs):
    raise AssertionError("data was loaded or training started before the problem was reported")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, image_folder, unet_config):
    """A finished run: checkpoint-1, checkpoint-2 and the pipeline, class-conditional with D = 16."""
    root = tmp_path_factory.mktemp("trained")
    train(root, tiny_args(image_folder, unet_config, root / "out", **RUN))
    return root / "out"


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    return out


def resume_args(image_folder, unet_config, out, **overrides):
    return tiny_args(image_folder, unet_config, out, **{**RUN, "resume_from_checkpoint": "latest", **overrides})


# ----- one run per folder -----


def test_a_new_run_into_another_runs_folder_is_refused_or_replaces_it(
    run_copy, tmp_path, image_folder, unet_config, caplog
):
    (run_copy / "notes.txt").write_text("mine")
    args = tiny_args(image_folder, unet_config, run_copy, **{**RUN, "max_train_steps": 1})
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, load_images=fail_if_called)
    message = str(error.value)
    assert f"--output_dir '{run_copy}' holds another run (checkpoint-1, checkpoint-2, model_index.json" in message
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint latest" in message
    assert sorted(os.listdir(run_copy / "samples")) == ["step_0000002.png"]  # untouched

    train(tmp_path, args + ["--overwrite_output_dir"])
    removed = "removing checkpoint-1, checkpoint-2, model_index.json, samples, samples.png, scheduler, "
    assert f"--overwrite_output_dir: {removed}training_args.json, unet from {run_copy}" in caplog.text
    assert sorted(name for name in os.listdir(run_copy) if name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert sorted(os.listdir(run_copy / "samples")) == ["step_0000001.png"]  # only the new run's grid
    assert (run_copy / "notes.txt").read_text() == "mine"  # not a run's output: kept


def test_a_second_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, image_folder, unet_config, caplog):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".pfgm_train.lock"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=1)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{other.pid} {os.uname().nodename}\n")
        with pytest.raises(ValueError, match=rf"another run \(pid {other.pid}\) is training into '{out}'"):
            train(tmp_path, args, load_images=fail_if_called)
        assert lock.read_text().split()[0] == str(other.pid)  # the live run's lock stays
    finally:
        other.kill()
        other.wait()
    train(tmp_path, args)
    assert f"Removing the stale lock {lock} of process {other.pid}" in caplog.text
    assert not lock.exists() and (out / "model_index.json").is_file()  # released at the end


# ----- resume: exact or refused -----


def test_resume_by_checkpoint_name_looks_in_the_output_dir_and_logs_one_line(
    run_copy, tmp_path, image_folder, unet_config, caplog, capfd
):
    caplog.set_level(logging.INFO)
    train(tmp_path, resume_args(image_folder, unet_config, run_copy, resume_from_checkpoint="checkpoint-1"))
    assert f"Resumed from {run_copy}/checkpoint-1 at step 1" in caplog.text
    assert [record.getMessage() for record in caplog.records if "checkpoint-2" in record.getMessage()] == [
        f"[RANK 0] Saved {run_copy}/checkpoint-2"
    ]
    # accelerate's lines per saved or loaded file, and diffusers' warnings about the EMA config, stay quiet
    assert "loaded successfully" not in caplog.text and "Saving current state" not in caplog.text
    assert "were passed to UNet2DModel" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="poisson_field", large_batch_size=8, aug_dim=None), "objective: 'pfgmpp' there, 'poisson_"),
        (dict(aug_dim=32), "aug_dim: 16 there, 32 here"),
        (dict(aug_dim="inf"), "aug_dim: 16 there, None here"),
        (dict(resolution=16), "resolution: 8 there, 16 here"),
        (dict(class_conditional=None), "class_names: ['circles', 'squares'] there, None here"),
        ("wider model", "model config block_out_channels: [4, 8] there, [8, 8] here"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_setting_naming_it(
    run_copy, tmp_path, image_folder, unet_config, overrides, message
):
    if overrides == "wider model":
        wider = tmp_path / "wider.json"
        wider.write_text(json.dumps(dict(json.loads(unet_config.read_text()), block_out_channels=[8, 8])))
        overrides = dict(model_config_name_or_path=wider)
    args = resume_args(image_folder, unet_config, run_copy, **overrides)
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, loss=fail_if_called)
    assert f"checkpoint '{run_copy}/checkpoint-2' does not match this run: " in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "objective",
    [
        dict(train_batch_size=16, class_conditional=True),
        dict(objective="poisson_field", large_batch_size=16, aug_dim=None, class_conditional=True),
        dict(target="stf", reference_batch_size=16),  # (unconditional: STF refuses class labels)
        # 8 batches of 4 in 3 steps: accelerate steps the optimizer at the end of an epoch on a partial accumulation
        dict(train_batch_size=4, gradient_accumulation_steps=3, class_conditional=True),
    ],
    ids=["pfgmpp", "poisson_field", "stf", "accumulation"],
)
def test_resumes_across_epoch_boundaries_equal_an_uninterrupted_run(tmp_path, image_folder, unet_config, objective):
    # 32 images in loader batches of 16 (per optimizer step): 2 steps per epoch. The interrupted run stops at step 2
    # (an epoch boundary), resumes to step 3 (mid-epoch 1) and from there to step 5, through epoch 2 (with
    # accumulation, 3 steps per epoch: mid-epoch 0, a boundary, mid-epoch 1): every resume must see the data order,
    # augmentations and noise of the uninterrupted run, and no checkpoint may shift them
    common = dict(lr_scheduler="constant", dataloader_num_workers=0, random_flip=True, **objective)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tmp_path, tiny_args(image_folder, unet_config, straight, max_train_steps=5, **common))
    for steps in (2, 3, 5):
        resume = "latest" if steps > 2 else None
        train(tmp_path, tiny_args(image_folder, unet_config, resumed, max_train_steps=steps,
                                  resume_from_checkpoint=resume, **common))  # fmt: skip
    a, b = (load_file(folder / "checkpoint-5" / "model.safetensors") for folder in (straight, resumed))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    a, b = load_weights(straight / "unet"), load_weights(resumed / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a), "EMA weights differ"


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte changed, same size
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, how", [("model.safetensors", "truncate"), ("random_states_0.pkl", "flip"), ("optimizer.bin", "flip")]
)
def test_a_damaged_checkpoint_is_refused_by_name_and_latest_falls_back(
    run_copy, tmp_path, image_folder, unet_config, caplog, name, how
):
    damaged = run_copy / "checkpoint-2" / name
    damage(damaged, how)
    named = resume_args(image_folder, unet_config, run_copy, resume_from_checkpoint="checkpoint-2")
    with pytest.raises(ValueError) as error:
        train(tmp_path, named, load_images=fail_if_called)
    assert f"checkpoint '{run_copy}/checkpoint-2' is damaged: '{damaged}' differs from the file that was saved" in str(
        error.value
    )

    # `latest` skips it, says so with both names, and continues from checkpoint-1
    train(tmp_path, resume_args(image_folder, unet_config, run_copy))
    assert f"'{damaged}' differs from the file that was saved" in caplog.text
    assert f"resuming from {run_copy}/checkpoint-1 instead" in caplog.text
    assert f"Resumed from {run_copy}/checkpoint-1 at step 1" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"global_step": 2, "objec', "is damaged: Unterminated string"),
        ('{"global_step": 2}', "is damaged or from another trainer version: no ['scheduler_config', 'files'"),
        ("[]", "is damaged or from another trainer version"),
    ],
)
def test_a_damaged_training_state_is_named(run_copy, tmp_path, image_folder, unet_config, content, message):
    state = run_copy / "checkpoint-2" / "pfgm_training_state.json"
    state.write_text(content)
    args = resume_args(image_folder, unet_config, run_copy, resume_from_checkpoint=run_copy / "checkpoint-2")
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, load_images=fail_if_called)
    assert f"the training state '{state}' " in str(error.value) and message in str(error.value)


# ----- writing -----


@pytest.mark.parametrize(
    "target, error",
    [
        ("accelerate.utils.other.safe_save_file", OSError(errno.ENOSPC, "No space left on device")),
        ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")),
    ],
)
def test_a_full_disk_during_a_checkpoint_says_what_failed_and_where(
    tmp_path, image_folder, unet_config, monkeypatch, target, error
):
    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, full_disk)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as raised:
        train(tmp_path, tiny_args(image_folder, unet_config, out, checkpointing_steps=1))
    message = str(raised.value)
    assert f"saving checkpoint '{out}/checkpoint-1' failed while writing '{out}/.partial-checkpoint-1'" in message
    assert "GiB free on that disk" in message and str(error) in message
    assert not [name for name in os.listdir(out) if "checkpoint" in name]  # nothing half-written left


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, image_folder, unet_config, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    train(tmp_path, tiny_args(image_folder, unet_config, out, max_train_steps=1, checkpointing_steps=1))
    partial, final = str(out / ".partial-checkpoint-1"), str(out / "checkpoint-1")
    rename = events.index(("replace", partial, final))
    synced = {event[1] for event in events[:rename] if event[0] == "fsync"}
    files = [os.path.join(root, name) for root, _, names in os.walk(final) for name in names]
    assert len(files) >= 6 and {path.replace(final, partial) for path in files} <= synced
    assert partial in synced and ("fsync", str(out)) in events[rename:]  # the folder entries too


def test_save_pipeline_steps_leaves_a_pipeline_when_a_run_dies(tmp_path, image_folder, unet_config):
    from pfgm_diffusers.losses import pfgmpp_loss

    calls = []

    def dies_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return pfgmpp_loss(*args, **kwargs)

    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=4, checkpointing_steps=1, save_pipeline_steps=2)
    with pytest.raises(RuntimeError, match="killed"):
        train(tmp_path, args, loss=dies_at_the_third_step)
    # The pipeline of step 2 (its EMA weights), whole, although the run never reached its end
    pipeline = PFGMPipeline.from_pretrained(out)
    ema = load_weights(out / "checkpoint-2" / "unet_ema")
    assert all(torch.equal(pipeline.unet.state_dict()[name], ema[name]) for name in ema)
    assert not (out / ".partial-pipeline").exists() and not (out / "samples.png").exists()


def test_export_checkpoint_makes_a_pipeline_of_the_ema_or_trained_weights(run_copy, tmp_path):
    sys.path.insert(0, TRAINING_DIR)
    import export_checkpoint

    export_checkpoint.main([str(run_copy / "checkpoint-2"), str(tmp_path / "ema")])
    export_checkpoint.main([str(run_copy / "checkpoint-1"), str(tmp_path / "trained"), "--no_ema"])
    ema = PFGMPipeline.from_pretrained(tmp_path / "ema")
    assert ema.config.class_names == ["circles", "squares"] and ema.scheduler.config.aug_dim == 16
    expected = load_weights(run_copy / "checkpoint-2" / "unet_ema")
    assert all(torch.equal(ema.unet.state_dict()[name], expected[name]) for name in expected)
    saved = load_weights(run_copy / "unet")  # the run's own final pipeline holds the same EMA weights
    assert all(torch.equal(saved[name], expected[name]) for name in expected)
    trained = PFGMPipeline.from_pretrained(tmp_path / "trained")
    model = load_file(run_copy / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(trained.unet.state_dict()[name], model[name]) for name in model)
    images = ema(batch_size=2, class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    damage(run_copy / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors", "flip")
    with pytest.raises(ValueError, match="checkpoint-2' is damaged"):
        export_checkpoint.main([str(run_copy / "checkpoint-2"), str(tmp_path / "again")])


# ----- hardening round 3 (issue 14): links, folders that are not runs, resumes that would change the model -----


def checkpoints_module():
    from pfgm_diffusers.training import checkpoints

    return checkpoints


def export_checkpoint_script():
    if TRAINING_DIR not in sys.path:
        sys.path.insert(0, TRAINING_DIR)
    return importlib.import_module("export_checkpoint")


def edit_state(checkpoint, edit, rehash=True):
    """Apply `edit` to the training state of `checkpoint`, with its own checksum recomputed when `rehash` (so that only
    the check under test can catch the edit)."""
    path = checkpoint / "pfgm_training_state.json"
    state = json.loads(path.read_text())
    edit(state)
    if rehash:
        state["state_sha256"] = checkpoints_module().state_sha256(state)
    path.write_text(json.dumps(state, indent=2))


@pytest.mark.parametrize("name", ["training_args.json", "samples.png", "samples", "logs", ".pfgm_train.lock"])
def test_the_trainer_never_writes_through_a_link_in_its_folder(run_copy, tmp_path, image_folder, unet_config, name):
    victim = tmp_path / "victim"  # another user's file or folder the link points to
    if name in ("samples", "logs"):
        victim.mkdir()
        (victim / "theirs.txt").write_text("theirs")
    else:
        victim.write_text("theirs")
    target = run_copy / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.symlink_to(victim)
    args = resume_args(image_folder, unet_config, run_copy, max_train_steps=3)
    with pytest.raises(ValueError) as error:
        train(tmp_path, args)
    assert f"'{target}' is a symbolic link" in str(error.value)
    if victim.is_dir():
        assert os.listdir(victim) == ["theirs.txt"] and (victim / "theirs.txt").read_text() == "theirs"
    else:
        assert victim.read_text() == "theirs"


def test_a_linked_partial_pipeline_is_refused_and_its_target_untouched(run_copy, tmp_path, image_folder, unet_config):
    other_model = tmp_path / "other-model"
    shutil.copytree(run_copy / "unet", other_model)
    before = {name: (other_model / name).read_bytes() for name in os.listdir(other_model)}
    link = run_copy / ".partial-pipeline"
    link.symlink_to(other_model)
    pipeline = PFGMPipeline.from_pretrained(run_copy)
    with pytest.raises(ValueError, match=f"'{link}' is a symbolic link"):
        checkpoints_module().save_pipeline(pipeline, str(run_copy))
    # A run finds it as a leftover of a killed run: it removes the link, never what it points to
    train(tmp_path, resume_args(image_folder, unet_config, run_copy, max_train_steps=3))
    assert not os.path.lexists(link) and (run_copy / "checkpoint-3").is_dir()
    assert {name: (other_model / name).read_bytes() for name in os.listdir(other_model)} == before


@pytest.mark.parametrize("name", ["../outside.bin", "unet_ema/../../outside.bin", "/tmp/outside.bin", "./x", ""])
def test_a_manifest_naming_files_outside_the_checkpoint_is_refused_before_reading(run_copy, tmp_path, name):
    (run_copy / "outside.bin").write_bytes(b"x" * 1234)  # what `../outside.bin` names from checkpoint-2
    edit_state(run_copy / "checkpoint-2", lambda state: state["files"].update({name: {"size": 1, "sha256": "0"}}))
    export = export_checkpoint_script()
    for attempt in (
        lambda: checkpoints_module().find_checkpoint(str(run_copy / "checkpoint-2"), str(run_copy)),
        lambda: export.main([str(run_copy / "checkpoint-2"), str(tmp_path / "exported")]),
    ):
        with pytest.raises(ValueError) as error:
            attempt()
        assert f"its file list names {name!r} is not a plain relative file name" in str(error.value)
        assert "1234" not in str(error.value)
    assert not (tmp_path / "exported").exists()


def test_an_edited_training_state_is_refused_by_resume_and_export(run_copy, tmp_path, image_folder, unet_config):
    def edit(state):
        state["scheduler_config"]["sigma_max"] = 10.0

    edit_state(run_copy / "checkpoint-2", edit, rehash=False)
    state = run_copy / "checkpoint-2" / "pfgm_training_state.json"
    message = f"the training state '{state}' is damaged: it differs from the state that was saved"
    export = export_checkpoint_script()
    with pytest.raises(ValueError, match=re.escape(message)):
        export.main([str(run_copy / "checkpoint-2"), str(tmp_path / "exported")])
    args = resume_args(image_folder, unet_config, run_copy, resume_from_checkpoint="checkpoint-2")
    with pytest.raises(ValueError, match=re.escape(message)):
        train(tmp_path, args, load_images=fail_if_called)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sigma_data=0.6), "scheduler config sigma_data: 0.5 there, 0.6 here"),
        (dict(sigma_max=40.0), "scheduler config sigma_max: 80.0 there, 40.0 here"),
        (dict(P_mean=-1.0), "loss setting P_mean: -1.2 there, -1.0 here"),
        (dict(P_std=1.0), "loss setting P_std: 1.2 there, 1.0 here"),
    ],
)
def test_resume_refuses_another_scheduler_or_loss_setting(
    run_copy, tmp_path, image_folder, unet_config, overrides, message
):
    args = resume_args(image_folder, unet_config, run_copy, max_train_steps=3, **overrides)
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, loss=fail_if_called)
    assert f"checkpoint '{run_copy}/checkpoint-2' does not match this run: " in str(error.value)
    assert message in str(error.value)


def test_a_random_state_accelerate_cannot_restore_is_reported(run_copy, tmp_path, image_folder, unet_config, caplog):
    checkpoint = run_copy / "checkpoint-2"
    torch.save({"not": "a random state"}, checkpoint / "random_states_0.pkl")  # checksum updated: only the load fails
    record = {"size": os.path.getsize(checkpoint / "random_states_0.pkl")}
    record["sha256"] = checkpoints_module()._sha256(checkpoint / "random_states_0.pkl")
    edit_state(checkpoint, lambda state: state["files"].update({"random_states_0.pkl": record}))
    train(tmp_path, resume_args(image_folder, unet_config, run_copy, max_train_steps=3))
    assert f"could not restore the random state '{checkpoint}/random_states_0.pkl'" in caplog.text
    assert "this resume is not reproducible" in caplog.text


def test_overwrite_output_dir_refuses_a_folder_that_is_not_a_run(tmp_path, image_folder, unet_config):
    home = tmp_path / "home"
    for name in ("logs", "samples"):
        (home / name).mkdir(parents=True)
        (home / name / "mine.txt").write_text("mine")
    (home / "notes.txt").write_text("mine")
    args = tiny_args(image_folder, unet_config, home, max_train_steps=1, overwrite_output_dir=True)
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, load_images=fail_if_called)
    message = str(error.value)
    assert f"--output_dir '{home}' is not a run of this trainer (no pfgm_run.json)" in message
    assert "but holds logs, notes.txt, samples: choose a new or empty --output_dir" in message
    assert sorted(os.listdir(home)) == ["logs", "notes.txt", "samples"]  # nothing deleted, nothing added
    assert [(home / name / "mine.txt").read_text() for name in ("logs", "samples")] == ["mine", "mine"]


def test_a_lock_file_naming_an_unrelated_process_or_empty_is_named_not_taken_over(tmp_path, image_folder, unet_config):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".pfgm_train.lock"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=1)
    lock.write_text(f"{os.getppid()} {os.uname().nodename}\n")  # a live process that is not a trainer
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, load_images=fail_if_called)
    assert f"The lock file is '{lock}': if process {os.getppid()} is not a run of this trainer" in str(error.value)
    # The instant between another trainer creating its lock and writing its pid: never taken over
    lock.write_text("")
    with pytest.raises(ValueError) as error:
        train(tmp_path, args, load_images=fail_if_called)
    assert f"holds a lock file '{lock}' that is not this trainer's ('')" in str(error.value)
    assert lock.exists() and lock.read_text() == ""


def test_the_lock_never_appears_without_its_pid(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lock_path = out / ".pfgm_train.lock"
    seen = []
    real_fsync, real_hostname = os.fsync, socket.gethostname

    def look(real):  # at each step of writing the lock: whenever the lock exists, it holds the whole line
        def step(*args):
            if lock_path.exists():
                seen.append(lock_path.read_text())
            return real(*args)

        return step

    monkeypatch.setattr(os, "fsync", look(real_fsync))
    monkeypatch.setattr(socket, "gethostname", look(real_hostname))
    lock = checkpoints_module().OutputDirLock(str(out))
    lock.acquire()
    assert lock_path.read_text() == f"{os.getpid()} {real_hostname()}\n"
    assert all(text == lock_path.read_text() for text in seen), seen
    lock.release()
    assert os.listdir(out) == []  # no temporary file left


def test_latest_ignores_a_checkpoint_name_with_non_ascii_digits(run_copy, tmp_path, image_folder, unet_config, caplog):
    (run_copy / "checkpoint-²").mkdir()
    caplog.set_level(logging.INFO)
    train(tmp_path, resume_args(image_folder, unet_config, run_copy, max_train_steps=3))
    assert f"Resumed from {run_copy}/checkpoint-2 at step 2" in caplog.text


# ----- issue 16: frictions of the trainer -----


def test_resuming_a_finished_run_says_so_and_trains_no_step(run_copy, tmp_path, image_folder, unet_config, caplog):
    before = sorted(os.listdir(run_copy))
    weights = (run_copy / "checkpoint-2" / "model.safetensors").read_bytes()
    train(tmp_path, resume_args(image_folder, unet_config, run_copy), loss=fail_if_called)
    assert "Already at 2 steps: pass a larger --max_train_steps to train on" in caplog.text
    assert "throughput" not in caplog.text
    assert sorted(os.listdir(run_copy)) == before
    assert (run_copy / "checkpoint-2" / "model.safetensors").read_bytes() == weights


def test_training_args_hold_no_absolute_local_path(trained_run):
    saved = json.loads((trained_run / "training_args.json").read_text())
    assert saved["train_data_dir"] == os.path.basename(saved["train_data_dir"]) != ""  # the folder's name only
    assert not [name for name, value in saved.items() if isinstance(value, str) and os.path.isabs(value)]
    assert saved["resolution"] == 8 and saved["aug_dim"] == 16  # the settings themselves stay


def test_a_bad_input_is_one_error_line_and_removes_the_folder_it_created(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(flat / f"{i}.png")
    out = tmp_path / "new-run"
    args = ["--train_data_dir", flat, "--output_dir", out, "--class_conditional", "--cache_dir", tmp_path / "cache"]
    result = subprocess.run(
        [sys.executable, os.path.join(TRAINING_DIR, "train_pfgm.py")] + [str(arg) for arg in args],
        env=dict(os.environ, PYTHONPATH=os.path.dirname(TRAINING_DIR), HF_HOME=str(tmp_path / "hf_home")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --class_conditional needs labels: class sub-folders or a label column in the dataset"
    )
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()  # created by the failed run, holding nothing but its mark: removed
    # A folder that existed before stays, whatever the failure
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    subprocess.run(
        [sys.executable, os.path.join(TRAINING_DIR, "train_pfgm.py")] + [str(arg) for arg in args],
        env=dict(os.environ, PYTHONPATH=os.path.dirname(TRAINING_DIR), HF_HOME=str(tmp_path / "hf_home")),
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert (out / "notes.txt").read_text() == "mine"


def test_no_function_of_the_trainer_is_longer_than_120_lines():
    import ast

    folders = [TRAINING_DIR, os.path.join(os.path.dirname(TRAINING_DIR), "pfgm_diffusers", "training")]
    long = []
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, name)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 120:
                        long.append(f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
