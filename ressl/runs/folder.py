"""The run folder: the files a training run writes, and finding a checkpoint from a path.

A run folder (``ressl train --out RUN``) holds ``last.safetensors`` (the checkpoint),
``metrics.jsonl`` (one JSON object per finished epoch), ``steps.jsonl``, ``.lock``,
perhaps ``tensorboard/`` and, once evaluated, ``eval.jsonl``. ressl writes these itself,
so each is a regular file (a folder for ``tensorboard``): a link among them is refused,
never followed, since a shared or downloaded run folder could point it at any file of
the user's (:func:`open_run_file`). No torch here, so the command line can check paths
before it loads any.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ressl.atomic import write_atomic
from ressl.errors import CheckpointError, RunFileError
from ressl.jsontext import parse_json

__all__ = [
    "CHECKPOINT",
    "EVAL_LOG",
    "LOCK",
    "METRICS",
    "RUN_FILES",
    "STEPS",
    "TENSORBOARD",
    "CheckpointError",
    "RunFileError",
    "append_run_file",
    "check_run_folder",
    "open_run_file",
    "read_metrics",
    "read_run_file",
    "resolve_checkpoint",
    "write_metrics",
]

CHECKPOINT = "last.safetensors"
METRICS = "metrics.jsonl"
EVAL_LOG = "eval.jsonl"
#: The per-step stream (``ressl.training.steplog``).
STEPS = "steps.jsonl"
#: The lock a training run holds (``ressl.runs.lock``).
LOCK = ".lock"
#: The TensorBoard folder (``--log tensorboard``).
TENSORBOARD = "tensorboard"
#: Every file ressl writes in a run folder (each a regular file), and the folder it writes.
RUN_FILES = (CHECKPOINT, METRICS, STEPS, EVAL_LOG, LOCK)
RUN_FOLDERS = (TENSORBOARD,)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # (Windows has none: a check before opening instead)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a named pipe must not block the open
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
#: What opening a link (ELOOP; EMLINK on FreeBSD), a pipe without a reader (ENXIO) or a
#: folder (EISDIR) fails with under these flags.
_NOT_REGULAR = (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR)


def not_regular(path: Path, *, folder: bool = False) -> RunFileError:
    """The error for the run-folder file ``path`` as it is now (a link, or not a regular
    file; not a folder with ``folder``)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        what, fix = "a symbolic link", "replace it by the file it points to, or remove it"
    elif folder:
        what, fix = "not a folder", "remove it"
    else:
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        fix = "remove it"
    return RunFileError(
        f"{path} is {what}; ressl does not follow links or use special files in a run "
        f"folder (they could point anywhere): {fix}"
    )


def open_run_file(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """A descriptor on the run-folder file ``path``, opened with ``flags`` (``os.O_*``) without
    following a link and without blocking on a named pipe; the one way ressl opens the
    files of a run folder in place (the lock, appended logs, reads).

    Raises:
        RunFileError: ``path`` is a link, a folder, a pipe or any other non-regular file
            (nothing is opened, created or changed, here or where a link points).
        FileNotFoundError: ``path`` is missing and ``flags`` has no ``O_CREAT``.
    """
    path = Path(path)
    if not _NOFOLLOW and path.is_symlink():
        raise not_regular(path)
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY, mode)
    except OSError as e:
        if e.errno in _NOT_REGULAR:
            raise not_regular(path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular(path)
        if _NONBLOCK:  # a regular file: back to ordinary blocking I/O
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_run_file(path: str | Path, text: str) -> None:
    """Append ``text`` (UTF-8) to the run-folder file ``path``, created if missing.

    Raises:
        RunFileError: as :func:`open_run_file`.
    """
    fd = open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "ab") as f:
        f.write(text.encode("utf-8"))


def read_run_file(path: str | Path) -> str | None:
    """The text of the run-folder file ``path`` (undecodable bytes replaced), None if missing.

    Raises:
        RunFileError: as :func:`open_run_file`.
    """
    try:
        fd = open_run_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def check_run_folder(folder: str | Path) -> None:
    """Refuse a run folder where a file ressl writes (:data:`RUN_FILES`, :data:`RUN_FOLDERS`)
    is a link or of the wrong kind, before a run writes anything there.

    Raises:
        RunFileError: naming the first such file.
    """
    folder = Path(folder)
    for name in (*RUN_FILES, *RUN_FOLDERS):
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:
            continue
        is_folder = name in RUN_FOLDERS
        if not (stat.S_ISDIR if is_folder else stat.S_ISREG)(mode):
            raise not_regular(folder / name, folder=is_folder)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file a path names: the file itself, or a run folder's ``last.safetensors``.

    Raises:
        CheckpointError: there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_metrics(
    path: str | Path,
    upto_epoch: int | None = None,
    *,
    on_bad_line: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none if it is missing), up to ``upto_epoch``.

    Args:
        on_bad_line: called with the problem of each line that is not a row, which is then
            skipped (a resume repairs the file from its checkpoint); None: such a line raises.

    Raises:
        ValueError: a line is not a JSON object with an ``epoch`` >= 1 (naming the line).
        RunFileError: the file is a link or not a regular file.
    """
    path = Path(path)
    text = read_run_file(path)
    rows = []
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path} line {number}")
            if not isinstance(row, dict):
                raise CheckpointError(f"{path} line {number} is not a JSON object")
            epoch = row.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
                raise CheckpointError(f"{path} line {number} has no epoch number (an integer >= 1)")
        except ValueError as e:
            if on_bad_line is None:
                raise
            on_bad_line(str(e))
            continue
        if upto_epoch is None or epoch <= upto_epoch:
            rows.append(row)
    return rows


def write_metrics(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite a ``metrics.jsonl`` atomically, one strict JSON object per line (no NaN).

    Raises:
        ValueError: a row holds a NaN or an infinity (nothing is written).
    """
    try:
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    except ValueError:
        raise ValueError(f"{path}: a metrics row holds a value that is not finite") from None
    write_atomic(path, text.encode(), "metrics file")
