"""``ressl eval knn|linear|health``: the evaluation protocols on a trained encoder.

One sub-command per command of :data:`ressl.eval.protocols.PROTOCOLS`, generated from
it: a flag per option of the protocol's function, ``--protocol`` where a command runs
several (``linear``: ``fast`` or ``paper``). Each takes a ressl checkpoint (a
``.safetensors`` file or a run folder) or an ONNX model exported from one and runs the
protocol on a dataset's features: kNN and the probes on its labelled train and test
splits, ``health`` on a sample of any images, labelled or not.
Results go to stdout and, for a checkpoint, one JSON line is appended to ``eval.jsonl`` in
its run folder (the run's history, which ``ressl plot`` draws). An ONNX model is a file that
may sit anywhere (a working folder, a read-only release): its result is recorded, next to
it, only when ``--record`` is given (see docs/evaluation.md).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ressl.config.fields import dataset_choices
from ressl.eval.protocols import PROTOCOLS, Protocol
from ressl.eval.sources import FeatureSource, load_eval_data, record, stamped
from ressl.runs.folder import EVAL_LOG

from .common import (
    DataRootOpt,
    DeviceOpt,
    Weights,
    WeightsOpt,
    checkpoint_file,
    existing,
    fail,
)

if TYPE_CHECKING:  # torch is imported by the commands, not by ressl --help
    import torch

__all__ = ["eval_app", "eval_commands", "load_eval_data", "load_source", "pick_device"]


def load_source(path: Path, weights: str, device: torch.device) -> FeatureSource:
    """A checkpoint file / run folder, or an ``.onnx`` model, as a :class:`FeatureSource`."""
    existing(path)
    if path.suffix.lower() == ".onnx" and path.is_file():
        from ressl.export.features import onnx_source

        return onnx_source(path, device)
    from ressl.eval.sources import checkpoint_source

    return checkpoint_source(checkpoint_file(path), weights, device)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a named device is checked."""
    from ressl.device import select_device

    return select_device(name)


PathArg = Annotated[
    Path,
    typer.Argument(
        metavar="CHECKPOINT|MODEL.onnx",
        help="A ressl checkpoint (.safetensors), a run folder, or an exported .onnx model.",
    ),
]
DatasetOpt = Annotated[
    str | None, typer.Option(help=f"{dataset_choices()} (default: the checkpoint's).")
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


def evaluate_path(
    protocol: Protocol,
    path: Path,
    options: dict[str, Any],
    *,
    weights: Weights = Weights.student,
    device: str = "auto",
    dataset: str | None = None,
    data_root: Path | None = None,
    batch_size: int = 512,
    record_result: bool | None = None,
    as_json: bool = False,
) -> None:
    """Run ``protocol`` on the checkpoint or ONNX model at ``path``; print and record its row."""
    existing(path)  # the arguments before torch is imported (seconds)
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    from .progress import CountProgress

    dev = pick_device(device)
    source = load_source(path, weights.value, dev)
    data = load_eval_data(source, dataset, data_root)
    row = protocol.run(
        source, data, device=dev, batch_size=batch_size, progress=CountProgress, **options
    )
    row = stamped(row)
    where = record(source, row, record_result)
    if as_json:
        typer.echo(json.dumps(row))
        return
    heading, result = protocol.report(row, source)
    typer.echo(heading)
    typer.echo(result + (f"  (recorded in {where})" if where else ""))


# --------------------------------------------------------------------------- commands

_COMMON = {  # the options every command takes, after the protocol's own
    "weights": (WeightsOpt, Weights.student),
    "device": (DeviceOpt, "auto"),
    "data_root": (DataRootOpt, None),
    "batch_size": (BatchOpt, 512),
    "record_result": (RecordOpt, None),
    "as_json": (JsonOpt, False),
}


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _options(variants: list[Protocol]) -> list[inspect.Parameter]:
    """One flag per option of the variants' functions; a default that differs between them
    is None, said per variant in the help."""
    params: list[inspect.Parameter] = []
    names = list(dict.fromkeys(name for p in variants for name in p.options))
    for name in names:
        having = [p for p in variants if name in p.options]
        defaults = {p.variant or p.name: p.defaults()[name] for p in having}
        kind: Any = type(next(iter(defaults.values())))  # int, float, str or bool
        help_text = having[0].options[name]
        default = next(iter(defaults.values()))
        if len(set(defaults.values())) > 1 or len(having) < len(variants):
            default, kind = None, kind | None
            shown = ", ".join(f"{v} {_show(d)}" for v, d in defaults.items())
            help_text = f"{help_text.rstrip('.')} (default: {shown})."
        option = typer.Option(
            f"--{name.replace('_', '-')}", help=help_text, show_default=default is not None
        )
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, option],
            )
        )
    return params


def _command(variants: list[Protocol]) -> Callable[..., None]:
    """The ``ressl eval`` sub-command running ``variants`` (one, or several by ``--protocol``)."""
    by_variant = {p.variant or p.name: p for p in variants}

    def command(path: Path, dataset: str | None = None, **kw: Any) -> None:
        chosen = kw.pop("protocol", None)
        protocol = by_variant[chosen.value] if chosen is not None else variants[0]
        common = {name: kw.pop(name) for name in _COMMON}
        options = {k: v for k, v in kw.items() if k in protocol.options and v is not None}
        evaluate_path(protocol, path, options, dataset=dataset, **common)

    params = [
        inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=PathArg),
        inspect.Parameter(
            "dataset", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=DatasetOpt
        ),
    ]
    doc = variants[0].summary
    if len(variants) > 1:
        choices = Enum("Variant", {v: v for v in by_variant}, type=str)  # type: ignore[misc]
        help_text = "; ".join(f"{v}: {p.summary}" for v, p in by_variant.items()) + "."
        default = choices(next(iter(by_variant)))
        params.append(
            inspect.Parameter(
                "protocol",
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[choices, typer.Option(help=help_text)],
            )
        )
        doc = (
            f"{variants[0].sub_command.capitalize()} evaluation: "
            + ", or ".join(f"{v} (--protocol {v})" for v in by_variant)
            + "; top-1 on the test split."
        )
    params += _options(variants)
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
        for name, (a, d) in _COMMON.items()
    ]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def eval_commands() -> typer.Typer:
    """``ressl eval``: one sub-command per command of :data:`PROTOCOLS`, as the table is now."""
    app = typer.Typer(
        name="eval",
        help="Evaluate a trained encoder on a dataset (each command's --help says what it "
        "needs): " + ", ".join(dict.fromkeys(p.sub_command for p in PROTOCOLS.values())) + ".",
        no_args_is_help=True,
    )
    commands: dict[str, list[Protocol]] = {}
    for protocol in PROTOCOLS.values():
        commands.setdefault(protocol.sub_command, []).append(protocol)
    for name, variants in commands.items():
        app.command(name)(_command(variants))
    return app


eval_app = eval_commands()
