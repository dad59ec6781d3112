#!/usr/bin/env python
"""Train PFGM++ (Xu et al., ICML 2023) or the original PFGM (Xu et al., NeurIPS 2022) with accelerate.

    accelerate launch training/train_pfgm.py            # no arguments: the embedded 8x8 digits, CPU
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 training/train_pfgm.py \\
        --preset cifar10 --aug_dim 2048 --push_to_hub --hub_model_id me/pfgmpp-cifar10
    accelerate launch training/train_pfgm.py --objective poisson_field --train_data_dir ./my_images \\
        --large_batch_size 4096 --train_batch_size 128

The script reads top to bottom: arguments, accelerator, data, model/scheduler/optimizer/EMA, prepare, loop, save.
The reusable pieces live in `pfgm_diffusers.training`: the flags (`arguments`), settings as data (`presets`), the
objectives (`objectives`), the output folder and checkpoints (`checkpoints`); the math in `pfgm_diffusers` (the losses
in `pfgm_diffusers.losses`). See docs/training.md.
"""

import atexit
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
import time
import warnings

import datasets
import diffusers
import huggingface_hub
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.import_utils import is_xformers_available
from tqdm.auto import tqdm

from pfgm_diffusers import PFGMPipeline, PFGMScheduler
from pfgm_diffusers.conditioning import with_condition
from pfgm_diffusers.data import (
    EpochSampler,
    ImageTransform,
    TrainingDataset,
    collate,
    load_digits_dataset,
    load_hub_dataset,
    load_image_folder,
)
from pfgm_diffusers.files import atomic_write, atomic_write_json, inside, makedirs
from pfgm_diffusers.guidance import drop_conditions
from pfgm_diffusers.hub import model_card_text, upload_pipeline
from pfgm_diffusers.latent_cache import LatentDataset, build_latent_cache, cache_fingerprint, training_defaults
from pfgm_diffusers.paired import (
    PairedImages,
    PairedTrainingDataset,
    condition_sources,
    load_paired_dataset,
    load_paired_folders,
    paired_collate,
)
from pfgm_diffusers.pipeline_pfgm import image_grid
from pfgm_diffusers.training import checkpoints, metrics
from pfgm_diffusers.training.arguments import (
    build_objective,
    build_scheduler,
    degradation,
    fill_from_the_data,
    load_unet_config,
    parse_args,
    public_arguments,
)
from pfgm_diffusers.vae import latent_shape, load_vae, load_vae_config, vae_dtype, vae_scale_factor

logger = get_logger(__name__, log_level="INFO")


