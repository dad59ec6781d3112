"""`PFGMScheduler`: PFGM++ for any D and the original PFGM, as a drop-in diffusers scheduler.

PFGM++ (Xu et al., ICML 2023) shares EDM's probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma once
r = sigma * sqrt(D); only the perturbation kernel (`add_noise`) and the prior (`sample_prior`) depend on D
(math.md §1–§2). The original PFGM (Xu et al., NeurIPS 2022) is the field mode: a network predicting the normalised
Poisson field, stepped in z on the same code path through D(x, z) = x - z v_x / v_z (math.md §1, §3).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import ode, preconditioning
from .field import field_dx_dz
from .perturbation import (
    kernel_noise,
    pfgm_prior_from_noise,
    pfgmpp_noise_from_prior,
    pfgmpp_prior_from_noise,
    sample_pfgm_prior,
    sample_pfgmpp_prior,
)

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "poisson_field")
_SOLVERS = ("heun", "euler")
_SCHEDULES = ("karras", "exponential")
_FINAL_SIGMAS = ("zero", "sigma_min")


@dataclass
class PFGMSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next noise level, the input of the next model call.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The denoised estimate D(x, sigma) of the current call (`x - z v_x / v_z` in field mode).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class PFGMScheduler(SchedulerMixin, ConfigMixin):
    """
    Sampler and noise kernel of Poisson flow generative models: PFGM++ for any augmentation dimension D
    ([Xu et al. 2023](https://huggingface.co/papers/2302.04265)) and the original PFGM
    ([Xu et al. 2022](https://huggingface.co/papers/2209.11178)).

    The config is `EDMEulerScheduler`'s (same keys, same defaults, so `from_config` swaps both ways) plus `aug_dim`,
    `solver` and the field-mode options. D = 1 is PFGM, `aug_dim=None` (D = infinity) is EDM exactly.

    Starting point: [`~PFGMScheduler.sample_prior`] draws the exact prior, a heavy-tailed radial law that no
    `randn * init_noise_sigma` can produce. A generic diffusers loop that starts from `randn * init_noise_sigma`
    still samples the exact prior: on the first step of a run the scheduler divides that sample by
    `init_noise_sigma` and moves its radius through the quantiles onto the prior (the map of math.md §2,
    deterministic and exact in distribution). A run that starts from `sample_prior` (or after
    [`~PFGMScheduler.mark_prior_sample`], e.g. for latents from an inversion) is used as it is. With
    `aug_dim=None` the Gaussian start is already the prior and nothing is mapped, exactly as in `EDMEulerScheduler`.

    Args:
        sigma_min (`float`, defaults to 0.002):
            Smallest noise level of the schedule (z_min in field mode; the official PFGM uses 1e-3).
        sigma_max (`float`, defaults to 80.0):
            Largest noise level; the prior has r_max = sigma_max * sqrt(D) (z_max in field mode, 40 for CIFAR-10).
        sigma_data (`float`, defaults to 0.5):
            Standard deviation of the data, for EDM's preconditioning.
        sigma_schedule (`str`, defaults to `"karras"`):
            `"karras"` (EDM's rho-schedule) or `"exponential"` (uniform in log sigma; the official PFGM grid in z).
        num_train_timesteps (`int`, defaults to 1000):
            Size of the training sigma table (as in `EDMEulerScheduler`); `__len__` returns it.
        prediction_type (`str`, defaults to `"epsilon"`):
            `"epsilon"` (EDM's F-preconditioning, as in `EDMEulerScheduler`), `"v_prediction"`, `"sample"` (the
            model returns the denoised image) or `"poisson_field"` (the original PFGM: C+1 output channels, the
            z-component is the spatial mean of the extra channel; the network gets the raw z as its timestep and the
            unscaled sample, as in the official code; requires `aug_dim=1`).
        rho (`float`, defaults to 7.0):
            Exponent of the Karras schedule.
        final_sigmas_type (`str`, defaults to `"zero"`):
            `"zero"` or `"sigma_min"`: the last noise level of the sampling schedule. Field mode always ends at
            z_min with no final denoising step (official PFGM).
        aug_dim (`int` or `None`, defaults to 128):
            D, the number of augmented dimensions, an integer >= 1; `None` means D = infinity (diffusion, EDM).
        solver (`str`, defaults to `"heun"`):
            `"heun"`: EDM's second-order sampler with a plain Euler last step, 2n - 1 model calls for n steps, laid out
            as diffusers' `HeunDiscreteScheduler` (interior timesteps repeated, one model call per timestep);
            `"euler"`: n calls.
        gamma (`float`, defaults to 5.0):
            Field mode: the gamma of the normalised field v = sqrt(N) g / (|g| + gamma), used by the `z_exp` safeguard.
        z_exp (`float`, *optional*):
            Field mode: below this z, v_z is rebuilt from v_x (official: 5 for CIFAR-10, 1 for CelebA). `None`: off.
        upper_norm (`float`, *optional*):
            Field mode: clip the prior radius to [1, upper_norm] as the official code does (3000 for CIFAR-10, 6000 for
            CelebA 64). `None`: the exact prior.
        vz_eps (`float`, defaults to 1e-5):
            Field mode: added to v_z in dx/dz = v_x / (v_z + vz_eps) as in the official sampler; 0 turns it off.
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
        aug_dim: int | None = 128,
        solver: str = "heun",
        gamma: float = 5.0,
        z_exp: float | None = None,
        upper_norm: float | None = None,
        vz_eps: float = 1e-5,
    ):
        if aug_dim is not None and (isinstance(aug_dim, bool) or not isinstance(aug_dim, (int, np.integer))):
            raise ValueError(f"`aug_dim` must be an integer >= 1 or None (D = infinity), got {aug_dim!r}.")
        if aug_dim is not None and aug_dim < 1:
            raise ValueError(f"`aug_dim` must be an integer >= 1 or None (D = infinity), got {aug_dim!r}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if sigma_schedule not in _SCHEDULES:
            raise ValueError(f"`sigma_schedule` must be one of {_SCHEDULES}, got {sigma_schedule!r}.")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")
        if solver not in _SOLVERS:
            raise ValueError(f"`solver` must be one of {_SOLVERS}, got {solver!r}.")
        if final_sigmas_type not in _FINAL_SIGMAS:
            raise ValueError(f"`final_sigmas_type` must be one of {_FINAL_SIGMAS}, got {final_sigmas_type!r}.")
        if prediction_type == "poisson_field" and aug_dim != 1:
            raise ValueError(
                f"`prediction_type='poisson_field'` is the original PFGM and needs aug_dim=1, got {aug_dim}."
            )
        if gamma < 0 or vz_eps < 0:
            raise ValueError(f"`gamma` and `vz_eps` must be >= 0, got gamma={gamma}, vz_eps={vz_eps}.")
        if z_exp is not None and z_exp <= 0:
            raise ValueError(f"`z_exp` must be > 0 or None, got {z_exp}.")
        if upper_norm is not None and upper_norm < 1:
            raise ValueError(f"`upper_norm` must be >= 1 or None, got {upper_norm}.")

        self.num_inference_steps = None
        # The training table of EDMEulerScheduler, so that `add_noise` with its timesteps works before set_timesteps.
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self._set_schedule(self._sigmas_from_ramp(ramp).to(torch.float32), interleave=False)
        self.is_scale_input_called = False
        self._start_is_prior = False

    # ----- properties of the diffusers contract -----

    @property
    def init_noise_sigma(self) -> float:
        """The scale a generic loop multiplies `randn` by, EDMEulerScheduler's sqrt(sigma_max^2 + 1); the first step
        maps such a start onto the exact prior (see the class docstring)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    @property
    def order(self) -> int:
        """2 for Heun (two model calls per step), 1 for Euler."""
        return 2 if self.config.solver == "heun" else 1

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
        return self._heun_state is None

    @property
    def _field_mode(self) -> bool:
        return self.config.prediction_type == "poisson_field"

    def set_begin_index(self, begin_index: int = 0) -> None:
        """
        Set the index of the first timestep, for pipelines that start part-way (run before inference).

        Args:
            begin_index (`int`, defaults to 0): the begin index.
        """
        self._begin_index = begin_index

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
        """Set `timesteps` (on the device of `sigmas`) and `sigmas` (on the CPU, with the final value)."""
        if self._field_mode:
            # The grid ends at z_min (no final denoising step); the network sees the raw z (official PFGM).
            timesteps, sigmas = sigmas[:-1].clone(), sigmas
        else:
            timesteps = self.precondition_noise(sigmas)
            sigma_last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
            sigmas = torch.cat([sigmas, torch.full((1,), fill_value=sigma_last, device=sigmas.device)])
        if interleave and self.config.solver == "heun":
            # HeunDiscreteScheduler's layout: call i evaluates at sigmas[i]; interior levels are visited twice.
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
            timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps
        self.sigmas = sigmas.to("cpu")  # to avoid CPU/GPU communication in `step`
        self._step_index = None
        self._begin_index = None
        self._heun_state = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """
        Set the sampling schedule (run before inference).

        Args:
            num_inference_steps (`int`, *optional*):
                The number of steps n. Heun makes 2n - 1 model calls, Euler n.
            device (`str` or `torch.device`, *optional*):
                Where to put `timesteps` (`sigmas` stay on the CPU, as in diffusers' EDM schedulers).
            sigmas (`list[float]` or `torch.Tensor`, *optional*):
                Custom noise levels, strictly decreasing and > 0, used instead of `num_inference_steps`. The final
                value of `final_sigmas_type` is appended; in field mode the last one given is z_min. (Unlike
                `EDMEulerScheduler`, which reads `sigmas` as positions in [0, 1] along its schedule, these are the
                noise levels themselves, as in diffusers' other k-diffusion schedulers.)
        """
        if sigmas is None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps}.")
            num_levels = num_inference_steps + 1 if self._field_mode else num_inference_steps
            sigmas = self._sigmas_from_ramp(torch.linspace(0, 1, num_levels, dtype=torch.float64))
        else:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            if len(sigmas) < (2 if self._field_mode else 1):
                raise ValueError(f"`sigmas` needs at least {2 if self._field_mode else 1} values, got {len(sigmas)}.")
            if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas[1:] < sigmas[:-1]).all()):
                raise ValueError(f"`sigmas` must be finite, > 0 and strictly decreasing, got {sigmas.tolist()}.")
            num_inference_steps = len(sigmas) - 1 if self._field_mode else len(sigmas)
        self.num_inference_steps = num_inference_steps
        self._set_schedule(sigmas.to(dtype=torch.float32, device=device), interleave=True)

    # ----- preconditioning, at any sigma (these are the ODE's building blocks) -----

    @staticmethod
    def _per_sample(sigma, sample: torch.Tensor):
        """A (B,) sigma as (B, 1, ..., 1) on the sample's device; scalars stay as they are (diffusers' arithmetic)."""
        if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
            return sigma.to(sample.device).reshape((-1,) + (1,) * (sample.ndim - 1))
        return sigma

    def precondition_inputs(self, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model input at noise level `sigma`: c_in(sigma) * sample (EDM), the sample itself in field mode.

        Args:
            sample (`torch.Tensor`): the noisy sample.
            sigma (`float` or `torch.Tensor`): a scalar or one noise level per sample (B,).

        Returns:
            `torch.Tensor`: the scaled sample.
        """
        if self._field_mode:
            return sample
        return sample * preconditioning.c_in(self._per_sample(sigma, sample), self.config.sigma_data)

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model's timestep for noise level `sigma`: c_noise = ln(sigma) / 4 (EDM), the raw z in field mode.

        Args:
            sigma (`float` or `torch.Tensor`): a scalar or (B,) noise levels.

        Returns:
            `torch.Tensor`: the timestep(s).
        """
        if self._field_mode:
            return sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma])
        return preconditioning.c_noise(sigma)

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: float | torch.Tensor
    ) -> torch.Tensor:
        """
        The denoised estimate D(x, sigma) from the model output, so that dx/dsigma = (x - D) / sigma in every mode.

        Args:
            sample (`torch.Tensor`): the noisy sample x.
            model_output (`torch.Tensor`): the raw model output (C+1 channels in field mode).
            sigma (`float` or `torch.Tensor`): a scalar or (B,) noise levels (z in field mode).

        Returns:
            `torch.Tensor`: D(x, sigma), shaped like `sample`.
        """
        prediction_type = self.config.prediction_type
        if prediction_type == "sample":
            return model_output
        if prediction_type == "poisson_field":
            if model_output.ndim != sample.ndim or model_output.shape[1] != sample.shape[1] + 1:
                raise ValueError(
                    f"Field mode needs a model output with C+1 = {sample.shape[1] + 1} channels (the extra one is"
                    f" the z-component), got shape {tuple(model_output.shape)} for a sample of shape"
                    f" {tuple(sample.shape)}."
                )
            dx_dz = field_dx_dz(model_output, sigma, self.config.gamma, self.config.z_exp, self.config.vz_eps)
            return sample - self._per_sample(sigma, sample) * dx_dz
        sigma = self._per_sample(sigma, sample)
        sigma_data = self.config.sigma_data
        c_out = preconditioning.c_out(sigma, sigma_data)
        if prediction_type == "v_prediction":
            c_out = -c_out
        return preconditioning.c_skip(sigma, sigma_data) * sample + c_out * model_output

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 for training (math.md §2)."""
        return preconditioning.loss_weight(sigma, self.config.sigma_data)

    # ----- the prior -----

    def prior_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """
        Map standard Gaussian `noise` onto the exact prior (deterministic radial quantile map, math.md §2).

        Args:
            noise (`torch.Tensor`): N(0, I) samples (B, C, H, W).

        Returns:
            `torch.Tensor`: prior samples, the PFGM++ prior at r_max = sigma_max sqrt(D), or the original PFGM's
            hyperplane prior in field mode.
        """
        if self._field_mode:
            return pfgm_prior_from_noise(noise, self.config.sigma_max, self.config.upper_norm)
        return pfgmpp_prior_from_noise(noise, self.config.sigma_max, self.config.aug_dim)

    def noise_from_prior(self, x: torch.Tensor) -> torch.Tensor:
        """
        The standard Gaussian latent of a prior sample: the inverse of [`~PFGMScheduler.prior_from_noise`].

        Args:
            x (`torch.Tensor`): prior samples (B, C, H, W), e.g. the end of an inversion at sigma_max.

        Returns:
            `torch.Tensor`: `noise` with `prior_from_noise(noise) == x` (exact up to rounding; in field mode exact for
            radii inside the `upper_norm` clip).
        """
        aug_dim = 1 if self._field_mode else self.config.aug_dim
        return pfgmpp_noise_from_prior(x, self.config.sigma_max, aug_dim)

    def num_output_channels(self, num_channels: int) -> int:
        """The number of model output channels this prediction type needs for `num_channels` image channels: C + 1
        in field mode (the extra channel is the z-component, math.md §3), C otherwise."""
        return num_channels + 1 if self._field_mode else num_channels

    def sample_prior(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """
        Draw the exact prior; the next sampling run starts from it as it is.

        Args:
            shape (`tuple`): (B, C, H, W).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per sample.
            device (`str` or `torch.device`, *optional*): where to put the samples.
            dtype (`torch.dtype`, *optional*): their dtype (float32 by default).

        Returns:
            `torch.Tensor`: prior samples of shape `shape`.
        """
        if self._field_mode:
            x = sample_pfgm_prior(shape, self.config.sigma_max, self.config.upper_norm, generator, device, dtype)
        else:
            x = sample_pfgmpp_prior(shape, self.config.sigma_max, self.config.aug_dim, generator, device, dtype)
        self._start_is_prior = True
        return x

    def mark_prior_sample(self) -> None:
        """Declare that the next sampling run starts from a prior sample (e.g. latents from an inversion), so the
        first step uses it as it is instead of mapping a `randn * init_noise_sigma` start onto the prior."""
        self._start_is_prior = True

    def _start_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """At the first call of a run, map a generic loop's `randn * init_noise_sigma` start onto the exact prior."""
        if self._step_index != 0 or self._start_is_prior or (self.config.aug_dim is None and not self._field_mode):
            return sample
        return self.prior_from_noise(sample / self.init_noise_sigma)

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

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _check_call(self, timestep) -> None:
        if self.num_inference_steps is None:
            raise ValueError("The schedule is not set: call `set_timesteps` before `scale_model_input` or `step`.")
        integer = isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
        )
        if integer:
            raise ValueError(
                f"Integer timestep {timestep!r}: pass one of `scheduler.timesteps` (floats), not an index from"
                " `enumerate(timesteps)`."
            )
        if self.step_index is None:
            self._init_step_index(timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """
        The model input for the current timestep (`precondition_inputs` at its sigma). On the first call of a run
        started from `randn * init_noise_sigma`, the sample is first mapped onto the exact prior.

        Args:
            sample (`torch.Tensor`): the current sample.
            timestep (`float` or `torch.Tensor`): the current timestep, one of `timesteps`.

        Returns:
            `torch.Tensor`: the scaled sample.
        """
        self._check_call(timestep)
        sample = self._start_sample(sample)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[self.step_index])

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
        Advance the probability-flow ODE by one model call: an Euler step, or half of a Heun step.

        Args:
            model_output (`torch.Tensor`): the model's output for `scale_model_input(sample, timestep)`.
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
        self._check_call(timestep)
        if s_churn > 0 and (self.config.aug_dim is not None or self.config.solver != "euler"):
            raise ValueError(f"`s_churn` > 0 needs aug_dim=None and solver='euler', got s_churn={s_churn}.")
        if torch.isnan(model_output).any():
            raise ValueError(f"The model output at timestep {float(timestep)} contains NaN.")
        starting = self._step_index == 0
        # Upcast to avoid precision issues when computing prev_sample
        sample = self._start_sample(sample.to(torch.float32))

        sigma = self.sigmas[self.step_index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        pred_original_sample = self.precondition_outputs(sample, model_output, sigma_hat)
        derivative = ode.to_d(sample, pred_original_sample, sigma_hat)  # dx/dsigma (dx/dz in field mode)
        if self._heun_state is None:
            sigma_next = self.sigmas[self.step_index + 1]
            prev_sample = ode.euler_step(sample, derivative, sigma_hat, sigma_next)
            last_call = self.step_index == len(self.timesteps) - 1
            if self.config.solver == "heun" and not last_call:
                self._heun_state = (sample, derivative, sigma_hat)  # corrected at the next call, at sigma_next
        else:
            sample_start, derivative_start, sigma_start = self._heun_state
            prev_sample = ode.heun_step(sample_start, derivative_start, derivative, sigma_start, sigma)
            self._heun_state = None

        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if starting:
            self._start_is_prior = False
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PFGMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # ----- training -----

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        sigmas: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """
        Perturb clean samples with the PFGM++ kernel, from Gaussian `noise` (math.md §2).

        `original + kernel_noise(noise, sigma, D)`: the direction of each sample's noise is kept and its radius is
        moved through the quantiles, so `noise = randn` gives an exact draw of p_r(y | x), r = sigma sqrt(D). With
        `aug_dim=None` this is `original + sigma * noise`, exactly `EDMEulerScheduler.add_noise`. The official training
        clips Beta draws to [1e-3, 1 - 1e-3]; here the kernel is exact (the clip binds often for D << N/100).

        Args:
            original_samples (`torch.Tensor`): clean samples (B, C, H, W).
            noise (`torch.Tensor`): standard Gaussian noise of the same shape.
            timesteps (`torch.Tensor`, *optional*): (B,) values of the schedule's `timesteps` (as in diffusers).
            sigmas (`torch.Tensor` or `float`, *optional*): continuous noise levels (B,) instead, e.g. for training.

        Returns:
            `torch.Tensor`: the noisy samples.
        """
        if (timesteps is None) == (sigmas is None):
            raise ValueError("Pass exactly one of `timesteps` (schedule values) or `sigmas` (noise levels).")
        if sigmas is None:
            sigma = self._sigmas_for_timesteps(original_samples, timesteps)
        else:
            sigma = torch.as_tensor(sigmas, dtype=original_samples.dtype, device=original_samples.device)
            if not (torch.isfinite(sigma).all() and (sigma >= 0).all()):
                raise ValueError(f"`sigmas` must be finite and >= 0, got {sigma.tolist()}.")
            sigma = sigma.reshape(-1)
        aug_dim = 1 if self._field_mode else self.config.aug_dim
        if aug_dim is None:
            while len(sigma.shape) < len(original_samples.shape):
                sigma = sigma.unsqueeze(-1)
            return original_samples + noise * sigma
        return original_samples + kernel_noise(noise, sigma, aug_dim)

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
