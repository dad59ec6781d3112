"""Sample-quality metrics: the Fréchet distance, streaming feature statistics, an offline digits metric, FID/KID.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: the squared 2-Wasserstein distance between two Gaussians (the
  formula behind FID, Heusel et al., NeurIPS 2017), in float64, stable for singular covariances.
- `FeatureStatistics`: mean and covariance of a stream of feature batches without holding the features.
- `DigitsMetrics`: an offline metric for models of the embedded digits (`pfgm_diffusers/data/digits.npz`). A
  ~10k-parameter CNN shipped with the package (`data/digit_classifier.safetensors`, trained by
  `scripts/train_digit_classifier.py` on a fixed 80 % split) gives, for generated images in [0, 1]:
  the Fréchet distance of its penultimate features to the real training split, the share of images it classifies
  with max softmax >= `CONFIDENCE_THRESHOLD` (0.9), the class coverage (the share of the 10 classes that receive at
  least half of their uniform share of the predictions) and the KL divergence of the predicted-class histogram from
  uniform. Every figure comes with the same figure for as many of the 359 held-out real digits (the other 20 %) as
  there are images: what real digits score at that sample size. (The trainer learns from all 1797 digits, held-out
  ones included, so a model that memorises them can match or pass these figures: they show quality, not novelty.)
- `fidelity_metrics(generated, reference)`: FID and KID through torch-fidelity's Inception-v3 (`pip install
  pfgm_diffusers[eval]`). Needs the Inception weights: downloaded once when online, or a local file given by
  `weights_path` / the `PFGM_INCEPTION_WEIGHTS` environment variable / torch's hub cache. Offline without them
  (`HF_HUB_OFFLINE=1`), it stops with a one-line `FidelityUnavailableError` (a `RuntimeError`) naming the fix and
  never touches the network.

    >>> from pfgm_diffusers.evaluation import digits_metrics
    >>> images = pipe(batch_size=500, output_type="np").images  # (500, 16, 16, 1) in [0, 1]
    >>> digits_metrics(images)["frechet_distance"]
"""

import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .data import DIGITS_PATH, ImageTransform

DIGIT_CLASSIFIER_PATH = os.path.join(os.path.dirname(__file__), "data", "digit_classifier.safetensors")
# The classifier's input: the digits upscaled bilinearly from 8x8 to 16x16, one channel in [0, 1] (other sizes, the
# trainer's default 8x8 included, are resized to it).
DIGITS_RESOLUTION = 16
NUM_DIGIT_CLASSES = 10
# The class names the trainer saves with a class-conditional model of the embedded digits (data.load_digits_dataset).
DIGIT_CLASS_NAMES = [str(digit) for digit in range(NUM_DIGIT_CLASSES)]
# The fixed split of the 1797 digits: a permutation by np.random.default_rng(DIGITS_SPLIT_SEED), the first 20 % held
# out. The classifier is trained on the rest, which is also the real side of the Fréchet distance.
DIGITS_SPLIT_SEED = 0
DIGITS_HELDOUT_FRACTION = 0.2
# An image counts as a confident digit when the classifier's largest softmax probability is at least this.
CONFIDENCE_THRESHOLD = 0.9
# A class is covered when it receives at least this fraction of its uniform share (n / 10) of the predictions.
COVERAGE_FRACTION = 0.5

INCEPTION_WEIGHTS_ENV = "PFGM_INCEPTION_WEIGHTS"
_EVAL_EXTRA = "pip install pfgm_diffusers[eval]"
# Negative eigenvalues of a PSD matrix beyond this fraction of its largest are not round-off but an error.
_PSD_TOLERANCE = 1e-9


