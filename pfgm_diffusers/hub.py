"""The Hub side of a saved `PFGMPipeline`: which files are the pipeline, download, upload, and the model card.

Uploads and downloads name the pipeline's files explicitly (an allow-list), so that a stray file in an output folder
(a `.env`, notes, checkpoints, logs) never reaches the Hub, and a download fetches only what `from_pretrained` reads:
the configurations, the model card and the UNet weights of one variant in one format (`pipeline_files`).
"""

import functools
import glob
import os
import re
import tempfile

import huggingface_hub
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

# What `PFGMPipeline.save_pretrained` writes (safetensors, sharded or not, any variant; or torch .bin weights): the
# upload allow-list. A download fetches fewer: `pipeline_files` picks the one weight format and variant loaded.
PIPELINE_FILES = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model*.safetensors",
    "unet/diffusion_pytorch_model*.safetensors.index.json",
    "unet/diffusion_pytorch_model*.bin",
    "unet/diffusion_pytorch_model*.bin.index.json",
    "scheduler/scheduler_config.json",
    # a latent pipeline's AutoencoderKL (PFGMPipeline's optional `vae`)
    "vae/config.json",
    "vae/diffusion_pytorch_model*.safetensors",
    "vae/diffusion_pytorch_model*.safetensors.index.json",
    "vae/diffusion_pytorch_model*.bin",
    "vae/diffusion_pytorch_model*.bin.index.json",
]
CONFIG_FILES = ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "vae/config.json"]
WEIGHTS_FOLDER = "unet"
OPTIONAL_WEIGHTS_FOLDERS = ("vae",)  # fetched when the repository has their config (a latent pipeline)
WEIGHTS_NAME = "diffusion_pytorch_model"
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


# The weight files diffusers' `save_pretrained` names (diffusers.utils.hub_utils._add_variant): one file
# `diffusion_pytorch_model[.variant].ext`, or shards `diffusion_pytorch_model[.variant]-00001-of-00002.ext` (before
# diffusers 0.27 `...-00001-of-00002.variant.ext`) listed by `diffusion_pytorch_model.ext.index[.variant].json`
# (before 0.27 `...ext.variant.index.json`).
def _weight_patterns(folder):
    """The (index, weights) file patterns of a component folder."""
    weights = re.compile(
        rf"{folder}/{WEIGHTS_NAME}(?:\.(?P<variant>[^./-]+))?"
        rf"(?:-(?P<shard>\d{{5}}-of-\d{{5}})(?:\.(?P<legacy_variant>[^./]+))?)?\.(?P<format>safetensors|bin)"
    )
    index = re.compile(
        rf"{folder}/{WEIGHTS_NAME}\.(?P<format>safetensors|bin)"
        r"(?:\.index(?:\.(?P<variant>[^./]+))?|\.(?P<legacy_variant>[^./]+)\.index)\.json"
    )
    return index, weights


