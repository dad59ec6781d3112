#!/usr/bin/env python
"""Train PFGM++ (Xu et al., ICML 2023) or the original PFGM (Xu et al., NeurIPS 2022) with accelerate.

    accelerate launch training/train_pfgm.py            # no arguments: embedded 8x8 digits upscaled to 16x16, CPU
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 training/train_pfgm.py \\
        --preset cifar10 --aug_dim 2048 --push_to_hub --hub_model_id me/pfgmpp-cifar10
    accelerate launch training/train_pfgm.py --objective poisson_field --train_data_dir ./my_images \\
        --large_batch_size 4096 --train_batch_size 128

The script reads top to bottom: arguments, accelerator and seed, data, model/scheduler/optimizer/EMA, prepare, loop,
save. The math (kernel, prior, field target, preconditioning) lives in `pfgm_diffusers`; see docs/training.md.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time

import datasets
import diffusers
import huggingface_hub
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.import_utils import is_xformers_available
from tqdm.auto import tqdm

from pfgm_diffusers import PFGMPipeline, PFGMScheduler
from pfgm_diffusers.data import (
    ImageTransform,
    TrainingDataset,
    collate,
    load_digits_dataset,
    load_hub_dataset,
    load_image_folder,
)
from pfgm_diffusers.field import poisson_field_target, split_field_output
from pfgm_diffusers.hub import save_model_card, upload_pipeline
from pfgm_diffusers.perturbation import pfgm_perturb
from pfgm_diffusers.pipeline_pfgm import image_grid

logger = get_logger(__name__, log_level="INFO")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "pfgm_training_state.json"  # written into every checkpoint, read back on resume
ARGS_NAME = "training_args.json"  # the resolved arguments without secrets, beside the saved pipeline
# Arguments whose names contain these words are secrets: never written to disk, logged or sent to a tracker.
SECRET_WORDS = ("token", "key", "password", "secret")
# UNet2DModel keys the trainer derives from the data and the objective; a model config may not set them otherwise.
DERIVED_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds")

# Known-good settings of the official code bases (docs/training.md lists them with their commands and results).
# Durations are in optimizer steps; EMA decays are the official half-lives converted at the preset's batch size.
PRESETS = {
    # PFGM++ CIFAR-10 32x32 (official: EDM's DDPM++ config, D=128 or 2048, 200 Mimg at batch 512)
    "cifar10": dict(
        objective="pfgmpp",
        dataset_name="uoft-cs/cifar10",
        resolution=32,
        random_flip=True,
        model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_ddpmpp_32.json"),
        aug_dim=2048,
        train_batch_size=64,  # per process: 8 processes x 64 = 512
        learning_rate=1e-3,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=19_531,  # 10 Mimg
        max_train_steps=390_625,  # 200 Mimg
        adam_weight_decay=0.0,
        ema_max_decay=0.9993,  # 0.5 Mimg half-life at batch 512
        max_grad_norm=None,
        sigma_max=80.0,
        num_inference_steps=18,
    ),
    # PFGM++ FFHQ 64x64 (official: EDM's DDPM++ config at 64x64, D=128, batch 256, lr 2e-4, 200 Mimg)
    "ffhq64": dict(
        objective="pfgmpp",
        resolution=64,
        random_flip=True,
        model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_ddpmpp_64.json"),
        aug_dim=128,
        train_batch_size=32,  # per process: 8 processes x 32 = 256
        learning_rate=2e-4,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=39_062,  # 10 Mimg
        max_train_steps=781_250,  # 200 Mimg
        adam_weight_decay=0.0,
        ema_max_decay=0.99965,  # 0.5 Mimg half-life at batch 256
        max_grad_norm=None,
        sigma_max=80.0,
        num_inference_steps=40,
    ),
    # Original PFGM CIFAR-10 (official configs/poisson/cifar10_ddpmpp.py: batch 128, large batch 4096, 1.3 M steps)
    "pfgm-cifar10": dict(
        objective="poisson_field",
        dataset_name="uoft-cs/cifar10",
        resolution=32,
        random_flip=True,
        model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_ddpmpp_32.json"),
        train_batch_size=128,
        large_batch_size=4096,
        learning_rate=2e-4,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=5000,
        max_train_steps=1_300_000,
        adam_beta1=0.9,
        adam_weight_decay=0.0,
        ema_max_decay=0.9999,
        max_grad_norm=1.0,
        sigma=0.01,
        tau=0.03,
        M=291,
        gamma=5.0,
        sigma_max=40.0,
        upper_norm=3000.0,
        z_exp=5.0,
        num_inference_steps=50,
    ),
    # Original PFGM CelebA 64x64 (official: batch 128, large batch 512, z_max 60, upper_norm 6000, z_exp 1)
    "pfgm-celeba64": dict(
        objective="poisson_field",
        resolution=64,
        center_crop=True,
        random_flip=True,
        model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_ddpmpp_64.json"),
        train_batch_size=128,
        large_batch_size=512,
        learning_rate=2e-4,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=5000,
        max_train_steps=1_300_000,
        adam_beta1=0.9,
        adam_weight_decay=0.0,
        ema_max_decay=0.9999,
        max_grad_norm=1.0,
        sigma=0.01,
        tau=0.03,
        M=356,
        gamma=5.0,
        sigma_max=60.0,
        upper_norm=6000.0,
        z_exp=1.0,
        num_inference_steps=50,
    ),
}
DEFAULT_MAX_TRAIN_STEPS = 2000
# Defaults that differ between the objectives; the other defaults are shared.
OBJECTIVE_DEFAULTS = {
    "pfgmpp": dict(aug_dim=128, sigma_min=0.002, sigma_max=80.0),
    # In the field objective "sigma" of the scheduler is z: sigma_min = z_min, sigma_max = z_max (math.md §3)
    "poisson_field": dict(aug_dim=1, sigma_min=1e-3, sigma_max=40.0),
}


def parse_aug_dim(value):
    """`--aug_dim`: an integer D >= 1, or `inf` for the diffusion limit (stored as the string "inf")."""
    if value.lower() in ("inf", "infinity"):
        return "inf"
    try:
        aug_dim = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--aug_dim must be an integer >= 1 or 'inf', got {value!r}") from None
    if aug_dim < 1:
        raise argparse.ArgumentTypeError(f"--aug_dim must be an integer >= 1 or 'inf', got {aug_dim}")
    return aug_dim


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="Known-good settings; flags override.")
    parser.add_argument("--objective", choices=("pfgmpp", "poisson_field"), default="pfgmpp")

    data = parser.add_argument_group("data (none given: the embedded 8x8 digits)")
    data.add_argument("--dataset_name", default=None, help="A `datasets` Hub id or local path.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="An image folder; class sub-folders become labels.")
    data.add_argument("--image_column", default=None, help="Default: the dataset's first image column.")
    data.add_argument("--label_column", default="label")
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--resolution", type=int, default=16)
    data.add_argument("--center_crop", action="store_true", help="Center instead of random crop.")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--class_conditional", action="store_true", help="Condition the UNet on the labels.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config_name_or_path",
        default=os.path.join(CONFIG_DIR, "unet_digits.json"),
        help="A UNet2DModel config (JSON file, or a folder/Hub id with config.json); sizes and channels are derived.",
    )
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    pfgmpp = parser.add_argument_group("PFGM++ objective (and the sampler's noise range)")
    pfgmpp.add_argument("--aug_dim", type=parse_aug_dim, default=None, help="D; 'inf' = diffusion (EDM). Default 128.")
    pfgmpp.add_argument("--P_mean", type=float, default=-1.2)
    pfgmpp.add_argument("--P_std", type=float, default=1.2)
    pfgmpp.add_argument("--sigma_data", type=float, default=0.5)
    pfgmpp.add_argument("--sigma_min", type=float, default=None, help="Default 0.002 (PFGM++), z_min=1e-3 (PFGM).")
    pfgmpp.add_argument("--sigma_max", type=float, default=None, help="Default 80 (PFGM++), z_max=40 (PFGM).")

    pfgm = parser.add_argument_group("PFGM objective (--objective poisson_field)")
    pfgm.add_argument("--sigma", type=float, default=0.01, help="Algorithm 2's base noise.")
    pfgm.add_argument("--tau", type=float, default=0.03)
    pfgm.add_argument("--M", type=int, default=291)
    pfgm.add_argument("--gamma", type=float, default=5.0, help="Algorithm 1's normaliser offset.")
    pfgm.add_argument("--large_batch_size", type=int, default=None, help="Charges per process; default 4x batch.")
    pfgm.add_argument("--upper_norm", type=float, default=None, help="Prior radius clip of the sampler.")
    pfgm.add_argument("--z_exp", type=float, default=None, help="Below this z the sampler rebuilds v_z.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=64, help="Per process.")
    optim.add_argument("--num_epochs", type=int, default=None, help="Used when --max_train_steps is not given.")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_epochs. Default 2000.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=1e-3)
    optim.add_argument(
        "--lr_scheduler",
        default="constant_with_warmup",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=200)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    optim.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: launcher's.")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument(
        "--cpu_threads_per_process",
        type=int,
        default=None,
        help="CPU runs only. Default: torch's setting (`accelerate launch` gives each process one thread); 2 on an "
        "idle 2-core machine trains ~1.6x faster.",
    )

    ema = parser.add_argument_group("EMA")
    ema.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    ema.add_argument("--ema_inv_gamma", type=float, default=1.0)
    ema.add_argument("--ema_power", type=float, default=3 / 4)
    ema.add_argument("--ema_max_decay", type=float, default=0.999)

    output = parser.add_argument_group("checkpoints, samples, logging")
    output.add_argument("--output_dir", default="pfgm-digits")
    output.add_argument("--checkpointing_steps", type=int, default=500)
    output.add_argument("--checkpoints_total_limit", type=int, default=2)
    output.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    output.add_argument(
        "--save_images_steps", type=int, default=1000, help="Sample grid every N steps and at the end."
    )
    output.add_argument("--eval_batch_size", type=int, default=64, help="Images in each sample grid.")
    output.add_argument("--num_inference_steps", type=int, default=18)
    output.add_argument("--logging_dir", default="logs", help="Relative to --output_dir.")
    output.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default="none")

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None, help="Default: the name of --output_dir.")
    hub.add_argument(
        "--hub_token",
        default=None,
        help="Prefer `hf auth login` or HF_TOKEN (other users see flags in `ps`). Never saved or logged.",
    )
    hub.add_argument("--hub_private_repo", action="store_true")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is not None:
        # Preset values become defaults, so flags given on the command line still win
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    for key, value in OBJECTIVE_DEFAULTS[args.objective].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_train_steps is None and args.num_epochs is None:
        args.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
    if args.objective == "poisson_field" and args.large_batch_size is None:
        args.large_batch_size = 4 * args.train_batch_size
    check_args(args)
    return args


def check_args(args):
    """Every check that needs no data and no accelerator: bad input fails here, before anything is loaded."""
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("give at most one of --dataset_name and --train_data_dir")
    if args.preset is not None and args.dataset_name is None and args.train_data_dir is None:
        raise ValueError(
            f"--preset {args.preset} needs a dataset: give --dataset_name or --train_data_dir "
            "(the embedded digits are only the no-preset default)"
        )
    positive = ["resolution", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"]
    positive += ["save_images_steps", "eval_batch_size", "num_inference_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "num_epochs", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.objective == "pfgmpp" and args.large_batch_size is not None:
        raise ValueError("--large_batch_size is the charge count of --objective poisson_field; PFGM++ has none")
    if args.objective == "poisson_field":
        if args.aug_dim != 1:
            raise ValueError(f"--objective poisson_field is PFGM with D = 1; --aug_dim {args.aug_dim} is not allowed")
        if args.large_batch_size < args.train_batch_size:
            raise ValueError(
                f"--large_batch_size ({args.large_batch_size}) must be >= --train_batch_size "
                f"({args.train_batch_size}): the small batch is the first rows of the large one"
            )
    if not 0 < args.sigma_min < args.sigma_max:
        raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {args.sigma_min} and {args.sigma_max}")
    if args.P_std <= 0 or args.sigma_data <= 0:
        raise ValueError(f"--P_std and --sigma_data must be > 0, got {args.P_std} and {args.sigma_data}")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "--hub_token with --report_to wandb: wandb records the command line, token included; use `hf auth login` "
            "or the HF_TOKEN variable instead"
        )
    if args.report_to != "none":
        try:
            __import__(args.report_to)
        except ImportError:
            raise ValueError(f"--report_to {args.report_to} needs `pip install {args.report_to}`") from None
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist")


# ---------------------------------------------------------------------------------------------------------------
# The two objectives. Each is a pure function of the model, a batch and its own hyperparameters.


def pfgmpp_loss(unet, scheduler, x, class_labels=None, P_mean=-1.2, P_std=1.2):
    """PFGM++ loss: EDM's denoising loss with the PFGM++ kernel (PFGM++ eq. 11 and App. C; EDM Table 1)."""
    batch_size = x.shape[0]
    sigma = torch.exp(P_mean + P_std * torch.randn(batch_size, device=x.device))  # (B,), ln sigma ~ N(P_mean, P_std^2)
    noisy = scheduler.add_noise(x, torch.randn_like(x), sigmas=sigma)  # exact kernel with r = sigma sqrt(D)
    model_input = scheduler.precondition_inputs(noisy, sigma)
    timestep = scheduler.precondition_noise(sigma)  # (B,) float
    model_output = unet(model_input, timestep, class_labels=class_labels).sample
    denoised = scheduler.precondition_outputs(noisy, model_output.float(), sigma)  # loss in fp32 under autocast
    weight = scheduler.loss_weight(sigma).reshape(-1, *([1] * (x.ndim - 1)))
    return (weight * (denoised - x) ** 2).mean()


