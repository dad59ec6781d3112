"""Exact stand-ins for a trained network, for scheduler tests: the ideal denoiser of a few points (math.md §1),
returned in the form each `prediction_type` expects, so that `precondition_outputs` gives D* back."""

import math

import torch

from pfgm_diffusers import ideal_denoiser


def sigma_of_timestep(scheduler, timestep) -> float:
    """The noise level a network reads from its timestep: the inverse of `precondition_noise` (c_noise = ln(sigma)/4,
    the raw z in field mode)."""
    t = float(timestep)
    return t if scheduler.config.prediction_type == "poisson_field" else math.exp(4 * t)


def output_for_denoised(scheduler, x, denoised, sigma):
    """The model output whose `precondition_outputs(x, output, sigma)` is `denoised` (float64 in, x's dtype out)."""
    prediction_type, sigma_data = scheduler.config.prediction_type, scheduler.config.get("sigma_data")
    if prediction_type == "sample":
        return denoised
    if prediction_type == "poisson_field":
        # dx/dz = v_x / (v_z + vz_eps) must equal (x - D) / z: take v_z = -1 (a field pointing down, toward the data)
        v_z = -1.0
        v_x = (x - denoised) / sigma * (v_z + scheduler.config.vz_eps)
        return torch.cat([v_x, torch.full_like(x[:, :1], v_z)], dim=1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    out = (denoised - c_skip * x) / c_out
    return -out if prediction_type == "v_prediction" else out


def exact_network(scheduler, data, record=None):
    """`network(model_input, timestep)` returning what `scheduler.config.prediction_type` expects for the ideal
    denoiser of the points `data` (L, C, H, W), like a real network: it reads only its input and timestep.
    `record`, a list, receives the sample x each call saw (the model input with c_in undone)."""
    aug_dim = scheduler.config.aug_dim
    field = scheduler.config.prediction_type == "poisson_field"

    def network(model_input, timestep):
        sigma = sigma_of_timestep(scheduler, timestep)
        x = model_input.double()
        if not field:
            x = x * (sigma**2 + scheduler.config.get("sigma_data") ** 2) ** 0.5  # undo c_in
        if record is not None:
            record.append(x)
        denoised = ideal_denoiser(x, sigma, data.double(), aug_dim)
        return output_for_denoised(scheduler, x, denoised, sigma).to(model_input.dtype)

    return network


def run_loop(scheduler, x, network):
    """A plain diffusers loop over `scheduler.timesteps[begin_index or 0:]`: one model call per timestep."""
    begin = scheduler.begin_index or 0
    for t in scheduler.timesteps[begin:]:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(network(model_input, t), t, x).prev_sample
    return x


def landed(x, data, tol=1e-3):
    """(bool (B,) whether each sample ends within `tol` of a data point, index (B,) of the nearest point)."""
    dist = torch.cdist(x.reshape(len(x), -1).double(), data.reshape(len(data), -1).double())
    return dist.min(1).values < tol, dist.argmin(1)
