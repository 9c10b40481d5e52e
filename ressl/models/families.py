"""Backbone families, one registry entry each, and ``build_backbone``, which builds by them.

The families: ressl's own, any torchvision classification model, any timm model, any
``nn.Module``.

A backbone maps ``(B, C, H, W)`` images to ``(B, F)`` features. ``build_backbone``
builds one from its name and the data's channels and side, and states what it
changed in a :class:`BackboneBuild` (kept in every checkpoint as ``backbone_build``,
so the file says how to rebuild its network). Each family is one entry of
:data:`FAMILIES` (a new one is :func:`register_family`). The rules, once:

* ``small``, ``resnet18``, ``resnet50``: ressl's small CNN, and torchvision's ResNets
  (``resnet18`` is ``torchvision:resnet18``).
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``, with
  ``image_size`` passed to models that take it (the ViTs).
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=0,
  in_chans=C)``, with ``img_size`` passed to models that take it (timm is an extra).
* Channels: a torchvision model's first convolution is replaced by one taking C
  channels when C is not 3 (timm does this itself with ``in_chans``).
* Small images: a ResNet-like stem (``conv1`` a 7x7 stride-2 convolution followed
  by ``maxpool``) becomes a 3x3 stride-1 convolution without max-pooling for images
  up to ``SMALL_STEM_MAX`` px, so 32-px inputs keep their detail (the CIFAR stem of
  the ReSSL and SimCLR code). Other architectures keep their stem.
* Features: a torchvision model's final ``Linear`` (the classifier), and a
  ``Dropout`` right before it, become ``Identity``; the feature size is that of
  the output, found by one forward pass of a single image.
* BatchNorm statistics: a torchvision or timm model's running statistics start as its
  own on noise images, not at PyTorch's (0, 1), so eval mode is right after a short run
  (:func:`start_batchnorm_`).
* ``nn.Module``: used as it is (through the API); its output must be ``(B, F)``.

The torchvision and timm builds and their changes are :mod:`ressl.models.library_backbones`;
the small CNN, the feature size and the BatchNorm start :mod:`ressl.models.backbones`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ressl.errors import ConfigError, ExportError
from ressl.jsontext import parse_json
from ressl.models.backbones import SmallCNN, custom_spec, feature_dim, start_batchnorm_
from ressl.models.library_backbones import Change, timm_backbone, torchvision_backbone
from ressl.rules import BACKBONE_FAMILIES, BackboneNames, backbone_choices, split_backbone

__all__ = [
    "FAMILIES",
    "BackboneBuild",
    "BackboneFamily",
    "build_backbone",
    "register_family",
    "unregister_family",
]


@dataclass(frozen=True)
class BackboneBuild:
    """How a backbone was built: enough to rebuild it with its own library.

    Attributes:
        spec: the name it was asked for (``resnet18``, ``torchvision:NAME``, ``custom:Class``).
        library: ``ressl``, ``torchvision``, ``timm`` or ``custom``.
        name: the model's name in that library.
        version: the library's version at build time.
        kwargs: the keywords its constructor got besides ``weights``/``pretrained``.
        changes: each module replaced after construction: ``(path, module, why)``, the
            module as ``torch.nn`` code, e.g. ``("maxpool", "Identity()", "small-image stem")``.
        feature_dim: F, the size of its features.
    """

    spec: str
    library: str
    name: str
    version: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    changes: tuple[tuple[str, str, str], ...] = ()
    feature_dim: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BackboneBuild:
        d = parse_json(text, "the backbone build")
        return cls(**{**d, "changes": tuple(tuple(c) for c in d.get("changes", ()))})

    def describe(self) -> str:
        """One line: ``torchvision resnet18 (conv1 = Conv2d(...): small-image stem; ...); 512-d features``."""
        changed = "; ".join(f"{p} = {m}: {why}" for p, m, why in self.changes) or "unchanged"
        return f"{self.library} {self.name} ({changed}); {self.feature_dim}-d features"

    def code(self, weights_file: str = "backbone.safetensors") -> str:
        """Python that rebuilds this backbone with its own library and loads ``weights_file``
        (written by ``ressl export -o NAME.safetensors``).

        Raises:
            ValueError: for a custom module (only its author can build it), or a family
                no longer registered.
        """
        family = FAMILIES.get(self.library)
        if family is None or family.code is None:
            raise ExportError(f"{self.spec} is a module of its own; build it as its author does")
        lines = family.code(self)
        lines += [f"net{_attribute(p)} = torch.nn.{m}  # {why}" for p, m, why in self.changes]
        lines.append(f"net.load_state_dict(load_file({weights_file!r}))")
        return "\n".join(lines) + "\n"


def _attribute(path: str) -> str:
    """``features.0.0`` -> ``.features[0][0]``."""
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split("."))


#: ``build(name, in_channels, image_size, width, spec) -> (net, kwargs, changes)``: the network,
#: the keywords its constructor got, and each module replaced after construction.
Build = Callable[[str, int, int, int, str], tuple[nn.Module, dict[str, Any], list[Change]]]


@dataclass(frozen=True)
class BackboneFamily:
    """One backbone family: how its names are written, built, versioned and rebuilt.

    Attributes:
        names: how its names are written (checked by the configuration, listed by
            ``--help`` and the messages).
        build: the network for one of its names (see :data:`Build`).
        version: its library's version, recorded in the build.
        code: the Python lines that build ``net`` with the family's own library (the
            rebuild code written next to exported weights); None: only its author can.
        start_batchnorm: its BatchNorm statistics start as its own on noise images
            (:func:`start_batchnorm_`).
    """

    names: BackboneNames
    build: Build
    version: Callable[[], str]
    code: Callable[[BackboneBuild], list[str]] | None = None
    start_batchnorm: bool = False

    @property
    def name(self) -> str:
        return self.names.family


def _keywords(build: BackboneBuild) -> str:
    return "".join(f", {k}={v!r}" for k, v in sorted(build.kwargs.items()))


def _ressl_version() -> str:
    from ressl._version import __version__

    return __version__


def _module_version(library: str) -> Callable[[], str]:
    return lambda: str(__import__(library).__version__)


def _small(
    name: str, in_channels: int, image_size: int, width: int, spec: str
) -> tuple[nn.Module, dict[str, Any], list[Change]]:
    return SmallCNN(in_channels, width), {"in_channels": in_channels, "width": width}, []


def _small_code(build: BackboneBuild) -> list[str]:
    channels, width = build.kwargs.get("in_channels", 3), build.kwargs.get("width", 32)
    return [
        "import torch",
        "from safetensors.torch import load_file",
        "from ressl.models.backbones import SmallCNN",
        "",
        f"net = SmallCNN(in_channels={channels}, width={width})",
    ]


def _torchvision_code(build: BackboneBuild) -> list[str]:
    return [
        "import torch, torchvision",
        "from safetensors.torch import load_file",
        "",
        f"net = torchvision.models.get_model({build.name!r}, weights=None{_keywords(build)})",
    ]


def _timm_code(build: BackboneBuild) -> list[str]:
    return [
        "import torch, timm",
        "from safetensors.torch import load_file",
        "",
        f"net = timm.create_model({build.name!r}, pretrained=False{_keywords(build)})",
    ]


def _custom(
    name: str, in_channels: int, image_size: int, width: int, spec: str
) -> tuple[nn.Module, dict[str, Any], list[Change]]:
    raise ConfigError(
        f"{{backbone}} {spec} was a module given through the API; pass that module again "
        "(e.g. load_encoder(path, backbone=module)) to rebuild it",
        "backbone",
    )


def _without_width(
    build: Callable[[str, int, int, str], tuple[nn.Module, dict[str, Any], list[Change]]],
) -> Build:
    return lambda name, in_channels, image_size, width, spec: build(
        name, in_channels, image_size, spec
    )


#: The backbone families by name, one entry each: what ``build_backbone``, the checkpoint's
#: ``backbone_build``, the rebuild code and the ``--backbone`` checks, help and messages
#: follow (timm's ``register_model``: a new family is one entry, :func:`register_family`).
FAMILIES: dict[str, BackboneFamily] = {
    family.name: family
    for family in (
        BackboneFamily(BACKBONE_FAMILIES["ressl"], _small, _ressl_version, _small_code),
        BackboneFamily(
            BACKBONE_FAMILIES["torchvision"],
            _without_width(torchvision_backbone),
            _module_version("torchvision"),
            _torchvision_code,
            start_batchnorm=True,
        ),
        BackboneFamily(
            BACKBONE_FAMILIES["timm"],
            _without_width(timm_backbone),
            _module_version("timm"),
            _timm_code,
            start_batchnorm=True,
        ),
        BackboneFamily(BACKBONE_FAMILIES["custom"], _custom, lambda: ""),
    )
}
if FAMILIES.keys() != BACKBONE_FAMILIES.keys():  # the configuration checks names by that table
    raise ImportError("ressl.rules.BACKBONE_FAMILIES and FAMILIES name different families")


def register_family(family: BackboneFamily) -> None:
    """Add a backbone family: its names are accepted by ``build_backbone`` and the
    configuration (``backbone="FAMILY:NAME"``) and listed in their messages.

    Raises:
        ValueError: if a family of that name, or one of its bare names, exists already.
    """
    taken = {a for names in BACKBONE_FAMILIES.values() for a in names.aliases}
    if family.name in BACKBONE_FAMILIES or taken & set(family.names.aliases):
        raise ValueError(f"a backbone family {family.name!r} or its names exist already")
    BACKBONE_FAMILIES[family.name] = family.names
    FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family` (ressl's own stay)."""
    if name in ("ressl", "torchvision", "timm", "custom"):
        raise ValueError(f"{name!r} is one of ressl's own backbone families")
    BACKBONE_FAMILIES.pop(name, None)
    FAMILIES.pop(name, None)


