"""What changes on a CUDA device: timesteps, sampling loops, the pipeline, the field target and the losses there, each
against the same computation on the CPU. Skipped without a GPU; `benchmarks/gpu_check.py` runs this file first."""

import os

import numpy as np
import pytest
import torch
from exact_networks import exact_network, landed, run_loop
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, ideal_denoiser, pfgm_perturb, poisson_field_target
from pfgm_diffusers.losses import pfgmpp_loss, poisson_field_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("aug_dim", [128, None])
def test_scheduler_loop_on_the_device_matches_the_cpu(solver, aug_dim):
    data = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for device in ("cpu", CUDA):
        scheduler = PFGMScheduler(aug_dim=aug_dim, solver=solver)
        scheduler.set_timesteps(12, device=device)
        assert scheduler.timesteps.device.type == torch.device(device).type and scheduler.sigmas.device.type == "cpu"
        start = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x = start.to(device) * scheduler.init_noise_sigma
        results[str(device)] = run_loop(scheduler, x, exact_network(scheduler, data.to(device))).cpu()
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-5, atol=1e-5)
    assert landed(results["cuda"], data)[0].float().mean() > 0.95


@pytest.mark.parametrize("solver", [None, "dpmpp_2m", "rk45"])
def test_pipeline_samples_on_the_device_as_on_the_cpu(solver):
    images = {}
    for device in ("cpu", "cuda"):
        pipe = PFGMPipeline(unet=tiny_unet(block_out_channels=(8, 16)), scheduler=PFGMScheduler(aug_dim=128)).to(
            device
        )
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(0)
        output = pipe(batch_size=4, num_inference_steps=6, generator=generator, output_type="pt", solver=solver)
        images[device] = output.images.cpu()
        assert output.images.device.type == device
    torch.testing.assert_close(images["cuda"], images["cpu"], rtol=1e-3, atol=1e-3)


def test_field_target_on_the_device_matches_the_official_values():
    with np.load(os.path.join(os.path.dirname(__file__), "oracle", "pfgm_field_target_N192.npz")) as oracle:
        large = torch.from_numpy(oracle["large_batch"]).float()
        y, z = torch.from_numpy(oracle["y"]).float(), torch.from_numpy(oracle["z"]).float()
        target = torch.from_numpy(oracle["gamma5__target"])
    target_x, target_z = poisson_field_target(y.to(CUDA), z.to(CUDA), large.to(CUDA), gamma=5.0)
    ours = torch.cat([target_x.cpu().double(), target_z.cpu().double()[:, None]], dim=1)
    assert ((ours - target).norm(dim=1) / target.norm(dim=1)).max() < 1e-5


def test_field_target_and_ideal_denoiser_at_cifar_size_agree_with_the_cpu():
    generator = torch.Generator().manual_seed(0)
    data = torch.rand(512, 3, 32, 32, generator=generator) * 2 - 1
    y, z = pfgm_perturb(data[:32], generator=generator)
    cpu = poisson_field_target(y, z, data)
    gpu = poisson_field_target(y.to(CUDA), z.to(CUDA), data.to(CUDA))
    for ours, reference in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(ours.cpu(), reference, rtol=1e-4, atol=1e-5)
    denoised = ideal_denoiser(y.to(CUDA), 0.5, data.to(CUDA), 128).cpu()
    torch.testing.assert_close(denoised, ideal_denoiser(y, 0.5, data, 128), rtol=1e-4, atol=1e-5)


def test_losses_under_bf16_autocast_on_the_device():
    x = torch.rand(8, 3, 8, 8, device=CUDA) * 2 - 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = pfgmpp_loss(tiny_unet(block_out_channels=(8, 16)).to(CUDA), PFGMScheduler(aug_dim=128), x)
        field = poisson_field_loss(tiny_unet(out_channels=4, block_out_channels=(8, 16)).to(CUDA), x[:4], x)
    assert loss.dtype == field.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(field)
    loss.backward()


def test_a_pfgmpp_training_step_never_waits_for_the_host():
    """The kernel draw, the preconditioning and the loss stay on the device: no synchronising call in a step."""
    unet = tiny_unet(block_out_channels=(8, 16)).to(CUDA)
    x = torch.rand(8, 3, 8, 8, device=CUDA) * 2 - 1
    scheduler = PFGMScheduler(aug_dim=128)
    pfgmpp_loss(unet, scheduler, x).backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        pfgmpp_loss(unet, scheduler, x).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
