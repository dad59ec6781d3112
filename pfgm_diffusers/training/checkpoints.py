"""The trainer's output folder: one run at a time, atomic checkpoints that are verified before a resume, pipelines.

A checkpoint is `checkpoint-<step>`: accelerate's state (model, optimizer, lr schedule, every process's RNG state),
the EMA weights in `unet_ema/`, and `pfgm_training_state.json` with the step, the settings a resume must match, the
size and SHA-256 of every file and its own SHA-256. It is written under `.partial-checkpoint-<step>`, fsync'ed and
renamed, so `latest` only ever sees complete checkpoints; a resume re-checks the state and every file against the
record, so a truncated or altered file (weights, optimizer, random state, the state itself) is refused by name instead
of loading into a different run, and a file list naming anything outside the checkpoint is refused before any read.
Everything is written inside the output folder and never through a link in it (`pfgm_diffusers.files.inside`).
"""

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import warnings

from accelerate.logging import get_logger

from pfgm_diffusers.files import atomic_write, atomic_write_json, check_file_name, fsync_dir, fsync_tree, inside

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "pfgm_training_state.json"
ARGS_NAME = "training_args.json"  # the resolved arguments without secrets, beside the saved pipeline
LOCK_NAME = ".pfgm_train.lock"
# Written by this trainer into every output folder it claims: the proof that the folder is a run of this trainer, so
# that --overwrite_output_dir deletes only what a run wrote, never a user's own logs/ or samples/
RUN_MARKER = "pfgm_run.json"
# What a run writes into its output folder besides checkpoints; another run's copies are never silently mixed in
RUN_OUTPUTS = ("model_index.json", "unet", "scheduler", "vae", "samples", "samples.png", ARGS_NAME)
# Settings stored in every checkpoint: a resume with different values would load weights into another model or train
# another objective (the scheduler's config holds sigma_data and the sampler's range, loss_config the loss's settings)
COMPATIBILITY_KEYS = ("objective", "aug_dim", "resolution", "class_names", "unet_config", "scheduler_config")
COMPATIBILITY_KEYS += ("loss_config",)
# Compared when the checkpoint has it: what the run trains on that no model config shows (the digits' split, the
# source of conditions, a built-in task's settings: denoise and superres models have the same channels). Checkpoints
# written before it was recorded have none, and still resume
OPTIONAL_COMPATIBILITY_KEYS = ("data_config",)
STATE_KEYS = ("global_step", "scheduler_config", "files")
STATE_KEYS += tuple(key for key in COMPATIBILITY_KEYS if key not in STATE_KEYS)
# The batch the checkpoint was trained with: a resume may change it (the lr schedule follows the optimizer step)
STATE_KEYS += ("num_processes", "global_batch_size", "state_sha256")


# ----- one run per output folder -----


