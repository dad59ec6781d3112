"""`PFGMScheduler`: PFGM++ for any D as a drop-in diffusers scheduler (D = infinity is EDM).

PFGM++ (Xu et al., ICML 2023) shares EDM's probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma once
r = sigma * sqrt(D); only the perturbation kernel (`add_noise`) and the prior (`sample_prior`) depend on D
(math.md §1–§2). The original PFGM is the sibling class `PFGMFieldScheduler` (scheduling_pfgm_field.py).
"""

import torch
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds the base class of a saved component on the module that model_index.json names
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
from diffusers.utils import logging

from . import ode, preconditioning
from .scheduling_common import NO_RESTART_STEP, PFGMSchedulerOutput, PoissonFlowScheduler, check_grid_config
from .validation import check_aug_dim, check_choice, check_number

__all__ = ["SOLVERS", "PFGMScheduler", "PFGMSchedulerOutput"]

logger = logging.get_logger(__name__)

# The ODE solvers of `step`, the names the pipeline and the scripts accept (ode.STEPPERS; docs/scheduler.md).
SOLVERS = tuple(ode.STEPPERS)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_FINAL_SIGMAS = ("zero", "sigma_min")
# The original PFGM's config keys, with the values v0.1 gave them (which meant nothing outside its field mode).
_V0_1_FIELD_KEYS = dict(gamma=5.0, z_exp=None, upper_norm=None, vz_eps=1e-5)
# What a v0.1 `PFGMScheduler(prediction_type="poisson_field")` got for the keys it was not given.
_V0_1_FIELD_DEFAULTS = dict(sigma_min=0.002, sigma_max=80.0, sigma_schedule="karras", rho=7.0, solver="heun")
_FIELD_NOTE = (
    "prediction_type='poisson_field' is the original PFGM, now its own scheduler: this is a PFGMFieldScheduler with"
    " the same settings and the same samples (save the pipeline again to store it under its new name)."
)


def _field_scheduler(config: dict, defaults: dict):
    """The `PFGMFieldScheduler` of a v0.1 field-mode `PFGMScheduler` config (its PFGM++-only keys dropped)."""
    from .scheduling_pfgm_field import PFGMFieldScheduler

    dropped = ("sigma_data", "final_sigmas_type", "_use_default_values")
    return PFGMFieldScheduler, {**defaults, **{k: v for k, v in config.items() if k not in dropped}}


class _ReadsV01Arguments(type(PoissonFlowScheduler)):
    """v0.1 code built the original PFGM as `PFGMScheduler(prediction_type="poisson_field", ...)`: it gets the sibling
    class with the same samples and a warning. It also passed the field keys to PFGM++ schedulers at their v0.1 values,
    which meant nothing there: those are dropped, any other value is refused."""

    def __call__(cls, *args, **kwargs):
        if cls is PFGMScheduler and kwargs.get("prediction_type") == "poisson_field" and not args:
            logger.warning(_FIELD_NOTE + " Build it as `PFGMFieldScheduler(...)`.")
            field_class, config = _field_scheduler(kwargs, _V0_1_FIELD_DEFAULTS)
            return field_class(**config)
        if cls is PFGMScheduler:
            given = {key: kwargs.pop(key) for key in _V0_1_FIELD_KEYS if key in kwargs}
            changed = sorted(key for key, value in given.items() if value != _V0_1_FIELD_KEYS[key])
            if changed:
                raise ValueError(
                    f"{changed} are options of the original PFGM's field model: use `PFGMFieldScheduler(...)`."
                )
        return super().__call__(*args, **kwargs)


