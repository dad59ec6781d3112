"""Distances between samples, pure functions of arrays: the Fréchet distance with its streaming statistics, and the
sliced Wasserstein distance.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: the squared 2-Wasserstein distance between two Gaussians (the
  formula behind FID, Heusel et al., NeurIPS 2017), in float64, stable for singular covariances.
- `FeatureStatistics`: mean and covariance of a stream of feature batches without holding the features.
- `sliced_wasserstein(x, y)`: the sliced 2-Wasserstein distance between two point clouds (the toy experiments).
"""

import numpy as np
import torch

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

    def frechet_distance(self, other: "FeatureStatistics") -> float:
        """`frechet_distance` between the Gaussians of these statistics and of `other` (each needs >= 2 samples)."""
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)


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