def create_accelerator(args):
    """The Accelerator, with the checks that need it: the process group, fp16 on CPU, threads, log verbosity."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        # With no accelerator at all, accelerate forms a (gloo) process group only when told cpu=True: this makes
        # `accelerate launch --multi_gpu --num_processes N` train on a CPU-only machine instead of running N copies
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir)),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise ValueError(
            f"launched as {os.environ['WORLD_SIZE']} processes but accelerate formed a group of "
            f"{accelerator.num_processes}: they would train independent copies"
        )
    env = os.environ
    # `accelerate launch --num_processes N` without --multi_gpu starts ONE process on a machine without GPUs: its
    # simple launcher sets MASTER_ADDR only for N > 1, where a real process group (torchrun) also sets WORLD_SIZE
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        logger.warning(
            f"accelerate launch was asked for several processes but started {accelerator.num_processes}: without a "
            "GPU add --multi_gpu (accelerate launch --multi_gpu --num_processes N) to train on N CPU processes"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 is not supported on CPU; use bf16 or no")
    if accelerator.device.type == "cpu" and args.cpu_threads_per_process is not None:
        # Not the default: more threads than free cores makes torch's spinning thread pools crawl (measured 50x)
        torch.set_num_threads(args.cpu_threads_per_process)
    for library in (datasets, diffusers):
        library.utils.logging.set_verbosity(logging.WARNING if accelerator.is_local_main_process else logging.ERROR)
    return accelerator


def load_images(args):
    """The training images, and for an image-to-image run their conditions (`PairedImages`, else None); labels only
    for --class_conditional (unconditional training never reads them)."""
    images, paired = None, None
    if args.conditioning_data_dir is not None:  # paired by file name: the pairs decide the images and their order
        if args.class_conditional:
            raise ValueError(
                "--class_conditional with --conditioning_data_dir: paired folders carry no labels; use a dataset "
                "with a label column and --conditioning_image_column"
            )
        paired = load_paired_folders(args.train_data_dir, args.conditioning_data_dir)
        images = paired.target
    elif args.train_data_dir is not None:
        images = load_image_folder(args.train_data_dir, args.cache_dir, with_labels=args.class_conditional)
    elif args.dataset_name is not None:
        label_column = args.label_column if args.class_conditional else None
        data = dict(dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir, label_column=label_column)
        if args.conditioning_image_column is not None:  # the same rows, the condition column as "image"
            paired = load_paired_dataset(
                args.dataset_name, args.conditioning_image_column, **data, image_column=args.image_column
            )
            images = paired.target
        else:
            images = load_hub_dataset(args.dataset_name, image_column=args.image_column, **data)
    else:
        images = load_digits_dataset(with_labels=args.class_conditional, split=args.digits_split)
    if args.paired_task is not None:
        paired = PairedImages(images, degradation=degradation(args))
    if args.class_conditional and images.class_names is None:
        raise ValueError("--class_conditional needs labels: class sub-folders or a label column in the dataset")
    width, height = images.dataset[0]["image"].size
    if args.resolution is None or args.model_config_name_or_path is None:  # your own data, no --preset
        vae_factor = None  # a latent run sizes its UNet for the latents: the VAE's factor from its config
        if args.pretrained_vae_model_name_or_path is not None:
            vae = args.pretrained_vae_model_name_or_path
            vae_factor = vae_scale_factor(load_vae_config(vae, args.vae_subfolder, cache_dir=args.cache_dir))
        logger.info(fill_from_the_data(args, width, height, vae_factor))
    if (width, height) != (args.resolution, args.resolution):
        logger.info(
            f"Images are resized (shorter side, bilinear) and cropped from {width}x{height} (the first image) to "
            f"{args.resolution}x{args.resolution}"
        )
    return images, paired


def encode_latents_once(args, accelerator, images):
    """A latent run's data: the VAE (on the device, float32 under fp16 unless its config allows float16), the cache of
    the images' latents (encoded once across the processes, reused by later runs with the same VAE, data and
    transform) and its `LatentDataset`. The PFGM++ noise settings no flag gave are measured from the latents."""
    vae = load_vae(args.pretrained_vae_model_name_or_path, args.vae_subfolder, cache_dir=args.cache_dir)
    shape = latent_shape(vae.config, args.resolution)  # (C, h, w); a resolution the VAE cannot take fails here
    logger.info(
        f"The UNet's channels {shape[0]} (in; out +1 for the field objective) and sample_size {shape[1]}: the VAE's "
        f"latent_channels and --resolution {args.resolution} / its downsampling factor {vae_scale_factor(vae.config)}"
    )
    dtype = vae_dtype(vae.config, accelerator.mixed_precision)
    if accelerator.mixed_precision == "fp16" and dtype == torch.float32:
        logger.info("The VAE runs in float32 under fp16: its config has force_upcast (its activations overflow fp16)")
    vae.to(accelerator.device, dtype)
    # The images are converted to the VAE's channels (grayscale data through an RGB VAE: three equal channels)
    fingerprint = cache_fingerprint(
        vae, images.dataset, args.resolution, vae.config.in_channels, args.center_crop, args.random_flip, dtype
    )
    cache = build_latent_cache(args.latent_cache_dir, vae, images.dataset, fingerprint, accelerator,
                               args.encode_batch_size)  # fmt: skip
    labels = images.dataset["label"] if images.class_names is not None else None
    dataset = LatentDataset(cache, args.latent_sampling, seed=args.seed, labels=labels)
    logger.info(
        f"Latents of {len(cache)} images in {args.latent_cache_dir}: {shape[0]}x{shape[1]}x{shape[2]} "
        f"(N = {cache.statistics['N']}), RMS {cache.statistics['rms']:.4g}, channel means "
        f"{[round(m, 3) for m in cache.statistics['channel_mean']]}"
    )
    if args.objective == "pfgmpp":
        for name, (value, source) in training_defaults(cache.statistics, args.latent_sampling).items():
            if name in args.latent_defaults:
                setattr(args, name, value)
                logger.info(f"--{name} {value}: {source}")
            else:
                logger.info(f"--{name} {getattr(args, name)} as given (the latents suggest {value}: {source})")
    return vae, dataset, shape


def create_dataloader(args, dataset, sampler, batch_size, accelerator):
    """The DataLoader and the number of optimizer steps per epoch (whole batches on every process)."""
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=paired_collate if isinstance(dataset, PairedTrainingDataset) else collate,
        drop_last=True,  # equal batches on every process, as the gathered charges need
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG (restored on resume) untouched
    )
    batches = len(dataset) // (batch_size * accelerator.num_processes)  # per process and epoch
    if batches < args.gradient_accumulation_steps:
        per_step = batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        most = len(dataset) // (accelerator.num_processes * args.gradient_accumulation_steps)
        flag = "--train_batch_size" if batch_size == args.train_batch_size else "--large_batch_size"
        flag = "--reference_batch_size" if args.target == "stf" else flag
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than one optimizer step: batches of {batch_size} x "
            f"{accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation = {per_step} "
            f"images; {f'give {flag} {most} or less, ' if most >= 1 else ''}use fewer processes or accumulation "
            "steps, or add images"
        )
    # accelerate also steps the optimizer on the last batches of an epoch when they are fewer than an accumulation
    return dataloader, math.ceil(batches / args.gradient_accumulation_steps)


def create_unet(args, unet_config):
    unet = UNet2DModel.from_config(unet_config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if is_xformers_available() and torch.cuda.is_available():
            unet.enable_xformers_memory_efficient_attention()
        else:
            logger.warning(
                "--enable_xformers_memory_efficient_attention ignored: it needs `pip install xformers` and a CUDA "
                "GPU; using PyTorch attention"
            )
    return unet


def create_ema(args, accelerator, unet):
    """diffusers' EMAModel with warm-up, saved into and loaded from every checkpoint (None without --use_ema)."""
    if not args.use_ema:
        return None
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
        # EMAModel.save_pretrained builds a UNet, whose initialisation draws from the global generator before
        # accelerate saves it: forked, so that a checkpoint neither shifts the run's noise nor records a shifted state
        with torch.random.fork_rng(devices=[]):
            if accelerator.is_main_process:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_ema(models, input_dir):
        loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DModel)
        ema_model.load_state_dict(loaded.state_dict())
        ema_model.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)
    return ema_model


