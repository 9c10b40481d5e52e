"""Schedules over a run's steps: the learning rate and the EMA momentum. No torch here."""

from __future__ import annotations

import math
from typing import Literal

from ressl.errors import ConfigError

__all__ = ["cosine_lr", "momentum_schedule"]


def momentum_schedule(
    step: int,
    total_steps: int,
    base: float,
    schedule: Literal["constant", "cosine"] = "constant",
) -> float:
    """EMA momentum at ``step``: constant (official code) or cosine from ``base`` to 1 (BYOL, solo-learn).

    Args:
        step: current step, ``0 <= step <= total_steps``.
        total_steps: steps in the whole run, ``>= 1``.
        base: momentum at step 0, in ``[0, 1]``.
        schedule: ``"constant"`` or ``"cosine"``.

    Returns:
        The momentum as a float.

    Raises:
        ValueError: on an unknown schedule or out-of-range arguments.
    """
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not 0.0 <= base <= 1.0:
        raise ConfigError(f"base momentum must be in [0, 1], got {base}")
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    if schedule == "constant":
        return float(base)
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def cosine_lr(
    step: int,
    total_steps: int,
    base_lr: float,
    warmup_steps: int = 0,
    final_lr: float = 0.0,
    *,
    warmup_from_zero: bool = True,
) -> float:
    """Learning rate with a linear warm-up then a cosine decay to ``final_lr``.

    Warm-up rises linearly from 0 at step 0 (the official code; ``base_lr /
    warmup_steps`` with ``warmup_from_zero=False``) to ``base_lr`` at ``warmup_steps``;
    the cosine then reaches ``final_lr`` at ``total_steps``.

    Args:
        step: current step (0-based).
        total_steps: steps in the whole run, ``>= 1``.
        base_lr: peak learning rate, ``>= 0``.
        warmup_steps: length of the linear warm-up, ``0 <= warmup_steps <= total_steps``.
        final_lr: learning rate at the end of training.
        warmup_from_zero: start the warm-up at 0 rather than one step's share.

    Returns:
        The learning rate as a float.

    Raises:
        ValueError: on out-of-range arguments.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if base_lr < 0:
        raise ConfigError(f"base_lr must be >= 0, got {base_lr}")
    if step < warmup_steps:
        return base_lr * (step + (0 if warmup_from_zero else 1)) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, span) / span
    return final_lr + (base_lr - final_lr) * (math.cos(math.pi * progress) + 1.0) / 2.0
