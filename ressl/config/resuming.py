"""Continuing a saved configuration: a checkpoint's settings, with the ones a user gives
again on ``--resume`` (each field says whether it may change: ``Setting.resumable``).

This module imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ressl.config.settings import TrainConfig, coerce_setting, refuse_unknown, settings
from ressl.data.registry import find, spec_problem
from ressl.errors import ConfigError
from ressl.rules import NO_LEGACY

__all__ = ["from_saved"]


def from_saved(saved: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config a checkpoint's ``settings`` describe, continued with ``given`` settings.

    Settings marked ``resumable`` take the given value (applied before the saved ones are
    checked, so a saved value that is no longer valid can be replaced); any other given
    setting must equal the saved one, compared as the config stores it (``out`` is where
    the checkpoint is, so it is ignored). The checkpoint's extra data fields are ignored.

    Raises:
        ConfigError: invalid saved settings, a setting that may not change that does,
            or an unknown one.
    """
    names = {name: meta for name, _, meta in settings()}
    given = {k: v for k, v in (given or {}).items() if v is not None and k != "out"}
    refuse_unknown(given)
    changes = {k: v for k, v in given.items() if names[k].resumable}
    legacy = {
        k: meta.legacy
        for k, meta in names.items()
        if k not in saved and meta.legacy is not NO_LEGACY
    }
    config = TrainConfig(**{**legacy, **{k: v for k, v in saved.items() if k in names}, **changes})
    for key, value in given.items():
        if key not in changes and not _same(key, coerce_setting(key, value), getattr(config, key)):
            raise ConfigError(
                f"--resume continues a run with its saved settings, but {{{key}}} {value!r} "
                f"differs from the checkpoint's {getattr(config, key)!r}; drop the option or "
                "start a new run",
                key,
            )
    return config


def _same(key: str, given: Any, saved: Any) -> bool:
    """Equal settings; datasets by what they name (aliases, ``_`` for ``-``, the path's spelling)."""
    if key == "dataset" and not spec_problem(given) and not spec_problem(saved):
        (a, pa), (b, pb) = find(given), find(saved)
        return (
            a is b
            and (pa is None) == (pb is None)
            and os.path.normpath(pa or "") == os.path.normpath(pb or "")
        )
    return bool(given == saved)
