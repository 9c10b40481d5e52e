"""Backbones: ressl's own, any torchvision classification model, any timm model, any ``nn.Module``.

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
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ressl.errors import ConfigError, ExportError, first_line
from ressl.jsontext import parse_json
from ressl.rules import BACKBONE_FAMILIES, BackboneNames, backbone_choices, split_backbone

__all__ = [
    "BN_START_VALUES",
    "FAMILIES",
    "SMALL_STEM_MAX",
    "BackboneBuild",
    "BackboneFamily",
    "SmallCNN",
    "build_backbone",
    "custom_spec",
    "register_family",
    "start_batchnorm_",
    "unregister_family",
]

#: The largest image side that gets the small-image stem.
SMALL_STEM_MAX = 64

#: Values per channel, at the smallest BatchNorm map, of the noise images whose statistics
#: replace PyTorch's initial (mean 0, var 1). Evidence: MobileNetV3-Small
#: at 28 px (1x1 maps), eval/train feature-norm ratio on other noise: 15 from 16 values,
#: 2.1 from 64, 1.2 from 256. Then the per-layer median ratio of the started variance to the
#: untrained network's batch variance on 256 Fashion-MNIST images is 0.6-1.4 for
#: MobileNetV3-Small, EfficientNet-B0 and ResNet-18 (PyTorch's start: 0.49-95,014).
BN_START_VALUES = 256


class SmallCNN(nn.Module):
    """A compact VGG-style CNN for fast CPU runs on small images.

    Four conv-BN-ReLU stages of widths ``w, 2w, 4w, 8w`` with 2x max-pooling after
    the first three, then global average pooling: ``(B, C, H, W) -> (B, 8w)``.

    Args:
        in_channels: image channels (1 or 3).
        width: channels of the first stage.
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"{{width}} must be >= 1, got {width}", "width")
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))  # (B, 8w)


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


def custom_spec(module: nn.Module) -> str:
    """The name a module given through the API is recorded under: ``custom:ClassName``."""
    return f"custom:{type(module).__name__}"


def _set(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _conv_like(conv: nn.Conv2d, in_channels: int, **changes: Any) -> nn.Conv2d:
    kw: dict[str, Any] = dict(
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    kw.update(changes)
    return nn.Conv2d(in_channels, conv.out_channels, **kw)


def _conv_code(conv: nn.Conv2d) -> str:
    """The ``torch.nn`` code that builds a convolution like ``conv``."""
    parts = [
        str(conv.in_channels),
        str(conv.out_channels),
        f"kernel_size={conv.kernel_size}",
        f"stride={conv.stride}",
        f"padding={conv.padding!r}",
    ]
    if conv.dilation != (1, 1):
        parts.append(f"dilation={conv.dilation}")
    if conv.groups != 1:
        parts.append(f"groups={conv.groups}")
    parts.append(f"bias={conv.bias is not None}")
    if conv.padding_mode != "zeros":
        parts.append(f"padding_mode={conv.padding_mode!r}")
    return f"Conv2d({', '.join(parts)})"


def _resnet_like(net: nn.Module) -> bool:
    conv, pool = getattr(net, "conv1", None), getattr(net, "maxpool", None)
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (7, 7)
        and conv.stride == (2, 2)
        and isinstance(pool, nn.MaxPool2d)
    )


Change = tuple[str, str, str]


def _small_stem(net: nn.Module, in_channels: int) -> list[Change]:
    conv: nn.Conv2d = net.conv1  # type: ignore[assignment]
    net.conv1 = _conv_like(conv, in_channels, kernel_size=3, stride=1, padding=1)
    net.maxpool = nn.Identity()
    return [
        ("conv1", _conv_code(net.conv1), "small-image stem"),
        ("maxpool", "Identity()", "small-image stem"),
    ]


def _first_conv(net: nn.Module, in_channels: int, spec: str) -> list[Change]:
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return []
            new = _conv_like(module, in_channels)
            _set(net, path, new)
            return [(path, _conv_code(new), f"{in_channels}-channel input")]
    raise ConfigError(
        f"{{backbone}} {spec} has no Conv2d to take {in_channels}-channel images", "backbone"
    )


def _drop_classifier(net: nn.Module, spec: str) -> list[Change]:
    linears = [p for p, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{{backbone}} {spec} has no final Linear layer (its classifier) to remove; train it through "
            "the API as an nn.Module that returns (batch, features)",
            "backbone",
        )
    path = linears[-1]
    parent_path, _, child = path.rpartition(".")
    removed = [path]
    parent = net.get_submodule(parent_path) if parent_path else net
    prefix = f"{parent_path}." if parent_path else ""
    if isinstance(parent, nn.Sequential) and child.isdigit() and int(child) > 0:
        if isinstance(parent[int(child) - 1], nn.Dropout):
            removed.insert(0, f"{prefix}{int(child) - 1}")
    elif isinstance(getattr(parent, "dropout", None), nn.Dropout):  # GoogLeNet, Inception
        removed.insert(0, f"{prefix}dropout")
    for p in removed:
        _set(net, p, nn.Identity())
    return [(p, "Identity()", "classifier removed") for p in removed]


def _with_size(
    build: Any, name: str, size_kw: str, size: int, **kw: Any
) -> tuple[nn.Module, dict[str, int]]:
    """``build(name, **kw)``, with ``size_kw=size`` where the model takes it (a model that
    does not refuses the keyword before it draws any weight)."""
    try:
        return build(name, **kw, **{size_kw: size}), {size_kw: size}
    except TypeError as e:
        if size_kw not in str(e):
            raise
    return build(name, **kw), {}


def _torchvision(
    name: str, in_channels: int, image_size: int, spec: str
) -> tuple[nn.Module, dict[str, Any], list[Change]]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ConfigError(
            f"{{backbone}} {spec} is not a torchvision classification model; it has "
            f"{', '.join(names[:6])}, ... ({len(names)} in all: torchvision.models.list_models())",
            "backbone",
        )
    kwargs: dict[str, Any] = {"image_size": image_size} if name.startswith("vit_") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # else training mode returns a tuple with the aux heads
        kwargs["init_weights"] = True  # torchvision's truncated-normal init, said explicitly
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    changes = (
        _small_stem(net, in_channels)
        if image_size <= SMALL_STEM_MAX and _resnet_like(net)
        else _first_conv(net, in_channels, spec)
        if in_channels != 3
        else []
    )
    return net, kwargs, changes + _drop_classifier(net, spec)


def _timm(
    name: str, in_channels: int, image_size: int, spec: str
) -> tuple[nn.Module, dict[str, Any], list[Change]]:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"{{backbone}} {spec} needs timm: pip install 'ressl[timm]'", "backbone"
        ) from None
    if not timm.is_model(name):
        raise ConfigError(
            f"{{backbone}} {spec} is not a timm model (timm {timm.__version__}); timm.list_models() lists them",
            "backbone",
        )
    net, sized = _with_size(
        timm.create_model,
        name,
        "img_size",
        image_size,
        pretrained=False,
        num_classes=0,
        in_chans=in_channels,
    )
    changes = (
        _small_stem(net, in_channels) if image_size <= SMALL_STEM_MAX and _resnet_like(net) else []
    )
    return net, {"num_classes": 0, "in_chans": in_channels, **sized}, changes


