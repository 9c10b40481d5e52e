"""Networks: backbones, the projection head, and the ``ReSSL`` student/teacher/queue module."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .config import BACKBONES
from .functional import queue_push_, random_queue

__all__ = ["BACKBONES", "SmallCNN", "ProjectionHead", "Encoder", "ReSSL", "build_backbone"]


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
            raise ValueError(f"width must be >= 1, got {width}")
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


def _resnet(name: str, in_channels: int, small_stem: bool) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        # CIFAR stem: 3x3 stride-1 conv, no max-pool, so 32 px inputs keep their detail.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def build_backbone(
    name: str, in_channels: int = 3, image_size: int = 32, width: int = 32
) -> nn.Module:
    """A backbone mapping ``(B, C, H, W)`` images to ``(B, F)`` features; ``.out_dim`` is F.

    ResNets get the small-image stem (3x3 stride-1 conv, no max-pool) for inputs
    up to 64 px, the standard ImageNet stem above.

    Args:
        name: one of ``BACKBONES``: ``"small"``, ``"resnet18"``, ``"resnet50"``.
        in_channels: image channels.
        image_size: input side, picks the ResNet stem.
        width: first-stage width of the small CNN (ignored for ResNets).

    Raises:
        ValueError: on an unknown name or bad sizes.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if name == "small":
        return SmallCNN(in_channels, width)
    return _resnet(name, in_channels, small_stem=image_size <= 64)


class ProjectionHead(nn.Module):
    """``Linear(in -> hidden) -> ReLU -> Linear(hidden -> out)``, no BN (as the official code).

    Args:
        in_dim: backbone feature size.
        hidden_dim: hidden width.
        out_dim: embedding size D.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        for arg, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if v < 1:
                raise ValueError(f"{arg} must be >= 1, got {v}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """Backbone plus projection head; ``forward`` returns L2-normalised ``(B, D)`` embeddings."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, F)`` backbone features (what evaluation uses)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)  # (B, D)


class ReSSL(nn.Module):
    """Student, EMA teacher and the relation queue.

    The module holds state; the training step composes the functional pieces
    (see ``ressl.train``). ``queue`` and ``queue_ptr`` are persistent buffers, so
    they are saved and restored with the weights.

    Args:
        backbone: ``"small"``, ``"resnet18"`` or ``"resnet50"``.
        in_channels: image channels.
        image_size: input side (picks the ResNet stem).
        hidden_dim: projection head hidden width.
        embed_dim: embedding size D.
        queue_size: K, number of past teacher embeddings kept.
        width: small CNN width.
        generator: randomness for the initial queue (random unit vectors).
    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        in_channels: int = 3,
        image_size: int = 32,
        hidden_dim: int = 512,
        embed_dim: int = 128,
        queue_size: int = 4096,
        width: int = 32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        net = build_backbone(backbone, in_channels, image_size, width)
        feat_dim: int = net.out_dim  # type: ignore[assignment]
        self.student = Encoder(net, ProjectionHead(feat_dim, hidden_dim, embed_dim))
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.register_buffer("queue", random_queue(queue_size, embed_dim, generator=generator))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def feature_dim(self) -> int:
        out_dim: int = self.student.backbone.out_dim  # type: ignore[assignment]
        return out_dim

    @torch.no_grad()
    def enqueue_(self, keys: Tensor) -> None:
        """Push ``(B, D)`` teacher embeddings into the queue (after the loss is formed)."""
        self.queue_ptr.copy_(queue_push_(self.queue, self.queue_ptr, keys))
