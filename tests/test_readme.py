"""The README's Python examples run as written, as a new user would run them (a tiny UNet stands in for `unet` and
a tiny saved pipeline for `pfgm-digits/`)."""

import os
import re

import pytest
import torch
from diffusers import UNet2DModel

from pfgm_diffusers import PFGMPipeline, PFGMScheduler

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def tiny_unet(channels):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_the_readme_has_its_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = PFGMPipeline(unet=tiny_unet(1), scheduler=PFGMScheduler(aug_dim=128))
    pipe.save_pretrained("pfgm-digits")  # what `make train` leaves behind, in miniature
    unet = tiny_unet(3)  # the README's scheduler loop samples (4, 3, 32, 32): a UNet of any size runs it
    namespace = {"unet": lambda x, t: unet(x, t)}
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
