"""Where training and evaluation run: the device, and the autocast precision it supports."""

from __future__ import annotations

import torch

from .rules import DEVICE, ConfigError

__all__ = ["autocast_dtype", "select_device"]


def select_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; otherwise the named device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE.ok(device):  # the rule TrainConfig checks too
        raise ConfigError.invalid("device", DEVICE.expect, device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu"
        )
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting on ``device``: ``"auto"`` is bf16 where
    the device supports it (CUDA, or a CPU with oneDNN bf16), else None (fp32).

    Raises:
        ValueError: ``"bf16"`` where the device does not support it.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    if precision == "bf16" and not supported:
        raise ValueError(
            f"precision 'bf16' is not supported on this {device.type}; use --precision fp32"
        )
    return torch.bfloat16 if supported else None
