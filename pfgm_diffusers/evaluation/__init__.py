"""Sample-quality metrics, one module per job:

- `distances`: pure functions of arrays: `frechet_distance` (the formula behind FID), `FeatureStatistics` (streaming
  mean and covariance), `sliced_wasserstein`.
- `digits`: the offline metric for models of the embedded digits with its shipped classifier: `DigitsMetrics`,
  `digits_metrics`, `check_digits_pipeline`, the classifier and the fixed split.
- `fidelity`: FID and KID through torch-fidelity (the `[eval]` extra): `FidelityMetrics`, `fidelity_metrics`. It
  reads no environment and downloads nothing when imported.

`DigitsMetrics` and `FidelityMetrics` share one interface, `SampleMetric`: `check_pipeline(pipe)` before sampling,
`update(images)` per batch of pipeline outputs, `compute()` (a dict with `frechet_distance`), `report(results)`;
`scripts/evaluate.py` drives either through it. Every public name stays importable from `pfgm_diffusers.evaluation`.

    >>> from pfgm_diffusers.evaluation import digits_metrics
    >>> images = pipe(batch_size=500, output_type="np").images  # (500, 8, 8, 1) in [0, 1]
    >>> digits_metrics(images)["frechet_distance"]
"""

from typing import Protocol

from ..data import DIGITS_HELDOUT_FRACTION, DIGITS_SPLIT_SEED, digits_split  # the split belongs to the data
from .digits import (
    CONFIDENCE_THRESHOLD,
    COVERAGE_FRACTION,
    DIGIT_CLASS_NAMES,
    DIGIT_CLASSIFIER_PATH,
    DIGITS_RESOLUTION,
    NUM_DIGIT_CLASSES,
    DigitClassifier,
    DigitsMetrics,
    check_digits_pipeline,
    class_coverage,
    class_kl,
    digits_metrics,
    load_digit_classifier,
    load_digits_images,
    to_classifier_input,
)
from .distances import FeatureStatistics, frechet_distance, sliced_wasserstein
from .fidelity import (
    INCEPTION_WEIGHTS_ENV,
    FidelityMetrics,
    FidelityUnavailableError,
    eval_install_line,
    fidelity_metrics,
    import_torch_fidelity,
    inception_weights_path,
    to_uint8,
)


class SampleMetric(Protocol):
    """What `scripts/evaluate.py` asks of a metric of generated images (`DigitsMetrics`, `FidelityMetrics`)."""

    # The features its Fréchet distance is measured in, recorded with the results ("digit_classifier", ...).
    frechet_features: str

    def check_pipeline(self, pipe) -> None:
        """Raise a `ValueError` before any sampling if the pipeline's images cannot be measured."""

    def update(self, images) -> "SampleMetric":
        """Add a batch of generated images, a pipeline's `output_type="np"` output `(B, H, W, C)` in [0, 1]."""

    def compute(self) -> dict:
        """The figures of the images added so far; `frechet_distance` among them."""

    def report(self, results: dict) -> str:
        """`compute`'s figures as text for a console."""


__all__ = [
    "CONFIDENCE_THRESHOLD",
    "COVERAGE_FRACTION",
    "DIGIT_CLASSIFIER_PATH",
    "DIGIT_CLASS_NAMES",
    "DIGITS_HELDOUT_FRACTION",
    "DIGITS_RESOLUTION",
    "DIGITS_SPLIT_SEED",
    "INCEPTION_WEIGHTS_ENV",
    "NUM_DIGIT_CLASSES",
    "DigitClassifier",
    "DigitsMetrics",
    "FeatureStatistics",
    "FidelityMetrics",
    "FidelityUnavailableError",
    "SampleMetric",
    "check_digits_pipeline",
    "class_coverage",
    "class_kl",
    "digits_metrics",
    "digits_split",
    "eval_install_line",
    "fidelity_metrics",
    "frechet_distance",
    "import_torch_fidelity",
    "inception_weights_path",
    "load_digit_classifier",
    "load_digits_images",
    "sliced_wasserstein",
    "to_classifier_input",
    "to_uint8",
]
