"""Images in and out of the pipeline: [0, 1] pictures <-> the model's [-1, 1] tensors, and a grid for viewing.

The pipeline's outputs are in [0, 1] (`output_type` "pil", "np" (B, H, W, C) or "pt" (B, C, H, W)); `invert` and
`log_likelihood` take the same three forms back.
"""

import math

import numpy as np
import PIL.Image
import torch
from diffusers.utils.pil_utils import numpy_to_pil

OUTPUT_TYPES = ("pil", "np", "pt")


def preprocess(images, num_channels: int, do_normalize: bool = True, name: str = "images") -> torch.Tensor:
    """Images (PIL, np (B, H, W, C) or pt (B, C, H, W), in [0, 1]) -> float32 (B, C, H, W) in model space [-1, 1].

    With `do_normalize=False`, `images` is a tensor already in model space. Non-finite values and, when normalising,
    values outside [0, 1] raise a `ValueError` (one host sync per call) that calls them `name` (the argument).
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple, np.ndarray, torch.Tensor)) and len(images) == 0:
        raise ValueError(f"{name} is empty: pass at least one image.")
    if isinstance(images, list) and all(isinstance(image, PIL.Image.Image) for image in images):
        images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        if images.ndim == 3:
            images = images[..., None]  # grayscale: (B, H, W) -> (B, H, W, 1)
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"{name} as a numpy array must have shape (B, H, W, C), got {images.shape}.")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be PIL images, a numpy array or a torch tensor, got {type(images)}.")
    if images.ndim != 4 or images.shape[1] != num_channels:
        raise ValueError(f"{name} must have shape (B, {num_channels}, H, W), got {tuple(images.shape)}.")
    images = images.float()
    low, high = images.min().item(), images.max().item()  # NaN propagates to both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values (min {low}, max {high}).")
    if do_normalize:
        if low < 0 or high > 1:
            raise ValueError(
                f"{name} must lie in [0, 1] (as output_type 'pt' / 'np' return them), got values in "
                f"[{low:.3g}, {high:.3g}]; pass do_normalize=False for tensors already in the model's [-1, 1] space."
            )
        images = images * 2 - 1
    return images


def postprocess(sample: torch.Tensor, output_type: str = "pil"):
    """Model-space samples (B, C, H, W) -> images in [0, 1]: PIL images, (B, H, W, C) array or (B, C, H, W) tensor."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    image = (sample / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return numpy_to_pil(image) if output_type == "pil" else image


def image_grid(images: list[PIL.Image.Image], nrow: int | None = None, padding: int = 2) -> PIL.Image.Image:
    """
    Tile equally sized images row by row, `nrow` per row (about sqrt(len(images)) by default), on a white background.

    Args:
        images (`list[PIL.Image.Image]`): the images, e.g. a pipeline's `.images`.
        nrow (`int`, *optional*): images per row.
        padding (`int`, defaults to 2): pixels between and around the tiles.

    Returns:
        `PIL.Image.Image`: the grid (RGB, or L when every image is grayscale).
    """
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    ncol = math.ceil(len(images) / nrow)
    width, height = images[0].size
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    size = (nrow * (width + padding) + padding, ncol * (height + padding) + padding)
    grid = PIL.Image.new(mode, size, color="white")
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        grid.paste(image.convert(mode), (padding + col * (width + padding), padding + row * (height + padding)))
    return grid
