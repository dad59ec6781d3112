"""The pipeline as an invertible flow: `invert` (images -> standard Gaussian latents), `slerp` (interpolation that
keeps latents standard Gaussian) and `log_likelihood` (the probability-flow ODE with its change of volume).

`InvertibleFlowMixin` is mixed into `PFGMPipeline`, which provides the network, the scheduler and the input checks;
the solvers are `ode.SAMPLERS`, the pieces of a run `flow.py`.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import flow, ode
from .latents import slerp_gaussian
from .perturbation import prior_log_prob

__all__ = ["InvertibleFlowMixin", "PFGMLikelihoodOutput"]

HUTCHINSON_TYPES = ("rademacher", "gaussian")
# 8-bit data mapped to [-1, 1]: one quantisation bin is 2/256 wide, so log2(256 / 2) = 7 bits/dim convert a density
# on [-1, 1] into a discrete likelihood of 8-bit pixels (the official PFGM / score_sde offset).
_BITS_PER_DIM_OFFSET = 7.0


@dataclass
class PFGMLikelihoodOutput(BaseOutput):
    """
    Output class of [`PFGMPipeline.log_likelihood`].

    Args:
        bits_per_dim (`torch.Tensor` of shape `(B,)`):
            `-log_prob / (N ln 2) + 7`: the negative log-likelihood of 8-bit data in bits per dimension (the
            density on [-1, 1] turned into a probability of 256 levels, as the official PFGM and score_sde code).
            For a latent pipeline `-log_prob / (N ln 2)`: bits per latent dimension of the images' latents.
        log_prob (`torch.Tensor` of shape `(B,)`):
            The log-density in nats of the (dequantised) images in model space ([-1, 1]), float64.
        latents (`torch.Tensor` of shape `(B, C, H, W)`):
            The standard Gaussian latents of the images (as [`~PFGMPipeline.invert`] returns them), float32.
        nfe (`int`):
            The number of ODE function evaluations (each one network forward and one backward pass).
    """

    bits_per_dim: torch.Tensor
    log_prob: torch.Tensor
    latents: torch.Tensor
    nfe: int


class InvertibleFlowMixin:
    """`invert`, `slerp` and `log_likelihood` of [`PFGMPipeline`] (which it is mixed into: it uses the pipeline's
    `scheduler`, `unet`, `vae`, `check_inputs`, `prepare_class_labels`, `prepare_conditioning_image`, `_network`,
    `_denoiser` and `_model_space`)."""

    @torch.no_grad()
    def invert(
        self,
        images,
        num_inference_steps: int = 18,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        solver: str | None = None,
        do_normalize: bool = True,
        rtol: float = 1e-4,
        atol: float = 1e-4,
        guidance_scale: float = 1.0,
        conditioning_image=None,
    ) -> torch.Tensor:
        r"""
        Map images to standard Gaussian latents: integrate the ODE from sigma_min (the images' state) to sigma_max, and
        return the latents the scheduler maps onto that state. `pipe(latents=pipe.invert(images))` with the same
        `num_inference_steps` and solver reconstructs the images up to the solvers' discretisation error.

        Args:
            images (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or `list[PIL.Image.Image]`):
                A `(B, C, H, W)` tensor or `(B, H, W, C)` array in [0, 1] (as output_type `"pt"`/`"np"` returns
                them) or PIL images.
            num_inference_steps (`int`, defaults to 18):
                The scheduler's grid of that many steps is walked backwards, its final sigma = 0 skipped: with Heun,
                2 (n - 1) network evaluations (2n in field mode, whose grid has n + 1 levels).
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`, *optional*):
                The images' classes; required for a class-conditional UNet.
            solver (`str`, *optional*):
                `None` for the scheduler's own solver, another of its names (`"heun"`, `"euler"`, ...), or `"rk45"`
                for scipy's adaptive RK45 in ln sigma.
            do_normalize (`bool`, defaults to `True`):
                Map images from [0, 1] to the model's [-1, 1]. With `False`, `images` is a tensor in model space.
                A latent model encodes the images first (the VAE posterior's mean, scaled); with `False` they are
                pixels in [-1, 1].
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4):
                Tolerances of `solver="rk45"`.
            guidance_scale (`float`, defaults to 1.0):
                As in [`~PFGMPipeline.__call__`]: the guided ODE walked backwards, so that sampling with the same
                scale reconstructs the images.
            conditioning_image (*optional*):
                The images' conditions, required for an image-conditional model (as in `__call__`; normalised with
                `do_normalize`).

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`: standard Gaussian latents, float32.
        """
        self.check_inputs(num_inference_steps)
        name = flow.solver_name(self.scheduler, solver)
        if name == "restart":
            raise ValueError(
                "invert has no solver='restart': Restart's forward jumps add fresh noise, so it is no deterministic "
                "map to walk back; pass None, 'heun', 'euler', 'dpmpp_2m' or 'rk45'."
            )
        if name not in flow.ADAPTIVE:
            flow.loop_scheduler(self.scheduler, solver)  # refuses a swap an EDM scheduler cannot make
        device = self._execution_device
        x = self._model_space(images, do_normalize)
        labels = self.prepare_class_labels(class_labels, x.shape[0], device=device, required=True)
        condition = self.prepare_conditioning_image(conditioning_image, x.shape[0], device, do_normalize)
        denoise, progress = self._denoiser(self._network(labels, guidance_scale, condition))
        if name in flow.ADAPTIVE:
            sigmas, options = flow.sigma_range(self.scheduler), dict(rtol=rtol, atol=atol)
            options.update(carry_sigma=flow.is_field_model(self.scheduler))
        else:  # the grid walked backwards, ascending, its final sigma = 0 skipped
            sigmas = [sigma for sigma in flow.noise_levels(self.scheduler, num_inference_steps) if sigma > 0][::-1]
            options = {}
        x = ode.SAMPLERS[name](denoise, x, sigmas, **options)
        progress.close()
        latents = flow.noise_from_prior(self.scheduler, x)
        self.maybe_free_model_hooks()
        return latents

    def slerp(self, latents_a: torch.Tensor, latents_b: torch.Tensor, t) -> torch.Tensor:
        r"""
        Interpolate standard Gaussian latents so that every interpolant is again standard Gaussian (a plain linear mix
        shrinks the radius): directions by slerp, radii through their chi_N quantiles (`latents.slerp_gaussian`).
        t = 0 and t = 1 return the endpoints. It does not depend on the scheduler.

        Args:
            latents_a (`torch.Tensor` of shape `(B, C, H, W)`), latents_b (`torch.Tensor`, same shape):
                The endpoints, e.g. `randn` draws or [`~PFGMPipeline.invert`] outputs; non-zero and not opposite.
            t (`float`, `list[float]` or 1-D `torch.Tensor`):
                Interpolation weights in [0, 1].

        Returns:
            `torch.Tensor`: `(B, C, H, W)` for a float `t`; `(len(t) * B, C, H, W)` for a sequence, weight-major
            (with B = 1, one frame per weight), ready to pass as `latents`.
        """
        return slerp_gaussian(latents_a, latents_b, t)

    # ------------------------------------------------------------------ likelihood

    @torch.no_grad()
    def log_likelihood(
        self,
        images,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        hutchinson_type: str = "rademacher",
        dequantize: bool = False,
        do_normalize: bool = True,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        return_dict: bool = True,
        guidance_scale: float = 1.0,
        conditioning_image=None,
    ) -> PFGMLikelihoodOutput | tuple:
        r"""
        Log-likelihood of images under the model, through the probability-flow ODE (PFGM `likelihood.py`).

        [x, delta] is integrated with scipy's RK45 in ln sigma from sigma_min to sigma_max (`ode.solve_log_likelihood`:
        d delta/d ln sigma = div_x (x - D) by Hutchinson's estimator, one probe per image drawn from `generator`), then
        log p(x) = log p_prior(x_T) + delta with the exact prior density (`perturbation.prior_log_prob`; in field mode
        D = 1 at z_max, ignoring the sampler's radius clip). The images are the state at sigma_min. The ODE state is
        float64, each evaluation float32.

        A latent model (with a `vae`) measures the density of the images' latents (the scaled posterior means), not of
        the images: `bits_per_dim` is then in bits per latent dimension, without the 8-bit offset (the decoder is not
        invertible, so no pixel likelihood follows), and `dequantize` is refused.

        Args:
            images (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or `list[PIL.Image.Image]`):
                As in [`~PFGMPipeline.invert`]: in [0, 1], or in model space with `do_normalize=False`.
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`, *optional*):
                The images' classes; required for a class-conditional UNet.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws the Hutchinson probes and the dequantisation noise.
            hutchinson_type (`str`, defaults to `"rademacher"`):
                `"rademacher"` (+-1 probes, lower variance) or `"gaussian"`.
            dequantize (`bool`, defaults to `False`):
                Uniform dequantisation of 8-bit data: each value is put back on its 256-level grid and uniform
                noise within the bin is added, (k + u) / 256 mapped to [-1, 1] (score_sde / PFGM evaluation).
            do_normalize (`bool`, defaults to `True`):
                Map images from [0, 1] to [-1, 1]. With `False`, `images` is a tensor in model space.
            rtol (`float`, defaults to 1e-5), atol (`float`, defaults to 1e-5):
                RK45 tolerances.
            return_dict (`bool`, defaults to `True`):
                Return a [`PFGMLikelihoodOutput`] instead of a tuple `(bits_per_dim, log_prob, latents, nfe)`.
            guidance_scale (`float`, defaults to 1.0):
                Only 1: a guided ODE's velocity is no trained model's probability flow, so its change of volume is no
                likelihood of the model (other values raise).

        Returns:
            [`PFGMLikelihoodOutput`] or `tuple`.

        Raises:
            `ValueError`: for a UNet that is not float32 or float64, whose rounding makes the adaptive solver take
            3x the evaluations and moves the result (docs/pipeline.md): call `pipe.to(torch.float32)` first.
        """
        _check_likelihood_arguments(hutchinson_type, guidance_scale, self.unet.dtype, dequantize, self.vae is not None)
        device = self._execution_device
        x = self._model_space(images, do_normalize)
        batch_size, N = x.shape[0], x[0].numel()
        self.check_inputs(1, batch_size=batch_size, generator=generator)
        labels = self.prepare_class_labels(class_labels, batch_size, device=device, required=True)
        condition = self.prepare_conditioning_image(conditioning_image, batch_size, device, do_normalize)
        if dequantize:
            levels = torch.round((x + 1) * 127.5)  # 0..255
            uniform = torch.special.ndtr(randn_tensor(x.shape, generator=generator, device=device))  # U(0, 1)
            x = (levels + uniform) / 256 * 2 - 1
        probe = randn_tensor(x.shape, generator=generator, device=device, dtype=torch.float32)
        if hutchinson_type == "rademacher":
            probe = torch.sign(probe)
        sigma_min, sigma_max = flow.sigma_range(self.scheduler)
        denoise, progress = self._denoiser(self._network(labels, conditioning_image=condition))
        x_T, delta, nfe = ode.solve_log_likelihood(denoise, x, probe, sigma_min, sigma_max, rtol, atol)
        progress.close()
        log_prob = prior_log_prob(x_T.double(), sigma_max, self.scheduler.config.get("aug_dim")) + delta
        offset = _BITS_PER_DIM_OFFSET if self.vae is None else 0.0  # latents are no 8-bit data
        bits_per_dim = -log_prob / (N * math.log(2)) + offset
        latents = flow.noise_from_prior(self.scheduler, x_T)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (bits_per_dim, log_prob, latents, nfe)
        return PFGMLikelihoodOutput(bits_per_dim=bits_per_dim, log_prob=log_prob, latents=latents, nfe=nfe)


def _check_likelihood_arguments(hutchinson_type, guidance_scale, unet_dtype, dequantize, latent) -> None:
    """What `log_likelihood` refuses: an unknown probe, guidance, a low-precision UNet, dequantising VAE latents."""
    if hutchinson_type not in HUTCHINSON_TYPES:
        raise ValueError(f"`hutchinson_type` must be one of {HUTCHINSON_TYPES}, got {hutchinson_type!r}.")
    if guidance_scale != 1:
        raise ValueError(
            f"log_likelihood has no guidance_scale={guidance_scale!r}: a guided ODE (D_null + w (D_cond - "
            "D_null)) is no probability flow of the trained model, so it gives no likelihood of it. Pass "
            "guidance_scale=1 (the conditional model)."
        )
    if unet_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"log_likelihood needs a float32 UNet, got unet.dtype={unet_dtype}: the network's rounding "
            "makes the adaptive solver take 2-3x the evaluations and moves the likelihood. Call "
            "`pipe.to(torch.float32)` first (the weights are the same model)."
        )
    if dequantize and latent:
        raise ValueError(
            "dequantize=True dequantizes 8-bit pixels, but this latent pipeline measures the density of VAE "
            "latents (bits per latent dimension): pass dequantize=False."
        )
