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


def data_end(scheduler, levels) -> float:
    """Where a sampling run along the grid `levels` (`noise_levels`) lands on the data, whose step `ode.sample_heun`
    takes with Euler (`data_end=`): the field model's z_min, its grid's last level; 0 for PFGM++ and EDM."""
    return float(levels[-1]) if is_field_model(scheduler) else 0.0


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


def check_solver_options(scheduler, name: str, max_evaluations=None, restart_blocks=None) -> None:
    """Each option for its solver only: `max_evaluations` for the adaptive solvers, `restart_blocks` for Restart,
    which the field model has not (checked before any network call)."""
    if max_evaluations is not None and name not in ADAPTIVE:
        raise ValueError(f"`max_evaluations` bounds the adaptive solvers {ADAPTIVE}, got solver={name!r}.")
    if restart_blocks is not None and name != "restart":
        raise ValueError(f"`restart_blocks` are the blocks of solver='restart', got solver={name!r}.")
    if name == "restart":
        restart_aug_dim(scheduler)


def sample_without_steps(name: str, scheduler, denoise, latents, num_inference_steps: int, **options):
    """A pipeline run of a solver with no scheduler step (`SAMPLER_ONLY`) from standard Gaussian `latents`:
    `"rk45"` from sigma_max to sigma_min (`rtol`, `atol`, `max_evaluations`), then EDM's last Euler step
    x = D(x, sigma_min) when the scheduler's grid ends at 0; `"restart"` along the grid of `num_inference_steps`
    (`restart_blocks`, `generator`)."""
    x = prior_from_noise(scheduler, latents)
    levels = noise_levels(scheduler, num_inference_steps)
    if name == "restart":
        blocks, generator = options.get("restart_blocks"), options.get("generator")
        return ode.SAMPLERS[name](denoise, x, levels, blocks, aug_dim=restart_aug_dim(scheduler), generator=generator)
    sigma_min, sigma_max = sigma_range(scheduler)
    rk45 = {key: options[key] for key in ("rtol", "atol", "max_evaluations") if key in options}
    x = ode.SAMPLERS[name](denoise, x, [sigma_max, sigma_min], carry_sigma=is_field_model(scheduler), **rk45)
    return denoise(x, sigma_min) if levels[-1] == 0 else x  # EDM's last Euler step to 0


def check_img2img(image, strength, solver) -> float | None:
    """The `strength` of an img2img call (0.8 by default with `image`): refused without `image`, outside (0, 1], or
    with a solver that walks no scheduler grid (`SAMPLER_ONLY`)."""
    if image is None:
        if strength is not None:
            raise ValueError(
                f"strength={strength!r} was given without `image`: it sets how far down to start from it."
            )
        return None
    strength = 0.8 if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}.")
    if solver in SAMPLER_ONLY:
        name = {"rk45": "RK45", "restart": "Restart"}.get(solver, solver)
        raise ValueError(
            f"`image` with solver={solver!r}: strength selects a step of the scheduler's grid, and {name} has none; "
            "pass a grid solver (None, 'heun', 'euler', ...)."
        )
    return strength


def img2img_start(scheduler, image: torch.Tensor, noise: torch.Tensor, num_inference_steps: int, strength: float):
    """diffusers' img2img start on a scheduler whose timesteps are set: the last int(n * strength) of the n steps run
    (`set_begin_index`), from `image` noised to the first of their levels by `add_noise` (a kernel draw with the
    standard Gaussian `noise`)."""
    steps = min(int(num_inference_steps * strength), num_inference_steps)
    if steps < 1:  # diffusers' img2img pipelines refuse this too: no step would run, the image returned as it is
        raise ValueError(
            f"strength={strength} runs int({num_inference_steps} * {strength}) = 0 of the {num_inference_steps} "
            f"steps: pass strength >= 1 / num_inference_steps ({1 / num_inference_steps:.3g}) or more steps."
        )
    t_start = num_inference_steps - steps
    scheduler.set_begin_index(t_start * scheduler.order)
    start = scheduler.timesteps[t_start * scheduler.order :][:1].repeat(image.shape[0])
    return scheduler.add_noise(image.to(noise.device), noise, start)


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
