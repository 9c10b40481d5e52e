"""Backbones: ressl's small CNN, and what every built backbone gets.

A backbone maps ``(B, C, H, W)`` images to ``(B, F)`` features; ``build_backbone``
(:mod:`ressl.models.families`) builds one by its family. Here: :class:`SmallCNN`, the
feature size F of any backbone (:func:`feature_dim`, one forward pass of a single
image), and the start of a torchvision or timm model's BatchNorm statistics as its own
on noise images (:func:`start_batchnorm_`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ressl.errors import ConfigError, first_line

__all__ = ["BN_START_VALUES", "SmallCNN", "custom_spec", "feature_dim", "start_batchnorm_"]

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


def custom_spec(module: nn.Module) -> str:
    """The name a module given through the API is recorded under: ``custom:ClassName``."""
    return f"custom:{type(module).__name__}"


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


def feature_dim(net: nn.Module, spec: str, in_channels: int, image_size: int) -> int:
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
