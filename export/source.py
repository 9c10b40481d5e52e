"""What ``export_onnx`` exports: the network and its ``ModelInfo`` fields, from a ressl
checkpoint (whose settings say everything) or from a module (whose caller says it)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ressl.errors import CheckpointError, ConfigError
from ressl.models.network import Encoder, ReSSL
from ressl.rules import IMAGE_SIZE
from ressl.runs.checkpoint import open_encoder
from ressl.runs.folder import resolve_checkpoint

__all__ = ["resolve_source"]

#: What a module's caller must say about its input (a checkpoint's settings say it).
MODULE_INPUT = ("image_size", "channels", "mean", "std")


def resolve_source(
    source: str | os.PathLike[str] | nn.Module,
    weights: str | None,
    head: bool,
    **module_fields: Any,
) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    """``(network, ModelInfo fields, extra metadata)`` of a checkpoint or a module."""
    if isinstance(source, nn.Module):
        net, fields = _from_module(source, weights, head, **module_fields)
        return net, fields, {}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a checkpoint path or an nn.Module, got {type(source).__name__}"
        )
    given = [name for name, value in module_fields.items() if value is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: the checkpoint's settings supply these; pass them only with a module"
        )
    return _from_checkpoint(Path(source), weights or "student", head)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pick_net(encoder: nn.Module, head: bool) -> nn.Module:
    if isinstance(encoder, Encoder):
        return nn.Sequential(encoder.backbone, encoder.head) if head else encoder.backbone
    if head:
        raise ConfigError(
            f"head=True needs an Encoder (backbone + head) or a ReSSL module, got {type(encoder).__name__}; "
            "export the module as it is with head=False"
        )
    return encoder


def _from_checkpoint(
    path: Path, weights: str, head: bool
) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    file = resolve_checkpoint(path)
    sha = _sha256(file)
    encoder, checked = open_encoder(file, weights)
    if _sha256(file) != sha:  # a running training rewrote last.safetensors meanwhile
        raise CheckpointError(
            f"{file} changed while it was being read (a run still training?); export again"
        )
    model, data, meta = checked.model, checked.data, checked.meta
    fields: dict[str, Any] = dict(
        backbone=model.backbone,
        image_size=model.image_size,
        channels=model.channels,
        mean=data.mean,
        std=data.std,
        weights=weights,
        source=file.name,
        source_sha256=sha,
        settings=checked.settings,
    )
    extra: dict[str, str] = {k: meta[k] for k in ("epoch", "step") if k in meta}
    extra["source_ressl_version"] = meta.get("ressl_version", "")
    return _pick_net(encoder, head), fields, extra


def _from_module(
    module: nn.Module,
    weights: str | None,
    head: bool,
    backbone: str | None,
    image_size: int | None,
    channels: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    given = dict(image_size=image_size, channels=channels, mean=mean, std=std)
    missing = [name for name in MODULE_INPUT if given[name] is None]
    if missing:
        raise TypeError(
            f"exporting an nn.Module needs {', '.join(missing)} (the checkpoint would supply them)"
        )
    assert image_size is not None and channels is not None and mean is not None and std is not None
    encoder, name = _module_encoder(module, weights, backbone)
    _check_module_input(image_size, channels, mean, std)
    fields: dict[str, Any] = dict(
        backbone=name,
        image_size=int(image_size),
        channels=int(channels),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        weights=(weights or "student") if isinstance(module, ReSSL) else "module",
        source="",
        source_sha256="",
        settings={},
    )
    return _pick_net(encoder, head), fields


def _module_encoder(
    module: nn.Module, weights: str | None, backbone: str | None
) -> tuple[nn.Module, str]:
    """``(the encoder to export, its backbone's recorded name)``: a ReSSL module's student or
    teacher, or the module itself."""
    if isinstance(module, ReSSL):
        return getattr(module, weights or "student"), (
            backbone or type(module.student.backbone).__name__
        )
    if weights is not None:
        raise ConfigError(
            f"weights={weights!r} picks the student or teacher of a checkpoint or ReSSL module; "
            f"a {type(module).__name__} has one set of weights, leave weights unset"
        )
    inner = module.backbone if isinstance(module, Encoder) else module
    return module, backbone or type(inner).__name__


def _check_module_input(
    image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> None:
    """The served input a module's caller gave: per-channel mean/std, std > 0, and an image
    side in ressl's range (``rules.IMAGE_SIZE``: the export's metadata must read back)."""
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"std values must be > 0, got {list(std)}")
    if channels < 1:
        raise ConfigError(f"channels must be >= 1, got {channels}")
    IMAGE_SIZE.check("image_size", image_size)
