"""The monitor a training run reports at its kNN-monitor points, on the student's backbone
features: weighted kNN accuracy when the data has labels, and RankMe (the effective rank,
``ressl.eval.health.rankme``) of the features of a fixed sample of ``MONITOR_SAMPLE``
images, labels or not: the first images of the test split, or of the training images when
there is no test split.

Distributed, each rank extracts the features of its contiguous part of each split and
the parts are gathered in rank order, so every rank computes the same accuracy as one
process would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ressl.data.sources import ImageData, ImageSource, source_part
from ressl.distributed import World, all_gather_rows
from ressl.eval.features import extract_features
from ressl.eval.health import rankme
from ressl.eval.knn import knn_accuracy
from ressl.models.network import Encoder
from ressl.rules import HEALTH_IMAGES

if TYPE_CHECKING:
    from ressl.config.settings import TrainConfig

__all__ = ["MONITOR_SAMPLE", "knn_monitor"]

#: Images whose features RankMe measures at each monitor point (``ressl eval health``'s).
MONITOR_SAMPLE = HEALTH_IMAGES


def knn_monitor(
    encoder: Encoder,
    data: ImageData,
    config: TrainConfig,
    device: torch.device,
    amp: torch.dtype | None,
    world: World,
) -> dict[str, float]:
    """``{"knn_top1", "knn_top5", "rankme"}`` of ``encoder`` on ``data`` (``rankme`` alone
    without labels).

    The kNN bank is ``data.labelled``, the queries ``data.test``; k and t are the
    config's ``knn_k`` and ``knn_temperature``. The encoder runs in eval mode (BatchNorm
    running statistics: no collectives, so ranks may run different batch sizes) and is
    put back in the mode it was in.
    """
    was_training = encoder.training
    encoder.eval()
    kw: dict[str, Any] = dict(
        mean=data.mean,
        std=data.std,
        batch_size=512,
        device=device,
        autocast_dtype=amp,
        channels_last=config.channels_last,
    )

    def features(source: ImageSource) -> tuple[Tensor, Tensor]:
        n = len(source)
        if not world.distributed or n < world.size:
            return extract_features(encoder.features, source, **kw)
        part = source_part(source, n * world.rank // world.size, n * (world.rank + 1) // world.size)
        f, y = extract_features(encoder.features, part, **kw)
        return all_gather_rows(f), all_gather_rows(y)

    try:
        if data.labelled is None or data.test is None or not data.classes:
            sample = data.test if data.test is not None else data.train
            sample = source_part(sample, 0, min(len(sample), MONITOR_SAMPLE))
            f, _ = extract_features(encoder.features, sample, **kw)  # every rank the same
            return {"rankme": round(float(rankme(f)), 4)}
        bank_f, bank_y = features(data.labelled)
        test_f, test_y = features(data.test)
    finally:
        encoder.train(was_training)
    k, t = config.knn_k, config.knn_temperature
    acc = knn_accuracy(bank_f, bank_y, test_f, test_y, len(data.classes), k, t)
    row = {f"knn_{name}": round(v, 4) for name, v in acc.items()}
    row["rankme"] = round(float(rankme(test_f[:MONITOR_SAMPLE])), 4)
    return row
