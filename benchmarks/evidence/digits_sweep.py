"""The digits part of the evidence: models trained by the project's trainer in segments, sampled with the scheduler's
diffusers loop (optionally with noise injected at each step, or with quantised weights), measured with the offline
digits classifier of `pfgm_diffusers.evaluation`, with bootstrap error bars.

Every call into the trainer, the pipeline and the scheduler sits in the first section of this file, so that a change
of their interfaces is a change here only.
"""

import copy
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from pfgm_diffusers import PFGMPipeline, PFGMScheduler, scheduling_pfgm
from pfgm_diffusers.evaluation import (
    CONFIDENCE_THRESHOLD,
    DigitsMetrics,
    FeatureStatistics,
    class_coverage,
    digits_split,
    frechet_distance,
    load_digits_images,
    to_classifier_input,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINER = os.path.join(REPO, "training", "train_pfgm.py")
# The no-argument run's UNet
UNET_CONFIG = os.path.join(REPO, "pfgm_diffusers", "training", "configs", "unet_digits_8px.json")


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the sweep: PFGM++ at `aug_dim` (an int, or None for D = infinity), or the original PFGM
    (`objective="poisson_field"`)."""

    objective: str
    aug_dim: int | None
    seed: int

    @property
    def name(self) -> str:
        if self.objective == "poisson_field":
            return "PFGM"
        return "D=inf" if self.aug_dim is None else f"D={self.aug_dim}"

    @property
    def folder(self) -> str:
        return f"{self.name.replace('=', '')}-seed{self.seed}"


# ---------------------------------------------------------------------- the only calls into the trainer, pipeline
# ---------------------------------------------------------------------- and scheduler


def trainer_command(spec: ModelSpec, output_dir: str, max_train_steps: int, training: dict) -> list[str]:
    """The trainer's command line for one segment: it resumes from the latest checkpoint in `output_dir` (a fresh run
    when there is none) and trains up to `max_train_steps`, then saves the EMA pipeline there."""
    command = [sys.executable, TRAINER, "--objective", spec.objective, "--seed", str(spec.seed)]
    if spec.objective == "pfgmpp":
        command += ["--aug_dim", "inf" if spec.aug_dim is None else str(spec.aug_dim)]
    else:
        command += [f"--{key}={value}" for key, value in training["field"].items()]
    command += [
        "--max_train_steps", str(max_train_steps),
        "--output_dir", output_dir,
        "--resume_from_checkpoint", "latest",
        "--resolution", str(training["resolution"]),
        "--model_config_name_or_path", training["model_config"],
        "--train_batch_size", str(training["batch_size"]),
        "--learning_rate", str(training["learning_rate"]),
        "--lr_scheduler", "constant_with_warmup",  # does not depend on the total step count: segments are exact
        "--lr_warmup_steps", str(training["lr_warmup_steps"]),
        "--ema_max_decay", str(training["ema_max_decay"]),
        "--checkpointing_steps", str(max_train_steps),  # one checkpoint, at the segment's end
        "--checkpoints_total_limit", "1",
        "--save_images_steps", str(max_train_steps),  # the trainer's own sample grid: tiny, at the end only
        "--eval_batch_size", "4",
        "--num_inference_steps", "2",
    ]  # fmt: skip
    return command


def load_pipeline(folder: str) -> PFGMPipeline:
    pipe = PFGMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_solvers() -> tuple:
    """The scheduler's solver names (`scheduling_pfgm.SOLVERS`): a new solver joins the sweep with no change here."""
    return tuple(scheduling_pfgm.SOLVERS)


def make_scheduler(pipe: PFGMPipeline, solver: str) -> PFGMScheduler:
    return PFGMScheduler.from_config(pipe.scheduler.config, solver=solver)


def is_field_model(pipe: PFGMPipeline) -> bool:
    return pipe.scheduler.config.prediction_type == "poisson_field"


