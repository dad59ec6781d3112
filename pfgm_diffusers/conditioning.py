"""Image conditioning by channel concatenation (conditional PFGM++ as in PPFM, Hein et al.; SR3, Saharia et al.).

The network sees `cat([scaled sample, condition], dim=1)`: `in_channels = C + C_cond`. Only the sample is perturbed
and preconditioned; the condition enters as it is at every noise level. `with_condition` wraps a network so that the
losses and the samplers, which call `network(model_input, timestep, class_labels=...)`, need no change.
"""

from collections.abc import Callable

import torch

__all__ = ["ConditionedUNet", "concat_condition", "with_condition"]


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
