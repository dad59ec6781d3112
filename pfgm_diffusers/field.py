"""Poisson fields of a set of charges: the PFGM training target (Algorithm 1) and the ideal denoiser of any D.

Formulas: `docs/math.md` §1 and §3 (PFGM: Xu et al., NeurIPS 2022, eq. 7 and Algorithm 1; PFGM++: Xu et al.,
ICML 2023, Proposition 3.1 and eq. 6). Both are softmaxes over the charges of log-distances in the augmented space,
so they share one distance computation that is fast (a matrix product) and exact where it matters.
"""

import math

import torch

# Nearest charges per query whose distances and contributions are computed exactly (see `_pull_toward_charges`).
_NUM_EXACT = 16
# Bound on the number of elements of the (rows, k, N) float64 difference block built at once.
_CHUNK_ELEMENTS = 1 << 18


def _pull_toward_charges(y: torch.Tensor, x: torch.Tensor, log_weight, num_exact: int = _NUM_EXACT) -> torch.Tensor:
    """g_i = sum_j w_ij (x_j - y_i), (B, N) in float64, with w_i = softmax_j(log_weight(|y_i - x_j|^2, rows)).

    y (B, N) and x (L, N) share a dtype; `log_weight(dist_sq, rows)` maps a block of squared distances (r, L) and
    its row slice to log-weights. No (B, L, N) tensor is built: all distances come from the expansion
    |y|^2 + |x|^2 - 2 y.x (one matrix product), which loses digits to cancellation when a distance is small next to the
    norms, and the weights raise distances to the power (N + D)/2. So for the `num_exact` nearest charges of each
    query, the only ones with weight when distances are small, both the distance and the term w_ij (x_j - y_i) come
    from explicit float64 differences; the far charges' part is one more matrix product.
    """
    gram = y @ x.T  # (B, L), the product that dominates the cost
    y64 = y.double()
    y_sq = torch.linalg.vecdot(y64, y64)  # (B,), exact and cheap
    x_sq = torch.linalg.vector_norm(x, dim=1).double().square()  # (L,): an (L, N) float64 copy would cost a product
    dist_sq = (y_sq[:, None] + x_sq[None, :] - 2 * gram.double()).clamp_(min=0)  # (B, L), approximate
    k = min(num_exact, x.shape[0])
    near_part = torch.empty_like(y64)  # (B, N)
    far_weights = torch.empty_like(dist_sq)  # (B, L), zero on the nearest charges
    rows_per_block = max(1, _CHUNK_ELEMENTS // (k * y.shape[1]))
    for start in range(0, y.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        block = dist_sq[rows]
        nearest = block.topk(k, dim=1, largest=False).indices  # (r, k)
        diff = x[nearest] - y64[rows, None, :]  # (r, k, N), exact in float64
        block.scatter_(1, nearest, torch.linalg.vecdot(diff, diff))
        weights = torch.softmax(log_weight(block, rows), dim=1)  # (r, L), final once the nearest are exact
        near_part[rows] = torch.bmm(weights.gather(1, nearest)[:, None, :], diff)[:, 0]
        far_weights[rows] = weights.scatter(1, nearest, 0.0)
    far_part = (far_weights.to(x.dtype) @ x).double() - far_weights.sum(1, keepdim=True) * y64
    return near_part + far_part


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
    # Mixed-precision training calls this inside autocast; the target must stay in float32/float64.
    with torch.autocast(device_type=y.device.type, enabled=False):
        target_x, target_z = _field_target(y, z, x, gamma, samples.shape)
    # A NaN or inf anywhere in the inputs reaches the rows' normalisers; checking (B,) values is free, the inputs not.
    if not torch.isfinite(target_z).all():
        raise ValueError("`samples`, `z` and `data` must be finite (NaN or inf found).")
    return target_x, target_z


def _field_target(y, z, x, gamma, shape):
    """Algorithm 1 on flattened float32 y (B, N), float64 z (B,) and float32 charges x (L, N)."""
    N = y.shape[1]

    def log_weight(dist_sq, rows):  # c_ij = softmax_j(-(N+1)/2 log(|y_i - x_j|^2 + z_i^2))
        return -(N + 1) / 2 * torch.log(dist_sq + z[rows, None] ** 2)

    g_x = _pull_toward_charges(y, x, log_weight)  # (B, N)
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
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1).expand(batch_size)

    def log_weight(dist_sq, rows):
        if aug_dim is None:
            return -dist_sq / (2 * sigma[rows, None] ** 2)
        return -(N + aug_dim) / 2 * torch.log(dist_sq + sigma[rows, None] ** 2 * aug_dim)

    with torch.autocast(device_type=y.device.type, enabled=False):
        denoised = _pull_toward_charges(y, charges, log_weight) + y  # sum_i w_i x_i
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
