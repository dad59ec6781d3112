"""Full-reference image-quality metrics in torch, per image: PSNR and SSIM (for image-to-image restoration).

- `psnr(images, references)`: 10 log10(data_range^2 / MSE), per image.
- `ssim(images, references)`: the structural similarity of Wang et al. (IEEE TIP 2004), eq. 13, with
  scikit-image's defaults (`skimage.metrics.structural_similarity`): a 7x7 uniform window, K1 = 0.01, K2 = 0.03,
  sample (N - 1) covariances, the mean over the positions where the window fits and over the channels. The window
  fits images of at least 7x7 pixels (the 8x8 digits have 2x2 such positions).

Both take `(B, C, H, W)` tensors (or `(B, H, W, C)` arrays, as pipelines return with output_type "np") in [0, 1] by
default (`data_range=1`).
"""

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]

SSIM_WIN_SIZE = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_pair(images, references, name):
    """Both as float64 (B, C, H, W) tensors of one shape; a numpy array is read as (B, H, W, C)."""
    pair = []
    for value in (images, references):
        if isinstance(value, np.ndarray):
            if value.ndim != 4:
                raise ValueError(f"{name}: numpy images must be (B, H, W, C), got shape {value.shape}")
            value = torch.from_numpy(np.ascontiguousarray(value)).permute(0, 3, 1, 2)
        if not isinstance(value, torch.Tensor) or value.ndim != 4:
            raise ValueError(f"{name}: expected (B, C, H, W) tensors, got {getattr(value, 'shape', type(value))}")
        pair.append(value.detach().to(device="cpu", dtype=torch.float64))
    if pair[0].shape != pair[1].shape:
        raise ValueError(
            f"{name}: images {tuple(pair[0].shape)} and references {tuple(pair[1].shape)} differ in shape"
        )
    return pair


def psnr(images, references, data_range: float = 1.0) -> torch.Tensor:
    r"""
    Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE) in dB (infinite for identical images).

    Args:
        images, references (`torch.Tensor` `(B, C, H, W)` or `np.ndarray` `(B, H, W, C)`): of one shape.
        data_range (`float`, defaults to 1.0): the range of the pixel values (1 for [0, 1], 2 for [-1, 1]).

    Returns:
        `torch.Tensor` of shape `(B,)`, float64.
    """
    x, y = _as_pair(images, references, "psnr")
    mse = (x - y).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(images, references, data_range: float = 1.0, win_size: int = SSIM_WIN_SIZE) -> torch.Tensor:
    r"""
    Structural similarity per image (Wang et al. 2004, eq. 13) with scikit-image's default settings: local means,
    variances and covariance over a `win_size` x `win_size` uniform window (sample covariances, N - 1),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = `data_range`, averaged over every position where the window fits and
    over the channels.

    Args:
        images, references (`torch.Tensor` `(B, C, H, W)` or `np.ndarray` `(B, H, W, C)`): of one shape, H and W at
            least `win_size`.
        data_range (`float`, defaults to 1.0): the range of the pixel values.
        win_size (`int`, defaults to 7): an odd window width.

    Returns:
        `torch.Tensor` of shape `(B,)`, float64, 1 for identical images.
    """
    x, y = _as_pair(images, references, "ssim")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size}x{win_size} pixels, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    window = torch.full((channels, 1, win_size, win_size), 1.0 / win_size**2, dtype=torch.float64)

    def local_mean(value):  # (B, C, H', W'): the window's mean at every position where it fits
        return F.conv2d(value, window, groups=channels)

    n = win_size**2
    mu_x, mu_y = local_mean(x), local_mean(y)
    unbiased = n / (n - 1)  # sample covariances, as scikit-image's default use_sample_covariance=True
    var_x = unbiased * (local_mean(x * x) - mu_x * mu_x)
    var_y = unbiased * (local_mean(y * y) - mu_y * mu_y)
    cov_xy = unbiased * (local_mean(x * y) - mu_x * mu_y)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
