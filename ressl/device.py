"""Where training and evaluation run: the device, the autocast precision it supports, and
its memory."""

from __future__ import annotations

import os

import torch

from ressl.errors import ConfigError
from ressl.rules import DEVICE

__all__ = ["autocast_dtype", "device_memory", "human_bytes", "select_device"]


def select_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; otherwise the named device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE.ok(device):  # the rule TrainConfig checks too
        raise ConfigError.invalid("device", DEVICE.expect, device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
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
        raise ConfigError(
            f"precision 'bf16' is not supported on this {device.type}; use --precision fp32"
        )
    return torch.bfloat16 if supported else None


def human_bytes(n: float) -> str:
    """``1536 -> "1.5 KB"`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EB"  # pragma: no cover


def device_memory(device: torch.device) -> int | None:
    """The whole memory of ``device`` in bytes (physical memory for the CPU); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None
