"""Poisson fields of a set of charges: the PFGM training target (Algorithm 1), the posterior mean of any D (the
ideal denoiser, and the Stable Target Field training target).

Formulas: `docs/math.md` §1 and §3 (PFGM: Xu et al., NeurIPS 2022, eq. 7 and Algorithm 1; PFGM++: Xu et al.,
ICML 2023, Proposition 3.1 and eq. 6; STF: Xu, Tong, Jaakkola, ICLR 2023). All are softmaxes over the charges
of log-distances in the augmented space, so they share one distance computation (`_pull_toward_charges`) that is
fast (a matrix product) and exact where it matters.
"""

import math

import torch

from .validation import check_aug_dim

# Bound on the number of elements of the (pairs, N) float64 block of exact differences built at once.
_CHUNK_ELEMENTS = 1 << 18
# lambda of the probabilistic rounding-error bound of a dot product (see `_expansion_error`).
_ERROR_LAMBDA = 8.0
# Rows where the expansion may misjudge a log-weight by this much take all their weights from exact distances.
_MAX_LOG_WEIGHT_ERROR = 1.0
# Elsewhere, charges that carry at least this share of their row's weight are recomputed exactly (`_heavy_reach`) ...
_HEAVY_WEIGHT = 1e-4
# ... or, where more than this many charges do, those that carry at least this share.
_MAX_HEAVY_CHARGES, _SPREAD_HEAVY_WEIGHT = 32, 1e-2


def _log_weight(dist_sq, nearest, exponent, scale):
    """log w(dist_sq) - log w(nearest) for the PFGM++ kernel w(d^2) = (d^2 + scale)^(-exponent) (math.md §1).

    exponent = (N + D) / 2 and scale = r^2 = sigma^2 D; `exponent=None` is the D -> infinity limit
    w(d^2) = exp(-d^2 / scale), scale = 2 sigma^2. `nearest` and `scale` broadcast against `dist_sq`.
    Relative to the nearest charge, so that z^2 = inf (z > 1e154) still gives what it should: equal weights.
    """
    if exponent is None:
        return torch.addcmul(nearest / scale, dist_sq, -1 / scale)  # -(d^2 - nearest) / scale
    inv = 1 / (nearest + scale)
    # log((d^2 + scale) / (nearest + scale)), with an absolute error of ~1e-16: all that weights need
    return torch.addcmul(1 - nearest * inv, dist_sq, inv).log_().mul_(-exponent)


def _weights(dist_sq, nearest, exponent, scale, negligible):
    """w(dist_sq) / w(nearest), zero below exp(`negligible`) (see `_negligible_log_weight`)."""
    # Zeroing negligible weights keeps float64 denormals out of exp and float32 ones (each costs ~30x on x86) out of
    # the far product.
    return torch.nn.functional.threshold_(_log_weight(dist_sq, nearest, exponent, scale), negligible, -math.inf).exp_()


def _negligible_log_weight(L, dtype):
    """Charges weighing under exp(this) times the nearest one are dropped: all L of them weigh < eps^2 of the row.

    eps is that of `dtype`, the far product's: below its resolution of the row's total weight, squared for margin.
    """
    return math.log(torch.finfo(dtype).eps ** 2 / L)


def _dist_sq_at(nearest, log_gap, exponent, scale):
    """The squared distance whose weight is exp(-log_gap) times that at `nearest` (inverts `_log_weight`), (B,)."""
    if exponent is None:
        growth = scale * log_gap
    else:
        growth = (nearest + scale) * torch.expm1(log_gap / exponent)
    return nearest + torch.where(log_gap > 0, growth, 0.0)  # no inf * 0 where scale overflowed


