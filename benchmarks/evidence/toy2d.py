"""2-D toy data with a known density, a small MLP denoiser trained with the PFGM++ objective, its samples and its
exact log-likelihood.

The denoiser is the PFGM++ one of every other model here (math.md §2), trained with the library's `pfgmpp_loss`
(EDM's preconditioning through `PFGMScheduler.precondition_*`, the exact kernel, ln sigma ~ N(P_mean, P_std^2) and
EDM's loss weight); only the network is an MLP instead of a UNet. Sampling is the library's Heun solver. The
likelihood is the pipeline's probability-flow ODE in ln sigma with an exact divergence (N = 2: two probes), so the
only approximations are the network and the ODE tolerance.
"""

import math

import torch

from pfgm_diffusers import PFGMScheduler, flow, ode
from pfgm_diffusers.denoiser import make_denoiser
from pfgm_diffusers.losses import pfgmpp_loss
from pfgm_diffusers.perturbation import prior_log_prob

DATASETS = ("gaussian_mixture", "ring")
# Eight Gaussians of std 0.08 on the circle of radius 1, and a ring of radius 1 with a radial N(0, 0.08^2) profile:
# both have a per-coordinate std near 0.7, close to EDM's sigma_data = 0.5 that the preconditioning assumes.
_MODES, _RADIUS, _WIDTH = 8, 1.0, 0.08


def sample_data(name: str, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """`num_samples` draws (n, 2) float32 of the toy density `name` (one of `DATASETS`)."""
    angle = torch.rand(num_samples, generator=generator, dtype=torch.float64) * 2 * math.pi
    if name == "gaussian_mixture":
        mode = torch.randint(_MODES, (num_samples,), generator=generator)
        angle = mode.double() * (2 * math.pi / _MODES)
        centres = _RADIUS * torch.stack([angle.cos(), angle.sin()], 1)
        return (centres + _WIDTH * torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)).float()
    if name == "ring":
        radius = _RADIUS + _WIDTH * torch.randn(num_samples, generator=generator, dtype=torch.float64)
        return (radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)).float()
    raise ValueError(f"unknown toy dataset {name!r}; choose one of {DATASETS}")


def log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """The exact log-density (n,) float64 of the toy density `name` at points `x` (n, 2).

    The mixture: log of the mean of the eight Gaussian densities. The ring: a radius ~ N(1, 0.08^2) and a uniform
    angle, p(x) = N(|x|; 1, 0.08^2) / (2 pi |x|) (the radius's mass below 0, Phi(-12.5) ~ 1e-36, is neglected).
    """
    x = x.double()
    if name == "gaussian_mixture":
        angle = torch.arange(_MODES, dtype=torch.float64) * (2 * math.pi / _MODES)
        centres = _RADIUS * torch.stack([angle.cos(), angle.sin()], 1)  # (K, 2)
        squared = (x[:, None, :] - centres[None]).pow(2).sum(-1)  # (n, K)
        log_gauss = -squared / (2 * _WIDTH**2) - math.log(2 * math.pi * _WIDTH**2)
        return torch.logsumexp(log_gauss, dim=1) - math.log(_MODES)
    if name == "ring":
        radius = x.norm(dim=1)
        log_radial = -((radius - _RADIUS) ** 2) / (2 * _WIDTH**2) - 0.5 * math.log(2 * math.pi * _WIDTH**2)
        return log_radial - torch.log(2 * math.pi * radius)
    raise ValueError(f"unknown toy dataset {name!r}; choose one of {DATASETS}")


class MLPDenoiser(torch.nn.Module):
    """F_theta(c_in x, c_noise): an MLP on the 2-D input and Fourier features of the noise conditioning, called like
    a diffusers UNet (`model(sample, timestep, class_labels=None).sample`) so that the library's loss and denoiser
    (`pfgmpp_loss`, `denoiser.make_denoiser`) take it as they take a UNet."""

    def __init__(self, hidden: int = 128, num_layers: int = 3, num_frequencies: int = 8):
        super().__init__()
        # c_noise = ln(sigma) / 4 spans about [-1.6, 1.1]: frequencies 0.5 .. 64 resolve it finely enough
        self.register_buffer("frequencies", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32) / 2)
        layers, width = [], 2 + 2 * num_frequencies
        for _ in range(num_layers):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 2))

    def forward(self, sample, timestep, class_labels=None):
        if class_labels is not None:
            raise ValueError("the toy MLP is unconditional: class_labels must be None")
        timestep = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).reshape(-1)
        angles = timestep.expand(sample.shape[0])[:, None] * self.frequencies  # (B, F)
        features = torch.cat([sample, angles.sin(), angles.cos()], dim=1)
        return _Output(self.net(features))


class _Output:
    def __init__(self, sample):
        self.sample = sample


def make_scheduler(aug_dim: int | None) -> PFGMScheduler:
    """The PFGM++ scheduler of the toy models: the defaults (sigma in [0.002, 80], sigma_data 0.5, Heun)."""
    return PFGMScheduler(aug_dim=aug_dim)


