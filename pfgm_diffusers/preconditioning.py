"""EDM preconditioning, written in sigma (Karras et al. 2022, Table 1; math.md §2).

PFGM++ keeps it unchanged with r = sigma * sqrt(D): D never reaches the network. The expressions are written
exactly as diffusers' `EDMEulerScheduler` writes them so that D = infinity reproduces it to the last bit.
"""

import torch


def c_skip(sigma, sigma_data):
    """Skip scaling sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma, sigma_data):
    """Output scaling sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def c_in(sigma, sigma_data):
    """Input scaling 1 / sqrt(sigma^2 + sigma_data^2) (EDM's; for finite D the noise variance is sigma^2 D/(D-2))."""
    return 1 / ((sigma**2 + sigma_data**2) ** 0.5)


def c_noise(sigma):
    """Noise conditioning ln(sigma) / 4, as a tensor ((1,) for a Python float, as diffusers does)."""
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor([sigma])
    return 0.25 * torch.log(sigma)


def loss_weight(sigma, sigma_data):
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
