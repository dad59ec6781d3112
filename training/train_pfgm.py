#!/usr/bin/env python
"""Train PFGM++ (Xu et al., ICML 2023) or the original PFGM (Xu et al., NeurIPS 2022) with accelerate.

    accelerate launch training/train_pfgm.py            # no arguments: the embedded 8x8 digits, CPU
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 training/train_pfgm.py \\
        --preset cifar10 --aug_dim 2048 --push_to_hub --hub_model_id me/pfgmpp-cifar10
    accelerate launch training/train_pfgm.py --objective poisson_field --train_data_dir ./my_images \\
        --large_batch_size 4096 --train_batch_size 128

The script reads top to bottom: arguments, accelerator, data, model/scheduler/optimizer/EMA, prepare, loop, save.
Settings live in presets.py, the output folder and checkpoints in checkpoints.py, the math in `pfgm_diffusers`
(the losses in `pfgm_diffusers.losses`); see docs/training.md.
"""

import atexit
import contextlib
import io
import json
import logging
import math
import os
import time

import datasets
import diffusers
import huggingface_hub
import numpy as np
import PIL.Image
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
    EpochSampler,
    ImageTransform,
    TrainingDataset,
    collate,
    load_digits_dataset,
    load_hub_dataset,
    load_image_folder,
)
from pfgm_diffusers.files import atomic_write, atomic_write_json, inside, makedirs
from pfgm_diffusers.hub import save_model_card, upload_pipeline
from pfgm_diffusers.losses import pfgmpp_loss, poisson_field_loss
from pfgm_diffusers.pipeline_pfgm import image_grid

# isort: split
# This script's siblings in training/ (on sys.path when the script runs)
import checkpoints
from arguments import build_scheduler, fill_from_the_data, load_unet_config, parse_args, public_arguments

logger = get_logger(__name__, log_level="INFO")


def clock():
    """Wall and CPU seconds of this process: under load from other processes the CPU time still measures the work."""
    return np.array([time.perf_counter(), time.process_time()])


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
    """The training images; labels only for --class_conditional (unconditional training never reads them)."""
    if args.train_data_dir is not None:
        images = load_image_folder(args.train_data_dir, args.cache_dir, with_labels=args.class_conditional)
    elif args.dataset_name is not None:
        label_column = args.label_column if args.class_conditional else None
        images = load_hub_dataset(
            args.dataset_name, args.dataset_config_name, args.cache_dir, args.image_column, label_column
        )
    else:
        images = load_digits_dataset(with_labels=args.class_conditional)
    if args.class_conditional and images.class_names is None:
        raise ValueError("--class_conditional needs labels: class sub-folders or a label column in the dataset")
    width, height = images.dataset[0]["image"].size
    if args.resolution is None or args.model_config_name_or_path is None:  # your own data, no --preset
        logger.info(fill_from_the_data(args, width, height))
    if (width, height) != (args.resolution, args.resolution):
        logger.info(
            f"Images are resized (shorter side, bilinear) and cropped from {width}x{height} (the first image) to "
            f"{args.resolution}x{args.resolution}"
        )
    return images


def create_dataloader(args, dataset, sampler, batch_size, accelerator):
    """The DataLoader and the number of optimizer steps per epoch (whole batches on every process)."""
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,  # equal batches on every process, as the gathered charges need
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG (restored on resume) untouched
    )
    steps_per_epoch = len(dataset) // (batch_size * accelerator.num_processes) // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        per_step = batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        most = len(dataset) // (accelerator.num_processes * args.gradient_accumulation_steps)
        flag = "--large_batch_size" if batch_size != args.train_batch_size else "--train_batch_size"
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than one optimizer step: batches of {batch_size} x "
            f"{accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation = {per_step} "
            f"images; {f'give {flag} {most} or less, ' if most >= 1 else ''}use fewer processes or accumulation "
            "steps, or add images"
        )
    return dataloader, steps_per_epoch


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


