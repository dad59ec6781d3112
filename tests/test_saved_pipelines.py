"""Pipelines saved by v0.1 (`tests/fixtures/make_saved_v0_1.py`, before the scheduler redesign) load and sample the
same images, with `PFGMPipeline.from_pretrained` and with diffusers' own `DiffusionPipeline.from_pretrained`."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from pfgm_diffusers import PFGMFieldScheduler, PFGMPipeline, PFGMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from make_saved_v0_1 import OUT, PIPELINES, calls_for, sample  # noqa: E402


@pytest.mark.parametrize("loader", [PFGMPipeline, DiffusionPipeline], ids=["PFGMPipeline", "DiffusionPipeline"])
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_a_v0_1_folder_loads_and_samples_the_same_images(name, loader):
    pipe = loader.from_pretrained(OUT / name)
    assert type(pipe) is PFGMPipeline
    # the v0.1 field-mode PFGMScheduler is the original PFGM's own class now
    assert type(pipe.scheduler) is (PFGMFieldScheduler if name == "pfgm_field" else PFGMScheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = load_file(OUT / name / "samples.safetensors")
    assert sorted(expected) == sorted(calls_for(name))
    for key, call in calls_for(name).items():
        images = sample(pipe, call)
        assert torch.equal(images, expected[key]), f"{name}: {key} differs by {(images - expected[key]).abs().max()}"