# ---------------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""
    The Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), squared as in FID:
    `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`.

    The trace term is computed in float64 as `tr((S1^(1/2) sigma2 S1^(1/2))^(1/2))` with `S1^(1/2)` from an
    eigendecomposition: that matrix is symmetric positive semi-definite and has the eigenvalues of sigma1 sigma2, so
    its square root is real even where the non-symmetric product's `sqrtm` goes complex, and singular covariances
    (fewer samples than features) need no added epsilon.

    Args:
        mu1 (`np.ndarray` or `torch.Tensor` of shape `(d,)`): the first mean.
        sigma1 (`np.ndarray` or `torch.Tensor` of shape `(d, d)`): the first covariance, symmetric PSD.
        mu2, sigma2: the second Gaussian, likewise.

    Returns:
        `float`: the squared distance (>= 0 up to float64 round-off).
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length d, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {sigma.shape}")
    sqrt_sigma1 = _psd_sqrt(sigma1, "sigma1")
    _psd_eigh(sigma2, "sigma2", vectors=False)  # checks that sigma2 is a covariance too
    product = sqrt_sigma1 @ _symmetric(sigma2, "sigma2") @ sqrt_sigma1  # symmetric PSD, eigenvalues of S1 S2
    eigenvalues, _ = _psd_eigh(product, "sigma1^(1/2) sigma2 sigma1^(1/2)", vectors=False)
    trace_sqrt = np.sqrt(eigenvalues).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _as_float64(value, name):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _symmetric(matrix, name):
    """`matrix` made exactly symmetric, after checking that it is symmetric up to round-off."""
    scale = max(np.abs(matrix).max(), np.finfo(np.float64).tiny)
    asymmetry = np.abs(matrix - matrix.T).max() / scale
    if asymmetry > 1e-6:
        raise ValueError(f"{name} must be a symmetric matrix, its relative asymmetry is {asymmetry:.3g}")
    return (matrix + matrix.T) / 2


def _psd_eigh(matrix, name, vectors=True):
    """Eigenvalues (and eigenvectors) of a symmetric PSD matrix. Eigenvalues below d * eps * max|lambda| (the rank
    rule of `numpy.linalg.matrix_rank`) are round-off and become 0: a singular matrix's null space holds +-1e-16
    noise, whose square roots (1e-8 each, d of them) would otherwise bias the trace. Clearly negative ones are an
    error."""
    matrix = _symmetric(matrix, name)
    eigenvalues, eigenvectors = np.linalg.eigh(matrix) if vectors else (np.linalg.eigvalsh(matrix), None)
    scale = np.abs(eigenvalues).max(initial=0.0)
    if eigenvalues.min(initial=0.0) < -_PSD_TOLERANCE * scale:
        raise ValueError(
            f"{name} must be positive semi-definite (a covariance), its smallest eigenvalue is {eigenvalues.min():.3g}"
        )
    eigenvalues[eigenvalues < len(eigenvalues) * np.finfo(np.float64).eps * scale] = 0.0
    return eigenvalues, eigenvectors


def _psd_sqrt(matrix, name):
    eigenvalues, eigenvectors = _psd_eigh(matrix, name)
    return (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T


# ---------------------------------------------------------------------- streaming statistics


class FeatureStatistics:
    """
    Running mean and covariance of feature vectors fed in batches, in float64 (Chan, Golub and LeVeque's pairwise
    update: each batch's centred scatter matrix is merged with the running one, no raw sums that cancel).

    Args:
        num_features (`int`, *optional*): the feature dimension; taken from the first batch if not given.

    Example:
        >>> stats = FeatureStatistics()
        >>> for batch in batches:  # each (B, F)
        ...     stats.update(batch)
        >>> frechet_distance(stats.mean, stats.covariance, other.mean, other.covariance)
    """

    def __init__(self, num_features: int | None = None):
        self.num_features = num_features
        self.count = 0
        self._mean = None if num_features is None else np.zeros(num_features)
        self._scatter = None if num_features is None else np.zeros((num_features, num_features))

    def update(self, features) -> "FeatureStatistics":
        """Add a batch `features` of shape `(B, F)` (numpy or torch); returns `self`."""
        features = _as_float64(features, "features")
        if features.ndim != 2:
            raise ValueError(f"features must have shape (batch, num_features), got {features.shape}")
        if self.num_features is None:
            self.__init__(features.shape[1])
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"features must have {self.num_features} columns like the earlier ones, got {features.shape}"
            )
        if features.shape[0] == 0:
            return self
        batch_mean = features.mean(axis=0)
        centred = features - batch_mean
        self._merge(features.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Add the samples summarised by `other` (e.g. from another process); returns `self`."""
        if other.count == 0:
            return self
        if self.num_features is None:
            self.__init__(other.num_features)
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge statistics of {other.num_features} features into {self.num_features}")
        self._merge(other.count, other._mean, other._scatter)
        return self

    def _merge(self, count, mean, scatter):
        total = self.count + count
        delta = mean - self._mean
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * count / total)
        self._mean = self._mean + delta * (count / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        """The mean `(F,)`, float64."""
        if self.count < 1:
            raise ValueError("no features were added: the mean needs at least 1 sample")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased covariance `(F, F)` (divided by count - 1, as `np.cov`), float64."""
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 samples, got {self.count}")
        return self._scatter / (self.count - 1)


# ---------------------------------------------------------------------- the digits classifier


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


def digits_split(seed: int = DIGITS_SPLIT_SEED, heldout_fraction: float = DIGITS_HELDOUT_FRACTION):
    """(train_indices, heldout_indices) into the 1797 embedded digits: a seeded permutation whose first
    `round(heldout_fraction * 1797)` entries are held out. Both keep the permutation's order, so the first k held-out
    digits are a uniformly drawn subset of k."""
    with np.load(DIGITS_PATH) as npz:
        count = len(npz["labels"])
    permutation = np.random.default_rng(seed).permutation(count)
    num_heldout = round(heldout_fraction * count)
    return permutation[num_heldout:], permutation[:num_heldout]


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
            "frechet_distance": _frechet_between(self.statistics, train_statistics),
            "confident_share": self.num_confident / self.statistics.count,
            "class_coverage": class_coverage(self.class_counts),
            "class_kl": class_kl(self.class_counts),
            "class_counts": self.class_counts.tolist(),
            "heldout_num_images": len(features),
            "heldout_frechet_distance": _frechet_between(FeatureStatistics().update(features), train_statistics),
            "heldout_confident_share": float((probabilities.max(1).values >= CONFIDENCE_THRESHOLD).double().mean()),
            "heldout_class_coverage": class_coverage(heldout_counts),
            "heldout_class_kl": class_kl(heldout_counts),
            "heldout_class_counts": heldout_counts.tolist(),
            "heldout_accuracy": float((probabilities.argmax(1) == labels).double().mean()),
            "confidence_threshold": CONFIDENCE_THRESHOLD,
            "coverage_fraction": COVERAGE_FRACTION,
        }
        return results


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
    if config.in_channels != 1:
        raise ValueError(f"{metric} 1-channel models, this one has {config.in_channels} channels")
    size = config.sample_size
    if not isinstance(size, int) and size[0] != size[1]:
        raise ValueError(f"{metric} square images, this model makes {size[0]}x{size[1]}")
    num_classes = config.num_class_embeds
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


