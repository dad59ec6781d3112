"""Full-reference image-quality metrics in torch, per image: PSNR and SSIM (for image-to-image restoration).

- `psnr(images, references)`: 10 log10(data_range^2 / MSE), per image.
- `ssim(images, references)`: the structural similarity of Wang et al. (IEEE TIP 2004), eq. 13, with
  scikit-image's defaults (`skimage.metrics.structural_similarity`): a 7x7 uniform window, K1 = 0.01, K2 = 0.03,
  sample (N - 1) covariances, the mean over the positions where the window fits and over the channels. The window
  fits images of at least 7x7 pixels (the 8x8 digits have 2x2 such positions).

`RestorationMetrics` accumulates both (and a classifier's label accuracy) over batches, for restored images and
the degraded inputs beside them. All take `(B, C, H, W)` tensors (or `(B, H, W, C)` arrays, as pipelines return
with output_type "np") in [0, 1] by default (`data_range=1`).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RestorationMetrics", "digit_classifier", "psnr", "ssim"]

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


class RestorationMetrics:
    r"""
    Streaming scores of restored images against their clean references (image-to-image evaluation): mean PSNR and
    SSIM with their standard errors, the same for the degraded inputs beside them, and, given a `classify` function
    and labels, the share of restored and of degraded images whose predicted class is the clean image's label.

    Args:
        classify (`Callable`, *optional*):
            `(B, C, H, W)` images in [0, 1] -> `(B,)` predicted labels, e.g. `digit_classifier()` for the digits.
        data_range (`float`, defaults to 1.0): the range of the pixel values.

    Examples:

    ```py
    >>> metrics = RestorationMetrics(classify=digit_classifier())
    >>> metrics.update(restored, clean, degraded=measured, labels=labels)  # (B, 1, H, W) in [0, 1], (B,)
    >>> metrics.compute()["psnr"], metrics.compute()["degraded_psnr"]
    ```
    """

    def __init__(self, classify=None, data_range: float = 1.0):
        self.classify = classify
        self.data_range = data_range
        self.scores = {}  # name -> list of (B,) float64 tensors

    def _add(self, name, values):
        self.scores.setdefault(name, []).append(values.detach().to("cpu", torch.float64))

    def update(self, restored, references, degraded=None, labels=None) -> "RestorationMetrics":
        """Add a batch: `restored`, `references` and `degraded` images in [0, 1] of one shape; `labels` `(B,)`."""
        for prefix, images in (("", restored), ("degraded_", degraded)):
            if images is None:
                continue
            self._add(prefix + "psnr", psnr(images, references, self.data_range))
            self._add(prefix + "ssim", ssim(images, references, self.data_range))
            if labels is not None:
                if self.classify is None:
                    raise ValueError("labels were given but RestorationMetrics has no `classify` function")
                x, _ = _as_pair(images, images, "RestorationMetrics")
                predicted = torch.as_tensor(self.classify(x.float())).cpu()
                self._add(prefix + "accuracy", (predicted == torch.as_tensor(labels).cpu()).double())
        return self

    def compute(self) -> dict:
        """`{name: mean, name + "_sem": standard error, ..., "num_images": n}` for psnr, ssim, accuracy and their
        `degraded_` versions."""
        if not self.scores:
            raise ValueError("RestorationMetrics.compute() before any update()")
        result = {}
        for name, batches in self.scores.items():
            values = torch.cat(batches)
            result[name] = values.mean().item()
            result[name + "_sem"] = (values.std() / values.numel() ** 0.5).item() if values.numel() > 1 else math.nan
        result["num_images"] = torch.cat(self.scores["psnr"]).numel()
        return result


def digit_classifier(device="cpu"):
    """The shipped digits classifier as a `classify` function: `(B, 1, H, W)` images in [0, 1] -> `(B,)` labels."""
    from .evaluation import load_digit_classifier, to_classifier_input

    model = load_digit_classifier(device=device)

    @torch.no_grad()
    def classify(images):
        return model(to_classifier_input(images.to(device))).argmax(1)

    return classify
