"""Writing outputs atomically (ONNX files, embedding files) and the embedding file format.

An embedding file is a numpy ``.npz`` archive, readable with
``np.load(path)`` (no pickle):

* ``embeddings``: float32 ``(N, D)``, row i the L2-normalised embedding of ``paths[i]``;
* ``paths``: str ``(N,)``, the file each row came from, as it was found;
* ``skipped``: str ``(M,)``, files that could not be read;
* ``model``: str ``()``, the encoder's metadata as JSON (backbone, weights, sha256 ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["check_writable", "write_atomic", "save_embeddings", "load_embeddings"]


def check_writable(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Fail early, before any work, when ``path`` cannot be written.

    Missing parent folders are fine (they are created on writing).

    Raises:
        ValueError: ``path`` is a folder, or a parent is a file, or the folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: folder {parent} is not writable")
    return path


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file through ``write(f)`` to a temporary name beside ``path``, then rename it over ``path``.

    A crash or Ctrl-C leaves the old file or none, never a half-written one.
    Parent folders are created.
    """
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_embeddings(
    path: str | os.PathLike[str],
    embeddings: np.ndarray,
    paths: Sequence[str],
    skipped: Sequence[str] = (),
    model: Mapping[str, str] | None = None,
) -> Path:
    """Write an embedding file (format in this module's docstring) atomically.

    Args:
        path: destination, conventionally ``.npz``.
        embeddings: float32 ``(N, D)``.
        paths: ``N`` source file names, one per row.
        skipped: files that could not be read.
        model: the encoder's metadata.

    Raises:
        ValueError: rows and paths disagree.
    """
    if embeddings.ndim != 2 or len(embeddings) != len(paths):
        raise ValueError(
            f"embeddings have shape {embeddings.shape} but there are {len(paths)} paths"
        )
    arrays = {
        "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
        "paths": np.array(list(paths), dtype=np.str_).reshape(len(paths)),
        "skipped": np.array(list(skipped), dtype=np.str_).reshape(len(skipped)),
        "model": np.array(json.dumps(dict(model or {}), sort_keys=True)),
    }
    return write_atomic(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def load_embeddings(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Read an embedding file: ``(embeddings (N, D), paths, {"skipped": [...], "model": {...}})``."""
    with np.load(path, allow_pickle=False) as z:
        extra = {"skipped": z["skipped"].tolist(), "model": json.loads(str(z["model"]))}
        return z["embeddings"], z["paths"].tolist(), extra