def main(argv=None):
    args = parse_args(argv)
    scheduler = build_scheduler(args)  # validates the sampler's settings before anything is loaded

    # Accelerator, output folder, seed
    accelerator = create_accelerator(args)
    checkpoint, checkpoint_state = checkpoints.find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if accelerator.is_main_process:  # one run per folder; another run's outputs only with --overwrite_output_dir
        resuming = args.resume_from_checkpoint is not None
        lock = checkpoints.claim_output_dir(args.output_dir, args.logging_dir, resuming, args.overwrite_output_dir)
        atexit.register(lock.release)
    accelerator.wait_for_everyone()
    # A different noise stream per process; the data order below has its own generator shared by all processes
    set_seed(args.seed, device_specific=True)

    # Data
    with accelerator.main_process_first():  # one process fills the `datasets` cache, the others read it
        images = load_images(args)
    transform = ImageTransform(args.resolution, images.num_channels, args.center_crop, args.random_flip)
    dataset = TrainingDataset(images.dataset, transform, seed=args.seed)
    field = scheduler.config.prediction_type == "poisson_field"  # the trainer's one question about the objective
    # The field objective loads the large batch; its first train_batch_size rows are the small batch
    loader_batch_size = args.large_batch_size if field else args.train_batch_size
    sampler = EpochSampler(len(dataset), seed=args.seed)
    train_dataloader, steps_per_epoch = create_dataloader(args, dataset, sampler, loader_batch_size, accelerator)

    # Model, scheduler, optimizer, EMA
    if args.upper_norm == "auto":
        scheduler = build_scheduler(args, images.num_channels)
        logger.info(f"--upper_norm auto: {scheduler.config.upper_norm:.1f} = sqrt(N + 1) sigma (1 + tau)^M")
    out_channels = scheduler.num_output_channels(images.num_channels)  # C + 1 in field mode
    unet_config = load_unet_config(args, images.num_channels, out_channels, images.num_classes)
    # What a checkpoint records and a resume must match (checkpoints.COMPATIBILITY_KEYS)
    run_settings = dict(
        objective=args.objective,
        aug_dim=scheduler.config.aug_dim,
        resolution=args.resolution,
        class_names=images.class_names,
        unet_config=unet_config,
        scheduler_config=json.loads(scheduler.to_json_string()),
        loss_config=loss_config(args),
    )
    if checkpoint is not None:
        checkpoints.check_compatible(checkpoint, checkpoint_state, run_settings)
    unet = create_unet(args, unet_config)
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    ema_model = create_ema(args, accelerator, unet)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    # After every input check, so that bad input creates no repository; before training, so that it fails fast
    repo_id = create_hub_repo(args) if accelerator.is_main_process and args.push_to_hub else None

    # Prepare
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)
    global_step = 0
    if checkpoint is not None:
        checkpoints.load_checkpoint(accelerator, checkpoint)
        global_step = checkpoint_state["global_step"]
        logger.info(f"Resumed from {checkpoint} at step {global_step}")
    elif args.resume_from_checkpoint is not None:
        logger.info(f"No checkpoint in {args.output_dir} yet: starting a new run")
    if accelerator.is_main_process:  # the arguments, without secrets, to a file and the tracker
        arguments_file = os.path.join(args.output_dir, checkpoints.ARGS_NAME)
        atomic_write_json(arguments_file, public_arguments(args), folder=args.output_dir)
        if args.report_to != "none":
            accelerator.init_trackers("train_pfgm", {k: v for k, v in public_arguments(args).items() if v is not None})

    # Loop
    logger.info(
        f"{args.objective}: {len(dataset)} images ({images.num_channels} channel(s), {args.resolution}px), "
        f"{accelerator.num_processes} process(es) x {args.train_batch_size} x {args.gradient_accumulation_steps} "
        f"accumulation, {args.max_train_steps} steps, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
        f"parameters"
        + (f", {loader_batch_size * accelerator.num_processes} charges per field target" if field else "")
    )
    progress_bar = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    first_epoch, start_step = global_step // steps_per_epoch, global_step
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0  # summed on the device: no per-step sync
    train_time, step_start = np.zeros(2), clock()  # of the optimizer steps only (the benchmark reads it)
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        sampler.set_epoch(epoch)  # the same order and augmentations on every process and after a resume
        dataset.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and global_step % steps_per_epoch != 0:
            done = global_step % steps_per_epoch * args.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(train_dataloader, done)
        unet.train()
        for batch in batches:
            x_large = batch["pixel_values"]  # (L, C, H, W) for the field objective, else (B, C, H, W)
            x = x_large[: args.train_batch_size]
            class_labels = batch["label"][: args.train_batch_size] if images.class_names is not None else None
            with accelerator.accumulate(unet):
                if field:  # the target is the field of every process's large batch: num_processes x L charges
                    charges = accelerator.gather(x_large.contiguous())
                    loss = poisson_field_loss(unet, x, charges, class_labels, args.sigma, args.tau, args.M, args.gamma)
                else:
                    loss = pfgmpp_loss(unet, scheduler, x, class_labels, args.P_mean, args.P_std)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
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
            if global_step > start_step + 5:  # the first steps warm up allocators and caches
                train_time += clock() - step_start
            last_step = global_step == args.max_train_steps
            if global_step % args.logging_steps == 0 or last_step:
                logs = {"loss": (loss_sum / loss_count).item(), "lr": lr_scheduler.get_last_lr()[0]}
                if not math.isfinite(logs["loss"]):  # read every --logging_steps only: no per-step host sync
                    raise RuntimeError(
                        f"the training loss became {logs['loss']} within the {args.logging_steps} steps before step "
                        f"{global_step}: lower --learning_rate or check the data; checkpoints before it are intact"
                    )
                if ema_model is not None:
                    logs["ema_decay"] = ema_model.cur_decay_value
                loss_sum, loss_count = torch.zeros_like(loss_sum), 0
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or last_step:
                checkpoints.save_checkpoint(
                    accelerator, args.output_dir, global_step, run_settings, args.checkpoints_total_limit
                )
            if accelerator.is_main_process and (global_step % args.save_images_steps == 0 or last_step):
                with ema_weights(ema_model, unet):
                    save_samples(args, accelerator, accelerator.unwrap_model(unet), scheduler, global_step)
            pipeline_steps = args.save_pipeline_steps
            if accelerator.is_main_process and pipeline_steps is not None and global_step % pipeline_steps == 0:
                with ema_weights(ema_model, unet):
                    save_pipeline(accelerator.unwrap_model(unet), scheduler, images.class_names, args.output_dir)
            unet.train()
            step_start = clock()  # sampling and checkpoints are not training throughput
            if last_step:
                break
    progress_bar.close()
    if global_step > start_step + 5:
        wall, cpu = train_time / (global_step - start_step - 5)
        logger.info(
            f"Training throughput: {1 / wall:.3f} steps/s, {1000 * cpu:.1f} CPU ms per step (after the first 5 steps, "
            "without samples and checkpoints)"
        )

    # Save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with ema_weights(ema_model, unet):
            save_pipeline(accelerator.unwrap_model(unet), scheduler, images.class_names, args.output_dir)
        last_grid = inside(args.output_dir, "samples", f"step_{global_step:07d}.png")
        if os.path.exists(last_grid):
            with open(last_grid, "rb") as f:
                atomic_write(os.path.join(args.output_dir, "samples.png"), f.read(), folder=args.output_dir)
        logger.info(f"Saved the pipeline (EMA weights: {ema_model is not None}) to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(repo_id, args.output_dir, args.hub_token)
        lock.release()
    accelerator.end_training()


def loss_config(args):
    """The loss's own settings, recorded in each checkpoint: a resume that changes them trains another objective."""
    if args.objective == "poisson_field":
        return dict(sigma=args.sigma, tau=args.tau, M=args.M, gamma=args.gamma)
    return dict(P_mean=args.P_mean, P_std=args.P_std)


def save_samples(args, accelerator, unet, scheduler, global_step):
    """A grid `samples/step_<step>.png` of `unet`'s samples (a fixed seed, a fresh scheduler; classes in turn for a
    class-conditional model), and the images to TensorBoard or W&B."""
    pipeline = PFGMPipeline(unet=unet, scheduler=PFGMScheduler.from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    num_classes = unet.config.num_class_embeds
    labels = {} if num_classes is None else {"class_labels": torch.arange(args.eval_batch_size) % num_classes}
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    samples = pipeline(
        args.eval_batch_size,
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


def save_pipeline(unet, scheduler, class_names, output_dir):
    """The pipeline with the class names of the data, written file by file atomically (checkpoints.save_pipeline)."""
    checkpoints.save_pipeline(PFGMPipeline(unet=unet, scheduler=scheduler, class_names=class_names), output_dir)


def push_to_hub(repo_id, output_dir, token):
    """Upload the saved pipeline, its model card, `samples.png` and the arguments file: an allow-list, so checkpoints,
    logs and any stray file in the output folder stay local."""
    save_model_card(output_dir, repo_id)
    upload_pipeline(
        repo_id,
        output_dir,
        token=token,
        commit_message="Upload PFGM pipeline trained with pfgm_diffusers",
        extra_files=("samples.png", checkpoints.ARGS_NAME),
    )
    logger.info(f"Pushed {output_dir} to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    main()