def _forward_one(net: nn.Module, in_channels: int, image_size: int) -> Any:
    """The output for one image, computed on the meta device (shapes only: free at any size)
    where the module allows it, else for real."""
    x = torch.zeros(1, in_channels, image_size, image_size, device="meta")
    state = dict(net.named_parameters()) | dict(net.named_buffers())
    if any(t.device.type != "meta" for t in state.values()):
        state = {k: torch.empty_like(t, device="meta") for k, t in state.items()}
        try:
            return torch.func.functional_call(net, state, (x,))
        except Exception:  # noqa: BLE001 - a module holding tensors of its own: run it for real
            param = next(iter(net.parameters()), None)
            x = torch.zeros_like(x, device=param.device if param is not None else "cpu")
    return net(x)


def _feature_dim(net: nn.Module, spec: str, in_channels: int, image_size: int) -> int:
    """F, from one forward pass of a single image."""
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            out = _forward_one(net, in_channels, image_size)
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as e:
        raise ConfigError(
            f"{{backbone}} {spec} cannot take {in_channels}x{image_size}x{image_size} images: {first_line(e)}",
            "backbone",
        ) from None
    finally:
        net.train(training)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(
            f"{{backbone}} {spec} gives {shape} for one {in_channels}x{image_size}x{image_size} "
            "image; a backbone must return (batch, features): end it in global pooling",
            "backbone",
        )
    return int(out.shape[1])


def _smallest_map(
    net: nn.Module, norms: Sequence[nn.Module], in_channels: int, image_size: int
) -> int:
    """The fewest values per channel per image that any of ``norms`` sees (1 for a 1x1 map)."""
    sizes: list[int] = []

    def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
        sizes.append(args[0][0, 0].numel())  # (B, C, ...) -> values of one channel of one image

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        with torch.no_grad():
            _forward_one(net.eval(), in_channels, image_size)
    finally:
        for h in hooks:
            h.remove()
    return min(sizes, default=1)


def start_batchnorm_(net: nn.Module, in_channels: int, image_size: int) -> None:
    """Set each BatchNorm's running statistics to ``net``'s own on noise images.

    PyTorch starts them at mean 0, variance 1 and moves them by ``momentum`` per training
    batch (torchvision's MobileNetV3: 0.01, MNASNet: 0.0003). Behind a depthwise
    convolution (torchvision's fan-out init) the real variance is 1e-2 to 1e-5, so after a
    short run eval mode still divides by about 1: each such layer shrinks the signal
    10-100x and the features come out the same for every image (MobileNetV3-Small, 7
    steps on Fashion-MNIST: spread 1e-9, kNN at chance). Statistics measured on
    ``(N, C, S, S)`` unit-normal images (what normalised data looks like in scale), N
    giving ``BN_START_VALUES`` values per channel at the smallest map, are right to a
    small factor from the first step. The global RNG is untouched.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    training = net.training
    try:
        per_image = _smallest_map(net, norms, in_channels, image_size)
        noise = torch.Generator().manual_seed(0)
        images = max(2, math.ceil(BN_START_VALUES / per_image))  # 2: a 1x1 map has a variance
        x = torch.randn(images, in_channels, image_size, image_size, generator=noise)
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch gives its own statistics
        net.train()
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # dropout draws from the RNG
            net(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            if m.num_batches_tracked is not None:  # tracked with the running statistics
                m.num_batches_tracked.zero_()  # no training batch seen yet
        net.train(training)


# --------------------------------------------------------------------------- families

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
            _without_width(_torchvision),
            _module_version("torchvision"),
            _torchvision_code,
            start_batchnorm=True,
        ),
        BackboneFamily(
            BACKBONE_FAMILIES["timm"],
            _without_width(_timm),
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
    dim = _feature_dim(net, spec, in_channels, image_size)
    family = FAMILIES[library]
    if family.start_batchnorm:
        start_batchnorm_(net, in_channels, image_size)
    version = family.version()
    build = BackboneBuild(spec, library, model, version, kwargs, tuple(changes), dim)
    if not isinstance(name, nn.Module):
        net.out_dim = dim  # type: ignore[assignment]
    net.ressl_build = build  # type: ignore[assignment]
    return net
