"""Checkpoints as safetensors files: atomic writes, metadata, never pickle.

A training checkpoint holds every tensor needed to resume (``model.*`` for the
student, teacher, queue and pointer; ``optimizer.*``; ``rng.*``) and string
metadata: the format and its version, the package version, the training
settings as JSON, and the epoch/step counters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ._version import __version__
from .atomic import write_atomic
from .runs import CheckpointError, resolve_checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "optimizer_tensors",
    "load_optimizer_tensors",
    "load_encoder",
    "resolve_checkpoint",
]

FORMAT = "ressl-checkpoint"
FORMAT_VERSION = "1"


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically.

    The file is written to a temporary name in the same folder, flushed to disk,
    then renamed over ``path``: a crash leaves either the old file or the new
    one, never a half-written one. The format tags and package version are added
    to the metadata.

    Args:
        path: destination ``.safetensors`` file; parent folders are created.
        tensors: name -> tensor (any device; saved contiguous on CPU).
        metadata: string -> string.

    Returns:
        The path written.
    """
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, ressl_version=__version__)
    payload = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    return write_atomic(path, payload, "checkpoint")


def _check_meta(path: Path, meta: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a ressl checkpoint (no format={FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; "
            f"this ressl reads version {FORMAT_VERSION}"
        )
    return meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ressl checkpoint (a file, or a run folder's ``last.safetensors``).

    Raises:
        CheckpointError: if the file is missing, not safetensors, or not a ressl checkpoint.
    """
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return _check_meta(path, f.metadata())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a ressl checkpoint, on CPU, without unpickling.

    Args:
        path: a ``.safetensors`` file or a run folder (its ``last.safetensors``).

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CheckpointError: if the file is missing, not safetensors, or not a ressl checkpoint.
    """
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], str]:
    """Flatten an optimiser's state into tensors (``optimizer.<param>.<key>``) and a JSON string."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                rest["state"].setdefault(str(idx), {})[key] = value
    return tensors, json.dumps(rest)


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], blob: str
) -> None:
    """Inverse of ``optimizer_tensors``: restore an optimiser's state in place."""
    rest = json.loads(blob)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in rest["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def load_encoder(path: str | Path, weights: str = "student") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained encoder (backbone + head) from a checkpoint, ready for inference.

    Args:
        path: a ressl checkpoint file or run folder.
        weights: ``"student"`` (default; what the kNN monitor measures) or ``"teacher"`` (the EMA weights).

    Returns:
        ``(encoder, settings)``: an ``Encoder`` in eval mode whose ``forward``
        gives L2-normalised embeddings and ``features`` backbone features, and
        the run's training settings (dataset, image size, mean/std, ...).

    Raises:
        CheckpointError: on a bad file.
        ValueError: if ``weights`` is not "student" or "teacher".
    """
    from .model import ReSSL

    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    tensors, meta = load_checkpoint(path)
    settings = json.loads(meta["settings"])
    model = ReSSL(
        settings["backbone"],
        in_channels=settings["channels"],
        image_size=settings["image_size"],
        hidden_dim=settings["hidden_dim"],
        embed_dim=settings["embed_dim"],
        queue_size=settings["queue_size"],
        width=settings["width"],
    )
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    encoder = getattr(model, weights)
    encoder.eval()
    return encoder, settings