class PFGMScheduler(PoissonFlowScheduler, metaclass=_ReadsV01Arguments):
    """
    Sampler and noise kernel of PFGM++ ([Xu et al. 2023](https://huggingface.co/papers/2302.04265)) for any
    augmentation dimension D: `aug_dim=None` (D = infinity) is `EDMEulerScheduler` bit for bit, D = 1 the geometry of
    the original PFGM (whose field model is [`PFGMFieldScheduler`]). The config is `EDMEulerScheduler`'s (same keys,
    same defaults, so `from_config` swaps both ways) plus `aug_dim` and `solver`. Latents are standard Gaussian; where
    a run starts, the solvers and the checks: docs/scheduler.md.

    Args:
        sigma_min (`float`, defaults to 0.002): smallest noise level of the schedule.
        sigma_max (`float`, defaults to 80.0): largest noise level; the prior has r_max = sigma_max * sqrt(D).
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for EDM's preconditioning; > 0.
        sigma_schedule (`str`, defaults to `"karras"`): `"karras"` (EDM's rho-schedule) or `"exponential"`.
        num_train_timesteps (`int`, defaults to 1000): size of the training sigma table; `__len__` returns it.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"` (EDM's F-preconditioning),
            `"v_prediction"` or `"sample"` (the model returns the denoised image).
        rho (`float`, defaults to 7.0): exponent of the Karras schedule; > 0.
        final_sigmas_type (`str`, defaults to `"zero"`): `"zero"` or `"sigma_min"`, the schedule's last level.
        aug_dim (`int` or `None`, defaults to 128): D, an integer >= 1; `None` means D = infinity (EDM).
        solver (`str`, defaults to `"heun"`): one of `SOLVERS` (`ode.STEPPERS`): `"heun"` (EDM's sampler, 2n - 1
            model calls for n steps, `order = 2`), `"euler"` (n calls) or `"dpmpp_2m"` (DPM-Solver++(2M), n calls).
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    _extra_levels = 0  # n levels for n steps, then the final sigma
    _upper_norm = None  # the exact prior, never clipped
    _output_channels_note = ""

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """`ConfigMixin.from_config`; a v0.1 field-mode config (`prediction_type="poisson_field"`, as pipelines saved
        by v0.1 hold) gives the `PFGMFieldScheduler` of the same settings."""
        merged = {**dict(config or {}), **kwargs}
        if cls is PFGMScheduler and merged.get("prediction_type") == "poisson_field":
            logger.info(_FIELD_NOTE)
            field_class, field_config = _field_scheduler(merged, {})
            return field_class.from_config(field_config, return_unused_kwargs=return_unused_kwargs)
        if config is not None and cls is PFGMScheduler:  # a v0.1 PFGM++ config holds the field keys: meaningless
            config = {key: value for key, value in dict(config).items() if key not in _V0_1_FIELD_KEYS}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

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
    ):
        check_aug_dim(aug_dim)
        if solver == "restart":
            raise ValueError(NO_RESTART_STEP)
        check_grid_config(sigma_min, sigma_max, sigma_schedule, num_train_timesteps, rho, solver)
        check_number("sigma_data", sigma_data)
        if sigma_data <= 0:
            raise ValueError(f"`sigma_data` must be > 0, got {sigma_data}.")
        check_choice("prediction_type", prediction_type, _PREDICTION_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, _FINAL_SIGMAS)
        self._init_schedule()

    def _timesteps_and_final_sigmas(self, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EDMEulerScheduler's: c_noise(sigma) as the timesteps, and the final sigma (0 or sigma_min) appended."""
        timesteps = self.precondition_noise(sigmas)
        sigma_last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
        return timesteps, torch.cat([sigmas, torch.full((1,), fill_value=sigma_last, device=sigmas.device)])

    # ----- preconditioning, at any sigma (EDM's, Karras et al. 2022 Table 1; math.md §2) -----

    def precondition_inputs(self, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model input at noise level `sigma`: c_in(sigma) * sample.

        Args:
            sample (`torch.Tensor`): the noisy sample.
            sigma (`float` or `torch.Tensor`): a scalar or one noise level per sample (B,).

        Returns:
            `torch.Tensor`: the scaled sample.
        """
        return sample * preconditioning.c_in(self._broadcast_over_sample(sigma, sample), self.config.sigma_data)

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model's timestep for noise level `sigma`: c_noise = ln(sigma) / 4.

        Args:
            sigma (`float` or `torch.Tensor`): a scalar or (B,) noise levels.

        Returns:
            `torch.Tensor`: the timestep(s).
        """
        return preconditioning.c_noise(sigma)

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: float | torch.Tensor
    ) -> torch.Tensor:
        """
        The denoised estimate D(x, sigma) = c_skip x + c_out F from the model output F.

        Args:
            sample (`torch.Tensor`): the noisy sample x.
            model_output (`torch.Tensor`): the raw model output, shaped like `sample`.
            sigma (`float` or `torch.Tensor`): a scalar or (B,) noise levels.

        Returns:
            `torch.Tensor`: D(x, sigma), shaped like `sample`.
        """
        if model_output.shape != sample.shape:
            self._check_output_shape(model_output, sample)
        prediction_type = self.config.prediction_type
        if prediction_type == "sample":
            return model_output
        sigma = self._broadcast_over_sample(sigma, sample)
        sigma_data = self.config.sigma_data
        c_out = preconditioning.c_out(sigma, sigma_data)
        if prediction_type == "v_prediction":
            c_out = -c_out
        return preconditioning.c_skip(sigma, sigma_data) * sample + c_out * model_output

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 for training (math.md §2)."""
        return preconditioning.loss_weight(sigma, self.config.sigma_data)

    def num_output_channels(self, num_channels: int) -> int:
        """The number of model output channels for `num_channels` image channels: the same."""
        return num_channels
