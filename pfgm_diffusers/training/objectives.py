"""The training objectives `--objective` names. The trainer picks one here, once: what each batch holds, its loss, and
the settings a checkpoint records; nothing else in the trainer asks which objective runs.

The classes share one interface (`loader_batch_size`, `settings`, `__call__`); `loss` is the library loss they
call, replaceable so that tests and benchmarks can record or stop training without patching the trainer.
"""

import functools

from pfgm_diffusers.field import stable_target
from pfgm_diffusers.losses import pfgmpp_loss, poisson_field_loss

__all__ = ["PFGMPPObjective", "PoissonFieldObjective", "StableTargetObjective"]


class PFGMPPObjective:
    """PFGM++ (Xu et al., ICML 2023): `pfgmpp_loss`, EDM's denoising loss with the PFGM++ perturbation kernel of the
    scheduler's D (math.md §2). Each batch is `train_batch_size` images.

    Args:
        train_batch_size (`int`): images per process and step.
        P_mean (`float`), P_std (`float`): training noise levels, ln sigma ~ N(P_mean, P_std^2) (EDM).
        loss (`callable`, *optional*): called as `pfgmpp_loss(unet, scheduler, x, class_labels, P_mean, P_std)`;
            default `pfgm_diffusers.losses.pfgmpp_loss`.
    """

    name = "pfgmpp"
    gathers = False  # the batch of this process is all its loss sees

    def __init__(self, train_batch_size, P_mean, P_std, loss=None):
        self.train_batch_size, self.P_mean, self.P_std = train_batch_size, P_mean, P_std
        self.loss = pfgmpp_loss if loss is None else loss

    @property
    def loader_batch_size(self):
        return self.train_batch_size

    def settings(self):
        """The loss's settings, recorded in every checkpoint: a resume that changes them learns another objective."""
        return dict(P_mean=self.P_mean, P_std=self.P_std)

    def __call__(self, unet, scheduler, batch, class_labels, accelerator):
        """The loss of one batch `(B, C, H, W)` of this process."""
        return self.loss(unet, scheduler, batch, class_labels, self.P_mean, self.P_std)


class PoissonFieldObjective:
    """The original PFGM (Xu et al., NeurIPS 2022): `poisson_field_loss`, the normalised Poisson field of the
    charges (Algorithm 1) at points perturbed by Algorithm 2 (math.md §3). Each batch is `large_batch_size` images;
    its first `train_batch_size` rows are perturbed, and the charges are the large batches of every process.

    Args:
        train_batch_size (`int`), large_batch_size (`int`): the small and the large batch, per process.
        sigma (`float`), tau (`float`), M (`int`): Algorithm 2's perturbation.
        gamma (`float`): Algorithm 1's normaliser offset.
        loss (`callable`, *optional*): called as
            `poisson_field_loss(unet, x, charges, class_labels, sigma, tau, M, gamma)`; default
            `pfgm_diffusers.losses.poisson_field_loss`.
    """

    name = "poisson_field"
    gathers = "charges per field target"  # the charges are every process's large batch

    def __init__(self, train_batch_size, large_batch_size, sigma, tau, M, gamma, loss=None):
        self.train_batch_size, self.large_batch_size = train_batch_size, large_batch_size
        self.sigma, self.tau, self.M, self.gamma = sigma, tau, M, gamma
        self.loss = poisson_field_loss if loss is None else loss

    @property
    def loader_batch_size(self):
        return self.large_batch_size

    def settings(self):
        """The loss's settings, recorded in every checkpoint: a resume that changes them learns another objective."""
        return dict(sigma=self.sigma, tau=self.tau, M=self.M, gamma=self.gamma)

    def __call__(self, unet, scheduler, batch, class_labels, accelerator):
        """The loss of one large batch `(L, C, H, W)` of this process: the field of every process's large batch
        (num_processes x L charges) at this process's small batch."""
        charges = accelerator.gather(batch.contiguous())
        x = batch[: self.train_batch_size]
        return self.loss(unet, x, charges, class_labels, self.sigma, self.tau, self.M, self.gamma)


class StableTargetObjective:
    """PFGM++ with the Stable Target Field target (Xu, Tong, Jaakkola, ICLR 2023; `--target stf`): `pfgmpp_loss`
    regressing `stable_target`, the posterior mean of a reference batch at each perturbed image, instead of its
    clean image. Each batch is `reference_batch_size` images; its first `train_batch_size` rows are perturbed, and the
    reference batch is every process's batch (num_processes x L images, each sample's own image among them).

    Gathered rather than per process as in the official code (`--stf --rbatch 4096`, each GPU's own batch): STF's
    bias and variance fall as the reference batch grows, and gathering multiplies it by the number of processes for
    one all-gather of images every process loads anyway (as the field objective's charges); the cost is the target's
    two products over num_processes x L images. On one process the two are the same.

    Args:
        train_batch_size (`int`), reference_batch_size (`int`): the training and the reference batch, per process.
        P_mean (`float`), P_std (`float`): training noise levels, ln sigma ~ N(P_mean, P_std^2) (EDM).
        loss (`callable`, *optional*): called as
            `pfgmpp_loss(unet, scheduler, x, class_labels, P_mean, P_std, target=target)`, `target` the STF target
            of the gathered reference batch; default `pfgm_diffusers.losses.pfgmpp_loss`.
    """

    name = "pfgmpp"
    gathers = "reference images per STF target"  # the reference batch is every process's batch

    def __init__(self, train_batch_size, reference_batch_size, P_mean, P_std, loss=None):
        self.train_batch_size, self.reference_batch_size = train_batch_size, reference_batch_size
        self.P_mean, self.P_std = P_mean, P_std
        self.loss = pfgmpp_loss if loss is None else loss

    @property
    def loader_batch_size(self):
        return self.reference_batch_size

    def settings(self):
        """The loss's settings, recorded in every checkpoint: a resume that changes them learns another objective."""
        return dict(P_mean=self.P_mean, P_std=self.P_std, target="stf", reference_batch_size=self.reference_batch_size)

    def __call__(self, unet, scheduler, batch, class_labels, accelerator):
        """The loss of one batch `(L, C, H, W)` of this process: its first rows regress the posterior mean over every
        process's batch (num_processes x L images)."""
        reference = accelerator.gather(batch.contiguous())
        target = functools.partial(stable_target, reference=reference, aug_dim=scheduler.config.aug_dim)
        x = batch[: self.train_batch_size]
        return self.loss(unet, scheduler, x, class_labels, self.P_mean, self.P_std, target=target)
