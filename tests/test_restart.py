"""Restart sampling (`pfgm_diffusers.restart`): the forward jump's law, the evaluation count, landing on the data with
an exact denoiser, and bad restart blocks."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pfgm_diffusers import ideal_denoiser, sample_kernel_noise
from pfgm_diffusers.restart import RESTART_CIFAR10, restart_jump, restart_schedule, sample_restart
from pfgm_diffusers.scheduling_pfgm import PFGMScheduler

DATA = torch.tensor([[1.5, 0.2, -0.4], [-1.0, 0.9, 0.3], [0.1, -1.2, 0.8], [0.4, 0.5, 1.6]]).reshape(4, 1, 1, 3)
T_MIN, T_MAX = 0.14, 0.30  # the official CIFAR-10 block's levels


def main_sigmas(steps=18):
    scheduler = PFGMScheduler(aug_dim=128)
    scheduler.set_timesteps(steps)
    return torch.unique_consecutive(scheduler.sigmas).tolist()  # 18 levels and the trailing 0


def official_jump(delta, N, D, r_from, r_to, generator):
    """The official PFGM++ jump as `generate_restart.py` writes it: z (B, D) of norm r_from, a direction (B, N+D)
    scaled to |dir_z| = 1, the root m = -dot - sqrt(dot^2 + r_to^2 - r_from^2), x + m dir_x."""
    n = len(delta)
    z = torch.randn(n, D, generator=generator, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True) * r_from
    direction = torch.randn(n, N + D, generator=generator, dtype=torch.float64)
    direction = direction / direction[:, N:].norm(dim=1, keepdim=True)
    dot = (z * direction[:, N:]).sum(1)
    move = -dot - torch.sqrt(dot**2 + r_to**2 - r_from**2)
    return delta + move[:, None] * direction[:, :N]


def test_gaussian_jump_carries_the_kernel_at_t_min_exactly_onto_the_one_at_t_max():
    """D = infinity: |x - x_0|^2 / t_max^2 ~ chi^2_N after the jump (KS)."""
    N, n = 16, 20000
    g = torch.Generator().manual_seed(0)
    start = sample_kernel_noise((n, N), T_MIN, None, g, dtype=torch.float64)
    jumped = restart_jump(start, T_MIN, T_MAX, None, g)
    assert stats.kstest(jumped.pow(2).sum(1).numpy() / T_MAX**2, stats.chi2(N).cdf).pvalue > 1e-3
    # power: the same radii read at t_min are far from chi^2_N
    assert stats.kstest(start.pow(2).sum(1).numpy() / T_MAX**2, stats.chi2(N).cdf).pvalue < 1e-10


@pytest.mark.parametrize(("N", "D"), [(8, 1), (8, 16), (48, 4)])
def test_finite_D_jump_has_the_official_codes_law(N, D):
    """Our jump draws 2 numbers per sample where the official code builds (B, D) and (B, N+D) vectors: same law of
    the perturbation radius after the jump (two-sample KS), from the kernel at r_from."""
    n = 20000
    r_from, r_to = T_MIN * math.sqrt(D), T_MAX * math.sqrt(D)
    g = torch.Generator().manual_seed(1)
    start = sample_kernel_noise((n, N), T_MIN, D, g, dtype=torch.float64)
    ours = restart_jump(start, T_MIN, T_MAX, D, g).norm(dim=1)
    theirs = official_jump(start, N, D, r_from, r_to, g).norm(dim=1)
    assert stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3
    # power: jumping to r_to from a start at the kernel of r_to instead is detected
    other = restart_jump(sample_kernel_noise((n, N), T_MAX, D, g, dtype=torch.float64), T_MIN, T_MAX, D, g)
    assert stats.ks_2samp(ours.numpy(), other.norm(dim=1).numpy()).pvalue < 1e-10


def test_finite_D_jump_radius_second_moment_is_the_closed_form_near_the_kernel_at_t_max():
    """E|x - x_0|^2 = N (r_to^2 + 2 r_from^2 / D) / (D - 2) after the jump; the kernel at r_to has N r_to^2 / (D - 2),
    2.7% less at N = 8, D = 16 (so the jump is close to the kernel but not exactly it), 0.3% at D = 128."""
    N, D, n = 8, 16, 400000
    r_from, r_to = T_MIN * math.sqrt(D), T_MAX * math.sqrt(D)
    g = torch.Generator().manual_seed(2)
    start = sample_kernel_noise((n, N), T_MIN, D, g, dtype=torch.float64)
    mean_sq = restart_jump(start, T_MIN, T_MAX, D, g).pow(2).sum(1).mean().item()
    assert mean_sq / (N * (r_to**2 + 2 * r_from**2 / D) / (D - 2)) == pytest.approx(1, abs=0.01)
    assert mean_sq / (N * r_to**2 / (D - 2)) > 1.015


@pytest.mark.parametrize("D", [128, 2048])
def test_finite_D_jump_follows_the_kernel_at_t_max_at_image_sizes(D):
    """N = 3072: the jump's radius against the kernel at r_to (KS, 4000 draws; the exact deviation, 0.3% of
    E|x - x_0|^2 at D = 128, is below what they resolve), where a Gaussian jump is off by 1.2% at D = 128."""
    N, n = 3072, 4000
    r_to = T_MAX * math.sqrt(D)
    g = torch.Generator().manual_seed(3)
    start = sample_kernel_noise((n, N), T_MIN, D, g)
    radius_sq = restart_jump(start, T_MIN, T_MAX, D, g).double().pow(2).sum(1).numpy()
    assert stats.kstest(radius_sq / (radius_sq + r_to**2), stats.beta(N / 2, D / 2).cdf).pvalue > 1e-3
    if D == 128:  # power: the Gaussian jump from the same start is refused
        gaussian = restart_jump(start, T_MIN, T_MAX, None, g).double().pow(2).sum(1).numpy()
        assert stats.kstest(gaussian / (gaussian + r_to**2), stats.beta(N / 2, D / 2).cdf).pvalue < 1e-3


def test_the_jump_keeps_shape_dtype_and_is_reproducible_per_sample():
    x = torch.zeros(3, 1, 2, 2)
    generators = [torch.Generator().manual_seed(s) for s in (4, 5, 6)]
    batch = restart_jump(x, T_MIN, T_MAX, 128, generators)
    assert batch.shape == x.shape and batch.dtype == torch.float32
    single = restart_jump(x[1:2], T_MIN, T_MAX, 128, [torch.Generator().manual_seed(5)])
    torch.testing.assert_close(batch[1:2], single, rtol=0, atol=0)


def counting(denoise):
    calls = []

    def counted(x, sigma):
        calls.append(sigma)
        return denoise(x, sigma)

    return counted, calls


def test_official_cifar10_block_costs_43_evaluations_at_18_steps():
    denoise, calls = counting(lambda x, sigma: torch.zeros_like(x))
    sample_restart(denoise, torch.randn(2, 1, 1, 3), main_sigmas(), RESTART_CIFAR10, 128, torch.Generator())
    assert len(calls) == 43  # 2 * 18 - 1 + K 2 (N_restart - 1) = 35 + 2 * 2 * 2
    # the restart: after the main step that reaches the level nearest 0.14, twice from 0.30 back to it in 2 steps
    index = int(np.argmin(np.abs(np.array(main_sigmas()) - T_MIN)))
    level = main_sigmas()[index]
    first = 2 * index  # main Heun steps before it, two calls each
    assert calls[first : first + 4] == pytest.approx([T_MAX, calls[first + 1], calls[first + 1], level])
    assert calls[first] == calls[first + 4] == T_MAX and calls[first + 3] == calls[first + 7] == level
    blocks = {"a": [4, 3, 1.0, 5.0], "b": [2, 1, 0.05, 0.2]}
    calls.clear()
    sample_restart(denoise, torch.randn(2, 1, 1, 3), main_sigmas(), blocks, None, torch.Generator())
    assert len(calls) == 35 + 3 * 2 * 3 + 1 * 2 * 1


@pytest.mark.parametrize("aug_dim", [8, 128, 2048, None])
def test_exact_denoiser_lands_on_each_point_equally_often(aug_dim):
    scheduler = PFGMScheduler(aug_dim=aug_dim)
    g = torch.Generator().manual_seed(7)
    x_T = scheduler.sample_prior((1000, 1, 1, 3), generator=g).double()
    blocks = {"0": [3, 2, T_MIN, T_MAX], "1": [3, 1, 2.0, 5.0]}

    def denoise(x, sigma):
        return ideal_denoiser(x, sigma, DATA.double(), aug_dim)

    x = sample_restart(denoise, x_T, main_sigmas(), blocks, aug_dim, g).float()
    dist = torch.cdist(x.reshape(len(x), -1).double(), DATA.reshape(4, -1).double())
    assert (dist.min(1).values < 1e-3).all()
    counts = np.bincount(dist.argmin(1).numpy(), minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_bad_restart_blocks_are_refused_naming_the_value():
    sigmas = main_sigmas()
    cases = [
        ({"0": [3, 2, 0.30, 0.14]}, r"need 0 < t_min < t_max, both finite, got 0.3 and 0.14"),
        ({"0": [3, 2, 0.2, 0.2]}, r"need 0 < t_min < t_max"),
        ({"0": [3, 2, 0.001, 0.3]}, r"t_min 0.001 and t_max 0.3 must satisfy 0.002 <= t_min < t_max <= 80"),
        ({"0": [3, 2, 0.14, 120.0]}, r"must satisfy 0.002 <= t_min < t_max <= 80"),
        ({"0": [3, 2, 79.0, 80.0]}, r"t_min 79.0 snaps to the schedule's level 80 \(index 0\)"),
        ({"0": [3, 2, 0.12, 0.13]}, r"t_min 0.12 snaps to the schedule's level 0.1395 .* below t_max 0.13"),
        ({"0": [3, 2, 0.14, 0.3], "1": [2, 1, 0.15, 0.5]}, r"block '1' snaps to the level .* of another block"),
        ({"0": [1, 2, 0.14, 0.3]}, r"block '0' must be \[N_restart \(integer >= 2\), K \(integer >= 1\)"),
        ({"0": [3, 0, 0.14, 0.3]}, r"K \(integer >= 1\)"),
        ({"0": [3.0, 2, 0.14, 0.3]}, r"N_restart \(integer >= 2\)"),
        ({"0": [3, 2, 0.14]}, r"must be \[N_restart"),
        ({"0": "3 2 0.14 0.3"}, r"must be \[N_restart"),
        ([[3, 2, 0.14, 0.3]], r"`restart_blocks` must be a dict of blocks"),
    ]
    for restart, message in cases:
        with pytest.raises(ValueError, match=message):
            restart_schedule(sigmas, restart)
    with pytest.raises(ValueError, match="Restart needs a descending schedule"):
        restart_schedule(sigmas[::-1], RESTART_CIFAR10)
    with pytest.raises(ValueError, match="`aug_dim` must be an integer >= 1 or None"):
        sample_restart(lambda x, s: x, torch.zeros(1, 3), sigmas, RESTART_CIFAR10, 0)
    for sigma_from, sigma_to in ((0.3, 0.14), (0.2, 0.2), (-0.1, 0.3), (0.1, math.inf)):
        with pytest.raises(ValueError, match="a forward jump needs 0 <= sigma_from < sigma_to, finite; got"):
            restart_jump(torch.zeros(1, 3), sigma_from, sigma_to, 128)
