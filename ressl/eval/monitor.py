"""The monitor a training run reports at its kNN-monitor points, on the student's backbone
features: weighted kNN accuracy when the data has labels, and RankMe (the effective rank,
``ressl.eval.health.rankme``) of the raw features of a fixed sample of ``MONITOR_SAMPLE``
images, labels or not: the sample and the measure of ``ressl eval health`` with its default
seed (``ressl.eval.sampled_health``), so the last monitor point and an evaluation of the
final checkpoint agree.

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
from ressl.eval.knn import knn_accuracy
from ressl.eval.sampled_health import health_sample, sample_health
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

    row: dict[str, float] = {}
    try:
        if data.labelled is not None and data.test is not None and data.classes:
            bank_f, bank_y = features(data.labelled)
            test_f, test_y = features(data.test)
            k, t = config.knn_k, config.knn_temperature
            acc = knn_accuracy(bank_f, bank_y, test_f, test_y, len(data.classes), k, t)
            row.update({f"knn_{name}": round(v, 4) for name, v in acc.items()})
        sample, _ = health_sample(data, MONITOR_SAMPLE, seed=0)  # every rank the same
        measured = sample_health(
            encoder.features,
            sample,
            mean=data.mean,
            std=data.std,
            side=data.image_size,
            device=device,
        )
    finally:
        encoder.train(was_training)
    row["rankme"] = round(float(measured["rankme"]), 4)
    return row
