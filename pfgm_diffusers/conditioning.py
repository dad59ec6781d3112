"""Image conditioning by channel concatenation (conditional PFGM++ as in PPFM, Hein et al.; SR3, Saharia et al.).

The network sees `cat([scaled sample, condition], dim=1)`: `in_channels = C + C_cond`. Only the sample is perturbed
and preconditioned; the condition enters as it is at every noise level. `with_condition` wraps a network so that the
losses and the samplers, which call `network(model_input, timestep, class_labels=...)`, need no change.
"""

from collections.abc import Callable

import torch

from .image_processing import preprocess
from .validation import check_number, is_integer

__all__ = [
    "ConditionedUNet",
    "check_conditioning",
    "concat_condition",
    "prepare_conditioning_image",
    "with_condition",
]


def check_conditioning(in_channels: int, conditioning_channels, conditioning_dropout_prob) -> None:
    """A pipeline's condition settings: C_cond in [1, in_channels - 1] or None; the dropout share in [0, 1], only with
    a condition."""
    if conditioning_channels is not None and (
        not is_integer(conditioning_channels) or not 1 <= conditioning_channels < in_channels
    ):
        raise ValueError(
            f"conditioning_channels must be None or an integer in [1, {in_channels - 1}] (the UNet's in_channels "
            f"{in_channels} = C + C_cond with C >= 1), got {conditioning_channels!r}."
        )
    if conditioning_dropout_prob is None:
        return
    if conditioning_channels is None:
        raise ValueError("conditioning_dropout_prob is set but the model has no condition (conditioning_channels).")
    check_number("conditioning_dropout_prob", conditioning_dropout_prob)
    if not 0 <= conditioning_dropout_prob <= 1:
        raise ValueError(f"conditioning_dropout_prob must be in [0, 1], got {conditioning_dropout_prob!r}.")


def prepare_conditioning_image(conditioning_image, channels, size, batch_size=None, do_normalize=True):
    """The condition of an image-conditional model (`channels` = C_cond, None for a model without one) as a float32
    (B, C_cond, H, W) tensor in model space, `size` = (H, W); None without a condition. Missing, unexpected or
    mis-shaped conditions are a ValueError; `batch_size` None accepts any batch."""
    if channels is None:
        if conditioning_image is not None:
            raise ValueError(
                "A conditioning_image was given but this model takes no condition (conditioning_channels=None): "
                "it was trained without one. For image-to-image with any model, pass `image=` and `strength=`."
            )
        return None
    if conditioning_image is None:
        raise ValueError(
            f"This model is image-conditional (conditioning_channels={channels}): pass `conditioning_image`, "
            f"{channels}-channel images of {tuple(size)} pixels."
        )
    condition = preprocess(conditioning_image, channels, do_normalize, name="conditioning_image")
    if tuple(condition.shape[2:]) != tuple(size):
        raise ValueError(
            f"conditioning_image must be {size[0]}x{size[1]} pixels (the UNet's sample_size), got "
            f"{tuple(condition.shape[2:])}."
        )
    if batch_size is not None and condition.shape[0] != batch_size:
        raise ValueError(f"Got {condition.shape[0]} conditioning images for a batch of {batch_size}.")
    return condition


def concat_condition(model_input: torch.Tensor, conditioning_image: torch.Tensor | None) -> torch.Tensor:
    """`(B, C, H, W)` and `(B, C_cond, H, W)` -> `(B, C + C_cond, H, W)` in the input's dtype; the input alone for
    None."""
    if conditioning_image is None:
        return model_input
    if conditioning_image.shape[0] != model_input.shape[0] or conditioning_image.shape[2:] != model_input.shape[2:]:
        raise ValueError(
            f"The condition {tuple(conditioning_image.shape)} must match the sample {tuple(model_input.shape)} in "
            "batch and size."
        )
    return torch.cat([model_input, conditioning_image.to(model_input.dtype)], dim=1)


def with_condition(network: Callable, conditioning_image: torch.Tensor | None) -> Callable:
    """`network(model_input, timestep, class_labels=None, **kwargs)` with `conditioning_image` concatenated to every
    input; `network` itself for None."""
    if conditioning_image is None:
        return network

    def conditioned(model_input, timestep, *args, **kwargs):
        return network(concat_condition(model_input, conditioning_image), timestep, *args, **kwargs)

    return conditioned


class ConditionedUNet:
    """A UNet that takes its image condition as a keyword, `unet(sample, timestep, conditioning_image=y, **kwargs)`,
    concatenated to the input: so the condition travels with the other conditions (class labels) through a denoiser
    and a batched guidance call. `dtype` and `config` are the UNet's."""

    def __init__(self, unet):
        self.unet = unet

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def config(self):
        return self.unet.config

    def __call__(self, sample, timestep, *args, conditioning_image=None, **kwargs):
        return self.unet(concat_condition(sample, conditioning_image), timestep, *args, **kwargs)