def create_hub_repo(args):
    """The Hub repository, created before training so that no network or a bad token fails now, in one line."""
    repo_id = (
        args.hub_model_id if args.hub_model_id is not None else os.path.basename(os.path.normpath(args.output_dir))
    )
    try:
        return huggingface_hub.create_repo(
            repo_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token
        ).repo_id
    except Exception as error:  # offline mode, DNS, HTTP 401...: all end the run before it starts
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"--push_to_hub: the Hub is unreachable or refused to create {repo_id!r} ({type(error).__name__}: "
            f"{reason}); check the network and `hf auth login`, or train without --push_to_hub"
        ) from None


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


def main(argv=None, loss=None):
    """Train, as `accelerate launch training/train_pfgm.py [flags]` does. `loss` replaces the objective's library loss
    (called as `pfgmpp_loss` or `poisson_field_loss` is): the seam through which tests record or stop training."""
    args = parse_args(argv)  # bad input fails here, the scheduler's own settings included
    objective = build_objective(args, loss)  # the one choice of objective: its batch, loss and recorded settings

    # Accelerator, output folder, seed
    accelerator = create_accelerator(args)
    checkpoint, checkpoint_state = checkpoints.find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    lock = claim_output_dir(args, accelerator)
    # A different noise stream per process; the data order below has its own generator shared by all processes
    set_seed(args.seed, device_specific=True)

    # Data
    data = prepare_data(args, accelerator, objective)
    images, paired, vae, dataset = data.images, data.paired, data.vae, data.dataset
    num_channels, sample_size, pipeline_config = data.num_channels, data.sample_size, data.pipeline_config
    train_dataloader, steps_per_epoch = data.dataloader, data.steps_per_epoch

    # Model, scheduler, optimizer, EMA
    # The one scheduler: grids, checkpoints, the pipeline (N: the latent's size for a latent run)
    scheduler = build_scheduler(args, num_channels, N=num_channels * sample_size**2)
    if args.upper_norm == "auto":
        logger.info(f"--upper_norm auto: {scheduler.config.upper_norm:.1f} = sqrt(N + 1) sigma (1 + tau)^M")
    out_channels = scheduler.num_output_channels(num_channels)  # C + 1 for the field objective
    in_channels = num_channels + (0 if paired is None else paired.conditioning_channels)
    unet_config = load_unet_config(args, in_channels, out_channels, num_class_embeds(args, images), sample_size)
    pipeline_config["null_class_label"] = null_class_label(args, images.class_names)  # --class_dropout_prob
    run_settings = recorded_settings(args, accelerator, objective, scheduler, unet_config, images.class_names)
    if checkpoint is not None:
        check_vae_channels(vae, num_channels, checkpoint, checkpoint_state)
        checkpoints.check_compatible(checkpoint, checkpoint_state, run_settings)
    unet = create_unet(args, unet_config)
    optimizer = create_optimizer(args, unet)
    ema_model = create_ema(args, accelerator, unet)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_epochs * steps_per_epoch
    # A function of the optimizer step whatever the process count: not prepared (accelerate would step it once per
    # process), stepped once per optimizer step, and on a resume brought to the checkpoint's step
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    # After every input check, so that bad input creates no repository; before training, so that it fails fast
    repo_id = create_hub_repo(args) if accelerator.is_main_process and args.push_to_hub else None

    # Prepare, resume
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    global_step = resume(args, accelerator, checkpoint, checkpoint_state, run_settings, lr_scheduler)
    if accelerator.is_main_process:
        record_arguments(args, accelerator)

    # Loop
    logger.info(describe_run(args, accelerator, data, objective, unet))
    progress_bar = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    first_epoch = global_step // steps_per_epoch
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0  # summed on the device: no per-step sync
    began = time.monotonic(), time.process_time()  # --max_train_seconds counts from here (after the data and a resume)
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        if global_step >= args.max_train_steps:  # a finished run resumed: `resume` said so
            break
        # The same order and augmentations on every process and after a resume. The order through the prepared
        # loader: it keeps its own epoch counter and hands it to the sampler whenever it is iterated (a resumed
        # process counting from 0 would replay epoch 0's order); the dataset's augmentations directly (accelerate
        # passes the epoch to a dataset only on one process)
        train_dataloader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and global_step % steps_per_epoch != 0:
            done = global_step % steps_per_epoch * args.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(train_dataloader, done)
        unet.train()
        for batch in batches:
            network, class_labels = conditioned_network(args, unet, batch, images.class_names, paired)
            with accelerator.accumulate(unet):
                loss = objective(network, scheduler, batch["pixel_values"], class_labels, accelerator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()
                optimizer.zero_grad()
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done
            if ema_model is not None:
                ema_model.step(unet.parameters())
            global_step += 1
            progress_bar.update(1)
            if out_of_time(args, accelerator, began):
                args.max_train_steps = global_step  # this step is the last: checkpoint, grid and card say so
            last_step = global_step == args.max_train_steps
            if global_step % args.logging_steps == 0 or last_step:
                logs = {"loss": (loss_sum / loss_count).item(), "lr": lr_scheduler.get_last_lr()[0]}
                log_progress(args, accelerator, progress_bar, global_step, logs, ema_model)
                loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            save_progress(args, accelerator, global_step, unet, ema_model, scheduler, run_settings, data)
            if args.eval_steps is not None and (global_step % args.eval_steps == 0 or last_step):
                evaluate(args, accelerator, unet, ema_model, scheduler, pipeline_config, data.reference, global_step)
            unet.train()
            if last_step:
                break
    progress_bar.close()

    # Save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(args, accelerator.unwrap_model(unet), ema_model, scheduler, pipeline_config, global_step)
        condition_shape = None if paired is None else (paired.conditioning_channels, sample_size, sample_size)
        write_model_card(args, argv, repo_id, scheduler, condition_shape)
        if args.push_to_hub:
            push_to_hub(repo_id, args.output_dir, args.hub_token)
        lock.release()
    accelerator.end_training()


@dataclasses.dataclass
class TrainingData:
    """What `prepare_data` builds: the images, what the UNet sees (latents for a latent run), the loader."""

    images: object
    paired: object
    vae: object
    dataset: object
    sampler: EpochSampler
    dataloader: object
    steps_per_epoch: int
    loader_batch_size: int
    num_channels: int  # of the UNet's input and output (the VAE's latent channels for a latent run)
    sample_size: int
    reference: object  # FID's reference statistics, or None
    pipeline_config: dict  # what the saved pipeline records besides its modules
    sample_conditions: object  # the conditions of the sample grids (fixed examples), or None


def prepare_data(args, accelerator, objective):
    """Load the images (paired, or encoded once into latents), the epoch sampler and the prepared-to-be loader."""
    with accelerator.main_process_first():  # one process fills the `datasets` cache, the others read it
        images, paired = load_images(args)
    reference = metrics.reference_for(args, images, accelerator.is_main_process)  # FID's, or None
    transform = ImageTransform(args.resolution, images.num_channels, args.center_crop, args.random_flip)
    dataset = TrainingDataset(images.dataset, transform, seed=args.seed)
    pipeline_config, sample_conditions = dict(class_names=images.class_names), None
    if paired is not None:  # the UNet takes C + C_cond channels: the condition is concatenated to its input
        dataset = PairedTrainingDataset(paired, args.resolution, args.center_crop, args.random_flip, seed=args.seed)
        pipeline_config.update(
            conditioning_channels=paired.conditioning_channels,
            conditioning_dropout_prob=args.conditioning_dropout_prob,
        )
        first = list(range(min(args.eval_batch_size, len(dataset))))
        sample_conditions = paired_collate(dataset.__getitems__(first))["conditioning_pixel_values"]
    vae, num_channels, sample_size = None, images.num_channels, args.resolution  # what the UNet sees
    if args.pretrained_vae_model_name_or_path is not None:  # latent PFGM++: the VAE's latents, encoded once
        vae, dataset, (num_channels, sample_size, _) = encode_latents_once(args, accelerator, images)
        pipeline_config["vae"] = vae
    sampler = EpochSampler(len(dataset), seed=args.seed)
    batch_size = objective.loader_batch_size  # the field objective loads the large batch
    dataloader, steps_per_epoch = create_dataloader(args, dataset, sampler, batch_size, accelerator)
    return TrainingData(
        images, paired, vae, dataset, sampler, dataloader, steps_per_epoch, batch_size, num_channels, sample_size,
        reference, pipeline_config, sample_conditions,
    )  # fmt: skip


def check_vae_channels(vae, num_channels, checkpoint, checkpoint_state):
    """Refuse a resume whose UNet was trained on latents of another channel count than this VAE's."""
    saved_channels = checkpoint_state["unet_config"].get("in_channels")
    if vae is not None and saved_channels not in (None, num_channels):
        raise ValueError(
            f"the VAE's latent_channels={num_channels} disagree with the UNet of {checkpoint!r} (in_channels="
            f"{saved_channels}): resume with the VAE (and data) that run was trained with"
        )


def describe_run(args, accelerator, data, objective, unet):
    """The one line that says what this run trains on, with what, for how long."""
    latents = f"; latents {data.num_channels}x{data.sample_size}x{data.sample_size}" if data.vae is not None else ""
    gathered = data.loader_batch_size * accelerator.num_processes
    gathers = f", {gathered} {objective.gathers}" if objective.gathers else ""
    return (
        f"{args.objective}: {len(data.dataset)} images ({data.images.num_channels} channel(s), {args.resolution}px"
        f"{latents}), {accelerator.num_processes} process(es) x {args.train_batch_size} x"
        f" {args.gradient_accumulation_steps} accumulation, {args.max_train_steps} steps,"
        f" {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters{gathers}"
    )


def conditioned_network(args, unet, batch, class_names, paired):
    """The network and class labels of one batch: labels dropped (--class_dropout_prob), and for paired data the
    condition concatenated to the network input as it is (never perturbed; zeros where --conditioning_dropout_prob
    drops it, for guidance at sampling time)."""
    class_labels = batch["label"][: args.train_batch_size] if class_names is not None else None
    class_labels = drop_labels(args, class_labels, class_names)
    if paired is None:
        return unet, class_labels
    condition = batch["conditioning_pixel_values"][: args.train_batch_size]
    if args.conditioning_dropout_prob:
        nulls = {"image": torch.zeros_like(condition[:1])}
        condition = drop_conditions({"image": condition}, nulls, args.conditioning_dropout_prob)["image"]
    return with_condition(unet, condition), class_labels


def null_class_label(args, class_names):
    """The null class of --class_dropout_prob: the last class embedding, after the data's classes (or None)."""
    return len(class_names) if args.class_dropout_prob > 0 else None


def num_class_embeds(args, images):
    """The UNet's class embeddings: the data's classes, and the null class with --class_dropout_prob."""
    return images.num_classes if null_class_label(args, images.class_names) is None else images.num_classes + 1


def drop_labels(args, class_labels, class_names):
    """--class_dropout_prob: each label becomes the null class with that probability, drawn from the global
    generator (seeded per process, restored on resume); the labels as they are without it."""
    null_class = None if class_labels is None else null_class_label(args, class_names)
    if null_class is None:
        return class_labels
    null = {"labels": torch.tensor(null_class)}
    return drop_conditions({"labels": class_labels}, null, args.class_dropout_prob)["labels"]


def claim_output_dir(args, accelerator):
    """One run per folder (checkpoints.claim_output_dir), on the main process; returns its lock (None elsewhere)."""
    lock = None
    if accelerator.is_main_process:
        resuming = args.resume_from_checkpoint is not None
        lock = checkpoints.claim_output_dir(args.output_dir, args.logging_dir, resuming, args.overwrite_output_dir)
        atexit.register(lock.release)
    accelerator.wait_for_everyone()
    return lock


def create_optimizer(args, unet):
    return torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def recorded_settings(args, accelerator, objective, scheduler, unet_config, class_names):
    """What every checkpoint records: the settings a resume must match (checkpoints.COMPATIBILITY_KEYS), and the
    process count and global batch, which a resume may change (and says so)."""
    processes = accelerator.num_processes
    return dict(
        objective=args.objective,
        aug_dim=scheduler.config.aug_dim,
        resolution=args.resolution,
        class_names=class_names,
        unet_config=unet_config,
        scheduler_config=json.loads(scheduler.to_json_string()),
        loss_config=objective.settings(),
        data_config=data_settings(args),
        num_processes=processes,
        global_batch_size=args.train_batch_size * processes * args.gradient_accumulation_steps,
    )


def data_settings(args):
    """What the run trains on that the model's config cannot show: a resume with other values would go on training the
    same network on other data (the held-out digits, another task of the same channels)."""
    embedded = args.dataset_name is None and args.train_data_dir is None
    task = degradation(args)
    return dict(
        digits_split=args.digits_split if embedded else None,
        conditioning=next(iter(condition_sources(args)), None),
        conditioning_image_column=args.conditioning_image_column,
        paired_task=None if task is None else dataclasses.asdict(task),
    )


def resume(args, accelerator, checkpoint, checkpoint_state, run_settings, lr_scheduler):
    """Load `checkpoint` (model, optimizer, EMA, random states) and bring the lr schedule to its step: the step."""
    if checkpoint is None:
        if args.resume_from_checkpoint is not None:
            logger.info(f"No checkpoint in {args.output_dir} yet: starting a new run")
        return 0
    checkpoints.load_checkpoint(accelerator, checkpoint)
    global_step = checkpoint_state["global_step"]
    with warnings.catch_warnings():  # torch warns of a schedule stepped before the optimizer: here on purpose
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        for _ in range(global_step):  # the schedule is a function of the optimizer step only
            lr_scheduler.step()
    logger.info(f"Resumed from {checkpoint} at step {global_step}")
    then, now = checkpoint_state["global_batch_size"], run_settings["global_batch_size"]
    if then != now or checkpoint_state["num_processes"] != run_settings["num_processes"]:
        logger.warning(
            f"The global batch changed: {then} images per optimizer step ({checkpoint_state['num_processes']} "
            f"process(es)) in the checkpoint, {now} ({run_settings['num_processes']} process(es)) now; the lr "
            f"schedule continues at optimizer step {global_step}"
        )
    if global_step >= args.max_train_steps:
        logger.warning(f"Already at {global_step} steps: pass a larger --max_train_steps to train on")
    return global_step


def record_arguments(args, accelerator):
    """The arguments, without secrets, to `training_args.json` and the tracker."""
    arguments_file = os.path.join(args.output_dir, checkpoints.ARGS_NAME)
    atomic_write_json(arguments_file, public_arguments(args), folder=args.output_dir)
    if args.report_to != "none":
        accelerator.init_trackers("train_pfgm", {k: v for k, v in public_arguments(args).items() if v is not None})


def out_of_time(args, accelerator, began):
    """Whether `--max_train_seconds` is spent; the main process's clock decides for all (one broadcast a step)."""
    if args.max_train_seconds is None:
        return False
    seconds = time.monotonic() - began[0]
    spent = torch.tensor(float(seconds >= args.max_train_seconds), device=accelerator.device)
    if accelerator.num_processes > 1:
        spent = broadcast(spent)
    if spent.item():
        cpu = time.process_time() - began[1]
        logger.info(f"--max_train_seconds {args.max_train_seconds:g} spent after {seconds:.1f} s ({cpu:.1f} CPU s)")
        return True
    return False


def log_progress(args, accelerator, progress_bar, global_step, logs, ema_model):
    """The mean loss since the last log, the lr and the EMA decay, to the progress bar and the trackers."""
    if not math.isfinite(logs["loss"]):  # read every --logging_steps only: no per-step host sync
        raise RuntimeError(
            f"the training loss became {logs['loss']} within the {args.logging_steps} steps before step "
            f"{global_step}: lower --learning_rate or check the data; checkpoints before it are intact"
        )
    if ema_model is not None:
        logs["ema_decay"] = ema_model.cur_decay_value
    progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    accelerator.log(logs, step=global_step)


def save_progress(args, accelerator, global_step, unet, ema_model, scheduler, run_settings, data):
    """What is due at `global_step`: a checkpoint, a sample grid, a pipeline (the first two at the last step too)."""
    pipeline_config, sample_conditions = data.pipeline_config, data.sample_conditions
    last_step = global_step == args.max_train_steps
    if global_step % args.checkpointing_steps == 0 or last_step:
        checkpoints.save_checkpoint(
            accelerator, args.output_dir, global_step, run_settings, args.checkpoints_total_limit
        )
    grids = args.save_images_steps > 0  # 0: no grids, not even at the end
    if accelerator.is_main_process and grids and (global_step % args.save_images_steps == 0 or last_step):
        with ema_weights(ema_model, unet):
            unwrapped = accelerator.unwrap_model(unet)
            save_samples(args, accelerator, unwrapped, scheduler, global_step, pipeline_config, sample_conditions)
    pipeline_steps = args.save_pipeline_steps
    if accelerator.is_main_process and pipeline_steps is not None and global_step % pipeline_steps == 0:
        with ema_weights(ema_model, unet):
            save_pipeline(accelerator.unwrap_model(unet), scheduler, pipeline_config, args.output_dir)


def save_outputs(args, unet, ema_model, scheduler, pipeline_config, global_step):
    """The EMA pipeline, and the last sample grid as `samples.png`."""
    with ema_weights(ema_model, unet):
        save_pipeline(unet, scheduler, pipeline_config, args.output_dir)
    last_grid = inside(args.output_dir, "samples", f"step_{global_step:07d}.png")
    if os.path.exists(last_grid):
        with open(last_grid, "rb") as f:
            atomic_write(os.path.join(args.output_dir, "samples.png"), f.read(), folder=args.output_dir)
    logger.info(f"Saved the pipeline (EMA weights: {ema_model is not None}) to {args.output_dir}")


def save_samples(args, accelerator, unet, scheduler, global_step, pipeline_config, conditions=None):
    """A grid `samples/step_<step>.png` of `unet`'s samples (a fixed seed, a fresh scheduler; classes in turn for a
    class-conditional model; for an image-to-image model, one sample per fixed condition), and the images to
    TensorBoard or W&B."""
    config = {key: value for key, value in pipeline_config.items() if key != "class_names"}
    pipeline = PFGMPipeline(unet=unet, scheduler=PFGMScheduler.from_config(scheduler.config), **config)
    pipeline.set_progress_bar_config(disable=True)
    batch_size = args.eval_batch_size if conditions is None else len(conditions)
    num_classes = pipeline.num_classes
    labels = {} if num_classes is None else {"class_labels": torch.arange(batch_size) % num_classes}
    if conditions is not None:  # model space, as the trainer made them (a noisy measurement may pass [-1, 1])
        labels.update(conditioning_image=conditions, do_normalize=False)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    samples = pipeline(
        batch_size,
        num_inference_steps=args.num_inference_steps,
        generator=generator,
        output_type="np",
        **labels,
    ).images  # (B, H, W, C) in [0, 1]
    grid = image_grid(PFGMPipeline.numpy_to_pil(samples), padding=1)
    scale = max(1, 32 // args.resolution)  # small images drawn at >= 32 pixels, so that a person can see them
    grid = grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)
    png = io.BytesIO()
    grid.save(png, format="PNG")
    folder = makedirs(args.output_dir, "samples")  # refused if a link would take it out of the output folder
    atomic_write(os.path.join(folder, f"step_{global_step:07d}.png"), png.getvalue(), folder=args.output_dir)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": samples}, step=global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": list(samples)}, step=global_step)


