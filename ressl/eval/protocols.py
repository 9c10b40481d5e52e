"""The evaluation protocols as one table: ``PROTOCOLS[name]`` runs one on a feature source.

Each protocol is a function ``run(source, data, *, device, batch_size, progress, **options)
-> row``: it checks its options, reads the features of ``data`` through ``source`` and
returns the result row that ``eval.jsonl`` records. ``ressl eval`` makes one sub-command
per ``command`` of the table, with one flag per option (``--protocol`` picks the variant
where a command has several), and :func:`evaluate` runs any entry from the API; a new
protocol is one function and one :func:`register_protocol` (timm's ``register_model``).

* ``knn``: weighted kNN on L2-normalised features, the train split as the bank.
* ``linear``: the fast probe, a linear layer on features extracted once.
* ``linear-paper``: the paper's protocol, augmented crops through the frozen backbone.
* ``health``: label-free measures (RankMe, std, uniformity, alignment) on a fixed sample,
  for any dataset, labelled or not; the default on data without labels.

kNN and the probes need labels; on data without them they refuse in one line that points
at ``health`` (:func:`ressl.eval.features.require_labels`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ressl.errors import ConfigError, ResslError
from ressl.eval.health_protocol import encoder_health, health_report
from ressl.eval.sources import FeatureSource, Progress, extract, silent
from ressl.rules import HEALTH_SAMPLE, KNN_K, KNN_TEMPERATURE, LEARNING_RATE, WEIGHT_DECAY

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ressl.data.sources import ImageData

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "default_protocol",
    "evaluate",
    "knn",
    "linear",
    "linear_paper",
    "register_protocol",
    "unregister_protocol",
]

#: The keywords every protocol takes besides its own options.
RUN_KEYWORDS = ("device", "batch_size", "progress")


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    Attributes:
        name: what the result row records as ``protocol``.
        run: ``run(source, data, *, device, batch_size, progress, **options) -> row``; its
            keyword-only parameters past :data:`RUN_KEYWORDS` are its options (with defaults).
        summary: one line for ``--help``.
        options: each option's help (the flag is ``--NAME``).
        report: ``report(row, source) -> (heading, result)``, the two lines the CLI prints.
        command: the ``ressl eval`` sub-command that runs it (default: ``name``).
        variant: its ``--protocol`` value, where one command runs several protocols.
    """

    name: str
    run: Callable[..., dict[str, Any]]
    summary: str
    options: Mapping[str, str]
    report: Callable[[dict[str, Any], FeatureSource], tuple[str, str]]
    command: str = ""
    variant: str = ""

    @property
    def sub_command(self) -> str:
        return self.command or self.name

    def defaults(self) -> dict[str, Any]:
        """Each option's default, from ``run``'s signature."""
        params = inspect.signature(self.run).parameters
        return {name: params[name].default for name in self.options}


def _base_row(
    protocol: str, source: FeatureSource, data: ImageData, feats: tuple[Tensor, ...]
) -> dict[str, Any]:
    train_f, _, test_f, _ = feats
    return {
        "protocol": protocol,
        **source.info,
        "features": source.features,
        "dim": int(train_f.shape[1]),
        "dataset": data.name,
        "train_images": int(train_f.shape[0]),
        "test_images": int(test_f.shape[0]),
    }


