"""Weighted kNN (InstDisc / MoCo monitor): L2-normalised backbone features, cosine
similarity, the k nearest training images vote with weight ``exp(sim / t)``."""

from __future__ import annotations

import torch
from torch import Tensor

from ressl.errors import ConfigError
from ressl.eval.features import topk_accuracy
from ressl.rules import KNN_K, KNN_TEMPERATURE

__all__ = ["knn_accuracy", "knn_predict"]


@torch.no_grad()
def knn_predict(
    bank_features: Tensor,
    bank_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores (InstDisc / MoCo monitor).

    Each query's ``k`` most cosine-similar bank entries vote for their class
    with weight ``exp(sim / temperature)``.

    Args:
        bank_features: ``(N, F)`` L2-normalised features of the labelled bank.
        bank_labels: ``(N,)`` int64 labels in ``[0, num_classes)``.
        query_features: ``(M, F)`` L2-normalised query features.
        num_classes: C.
        k: neighbours (clipped to N).
        temperature: vote temperature.
        chunk_size: queries per similarity block (bounds the similarity block to chunk x N).

    Returns:
        ``(M, C)`` float32 class scores; ``argmax`` is the prediction.

    Raises:
        ValueError: on mismatched shapes or bad k / temperature.
    """
    if bank_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("bank_features and query_features must be (N, F) and (M, F) tensors")
    if bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"bank features have dim {bank_features.shape[1]} but queries have dim {query_features.shape[1]}"
        )
    if bank_labels.shape != (bank_features.shape[0],):
        raise ValueError(
            f"bank_labels must have shape ({bank_features.shape[0]},), got {tuple(bank_labels.shape)}"
        )
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    k = min(k, bank_features.shape[0])
    labels = bank_labels.to(bank_features.device)
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = query_features[start : start + chunk_size].to(bank_features.device)
        sim = q @ bank_features.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, labels[top_idx], weights)
        out.append(scores)
    return torch.cat(out) if out else query_features.new_zeros(0, num_classes)


def knn_accuracy(
    bank_features: Tensor,
    bank_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, float]:
    """Weighted kNN accuracy in percent: ``{"top1": ...}``, plus ``"top5"`` when there are more than 5 classes.

    Args:
        bank_features, bank_labels, query_features, num_classes, k, temperature:
            as in :func:`knn_predict`.
        query_labels: ``(M,)`` true labels of the queries.

    Raises:
        ValueError: on mismatched shapes or bad k / temperature.

    Example:
        >>> bank = torch.eye(2); q = torch.tensor([[0.9, 0.1]])
        >>> knn_accuracy(bank, torch.tensor([0, 1]), q, torch.tensor([0]), 2, k=1)
        {'top1': 100.0}
    """
    if query_labels.shape != (query_features.shape[0],):
        raise ValueError(
            f"query_labels must have shape ({query_features.shape[0]},), got {tuple(query_labels.shape)}"
        )
    scores = knn_predict(bank_features, bank_labels, query_features, num_classes, k, temperature)
    result = {"top1": topk_accuracy(scores, query_labels, 1)}
    if num_classes > 5:
        result["top5"] = topk_accuracy(scores, query_labels, 5)
    return result
