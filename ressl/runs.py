"""The run folder: the files a training run writes, and finding a checkpoint from a path.

A run folder (``ressl train --out RUN``) holds ``last.safetensors`` (the checkpoint),
``metrics.jsonl`` (one JSON object per finished epoch) and, once evaluated,
``eval.jsonl``. No torch here, so the command line can check paths before it loads any.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_atomic

__all__ = [
    "CHECKPOINT",
    "EVAL_LOG",
    "METRICS",
    "CheckpointError",
    "read_metrics",
    "resolve_checkpoint",
    "write_metrics",
]

CHECKPOINT = "last.safetensors"
METRICS = "metrics.jsonl"
EVAL_LOG = "eval.jsonl"


class CheckpointError(ValueError):
    """A file is missing, not a safetensors file, or not a ressl checkpoint."""


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


def read_metrics(path: str | Path, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none if it is missing), up to ``upto_epoch``.

    Raises:
        ValueError: a line is not a JSON object with an ``epoch`` >= 1 (naming the line).
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path} line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object")
        epoch = row.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError(f"{path} line {number} has no epoch number (an integer >= 1)")
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
