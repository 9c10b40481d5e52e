"""What :class:`ressl.config.settings.TrainConfig`'s fields are made of: the field
constructors and help panels, the rules only the configuration uses (datasets, EMA
momentum, temperatures), the dataset help derived from the registry, and the coercion of
a given value to the type its field stores.

This module imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path
from typing import Any

from ressl.data.registry import DATASETS, dataset_names, spec_problem
from ressl.errors import ConfigError
from ressl.rules import PATH, Rule, Setting, as_type, number

__all__ = [
    "DATA",
    "DATASET",
    "EMA_MOMENTUM",
    "METHOD",
    "MIN_TEMPERATURE",
    "MODEL",
    "MONITOR",
    "OPTIM",
    "RUN",
    "TEMPERATURE",
    "VIEWS",
    "coerce",
    "dataset_choices",
    "dataset_help",
    "recipe_field",
    "setting_field",
]

#: The sharpest softmax temperature accepted (teacher and student). The relation logits are
#: cosines / tau, and the cosines come from a bf16 matmul under autocast, which resolves
#: them to 2**-8 (0.004) near 1: at tau 1e-3 one such step is already a logit gap of 4,
#: and a cosine gap of 0.09 one of 88, where fp32's exp underflows. Below it the teacher's
#: target is a one-hot of rounding noise and the student's gradient grows as 1/tau.
#: ReSSL uses 0.04 (teacher) and 0.1 (student), 40x and 100x above it.
MIN_TEMPERATURE = 1e-3

#: The teacher's EMA momentum m: 1 would leave the teacher at its initial weights forever.
EMA_MOMENTUM = number(0.0, strict=False, below=1.0).explained(
    "(1 would keep the teacher at its random initial weights: it would never learn)"
)
TEMPERATURE = number(MIN_TEMPERATURE, strict=False).explained(
    "(a sharper softmax is a one-hot of bf16 rounding noise; ReSSL uses 0.04 and 0.1)"
)


def _spec_ok(value: Any) -> bool:
    return not spec_problem(value)


def dataset_choices() -> str:
    """The registry's datasets: ``fashion-mnist, cifar10, ..., folder:PATH or imagenet:PATH``."""
    names = dataset_names()
    return ", ".join(names[:-1]) + " or " + names[-1]


def dataset_help() -> str:
    """``--dataset``'s help: the registry's datasets, and what each ``NAME:PATH`` one is."""
    folders = [f" {d.spec}: {d.summary}." for d in DATASETS.values() if d.takes_path]
    return dataset_choices() + "." + "".join(folders)


#: Valid datasets are the registry's; its ``spec_problem`` words the error.
DATASET = Rule("one of " + ", ".join(dataset_names()), _spec_ok)


def setting_field(panel: str, default: Any, help: str, rule: Rule, **kw: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (typed Any so recipe fields may
    default to None while their type says what they hold once resolved)."""
    return field(default=default, metadata={"setting": Setting(help, rule, panel=panel, **kw)})


def recipe_field(panel: str, help: str, rule: Rule, **kw: Any) -> Any:
    return setting_field(panel, None, help, rule, recipe=True, **kw)


DATA, MODEL, METHOD, OPTIM, VIEWS, MONITOR, RUN = (
    "Data",
    "Model",
    "Method",
    "Optimiser",
    "Views",
    "Monitor",
    "Run",
)


def coerce(name: str, meta: Setting, kind: Any, value: Any) -> Any:
    """A value as field ``name`` (of type ``kind``) stores it: text parsed (tuples), sequences
    as tuples, paths as str, integers as floats where the field holds floats. Anything else
    is left for the field's rule to refuse."""
    if isinstance(value, str) and meta.parse is not None:
        try:
            return meta.parse(value)
        except ValueError as e:
            raise ConfigError(f"{{{name}}} must be {e}, got {value!r}", name) from None
    if isinstance(value, Path):
        return str(value)
    if meta.rule is PATH and isinstance(value, str) and value:
        return os.path.normpath(value)  # "./data/" and "data" are one folder
    return as_type(kind, value)
