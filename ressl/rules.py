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
    "CHANNELS",
    "HEALTH_IMAGES",
    "HEALTH_SAMPLE",
    "IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "BACKBONE_FAMILIES",
    "JITTER_P",
    "JITTER_STRENGTHS",
    "KNN_K",
    "KNN_TEMPERATURE",
    "BackboneNames",
    "Note",
    "Rule",
    "Setting",
    "as_type",
    "backbone_choices",
    "backbone_help",
    "choice",
    "integer",
    "interval",
    "names_fit",
    "number",
    "split_backbone",
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
    """A valid range: ``ok(value)``, described by ``expect`` ("an integer >= 1").

    ``text`` is that description, or a function giving it when it follows a table that may
    grow (the backbone families)."""

    text: str | Callable[[], str]
    ok: Callable[[Any], bool]
    choices: tuple[str, ...] = ()  # the valid values, when they can be listed

    @property
    def expect(self) -> str:
        return self.text() if callable(self.text) else self.text

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


@dataclass(frozen=True)
class BackboneNames:
    """How one backbone family's names are written: what the configuration checks (no torch).

    The family itself (how to build, its version, its rebuild code) is its entry in
    ``ressl.models.backbones.FAMILIES``, which registers these names here.

    Attributes:
        family: its name, and the prefix of ``FAMILY:NAME`` (``torchvision``).
        help: how ``--help`` lists it ("a timm model as timm:NAME").
        prefixed: it takes ``FAMILY:NAME``.
        aliases: bare names it owns (``small``; ``resnet18`` is ``torchvision:resnet18``).
        listed: named in messages and ``--help`` (``custom``, a module given through the
            API, is only recorded).
    """

    family: str
    help: str
    prefixed: bool = True
    aliases: tuple[str, ...] = ()
    listed: bool = True


#: The backbone families, by name: the ones ressl builds, then any registered with
#: ``ressl.models.backbones.register_family`` (which keeps this table and its own in step).
BACKBONE_FAMILIES: dict[str, BackboneNames] = {
    names.family: names
    for names in (
        BackboneNames("ressl", "small (a fast CNN for CPU runs)", False, ("small",)),
        BackboneNames(
            "torchvision",
            "resnet18, resnet50, any torchvision classification model as torchvision:NAME",
            aliases=("resnet18", "resnet50"),
        ),
        BackboneNames("timm", "a timm model as timm:NAME"),
        BackboneNames("custom", "an nn.Module given through the API", listed=False),
    )
}
#: The bare backbone names (``ressl.BACKBONES``): ``small``, ``resnet18``, ``resnet50``.
BUILTIN_BACKBONES = tuple(a for names in BACKBONE_FAMILIES.values() for a in names.aliases)
_MODEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


def split_backbone(spec: Any) -> tuple[str, str] | None:
    """``(family, name)`` of a backbone: ``("ressl", "small")``, ``("torchvision", "resnet18")``
    for ``"resnet18"`` or ``"torchvision:resnet18"``; None when ``spec`` is no family's."""
    if not isinstance(spec, str):
        return None
    for entry in BACKBONE_FAMILIES.values():
        if spec in entry.aliases:
            return entry.family, spec
    family, sep, name = spec.partition(":")
    names = BACKBONE_FAMILIES.get(family)
    if sep and names is not None and names.prefixed and _MODEL_NAME.match(name):
        return family, name
    return None


def backbone_choices() -> str:
    """The backbones a message offers: ``small, resnet18, resnet50, torchvision:NAME or timm:NAME``."""
    listed = [names for names in BACKBONE_FAMILIES.values() if names.listed]
    items = [a for names in listed for a in names.aliases]
    items += [f"{names.family}:NAME" for names in listed if names.prefixed]
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else "".join(items)


def backbone_help() -> str:
    """``--backbone``'s help: each listed family's own line."""
    listed = [names.help for names in BACKBONE_FAMILIES.values() if names.listed]
    return "Encoder: " + "; ".join(listed) + "."


BACKBONE = Rule(lambda: "one of " + backbone_choices(), lambda v: split_backbone(v) is not None)
#: Where streamed folders' files are decoded: DataLoader workers (PIL), or the training device.
DECODE_PLACES = ("workers", "device")
#: Image channels: ressl decodes every image as greyscale (1) or RGB (3) (PIL's "L" and "RGB",
#: the built-in datasets' own), so every dataset it reads and every checkpoint it writes has
#: one of these; the model itself would take any count, but no data of another would reach it.
CHANNELS = Rule("1 (greyscale) or 3 (RGB)", lambda v: is_int(v) and v in (1, 3))
#: The largest image side ressl trains on (and accepts from a checkpoint or an export).
MAX_IMAGE_SIZE = 4096
#: Image sides: at least 8, the smallest the backbones take (``build_backbone`` refuses less:
#: the small CNN's three stride-2 stages and the ResNets' stem leave no pixel below it), so
#: every run, checkpoint and export ressl writes has one in this range.
IMAGE_SIZE = integer(8, high=MAX_IMAGE_SIZE)
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
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
#: The strong view's colour jitter (MoCo v2's, which ReSSL's code keeps): ColorJitter
#: strengths (brightness, contrast, saturation, hue), applied with probability JITTER_P.
JITTER_STRENGTHS = (0.4, 0.4, 0.4, 0.1)
JITTER_P = 0.8
#: The weighted kNN of InstDisc and MoCo's monitor (and ReSSL's code): the KNN_K nearest
#: training images vote with weight exp(similarity / KNN_TEMPERATURE).
KNN_K = 200
KNN_TEMPERATURE = 0.1
#: ``ressl eval health``'s sample: HEALTH_IMAGES images by default, more than the widest
#: backbone's features (ResNet-50: 2048) so RankMe is not capped by the sample; HEALTH_SAMPLE
#: the sizes one may ask for, at least 32 so the measures average over something, at most
#: 8192 so uniformity's N x N fp32 Gram matrix stays within 256 MiB.
HEALTH_IMAGES = 4096
HEALTH_SAMPLE = integer(32, high=8192)
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
            resumes with this (``ressl.config.resuming.from_saved``), so it continues as it began.
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
