"""Sampling for the sweep: every call into the pipeline, the scheduler and `ode` sits in this file, so that a change
of their interfaces is a change here only.

Images come from the pipeline itself (`PFGMPipeline.__call__` with given latents), or, with noise injected between
steps and for Restart, from the library's samplers (the table `ode.SAMPLERS`) with the library's denoiser
(`denoiser.make_denoiser`) and prior map (`flow.prior_from_noise`); RK45 within a budget of calls is
`ode.SAMPLERS["rk45"]` with its `max_evaluations`. The robustness
experiments are the official PFGM++ code's (Newbeeer/pfgmpp at commit d57c1ee): noise injected before every Heun
step (`generate_alpha.py`) and post-training quantisation of the weights (`generate_quant.py`).
"""

import copy

import numpy as np
import torch

from pfgm_diffusers import PFGMPipeline, flow, ode, scheduling_pfgm
from pfgm_diffusers.denoiser import make_denoiser
from pfgm_diffusers.image_processing import postprocess

# Solvers that finish each step before the next: noise can be injected between their steps without breaking a
# multistep history (dpmpp_2m extrapolates from the previous step's call).
SINGLE_STEP_SOLVERS = ("heun", "euler")


def load_pipeline(folder: str) -> PFGMPipeline:
    pipe = PFGMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_solvers() -> tuple:
    """The scheduler's solver names: a new solver joins the sweep with no change here."""
    return tuple(scheduling_pfgm.SOLVERS)


def is_field_model(pipe: PFGMPipeline) -> bool:
    return flow.is_field_model(pipe.scheduler)


def noise_levels(pipe: PFGMPipeline, num_inference_steps: int) -> list[float]:
    """The scheduler's grid for `num_inference_steps`, descending, each level once (with a trailing 0 where the run
    ends with EDM's denoising step)."""
    return flow.noise_levels(pipe.scheduler, num_inference_steps)


def denoiser(pipe: PFGMPipeline):
    """D(x, sigma) of `pipe`'s network and scheduler, the library's composition (`denoiser.make_denoiser`)."""
    return make_denoiser(pipe.unet, pipe.scheduler)


def prior_from_noise(pipe: PFGMPipeline, latents: torch.Tensor) -> torch.Tensor:
    return flow.prior_from_noise(pipe.scheduler, latents)


def solve_rk45(pipe: PFGMPipeline, x: torch.Tensor, max_nfe: int | None, rtol=1e-4, atol=1e-4):
    """The pipeline's RK45 (`ode.SAMPLERS["rk45"]` with the official tolerances) from the prior `x` to sigma_min, then
    EDM's final denoising step where the grid ends at 0; (samples, calls). Over `max_nfe` calls it raises
    `ode.EvaluationBudgetExceeded` (the sampler's `max_evaluations`)."""
    denoise, calls = denoiser(pipe), []
    sigma_min, sigma_max = flow.sigma_range(pipe.scheduler)
    rk45 = ode.SAMPLERS["rk45"]
    options = dict(carry_sigma=is_field_model(pipe), max_evaluations=max_nfe, callback=calls.append)
    sample = rk45(denoise, x, [sigma_max, sigma_min], rtol, atol, **options)
    nfe = len(calls)
    if noise_levels(pipe, 2)[-1] == 0:  # the grid ends at 0: x = D(x, sigma_min), as PFGMPipeline does
        sample, nfe = denoise(sample, sigma_min), nfe + 1
    return sample, nfe


# ---------------------------------------------------------------------- sampling with the sweep's conventions


