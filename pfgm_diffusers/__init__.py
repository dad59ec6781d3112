"""Poisson flow generative models (PFGM and PFGM++) for diffusers.

The public classes are imported eagerly: diffusers resolves the library name saved in `model_index.json`
(`pfgm_diffusers`) by looking for already-imported modules when a pipeline is reloaded.
"""

import diffusers as _diffusers

from .denoiser import make_denoiser
from .field import field_dx_dz, ideal_denoiser, poisson_field_target, split_field_output, stable_target
from .perturbation import (
    kernel_noise,
    pfgm_perturb,
    pfgm_prior_from_noise,
    pfgmpp_prior_from_noise,
    prior_log_prob,
    sample_kernel_noise,
    sample_pfgm_prior,
    sample_pfgmpp_prior,
)
from .pipeline_pfgm import PFGMPipeline, PFGMPipelineOutput, image_grid
from .scheduling_pfgm import PFGMScheduler, PFGMSchedulerOutput
from .scheduling_pfgm_field import PFGMFieldScheduler

__version__ = "0.1.0"

# `DiffusionPipeline.from_pretrained(folder)` looks the saved `_class_name` up on the diffusers module: registering the
# class there lets generic diffusers code load a saved PFGMPipeline without `custom_pipeline` or remote code.
if not hasattr(_diffusers, "PFGMPipeline"):
    _diffusers.PFGMPipeline = PFGMPipeline

__all__ = [
    "PFGMPipeline",
    "PFGMFieldScheduler",
    "PFGMPipelineOutput",
    "PFGMScheduler",
    "PFGMSchedulerOutput",
    "field_dx_dz",
    "image_grid",
    "ideal_denoiser",
    "kernel_noise",
    "make_denoiser",
    "pfgm_perturb",
    "pfgm_prior_from_noise",
    "pfgmpp_prior_from_noise",
    "poisson_field_target",
    "prior_log_prob",
    "sample_kernel_noise",
    "sample_pfgm_prior",
    "sample_pfgmpp_prior",
    "split_field_output",
    "stable_target",
]
