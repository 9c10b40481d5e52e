"""Networks: backbones, the projection head, and the ``ReSSL`` student/teacher/queue module."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ressl.config.settings import BACKBONES
from ressl.config.specs import ModelSpec
from ressl.errors import ConfigError
from ressl.functional import queue_push_, random_queue
from ressl.models.backbones import SmallCNN
from ressl.models.families import BackboneBuild, build_backbone

__all__ = [
    "BACKBONES",
    "SmallCNN",
    "ProjectionHead",
    "Encoder",
    "ReSSL",
    "build_backbone",
    "model_from_spec",
]


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
                raise ConfigError(f"{arg} must be >= 1, got {v}")
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
        backbone: a name ``build_backbone`` builds (``"small"``, ``"resnet18"``,
            ``"torchvision:NAME"``, ``"timm:NAME"`` ...) or an ``nn.Module`` mapping
            images to ``(B, F)`` features (the student uses it, the teacher a copy).
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
        backbone: str | nn.Module = "resnet18",
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
            raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
        net = build_backbone(backbone, in_channels, image_size, width)
        self.backbone_build: BackboneBuild = net.ressl_build  # type: ignore[assignment]
        feat_dim = self.backbone_build.feature_dim
        self.student = Encoder(net, ProjectionHead(feat_dim, hidden_dim, embed_dim))
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.register_buffer("queue", random_queue(queue_size, embed_dim, generator=generator))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def feature_dim(self) -> int:
        return self.backbone_build.feature_dim

    @torch.no_grad()
    def enqueue_(self, keys: Tensor) -> None:
        """Push ``(B, D)`` teacher embeddings into the queue (after the loss is formed)."""
        self.queue_ptr.copy_(queue_push_(self.queue, self.queue_ptr, keys))


def model_from_spec(
    spec: ModelSpec, *, backbone: nn.Module | None = None, meta: bool = False
) -> ReSSL:
    """The ``ReSSL`` module ``spec`` describes.

    Args:
        backbone: the module a ``custom:`` backbone was trained with.
        meta: build on the meta device (shapes only, no memory); a model whose
            construction cannot run there is built on the CPU.
    """
    kw: dict[str, Any] = dict(
        in_channels=spec.channels,
        image_size=spec.image_size,
        hidden_dim=spec.hidden_dim,
        embed_dim=spec.embed_dim,
        queue_size=spec.queue_size,
        width=spec.width,
    )
    net: str | nn.Module = spec.backbone if backbone is None else backbone
    if not meta:
        return ReSSL(net, **kw)
    if isinstance(net, nn.Module):
        net = copy.deepcopy(net).to("meta")
    try:
        with torch.device("meta"):
            return ReSSL(net, **kw)
    except (NotImplementedError, ValueError, RuntimeError):
        # an initialiser that copies data (torchvision's RegNets), or a module holding tensors
        # of its own or using an op without a meta kernel: built for real (a genuine problem
        # raises again there)
        real = spec.backbone if backbone is None else backbone
        if isinstance(real, nn.Module):
            real = copy.deepcopy(real)  # the caller's module stays where it is
        return ReSSL(real, **kw).to("meta")
