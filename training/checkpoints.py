"""The trainer's output folder: one run at a time, atomic checkpoints that are verified before a resume, pipelines.

A checkpoint is `checkpoint-<step>`: accelerate's state (model, optimizer, lr schedule, every process's RNG state),
the EMA weights in `unet_ema/`, and `pfgm_training_state.json` with the step, the settings a resume must match and the
size and SHA-256 of every file. It is written under `.partial-checkpoint-<step>`, fsync'ed and renamed, so `latest`
only ever sees complete checkpoints; a resume re-checks every file against the record, so a truncated or altered file
(weights, optimizer, random state) is refused by name instead of loading into a different run.
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import warnings

from accelerate.logging import get_logger

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "pfgm_training_state.json"
ARGS_NAME = "training_args.json"  # the resolved arguments without secrets, beside the saved pipeline
LOCK_NAME = ".pfgm_train.lock"
# What a run writes into its output folder besides checkpoints; another run's copies are never silently mixed in
RUN_OUTPUTS = ("model_index.json", "unet", "scheduler", "vae", "samples", "samples.png", ARGS_NAME)
# Settings stored in every checkpoint: a resume with different values would load weights into another model
COMPATIBILITY_KEYS = ("objective", "aug_dim", "resolution", "class_names", "unet_config")
STATE_KEYS = ("global_step", "scheduler_config", "files") + COMPATIBILITY_KEYS


# ----- one run per output folder -----


class OutputDirLock:
    """A lock file holding "pid hostname": a second run into the same folder is refused while the first one lives.
    A lock whose process is dead (on this host) is stale and taken over with a warning."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.held = False

    def acquire(self):
        while not self.held:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True

    def _check_stale(self):
        try:
            with open(self.path) as f:
                pid, host = f.read().split()
            pid = int(pid)
        except FileNotFoundError:
            return  # released meanwhile
        except ValueError:
            pid, host = None, socket.gethostname()  # a lock killed between create and write
        if host != socket.gethostname():
            raise ValueError(
                f"{os.path.dirname(self.path)!r} is locked by a run on {host} (pid {pid}): wait for it, or delete "
                f"{self.path!r} if that run is gone"
            )
        if pid is not None and pid != os.getpid() and _process_alive(pid):
            raise ValueError(
                f"another run (pid {pid}) is training into {os.path.dirname(self.path)!r}: wait for it to finish or "
                "choose another --output_dir"
            )
        logger.warning(f"Removing the stale lock {self.path} of process {pid}, which is no longer running")
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def claim_output_dir(output_dir, logging_dir, resuming, overwrite):
    """Lock `output_dir` for this run; refuse a new run into another run's folder unless `overwrite`, which removes
    that run's checkpoints, pipeline, samples and logs (and says what it removed). Returns the lock."""
    os.makedirs(output_dir, exist_ok=True)
    lock = OutputDirLock(output_dir)
    lock.acquire()
    try:
        previous = previous_run_outputs(output_dir, logging_dir)
        if previous and not resuming:
            if not overwrite:
                raise ValueError(
                    f"--output_dir {output_dir!r} holds another run ({', '.join(previous)}): pass "
                    "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or choose "
                    "another --output_dir"
                )
            logger.warning(f"--overwrite_output_dir: removing {', '.join(previous)} from {output_dir}")
            for name in previous:
                path = os.path.join(output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        remove_partial_checkpoints(output_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def previous_run_outputs(output_dir, logging_dir):
    """Names in `output_dir` that a training run wrote: checkpoints, the pipeline, samples, arguments, logs."""
    logs = os.path.relpath(os.path.join(output_dir, logging_dir), output_dir).split(os.sep)[0]  # --logging_dir
    outputs = RUN_OUTPUTS + (() if logs.startswith("..") else (logs,))
    return [name for name in sorted(os.listdir(output_dir)) if name.startswith(CHECKPOINT_PREFIX) or name in outputs]


def remove_partial_checkpoints(output_dir):
    """Leftovers of a killed run: checkpoints and pipelines being written, checkpoints being deleted."""
    for name in os.listdir(output_dir):
        if name.startswith((".partial-", ".deleting-")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ----- finding, verifying and reading a checkpoint -----


def list_checkpoints(output_dir):
    """Checkpoints in `output_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
            found.append((int(step), os.path.join(output_dir, name)))
    return sorted(found)


def checkpoint_path(resume_from_checkpoint, output_dir):
    """The folder `--resume_from_checkpoint` names: a path, or a checkpoint name in `output_dir` (as in diffusers)."""
    if os.path.isdir(resume_from_checkpoint):
        return resume_from_checkpoint
    in_output_dir = os.path.join(output_dir, resume_from_checkpoint)
    if os.path.isdir(in_output_dir):
        return in_output_dir
    raise ValueError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist (nor {in_output_dir!r} in --output_dir)"
    )


def find_checkpoint(resume_from_checkpoint, output_dir):
    """The verified checkpoint to resume from and its training state, or (None, None) for a new run.

    `latest` takes the newest checkpoint whose files match their record; a damaged newer one is skipped with a
    warning naming both. A named checkpoint that is damaged is an error naming the file.
    """
    if resume_from_checkpoint is None:
        return None, None
    if resume_from_checkpoint != "latest":
        path = checkpoint_path(resume_from_checkpoint, output_dir)
        return path, verified_training_state(path)
    damaged = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            state = verified_training_state(path)
        except ValueError as error:
            damaged.append(error)
            continue
        for error in damaged:
            logger.warning(f"{error}; resuming from {path} instead")
        return path, state
    if damaged:
        raise ValueError(f"no complete checkpoint in {output_dir!r}: {'; '.join(map(str, damaged))}")
    return None, None


def verified_training_state(checkpoint):
    """The training state of `checkpoint` after checking every file against its recorded size and SHA-256."""
    state = read_training_state(checkpoint)
    for name, record in state["files"].items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {checkpoint!r} is damaged: {path!r} is missing")
        if os.path.getsize(path) != record["size"] or _sha256(path) != record["sha256"]:
            raise ValueError(
                f"checkpoint {checkpoint!r} is damaged: {path!r} differs from the file that was saved "
                f"({os.path.getsize(path)} bytes, {record['size']} recorded)"
            )
    return state


def read_training_state(checkpoint):
    """The JSON training state of `checkpoint`, or a ValueError naming the file and what is wrong with it."""
    path = os.path.join(checkpoint, TRAINING_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint!r} is not a checkpoint of this trainer (no {TRAINING_STATE_NAME})")
    try:
        with open(path) as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"the training state {path!r} is damaged: {error}") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"the training state {path!r} is damaged or from another trainer version: no {missing}")
    return state


def check_compatible(checkpoint, state, settings):
    """A ValueError naming every setting of this run that differs from the checkpoint's (COMPATIBILITY_KEYS)."""
    differences = []
    for key in COMPATIBILITY_KEYS:
        if key == "unet_config":
            saved, now = state[key], settings[key]
            keys = sorted(k for k in set(saved) | set(now) if not k.startswith("_") and saved.get(k) != now.get(k))
            differences += [f"model config {k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in keys]
        elif state[key] != settings[key]:
            differences.append(f"{key}: {state[key]!r} there, {settings[key]!r} here")
    if differences:
        raise ValueError(f"checkpoint {checkpoint!r} does not match this run: {'; '.join(differences)}")


# ----- writing -----


@contextlib.contextmanager
def quiet_checkpoint_logs():
    """accelerate logs six lines per save or load, and diffusers' EMAModel.from_pretrained warns about its own config
    keys; the trainer logs one line per checkpoint."""
    loggers = [logging.getLogger(name) for name in ("accelerate.accelerator", "accelerate.checkpointing", "diffusers")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def save_checkpoint(accelerator, output_dir, global_step, training_state, checkpoints_total_limit):
    """Save the full training state atomically, then keep only the newest `checkpoints_total_limit` checkpoints."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    partial = os.path.join(output_dir, f".partial-{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        with quiet_checkpoint_logs():
            accelerator.save_state(partial)  # every process writes its own RNG state into it
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {name: _record(os.path.join(partial, name)) for name in _files_under(partial)}
            with open(os.path.join(partial, TRAINING_STATE_NAME), "w") as f:
                json.dump(dict(training_state, global_step=global_step, files=files), f, indent=2)
            _fsync_tree(partial)  # on disk before the rename makes it visible to `latest`
    except (OSError, RuntimeError) as error:  # torch.save on a full disk: "[enforce fail at inline_container.cc]"
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free / 2**30
        raise RuntimeError(
            f"saving checkpoint {final!r} failed while writing {partial!r} ({free:.2f} GiB free on that disk): "
            f"{error}. The earlier checkpoints are untouched."
        ) from error
    if accelerator.is_main_process:
        if os.path.exists(final):  # the same step saved again (a resumed run's last step)
            remove_checkpoint(final)
        os.replace(partial, final)
        _fsync_dir(output_dir)
        if checkpoints_total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-checkpoints_total_limit]:
                remove_checkpoint(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint):
    with quiet_checkpoint_logs():
        accelerator.load_state(checkpoint)


def remove_checkpoint(path):
    # Rename first, so a run killed while deleting leaves no half-deleted folder that looks like a checkpoint
    trash = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def save_pipeline(pipeline, output_dir):
    """`pipeline.save_pretrained(output_dir)` where every file appears whole: written and fsync'ed in a temporary
    folder, then moved into place one atomic rename at a time, `model_index.json` last."""
    partial = os.path.join(output_dir, ".partial-pipeline")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial)
    _fsync_tree(partial)
    for name in sorted(_files_under(partial), key=lambda name: name == "model_index.json"):
        os.makedirs(os.path.dirname(os.path.join(output_dir, name)), exist_ok=True)
        os.replace(os.path.join(partial, name), os.path.join(output_dir, name))
    shutil.rmtree(partial)
    _fsync_dir(output_dir)


def _files_under(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


def _record(path):
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot sync a directory
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
