#!/usr/bin/env python
"""Turn a training checkpoint into a `PFGMPipeline` folder, e.g. from a run that was killed or is still going.

    python training/export_checkpoint.py pfgm-digits/checkpoint-500 pfgm-digits-500
    python -c "from pfgm_diffusers import PFGMPipeline; PFGMPipeline.from_pretrained('pfgm-digits-500')"

The checkpoint's files are verified against their record first. The pipeline gets the EMA weights (the model's own
with `--no_ema`, or when the run had no EMA), the scheduler and the class names the run saved in the checkpoint.
"""

import argparse
import os

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from pfgm_diffusers import PFGMPipeline, PFGMScheduler
from pfgm_diffusers.training import checkpoints


def export_pipeline(checkpoint, output_dir, use_ema=True):
    """Save the pipeline of `checkpoint` into `output_dir`; return the weights file it took the UNet from."""
    state = checkpoints.verified_training_state(checkpoint)
    weights = os.path.join(checkpoint, "unet_ema", "diffusion_pytorch_model.safetensors")
    if not use_ema or not os.path.isfile(weights):
        weights = os.path.join(checkpoint, "model.safetensors")  # accelerate's copy of the trained model
    state_dict = {name.removeprefix("module."): tensor for name, tensor in load_file(weights).items()}  # DDP names
    unet = UNet2DModel.from_config(state["unet_config"])
    unet.load_state_dict(state_dict)
    scheduler = PFGMScheduler.from_config(state["scheduler_config"])
    os.makedirs(output_dir, exist_ok=True)
    pipeline = PFGMPipeline(unet=unet.to(torch.float32), scheduler=scheduler, class_names=state["class_names"])
    checkpoints.save_pipeline(pipeline, output_dir)
    return weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A checkpoint-<step> folder of training/train_pfgm.py.")
    parser.add_argument("output_dir", help="Where to save the pipeline (created if needed).")
    parser.add_argument("--no_ema", action="store_true", help="The trained weights instead of the EMA weights.")
    args = parser.parse_args(argv)
    weights = export_pipeline(args.checkpoint, args.output_dir, use_ema=not args.no_ema)
    print(
        f"Saved the pipeline of {args.checkpoint} ({os.path.relpath(weights, args.checkpoint)}) to {args.output_dir}"
    )


if __name__ == "__main__":
    main()
