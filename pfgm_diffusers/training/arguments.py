"""The trainer's command line: flags, their defaults (from presets.py), the checks that need no data, and the
scheduler and model configs the flags describe.

Defaults come in three layers, each overriding the one before: the no-argument run (`presets.NO_PRESET`), the
objective's (`presets.OBJECTIVE_DEFAULTS`), a `--preset`; a flag on the command line wins over all. `--help` shows
every default. The scheduler's own settings (D, the sigma range) are validated by `PFGMScheduler`, which the trainer
builds right after parsing.
"""

import argparse
import json
import math
import os
import sys

from diffusers import UNet2DModel

from pfgm_diffusers import PFGMScheduler
from pfgm_diffusers.data import DIGITS_SPLITS
from pfgm_diffusers.latent_cache import LATENT_SAMPLING
from pfgm_diffusers.paired import PAIRED_TASKS, Degradation, condition_sources
from pfgm_diffusers.training import checkpoints, metrics
from pfgm_diffusers.training.objectives import PFGMPPObjective, PoissonFieldObjective, StableTargetObjective
from pfgm_diffusers.training.presets import (
    CONFIG_DIR,
    FROM_THE_DATA,
    NO_PRESET,
    OBJECTIVE_DEFAULTS,
    PRESETS,
    UNET_BY_RESOLUTION,
)

# --target stf's reference batch per process: the official code's --rbatch default (Newbeeer/pfgmpp, train.py).
STF_REFERENCE_BATCH_SIZE = 4096
# Arguments whose names contain these words are secrets: never written to disk, logged or sent to a tracker.
SECRET_WORDS = ("token", "key", "password", "secret")


