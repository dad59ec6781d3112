"""`PFGMFieldScheduler`: the original PFGM (Xu et al., NeurIPS 2022) as a diffusers scheduler, stepped in z.

A network predicting the normalised Poisson field (C + 1 output channels) is integrated along the same ODE as
PFGM++ through D(x, z) = x - z v_x / v_z (math.md §1, §3), on a grid in z that ends at z_min, from the hyperplane
prior at z_max (the D = 1 prior, clipped as the official code does).
"""

import torch
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds the base class of a saved component on the module that model_index.json names
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .field import field_dx_dz
from .scheduling_common import NO_RESTART_FIELD, PoissonFlowScheduler, check_grid_config
from .validation import check_number

__all__ = ["PFGMFieldScheduler"]


class PFGMFieldScheduler(PoissonFlowScheduler):
    """
    Sampler of the original PFGM ([Xu et al. 2022](https://huggingface.co/papers/2209.11178)): a field model with C+1
    output channels (the z-component is the spatial mean of the extra channel), stepped in z on a grid that ends at
    z_min with no final denoising step, from the hyperplane prior at z_max (PFGM++'s D = 1 prior). The network gets
    the unscaled sample and the raw z as its timestep, as in the official code. Rules and solvers: docs/scheduler.md.

    Pipelines saved with v0.1's `PFGMScheduler(prediction_type="poisson_field")` load as this class.

    Args:
        sigma_min (`float`, defaults to 1e-3): z_min, the end of the grid (the official PFGM's).
        sigma_max (`float`, defaults to 40.0): z_max, where the prior sits (40 for CIFAR-10).
        sigma_schedule (`str`, defaults to `"exponential"`): `"exponential"` (uniform in ln z, the official grid) or
            `"karras"`.
        num_train_timesteps (`int`, defaults to 1000): size of the training z table; `__len__` returns it.
        rho (`float`, defaults to 7.0): exponent of the Karras schedule; > 0.
        solver (`str`, defaults to `"heun"`): one of `ode.STEPPERS`, as for `PFGMScheduler`.
        gamma (`float`, defaults to 5.0): the gamma of the normalised field v = sqrt(N) g / (|g| + gamma), used by the
            `z_exp` safeguard.
        z_exp (`float`, *optional*): below this z, v_z is rebuilt from v_x (official: 5 for CIFAR-10, 1 for CelebA).
            `None`: off.
        upper_norm (`float`, *optional*): clip the prior radius to [1, upper_norm] as the official code does (3000
            for CIFAR-10, 6000 for CelebA 64). `None`: the exact prior.
        vz_eps (`float`, defaults to 1e-5): added to v_z in dx/dz = v_x / (v_z + vz_eps) as in the official sampler;
            0 turns it off.
        prediction_type (`str`, defaults to `"poisson_field"`): what the network predicts, fixed (kept in the config
            for code that reads `scheduler.config.prediction_type`).
        aug_dim (`int`, defaults to 1): D of the prior's geometry, fixed at 1.
    """

    _compatibles = []
    _extra_levels = 1  # n + 1 levels in z for n steps, ending at z_min
    _output_channels_note = " (C+1: the extra channel is the field's z-component)"

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 1e-3,
        sigma_max: float = 40.0,
        sigma_schedule: str = "exponential",
        num_train_timesteps: int = 1000,
        rho: float = 7.0,
        solver: str = "heun",
        gamma: float = 5.0,
        z_exp: float | None = None,
        upper_norm: float | None = None,
        vz_eps: float = 1e-5,
        prediction_type: str = "poisson_field",
        aug_dim: int = 1,
    ):
        if solver == "restart":
            raise ValueError(NO_RESTART_FIELD)
        check_grid_config(sigma_min, sigma_max, sigma_schedule, num_train_timesteps, rho, solver)
        for name, value in dict(gamma=gamma, vz_eps=vz_eps).items():
            check_number(name, value)
        check_number("z_exp", z_exp, optional=True)
        check_number("upper_norm", upper_norm, optional=True)
        if gamma < 0 or vz_eps < 0:
            raise ValueError(f"`gamma` and `vz_eps` must be >= 0, got gamma={gamma}, vz_eps={vz_eps}.")
        if z_exp is not None and z_exp <= 0:
            raise ValueError(f"`z_exp` must be > 0 or None, got {z_exp}.")
        if upper_norm is not None and upper_norm < 1:
            raise ValueError(f"`upper_norm` must be >= 1 or None, got {upper_norm}.")
        if prediction_type != "poisson_field" or aug_dim != 1:
            raise ValueError(
                "`prediction_type='poisson_field'` is the original PFGM and needs aug_dim=1 (PFGMFieldScheduler;"
                f" PFGM++ is PFGMScheduler), got prediction_type={prediction_type!r}, aug_dim={aug_dim!r}."
            )
        self._init_schedule()

    @property
    def _upper_norm(self) -> float | None:
        return self.config.upper_norm

    def _timesteps_and_final_sigmas(self, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw z as the timesteps; the grid already ends at z_min, where sampling stops."""
        return sigmas[:-1].clone(), sigmas

    # ----- preconditioning: the official PFGM's network sees x and z as they are -----

    def precondition_inputs(self, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model input at z = `sigma`: the sample itself.

        Args:
            sample (`torch.Tensor`): the sample x.
            sigma (`float` or `torch.Tensor`): z, a scalar or (B,).

        Returns:
            `torch.Tensor`: `sample`.
        """
        return sample

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        The model's timestep at z = `sigma`: z itself.

        Args:
            sigma (`float` or `torch.Tensor`): z, a scalar or (B,).

        Returns:
            `torch.Tensor`: z as a tensor ((1,) for a Python float).
        """
        return sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma])

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: float | torch.Tensor
    ) -> torch.Tensor:
        """
        The denoised estimate D(x, z) = x - z dx/dz from the field (math.md §1, §3), so that the ODE is
        dx/dz = (x - D) / z as for PFGM++.

        Args:
            sample (`torch.Tensor`): the sample x (B, C, H, W).
            model_output (`torch.Tensor`): the field (B, C+1, H, W).
            sigma (`float` or `torch.Tensor`): z, a scalar or (B,).

        Returns:
            `torch.Tensor`: D(x, z), shaped like `sample`.
        """
        self._check_output_shape(model_output, sample)
        dx_dz = field_dx_dz(model_output, sigma, self.config.gamma, self.config.z_exp, self.config.vz_eps)
        return sample - self._broadcast_over_sample(sigma, sample) * dx_dz

    def num_output_channels(self, num_channels: int) -> int:
        """The number of model output channels for `num_channels` image channels: C + 1 (math.md §3)."""
        return num_channels + 1
