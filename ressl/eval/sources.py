"""What the evaluation protocols read: a feature source, the labelled data, and the record.

A :class:`FeatureSource` is a normalised-image -> feature function and what it expects
(mean/std, channels, side); :func:`checkpoint_source` makes one of a ressl checkpoint
(``export.features.onnx_source`` of an ONNX model). :func:`load_eval_data` loads the data
the source was trained on (or another) checked against it; :func:`extract` gives the
features of its labelled train and test splits; :func:`stamped` and :func:`record` write
a result row to the run's ``eval.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ressl.errors import ConfigError
from ressl.runs.folder import EVAL_LOG, append_run_file, resolve_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ressl.data.sources import ImageData

__all__ = [
    "FeatureSource",
    "Progress",
    "checkpoint_source",
    "extract",
    "load_eval_data",
    "record",
    "stamped",
]

#: ``progress(label, total, heading=..., unit=...)``: a context giving the function that is
#: called with the count done so far (the CLI's ``CountProgress``); None: silent.
Progress = Callable[..., AbstractContextManager[Callable[[int], None]]]


def silent(label: str, total: int, **kw: Any) -> AbstractContextManager[Callable[[int], None]]:
    """A :data:`Progress` that reports nothing."""
    return nullcontext(lambda done: None)


@dataclass
class FeatureSource:
    """Where features come from: a normalised-image -> feature function and what it expects."""

    fn: Callable[[Tensor], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    image_size: int | None = None  # None: any size (an ONNX model with dynamic height/width)
    default_dataset: str | None = None
    description: str = "features"  # e.g. "student backbone features"
    features: str = "backbone"  # "backbone" or the ONNX output's name
    run_dir: Path = Path(".")
    info: dict[str, Any] = field(default_factory=dict)  # extra fields for the eval.jsonl record
    position: str | None = None  # where the checkpoint's run is (ressl.runs.position)
    recorded: bool = True  # results go to RUN/eval.jsonl unless --no-record (ONNX: --record)


def checkpoint_source(path: Path, weights: str, device: torch.device) -> FeatureSource:
    """The backbone features of a checkpoint file or run folder (``weights``: student or teacher)."""
    from ressl.runs.checkpoint import open_encoder
    from ressl.runs.position import Position

    file = resolve_checkpoint(path)
    encoder, checked = open_encoder(file, weights=weights)
    model, data = checked.model, checked.data
    encoder.to(device).eval()

    def backbone(x: Tensor) -> Tensor:
        out: Tensor = encoder.features(x)  # type: ignore[operator]
        return out

    where = Position.from_metadata(checked.meta, checked.settings.get("epochs"))
    return FeatureSource(
        fn=backbone,
        mean=data.mean,
        std=data.std,
        channels=model.channels,
        image_size=model.image_size,
        default_dataset=checked.settings.get("dataset"),
        description=f"{weights} backbone features",
        features="backbone",
        run_dir=file.parent,
        info={"checkpoint": file.name, "epoch": where.epochs_done, "weights": weights},
        position=str(where),
    )


def load_eval_data(source: FeatureSource, dataset: str | None, data_root: Path | None) -> ImageData:
    """The dataset to evaluate on (default: the one the checkpoint was trained on), checked
    against the encoder.

    Raises:
        ConfigError: naming ``dataset`` when none is known, or when its channels are not the
            encoder's.
    """
    from ressl.data.loading import load_dataset

    name = dataset or source.default_dataset
    if name is None:
        raise ConfigError(
            "the model does not say which dataset it was trained on; pass {dataset}", "dataset"
        )
    data = load_dataset(
        name,
        root=data_root,
        image_size=source.image_size,  # folders follow
        channels=source.channels if source.channels in (1, 3) else None,
    )
    if data.channels != source.channels:
        raise ConfigError(
            f"the encoder takes {source.channels}-channel images but {data.name} has "
            f"{data.channels} channel(s); pass another {{dataset}}",
            "dataset",
        )
    return data


def extract(
    source: FeatureSource,
    data: ImageData,
    device: torch.device,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[Tensor, ...]:
    """Train / test features and labels under the eval protocol (fp32, eval mode, L2-normalised)."""
    import torch

    from ressl.eval.features import split_features

    n_train = len(data.labelled) if data.labelled is not None else 0
    n_test = len(data.test) if data.test is not None else 0
    heading = (
        f"extracting {source.description} of {n_train} + {n_test} {data.name} images on {device}"
    )
    with (progress or silent)("extract", n_train + n_test, heading=heading) as report:
        with torch.no_grad():
            return split_features(
                source.fn,
                data,
                mean=source.mean,
                std=source.std,
                batch_size=batch_size,
                device=device,
                progress=report,
            )


def stamped(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as ``eval.jsonl`` records it (and ``--json`` prints it): with time and version."""
    from ressl import __version__

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **row,
        "ressl_version": __version__,
    }


def record(source: FeatureSource, row: dict[str, Any], enabled: bool | None) -> Path | None:
    """Append the ``stamped`` ``row`` to ``eval.jsonl`` next to the evaluated file (``enabled``
    None: a checkpoint's result is recorded, an ONNX model's is not)."""
    if not (source.recorded if enabled is None else enabled):
        return None
    path = source.run_dir / EVAL_LOG
    append_run_file(path, json.dumps(row) + "\n")
    return path
