"""Restart sampling (Xu, Deng, Ahmadi, Tong, Jaakkola, NeurIPS 2023) for PFGM++ of any D (None = EDM).

Inside the deterministic Heun schedule, after the step that reaches t_min, jump forward to t_max with fresh noise and
integrate back to t_min with Heun on a short schedule, K times. The jump follows the official code
(`Newbeeer/diffusion_restart_sampling`, `benchmarks/generate_restart.py`, `restart_sampler`): for D = infinity a
Gaussian of variance t_max^2 - t_min^2; for finite D the augmented point (x, z), |z| = r_min = t_min sqrt(D), moves
along a random direction of R^{N+D} until |z| = r_max = t_max sqrt(D) (math.md §1: r = sigma sqrt(D)).
"""

import json
import math
from collections.abc import Mapping

import torch

from . import ode
from .perturbation import _standard_gamma, gaussian
from .validation import check_aug_dim

# The official PFGM++ CIFAR-10 configuration (params_cifar10_pfgmpp.txt, 18 main steps): one block of
# [N_restart, K, t_min, t_max]: 3 levels from t_max = 0.30 to t_min ~ 0.14, twice. 35 + 2 * 2 * 2 = 43 NFE.
RESTART_CIFAR10 = {"0": [3, 2, 0.14, 0.30]}


def restart_jump(x: torch.Tensor, sigma_from: float, sigma_to: float, aug_dim: int | None, generator=None):
    """The forward jump of Restart from noise level `sigma_from` up to `sigma_to` (the official code's, any D).

    D = infinity: x + sqrt(sigma_to^2 - sigma_from^2) eps, which carries the Gaussian kernel at sigma_from exactly onto
    the one at sigma_to. Finite D: the augmented coordinates z of x are a uniform direction of R^D times
    r_from = sigma_from sqrt(D) (they are not tracked by the ODE; by symmetry any direction will do), and (x, z)
    moves along a uniform random direction u of R^{N+D} scaled to |u_z| = 1 by the m < 0 with |z + m u_z| = r_to:
    x + m u_x. Only u_z . z and |u_z| enter m, so the D-dimensional vectors are not built: with u = (g, w),
    u_z . z = r_from w_1 / |w| and |w|^2 = w_1^2 + chi^2_{D-1}.

    For finite D this is not exactly the kernel at r_to after the kernel at r_from (no jump independent of x is: the
    Student-t laws are not closed under convolution), but close to it: E|x_to - x_0|^2 = N (r_to^2 + 2 r_from^2 / D) /
    (D - 2) where the kernel has N r_to^2 / (D - 2), 0.3% more at D = 128 for the CIFAR-10 block (tests).

    Draws: the Gaussian g (B, N) first, then w_1 (B,), then chi^2_{D-1} as 2 Gamma((D - 1) / 2) (B,).
    """
    if not (0 <= sigma_from < sigma_to < math.inf):
        raise ValueError(f"a forward jump needs 0 <= sigma_from < sigma_to, finite; got {sigma_from} and {sigma_to}.")
    check_aug_dim(aug_dim)
    batch_size = x.shape[0]
    g = gaussian(x.shape, generator, x.device, torch.float64)  # (B, ...)
    view = (-1,) + (1,) * (x.ndim - 1)
    if aug_dim is None:
        return (x + math.sqrt(sigma_to**2 - sigma_from**2) * g).to(x.dtype)
    r_from, r_to = sigma_from * math.sqrt(aug_dim), sigma_to * math.sqrt(aug_dim)
    w_1 = gaussian((batch_size,), generator, x.device, torch.float64)  # (B,), w's component along z
    w_sq = w_1**2
    if aug_dim > 1:
        w_sq = w_sq + 2 * _standard_gamma((aug_dim - 1) / 2, batch_size, generator, x.device)
    w_norm = w_sq.sqrt()  # (B,) = |w|
    dot = r_from * w_1 / w_norm  # (B,) = u_z . z with |u_z| = 1
    move = -dot - torch.sqrt(dot**2 + (r_to**2 - r_from**2))  # (B,), the official code's root
    return (x + (move / w_norm).reshape(view) * g).to(x.dtype)  # x + m u_x, u_x = g / |w|


def blocks_from_json(text: str) -> dict:
    """Restart blocks written as JSON (a command line's), e.g. '{"0": [3, 2, 0.14, 0.30]}'; their values are checked
    against the schedule where they are used."""
    try:
        blocks = json.loads(text)
    except json.JSONDecodeError:
        blocks = None
    if not isinstance(blocks, dict):
        raise ValueError(f"restart blocks are a JSON object of [N_restart, K, t_min, t_max] lists, got {text!r}")
    return blocks


