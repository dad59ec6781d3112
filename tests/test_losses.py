"""The two training losses against formulas written out here by hand, with the same random draws.

EDM's loss (Karras et al. 2022, training/loss.py; math.md §2) and PFGM's (Xu et al. 2022, Algorithms 1-2; math.md §3
and §4). The networks are small functions whose outputs are known, so each value is pinned exactly.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from pfgm_diffusers import PFGMFieldScheduler, PFGMScheduler
from pfgm_diffusers.field import poisson_field_target
from pfgm_diffusers.losses import pfgmpp_loss, poisson_field_loss
from pfgm_diffusers.perturbation import pfgm_perturb

SIGMA_DATA = 0.5


class Net(torch.nn.Module):
    """A fixed function of (input, timestep, label) with a real dependence on each, recording its inputs."""

    def __init__(self, out_channels=None):
        super().__init__()
        self.out_channels = out_channels
        self.calls = []

    def forward(self, sample, timestep, class_labels=None):
        self.calls.append((sample, timestep, class_labels))
        out = torch.tanh(sample) * (1 + timestep.reshape(-1, 1, 1, 1)) - 0.1 * sample.roll(1, dims=-1)
        if class_labels is not None:
            out = out + 0.05 * class_labels.reshape(-1, 1, 1, 1)
        if self.out_channels is not None:  # a field network: one more channel
            out = torch.cat([out, out.mean(1, keepdim=True) - 1.0], dim=1)
        return SimpleNamespace(sample=out)


def clean_batch(batch_size=6, shape=(3, 4, 4), seed=0):
    return torch.rand((batch_size, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def edm_loss_by_hand(net, x, generator, P_mean=-1.2, P_std=1.2, class_labels=None):
    """EDM's training/loss.py EDMLoss with its Table 1 preconditioning, written out; mean instead of sum."""
    rnd_normal = torch.randn(x.shape[0], generator=generator)
    sigma = (rnd_normal * P_std + P_mean).exp().reshape(-1, 1, 1, 1)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    n = torch.randn(x.shape, generator=generator) * sigma
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (SIGMA_DATA**2 + sigma**2).sqrt()
    c_noise = sigma.log().flatten() / 4
    F_x = net(c_in * (x + n), c_noise, class_labels=class_labels).sample
    D_yn = c_skip * (x + n) + c_out * F_x
    return (weight * (D_yn - x) ** 2).mean()


@pytest.mark.parametrize("class_conditional", [False, True])
def test_pfgmpp_loss_at_infinite_D_is_edms_loss(class_conditional):
    x = clean_batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if class_conditional else None
    scheduler = PFGMScheduler(aug_dim=None, sigma_data=SIGMA_DATA)
    loss = pfgmpp_loss(Net(), scheduler, x, labels, generator=torch.Generator().manual_seed(7))
    expected = edm_loss_by_hand(Net(), x, torch.Generator().manual_seed(7), class_labels=labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert loss.ndim == 0 and loss > 0.1


def test_pfgmpp_loss_uses_P_mean_and_P_std_and_the_global_generator_by_default():
    x = clean_batch()
    scheduler = PFGMScheduler(aug_dim=None)
    torch.manual_seed(3)
    loss = pfgmpp_loss(Net(), scheduler, x, P_mean=0.5, P_std=0.3)
    torch.manual_seed(3)
    expected = edm_loss_by_hand(Net(), x, None, P_mean=0.5, P_std=0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


class ExactDenoiser(torch.nn.Module):
    """Returns the F with c_skip y + c_out F = x exactly, for the clean batch `x` it was given."""

    def __init__(self, x, scheduler):
        super().__init__()
        self.x, self.scheduler = x, scheduler

    def forward(self, model_input, timestep, class_labels=None):
        sigma = torch.exp(4 * timestep.double()).reshape(-1, 1, 1, 1)  # c_noise = ln(sigma) / 4
        noisy = model_input.double() * (sigma**2 + SIGMA_DATA**2).sqrt()  # undo c_in
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
        return SimpleNamespace(sample=((self.x.double() - c_skip * noisy) / c_out).float())


@pytest.mark.parametrize("aug_dim", [None, 1, 128])
def test_pfgmpp_loss_of_a_model_that_returns_the_clean_image_is_zero(aug_dim):
    # A loss measured against the noisy input (or any target but the clean image) is far from 0 here
    x = clean_batch()
    scheduler = PFGMScheduler(aug_dim=aug_dim, sigma_data=SIGMA_DATA)
    loss = pfgmpp_loss(ExactDenoiser(x, scheduler), scheduler, x, generator=torch.Generator().manual_seed(1))
    assert loss < 1e-6
    noisy_target = pfgmpp_loss(Net(), scheduler, x, generator=torch.Generator().manual_seed(1))
    assert noisy_target > 1e-2


def test_pfgmpp_loss_perturbs_with_the_pfgmpp_kernel_for_finite_D():
    # Same draws, D = 128 against D = infinity: the same sigmas and directions, different radii
    x = clean_batch()
    net_inf, net_128 = Net(), Net()
    pfgmpp_loss(net_inf, PFGMScheduler(aug_dim=None), x, generator=torch.Generator().manual_seed(2))
    pfgmpp_loss(net_128, PFGMScheduler(aug_dim=128), x, generator=torch.Generator().manual_seed(2))
    (input_inf, t_inf, _), (input_128, t_128, _) = net_inf.calls[0], net_128.calls[0]
    assert torch.equal(t_inf, t_128)
    sigma = torch.exp(4 * t_inf).reshape(-1, 1, 1, 1)
    c_in = 1 / (sigma**2 + SIGMA_DATA**2).sqrt()
    noise_inf, noise_128 = input_inf / c_in - x, input_128 / c_in - x
    cosine = torch.nn.functional.cosine_similarity(noise_inf.flatten(1), noise_128.flatten(1))
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-5)
    assert not torch.allclose(noise_inf.flatten(1).norm(dim=1), noise_128.flatten(1).norm(dim=1), rtol=1e-3)
    # the radius is the kernel's, r sqrt(G_N / G_D) with r = sigma sqrt(D) (math.md §2), from the same draws by hand:
    # ln sigma, the Gaussian, then G_N ~ Gamma(N/2) and G_D ~ Gamma(D/2); r = sigma D (or sigma) would not match
    g = torch.Generator().manual_seed(2)
    B, N, D = x.shape[0], x[0].numel(), 128
    sigma_by_hand = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=g)).double()
    torch.randn(x.shape, generator=g)
    G_N = torch._standard_gamma(torch.full((B,), N / 2, dtype=torch.float64), generator=g)
    G_D = torch._standard_gamma(torch.full((B,), D / 2, dtype=torch.float64), generator=g)
    R = sigma_by_hand * math.sqrt(D) * (G_N / G_D).sqrt()
    torch.testing.assert_close(noise_128.flatten(1).norm(dim=1).double(), R, rtol=1e-4, atol=0)


