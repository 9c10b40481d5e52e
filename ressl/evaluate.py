"""Evaluation protocols: feature extraction, the weighted kNN monitor and the linear probe."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import cosine_lr

if TYPE_CHECKING:
    from .data import ImageSource

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "linear_probe", "normalize_images"]


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 normalised by per-channel mean/std (values in [0, 1] scale)."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(
    fn: Callable[[Tensor], Tensor],
    source: ImageSource,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` (e.g. ``encoder.features``) over a whole image source, in order.

    Args:
        fn: ``(B, C, H, W)`` normalised float -> ``(B, F)`` features; call it in eval mode.
        source: images and labels (``ressl.data.ImageSource``).
        mean, std: per-channel normalisation.
        batch_size: images per forward pass.
        device: where to compute.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under autocast.
        channels_last: feed NHWC-strided inputs.

    Returns:
        ``(features, labels)``: float32 ``(N, F)`` L2-normalised features on
        ``device`` and int64 ``(N,)`` labels.
    """
    device = torch.device(device)
    feats, labels = [], []
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    for images, y in source.batches(batch_size, epoch=0, seed=0, device=device, shuffle=False, drop_last=False):
        x = normalize_images(images, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx:
            f = fn(x)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    memory_features: Tensor,
    memory_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores (InstDisc / MoCo monitor).

    Each query's ``k`` most cosine-similar memory entries vote for their class
    with weight ``exp(sim / temperature)``.

    Args:
        memory_features: ``(N, F)`` L2-normalised features of the labelled bank.
        memory_labels: ``(N,)`` int64 labels in ``[0, num_classes)``.
        query_features: ``(M, F)`` L2-normalised query features.
        num_classes: C.
        k: neighbours (clipped to N).
        temperature: vote temperature.
        chunk_size: queries per similarity block (bounds memory to chunk x N).

    Returns:
        ``(M, C)`` float32 class scores; ``argmax`` is the prediction.

    Raises:
        ValueError: on mismatched shapes or bad k / temperature.
    """
    if memory_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("memory_features and query_features must be (N, F) and (M, F) tensors")
    if memory_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"memory features have dim {memory_features.shape[1]} but queries have dim {query_features.shape[1]}"
        )
    if memory_labels.shape != (memory_features.shape[0],):
        raise ValueError(
            f"memory_labels must have shape ({memory_features.shape[0]},), got {tuple(memory_labels.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    k = min(k, memory_features.shape[0])
    labels = memory_labels.to(memory_features.device)
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = query_features[start : start + chunk_size].to(memory_features.device)
        sim = q @ memory_features.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, labels[top_idx], weights)
        out.append(scores)
    return torch.cat(out) if out else query_features.new_zeros(0, num_classes)


def _topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels.view(-1, 1).to(scores.device)).any(dim=1)
    return 100.0 * hit.float().mean().item()


def knn_accuracy(
    memory_features: Tensor,
    memory_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) kNN accuracy in percent."""
    scores = knn_predict(memory_features, memory_labels, query_features, num_classes, k, temperature)
    result = {"top1": _topk_accuracy(scores, query_labels, 1)}
    if num_classes > 5:
        result["top5"] = _topk_accuracy(scores, query_labels, 5)
    return result


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train a linear classifier on frozen features; report test top-1 (%).

    Features are standardised with the training set's per-dimension mean and
    std (what a frozen BatchNorm in front of the linear layer would do), then a
    linear layer is trained with SGD (momentum 0.9) and a cosine schedule.

    Args:
        train_features: ``(N, F)``; train_labels: ``(N,)``.
        test_features: ``(M, F)``; test_labels: ``(M,)``.
        num_classes: C.
        epochs: passes over the training features.
        lr: peak learning rate for ``batch_size`` 256 (scaled linearly).
        batch_size: mini-batch size.
        weight_decay: L2 penalty.
        seed: shuffling and init seed.

    Returns:
        ``{"top1": ..., "train_top1": ...}`` in percent.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    device = train_features.device
    gen = torch.Generator().manual_seed(seed)
    mu = train_features.mean(0, keepdim=True)
    sd = train_features.std(0, keepdim=True).clamp_min(1e-6)
    xtr = (train_features.float() - mu) / sd
    xte = (test_features.float().to(device) - mu) / sd
    ytr = train_labels.to(device)
    layer = torch.nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=gen) * 0.01
        layer.weight.copy_(w)
        layer.bias.zero_()
    base_lr = lr * batch_size / 256
    opt = torch.optim.SGD(layer.parameters(), lr=base_lr, momentum=0.9, weight_decay=weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, base_lr)
            loss = F.cross_entropy(layer(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        test_top1 = _topk_accuracy(layer(xte), test_labels, 1)
        train_top1 = _topk_accuracy(layer(xtr), ytr, 1)
    return {"top1": test_top1, "train_top1": train_top1}
