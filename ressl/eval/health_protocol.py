"""The ``health`` evaluation protocol: label-free measures of an encoder on a fixed sample.

The function and report line that :data:`ressl.eval.protocols.PROTOCOLS` registers as
``health``; the measuring itself (torch) is :mod:`ressl.eval.sampled_health`, imported when
the protocol runs, so ``ressl --help`` stays fast.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ressl.eval.sources import FeatureSource, Progress, silent
from ressl.rules import HEALTH_IMAGES, HEALTH_SAMPLE

if TYPE_CHECKING:
    import torch

    from ressl.data.sources import ImageData

__all__ = ["encoder_health", "health_report"]


def encoder_health(
    source: FeatureSource,
    data: ImageData,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: Progress | None = None,
    images: int = HEALTH_IMAGES,
    seed: int = 0,
) -> dict[str, Any]:
    """Label-free health on a fixed sample: up to ``images`` images of the test split (the
    train split when there is none), RankMe, std and uniformity of their features, and the
    alignment of two weak views of each (``ressl.eval.sampled_health``)."""
    import torch

    from ressl.eval.sampled_health import health_sample, sample_health

    HEALTH_SAMPLE.check("images", images)
    t0 = time.perf_counter()
    sample, split = health_sample(data, images, seed)
    heading = (
        f"measuring {source.description} of {len(sample)} {data.name} {split} images "
        f"and two views of each on {device}"
    )
    with (progress or silent)("health", len(sample), heading=heading) as report:
        measures = sample_health(
            source.fn,
            sample,
            mean=source.mean,
            std=source.std,
            side=data.image_size,
            seed=seed,
            batch_size=batch_size,
            device=torch.device(device),
            progress=report,
        )
    return {
        "protocol": "health",
        **source.info,
        "features": source.features,
        "dim": measures.pop("dim"),
        "dataset": data.name,
        "split": split,
        "images": len(sample),
        "seed": seed,
        "rank_cap": measures.pop("rank_cap"),
        **{key: float(f"{v:.6g}") for key, v in measures.items()},  # 6 significant digits
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(device),
    }


def health_report(row: dict[str, Any], source: FeatureSource) -> tuple[str, str]:
    """What was measured, then the measures, in one line each."""
    return (
        f"health on {row['dataset']}: {row['images']} {row['split']} images (seed "
        f"{row['seed']}), {source.description} ({row['dim']}-d)",
        f"RankMe {row['rankme']:.1f} of {row['rank_cap']}  std {row['std_ratio']:.2f}x "
        f"healthy  uniformity {row['uniformity']:.2f}  alignment {row['alignment']:.3f}",
    )
