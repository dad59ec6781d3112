"""Guidance: one combination of a conditional and an unconditional denoiser, shared by every kind of condition.

Classifier-free guidance (Ho & Salimans, 2022) written on the denoiser, as EDM-style samplers use it:
D(x, sigma) = D_null(x, sigma) + w (D_cond(x, sigma) - D_null(x, sigma)). The condition may be class labels (a null
class), an image (a zero image), or both; the model learns the null branch from conditioning dropout in training
(`drop_conditions`). Both branches run as one batched network call; `w = 1` is the conditional denoiser exactly and
`w = 0` the unconditional one exactly (one branch, no arithmetic on it).
"""

from collections.abc import Callable, Mapping

import torch

from .validation import check_number

__all__ = ["check_guidance", "combine_guidance", "drop_conditions", "guided_denoiser", "null_conditions"]


def combine_guidance(d_null: torch.Tensor, d_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """D = D_null + w (D_cond - D_null): the one guidance formula (Ho & Salimans 2022, on the denoised estimate)."""
    return d_null + guidance_scale * (d_cond - d_null)


def check_guidance(
    guidance_scale: float, class_conditional: bool, null_class: int | None, image_conditional: bool, dropout
) -> None:
    """Refuse a `guidance_scale` a model cannot apply: not a finite number, or other than 1 for a model with no
    condition it learnt to do without (a null class from `--class_dropout_prob`, a zero image from
    `--conditioning_dropout_prob` > 0, `dropout`). The null branch drops every such condition; the others stay."""
    check_number("guidance_scale", guidance_scale)
    if guidance_scale == 1 or (class_conditional and null_class is not None) or (image_conditional and dropout):
        return
    if not class_conditional and not image_conditional:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a conditional model, but the UNet has no class embedding "
            "(unet.config.num_class_embeds is None) and no condition was given: pass guidance_scale=1."
        )
    if not class_conditional:
        raise ValueError(
            f"guidance_scale={guidance_scale}: this model was trained without conditioning dropout "
            "(conditioning_dropout_prob is not > 0; train_pfgm.py --conditioning_dropout_prob, e.g. 0.1), so it "
            "has no zero-condition branch: pass guidance_scale=1."
        )
    raise ValueError(
        f"guidance_scale={guidance_scale} needs a model trained with a null class (train_pfgm.py "
        "--class_dropout_prob, e.g. 0.1), but this pipeline has none (null_class_label is None): pass "
        "guidance_scale=1."
    )


def null_conditions(conditions: Mapping[str, torch.Tensor], null_class: int | None, dropout) -> dict:
    """The null branch's conditions: every condition the model learnt to do without is dropped (class labels -> the
    null class `null_class`; a conditioning image -> zeros when trained with conditioning `dropout` > 0); the others
    stay."""
    null = dict(conditions)
    if "class_labels" in conditions and null_class is not None:
        null["class_labels"] = torch.full_like(conditions["class_labels"], null_class)
    if "conditioning_image" in conditions and dropout:
        null["conditioning_image"] = torch.zeros_like(conditions["conditioning_image"])  # conditioning dropout
    return null


def guided_denoiser(
    denoise: Callable[..., torch.Tensor],
    conditions: Mapping[str, torch.Tensor],
    null_conditions: Mapping[str, torch.Tensor],
    guidance_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]:
    r"""
    A denoiser `(x, sigma) -> D` that applies classifier-free guidance to `denoise(x, sigma, **conditions)`.

    For `guidance_scale` w other than 0 and 1, `x` (and a per-image `sigma`) is repeated and the conditions are
    concatenated with their null versions, so that both branches cost one network call on a doubled batch. `w = 1`
    calls `denoise` with `conditions` only and `w = 0` with `null_conditions` only: exactly the conditional and the
    unconditional model.

    Args:
        denoise (`Callable`):
            `denoise(x, sigma, **conditions)`, batched: every condition has the batch of `x` as its first dimension.
        conditions (`Mapping[str, torch.Tensor]`):
            The conditions by keyword, e.g. `{"class_labels": labels}` or `{"conditioning_image": y}`, each `(B, ...)`.
        null_conditions (`Mapping[str, torch.Tensor]`):
            Their null versions (the same keys and shapes), as the model saw them under conditioning dropout.
        guidance_scale (`float`):
            w; 1 is no guidance, 0 the unconditional model, > 1 stronger conditioning.

    Returns:
        `Callable`: `(x, sigma) -> D(x, sigma)` with the shape of `x`.
    """
    check_number("guidance_scale", guidance_scale)
    if set(conditions) != set(null_conditions):
        raise ValueError(
            f"The conditions {sorted(conditions)} and the null conditions {sorted(null_conditions)} must have the "
            "same keys."
        )
    for key, value in conditions.items():
        if tuple(value.shape) != tuple(null_conditions[key].shape):
            raise ValueError(
                f"The null {key!r} has shape {tuple(null_conditions[key].shape)}, the condition {tuple(value.shape)}."
            )
    if guidance_scale == 1:
        return lambda x, sigma: denoise(x, sigma, **conditions)
    if guidance_scale == 0:
        return lambda x, sigma: denoise(x, sigma, **null_conditions)
    both = {key: torch.cat([value, null_conditions[key]]) for key, value in conditions.items()}  # (2B, ...)

    def guided(x, sigma):
        if isinstance(sigma, torch.Tensor) and sigma.ndim > 0 and sigma.shape[0] == x.shape[0]:
            sigma = torch.cat([sigma, sigma])  # a per-image noise level follows its image
        d_cond, d_null = denoise(torch.cat([x, x]), sigma, **both).chunk(2)
        return combine_guidance(d_null, d_cond, guidance_scale)

    return guided


def drop_conditions(
    conditions: Mapping[str, torch.Tensor],
    null_conditions: Mapping[str, torch.Tensor],
    drop_prob: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    r"""
    Conditioning dropout for training a guidable model: each image's conditions are replaced, all together, by their
    null versions with probability `drop_prob` (one draw per image from `generator`).

    Args:
        conditions (`Mapping[str, torch.Tensor]`): the batch's conditions, each `(B, ...)`.
        null_conditions (`Mapping[str, torch.Tensor]`): their null versions, broadcastable to them.
        drop_prob (`float`): in [0, 1].
        generator (`torch.Generator`, *optional*): draws which images lose their condition.

    Returns:
        `dict[str, torch.Tensor]`: the conditions with the dropped images' entries replaced.
    """
    check_number("drop_prob", drop_prob)
    if not 0 <= drop_prob <= 1:
        raise ValueError(f"`drop_prob` must be a number in [0, 1], got {drop_prob!r}.")
    if drop_prob == 0 or not conditions:
        return dict(conditions)
    batch_size = next(iter(conditions.values())).shape[0]
    device = next(iter(conditions.values())).device
    drop = torch.rand(batch_size, generator=generator, device="cpu" if generator is None else generator.device)
    drop = drop.to(device) < drop_prob  # (B,)
    dropped = {}
    for key, value in conditions.items():
        mask = drop.reshape(-1, *([1] * (value.ndim - 1)))
        dropped[key] = torch.where(mask, null_conditions[key].to(value.dtype).expand_as(value), value)
    return dropped
