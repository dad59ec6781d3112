"""The README's Python examples run as written, as a new user would run them (a tiny UNet stands in for `unet` and
a tiny saved pipeline for `pfgm-digits/`)."""

import os
import re

import pytest
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_has_its_examples():
    """The two examples a user starts from, each with the calls it exists to show (an edit that drops one fails)."""
    pipeline, scheduler = python_blocks()
    for call in (
        "PFGMPipeline.from_pretrained(",
        "pipe.invert(",
        "pipe(latents=",
        'solver="dpmpp_2m"',
        "log_likelihood(",
    ):
        assert call in pipeline, call
    for call in ("PFGMScheduler(aug_dim=128)", "PFGMScheduler(aug_dim=None)", "PFGMFieldScheduler(", "set_timesteps(",
                 "scale_model_input(", ".step(", "init_noise_sigma"):  # fmt: skip
        assert call in scheduler, call


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = PFGMPipeline(unet=tiny_unet(in_channels=1), scheduler=PFGMScheduler(aug_dim=128))
    pipe.save_pretrained("pfgm-digits")  # what `make train` leaves behind, in miniature
    unet = tiny_unet(in_channels=3)  # the README's scheduler loop samples (4, 3, 32, 32): a UNet of any size runs it
    namespace = {"unet": lambda x, t: unet(x, t)}
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)


def test_no_documented_recipe_runs_remote_code():
    # trust_remote_code=True runs a repository's Python files; a relative custom_pipeline is read as a Hub repo id
    root = os.path.dirname(README)
    pages = [README] + [os.path.join(root, "docs", name) for name in os.listdir(os.path.join(root, "docs"))]
    for page in (page for page in pages if page.endswith(".md")):
        with open(page, encoding="utf-8") as f:
            code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", f.read(), flags=re.S))
        assert "trust_remote_code" not in code, page
        assert not re.search(r"custom_pipeline\s*=\s*[\"'](?!/)", code), page
