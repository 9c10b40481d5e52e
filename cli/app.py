"""The ``ressl`` command line: ``ressl train``, ``ressl info``, ``ressl export``, ``ressl embed``,
``ressl eval knn|linear``, ``ressl plot``.

The CLI owns the terminal: progress bars and summary lines go to stderr,
results to stdout. Every user error becomes one line on stderr and a non-zero
exit status, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(
    name="ressl",
    help="ReSSL: relational self-supervised pre-training of image encoders.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


class Backbone(str, Enum):
    small = "small"
    resnet18 = "resnet18"
    resnet50 = "resnet50"


class MomentumSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class TeacherView(str, Enum):
    weak = "weak"
    strong = "strong"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


def _parse_numbers(
    option: str, text: str | None, count: int, example: str
) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        fail(f"{option} must be {count} comma-separated numbers like {example}, got {text!r}")
    return values


def _parse_crops(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        fail(f"--crops must be comma-separated crop sides like 32,28,24,20,16, got {text!r}")


def _parse_crop_scales(text: str | None) -> tuple[tuple[float, float], ...] | None:
    if text is None:
        return None
    try:
        pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        fail(
            f"--crop-scales must be comma-separated lo:hi ranges like 0.2:1,0.15:0.75, got {text!r}"
        )
    return tuple((p[0], p[1]) for p in pairs)


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    dataset: Annotated[
        str,
        typer.Option(
            help="fashion-mnist, cifar10, cifar100, stl10, folder:PATH or imagenet:PATH "
            "(a folder with the ImageNet recipe)"
        ),
    ] = "fashion-mnist",
    epochs: Annotated[
        int | None, typer.Option(help="Total epochs (also when resuming). (default: per dataset)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    backbone: Annotated[
        Backbone | None,
        typer.Option(
            help="Encoder; 'small' is a fast CNN for CPU runs. "
            "(default: per dataset: resnet18, resnet50 for ImageNet-like data)"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder. (default: runs/DATASET)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Run folder or checkpoint to continue.")
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = "auto",
    seed: Annotated[
        int, typer.Option(help="Random seed (model init, data order, augmentations).")
    ] = 0,
    subset: Annotated[
        int | None, typer.Option(help="Train on the first N images only (quick runs).")
    ] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="Relation queue length K. (default: per dataset)")
    ] = None,
    ema_momentum: Annotated[
        float | None, typer.Option(help="Teacher EMA momentum m. (default: per dataset)")
    ] = None,
    momentum_schedule: Annotated[
        MomentumSchedule, typer.Option(help="Constant m, or cosine from m to 1.")
    ] = MomentumSchedule.constant,
    student_temperature: Annotated[float, typer.Option(help="tau_s.")] = 0.1,
    teacher_temperature: Annotated[float, typer.Option(help="tau_t (sharper than tau_s).")] = 0.04,
    lr: Annotated[
        float | None, typer.Option(help="SGD learning rate per 256 images. (default: per dataset)")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (not on BN/bias). (default: per dataset)")
    ] = None,
    warmup_epochs: Annotated[
        int | None,
        typer.Option(help="Linear warm-up epochs before the cosine decay. (default: per dataset)"),
    ] = None,
    crop_scale: Annotated[
        str | None, typer.Option(help="RandomResizedCrop area range, e.g. 0.2,1.0.")
    ] = None,
    crops: Annotated[
        str | None,
        typer.Option(
            help="Multi-crop: student crop sides, e.g. 32,28,24,20,16 or 224,192,160,128,96."
        ),
    ] = None,
    crop_scales: Annotated[
        str | None,
        typer.Option(
            help="Area range per --crops side, e.g. 0.2:1,0.15:0.75 (default: crop scale x side / image size)"
        ),
    ] = None,
    symmetric: Annotated[
        bool,
        typer.Option(
            "--symmetric", help="2x backprop: two crops per image, each seen by both networks."
        ),
    ] = False,
    teacher_view: Annotated[
        TeacherView, typer.Option(help="Teacher augmentation (the paper: weak).")
    ] = TeacherView.weak,
    jitter: Annotated[
        str | None,
        typer.Option(
            help="Strong view colour jitter: brightness,contrast,saturation,hue. (default: per dataset)"
        ),
    ] = None,
    jitter_p: Annotated[
        float, typer.Option(help="Probability of colour jitter on the strong view.")
    ] = 0.8,
    grayscale_p: Annotated[
        float, typer.Option(help="Probability of grayscale on the strong view.")
    ] = 0.2,
    blur: Annotated[
        float | None,
        typer.Option(
            help="Gaussian blur probability on the strong view. (default: per dataset: 0, ImageNet 0.5)"
        ),
    ] = None,
    width: Annotated[int, typer.Option(help="Width of the small CNN's first stage.")] = 32,
    hidden_dim: Annotated[
        int | None,
        typer.Option(
            help="Projection head hidden width. (default: per dataset: 512, ImageNet 4096)"
        ),
    ] = None,
    embed_dim: Annotated[
        int | None,
        typer.Option(help="Embedding dimension D. (default: per dataset: 128, ImageNet 512)"),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Image side for folder data. (default: per dataset)")
    ] = None,
    knn_every: Annotated[
        int,
        typer.Option(
            help="kNN monitor every N epochs (0: only at the end, -1: never, e.g. for ImageNet-size data)."
        ),
    ] = 5,
    precision: Annotated[
        Precision, typer.Option(help="auto: bf16 autocast where supported.")
    ] = Precision.auto,
    data_root: Annotated[
        Path | None, typer.Option(help="Where datasets are looked for / downloaded.")
    ] = None,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers for streamed folders.")] = 4,
) -> None:
    """Pre-train an encoder with ReSSL; writes RUN/last.safetensors and RUN/metrics.jsonl."""
    from ressl.train import train

    from .progress import TrainProgress

    explicit = _explicit_options(ctx)
    settings: dict[str, Any] = dict(
        dataset=dataset,
        epochs=epochs,
        batch_size=batch_size,
        backbone=backbone.value if backbone else None,
        out=out,
        device=device,
        seed=seed,
        subset=subset,
        queue_size=queue_size,
        ema_momentum=ema_momentum,
        momentum_schedule=momentum_schedule.value,
        student_temperature=student_temperature,
        teacher_temperature=teacher_temperature,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        crop_scale=_parse_numbers("--crop-scale", crop_scale, 2, "0.2,1.0"),
        crops=_parse_crops(crops),
        crop_scales=_parse_crop_scales(crop_scales),
        symmetric=symmetric,
        teacher_view=teacher_view.value,
        jitter=_parse_numbers("--jitter", jitter, 4, "0.4,0.4,0.4,0.1"),
        jitter_p=jitter_p,
        grayscale_p=grayscale_p,
        blur=blur,
        width=width,
        hidden_dim=hidden_dim,
        embed_dim=embed_dim,
        image_size=image_size,
        knn_every=knn_every,
        precision=precision.value,
        data_root=data_root,
        num_workers=num_workers,
    )
    if resume is not None:
        # Only what the user typed may override (and must agree with) the saved settings.
        settings = {k: v for k, v in settings.items() if k in explicit}
        if not resume.exists():
            fail(f"--resume {resume}: no such file or folder")
    if _launch_rank() != 0:  # under torchrun, rank 0 alone draws progress and prints
        logging.getLogger("ressl").setLevel(logging.ERROR)
        train(resume=resume, **settings)
        return
    with TrainProgress() as progress:
        path = train(resume=resume, callback=progress, **settings)
    typer.echo(str(path))


def _launch_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _explicit_options(ctx: typer.Context) -> set[str]:
    """Names of the options the user actually typed (vs. defaults)."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and getattr(source, "name", "") not in ("DEFAULT", "DEFAULT_MAP"):
            out.add(name)
    return out


