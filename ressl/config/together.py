"""The rules that tie a :class:`ressl.config.settings.TrainConfig`'s settings together."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ressl.errors import ConfigError

if TYPE_CHECKING:
    from ressl.config.settings import TrainConfig

__all__ = ["check_together"]


def check_together(c: TrainConfig) -> None:
    """The rules that tie settings together (each names the settings it ties)."""
    per_step = c.batch_size * (2 if c.symmetric else 1)  # enqueued per step
    if c.queue_size < per_step:
        why = " ({per_step}: symmetric enqueues both crops' teacher embeddings)"
        expect = (
            f">= 2 x {{batch_size}}{why.format(per_step=per_step)}"
            if c.symmetric
            else f">= {{batch_size}} ({per_step})"
        )
        raise ConfigError(
            f"{{queue_size}} must be {expect}, got {c.queue_size}",
            "queue_size",
            "batch_size",
        )
    if c.nesterov and c.sgd_momentum == 0:
        raise ConfigError("{nesterov} needs {sgd_momentum} > 0", "nesterov", "sgd_momentum")
    if c.symmetric and c.crops is not None and len(c.crops) > 1:
        raise ConfigError(
            "{symmetric} (2x backprop) and multi-crop ({crops}) cannot be combined; "
            "drop one of them",
            "symmetric",
            "crops",
        )
    if c.crop_scales is not None and (c.crops is None or len(c.crop_scales) != len(c.crops)):
        raise ConfigError(
            "{crop_scales} must be one (lo, hi) range per crop in {crops}: "
            f"{len(c.crops or ())} crop(s), got {len(c.crop_scales)} range(s)",
            "crop_scales",
            "crops",
        )