@torch.no_grad()
def sample_loop(unet, scheduler, latents, num_inference_steps, noise_scale=0.0, generator=None):
    """
    Samples in model space ([-1, 1] for images) from the scheduler's diffusers loop started from standard Gaussian
    `latents` (B, C, H, W), as a generic diffusers pipeline runs it (`latents * init_noise_sigma`: the scheduler maps
    that start onto the prior), and the number of network calls.

    With `noise_scale` alpha > 0, noise is injected after every completed step except the last, x <- x + alpha sigma_i
    eps with sigma_i the noise level (z in field mode) the step arrived at (PFGM++ §5, math.md §2 end).
    """
    scheduler.set_timesteps(num_inference_steps)
    x = latents * scheduler.init_noise_sigma
    num_calls = len(scheduler.timesteps)
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(output, t, x).prev_sample
        step_done = getattr(scheduler, "state_in_first_order", True)  # Heun: after its correction call
        if noise_scale > 0 and step_done and scheduler.step_index < num_calls:
            sigma = float(scheduler.sigmas[scheduler.step_index])
            x = x + noise_scale * sigma * torch.randn(x.shape, generator=generator)
    return x, num_calls


class RK45Stalled(Exception):
    """RK45 spent its evaluation budget before reaching sigma_min; `sigma` is where it was."""

    def __init__(self, sigma: float):
        super().__init__(f"RK45 stalled at sigma = {sigma:.3g}")
        self.sigma = sigma


def sample_rk45(pipe, num_images, seed, batch_size, max_nfe=None):
    """Images in [0, 1] from the pipeline's adaptive RK45 (image i seeded `seed + i`) and the mean NFE per image.

    With `max_nfe`, a batch that needs more network calls raises `RK45Stalled`: on the sweep's field models the
    official tolerances (1e-4) can need tens of thousands of calls (the step size collapses where v_z nears 0)."""
    images, nfe, calls = [], [], []
    denoise = pipe.denoise

    def counted(sample, sigma, class_labels=None):
        calls.append(sigma)
        if max_nfe is not None and len(calls) > max_nfe:
            raise RK45Stalled(min(calls))
        return denoise(sample, sigma, class_labels)

    pipe.denoise = counted
    try:
        for start in range(0, num_images, batch_size):
            calls.clear()
            generators = [
                torch.Generator().manual_seed(seed + i) for i in range(start, min(start + batch_size, num_images))
            ]
            output = pipe(batch_size=len(generators), generator=generators, solver="rk45", output_type="pt")
            images.append(output.images)
            nfe += [output.nfe] * len(generators)
    finally:
        del pipe.denoise  # the class's method again
    return torch.cat(images), float(np.mean(nfe))


# ---------------------------------------------------------------------- sampling with the sweep's conventions


