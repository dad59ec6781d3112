"""Settings as data: the no-argument run, the defaults that depend on the objective, and the official presets.

`train_pfgm.py` turns each dict into argparse defaults, so a flag on the command line always wins. Every preset names
its source (the official config file or README it comes from) and the official result it should reach. Sizes are per
process (the commands in docs/training.md assume 8 GPUs); durations are optimizer steps, EMA decays the official
half-lives converted at the preset's batch size.
"""

import inspect
import os

from pfgm_diffusers import PFGMScheduler

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_SCHEDULER_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(PFGMScheduler.__init__).parameters.items()
}

# The no-argument run (`make train`): PFGM++ on the embedded digits at their native 8x8, CPU, about 6 minutes on
# 2 cores. The one place to tune it; the values come from the pilots of the evidence sweep (docs/benchmarks.md).
NO_PRESET = dict(
    objective="pfgmpp",
    resolution=8,  # the digits' native size
    model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_digits_8px.json"),
    train_batch_size=64,
    max_train_steps=6000,
    learning_rate=2e-3,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=200,
    adam_weight_decay=0.0,
    max_grad_norm=1.0,
    ema_max_decay=0.999,
    output_dir="pfgm-digits",
    checkpointing_steps=1000,
    save_images_steps=2000,
    eval_batch_size=64,
    num_inference_steps=18,
)

# Given a dataset (--train_data_dir or --dataset_name) and no --preset, these come from the data, not from NO_PRESET
# (arguments.fill_from_the_data): the resolution is the data's image size, the UNet the one for that resolution in
# this table, and the output folder pfgm-<the data's folder or Hub name>.
FROM_THE_DATA = ("resolution", "model_config_name_or_path")
UNET_BY_RESOLUTION = os.path.join(CONFIG_DIR, "unet_by_resolution.json")

# Defaults that differ between the objectives. PFGM++ takes the scheduler's own (D, sigma range); in the field
# objective "sigma" is z and D is 1 (math.md §3).
OBJECTIVE_DEFAULTS = {
    "pfgmpp": dict(
        aug_dim=_SCHEDULER_DEFAULTS["aug_dim"],
        sigma_min=_SCHEDULER_DEFAULTS["sigma_min"],
        sigma_max=_SCHEDULER_DEFAULTS["sigma_max"],
        z_exp=None,
        upper_norm=None,
    ),
    "poisson_field": dict(
        aug_dim=1,
        sigma_min=1e-3,  # z_min of the official sampler
        sigma_max=40.0,  # z_max for CIFAR-10 (math.md §3)
        # The official sampler's safeguards (math.md §3), on by default: without them about 21 of 32 digits samples
        # were noise, 7 of 32 with them. z_exp 1 is CelebA's official value and the one measured on the digits
        # (docs/pipeline.md); "auto" clips the prior at the largest radius the training perturbation reaches,
        # sqrt(N + 1) sigma (1 + tau)^M, the official hyperparam_calculator.py rule (3016 for CIFAR-10's N and
        # M = 291, whose config says 3000).
        z_exp=1.0,
        upper_norm="auto",
    ),
}


class Preset(dict):
    """Flag defaults with the official source they come from and the result that source reports."""

    def __init__(self, source, result, **settings):
        super().__init__(settings)
        self.source = source
        self.result = result


PRESETS = {
    "cifar10": Preset(
        source="PFGM++ README (Newbeeer/pfgmpp): train.py --cond=0 --arch=ddpmpp --batch=512 --aug_dim=2048, on "
        "EDM's CIFAR-10 defaults (lr 1e-3, 10 Mimg warm-up, 200 Mimg, EMA half-life 0.5 Mimg)",
        result="FID 1.91 at D = 2048, 1.92 at D = 128, 35 NFE (18 Heun steps)",
        objective="pfgmpp",
        dataset_name="uoft-cs/cifar10",
        resolution=32,
        random_flip=True,
        model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_ddpmpp_32.json"),
        aug_dim=2048,
        train_batch_size=64,  # x 8 processes = 512
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
    "ffhq64": Preset(
        source="PFGM++ README (Newbeeer/pfgmpp) on EDM's FFHQ 64x64 options: --arch=ddpmpp --batch=256 "
        "--cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15, D = 128, 200 Mimg",
        result="FID 2.43 at D = 128 (EDM, D = infinity: 2.53), 79 NFE (40 Heun steps)",
        objective="pfgmpp",
        resolution=64,
        random_flip=True,
        model_config_name_or_path=os.path.join(CONFIG_DIR, "unet_ddpmpp_64.json"),
        aug_dim=128,
        train_batch_size=32,  # x 8 processes = 256
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
    "pfgm-cifar10": Preset(
        source="PFGM (Newbeeer/Poisson_flow) configs/poisson/cifar10_ddpmpp.py and configs/default_cifar10_configs.py"
        ": batch 128, large batch 4096, 1.3 M steps, Adam 2e-4 with 5000 warm-up steps, clip 1, EMA 0.9999, "
        "gamma 5, tau 0.03, z_exp 5; z_max 40 / upper_norm 3000 and M = 291 as in math.md §3 (one revision of the "
        "config has 50 / 4000)",
        result="FID 2.48, IS 9.65, about 104 NFE (RK45, rtol = atol = 1e-4)",
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
    "pfgm-celeba64": Preset(
        source="PFGM (Newbeeer/Poisson_flow) configs/poisson/celeba64_ddpmpp.py and configs/default_celeba_configs.py"
        ": batch 128, large batch 512, z_max 60, upper_norm 6000, z_exp 1; M = 356 is not in the config files (the "
        "official code derives it from the data dimension) and was not checked",
        result="FID 3.68, about 110 NFE (RK45)",
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
