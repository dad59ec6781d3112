"""`PFGMPipeline`: sampling, inversion, latent interpolation and likelihoods for PFGM and PFGM++ models.

Every mode integrates one ODE (math.md §1), dx/dsigma = (x - D(x, sigma)) / sigma, with the denoiser the scheduler
builds from the network; the solvers are in `ode.py`, the Hub plumbing in `hub.py`, image conversion in
`image_processing.py`. Latents are standard Gaussian everywhere; only the scheduler maps them onto its prior.
"""

import math
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from . import flow, ode
from .class_labels import check_class_names, prepare_class_labels
from .denoiser import denoise
from .hub import PipelineHubMixin
from .image_processing import OUTPUT_TYPES, image_grid, postprocess, preprocess
from .latents import check_standard_gaussian, slerp_gaussian
from .perturbation import prior_log_prob
from .scheduling_common import PoissonFlowScheduler
from .scheduling_pfgm import PFGMScheduler
from .scheduling_pfgm_field import PFGMFieldScheduler
from .validation import check_integer

__all__ = ["PFGMLikelihoodOutput", "PFGMPipeline", "PFGMPipelineOutput", "image_grid"]

HUTCHINSON_TYPES = ("rademacher", "gaussian")
# 8-bit data mapped to [-1, 1]: one quantisation bin is 2/256 wide, so log2(256 / 2) = 7 bits/dim convert a density
# on [-1, 1] into a discrete likelihood of 8-bit pixels (the official PFGM / score_sde offset).
_BITS_PER_DIM_OFFSET = 7.0

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from pfgm_diffusers import PFGMPipeline, PFGMScheduler

        >>> # a tiny randomly initialised PFGM++ model (D = 128); load a trained one with PFGMPipeline.from_pretrained
        >>> unet = UNet2DModel(
        ...     sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        ...     norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"),
        ... )
        >>> pipe = PFGMPipeline(unet=unet, scheduler=PFGMScheduler(aug_dim=128))

        >>> images = pipe(batch_size=4, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
        >>> images[0].size
        (8, 8)

        >>> # PFGM is an invertible flow: image -> standard Gaussian latent -> image
        >>> pixels = pipe(batch_size=2, output_type="pt", generator=torch.Generator().manual_seed(1)).images
        >>> latents = pipe.invert(pixels, num_inference_steps=18)
        >>> again = pipe(latents=latents, num_inference_steps=18, output_type="pt").images
        >>> bpd = pipe.log_likelihood(pixels, generator=torch.Generator().manual_seed(2)).bits_per_dim
        ```
"""


@dataclass
class PFGMPipelineOutput(ImagePipelineOutput):
    """
    Output class of [`PFGMPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images: a list of PIL images, a `(B, H, W, C)` array or a `(B, C, H, W)` tensor in [0, 1].
        nfe (`int`):
            The number of network evaluations the sampler used (with `solver="rk45"` chosen adaptively).
    """

    nfe: int = 0


@dataclass
class PFGMLikelihoodOutput(BaseOutput):
    """
    Output class of [`PFGMPipeline.log_likelihood`].

    Args:
        bits_per_dim (`torch.Tensor` of shape `(B,)`):
            `-log_prob / (N ln 2) + 7`: the negative log-likelihood of 8-bit data in bits per dimension (the
            density on [-1, 1] turned into a probability of 256 levels, as the official PFGM and score_sde code).
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


class PFGMPipeline(PipelineHubMixin, DiffusionPipeline):
    r"""
    Pipeline for unconditional or class-conditional image generation with Poisson flow generative models: PFGM++
    (any augmentation dimension D, D = infinity being EDM) and the original PFGM (a field model with C + 1 outputs).

    It is an invertible flow: besides sampling it maps images to latents ([`~PFGMPipeline.invert`]), interpolates
    latents ([`~PFGMPipeline.slerp`]) and measures likelihoods ([`~PFGMPipeline.log_likelihood`]). Latents are
    standard Gaussian `(B, C, H, W)` tensors, as in every diffusers pipeline; the scheduler maps them onto its prior.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.). Loading from and
    pushing to the Hub go through `hub.PipelineHubMixin`, which fetches and uploads only the pipeline's own files.

    Parameters:
        unet ([`UNet2DModel`]):
            The network. `C` output channels for the PFGM++ prediction types, `C + 1` for
            `prediction_type="poisson_field"`. Class-conditional if it has `num_class_embeds`.
        scheduler ([`PFGMScheduler`] or [`~diffusers.EDMEulerScheduler`]):
            The scheduler; it owns the preconditioning, the sigma grid and the prior.
        class_names (`list[str]`, *optional*):
            The names of the classes of a class-conditional UNet, in label order (saved with the pipeline), so that
            `class_labels` can name them.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: PFGMScheduler | PFGMFieldScheduler | EDMEulerScheduler,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        flow.check_scheduler(scheduler)
        check_class_names(class_names, unet.config.num_class_embeds)
        self.register_modules(unet=unet, scheduler=scheduler)
        # Saved in model_index.json, so that a class-conditional model can be sampled by class name
        self.register_to_config(class_names=None if class_names is None else list(class_names))

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, num_inference_steps, output_type="pt", batch_size=1, generator=None, latents=None):
        """Check the arguments of `__call__` and `invert` and the unet/scheduler pairing."""
        flow.check_scheduler(self.scheduler)
        check_integer("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_integer("batch_size", batch_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You passed a list of {len(generator)} generators for a batch of {batch_size}: pass one generator "
                "per image (or a single generator)."
            )
        shape = self._latent_shape(batch_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"Unexpected latents shape {tuple(latents.shape)}: expected {shape} (batch, C, H, W).")
        if latents is not None:
            check_standard_gaussian(latents, flow.old_latents_fix(self.scheduler))
        in_channels, out_channels = self.unet.config.in_channels, self.unet.config.out_channels
        expected = in_channels
        if isinstance(self.scheduler, PoissonFlowScheduler):
            expected = self.scheduler.num_output_channels(in_channels)
        if out_channels != expected:
            raise ValueError(
                f"The scheduler's prediction_type={self.scheduler.config.prediction_type!r} needs a UNet with "
                f"{expected} output channels for {in_channels} input channels, but unet.config.out_channels="
                f"{out_channels}."
            )

    def _latent_shape(self, batch_size: int) -> tuple:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def prepare_latents(self, batch_size, latents=None, generator=None, device=None) -> torch.Tensor:
        """Standard Gaussian latents (B, C, H, W), float32: drawn from `generator`, or the given ones moved."""
        if latents is None:
            return randn_tensor(
                self._latent_shape(batch_size), generator=generator, device=device, dtype=torch.float32
            )
        return latents.to(device=device, dtype=torch.float32)

    def prepare_class_labels(self, class_labels, batch_size, generator=None, device=None, required=False):
        """`class_labels` as a (B,) long tensor, None for an unconditional UNet (`class_labels.prepare_class_labels`);
        missing labels are drawn uniformly from `generator` unless `required`."""
        num_classes, names = self.unet.config.num_class_embeds, self.config.class_names
        return prepare_class_labels(class_labels, num_classes, names, batch_size, generator, device, required)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as `DiffusionPipeline.save_pretrained` does, after checking that `class_names` fit the UNet."""
        check_class_names(self.config.class_names, self.unet.config.num_class_embeds)
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------ the ODE's pieces

    def denoise(self, sample: torch.Tensor, sigma: float, class_labels=None) -> torch.Tensor:
        """D(x, sigma) of the network at noise level `sigma` (z for the field model), float32 (`denoiser.denoise`)."""
        conditions = {} if class_labels is None else {"class_labels": class_labels}
        return denoise(self.unet, self.scheduler, sample, sigma, **conditions)

    def _denoiser(self, class_labels):
        """`denoise` with the labels bound, as `ode.SAMPLERS` call it, counted, with its progress bar."""
        progress_config = getattr(self, "_progress_bar_config", {})
        return flow.counted_denoiser(lambda x, sigma: self.denoise(x, sigma, class_labels), progress_config)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        num_inference_steps: int = 18,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        solver: str | None = None,
        rtol: float = 1e-4,
        atol: float = 1e-4,
        max_evaluations: int | None = None,
    ) -> PFGMPipelineOutput | tuple:
        r"""
        Generate images by carrying prior samples to the data along the PFGM ODE.

        Args:
            batch_size (`int`, defaults to 1):
                The number of images. With `latents` the batch is `latents.shape[0]`; `batch_size` must then be 1
                or equal to it.
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`, *optional*):
                Class labels for a UNet with `num_class_embeds`: one label for the whole batch, or one per image,
                each an integer or one of the pipeline's `class_names`. Drawn uniformly at random (from `generator`)
                when not given.
            num_inference_steps (`int`, defaults to 18):
                Steps of the scheduler's grid (18 Heun steps = 35 network evaluations). Ignored by `solver="rk45"`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic. With a list (one per image), image `i` equals a single-image run
                with generator `i` (for the scheduler's solvers; RK45 adapts its steps to the whole batch).
            latents (`torch.Tensor` of shape `(B, C, H, W)`, *optional*):
                Standard Gaussian latents to start from (by default `randn_tensor` from `generator`), e.g. from
                [`~PFGMPipeline.invert`] or [`~PFGMPipeline.slerp`]. The scheduler maps them onto its prior.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (`PIL.Image`), `"np"` (`(B, H, W, C)` array) or `"pt"` (`(B, C, H, W)` tensor), in [0, 1].
            return_dict (`bool`, defaults to `True`):
                Return a [`PFGMPipelineOutput`] instead of a tuple.
            solver (`str`, *optional*):
                `None` runs the scheduler's own steps. A name the scheduler accepts (`"heun"`, `"euler"`, ...) runs
                the scheduler's steps with that solver for this call. `"rk45"` runs the original PFGM's default
                sampler, scipy's adaptive RK45 in ln sigma from sigma_max to sigma_min; when the scheduler's grid ends
                at 0 (PFGM++ modes), a final denoising step x = D(x, sigma_min) follows, EDM's last Euler step.
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4):
                Tolerances of `solver="rk45"` (the official PFGM defaults).
            max_evaluations (`int`, *optional*):
                A budget of network calls for `solver="rk45"`: a run that needs more raises
                `ode.EvaluationBudgetExceeded` (with the noise level it reached) instead of going on.

        Examples:

        Returns:
            [`PFGMPipelineOutput`] or `tuple`: the images and the number of network evaluations `nfe`; as a tuple
            `(images, nfe)`.
        """
        if latents is not None and latents.ndim > 0:
            if batch_size not in (1, latents.shape[0]):
                raise ValueError(f"batch_size={batch_size} does not match latents of batch {latents.shape[0]}.")
            batch_size = latents.shape[0]
        self.check_inputs(num_inference_steps, output_type, batch_size, generator, latents)
        name = flow.solver_name(self.scheduler, solver)  # "rk45", or a step of `ode.STEPPERS` for the loop below
        if max_evaluations is not None and name not in flow.ADAPTIVE:
            raise ValueError(f"`max_evaluations` bounds the adaptive solvers {flow.ADAPTIVE}, got solver={name!r}.")
        device = self._execution_device

        labels = self.prepare_class_labels(class_labels, batch_size, generator, device)
        latents = self.prepare_latents(batch_size, latents, generator, device)
        if name in flow.ADAPTIVE:
            denoise, progress = self._denoiser(labels)
            sigma_min, sigma_max = flow.sigma_range(self.scheduler)
            x = flow.prior_from_noise(self.scheduler, latents)
            options = dict(rtol=rtol, atol=atol, carry_sigma=flow.is_field_model(self.scheduler))
            sample = ode.SAMPLERS[name](denoise, x, [sigma_max, sigma_min], max_evaluations=max_evaluations, **options)
            if flow.noise_levels(self.scheduler, num_inference_steps)[-1] == 0:  # EDM's last Euler step to 0
                sample = denoise(sample, sigma_min)  # x = D(x, sigma_min)
            nfe = denoise.calls
            progress.close()
        else:
            scheduler = flow.loop_scheduler(self.scheduler, solver)
            scheduler.set_timesteps(num_inference_steps, device=device)
            # The generic diffusers start: the scheduler maps it onto its prior at the first call (docs/scheduler.md).
            sample = latents * scheduler.init_noise_sigma
            for t in self.progress_bar(scheduler.timesteps):
                model_input = scheduler.scale_model_input(sample, t)
                model_output = self.unet(model_input.to(self.unet.dtype), t, class_labels=labels).sample
                sample = scheduler.step(model_output.float(), t, sample).prev_sample
            nfe = len(scheduler.timesteps)

        image = postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, nfe)
        return PFGMPipelineOutput(images=image, nfe=nfe)

    # ------------------------------------------------------------------ the flow's other direction

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
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4):
                Tolerances of `solver="rk45"`.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`: standard Gaussian latents, float32.
        """
        self.check_inputs(num_inference_steps)
        name = flow.solver_name(self.scheduler, solver)
        if name not in flow.ADAPTIVE:
            flow.loop_scheduler(self.scheduler, solver)  # refuses a swap an EDM scheduler cannot make
        device = self._execution_device
        x = preprocess(images, self.unet.config.in_channels, do_normalize).to(device)
        labels = self.prepare_class_labels(class_labels, x.shape[0], device=device, required=True)
        denoise, progress = self._denoiser(labels)
        if name in flow.ADAPTIVE:
            sigmas, options = flow.sigma_range(self.scheduler), dict(rtol=rtol, atol=atol)
            options.update(carry_sigma=flow.is_field_model(self.scheduler))
        else:  # the grid walked backwards, ascending, its final sigma = 0 skipped
            sigmas, options = (
                [sigma for sigma in flow.noise_levels(self.scheduler, num_inference_steps) if sigma > 0],
                {},
            )
            sigmas = sigmas[::-1]
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
    ) -> PFGMLikelihoodOutput | tuple:
        r"""
        Log-likelihood of images under the model, through the probability-flow ODE (PFGM `likelihood.py`).

        [x, delta] is integrated with scipy's RK45 in ln sigma from sigma_min to sigma_max (`ode.solve_log_likelihood`:
        d delta/d ln sigma = div_x (x - D) by Hutchinson's estimator, one probe per image drawn from `generator`), then
        log p(x) = log p_prior(x_T) + delta with the exact prior density (`perturbation.prior_log_prob`; in field mode
        D = 1 at z_max, ignoring the sampler's radius clip). The images are the state at sigma_min. The ODE state is
        float64, each evaluation float32.

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

        Returns:
            [`PFGMLikelihoodOutput`] or `tuple`.

        Raises:
            `ValueError`: for a UNet that is not float32 or float64, whose rounding makes the adaptive solver take
            3x the evaluations and moves the result (docs/pipeline.md): call `pipe.to(torch.float32)` first.
        """
        if hutchinson_type not in HUTCHINSON_TYPES:
            raise ValueError(f"`hutchinson_type` must be one of {HUTCHINSON_TYPES}, got {hutchinson_type!r}.")
        if self.unet.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"log_likelihood needs a float32 UNet, got unet.dtype={self.unet.dtype}: the network's rounding "
                "makes the adaptive solver take 2-3x the evaluations and moves the likelihood. Call "
                "`pipe.to(torch.float32)` first (the weights are the same model)."
            )
        device = self._execution_device
        x = preprocess(images, self.unet.config.in_channels, do_normalize).to(device)
        batch_size, N = x.shape[0], x[0].numel()
        self.check_inputs(1, batch_size=batch_size, generator=generator)
        labels = self.prepare_class_labels(class_labels, batch_size, device=device, required=True)
        if dequantize:
            levels = torch.round((x + 1) * 127.5)  # 0..255
            uniform = torch.special.ndtr(randn_tensor(x.shape, generator=generator, device=device))  # U(0, 1)
            x = (levels + uniform) / 256 * 2 - 1
        probe = randn_tensor(x.shape, generator=generator, device=device, dtype=torch.float32)
        if hutchinson_type == "rademacher":
            probe = torch.sign(probe)
        sigma_min, sigma_max = flow.sigma_range(self.scheduler)
        denoise, progress = self._denoiser(labels)
        x_T, delta, nfe = ode.solve_log_likelihood(denoise, x, probe, sigma_min, sigma_max, rtol, atol)
        progress.close()
        log_prob = prior_log_prob(x_T.double(), sigma_max, self.scheduler.config.get("aug_dim")) + delta
        bits_per_dim = -log_prob / (N * math.log(2)) + _BITS_PER_DIM_OFFSET
        latents = flow.noise_from_prior(self.scheduler, x_T)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (bits_per_dim, log_prob, latents, nfe)
        return PFGMLikelihoodOutput(bits_per_dim=bits_per_dim, log_prob=log_prob, latents=latents, nfe=nfe)