def restart_schedule(sigmas, restart_blocks: Mapping, rho: float = 7.0):
    """The restart blocks placed on the main schedule `sigmas` (descending, usually ending at 0), checked.

    Each block of `restart_blocks`, [N_restart, K, t_min, t_max] (the official format; the keys are only labels),
    restarts after the main step that ends at the level nearest to t_min (the official code snaps t_min so), K times,
    each a jump to t_max and N_restart - 1 Heun steps back on EDM's rho-schedule from t_max to that level.

    Returns:
        `dict[int, tuple[int, torch.Tensor]]`: for each index i of `sigmas` where a block restarts, (K, its N_restart
        levels in float64, from t_max down to sigmas[i]).
    """
    if not isinstance(restart_blocks, Mapping):
        raise ValueError(
            f"`restart_blocks` must be a dict of blocks [N_restart, K, t_min, t_max], got {restart_blocks!r}."
        )
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    positive = sigmas[sigmas > 0]
    if len(sigmas) < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()) or len(positive) < 2:
        raise ValueError(f"Restart needs a descending schedule with at least two levels > 0, got {sigmas.tolist()}.")
    blocks = {}
    for name, block in restart_blocks.items():
        steps, repeats, t_min, t_max = _check_block(name, block)
        if not positive[-1] <= t_min < t_max <= sigmas[0]:
            raise ValueError(
                f"Restart block {name!r}: t_min {t_min} and t_max {t_max} must satisfy {positive[-1].item():.4g} <= "
                f"t_min < t_max <= {sigmas[0].item():.4g} (the schedule's levels)."
            )
        index = int(torch.argmin((sigmas - t_min).abs()))
        level = sigmas[index].item()
        if index == 0 or not level < t_max:
            raise ValueError(
                f"Restart block {name!r}: t_min {t_min} snaps to the schedule's level {level:.4g} (index {index}); it "
                f"must be a level after the first and below t_max {t_max}: use more steps or other t_min and t_max."
            )
        if index in blocks:
            raise ValueError(f"Restart block {name!r} snaps to the level {level:.4g} of another block: merge them.")
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        levels = (t_max ** (1 / rho) + ramp * (level ** (1 / rho) - t_max ** (1 / rho))) ** rho
        levels[-1] = level  # exactly the main level, where the main schedule resumes
        blocks[index] = (repeats, levels)
    return blocks


def _check_block(name, block):
    """A block [N_restart >= 2 (integer), K >= 1 (integer), t_min, t_max] as (int, int, float, float)."""
    message = (
        f"Restart block {name!r} must be [N_restart (integer >= 2), K (integer >= 1), t_min, t_max], got {block!r}."
    )
    if isinstance(block, (str, bytes)) or not hasattr(block, "__len__") or len(block) != 4:
        raise ValueError(message)
    steps, repeats, t_min, t_max = block
    for value, lowest in ((steps, 2), (repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(message)
    try:
        t_min, t_max = float(t_min), float(t_max)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (math.isfinite(t_min) and math.isfinite(t_max) and 0 < t_min < t_max):
        raise ValueError(f"Restart block {name!r}: need 0 < t_min < t_max, both finite, got {t_min} and {t_max}.")
    return steps, repeats, t_min, t_max


def sample_restart(
    denoise, x: torch.Tensor, sigmas, restart_blocks=None, aug_dim=None, generator=None, rho: float = 7.0
):
    """Restart sampling along the main schedule `sigmas` (descending, ending at 0): EDM's Heun (`ode.sample_heun`,
    last step Euler), with the blocks of `restart_blocks` (default `RESTART_CIFAR10`) for `aug_dim` (None = EDM).

    Network evaluations: 2n - 1 for the main n levels > 0 with a trailing 0, plus 2 K (N_restart - 1) per block; 43 for
    18 steps with the default block. `generator` drives the jumps (one generator, or one per sample).
    """
    check_aug_dim(aug_dim)
    blocks = restart_schedule(sigmas, RESTART_CIFAR10 if restart_blocks is None else restart_blocks, rho)
    start = 0
    for index in sorted(blocks):
        x = ode.sample_heun(denoise, x, sigmas[start : index + 1])
        repeats, levels = blocks[index]
        for _ in range(repeats):
            x = restart_jump(x, levels[-1].item(), levels[0].item(), aug_dim, generator)
            x = ode.sample_heun(denoise, x, levels.tolist())
        start = index
    return ode.sample_heun(denoise, x, sigmas[start:])