def _frechet_between(a: FeatureStatistics, b: FeatureStatistics) -> float:
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


# ---------------------------------------------------------------------- FID and KID through torch-fidelity


class FidelityUnavailableError(RuntimeError):
    """FID/KID cannot run here: torch-fidelity or its Inception weights are missing. The message is one line that
    names the fix."""


def import_torch_fidelity():
    """torch-fidelity, or a one-line `FidelityUnavailableError` naming the install command."""
    try:
        import torch_fidelity
    except ImportError as error:
        raise FidelityUnavailableError(
            f"FID/KID need torch-fidelity ({error}): {_EVAL_EXTRA}, or evaluate digits models offline with "
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


# ---------------------------------------------------------------------- sliced Wasserstein distance


def sliced_wasserstein(x, y, num_projections: int = 256, generator: torch.Generator | None = None) -> float:
    r"""
    The sliced 2-Wasserstein distance between two equally sized point clouds (Rabin et al. 2011; Bonneel et al.
    2015): `sqrt(mean_k W2(<theta_k, x>, <theta_k, y>)^2)` over `num_projections` directions theta_k drawn uniformly
    on the unit sphere, where the 1-D W2 between two sets of n points is the root mean square difference of their
    sorted values.

    Args:
        x (`np.ndarray` or `torch.Tensor` of shape `(n, d)`): the first point cloud.
        y (`np.ndarray` or `torch.Tensor` of shape `(n, d)`): the second, with as many points.
        num_projections (`int`, defaults to 256): the number of random directions.
        generator (`torch.Generator`, *optional*): draws the directions, `torch.randn((num_projections, d),
            generator=generator, dtype=torch.float64)` normalised to unit length.

    Returns:
        `float`: the distance, in the units of the points (for a shift by delta, `|delta| / sqrt(d)` as
        `num_projections` grows).
    """
    x, y = torch.as_tensor(_as_float64(x, "x")), torch.as_tensor(_as_float64(y, "y"))
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"x and y must be point clouds of one shape (n, d), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) < 1 or num_projections < 1:
        raise ValueError(f"need at least one point and one projection, got {len(x)} and {num_projections}")
    directions = torch.randn((num_projections, x.shape[1]), generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)  # (K, d)
    x_sorted = (x @ directions.T).sort(dim=0).values  # (n, K)
    y_sorted = (y @ directions.T).sort(dim=0).values
    return float((x_sorted - y_sorted).pow(2).mean().sqrt())
