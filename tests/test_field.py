"""The Poisson field target (Algorithm 1) and the ideal denoiser against the official code and float64 references."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pfgm_diffusers import field_dx_dz, ideal_denoiser, pfgm_perturb, poisson_field_target, split_field_output

ORACLE = Path(__file__).resolve().parent / "oracle"  # the official code's outputs (see oracle/README.md)


def reference_target(y, z, data, gamma):
    """Algorithm 1 in float64 from explicit differences (affordable at test sizes)."""
    y = y.reshape(y.shape[0], -1).double()
    x = data.reshape(data.shape[0], -1).double()
    z = z.double()
    N = y.shape[1]
    diff = x[None] - y[:, None]  # (B, L, N)
    dist_sq = diff.pow(2).sum(-1) + z[:, None] ** 2
    c = torch.softmax(-(N + 1) / 2 * torch.log(dist_sq), dim=1)
    g = torch.cat([(c[..., None] * diff).sum(1), -z[:, None]], dim=1)
    return math.sqrt(N) * g / (g.norm(dim=1, keepdim=True) + gamma)


def ours(y, z, data, gamma):
    tx, tz = poisson_field_target(y, z, data, gamma)
    return torch.cat([tx.reshape(tx.shape[0], -1), tz[:, None]], dim=1).double()


def row_relative_error(a, b):
    return ((a - b).abs().amax(1) / b.abs().amax(1)).max().item()


@pytest.mark.parametrize("gamma", [5, 0])
def test_official_field_target_values(gamma):
    ref = np.load(ORACLE / "pfgm_field_target_N192.npz")
    C, H, W = ref["shape_CHW"]
    y = torch.tensor(ref["y"], dtype=torch.float32).reshape(-1, C, H, W)
    z = torch.tensor(ref["z"], dtype=torch.float32)
    data = torch.tensor(ref["large_batch"], dtype=torch.float32).reshape(-1, C, H, W)
    target = ours(y, z, data, float(gamma))
    assert row_relative_error(target, torch.tensor(ref[f"gamma{gamma}__target"])) < 1e-5


@pytest.mark.parametrize(
    ("query", "gamma", "expected"),
    [
        ((0.3, 0.2, 0.5), 5.0, (0.021620, 0.041608, -0.127808)),
        ((0.3, 0.2, 0.5), 0.0, (0.224586, 0.432231, -1.327682)),
        ((0.0, 0.0, 1.0), 5.0, (0.0, 0.077865, -0.233596)),
    ],
)
def test_math_md_reference_values(query, gamma, expected):
    data = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]).reshape(3, 2, 1, 1)
    y = torch.tensor(query[:2]).reshape(1, 2, 1, 1)
    target = ours(y, torch.tensor([query[2]]), data, gamma)[0]
    np.testing.assert_allclose(target.numpy(), expected, atol=2e-6)


def test_near_ties_at_N_3072_are_exact():
    """Queries almost equidistant from two charges, norms far larger than distances: float32 expansion fails here."""
    g = torch.Generator().manual_seed(0)
    N, L = 3072, 32
    data = torch.rand(L, N, generator=g) * 2 - 1
    data[:, :] += 3.0  # a large common offset: |x|^2 ~ 3e4 while neighbour distances are ~1
    data[1] = data[0] + 0.02 * torch.randn(N, generator=g)  # two charges close together
    midpoint, axis = (data[0] + data[1]) / 2, data[1] - data[0]
    noise = 0.003 * torch.randn(8, N, generator=g)
    noise -= (noise @ axis)[:, None] * axis / axis.dot(axis)  # keep the queries on the bisecting hyperplane...
    y = midpoint + noise + torch.linspace(-2e-4, 2e-4, 8)[:, None] * axis  # ... up to a tiny shift along the axis
    z = torch.full((8,), 0.01)
    data, y = data.reshape(L, 3, 32, 32), y.reshape(8, 3, 32, 32)
    ref = reference_target(y, z, data, 5.0)
    assert row_relative_error(ours(y, z, data, 5.0), ref) < 1e-6
    # the weights really are split between the two charges (the case is a tie, not a single nearest charge)
    d = (y.reshape(8, -1, 1).double() - data.reshape(L, -1).T.double()[None]).pow(2).sum(1) + 1e-4
    log_w = -(N + 1) / 2 * torch.log(d)
    w = torch.softmax(log_w, 1)
    assert ((w[:, 0] > 0.01) & (w[:, 1] > 0.01)).sum() >= 4


def near_duplicates(seed, N, B=4, L=128, multiplicity=64):
    """`multiplicity` charges 1e-3 apart per pixel around a centre, queries 0.01 from the centre, the other charges
    uniform in [-1, 1]^N (~45 away). The expansion's rounding error (~eps |x|^2 ~ 1e-4) is larger than the gaps between
    the duplicates' squared distances (~3e-3 +- 1e-4): it cannot tell which of them is the nearest."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(N, generator=g) * 2 - 1
    data = torch.rand(L, N, generator=g) * 2 - 1
    data[:multiplicity] = centre + 1e-3 * torch.randn(multiplicity, N, generator=g)
    direction = torch.randn(B, N, generator=g)
    y = centre + 0.01 * direction / direction.norm(dim=1, keepdim=True)
    return y, torch.full((B,), 1e-4), data


