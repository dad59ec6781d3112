"""The probability-flow ODE of every mode, dx/dsigma = (x - D(x, sigma)) / sigma (math.md §1), and its solvers.

In field mode sigma is z and D = x - z v_x / v_z. The step functions below are shared by `PFGMScheduler.step` (one
model call at a time) and the pipeline's solvers, which take a denoiser `denoise(x, sigma)` and a list of sigmas whose
order is the direction of integration (k-diffusion's convention).
"""


def to_d(x, denoised, sigma):
    """The ODE's slope dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 4 with s = 1; math.md §1)."""
    return (x - denoised) / sigma


def euler_step(x, d, sigma, sigma_next):
    """One Euler step of dx/dsigma = d from sigma to sigma_next (either direction)."""
    return x + (sigma_next - sigma) * d


def heun_step(x, d, d_next, sigma, sigma_next):
    """Heun's correction: the mean of the slopes at both ends of the step (EDM Algorithm 1, lines 7-8)."""
    return x + (sigma_next - sigma) * (d + d_next) / 2
