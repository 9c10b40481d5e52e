"""Backbone features of a dataset, extracted once for the evaluation protocols.

The protocols that use them (kNN in :mod:`ressl.eval.knn`, the fast linear probe in
:mod:`ressl.eval.linear`, the paper's in :mod:`ressl.eval.paper_linear`) are listed once in
:mod:`ressl.eval.protocols`.

The t-SNE of the paper's qualitative figure is in :mod:`ressl.eval.tsne` (``ressl.tsne``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ressl.errors import DataError
from ressl.views import normalize

if TYPE_CHECKING:
    from ressl.data.sources import ImageData, ImageSource

__all__ = ["extract_features", "require_labels", "split_features", "topk_accuracy"]

#: What the refusals of the protocols that need labels point at instead.
WITHOUT_LABELS = "`ressl eval health` measures the features without labels"


def require_labels(data: ImageData, what: str) -> tuple[ImageSource, ImageSource]:
    """``(data.labelled, data.test)``, or a one-line refusal saying that ``what`` (e.g.
    ``"kNN evaluation"``) needs them and pointing at the health protocol.

    Raises:
        DataError: the dataset has no labels, or no labelled test split.
    """
    if data.labelled is None or not data.classes:
        raise DataError(
            f"{data.name} has no labels (class sub-folders), which {what} needs; " + WITHOUT_LABELS
        )
    if data.test is None:
        raise DataError(
            f"{data.name} has no labelled test split, which {what} needs (a folder needs test/ "
            f"or val/ with the same class sub-folders as train/); {WITHOUT_LABELS}"
        )
    return data.labelled, data.test


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
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` (e.g. ``encoder.features``) over a whole image source, in order.

    Args:
        fn: ``(B, C, H, W)`` normalised float -> ``(B, F)`` features; call it in eval mode.
        source: images and labels (``ressl.data.sources.ImageSource``).
        mean, std: per-channel normalisation.
        batch_size: images per forward pass.
        device: where to compute.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under autocast.
        channels_last: feed NHWC-strided inputs.
        progress: called with the number of images done after each batch.

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
    for images, y in source.batches(
        batch_size, epoch=0, seed=0, device=device, shuffle=False, drop_last=False
    ):
        x = normalize(
            images, mean, std, input_scale=1 / 255 if images.dtype == torch.uint8 else 1.0
        )
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx:
            f = fn(x)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y)
        if progress is not None:
            progress(sum(len(t) for t in labels))
    return torch.cat(feats), torch.cat(labels)


def split_features(
    fn: Callable[[Tensor], Tensor],
    data: ImageData,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Features of a dataset's labelled training split and its test split (the eval protocols' input).

    The training side is ``data.labelled`` (the labelled train images: the whole train
    split for Fashion-MNIST / CIFAR / labelled folders, the 5,000 labelled images for
    STL-10).

    Args:
        fn: ``(B, C, H, W)`` normalised float -> ``(B, F)``; call it in eval mode.
        data: a loaded dataset (``ressl.load_dataset``).
        mean, std: normalisation; default the dataset's own (pass the checkpoint's
            when they differ).
        batch_size, device, autocast_dtype: as in :func:`extract_features`.
        progress: called with the images done so far (train split, then test split).

    Returns:
        ``(train_features (N, F), train_labels (N,), test_features (M, F), test_labels (M,))``,
        features L2-normalised float32 on ``device``.

    Raises:
        DataError: if the dataset has no labelled training split or no labelled test split.
    """
    labelled, test = require_labels(data, "kNN and linear evaluation")
    kw: dict[str, Any] = dict(
        mean=data.mean if mean is None else mean,
        std=data.std if std is None else std,
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
    )
    report = progress or (lambda done: None)
    train_f, train_y = extract_features(fn, labelled, **kw, progress=report)
    n = len(train_y)
    test_f, test_y = extract_features(fn, test, **kw, progress=lambda done: report(n + done))
    return train_f, train_y, test_f, test_y


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """The percentage of rows of ``scores`` whose ``k`` highest include the row's label."""
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels.view(-1, 1).to(scores.device)).any(dim=1)
    return 100.0 * hit.float().mean().item()