@pytest.mark.parametrize("seed", range(6))
def test_near_duplicates_of_any_multiplicity_are_exact(seed):
    """A fixed number of exactly recomputed nearest charges (16) fails here: row-relative errors up to 1.6."""
    y, z, data = near_duplicates(seed, N=3072)
    assert row_relative_error(ours(y, z, data, 5.0), reference_target(y, z, data, 5.0)) < 1e-6


def test_near_duplicates_beyond_one_block_of_exact_differences_are_exact():
    """At N = 12288 a block of exact differences holds 21 charges; the 64 duplicates of a row overflow it."""
    y, z, data = near_duplicates(0, N=12288)
    assert row_relative_error(ours(y, z, data, 0.0), reference_target(y, z, data, 0.0)) < 1e-6


@pytest.mark.parametrize("D", [1, 128, None])
def test_ideal_denoiser_is_exact_on_near_duplicates(D):
    """Relative to D* - x, what the ODE steps with; its float32 output resolves ~1e-5 of it here (the old fixed
    top-16 was off by 3e-3 to 0.7)."""
    y, _, data = near_duplicates(1, N=3072)
    for sigma in (1e-4, 3e-3, 0.1):
        out = ideal_denoiser(y, sigma, data, D).double()
        ref = reference_denoiser(y, sigma, data, D)
        assert ((out - ref).abs().max() / (ref - y.double()).abs().max()).item() < 1e-4


def test_random_batches_match_reference_over_all_z():
    g = torch.Generator().manual_seed(1)
    data = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    y, z = pfgm_perturb(data[:32], generator=g)
    ref = reference_target(y, z, data, 5.0)
    assert row_relative_error(ours(y, z, data, 5.0), ref) < 1e-6
    assert z.min() < 0.1 and z.max() > 10  # both regimes are covered