def latents_for(num_images, shape, seed):
    """Standard Gaussian latents (n, C, H, W), image i drawn from a generator seeded `seed + i`: every model and
    solver of the sweep starts from the same draws, so their differences are paired."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)) for i in range(num_images)]
    )


def sample_images(pipe, solver, num_inference_steps, num_images, seed, batch_size, noise_scale=0.0, unet=None):
    """`num_images` images in [0, 1] from the scheduler loop of `solver`, and the network calls per image."""
    unet = pipe.unet if unet is None else unet
    config = pipe.unet.config
    latents = latents_for(num_images, (config.in_channels, config.sample_size, config.sample_size), seed)
    noise_generator = torch.Generator().manual_seed(seed + 10**6)
    images = []
    for start in range(0, num_images, batch_size):
        scheduler = make_scheduler(pipe, solver)
        batch, nfe = sample_loop(
            unet, scheduler, latents[start : start + batch_size], num_inference_steps, noise_scale, noise_generator
        )
        images.append((batch / 2 + 0.5).clamp(0, 1))
    return torch.cat(images), float(nfe)


def quantize_weights(unet, bits: int):
    """A copy of `unet` with every parameter tensor quantised per tensor by min-max to 2^bits levels (PFGM++ §5):
    w -> lo + round((w - lo) / step) step, step = (hi - lo) / (2^bits - 1)."""
    quantized = copy.deepcopy(unet)
    with torch.no_grad():
        for parameter in quantized.parameters():
            lo, hi = parameter.min(), parameter.max()
            step = (hi - lo) / (2**bits - 1)
            if step > 0:
                parameter.copy_(lo + torch.round((parameter - lo) / step) * step)
    return quantized


# ---------------------------------------------------------------------- measuring, with bootstrap error bars


class DigitsJudge:
    """
    The offline digits metrics of `pfgm_diffusers.evaluation.DigitsMetrics`, plus standard errors over the images:
    a delete-one-block jackknife (20 blocks) for the Fréchet distance, and a bootstrap for the confident share and
    the class coverage. The bootstrap does not suit the Fréchet distance: its duplicated images bias every resample
    upward. Measured on a pilot model (D = 128, 8000 steps, 1000 samples): eight independent sample sets had a
    Fréchet distance of 2.2 +- 0.78 (std); the jackknife gave 0.61-1.07 on four of them, the bootstrap 0.78-1.37
    around resample means twice the point values.
    """

    def __init__(self, num_bootstrap: int = 100, seed: int = 0, num_blocks: int = 20):
        self.num_bootstrap = num_bootstrap
        self.num_blocks = num_blocks
        self.seed = seed
        self.classifier = DigitsMetrics().model
        train_images, _ = load_digits_images(digits_split()[0])
        with torch.no_grad():
            train_features = self.classifier.features(train_images)
        self.train_statistics = FeatureStatistics().update(train_features)

    def frechet_distance(self, features) -> float:
        statistics = FeatureStatistics().update(features)
        train = self.train_statistics
        return frechet_distance(statistics.mean, statistics.covariance, train.mean, train.covariance)

    @torch.no_grad()
    def __call__(self, images) -> dict:
        metric = DigitsMetrics()
        metric.update(images)
        result = metric.compute()
        features = self.classifier.features(to_classifier_input(torch.as_tensor(images))).double().numpy()
        probabilities = torch.softmax(self.classifier.head(torch.from_numpy(features).float()), 1).numpy()
        n = len(features)

        blocks = np.array_split(np.arange(n), min(self.num_blocks, n // 3))  # each leave-out keeps >= 2 images
        leave_out = np.array([self.frechet_distance(np.delete(features, block, axis=0)) for block in blocks])
        k = len(blocks)
        result["frechet_distance_se"] = float(np.sqrt((k - 1) / k * ((leave_out - leave_out.mean()) ** 2).sum()))

        rng = np.random.default_rng(self.seed)
        draws = {"confident_share": [], "class_coverage": []}
        for _ in range(self.num_bootstrap):
            chosen = probabilities[rng.integers(0, n, n)]
            draws["confident_share"].append(float((chosen.max(1) >= CONFIDENCE_THRESHOLD).mean()))
            draws["class_coverage"].append(class_coverage(np.bincount(chosen.argmax(1), minlength=10)))
        for key, values in draws.items():
            result[f"{key}_se"] = float(np.std(values, ddof=1))
        return result


# ---------------------------------------------------------------------- one model: train in segments, then measure


def run_model(spec: ModelSpec, workdir: str, settings: dict, log=print) -> dict:
    """Train `spec` in segments (measuring the saved pipeline after each), then measure it with every solver,
    injected noise and quantised weights. Returns a JSON-ready dict."""
    output_dir = os.path.join(workdir, spec.folder)
    # A folder left by an interrupted job holds checkpoints past its first segments: those points of the training
    # curve could not be measured again, so the model trains from the start.
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    training, evaluation = settings["training"], settings["evaluation"]
    judge = DigitsJudge(evaluation["num_bootstrap"])
    num_images, batch_size, seed = evaluation["num_images"], evaluation["batch_size"], evaluation["sample_seed"]
    reference_steps = evaluation["reference_steps"]
    result = {"name": spec.name, "seed": spec.seed, "objective": spec.objective, "aug_dim": spec.aug_dim}

    curve, train_seconds = [], 0.0
    for max_train_steps in training["segments"]:
        began = time.perf_counter()
        command = trainer_command(spec, output_dir, max_train_steps, training)
        # One thread, as the worker: the figures do not depend on --jobs, and two jobs share two cores
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=environment
        )
        if completed.returncode != 0:
            raise RuntimeError(f"the trainer failed ({' '.join(command)}):\n{completed.stdout[-3000:]}")
        train_seconds += time.perf_counter() - began
        pipe = load_pipeline(output_dir)
        images, _ = sample_images(pipe, "heun", reference_steps, evaluation["curve_images"], seed, batch_size)
        point = judge(images)
        curve.append({"steps": max_train_steps, "seconds": train_seconds, **_summary(point)})
        log(f"{spec.folder}: {max_train_steps} steps, FD {point['frechet_distance']:.3f}, "
            f"confident {point['confident_share']:.3f} ({train_seconds:.0f} s training)")  # fmt: skip
    result["curve"] = curve
    result["train_seconds"] = train_seconds
    result["parameters"] = pipe.unet.num_parameters()

    began = time.perf_counter()
    solvers = {}
    for solver in scheduler_solvers():
        points = []
        for num_steps in (
            evaluation["steps"][solver] if solver in evaluation["steps"] else evaluation["steps"]["other"]
        ):
            images, nfe = sample_images(pipe, solver, num_steps, num_images, seed, batch_size)
            points.append({"num_inference_steps": num_steps, "nfe": nfe, **_summary(judge(images))})
        solvers[solver] = points
    if is_field_model(pipe) or evaluation["rk45_all"]:
        rk45_images, max_nfe = evaluation["rk45_images"], evaluation["rk45_max_nfe"]
        try:
            images, nfe = sample_rk45(pipe, rk45_images, seed, evaluation["rk45_batch_size"], max_nfe)
            solvers["rk45"] = [{"num_inference_steps": None, "nfe": nfe, **_summary(judge(images))}]
        except RK45Stalled as stalled:
            result["rk45_stalled"] = {"num_images": rk45_images, "max_nfe": max_nfe, "sigma_reached": stalled.sigma}
            log(f"{spec.folder}: RK45 stalled at sigma {stalled.sigma:.3g} after {max_nfe} calls")
    result["solvers"] = solvers

    result["noise"] = []
    for alpha in evaluation["noise_scales"]:
        images, nfe = sample_images(pipe, "heun", reference_steps, num_images, seed, batch_size, noise_scale=alpha)
        result["noise"].append({"alpha": alpha, "nfe": nfe, **_summary(judge(images))})
    result["quantization"] = []
    for bits in evaluation["quantization_bits"]:
        unet = quantize_weights(pipe.unet, bits)
        images, nfe = sample_images(pipe, "heun", reference_steps, num_images, seed, batch_size, unet=unet)
        result["quantization"].append({"bits": bits, "nfe": nfe, **_summary(judge(images))})
    result["evaluation_seconds"] = time.perf_counter() - began
    log(f"{spec.folder}: measured in {result['evaluation_seconds']:.0f} s")
    return result


_KEYS = ("frechet_distance", "confident_share", "class_coverage")


def _summary(point: dict) -> dict:
    """The figures the report uses, with their bootstrap errors and the held-out real digits' figures."""
    summary = {key: point[key] for key in _KEYS}
    summary.update({f"{key}_se": point[f"{key}_se"] for key in _KEYS})
    summary.update({f"heldout_{key}": point[f"heldout_{key}"] for key in _KEYS})
    summary["num_images"] = point["num_images"]
    summary["heldout_num_images"] = point["heldout_num_images"]
    return summary
