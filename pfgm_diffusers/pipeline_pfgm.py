"""`PFGMPipeline`: sampling PFGM and PFGM++ models, a diffusers pipeline (check inputs, prepare latents, loop,
post-process); as a flow it also inverts, interpolates and measures likelihoods (`pipeline_flow.InvertibleFlowMixin`).

Every mode integrates one ODE (math.md §1), dx/dsigma = (x - D(x, sigma)) / sigma, with the denoiser the scheduler
builds from the network. What it calls: the solvers in `ode.py` and the pieces of a run in `flow.py`; class labels
in `class_labels.py`, image conditions in `conditioning.py`, guidance in `guidance.py`, argument checks in
`validation.py`, the Hub plumbing in `hub.py`, image conversion in `image_processing.py`, the VAE in `vae.py`.
Latents are standard Gaussian everywhere; only the scheduler maps them onto its prior.
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from . import class_labels as labels_module
from . import flow
from .conditioning import check_conditioning, concat_condition, prepare_conditioning_image
from .denoiser import denoise_with
from .guidance import check_guidance, guided_denoiser, null_conditions
from .hub import PipelineHubMixin
from .image_processing import OUTPUT_TYPES, image_grid, postprocess, preprocess
from .latents import check_standard_gaussian
from .pipeline_flow import InvertibleFlowMixin, PFGMLikelihoodOutput
from .scheduling_common import PoissonFlowScheduler
from .scheduling_pfgm import PFGMScheduler
from .scheduling_pfgm_field import PFGMFieldScheduler
from .vae import LatentScaling, check_vae, decode_latents, encode_latents, vae_scale_factor
from .validation import batch_size_of, check_choice, check_generators, check_integer

__all__ = ["PFGMLikelihoodOutput", "PFGMPipeline", "PFGMPipelineOutput", "image_grid"]

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


class PFGMPipeline(PipelineHubMixin, InvertibleFlowMixin, DiffusionPipeline):
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
        check_conditioning(unet.config.in_channels, conditioning_channels, conditioning_dropout_prob)
        labels_module.check_null_class_label(null_class_label, unet.config.num_class_embeds)
        labels_module.check_class_names(class_names, unet.config.num_class_embeds, null_class_label)
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
        check_choice("output_type", output_type, allowed)
        check_integer("batch_size", batch_size)
        check_generators(generator, batch_size)
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
        for an unconditional UNet. Missing labels are drawn uniformly from `generator` unless `required`
        (`class_labels.prepare_class_labels`)."""
        labels = labels_module.prepare_class_labels(
            class_labels,
            batch_size,
            self.num_classes,
            self.config.class_names,
            self._null_class,
            generator,
            required,
        )
        return None if labels is None else labels.to(device)

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
        null = conditions  # w = 1: no null branch is built or run
        if guidance_scale != 1:
            null = null_conditions(conditions, self._null_class, self.config.get("conditioning_dropout_prob"))

        def network(model_input, timestep, class_labels=None, conditioning_image=None):
            model_input = concat_condition(model_input, conditioning_image)
            return self.unet(model_input.to(self.unet.dtype), timestep, class_labels=class_labels).sample

        return guided_denoiser(network, conditions, null, float(guidance_scale))

    def check_guidance(self, guidance_scale: float, conditioning_image: torch.Tensor | None = None) -> None:
        """Raise a `ValueError` for a `guidance_scale` this model cannot apply: not a finite number, or other than 1
        for a model with no condition it learnt to do without (a null class from `--class_dropout_prob`, a zero
        image from `--conditioning_dropout_prob`). The null branch drops every such condition; the others stay."""
        image_conditional = self.config.get("conditioning_channels") is not None or conditioning_image is not None
        dropout = self.config.get("conditioning_dropout_prob")
        check_guidance(guidance_scale, self.num_classes is not None, self._null_class, image_conditional, dropout)

    @property
    def condition_shape(self) -> tuple[int, int, int] | None:
        """(channels, height, width) of the condition an image-conditional model takes (`conditioning_image`, one
        per image, at the UNet's sample size); None for a model without one."""
        channels = self.config.get("conditioning_channels")
        return None if channels is None else (channels, *self._latent_shape(1)[2:])

    def prepare_conditioning_image(self, conditioning_image, batch_size, device=None, do_normalize=True):
        """The condition of an image-conditional model as a float32 (B, C_cond, H, W) tensor in model space; None for
        a model without one. Missing, unexpected or mis-shaped conditions are a ValueError."""
        channels, size = self.config.get("conditioning_channels"), self._latent_shape(1)[2:]
        condition = prepare_conditioning_image(conditioning_image, channels, size, batch_size, do_normalize)
        return None if condition is None else condition.to(device)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as `DiffusionPipeline.save_pretrained` does, after checking that `class_names` fit the UNet."""
        labels_module.check_class_names(self.config.class_names, self.unet.config.num_class_embeds, self._null_class)
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
        image part of the way down (image-to-image); with `conditioning_image`, for a model trained on paired data.
        Each argument at length: docs/pipeline.md.

        Args:
            batch_size (`int`, defaults to 1): the number of images; 1 or theirs with `latents`, `image`, a condition.
            class_labels (`int`, `str`, `list` of them, or `torch.Tensor`, *optional*): for a class-conditional UNet,
                one or one per image, ints or names of `class_names`; drawn uniformly from `generator` if not given.
            num_inference_steps (`int`, defaults to 18): steps of the grid (18 Heun steps: 35 calls); not for RK45.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): with a list (one per image), image
                `i` equals a single-image run with generator `i` (but for RK45, which adapts to the whole batch).
            latents (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): standard Gaussian latents to start from,
                e.g. from [`~PFGMPipeline.invert`] or [`~PFGMPipeline.slerp`]; the scheduler maps them onto its prior.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (`(B, H, W, C)`) or `"pt"` (`(B, C, H, W)`), in
                [0, 1]; with a `vae` also `"latent"` (the ODE's final samples, not decoded).
            return_dict (`bool`, defaults to `True`): a [`PFGMPipelineOutput`], else `(images, nfe)`.
            solver (`str`, *optional*): `None`, the scheduler's own steps; a name the scheduler accepts (`"heun"`,
                `"euler"`, `"dpmpp_2m"`), its steps with that solver for this call; `"rk45"`, scipy's adaptive RK45
                in ln sigma (the original PFGM's sampler), followed by x = D(x, sigma_min) where the grid ends at 0;
                `"restart"`, Restart sampling (Xu et al. 2023) on the grid for PFGM++ of any D and EDM, its jumps
                from `generator`: 2n - 1 + 2 K (N_restart - 1) per block evaluations (43 at 18 steps by default).
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4): RK45's tolerances.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance, D = D_null + w (D_cond - D_null) in
                one batched call, for a model trained with a null class and/or conditioning dropout; 1 is the
                conditional model exactly, 0 the null branch exactly (field models: the fields are combined).
            image (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or a list of them, *optional*): images to start
                from (any model), as diffusers' img2img: the last `int(num_inference_steps * strength)` steps run
                from `scheduler.add_noise(image, latents)` at the first of them. Not with RK45 or Restart.
            strength (`float`, *optional*, defaults to 0.8 with `image`): in (0, 1], the share of the grid that runs.
            conditioning_image (*optional*): the condition of an image-conditional model (`conditioning_channels`
                channels, the UNet's size, one per image), e.g. a low-resolution or noisy measurement.
            do_normalize (`bool`, defaults to `True`): `image` and `conditioning_image` in [0, 1], else model space.
            max_evaluations (`int`, *optional*): RK45's budget of calls, else `ode.EvaluationBudgetExceeded`.
            decode_batch_size (`int`, *optional*): a latent model decodes this many images at a time.
            restart_blocks (`dict`, *optional*): Restart's `{"name": [N_restart, K, t_min, t_max]}`, K jumps to t_max
                after the step to t_min each; default the official CIFAR-10 block `restart.RESTART_CIFAR10`.

        Examples:

        Returns:
            [`PFGMPipelineOutput`] or `tuple`: the images and the number of network evaluations `nfe`.
        """
        strength = flow.check_img2img(image, strength, solver)
        image = None if image is None else self._model_space(image, do_normalize, "image")  # a latent model encodes it
        device = self._execution_device
        condition = self.prepare_conditioning_image(conditioning_image, None, device, do_normalize)
        batch_size = batch_size_of(batch_size, {"latents": latents, "image": image, "conditioning_image": condition})
        self.check_inputs(num_inference_steps, output_type, batch_size, generator, latents)
        if image is not None and tuple(image.shape) != self._latent_shape(batch_size):
            raise ValueError(f"image must have shape {self._latent_shape(batch_size)}, got {tuple(image.shape)}.")
        name = flow.solver_name(self.scheduler, solver)  # a pure sampler, or a step of `ode.STEPPERS` for the loop
        flow.check_solver_options(self.scheduler, name, max_evaluations, restart_blocks)
        scheduler = None if name in flow.SAMPLER_ONLY else flow.loop_scheduler(self.scheduler, solver)

        labels = self.prepare_class_labels(class_labels, batch_size, generator, device)
        network = self._network(labels, guidance_scale, condition)
        latents = self.prepare_latents(batch_size, latents, generator, device)
        if scheduler is None:  # RK45 or Restart: `ode.SAMPLERS[name]`
            options = dict(rtol=rtol, atol=atol, max_evaluations=max_evaluations, restart_blocks=restart_blocks)
            sample, nfe = self._sample_without_steps(name, network, latents, num_inference_steps, generator, options)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
            # The generic diffusers start: the scheduler maps it onto its prior at the first call (docs/scheduler.md).
            sample = latents * scheduler.init_noise_sigma
            if image is not None:  # diffusers' img2img start: a begin index, and the image noised to its level
                sample = flow.img2img_start(scheduler, image, latents, num_inference_steps, strength)
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

    def _sample_without_steps(self, name, network, latents, num_inference_steps, generator, options):
        """(samples, network evaluations) of a solver with no scheduler step, its denoiser counted."""
        denoise, progress = self._denoiser(network)
        sample = flow.sample_without_steps(
            name, self.scheduler, denoise, latents, num_inference_steps, generator=generator, **options
        )
        progress.close()
        return sample, denoise.calls

    def _postprocess(self, sample, output_type, decode_batch_size=None):
        """The ODE's final samples -> the output: themselves for "latent", else images (decoded by the VAE first)."""
        if decode_batch_size is not None and self.vae is None:
            raise ValueError(f"decode_batch_size={decode_batch_size!r} needs a latent pipeline: this one has no vae.")
        if output_type == "latent":
            return sample
        if self.vae is not None:
            sample = decode_latents(self.vae, sample, LatentScaling.from_config(self.vae.config), decode_batch_size)
        return postprocess(sample, output_type)

    def _model_space(self, images, do_normalize, name="images"):
        """Images as `invert` and `log_likelihood` take them -> the ODE's space: pixels in [-1, 1], or for a latent
        model the scaled posterior means of the VAE (`vae.encode_latents`)."""
        device = self._execution_device
        if self.vae is None:
            return preprocess(images, self.num_channels, do_normalize, name).to(device)
        return encode_latents(self.vae, preprocess(images, self.vae.config.in_channels, do_normalize, name).to(device))

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
