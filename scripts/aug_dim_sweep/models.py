"""One model of the sweep: trained by the project's trainer in segments (measured after each), then measured with
every solver, RK45, injected noise and quantised weights, as its settings ask."""

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from pfgm_diffusers import ode

from . import judges, sampling

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINER = os.path.join(REPO, "training", "train_pfgm.py")
UNET_CONFIG = os.path.join(REPO, "pfgm_diffusers", "training", "configs", "unet_digits_8px.json")  # the default UNet
DATA_FLAGS = ("train_data_dir", "dataset_name", "dataset_config_name", "image_column")


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the sweep: PFGM++ at `aug_dim` (an int, or None for D = infinity), or the original PFGM
    (`objective="poisson_field"`)."""

    objective: str
    aug_dim: int | None
    seed: int
    target: str = "clean"  # the regression target: "clean" (the sample's own image) or "stf" (Stable Target Field)

    @property
    def name(self) -> str:
        if self.objective == "poisson_field":
            return "PFGM"
        name = "D=inf" if self.aug_dim is None else f"D={self.aug_dim}"
        return name if self.target == "clean" else f"{name} {self.target.upper()}"

    @property
    def folder(self) -> str:
        target = "" if self.target == "clean" else f"-{self.target}"
        return f"{self.name.split()[0].replace('=', '')}{target}-seed{self.seed}"

    @classmethod
    def from_model(cls, model, seed: int) -> "ModelSpec":
        """The spec of a settings' model entry [objective, aug_dim] or [objective, aug_dim, target]."""
        return cls(*model[:2], seed, *model[2:])


def data_arguments(data: dict) -> list[str]:
    """The trainer's data flags for `data` ({} or no values: the embedded digits)."""
    return [f"--{flag}={data[flag]}" for flag in DATA_FLAGS if data.get(flag) is not None]


