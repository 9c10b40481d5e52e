"""The paper's linear evaluation: a linear layer trained on augmented crops through the
frozen backbone.

The official ReSSL protocol (RESSL.md): the backbone in eval mode (BatchNorm frozen),
every epoch a new RandomResizedCrop (scale 0.08-1, torchvision's default) and
horizontal flip of each training image through it, its raw features into one
``nn.Linear``; SGD with lr 0.3, momentum 0.9, no weight decay, batch 256, a cosine
schedule over 100 epochs; top-1 on the test images as stored. The official script
reports its best epoch, which is selected on the test set: this reports the final
epoch, and the best only under that name (``best_top1``, ``best_epoch``).

``ressl.eval.linear.linear_probe`` is the fast probe beside it (features extracted once,
standardised): minutes instead of hours, and not the paper's number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ressl.data.sources import ImageSource
from ressl.errors import ConfigError, DataError
from ressl.rules import LEARNING_RATE, WEIGHT_DECAY
from ressl.schedules import cosine_lr
from ressl.views import normalize, weak_view

__all__ = ["paper_linear_eval"]


def _test_features(
    fn: Callable[[Tensor], Tensor],
    test: ImageSource,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Raw (not normalised) features of the test images as stored, in order."""
    feats, labels = [], []
    for images, y in test.batches(
        batch_size, epoch=0, seed=0, device=device, shuffle=False, drop_last=False
    ):
        x = normalize(
            images, mean, std, input_scale=1 / 255 if images.dtype == torch.uint8 else 1.0
        )
        feats.append(fn(x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _check_args(
    epochs: int,
    batch_size: int,
    num_classes: int,
    lr: float,
    weight_decay: float,
    n_train: int,
    n_test: int,
) -> None:
    for name, value, low in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("num_classes", num_classes, 2),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    LEARNING_RATE.check("lr", lr)
    WEIGHT_DECAY.check("weight_decay", weight_decay)
    if n_train < 1 or n_test < 1:
        raise DataError(f"need training and test images, got {n_train} and {n_test}")


def _official_layer(
    features: int, num_classes: int, seed: int, device: torch.device
) -> torch.nn.Linear:
    """``nn.Linear(features, num_classes)`` as the official script initialises it:
    weights N(0, 0.01) from ``seed``, bias 0."""
    init = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer = torch.nn.Linear(features, num_classes).to(device)
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=init) * 0.01)
        layer.bias.zero_()
    return layer


@torch.no_grad()
def _crop_features(
    fn: Callable[[Tensor], Tensor],
    images: Tensor,
    generator: torch.Generator,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float],
) -> Tensor:
    """``(B, F)`` features of a new RandomResizedCrop + flip of each image."""
    x = weak_view(images, size=size, mean=mean, std=std, generator=generator, scale=scale)
    return fn(x).float()


def _accuracy(layer: torch.nn.Linear, x: Tensor, y: Tensor) -> float:
    return 100.0 * float((layer(x).argmax(1) == y).float().mean()) if len(y) else math.nan


def _sgd_step(
    opt: torch.optim.Optimizer, layer: torch.nn.Linear, x: Tensor, y: Tensor, lr: float
) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(layer(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def paper_linear_eval(
    fn: Callable[[Tensor], Tensor],
    train: ImageSource,
    test: ImageSource,
    num_classes: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    epochs: int = 100,
    lr: float = 0.3,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train a linear layer on augmented crops through the frozen ``fn``; test top-1.

    The official protocol in order: features of the test set once, then epochs of
    crops, SGD steps and a test.

    Args:
        fn: ``(B, C, H, W)`` normalised images -> ``(B, F)`` backbone features, in eval
            mode (called under ``no_grad``).
        train, test: labelled images (labels in ``[0, num_classes)``).
        mean, std: per-channel normalisation.
        image_size: side of the training crops (the images' side).
        epochs, lr, batch_size, weight_decay: SGD (momentum 0.9) with a cosine schedule;
            ``lr`` is per step as given (the official value 0.3 is for batch 256).
        crop_scale: RandomResizedCrop's area range.
        seed: the layer's initialisation, the order and the crops.
        device: where to compute.
        progress: called with the number of epochs done after each epoch.

    Returns:
        ``top1`` (the final epoch's test top-1, %), ``best_top1`` and ``best_epoch``
        (the best epoch, selected on the test set), ``top1_per_epoch``.

    Raises:
        ValueError: on a bad hyper-parameter or too few images.
    """
    _check_args(epochs, batch_size, num_classes, lr, weight_decay, len(train), len(test))
    device = torch.device(device)
    with torch.no_grad():
        test_x, test_y = _test_features(fn, test, mean, std, batch_size, device)
    layer = _official_layer(test_x.shape[1], num_classes, seed, device)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    crops = torch.Generator(device=device).manual_seed(seed + 1)
    steps = epochs * math.ceil(len(train) / batch_size)
    step, per_epoch = 0, []
    for epoch in range(epochs):
        for images, y in train.batches(
            batch_size, epoch=epoch, seed=seed, device=device, shuffle=True, drop_last=False
        ):
            features = _crop_features(
                fn, images, crops, size=image_size, mean=mean, std=std, scale=crop_scale
            )
            _sgd_step(opt, layer, features, y, cosine_lr(step, steps, lr))
            step += 1
        with torch.no_grad():
            per_epoch.append(round(_accuracy(layer, test_x, test_y), 4))
        if progress is not None:
            progress(epoch + 1)
    best = max(range(epochs), key=lambda e: per_epoch[e])
    return {
        "top1": per_epoch[-1],
        "best_top1": per_epoch[best],
        "best_epoch": best + 1,
        "top1_per_epoch": per_epoch,
    }