def _at_least_one(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{{{name}}} must be >= 1, got {value}", name)


# --------------------------------------------------------------------------- kNN


def knn(
    source: FeatureSource,
    data: ImageData,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: Progress | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, Any]:
    """Weighted kNN (cosine on L2-normalised features): the train split as the bank, top-1
    (and top-5) on the test split."""
    import torch

    from ressl.eval.features import require_labels
    from ressl.eval.knn import knn_accuracy

    require_labels(data, "kNN evaluation")
    _at_least_one(k=k)
    if not temperature > 0:
        raise ConfigError(f"{{temperature}} must be > 0, got {temperature}", "temperature")
    t0 = time.perf_counter()
    feats = extract(source, data, torch.device(device), batch_size, progress)
    train_f, train_y, test_f, test_y = feats
    acc = knn_accuracy(train_f, train_y, test_f, test_y, len(data.classes), k, temperature)
    return {
        **_base_row("knn", source, data, feats),
        "k": k,
        "temperature": temperature,
        **{key: round(v, 4) for key, v in acc.items()},
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(device),
    }


def _knn_report(row: dict[str, Any], source: FeatureSource) -> tuple[str, str]:
    top5 = f"  top-5 {row['top5']:.2f}%" if "top5" in row else ""
    return (
        f"kNN (k {row['k']}, t {row['temperature']:g}) on {row['dataset']}: "
        f"{row['train_images']} train -> {row['test_images']} test images, "
        f"{source.description} ({row['dim']}-d)",
        f"top-1 {row['top1']:.2f}%{top5}",
    )


# --------------------------------------------------------------------------- linear probes


def _check_probe(epochs: int, lr: float, probe_batch_size: int, weight_decay: float) -> None:
    _at_least_one(epochs=epochs)
    LEARNING_RATE.check("lr", lr)  # the library's ranges, named as flags at the CLI
    _at_least_one(probe_batch_size=probe_batch_size)
    WEIGHT_DECAY.check("weight_decay", weight_decay)


def linear(
    source: FeatureSource,
    data: ImageData,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: Progress | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    probe_batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The fast probe: a linear layer on features extracted once (standardised); top-1 on the
    test split."""
    import torch

    from ressl.eval.features import require_labels
    from ressl.eval.linear import linear_probe

    require_labels(data, "linear evaluation")
    _check_probe(epochs, lr, probe_batch_size, weight_decay)
    t0 = time.perf_counter()
    feats = extract(source, data, torch.device(device), batch_size, progress)
    train_f, train_y, test_f, test_y = feats
    probe: dict[str, Any] = dict(
        epochs=epochs, lr=lr, batch_size=probe_batch_size, weight_decay=weight_decay, seed=seed
    )
    with (progress or silent)("probe epochs", epochs, unit="epochs/s") as report:
        acc = linear_probe(
            train_f,
            train_y,
            test_f,
            test_y,
            len(data.classes),
            **probe,
            device=device,
            progress=report,
        )
    return {
        **_base_row("linear", source, data, feats),
        **probe,
        **{key: round(v, 4) for key, v in acc.items()},
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(device),
    }


def _linear_report(row: dict[str, Any], source: FeatureSource) -> tuple[str, str]:
    return (
        f"linear probe ({row['epochs']} epochs, lr {row['lr']:g}) on {row['dataset']}: "
        f"{row['train_images']} train -> {row['test_images']} test images, "
        f"{source.description} ({row['dim']}-d)",
        f"top-1 {row['top1']:.2f}%  (train {row['train_top1']:.2f}%)",
    )


def linear_paper(
    source: FeatureSource,
    data: ImageData,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: Progress | None = None,
    epochs: int = 100,
    lr: float = 0.3,
    probe_batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The paper's protocol: new random crops and flips through the frozen backbone every
    epoch; top-1 of the final epoch on the test split (``batch_size`` is unused: the
    backbone sees ``probe_batch_size`` crops per step)."""
    from ressl.eval.features import require_labels
    from ressl.eval.paper_linear import paper_linear_eval

    labelled, test = require_labels(data, "linear evaluation")
    _check_probe(epochs, lr, probe_batch_size, weight_decay)
    if len(data.classes) < 2:
        raise ResslError(f"{data.name} has {len(data.classes)} class; a probe needs at least 2")
    probe: dict[str, Any] = dict(
        epochs=epochs, lr=lr, batch_size=probe_batch_size, weight_decay=weight_decay, seed=seed
    )
    t0 = time.perf_counter()
    with (progress or silent)("probe epochs", epochs, unit="epochs/s") as report:
        acc = paper_linear_eval(
            source.fn,
            labelled,
            test,
            len(data.classes),
            mean=source.mean,
            std=source.std,
            image_size=data.image_size,
            device=device,
            progress=report,
            **probe,
        )
    return {
        "protocol": "linear-paper",
        **source.info,
        "features": source.features,
        "dataset": data.name,
        "train_images": len(labelled),
        "test_images": len(test),
        **probe,
        **acc,
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(device),
    }


def _paper_report(row: dict[str, Any], source: FeatureSource) -> tuple[str, str]:
    return (
        f"linear evaluation, the paper's protocol ({row['epochs']} epochs of random crops, "
        f"lr {row['lr']:g}, batch {row['batch_size']}) on {row['dataset']}: "
        f"{row['train_images']} train -> {row['test_images']} test images, "
        f"{source.description}",
        f"top-1 {row['top1']:.2f}% (final epoch); best {row['best_top1']:.2f}% at epoch "
        f"{row['best_epoch']}, selected on the test set",
    )


# --------------------------------------------------------------------------- the table

_PROBE_OPTIONS = {
    "epochs": "Passes of the linear layer over the training set.",
    "lr": "Peak SGD learning rate, cosine schedule (fast: per 256 features).",
    "probe_batch_size": "Images or features per SGD step.",
    "weight_decay": "L2 penalty on the linear layer.",
    "seed": "Initialisation, shuffling and crop seed.",
}

#: The evaluation protocols by name, one entry each (``ressl eval`` and :func:`evaluate`).
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "knn",
            knn,
            "Weighted kNN (cosine on L2-normalised features): train split as the bank, "
            "top-1 (and top-5) on the test split.",
            {
                "k": "Neighbours that vote.",
                "temperature": "Vote weight exp(similarity / temperature).",
            },
            _knn_report,
        ),
        Protocol(
            "linear",
            linear,
            "a probe on features extracted once (standardised, minutes)",
            _PROBE_OPTIONS,
            _linear_report,
            variant="fast",
        ),
        Protocol(
            "linear-paper",
            linear_paper,
            "the official protocol, new random crops and flips through the frozen backbone "
            "every epoch (hours on a CPU)",
            _PROBE_OPTIONS,
            _paper_report,
            command="linear",
            variant="paper",
        ),
        Protocol(
            "health",
            encoder_health,
            "Label-free health of the features on a fixed sample, labels or not: RankMe, "
            "std against its healthy value, uniformity, alignment of two weak views.",
            {
                "images": "Images in the sample: up to this many of the test split (the train "
                f"split when there is none), {HEALTH_SAMPLE.expect}.",
                "seed": "Which images are sampled, and the crops and flips of their two views.",
            },
            health_report,
        ),
    )
}