def field_loss_by_hand(net, x, charges, generator, sigma=0.01, tau=0.03, M=291, gamma=5.0):
    """math.md §3: y, z from Algorithm 2, v from Algorithm 1, loss = 1/2 sum over N + 1 components, batch mean."""
    y, z = pfgm_perturb(x, sigma=sigma, tau=tau, M=M, generator=generator)
    v_x, v_z = poisson_field_target(y, z, charges, gamma=gamma)
    out = net(y, z).sample
    f_x, f_z = out[:, :-1], out[:, -1].mean(dim=(1, 2))
    per_sample = ((f_x - v_x) ** 2).sum(dim=(1, 2, 3)) + (f_z - v_z) ** 2
    return 0.5 * per_sample.mean()


def test_poisson_field_loss_is_algorithms_1_and_2_with_half_the_squared_error():
    charges = clean_batch(batch_size=12, seed=4)
    x = charges[:4]
    loss = poisson_field_loss(Net(out_channels=4), x, charges, M=50, generator=torch.Generator().manual_seed(5))
    expected = field_loss_by_hand(Net(out_channels=4), x, charges, torch.Generator().manual_seed(5), M=50)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


class ZeroField(torch.nn.Module):
    def forward(self, y, z, class_labels=None):
        return SimpleNamespace(sample=torch.zeros(y.shape[0], y.shape[1] + 1, *y.shape[2:]))


def test_poisson_field_loss_of_a_zero_network_at_gamma_0_is_N_over_2():
    # With gamma = 0 the target has norm sqrt(N) over its N + 1 components (math.md §4): a loss without the 1/2, or
    # without the z-component, or with the norm over N components only, gives another value
    charges = clean_batch(batch_size=16, shape=(1, 4, 4), seed=6)
    loss = poisson_field_loss(ZeroField(), charges[:8], charges, M=100, gamma=0.0, generator=torch.Generator())
    torch.testing.assert_close(loss, torch.tensor(16 / 2), rtol=1e-6, atol=0)


class ExactField(torch.nn.Module):
    """Returns the target field of `charges` at the (y, z) it is called with: v_x, and v_z in the extra channel."""

    def __init__(self, charges, gamma):
        super().__init__()
        self.charges, self.gamma = charges, gamma

    def forward(self, y, z, class_labels=None):
        v_x, v_z = poisson_field_target(y, z, self.charges, gamma=self.gamma)
        v_z = v_z.reshape(-1, 1, 1, 1).expand(-1, 1, *y.shape[2:])
        return SimpleNamespace(sample=torch.cat([v_x, v_z], dim=1))


def test_poisson_field_loss_of_the_exact_field_is_zero_and_the_network_sees_raw_z():
    charges = clean_batch(batch_size=10, seed=8)
    net = ExactField(charges, gamma=5.0)
    loss = poisson_field_loss(net, charges[:5], charges, M=80, generator=torch.Generator().manual_seed(9))
    assert loss < 1e-10
    # The input and timestep are what PFGMScheduler gives a field network: the sample itself and the raw z
    recorder = Net(out_channels=4)
    poisson_field_loss(recorder, charges[:5], charges, M=80, generator=torch.Generator().manual_seed(9))
    y, z = pfgm_perturb(charges[:5], M=80, generator=torch.Generator().manual_seed(9))
    sample, timestep, _ = recorder.calls[0]
    field = PFGMFieldScheduler(sigma_min=1e-3, sigma_max=40.0)
    assert torch.equal(sample, field.precondition_inputs(y, z)) and torch.equal(timestep, field.precondition_noise(z))


def test_poisson_field_loss_targets_the_charges_not_the_small_batch():
    # The field of the large batch differs from that of the small batch alone: the loss must use `charges`
    charges = clean_batch(batch_size=12, seed=10)
    x = charges[:3]
    net = ExactField(charges, gamma=5.0)
    # Draws that reach radii where several charges pull (N = 48: at small z only the nearest one counts)
    right = poisson_field_loss(net, x, charges, M=291, generator=torch.Generator().manual_seed(2))
    wrong = poisson_field_loss(net, x, x, M=291, generator=torch.Generator().manual_seed(2))
    assert right < 1e-10 and 1e-2 < wrong < math.inf
