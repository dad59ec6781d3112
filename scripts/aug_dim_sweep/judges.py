"""The sweep's quality figures, each with a standard error over the images.

A judge is called on images (n, C, H, W) in [0, 1] and returns a dict of figures: for each of its `metrics` the value
and `<key>_se`, and the same figure for as many real images under `heldout_<key>` (the ceiling at that sample size).
`metrics` maps each key to (label, format, higher_is_better); the first key is the one that ranks the D values.
"""

import numpy as np
import torch

from pfgm_diffusers.evaluation import (
    CONFIDENCE_THRESHOLD,
    DigitsMetrics,
    FeatureStatistics,
    class_coverage,
    digits_split,
    frechet_distance,
    load_digits_images,
    sliced_wasserstein,
    to_classifier_input,
)


def jackknife_se(statistic, n, num_blocks=20) -> float:
    """The delete-one-block jackknife standard error of `statistic(kept indices)` over `n` items; each leave-out
    keeps at least 2 items."""
    blocks = np.array_split(np.arange(n), max(2, min(num_blocks, n // 3)))
    leave_out = np.array([statistic(np.setdiff1d(np.arange(n), block)) for block in blocks])
    k = len(blocks)
    return float(np.sqrt((k - 1) / k * ((leave_out - leave_out.mean()) ** 2).sum()))


class DigitsJudge:
    """
    The offline digits metrics of `pfgm_diffusers.evaluation.DigitsMetrics`, plus standard errors over the images:
    a delete-one-block jackknife (20 blocks) for the Fréchet distance, and a bootstrap for the confident share and
    the class coverage. The bootstrap does not suit the Fréchet distance: its duplicated images bias every resample
    upward. Measured on a pilot model (D = 128, 8000 steps, 1000 samples): eight independent sample sets had a
    Fréchet distance of 2.2 +- 0.78 (std); the jackknife gave 0.61-1.07 on four of them, the bootstrap 0.78-1.37
    around resample means twice the point values.
    """

    metrics = {
        "frechet_distance": ("Fréchet distance", "{:.2f}", False),
        "confident_share": ("confident share", "{:.3f}", True),
        "class_coverage": ("class coverage", "{:.2f}", True),
    }

    def __init__(self, num_bootstrap: int = 100, seed: int = 0):
        self.num_bootstrap = num_bootstrap
        self.seed = seed
        self.classifier = DigitsMetrics().model
        train_images, _ = load_digits_images(digits_split()[0])
        with torch.no_grad():
            self.train_statistics = FeatureStatistics().update(self.classifier.features(train_images))

    def frechet_distance(self, features) -> float:
        statistics, train = FeatureStatistics().update(features), self.train_statistics
        return frechet_distance(statistics.mean, statistics.covariance, train.mean, train.covariance)

    @torch.no_grad()
    def __call__(self, images) -> dict:
        metric = DigitsMetrics()
        metric.update(images)
        computed = metric.compute()
        keys = [*self.metrics, *[f"heldout_{key}" for key in self.metrics], "num_images", "heldout_num_images"]
        result = {key: computed[key] for key in keys}
        features = self.classifier.features(to_classifier_input(torch.as_tensor(images))).double().numpy()
        probabilities = torch.softmax(self.classifier.head(torch.from_numpy(features).float()), 1).numpy()
        n = len(features)
        result["frechet_distance_se"] = jackknife_se(lambda kept: self.frechet_distance(features[kept]), n)
        rng = np.random.default_rng(self.seed)
        draws = {"confident_share": [], "class_coverage": []}
        for _ in range(self.num_bootstrap):
            chosen = probabilities[rng.integers(0, n, n)]
            draws["confident_share"].append(float((chosen.max(1) >= CONFIDENCE_THRESHOLD).mean()))
            draws["class_coverage"].append(class_coverage(np.bincount(chosen.argmax(1), minlength=10)))
        for key, values in draws.items():
            result[f"{key}_se"] = float(np.std(values, ddof=1))
        return result


class SlicedWassersteinJudge:
    """For any dataset, with no extra dependency: the sliced 2-Wasserstein distance in pixel space (256 fixed
    directions, `pfgm_diffusers.evaluation.sliced_wasserstein`) between the generated images and as many real
    training images (drawn once, without replacement where the data allow), with a 20-block jackknife standard
    error over the image pairs. `heldout_sliced_wasserstein` is the distance between two such draws of real images:
    the floor at that sample size."""

    metrics = {"sliced_wasserstein": ("sliced W2 (pixels)", "{:.4f}", False)}

    def __init__(self, real_images: torch.Tensor, num_projections: int = 256, seed: int = 0):
        if len(real_images) < 2:
            raise ValueError(f"the sliced Wasserstein judge needs at least 2 real images, got {len(real_images)}")
        self.real = real_images.reshape(len(real_images), -1).double()  # (M, C H W) in [0, 1]
        self.num_projections = num_projections
        self.seed = seed

    def _draw(self, n, generator):
        if n <= len(self.real):
            return self.real[torch.randperm(len(self.real), generator=generator)[:n]]
        return self.real[torch.randint(len(self.real), (n,), generator=generator)]

    def _distance(self, x, y):
        return sliced_wasserstein(x, y, self.num_projections, torch.Generator().manual_seed(self.seed))

    def __call__(self, images) -> dict:
        x = torch.as_tensor(images).reshape(len(images), -1).double()
        n, generator = len(x), torch.Generator().manual_seed(self.seed)
        real_a, real_b = self._draw(n, generator), self._draw(n, generator)
        return {
            "num_images": n,
            "sliced_wasserstein": self._distance(x, real_a),
            "sliced_wasserstein_se": jackknife_se(lambda kept: self._distance(x[kept], real_a[kept]), n),
            "heldout_num_images": n,
            "heldout_sliced_wasserstein": self._distance(real_b, real_a),
        }


def real_images(data: dict, resolution: int, max_images: int = 5000) -> torch.Tensor:
    """Up to `max_images` training images of `data` (the trainer's data flags; {}: the embedded digits) as the
    trainer sees them at `resolution` (shorter side resized, centre crop), (n, C, H, W) in [0, 1]."""
    from pfgm_diffusers.data import ImageTransform, load_digits_dataset, load_hub_dataset, load_image_folder

    if data.get("train_data_dir") is not None:
        loaded = load_image_folder(data["train_data_dir"], with_labels=False)
    elif data.get("dataset_name") is not None:
        loaded = load_hub_dataset(
            data["dataset_name"],
            data.get("dataset_config_name"),
            image_column=data.get("image_column"),
            label_column=None,
        )
    else:
        loaded = load_digits_dataset(with_labels=False)
    transform = ImageTransform(resolution, loaded.num_channels, center_crop=True)
    rows = loaded.dataset.select(range(min(max_images, len(loaded.dataset))))
    return torch.stack([transform(row["image"]) for row in rows]) / 2 + 0.5


JUDGES = ("digits", "sliced_wasserstein")


def make_judge(settings: dict):
    """The judge named by `settings["evaluation"]["metric"]` (one of `JUDGES`; default "digits")."""
    evaluation = settings["evaluation"]
    metric = evaluation.get("metric", "digits")
    if metric == "digits":
        return DigitsJudge(evaluation["num_bootstrap"])
    if metric == "sliced_wasserstein":
        return SlicedWassersteinJudge(real_images(settings.get("data", {}), settings["training"]["resolution"]))
    raise ValueError(f"unknown metric {metric!r}; choose one of {JUDGES}")


def make_judge_metrics(settings: dict) -> dict:
    """The `metrics` of the judge `make_judge(settings)` would build, without loading anything."""
    metric = settings["evaluation"].get("metric", "digits")
    if metric not in JUDGES:
        raise ValueError(f"unknown metric {metric!r}; choose one of {JUDGES}")
    return DigitsJudge.metrics if metric == "digits" else SlicedWassersteinJudge.metrics