def _expansion_error(y_sq, x_sq_max, N, dtype):
    """A bound Delta_i on |d~_ij^2 - d_ij^2| over the charges j of row i, (B,) float64.

    d~^2 = |y|^2 + |x|^2 - 2 y.x with y.x (one matrix product) and |x| computed in `dtype` (unit roundoff u = eps / 2)
    and |y|^2 in float64. A computed length-N dot product a.b is off by at most gamma sum_k |a_k b_k| <= gamma |a| |b|:
    gamma = N u if every rounding error had the same sign, and gamma = lambda sqrt(N) u with probability
    >= 1 - 2 N exp(-lambda^2 / 2) for independent rounding errors (Higham & Mary, SIAM J. Sci. Comput. 41, 2019).
    With lambda = 8 (1 - 8e-11 at N = 3072; on the benchmark's inputs gamma <= 7 u and |d~^2 - d^2| <= Delta / 200)
    and X = max_j |x_j|: 2 |y.x error| <= 2 gamma |y| X and |x|^2 is off by <= (gamma + 3 u) X^2, both covered by
    lambda sqrt(N) eps X (|y| + X); |y|^2 and the float64 sum by lambda sqrt(N) eps64 |y|^2.
    """
    eps, x_max = torch.finfo(dtype).eps, x_sq_max.sqrt()
    eps64 = torch.finfo(torch.float64).eps
    return _ERROR_LAMBDA * math.sqrt(N) * (eps * x_max * (y_sq.sqrt() + x_max) + eps64 * y_sq)


def _exact_only(nearest, error, exponent, scale):
    """The rows (B,) where the expansion may misjudge a log-weight by `_MAX_LOG_WEIGHT_ERROR` or more (near charges,
    small z: the weights raise distances to the power (N + D) / 2); they take every weight from an exact distance.

    `nearest` (B,) is the rows' smallest approximate squared distance; the true one lies in nearest -/+ Delta.
    """
    lower, upper = (nearest - error).clamp(min=0), nearest + error
    # the largest error of the row's log-weights is at its nearest charge: log w is convex in d^2
    return -_log_weight(upper, lower, exponent, scale) >= _MAX_LOG_WEIGHT_ERROR


def _exact_reach(nearest, error, exact_only, exponent, scale, negligible):
    """Per row, the largest approximate squared distance of a charge recomputed exactly for being near, (B,).

    Every charge that may be the nearest (d~^2 - Delta <= nearest + Delta): ties of any multiplicity are exact. In
    `exact_only` rows also every charge that may weigh more than the negligible fraction of the nearest one.
    """
    margin = torch.where(exact_only, -negligible, 0.0)
    return _dist_sq_at(nearest + error, margin, exponent, scale) + error


def _heavy_reach(weights, total, nearest, exponent, scale):
    """Per row, the largest approximate squared distance of a charge recomputed exactly for its weight, (F,).

    For rows that take weights from the expansion: every charge that carries `_HEAVY_WEIGHT` of the row's weight, or
    where more than `_MAX_HEAVY_CHARGES` do, `_SPREAD_HEAVY_WEIGHT`. The other weights keep the expansion's relative
    error, below `_MAX_LOG_WEIGHT_ERROR` by the bound and 1e-3 at most in practice; they weigh little, and in rows
    whose weight is spread over many charges their independent rounding errors average out in g.
    """
    spread = (weights >= _HEAVY_WEIGHT * total[:, None]).sum(1) > _MAX_HEAVY_CHARGES
    share = torch.where(spread, _SPREAD_HEAVY_WEIGHT, _HEAVY_WEIGHT)
    return _dist_sq_at(nearest, -torch.log(share * total), exponent, scale)


def _row_blocks(rows, batch_size, max_pairs):
    """Split the row-sorted pairs `rows` into blocks of consecutive rows with at most `max_pairs` pairs each (a row
    with more is a block of its own): yields (first row, end row, slice of the pairs)."""
    ends = torch.bincount(rows, minlength=batch_size).cumsum(0).tolist()
    start, begin = 0, 0
    for row, end in enumerate(ends):
        if end - begin > max_pairs and row > start:
            yield start, row, slice(begin, ends[row - 1])
            start, begin = row, ends[row - 1]
    yield start, batch_size, slice(begin, ends[-1])


