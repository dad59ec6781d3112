"""The Hub side of a saved `PFGMPipeline`: which files are the pipeline, download, upload, and the model card.

Uploads and downloads name the pipeline's files explicitly (an allow-list), so that a stray file in an output folder
(a `.env`, notes, checkpoints, logs) never reaches the Hub, and nothing but the pipeline's own files is fetched.
"""

import os

import huggingface_hub

# What `PFGMPipeline.save_pretrained` writes (safetensors, sharded or not, any variant; or torch .bin weights).
PIPELINE_FILES = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model*.safetensors",
    "unet/diffusion_pytorch_model*.safetensors.index.json",
    "unet/diffusion_pytorch_model*.bin",
    "unet/diffusion_pytorch_model*.bin.index.json",
    "scheduler/scheduler_config.json",
]
MODEL_CARD = "README.md"


def download_pipeline(repo_id: str, **kwargs) -> str:
    """Fetch the pipeline files and the model card of a Hub repository with `snapshot_download`; return the folder.

    `cache_dir`, `force_download`, `local_files_only`, `token` and `revision` are passed on; `proxies` is refused
    (huggingface_hub >= 1.0 has no such argument: set the HTTP(S)_PROXY variables).
    """
    proxies = kwargs.pop("proxies", None)
    if proxies is not None:
        raise ValueError(
            f"proxies={proxies!r} is not supported by huggingface_hub's snapshot_download; set the "
            "HTTP(S)_PROXY environment variables instead."
        )
    from . import __version__ as library_version  # the package imports this module: import at call time

    return huggingface_hub.snapshot_download(
        repo_id,
        cache_dir=kwargs.get("cache_dir"),
        force_download=bool(kwargs.get("force_download", False)),
        local_files_only=bool(kwargs.get("local_files_only", False)),
        token=kwargs.get("token"),
        revision=kwargs.get("revision"),
        allow_patterns=PIPELINE_FILES + [MODEL_CARD],
        library_name="pfgm_diffusers",
        library_version=library_version,
    )


def upload_pipeline(
    repo_id: str,
    folder: str,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    extra_files: tuple[str, ...] = (),
):
    """Upload the pipeline files of `folder`, its model card and the named `extra_files`, and nothing else."""
    return huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=PIPELINE_FILES + [MODEL_CARD] + list(extra_files),
        token=token,
        commit_message=commit_message or "Upload PFGMPipeline",
        create_pr=create_pr,
    )


def save_model_card(folder: str, repo_id: str) -> None:
    """Write the model card (`README.md`, `library_name: pfgm_diffusers`, a loading example) into `folder`."""
    huggingface_hub.ModelCard(model_card_text(repo_id)).save(os.path.join(folder, MODEL_CARD))


def model_card_text(repo_id: str) -> str:
    return f"""---
library_name: pfgm_diffusers
tags:
- pfgm
- pfgm++
- unconditional-image-generation
- diffusers
---

# {repo_id}

A Poisson flow generative model (PFGM / PFGM++) saved by `pfgm_diffusers`'s `PFGMPipeline`, a diffusers
pipeline. Load it with that package installed (`pip install pfgm_diffusers`); no remote code is needed or run:

```python
import torch
from pfgm_diffusers import PFGMPipeline

pipe = PFGMPipeline.from_pretrained("{repo_id}")
images = pipe(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
```
"""