def pipeline_files(filenames, variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    r"""
    The files of a repository listing that `PFGMPipeline.from_pretrained(..., variant=, use_safetensors=)` reads.

    The configurations, the model card, and the UNet weights (and a latent pipeline's VAE weights) of one variant in
    one format, as diffusers' loader
    picks them: safetensors when the variant has them, else torch `.bin` (only safetensors with
    `use_safetensors=True`, only `.bin` with `False`); a sharded checkpoint is its index and its shards. Other
    variants, formats, checkpoints, code and anything else in the repository are left out.

    Args:
        filenames (`list[str]`): the repository's files, relative paths with `/` (`huggingface_hub.list_repo_files`).
        variant (`str`, *optional*): the weights variant (e.g. `"fp16"`); `None` reads the files without one.
        use_safetensors (`bool`, *optional*): as in `from_pretrained`.

    Returns:
        `list[str]`: the files to fetch, sorted.

    Raises:
        `ValueError`: when the listing holds no UNet weights of that variant and format; the message lists the
        variants and formats it does hold.
    """
    listed = set(filenames)
    folders = [WEIGHTS_FOLDER] + [name for name in OPTIONAL_WEIGHTS_FOLDERS if f"{name}/config.json" in listed]
    weights = [name for folder in folders for name in _folder_weights(filenames, folder, variant, use_safetensors)]
    return sorted([name for name in CONFIG_FILES + [MODEL_CARD] if name in listed] + weights)


def _folder_weights(filenames, folder, variant, use_safetensors):
    """The weight files of one component folder that `pipeline_files` picks (see there)."""
    index_pattern, weights_pattern = _weight_patterns(folder)
    groups = {}  # (variant, format) -> {"single": [...], "index": [...], "shards": [...]}
    for name in filenames:
        for kind, pattern in (("index", index_pattern), ("weights", weights_pattern)):
            match = pattern.fullmatch(name)
            if match is not None:
                key = (match["variant"] or match["legacy_variant"], match["format"])
                if kind == "weights":
                    kind = "single" if match["shard"] is None else "shards"
                groups.setdefault(key, {"single": [], "index": [], "shards": []})[kind].append(name)
                break
    formats = {None: ("safetensors", "bin"), True: ("safetensors",), False: ("bin",)}[use_safetensors]
    chosen = next((groups[(variant, f)] for f in formats if (variant, f) in groups), None)
    if chosen is None or not (chosen["single"] or chosen["index"]):
        held = ", ".join(f"{v or 'no variant'} {f}" for v, f in sorted(groups, key=str)) or "none"
        raise ValueError(
            f"the repository has no {folder} weights for variant={variant!r} in "
            f"{' or '.join(formats)} (use_safetensors={use_safetensors}); its weights: {held}"
        )
    # A sharded checkpoint is read through its index, even beside a single file (diffusers' loader looks first)
    return chosen["index"] + chosen["shards"] if chosen["index"] else chosen["single"]


def download_pipeline(repo_id: str, **kwargs) -> str:
    """Fetch the files `from_pretrained` will read (`pipeline_files`) and the model card of a Hub repository with
    `snapshot_download`; return the folder.

    `variant` and `use_safetensors` choose the weights (one variant, one format); `cache_dir`, `force_download`,
    `local_files_only`, `token` and `revision` are passed on; `proxies` is refused (huggingface_hub >= 1.0 has no
    such argument: set the HTTP(S)_PROXY variables). Without the Hub (offline, unreachable), a snapshot already in
    the cache is used, as `snapshot_download` does.
    """
    proxies = kwargs.pop("proxies", None)
    if proxies is not None:
        raise ValueError(
            f"proxies={proxies!r} is not supported by huggingface_hub's snapshot_download; set the "
            "HTTP(S)_PROXY environment variables instead."
        )
    from . import __version__ as library_version  # the package imports this module: import at call time

    token, revision = kwargs.get("token"), kwargs.get("revision")
    download = functools.partial(
        huggingface_hub.snapshot_download,
        repo_id,
        cache_dir=kwargs.get("cache_dir"),
        force_download=bool(kwargs.get("force_download", False)),
        token=token,
        revision=revision,
        library_name="pfgm_diffusers",
        library_version=library_version,
    )
    if kwargs.get("local_files_only", False):
        return download(local_files_only=True, allow_patterns=PIPELINE_FILES + [MODEL_CARD])
    try:
        listing = huggingface_hub.list_repo_files(repo_id, revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
        raise
    except Exception as error:  # offline, unreachable, Hub down: a cached snapshot loads (snapshot_download's rule)
        try:
            return download(local_files_only=True, allow_patterns=PIPELINE_FILES + [MODEL_CARD])
        except Exception:
            raise error from None
    selected = pipeline_files(listing, kwargs.get("variant"), kwargs.get("use_safetensors"))
    return download(allow_patterns=[glob.escape(name) for name in selected])  # exact names, not fnmatch patterns


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
        `cls.download`, so this pipeline replaces it. Only the files `from_pretrained` reads are fetched
        (`hub.pipeline_files`: the configurations, the model card and the UNet weights of one variant in one
        format); no code file is ever downloaded or run.

        Args:
            pretrained_model_name (`str`):
                The repository id, e.g. `"user/pfgmpp-cifar10"`.
            variant (`str`, *optional*), use_safetensors (`bool`, *optional*):
                Which weights: as in `from_pretrained` (safetensors preferred, `.bin` only where the variant has
                no safetensors).
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
            save_model_card(folder, repo_id, condition_shape=self.condition_shape)
            return upload_pipeline(repo_id, folder, token, commit_message, create_pr)


def save_model_card(folder: str, repo_id: str, training: str | None = None, condition_shape=None) -> None:
    """Write the model card (`README.md`, `library_name: pfgm_diffusers`, a loading example, and the `training`
    section in markdown if given) into `folder`."""
    card = model_card_text(repo_id, training, condition_shape)
    huggingface_hub.ModelCard(card).save(os.path.join(folder, MODEL_CARD))


def model_card_text(repo_id: str, training: str | None = None, condition_shape: tuple | None = None) -> str:
    """The model card; `condition_shape` (C_cond, H, W) for an image-conditional model, whose card is tagged
    image-to-image and whose example passes a condition (a call without one is refused)."""
    if condition_shape is None:
        kind, condition, call = "unconditional-image-generation", "", "batch_size=16, num_inference_steps=18"
    else:
        kind, call = "image-to-image", "conditioning_image=condition, num_inference_steps=18"
        condition = (
            f"# image-conditional: one {condition_shape[1]}x{condition_shape[2]} condition per image, (B, "
            f"{condition_shape[0]}, H, W) in [0, 1] or PIL images, e.g. your measurements\n"
            f"condition = torch.rand(16, {', '.join(map(str, condition_shape))})\n"
        )
    card = _MODEL_CARD.format(repo_id=repo_id, kind=kind, condition=condition, call=call)
    return card + ("" if training is None else "\n" + training.rstrip() + "\n")


_MODEL_CARD = """---
library_name: pfgm_diffusers
tags:
- pfgm
- pfgm++
- {kind}
- diffusers
---

# {repo_id}

A Poisson flow generative model (PFGM / PFGM++) saved by `pfgm_diffusers`'s `PFGMPipeline`, a diffusers
pipeline. Load it with that library installed; it is on no package index, so install it from a checkout of its
repository (`pip install -e .` in the checkout). No remote code is needed or run:

```python
import torch
import pfgm_diffusers  # the pipeline and its scheduler, registered with diffusers

pipe = pfgm_diffusers.PFGMPipeline.from_pretrained("{repo_id}")
{condition}images = pipe({call}, generator=torch.Generator().manual_seed(0)).images
```
"""
