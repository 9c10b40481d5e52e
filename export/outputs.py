"""The embedding file format, written atomically (``ressl.atomic``).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ressl.atomic import write_atomic  # torch-free
from ressl.jsontext import parse_json  # torch-free

__all__ = ["save_embeddings", "load_embeddings"]


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
    return write_atomic(path, lambda f: np.savez(f, **arrays), "embedding file")  # type: ignore[arg-type]


def load_embeddings(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Read an embedding file: ``(embeddings (N, D), paths, {"skipped": [...], "model": {...}})``."""
    with np.load(path, allow_pickle=False) as z:
        model = parse_json(str(z["model"]), f"{path}: its 'model'")
        extra = {"skipped": z["skipped"].tolist(), "model": model}
        return z["embeddings"], z["paths"].tolist(), extra
