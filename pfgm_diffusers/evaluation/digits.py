"""The offline digits metric: a small classifier shipped with the package judges generated images of the embedded
digits (`pfgm_diffusers/data/digits.npz`).

A ~10k-parameter CNN (`data/digit_classifier.safetensors`, trained by `scripts/train_digit_classifier.py` on a fixed
80 % split) gives, for generated images in [0, 1]: the Fréchet distance of its penultimate features to the real
training split, the share of images it classifies with max softmax >= `CONFIDENCE_THRESHOLD` (0.9), the class
coverage (the share of the 10 classes that receive at least half of their uniform share of the predictions) and the
KL divergence of the predicted-class histogram from uniform. Every figure comes with the same figure for as many of
the 359 held-out real digits (the other 20 %) as there are images: what real digits score at that sample size. (The
trainer learns from all 1797 digits, held-out ones included, unless it is given `--digits_split train`; a model that
memorises them can match or pass these figures: they show quality, not novelty.)

    >>> from pfgm_diffusers.evaluation import digits_metrics
    >>> images = pipe(batch_size=500, output_type="np").images  # (500, 8, 8, 1) in [0, 1]
    >>> digits_metrics(images)["frechet_distance"]
"""

import functools
import math
import os
import textwrap

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DIGITS_PATH, ImageTransform, digits_split
from .distances import FeatureStatistics

DIGIT_CLASSIFIER_PATH = os.path.join(os.path.dirname(DIGITS_PATH), "digit_classifier.safetensors")
# The classifier's input: the digits upscaled bilinearly from 8x8 to 16x16, one channel in [0, 1] (other sizes, the
# trainer's default 8x8 included, are resized to it).
DIGITS_RESOLUTION = 16
NUM_DIGIT_CLASSES = 10
# The class names the trainer saves with a class-conditional model of the embedded digits (data.load_digits_dataset).
DIGIT_CLASS_NAMES = [str(digit) for digit in range(NUM_DIGIT_CLASSES)]
# An image counts as a confident digit when the classifier's largest softmax probability is at least this.
CONFIDENCE_THRESHOLD = 0.9
# A class is covered when it receives at least this fraction of its uniform share (n / 10) of the predictions.
COVERAGE_FRACTION = 0.5


