"""Argument checks and per-image helpers shared by the view kernels.

Every public view function validates at its boundary with these, so a bad argument is a
``TypeError`` / ``ValueError`` naming it and what would be valid.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ressl.errors import ConfigError
from ressl.rules import JITTER, PROBABILITY, is_number

__all__ = [
    "check_channel_stats",
    "check_generator",
    "check_images",
    "check_jitter",
    "check_per_image",
    "check_prob",
    "check_range",
    "check_size",
    "coin",
    "device_constant",
    "per_image",
    "syncs_are_free",
]


def check_images(images: object, *, float_only: bool = False, any_channels: bool = False) -> Tensor:
    """``images`` if it is a (B, C, H, W) uint8 or float tensor (C in {1, 3} unless
    ``any_channels``)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    channels_ok = any_channels or (images.ndim == 4 and images.shape[1] in (1, 3))
    if images.ndim != 4 or not channels_ok or 0 in images.shape[2:]:
        which = "C >= 1" if any_channels else "C in {1, 3}"
        raise ValueError(
            f"images must have shape (B, C, H, W) with {which} and H, W >= 1, "
            f"got {tuple(images.shape)}"
        )
    if not (images.is_floating_point() or (images.dtype == torch.uint8 and not float_only)):
        valid = "a floating dtype in [0, 1]" if float_only else "uint8 or a floating dtype"
        raise TypeError(f"images must be {valid}, got dtype {images.dtype}")
    return images


def check_generator(generator: object, device: torch.device) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator on {device}, got {type(generator).__name__}"
        )
    gdev = torch.device(generator.device)
    if gdev.type != device.type or (gdev.index or 0) != (device.index or 0):
        raise ValueError(
            f"generator is on {gdev} but images are on {device}; pass "
            f"torch.Generator(device={str(device)!r})"
        )
    return generator


def check_size(size: object) -> int:
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"size must be an int >= 1, got {size!r}")
    return int(size)


def check_prob(name: str, p: object) -> float:
    if not PROBABILITY.ok(p):  # the rule TrainConfig checks too
        raise ConfigError(f"{name} must be {PROBABILITY.expect}, got {p!r}")
    return float(p)  # type: ignore[arg-type]


def check_range(name: str, value: object, *, high: float = math.inf) -> tuple[float, float]:
    ok = isinstance(value, Sequence) and len(value) == 2 and all(map(is_number, value))
    if not ok or not 0 < value[0] <= value[1] <= high:  # type: ignore[index]
        rule = "0 < a <= b" + ("" if high == math.inf else f" <= {high:g}")
        raise ConfigError(f"{name} must be a pair (a, b) with {rule}, got {value!r}")
    return float(value[0]), float(value[1])  # type: ignore[index]


def check_jitter(jitter: object) -> tuple[float, float, float, float]:
    if not JITTER.ok(jitter):  # the rule TrainConfig checks too
        raise ConfigError(f"jitter must be {JITTER.expect}, got {jitter!r}")
    b, c, s, h = (float(v) for v in jitter)  # type: ignore[attr-defined]
    return b, c, s, h


def check_channel_stats(name: str, values: object, channels: int) -> list[float]:
    if not isinstance(values, Sequence) or not all(map(is_number, values)):
        raise TypeError(f"{name} must be a sequence of {channels} numbers, got {values!r}")
    if len(values) != channels:
        raise ConfigError(
            f"{name} has {len(values)} values but images have {channels} channel(s); "
            f"pass one value per channel"
        )
    if name == "std" and min(values) <= 0:
        raise ConfigError(f"std must be > 0 for every channel, got {values!r}")
    return [float(v) for v in values]


def check_per_image(name: str, values: object, batch: int) -> Tensor:
    if not isinstance(values, Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a tensor of shape ({batch},), one per image, got {shape}")
    return values


def per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), broadcasts over C, H, W


def coin(batch: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(batch, generator=generator, device=device) < p  # (B,) bool


def syncs_are_free(device: torch.device) -> bool:
    """Whether reading a value of ``device`` on the host costs nothing (the CPU, eager):
    kernels may then branch on data (gather a subset, count); elsewhere, and under
    ``torch.compile`` (where a value read is a graph break and a recompile), they stay
    sync-free."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def device_constant(
    values: tuple[float, ...] | tuple[bool, ...], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, device, dtype).

    Copying host values to a GPU waits for it, so the views' constants (normalisation,
    jitter ranges, hue anchors) are copied at the first step and reused: read-only.
    """
    if torch.compiler.is_compiling():  # a traced graph holds its own constants
        return torch.tensor(values, device=device, dtype=dtype)
    return _constant(tuple(values), torch.device(device), dtype)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor whatever the caller's mode
        return torch.tensor(values, device=device, dtype=dtype)
