"""What `PFGMScheduler` and `PFGMFieldScheduler` share: diffusers' run bookkeeping around the steps of `ode.STEPPERS`.

Both integrate dx/dsigma = (x - D(x, sigma)) / sigma (math.md §1; sigma is z for the original PFGM), map standard
Gaussian starts onto their prior, and run one model call per `step`. The subclasses give the grid's timesteps, the
preconditioning and the prior's parameters; the rules are in docs/scheduler.md.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from . import ode, prior_draws, run_checks
from .perturbation import gaussian, kernel_noise, pfgmpp_noise_from_prior, prior_from_noise, squared_norms
from .validation import check_choice, check_integer, check_number

# One logger for both schedulers' messages, under the name users filter on.
logger = logging.get_logger("pfgm_diffusers.scheduling_pfgm")


@dataclass
class PFGMSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next noise level, the input of the next model call.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The denoised estimate D(x, sigma) of the current call (`x - z v_x / v_z` for the field model).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


SCHEDULES = ("karras", "exponential")


# Why the schedulers refuse solver="restart" (a pipeline solver, ode.SAMPLERS only; docs/scheduler.md).
NO_RESTART_STEP = (
    "solver='restart' has no scheduler step: Restart jumps from t_min back up to t_max with fresh noise K times per "
    "block, so its noise levels rise and repeat inside a run, which diffusers' `step` contract cannot carry "
    "(`timesteps` passed once in descending order, `order` calls per step, `set_begin_index` and img2img's strength "
    "indexing that sequence, no generator required by `step`). Use `PFGMPipeline(...)(solver='restart', "
    "restart_blocks=...)` or `ode.SAMPLERS['restart']`; docs/scheduler.md."
)
NO_RESTART_FIELD = (
    "solver='restart' is for PFGM++ models: its forward jump follows the PFGM++ perturbation kernel at t_max, but the "
    "original PFGM's field model is trained with the perturbation of its Algorithm 2 (`pfgm_perturb`), which defines "
    "no kernel at a given z for a jump to follow (the official Restart code has no branch for it). Use 'heun', "
    "'euler', 'dpmpp_2m' or 'rk45'."
)


def check_grid_config(sigma_min, sigma_max, sigma_schedule, num_train_timesteps, rho, solver) -> None:
    """The config keys both schedulers share: finite numbers, 0 < sigma_min < sigma_max, the names."""
    for name, value in dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).items():
        check_number(name, value)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    if rho <= 0:
        raise ValueError(f"`rho` must be > 0, got {rho}.")
    check_integer("num_train_timesteps", num_train_timesteps)
    check_choice("sigma_schedule", sigma_schedule, SCHEDULES)
    check_choice("solver", solver, tuple(ode.STEPPERS))


class PriorMixin:
    """The prior of a Poisson flow scheduler, and where its runs start (docs/scheduler.md): the radial map of
    standard Gaussian noise onto the prior at r_max = sigma_max sqrt(D), its inverse, and the first sample of a run."""

    def prior_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """
        Map standard Gaussian `noise` onto the exact prior (deterministic radial quantile map, math.md §2). The
        returned tensor is recognised as a prior draw if a loop starts from it (docs/scheduler.md).

        Args:
            noise (`torch.Tensor`): N(0, I) samples (B, C, H, W).

        Returns:
            `torch.Tensor`: prior samples at r_max = sigma_max sqrt(D) (`sigma_max * noise` for `aug_dim=None`), in the
            dtype of `noise` (a radius that dtype cannot hold raises a `ValueError`).
        """
        x, radius = prior_from_noise(noise, self.config.sigma_max, self.config.aug_dim, self._upper_norm)
        return x if radius is None else prior_draws.remember(x, radius)

    def noise_from_prior(self, x: torch.Tensor) -> torch.Tensor:
        """
        The standard Gaussian latent of a prior sample: the inverse of `prior_from_noise`. Sets no state.

        Args:
            x (`torch.Tensor`): prior samples (B, C, H, W), e.g. the end of an inversion at sigma_max.

        Returns:
            `torch.Tensor`: `noise` with `prior_from_noise(noise) == x` (exact up to rounding; for radii inside the
            `upper_norm` clip where there is one).
        """
        return pfgmpp_noise_from_prior(x, self.config.sigma_max, self.config.aug_dim)

    def sample_prior(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """
        Draw the exact prior: `prior_from_noise(randn_tensor(shape, generator))`. A loop may start from the draw with
        or without `set_begin_index(0)` (docs/scheduler.md).

        Args:
            shape (`tuple`): (B, C, H, W).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per sample.
            device (`str` or `torch.device`, *optional*): where to put the samples.
            dtype (`torch.dtype`, *optional*): their dtype (float32 by default). The radii are computed in float64;
                a draw that `dtype` cannot hold (e.g. float16 with D = 1) raises a `ValueError`.

        Returns:
            `torch.Tensor`: prior samples of shape `shape`.
        """
        return self.prior_from_noise(gaussian(shape, generator, device, dtype))

    # ----- the first call of a run -----

    def _start_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The sample the run starts from (docs/scheduler.md's rule), checked once; float32 where it was mapped."""
        if self._start is not None and self._start[0] is sample:
            return self._start[1]
        generic = self._begin_index is None and self._first_index == 0
        x = sample.float() if generic and self.config.aug_dim is not None else sample  # (a no-op for float32)
        norm_sq = squared_norms(x)  # (B,): the run's one host sync
        run_checks.check_finite_start(norm_sq)
        if generic and self.config.aug_dim is not None and prior_draws.is_prior_draw(sample, norm_sq):
            generic = False  # a `sample_prior` / `prior_from_noise` draw (or a copy): already on the prior
        start = sample
        if generic:
            run_checks.warn_if_far_from_gaussian(logger, norm_sq / self.init_noise_sigma**2, sample[0].numel())
            if self.config.aug_dim is not None:
                try:  # direction kept, radius moved onto the prior's: prior_from_noise(sample / init_noise_sigma)
                    config = self.config
                    start, _ = prior_from_noise(
                        x, config.sigma_max, config.aug_dim, self._upper_norm, self.init_noise_sigma, norm_sq
                    )
                except ValueError as error:
                    raise ValueError(f"{error} {run_checks.MAPPED_START_NOTE}") from error
        self._start = (sample, start)
        return start


