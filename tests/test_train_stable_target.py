"""Stable Target Field training in the trainer (`--target stf --reference_batch_size L`): the reference batch it
builds, mixed precision, an exact resume, and the input it refuses."""

import os

import pytest
import torch
from test_train import (
    REPO,
    checkpoint_steps,
    fail_if_called,
    in_process,
    load_weights,
    run_training,
    tiny_args,
)

STF = dict(target="stf", reference_batch_size=8)  # the training batch is 4 (tiny_args)


REFERENCE_RECORDER = """
import os, sys
import torch
sys.path.insert(0, {training_dir!r})
import train_pfgm

from pfgm_diffusers.losses import pfgmpp_loss

calls = []


def recording_loss(unet, scheduler, x, class_labels, P_mean, P_std, target=None):
    # Record what each process trains on and the reference batch of its target, then train as usual
    rank = int(os.environ.get("RANK", 0))
    path = os.path.join({record_dir!r}, f"rank{{rank}}_call{{len(calls)}}.pt")
    keywords = target.keywords
    torch.save({{"x": x.clone(), "reference": keywords["reference"].clone(), "aug_dim": keywords["aug_dim"]}}, path)
    calls.append(1)
    return pfgmpp_loss(unet, scheduler, x, class_labels, P_mean, P_std, target=target)


train_pfgm.main(loss=recording_loss)
"""


@pytest.mark.parametrize(("num_processes", "mixed_precision"), [(2, "no"), (1, "bf16")])
def test_reference_batch_is_every_process_batch_with_the_training_batch_first(
    tmp_path, image_folder, unet_config, num_processes, mixed_precision
):
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    recorder = tmp_path / "record_reference.py"
    recorder.write_text(
        REFERENCE_RECORDER.format(training_dir=os.path.join(REPO, "training"), record_dir=str(record_dir))
    )
    out = tmp_path / "out"
    args = tiny_args(image_folder, unet_config, out, max_train_steps=2, mixed_precision=mixed_precision, **STF)
    log = run_training(tmp_path, args, num_processes=num_processes, script=str(recorder))
    L = 8 * num_processes
    assert f"{L} reference images per STF target" in log
    for call in range(2):
        records = [torch.load(record_dir / f"rank{rank}_call{call}.pt") for rank in range(num_processes)]
        reference = records[0]["reference"]
        assert reference.shape == (L, 3, 8, 8) and reference.dtype == torch.float32  # float32 under bf16 too
        assert records[0]["aug_dim"] == 128  # the scheduler's D reaches the target
        for rank, record in enumerate(records):
            assert torch.equal(record["reference"], reference)  # one reference batch for every process
            # process p's batch is rows [8p, 8p + 8); it trains on the first 4: each sample's own image is in it
            assert torch.equal(reference[8 * rank : 8 * rank + 4], record["x"])
        assert len({tuple(row.flatten().tolist()) for row in reference}) == L  # different images
    assert (out / "model_index.json").is_file()


def test_resume_from_latest_equals_an_uninterrupted_run(tmp_path, image_folder, unet_config):
    # 32 images / reference batches of 8 = 4 steps per epoch: the resume at step 2 lands mid-epoch (resumes across
    # epochs: tests/test_checkpoints.py)
    common = dict(lr_scheduler="constant", checkpointing_steps=2, dataloader_num_workers=0, **STF)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(tmp_path, tiny_args(image_folder, unet_config, straight, max_train_steps=4, **common))
    run_training(tmp_path, tiny_args(image_folder, unet_config, resumed, max_train_steps=2, **common))
    assert checkpoint_steps(resumed) == [2]
    log = run_training(
        tmp_path,
        tiny_args(image_folder, unet_config, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common),
    )
    assert "checkpoint-2 at step 2" in log
    from safetensors.torch import load_file

    a, b = (load_file(folder / "checkpoint-4" / "model.safetensors") for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "trained weights differ"
    a, b = load_weights(straight / "unet"), load_weights(resumed / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a), "EMA weights differ"
    # a resume that switches the target back is another objective: refused
    with pytest.raises(AssertionError, match="loss setting reference_batch_size: 8 there, None here; loss setting "):
        run_training(
            tmp_path,
            tiny_args(
                image_folder,
                unet_config,
                resumed,
                max_train_steps=6,
                resume_from_checkpoint="latest",
                lr_scheduler="constant",
                checkpointing_steps=2,
            ),
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="poisson_field", target="stf"), "--target stf is a target of --objective pfgmpp; the field"),
        (dict(target="stf", reference_batch_size=2), "--reference_batch_size (2) must be >= --train_batch_size (4)"),
        (dict(reference_batch_size=64), "--reference_batch_size is an option of --target stf"),
        (dict(target="stf", class_conditional=True), "--target stf with --class_conditional is not supported"),
        (dict(target="stf", paired_task="denoise", paired_sigma_y=0.2), "--target stf with --paired_task is not"),
        (dict(target="stf", reference_batch_size=0), "--reference_batch_size (0) must be >= --train_batch_size"),
    ],
)
def test_bad_arguments_fail_before_loading_anything(tmp_path, image_folder, unet_config, overrides, message):
    args = [str(a) for a in tiny_args(image_folder, unet_config, tmp_path / "out", **overrides)]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.load_images = fail_if_called
        with pytest.raises(ValueError) as error:
            train_pfgm.main(args, loss=fail_if_called)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_default_reference_batch_is_the_official_4096(tmp_path):
    with in_process(tmp_path) as train_pfgm:
        args = train_pfgm.parse_args(["--target", "stf", "--train_batch_size", "128"])
        assert args.reference_batch_size == 4096
        objective = train_pfgm.build_objective(args)
        assert objective.loader_batch_size == 4096 and objective.settings()["target"] == "stf"
        assert train_pfgm.parse_args([]).target == "clean"
