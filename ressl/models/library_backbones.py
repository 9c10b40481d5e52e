"""torchvision and timm backbones, built by their libraries and fitted to ressl's images.

A torchvision classification model comes from ``torchvision.models.get_model(NAME,
weights=None)``, a timm one from ``timm.create_model(NAME, pretrained=False,
num_classes=0, in_chans=C)``; then each module replaced to fit the images is recorded
as a :data:`Change` ``(path, module as torch.nn code, why)``:

* Small images: a ResNet-like stem (``conv1`` a 7x7 stride-2 convolution followed by
  ``maxpool``) becomes a 3x3 stride-1 convolution without max-pooling for images up to
  ``SMALL_STEM_MAX`` px (the CIFAR stem of the ReSSL and SimCLR code).
* Channels: a torchvision model's first convolution is replaced by one taking C
  channels when C is not 3 (timm does this itself with ``in_chans``).
* Features: a torchvision model's final ``Linear`` (the classifier), and a ``Dropout``
  right before it, become ``Identity``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ressl.errors import ConfigError

__all__ = ["SMALL_STEM_MAX", "Change", "timm_backbone", "torchvision_backbone"]

#: The largest image side that gets the small-image stem.
SMALL_STEM_MAX = 64

#: A module replaced after construction: ``(path, module as torch.nn code, why)``.
Change = tuple[str, str, str]


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


def torchvision_backbone(
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


def timm_backbone(
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