class PoissonFlowScheduler(PriorMixin, SchedulerMixin, ConfigMixin):
    """The run bookkeeping both schedulers share; not a scheduler of its own (docs/scheduler.md)."""

    def _init_schedule(self) -> None:
        """No sampling schedule yet: the training table of EDMEulerScheduler, so that `add_noise` and
        `scale_model_input` work before `set_timesteps`."""
        self.num_inference_steps = None
        # Opt-in per-call finiteness check (one host sync per call), an attribute so that configs stay EDM's.
        self.check_finite = False
        n = self.config.num_train_timesteps
        ramp = torch.arange(n + 1, dtype=torch.float64) / n
        self._set_schedule(self._sigmas_from_ramp(ramp).to(torch.float32), interleave=False)

    # ----- properties of the diffusers contract -----

    @property
    def init_noise_sigma(self) -> float:
        """The scale a generic loop multiplies `randn` by, EDMEulerScheduler's sqrt(sigma_max^2 + 1); the first call
        maps such a start onto the exact prior (docs/scheduler.md)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    @property
    def _stepper(self) -> ode.Stepper:
        return ode.STEPPERS[self.config.solver]

    @property
    def order(self) -> int:
        """Model calls per step as diffusers counts them: 2 for Heun, 1 for Euler and DPM-Solver++(2M)."""
        return self._stepper.order

    @property
    def step_index(self) -> int | None:
        """Index of the current model call in `timesteps`, increased by one after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep, set by a pipeline with `set_begin_index`."""
        return self._begin_index

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next `step` starts a new step (True) or is Heun's correction of the last one (False)."""
        return self._state is None or not self._stepper.repeats_levels

    def set_begin_index(self, begin_index: int = 0) -> None:
        """
        Set the index of the first timestep, for pipelines that start part-way (run after `set_timesteps`, before
        inference). A run with a begin index uses its first sample as it is (docs/scheduler.md).

        Args:
            begin_index (`int`, defaults to 0): the begin index, an integer in [0, len(timesteps) - 1].
        """
        try:
            self._begin_index = check_integer("begin_index", begin_index, 0, self._num_calls - 1)
        except ValueError as error:
            raise ValueError(f"{error} (an index of this schedule's {self._num_calls} timesteps)") from None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ----- schedule -----

    def _sigmas_from_ramp(self, ramp: torch.Tensor) -> torch.Tensor:
        """Noise levels at ramp positions in [0, 1], descending, computed as EDMEulerScheduler does."""
        sigma_min, sigma_max = self.config.sigma_min, self.config.sigma_max
        if self.config.sigma_schedule == "karras":
            rho = self.config.rho
            min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
            return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        return torch.linspace(math.log(sigma_min), math.log(sigma_max), len(ramp)).exp().flip(0)

    def _set_schedule(self, sigmas: torch.Tensor, interleave: bool) -> None:
        """Set `timesteps` (on the device of `sigmas`) and `sigmas` (on the CPU, with the final value); new run."""
        timesteps, sigmas = self._timesteps_and_final_sigmas(sigmas)
        if interleave and self._stepper.repeats_levels:
            # HeunDiscreteScheduler's layout: call i evaluates at sigmas[i]; interior levels are visited twice.
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
            timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps
        # The values on the host, so that each call's timestep is checked without a device sync.
        self._timestep_values = timesteps.tolist()
        self.sigmas = sigmas.to("cpu")  # to avoid CPU/GPU communication in `step`
        self._num_calls = len(timesteps)  # a Python int: len() of a tensor costs microseconds in every `step`
        self._step_index = None
        self._begin_index = None
        self._reset_run()

    def _reset_run(self) -> None:
        """Forget the state of the current sampling run."""
        self._first_index = None  # step index of the run's first call
        self._start = None  # (the first call's sample, the sample the run uses), shared by scale_model_input and step
        self._state = None  # what the solver carries from one call to the next (ode.STEPPERS)
        self.is_scale_input_called = False
        self._scale_warning_given = False

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """
        Set the sampling schedule (run before inference); this starts a new run.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of steps n. Heun makes 2n - 1 model calls, Euler and DPM-Solver++(2M) n.
            device (`str` or `torch.device`, *optional*):
                Where to put `timesteps` (`sigmas` stay on the CPU, as in diffusers' EDM schedulers).
            sigmas (`list[float]` or `torch.Tensor`, *optional*):
                Custom noise levels, strictly decreasing and > 0, used instead of `num_inference_steps`
                (docs/scheduler.md: the levels themselves, as in diffusers' k-diffusion schedulers).
        """
        extra = self._extra_levels  # the field grid has n + 1 levels for n steps and ends at z_min
        if sigmas is None:
            num_inference_steps = check_integer("num_inference_steps", num_inference_steps)
            sigmas = self._sigmas_from_ramp(torch.linspace(0, 1, num_inference_steps + extra, dtype=torch.float64))
        else:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            if len(sigmas) < 1 + extra:
                raise ValueError(f"`sigmas` needs at least {1 + extra} values, got {len(sigmas)}.")
            if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas[1:] < sigmas[:-1]).all()):
                raise ValueError(f"`sigmas` must be finite, > 0 and strictly decreasing, got {sigmas.tolist()}.")
            num_inference_steps = len(sigmas) - extra
        self.num_inference_steps = num_inference_steps
        self._set_schedule(sigmas.to(dtype=torch.float32, device=device), interleave=True)

    @staticmethod
    def _broadcast_over_sample(sigma, sample: torch.Tensor):
        """A (B,) sigma as (B, 1, ..., 1) on the sample's device; scalars stay as they are (diffusers' arithmetic)."""
        if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
            return sigma.to(sample.device).reshape((-1,) + (1,) * (sample.ndim - 1))
        return sigma

    def _check_output_shape(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        """Refuse an output that arithmetic would broadcast (batch 1, one channel) or that lacks the field channel."""
        expected = (sample.shape[0], self.num_output_channels(sample.shape[1]), *sample.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"The model output must have shape {expected}{self._output_channels_note} for a sample of shape"
                f" {tuple(sample.shape)}, got {tuple(model_output.shape)}."
            )

    # ----- the first call of a run -----

    def _start_run(self, timestep) -> None:
        """Find the first call's step index (diffusers' rule: the begin index, or the timestep's place)."""
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index
        self._first_index = self._step_index

    # ----- sampling -----

    def index_for_timestep(
        self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """
        Index of `timestep` in the schedule (exact float equality, as in diffusers).

        Args:
            timestep (`float` or `torch.Tensor`): one of `timesteps`.
            schedule_timesteps (`torch.Tensor`, *optional*): the schedule to search, `timesteps` by default.

        Returns:
            `int`: the index; the second one where the timestep appears twice (as diffusers' Heun does).
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not in the schedule: pass one of `scheduler.timesteps` unchanged"
                " (a cast, e.g. to float16, changes its value)."
            )
        return indices[1 if len(indices) > 1 else 0].item()

    def _begin_call(self, timestep) -> None:
        """Start the run at its first call; at every later one, check the timestep is the one the run expects."""
        run_checks.check_timestep_type(timestep)
        if self._step_index is None:
            self._start_run(timestep)
            return
        run_checks.check_timestep_order(self, timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """
        The model input for the current timestep (`precondition_inputs` at its sigma). At the first call of a generic
        run the sample is first mapped onto the exact prior (docs/scheduler.md). Before `set_timesteps` the training
        table's timesteps are accepted, as in `EDMEulerScheduler`.

        Args:
            sample (`torch.Tensor`): the current sample.
            timestep (`float` or `torch.Tensor`): the current timestep, one of `timesteps`.

        Returns:
            `torch.Tensor`: the scaled sample, in the dtype of `sample`.
        """
        self._begin_call(timestep)
        dtype = sample.dtype
        if self._step_index == self._first_index:
            sample = self._start_sample(sample)  # float32 where mapped: scaled before it returns to `dtype`
        self.is_scale_input_called = True
        scaled = self.precondition_inputs(sample, self.sigmas[self._step_index])
        return scaled if scaled.dtype == dtype else scaled.to(dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> PFGMSchedulerOutput | tuple:
        """
        Advance the probability-flow ODE by one model call: the step of `ode.STEPPERS[config.solver]` (an Euler step,
        half of a Heun step, or a DPM-Solver++(2M) step).

        Args:
            model_output (`torch.Tensor`): the model's output for `scale_model_input(sample, timestep)`, shaped like
                `sample` (C+1 channels for the field model).
            timestep (`float` or `torch.Tensor`): the current timestep, one of `timesteps`.
            sample (`torch.Tensor`): the current sample.
            s_churn (`float`, defaults to 0.0):
                EDM's stochastic churn, as in `EDMEulerScheduler`: only with `aug_dim=None` and the Euler solver, where
                Gaussian increments are exact (the PFGM++ kernel is not closed under adding noise).
            s_tmin, s_tmax, s_noise (`float`): EDM's churn range and noise scale.
            generator (`torch.Generator`, *optional*): randomness for the churn.
            return_dict (`bool`, defaults to `True`): return a `PFGMSchedulerOutput` rather than a tuple.

        Returns:
            [`PFGMSchedulerOutput`] or `tuple`: `(prev_sample, pred_original_sample)`.
        """
        if self.num_inference_steps is None:
            raise ValueError("The schedule is not set: call `set_timesteps` before `step`.")
        self._begin_call(timestep)
        if s_churn > 0 and (self.config.aug_dim is not None or self.config.solver != "euler"):
            raise ValueError(f"`s_churn` > 0 needs aug_dim=None and solver='euler', got s_churn={s_churn}.")
        if not self.is_scale_input_called and not self._scale_warning_given:
            logger.warning(run_checks.NO_SCALE_MODEL_INPUT)
            self._scale_warning_given = True
        i = self._step_index
        if i == self._first_index:
            sample = self._start_sample(sample)
            if torch.finfo(model_output.dtype).max < torch.finfo(sample.dtype).max:
                run_checks.check_representable(sample, model_output.dtype)
        # Upcast to avoid precision issues when computing prev_sample
        sample = sample.to(torch.float32)

        sigma = self.sigmas[i]
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:  # EDM's churn (Algorithm 2), as EDMEulerScheduler
            sigma_hat = sigma * (min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) + 1)
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
            sigma = sigma_hat
        denoised = self.precondition_outputs(sample, model_output, sigma)
        last = i == self._num_calls - 1
        prev_sample, self._state = self._stepper.call(sample, denoised, sigma, self.sigmas[i + 1], self._state, last)
        prev_sample = prev_sample.to(model_output.dtype)

        if self.check_finite:
            run_checks.check_finite_call(model_output, prev_sample, timestep, i, float(self.sigmas[i]))
        elif last and not run_checks.all_finite(prev_sample):  # once per run
            raise ValueError(run_checks.non_finite_run_message(i + 1 - self._first_index, model_output.dtype))
        self._step_index += 1
        if i == self._first_index:
            self._start = None
        if not return_dict:
            return (prev_sample, denoised)
        return PFGMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    # ----- training -----

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        sigmas: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """
        Perturb clean samples with the PFGM++ kernel from Gaussian `noise`: `original + kernel_noise(noise, sigma, D)`
        (`perturbation.kernel_noise`, exact, math.md §2); `aug_dim=None` is exactly `EDMEulerScheduler.add_noise`.

        Args:
            original_samples (`torch.Tensor`): clean samples (B, C, H, W).
            noise (`torch.Tensor`): standard Gaussian noise of the same shape.
            timesteps (`torch.Tensor`, *optional*): 1 or B values of the schedule's `timesteps` (as in diffusers).
            sigmas (`torch.Tensor` or `float`, *optional*): noise levels (1 or B) instead, e.g. for training.

        Returns:
            `torch.Tensor`: the noisy samples.
        """
        if (timesteps is None) == (sigmas is None):
            raise ValueError("Pass exactly one of `timesteps` (schedule values) or `sigmas` (noise levels).")
        if noise.shape != original_samples.shape:
            raise ValueError(
                f"`noise` must have the shape of `original_samples` {tuple(original_samples.shape)}, got"
                f" {tuple(noise.shape)}."
            )
        batch_size = original_samples.shape[0]
        if sigmas is None:
            sigma = self._sigmas_for_timesteps(original_samples, timesteps)
        else:
            sigma = torch.as_tensor(sigmas, dtype=original_samples.dtype).reshape(-1)
            # Finite D: kernel_noise checks the levels on the CPU, where its radii are computed anyway. D = None checks
            # levels that are on the CPU; levels already on an accelerator are not read back (a host sync per
            # training step): a bad one shows as a non-finite loss.
            if self.config.aug_dim is None and sigma.device.type == "cpu":
                if not (torch.isfinite(sigma).all() and (sigma >= 0).all()):
                    raise ValueError(f"`sigmas` must be finite and >= 0, got {sigma.tolist()}.")
            sigma = sigma.to(original_samples.device)
        if sigma.numel() not in (1, batch_size):
            raise ValueError(f"Need 1 or {batch_size} (one per sample) timesteps or sigmas, got {sigma.numel()}.")
        return original_samples + kernel_noise(noise, sigma, self.config.aug_dim)

    def _sigmas_for_timesteps(self, original_samples: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Look `timesteps` up in the schedule exactly as EDMEulerScheduler.add_noise does."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule_timesteps = self.timesteps.to(original_samples.device)
        timesteps = torch.as_tensor(timesteps).to(original_samples.device).reshape(-1)
        if self.begin_index is None:
            step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        elif self.step_index is not None:
            step_indices = [self.step_index] * timesteps.shape[0]
        else:
            step_indices = [self.begin_index] * timesteps.shape[0]
        return sigmas[step_indices].flatten()
