"""`PFGMPipeline`: sampling, inversion, latent interpolation and likelihoods for PFGM and PFGM++ models.

Every mode integrates one ODE (math.md §1), dx/dsigma = (x - D(x, sigma)) / sigma, with the denoiser the scheduler
builds from the network; the solvers are in `ode.py`, the Hub plumbing in `hub.py`, image conversion in
`image_processing.py`. Latents are standard Gaussian everywhere; only the scheduler maps them onto its prior.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from . import flow, ode
from .conditioning import concat_condition
from .denoiser import denoise_with
from .guidance import guided_denoiser
from .hub import PipelineHubMixin
from .image_processing import OUTPUT_TYPES, image_grid, postprocess, preprocess
from .latents import check_standard_gaussian, slerp_gaussian
from .perturbation import prior_log_prob
from .scheduling_common import PoissonFlowScheduler
from .scheduling_pfgm import PFGMScheduler
from .scheduling_pfgm_field import PFGMFieldScheduler
from .vae import LatentScaling, check_vae, decode_latents, encode_latents, vae_scale_factor
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
            The number of network evaluations the sampler used (with `solver="rk45"` chosen adaptively; with
            `solver="restart"` 2n - 1 for n steps plus 2 K (N_restart - 1) per restart block).
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
        vae ([`~diffusers.AutoencoderKL`], *optional*):
            For a latent model (docs/pipeline.md, "Latent models"): the UNet works on the VAE's scaled latents and
            images are `vae.decode(latents / scaling_factor + shift)` (the VAE config's scaling as diffusers
            pipelines apply it, `vae.LatentScaling`). Without it the UNet works on pixels.
        null_class_label (`int`, *optional*):
            The label of the null class of a UNet trained with class dropout (`--class_dropout_prob`), which makes
            classifier-free guidance (`guidance_scale`) possible: the last class embedding,
            `unet.config.num_class_embeds - 1`. `None` (folders saved without it) means no null class.
        conditioning_channels (`int`, *optional*):
            C_cond for an image-conditional model (image-to-image, e.g. super-resolution): the UNet takes the scaled
            sample and the condition concatenated, `in_channels = C + C_cond`, and every call needs a
            `conditioning_image` of C_cond channels. Saved with the pipeline (`model_index.json`); None: no condition.
        conditioning_dropout_prob (`float`, *optional*):
            The share of training examples whose condition was replaced by zeros (conditioning dropout), recorded by
            the trainer: a model trained with it > 0 knows the zero-condition branch that `guidance_scale` uses.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: PFGMScheduler | PFGMFieldScheduler | EDMEulerScheduler,
        class_names: list[str] | None = None,
        null_class_label: int | None = None,
        conditioning_channels: int | None = None,
        conditioning_dropout_prob: float | None = None,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        flow.check_scheduler(scheduler)
        _check_conditioning(unet, conditioning_channels, conditioning_dropout_prob)
        _check_null_class_label(null_class_label, unet)
        _check_class_names(class_names, unet, null_class_label)
        if vae is not None:
            check_vae(vae, unet.config.in_channels - (conditioning_channels or 0))
        # A pixel model saves `"vae": [null, null]` (diffusers' optional component); folders without it load as before
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        # Saved in model_index.json, so that a class-conditional model can be sampled by class name, and guided
        self.register_to_config(class_names=None if class_names is None else list(class_names))
        self.register_to_config(null_class_label=null_class_label)
        # An image-conditional model's condition channels: not derivable from the UNet (field models: C + 1 outputs)
        self.register_to_config(
            conditioning_channels=conditioning_channels, conditioning_dropout_prob=conditioning_dropout_prob
        )

    @property
    def num_channels(self) -> int:
        """C, the channels of the images (the UNet's inputs less the condition's)."""
        return self.unet.config.in_channels - (self.config.get("conditioning_channels") or 0)

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, num_inference_steps, output_type="pt", batch_size=1, generator=None, latents=None):
        """Check the arguments of `__call__` and `invert` and the unet/scheduler pairing."""
        flow.check_scheduler(self.scheduler)
        check_integer("num_inference_steps", num_inference_steps)
        allowed = OUTPUT_TYPES if getattr(self, "vae", None) is None else (*OUTPUT_TYPES, "latent")  # a latent model
        if output_type not in allowed:
            raise ValueError(f"`output_type` must be one of {allowed}, got {output_type!r}.")
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
        in_channels, out_channels = self.num_channels, self.unet.config.out_channels
        expected = in_channels
        if isinstance(self.scheduler, PoissonFlowScheduler):
            expected = self.scheduler.num_output_channels(in_channels)
        if out_channels != expected:
            raise ValueError(
                f"The scheduler's prediction_type={self.scheduler.config.prediction_type!r} needs a UNet with "
                f"{expected} output channels for {in_channels} input channels, but unet.config.out_channels="
                f"{out_channels}."
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the generated images: the UNet's samples for a pixel model; for a latent model
        their decoding (the VAE's channels, the VAE's downsampling factor times the latent size)."""
        height, width = self._latent_shape(1)[2:]
        if self.vae is None:
            return (self.unet.config.in_channels, height, width)
        factor = vae_scale_factor(self.vae.config)
        return (self.vae.config.in_channels, height * factor, width * factor)

    def _latent_shape(self, batch_size: int) -> tuple:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.num_channels, *size)

    def prepare_latents(self, batch_size, latents=None, generator=None, device=None) -> torch.Tensor:
        """Standard Gaussian latents (B, C, H, W), float32: drawn from `generator`, or the given ones moved."""
        if latents is None:
            return randn_tensor(
                self._latent_shape(batch_size), generator=generator, device=device, dtype=torch.float32
            )
        return latents.to(device=device, dtype=torch.float32)

    def prepare_class_labels(self, class_labels, batch_size, generator=None, device=None, required=False):
        """`class_labels` (None, an int or name, a list of them, or an integer tensor) as a (B,) long tensor; None
        for an unconditional UNet. Missing labels are drawn uniformly from `generator` unless `required`."""
        num_classes = self.num_classes
        if num_classes is None and class_labels is not None:
            raise ValueError(
                f"class_labels={_short_repr(class_labels)} were given but the UNet has no class embedding "
                "(unet.config.num_class_embeds is None): it is unconditional."
            )
        if num_classes is None:
            return None
        if class_labels is None and required:
            raise ValueError(f"The UNet is class-conditional (num_class_embeds={num_classes}): pass `class_labels`.")
        if class_labels is None:
            return _random_labels(num_classes, batch_size, generator).to(device)
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be an integer tensor of shape ({batch_size},), got {class_labels}."
                )
            labels = class_labels.reshape(-1).cpu().long().expand(batch_size if class_labels.ndim == 0 else -1)
        else:
            single = not isinstance(class_labels, (list, tuple))
            values = [class_labels] * batch_size if single else list(class_labels)
            labels = torch.tensor([_label_index(value, self.config.class_names) for value in values], dtype=torch.long)
        if labels.shape[0] != batch_size:
            raise ValueError(f"Got {labels.shape[0]} class_labels for a batch of {batch_size}.")
        if labels.min() < 0 or labels.max() >= num_classes:
            null = "" if self._null_class is None else f"; the null class {self._null_class} is guidance_scale=0's"
            raise ValueError(
                f"class_labels must lie in [0, {num_classes - 1}] ({num_classes} classes{null}), got "
                f"{labels.tolist()}."
            )
        return labels.to(device)

    @property
    def num_classes(self) -> int | None:
        """The number of classes a class-conditional UNet was trained on (without the null class); None for an
        unconditional one."""
        num_class_embeds = self.unet.config.num_class_embeds
        if num_class_embeds is None or self._null_class is None:
            return num_class_embeds
        return num_class_embeds - 1

    @property
    def _null_class(self) -> int | None:
        return getattr(self.config, "null_class_label", None)  # None in pipelines saved before it existed

    def _network(self, class_labels, guidance_scale=1.0, conditioning_image=None):
        """`network(model_input, timestep) -> model output` with the conditions bound and classifier-free guidance
        applied (`guidance.guided_denoiser`: one batched call for both branches, only one branch at w = 0 or 1).

        Guidance combines the network outputs. For the PFGM++ prediction types `precondition_outputs` is affine in
        the output with weights that do not depend on it, so this is D = D_null + w (D_cond - D_null) exactly; for the
        field objective it guides the predicted field, E_null + w (E_cond - E_null), before dx/dz = E_x / E_z.
        """
        self.check_guidance(guidance_scale, conditioning_image)
        conditions = {"class_labels": class_labels, "conditioning_image": conditioning_image}
        conditions = {key: value for key, value in conditions.items() if value is not None}
        null_conditions = conditions  # w = 1: no null branch is built or run
        if guidance_scale != 1:
            null_conditions = dict(conditions)
            # the null branch drops every condition the model learnt to do without; the others stay
            if class_labels is not None and self._null_class is not None:
                null_conditions["class_labels"] = torch.full_like(class_labels, self._null_class)
            if conditioning_image is not None and self.config.get("conditioning_dropout_prob"):
                null_conditions["conditioning_image"] = torch.zeros_like(conditioning_image)  # conditioning dropout

        def network(model_input, timestep, class_labels=None, conditioning_image=None):
            model_input = concat_condition(model_input, conditioning_image)
            return self.unet(model_input.to(self.unet.dtype), timestep, class_labels=class_labels).sample

        return guided_denoiser(network, conditions, null_conditions, float(guidance_scale))

    def check_guidance(self, guidance_scale: float, conditioning_image: torch.Tensor | None = None) -> None:
        """Raise a `ValueError` for a `guidance_scale` this model cannot apply: not a finite number, or other than 1
        for a model with no condition it learnt to do without (a null class from `--class_dropout_prob`, a zero
        image from `--conditioning_dropout_prob`). The null branch drops every such condition; the others stay."""
        class_conditional = self.num_classes is not None
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
            raise ValueError(f"`guidance_scale` must be a real number, got {_short_repr(guidance_scale)}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale!r}.")
        if guidance_scale == 1:
            return
        image_conditional = self.config.get("conditioning_channels") is not None or conditioning_image is not None
        if (class_conditional and self._null_class is not None) or (
            image_conditional and self.config.get("conditioning_dropout_prob")
        ):
            return
        if not class_conditional and not image_conditional:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a conditional model, but the UNet has no class embedding "
                "(unet.config.num_class_embeds is None) and no condition was given: pass guidance_scale=1."
            )
        if not class_conditional:
            raise ValueError(
                f"guidance_scale={guidance_scale}: this model was trained without conditioning dropout "
                "(conditioning_dropout_prob is not > 0; train_pfgm.py --conditioning_dropout_prob, e.g. 0.1), so it "
                "has no zero-condition branch: pass guidance_scale=1."
            )
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a model trained with a null class (train_pfgm.py "
            "--class_dropout_prob, e.g. 0.1), but this pipeline has none (null_class_label is None): pass "
            "guidance_scale=1."
        )

    def prepare_conditioning_image(self, conditioning_image, batch_size, device=None, do_normalize=True):
        """The condition of an image-conditional model as a float32 (B, C_cond, H, W) tensor in model space; None for
        a model without one. Missing, unexpected or mis-shaped conditions are a ValueError."""
        channels = self.config.get("conditioning_channels")
        if channels is None:
            if conditioning_image is not None:
                raise ValueError(
                    "A conditioning_image was given but this model takes no condition (conditioning_channels=None): "
                    "it was trained without one. For image-to-image with any model, pass `image=` and `strength=`."
                )
            return None
        if conditioning_image is None:
            raise ValueError(
                f"This model is image-conditional (conditioning_channels={channels}): pass `conditioning_image`, "
                f"{channels}-channel images of {self._latent_shape(1)[2:]} pixels."
            )
        condition = preprocess(conditioning_image, channels, do_normalize)
        shape = self._latent_shape(condition.shape[0])[2:]
        if tuple(condition.shape[2:]) != shape:
            raise ValueError(
                f"conditioning_image must be {shape[0]}x{shape[1]} pixels (the UNet's sample_size), got "
                f"{tuple(condition.shape[2:])}."
            )
        if batch_size is not None and condition.shape[0] != batch_size:
            raise ValueError(f"Got {condition.shape[0]} conditioning images for a batch of {batch_size}.")
        return condition.to(device)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as `DiffusionPipeline.save_pretrained` does, after checking that `class_names` fit the UNet."""
        _check_class_names(self.config.class_names, self.unet, self._null_class)
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------ the ODE's pieces

    def denoise(
        self,
        sample: torch.Tensor,
        sigma: float,
        class_labels=None,
        guidance_scale: float = 1.0,
        conditioning_image=None,
    ):
        """D(x, sigma) of the network at noise level `sigma` (z in field mode), float32 in and out (math.md §1),
        with classifier-free guidance for `guidance_scale` other than 1. Only the network's input is cast to
        `unet.dtype`; `conditioning_image` is a model-space (B, C_cond, H, W) tensor."""
        return self._denoise(self._network(class_labels, guidance_scale, conditioning_image), sample, sigma)

    def _denoise(self, network, sample, sigma):
        return denoise_with(network, self.scheduler, sample, sigma)  # the one composition (denoiser.py)

    def _denoiser(self, network):
        """`denoise` with the conditions bound, as `ode.SAMPLERS` call it, counted, with its progress bar."""
        progress_config = getattr(self, "_progress_bar_config", {})
        return flow.counted_denoiser(lambda sample, sigma: self._denoise(network, sample, sigma), progress_config)

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
        guidance_scale: float = 1.0,
        image=None,
        strength: float | None = None,
        conditioning_image=None,
        do_normalize: bool = True,
        max_evaluations: int | None = None,
        decode_batch_size: int | None = None,
        restart_blocks: dict | None = None,
    ) -> PFGMPipelineOutput | tuple:
        r"""
        Generate images by carrying prior samples to the data along the PFGM ODE; or, with `image`, from a noised
        image part of the way down (image-to-image: SDEdit, PPFM's "hijack" start from a measurement); with
        `conditioning_image`, for a model trained on paired data.

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
                `"pil"` (`PIL.Image`), `"np"` (`(B, H, W, C)` array) or `"pt"` (`(B, C, H, W)` tensor), in [0, 1];
                with a `vae`, also `"latent"`: the ODE's final samples, the scaled VAE latents, not decoded
                (`vae.decode(latents / scaling_factor + shift)` gives the images).
            return_dict (`bool`, defaults to `True`):
                Return a [`PFGMPipelineOutput`] instead of a tuple.
            solver (`str`, *optional*):
                `None` runs the scheduler's own steps. A name the scheduler accepts (`"heun"`, `"euler"`, ...) runs
                the scheduler's steps with that solver for this call. `"rk45"` runs the original PFGM's default
                sampler, scipy's adaptive RK45 in ln sigma from sigma_max to sigma_min; when the scheduler's grid ends
                at 0 (PFGM++ modes), a final denoising step x = D(x, sigma_min) follows, EDM's last Euler step.
                `"restart"` runs Restart sampling (Xu et al. 2023; `restart.sample_restart`) for PFGM++ of any D and
                EDM: Heun on the scheduler's grid of `num_inference_steps` with the `restart_blocks`, each jump drawn
                from the PFGM++ kernel with `generator`; 2n - 1 + 2 K (N_restart - 1) per block network evaluations
                (43 for 18 steps and the default block). Not for the field model (`PFGMFieldScheduler`).
            restart_blocks (`dict`, *optional*, defaults to `restart.RESTART_CIFAR10` with `solver="restart"`):
                Restart's blocks as in the official code, `{"name": [N_restart, K, t_min, t_max]}`: after the main
                step that reaches the level nearest t_min, K times a jump to t_max and N_restart - 1 Heun steps back.
                The default is the official PFGM++ CIFAR-10 block `{"0": [3, 2, 0.14, 0.30]}`. Only with
                `solver="restart"`.
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4):
                Tolerances of `solver="rk45"` (the official PFGM defaults).
            max_evaluations (`int`, *optional*):
                A budget of network calls for `solver="rk45"`: a run that needs more raises
                `ode.EvaluationBudgetExceeded` (with the noise level it reached) instead of going on.
            guidance_scale (`float`, defaults to 1.0):
                Classifier-free guidance (Ho & Salimans 2022) for a model trained with a null class
                (`null_class_label`) and/or conditioning dropout (`conditioning_dropout_prob`): D = D_null +
                w (D_cond - D_null), the null branch with the null class and/or a zero `conditioning_image` (the
                conditions the model learnt to do without), both branches in one network call on a doubled batch.
                1 is the conditional model exactly (one branch, no extra cost), 0 the null branch exactly, > 1
                stronger conditioning. For the field objective the predicted fields are combined.
            image (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or `list[PIL.Image.Image]`, *optional*):
                Images to start from (as [`~PFGMPipeline.invert`] takes them), for any model, as diffusers' img2img
                pipelines: of the grid of `num_inference_steps` steps the last `int(num_inference_steps * strength)`
                run, from `scheduler.add_noise(image, latents)` at the first of them (an exact PFGM++ kernel draw
                around the image; `latents` or `generator` give its Gaussian noise) with `set_begin_index`. The batch
                is the images'. Not with `solver="rk45"`.
            strength (`float`, *optional*, defaults to 0.8 with `image`):
                In (0, 1]: the share of the grid's steps that run. 1 runs every step from sigma_max (the image then
                barely matters); a small strength runs few steps from a low noise level. Only with `image`.
            conditioning_image (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or a list of them, *optional*):
                The condition of an image-conditional model (`config.conditioning_channels` channels, the UNet's
                size, one per image; in [0, 1] unless `do_normalize=False`), e.g. the low-resolution or noisy
                measurement; required for such a model and refused for others.
            do_normalize (`bool`, defaults to `True`):
                `image` and `conditioning_image` are in [0, 1]; with `False`, tensors in model space ([-1, 1] for
                clean images; a noisy measurement may lie beyond).
            decode_batch_size (`int`, *optional*):
                A latent model decodes this many images at a time (decoding is sampling's memory peak); all at once
                by default. Only with a `vae`.

        Examples:

        Returns:
            [`PFGMPipelineOutput`] or `tuple`: the images and the number of network evaluations `nfe`; as a tuple
            `(images, nfe)`.
        """
        if image is not None:
            image = self._model_space(image, do_normalize)  # a latent model encodes it
            strength = 0.8 if strength is None else strength
            _check_strength(strength)
            if solver in flow.SAMPLER_ONLY:
                raise ValueError(
                    f"`image` with solver={solver!r}: strength selects a step of the scheduler's grid, and "
                    f"{'RK45' if solver == 'rk45' else 'Restart'} has none; pass a grid solver (None, 'heun', ...)."
                )
        elif strength is not None:
            raise ValueError(
                f"strength={strength!r} was given without `image`: it sets how far down to start from it."
            )
        device = self._execution_device
        condition = self.prepare_conditioning_image(conditioning_image, None, device, do_normalize)
        sources = {"latents": latents, "image": image, "conditioning_image": condition}
        batch_size = _batch_size(batch_size, {name: value for name, value in sources.items() if value is not None})
        self.check_inputs(num_inference_steps, output_type, batch_size, generator, latents)
        if image is not None and tuple(image.shape) != self._latent_shape(batch_size):
            raise ValueError(f"image must have shape {self._latent_shape(batch_size)}, got {tuple(image.shape)}.")
        name = flow.solver_name(self.scheduler, solver)  # a pure sampler, or a step of `ode.STEPPERS` for the loop
        if max_evaluations is not None and name not in flow.ADAPTIVE:
            raise ValueError(f"`max_evaluations` bounds the adaptive solvers {flow.ADAPTIVE}, got solver={name!r}.")
        if restart_blocks is not None and name != "restart":
            raise ValueError(f"`restart_blocks` are the blocks of solver='restart', got solver={name!r}.")
        aug_dim = flow.restart_aug_dim(self.scheduler) if name == "restart" else None  # refuses the field model
        scheduler = None if name in flow.SAMPLER_ONLY else flow.loop_scheduler(self.scheduler, solver)

        labels = self.prepare_class_labels(class_labels, batch_size, generator, device)
        network = self._network(labels, guidance_scale, condition)
        latents = self.prepare_latents(batch_size, latents, generator, device)
        if name in flow.ADAPTIVE:
            denoise, progress = self._denoiser(network)
            sigma_min, sigma_max = flow.sigma_range(self.scheduler)
            x = flow.prior_from_noise(self.scheduler, latents)
            options = dict(rtol=rtol, atol=atol, carry_sigma=flow.is_field_model(self.scheduler))
            sample = ode.SAMPLERS[name](denoise, x, [sigma_max, sigma_min], max_evaluations=max_evaluations, **options)
            if flow.noise_levels(self.scheduler, num_inference_steps)[-1] == 0:  # EDM's last Euler step to 0
                sample = denoise(sample, sigma_min)  # x = D(x, sigma_min)
            nfe = denoise.calls
            progress.close()
        elif name == "restart":  # Heun on the scheduler's grid, with Restart's jumps from `generator`
            denoise, progress = self._denoiser(network)
            x = flow.prior_from_noise(self.scheduler, latents)
            sigmas = flow.noise_levels(self.scheduler, num_inference_steps)
            options = dict(restart_blocks=restart_blocks, aug_dim=aug_dim, generator=generator)
            sample = ode.SAMPLERS[name](denoise, x, sigmas, **options)
            nfe = denoise.calls
            progress.close()
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
            # The generic diffusers start: the scheduler maps it onto its prior at the first call (docs/scheduler.md).
            sample = latents * scheduler.init_noise_sigma
            if image is not None:  # diffusers' img2img start: a begin index, and the image noised to its level
                t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
                scheduler.set_begin_index(t_start * scheduler.order)
                start = scheduler.timesteps[t_start * scheduler.order :][:1].repeat(batch_size)
                sample = scheduler.add_noise(image.to(device), latents, start)
            timesteps = scheduler.timesteps[scheduler.begin_index or 0 :]
            for t in self.progress_bar(timesteps):
                model_input = scheduler.scale_model_input(sample, t)
                model_output = network(model_input, t)
                sample = scheduler.step(model_output.float(), t, sample).prev_sample
            nfe = len(timesteps)

        image = self._postprocess(sample, output_type, decode_batch_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, nfe)
        return PFGMPipelineOutput(images=image, nfe=nfe)

    def _postprocess(self, sample, output_type, decode_batch_size=None):
        """The ODE's final samples -> the output: themselves for "latent", else images (decoded by the VAE first)."""
        if decode_batch_size is not None and self.vae is None:
            raise ValueError(f"decode_batch_size={decode_batch_size!r} needs a latent pipeline: this one has no vae.")
        if output_type == "latent":
            return sample
        if self.vae is not None:
            sample = decode_latents(self.vae, sample, LatentScaling.from_config(self.vae.config), decode_batch_size)
        return postprocess(sample, output_type)

    def _model_space(self, images, do_normalize):
        """Images as `invert` and `log_likelihood` take them -> the ODE's space: pixels in [-1, 1], or for a latent
        model the scaled posterior means of the VAE (`vae.encode_latents`)."""
        device = self._execution_device
        if self.vae is None:
            return preprocess(images, self.num_channels, do_normalize).to(device)
        return encode_latents(self.vae, preprocess(images, self.vae.config.in_channels, do_normalize).to(device))

    def _require_vae(self, method):
        if self.vae is None:
            raise ValueError(
                f"{method} needs a latent pipeline (a vae); this one works on pixels and decodes nothing."
            )
        return self.vae

    def enable_vae_slicing(self):
        """Decode one image at a time inside the VAE (less memory); see also `decode_batch_size`."""
        self._require_vae("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self):
        self._require_vae("disable_vae_slicing").disable_slicing()

    def enable_vae_tiling(self):
        """Decode large images in overlapping tiles (less memory, possible seams): `AutoencoderKL.enable_tiling`."""
        self._require_vae("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self):
        self._require_vae("disable_vae_tiling").disable_tiling()

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
        if hutchinson_type not in HUTCHINSON_TYPES:
            raise ValueError(f"`hutchinson_type` must be one of {HUTCHINSON_TYPES}, got {hutchinson_type!r}.")
        if guidance_scale != 1:
            raise ValueError(
                f"log_likelihood has no guidance_scale={guidance_scale!r}: a guided ODE (D_null + w (D_cond - "
                "D_null)) is no probability flow of the trained model, so it gives no likelihood of it. Pass "
                "guidance_scale=1 (the conditional model)."
            )
        if self.unet.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"log_likelihood needs a float32 UNet, got unet.dtype={self.unet.dtype}: the network's rounding "
                "makes the adaptive solver take 2-3x the evaluations and moves the likelihood. Call "
                "`pipe.to(torch.float32)` first (the weights are the same model)."
            )
        if dequantize and self.vae is not None:
            raise ValueError(
                "dequantize=True dequantizes 8-bit pixels, but this latent pipeline measures the density of VAE "
                "latents (bits per latent dimension): pass dequantize=False."
            )
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


# ---------------------------------------------------------------------- helpers


def _check_null_class_label(null_class_label, unet):
    """The null class is the last class embedding, or there is none."""
    if null_class_label is None:
        return
    num_class_embeds = unet.config.num_class_embeds
    if num_class_embeds is None or num_class_embeds < 2:
        raise ValueError(
            f"null_class_label={null_class_label!r} needs a class-conditional UNet with at least 2 class embeddings, "
            f"got num_class_embeds={num_class_embeds}."
        )
    if isinstance(null_class_label, bool) or null_class_label != num_class_embeds - 1:
        raise ValueError(
            f"null_class_label must be the last class embedding, {num_class_embeds - 1} (num_class_embeds="
            f"{num_class_embeds}), or None, got {null_class_label!r}."
        )


def _check_class_names(class_names, unet, null_class_label=None):
    """One name per class embedding of the UNet (the null class has none), or none."""
    if class_names is None:
        return
    num_classes = unet.config.num_class_embeds
    if num_classes is not None and null_class_label is not None:
        num_classes -= 1
    if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
        raise ValueError(f"`class_names` must be a list of strings, got {_short_repr(class_names)}.")
    if num_classes is None or len(class_names) != num_classes:
        raise ValueError(
            f"Got {len(class_names)} class_names for a UNet with num_class_embeds={num_classes}: give one name per"
            " class, in label order (or none)."
        )


def _check_conditioning(unet, conditioning_channels, conditioning_dropout_prob):
    if conditioning_channels is not None:
        in_channels = unet.config.in_channels
        if (
            isinstance(conditioning_channels, bool)
            or not isinstance(conditioning_channels, (int, np.integer))
            or not 1 <= conditioning_channels < in_channels
        ):
            raise ValueError(
                f"conditioning_channels must be None or an integer in [1, {in_channels - 1}] (the UNet's in_channels "
                f"{in_channels} = C + C_cond with C >= 1), got {conditioning_channels!r}."
            )
    if conditioning_dropout_prob is not None:
        if conditioning_channels is None:
            raise ValueError(
                "conditioning_dropout_prob is set but the model has no condition (conditioning_channels)."
            )
        if not isinstance(conditioning_dropout_prob, (int, float)) or not 0 <= conditioning_dropout_prob <= 1:
            raise ValueError(f"conditioning_dropout_prob must be in [0, 1], got {conditioning_dropout_prob!r}.")


def _check_strength(strength):
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}.")


def _batch_size(batch_size, sources):
    """The batch: that of every given tensor (which must agree), with `batch_size` 1 or equal to it."""
    sizes = {name: value.shape[0] for name, value in sources.items() if value.ndim > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"The batch sizes of {', '.join(f'{k} ({v})' for k, v in sizes.items())} must be equal.")
    if not sizes:
        return batch_size
    (name, size), *_ = sizes.items()
    if batch_size not in (1, size):
        raise ValueError(f"batch_size={batch_size} does not match {name} of batch {size}.")
    return size


def _label_index(label, class_names):
    """An int label, or the index of a class name in the pipeline's `class_names`."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    if isinstance(label, str):
        if class_names is None:
            raise ValueError(f"class label {label!r} is a name, but the pipeline has no `class_names`: pass ints.")
        if label not in class_names:
            raise ValueError(f"Unknown class name {label!r}: the pipeline's class_names are {class_names}.")
        return class_names.index(label)
    raise ValueError(
        f"class_labels must be ints, class names, a list of them or an integer tensor, got {_short_repr(label)}."
    )


def _short_repr(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _random_labels(num_classes, batch_size, generator):
    """Uniform labels (B,); with a generator list, label i comes from generator i (as in a single-image run)."""
    if isinstance(generator, list):
        return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randint(num_classes, (batch_size,), generator=generator, device=device).cpu()
