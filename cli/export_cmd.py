"""``ressl export`` and ``ressl embed``, and what ``ressl info`` shows for an ONNX file.

Registered on the app in ``cli/app.py``. Results go to stdout, progress and
skipped-file notes to stderr.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import OverwriteOpt, Weights, checkpoint_file, fail, new_output
from .info_cmd import size_text


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def export_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="A ressl checkpoint (.safetensors) or run folder.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="encoder.onnx: the ONNX encoder; backbone.safetensors: the backbone's plain "
            "state dict, for fine-tuning in its own library (torchvision, timm).",
        ),
    ],
    weights: Annotated[
        Weights, typer.Option(help="Student weights, or the EMA teacher's.")
    ] = Weights.student,
    head: Annotated[
        bool,
        typer.Option("--head", help="Include the projection head (default: backbone features)."),
    ] = False,
    fp16: Annotated[
        bool,
        typer.Option("--fp16", help="Compute in float16, for GPU serving (I/O stays float32)."),
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="Check with onnx.checker and onnxruntime against PyTorch.")
    ] = True,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint's encoder to ONNX (preprocessing and metadata inside, verified
    against PyTorch), or its backbone's weights to a plain safetensors state dict.

    Long by its options only: Typer declares each in the signature."""
    if not checkpoint.exists():  # before torch is imported (seconds)
        fail(f"{checkpoint}: no such file or folder")
    from ressl.export.exporter import export_onnx

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
    if suffix == ".safetensors":
        if head or fp16:
            fail(
                f"{'--head' if head else '--fp16'} is for ONNX files; -o {out} gets the "
                "backbone's weights as trained"
            )
        _export_weights(checkpoint, out, weights.value)
        return
    report = export_onnx(
        checkpoint, out, weights=weights.value, head=head, fp16=fp16, verify=verify, opset=opset
    )
    typer.echo(f"wrote {report.path} ({size_text(report.size_bytes)}): {report.info.describe()}")
    typer.echo(
        f"verified: {report.verification.describe()}"
        if report.verification is not None
        else "not verified (--no-verify)"
    )


def embed_cmd(
    model: Annotated[Path, typer.Argument(help="An ONNX encoder written by `ressl export`.")],
    paths: Annotated[
        list[str],  # str, not Path: Path("") is ".", and '' must not embed the working tree
        typer.Argument(help="Image files and folders (searched recursively).", metavar="PATH"),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="The .npz file to write (embeddings, paths, skipped)."),
    ],
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime run.")] = 64,
    device: Annotated[
        Device, typer.Option(help="auto: CUDA when a GPU is usable, else CPU.")
    ] = Device.auto,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads per run (default: onnxruntime's, one per core).")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Embed image files and folders with an exported encoder; write OUT.npz (see docs/export.md)."""
    from ressl.export.embedder import Embedder
    from ressl.export.images import image_files
    from ressl.export.outputs import save_embeddings

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
