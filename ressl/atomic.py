"""Writing files atomically: a crash, a full disk or Ctrl-C leaves the old file or none,
never a half-written one. Used for checkpoints, ``metrics.jsonl``, ONNX files and
embedding files alike. No torch here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ressl.errors import ConfigError

__all__ = ["check_writable", "write_atomic"]


def check_writable(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Fail early, before any work, when ``path`` cannot be written.

    Missing parent folders are fine (they are created on writing).

    Raises:
        ValueError: ``path`` is a folder, or a parent is a file, or the folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} {path}: folder {parent} is not writable")
    return path


def write_atomic(
    path: str | os.PathLike[str], content: bytes | Callable[[IO[bytes]], Any], what: str = "output"
) -> Path:
    """Write ``content`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The data goes to a temporary file beside ``path``, is flushed to disk, and is then
    renamed over ``path``; the rename is made durable too. Parent folders are created;
    the file gets the usual permissions (0644 less the umask). No link is followed: the
    temporary file is created new (``O_EXCL``), and a link at ``path`` is replaced by the
    file, never written through.

    Returns:
        ``path``.

    Raises:
        ValueError: as :func:`check_writable`.
        OSError: the disk is full, or another I/O failure (the old file is kept).
    """
    path = check_writable(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "fchmod"):  # the file opened, not whatever the name holds by now
                os.fchmod(f.fileno(), 0o644 & ~_umask())
        if not hasattr(os, "fchmod"):  # Windows before Python 3.13
            os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a full disk: name the file it was writing
            raise OSError(e.errno, f"cannot write the {what}: {e.strerror or e}", str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable (not every file system supports it)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
