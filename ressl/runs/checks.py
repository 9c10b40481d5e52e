"""Checking a checkpoint before anything is built from it: a file may be foreign or crafted.

Every metadata field a command uses is checked for presence, type and range, and the
model's tensors for name, dtype and shape against a model built from the file's settings
on the ``meta`` device (shapes only, no memory). So a model is only ever allocated from
sizes that the file itself holds and that agree with its settings: a crafted
``queue_size`` or ``width`` cannot make ressl allocate more than the file's own tensors.
Every problem is one :class:`ressl.runs.folder.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ressl.config.settings import MAX_IMAGE_SIZE
from ressl.config.settings import settings as config_fields
from ressl.errors import CheckpointError, ConfigError
from ressl.jsontext import parse_json
from ressl.rules import is_int, is_number

__all__ = [
    "CheckedFile",
    "check_file",
    "check_finite",
    "check_resumable",
    "count",
    "metadata_json",
    "expected_model",
]

#: What ``settings`` holds beside the config's own fields: what the data told the run.
DATA_FIELDS = ("image_size", "channels", "mean", "std", "num_classes")
#: The settings the model's shapes follow.
MODEL_FIELDS = ("backbone", "hidden_dim", "embed_dim", "queue_size", "width")
MAX_CHANNELS = 64

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
        settings: The training settings: the model's and the data's fields checked (a resume
            checks the rest as ``TrainConfig.from_saved`` builds its config).
        header: Tensor name -> (safetensors dtype, shape), from the file's header.
    """

    path: Path
    meta: dict[str, str]
    settings: dict[str, Any]
    header: dict[str, tuple[str, tuple[int, ...]]]


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def metadata_json(
    path: Path, meta: Mapping[str, str], key: str, kind: type, default: Any = None
) -> Any:
    """The JSON metadata field ``key`` (a ``kind``), ``default`` when absent if one is given."""
    if key not in meta and default is not None:
        return default
    if key not in meta:
        raise _fail(path, f"its metadata has no {key!r} (a ressl checkpoint always has one)")
    try:
        value = parse_json(meta[key], f"its metadata {key!r}")
    except ValueError as e:
        raise _fail(path, str(e)) from None
    if not isinstance(value, kind):
        raise _fail(path, f"its metadata {key!r} is not a JSON {kind.__name__}")
    return value


def count(path: Path, meta: Mapping[str, str], key: str, low: int = 0) -> int:
    """The integer metadata field ``key`` (>= ``low``), or a CheckpointError naming it."""
    text = meta.get(key)
    if text is None:
        raise _fail(path, f"its metadata has no {key!r}")
    try:
        value = int(text)
    except ValueError:
        raise _fail(path, f"its metadata {key!r} is {text[:40]!r}, not an integer") from None
    if value < low:
        raise _fail(path, f"its metadata {key!r} is {value}; it must be >= {low}")
    return value


def _data_fields(path: Path, settings: Mapping[str, Any]) -> None:
    def need(key: str, ok: bool, expect: str) -> None:
        if not ok:
            shown = json.dumps(settings.get(key))[:60]
            raise _fail(path, f"its settings' {key} is {shown}; it must be {expect}")

    size: Any = settings.get("image_size")
    channels: Any = settings.get("channels")
    need(
        "image_size",
        is_int(size) and 8 <= size <= MAX_IMAGE_SIZE,
        f"an integer in [8, {MAX_IMAGE_SIZE}]",
    )
    need(
        "channels",
        is_int(channels) and 1 <= channels <= MAX_CHANNELS,
        f"an integer in [1, {MAX_CHANNELS}]",
    )
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        v = settings.get(key)
        ok = isinstance(v, list) and len(v) == channels and all(is_number(x) and x > low for x in v)
        need(key, ok, f"a list of {channels} finite numbers" + (" > 0" if low == 0 else ""))
    classes = settings.get("num_classes", 0)
    need("num_classes", is_int(classes) and classes >= 0, "an integer >= 0")


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def expected_model(
    settings: Mapping[str, Any], backbone: nn.Module | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``model.*`` tensor name -> (dtype, shape) of the model ``settings`` describe (no memory).

    Args:
        backbone: the module of a ``custom:`` backbone.
    """
    from ressl.models.network import model_from_settings

    model = model_from_settings(settings, backbone=backbone, meta=True)
    return {
        f"model.{k}": (_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        for k, t in model.state_dict().items()
    }


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check_model(
    path: Path,
    header: Mapping[str, tuple[str, tuple[int, ...]]],
    settings: Mapping[str, Any],
    backbone: nn.Module | None,
) -> None:
    try:
        expected = expected_model(settings, backbone)
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
                f"(backbone {settings['backbone']}, width {settings['width']}, queue_size "
                f"{settings['queue_size']}, embed_dim {settings['embed_dim']}, ...) make it "
                f"{dtype} {_shape(shape)}",
            )


def check_file(path: str | Path, backbone: nn.Module | None = None) -> CheckedFile:
    """Check a checkpoint's metadata, the settings its model follows, and its model tensors
    (their header only, against the model those settings build).

    A ``custom:`` backbone's tensors are compared only when its module is given as
    ``backbone`` (nothing else says what they should be).

    Raises:
        CheckpointError: the first problem, naming the file and the field.
    """
    from ressl.runs.checkpoint import read_metadata
    from ressl.runs.folder import resolve_checkpoint

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    settings = metadata_json(path, meta, "settings", dict)
    rules = {name: field.rule for name, _, field in config_fields()}
    for key in MODEL_FIELDS:
        if key not in settings:
            raise _fail(path, f"its settings have no {key!r}")
        if not rules[key].ok(settings[key]):
            shown = json.dumps(settings[key])[:60]
            raise _fail(path, f"its settings' {key} is {shown}; it must be {rules[key].expect}")
    _data_fields(path, settings)
    header = _header(path)
    custom = str(settings["backbone"]).startswith("custom:")
    if backbone is not None and not custom:
        raise ConfigError(
            f"backbone= rebuilds a custom module; {path} was trained with {settings['backbone']}, "
            "which ressl builds itself: leave backbone unset"
        )
    if backbone is not None or not custom:
        _check_model(path, header, settings, backbone)
    return CheckedFile(path, meta, settings, header)


def check_finite(path: Path, tensors: Mapping[str, Tensor], prefix: str = "model.") -> None:
    """Refuse weights holding a NaN or an infinity (a diverged or corrupted run)."""
    for name, t in tensors.items():
        if name.startswith(prefix) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(
                path,
                f"its tensor {name} holds NaN or infinite values; the run diverged "
                "or the file is corrupt",
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
    pointer = int(tensors["model.queue_ptr"])
    if not 0 <= pointer < settings["queue_size"]:
        raise _fail(
            path, f"its queue pointer {pointer} is outside its queue of {settings['queue_size']}"
        )
