"""Jobs (one model, or one toy dataset) `jobs` at a time in worker processes of one thread each; each job's result is
kept in `workdir/results/<job id>.json` and reused by a rerun with the same arguments, so that an interrupted sweep
continues where it stopped.

A job is (job id, function, keyword arguments): `function(**arguments, workdir=..., log=...)` returns a JSON-ready
dict; the function must be importable by name (the workers are spawned)."""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import time

from pfgm_diffusers import files

from . import models


def settings_key(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def model_jobs(settings) -> list:
    """(job id, function, keyword arguments) of every model and seed, the field model (the slowest to measure)
    first."""
    jobs = []
    for model in sorted(settings["models"], key=lambda model: model[0] != "poisson_field"):
        for seed in settings["seeds"]:
            spec = models.ModelSpec.from_model(model, seed)
            arguments = dict(model=list(model), seed=seed, settings=model_settings(settings))
            jobs.append((f"model-{spec.folder}", train_and_measure, arguments))
    return jobs


def model_settings(settings) -> dict:
    """The settings one model's job depends on: all but the list of models and seeds, so that adding or dropping a
    model keeps the others' kept results."""
    return {key: value for key, value in settings.items() if key not in ("models", "seeds")}


def train_job(model, seed, settings) -> tuple:
    """(job id, function, keyword arguments) of training one model: a job of its own, kept in results/train-*.json
    with the settings that training depends on only, so that changing the measurements reuses the trained models."""
    spec = models.ModelSpec.from_model(model, seed)
    arguments = dict(model=list(model), seed=seed, settings=models.training_settings(settings))
    return f"train-{spec.folder}", train_model, arguments


def train_jobs(settings) -> list:
    """The training jobs of every model and seed (`train_job`), for training now and measuring later."""
    return [train_job(model, seed, settings) for model in settings["models"] for seed in settings["seeds"]]


def train_model(model, seed, settings, workdir, log):
    """A training job: `models.train_model` with its models kept under `workdir/models`."""
    return models.train_model(models.ModelSpec.from_model(model, seed), os.path.join(workdir, "models"), settings, log)


def train_and_measure(model, seed, settings, workdir, log):
    """A model job: its training (reused from results/train-*.json when kept), then `models.measure_model`."""
    job_id, function, arguments = train_job(model, seed, settings)
    trained = load_cached(job_id, arguments, workdir) or run_job(job_id, function, arguments, workdir)
    spec = models.ModelSpec.from_model(model, seed)
    return models.measure_model(spec, os.path.join(workdir, "models"), trained, settings, log)


def _log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_job(job_id, function, arguments, workdir):
    """One job in a worker process (one thread); writes results/<job_id>.json atomically and returns it."""
    import diffusers
    import torch

    torch.set_num_threads(1)
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" at every segment
    began = time.perf_counter()
    result = function(**arguments, workdir=workdir, log=_log)
    result["job_seconds"] = time.perf_counter() - began
    result["settings_key"] = settings_key(arguments)
    files.atomic_write_json(os.path.join(workdir, "results", f"{job_id}.json"), result, indent=1)
    return result


def load_cached(job_id, arguments, workdir):
    path = os.path.join(workdir, "results", f"{job_id}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        result = json.load(file)
    return result if result.get("settings_key") == settings_key(arguments) else None


def run_all(planned, workdir, jobs=2, log=print) -> tuple[dict, dict]:
    """Every planned job (finished ones reused), `jobs` at a time; returns ({job id: result}, {reused_jobs,
    job_seconds})."""
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    results = {job_id: load_cached(job_id, arguments, workdir) for job_id, _, arguments in planned}
    todo = [job for job in planned if results[job[0]] is None]
    log(f"{len(planned)} jobs, {len(planned) - len(todo)} reused from {workdir}, {len(todo)} to run, {jobs} at a time")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_job, *job, workdir): job[0] for job in todo}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            log(f"done: {futures[future]} ({results[futures[future]]['job_seconds'] / 60:.1f} min)")
    info = {
        "reused_jobs": len(planned) - len(todo),
        "job_seconds": sum(result["job_seconds"] for result in results.values()),
    }
    return results, info
