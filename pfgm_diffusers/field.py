"""Poisson fields of a set of charges: the PFGM training target (Algorithm 1) and the ideal denoiser of any D.

Formulas: `docs/math.md` §1 and §3 (PFGM: Xu et al., NeurIPS 2022, eq. 7 and Algorithm 1; PFGM++: Xu et al.,
ICML 2023, Proposition 3.1 and eq. 6). Both are softmaxes over the charges of log-distances in the augmented space,
so they share one distance computation that is fast (a matrix product) and exact where it matters.
"""

import math

import torch

# Nearest charges per query whose distances are recomputed exactly (see `_squared_distances`).
_NUM_EXACT = 16
# Bound on the number of elements of the (rows, k, N) difference tensor built at once.
_CHUNK_ELEMENTS = 1 << 20


def _squared_distances(y: torch.Tensor, x: torch.Tensor, num_exact: int = _NUM_EXACT) -> torch.Tensor:
    """Squared distances |y_i - x_j|^2, (B, L) in float64, from y (B, N) and x (L, N), without a (B, L, N) tensor.

    All pairs come from the expansion |y|^2 + |x|^2 - 2 y.x (one matrix product in the inputs' precision). The
    expansion loses digits to cancellation when a distance is small next to the norms, and the softmaxes downstream
    raise distances to the power (N + D)/2, so the `num_exact` nearest charges of each query, the only ones that carry
    weight when distances are small, are recomputed from explicit float64 differences.
    """
    gram = y @ x.T  # (B, L), the product that dominates the cost
    y_sq = y.double().pow(2).sum(1)  # (B,)
    x_sq = x.double().pow(2).sum(1)  # (L,)
    dist_sq = (y_sq[:, None] + x_sq[None, :] - 2 * gram.double()).clamp_(min=0)
    k = min(num_exact, x.shape[0])
    nearest = dist_sq.topk(k, dim=1, largest=False).indices  # (B, k)
    rows = max(1, _CHUNK_ELEMENTS // (k * y.shape[1]))
    for start in range(0, y.shape[0], rows):
        idx = nearest[start : start + rows]
        diff = y[start : start + rows, None, :].double() - x[idx].double()  # (rows, k, N), exact in float64
        dist_sq[start : start + rows].scatter_(1, idx, diff.pow(2).sum(-1))
    return dist_sq


def _weighted_mean_minus(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij (x_j - y_i), (B, N), for float64 weights (B, L) summing to 1 over j.

    Written as sum_{j != j*} w_ij x_j - (1 - w_ij*) x_j* + (x_j* - y_i) with j* the heaviest charge: the two large
    nearly equal terms of the plain form (W x)_i - y_i never meet, so the result keeps its relative accuracy when
    y_i sits close to a charge.
    """
    heaviest = weights.argmax(dim=1)  # (B,)
    others = weights.scatter(1, heaviest[:, None], 0.0)  # (B, L)
    rest = others.sum(1, keepdim=True)  # 1 - w_ij*, without the rounding of 1 - w
    x_star = x[heaviest]  # (B, N)
    return others.to(x.dtype) @ x - (rest.to(x.dtype) * x_star) + (x_star - y)


def poisson_field_target(samples: torch.Tensor, z: torch.Tensor, data: torch.Tensor, gamma: float = 5.0):
    """The normalised Poisson field of the charges `data` at the augmented points (samples, z): PFGM Algorithm 1.

    With x~_j = (x_j, 0) and y~_i = (y_i, z_i): c_ij = softmax_j(-(N+1)/2 log |y~_i - x~_j|^2),
    g_i = sum_j c_ij (x~_j - y~_i) (it points toward the data, g_z = -z_i < 0), v_i = sqrt(N) g_i / (|g_i| + gamma).
    Computed with two matrix products and a float64 log-space softmax; the (B, L, N) difference tensor of the
    official code is never built. Agrees with the official code to about 2e-6 (it adds 1e-7 to distances and sums).

    Args:
        samples (`torch.Tensor` of shape `(B, C, H, W)`): the perturbed points y.
        z (`torch.Tensor` of shape `(B,)`): their augmented coordinate, > 0.
        data (`torch.Tensor` of shape `(L, C, H, W)`): the large batch of clean data (the charges).
        gamma (`float`, defaults to 5.0): the normaliser's offset; 0 gives the unit field scaled by sqrt(N).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: `target_x` shaped like `samples` and `target_z` of shape (B,), float32.
    """
    batch_size, N = samples.shape[0], samples[0].numel()
    if data.ndim < 2 or data[0].numel() != N:
        raise ValueError(f"`data` must hold charges of {N} values each like `samples`, got shape {tuple(data.shape)}.")
    if z.numel() != batch_size:
        raise ValueError(f"`z` must have shape ({batch_size},), got {tuple(z.shape)}.")
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
    y = samples.reshape(batch_size, N).float()
    x = data.reshape(data.shape[0], N).to(y.device, torch.float32)
    z = z.reshape(batch_size).to(y.device, torch.float64)
    if not (torch.isfinite(y).all() and torch.isfinite(z).all() and torch.isfinite(x).all()):
        raise ValueError("`samples`, `z` and `data` must be finite (NaN or inf found).")
    # Mixed-precision training calls this inside autocast; the target must stay in float32/float64.
    with torch.autocast(device_type=y.device.type, enabled=False):
        return _field_target(y, z, x, gamma, samples.shape)


def _field_target(y, z, x, gamma, shape):
    """Algorithm 1 on flattened float32 y (B, N), float64 z (B,) and float32 charges x (L, N)."""
    N = y.shape[1]
    dist_sq = _squared_distances(y, x) + z[:, None] ** 2  # (B, L), augmented distances
    weights = torch.softmax(-(N + 1) / 2 * torch.log(dist_sq), dim=1)  # c_ij, float64
    g_x = _weighted_mean_minus(weights, x, y).double()  # (B, N)
    g_z = -z  # sum_j c_ij (0 - z_i)
    g_norm = torch.sqrt(g_x.pow(2).sum(1) + g_z**2)  # (B,)
    scale = math.sqrt(N) / (g_norm + gamma)
    target_x = (g_x * scale[:, None]).float().reshape(shape)
    target_z = (g_z * scale).float()
    return target_x, target_z


def ideal_denoiser(x: torch.Tensor, sigma, data: torch.Tensor, aug_dim: int | None) -> torch.Tensor:
    """The posterior mean D*(x, sigma) = sum_i w_i x_i of the empirical data `data` under the PFGM++ kernel.

    w_i ∝ (|x - x_i|^2 + sigma^2 D)^(-(N+D)/2) (math.md §1); `aug_dim=None` is the Gaussian (EDM) limit
    w_i ∝ exp(-|x - x_i|^2 / (2 sigma^2)). This is the exact minimiser of the denoising loss on `data`: an exact
    "model" for tests. `sigma` is a float or a (B,) tensor; the result has the shape and dtype of `x`.
    """
    batch_size, N = x.shape[0], x[0].numel()
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.reshape(batch_size, N).to(compute_dtype)
    charges = data.reshape(data.shape[0], N).to(y.device, compute_dtype)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1)
    sigma = sigma.expand(batch_size)[:, None]  # (B, 1)
    with torch.autocast(device_type=y.device.type, enabled=False):
        dist_sq = _squared_distances(y, charges)  # (B, L)
        if aug_dim is None:
            log_w = -dist_sq / (2 * sigma**2)
        else:
            log_w = -(N + aug_dim) / 2 * torch.log(dist_sq + sigma**2 * aug_dim)
        weights = torch.softmax(log_w, dim=1)
        denoised = _weighted_mean_minus(weights, charges, y) + y  # sum_i w_i x_i
    return denoised.reshape(x.shape).to(x.dtype)


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
