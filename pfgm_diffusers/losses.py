"""The two training objectives, as siblings in the manner of EDM's `training/loss.py`.

Each is a pure function of the network, a clean batch and its own hyperparameters, and returns a scalar loss. The
formulas they use live elsewhere, once: the PFGM++ kernel, and the denoiser through EDM's preconditioning in
`denoiser.make_denoiser` (math.md §2),
Algorithm 2 in `pfgm_perturb` and Algorithm 1 in `poisson_field_target` (math.md §3).
"""

import torch
from diffusers.utils.torch_utils import randn_tensor

from .denoiser import make_denoiser
from .field import poisson_field_target, split_field_output
from .perturbation import pfgm_perturb, sample_kernel_noise


def pfgmpp_loss(unet, scheduler, x, class_labels=None, P_mean=-1.2, P_std=1.2, generator=None, target=None):
    """PFGM++ loss: EDM's weighted denoising loss with the PFGM++ kernel (PFGM++ eq. 11, App. C; EDM Table 1).

    ln sigma ~ N(P_mean, P_std^2), then y = x + kernel noise with r = sigma sqrt(D) (`sample_kernel_noise`), and
    loss = mean of lambda(sigma) (D(y, sigma) - x)^2. With `aug_dim=None` this is EDM's loss, averaged over the
    elements where EDM sums them (a constant factor Adam does not see). Draws: ln sigma first, then the noise (a
    Gaussian, then for finite D its radius's two Gamma draws, see `sample_kernel_noise`).

    Args:
        unet: a network called as `unet(model_input, timestep, class_labels=...)` returning `.sample`.
        scheduler (`PFGMScheduler`): the kernel, the preconditioning and the loss weight.
        x (`torch.Tensor` of shape `(B, C, H, W)`): clean images in [-1, 1].
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): labels of a class-conditional network.
        P_mean, P_std (`float`): the log-normal noise-level distribution (EDM: -1.2, 1.2).
        generator (`torch.Generator`, *optional*): the randomness; torch's global generator by default.
        target (`callable`, *optional*): `target(noisy, sigma)`, the regression target at the perturbed images
            (B, C, H, W) and their noise levels (B,); `None`: the clean images `x`. Stable Target Field training
            (Xu, Tong, Jaakkola, ICLR 2023): `functools.partial(stable_target, reference=..., aug_dim=D)`.

    Returns:
        `torch.Tensor`: the scalar loss, in float32.
    """
    batch_size = x.shape[0]
    sigma = torch.exp(P_mean + P_std * randn_tensor((batch_size,), generator=generator, device=x.device))  # (B,)
    # The exact kernel with r = sigma sqrt(D), drawn on x's device: no host round trip in a training step
    noisy = x + sample_kernel_noise(x.shape, sigma, scheduler.config.aug_dim, generator, x.device, x.dtype)
    denoised = make_denoiser(unet, scheduler, class_labels=class_labels)(noisy, sigma)  # fp32 loss under autocast
    weight = scheduler.loss_weight(sigma).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    regressed = x if target is None else target(noisy, sigma)  # (B, C, H, W), no gradient
    return (weight * (denoised - regressed) ** 2).mean()


def poisson_field_loss(unet, x, charges, class_labels=None, sigma=0.01, tau=0.03, M=291, gamma=5.0, generator=None):
    """PFGM loss: perturb `x` (Algorithm 2), regress the normalised field of `charges` there (Algorithm 1).

    loss = 1/2 sum over the N + 1 components of (f - v)^2, averaged over the batch (math.md §3). The network gets the
    perturbed image and the raw z as its timestep, as `PFGMScheduler` in field mode gives them, and has C + 1 output
    channels (the spatial mean of the last one is v_z).

    Args:
        unet: a network called as `unet(y, z, class_labels=...)` returning `.sample` of shape (B, C + 1, H, W).
        x (`torch.Tensor` of shape `(B, C, H, W)`): the small batch of clean images.
        charges (`torch.Tensor` of shape `(L, C, H, W)`): the large batch whose field is the target (it holds `x`).
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): labels of a class-conditional network.
        sigma, tau, M (`float`): Algorithm 2's base noise, growth rate and maximum exponent (CIFAR-10: 0.01, 0.03,
            291).
        gamma (`float`): Algorithm 1's normaliser offset (5).
        generator (`torch.Generator`, *optional*): the randomness of the perturbation.

    Returns:
        `torch.Tensor`: the scalar loss, in float32.
    """
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        # fp32 outside autocast: the target's softmax over the charges must stay exact under bf16/fp16
        y, z = pfgm_perturb(x.float(), sigma=sigma, tau=tau, M=M, generator=generator)  # (B, C, H, W), (B,)
        target_x, target_z = poisson_field_target(y, z, charges.float(), gamma=gamma)
    v_x, v_z = split_field_output(unet(y, z, class_labels=class_labels).sample.float())
    squared_error = (v_x - target_x).pow(2).flatten(1).sum(1) + (v_z - target_z).pow(2)  # (B,): N + 1 components
    return 0.5 * squared_error.mean()
