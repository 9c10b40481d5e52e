"""``ressl export`` and ``ressl embed``.

Registered on the app in ``cli/app.py``. Results go to stdout, progress and
skipped-file notes to stderr.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import OnnxModelArg, OverwriteOpt, Weights, checkpoint_file, fail, new_output
from .info_cmd import size_text

if TYPE_CHECKING:  # onnxruntime is imported by the commands, not by ressl --help
    from ressl.export.embedder import Embedder, FileEmbeddings


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


CheckpointArg = Annotated[
    Path, typer.Argument(help="A ressl checkpoint (.safetensors) or run folder.")
]
ExportOutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="encoder.onnx: the ONNX encoder; backbone.safetensors: the backbone's plain "
        "state dict, for fine-tuning in its own library (torchvision, timm).",
    ),
]
ExportWeightsOpt = Annotated[Weights, typer.Option(help="Student weights, or the EMA teacher's.")]
HeadOpt = Annotated[
    bool,
    typer.Option("--head", help="Include the projection head (default: backbone features)."),
]
Fp16Opt = Annotated[
    bool,
    typer.Option("--fp16", help="Compute in float16, for GPU serving (I/O stays float32)."),
]
Int8Opt = Annotated[
    bool,
    typer.Option(
        "--int8",
        help="Quantise statically to int8, for CPU serving (I/O stays float32): calibrated on "
        "the run's training images, checked against fp32 on held-out ones (docs/export.md).",
    ),
]
CalibrationOpt = Annotated[
    int,
    typer.Option(
        help="--int8: training images (a seeded sample) that calibrate the int8 ranges, 16 to 4096."
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        help="Check with onnx.checker and onnxruntime against PyTorch (--int8: and the int8 "
        "graph against fp32; --no-verify writes it unchecked)."
    ),
]
OpsetOpt = Annotated[int, typer.Option(help="ONNX opset.")]

PathsArg = Annotated[
    list[str],  # str, not Path: Path("") is ".", and '' must not embed the working tree
    typer.Argument(help="Image files and folders (searched recursively).", metavar="PATH"),
]
EmbedOutOpt = Annotated[
    Path,
    typer.Option("--out", "-o", help="The .npz file to write (embeddings, paths, skipped)."),
]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per onnxruntime run.")]
EmbedDeviceOpt = Annotated[Device, typer.Option(help="auto: CUDA when a GPU is usable, else CPU.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(help="CPU threads per run (default: onnxruntime's, one per core).")
]


def export_cmd(
    checkpoint: CheckpointArg,
    out: ExportOutOpt,
    weights: ExportWeightsOpt = Weights.student,
    head: HeadOpt = False,
    fp16: Fp16Opt = False,
    int8: Int8Opt = False,
    calibration_images: CalibrationOpt = 256,
    verify: VerifyOpt = True,
    opset: OpsetOpt = 17,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint's encoder to ONNX (preprocessing and metadata inside, verified
    against PyTorch), or its backbone's weights to a plain safetensors state dict."""
    if not checkpoint.exists():  # before torch is imported (seconds)
        fail(f"{checkpoint}: no such file or folder")
    _check_export_out(checkpoint, out, overwrite)
    if out.suffix.lower() == ".safetensors":
        onnx_only = [
            name for name, given in (("--head", head), ("--fp16", fp16), ("--int8", int8)) if given
        ]
        if onnx_only:
            fail(
                f"{onnx_only[0]} is for ONNX files; -o {out} gets the backbone's weights as trained"
            )
        _export_weights(checkpoint, out, weights.value)
    else:
        precision = dict(fp16=fp16, int8=int8, calibration_images=calibration_images)
        _export_onnx(checkpoint, out, weights.value, head, precision, verify, opset)