class OutputDirLock:
    """A lock file holding "pid hostname": a second run into the same folder is refused while the first one lives.
    A lock whose process is dead (on this host) is stale and taken over with a warning.

    The lock appears whole: the line is written to a temporary file that is then hard-linked to the lock's name
    (which fails if the name exists, as O_EXCL does), so no other run can read an empty lock and take it over."""

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.path = inside(output_dir, LOCK_NAME)
        self.held = False

    def acquire(self):
        while not self.held:
            temporary = inside(self.output_dir, f"{LOCK_NAME}.{secrets.token_hex(4)}.tmp")
            atomic_write(temporary, f"{os.getpid()} {socket.gethostname()}\n", folder=self.output_dir)
            try:
                os.link(temporary, self.path, follow_symlinks=False)
                self.held = True
            except FileExistsError:
                self._check_stale()
            finally:
                os.remove(temporary)

    def _check_stale(self):
        how_to_remove = f"if no run uses {self.output_dir!r}, delete the lock file {self.path!r}"
        if os.path.islink(self.path):
            raise ValueError(f"the lock file {self.path!r} is a symbolic link, not this trainer's: {how_to_remove}")
        try:
            with open(self.path) as f:
                content = f.read()
        except FileNotFoundError:
            return  # released meanwhile
        try:
            pid, host = content.split()
            pid = int(pid)
        except ValueError:  # this trainer writes its lock whole: an empty or garbled one is not a stale lock of it
            raise ValueError(
                f"{self.output_dir!r} holds a lock file {self.path!r} that is not this trainer's ({content[:40]!r}): "
                f"another program may be writing into the folder; {how_to_remove}"
            ) from None
        if host != socket.gethostname():
            raise ValueError(
                f"{self.output_dir!r} is locked by a run on {host} (pid {pid}): wait for it, or delete "
                f"{self.path!r} if that run is gone"
            )
        if pid != os.getpid() and _process_alive(pid):
            raise ValueError(
                f"another run (pid {pid}) is training into {self.output_dir!r}: wait for it to finish or choose "
                f"another --output_dir. The lock file is {self.path!r}: if process {pid} is not a run of this trainer "
                "(a reused pid after a crash), delete that file"
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
    """Lock `output_dir` for this run and mark it as a run of this trainer (RUN_MARKER). A new run into another run's
    folder is refused unless `overwrite`, which removes that run's checkpoints, pipeline, samples and logs (and says
    what it removed); a folder this trainer never claimed is refused whatever the flags, naming what it holds, so
    that nothing of the user's is deleted or mixed with a run. Returns the lock."""
    os.makedirs(output_dir, exist_ok=True)
    lock = OutputDirLock(output_dir)
    lock.acquire()
    try:
        previous = previous_run_outputs(output_dir, logging_dir)
        marker = inside(output_dir, RUN_MARKER)
        ours = os.path.isfile(marker) or (resuming and list_checkpoints(output_dir))
        if previous and not ours:
            held = ", ".join(name for name in sorted(os.listdir(output_dir)) if name != LOCK_NAME)
            raise ValueError(
                f"--output_dir {output_dir!r} is not a run of this trainer (no {RUN_MARKER}) but holds {held}: "
                "choose a new or empty --output_dir (--overwrite_output_dir replaces only a run of this trainer)"
            )
        if previous and not resuming:
            if not overwrite:
                raise ValueError(
                    f"--output_dir {output_dir!r} holds another run ({', '.join(previous)}): pass "
                    "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or choose "
                    "another --output_dir"
                )
            logger.warning(f"--overwrite_output_dir: removing {', '.join(previous)} from {output_dir}")
            for name in previous:
                remove_output(output_dir, name)
        remove_partial_checkpoints(output_dir)
        logs = os.path.relpath(os.path.join(output_dir, logging_dir), output_dir)
        if not logs.startswith(os.pardir):  # the trackers write there: no link may lead them out of the folder
            inside(output_dir, logs)
        atomic_write_json(marker, dict(trainer="pfgm_diffusers training/train_pfgm.py"), folder=output_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def remove_unused_output_dir(output_dir):
    """Remove `output_dir`, which a run that failed created, if it holds only what claiming it wrote (the mark, the
    lock, the arguments): a failed start leaves no folder that would refuse the next run."""
    if os.path.isdir(output_dir) and set(os.listdir(output_dir)) <= {RUN_MARKER, LOCK_NAME, ARGS_NAME}:
        shutil.rmtree(output_dir)


def previous_run_outputs(output_dir, logging_dir):
    """Names in `output_dir` that a training run wrote: checkpoints, the pipeline, samples, arguments, logs."""
    logs = os.path.relpath(os.path.join(output_dir, logging_dir), output_dir).split(os.sep)[0]  # --logging_dir
    outputs = RUN_OUTPUTS + (() if logs.startswith("..") else (logs,))
    return [name for name in sorted(os.listdir(output_dir)) if name.startswith(CHECKPOINT_PREFIX) or name in outputs]


def remove_output(output_dir, name):
    """Delete `output_dir/name`: a folder with its files, a file, or a link itself (never what it points to)."""
    path = os.path.join(output_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def remove_partial_checkpoints(output_dir):
    """Leftovers of a killed run: checkpoints and pipelines being written, checkpoints being deleted."""
    for name in os.listdir(output_dir):
        if name.startswith((".partial-", ".deleting-")):
            remove_output(output_dir, name)


# ----- finding, verifying and reading a checkpoint -----


def list_checkpoints(output_dir):
    """Checkpoints in `output_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(CHECKPOINT_PREFIX) :]
        # ASCII digits only: `str.isdigit` also accepts "²", which int() refuses
        if name.startswith(CHECKPOINT_PREFIX) and step.isascii() and step.isdigit():
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
    """The training state of `checkpoint` after checking it against its own SHA-256 and every file it lists against
    its recorded size and SHA-256. The list may name only plain relative names inside the checkpoint, and no file may
    be a symbolic link: nothing outside the checkpoint is read, hashed or described."""
    state = read_training_state(checkpoint)
    files = state["files"]
    if not isinstance(files, dict) or not all(isinstance(record, dict) for record in files.values()):
        raise ValueError(f"the training state of {checkpoint!r} is damaged: its file list is not a mapping of records")
    for name in files:  # every name first: nothing is read before the whole list is known to stay inside
        try:
            check_file_name(name)
        except ValueError as error:
            raise ValueError(f"checkpoint {checkpoint!r} is refused: its file list names {error}") from None
    for name, record in files.items():
        path = os.path.join(checkpoint, name)
        link = _first_link(checkpoint, name)
        if link is not None:
            raise ValueError(f"checkpoint {checkpoint!r} is refused: {link!r} is a symbolic link")
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {checkpoint!r} is damaged: {path!r} is missing")
        if os.path.getsize(path) != record.get("size") or _sha256(path) != record.get("sha256"):
            raise ValueError(
                f"checkpoint {checkpoint!r} is damaged: {path!r} differs from the file that was saved "
                f"({os.path.getsize(path)} bytes, {record.get('size')} recorded)"
            )
    return state


def _first_link(folder, name):
    """The first component of `folder/name` below `folder` that is a symbolic link, or None."""
    path = folder
    for part in name.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            return path
    return None


def read_training_state(checkpoint):
    """The JSON training state of `checkpoint`, checked against its own SHA-256 (`state_sha256`, of the rest of the
    state), or a ValueError naming the file and what is wrong with it."""
    path = os.path.join(checkpoint, TRAINING_STATE_NAME)
    if os.path.islink(path):
        raise ValueError(f"{checkpoint!r} is refused: its training state {path!r} is a symbolic link")
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
    if state["state_sha256"] != state_sha256(state):
        raise ValueError(
            f"the training state {path!r} is damaged: it differs from the state that was saved (its SHA-256 does not "
            "match the one recorded in it)"
        )
    return state


def state_sha256(state):
    """SHA-256 of the training state without its own checksum, in a canonical JSON form."""
    rest = {key: value for key, value in state.items() if key != "state_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_compatible(checkpoint, state, settings):
    """A ValueError naming every setting of this run that differs from the checkpoint's (COMPATIBILITY_KEYS), with the
    checkpoint's value and this run's: the model, the data's shape and classes, and every scheduler and loss setting
    (sigma_data, the sigma range, P_mean...) that changes what the network learns, and the data settings
    (OPTIONAL_COMPATIBILITY_KEYS) where the checkpoint records them."""
    names = dict(unet_config="model config ", scheduler_config="scheduler config ", loss_config="loss setting ")
    names["data_config"] = "data setting "
    differences = []
    for key in COMPATIBILITY_KEYS + tuple(key for key in OPTIONAL_COMPATIBILITY_KEYS if key in state):
        saved, now = state[key], settings[key]
        if key in names and isinstance(saved, dict) and isinstance(now, dict):
            keys = sorted(k for k in set(saved) | set(now) if not k.startswith("_") and saved.get(k) != now.get(k))
            differences += [f"{names[key]}{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in keys]
        elif saved != now:
            differences.append(f"{key}: {saved!r} there, {now!r} here")
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
    final = inside(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")  # no write through a planted link
    partial = inside(output_dir, f".partial-{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        with quiet_checkpoint_logs():
            accelerator.save_state(partial)  # every process writes its own RNG state into it
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {name: _record(os.path.join(partial, name)) for name in _files_under(partial)}
            state = dict(training_state, global_step=global_step, files=files)
            state["state_sha256"] = state_sha256(state)  # the state itself is checked too: an edit is refused
            atomic_write_json(os.path.join(partial, TRAINING_STATE_NAME), state, folder=output_dir)
            fsync_tree(partial)  # on disk before the rename makes it visible to `latest`
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
        fsync_dir(output_dir)
        if checkpoints_total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-checkpoints_total_limit]:
                remove_checkpoint(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_checkpoint(accelerator, checkpoint):
    """`accelerator.load_state(checkpoint)` without its per-file lines, but with its one warning made loud: a random
    state it could not restore makes the resumed run draw other noise than an uninterrupted run would."""
    records = _Records()
    checkpointing = logging.getLogger("accelerate.checkpointing")
    with quiet_checkpoint_logs():
        checkpointing.setLevel(logging.INFO)  # to `records` only: quiet_checkpoint_logs restores the level
        propagate, checkpointing.propagate = checkpointing.propagate, False
        checkpointing.addHandler(records)
        try:
            accelerator.load_state(checkpoint)
        finally:
            checkpointing.removeHandler(records)
            checkpointing.propagate = propagate
    path = os.path.join(checkpoint, f"random_states_{accelerator.process_index}.pkl")
    # accelerate says it on the main process only; a missing file is the other processes' case
    if any("Could not load random states" in message for message in records.messages) or not os.path.isfile(path):
        logger.warning(
            f"could not restore the random state {path!r} (accelerate: 'Could not load random states'): process "
            f"{accelerator.process_index} continues with other random draws than an uninterrupted run, so this "
            "resume is not reproducible",
            main_process_only=False,
        )


def remove_checkpoint(path):
    # Rename first, so a run killed while deleting leaves no half-deleted folder that looks like a checkpoint
    trash = inside(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    inside(os.path.dirname(path), os.path.basename(path))
    os.replace(path, trash)
    shutil.rmtree(trash)


def save_pipeline(pipeline, output_dir):
    """`pipeline.save_pretrained(output_dir)` where every file appears whole: written and fsync'ed in a temporary
    folder, then moved into place one atomic rename at a time, `model_index.json` last. Nothing is written through a
    symbolic link in `output_dir` (a ValueError names it, before any file is moved)."""
    partial = inside(output_dir, ".partial-pipeline")
    if os.path.exists(partial):
        shutil.rmtree(partial)
    pipeline.save_pretrained(partial)
    fsync_tree(partial)
    names = sorted(_files_under(partial), key=lambda name: name == "model_index.json")
    try:
        targets = [inside(output_dir, name) for name in names]
    except ValueError:
        shutil.rmtree(partial)
        raise
    for name, target in zip(names, targets, strict=True):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(partial, name), target)
    shutil.rmtree(partial)
    fsync_dir(output_dir)


def _files_under(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )


def _record(path):
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