def _exact_terms(y, x, rows, cols, exponent, scale, negligible):
    """Exact float64 differences x_j - y_i for the `rows`, `cols` pairs: the rows' nearest squared distances (B,),
    the sums of w_ij (x_j - y_i) (B, N) and of w_ij (B,) over the pairs, with w_ij relative to the nearest charge."""
    batch_size, N = y.shape
    nearest = y.new_full((batch_size,), math.inf, dtype=torch.float64)
    near, total = y.new_zeros(batch_size, N, dtype=torch.float64), y.new_zeros(batch_size, dtype=torch.float64)
    for start, stop, pairs in _row_blocks(rows, batch_size, max(1, _CHUNK_ELEMENTS // N)):
        i, j = rows[pairs], cols[pairs]
        diff = x.index_select(0, j).double().sub_(y.index_select(0, i))  # (p, N), exact for float32 values
        dist_sq = torch.linalg.vecdot(diff, diff)  # (p,)
        # the reference of a row's weights cancels in g: no gradient needed
        block = dist_sq.new_full((stop - start,), math.inf).scatter_reduce_(0, i - start, dist_sq.detach(), "amin")
        nearest[start:stop] = block
        weights = _weights(dist_sq, block[i - start], exponent, scale[i], negligible)  # (p,)
        # in place unless autograd keeps diff for the backward pass (the ideal denoiser in the pipeline's likelihood)
        near.index_add_(0, i, weights[:, None] * diff if diff.requires_grad else diff.mul_(weights[:, None]))
        total.index_add_(0, i, weights)
    return nearest, near, total


def _far_terms(weights, total, rescale, far_rows, rows, cols, x, y):
    """The part of the charges not recomputed exactly, in the rows `far_rows` (F,) that have one: the sums of
    rescale_i w_ij (x_j - y_i) (F, N) and of rescale_i w_ij (F,), from the approximate weights (F, L), their sums
    `total` (F,) and the factors `rescale` (F,)."""
    local = rows.new_full((y.shape[0],), -1).index_put_((far_rows,), torch.arange(len(far_rows), device=rows.device))
    in_far = local[rows] >= 0
    i, j = local[rows[in_far]], cols[in_far]  # the exact pairs of the far rows
    far_total = rescale * (total - total.new_zeros(total.shape).index_add(0, i, weights[i, j]))  # (F,)
    far_weights = weights.to(x.dtype, copy=True).index_put_((i, j), weights.new_zeros((), dtype=x.dtype))  # (F, L)
    far = (far_weights @ x).double().mul_(rescale[:, None])  # (F, N), the second product
    return far.addcmul_(y.index_select(0, far_rows), -far_total[:, None]), far_total


def _pull_toward_charges(y: torch.Tensor, x: torch.Tensor, exponent, scale: torch.Tensor) -> torch.Tensor:
    """g_i = sum_j w_ij (x_j - y_i), (B, N) in float64, with w_ij ∝ (|y_i - x_j|^2 + scale_i)^(-exponent) over j.

    y (B, N) and x (L, N) share a dtype, scale is (B,) float64; `exponent=None` means w_ij ∝ exp(-|y_i - x_j|^2 /
    scale_i) (see `_log_weight`). No (B, L, N) tensor is built: all distances come from the expansion
    |y|^2 + |x|^2 - 2 y.x (one matrix product), whose rounding error (`_expansion_error`) is large next to small
    distances, and the weights raise distances to the power `exponent`. So the charges where that error can matter
    (usually one or two per row) get exact float64 distances and exact terms w_ij (x_j - y_i) from explicit
    differences; the others' part is one more matrix product, over the rows that have such a part. In place where
    autograd allows (the ideal denoiser is differentiated, for the pipeline's likelihood): every fresh buffer costs
    page faults.
    """
    N, L = y.shape[1], x.shape[0]
    gram = y @ x.T  # (B, L), the first of the two products that dominate the cost
    y64 = y.double()
    y_sq = torch.linalg.vecdot(y64, y64)  # (B,), exact and cheap
    x_sq = torch.linalg.vector_norm(x, dim=1).double().square()  # (L,): an (L, N) float64 copy would cost a product
    dist_sq = (y_sq[:, None] + x_sq).sub_(gram, alpha=2).clamp_(min=0)  # (B, L), approximate
    negligible = _negligible_log_weight(L, x.dtype)
    nearest = dist_sq.detach().amin(1)  # (B,)
    error = _expansion_error(y_sq.detach(), x_sq.detach().max(), N, x.dtype)  # (B,)
    exact_only = _exact_only(nearest, error, exponent, scale)  # (B,)
    far_rows = (~exact_only).nonzero()[:, 0]  # (F,): the rows that take weights from the expansion too
    far_nearest, far_scale = nearest[far_rows], scale[far_rows]
    weights = _weights(dist_sq[far_rows], far_nearest[:, None], exponent, far_scale[:, None], negligible)  # (F, L)
    total = weights.sum(1)  # (F,)

    reach = _exact_reach(nearest, error, exact_only, exponent, scale, negligible)  # (B,)
    heavy = _heavy_reach(weights.detach(), total.detach(), far_nearest, exponent, far_scale)  # (F,)
    reach = reach.index_put((far_rows,), torch.maximum(reach[far_rows], heavy))
    rows, cols = (dist_sq.detach() <= reach[:, None]).nonzero(as_tuple=True)  # (P,) pairs, sorted by row
    exact_nearest, g, g_total = _exact_terms(y, x, rows, cols, exponent, scale, negligible)  # (B,), (B, N), (B,)

    # relative to the exact nearest charge like the exact terms: a factor within e^(+-_MAX_LOG_WEIGHT_ERROR)
    rescale = _log_weight(far_nearest, exact_nearest[far_rows], exponent, far_scale).exp()  # (F,)
    far, far_total = _far_terms(weights, total, rescale, far_rows, rows, cols, x, y)  # (F, N), (F,)
    g.index_add_(0, far_rows, far)
    return g.div_(g_total.index_add_(0, far_rows, far_total)[:, None])


def poisson_field_target(samples: torch.Tensor, z: torch.Tensor, data: torch.Tensor, gamma: float = 5.0):
    """The normalised Poisson field of the charges `data` at the augmented points (samples, z): PFGM Algorithm 1.

    With x~_j = (x_j, 0) and y~_i = (y_i, z_i): c_ij = softmax_j(-(N+1)/2 log |y~_i - x~_j|^2),
    g_i = sum_j c_ij (x~_j - y~_i) (it points toward the data, g_z = -z_i < 0), v_i = sqrt(N) g_i / (|g_i| + gamma).
    Computed with two matrix products and float64 weights in log space; the (B, L, N) difference tensor of the
    official code is never built. Agrees with the official code to about 2e-6 (it adds 1e-7 to distances and sums).

    Args:
        samples (`torch.Tensor` of shape `(B, C, H, W)`): the perturbed points y.
        z (`torch.Tensor` of shape `(B,)`): their augmented coordinate, finite and > 0 (at least 1e-154, so that z^2
            does not underflow in float64; any larger z, even one whose z^2 overflows, gives the right limit).
        data (`torch.Tensor` of shape `(L, C, H, W)`): the large batch of clean data (the charges).
        gamma (`float`, defaults to 5.0): the normaliser's offset, >= 0; 0 gives the unit field scaled by sqrt(N).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: `target_x` shaped like `samples` and `target_z` of shape (B,), float32.
    """
    batch_size, N = _batch_sizes(samples, "samples", data, "data")
    if z.numel() != batch_size:
        raise ValueError(f"`z` must have shape ({batch_size},), got {tuple(z.shape)}.")
    if not 0 <= gamma < math.inf:
        raise ValueError(f"`gamma` must be finite and >= 0, got {gamma}.")
    y = samples.reshape(batch_size, N).float()
    x = data.reshape(data.shape[0], N).to(y.device, torch.float32)
    z = z.reshape(batch_size).to(y.device, torch.float64)
    _check_levels("z", z)
    # Mixed-precision training calls this inside autocast; the target must stay in float32/float64.
    with torch.autocast(device_type=y.device.type, enabled=False):
        target_x, target_z = _field_target(y, z, x, gamma, samples.shape)
    # A NaN or inf in the inputs reaches the rows' normalisers: checking (B,) values is free; the inputs on failure.
    if not torch.isfinite(target_z).all():
        _raise_non_finite(samples=samples, data=data)
    return target_x, target_z


def _batch_sizes(points, points_name, charges, charges_name):
    """(B, N) of `points` (B, ...) after checking that `charges` (L, ...) holds L >= 1 charges of N values each.

    A softmax over no charges and a mean over no points have no value: an empty batch is refused, not returned empty.
    """
    shape, charge_shape = tuple(points.shape), tuple(charges.shape)
    if points.ndim == 0 or shape[0] == 0 or math.prod(shape[1:]) == 0:
        raise ValueError(f"`{points_name}` must hold at least one point of at least one value, got shape {shape}.")
    N = math.prod(shape[1:])
    if charges.ndim == 0 or charge_shape[0] == 0 or math.prod(charge_shape[1:]) != N:
        raise ValueError(
            f"`{charges_name}` must hold at least one charge of {N} values like `{points_name}` {shape}, "
            f"got shape {charge_shape}."
        )
    return shape[0], N


def _levels(name, value, batch_size, device):
    """A float or (B,) tensor of noise levels as (B,) float64, checked by `_check_levels`."""
    levels = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if levels.numel() not in (1, batch_size):
        raise ValueError(f"`{name}` must be a number or have shape ({batch_size},), got shape {tuple(levels.shape)}.")
    _check_levels(name, levels)
    return levels.expand(batch_size)


def _check_levels(name, levels):
    """z or sigma must be finite and so large that its square is > 0 in float64 (z = 0 on a charge has no field)."""
    bad = ~(torch.isfinite(levels) & (levels > 0) & (levels**2 > 0))
    if bad.any():
        rows = bad.nonzero()[:, 0].tolist()
        raise ValueError(
            f"`{name}` must be finite and > 0 (at least 1e-154, so that {name}^2 > 0 in float64), got "
            f"{levels[bad].tolist()[:4]} at rows {rows[:4]}."
        )


def _raise_non_finite(**inputs):
    """Name the input holding a NaN or inf, else the product that overflowed; `inputs`: the points, the charges."""
    for name, value in inputs.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"`{name}` must be finite, found {torch.isfinite(value).logical_not().sum()} NaN or inf.")
    (points_name, points), (charges_name, charges) = inputs.items()
    raise ValueError(
        f"the target overflowed: the products y.x of `{points_name}` and `{charges_name}` must fit in float32 "
        f"(|y| |x| < 3e38), got max |{points_name}| {points.abs().max():.3g} and max |{charges_name}| "
        f"{charges.abs().max():.3g}."
    )


def _field_target(y, z, x, gamma, shape):
    """Algorithm 1 on flattened float32 y (B, N), float64 z (B,) and float32 charges x (L, N)."""
    N = y.shape[1]
    # c_ij ∝ (|y_i - x_j|^2 + z_i^2)^(-(N+1)/2): the PFGM++ kernel with D = 1 and r = z (math.md §1)
    g_x = _pull_toward_charges(y, x, (N + 1) / 2, z**2)  # (B, N); g_z = sum_j c_ij (0 - z_i) = -z_i
    g_norm = torch.hypot(torch.linalg.vector_norm(g_x, dim=1), z)  # (B,); hypot: no z^2 overflow
    scale = math.sqrt(N) / (g_norm + gamma)
    target_x = g_x.mul_(scale[:, None]).float().reshape(shape)
    target_z = (-z * scale).float()
    return target_x, target_z


def ideal_denoiser(x: torch.Tensor, sigma, data: torch.Tensor, aug_dim: int | None) -> torch.Tensor:
    """The posterior mean D*(x, sigma) = sum_i w_i x_i of the empirical data `data` under the PFGM++ kernel.

    w_i ∝ (|x - x_i|^2 + sigma^2 D)^(-(N+D)/2) (math.md §1); `aug_dim=None` is the Gaussian (EDM) limit
    w_i ∝ exp(-|x - x_i|^2 / (2 sigma^2)). This is the exact minimiser of the denoising loss on `data`: an exact
    "model" for tests. `sigma` is a float or a (B,) tensor; the result has the shape and dtype of `x`.
    """
    batch_size, N = _batch_sizes(x, "x", data, "data")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.reshape(batch_size, N).to(compute_dtype)
    charges = data.reshape(data.shape[0], N).to(y.device, compute_dtype)
    denoised = _posterior_mean(y, _levels("sigma", sigma, batch_size, y.device), charges, aug_dim)
    return denoised.reshape(x.shape).to(x.dtype)


def _posterior_mean(y, sigma, charges, aug_dim):
    """sum_j w_ij x_j (B, N) float64 at y (B, N), sigma (B,) float64, over the charges x (L, N), PFGM++ weights."""
    N = y.shape[1]
    if aug_dim is None:  # w ∝ exp(-|y - x_j|^2 / (2 sigma^2)), the D -> infinity limit (math.md §1)
        exponent, scale = None, 2 * sigma**2
    else:  # w ∝ (|y - x_j|^2 + r^2)^(-(N+D)/2), r = sigma sqrt(D)
        exponent, scale = (N + aug_dim) / 2, sigma**2 * aug_dim
    # Mixed-precision training calls this inside autocast; the weights must stay in float32/float64.
    with torch.autocast(device_type=y.device.type, enabled=False):
        return _pull_toward_charges(y, charges, exponent, scale) + y  # y + sum_j w_ij (x_j - y)


def stable_target(
    perturbed: torch.Tensor,
    sigma,
    reference: torch.Tensor,
    aug_dim: int | None,
    class_labels: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Stable Target Field (STF) training target: the posterior mean of the clean image over a reference batch.

    For a perturbed image y at noise level sigma and a reference batch x_1..x_L that holds y's own clean image,
    the target is sum_j w_j x_j with w_j ∝ (|y - x_j|^2 + r^2)^(-(N+D)/2), r = sigma sqrt(D) (math.md §1, the
    reference batch as the data; `aug_dim=None`: w_j ∝ exp(-|y - x_j|^2 / (2 sigma^2)), the STF paper's form). It
    replaces the clean image as the target of the denoising loss: the same minimiser as L grows (the bias is
    O(1/L)), a lower variance where the posterior spreads over several images (intermediate sigma). It tends to y's
    own clean image as sigma -> 0 and to the reference mean as sigma -> infinity.

    Computed as `poisson_field_target` is (the same code): float64 weights in log space from one matrix product,
    exact float64 differences where rounding could move a weight (near ties included), the weighted sum as a
    second product; memory O(B L), never a (B, L, N) tensor. No gradient flows through it.

    Differences from the official code (`Newbeeer/pfgmpp`, `training/loss.py`, `EDMLoss.pfgmpp_target` for finite
    D and `stf_scores` for D = infinity; `training/training_loop.py` for the reference batch):
    - The official reference batch is the `--rbatch` images (4096) loaded on each GPU, whose first rows are the
      training batch itself (`ref_images[:len(y)] = y`, after augmentation): every sample's own image and the other
      samples' images are in it. Here the caller passes the reference batch; the trainer builds it the same way.
    - The official finite-D weights are (min_j d_j / (d_j + 1e-7))^(N+D) in float64 from a (B, L, N+1) difference
      tensor, and the D = infinity weights a float32 softmax of a (B, L, N) tensor: both agree with these weights
      to float rounding, at O(B L N) memory (6.4 GB at 128 x 4096 x 3072 in float32, twice that in float64).
    - The official code ignores class labels: a class-conditional model then regresses the posterior mean over the
      images of every class, not E[x | y, class] (at large sigma the mean of all classes, not of its class). With
      `class_labels` and `reference_labels`, each sample's posterior runs over the images of its class only.
    - Without `--augment`, the official code assigns the training batch to the rest of the reference batch
      (`(images, None)` in place of the augmented reference), which fails unless L = 2B.

    Args:
        perturbed (`torch.Tensor` of shape `(B, C, H, W)`): the perturbed images y.
        sigma (`float` or `torch.Tensor` of shape `(B,)`): their noise levels, finite and > 0 (at least 1e-154).
        reference (`torch.Tensor` of shape `(L, C, H, W)`): the reference batch of clean images; for the STF
            estimator it holds the clean image of each perturbed one.
        aug_dim (`int` or `None`): D >= 1, or `None` for D = infinity (EDM).
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): the samples' classes, for a class-conditional
            model; then `reference_labels` (`torch.Tensor` of shape `(L,)`) gives the reference images' classes.

    Returns:
        `torch.Tensor`: the targets, shaped like `perturbed`, in float32 (float64 for float64 inputs).

    Example:

    ```py
    >>> import torch
    >>> from pfgm_diffusers import stable_target
    >>> clean = torch.rand(64, 1, 8, 8) * 2 - 1
    >>> target = stable_target(clean[:8] + 0.01 * torch.randn(8, 1, 8, 8), torch.full((8,), 0.01), clean, 128)
    >>> bool((target - clean[:8]).abs().max() < 1e-4)  # at small sigma: each sample's own clean image
    True
    ```
    """
    batch_size, N = _batch_sizes(perturbed, "perturbed", reference, "reference")
    check_aug_dim(aug_dim)
    dtype = torch.float64 if perturbed.dtype == torch.float64 else torch.float32
    y = perturbed.detach().reshape(batch_size, N).to(dtype)
    x = reference.detach().reshape(reference.shape[0], N).to(y.device, dtype)
    sigma = _levels("sigma", sigma, batch_size, y.device)
    with torch.no_grad():
        if class_labels is None and reference_labels is None:
            target = _posterior_mean(y, sigma, x, aug_dim)
        else:
            target = _posterior_mean_per_class(y, sigma, x, aug_dim, class_labels, reference_labels)
    # A NaN or inf in the inputs spreads to their rows: one (B, N) check, the inputs named on failure.
    if not torch.isfinite(target).all():
        _raise_non_finite(perturbed=perturbed, reference=reference)
    return target.reshape(perturbed.shape).to(dtype)


def _posterior_mean_per_class(y, sigma, x, aug_dim, class_labels, reference_labels):
    """`_posterior_mean` of each sample over the reference images of its class: one call per class in the batch."""
    if class_labels is None or reference_labels is None:
        raise ValueError("give both `class_labels` and `reference_labels`, or neither.")
    if tuple(class_labels.shape) != (y.shape[0],) or tuple(reference_labels.shape) != (x.shape[0],):
        raise ValueError(
            f"`class_labels` must have shape ({y.shape[0]},) and `reference_labels` ({x.shape[0]},), got "
            f"{tuple(class_labels.shape)} and {tuple(reference_labels.shape)}."
        )
    class_labels, reference_labels = class_labels.to(y.device), reference_labels.to(y.device)
    target = torch.empty(y.shape, dtype=torch.float64, device=y.device)
    for label in class_labels.unique().tolist():
        rows, charges = (class_labels == label).nonzero()[:, 0], x[reference_labels == label]
        if len(charges) == 0:
            raise ValueError(
                f"the reference batch holds no image of class {label}: it must hold each sample's own clean image."
            )
        target[rows] = _posterior_mean(y[rows], sigma[rows], charges, aug_dim)
    return target


def split_field_output(model_output: torch.Tensor):
    """Split a field model's (B, C+1, H, W) output into v_x (B, C, H, W) and v_z (B,), the mean of the extra channel.

    This is how the official PFGM reads its network (math.md §3).
    """
    return model_output[:, :-1], model_output[:, -1].reshape(model_output.shape[0], -1).mean(1)


def field_dx_dz(model_output: torch.Tensor, z, gamma: float = 5.0, z_exp: float | None = None, vz_eps: float = 1e-5):
    """The backward ODE dx/dz = v_x / v_z of a field model, with the official sampler's two safeguards (math.md §3).

    `vz_eps` is added to v_z in the denominator (1e-5 in the official code; 0 turns it off). Where z < `z_exp` (and
    gamma > 0), v_z is rebuilt from v_x assuming a nearest-charge field: n1 = |v_x| / sqrt(N),
    a = gamma n1 / (1 - n1), v_z = -sqrt(N) z / (sqrt(a^2 + z^2) + gamma) (PFGM Appendix B.2.3); `None` turns it off.

    Args:
        model_output (`torch.Tensor` of shape `(B, C+1, H, W)`): the predicted normalised field.
        z (`float` or `torch.Tensor`): the current z, a scalar or (B,).

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`: dx/dz.
    """
    v_x, v_z = split_field_output(model_output)
    batch_size, N = v_x.shape[0], v_x[0].numel()
    z = torch.as_tensor(z, device=v_z.device, dtype=v_z.dtype).reshape(-1).expand(batch_size)
    if z_exp is not None and gamma > 0:
        norm_1 = v_x.reshape(batch_size, -1).norm(dim=1) / math.sqrt(N)
        a = gamma * norm_1 / (1 - norm_1)
        rebuilt = -math.sqrt(N) * z / (torch.sqrt(a**2 + z**2) + gamma)
        v_z = torch.where(z < z_exp, rebuilt, v_z)
    return v_x / (v_z + vz_eps).reshape((-1,) + (1,) * (v_x.ndim - 1))