def train(dataset, aug_dim, num_steps=3000, batch_size=512, learning_rate=2e-3, ema_decay=0.995, seed=0):
    """An MLP denoiser trained with the library's `pfgmpp_loss` on fresh draws of `dataset` (Adam, EMA weights
    returned); (model, scheduler, losses), `losses` the loss of every step."""
    torch.manual_seed(seed)
    data_generator = torch.Generator().manual_seed(seed)
    loss_generator = torch.Generator().manual_seed(seed + 1)
    scheduler = make_scheduler(aug_dim)
    model = MLPDenoiser()
    ema = MLPDenoiser()
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    for step in range(num_steps):
        x = sample_data(dataset, batch_size, data_generator)
        loss = pfgmpp_loss(model, scheduler, x, generator=loss_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        decay = min(ema_decay, (1 + step) / (10 + step))  # a short warm-up, as diffusers' EMAModel
        with torch.no_grad():
            for average, parameter in zip(ema.parameters(), model.parameters(), strict=True):
                average.lerp_(parameter, 1 - decay)
    return ema.eval().requires_grad_(False), scheduler, losses


@torch.no_grad()
def sample(model, scheduler, num_samples, num_inference_steps=18, generator=None):
    """Samples (n, 2) from the library's Heun sampler (`ode.SAMPLERS["heun"]`) with the library's denoiser
    (`denoiser.make_denoiser`) on the scheduler's grid, started from the scheduler's prior map of standard Gaussian
    draws."""
    scheduler = PFGMScheduler.from_config(scheduler.config)
    sigmas = flow.noise_levels(scheduler, num_inference_steps)
    x = flow.prior_from_noise(scheduler, torch.randn(num_samples, 2, generator=generator))
    return ode.SAMPLERS["heun"](make_denoiser(model, scheduler), x, sigmas)


def log_likelihood(model, scheduler, x, rtol=1e-5, atol=1e-5):
    """log p_model(x) (n,) in nats, float64, and the number of ODE evaluations.

    The pipeline's likelihood ODE (`ode.solve_log_likelihood`: dx/dt = x - D(x, sigma) in t = ln sigma from sigma_min
    to sigma_max, log p(x) = log p_prior(x_T) + the integral of div_x (x - D) dt), with the divergence made exact: each
    point is integrated twice, with the Hutchinson probes e_1 and e_2, whose two estimates sum to the trace (N = 2).
    """
    n = x.shape[0]
    sigma_min, sigma_max = flow.sigma_range(scheduler)
    points = x.float().repeat(2, 1)  # (2n, 2): the copies follow the same path
    probe = torch.eye(2).repeat_interleave(n, dim=0)  # e_1 for the first copy of each point, e_2 for the second
    denoise = make_denoiser(model, scheduler)
    x_T, delta, evaluations = ode.solve_log_likelihood(denoise, points, probe, sigma_min, sigma_max, rtol, atol)
    divergence_integral = delta[:n] + delta[n:]
    return prior_log_prob(x_T[:n], sigma_max, scheduler.config.aug_dim) + divergence_integral, evaluations


def run_toy(dataset, aug_dim, seed, settings) -> dict:
    """Train one toy model and measure it: sliced W2 of its samples to fresh true samples (and the floor of two true
    sets), its NLL on fresh test points and the gap to the true density's NLL there. The evaluation draws depend on
    `seed` only, so every D of one seed meets the same true samples and test points."""
    from pfgm_diffusers.evaluation import sliced_wasserstein

    model, scheduler, losses = train(
        dataset, aug_dim, settings["num_steps"], settings["batch_size"], settings["learning_rate"], seed=seed
    )
    generator = torch.Generator().manual_seed(10**6 + seed)
    true_a = sample_data(dataset, settings["num_samples"], generator)
    true_b = sample_data(dataset, settings["num_samples"], generator)
    test = sample_data(dataset, settings["num_test"], generator)
    samples = sample(model, scheduler, settings["num_samples"], settings["num_inference_steps"], generator)
    projections = settings["num_projections"]
    log_prob, evaluations = log_likelihood(model, scheduler, test)
    gap = log_density(dataset, test) - log_prob  # (n,) per-point log p_true - log p_model
    return {
        "dataset": dataset,
        "aug_dim": aug_dim,
        "seed": seed,
        "sliced_wasserstein": sliced_wasserstein(samples, true_a, projections, torch.Generator().manual_seed(seed)),
        "sliced_wasserstein_floor": sliced_wasserstein(
            true_b, true_a, projections, torch.Generator().manual_seed(seed)
        ),
        "nll": float(-log_prob.mean()),
        "true_nll": float(-log_density(dataset, test).mean()),
        "nll_gap": float(gap.mean()),
        "nll_gap_se": float(gap.std() / math.sqrt(len(gap))),
        "likelihood_evaluations": evaluations,
        "nonfinite_samples": int((~torch.isfinite(samples)).any(1).sum()),
        # the training loss over the first and the last tenth of the steps: did the model learn
        "loss_start": float(sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10)),
        "loss_end": float(sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)),
    }


def toy_job(dataset, settings, workdir, log) -> dict:
    """A job of the evidence sweep: every D and seed of `settings` on `dataset`; {"rows": [run_toy row, ...]}."""
    torch.set_num_threads(1)
    rows = []
    for aug_dim in settings["aug_dims"]:
        for seed in settings["seeds"]:
            row = run_toy(dataset, aug_dim, seed, settings)
            log(f"toy {dataset} D={aug_dim} seed {seed}: sliced W2 {row['sliced_wasserstein']:.4f}, "
                f"NLL gap {row['nll_gap']:.4f} ± {row['nll_gap_se']:.4f}")  # fmt: skip
            rows.append(row)
    return {"rows": rows}