@app.command("info")
def info_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            help="A ressl checkpoint (.safetensors), run folder or exported .onnx file."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
) -> None:
    """Describe a checkpoint (format, versions, progress, metrics, settings) or an exported ONNX encoder."""
    from ressl.checkpoint import read_metadata

    if not path.exists():
        fail(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        typer.echo(export_cmd.onnx_info(path, as_json))
        return
    meta = read_metadata(path)
    settings = json.loads(meta.get("settings", "{}"))
    metrics = json.loads(meta.get("metrics", "{}") or "{}")
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "metadata": {
                        k: v
                        for k, v in meta.items()
                        if k not in ("settings", "optimizer", "metrics")
                    },
                    "settings": settings,
                    "metrics": metrics,
                },
                indent=2,
            )
        )
        return
    lines = [
        f"checkpoint     {path}",
        f"format         {meta['format']} v{meta['format_version']} (ressl {meta.get('ressl_version', '?')})",
        f"progress       epoch {meta.get('epoch')}/{settings.get('epochs')}, step {meta.get('step')}"
        + (
            f" (mid-epoch, batch {meta['batch_in_epoch']})"
            if meta.get("batch_in_epoch", "0") != "0"
            else ""
        ),
    ]
    if metrics:
        lines.append("last metrics   " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    lines.append("settings")
    width = max((len(k) for k in settings), default=0)
    lines += [f"  {k:<{width}}  {json.dumps(v)}" for k, v in settings.items()]
    typer.echo("\n".join(lines))


from .eval_cmd import eval_app  # noqa: E402  (registers ressl eval knn, ressl eval linear)
from .plot_cmd import plot_cmd  # noqa: E402

app.add_typer(eval_app, name="eval")
app.command("plot")(plot_cmd)

from . import export_cmd  # noqa: E402  (registers ressl export, ressl embed)


def _is_usage_error(e: BaseException) -> bool:
    # click's (or typer's vendored click's) UsageError / BadParameter / NoSuchOption.
    return any(c.__name__ in ("UsageError", "ClickException") for c in type(e).__mro__)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the app, turn user errors into one line and an exit status."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("ressl").setLevel(logging.WARNING)
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except UserError as e:
        _die(str(e))
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        _die(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        _die("interrupted", code=130)
    except OSError as e:
        _die(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    except Exception as e:
        if _is_usage_error(e):
            _die(e.format_message() if hasattr(e, "format_message") else str(e))  # type: ignore[attr-defined]
        if type(e).__name__ == "Abort":
            _die("aborted", code=130)
        raise
    sys.exit(code if isinstance(code, int) else 0)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now, so log lines go above a live progress bar."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _die(message: str, code: int = 2) -> NoReturn:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    print(f"ressl: error: {first}", file=sys.stderr)
    sys.exit(code)
