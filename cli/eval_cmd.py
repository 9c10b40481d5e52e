"""``ressl eval knn`` and ``ressl eval linear``: the evaluation protocols on a trained encoder.

Both take a ressl checkpoint (a ``.safetensors`` file or a run folder) or an ONNX
model exported from one, extract features of a dataset's labelled train split and
its test split once, and then run the weighted kNN (k 200, t 0.1) or train a linear
probe on them. Results go to stdout and, for a checkpoint, one JSON line is appended to
``eval.jsonl`` in its run folder (the run's history, which ``ressl plot`` draws). An ONNX
model is a file that may sit anywhere (a working folder, a read-only release): its result
is recorded, next to it, only when ``--record`` is given (see docs/evaluation.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ressl.jsontext import parse_json
from ressl.rules import LEARNING_RATE, WEIGHT_DECAY
from ressl.runs.folder import EVAL_LOG, append_run_file

from .common import DeviceOpt, Weights, WeightsOpt, checkpoint_file, existing, fail

if TYPE_CHECKING:  # torch is imported by the commands, not by ressl --help
    import torch
    from torch import Tensor

eval_app = typer.Typer(
    name="eval",
    help="Evaluate a trained encoder on a dataset's train -> test split: weighted kNN or a linear probe.",
    no_args_is_help=True,
)


@dataclass
class FeatureSource:
    """Where features come from: a normalised-image -> feature function and what it expects."""

    fn: Callable[[Tensor], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    image_size: int | None  # None: any size (an ONNX model with dynamic height/width)
    default_dataset: str | None
    description: str  # e.g. "student backbone features"
    features: str  # "backbone" or the ONNX output's name
    run_dir: Path
    info: dict[str, Any] = field(default_factory=dict)  # extra fields for the eval.jsonl record
    position: str | None = None  # where the checkpoint's run is (ressl.runs.position)
    recorded: bool = True  # results go to RUN/eval.jsonl unless --no-record (ONNX: --record)


def _checkpoint_source(path: Path, weights: str, device: torch.device) -> FeatureSource:
    from ressl.runs.checkpoint import load_encoder, read_metadata

    file = checkpoint_file(path)
    encoder, settings = load_encoder(file, weights=weights)
    encoder.to(device).eval()

    def backbone(x: Tensor) -> Tensor:
        out: Tensor = encoder.features(x)  # type: ignore[operator]
        return out

    from ressl.runs.position import Position

    where = Position.from_metadata(read_metadata(file), settings.get("epochs"))
    return FeatureSource(
        fn=backbone,
        mean=tuple(settings["mean"]),
        std=tuple(settings["std"]),
        channels=int(settings["channels"]),
        image_size=int(settings["image_size"]),
        default_dataset=settings.get("dataset"),
        description=f"{weights} backbone features",
        features="backbone",
        run_dir=file.parent,
        info={"checkpoint": file.name, "epoch": where.epochs_done, "weights": weights},
        position=str(where),
    )


def _onnx_session(path: Path, device: torch.device) -> Any:
    """An onnxruntime session of ``path`` (CUDA first when asked for and offered)."""
    try:
        from ressl.export.embedder import open_session
    except ImportError:
        fail("evaluating an ONNX model needs onnxruntime: pip install onnxruntime")
    return open_session(path, "auto" if device.type == "cuda" else "cpu")


def _onnx_input(
    path: Path, meta: dict[str, str], shape: list[Any], out_shape: list[Any]
) -> tuple[int, Any, dict[str, Any]]:
    """``(channels, image size or None, settings)`` of an ONNX model's input. A ressl export's
    metadata is checked as such (and against the graph); any other graph is read as it is."""
    from ressl.export.metadata import FORMAT, ModelInfo

    from ressl.config.settings import MAX_IMAGE_SIZE

    if meta.get("format") == FORMAT:
        try:
            info = ModelInfo.from_metadata(meta, str(path))
            info.check_signature(shape, out_shape, str(path))
        except ValueError as e:
            fail(str(e))
        return info.channels, None if info.dynamic_spatial else info.image_size, info.settings
    try:
        settings = parse_json(meta.get("settings", "{}"), f"{path}: metadata 'settings'")
    except ValueError:
        settings = {}
    settings = settings if isinstance(settings, dict) else {}
    channels = shape[1] if isinstance(shape[1], int) else settings.get("channels", 3)
    size = shape[2] if isinstance(shape[2], int) else settings.get("image_size")
    if not (isinstance(channels, int) and channels >= 1) or not (
        size is None or (isinstance(size, int) and 1 <= size <= MAX_IMAGE_SIZE)
    ):
        fail(f"{path}: cannot tell its input's channels and size (input shape {shape})")
    return channels, size, settings


def _onnx_source(path: Path, device: torch.device) -> FeatureSource:
    """An ONNX model run with onnxruntime on images in [0, 1] (its graph normalises them)."""
    import torch

    session = _onnx_session(path, device)
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        fail(
            f"{path}: expected an image input (N, C, H, W), got input {inp.name!r} of shape {shape}"
        )
    outputs = [o.name for o in session.get_outputs()]
    out_name = "embedding" if "embedding" in outputs else outputs[0]
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    channels, size, settings = _onnx_input(path, meta, shape, list(session.get_outputs()[0].shape))

    def run(x: Tensor) -> Tensor:
        (y,) = session.run([out_name], {inp.name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(y).to(x.device)

    # Which representation the graph outputs decides what the numbers mean: ressl's exporter
    # records it ("head": "true" for the projection head's embedding, "false" for backbone features).
    what = {
        "true": "projection-head embedding, not backbone features",
        "false": "backbone features",
    }
    weights = meta.get("weights")
    info: dict[str, Any] = {
        "model": path.name,
        **({"weights": weights} if weights else {}),
        **({"head": meta["head"] == "true"} if "head" in meta else {}),
    }
    return FeatureSource(
        fn=run,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        channels=channels,
        image_size=int(size) if size is not None else None,
        default_dataset=meta.get("dataset") or settings.get("dataset"),
        description=f"ONNX output {out_name!r} "
        f"({what.get(meta.get('head', ''), 'not a ressl export: unknown whether head or backbone')})",
        features=f"onnx:{out_name}",
        run_dir=path.parent,
        info=info,
        recorded=False,
    )


def load_source(path: Path, weights: str, device: torch.device) -> FeatureSource:
    """A checkpoint file / run folder, or an ``.onnx`` model, as a :class:`FeatureSource`."""
    existing(path)
    if path.suffix.lower() == ".onnx" and path.is_file():
        return _onnx_source(path, device)
    return _checkpoint_source(path, weights, device)


def load_eval_data(source: FeatureSource, dataset: str | None, data_root: Path | None) -> Any:
    """The dataset to evaluate on (default: the one the checkpoint was trained on), checked against the encoder."""
    from ressl.data.loading import load_dataset

    name = dataset or source.default_dataset
    if name is None:
        fail("the model does not say which dataset it was trained on; pass --dataset NAME")
    data = load_dataset(
        name,
        root=data_root,
        image_size=source.image_size,  # folders follow
        channels=source.channels if source.channels in (1, 3) else None,
    )
    if data.channels != source.channels:
        fail(
            f"the encoder takes {source.channels}-channel images but {data.name} has {data.channels} channel(s)"
        )
    return data


def features(
    source: FeatureSource, data: Any, device: torch.device, batch_size: int
) -> tuple[Tensor, ...]:
    """Train / test features and labels under the eval protocol (fp32, eval mode, L2-normalised)."""
    from ressl.eval.features import split_features

    from .progress import CountProgress

    n_train = len(data.memory) if data.memory is not None else 0
    n_test = len(data.test) if data.test is not None else 0
    heading = (
        f"extracting {source.description} of {n_train} + {n_test} {data.name} images on {device}"
    )
    with CountProgress("extract", n_train + n_test, heading=heading) as progress:
        return split_features(
            source.fn,
            data,
            mean=source.mean,
            std=source.std,
            batch_size=batch_size,
            device=device,
            progress=progress,
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


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a named device is checked."""
    from ressl.device import select_device

    return select_device(name)


