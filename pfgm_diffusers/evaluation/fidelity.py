"""FID and KID through torch-fidelity (the `[eval]` extra), behind the `update(images)` / `compute()` interface.

`FidelityMetrics` collects generated and reference images as 8-bit levels and measures FID and KID (Bińkowski et
al., ICLR 2018) with torch-fidelity's Inception-v3 (the TensorFlow FID network); `fidelity_metrics(generated,
reference)` does it for two arrays at once. The Inception weights come from a local file (`weights_path`, the
`PFGM_INCEPTION_WEIGHTS` environment variable, torch's hub cache) or are downloaded once. Nothing is read from the
environment, imported from torch-fidelity or downloaded when this module is imported: only when a metric is built.
Offline without the weights (`HF_HUB_OFFLINE=1`), building it stops with a one-line `FidelityUnavailableError` (a
`RuntimeError`) naming the fix, and never touches the network.
"""

import os

import numpy as np
import torch

INCEPTION_WEIGHTS_ENV = "PFGM_INCEPTION_WEIGHTS"


def eval_install_line() -> str:
    """How to install the `[eval]` extra without replacing the installed torch: pfgm_diffusers is on no package
    index, so from a checkout; torchvision pinned to the release built for this torch (torch 2.m pairs with
    torchvision 0.(m+15)), since torch-fidelity's unpinned torchvision would pull the newest torch (a CUDA build)."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    torchvision = f"torchvision==0.{minor + 15}.*" if major == 2 else "torchvision==<the release for your torch>"
    return (
        f'in a checkout of pfgm_diffusers: pip install -e ".[eval]" "{torchvision}" (keeps torch {torch.__version__})'
    )


class FidelityUnavailableError(RuntimeError):
    """FID/KID cannot run here: torch-fidelity or its Inception weights are missing. The message is one line that
    names the fix."""


def import_torch_fidelity():
    """torch-fidelity, or a one-line `FidelityUnavailableError` naming the install command."""
    try:
        import torch_fidelity
    except ImportError as error:
        raise FidelityUnavailableError(
            f"FID/KID need torch-fidelity ({error}): {eval_install_line()}, or evaluate digits models offline with "
            "--reference digits"
        ) from None
    return torch_fidelity


def inception_weights_path(weights_path: str | None = None) -> str:
    """
    The local file of torch-fidelity's Inception-v3 weights, downloaded into torch's hub cache if needed and allowed.

    Looks at `weights_path`, then the `PFGM_INCEPTION_WEIGHTS` environment variable, then torch's hub cache (where
    torch-fidelity itself keeps the file). When none has it and `HF_HUB_OFFLINE` is set, raises a one-line
    `FidelityUnavailableError` without touching the network; otherwise downloads it once from torch-fidelity's own
    URL (the same error if that fails). torch-fidelity unpickles this file: use its official file or one you made.
    """
    torch_fidelity = import_torch_fidelity()
    if weights_path is None:
        weights_path = os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise ValueError(f"the Inception weights file {weights_path!r} does not exist")
        return weights_path
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if os.path.isfile(cached):
        return cached
    fix = (
        f"run once online (they are saved to {cached}), or download {URL_INCEPTION_V3} to that path, or pass "
        f"--inception_weights (weights_path) / set {INCEPTION_WEIGHTS_ENV} to the file"
    )
    weights = f"FID/KID need torch-fidelity {torch_fidelity.__version__}'s Inception weights"
    if _hub_offline():
        raise FidelityUnavailableError(f"{weights}, not found locally and HF_HUB_OFFLINE is set: {fix}")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, cached, progress=False)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise FidelityUnavailableError(f"{weights}, whose download failed ({error}): {fix}") from None
    return cached


def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 images (N, H, W, C), C = 1 or 3, served as torch-fidelity wants them: uint8 (3, H, W) tensors."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        pixels = torch.from_numpy(self.images[index]).permute(2, 0, 1)  # (C, H, W)
        return pixels.expand(3, -1, -1).contiguous()  # grayscale repeated to RGB


def fidelity_metrics(
    generated: np.ndarray,
    reference: np.ndarray,
    weights_path: str | None = None,
    kid_subset_size: int = 1000,
    device="cpu",
    batch_size: int = 64,
) -> dict:
    """
    FID and KID (Bińkowski et al., ICLR 2018) of `generated` against `reference` through torch-fidelity's
    Inception-v3 (the TensorFlow FID network), images resized to 299x299 by torch-fidelity.

    Args:
        generated (`np.ndarray` of shape `(N, H, W, C)`, `uint8`): 8-bit images (as saved to PNG, i.e.
            `np.round(pipeline_output * 255)`), C = 1 (repeated to RGB) or 3.
        reference (`np.ndarray` of shape `(M, H', W', C')`, `uint8`): the real images, likewise.
        weights_path (`str`, *optional*): a local Inception weights file (see `inception_weights_path`).
        kid_subset_size (`int`, defaults to 1000): KID's subset size, capped at min(N, M).
        device (`str`, defaults to `"cpu"`): `"cuda..."` runs the Inception network on the GPU.
        batch_size (`int`, defaults to 64): Inception batch size.

    Returns:
        `dict`: `fid`, `kid_mean`, `kid_std`, `num_reference`, `kid_subset_size`.
    """
    for name, images in (("generated", generated), ("reference", reference)):
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"{name} must be a uint8 array (N, H, W, 1 or 3), got {type(images).__name__} "
                f"{getattr(images, 'dtype', '')}"
            )
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{name} must have shape (N, H, W, 1 or 3), got {images.shape}")
        if len(images) < 2:
            raise ValueError(f"FID/KID need at least 2 {name} images, got {len(images)}")
    torch_fidelity = import_torch_fidelity()
    weights_path = inception_weights_path(weights_path)
    subset_size = min(kid_subset_size, len(generated), len(reference))
    results = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(generated),
        input2=_UInt8Images(reference),
        fid=True,
        kid=True,
        kid_subset_size=subset_size,
        feature_extractor_weights_path=weights_path,
        cuda=str(device).startswith("cuda"),
        batch_size=batch_size,
        cache=False,
        verbose=False,
    )
    return {
        "fid": float(results[torch_fidelity.KEY_METRIC_FID]),
        "kid_mean": float(results[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(results[torch_fidelity.KEY_METRIC_KID_STD]),
        "num_reference": len(reference),
        "kid_subset_size": subset_size,
    }


def to_uint8(images, name: str = "images") -> np.ndarray:
    """Images `(N, H, W, C)` as 8-bit levels: uint8 as they are, floats in [0, 1] (a pipeline's `output_type="np"`)
    rounded from `images * 255`, as the pipeline's PIL output and saved PNGs have them."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or floats in [0, 1], got dtype {images.dtype}")
    if not np.all(np.isfinite(images)) or images.min(initial=0) < 0 or images.max(initial=0) > 1:
        raise ValueError(f"{name} must lie in [0, 1] (a pipeline's output), got values outside it or NaN")
    return np.round(images * 255).astype(np.uint8)


class FidelityMetrics:
    """
    FID and KID of generated images against reference images through torch-fidelity, fed batch by batch.

    Building it checks what can fail before any sampling: torch-fidelity is installed and the Inception weights are
    at hand (see `inception_weights_path`; a one-line `FidelityUnavailableError` otherwise). Both sides are kept as
    8-bit images until `compute`.

    Args:
        weights_path (`str`, *optional*): a local Inception weights file.
        kid_subset_size (`int`, defaults to 1000): KID's subset size, capped at the number of images.
        device (`str`, defaults to `"cpu"`): `"cuda..."` runs the Inception network on the GPU.
        batch_size (`int`, defaults to 64): Inception batch size.

    Example:
        >>> metric = FidelityMetrics()
        >>> metric.update_reference(real_images)  # (M, H, W, C) uint8, or floats in [0, 1]
        >>> for batch in batches:  # pipeline outputs, output_type="np": (B, H, W, C) in [0, 1]
        ...     metric.update(batch)
        >>> metric.compute()["fid"]
    """

    frechet_features = "inception_v3"

    def __init__(self, weights_path: str | None = None, kid_subset_size: int = 1000, device="cpu", batch_size=64):
        self.weights_path = inception_weights_path(weights_path)  # imports torch-fidelity: fails here, not later
        self.kid_subset_size = kid_subset_size
        self.device = device
        self.batch_size = batch_size
        self.generated, self.reference = [], []

    def check_pipeline(self, pipe) -> None:
        """Refuse, before any sampling, a pipeline whose images the Inception network cannot take (not 1 or 3
        channels)."""
        channels = pipe.unet.config.in_channels
        if channels not in (1, 3):
            raise ValueError(f"FID/KID measure 1- or 3-channel images, this model makes {channels} channels")

    def update_reference(self, images) -> "FidelityMetrics":
        """Add real images `(M, H, W, C)`, uint8 or floats in [0, 1]; returns `self`."""
        self.reference.append(to_uint8(images, "reference images"))
        return self

    def update(self, images) -> "FidelityMetrics":
        """Add generated images `(B, H, W, C)`, a pipeline's `output_type="np"` in [0, 1] (or uint8); returns
        `self`."""
        self.generated.append(to_uint8(images, "generated images"))
        return self

    def compute(self) -> dict:
        """
        FID and KID of the images added so far.

        Returns:
            `dict`: `frechet_distance` (= `fid`), `fid`, `kid_mean`, `kid_std`, `num_images`, `num_reference`,
            `kid_subset_size`.
        """
        for name, images in (("generated", self.generated), ("reference", self.reference)):
            if not images:
                raise ValueError(f"FID/KID need at least 2 {name} images, got 0")
        generated = np.concatenate(self.generated)
        results = fidelity_metrics(
            generated,
            np.concatenate(self.reference),
            self.weights_path,
            self.kid_subset_size,
            self.device,
            self.batch_size,
        )
        return {"frechet_distance": results["fid"], "num_images": len(generated), **results}

    @staticmethod
    def report(results: dict) -> str:
        """The figures of `compute` as a line of text."""
        return (
            f"FID {results['fid']:.3f}, KID {results['kid_mean']:.5f} +- {results['kid_std']:.5f} "
            f"of {results['num_images']} images against {results['num_reference']} reference images "
            "(Inception-v3 features; lower is better)"
        )
