"""The Hub side of a saved `PFGMPipeline`: which files are the pipeline, download, upload, and the model card.

Uploads and downloads name the pipeline's files explicitly (an allow-list), so that a stray file in an output folder
(a `.env`, notes, checkpoints, logs) never reaches the Hub, and nothing but the pipeline's own files is fetched.
"""

import os
import tempfile

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


def check_local_folder(name) -> None:
    """Refuse a name that looks like a local folder but is not one, before it is read as a Hub repository id.

    Looks local: an absolute path, one starting with `./`, `../` or `~`, or one whose parent folder exists (a bare
    name too: its parent is the working directory). A Hub id `owner/name` whose `owner` is no local folder passes.
    """
    path = os.fspath(name)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.expanduser(path)) or "."
    if os.path.isabs(path) or path.startswith(("./", "../", "~")) or os.path.isdir(parent):
        reason = "is not a folder" if os.path.exists(path) else "does not exist"
        raise ValueError(
            f"{path!r} looks like a local path and {reason} (resolved: {os.path.abspath(os.path.expanduser(path))}); "
            "pass the folder written by save_pretrained, or a Hub repository id 'owner/name'."
        )


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


class PipelineHubMixin:
    """Loading from and pushing to the Hub for a `DiffusionPipeline` whose components live outside diffusers: only
    the pipeline's own files travel (`PIPELINE_FILES` and the model card), and no code file is fetched or run."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Load a pipeline saved with [`~DiffusionPipeline.save_pretrained`] from a local folder or a Hub repository.

        As [`DiffusionPipeline.from_pretrained`], except that a name that looks like a local path (absolute, `./`,
        `../`, `~`, or with an existing parent folder) and is not a folder raises a `ValueError` saying so, instead of
        being looked up on the Hub. Hub repositories are fetched by [`~PipelineHubMixin.download`].

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder written by `save_pretrained`, or a Hub repository id `"owner/name"`.
            kwargs:
                Passed to [`DiffusionPipeline.from_pretrained`] (`dtype`, `revision`, `scheduler`, ...).

        Returns:
            [`PFGMPipeline`]
        """
        check_local_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        r"""
        Download a pipeline repository from the Hub with `huggingface_hub.snapshot_download` and return its folder.

        Diffusers' own `DiffusionPipeline.download` refuses `model_index.json` entries whose library it does not
        know (here `pfgm_diffusers.scheduling_pfgm`) before fetching anything, and `from_pretrained` calls
        `cls.download`, so this pipeline replaces it. Only the pipeline's own files (`hub.PIPELINE_FILES`) and the
        model card are fetched; no code file is ever downloaded or run.

        Args:
            pretrained_model_name (`str`):
                The repository id, e.g. `"user/pfgmpp-cifar10"`.
            cache_dir, force_download, local_files_only, token, revision:
                Passed to `huggingface_hub.snapshot_download`.

        Returns:
            `str`: the local folder holding the snapshot.
        """
        return download_pipeline(pretrained_model_name, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
    ):
        r"""
        Save the pipeline into a fresh folder and upload its files and a model card (library `pfgm_diffusers`).

        Args:
            repo_id (`str`):
                The repository to push to (created if it does not exist).
            commit_message (`str`, *optional*):
                Defaults to `"Upload PFGMPipeline"`.
            private (`bool`, *optional*):
                Whether a newly created repository is private.
            token (`str`, *optional*):
                The Hub token; defaults to the stored login.
            create_pr (`bool`, defaults to `False`):
                Open a pull request instead of committing.
            safe_serialization (`bool`, defaults to `True`), variant (`str`, *optional*):
                Passed to [`~DiffusionPipeline.save_pretrained`].

        Returns:
            The `huggingface_hub` commit info of the upload.
        """
        repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            save_model_card(folder, repo_id)
            return upload_pipeline(repo_id, folder, token, commit_message, create_pr)


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