def poisson_field_loss(unet, x, charges, class_labels=None, sigma=0.01, tau=0.03, M=291, gamma=5.0):
    """PFGM loss: perturb the small batch `x` (Algorithm 2), regress the normalised field of `charges` (Alg. 1)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        # fp32 outside autocast: the target's softmax over charges must stay exact under bf16/fp16
        y, z = pfgm_perturb(x.float(), sigma=sigma, tau=tau, M=M)  # (B, C, H, W), (B,)
        target_x, target_z = poisson_field_target(y, z, charges.float(), gamma=gamma)
    model_output = unet(y, z, class_labels=class_labels).sample  # raw z is the timestep; C + 1 channels
    v_x, v_z = split_field_output(model_output.float())
    squared_error = (v_x - target_x).pow(2).flatten(1).sum(1) + (v_z - target_z).pow(2)  # (B,), N + 1 components
    return 0.5 * squared_error.mean()


def gather_charges(accelerator, x_large):
    """Every process's large batch, concatenated in process order without gradient: num_processes x L charges."""
    return accelerator.gather(x_large.detach().contiguous())


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: folders `checkpoint-<step>`, written under a temporary name and renamed when complete.


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
            found.append((int(step), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_checkpoint(resume_from_checkpoint, output_dir):
    """The checkpoint folder to resume from, or None for a fresh run ('latest' with no checkpoint yet)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    return resume_from_checkpoint


def read_training_state(checkpoint, objective):
    """The step and objective stored in `checkpoint`; a ValueError if it is not ours or from another objective."""
    path = os.path.join(checkpoint, TRAINING_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint!r} is not a checkpoint of this trainer (no {TRAINING_STATE_NAME})")
    with open(path) as f:
        state = json.load(f)
    if state["objective"] != objective:
        raise ValueError(
            f"checkpoint {checkpoint!r} was trained with --objective {state['objective']}, "
            f"this run uses --objective {objective}"
        )
    return state


def save_checkpoint(accelerator, output_dir, global_step, training_state, checkpoints_total_limit):
    """Save the full training state atomically, then keep only the newest `checkpoints_total_limit` checkpoints."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    partial = os.path.join(output_dir, f".partial-{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)  # every process writes its own RNG state into it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, TRAINING_STATE_NAME), "w") as f:
            json.dump(training_state, f, indent=2)
        if os.path.exists(final):  # the same step saved again (a resumed run's last step)
            remove_checkpoint(final)
        os.replace(partial, final)  # atomic: `latest` only ever sees complete checkpoints
        if checkpoints_total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-checkpoints_total_limit]:
                remove_checkpoint(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()


def remove_checkpoint(path):
    # Rename first, so a run killed while deleting leaves no half-deleted folder that looks like a checkpoint
    trash = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def remove_partial_checkpoints(output_dir):
    """Leftovers of a killed run: checkpoints being written or deleted."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith((".partial-", ".deleting-")):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Model config, samples and the Hub.


def load_unet_config(model_config_name_or_path, resolution, num_channels, out_channels, num_classes):
    """A UNet2DModel config from a JSON file or a pretrained folder/Hub id, with the derived keys filled in."""
    if os.path.isfile(model_config_name_or_path):
        with open(model_config_name_or_path) as f:
            config = json.load(f)
    else:
        config = dict(UNet2DModel.load_config(model_config_name_or_path))
    derived = dict(sample_size=resolution, in_channels=num_channels, out_channels=out_channels)
    derived["num_class_embeds"] = num_classes
    for key, value in derived.items():
        if key in config and config[key] != value:
            raise ValueError(
                f"{model_config_name_or_path}: {key}={config[key]} conflicts with the data/objective ({key}={value}); "
                "remove it from the config, the trainer derives it"
            )
    config.update(derived)
    downsampling = 2 ** (len(config.get("block_out_channels", UNet2DModel().config.block_out_channels)) - 1)
    if resolution % downsampling != 0:
        raise ValueError(
            f"--resolution {resolution} is not divisible by {downsampling}, the UNet's downsampling factor "
            f"({model_config_name_or_path})"
        )
    return config


def sample_images(unet, scheduler_config, eval_batch_size, num_inference_steps, seed, num_classes=None):
    """Samples (B, H, W, C) in [0, 1] from `unet`, with a fresh scheduler and its own seeded generator."""
    pipeline = PFGMPipeline(unet=unet, scheduler=PFGMScheduler.from_config(scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = {}
    if num_classes is not None:
        kwargs["class_labels"] = torch.arange(eval_batch_size) % num_classes
    return pipeline(
        batch_size=eval_batch_size,
        num_inference_steps=num_inference_steps,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images


class EpochSampler(torch.utils.data.Sampler):
    """A random order that depends only on (seed, epoch): identical on every process and after a resume."""

    def __init__(self, num_samples, seed):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


@contextlib.contextmanager
def ema_weights(ema_model, unet):
    """The EMA weights in `unet` (in eval mode) inside the block; the trained weights come back after it."""
    unet.eval()
    if ema_model is None:
        yield
        return
    ema_model.store(unet.parameters())
    ema_model.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema_model.restore(unet.parameters())


def public_arguments(args):
    """The arguments without secrets (any name with token, key, password or secret), for files and trackers."""
    return {name: value for name, value in vars(args).items() if not any(word in name for word in SECRET_WORDS)}


def push_to_hub(repo_id, output_dir, token):
    """Upload the saved pipeline, its model card, `samples.png` and the arguments file: an allow-list, so checkpoints,
    logs and any stray file in the output folder stay local."""
    save_model_card(output_dir, repo_id)
    upload_pipeline(
        repo_id,
        output_dir,
        token=token,
        commit_message="Upload PFGM pipeline trained with pfgm_diffusers",
        extra_files=("samples.png", ARGS_NAME),
    )


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)

    # Accelerator and seed
    accelerator = Accelerator(
        # With no accelerator at all, accelerate forms a (gloo) process group only when told cpu=True: this makes
        # `accelerate launch --multi_gpu --num_processes N` train on a CPU-only machine instead of running N copies
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise ValueError(
            f"launched as {os.environ['WORLD_SIZE']} processes but accelerate formed a group of "
            f"{accelerator.num_processes}: they would train independent copies"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 is not supported on CPU; use bf16 or no")
    if accelerator.device.type == "cpu" and args.cpu_threads_per_process is not None:
        # Not the default: more threads than free cores makes torch's spinning thread pools crawl (measured 50x)
        torch.set_num_threads(args.cpu_threads_per_process)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    training_state = read_training_state(checkpoint, args.objective) if checkpoint is not None else None
    # A different noise stream per process; the data order below has its own generator shared by all processes
    set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_partial_checkpoints(args.output_dir)

    # Data
    with accelerator.main_process_first():  # one process fills the `datasets` cache, the others read it
        if args.train_data_dir is not None:
            image_dataset = load_image_folder(args.train_data_dir, cache_dir=args.cache_dir)
        elif args.dataset_name is not None:
            image_dataset = load_hub_dataset(
                args.dataset_name, args.dataset_config_name, args.cache_dir, args.image_column, args.label_column
            )
        else:
            image_dataset = load_digits_dataset()
    if args.class_conditional and image_dataset.num_classes is None:
        raise ValueError("--class_conditional needs labels: class sub-folders or a label column in the dataset")
    num_classes = image_dataset.num_classes if args.class_conditional else None
    transform = ImageTransform(args.resolution, image_dataset.num_channels, args.center_crop, args.random_flip)
    dataset = TrainingDataset(image_dataset.dataset, transform, seed=args.seed)
    # The field objective loads the large batch; its first train_batch_size rows are the small batch
    loader_batch_size = args.large_batch_size if args.objective == "poisson_field" else args.train_batch_size
    sampler = EpochSampler(len(dataset), seed=args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=loader_batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,  # equal batches on every process, as the gathered charges need
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG (restored on resume) untouched
    )
    if len(dataset) < loader_batch_size * accelerator.num_processes:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {loader_batch_size} "
            f"on each of {accelerator.num_processes} process(es)"
        )

    # Model, scheduler, optimizer, EMA
    out_channels = image_dataset.num_channels + (1 if args.objective == "poisson_field" else 0)
    unet_config = load_unet_config(
        args.model_config_name_or_path, args.resolution, image_dataset.num_channels, out_channels, num_classes
    )
    unet = UNet2DModel.from_config(unet_config)
    if args.objective == "pfgmpp":
        scheduler = PFGMScheduler(
            sigma_min=args.sigma_min,
            sigma_max=args.sigma_max,
            sigma_data=args.sigma_data,
            aug_dim=None if args.aug_dim == "inf" else args.aug_dim,
        )
    else:
        scheduler = PFGMScheduler(
            sigma_min=args.sigma_min,
            sigma_max=args.sigma_max,
            prediction_type="poisson_field",
            aug_dim=1,
            sigma_schedule="exponential",  # the official PFGM grid is uniform in ln z (math.md §3)
            gamma=args.gamma,
            z_exp=args.z_exp,
            upper_norm=args.upper_norm,
        )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if is_xformers_available() and torch.cuda.is_available():
            unet.enable_xformers_memory_efficient_attention()
        else:
            missing = "xformers" if not is_xformers_available() else "a CUDA device"
            logger.warning(
                f"--enable_xformers_memory_efficient_attention ignored: {missing} is not available "
                "(xformers needs `pip install xformers` and a CUDA GPU); using PyTorch attention"
            )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            unet.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=unet.config,
        )

        # accelerate checkpoints only what it prepares; the EMA weights ride along through these hooks
        def save_ema(models, weights, output_dir):
            if accelerator.is_main_process:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))

        def load_ema(models, input_dir):
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DModel)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)

        accelerator.register_save_state_pre_hook(save_ema)
        accelerator.register_load_state_pre_hook(load_ema)

    # Batches per process per epoch (drop_last), as the prepared dataloader will yield them
    num_update_steps_per_epoch = (
        len(dataset) // (loader_batch_size * accelerator.num_processes) // args.gradient_accumulation_steps
    )
    if num_update_steps_per_epoch < 1:
        raise ValueError("fewer batches per process than --gradient_accumulation_steps: nothing to train")
    if args.max_train_steps is None:
        args.max_train_steps = args.num_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    # After every input check, so that bad input creates no repository; before training, so that a bad token fails fast
    repo_id = None
    if accelerator.is_main_process and args.push_to_hub:
        repo_id = args.hub_model_id if args.hub_model_id is not None else os.path.basename(args.output_dir)
        repo_id = huggingface_hub.create_repo(
            repo_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token
        ).repo_id

    # Prepare
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)
    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        global_step = training_state["global_step"]
        logger.info(f"Resumed from {checkpoint} at step {global_step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir} yet: starting a new run")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, ARGS_NAME), "w") as f:
            json.dump(public_arguments(args), f, indent=2)
        if args.report_to != "none":
            config = {name: value for name, value in public_arguments(args).items() if value is not None}
            accelerator.init_trackers("train_pfgm", config=config)

    # Loop
    num_charges = args.large_batch_size * accelerator.num_processes if args.objective == "poisson_field" else None
    logger.info(
        f"{args.objective}: {len(dataset)} images ({image_dataset.num_channels} channel(s), {args.resolution}px), "
        f"{accelerator.num_processes} process(es) x {args.train_batch_size} x {args.gradient_accumulation_steps} "
        f"accumulation, {args.max_train_steps} steps, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
        f"parameters" + (f", {num_charges} charges per field target" if num_charges is not None else "")
    )
    samples_dir = os.path.join(args.output_dir, "samples")
    images_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    progress_bar = tqdm(
        total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    first_epoch = global_step // num_update_steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    step_start = time.perf_counter()
    start_step = global_step
    train_time, timed_steps = 0.0, 0  # throughput of the optimizer steps alone, without samples and checkpoints
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        # The same order and augmentations on every process and after a resume
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_dataloader = train_dataloader
        if epoch == first_epoch and global_step % num_update_steps_per_epoch != 0:
            done = global_step % num_update_steps_per_epoch * args.gradient_accumulation_steps
            epoch_dataloader = accelerator.skip_first_batches(train_dataloader, done)
        unet.train()
        for batch in epoch_dataloader:
            x_large = batch["pixel_values"]  # (L, C, H, W) for the field objective, else (B, C, H, W)
            x = x_large[: args.train_batch_size]
            class_labels = batch["label"][: args.train_batch_size] if num_classes is not None else None
            with accelerator.accumulate(unet):
                if args.objective == "pfgmpp":
                    loss = pfgmpp_loss(unet, scheduler, x, class_labels, args.P_mean, args.P_std)
                else:
                    charges = gather_charges(accelerator, x_large)  # (num_processes * L, C, H, W)
                    loss = poisson_field_loss(unet, x, charges, class_labels, args.sigma, args.tau, args.M, args.gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done
            if ema_model is not None:
                ema_model.step(unet.parameters())
            global_step += 1
            now = time.perf_counter()
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            logs["img/s"] = images_per_step / max(now - step_start, 1e-9)
            if global_step > start_step + 5:  # the first steps warm up allocators and caches
                train_time, timed_steps = train_time + now - step_start, timed_steps + 1
            step_start = now
            if ema_model is not None:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['img/s']:.0f}")
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                state = {"global_step": global_step, "objective": args.objective}
                save_checkpoint(accelerator, args.output_dir, global_step, state, args.checkpoints_total_limit)
            if accelerator.is_main_process and (
                global_step % args.save_images_steps == 0 or global_step == args.max_train_steps
            ):
                with ema_weights(ema_model, unet):
                    images = sample_images(
                        accelerator.unwrap_model(unet),
                        scheduler.config,
                        args.eval_batch_size,
                        args.num_inference_steps,
                        args.seed,
                        num_classes,
                    )
                unet.train()
                os.makedirs(samples_dir, exist_ok=True)
                image_grid(PFGMPipeline.numpy_to_pil(images), padding=1).save(
                    os.path.join(samples_dir, f"step_{global_step:07d}.png")
                )
                step_start = time.perf_counter()  # sampling time is not training throughput
            if global_step >= args.max_train_steps:
                break
    progress_bar.close()
    if timed_steps > 0:
        steps_per_second = timed_steps / train_time
        logger.info(
            f"Training throughput: {steps_per_second:.3f} steps/s, {steps_per_second * images_per_step:.1f} images/s "
            "(steps after the first 5, without sampling and checkpoints)"
        )

    # Save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with ema_weights(ema_model, unet):
            pipeline = PFGMPipeline(unet=accelerator.unwrap_model(unet), scheduler=scheduler)
            pipeline.save_pretrained(args.output_dir)
        last_grid = os.path.join(samples_dir, f"step_{global_step:07d}.png")
        if os.path.exists(last_grid):
            shutil.copyfile(last_grid, os.path.join(args.output_dir, "samples.png"))
        logger.info(f"Saved the pipeline (EMA weights: {ema_model is not None}) to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(repo_id, args.output_dir, args.hub_token)
            logger.info(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
