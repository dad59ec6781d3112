"""The checks of a sampling run, at what each costs (docs/scheduler.md, "Checks, and what they cost").

Pure functions of the scheduler's state and the tensors of one call, with the messages they raise or log: the
timestep of each call against the one the run expects, the first sample of a run, and its end.
"""

import numpy as np
import torch

from .perturbation import chi2_quantiles

# A generic loop's start |sample / init_noise_sigma|^2 with a chi-square tail probability below this is not a
# `randn * init_noise_sigma` draw (a batch of a million such draws crosses it with probability ~1 %).
FAR_START_PROBABILITY = 1e-6

MAPPED_START_NOTE = (
    "This run started without a begin index, so its first sample was read as `randn * init_noise_sigma` and mapped"
    " onto the prior: if it is a prior draw or an `add_noise` output, call `scheduler.set_begin_index(...)` after"
    " `set_timesteps`."
)
NO_SCALE_MODEL_INPUT = (
    "`scale_model_input` was not called before `step` in this run, so the model saw an unscaled sample (and a generic"
    " start was not mapped onto the prior for it): call `model_input = scheduler.scale_model_input(sample, t)` and"
    " pass that to the model."
)


# ----- the timestep of each call -----


def check_timestep_type(timestep) -> None:
    """Refuse an index from `enumerate(timesteps)` and a batch of timesteps: a call takes one schedule value."""
    integer = isinstance(timestep, (int, np.integer)) or (
        isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
    )
    if integer:
        raise ValueError(
            f"Integer timestep {timestep!r}: pass one of `scheduler.timesteps` (floats), not an index from"
            " `enumerate(timesteps)`."
        )
    if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
        raise ValueError(
            f"`timestep` must be one value of `scheduler.timesteps`, got a tensor of shape {tuple(timestep.shape)}."
        )


def _index_or_value(timestep, schedule: torch.Tensor) -> tuple:
    """(index in `schedule`, None) for an element of it (metadata only, no sync), else (None, value): a host float,
    a CPU tensor read on the host, or an accelerator tensor read with one host sync."""
    if isinstance(timestep, torch.Tensor):
        if (
            timestep.device == schedule.device
            and timestep.dtype == schedule.dtype
            and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()
        ):
            return (timestep.storage_offset() - schedule.storage_offset(), None)
        return (None, timestep.item())
    return (None, float(timestep))


def check_timestep_order(scheduler, timestep) -> None:
    """Refuse a call after the run's last one, and a timestep that is not `timesteps[step_index]`: the scheduler
    steps by its own index, so another timestep would be stepped at a sigma the network was not told."""
    index, value = _index_or_value(timestep, scheduler.timesteps)
    values, step_index = scheduler._timestep_values, scheduler._step_index
    given = f"timesteps[{index}] = {values[index]:.6g}" if index is not None else f"{value:.6g}"
    if step_index >= len(values):
        first = scheduler._first_index
        hint = ""
        if first == len(values) - 1 and len(values) > 1:
            hint = (
                ", the last one: its place was found from the timestep, so is this a loop over `reversed(timesteps)`?"
                " Pass the timesteps in the order of `scheduler.timesteps`"
            )
        raise ValueError(
            f"Got timestep {given} after the last call of this run (it started at timesteps[{first}]{hint}). Call"
            " `set_timesteps` to start another run."
        )
    expected = values[step_index]
    if (values[index] if index is not None else value) != expected:
        raise ValueError(
            f"Got timestep {given} at call {step_index} of this run, which expects timesteps[{step_index}] ="
            f" {expected:.6g}: pass the timesteps in the order of `scheduler.timesteps`, each unchanged (not"
            " `reversed(timesteps)`, not shuffled, not cast). To start part-way, call `set_begin_index(i)` after"
            " `set_timesteps`."
        )


# ----- the first sample of a run -----


def check_finite_start(norm_sq: np.ndarray) -> None:
    """NaN or inf in the first sample are the latents' fault (or the `add_noise` output's), not the model's."""
    if not np.all(np.isfinite(norm_sq)):
        bad = np.flatnonzero(~np.isfinite(norm_sq)).tolist()
        raise ValueError(
            f"The first sample of this run contains NaN or inf (batch items {bad}): the latents, or the `add_noise`"
            " output, are not finite."
        )


def warn_if_far_from_gaussian(logger, norm_sq: np.ndarray, N: int) -> None:
    """Warn of a generic start whose |sample / init_noise_sigma|^2 = `norm_sq` no chi-square draw would give."""
    lower, upper = chi2_quantiles(norm_sq, N)
    tail = np.minimum(lower, upper)
    if tail.min() < FAR_START_PROBABILITY:
        i = int(np.argmin(tail))
        side = "small" if lower[i] < upper[i] else "large"
        logger.warning(
            f"The first sample of this run is not a `randn * init_noise_sigma` draw: |sample / init_noise_sigma|^2"
            f" of batch item {i} is {norm_sq[i]:.4g}, too {side} for a chi-square law with {N} degrees of freedom"
            f" (tail probability {tail[i]:.3g}). A loop that starts at the top of the schedule without a begin"
            " index must start from `randn_tensor(shape) * scheduler.init_noise_sigma` (DDPMPipeline passes a"
            " plain `randn`), which the scheduler maps onto the prior. To start from a prior draw"
            " (`sample_prior`) or an `add_noise` output instead, call `scheduler.set_begin_index(...)` after"
            " `set_timesteps` (latents saved by the previous release are prior samples: convert them with"
            " `scheduler.noise_from_prior(old)`)."
        )


def check_representable(sample: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a start that the model output's dtype cannot hold (every step returns that dtype)."""
    largest = sample.detach().abs().max().item()
    if largest > torch.finfo(dtype).max:
        raise ValueError(
            f"The first sample of this run reaches {largest:.4g}, more than {dtype} can hold"
            f" ({torch.finfo(dtype).max:.4g}): run the model output in float32, or clip the prior (`upper_norm`)."
        )


# ----- the end of a run, and the opt-in per-call check -----


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite, from one sum (cheaper than isfinite(x).all()); confirmed element-wise where
    the sum alone is not finite (it can overflow)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def non_finite_run_message(num_calls: int, dtype: torch.dtype) -> str:
    return (
        f"The sample became NaN or inf during this run of {num_calls} model calls (its first sample was finite): a"
        f" model output was not finite, or a step overflowed {dtype}. Set `scheduler.check_finite = True` to raise"
        " at the first such call."
    )


def check_finite_call(model_output, prev_sample, timestep, step_index: int, sigma: float) -> None:
    """The opt-in `check_finite` check of one call (two host syncs)."""
    where = f"call {step_index} (timestep {float(timestep):.6g}, sigma {sigma:.6g})"
    if not torch.isfinite(model_output).all():
        raise ValueError(f"The model output at {where} contains NaN or inf.")
    if not torch.isfinite(prev_sample).all():
        raise ValueError(f"The step at {where} overflowed {prev_sample.dtype}: its result contains inf or NaN.")
