"""``ressl export`` and ``ressl embed``, and what ``ressl info`` shows for an ONNX file.

Registered on the app in ``cli/app.py``. Results go to stdout, progress and
skipped-file notes to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .app import app, fail


class Weights(str, Enum):
    student = "student"
    teacher = "teacher"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command("export")
def export_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="A ressl checkpoint (.safetensors) or run folder.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The ONNX file to write, e.g. encoder.onnx.")
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
) -> None:
    """Export a checkpoint's encoder to ONNX: preprocessing and metadata inside, verified against PyTorch."""
    from ressl.export.exporter import export_onnx

    if not checkpoint.exists():
        fail(f"{checkpoint}: no such file or folder")
    report = export_onnx(
        checkpoint, out, weights=weights.value, head=head, fp16=fp16, verify=verify, opset=opset
    )
    typer.echo(f"wrote {report.path} ({_size(report.size_bytes)}): {report.info.describe()}")
    typer.echo(
        f"verified: {report.verification.describe()}"
        if report.verification is not None
        else "not verified (--no-verify)"
    )


class _EmbedProgress:
    """A bar on stderr while files are embedded (nothing when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]embed"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not sys.stderr.isatty(),
        )
        self.task = self.progress.add_task("embed", total=total, ips="-")
        self.start = time.perf_counter()

    def __enter__(self) -> _EmbedProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, done: int) -> None:
        ips = done / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, completed=done, ips=f"{ips:,.0f}")


@app.command("embed")
def embed_cmd(
    model: Annotated[Path, typer.Argument(help="An ONNX encoder written by `ressl export`.")],
    paths: Annotated[
        list[Path],
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
) -> None:
    """Embed image files and folders with an exported encoder; write OUT.npz (see docs/export.md)."""
    from ressl.export.embedder import Embedder
    from ressl.export.images import image_files
    from ressl.export.outputs import check_writable, save_embeddings

    if out.suffix.lower() != ".npz":
        fail(
            f"-o must name a .npz file (embeddings, paths and skipped files in one archive), got {out}"
        )
    check_writable(out, "output")
    if not model.exists():
        fail(f"{model}: no such file")
    embedder = Embedder(model, device=device.value, batch_size=batch_size, threads=threads)
    files = image_files(paths)
    with _EmbedProgress(len(files)) as progress:
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


def onnx_info(path: Path, as_json: bool) -> str:
    """What ``ressl info`` prints for an exported ONNX file."""
    from ressl.export.modelfile import describe_model

    d = describe_model(path)
    info = d["info"]
    meta = d["metadata"]
    if as_json:
        plain = {k: v for k, v in meta.items() if k not in ("settings", "verification")}
        return json.dumps(
            {
                "file": d["file"],
                "size_bytes": d["size_bytes"],
                "opset": d["opset"],
                "producer": d["producer"],
                "inputs": d["inputs"],
                "outputs": d["outputs"],
                "metadata": plain,
                "verification": json.loads(meta.get("verification") or "null"),
                "settings": info.settings,
            },
            indent=2,
        )

    def sig(v: dict[str, Any]) -> str:
        return f"{v['name']} {v['dtype']} ({', '.join(map(str, v['shape']))})"

    mode = {1: "grey", 3: "RGB"}.get(info.channels, f"{info.channels}-channel")
    lines = [
        f"onnx encoder   {path} ({_size(d['size_bytes'])}, opset {d['opset']}, ressl {info.ressl_version})",
        f"computes       {info.describe()}",
        f"input          {sig(d['inputs'][0])}, values in [0, 1]; served at {info.image_size}x{info.image_size}"
        + (" (any size accepted)" if info.dynamic_spatial else ""),
        f"preprocess     {mode}; {meta.get('preprocess', '')}",
        f"normalise      mean {list(info.mean)} std {list(info.std)} (inside the graph)",
        f"output         {sig(d['outputs'][0])}, L2-normalised",
    ]
    if info.source:
        progress = (
            f", epoch {meta['epoch']} step {meta['step']}"
            if "epoch" in meta and "step" in meta
            else ""
        )
        lines.append(f"source         {info.source} (sha256 {info.source_sha256}{progress})")
    if meta.get("verification"):
        v = json.loads(meta["verification"])
        lines.append(
            f"verified       max |diff| {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.6f} "
            f"({v['criterion']})"
        )
    if info.settings:
        lines.append("settings")
        width = max(len(k) for k in info.settings)
        lines += [f"  {k:<{width}}  {json.dumps(v)}" for k, v in info.settings.items()]
    return "\n".join(lines)
