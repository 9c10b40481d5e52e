"""Checkpoints as safetensors files: atomic writes, metadata, never pickle.

A training checkpoint holds every tensor needed to resume (``model.*`` for the
student, teacher, queue and pointer; ``optimizer.*``; ``rng.*``) and string
metadata: the format and its version, the package version, the training
settings as JSON, and the epoch/step counters. :class:`TrainState` is what a run
changes as it trains; :func:`save_state` and :func:`restore_state` write it into
a checkpoint and read it back, side by side (docs/checkpoints.md lists the keys).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ressl._version import __version__
from ressl.atomic import write_atomic
from ressl.errors import CheckpointError, ConfigError
from ressl.jsontext import parse_json
from ressl.models.network import ReSSL, model_from_spec
from ressl.rules import is_number
from ressl.runs.checks import CheckedFile, check_file, check_finite
from ressl.runs.folder import resolve_checkpoint
from ressl.runs.metadata import EMPTY_HEALTH, FORMAT, FORMAT_VERSION, read_metadata

if TYPE_CHECKING:
    from ressl.distributed import World

log = logging.getLogger("ressl")

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
    "open_encoder",
    "resolve_checkpoint",
    "TrainState",
    "save_state",
    "restore_state",
]


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
    rest = parse_json(blob, "its metadata 'optimizer'")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in rest["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if state and set(state) != set(range(count)):  # after the first step, every one has state
        raise CheckpointError(f"it has optimizer state for {len(state)} of the {count} parameters")
    for group in rest["param_groups"]:
        for key, value in group.items():
            plain = value is None or isinstance(value, bool) or is_number(value)
            if key != "params" and not plain:
                raise CheckpointError(f"param group setting {key!r} is {value!r}, not a number")
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = optimizer.state.get(param, {})
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.shape != param.shape:
                    raise CheckpointError(
                        f"its {key} of shape {tuple(value.shape)} is for a parameter "
                        f"of shape {tuple(param.shape)}"
                    )
                if isinstance(value, Tensor) and value.stride() != param.stride():
                    # the parameter's layout (channels-last), as the first step made it: fused
                    # SGD reads parameter, gradient and buffer as one flat layout
                    entry[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


@dataclass
class TrainState:
    """What a training run changes as it trains: saved whole in every checkpoint.

    Attributes:
        model: Student, teacher, queue and queue pointer.
        optimizer: SGD over the student's parameters (momentum buffers included).
        views: This rank's augmentation generator, on the training device.
        epoch: Finished epochs.
        batch_in_epoch: Finished batches of the epoch in progress.
        loss_sum: Sum of the losses of those batches (for the epoch's mean).
        loss_count: How many losses ``loss_sum`` holds.
        health_sum: Per health measure, its window means times their steps, summed over the
            windows of the epoch in progress (``ressl.training.vitals``).
        health_steps: The steps ``health_sum`` covers.
        rows: The ``metrics.jsonl`` rows of the finished epochs.
    """

    model: ReSSL
    optimizer: torch.optim.Optimizer
    views: torch.Generator
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    health_sum: dict[str, float] = field(default_factory=dict)
    health_steps: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def step(self, steps_per_epoch: int) -> int:
        """Optimisation steps taken so far."""
        return self.epoch * steps_per_epoch + self.batch_in_epoch

    def next_epoch(self, row: dict[str, Any]) -> None:
        """Close the epoch in progress with its metrics ``row``."""
        self.rows.append(row)
        self.epoch += 1
        self.batch_in_epoch, self.loss_sum, self.loss_count = 0, 0.0, 0
        self.health_sum, self.health_steps = {}, 0


def _generator_tensors(views: torch.Generator, world: World) -> dict[str, Tensor]:
    """The generators' states; distributed, every rank's view generator (a collective)."""
    out = {"rng.views": views.get_state(), "rng.torch": torch.get_rng_state()}
    if world.distributed:
        states: list[Any] = [None] * world.size
        torch.distributed.all_gather_object(states, views.get_state())
        out.update({f"rng.views.rank{r}": state for r, state in enumerate(states) if r > 0})
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def save_state(
    path: Path,
    state: TrainState,
    *,
    settings: Mapping[str, Any],
    steps_per_epoch: int,
    world: World,
) -> Path:
    """Write ``state`` and the run's ``settings`` into the checkpoint at ``path``, atomically.

    Every rank must call it (the view generators are gathered); rank 0 writes.
    """
    generators = _generator_tensors(state.views, world)
    if not world.main:
        return path
    opt_tensors, opt_blob = optimizer_tensors(state.optimizer)
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors.update(generators)
    meta = {
        "world_size": str(world.size),
        "settings": json.dumps(dict(settings)),
        "optimizer": opt_blob,
        "epoch": str(state.epoch),
        "batch_in_epoch": str(state.batch_in_epoch),
        "step": str(state.step(steps_per_epoch)),
        "steps_per_epoch": str(steps_per_epoch),  # where the run is: ressl.runs.position
        "epoch_loss_sum": repr(state.loss_sum),
        "epoch_loss_count": str(state.loss_count),
        "epoch_health": json.dumps({"steps": state.health_steps, "sum": state.health_sum}),
        "metrics": json.dumps(state.rows[-1] if state.rows else {}),
        "rng_device": torch.device(state.views.device).type,
    }
    build = getattr(state.model, "backbone_build", None)
    if build is not None:  # how to rebuild the backbone with its own library
        meta["backbone_build"] = build.to_json()
    return save_checkpoint(path, tensors, meta)


def restore_state(
    state: TrainState,
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, str],
    *,
    world: World,
    reseed: int,
) -> None:
    """Load a checkpoint written by :func:`save_state` into a freshly built ``state``.

    A generator's state does not carry across device types or process counts: then
    this rank's view generator is seeded with ``reseed + step`` instead (the run
    continues correctly, not bitwise-identically, and says so).
    """
    state.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    try:
        load_optimizer_tensors(state.optimizer, tensors, meta["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"its optimizer state does not fit the model ({e})") from None
    _set_generators(state, tensors, meta, world=world, reseed=reseed)
    state.epoch, state.batch_in_epoch = int(meta["epoch"]), int(meta["batch_in_epoch"])
    state.loss_sum, state.loss_count = float(meta["epoch_loss_sum"]), int(meta["epoch_loss_count"])
    health = json.loads(meta.get("epoch_health", EMPTY_HEALTH))  # absent before ressl 0.4
    state.health_sum = {k: float(v) for k, v in health["sum"].items()}
    state.health_steps = int(health["steps"])


def _set_generators(
    state: TrainState,
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, str],
    *,
    world: World,
    reseed: int,
) -> None:
    key = "rng.views" if world.rank == 0 else f"rng.views.rank{world.rank}"
    saved_world, device = int(meta.get("world_size", "1")), torch.device(state.views.device).type
    same_kind = meta.get("rng_device", "cpu") == device and saved_world == world.size
    why = (
        f"the checkpoint was written by {saved_world} process(es) on "
        f"{meta.get('rng_device')}, resuming with {world.size} on {device}"
    )
    if same_kind and key in tensors:
        try:
            state.views.set_state(tensors[key])
            return _set_global_generators(tensors)
        except RuntimeError:  # not a state of this kind of generator
            why = f"its tensor {key} is not a generator state of this device"
    elif same_kind:
        why = f"it has no tensor {key}"
    if world.main:
        log.warning(
            "%s: augmentations are reseeded, so the run continues correctly but not "
            "bitwise-identically",
            why,
        )
    state.views.manual_seed(reseed + int(meta["step"]))
    _set_global_generators(tensors)


def _set_global_generators(tensors: Mapping[str, Tensor]) -> None:
    try:
        torch.set_rng_state(tensors["rng.torch"])
    except RuntimeError as e:
        raise CheckpointError(f"its tensor rng.torch is not a CPU generator state ({e})") from None
    if "rng.cuda" in tensors and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        except RuntimeError as e:
            raise CheckpointError(
                f"its tensor rng.cuda is not a CUDA generator state ({e})"
            ) from None


def open_encoder(
    path: str | Path, weights: str = "student", *, backbone: nn.Module | None = None
) -> tuple[nn.Module, CheckedFile]:
    """``load_encoder``, with the checked file (its metadata and specs) in place of the settings."""
    if weights not in ("student", "teacher"):
        raise ConfigError(f"weights must be 'student' or 'teacher', got {weights!r}")
    checked = check_file(path, backbone)  # sizes agree with the file's tensors before any is built
    tensors, _ = load_checkpoint(checked.path)
    check_finite(checked.path, tensors, prefix=f"model.{weights}.")
    model = model_from_spec(checked.model, backbone=backbone)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    encoder: nn.Module = getattr(model, weights)
    encoder.eval()
    return encoder, checked


def load_encoder(
    path: str | Path, weights: str = "student", *, backbone: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained encoder (backbone + head) from a checkpoint, ready for inference.

    Args:
        path: a ressl checkpoint file or run folder.
        weights: ``"student"`` (default; what the kNN monitor measures) or ``"teacher"`` (the EMA weights).
        backbone: for a run trained with an ``nn.Module`` backbone (``custom:`` in its
            settings), a module of the same architecture; its weights are replaced.

    Returns:
        ``(encoder, settings)``: an ``Encoder`` in eval mode whose ``forward``
        gives L2-normalised embeddings and ``features`` backbone features, and
        the run's training settings (dataset, image size, mean/std, ...).

    Raises:
        CheckpointError: on a bad file.
        ValueError: if ``weights`` is not "student" or "teacher", or a ``custom:``
            backbone is not given.
    """
    encoder, checked = open_encoder(path, weights, backbone=backbone)
    return encoder, checked.settings
