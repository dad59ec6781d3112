"""Exact stand-ins for a trained network, for scheduler and pipeline tests: the ideal denoiser of a few points
(math.md §1), returned in the form each `prediction_type` expects, so that `precondition_outputs` gives D* back."""

import math
from types import SimpleNamespace

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


SIGMA_DATA = 0.5


class ExactUNet(torch.nn.Module):
    """Stands in for a UNet2DModel whose output the scheduler turns into a known denoiser D(x, sigma).

    `mode="sample"` (prediction_type="sample": the output IS D) and `mode="epsilon"` (EDM's F-preconditioning, the
    default of PFGMScheduler and EDMEulerScheduler: F = (D - c_skip x) / c_out) undo the input scaling c_in x and the
    timestep ln(sigma)/4 first. Field mode (the network sees x and the raw z) returns v_x = -(x - D)/z and v_z = -1,
    so that x - z v_x / v_z is D again (up to the official 1e-5 added to v_z).
    """

    def __init__(self, denoiser, shape, mode="sample"):
        super().__init__()
        self.denoiser, self.mode = denoiser, mode
        channels, size = shape[0], shape[1]
        out_channels = channels + 1 if mode == "field" else channels
        self.config = SimpleNamespace(
            in_channels=channels, out_channels=out_channels, sample_size=size, num_class_embeds=None
        )
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device

    def forward(self, sample, timestep, class_labels=None):
        timestep = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(sample.shape[0])
        view = (-1,) + (1,) * (sample.ndim - 1)
        if self.mode == "field":
            z = timestep.to(sample.dtype).reshape(view)
            v_x = -(sample - self.denoiser(sample, timestep)) / z
            return SimpleNamespace(sample=torch.cat([v_x, -torch.ones_like(sample[:, :1])], dim=1))
        sigma = torch.exp(4 * timestep)  # (B,) float64
        sigma_view = sigma.reshape(view)
        x = (sample * torch.sqrt(sigma_view**2 + SIGMA_DATA**2)).to(sample.dtype)
        denoised = self.denoiser(x, sigma)
        if self.mode == "sample":
            return SimpleNamespace(sample=denoised)
        c_skip = SIGMA_DATA**2 / (sigma_view**2 + SIGMA_DATA**2)
        c_out = sigma_view * SIGMA_DATA / torch.sqrt(sigma_view**2 + SIGMA_DATA**2)
        return SimpleNamespace(sample=((denoised - c_skip * x) / c_out).to(sample.dtype))