def trainer_command(spec: ModelSpec, output_dir: str, max_train_steps: int, training: dict, data=None) -> list[str]:
    """The trainer's command line for one segment: it resumes from the latest checkpoint in `output_dir` (a fresh run
    when there is none) and trains up to `max_train_steps`, then saves the EMA pipeline there."""
    command = [sys.executable, TRAINER, "--objective", spec.objective, "--seed", str(spec.seed)]
    if spec.objective == "pfgmpp":
        command += ["--aug_dim", "inf" if spec.aug_dim is None else str(spec.aug_dim)]
        if spec.target != "clean":
            command += ["--target", spec.target]
            if training.get("reference_batch_size") is not None:
                command += ["--reference_batch_size", str(training["reference_batch_size"])]
    else:
        command += [f"--{key}={value}" for key, value in training.get("field", {}).items()]
    command += data_arguments(data or {})
    if training.get("model_config") is not None:
        command += ["--model_config_name_or_path", training["model_config"]]
    command += [
        "--max_train_steps", str(max_train_steps),
        "--output_dir", output_dir,
        "--resume_from_checkpoint", "latest",
        "--resolution", str(training["resolution"]),
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
    return command + list(training.get("extra_args", []))


def train_segment(spec, output_dir, max_train_steps, training, data):
    """Run the trainer up to `max_train_steps` on one thread; the seconds it took."""
    began = time.perf_counter()
    command = trainer_command(spec, output_dir, max_train_steps, training, data)
    # One thread, as the worker: the figures do not depend on --jobs, and two jobs share two cores
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=environment
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the trainer failed ({' '.join(command)}):\n{completed.stdout[-3000:]}")
    return time.perf_counter() - began


def summary(point: dict, judge) -> dict:
    """The figures the reports use: each metric with its standard error and the real images' figure."""
    keys = [*judge.metrics, *[f"{key}_se" for key in judge.metrics], *[f"heldout_{key}" for key in judge.metrics]]
    return {key: point[key] for key in [*keys, "num_images", "heldout_num_images"]}


def measure_solvers(pipe, judge, evaluation) -> dict:
    """{solver: [point per step count]} for every scheduler solver with step counts in the settings."""
    solvers = {}
    for solver in sampling.scheduler_solvers():
        steps = evaluation["steps"].get(solver, evaluation["steps"].get("other", []))
        points = []
        for num_steps in steps:
            images, nfe = sampling.sample_images(
                pipe, solver, num_steps, evaluation["num_images"], evaluation["sample_seed"], evaluation["batch_size"]
            )
            points.append({"num_inference_steps": num_steps, "nfe": nfe, **summary(judge(images), judge)})
        if points:
            solvers[solver] = points
    return solvers


def measure_robustness(pipe, judge, evaluation) -> tuple[list, list]:
    """(noise rows, quantisation rows) at Heun with the reference step count (PFGM++ §5)."""
    arguments = (evaluation["reference_steps"], evaluation["num_images"], evaluation["sample_seed"])
    batch_size = evaluation["batch_size"]
    noise, quantization = [], []
    for alpha in evaluation.get("noise_scales", []):
        images, nfe = sampling.sample_images(pipe, "heun", *arguments, batch_size, noise_scale=alpha)
        noise.append({"alpha": alpha, "nfe": nfe, **summary(judge(images), judge)})
    for bits in evaluation.get("quantization_bits", []):
        unet = sampling.quantize_weights(pipe.unet, bits)
        images, nfe = sampling.sample_images(pipe, "heun", *arguments, batch_size, unet=unet)
        quantization.append({"bits": bits, "nfe": nfe, **summary(judge(images), judge)})
    return noise, quantization


def measure_restart(pipe, judge, evaluation) -> list:
    """Restart (the official blocks `evaluation["restart_blocks"]`, default the CIFAR-10 block) on the Heun grid of
    each of `evaluation["restart_steps"]`, each beside Heun at the step count whose NFE is nearest Restart's exact
    NFE: [{num_inference_steps, nfe, metrics..., "heun": {num_inference_steps, nfe, metrics...}}]."""
    arguments = (evaluation["num_images"], evaluation["sample_seed"], evaluation["batch_size"])
    rows = []
    for num_steps in evaluation["restart_steps"]:
        blocks = evaluation.get("restart_blocks")
        images, nfe = sampling.sample_images(pipe, "restart", num_steps, *arguments, restart_blocks=blocks)
        heun_steps = sampling.heun_steps_for_nfe(pipe, nfe)
        heun_images, heun_nfe = sampling.sample_images(pipe, "heun", heun_steps, *arguments)
        heun = {"num_inference_steps": heun_steps, "nfe": heun_nfe, **summary(judge(heun_images), judge)}
        rows.append({"num_inference_steps": num_steps, "nfe": nfe, **summary(judge(images), judge), "heun": heun})
    return rows


def train_and_follow(spec, output_dir, settings, judge, log) -> tuple[list, float, object]:
    """Train `spec` in segments, measuring the saved pipeline after each; (curve, training seconds, pipeline)."""
    training, evaluation = settings["training"], settings["evaluation"]
    curve, train_seconds = [], 0.0
    for max_train_steps in training["segments"]:
        train_seconds += train_segment(spec, output_dir, max_train_steps, training, settings.get("data"))
        pipe = sampling.load_pipeline(output_dir)
        images, _ = sampling.sample_images(
            pipe,
            "heun",
            evaluation["reference_steps"],
            evaluation["curve_images"],
            evaluation["sample_seed"],
            evaluation["batch_size"],
        )
        point = summary(judge(images), judge)
        curve.append({"steps": max_train_steps, "seconds": train_seconds, **point})
        figures = ", ".join(f"{key} {point[key]:.3f}" for key in judge.metrics)
        log(f"{spec.folder}: {max_train_steps} steps, {figures} ({train_seconds:.0f} s training)")
    return curve, train_seconds, pipe


def training_settings(settings: dict) -> dict:
    """What a model's training and its training curve depend on: the key of its cached training (`jobs.train_job`),
    so that a change of the final measurements (solvers, step counts, images) reuses the trained models."""
    evaluation = settings["evaluation"]
    curve = ("metric", "curve_images", "reference_steps", "sample_seed", "batch_size", "num_bootstrap")
    return {
        "data": settings.get("data", {}),
        "training": settings["training"],
        "evaluation": {key: evaluation[key] for key in curve if key in evaluation},
    }


def train_model(spec: ModelSpec, workdir: str, settings: dict, log=print) -> dict:
    """Train `spec` from the start in segments into `workdir/<spec.folder>`, measuring the saved pipeline after each
    segment (`settings` as `training_settings` gives them). Returns {curve, train_seconds, parameters}."""
    torch.set_num_threads(1)
    output_dir = os.path.join(workdir, spec.folder)
    # A folder left by an interrupted job holds checkpoints past its first segments: those points of the training
    # curve could not be measured again, so the model trains from the start.
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    judge = judges.make_judge(settings)
    curve, train_seconds, pipe = train_and_follow(spec, output_dir, settings, judge, log)
    return {"curve": curve, "train_seconds": train_seconds, "parameters": pipe.unet.num_parameters()}


def reference_only(evaluation: dict) -> dict:
    """`evaluation` cut to Heun at the reference step count (what the STF comparison needs beside the curve)."""
    none = dict(restart_steps=[], noise_scales=[], quantization_bits=[], rk45_all=False)
    return {**evaluation, "steps": {"heun": [evaluation["reference_steps"]], "other": []}, **none}


def measure_model(spec: ModelSpec, workdir: str, trained: dict, settings: dict, log=print) -> dict:
    """Measure the trained model of `spec` (in `workdir/<spec.folder>`, `trained` its `train_model` result) with every
    solver, Restart against Heun at equal NFE, RK45 where asked, injected noise and quantised weights. Returns a
    JSON-ready dict."""
    torch.set_num_threads(1)
    pipe = sampling.load_pipeline(os.path.join(workdir, spec.folder))
    evaluation = settings["evaluation"]
    if spec.target != "clean" and evaluation.get("other_targets") == "reference":
        evaluation = reference_only(evaluation)
    judge = judges.make_judge(settings)
    result = {"name": spec.name, "seed": spec.seed, "objective": spec.objective, "aug_dim": spec.aug_dim}
    result.update(target=spec.target, curve=trained["curve"], train_seconds=trained["train_seconds"])
    result["parameters"] = trained["parameters"]

    began = time.perf_counter()
    result["solvers"] = measure_solvers(pipe, judge, evaluation)
    if not sampling.is_field_model(pipe) and evaluation.get("restart_steps"):
        result["restart"] = measure_restart(pipe, judge, evaluation)
    if sampling.is_field_model(pipe) or evaluation.get("rk45_all", False):
        rk45_images, max_nfe = evaluation["rk45_images"], evaluation["rk45_max_nfe"]
        try:
            seed, batch_size = evaluation["sample_seed"], evaluation["rk45_batch_size"]
            images, nfe = sampling.sample_rk45(pipe, rk45_images, seed, batch_size, max_nfe)
            result["solvers"]["rk45"] = [{"num_inference_steps": None, "nfe": nfe, **summary(judge(images), judge)}]
        except ode.EvaluationBudgetExceeded as stalled:
            result["rk45_stalled"] = {"num_images": rk45_images, "max_nfe": max_nfe, "sigma_reached": stalled.sigma}
            log(f"{spec.folder}: RK45 stalled at sigma {stalled.sigma:.3g} after {max_nfe} calls")
    result["noise"], result["quantization"] = measure_robustness(pipe, judge, evaluation)
    result["evaluation_seconds"] = time.perf_counter() - began
    log(f"{spec.folder}: measured in {result['evaluation_seconds']:.0f} s")
    return result
