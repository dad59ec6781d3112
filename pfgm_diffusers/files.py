"""Writing files safely: whole or not at all, and only inside the folder they belong to.

One helper for the library, the trainer, the scripts and the benchmarks:

- `atomic_write(path, data, folder=None)` (and `atomic_write_json`): the bytes go to a new temporary file beside
  `path`, are fsync'ed and renamed over `path`, so a reader or a crash never sees half a file. The rename replaces a
  symbolic link at `path` instead of writing through it.
- `inside(folder, *parts)`: the path `folder/parts...`, or a `ValueError` when it would leave `folder` or pass through
  a symbolic link below it (a link planted in an output folder must not redirect a write elsewhere).
- `check_file_name(name)`: a relative name of plain components (what a file manifest may list).
- `check_output_file(path)`, `check_output_folder(path)`: that a path can be written, checked before long work.
"""

import errno
import json
import os
import secrets

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "check_file_name",
    "check_output_file",
    "check_output_folder",
    "fsync_dir",
    "fsync_tree",
    "inside",
    "makedirs",
]


def inside(folder, *parts):
    """`os.path.join(folder, *parts)`, after checking that it stays inside `folder` and that no existing component
    below `folder` (the last one included) is a symbolic link.

    Args:
        folder (`str` or `os.PathLike`): the folder the path must stay in; it may itself be a link (the user's choice).
        *parts (`str` or `os.PathLike`): components or relative paths below `folder`; an absolute path is allowed
            when it lies inside `folder`.

    Returns:
        `str`: the joined path.

    Raises:
        `ValueError`: naming the path and the link or the `..` that takes it out of `folder`.
    """
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, *map(os.fspath, parts))
    if os.pardir in path.split(os.sep):
        raise ValueError(f"refusing to write {path!r}: no `..` below {folder!r}")
    relative = os.path.relpath(path, folder)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ValueError(f"refusing to write {path!r}: it lies outside {folder!r}")
    current = folder
    for part in [] if relative == os.curdir else relative.split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise ValueError(
                f"refusing to write {path!r}: {current!r} is a symbolic link (to {os.readlink(current)!r}); "
                f"the files of {folder!r} are written only inside it: remove the link"
            )
    return path


def makedirs(folder, *parts):
    """`os.makedirs` of `inside(folder, *parts)`, re-checked after creation; returns the path."""
    path = inside(folder, *parts)
    os.makedirs(path, exist_ok=True)
    return inside(folder, *parts)  # a link put in place while the folders were made


def check_file_name(name):
    """A `ValueError` unless `name` is relative and made of plain components joined by `/` (no `..`, `.`, empty part,
    backslash or absolute path): the only names a file manifest may list."""
    parts = name.split("/") if isinstance(name, str) else None
    if not parts or any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        raise ValueError(f"{name!r} is not a plain relative file name (no '..', no absolute path)")
    return name


def atomic_write(path, data, folder=None):
    """Write `data` (`bytes`, or `str` encoded as UTF-8) to `path` whole or not at all.

    Args:
        path (`str` or `os.PathLike`): the file; its folder must exist. A symbolic link at `path` is replaced, never
            written through.
        data (`bytes` or `str`): the content.
        folder (`str` or `os.PathLike`, *optional*): when given, `path` must lie inside it and pass through no
            symbolic link below it (`inside`).
    """
    path = os.fspath(path)
    if folder is not None:
        path = inside(folder, os.path.abspath(path))
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: a new file, never an existing one or a link; permissions as for any new file (the umask's)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise
    fsync_dir(directory)


def atomic_write_json(path, obj, folder=None, indent=2):
    """`atomic_write` of `obj` as JSON."""
    atomic_write(path, json.dumps(obj, indent=indent) + "\n", folder=folder)


def fsync_tree(folder):
    """fsync every file and folder under `folder` (before a rename makes them visible)."""
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(folder):
    """fsync a folder's entries (a rename in it is then on disk); a file system that cannot is skipped."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def check_output_file(path):
    """A `ValueError` unless a file can be written at `path`: not a folder, under no file, below a folder the user
    may write (missing folders between are the writer's to create). For a check before long work (sampling, say)
    whose results a failed write would lose."""
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r} is a folder; give the path of a file")
    _check_creatable(os.path.dirname(os.path.abspath(path)), path)


def check_output_folder(path):
    """A `ValueError` unless `path` is a folder, or one that can be created, that the user may write into."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r} is a file, not a folder")
    _check_creatable(os.path.abspath(path), path)


def _check_creatable(folder, path):
    existing = folder
    while not os.path.lexists(existing):  # the nearest existing ancestor: the writer creates the folders below it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{os.fspath(path)!r} lies under {existing!r}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{os.fspath(path)!r} cannot be written: the folder {existing!r} is not writable")