class DigitClassifier(torch.nn.Module):
    """A small CNN for 16x16 grayscale digits in [0, 1]: two 3x3 conv + max-pool stages, a `num_features` ReLU layer
    (the penultimate features of the Fréchet distance) and a linear head over the 10 classes."""

    def __init__(self, width: int = 8, num_features: int = 32, num_classes: int = NUM_DIGIT_CLASSES):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = torch.nn.Linear(2 * width * (DIGITS_RESOLUTION // 4) ** 2, num_features)
        self.head = torch.nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [0, 1] -> the penultimate features (B, num_features)."""
        x = images * 2 - 1  # the trainer's [-1, 1] scale
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, 4, 4)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [0, 1] -> logits (B, 10)."""
        return self.head(self.features(images))


def load_digit_classifier(path: str = DIGIT_CLASSIFIER_PATH, device="cpu") -> DigitClassifier:
    """The shipped classifier (a safetensors file: tensors only, nothing unpickled), in eval mode."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"no digit classifier at {path!r}; train one with scripts/train_digit_classifier.py")
    state_dict = load_file(path)
    model = DigitClassifier(width=state_dict["conv1.weight"].shape[0], num_features=state_dict["fc.weight"].shape[0])
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def load_digits_images(indices=None):
    """The embedded digits as the trainer sees them at its default resolution, mapped to [0, 1]:
    images (N, 1, 16, 16) float32 and labels (N,) int64."""
    from PIL import Image

    with np.load(DIGITS_PATH) as npz:
        images, labels = npz["images"], npz["labels"]  # (1797, 8, 8) uint8, (1797,)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    transform = ImageTransform(DIGITS_RESOLUTION, num_channels=1, center_crop=True)
    pixels = torch.stack([transform(Image.fromarray(image, mode="L")) for image in images])  # (N, 1, 16, 16)
    return (pixels + 1) / 2, torch.from_numpy(labels.astype(np.int64))


def to_classifier_input(images) -> torch.Tensor:
    """
    Generated images as the classifier's input (B, 1, 16, 16) float32 in [0, 1].

    Accepts a pipeline's output: a `(B, H, W, 1)` array (`output_type="np"`), a `(B, 1, H, W)` tensor
    (`output_type="pt"`) or a list of grayscale PIL images, all in [0, 1], square, at any resolution; other sizes
    are resized bilinearly (antialiased when shrinking) to 16x16.
    """
    if isinstance(images, (list, tuple)):
        modes = {getattr(image, "mode", type(image).__name__) for image in images}
        if modes != {"L"}:
            raise ValueError(f"a list of images must hold grayscale PIL images (mode 'L'), got {sorted(modes)}")
        images = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])[..., None]
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an array of images must have shape (B, H, W, C), got {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(
            f"images must be a (B, H, W, C) array, a (B, C, H, W) tensor or PIL images, got {images!r:.80}"
        )
    if images.shape[1] != 1:
        raise ValueError(f"the digits classifier takes 1-channel images, got {images.shape[1]} channels")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"the digits classifier takes square images, got {images.shape[2]}x{images.shape[3]}")
    images = images.float()
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"images must lie in [0, 1] (a pipeline's output), got values in [{images.min():.3g}, {images.max():.3g}]"
        )
    if images.shape[-1] != DIGITS_RESOLUTION:
        size = (DIGITS_RESOLUTION, DIGITS_RESOLUTION)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return images


@functools.lru_cache(maxsize=2)
def _real_digits_summary(path):
    """Penultimate features, probabilities and labels of the real train and held-out digits under one classifier."""
    model = load_digit_classifier(path)
    summary = {}
    for name, indices in zip(("train", "heldout"), digits_split(), strict=True):
        images, labels = load_digits_images(indices)
        with torch.no_grad():
            features = model.features(images)
            probabilities = torch.softmax(model.head(features), dim=1)
        summary[name] = (features, probabilities, labels)
    return summary


class DigitsMetrics:
    """
    The offline digits metrics, fed batch by batch. See the module docstring for the definitions.

    Args:
        classifier_path (`str`, *optional*): a classifier file; defaults to the shipped one.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the classifier runs.

    Example:
        >>> metric = DigitsMetrics()
        >>> for batch in batches:  # pipeline outputs, (B, 16, 16, 1) in [0, 1]
        ...     metric.update(batch)
        >>> metric.compute()["confident_share"]
    """

    frechet_features = "digit_classifier"

    def __init__(self, classifier_path: str = DIGIT_CLASSIFIER_PATH, device="cpu"):
        self.classifier_path = classifier_path
        self.device = device
        self.model = load_digit_classifier(classifier_path, device)
        self.statistics = FeatureStatistics()
        self.class_counts = np.zeros(NUM_DIGIT_CLASSES, dtype=np.int64)
        self.num_confident = 0

    @torch.no_grad()
    def update(self, images) -> "DigitsMetrics":
        """Add a batch of generated images (see `to_classifier_input`); returns `self`."""
        pixels = to_classifier_input(images).to(self.device)
        features = self.model.features(pixels)
        probabilities = torch.softmax(self.model.head(features), dim=1).cpu()
        self.statistics.update(features)
        self.class_counts += np.bincount(probabilities.argmax(1).numpy(), minlength=NUM_DIGIT_CLASSES)
        self.num_confident += int((probabilities.max(1).values >= CONFIDENCE_THRESHOLD).sum())
        return self

    def compute(self) -> dict:
        """
        The figures of the images added so far, each beside the same figure for as many held-out real digits (all
        359 when more images were added: the Fréchet distance of a finite sample is biased upward, more so the
        smaller the sample, so compare figures at equal sample sizes).

        Returns:
            `dict`: `frechet_distance` (penultimate features vs the real training split; needs >= 2 images),
            `confident_share`, `class_coverage`, `class_kl` (nats), `class_counts`, `num_images`; the same with a
            `heldout_` prefix, `heldout_accuracy` (of those digits), and the definitions' constants.
        """
        if self.statistics.count < 2:
            raise ValueError(f"the digits metrics need at least 2 images, got {self.statistics.count}")
        real = _real_digits_summary(self.classifier_path)
        train_statistics = FeatureStatistics().update(real["train"][0])
        # The ceiling at the same sample size where the held-out digits allow it: the Fréchet distance and the
        # coverage of a finite sample both depend on its size.
        features, probabilities, labels = (value[: self.statistics.count] for value in real["heldout"])
        heldout_counts = np.bincount(probabilities.argmax(1).numpy(), minlength=NUM_DIGIT_CLASSES)
        results = {
            "num_images": self.statistics.count,
            "frechet_distance": self.statistics.frechet_distance(train_statistics),
            "confident_share": self.num_confident / self.statistics.count,
            "class_coverage": class_coverage(self.class_counts),
            "class_kl": class_kl(self.class_counts),
            "class_counts": self.class_counts.tolist(),
            "heldout_num_images": len(features),
            "heldout_frechet_distance": FeatureStatistics().update(features).frechet_distance(train_statistics),
            "heldout_confident_share": float((probabilities.max(1).values >= CONFIDENCE_THRESHOLD).double().mean()),
            "heldout_class_coverage": class_coverage(heldout_counts),
            "heldout_class_kl": class_kl(heldout_counts),
            "heldout_class_counts": heldout_counts.tolist(),
            "heldout_accuracy": float((probabilities.argmax(1) == labels).double().mean()),
            "train_num_images": train_statistics.count,
            "confidence_threshold": CONFIDENCE_THRESHOLD,
            "coverage_fraction": COVERAGE_FRACTION,
        }
        return results

    def check_pipeline(self, pipe) -> None:
        """`check_digits_pipeline`: refuse, before any sampling, a model whose images these metrics cannot judge."""
        check_digits_pipeline(pipe)

    @staticmethod
    def report(results: dict) -> str:
        """The figures of `compute` as a table beside the held-out real digits', with what "real" means there."""
        lines = [f"{'':24s}{'generated':>12s}{'held-out real':>15s}"]
        for key, label in (
            ("frechet_distance", "Fréchet distance"),
            ("confident_share", f"confident (p >= {results['confidence_threshold']})"),
            ("class_coverage", "class coverage"),
            ("class_kl", "class KL (nats)"),
        ):
            lines.append(f"{label:24s}{results[key]:12.4f}{results['heldout_' + key]:15.4f}")
        heldout, generated, train = results["heldout_num_images"], results["num_images"], results["train_num_images"]
        fewer = f" ({heldout} against {generated})" if heldout < generated else ""
        notes = [
            f"held-out real: {heldout} real digits kept out of the classifier's training (its accuracy on them "
            f"{results['heldout_accuracy']:.4f}), as many as the {generated} generated images where there are enough.",
            f"Both Fréchet distances are to the classifier's {train} real training digits. The held-out one can be "
            f"the larger: the distance of a finite sample is biased upward, more so the fewer its images{fewer}, and "
            "a model of the embedded digits learns from all 1797, that training split included. Compare generated "
            "figures with each other; the held-out column shows what real digits score, not a bound.",
        ]
        lines += [textwrap.fill(note, width=100) for note in notes]
        return "\n".join(lines)


def check_digits_pipeline(pipe) -> None:
    """
    Refuse, before any sampling, a pipeline whose images the digits metrics cannot judge: images that are not
    1-channel and square, or a class-conditional model whose classes are not the ten digits (a class count other
    than 10, or saved class names other than the trainer's `"0"` ... `"9"`).

    What cannot be checked: an unconditional 1-channel model trained on other data (or a 10-class model saved without
    class names) looks like a digits model; its figures then say only how digit-like its images are. Any square
    resolution is accepted (the trainer may learn the digits at another size; images are resized to 16x16).
    """
    config, metric = pipe.unet.config, "the digits metrics (--reference digits) measure"
    channels, *size = pipe.image_shape  # a latent model's images are its VAE's
    if channels != 1:
        raise ValueError(f"{metric} 1-channel models, this one has {channels} channels")
    if size[0] != size[1]:
        raise ValueError(f"{metric} square images, this model makes {size[0]}x{size[1]}")
    num_classes = getattr(pipe, "num_classes", config.num_class_embeds)  # without a null class (guidance)
    class_names = getattr(pipe.config, "class_names", None)
    instead = "use --reference with its own data (FID/KID)"
    if num_classes is not None and num_classes != NUM_DIGIT_CLASSES:
        named = "" if class_names is None else f" {list(class_names)}"
        raise ValueError(
            f"{metric} models of the ten digits, this class-conditional model has {num_classes} classes{named}: "
            f"{instead}"
        )
    if class_names is not None and list(class_names) != DIGIT_CLASS_NAMES:
        raise ValueError(
            f"{metric} models of the ten digits {DIGIT_CLASS_NAMES}, this model's classes are {list(class_names)}: "
            f"{instead}"
        )


def digits_metrics(images, classifier_path: str = DIGIT_CLASSIFIER_PATH, device="cpu", batch_size: int = 512):
    """`DigitsMetrics` of all `images` at once (see `to_classifier_input` for what they may be); returns its dict."""
    metric = DigitsMetrics(classifier_path, device)
    for start in range(0, len(images), batch_size):
        metric.update(images[start : start + batch_size])
    return metric.compute()


def class_coverage(class_counts) -> float:
    """The share of classes whose count is at least `COVERAGE_FRACTION` of the uniform share sum(counts) / K."""
    counts = np.asarray(class_counts, dtype=np.float64)
    return float((counts >= COVERAGE_FRACTION * counts.sum() / counts.size).mean())


def class_kl(class_counts) -> float:
    """KL(p || uniform) in nats of the class histogram p: 0 when uniform, log K when one class takes all."""
    p = np.asarray(class_counts, dtype=np.float64)
    p = p / p.sum()
    nonzero = p[p > 0]
    return float(math.log(p.size) + (nonzero * np.log(nonzero)).sum())
