"""Restoration on the embedded digits: degrade held-out digits, restore them with a pipeline, score the result.

`evaluate_restoration` is the conditional evaluation of `scripts/evaluate.py --paired_task ...` and of the
image-to-image evidence: the held-out digits (`evaluation.digits_split`, which the shipped classifier never saw) at
the model's resolution, the measurement y = A(x) + noise of a `paired.Degradation` (image i's noise seeded `seed + i`),
a restoration from y as the condition (`conditioning_image`, for models trained on pairs), as the start
(`image` with `strength`, PPFM's "hijack" / SDEdit, for any model) or both, and `image_metrics.RestorationMetrics`
of the restorations beside those of y itself.
"""

import numpy as np
import torch
from PIL import Image

from .data import DIGITS_PATH, ImageTransform
from .image_metrics import RestorationMetrics, digit_classifier
from .paired import Degradation

__all__ = ["degraded_digits", "evaluate_restoration"]


def degraded_digits(degradation: Degradation, num_images: int, resolution: int, seed: int = 0):
    """The first `num_images` held-out digits at `resolution` and their measurements, in model space: clean
    (n, 1, R, R), degraded (n, 1, R, R), labels (n,). Image i's measurement noise comes from a generator seeded
    `seed + i`, so it does not depend on how the images are batched."""
    from .evaluation import digits_split

    _, heldout = digits_split()
    if not 1 <= num_images <= len(heldout):
        raise ValueError(f"num_images must lie in [1, {len(heldout)}] (the held-out digits), got {num_images}")
    with np.load(DIGITS_PATH) as npz:
        images, labels = npz["images"][heldout[:num_images]], npz["labels"][heldout[:num_images]]
    transform = ImageTransform(resolution, num_channels=1, center_crop=True)
    clean = torch.stack([transform(Image.fromarray(image, mode="L")) for image in images])  # (n, 1, R, R)
    degraded = torch.cat([degradation(x[None], torch.Generator().manual_seed(seed + i)) for i, x in enumerate(clean)])
    return clean, degraded, torch.from_numpy(labels.astype(np.int64))


def evaluate_restoration(
    pipe,
    degradation: Degradation,
    num_images: int = 200,
    strength: float | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 18,
    solver: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    classify=None,
) -> dict:
    r"""
    Restore degraded held-out digits with `pipe` and score the restorations beside the degraded inputs.

    Args:
        pipe (`PFGMPipeline`): a 1-channel model of the digits. An image-conditional one gets the measurement as its
            `conditioning_image`; with `strength`, any model starts from the measurement noised to the level that
            `strength` selects. A class-conditional one is given the true labels (the result then knows the class).
        degradation (`paired.Degradation`): the measurement.
        num_images (`int`): how many held-out digits (at most 359).
        strength (`float`, *optional*): start from the measurement (`pipe(image=..., strength=...)`).
        guidance_scale (`float`): guidance on the condition (models trained with conditioning dropout).
        num_inference_steps, solver: the sampler's grid and solver.
        batch_size (`int`): images per pipeline call; image i's sampling noise is seeded `seed + i`.
        seed (`int`): the measurement noise and the sampling noise.
        classify (`Callable`, *optional*): `(B, 1, H, W)` in [0, 1] -> labels; the shipped digit classifier by default.

    Returns:
        `dict`: `RestorationMetrics.compute()` (psnr, ssim, accuracy and their `degraded_` versions, with `_sem`
        standard errors) plus `nfe` (network evaluations per image) and `labels_given`.
    """
    conditional = pipe.config.get("conditioning_channels") is not None
    if not conditional and strength is None:
        raise ValueError(
            "This model takes no condition: it can restore only by starting from the measurement; give a strength."
        )
    if pipe.num_channels != 1:
        raise ValueError(f"the digits are 1-channel images; this model makes {pipe.num_channels}-channel ones")
    resolution = pipe.unet.config.sample_size
    clean, degraded, labels = degraded_digits(degradation, num_images, resolution, seed)
    metrics = RestorationMetrics(classify=digit_classifier() if classify is None else classify)
    class_conditional = pipe.unet.config.num_class_embeds is not None
    nfe = []
    for start in range(0, num_images, batch_size):
        batch = slice(start, min(start + batch_size, num_images))
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch.start, batch.stop)]
        y = degraded[batch]
        kwargs = dict(conditioning_image=y) if conditional else {}
        if strength is not None:
            kwargs.update(image=y, strength=strength)
        if guidance_scale != 1:
            kwargs["guidance_scale"] = guidance_scale
        if class_conditional:
            kwargs["class_labels"] = labels[batch]
        output = pipe(
            batch_size=len(generators),
            generator=generators,
            num_inference_steps=num_inference_steps,
            solver=solver,
            output_type="pt",
            do_normalize=False,
            **kwargs,
        )
        nfe.append(output.nfe)
        degraded_images = ((y + 1) / 2).clamp(0, 1)  # the measurement as an image shows it
        metrics.update(output.images.cpu(), (clean[batch] + 1) / 2, degraded_images, labels[batch])
    return {**metrics.compute(), "nfe": float(np.mean(nfe)), "labels_given": class_conditional}