def parse_aug_dim(value):
    """`--aug_dim`: an integer D, or `inf` for the diffusion limit, which is None from here on (the scheduler's
    spelling); the scheduler validates it."""
    if value.lower() in ("inf", "infinity"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--aug_dim must be an integer >= 1 or 'inf', got {value!r}") from None


def optional_float(*words):
    """A float, `none` (None: the safeguard is off) or one of `words` kept as a string."""

    def parse(value):
        if value.lower() == "none":
            return None
        if value.lower() in words:
            return value.lower()
        try:
            return float(value)
        except ValueError:
            allowed = ", ".join(repr(word) for word in ("none", *words))
            raise argparse.ArgumentTypeError(f"expected a number or {allowed}, got {value!r}") from None

    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # flags without a default say in their help what happens
        return action.help if action.default is None else super()._get_help_string(action)


DESCRIPTION = """Train PFGM++ (--objective pfgmpp) or the original PFGM (--objective poisson_field) with accelerate.

    accelerate launch training/train_pfgm.py                  # no arguments: the embedded digits, on CPU
    accelerate launch --multi_gpu --num_processes 8 training/train_pfgm.py --preset cifar10 --output_dir out

Defaults: the no-argument run, then the objective's, then --preset's (pfgm_diffusers.training.presets); flags win. See
docs/training.md."""


def add_data_arguments(parser):
    """The data flags: images, latents (a VAE) and paired images."""
    add = parser.add_argument_group("data (default: the embedded 8x8 digits)").add_argument
    add("--dataset_name", help="A `datasets` Hub id, data folder or save_to_disk folder. Default: none.")
    add("--dataset_config_name", help="The dataset's configuration, if it has several. Default: none.")
    add(
        "--train_data_dir",
        help="An image folder (class sub-folders are labels) or a save_to_disk folder. Default: none.",
    )
    add("--digits_split", choices=DIGITS_SPLITS, default="all", help="The embedded digits: all 1797, or the 1438 "
        "of the training split, so that the 359 held-out digits scripts/evaluate.py scores stay unseen.")  # fmt: skip
    add("--image_column", help="Default: the dataset's first image column.")
    add("--label_column", default="label", help="The dataset's labels, read only with --class_conditional.")
    add("--cache_dir", help="The `datasets` cache. Default: datasets' own.")
    add("--resolution", type=int, help="Images are resized (shorter side) and cropped to this square size. With "
        "--train_data_dir/--dataset_name: the data's image size (up to 64).")  # fmt: skip
    add("--center_crop", action="store_true", help="Center instead of random crop.")
    add("--random_flip", action="store_true", help="Random horizontal flips.")
    add("--class_conditional", action="store_true", help="Condition the UNet on the labels.")
    add("--class_dropout_prob", type=float, default=0.0, help="With --class_conditional: each label is replaced by a "
        "null class (one more class embedding) with this probability, so that the pipeline can guide "
        "(guidance_scale). 0.1 is usual.")  # fmt: skip
    add("--dataloader_num_workers", type=int, default=0, help="Data loading processes.")

    add = parser.add_argument_group("latent PFGM++: train in a VAE's latent space (docs/training.md)").add_argument
    add(
        "--pretrained_vae_model_name_or_path",
        help="An AutoencoderKL (folder or Hub id, e.g. stabilityai/sd-vae-ft-mse): images are encoded once into "
        "--latent_cache_dir and the UNet learns their latents. Default: none (pixels).",
    )
    add("--vae_subfolder", help="The VAE's folder inside a pipeline repository (e.g. 'vae'). Default: none.")
    add("--latent_cache_dir", help="The encoded latents, reused by runs with the same VAE, data and transform. "
        "Default: <output_dir>/latent_cache.")  # fmt: skip
    add("--latent_sampling", choices=LATENT_SAMPLING, default="mean", help="Train on the VAE posterior's mean, or a "
        "new draw from it every epoch ('sample').")  # fmt: skip
    add("--encode_batch_size", type=int, default=32, help="Images per VAE call while encoding.")

    add = parser.add_argument_group("image-to-image: paired data (default: none, unpaired)").add_argument
    add("--conditioning_image_column", help="--dataset_name's column of condition images. Default: none.")
    add("--conditioning_data_dir", help="Condition images, paired by file name with --train_data_dir. Default: none.")
    add("--paired_task", choices=PAIRED_TASKS, help="A built-in condition made from each image. Default: none.")
    add("--paired_sigma_y", type=float, help="--paired_task's measurement noise (model units, [-1, 1] images). "
        "Default: 0 (superres); denoise needs one.")  # fmt: skip
    add("--paired_factor", type=int, help="--paired_task superres: the down-sampling factor. Default: 2.")
    add("--conditioning_dropout_prob", type=float, help="Conditions replaced by zeros, for guidance. Default: 0.")


def build_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="Official settings (presets.py); flags override. Default: none.")
    add("--objective", choices=("pfgmpp", "poisson_field"), help="PFGM++, or the original PFGM (the field).")

    add_data_arguments(parser)

    add = parser.add_argument_group("model").add_argument
    add("--model_config_name_or_path", help="A UNet2DModel config: JSON file, or folder/Hub id with config.json. "
        "With --train_data_dir/--dataset_name: configs/unet_by_resolution.json's for --resolution.")  # fmt: skip
    add("--gradient_checkpointing", action="store_true", help="Less memory, more compute.")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="With xformers and CUDA only.")

    add = parser.add_argument_group("PFGM++ objective, and the sampler's noise range").add_argument
    add("--aug_dim", type=parse_aug_dim, help="D (integer) or 'inf' (EDM). --objective poisson_field: 1.")
    add("--P_mean", type=float, default=-1.2, help="Training noise levels: ln sigma ~ N(P_mean, P_std^2) (EDM).")
    add("--P_std", type=float, default=1.2, help="See --P_mean.")
    add("--target", choices=("clean", "stf"), default="clean", help="The regression target: the clean image, "
        "or 'stf' (Stable Target Field): the posterior mean over a reference batch (Xu et al. 2023).")  # fmt: skip
    add("--reference_batch_size", type=int, help="--target stf: images per process, the first --train_batch_size "
        f"trained on; all processes' form the reference. Default: {STF_REFERENCE_BATCH_SIZE} (official)")  # fmt: skip
    add("--sigma_data", type=float, default=0.5, help="EDM's preconditioning.")
    add("--sigma_min", type=float, help="Sampler range; z_min with --objective poisson_field (1e-3).")
    add("--sigma_max", type=float, help="Sampler range; z_max with --objective poisson_field (40).")

    add = parser.add_argument_group("PFGM objective (--objective poisson_field)").add_argument
    add("--sigma", type=float, default=0.01, help="Algorithm 2's base noise.")
    add("--tau", type=float, default=0.03, help="Algorithm 2's growth rate.")
    add("--M", type=int, default=291, help="Algorithm 2's largest exponent.")
    add("--gamma", type=float, default=5.0, help="Algorithm 1's normaliser offset.")
    add("--large_batch_size", type=int, help="Charges per process. Default: 4 x --train_batch_size.")
    add("--upper_norm", type=optional_float("auto"), help="The sampler's prior radius clip; 'none': off. Default: "
        "'auto' = sqrt(N + 1) sigma (1 + tau)^M, the largest radius trained on.")  # fmt: skip
    add("--z_exp", type=optional_float(), help="Below this z the sampler rebuilds v_z; 'none': off. Default: 1.")

    add = parser.add_argument_group("optimisation").add_argument
    add("--train_batch_size", type=int, help="Per process.")
    add("--num_epochs", type=int, help="Used when --max_train_steps is not given. Default: none.")
    add("--max_train_steps", type=int, help="Default: 6000 (or the preset's), unless --num_epochs is given.")
    add("--max_train_seconds", type=float, help="A wall-clock budget for the training loop (from its first step): "
        "the step that spends it is the last, saved as such. Default: none (--max_train_steps only).")  # fmt: skip
    add("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    add("--learning_rate", type=float, help="AdamW's.")
    lr_schedulers = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
    add("--lr_scheduler", choices=lr_schedulers, help="diffusers' get_scheduler.")
    add("--lr_warmup_steps", type=int, help="Optimizer steps.")
    add("--adam_beta1", type=float, default=0.9, help="AdamW's.")
    add("--adam_beta2", type=float, default=0.999, help="AdamW's.")
    add("--adam_weight_decay", type=float, help="AdamW's.")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW's.")
    add("--max_grad_norm", type=optional_float(), help="Gradient clipping norm; 'none': no clipping.")
    add("--mixed_precision", choices=("no", "fp16", "bf16"), help="Default: the launcher's.")
    add("--seed", type=int, default=0, help="Model init, noise, data order and sample grids.")
    add("--cpu_threads_per_process", type=int, help="CPU only. Default: torch's (accelerate launch gives 1).")

    add = parser.add_argument_group("EMA").add_argument
    add("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Samples and pipeline use it.")
    add("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up.")
    add("--ema_power", type=float, default=3 / 4, help="EMA warm-up.")
    add("--ema_max_decay", type=float, help="EMA decay after the warm-up.")

    add = parser.add_argument_group("outputs: checkpoints, samples, pipeline, logs").add_argument
    add("--output_dir", help="The run's folder. With a dataset: pfgm-<its folder or Hub name>.")
    add("--overwrite_output_dir", action="store_true", help="Replace another run's outputs in --output_dir.")
    add("--checkpointing_steps", type=int, help="A checkpoint every N steps and at the end.")
    add("--checkpoints_total_limit", type=int, default=2, help="Older checkpoints are deleted.")
    add("--resume_from_checkpoint", help="'latest', a checkpoint folder, or its name in --output_dir. Default: none.")
    add("--save_images_steps", type=int, help="A sample grid every N steps and at the end; 0: no grids at all.")
    add("--save_pipeline_steps", type=int, help="Save the EMA pipeline every N steps. Default: at the end only.")
    add("--eval_batch_size", type=int, help="Images in each sample grid, and per batch of --eval_steps.")
    add("--eval_steps", type=int, help="Measure the EMA model every N steps and at the end: the digits metric for "
        "the embedded digits, FID/KID against the training data otherwise (the [eval] extra); eval/... to the "
        "trackers, one JSON line each to metrics.jsonl, the last in the model card. Default: never.")  # fmt: skip
    add("--eval_num_images", type=int, default=256, help="Images per evaluation, split across processes.")
    add("--num_inference_steps", type=int, help="Sampler steps of the sample grids.")
    add("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    add("--logging_steps", type=int, default=10, help="Log the mean loss every N steps (no per-step host sync).")
    add("--report_to", choices=("none", "tensorboard", "wandb"), default="none", help="A tracker (installed).")

    add = parser.add_argument_group("Hub").add_argument
    add("--push_to_hub", action="store_true", help="Upload the pipeline, its card, samples.png and arguments.")
    add("--hub_model_id", help="Default: the name of --output_dir.")
    add(
        "--hub_token",
        help="Prefer `hf auth login` or HF_TOKEN (others see flags in `ps`). Never saved. Default: none.",
    )
    add("--hub_private_repo", action="store_true", help="Create the repository private.")
    parser.set_defaults(**{key: value for key, value in NO_PRESET.items() if key != "max_train_steps"})
    parser.set_defaults(**OBJECTIVE_DEFAULTS[NO_PRESET["objective"]])
    return parser


def parse_args(argv=None):
    """The arguments, with the preset's and the objective's defaults; bad input fails here, before any loading."""
    parser = build_parser()
    given = parser.parse_args(argv)
    preset = dict(PRESETS[given.preset]) if given.preset is not None else {}
    if given.dataset_name is not None or given.train_data_dir is not None:
        preset.pop("dataset_name", None)  # the user's data replaces the preset's
    parser.set_defaults(**preset)
    objective = parser.parse_args(argv).objective  # the command line's, else the preset's
    parser.set_defaults(**{**OBJECTIVE_DEFAULTS[objective], **preset})
    if given.preset is None and (given.dataset_name is not None or given.train_data_dir is not None):
        parser.set_defaults(**dict.fromkeys(FROM_THE_DATA))  # not the digits': fill_from_the_data sets them
    if given.dataset_name is not None or given.train_data_dir is not None or "dataset_name" in preset:
        parser.set_defaults(output_dir=None)
    args = parser.parse_args(argv)
    if args.output_dir is None:  # named after the data, so that another dataset's run is not in the way
        data = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
        args.output_dir = "pfgm-" + (os.path.basename(os.path.normpath(data)) or "data")
    if args.max_train_steps is None and args.num_epochs is None:
        args.max_train_steps = preset.get("max_train_steps", NO_PRESET["max_train_steps"])
    if args.objective == "poisson_field" and args.large_batch_size is None:
        args.large_batch_size = 4 * args.train_batch_size
    # Latent data: the noise settings no flag or preset gave are measured from the cached latents (the trainer)
    flags = _given_flags(parser, sys.argv[1:] if argv is None else argv)
    args.latent_defaults = [name for name in LATENT_DEFAULTS if name not in flags | set(preset)]
    if args.pretrained_vae_model_name_or_path is not None and args.latent_cache_dir is None:
        args.latent_cache_dir = os.path.join(args.output_dir, "latent_cache")
    if args.target == "stf" and args.reference_batch_size is None:
        args.reference_batch_size = STF_REFERENCE_BATCH_SIZE
    check_args(args)
    if (
        args.pretrained_vae_model_name_or_path is not None
        and args.preset is not None
        and (
            PRESETS[args.preset].get("pretrained_vae_model_name_or_path") is None
            and "model_config_name_or_path" not in flags
        )
    ):
        latent_presets = sorted(name for name, p in PRESETS.items() if p.get("pretrained_vae_model_name_or_path"))
        raise ValueError(
            f"--preset {args.preset} sizes its UNet for pixels ({args.model_config_name_or_path}), not for a VAE's "
            f"latents: use a latent preset ({', '.join(latent_presets)}) or give --model_config_name_or_path"
        )
    build_scheduler(args)  # the scheduler checks its own settings (D, the sigma range...) before anything loads
    return args


# The settings a latent run measures from its cached latents unless given (latent_cache.training_defaults)
LATENT_DEFAULTS = ("sigma_data", "aug_dim", "sigma_max")


def _given_flags(parser, argv):
    """The destinations of the flags on the command line (`--flag value` and `--flag=value`)."""
    words = {word.split("=", 1)[0] for word in argv if word.startswith("--")}
    return {action.dest for action in parser._actions if words & set(action.option_strings)}


def check_args(args):
    """Every check that needs no data and no accelerator (the scheduler's settings are checked by the scheduler)."""
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("give at most one of --dataset_name and --train_data_dir")
    check_paired_args(args)
    if args.digits_split != "all" and (args.dataset_name is not None or args.train_data_dir is not None):
        raise ValueError(f"--digits_split {args.digits_split} selects the embedded digits: drop it with your own data")
    if args.preset is not None and args.dataset_name is None and args.train_data_dir is None:
        raise ValueError(f"--preset {args.preset} needs a dataset: give --dataset_name or --train_data_dir")
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"]
    positive += ["eval_batch_size", "num_inference_steps", "logging_steps"]
    optional = ["max_train_steps", "num_epochs", "checkpoints_total_limit", "save_pipeline_steps", "resolution"]
    optional += ["eval_steps"]
    for name in positive + [name for name in optional if getattr(args, name) is not None]:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.pretrained_vae_model_name_or_path is None:
        latent_only = [name for name in ("vae_subfolder", "latent_cache_dir") if getattr(args, name) is not None]
        if latent_only:
            raise ValueError(
                f"--{latent_only[0]} is an option of latent training: give --pretrained_vae_model_name_or_path"
            )
    if args.encode_batch_size < 1:
        raise ValueError(f"--encode_batch_size must be >= 1, got {args.encode_batch_size}")
    if args.save_images_steps < 0:
        raise ValueError(f"--save_images_steps must be >= 0 (0: no sample grids), got {args.save_images_steps}")
    if args.eval_num_images < 2:
        raise ValueError(f"--eval_num_images must be >= 2 (a covariance needs two images), got {args.eval_num_images}")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    field_only = [name for name in ("large_batch_size", "z_exp", "upper_norm") if getattr(args, name) is not None]
    if args.objective == "pfgmpp" and field_only:
        raise ValueError(f"--{field_only[0]} is an option of --objective poisson_field, not of PFGM++")
    if args.objective == "poisson_field" and args.large_batch_size < args.train_batch_size:
        raise ValueError(
            f"--large_batch_size ({args.large_batch_size}) must be >= --train_batch_size "
            f"({args.train_batch_size}): the small batch is the first rows of the large one"
        )
    check_target(args)
    if not 0 <= args.class_dropout_prob < 1:  # NaN fails too
        raise ValueError(f"--class_dropout_prob must lie in [0, 1), got {args.class_dropout_prob}")
    if args.class_dropout_prob > 0 and not args.class_conditional:
        raise ValueError("--class_dropout_prob drops class labels: it needs --class_conditional")
    if args.P_std <= 0:  # --sigma_data is the scheduler's to check
        raise ValueError(f"--P_std must be > 0, got {args.P_std}")
    ranges = {  # name: the allowed interval as (lowest, highest, "[" or "(", "]" or ")"); NaN fails every comparison
        "learning_rate": (0, math.inf, "(", ")"),
        "lr_warmup_steps": (0, math.inf, "[", ")"),
        "adam_beta1": (0, 1, "[", ")"),
        "adam_beta2": (0, 1, "[", ")"),
        "adam_epsilon": (0, math.inf, "(", ")"),
        "adam_weight_decay": (0, math.inf, "[", ")"),
        "ema_max_decay": (0, 1, "[", "]"),
        "ema_inv_gamma": (0, math.inf, "(", ")"),
        "ema_power": (0, math.inf, "(", ")"),
        "sigma": (0, math.inf, "(", ")"),
        "tau": (0, math.inf, "(", ")"),
        "M": (0, math.inf, "(", ")"),
    }
    if args.max_grad_norm is not None:
        ranges["max_grad_norm"] = (0, math.inf, "(", ")")
    if args.max_train_seconds is not None:
        ranges["max_train_seconds"] = (0, math.inf, "[", ")")
    for name, (lowest, highest, left, right) in ranges.items():
        value = getattr(args, name)
        above = value >= lowest if left == "[" else value > lowest
        below = value <= highest if right == "]" else value < highest
        if not (above and below):
            allowed = f"{left}{lowest}, {highest}{right}"
            raise ValueError(f"--{name} must lie in {allowed}, got {value}")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("--hub_token with --report_to wandb: wandb records the command line; use `hf auth login`")
    if args.report_to != "none":
        try:
            __import__(args.report_to)
        except ImportError:
            raise ValueError(f"--report_to {args.report_to} needs `pip install {args.report_to}`") from None
    if args.resume_from_checkpoint not in (None, "latest"):
        checkpoints.checkpoint_path(args.resume_from_checkpoint, args.output_dir)
    metrics.check_metric_available(args)  # FID/KID for your own data need torch-fidelity: refused now, not later


def check_paired_args(args):
    """The image-to-image flags: one source of conditions, each with the data it pairs with."""
    sources = condition_sources(args)
    if len(sources) > 1:
        raise ValueError(f"give at most one source of conditions, got --{sources[0]} and --{sources[1]}")
    if sources and args.pretrained_vae_model_name_or_path is not None:
        raise ValueError(f"--{sources[0]} (image-to-image) with --pretrained_vae_model_name_or_path is not supported")
    if args.conditioning_image_column is not None and args.dataset_name is None:
        raise ValueError("--conditioning_image_column names a column of --dataset_name: give --dataset_name")
    if args.conditioning_data_dir is not None and args.train_data_dir is None:
        raise ValueError("--conditioning_data_dir pairs with --train_data_dir: give --train_data_dir")
    if args.conditioning_data_dir is not None and os.path.realpath(args.conditioning_data_dir) == os.path.realpath(
        args.train_data_dir
    ):
        raise ValueError(
            f"--conditioning_data_dir {args.conditioning_data_dir!r} is --train_data_dir: each image would be its own "
            "condition, and the model would learn to copy it"
        )
    task_only = [name for name in ("paired_sigma_y", "paired_factor") if getattr(args, name) is not None]
    if task_only and args.paired_task is None:
        raise ValueError(f"--{task_only[0]} is an option of --paired_task")
    if args.conditioning_dropout_prob is not None:
        if not sources:
            raise ValueError("--conditioning_dropout_prob needs paired data (a source of conditions)")
        if not 0 <= args.conditioning_dropout_prob <= 1:
            raise ValueError(f"--conditioning_dropout_prob must lie in [0, 1], got {args.conditioning_dropout_prob}")
    if args.paired_task is not None:  # the Degradation checks its own settings, naming them
        degradation(args)


def degradation(args):
    """The built-in task of --paired_task, or None."""
    if args.paired_task is None:
        return None
    sigma_y = 0.0 if args.paired_sigma_y is None else args.paired_sigma_y
    factor = 2 if args.paired_factor is None else args.paired_factor
    try:
        return Degradation(args.paired_task, sigma_y=sigma_y, factor=factor)
    except ValueError as error:
        raise ValueError(f"--paired_task {args.paired_task}: {error} (--paired_sigma_y, --paired_factor)") from None


def public_arguments(args):
    """The arguments without secrets (any name with token, key, password or secret), for files and trackers, with
    absolute local paths shortened to their last component ("/home/me/data/cats" -> "cats"): `training_args.json` is
    uploaded with the model and must not show the machine's folders."""
    return {
        name: os.path.basename(os.path.normpath(value)) if isinstance(value, str) and os.path.isabs(value) else value
        for name, value in vars(args).items()
        if not any(word in name for word in SECRET_WORDS)
    }


def check_target(args):
    """--target stf: PFGM++ only, a reference batch at least the training batch, no class labels."""
    if args.target != "stf":
        if args.reference_batch_size is not None:
            raise ValueError("--reference_batch_size is an option of --target stf")
        return
    if args.objective == "poisson_field":
        raise ValueError(
            "--target stf is a target of --objective pfgmpp; the field objective has its own large-batch target "
            "(--large_batch_size)"
        )
    if args.reference_batch_size < args.train_batch_size:
        raise ValueError(
            f"--reference_batch_size ({args.reference_batch_size}) must be >= --train_batch_size "
            f"({args.train_batch_size}): the training batch is the first rows of the reference batch"
        )
    if args.class_conditional:  # the objective gets the training batch's labels, not the reference batch's
        raise ValueError(
            "--target stf with --class_conditional is not supported: its posterior must run over the images of each "
            "sample's class (stable_target's class_labels), and the trainer does not pass the reference's labels"
        )
    conditions = condition_sources(args)
    if conditions:  # the posterior would have to be conditioned on the condition image too
        raise ValueError(
            f"--target stf with --{conditions[0]} is not supported: STF's posterior ignores the condition"
        )


def build_objective(args, loss=None):
    """The objective `--objective` names, with its settings; `loss` replaces its library loss (same signature)."""
    if args.objective == "poisson_field":
        return PoissonFieldObjective(
            args.train_batch_size, args.large_batch_size, args.sigma, args.tau, args.M, args.gamma, loss=loss
        )
    if args.target == "stf":
        return StableTargetObjective(
            args.train_batch_size, args.reference_batch_size, args.P_mean, args.P_std, loss=loss
        )
    return PFGMPPObjective(args.train_batch_size, args.P_mean, args.P_std, loss=loss)


def build_scheduler(args, num_channels=None, N=None):
    """The sampler saved with the pipeline; it validates aug_dim and the sigma range. The field
    objective is the scheduler's `poisson_field` mode, the one place the objective reaches it (math.md §3).
    `--upper_norm auto` needs N: without `num_channels` the prior is left unclipped until the data is known; `N`
    overrides num_channels * resolution^2 (latent data)."""
    upper_norm = args.upper_norm
    if upper_norm == "auto":  # the official hyperparam_calculator.py rule (presets.py)
        N = N if N is not None or num_channels is None else num_channels * args.resolution**2
        upper_norm = None if N is None else math.sqrt(N + 1) * args.sigma * (1 + args.tau) ** args.M
        if upper_norm is not None and upper_norm < 1:
            raise ValueError(
                f"--upper_norm auto = sqrt(N + 1) sigma (1 + tau)^M = {upper_norm:.3g} (N = {N}, M = {args.M}) is "
                "below the prior clip's lower end 1: raise --M, or give --upper_norm (a number or 'none')"
            )
    field = dict(prediction_type="poisson_field", sigma_schedule="exponential", gamma=args.gamma)
    return PFGMScheduler(
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        sigma_data=args.sigma_data,
        aug_dim=args.aug_dim,
        z_exp=args.z_exp,
        upper_norm=upper_norm,
        **(field if args.objective == "poisson_field" else {}),
    )


def fill_from_the_data(args, width, height, vae_factor=None):
    """--resolution and --model_config_name_or_path where `parse_args` left them to the data (None): the image size
    (`width` x `height`, the first image's) capped at the largest UNet of configs/unet_by_resolution.json and rounded
    down to a multiple of its UNet's downsampling factor, and that table's UNet for the resolution. A latent run
    (`vae_factor`: the VAE's downsampling factor f) does the same with the latent size, image size / f: the UNet is
    the table's for the latents and --resolution is f times the latent size. Returns the log line that says so."""
    with open(UNET_BY_RESOLUTION) as f:
        rows = json.load(f)["unets"]
    filled, scale = [], vae_factor or 1
    if args.resolution is not None:
        size = args.resolution // scale  # what the UNet sees: pixels, or latents
    else:
        size = min(width // scale, height // scale, rows[-1]["max_resolution"])
    if args.model_config_name_or_path is None:
        row = next((row for row in rows if row["max_resolution"] >= size), None)
        if row is None:
            raise ValueError(
                f"--resolution {args.resolution}: {UNET_BY_RESOLUTION} has UNets up to {rows[-1]['max_resolution']} "
                f"px{' of latents' if vae_factor else ''} only; give --model_config_name_or_path (e.g. "
                f"{os.path.join(CONFIG_DIR, 'unet_ddpmpp_64.json')}, for a GPU)"
            )
        args.model_config_name_or_path = os.path.join(CONFIG_DIR, row["config"])
        latents = " of latents" if vae_factor else ""
        path, most = args.model_config_name_or_path, row["max_resolution"]
        filled.append(f"--model_config_name_or_path {path} (<= {most} px{latents})")
    if args.resolution is None:
        factor = downsampling_factor(read_unet_config(args.model_config_name_or_path))
        args.resolution = max(factor, size // factor * factor) * scale
        filled.insert(0, f"--resolution {args.resolution}")
    vae = f"; latents 1/{scale} of it, the VAE's downsampling factor" if vae_factor else ""
    data = f"From the data (its first image is {width}x{height}{vae}): "
    return data + ", ".join(filled) + f"; --output_dir {args.output_dir}"


def read_unet_config(model_config_name_or_path):
    """A UNet2DModel config: a JSON file (keys starting with "_" are comments), or a folder/Hub id with config.json."""
    if os.path.isfile(model_config_name_or_path):
        with open(model_config_name_or_path) as f:
            return {key: value for key, value in json.load(f).items() if not key.startswith("_")}
    return dict(UNet2DModel.load_config(model_config_name_or_path))


def downsampling_factor(config):
    """How much a UNet2DModel config shrinks the image: 2 per resolution below the first."""
    return 2 ** (len(config.get("block_out_channels", UNet2DModel().config.block_out_channels)) - 1)


def load_unet_config(args, num_channels, out_channels, num_classes, resolution=None):
    """The UNet2DModel config of --model_config_name_or_path (a JSON file, or a folder/Hub id with config.json), with
    the keys the data and the objective decide filled in; `resolution` is the UNet's sample size (default
    --resolution; a latent model's is the latent size)."""
    model_config_name_or_path = args.model_config_name_or_path
    resolution = args.resolution if resolution is None else resolution
    config = read_unet_config(model_config_name_or_path)
    derived = dict(sample_size=resolution, in_channels=num_channels, out_channels=out_channels)
    derived["num_class_embeds"] = num_classes
    classes = "an unconditional run" if num_classes is None else f"the data's {num_classes} classes"
    sources = dict(sample_size="--resolution", in_channels="the data's channels", num_class_embeds=classes)
    for key, value in derived.items():
        if key in config and config[key] != value:
            raise ValueError(
                f"{model_config_name_or_path}: {key}={config[key]} conflicts with {key}={value} from "
                f"{sources.get(key, 'the objective')}; remove it from the config, the trainer derives it"
            )
    config.update(derived)
    downsampling = downsampling_factor(config)
    if resolution % downsampling != 0:
        raise ValueError(
            f"--resolution {resolution} is not divisible by {downsampling}, the UNet's downsampling factor "
            f"({model_config_name_or_path})"
        )
    return config
