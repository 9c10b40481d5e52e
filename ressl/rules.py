"""Valid ranges, command-line text and errors of settings: the vocabulary of ``ressl.config.settings``.

A :class:`Rule` says which values a setting takes and how to say so; a
:class:`Setting` is what a configuration field declares besides its type and default;
a :class:`ConfigError` names settings as placeholders, so one message reads with
Python keywords in the API and with flags on the command line. No torch here.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ressl.errors import ConfigError, render

__all__ = [
    "BACKBONE",
    "Note",
    "Rule",
    "Setting",
    "as_type",
    "choice",
    "integer",
    "interval",
    "names_fit",
    "number",
]


class Note:
    """A remark about legal but probably unintended settings, naming them as ``{name}``
    placeholders like a :class:`ConfigError`; ``str()`` names keywords."""

    def __init__(self, template: str, *names: str) -> None:
        self.template, self.names = template, names

    def render(self, name: Callable[[str], str]) -> str:
        """The remark with every setting called ``name(setting)`` (``flag`` on the CLI)."""
        return render(self.template, self.names, name)

    def __str__(self) -> str:
        return self.render(str)

    def __repr__(self) -> str:
        return f"Note({str(self)!r})"


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A valid range: ``ok(value)``, described by ``expect`` ("an integer >= 1")."""

    expect: str
    ok: Callable[[Any], bool]
    choices: tuple[str, ...] = ()  # the valid values, when they can be listed

    def explained(self, why: str) -> Rule:
        """The same rule, its ``expect`` followed by why the range ends where it does."""
        return Rule(f"{self.expect} {why}", self.ok, self.choices)

    def check(self, name: str, value: Any) -> None:
        """Raise a :class:`ConfigError` naming ``name`` unless ``value`` is in range."""
        if not self.ok(value):
            raise ConfigError.invalid(name, self.expect, value)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite real number, not a bool (``True`` is no setting's number)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int | None = None, note: str = "", *, high: int | None = None) -> Rule:
    """An int (no bool) >= ``low`` (and <= ``high``)."""
    if high is not None:
        expect = f"an integer in [{low}, {high}]{note}"
    else:
        expect = "an integer" + (f" >= {low}" if low is not None else "") + note
    return Rule(
        expect,
        lambda v: is_int(v) and (low is None or v >= low) and (high is None or v <= high),
    )


def number(low: float = 0.0, *, strict: bool = True, below: float = math.inf) -> Rule:
    """A finite number > ``low`` (>= when not ``strict``) and < ``below``."""
    rel = ">" if strict else ">="
    expect = f"a number {rel} {low:g}" + ("" if below == math.inf else f" and < {below:g}")
    return Rule(
        expect,
        lambda v: is_number(v) and (v > low if strict else v >= low) and v < below,
    )


def interval(low: float, high: float, expect: str) -> Rule:
    """A finite number in ``[low, high]``."""
    return Rule(expect, lambda v: is_number(v) and low <= v <= high)


def choice(*values: str) -> Rule:
    return Rule("one of " + ", ".join(repr(v) for v in values), lambda v: v in values, values)


def _scale_range(v: Any) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(map(is_number, v)) and 0 < v[0] <= v[1] <= 1


#: The backbones ressl defines; any other is ``LIBRARY:NAME`` (see ``split_backbone``).
BUILTIN_BACKBONES = ("small", "resnet18", "resnet50")
#: Where a ``LIBRARY:NAME`` backbone comes from; ``custom`` names a module given through the API.
BACKBONE_LIBRARIES = ("torchvision", "timm", "custom")
_MODEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


def split_backbone(spec: Any) -> tuple[str, str] | None:
    """``("ressl", name)`` for a built-in backbone, ``(library, name)`` for ``"library:name"``,
    None when ``spec`` is neither."""
    if not isinstance(spec, str):
        return None
    if spec in BUILTIN_BACKBONES:
        return "ressl", spec
    library, sep, name = spec.partition(":")
    if sep and library in BACKBONE_LIBRARIES and _MODEL_NAME.match(name):
        return library, name
    return None


BACKBONE = Rule(
    "one of " + ", ".join(BUILTIN_BACKBONES) + ", torchvision:NAME or timm:NAME",
    lambda v: split_backbone(v) is not None,
)
#: Where streamed folders' files are decoded: DataLoader workers (PIL), or the training device.
DECODE_PLACES = ("workers", "device")
CHANNELS = Rule("1 (greyscale) or 3 (RGB)", lambda v: is_int(v) and v in (1, 3))
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str))
#: The longest file or folder name the usual file systems take (ext4, APFS, NTFS), in bytes.
NAME_MAX = 255