def _setup(
    path: Path,
    weights: Weights,
    device: str,
    dataset: str | None,
    data_root: Path | None,
    batch_size: int,
) -> tuple[FeatureSource, Any, torch.device, tuple[Tensor, ...], float]:
    existing(path)  # the arguments before torch is imported (seconds)
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    import torch

    dev = pick_device(device)
    source = load_source(path, weights.value, dev)
    data = load_eval_data(source, dataset, data_root)
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = features(source, data, dev, batch_size)
    return source, data, dev, feats, time.perf_counter() - t0


def _base_row(
    protocol: str, source: FeatureSource, data: Any, feats: tuple[Tensor, ...]
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


PathArg = Annotated[
    Path,
    typer.Argument(
        metavar="CHECKPOINT|MODEL.onnx",
        help="A ressl checkpoint (.safetensors), a run folder, or an exported .onnx model.",
    ),
]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        help="fashion-mnist, cifar10, cifar100, stl10 or folder:PATH (default: the checkpoint's)."
    ),
]
DataRootOpt = Annotated[
    Path | None, typer.Option(help="Where datasets are looked for / downloaded.")
]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass while extracting features.")]
RecordOpt = Annotated[
    bool | None,
    typer.Option(
        "--record/--no-record",
        help=f"Append the result to {EVAL_LOG} next to the evaluated file (default: for a "
        "checkpoint or run folder, not for an .onnx model).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


class Protocol(str, Enum):
    fast = "fast"
    paper = "paper"


@eval_app.command("knn")
def knn_cmd(
    path: PathArg,
    dataset: DatasetOpt = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours that vote.")] = 200,
    temperature: Annotated[
        float, typer.Option(help="Vote weight exp(similarity / temperature).")
    ] = 0.1,
    weights: WeightsOpt = Weights.student,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 512,
    record_result: RecordOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Weighted kNN (cosine on L2-normalised features): train split as memory, top-1 (and top-5) on the test split."""
    if k < 1:
        fail(f"--k must be >= 1, got {k}")
    if not temperature > 0:
        fail(f"--temperature must be > 0, got {temperature}")
    source, data, dev, feats, seconds = _setup(
        path, weights, device, dataset, data_root, batch_size
    )
    from ressl.eval.knn import knn_accuracy

    train_f, train_y, test_f, test_y = feats
    t0 = time.perf_counter()
    acc = knn_accuracy(train_f, train_y, test_f, test_y, len(data.classes), k, temperature)
    row = {
        **_base_row("knn", source, data, feats),
        "k": k,
        "temperature": temperature,
        **{key: round(v, 4) for key, v in acc.items()},
        "seconds": round(seconds + time.perf_counter() - t0, 2),
        "device": str(dev),
    }
    top5 = f"  top-5 {acc['top5']:.2f}%" if "top5" in acc else ""
    _finish(
        source,
        row,
        record_result,
        as_json,
        f"kNN (k {k}, t {temperature:g}) on {data.name}: {row['train_images']} train -> "
        f"{row['test_images']} test images, {source.description} ({row['dim']}-d)",
        f"top-1 {acc['top1']:.2f}%{top5}",
    )


@eval_app.command("linear")
def linear_cmd(
    path: PathArg,
    dataset: DatasetOpt = None,
    protocol: Annotated[
        Protocol,
        typer.Option(
            help="fast: a probe on features extracted once (standardised, minutes); paper: the "
            "official protocol, new random crops and flips through the frozen backbone every "
            "epoch (hours on a CPU)."
        ),
    ] = Protocol.fast,
    epochs: Annotated[
        int, typer.Option(help="Passes of the linear layer over the training set.")
    ] = 100,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak SGD learning rate, cosine schedule (default: fast 0.1 per 256 "
            "features, paper 0.3).",
            show_default=False,
        ),
    ] = None,
    probe_batch_size: Annotated[int, typer.Option(help="Images or features per SGD step.")] = 256,
    weight_decay: Annotated[float, typer.Option(help="L2 penalty on the linear layer.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Initialisation, shuffling and crop seed.")] = 0,
    weights: WeightsOpt = Weights.student,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 512,
    record_result: RecordOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Linear evaluation on frozen features: the fast probe, or the paper's protocol; top-1 on the test split."""
    if epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}")
    lr = lr if lr is not None else (0.3 if protocol is Protocol.paper else 0.1)
    LEARNING_RATE.check("lr", lr)  # the library's ranges, named as flags (ConfigError)
    if probe_batch_size < 1:
        fail(f"--probe-batch-size must be >= 1, got {probe_batch_size}")
    WEIGHT_DECAY.check("weight_decay", weight_decay)
    probe: dict[str, Any] = dict(
        epochs=epochs, lr=lr, batch_size=probe_batch_size, weight_decay=weight_decay, seed=seed
    )
    if protocol is Protocol.paper:
        _paper_linear(path, weights, device, dataset, data_root, probe, record_result, as_json)
        return
    _fast_linear(
        path, weights, device, dataset, data_root, batch_size, probe, record_result, as_json
    )


def _fast_linear(
    path: Path,
    weights: Weights,
    device: str,
    dataset: str | None,
    data_root: Path | None,
    batch_size: int,
    probe: dict[str, Any],
    record_result: bool | None,
    as_json: bool,
) -> None:
    """``eval linear`` (the fast probe): a linear layer on features extracted once."""
    source, data, dev, feats, seconds = _setup(
        path, weights, device, dataset, data_root, batch_size
    )
    from ressl.eval.linear import linear_probe

    from .progress import CountProgress

    train_f, train_y, test_f, test_y = feats
    t0 = time.perf_counter()
    with CountProgress("probe epochs", probe["epochs"], unit="epochs/s") as progress:
        acc = linear_probe(
            train_f,
            train_y,
            test_f,
            test_y,
            len(data.classes),
            **probe,
            device=dev,
            progress=progress,
        )
    row = {
        **_base_row("linear", source, data, feats),
        **probe,
        **{key: round(v, 4) for key, v in acc.items()},
        "seconds": round(seconds + time.perf_counter() - t0, 2),
        "device": str(dev),
    }
    _finish(
        source,
        row,
        record_result,
        as_json,
        f"linear probe ({probe['epochs']} epochs, lr {probe['lr']:g}) on {data.name}: "
        f"{row['train_images']} train -> {row['test_images']} test images, "
        f"{source.description} ({row['dim']}-d)",
        f"top-1 {acc['top1']:.2f}%  (train {acc['train_top1']:.2f}%)",
    )


def _paper_linear(
    path: Path,
    weights: Weights,
    device: str,
    dataset: str | None,
    data_root: Path | None,
    probe: dict[str, Any],
    record_result: bool | None,
    as_json: bool,
) -> None:
    """``eval linear --protocol paper``: the official protocol, its final epoch reported."""
    existing(path)  # before torch is imported (seconds)
    from ressl.eval.paper_linear import paper_linear_eval

    from .progress import CountProgress

    dev = pick_device(device)
    source = load_source(path, weights.value, dev)
    data = load_eval_data(source, dataset, data_root)
    if data.memory is None or data.test is None or len(data.classes) < 2:
        fail(f"{data.name} has no labelled train and test splits to evaluate on")
    t0 = time.perf_counter()
    with CountProgress("probe epochs", probe["epochs"], unit="epochs/s") as progress:
        acc = paper_linear_eval(
            source.fn,
            data.memory,
            data.test,
            len(data.classes),
            mean=source.mean,
            std=source.std,
            image_size=data.image_size,
            device=dev,
            progress=progress,
            **probe,
        )
    row = {
        "protocol": "linear-paper",
        **source.info,
        "features": source.features,
        "dataset": data.name,
        "train_images": len(data.memory),
        "test_images": len(data.test),
        **probe,
        **acc,
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(dev),
    }
    _finish(
        source,
        row,
        record_result,
        as_json,
        f"linear evaluation, the paper's protocol ({probe['epochs']} epochs of random crops, "
        f"lr {probe['lr']:g}, batch {probe['batch_size']}) on {data.name}: "
        f"{row['train_images']} train -> {row['test_images']} test images, "
        f"{source.description}",
        f"top-1 {acc['top1']:.2f}% (final epoch); best {acc['best_top1']:.2f}% at epoch "
        f"{acc['best_epoch']}, selected on the test set",
    )


def _finish(
    source: FeatureSource,
    row: dict[str, Any],
    record_result: bool | None,
    as_json: bool,
    heading: str,
    result: str,
) -> None:
    """Stamp and record an evaluation's row, then print it: as JSON, or a heading and the result."""
    row = stamped(row)
    where = record(source, row, record_result)
    if as_json:
        typer.echo(json.dumps(row))
        return
    typer.echo(heading)
    typer.echo(result + (f"  (recorded in {where})" if where else ""))
