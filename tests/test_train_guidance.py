"""The trainer's class dropout (--class_dropout_prob): labels become a null class at the given rate, and the saved
pipeline knows its null class and guides."""

import json

import pytest
import torch
from test_train import SCRIPT, fail_if_called, in_process, run_training, tiny_args

from pfgm_diffusers import PFGMPipeline

LABEL_RECORDER = """
import torch
from pfgm_diffusers.losses import pfgmpp_loss

train_pfgm = importlib.util.module_from_spec(importlib.util.spec_from_file_location("train_pfgm", {script!r}))
train_pfgm.__spec__.loader.exec_module(train_pfgm)
labels = []


def recording_loss(unet, scheduler, x, class_labels, *args, **kwargs):
    labels.append(class_labels.clone())
    torch.save(torch.cat(labels), {record!r})
    return pfgmpp_loss(unet, scheduler, x, class_labels, *args, **kwargs)


train_pfgm.main(loss=recording_loss)
"""


def write_recorder(tmp_path):
    record, recorder = tmp_path / "labels.pt", tmp_path / "record_labels.py"
    recorder.write_text("import importlib.util\n" + LABEL_RECORDER.format(script=SCRIPT, record=str(record)))
    return record, str(recorder)


def test_class_dropout_replaces_labels_by_the_null_class_at_the_given_rate(tmp_path, image_folder, unet_config):
    record, recorder = write_recorder(tmp_path)
    out = tmp_path / "out"
    flags = dict(class_conditional=True, class_dropout_prob=0.25, train_batch_size=8, max_train_steps=16)
    run_training(tmp_path, tiny_args(image_folder, unet_config, out, **flags), script=recorder)

    labels = torch.load(record)
    assert labels.shape == (128,) and set(labels.tolist()) == {0, 1, 2}  # two classes and the null class 2
    dropped = int((labels == 2).sum())
    assert 16 <= dropped <= 48, dropped  # Binomial(128, 0.25): mean 32, sd 4.9

    model_index = json.loads((out / "model_index.json").read_text())
    assert model_index["null_class_label"] == 2 and model_index["class_names"] == ["circles", "squares"]
    pipe = PFGMPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds == 3 and pipe.num_classes == 2
    images = pipe(class_labels="squares", num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_without_dropout_no_label_is_dropped_and_there_is_no_null_class(tmp_path, image_folder, unet_config):
    record, recorder = write_recorder(tmp_path)
    out = tmp_path / "out"
    run_training(tmp_path, tiny_args(image_folder, unet_config, out, class_conditional=True), script=recorder)
    assert set(torch.load(record).tolist()) == {0, 1}
    assert json.loads((out / "model_index.json").read_text())["null_class_label"] is None
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(class_conditional=True, class_dropout_prob=1.0), "--class_dropout_prob must lie in [0, 1), got 1.0"),
        (dict(class_conditional=True, class_dropout_prob=-0.1), "--class_dropout_prob must lie in [0, 1), got -0.1"),
        (dict(class_conditional=True, class_dropout_prob="nan"), "--class_dropout_prob must lie in [0, 1), got nan"),
        (dict(class_dropout_prob=0.1), "--class_dropout_prob drops class labels: it needs --class_conditional"),
    ],
)
def test_bad_class_dropout_fails_before_loading_anything(tmp_path, image_folder, unet_config, overrides, message):
    args = [str(a) for a in tiny_args(image_folder, unet_config, tmp_path / "out", **overrides)]
    with in_process(tmp_path) as train_pfgm:
        train_pfgm.load_images = fail_if_called
        with pytest.raises(ValueError) as error:
            train_pfgm.main(args, loss=fail_if_called)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()
