"""The pieces of the pipeline's ODE runs: the counted denoiser, the grid of a solver, the prior maps of a scheduler.

`PFGMPipeline` is a diffusers pipeline (check inputs, prepare latents, loop, post-process); what it integrates comes
from here, from the tables of `ode.py` (`SAMPLERS` by solver name) and from `denoiser.denoise`.
"""

import torch
from diffusers import EDMEulerScheduler
from tqdm.auto import tqdm

from . import ode
from .scheduling_common import NO_RESTART_FIELD, PoissonFlowScheduler
from .scheduling_pfgm_field import PFGMFieldScheduler

# The schedulers a pipeline runs: PFGM++ (any D), the original PFGM, and diffusers' EDM (D = infinity).
SCHEDULERS = (PoissonFlowScheduler, EDMEulerScheduler)
# Solvers that integrate from a start and an end only, choosing their own steps.
ADAPTIVE = ("rk45",)
# Solvers with no scheduler step (no entry in `ode.STEPPERS`): the pipeline runs their pure sampler.
SAMPLER_ONLY = tuple(name for name in ode.SAMPLERS if name not in ode.STEPPERS)


def check_scheduler(scheduler) -> None:
    if not isinstance(scheduler, SCHEDULERS):
        raise ValueError(
            f"Got a {type(scheduler).__name__}: PFGMPipeline runs a PFGMScheduler, a PFGMFieldScheduler or diffusers'"
            " EDMEulerScheduler (the D = infinity case, also PFGMScheduler.from_config(edm_scheduler.config,"
            " aug_dim=None))."
        )


def counted_denoiser(denoise, progress_bar_config: dict):
    """`denoise(x, sigma)` counting its calls (`counted.calls`), and a progress bar of them (no total: the adaptive
    solvers choose their number)."""
    progress = tqdm(total=None, **{"desc": "network evaluations", **progress_bar_config})

    def counted(sample, sigma):
        counted.calls += 1
        progress.update()
        return denoise(sample, sigma)

    counted.calls = 0
    return counted, progress


def is_field_model(scheduler) -> bool:
    """The field model's RK45 keeps the official state layout with z (`ode.sample_rk45(carry_sigma=True)`)."""
    return isinstance(scheduler, PFGMFieldScheduler)


def sigma_range(scheduler) -> tuple[float, float]:
    return float(scheduler.config.sigma_min), float(scheduler.config.sigma_max)


def noise_levels(scheduler, num_inference_steps: int) -> list[float]:
    """The scheduler's grid for `num_inference_steps`, descending, each level once (Heun's layout repeats them); it
    ends with 0 when sampling ends with EDM's denoising step x = D(x, sigma_min)."""
    scheduler.set_timesteps(num_inference_steps)
    return torch.unique_consecutive(scheduler.sigmas).tolist()


def check_solver(solver) -> None:
    if solver is not None and solver not in ode.SAMPLERS:
        raise ValueError(
            f"`solver` must be None (the scheduler's own) or one of {tuple(ode.SAMPLERS)}, got {solver!r}."
        )


def solver_name(scheduler, solver) -> str:
    """The solver a call runs: `solver`, or the scheduler's own (EDMEulerScheduler: Euler)."""
    check_solver(solver)
    return scheduler.config.get("solver", "euler") if solver is None else solver


def loop_scheduler(scheduler, solver):
    """The scheduler whose steps run `solver` for one call: `scheduler` itself for None or its own solver's name, else
    one of the same class and config with `solver` swapped (`scheduler` is left untouched)."""
    if solver_name(scheduler, solver) == scheduler.config.get("solver", "euler"):
        return scheduler
    if not isinstance(scheduler, PoissonFlowScheduler):
        raise ValueError(
            f"solver={solver!r} swaps the solver of a PFGMScheduler, but the scheduler is {type(scheduler).__name__}:"
            " pass None (its own steps) or 'rk45', or set `pipe.scheduler = PFGMScheduler.from_config("
            "pipe.scheduler.config, aug_dim=None)` (the same EDM model)."
        )
    return type(scheduler).from_config(scheduler.config, solver=solver)


def restart_aug_dim(scheduler) -> int | None:
    """D for Restart's forward jumps (None = EDM, also for an `EDMEulerScheduler`); the field model has none."""
    if isinstance(scheduler, PFGMFieldScheduler):
        raise ValueError(NO_RESTART_FIELD)
    return scheduler.config.get("aug_dim")


def prior_from_noise(scheduler, latents: torch.Tensor) -> torch.Tensor:
    """Standard Gaussian latents -> the ODE's state at sigma_max (docs/scheduler.md)."""
    if isinstance(scheduler, PoissonFlowScheduler):
        return scheduler.prior_from_noise(latents)
    return latents * scheduler.init_noise_sigma  # an EDM scheduler: its own generic start


def noise_from_prior(scheduler, x: torch.Tensor) -> torch.Tensor:
    """The ODE's state at sigma_max -> standard Gaussian latents (the inverse of `prior_from_noise`)."""
    if isinstance(scheduler, PoissonFlowScheduler):
        return scheduler.noise_from_prior(x)
    return x / scheduler.init_noise_sigma


def old_latents_fix(scheduler) -> str:
    """How to convert latents saved by v0.1 (prior samples) for this scheduler."""
    if isinstance(scheduler, PoissonFlowScheduler):
        return "`latents = pipe.scheduler.noise_from_prior(old)`"
    return "`latents = old / pipe.scheduler.init_noise_sigma`"