def test_target_stays_exact_under_bf16_autocast():
    g = torch.Generator().manual_seed(6)
    data = torch.rand(32, 3, 8, 8, generator=g) * 2 - 1
    y, z = pfgm_perturb(data[:8], generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = ours(y, z, data, 5.0)
    assert row_relative_error(target, reference_target(y, z, data, 5.0)) < 1e-6


def test_stable_for_large_N():
    g = torch.Generator().manual_seed(2)
    N = 196608
    data = torch.rand(6, 3, 256, 256, generator=g) * 2 - 1
    y = data[:2] + 0.01 * torch.randn(2, 3, 256, 256, generator=g)
    z = torch.tensor([0.05, 30.0])
    target = ours(y, z, data, 5.0)
    assert torch.isfinite(target).all()
    assert row_relative_error(target, reference_target(y, z, data, 5.0)) < 1e-5
    assert target.shape == (2, N + 1)


class MaxTensorSize(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_builds_the_difference_tensor():
    B, L, N = 32, 512, 3072
    data = torch.rand(L, N)
    y, z = data[:B] + 0.1, torch.rand(B)
    with MaxTensorSize() as probe:
        poisson_field_target(y, z, data)
    assert probe.max_numel <= max(L * N, B * L)  # (B, L) weights; the (L, N) data is the largest input


def test_exact_differences_are_built_in_bounded_blocks():
    """32 rows with 64 near-duplicate charges each: 2048 exact (row, charge) pairs, built a block at a time."""
    y, z, data = near_duplicates(2, N=3072, B=32, L=512)
    with MaxTensorSize() as probe:
        poisson_field_target(y, z, data)
    assert probe.max_numel <= max(512 * 3072, 32 * 512)  # all 2048 pairs at once would be 4x the data


class SubnormalProbe(TorchDispatchMode):
    """Records the ops whose floating-point outputs hold subnormal numbers (~30-100x slower arithmetic on x86)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "empty" in str(func):  # uninitialised memory, not a computed number
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if ((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).any():
                    self.ops.append(str(func))
        return out


def test_no_subnormal_numbers_with_charges_far_from_the_queries():
    """Gaussian charges and independent Gaussian queries (~78 apart): weights span hundreds of orders of magnitude.

    The weights are spread over a few charges with ~1e-4 relative errors from the expansion: recomputing only those
    carrying >= 1e-2 of a row's weight leaves 6e-7 here.
    """
    g = torch.Generator().manual_seed(7)
    data, y = torch.randn(512, 3072, generator=g), torch.randn(16, 3072, generator=g)
    z = torch.exp(torch.empty(16).uniform_(math.log(1e-2), math.log(1e2), generator=g))
    with SubnormalProbe() as probe:
        target = ours(y, z, data, 5.0)
    assert probe.ops == []
    assert row_relative_error(target, reference_target(y, z, data, 5.0)) < 1e-7


def test_zero_network_loss_is_N_over_2_with_gamma_0():
    data = torch.rand(16, 2, 4, 4) * 2 - 1
    y, z = pfgm_perturb(data[:8], generator=torch.Generator().manual_seed(3))
    target = ours(y, z, data, 0.0)
    loss = 0.5 * (0 - target).pow(2).sum(1)
    torch.testing.assert_close(loss, torch.full((8,), 32 / 2, dtype=torch.float64), rtol=1e-5, atol=0)


def test_target_points_toward_the_data():
    data = torch.zeros(1, 1, 2, 2)
    y = torch.ones(1, 1, 2, 2)
    tx, tz = poisson_field_target(y, torch.tensor([2.0]), data, gamma=0.0)
    g = torch.tensor([-1.0, -1, -1, -1, -2])  # (x - y, -z)
    expected = 2 * g / g.norm()
    torch.testing.assert_close(torch.cat([tx.flatten(), tz]), expected)


def test_field_target_bad_input():
    with pytest.raises(ValueError, match="data"):
        poisson_field_target(torch.rand(2, 1, 2, 2), torch.rand(2), torch.rand(4, 1, 3, 3))
    with pytest.raises(ValueError, match="z"):
        poisson_field_target(torch.rand(2, 1, 2, 2), torch.rand(3), torch.rand(4, 1, 2, 2))
    with pytest.raises(ValueError, match="`gamma` must be finite and >= 0, got -1"):
        poisson_field_target(torch.rand(2, 1, 2, 2), torch.rand(2), torch.rand(4, 1, 2, 2), gamma=-1.0)
    data = torch.rand(4, 1, 2, 2)
    for bad_z in (0.0, -1.0, float("nan"), float("inf"), 1e-170):  # 0 on a charge: the field has no direction
        with pytest.raises(
            ValueError, match=r"`z` must be finite and > 0 .* got \[" + f"{bad_z}" + r"\] at rows \[1\]"
        ):
            poisson_field_target(data[:2], torch.tensor([1.0, bad_z], dtype=torch.float64), data)
    samples = torch.rand(2, 1, 2, 2)
    samples[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`samples` must be finite, found 1 NaN or inf"):
        poisson_field_target(samples, torch.rand(2), data)
    data[3, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="`data` must be finite, found 1 NaN or inf"):
        poisson_field_target(torch.rand(2, 1, 2, 2), torch.rand(2), data)


def test_huge_z_gives_the_far_field_limit():
    """z = 1e200 (z^2 overflows float64) and 1e100: all charges weigh the same to 1e-100: g = (mean_j x_j - y, -z)."""
    data, y = torch.rand(16, 1, 2, 2) * 2 - 1, torch.rand(2, 1, 2, 2) * 2 - 1
    z = torch.tensor([1e200, 1e100], dtype=torch.float64)
    tx, tz = poisson_field_target(y, z, data, gamma=5.0)
    g_x = (data.double().mean(0) - y.double()).reshape(2, -1)
    norm = torch.hypot(g_x.norm(dim=1), z)
    torch.testing.assert_close(tx.reshape(2, -1), (2 * g_x / (norm[:, None] + 5)).float(), rtol=0, atol=0)
    torch.testing.assert_close(tz, (-2 * z / (norm + 5)).float(), rtol=0, atol=0)
    assert tz.tolist() == [-2.0, -2.0]  # -sqrt(N) z / (z + gamma)


def reference_denoiser(x, sigma, data, D):
    x = x.reshape(x.shape[0], -1).double()
    charges = data.reshape(data.shape[0], -1).double()
    N = x.shape[1]
    d = (x[:, None] - charges[None]).pow(2).sum(-1)
    log_w = -d / (2 * sigma**2) if D is None else -(N + D) / 2 * torch.log(d + sigma**2 * D)
    return torch.softmax(log_w, 1) @ charges


@pytest.mark.parametrize("D", [1, 8, 128, None])
def test_ideal_denoiser_matches_reference(D):
    g = torch.Generator().manual_seed(4)
    data = torch.randn(40, 3, 4, 4, generator=g)
    x = data[:6] + 0.8 * torch.randn(6, 3, 4, 4, generator=g)
    for sigma in (0.05, 0.8, 20.0):
        out = ideal_denoiser(x, sigma, data, D)
        assert out.shape == x.shape
        ref = reference_denoiser(x, sigma, data, D).reshape(x.shape).float()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [1, 64, None])
def test_ideal_denoiser_gradient_is_its_derivative(D):
    """The pipeline's likelihood differentiates the ideal denoiser: autograd must see every in-place step."""
    g = torch.Generator().manual_seed(8)
    data = torch.randn(24, 2, 3, 3, generator=g, dtype=torch.float64)
    x = (data[:4] + 0.7 * torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    for sigma in (0.3, 3.0):
        assert torch.autograd.gradcheck(lambda x, sigma=sigma: ideal_denoiser(x, sigma, data, D), (x,))


def test_ideal_denoiser_tends_to_edm_as_D_grows():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(10, 8, generator=g, dtype=torch.float64)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    edm = ideal_denoiser(x, 0.7, data, None)
    assert (ideal_denoiser(x, 0.7, data, 10**8) - edm).abs().max() < 1e-5
    assert (ideal_denoiser(x, 0.7, data, 4) - edm).abs().max() > 1e-2


def test_field_split_and_safeguards():
    out = torch.randn(2, 4, 3, 3)
    v_x, v_z = split_field_output(out)
    assert v_x.shape == (2, 3, 3, 3) and torch.equal(v_z, out[:, 3].mean((1, 2)))
    raw = field_dx_dz(out, 2.0, vz_eps=0.0)
    torch.testing.assert_close(raw, v_x / v_z[:, None, None, None])
    with_eps = field_dx_dz(out, 2.0, vz_eps=1e-5)
    torch.testing.assert_close(with_eps, v_x / (v_z + 1e-5)[:, None, None, None])
    # below z_exp, v_z is rebuilt from |v_x| with the nearest-charge formula; above it nothing changes
    v_small = torch.full((2, 4, 3, 3), 0.1)
    rebuilt = field_dx_dz(v_small, 0.5, gamma=5.0, z_exp=1.0, vz_eps=0.0)
    n1 = 0.1 * math.sqrt(27) / math.sqrt(27)
    a = 5.0 * n1 / (1 - n1)
    v_z_expected = -math.sqrt(27) * 0.5 / (math.sqrt(a**2 + 0.25) + 5.0)
    torch.testing.assert_close(rebuilt, torch.full((2, 3, 3, 3), 0.1 / v_z_expected))
    assert torch.equal(field_dx_dz(v_small, 2.0, z_exp=1.0, vz_eps=0.0), field_dx_dz(v_small, 2.0, vz_eps=0.0))


@pytest.mark.parametrize("sigma", [-1.0, 0.0, float("nan"), float("inf"), torch.tensor([1.0, -2.0])])
def test_ideal_denoiser_refuses_a_noise_level_that_is_not_positive_and_finite(sigma):
    with pytest.raises(ValueError, match="`sigma` must be finite and > 0"):
        ideal_denoiser(torch.zeros(2, 4), sigma, torch.randn(3, 4), 8)


def test_empty_batches_and_no_charges_are_refused_naming_the_shapes():
    """Before: IndexError (poisson_field_target) and ZeroDivisionError (ideal_denoiser) from deep inside."""
    points, charges = torch.rand(2, 1, 2, 2), torch.rand(4, 1, 2, 2)
    no_charges = (
        r"`data` must hold at least one charge of 4 values like `samples` \(2, 1, 2, 2\), got shape \(0, 1, 2, 2\)"
    )
    with pytest.raises(ValueError, match=no_charges):
        poisson_field_target(points, torch.rand(2), charges[:0])
    with pytest.raises(ValueError, match=r"`samples` must hold at least one point .* got shape \(0, 1, 2, 2\)"):
        poisson_field_target(points[:0], torch.rand(0), charges)
    with pytest.raises(ValueError, match=r"`samples` must hold at least one point .* got shape \(2, 0, 2, 2\)"):
        poisson_field_target(torch.rand(2, 0, 2, 2), torch.rand(2), charges[:, :0])
    with pytest.raises(ValueError, match=r"`data` must hold at least one charge .* got shape \(0, 1, 2, 2\)"):
        ideal_denoiser(points, 0.5, charges[:0], None)
    with pytest.raises(ValueError, match=r"`x` must hold at least one point .* got shape \(0, 1, 2, 2\)"):
        ideal_denoiser(points[:0], 0.5, charges, 128)
