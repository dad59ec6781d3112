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
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from . import ode, preconditioning, prior_draws
from .field import field_dx_dz
from .perturbation import (
    chi2_quantiles,
    gaussian,
    kernel_noise,
    kernel_radius,
    pfgm_prior_radius,
    pfgmpp_noise_from_prior,
    rescale_radii,
    squared_norms,
)

logger = logging.get_logger(__name__)

# The ODE solvers of `step`, the names the pipeline and the scripts accept (docs/scheduler.md).
SOLVERS = ("heun", "euler", "dpmpp_2m")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "poisson_field")
_SCHEDULES = ("karras", "exponential")
_FINAL_SIGMAS = ("zero", "sigma_min")
# A generic loop's start |sample / init_noise_sigma|^2 with a chi-square tail probability below this is not a
# `randn * init_noise_sigma` draw (a batch of a million such draws crosses it with probability ~1 %).
_FAR_START_PROBABILITY = 1e-6


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


def _check_number(name, value, optional=False):
    """Refuse a config value that is not a finite real number (NaN and inf pass `<` checks and fail later)."""
    if optional and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
    ):
        raise ValueError(f"`{name}` must be a finite number{' or None' if optional else ''}, got {value!r}.")


class PFGMScheduler(SchedulerMixin, ConfigMixin):
    """
    Sampler and noise kernel of Poisson flow generative models: PFGM++ for any augmentation dimension D
    ([Xu et al. 2023](https://huggingface.co/papers/2302.04265)) and the original PFGM
    ([Xu et al. 2022](https://huggingface.co/papers/2209.11178)).

    The config is `EDMEulerScheduler`'s (same keys, same defaults, so `from_config` swaps both ways) plus `aug_dim`,
    `solver` and the field-mode options. D = 1 is PFGM, `aug_dim=None` (D = infinity) is EDM exactly.

    Where a sampling run starts. Latents are standard Gaussian, as everywhere in diffusers; only the scheduler maps
    them onto the PFGM++ prior, a heavy-tailed radial law that no `randn * init_noise_sigma` can produce:

    - A run that begins at the top of the schedule with no begin index (`begin_index is None`, first call at step
      index 0) is a generic diffusers loop started from `randn * init_noise_sigma`. At its first call
      (`scale_model_input` and `step`) the scheduler maps that sample onto the exact prior,
      `prior_from_noise(sample / init_noise_sigma)`: each sample's direction is kept and its radius moved through the
      quantiles (math.md §2), deterministic and exact in distribution. With `aug_dim=None` nothing is mapped (bit for
      bit `EDMEulerScheduler`).
    - A run that sets a begin index (`set_begin_index(i)` after `set_timesteps`, as diffusers' img2img pipelines do,
      also at strength 1.0 where i = 0) uses its sample as it is: an `add_noise` output at `timesteps[i]`, or an exact
      prior draw from [`~PFGMScheduler.sample_prior`] (start such a loop with `set_begin_index(0)`).

    Nothing else decides it: [`~PFGMScheduler.sample_prior`], [`~PFGMScheduler.prior_from_noise`] and
    [`~PFGMScheduler.noise_from_prior`] set no state. The first sample of every run is checked (NaN or inf raise a
    `ValueError`), and a generic start far from `randn * init_noise_sigma` (e.g. a plain `randn`, as `DDPMPipeline`
    passes) gets a warning naming the fix. Per call nothing is synchronised with the host: a run whose sample became
    non-finite raises once, at its last call; set the attribute `check_finite = True` (not a config key, off by
    default) to check every model output and step and raise at the first bad one.

    Args:
        sigma_min (`float`, defaults to 0.002):
            Smallest noise level of the schedule (z_min in field mode; the official PFGM uses 1e-3).
        sigma_max (`float`, defaults to 80.0):
            Largest noise level; the prior has r_max = sigma_max * sqrt(D) (z_max in field mode, 40 for CIFAR-10).
        sigma_data (`float`, defaults to 0.5):
            Standard deviation of the data, for EDM's preconditioning; > 0.
        sigma_schedule (`str`, defaults to `"karras"`):
            `"karras"` (EDM's rho-schedule) or `"exponential"` (uniform in log sigma; the official PFGM grid in z).
        num_train_timesteps (`int`, defaults to 1000):
            Size of the training sigma table (as in `EDMEulerScheduler`); `__len__` returns it.
        prediction_type (`str`, defaults to `"epsilon"`):
            `"epsilon"` (EDM's F-preconditioning, as in `EDMEulerScheduler`), `"v_prediction"`, `"sample"` (the
            model returns the denoised image) or `"poisson_field"`: the original PFGM, which needs `aug_dim=1` (its
            prior is the D = 1 prior at z_max = `sigma_max`). Its network has C+1 output channels (the z-component is
            the spatial mean of the extra channel) and gets the unscaled sample and the raw z as its timestep, as in
            the official code; its grid ends at z_min with no final denoising step.
        rho (`float`, defaults to 7.0):
            Exponent of the Karras schedule; > 0.
        final_sigmas_type (`str`, defaults to `"zero"`):
            `"zero"` or `"sigma_min"`: the last noise level of the sampling schedule (field mode: always z_min).
        aug_dim (`int` or `None`, defaults to 128):
            D, the number of augmented dimensions, an integer >= 1; `None` means D = infinity (diffusion, EDM).
        solver (`str`, defaults to `"heun"`):
            One of `SOLVERS`. `"heun"`: EDM's second-order sampler with a plain Euler last step, 2n - 1 model calls
            for n steps, laid out as diffusers' `HeunDiscreteScheduler` (interior timesteps repeated, one model call
            per timestep, `order = 2`); `"euler"`: n calls; `"dpmpp_2m"`: DPM-Solver++(2M)
            ([Lu et al. 2022](https://huggingface.co/papers/2211.01095)), n calls, second order from the previous
            call's denoised estimate (first order at the first call and into sigma = 0), as diffusers'
            `EDMDPMSolverMultistepScheduler` (`order = 1`).
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
        numbers = dict(
            sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho, gamma=gamma, vz_eps=vz_eps
        )
        for name, value in numbers.items():
            _check_number(name, value)
        _check_number("z_exp", z_exp, optional=True)
        _check_number("upper_norm", upper_norm, optional=True)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if sigma_data <= 0:
            raise ValueError(f"`sigma_data` must be > 0, got {sigma_data}.")
        if rho <= 0:
            raise ValueError(f"`rho` must be > 0, got {rho}.")
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, (int, np.integer))
            or num_train_timesteps < 1
        ):
            raise ValueError(f"`num_train_timesteps` must be an integer >= 1, got {num_train_timesteps!r}.")
        if sigma_schedule not in _SCHEDULES:
            raise ValueError(f"`sigma_schedule` must be one of {_SCHEDULES}, got {sigma_schedule!r}.")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
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
        # Opt-in per-call finiteness check (one host sync per call), an attribute so that configs stay EDM's.
        self.check_finite = False
        # The training table of EDMEulerScheduler, so that `add_noise` and `scale_model_input` work before
        # set_timesteps.
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self._set_schedule(self._sigmas_from_ramp(ramp).to(torch.float32), interleave=False)

    # ----- properties of the diffusers contract -----

    @property
    def init_noise_sigma(self) -> float:
        """The scale a generic loop multiplies `randn` by, EDMEulerScheduler's sqrt(sigma_max^2 + 1); the first call
        maps such a start onto the exact prior (see the class docstring)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    @property
    def order(self) -> int:
        """Model calls per step as diffusers counts them: 2 for Heun, 1 for Euler and DPM-Solver++(2M)."""
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
        Set the index of the first timestep, for pipelines that start part-way (run after `set_timesteps`, before
        inference). A run with a begin index uses its first sample as it is (see the class docstring).

        Args:
            begin_index (`int`, defaults to 0): the begin index, an integer in [0, len(timesteps) - 1].
        """
        last = self._num_calls - 1
        if (
            isinstance(begin_index, bool)
            or not isinstance(begin_index, (int, np.integer))
            or not 0 <= begin_index <= last
        ):
            raise ValueError(
                f"`begin_index` must be an integer in [0, {last}] (an index of this schedule's {last + 1} timesteps,"
                f" after `set_timesteps`), got {begin_index!r}."
            )
        self._begin_index = int(begin_index)

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
        if self._field_mode:
            timesteps = sigmas[:-1].clone()  # the grid already ends at z_min
        else:
            timesteps = self.precondition_noise(sigmas)
            sigma_last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
            sigmas = torch.cat([sigmas, torch.full((1,), fill_value=sigma_last, device=sigmas.device)])
        if interleave and self.config.solver == "heun":
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
        self._heun_state = None  # (x, dx/dsigma, sigma) of Heun's predictor, corrected at the next call
        self._previous_denoised = None  # DPM-Solver++(2M)'s D of the previous call
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
    def _broadcast_over_sample(sigma, sample: torch.Tensor):
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
        return sample * preconditioning.c_in(self._broadcast_over_sample(sigma, sample), self.config.sigma_data)

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model's timestep for noise level `sigma`: c_noise = ln(sigma) / 4 (EDM), z itself in field mode.

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
            model_output (`torch.Tensor`): the raw model output, shaped like `sample` (C+1 channels in field mode).
            sigma (`float` or `torch.Tensor`): a scalar or (B,) noise levels (z in field mode).

        Returns:
            `torch.Tensor`: D(x, sigma), shaped like `sample`.
        """
        prediction_type = self.config.prediction_type
        if model_output.shape != sample.shape or prediction_type == "poisson_field":  # (the common case: one compare)
            self._check_output_shape(model_output, sample)
        if prediction_type == "sample":
            return model_output
        if prediction_type == "poisson_field":
            dx_dz = field_dx_dz(model_output, sigma, self.config.gamma, self.config.z_exp, self.config.vz_eps)
            return sample - self._broadcast_over_sample(sigma, sample) * dx_dz
        sigma = self._broadcast_over_sample(sigma, sample)
        sigma_data = self.config.sigma_data
        c_out = preconditioning.c_out(sigma, sigma_data)
        if prediction_type == "v_prediction":
            c_out = -c_out
        return preconditioning.c_skip(sigma, sigma_data) * sample + c_out * model_output

    def _check_output_shape(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        """Refuse an output that arithmetic would broadcast (batch 1, one channel) or that lacks the field channel."""
        expected = (sample.shape[0], self.num_output_channels(sample.shape[1]), *sample.shape[2:])
        if tuple(model_output.shape) != expected:
            extra = " (C+1: the extra channel is the field's z-component)" if self._field_mode else ""
            raise ValueError(
                f"The model output must have shape {expected}{extra} for a sample of shape {tuple(sample.shape)},"
                f" got {tuple(model_output.shape)}."
            )

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 for training (math.md §2)."""
        return preconditioning.loss_weight(sigma, self.config.sigma_data)

    def num_output_channels(self, num_channels: int) -> int:
        """The number of model output channels this prediction type needs for `num_channels` image channels: C + 1
        in field mode (the extra channel is the z-component, math.md §3), C otherwise."""
        return num_channels + 1 if self._field_mode else num_channels

    # ----- the prior -----

    def _prior_radius(self, norm_sq: np.ndarray, N: int) -> np.ndarray:
        """The prior radius with the chi-square quantile of |noise|^2 = `norm_sq` (float64 on the CPU)."""
        if self._field_mode:
            return pfgm_prior_radius(norm_sq, N, self.config.sigma_max, self.config.upper_norm)
        return kernel_radius(norm_sq, N, self.config.sigma_max, self.config.aug_dim)

    def prior_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """
        Map standard Gaussian `noise` onto the exact prior (deterministic radial quantile map, math.md §2). Sets no
        state.

        Args:
            noise (`torch.Tensor`): N(0, I) samples (B, C, H, W).

        Returns:
            `torch.Tensor`: prior samples, the PFGM++ prior at r_max = sigma_max sqrt(D) (the original PFGM's
            hyperplane prior in field mode; `sigma_max * noise` for `aug_dim=None`), in the dtype of `noise` (a radius
            that dtype cannot hold raises a `ValueError`).
        """
        if self.config.aug_dim is None:
            return noise * self.config.sigma_max
        norm_sq = squared_norms(noise)  # (B,)
        if not np.all(np.isfinite(norm_sq)):
            raise ValueError("`noise` contains NaN or infinite values.")
        radius = self._prior_radius(norm_sq, noise[0].numel())
        return prior_draws.remember(rescale_radii(noise, norm_sq, radius), radius)

    def noise_from_prior(self, x: torch.Tensor) -> torch.Tensor:
        """
        The standard Gaussian latent of a prior sample: the inverse of [`~PFGMScheduler.prior_from_noise`]. Sets no
        state.

        Args:
            x (`torch.Tensor`): prior samples (B, C, H, W), e.g. the end of an inversion at sigma_max.

        Returns:
            `torch.Tensor`: `noise` with `prior_from_noise(noise) == x` (exact up to rounding; in field mode exact for
            radii inside the `upper_norm` clip).
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
        Draw the exact prior: `prior_from_noise(randn_tensor(shape, generator))`. Sets no state: a loop that starts
        from it calls `set_begin_index(0)` after `set_timesteps` (see the class docstring).

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

    def _start_run(self, timestep) -> None:
        """Find the first call's step index (diffusers' rule: the begin index, or the timestep's place)."""
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index
        self._first_index = self._step_index

    def _start_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The sample the run starts from (the class docstring's rule), checked once; float32 where it was mapped."""
        if self._start is not None and self._start[0] is sample:
            return self._start[1]
        generic = self._begin_index is None and self._first_index == 0
        x = sample.float() if generic and self.config.aug_dim is not None else sample  # (a no-op for float32)
        norm_sq = squared_norms(x)  # (B,): the run's one host sync
        if not np.all(np.isfinite(norm_sq)):
            bad = np.flatnonzero(~np.isfinite(norm_sq)).tolist()
            raise ValueError(
                f"The first sample of this run contains NaN or inf (batch items {bad}): the latents, or the"
                " `add_noise` output, are not finite."
            )
        start = sample
        if generic and self.config.aug_dim is not None and prior_draws.is_prior_draw(sample, norm_sq):
            generic = False  # a `sample_prior` / `prior_from_noise` draw (or a copy): already on the prior
        if generic:
            N, noise_norm_sq = sample[0].numel(), norm_sq / self.init_noise_sigma**2  # |sample / init_noise_sigma|^2
            self._warn_if_far_from_gaussian(noise_norm_sq, N)
            if self.config.aug_dim is not None:
                # direction kept, radius moved onto the prior's (prior_from_noise(sample / init_noise_sigma))
                try:
                    start = rescale_radii(x, norm_sq, self._prior_radius(noise_norm_sq, N))
                except ValueError as error:
                    raise ValueError(
                        f"{error} This run started without a begin index, so its first sample was read as"
                        " `randn * init_noise_sigma` and mapped onto the prior: if it is a prior draw (`sample_prior`)"
                        " or an `add_noise` output, call `scheduler.set_begin_index(...)` after `set_timesteps`."
                    ) from error
        self._start = (sample, start)
        return start

    def _warn_if_far_from_gaussian(self, norm_sq: np.ndarray, N: int) -> None:
        lower, upper = chi2_quantiles(norm_sq, N)
        tail = np.minimum(lower, upper)
        if tail.min() < _FAR_START_PROBABILITY:
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
        """Refuse index-like timesteps and a finished run; start the run at its first call."""
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
                f"`timestep` must be one value of `scheduler.timesteps`, got a tensor of shape"
                f" {tuple(timestep.shape)}."
            )
        if self._step_index is None:
            self._start_run(timestep)
            return
        given = self._timestep_index_or_value(timestep)
        if self._step_index >= self._num_calls:
            backwards = self._first_index == self._num_calls - 1 and self._num_calls > 1
            hint = (
                ", the last one: its place was found from the timestep, so is this a loop over `reversed(timesteps)`?"
                " Pass the timesteps in the order of `scheduler.timesteps`"
                if backwards
                else ""
            )
            raise ValueError(
                f"Got timestep {self._describe(given)} after the last call of this run (it started at"
                f" timesteps[{self._first_index}]{hint}). Call `set_timesteps` to start another run."
            )
        expected = self._timestep_values[self._step_index]
        value = self._timestep_values[given[0]] if given[0] is not None else given[1]
        if value != expected:
            raise ValueError(
                f"Got timestep {self._describe(given)} at call {self._step_index} of this run, which expects"
                f" timesteps[{self._step_index}] = {expected:.6g}: pass the timesteps in the order of"
                " `scheduler.timesteps`, each unchanged (not `reversed(timesteps)`, not shuffled, not cast). To start"
                " part-way, call `set_begin_index(i)` after `set_timesteps`."
            )

    def _timestep_index_or_value(self, timestep) -> tuple:
        """(index in `timesteps`, None) for an element of `timesteps` (metadata only, no sync), else (None, value):
        a host float, a CPU tensor read on the host, or an accelerator tensor read with one host sync."""
        if isinstance(timestep, torch.Tensor):
            schedule = self.timesteps
            if (
                timestep.device == schedule.device
                and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()
                and timestep.dtype == schedule.dtype
            ):
                return (timestep.storage_offset() - schedule.storage_offset(), None)
            return (None, timestep.item())
        return (None, float(timestep))

    def _describe(self, given) -> str:
        index, value = given
        return f"timesteps[{index}] = {self._timestep_values[index]:.6g}" if index is not None else f"{value:.6g}"

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """
        The model input for the current timestep (`precondition_inputs` at its sigma). At the first call of a generic
        run the sample is first mapped onto the exact prior (see the class docstring). Before `set_timesteps` the
        training table's timesteps are accepted, as in `EDMEulerScheduler`.

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
        Advance the probability-flow ODE by one model call: an Euler step, half of a Heun step, or a DPM-Solver++(2M)
        step (`config.solver`).

        Args:
            model_output (`torch.Tensor`): the model's output for `scale_model_input(sample, timestep)`, shaped like
                `sample` (C+1 channels in field mode).
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
            logger.warning(
                "`scale_model_input` was not called before `step` in this run, so the model saw an unscaled sample"
                " (and a generic start was not mapped onto the prior for it): call"
                " `model_input = scheduler.scale_model_input(sample, t)` and pass that to the model."
            )
            self._scale_warning_given = True
        i = self._step_index
        if i == self._first_index:
            sample = self._start_sample(sample)
            if torch.finfo(model_output.dtype).max < torch.finfo(sample.dtype).max:
                self._check_representable(sample, model_output.dtype)
        # Upcast to avoid precision issues when computing prev_sample
        sample = sample.to(torch.float32)

        sigma = sigma_hat = self.sigmas[i]
        churn = 0.0
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:
            churn = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
            sigma_hat = sigma * (churn + 1)
        if churn > 0:
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        denoised = self.precondition_outputs(sample, model_output, sigma_hat)
        if self.config.solver == "dpmpp_2m":
            sigma_previous = self.sigmas[i - 1] if self._previous_denoised is not None else None
            prev_sample = ode.dpmpp_2m_step(
                sample, denoised, sigma, self.sigmas[i + 1], self._previous_denoised, sigma_previous
            )
            self._previous_denoised = denoised
        else:
            derivative = ode.to_d(sample, denoised, sigma_hat)  # dx/dsigma (dx/dz in field mode)
            if self._heun_state is None:
                prev_sample = ode.euler_step(sample, derivative, sigma_hat, self.sigmas[i + 1])
                if self.config.solver == "heun" and i < self._num_calls - 1:
                    self._heun_state = (sample, derivative, sigma_hat)  # corrected at the next call, at sigmas[i + 1]
            else:
                sample_start, derivative_start, sigma_start = self._heun_state
                prev_sample = ode.heun_step(sample_start, derivative_start, derivative, sigma_start, sigma)
                self._heun_state = None
        prev_sample = prev_sample.to(model_output.dtype)

        if self.check_finite:
            self._check_finite_call(model_output, prev_sample, timestep)
        elif i == self._num_calls - 1 and not self._all_finite(prev_sample):  # once per run
            raise ValueError(
                f"The sample became NaN or inf during this run of {i + 1 - self._first_index} model calls (its first"
                " sample was finite): a model output was not finite, or a step overflowed"
                f" {model_output.dtype}. Set `scheduler.check_finite = True` to raise at the first such call."
            )
        self._step_index += 1
        if i == self._first_index:
            self._start = None
        if not return_dict:
            return (prev_sample, denoised)
        return PFGMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    @staticmethod
    def _all_finite(x: torch.Tensor) -> bool:
        """Whether every element is finite, from one sum (cheaper than isfinite(x).all()); confirmed element-wise
        where the sum alone is not finite (it can overflow)."""
        return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())

    @staticmethod
    def _check_representable(sample: torch.Tensor, dtype: torch.dtype) -> None:
        """Refuse a start that the model output's dtype cannot hold (every step returns that dtype)."""
        largest = sample.detach().abs().max().item()
        if largest > torch.finfo(dtype).max:
            raise ValueError(
                f"The first sample of this run reaches {largest:.4g}, more than {dtype} can hold"
                f" ({torch.finfo(dtype).max:.4g}): run the model output in float32, or clip the prior (`upper_norm`)."
            )

    def _check_finite_call(self, model_output: torch.Tensor, prev_sample: torch.Tensor, timestep) -> None:
        """The opt-in `check_finite` check of one call (two host syncs)."""
        sigma = float(self.sigmas[self._step_index])
        where = f"call {self._step_index} (timestep {float(timestep):.6g}, sigma {sigma:.6g})"
        if not torch.isfinite(model_output).all():
            raise ValueError(f"The model output at {where} contains NaN or inf.")
        if not torch.isfinite(prev_sample).all():
            raise ValueError(f"The step at {where} overflowed {prev_sample.dtype}: its result contains inf or NaN.")

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
        if self.config.aug_dim is None:
            while len(sigma.shape) < len(original_samples.shape):
                sigma = sigma.unsqueeze(-1)
            return original_samples + noise * sigma
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