def names_fit(path: str | os.PathLike[str]) -> bool:
    """Every file or folder name in ``path`` is at most ``NAME_MAX`` bytes (longer names fail
    with ENAMETOOLONG wherever the path is used)."""
    return all(len(os.fsencode(part)) <= NAME_MAX for part in os.fspath(path).split(os.sep))


PATH = Rule(
    f"a path whose names are at most {NAME_MAX} bytes long",
    lambda v: isinstance(v, str) and v != "" and names_fit(v),
)
SCALE = Rule("two numbers 0 < lo <= hi <= 1", _scale_range)
JITTER = Rule(
    "four numbers >= 0 (brightness, contrast, saturation, hue <= 0.5)",
    lambda v: (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and len(v) == 4
        and all(is_number(x) and x >= 0 for x in v)
        and v[3] <= 0.5
    ),
)
CROPS = Rule(
    "crop sides >= 8 like (32, 28, 24, 20, 16)",
    lambda v: isinstance(v, tuple) and len(v) >= 1 and all(is_int(x) and x >= 8 for x in v),
)
CROP_SCALES = Rule(
    "(lo, hi) ranges with 0 < lo <= hi <= 1",
    lambda v: isinstance(v, tuple) and len(v) >= 1 and all(map(_scale_range, v)),
)
DEVICE = Rule(
    "'auto', 'cpu', 'cuda' or 'cuda:N'",
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|(cpu|cuda)(:\d+)?", v) is not None,
)
PROBABILITY = interval(0.0, 1.0, "a probability in [0, 1]")
#: The largest float32: optimisers apply the learning rate and weight decay to float32
#: tensors, where a larger value overflows (a traceback, or a loss of nan at the first step).
FLOAT32_MAX = 3.4028234663852886e38
LEARNING_RATE = number(0.0, below=FLOAT32_MAX)
WEIGHT_DECAY = number(0.0, strict=False, below=FLOAT32_MAX)


# --------------------------------------------------------------------------- parsing text


def numbers_text(count: int, example: str) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise ValueError(f"{count} comma-separated numbers like {example}")
        return values

    return parse


def sides_text(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError("comma-separated crop sides like 32,28,24,20,16") from None


def ranges_text(text: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError("comma-separated lo:hi ranges like 0.2:1,0.15:0.75")
    return tuple((p[0], p[1]) for p in pairs)


# --------------------------------------------------------------------------- fields

#: ``Setting.legacy`` of a setting whose absence from a checkpoint means its default.
NO_LEGACY: Any = object()


@dataclass(frozen=True)
class Setting:
    """What a ``TrainConfig`` field declares besides its type and default.

    Attributes:
        help: One sentence for ``--help`` and the docs.
        rule: The valid values (checked on every construction).
        recipe: None means "the dataset's recipe value" (``ressl.data.registry``).
        resumable: ``--resume`` may change it (everything else must match the checkpoint).
        panel: The ``--help`` section it is listed in.
        parse: Reads the value from command-line text (tuples); None: the field's type.
        metavar: How ``--help`` shows the value (for parsed text).
        optional: None is a valid value (not a recipe placeholder).
        short: A one-letter alias, e.g. ``-o``.
        legacy: The value runs had before the setting existed: a checkpoint without it
            resumes with this (``TrainConfig.from_saved``), so it continues as it began.
    """

    help: str
    rule: Rule
    recipe: bool = False
    resumable: bool = False
    panel: str = "Training"
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    optional: bool = False
    short: str | None = None
    legacy: Any = NO_LEGACY


def as_type(kind: Any, value: Any) -> Any:
    """``value`` converted to the type ``kind`` where that is lossless (int -> float, list -> tuple)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return as_type(args[0], value) if len(args) == 1 else value
    if kind is float and (is_int(value) or is_number(value)):
        return float(value)  # ints, numpy scalars
    if kind is int and is_int(value):
        return int(value)  # numpy integers

    if (
        typing.get_origin(kind) is tuple
        and isinstance(value, Sequence)
        and not isinstance(value, str)
    ):
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return tuple(value)  # the wrong length: the rule says what is expected
        return tuple(as_type(k, v) for k, v in zip(items, value))
    return value
