"""`PFGMPipeline(solver="restart")`: Restart sampling from the pipeline, for any D and EDM: where it lands with an
exact denoiser, its exact network evaluations, per-image generators, and what it refuses (the field model, the
schedulers' steps, inversion, bad blocks)."""

import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler
from exact_networks import ExactUNet, landed
from scipy import stats
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMFieldScheduler, PFGMPipeline, PFGMScheduler, ode
from pfgm_diffusers.field import ideal_denoiser
from pfgm_diffusers.restart import RESTART_CIFAR10

SHAPE = (3, 1, 1)  # (C, H, W): four points in N = 3, as the scheduler loops' tests
DATA = torch.tensor([[0.8, 0.2, -0.4], [-0.6, 0.7, 0.3], [0.1, -0.8, 0.5], [0.4, 0.5, 0.9]]).reshape(4, *SHAPE)


def exact_pipe(scheduler, mode="epsilon"):
    aug_dim = scheduler.config.get("aug_dim")
    unet = ExactUNet(lambda x, sigma: ideal_denoiser(x.double(), sigma, DATA.double(), aug_dim).float(), SHAPE, mode)
    pipe = PFGMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_unet_calls(unet):
    calls = []
    unet.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


SCHEDULERS = {
    "D=8": lambda: PFGMScheduler(aug_dim=8),
    "D=128": lambda: PFGMScheduler(aug_dim=128),
    "D=inf": lambda: PFGMScheduler(aug_dim=None),
    "EDMEuler": EDMEulerScheduler,
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_restart_with_an_exact_denoiser_lands_on_each_point_equally_often(name):
    pipe = exact_pipe(SCHEDULERS[name]())
    calls = count_unet_calls(pipe.unet)
    blocks = {"0": [3, 2, 0.14, 0.30], "1": [3, 1, 2.0, 5.0]}
    out = pipe(
        batch_size=1000,
        solver="restart",
        restart_blocks=blocks,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    assert out.nfe == len(calls) == 2 * 18 - 1 + 2 * 2 * (3 - 1) + 1 * 2 * (3 - 1)  # 47
    ok, nearest = landed(out.images * 2 - 1, DATA)  # back to model space
    assert ok.all(), ok.float().mean()
    counts = np.bincount(nearest.numpy(), minlength=len(DATA))
    assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_restart_costs_43_evaluations_with_the_official_block_and_adds_2_k_per_level():
    pipe = PFGMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(aug_dim=128))
    pipe.set_progress_bar_config(disable=True)
    calls = count_unet_calls(pipe.unet)
    default = pipe(batch_size=2, solver="restart", generator=torch.Generator().manual_seed(0), output_type="pt")
    assert default.nfe == len(calls) == 43  # 2 * 18 - 1 + K 2 (N_restart - 1) = 35 + 2 * 2 * 2
    official = pipe(
        batch_size=2,
        solver="restart",
        restart_blocks=RESTART_CIFAR10,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    torch.testing.assert_close(official.images, default.images, rtol=0, atol=0)  # the default is the official block
    calls.clear()
    out = pipe(
        batch_size=2,
        num_inference_steps=10,
        solver="restart",
        restart_blocks={"a": [4, 3, 1.0, 5.0]},
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        return_dict=False,
    )
    assert out[1] == len(calls) == 2 * 10 - 1 + 3 * 2 * (4 - 1)
    heun = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert heun.nfe == 35 and (heun.images - default.images).abs().max() > 1e-3  # the restart moved the samples


def test_restart_image_i_equals_a_single_run_with_generator_i():
    pipe = PFGMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(aug_dim=128))
    pipe.set_progress_bar_config(disable=True)
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = pipe(batch_size=2, solver="restart", generator=seeds, output_type="pt").images
    single = pipe(batch_size=1, solver="restart", generator=[torch.Generator().manual_seed(4)], output_type="pt")
    torch.testing.assert_close(batch[1:], single.images, rtol=0, atol=1e-6)


def test_restart_refusals_name_the_reason():
    field = PFGMPipeline(unet=tiny_unet(out_channels=4), scheduler=PFGMFieldScheduler())
    with pytest.raises(ValueError, match="solver='restart' is for PFGM\\+\\+ models: .* original PFGM's field model"):
        field(solver="restart")
    with pytest.raises(ValueError, match="solver='restart' has no scheduler step: Restart jumps from t_min back up"):
        PFGMScheduler(solver="restart")
    with pytest.raises(ValueError, match="solver='restart' has no scheduler step"):
        PFGMScheduler.from_config(PFGMScheduler().config, solver="restart")
    with pytest.raises(ValueError, match="solver='restart' is for PFGM\\+\\+ models"):
        PFGMFieldScheduler(solver="restart")
    pipe = PFGMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(aug_dim=128))
    pipe.set_progress_bar_config(disable=True)
    calls = count_unet_calls(pipe.unet)
    image = torch.rand(1, 3, 8, 8)
    cases = [
        (dict(solver="restart", restart_blocks={"0": [3, 2, 0.30, 0.14]}), r"t_min < t_max, both finite, got 0.3 and"),
        (dict(solver="restart", restart_blocks={"0": [3, 2, 0.14, 120.0]}), r"t_max 120.0 must satisfy .* <= 80"),
        (dict(solver="restart", restart_blocks={"0": [3, 2, 1e-4, 0.3]}), r"t_min 0.0001 and t_max 0.3 must satisfy"),
        (dict(solver="restart", restart_blocks=[3, 2, 0.14, 0.3]), r"`restart_blocks` must be a dict of blocks"),
        (dict(restart_blocks=RESTART_CIFAR10), r"`restart_blocks` are the blocks of solver='restart', got .*'heun'"),
        (dict(solver="restart", image=image), r"`image` with solver='restart'"),
        (dict(solver="restart", max_evaluations=50), r"`max_evaluations` bounds the adaptive solvers"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    assert calls == []  # refused before any network call
    with pytest.raises(ValueError, match="invert has no solver='restart'"):
        pipe.invert(image, solver="restart")
    assert "restart" in ode.SAMPLERS and "restart" not in ode.STEPPERS