def save_pipeline(unet, scheduler, pipeline_config, output_dir):
    """The pipeline with the class names of the data (and an image-to-image model's condition channels), written file
    by file atomically (checkpoints.save_pipeline)."""
    checkpoints.save_pipeline(PFGMPipeline(unet=unet, scheduler=scheduler, **pipeline_config), output_dir)


def evaluate(args, accelerator, unet, ema_model, scheduler, pipeline_config, reference, global_step):
    """One --eval_steps evaluation of the EMA model on every process; the record on the main process (None
    elsewhere), appended to metrics.jsonl and logged as eval/... ."""
    with ema_weights(ema_model, unet):  # every process samples its share
        pipeline = eval_pipeline(accelerator.unwrap_model(unet), scheduler, pipeline_config)
        record = metrics.evaluate(pipeline, args, accelerator, reference, global_step)
    if record is not None:
        metrics.append_record(args.output_dir, record)
        accelerator.log(metrics.tracker_figures(record), step=global_step)
        logger.info(f"Evaluation at step {global_step}: {json.dumps(record)}")
    return record


def eval_pipeline(unet, scheduler, pipeline_config):
    """The pipeline that --eval_steps samples: `unet` (the EMA weights) with a fresh scheduler."""
    pipeline = PFGMPipeline(unet=unet, scheduler=PFGMScheduler.from_config(scheduler.config), **pipeline_config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_model_card(args, argv, repo_id, scheduler, condition_shape=None):
    """`README.md`: loading, the training command (secrets hidden), D, the last evaluation's figures (the last line
    of metrics.jsonl) and the grid."""
    figures = metrics.last_record(args.output_dir)
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # --hub_token VALUE or --hub_token=VALUE
        if arg.startswith("--hub_token="):
            argv[i] = "--hub_token=***"
        elif i > 0 and argv[i - 1] == "--hub_token":
            argv[i] = "***"
    aug_dim = scheduler.config.aug_dim
    objective = "the original PFGM (field objective)" if args.objective == "poisson_field" else "PFGM++"
    lines = [
        "## Training",
        "",
        "```",
        " ".join(["accelerate launch training/train_pfgm.py", *argv]).strip(),
        "```",
        "",
    ]
    lines += [f"{objective}, D = {'inf (EDM)' if aug_dim is None else aug_dim}, {args.max_train_steps} steps.", ""]
    if figures is not None:
        lines += [f"Figures at step {figures['step']} ({figures['metric']}, {figures['num_images']} images, EMA):", ""]
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value:.6g} |" for key, value in figures.items() if key not in ("step", "metric")]
        lines.append("")
    if os.path.exists(inside(args.output_dir, "samples.png")):
        lines += ["![samples](samples.png)", ""]
    name = repo_id if repo_id is not None else os.path.basename(os.path.normpath(args.output_dir))
    card = model_card_text(name, "\n".join(lines), condition_shape)
    atomic_write(inside(args.output_dir, "README.md"), card.encode(), folder=args.output_dir)


def push_to_hub(repo_id, output_dir, token):
    """Upload the saved pipeline, its model card, `samples.png` and the arguments file: an allow-list, so checkpoints,
    logs and any stray file in the output folder stay local."""
    upload_pipeline(  # the model card is written at the end of training (write_model_card)
        repo_id,
        output_dir,
        token=token,
        commit_message="Upload PFGM pipeline trained with pfgm_diffusers",
        extra_files=("samples.png", checkpoints.ARGS_NAME),
    )
    logger.info(f"Pushed {output_dir} to https://huggingface.co/{repo_id}")


def cli(argv=None):
    """The command line: bad input (a ValueError) is one `error: ...` line (from the first process) and exit status 2,
    not a traceback per process; an output folder this failed run created and left empty of results is removed."""
    new_folder = None
    try:
        output_dir = parse_args(argv).output_dir
        new_folder = None if os.path.lexists(output_dir) else output_dir
        main(argv)
    except ValueError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            if new_folder is not None:
                checkpoints.remove_unused_output_dir(new_folder)
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