def build_backbone(
    name: str | nn.Module, in_channels: int = 3, image_size: int = 32, width: int = 32
) -> nn.Module:
    """A backbone mapping ``(B, C, H, W)`` images to ``(B, F)`` features.

    The module's ``ressl_build`` (a :class:`BackboneBuild`) says how it was built and
    its feature size F (see the module docstring for the rules).

    Args:
        name: a name of a family in :data:`FAMILIES` (``"small"``, ``"resnet18"``,
            ``"resnet50"``, ``"torchvision:NAME"``, ``"timm:NAME"``), or an ``nn.Module``
            (used as it is).
        in_channels: image channels.
        image_size: input side; picks the ResNet stem and sizes the ViTs.
        width: first-stage width of the small CNN (ignored by the others).

    Raises:
        ValueError: on an unknown name, bad sizes, or a model that cannot take the images.
    """
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 8:
        raise ConfigError(f"{{image_size}} must be >= 8, got {image_size}", "image_size")
    kwargs: dict[str, Any] = {}
    changes: list[Change] = []
    if isinstance(name, nn.Module):
        net, spec, library, model = name, custom_spec(name), "custom", type(name).__name__
    else:
        parts = split_backbone(name)
        if parts is None:
            raise ConfigError(
                f"{{backbone}} must be one of {backbone_choices()}; got {name!r}", "backbone"
            )
        library, model = parts
        spec = name
        net, kwargs, changes = FAMILIES[library].build(model, in_channels, image_size, width, spec)
    dim = feature_dim(net, spec, in_channels, image_size)
    family = FAMILIES[library]
    if family.start_batchnorm:
        start_batchnorm_(net, in_channels, image_size)
    version = family.version()
    build = BackboneBuild(spec, library, model, version, kwargs, tuple(changes), dim)
    if not isinstance(name, nn.Module):
        net.out_dim = dim  # type: ignore[assignment]
    net.ressl_build = build  # type: ignore[assignment]
    return net