def _check_export_out(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """``-o`` is a writable .onnx or .safetensors path, not the checkpoint itself, and new
    (or ``--overwrite`` given); else a one-line error."""
    from ressl.atomic import check_writable

    check_writable(out, "-o")  # a folder or an unwritable place is named as such
    suffix = out.suffix.lower()
    if suffix not in (".onnx", ".safetensors"):
        fail(
            f"-o must end in .onnx (the ONNX encoder) or .safetensors (the backbone's weights "
            f"for fine-tuning), got {out}"
        )
    if suffix == ".safetensors" and out.resolve() == checkpoint_file(checkpoint).resolve():
        fail(f"-o {out} is the checkpoint itself; choose another -o")
    new_output(out, overwrite)


def _export_onnx(
    checkpoint: Path,
    out: Path,
    weights: str,
    head: bool,
    precision: dict[str, Any],
    verify: bool,
    opset: int,
) -> None:
    from ressl.export.exporter import export_onnx

    report = export_onnx(
        checkpoint, out, weights=weights, head=head, verify=verify, opset=opset, **precision
    )
    calibration = report.info.metadata.get("calibration")
    if calibration:
        from ressl.export.quantization import Calibration

        typer.echo(f"calibrated: {Calibration.from_json(calibration).describe()}")
    typer.echo(f"wrote {report.path} ({size_text(report.size_bytes)}): {report.info.describe()}")
    typer.echo(
        f"verified: {report.verification.describe()}"
        if report.verification is not None
        else "not verified (--no-verify)"
    )


def embed_cmd(
    model: OnnxModelArg,
    paths: PathsArg,
    out: EmbedOutOpt,
    batch_size: BatchSizeOpt = 64,
    device: EmbedDeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Embed image files and folders with an exported encoder; write OUT.npz (see docs/export.md)."""
    from ressl.export.embedder import Embedder
    from ressl.export.images import image_files

    from ressl.atomic import check_writable

    from .progress import CountProgress

    if out.suffix.lower() != ".npz":
        fail(
            f"-o must name a .npz file (embeddings, paths and skipped files in one archive), got {out}"
        )
    check_writable(out, "-o")
    new_output(out, overwrite)
    if not model.exists():
        fail(f"{model}: no such file")
    embedder = Embedder(model, device=device.value, batch_size=batch_size, threads=threads)
    files = image_files(paths)
    with CountProgress("embed", len(files)) as progress:
        result = embedder.embed_files(files, progress=progress)
    for name, reason in result.skipped:
        print(f"ressl: skipped {name}: {reason}", file=sys.stderr)
    if not result.paths:
        fail(f"none of the {len(files)} files could be read as an image; nothing written")
    _save_embeddings(out, embedder, result)


def _save_embeddings(out: Path, embedder: Embedder, result: FileEmbeddings) -> None:
    """Write the embeddings, their paths and the skipped files to ``out`` and say so."""
    from ressl.export.outputs import save_embeddings

    save_embeddings(
        out,
        result.embeddings,
        result.paths,
        [name for name, _ in result.skipped],
        embedder.info.to_metadata(),
    )
    skipped = f", {len(result.skipped)} unreadable skipped" if result.skipped else ""
    typer.echo(
        f"wrote {out}: {len(result.paths)} embeddings of dim {result.embeddings.shape[1]} "
        f"({embedder.provider.removesuffix('ExecutionProvider')}{skipped})"
    )


def _export_weights(checkpoint: Path, out: Path, weights: str) -> None:
    from ressl.runs.weights import loading_code, save_backbone_weights

    saved = save_backbone_weights(checkpoint, out, weights=weights)
    build = saved.build
    typer.echo(
        f"wrote {saved.path} ({size_text(saved.path.stat().st_size)}): {weights} backbone, "
        f"{saved.tensors} tensors, {saved.parameters:,} parameters; {build.describe()}"
    )
    try:
        code = loading_code(build, out, saved.mean, saved.std)
        typer.echo("load it without ressl:\n" + code.rstrip())
    except ValueError as e:
        typer.echo(str(e))