def latents_for(num_images, shape, seed) -> torch.Tensor:
    """Standard Gaussian latents (n, C, H, W), image i drawn from a generator seeded `seed + i`: every model and
    solver of the sweep starts from the same draws, so their differences are paired."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)) for i in range(num_images)]
    )


def _latents(pipe, num_images, seed):
    config = pipe.unet.config
    return latents_for(num_images, (config.in_channels, config.sample_size, config.sample_size), seed)


@torch.no_grad()
def sample_with_noise(denoise, x, sigmas, solver, noise_scale, generator):
    """The solver's steps along `sigmas` with noise injected before each step as the official code does it
    (Newbeeer/pfgmpp `generate_alpha.py`, `edm_sampler`, lines 118-126: `x_cur += torch.randn_like(x_cur) * t_cur *
    alpha` at the top of every step i = 0 .. n-1, so before the network's first call of every Heun step including
    the first at sigma_max and the last to 0). The noise is drawn from `generator`."""
    if solver not in SINGLE_STEP_SOLVERS:
        raise ValueError(f"noise injection needs a single-step solver {SINGLE_STEP_SOLVERS}, got {solver!r}")
    step = ode.SAMPLERS[solver]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = x + torch.randn(x.shape, generator=generator) * sigma * noise_scale
        x = step(denoise, x, [sigma, sigma_next])
    return x


def with_unet(pipe: PFGMPipeline, unet) -> PFGMPipeline:
    """A pipeline of `unet` with the scheduler of `pipe` (`pipe` itself is left as it was)."""
    other = PFGMPipeline(unet=unet, scheduler=pipe.scheduler)
    other.set_progress_bar_config(disable=True)
    return other


def sample_images(
    pipe, solver, num_inference_steps, num_images, seed, batch_size, noise_scale=0.0, unet=None, **options
):
    """`num_images` images in [0, 1] from the pipeline with `solver` (image i from the latents seeded `seed + i`),
    and the network calls per image. With `noise_scale` alpha > 0, the library's `solver` runs one step at a time on
    the scheduler's grid with noise alpha sigma_i eps injected before each step (the official robustness test; the
    pipeline has no such hook); with `unet`, that network replaces the pipeline's (quantised weights). `solver=
    "restart"` runs the library's Restart sampler on the scheduler's grid with `options` (`restart_blocks`), its
    jumps for the scheduler's D drawn from a generator seeded `seed + 10**6`."""
    pipe = pipe if unet is None else with_unet(pipe, unet)
    latents = _latents(pipe, num_images, seed)
    generator = torch.Generator().manual_seed(seed + 10**6)  # the injected noise, Restart's jumps
    sigmas, denoise, calls = noise_levels(pipe, num_inference_steps), denoiser(pipe), []

    def counted(sample, sigma):
        calls.append(sigma)
        return denoise(sample, sigma)

    images = []
    with torch.no_grad():
        for start in range(0, num_images, batch_size):
            batch = latents[start : start + batch_size]
            if noise_scale > 0:
                x = sample_with_noise(counted, prior_from_noise(pipe, batch), sigmas, solver, noise_scale, generator)
                images.append(postprocess(x, "pt"))
            elif solver == "restart":
                x = sample_restart(counted, prior_from_noise(pipe, batch), sigmas, pipe, generator, **options)
                images.append(postprocess(x, "pt"))
            else:
                output = pipe(latents=batch, num_inference_steps=num_inference_steps, solver=solver, output_type="pt")
                images.append(output.images)
                calls += [None] * output.nfe
    return torch.cat(images), len(calls) / -(-num_images // batch_size)


def sample_restart(denoise, x, sigmas, pipe, generator, restart_blocks=None):
    """Restart (`ode.SAMPLERS["restart"]`) along `sigmas` from `x` for the D of `pipe`'s scheduler."""
    aug_dim = flow.restart_aug_dim(pipe.scheduler)  # refuses the field model
    options = dict(restart_blocks=restart_blocks, aug_dim=aug_dim, generator=generator)
    return ode.SAMPLERS["restart"](denoise, x, sigmas, **options)


def heun_nfe(pipe, num_inference_steps: int) -> int:
    """Heun's network calls for `num_inference_steps` on `pipe`'s grid: 2 per step, 1 for a last step to 0."""
    sigmas = noise_levels(pipe, num_inference_steps)
    return 2 * (sum(sigma > 0 for sigma in sigmas) - 1) + (sigmas[-1] == 0)


def heun_steps_for_nfe(pipe, nfe: float) -> int:
    """The Heun step count whose calls are nearest `nfe` (the fewer steps on a tie)."""
    return min(range(1, int(nfe) + 2), key=lambda steps: (abs(heun_nfe(pipe, steps) - nfe), steps))


def sample_rk45(pipe, num_images, seed, batch_size, max_nfe=None):
    """Images in [0, 1] from the pipeline's adaptive RK45 (image i from the latents seeded `seed + i`) and the mean
    NFE per image. With `max_nfe`, a batch that needs more network calls raises `ode.EvaluationBudgetExceeded`: on
    the sweep's field models the official tolerances (1e-4) can need tens of thousands of calls (the step size
    collapses where v_z nears 0)."""
    latents = _latents(pipe, num_images, seed)
    images, nfe = [], []
    with torch.no_grad():
        for start in range(0, num_images, batch_size):
            batch = latents[start : start + batch_size]
            x, calls = solve_rk45(pipe, prior_from_noise(pipe, batch), max_nfe)
            images.append(postprocess(x, "pt"))
            nfe += [calls] * len(batch)
    return torch.cat(images), float(np.mean(nfe))


# ---------------------------------------------------------------------- post-training quantisation


def quantize_tensor(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight` quantised per tensor, asymmetric min-max with a zero point, and dequantised, as the official code does
    (Newbeeer/pfgmpp `generate_quant.py`, `quantize_tensor` and `dequantize_tensor`, lines 411-437): scale = (max -
    min) / (2^bits - 1), zero point = int(clamp(-min / scale, 0, 2^bits - 1)), q = round(clamp(zp + w / scale, 0,
    2^bits - 1)), w <- scale (q - zp). A constant tensor (scale 0) is returned unchanged."""
    qmax = 2.0**bits - 1.0
    low, high = weight.min(), weight.max()
    scale = (high - low) / qmax
    if scale == 0:
        return weight.clone()
    zero_point = int(float((-low / scale).clamp(0.0, qmax)))  # int() truncates, as the official code
    q = (zero_point + weight / scale).clamp(0.0, qmax).round()
    return scale * (q - zero_point)


def quantized_parameter_names(unet) -> list[str]:
    """The parameters the official code quantises, in a diffusers UNet: the weights of the convolutions and linear
    layers. Biases, normalisation layers and the noise / class embeddings stay in full precision: the official
    filter (`generate_quant.py` line 441) quantises a parameter named 'weight' unless its name holds 'norm',
    'affine' (EDM's per-block projection of the embedding: diffusers' `time_emb_proj`), 'map' (EDM's mapping
    network of the noise level and the label: diffusers' `time_embedding`, `class_embedding`) or '32' (which in
    EDM's CIFAR-10 UNet names the 32x32 blocks; diffusers' names carry no resolution, so it has no counterpart
    here)."""
    names = []
    for module_name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            continue
        embedding = module_name.startswith(("time_embedding", "class_embedding"))
        if embedding or module_name.endswith("time_emb_proj"):
            continue
        names.append(f"{module_name}.weight")
    return names


def quantize_weights(unet, bits: int):
    """A copy of `unet` with the weights of `quantized_parameter_names` quantised by `quantize_tensor`."""
    quantized = copy.deepcopy(unet)
    parameters = dict(quantized.named_parameters())
    with torch.no_grad():
        for name in quantized_parameter_names(quantized):
            parameters[name].copy_(quantize_tensor(parameters[name], bits))
    return quantized
