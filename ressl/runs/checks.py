"""Checking a checkpoint before anything is built from it: a file may be foreign or crafted.

Every metadata field a command uses is checked for presence, type and range, and the
model's tensors for name, dtype and shape against a model built on the ``meta`` device
(shapes only, no memory) from the specs its settings hold (``ressl.config.specs``). So a
model is only ever allocated from sizes that the file itself holds and that agree with
its settings: a crafted
``queue_size`` or ``width`` cannot make ressl allocate more than the file's own tensors.
Every problem is one :class:`ressl.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ressl.config.specs import DataSpec, ModelSpec
from ressl.errors import CheckpointError, ConfigError
from ressl.models.network import model_from_spec
from ressl.rules import is_int
from ressl.runs.folder import resolve_checkpoint
from ressl.runs.metadata import count, metadata_json, read_metadata

__all__ = [
    "CheckedFile",
    "check_file",
    "check_finite",
    "check_loaded",
    "check_resumable",
    "count",
    "metadata_json",
    "expected_model",
]

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.uint8: "U8",
}


@dataclass
class CheckedFile:
    """A checkpoint whose metadata and model tensors passed the checks (no data loaded).

    Attributes:
        path: The file.
        meta: Its string metadata.
        settings: The training settings (a resume checks the config's fields as
            ``ressl.config.resuming.from_saved`` builds its config).
        header: Tensor name -> (safetensors dtype, shape), from the file's header.
        model: The model the settings describe, checked.
        data: What the data told the run, checked.
    """

    path: Path
    meta: dict[str, str]
    settings: dict[str, Any]
    header: dict[str, tuple[str, tuple[int, ...]]]
    model: ModelSpec
    data: DataSpec


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def expected_model(
    spec: ModelSpec, backbone: nn.Module | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``model.*`` tensor name -> (dtype, shape) of the model ``spec`` describes (no memory).

    Args:
        backbone: the module of a ``custom:`` backbone.
    """
    model = model_from_spec(spec, backbone=backbone, meta=True)
    return {
        f"model.{k}": (_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        for k, t in model.state_dict().items()
    }


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check_model(
    path: Path,
    header: Mapping[str, tuple[str, tuple[int, ...]]],
    spec: ModelSpec,
    backbone: nn.Module | None,
) -> None:
    try:
        expected = expected_model(spec, backbone)
    except (RuntimeError, ValueError, OverflowError) as e:  # sizes no tensor can have
        raise _fail(path, f"its settings describe a model that cannot be built ({e})") from None
    held = {k: v for k, v in header.items() if k.startswith("model.")}
    missing = sorted(set(expected) - set(held))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _fail(path, f"it has no tensor {missing[0]}{more}, which its settings' model has")
    extra = sorted(set(held) - set(expected))
    if extra:
        raise _fail(path, f"its tensor {extra[0]} is not part of the model its settings describe")
    for name, (dtype, shape) in expected.items():
        if held[name] != (dtype, shape):
            got_dtype, got_shape = held[name]
            raise _fail(
                path,
                f"its tensor {name} is {got_dtype} {_shape(got_shape)}, but its settings "
                f"(backbone {spec.backbone}, width {spec.width}, queue_size "
                f"{spec.queue_size}, embed_dim {spec.embed_dim}, ...) make it "
                f"{dtype} {_shape(shape)}",
            )


def check_file(path: str | Path, backbone: nn.Module | None = None) -> CheckedFile:
    """Check a checkpoint's metadata, the specs its settings hold, and its model tensors
    (their header only, against the model the specs build).

    A ``custom:`` backbone's tensors are compared only when its module is given as
    ``backbone`` (nothing else says what they should be).

    Raises:
        CheckpointError: the first problem, naming the file and the field.
    """
    path = resolve_checkpoint(path)
    return _checked(path, read_metadata(path), _header(path), backbone)


def check_loaded(
    path: Path,
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, str],
    backbone: nn.Module | None = None,
) -> CheckedFile:
    """``check_file`` of a checkpoint already read (``load_checkpoint``'s tensors and metadata)."""
    header = {k: (_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in tensors.items()}
    return _checked(path, dict(meta), header, backbone)


def _checked(
    path: Path,
    meta: dict[str, str],
    header: dict[str, tuple[str, tuple[int, ...]]],
    backbone: nn.Module | None,
) -> CheckedFile:
    settings = metadata_json(path, meta, "settings", dict)
    model = ModelSpec.from_settings(settings, str(path))
    data = DataSpec.from_settings(settings, model.channels, str(path))
    custom = model.backbone.startswith("custom:")
    if backbone is not None and not custom:
        raise ConfigError(
            f"backbone= rebuilds a custom module; {path} was trained with {model.backbone}, "
            "which ressl builds itself: leave backbone unset"
        )
    if backbone is not None or not custom:
        _check_model(path, header, model, backbone)
    return CheckedFile(path, meta, settings, header, model, data)


def check_finite(path: Path, tensors: Mapping[str, Tensor], prefix: str = "model.") -> None:
    """Refuse weights holding a NaN or an infinity (a diverged or corrupted run)."""
    for name, t in tensors.items():
        if name.startswith(prefix) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(
                path,
                f"its tensor {name} holds NaN or infinite values; the run diverged "
                "or the file is corrupt",
            )


def _check_health(path: Path, meta: Mapping[str, str], batches: int) -> None:
    """``epoch_health``: ``{"steps": 0..batches, "sum": {measure: finite number}}``."""
    health = metadata_json(path, meta, "epoch_health", dict, default={"steps": 0, "sum": {}})
    steps, sums = health.get("steps"), health.get("sum")
    finite = isinstance(sums, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in sums.values()
    )
    if not (is_int(steps) and 0 <= steps <= batches and finite):
        raise _fail(
            path,
            'its metadata \'epoch_health\' is not {"steps": 0 to batch_in_epoch, "sum": '
            "{measure: finite number}}",
        )


def check_resumable(checked: CheckedFile, tensors: Mapping[str, Tensor]) -> None:
    """Check what a resume uses beyond the model: counters, generators, optimiser, queue."""
    path, meta, settings = checked.path, checked.meta, checked.settings
    for key in ("step", "batch_in_epoch"):
        count(path, meta, key)
    epoch, planned = count(path, meta, "epoch"), settings.get("epochs", 0)
    if is_int(planned) and epoch > planned:
        raise _fail(path, f"its metadata 'epoch' is {epoch}, beyond its planned {planned} epochs")
    batches, losses = count(path, meta, "batch_in_epoch"), count(path, meta, "epoch_loss_count")
    if losses > batches:
        raise _fail(path, f"it counts {losses} losses for {batches} batches of its epoch")
    try:
        loss_sum = float(meta.get("epoch_loss_sum", "x"))
    except ValueError:
        loss_sum = math.nan
    if not math.isfinite(loss_sum):
        raise _fail(path, "its metadata 'epoch_loss_sum' is not a finite number")
    _check_health(path, meta, batches)
    count(path, meta, "world_size", low=1)
    metadata_json(path, meta, "optimizer", dict)
    metrics = metadata_json(path, meta, "metrics", dict)
    if metrics and metrics.get("epoch") != epoch:
        raise _fail(path, f"its last metrics row is of epoch {metrics.get('epoch')!r}, not {epoch}")
    cpu_state = torch.get_rng_state()
    for name in ("rng.torch", "rng.views"):
        t = tensors.get(name)
        if t is None:
            raise _fail(path, f"it has no tensor {name} (the run's random state)")
        if t.dtype != torch.uint8 or t.ndim != 1:
            raise _fail(path, f"its tensor {name} is not a generator state (1-d uint8)")
    if tensors["rng.torch"].shape != cpu_state.shape:
        raise _fail(
            path,
            f"its tensor rng.torch has {tensors['rng.torch'].numel()} bytes, "
            f"not the {cpu_state.numel()} of a CPU generator state",
        )
    check_finite(path, tensors)
    pointer, size = int(tensors["model.queue_ptr"]), checked.model.queue_size
    if not 0 <= pointer < size:
        raise _fail(path, f"its queue pointer {pointer} is outside its queue of {size}")
