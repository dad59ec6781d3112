"""`PFGMPipeline`: sampling, inversion, latent interpolation and likelihoods for PFGM and PFGM++ models.

Every mode integrates one ODE (math.md §1): dx/dsigma = (x - D(x, sigma)) / sigma, with the denoiser
D = scheduler.precondition_outputs(x, unet(precondition_inputs(x, sigma), precondition_noise(sigma)), sigma).
In field mode (the original PFGM, `prediction_type="poisson_field"`) sigma means z and D = x - z v_x / v_z.
"""

import math
import tempfile
from dataclasses import dataclass

import huggingface_hub
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from scipy import integrate
from tqdm.auto import tqdm

from .hub import download_pipeline, save_model_card, upload_pipeline
from .perturbation import gaussian, normal_to_radius, prior_log_prob, radius_to_normal
from .scheduling_pfgm import PFGMScheduler

OUTPUT_TYPES = ("pil", "np", "pt")
SOLVERS = (None, "rk45")
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

        >>> # PFGM is an invertible flow: image -> prior latent -> image
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
            The images carried to the prior by the probability-flow ODE.
        nfe (`int`):
            The number of ODE function evaluations (each one network forward and one backward pass).
    """

    bits_per_dim: torch.Tensor
    log_prob: torch.Tensor
    latents: torch.Tensor
    nfe: int


class PFGMPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional or class-conditional image generation with Poisson flow generative models: PFGM++
    (any augmentation dimension D, D = infinity being EDM) and the original PFGM (a field model with C + 1 outputs).

    It is an invertible flow: besides sampling it maps images to prior latents ([`~PFGMPipeline.invert`]),
    interpolates latents ([`~PFGMPipeline.slerp`]) and measures likelihoods ([`~PFGMPipeline.log_likelihood`]).

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.). `from_pretrained`
    loads from a local folder or from the Hub (see [`~PFGMPipeline.download`]).

    Parameters:
        unet ([`UNet2DModel`]):
            The network. `C` output channels for the PFGM++ prediction types, `C + 1` for
            `prediction_type="poisson_field"`. Class-conditional if it has `num_class_embeds`.
        scheduler ([`PFGMScheduler`] or [`~diffusers.EDMEulerScheduler`]):
            The scheduler; it owns the preconditioning, the sigma grid and the prior.
        class_names (`list[str]`, *optional*):
            The names of the classes of a class-conditional UNet, in label order (saved with the pipeline).
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: PFGMScheduler | EDMEulerScheduler,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # Saved in model_index.json, so that a class-conditional model can be sampled by class name
        self.register_to_config(class_names=None if class_names is None else list(class_names))

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        r"""
        Download a pipeline repository from the Hub with `huggingface_hub.snapshot_download` and return its folder.

        Diffusers' own `DiffusionPipeline.download` refuses `model_index.json` entries whose library it does not
        know (here `pfgm_diffusers.scheduling_pfgm`) before fetching anything, so this pipeline replaces it. Only
        the pipeline's own files (`hub.PIPELINE_FILES`) and the model card are fetched; no code file is ever
        downloaded or run. [`~DiffusionPipeline.from_pretrained`] calls this for any name that is not a local folder.

        Args:
            pretrained_model_name (`str`):
                The repository id, e.g. `"user/pfgmpp-cifar10"`.
            cache_dir, force_download, local_files_only, token, revision:
                Passed to `huggingface_hub.snapshot_download`.

        Returns:
            `str`: the local folder holding the snapshot.
        """
        return download_pipeline(pretrained_model_name, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> str:
        r"""
        Save the pipeline into a fresh folder and upload its files and a model card (library `pfgm_diffusers`).

        Args:
            repo_id (`str`):
                The repository to push to (created if it does not exist).
            commit_message (`str`, *optional*):
                Defaults to `"Upload PFGMPipeline"`.
            private (`bool`, *optional*):
                Whether a newly created repository is private.
            token (`str`, *optional*):
                The Hub token; defaults to the stored login.
            create_pr (`bool`, defaults to `False`):
                Open a pull request instead of committing.
            safe_serialization (`bool`, defaults to `True`), variant (`str`, *optional*):
                Passed to [`~DiffusionPipeline.save_pretrained`].

        Returns:
            The `huggingface_hub` commit info of the upload.
        """
        repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            save_model_card(folder, repo_id)
            return upload_pipeline(repo_id, folder, token, commit_message, create_pr)

    # ------------------------------------------------------------------ input checks and conversions

    @property
    def _is_field_model(self) -> bool:
        return self.scheduler.config.get("prediction_type") == "poisson_field"

    def _sample_shape(self, batch_size: int) -> tuple:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def check_inputs(self, num_inference_steps, output_type, solver):
        """Check the arguments shared by `__call__` and `invert` and the unet/scheduler pairing."""
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if solver not in SOLVERS:
            raise ValueError(
                f"`solver` must be None (the scheduler's own {self.scheduler.config.get('solver', 'Euler')} steps) "
                f"or 'rk45', got {solver!r}; choose 'heun' or 'euler' through the scheduler's `solver` config."
            )
        in_channels, out_channels = self.unet.config.in_channels, self.unet.config.out_channels
        expected = in_channels + 1 if self._is_field_model else in_channels
        if out_channels != expected:
            mode = self.scheduler.config.get("prediction_type")
            raise ValueError(
                f"The scheduler's prediction_type={mode!r} needs a UNet with {expected} output channels "
                f"({in_channels} input channels{' + 1 for the field z-component' if self._is_field_model else ''}), "
                f"but unet.config.out_channels={out_channels}."
            )

    @staticmethod
    def _check_generator(generator, batch_size):
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You passed a list of {len(generator)} generators for a batch of {batch_size}: pass one generator "
                "per image (or a single generator)."
            )

    def prepare_class_labels(self, class_labels, batch_size, generator=None, device=None, required=False):
        """`class_labels` (None, int, list or tensor) as a (B,) long tensor; None for an unconditional UNet."""
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    f"class_labels={_short_repr(class_labels)} were given but the UNet has no class embedding "
                    "(unet.config.num_class_embeds is None): it is unconditional."
                )
            return None
        if class_labels is None:
            if required:
                raise ValueError(
                    f"The UNet is class-conditional (num_class_embeds={num_classes}): pass `class_labels` of the "
                    "images."
                )
            labels = _random_labels(num_classes, batch_size, generator)
        elif isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be an integer tensor of shape ({batch_size},), got {class_labels}."
                )
            labels = class_labels.reshape(-1).cpu().long()
            if class_labels.ndim == 0:
                labels = labels.expand(batch_size)
        elif isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
            labels = torch.full((batch_size,), int(class_labels), dtype=torch.long)
        elif isinstance(class_labels, (list, tuple)) and all(
            isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in class_labels
        ):
            labels = torch.tensor([int(label) for label in class_labels], dtype=torch.long)
        else:
            raise ValueError(
                f"class_labels must be an int, a list of ints or an integer tensor, got {_short_repr(class_labels)}."
            )
        if labels.shape[0] != batch_size:
            raise ValueError(f"Got {labels.shape[0]} class_labels for a batch of {batch_size}.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"class_labels must lie in [0, {num_classes - 1}] (num_class_embeds={num_classes}), got "
                f"{labels.tolist()}."
            )
        return labels.to(device)

    def prepare_latents(self, batch_size, latents, generator, device, scheduler_loop=True):
        """Draw the starting sample from the scheduler's prior, or check and declare user `latents` (float32).

        `scheduler_loop=False` (RK45, which never calls `scheduler.step`) leaves the scheduler's "the next run starts
        from a prior draw" mark alone, so that it cannot leak into a later generic loop on the same scheduler.
        """
        shape = self._sample_shape(batch_size)
        if latents is not None:
            if latents.ndim != 4 or tuple(latents.shape[1:]) != shape[1:]:
                raise ValueError(f"Unexpected latents shape {tuple(latents.shape)}: expected (batch, {shape[1:]}).")
            if scheduler_loop and hasattr(self.scheduler, "mark_prior_sample"):
                self.scheduler.mark_prior_sample()
            return latents.to(device=device, dtype=torch.float32)
        if hasattr(self.scheduler, "prior_from_noise") and not scheduler_loop:
            return self.scheduler.prior_from_noise(gaussian(shape, generator, device, torch.float32))
        if hasattr(self.scheduler, "sample_prior"):
            return self.scheduler.sample_prior(shape, generator=generator, device=device, dtype=torch.float32)
        # A plain EDM scheduler: the generic diffusers start.
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * (
            self.scheduler.init_noise_sigma
        )

    def _preprocess(self, images, do_normalize, device):
        """Images (PIL, np (B, H, W, C) in [0, 1] or pt (B, C, H, W) in [0, 1]) -> model space float32 (B, C, H, W)."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if isinstance(images, list) and all(isinstance(image, PIL.Image.Image) for image in images):
            images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
            if images.ndim == 3:
                images = images[..., None]
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(f"numpy images must have shape (B, H, W, C), got {images.shape}.")
            images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be PIL images, a numpy array or a torch tensor, got {type(images)}.")
        if images.ndim != 4 or images.shape[1] != self.unet.config.in_channels:
            raise ValueError(
                f"images must have shape (B, {self.unet.config.in_channels}, H, W), got {tuple(images.shape)}."
            )
        images = images.to(device=device, dtype=torch.float32)
        if do_normalize:
            if images.min() < 0 or images.max() > 1:
                raise ValueError(
                    f"images must lie in [0, 1] (as output_type 'pt' / 'np' return them), got values in "
                    f"[{images.min().item():.3g}, {images.max().item():.3g}]; pass do_normalize=False for tensors "
                    "already in the model's [-1, 1] space."
                )
            images = images * 2 - 1
        return images

    def _postprocess(self, sample, output_type):
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            return self.numpy_to_pil(image)
        return image

    # ------------------------------------------------------------------ the ODE

    def denoise(self, sample: torch.Tensor, sigma: float, class_labels=None) -> torch.Tensor:
        """D(x, sigma) of the network at noise level `sigma` (z in field mode), float32 in and out (math.md §1)."""
        model_input = self.scheduler.precondition_inputs(sample, sigma)
        timestep = torch.as_tensor(self.scheduler.precondition_noise(sigma), dtype=torch.float32)
        timestep = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        model_output = self.unet(model_input.to(self.unet.dtype), timestep, class_labels=class_labels).sample
        return self.scheduler.precondition_outputs(sample, model_output.float(), sigma).float()

    def _drift(self, sample, sigma, class_labels):
        """dx/d(ln sigma) = x - D(x, sigma): the ODE in t' = ln sigma (for field mode: z dx/dz, official PFGM)."""
        return sample - self.denoise(sample, sigma, class_labels)

    def _heun(self, sample, sigmas, class_labels):
        """Heun steps of dx/dsigma = (x - D) / sigma along `sigmas` (any direction, all > 0); NFE = 2 (n - 1)."""
        for sigma, sigma_next in self.progress_bar(list(zip(sigmas[:-1], sigmas[1:], strict=True))):
            d = self._drift(sample, sigma, class_labels) / sigma
            euler = sample + (sigma_next - sigma) * d
            d_next = self._drift(euler, sigma_next, class_labels) / sigma_next
            sample = sample + (sigma_next - sigma) * (d + d_next) / 2
        return sample, 2 * (len(sigmas) - 1)

    def _rk45(self, sample, sigma_from, sigma_to, class_labels, rtol, atol):
        """Adaptive RK45 (scipy `solve_ivp`) of the ODE in ln sigma from `sigma_from` to `sigma_to`; returns (x, nfe).

        Field mode keeps the official PFGM state layout: the image with an extra channel holding z, flattened to
        float64, with d z / d ln z = z (PFGM `sampling.py:get_rk45_sampler_pfgm`).
        """
        shape, device = sample.shape, sample.device
        field = self._is_field_model
        state_shape = (shape[0], shape[1] + 1, *shape[2:]) if field else tuple(shape)
        progress = self._evaluation_counter()

        def ode_func(t, state):
            sigma = math.exp(t)
            state = torch.from_numpy(state.reshape(state_shape)).to(device, torch.float32)
            x = state[:, :-1] if field else state
            drift = self._drift(x, sigma, class_labels)
            if field:
                drift = torch.cat([drift, torch.full_like(drift[:, :1], sigma)], dim=1)
            progress.update()
            return drift.double().cpu().numpy().reshape(-1)

        initial = sample.double()
        if field:
            initial = torch.cat([initial, torch.full_like(initial[:, :1], sigma_from)], dim=1)
        solution = integrate.solve_ivp(
            ode_func,
            (math.log(sigma_from), math.log(sigma_to)),
            initial.cpu().numpy().reshape(-1),
            method="RK45",
            rtol=rtol,
            atol=atol,
        )
        progress.close()
        if not solution.success:
            raise RuntimeError(f"RK45 failed between sigma={sigma_from} and sigma={sigma_to}: {solution.message}")
        final = torch.from_numpy(solution.y[:, -1].reshape(state_shape)).to(device, torch.float32)
        return (final[:, :-1] if field else final), int(solution.nfev)

    def _evaluation_counter(self):
        """A progress bar without a total, for the adaptive solver (diffusers' `progress_bar` needs one)."""
        config = getattr(self, "_progress_bar_config", {})
        return tqdm(total=None, **{"desc": "network evaluations", **config})

    def _sigma_range(self):
        return float(self.scheduler.config.sigma_min), float(self.scheduler.config.sigma_max)

    def _ends_with_denoising(self) -> bool:
        """Whether the scheduler's grid ends at sigma = 0, i.e. with the Euler step x = D(x, sigma_min)."""
        return not self._is_field_model and self.scheduler.config.get("final_sigmas_type", "zero") == "zero"

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_inference_steps: int = 18,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        solver: str | None = None,
        rtol: float = 1e-4,
        atol: float = 1e-4,
    ) -> PFGMPipelineOutput | tuple:
        r"""
        Generate images by carrying prior samples to the data along the PFGM ODE.

        Args:
            batch_size (`int`, defaults to 1):
                The number of images. With `latents` the batch is `latents.shape[0]`; `batch_size` must then be 1
                or equal to it.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
                Class labels for a UNet with `num_class_embeds`: one int for the whole batch, or one per image.
                Drawn uniformly at random (from `generator`) when not given.
            num_inference_steps (`int`, defaults to 18):
                Steps of the scheduler's grid (18 Heun steps = 35 network evaluations). Ignored by `solver="rk45"`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic. With a list (one per image), image `i` equals a single-image run
                with generator `i` (for the scheduler's solvers; RK45 adapts its steps to the whole batch).
            latents (`torch.Tensor` of shape `(B, C, H, W)`, *optional*):
                Prior samples to start from (e.g. from [`~PFGMPipeline.invert`] or [`~PFGMPipeline.slerp`]), used as
                they are: they are not rescaled by `init_noise_sigma`.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (`PIL.Image`), `"np"` (`(B, H, W, C)` array) or `"pt"` (`(B, C, H, W)` tensor), in [0, 1].
            return_dict (`bool`, defaults to `True`):
                Return a [`PFGMPipelineOutput`] instead of a tuple.
            solver (`str`, *optional*):
                `None` runs the scheduler's own steps (Heun or Euler, as its `solver` config says). `"rk45"` runs the
                original PFGM's default sampler: scipy's adaptive RK45 in ln sigma (ln z in field mode, with the
                official state layout) from sigma_max to sigma_min; for the PFGM++ modes a final denoising step
                x = D(x, sigma_min) follows when the scheduler's grid ends at 0 (EDM's last Euler step), while field
                mode stops at z_min as the official code does.
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4):
                Tolerances of `solver="rk45"` (the official PFGM defaults).

        Examples:

        Returns:
            [`PFGMPipelineOutput`] or `tuple`: the images and the number of network evaluations `nfe`; as a tuple
            `(images, nfe)`.
        """
        self.check_inputs(num_inference_steps, output_type, solver)
        if latents is not None:
            if batch_size not in (1, latents.shape[0]):
                raise ValueError(f"batch_size={batch_size} does not match latents of batch {latents.shape[0]}.")
            batch_size = latents.shape[0]
        self._check_generator(generator, batch_size)
        device = self._execution_device

        labels = self.prepare_class_labels(class_labels, batch_size, generator, device)
        if solver == "rk45":
            sample = self.prepare_latents(batch_size, latents, generator, device, scheduler_loop=False)
            sigma_min, sigma_max = self._sigma_range()
            sample, nfe = self._rk45(sample, sigma_max, sigma_min, labels, rtol, atol)
            if self._ends_with_denoising():
                sample, nfe = self.denoise(sample, sigma_min, labels), nfe + 1
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            # After set_timesteps, so that a scheduler resetting its state there still sees the prior flag.
            sample = self.prepare_latents(batch_size, latents, generator, device)
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(sample, t).to(self.unet.dtype)
                model_output = self.unet(model_input, t, class_labels=labels).sample
                sample = self.scheduler.step(model_output.float(), t, sample).prev_sample.float()
            nfe = len(self.scheduler.timesteps)

        image = self._postprocess(sample, output_type)
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
        class_labels: int | list[int] | torch.Tensor | None = None,
        solver: str | None = None,
        do_normalize: bool = True,
        rtol: float = 1e-4,
        atol: float = 1e-4,
    ) -> torch.Tensor:
        r"""
        Map images to prior latents by integrating the same ODE forward, from sigma_min (z_min) to sigma_max (z_max).

        The images are taken as the state at sigma_min. Feeding the result back as `latents` to
        [`~PFGMPipeline.__call__`] with the same `num_inference_steps` reconstructs the images up to the solver's
        discretisation error.

        Args:
            images (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or `list[PIL.Image.Image]`):
                A `(B, C, H, W)` tensor or `(B, H, W, C)` array in [0, 1] (as output_type `"pt"`/`"np"` returns
                them) or PIL images.
            num_inference_steps (`int`, defaults to 18):
                The scheduler's grid of that many steps is walked backwards with Heun steps (2 (n - 1) network
                evaluations; the final sigma = 0 of the grid is skipped since the images sit at sigma_min).
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
                The images' classes; required for a class-conditional UNet.
            solver (`str`, *optional*):
                `None` for the Heun steps above, `"rk45"` for scipy's adaptive RK45 in ln sigma.
            do_normalize (`bool`, defaults to `True`):
                Map images from [0, 1] to the model's [-1, 1]. With `False`, `images` is a tensor in model space.
            rtol (`float`, defaults to 1e-4), atol (`float`, defaults to 1e-4):
                Tolerances of `solver="rk45"`.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`: latents at sigma_max, float32.
        """
        self.check_inputs(num_inference_steps, "pt", solver)
        device = self._execution_device
        sample = self._preprocess(images, do_normalize, device)
        labels = self.prepare_class_labels(class_labels, sample.shape[0], device=device, required=True)
        sigma_min, sigma_max = self._sigma_range()
        if solver == "rk45":
            latents, _ = self._rk45(sample, sigma_min, sigma_max, labels, rtol, atol)
        else:
            self.scheduler.set_timesteps(num_inference_steps)
            sigmas = [float(s) for s in self.scheduler.sigmas.flip(0) if s > 0]  # ascending, sigma_min..sigma_max
            latents, _ = self._heun(sample, sigmas, labels)
        self.maybe_free_model_hooks()
        return latents

    def slerp(self, latents_a: torch.Tensor, latents_b: torch.Tensor, t) -> torch.Tensor:
        r"""
        Interpolate between prior latents so that every interpolant is again distributed as the prior.

        The prior is radial, x = R u with u uniform on the sphere and R independent of u. The directions are
        interpolated by slerp (rotation-equivariant, so a uniform direction stays uniform) and the radii through
        their quantiles: each R is mapped to a standard normal n through the prior's radial CDF, n_t = cos(pi t / 2)
        n_a + sin(pi t / 2) n_b is again standard normal for independent endpoints, and mapped back. t = 0 and
        t = 1 return the endpoints. In field mode the radius is re-clipped to [1, upper_norm] like the prior.

        Args:
            latents_a (`torch.Tensor` of shape `(B, C, H, W)`), latents_b (`torch.Tensor`, same shape):
                The endpoints, e.g. prior draws or [`~PFGMPipeline.invert`] outputs.
            t (`float`, `list[float]` or 1-D `torch.Tensor`):
                Interpolation weights in [0, 1].

        Returns:
            `torch.Tensor`: `(B, C, H, W)` for a float `t`; `(len(t) * B, C, H, W)` for a sequence, weight-major
            (with B = 1, one frame per weight), ready to pass as `latents`.
        """
        if latents_a.shape != latents_b.shape:
            raise ValueError(f"latents_a {tuple(latents_a.shape)} and latents_b {tuple(latents_b.shape)} differ.")
        scalar = isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.ndim == 0)
        weights = np.atleast_1d(np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float64))
        if weights.ndim != 1 or np.any(weights < 0) or np.any(weights > 1):
            raise ValueError(f"t must be a float or a 1-D sequence of floats in [0, 1], got {t!r}.")
        batch_size, N = latents_a.shape[0], latents_a[0].numel()
        a = latents_a.detach().reshape(batch_size, N).double().cpu().numpy()
        b = latents_b.detach().reshape(batch_size, N).double().cpu().numpy()
        radius_a, radius_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)  # (B,)
        u_a, u_b = a / radius_a[:, None], b / radius_b[:, None]
        theta = np.arccos(np.clip((u_a * u_b).sum(1), -1.0, 1.0))[None, :, None]  # (1, B, 1)
        w = weights[:, None, None]  # (T, 1, 1)
        sin_theta = np.sin(theta)
        with np.errstate(divide="ignore", invalid="ignore"):
            slerped = (np.sin((1 - w) * theta) * u_a + np.sin(w * theta) * u_b) / sin_theta
        nearly_parallel = sin_theta < 1e-6  # fall back to a normalised lerp
        lerped = (1 - w) * u_a + w * u_b
        direction = np.where(nearly_parallel, lerped, slerped)
        direction /= np.linalg.norm(direction, axis=2, keepdims=True)

        sigma_max, aug_dim, upper_norm = self._prior_params()
        n_a, n_b = (
            radius_to_normal(radius_a, N, sigma_max, aug_dim),
            radius_to_normal(radius_b, N, sigma_max, aug_dim),
        )
        n_t = np.cos(np.pi / 2 * w[..., 0]) * n_a + np.sin(np.pi / 2 * w[..., 0]) * n_b  # (T, B)
        radius = normal_to_radius(n_t, N, sigma_max, aug_dim)
        # Exact endpoints, whatever the round trip through the quantiles loses.
        radius = np.where(w[..., 0] == 0, radius_a, np.where(w[..., 0] == 1, radius_b, radius))
        if upper_norm is not None:
            radius = np.clip(radius, 1.0, upper_norm)
        out = torch.from_numpy(direction * radius[..., None]).to(latents_a.device, latents_a.dtype)
        out = out.reshape(len(weights) * batch_size, *latents_a.shape[1:])
        return out[:batch_size] if scalar else out

    def _prior_params(self):
        """(sigma_max, aug_dim, upper_norm) of the prior: PFGM++, or the hyperplane prior (D = 1) in field mode."""
        config = self.scheduler.config
        if self._is_field_model:
            return float(config.sigma_max), 1, config.get("upper_norm")
        return float(config.sigma_max), config.get("aug_dim"), None

    # ------------------------------------------------------------------ likelihood

    def log_likelihood(
        self,
        images,
        class_labels: int | list[int] | torch.Tensor | None = None,
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

        The augmented state [x, delta] is integrated with scipy's RK45 in ln sigma from sigma_min (z_min) to
        sigma_max (z_max): dx/d ln sigma = x - D(x, sigma), d delta/d ln sigma = div_x (x - D), the divergence
        estimated by Hutchinson's trace estimator with one probe per image drawn once from `generator`. Then
        log p(x) = log p_prior(x_T) + delta, with the exact prior density (`perturbation.prior_log_prob`: the
        PFGM++ Student-t prior for finite D, N(0, sigma_max^2 I) for D = infinity, the hyperplane prior D = 1,
        z_max in field mode, ignoring the sampler's radius clip). The images are taken as the state at sigma_min.

        Args:
            images (`torch.Tensor`, `np.ndarray`, `PIL.Image.Image` or `list[PIL.Image.Image]`):
                As in [`~PFGMPipeline.invert`]: in [0, 1], or in model space with `do_normalize=False`.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
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

        Example:

        ```py
        >>> out = pipe.log_likelihood(images, dequantize=True, generator=torch.Generator().manual_seed(0))
        >>> out.bits_per_dim.mean()
        ```
        """
        if hutchinson_type not in HUTCHINSON_TYPES:
            raise ValueError(f"`hutchinson_type` must be one of {HUTCHINSON_TYPES}, got {hutchinson_type!r}.")
        self.check_inputs(1, "pt", None)
        device = self._execution_device
        with torch.no_grad():
            x = self._preprocess(images, do_normalize, device)
        batch_size, N = x.shape[0], x[0].numel()
        self._check_generator(generator, batch_size)
        labels = self.prepare_class_labels(class_labels, batch_size, device=device, required=True)
        if dequantize:
            levels = torch.round((x + 1) * 127.5)  # 0..255
            uniform = torch.special.ndtr(randn_tensor(x.shape, generator=generator, device=device))  # U(0, 1)
            x = (levels + uniform) / 256 * 2 - 1
        probe = randn_tensor(x.shape, generator=generator, device=device, dtype=torch.float32)
        if hutchinson_type == "rademacher":
            probe = torch.sign(probe)
        sigma_min, sigma_max = self._sigma_range()
        progress = self._evaluation_counter()

        def ode_func(t, state):
            sample = torch.from_numpy(state[:-batch_size].reshape(x.shape)).to(device, torch.float32)
            with torch.enable_grad():
                sample.requires_grad_(True)
                drift = self._drift(sample, math.exp(t), labels)
                (vjp,) = torch.autograd.grad((drift * probe).sum(), sample)
            divergence = (vjp * probe).reshape(batch_size, -1).sum(1)
            progress.update()
            return np.concatenate(
                [drift.detach().double().cpu().numpy().reshape(-1), divergence.double().cpu().numpy()]
            )

        initial = np.concatenate([x.double().cpu().numpy().reshape(-1), np.zeros(batch_size)])
        solution = integrate.solve_ivp(
            ode_func, (math.log(sigma_min), math.log(sigma_max)), initial, method="RK45", rtol=rtol, atol=atol
        )
        progress.close()
        if not solution.success:
            raise RuntimeError(f"RK45 failed in log_likelihood: {solution.message}")
        final = solution.y[:, -1]
        latents = torch.from_numpy(final[:-batch_size].reshape(x.shape)).to(device, torch.float32)
        delta = torch.from_numpy(final[-batch_size:]).to(device)
        sigma_prior, aug_dim, _ = self._prior_params()
        log_prob = prior_log_prob(latents.double(), sigma_prior, aug_dim).to(device) + delta
        bits_per_dim = -log_prob / (N * math.log(2)) + _BITS_PER_DIM_OFFSET
        self.maybe_free_model_hooks()
        if not return_dict:
            return (bits_per_dim, log_prob, latents, int(solution.nfev))
        return PFGMLikelihoodOutput(
            bits_per_dim=bits_per_dim, log_prob=log_prob, latents=latents, nfe=int(solution.nfev)
        )


# ---------------------------------------------------------------------- helpers


def image_grid(images: list[PIL.Image.Image], nrow: int | None = None, padding: int = 2) -> PIL.Image.Image:
    """
    Tile equally sized images row by row, `nrow` per row (about sqrt(len(images)) by default), on a white background.

    Args:
        images (`list[PIL.Image.Image]`): the images, e.g. a pipeline's `.images`.
        nrow (`int`, *optional*): images per row.
        padding (`int`, defaults to 2): pixels between and around the tiles.

    Returns:
        `PIL.Image.Image`: the grid (RGB, or L when every image is grayscale).
    """
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    ncol = math.ceil(len(images) / nrow)
    width, height = images[0].size
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    size = (nrow * (width + padding) + padding, ncol * (height + padding) + padding)
    grid = PIL.Image.new(mode, size, color="white")
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        grid.paste(image.convert(mode), (padding + col * (width + padding), padding + row * (height + padding)))
    return grid


def _short_repr(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _random_labels(num_classes, batch_size, generator):
    """Uniform labels (B,); with a generator list, label i comes from generator i (as in a single-image run)."""
    if isinstance(generator, list):
        return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randint(num_classes, (batch_size,), generator=generator, device=device).cpu()