def register_protocol(protocol: Protocol) -> None:
    """Add an evaluation protocol: :func:`evaluate` runs it, and a ``ressl eval`` app built
    after this (``ressl.cli.eval_cmd.eval_commands``) has its command.

    Raises:
        ValueError: if one of that name exists, or ``options`` are not ``run``'s keywords.
    """
    if protocol.name in PROTOCOLS:
        raise ValueError(f"an evaluation protocol {protocol.name!r} exists already")
    params = inspect.signature(protocol.run).parameters
    missing = [name for name in (*RUN_KEYWORDS, *protocol.options) if name not in params]
    if missing:
        raise ValueError(f"{protocol.name}: run takes no keyword(s) {', '.join(missing)}")
    PROTOCOLS[protocol.name] = protocol


def unregister_protocol(name: str) -> None:
    """Remove a protocol added by :func:`register_protocol` (ressl's own stay)."""
    if name in ("knn", "linear", "linear-paper", "health"):
        raise ValueError(f"{name!r} is one of ressl's own evaluation protocols")
    PROTOCOLS.pop(name, None)


def _protocol(name: str, options: dict[str, Any]) -> Protocol:
    """``PROTOCOLS[name]``, checked to take ``options``."""
    entry = PROTOCOLS.get(name)
    if entry is None:
        raise ConfigError(
            f"{{protocol}} must be one of {', '.join(PROTOCOLS)}, got {name!r}", "protocol"
        )
    unknown = [key for key in options if key not in entry.options]
    if unknown:
        raise ConfigError(
            f"{name} takes the options {', '.join(entry.options)}; got {', '.join(unknown)}"
        )
    return entry


def default_protocol(data: ImageData) -> str:
    """``knn`` on a dataset with labelled train and test splits, else ``health`` (the one
    protocol that needs no labels)."""
    labelled = data.labelled is not None and bool(data.classes) and data.test is not None
    return "knn" if labelled else "health"


def evaluate(
    source: FeatureSource | str | Path,
    protocol: str | None = None,
    data: ImageData | str | None = None,
    *,
    weights: str = "student",
    data_root: str | Path | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the evaluation protocol ``protocol`` (a key of :data:`PROTOCOLS`), as
    ``ressl eval`` does, and return its result row.

    Args:
        source: a :class:`FeatureSource`, or a checkpoint file or run folder (its
            ``weights``' backbone features).
        protocol: ``knn``, ``linear``, ``linear-paper``, ``health`` or a registered one;
            None: :func:`default_protocol` of the data (``knn``, or ``health`` without labels).
        data: a loaded dataset, a dataset name, or None for the one the source was trained on.
        data_root: where built-in datasets are found.
        device, batch_size, progress: where and how features are computed.
        **options: the protocol's own (``k=20``; see ``PROTOCOLS[protocol].options``).

    Raises:
        ConfigError: naming an unknown protocol or option, or a bad option value.
    """
    import torch

    from ressl.eval.sources import checkpoint_source, load_eval_data

    if protocol is not None:  # before the checkpoint and the data are read (seconds)
        _protocol(protocol, options)
    device = torch.device(device)
    if not isinstance(source, FeatureSource):
        source = checkpoint_source(Path(source), weights, device)
    if data is None or isinstance(data, str):
        data = load_eval_data(source, data, Path(data_root) if data_root is not None else None)
    entry = _protocol(protocol or default_protocol(data), options)
    return entry.run(
        source, data, device=device, batch_size=batch_size, progress=progress, **options
    )
