"""The denoiser of a network: D(x, sigma) from F through the scheduler's preconditioning (math.md §1-§2).

D(x, sigma) = precondition_outputs(x, F(precondition_inputs(x, sigma), precondition_noise(sigma)), sigma), the one
composition that the losses, the pipeline's solvers and the evidence call (EDM eq. 7; for the original PFGM's field
model D = x - z v_x / v_z). Classifier-free guidance wraps it (`guidance.guided_denoiser`), which passes the
conditions of both branches in one batched call.
"""

import torch


def denoise_with(network, scheduler, x: torch.Tensor, sigma) -> torch.Tensor:
    """
    D(x, sigma) from `network(model_input, timestep) -> model output` under `scheduler`'s preconditioning, float32 out:
    the composition itself, for callers that wrap the network (conditions, guidance on the outputs).

    Args:
        network (`Callable`): the raw network, `(model_input, timestep (B,)) -> (B, C, H, W)` (C + 1 for the field).
        scheduler (`PFGMScheduler`, `PFGMFieldScheduler` or `EDMEulerScheduler`): the preconditioning.
        x (`torch.Tensor` of shape `(B, C, H, W)`): the noisy sample.
        sigma (`float` or `torch.Tensor` of shape `(B,)`): the noise level (z for the field model).

    Returns:
        `torch.Tensor`: D(x, sigma), float32, shaped like `x`.
    """
    model_input = scheduler.precondition_inputs(x, sigma)
    timestep = torch.as_tensor(scheduler.precondition_noise(sigma), dtype=torch.float32)
    timestep = timestep.to(x.device).reshape(-1).expand(x.shape[0])
    model_output = network(model_input, timestep)
    return scheduler.precondition_outputs(x, model_output.float(), sigma).float()


def denoise(unet, scheduler, x: torch.Tensor, sigma, **conditions) -> torch.Tensor:
    """
    D(x, sigma) of `unet` under `scheduler`'s preconditioning (`denoise_with`), float32 out; only the network's input
    is cast to `unet.dtype` (a bf16 UNet keeps a float32 state).

    Args:
        unet: called as `unet(model_input, timestep, **conditions)` returning `.sample` (a `UNet2DModel`).
        scheduler (`PFGMScheduler` or `PFGMFieldScheduler`): the preconditioning.
        x (`torch.Tensor` of shape `(B, C, H, W)`): the noisy sample.
        sigma (`float` or `torch.Tensor` of shape `(B,)`): the noise level (z for the field model), one or per sample.
        **conditions: the network's conditioning, e.g. `class_labels` (B,).

    Returns:
        `torch.Tensor`: D(x, sigma), float32, shaped like `x`.
    """
    dtype = getattr(unet, "dtype", None)  # a model wrapped for distributed training has none: autocast casts

    def network(model_input, timestep):
        return unet(model_input if dtype is None else model_input.to(dtype), timestep, **conditions).sample

    return denoise_with(network, scheduler, x, sigma)


def make_denoiser(unet, scheduler, **conditions):
    """
    The denoiser `D(x, sigma, **more_conditions)` of `unet` under `scheduler` (see `denoise`), with `conditions`
    (e.g. `class_labels=labels`) bound: what `ode.SAMPLERS` and `guidance.guided_denoiser` take.

    Args:
        unet: the network (a `UNet2DModel`).
        scheduler (`PFGMScheduler` or `PFGMFieldScheduler`): the preconditioning.
        **conditions: bound conditioning keywords; `None` values are left out.

    Returns:
        `Callable`: `(x, sigma, **more_conditions) -> D(x, sigma)`, float32.
    """
    bound = {key: value for key, value in conditions.items() if value is not None}

    def denoiser(x, sigma, **more_conditions):
        return denoise(unet, scheduler, x, sigma, **bound, **more_conditions)

    return denoiser
