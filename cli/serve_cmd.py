"""``ressl serve``: an exported encoder behind HTTP (``ressl.export.server``; the serve extra)."""

from __future__ import annotations

import json
import os
import signal
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import Interrupted, OnnxModelArg, existing, fail

if TYPE_CHECKING:  # the serve extra is imported by the command, not by ressl --help
    from ressl.export.serve_settings import ServeSettings

INSTALL = "pip install 'ressl[serve]'"


HostOpt = Annotated[str, typer.Option(help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]
ServeDeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when usable), cpu or cuda.")]
MaxBatchOpt = Annotated[int, typer.Option(help="Images per model call (micro-batch).")]
MaxWaitOpt = Annotated[
    float, typer.Option(help="How long a request waits for others to share its batch, ms.")
]
WorkersOpt = Annotated[int, typer.Option(help="Server processes, each with the model.")]
MaxUploadOpt = Annotated[float, typer.Option(help="The largest request body, MB.")]
MaxImagesOpt = Annotated[int, typer.Option(help="The most images per request.")]
MaxPixelsOpt = Annotated[
    int, typer.Option(help="The largest image, width x height as decoded (a bomb: 413).")
]
MaxRequestPixelsOpt = Annotated[
    int, typer.Option(help="The most pixels one request's images hold, as decoded (~1 s/100M).")
]


def serve_cmd(
    model: OnnxModelArg,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    device: ServeDeviceOpt = "auto",
    max_batch: MaxBatchOpt = 64,
    max_wait_ms: MaxWaitOpt = 5.0,
    workers: WorkersOpt = 1,
    max_upload_mb: MaxUploadOpt = 32.0,
    max_images: MaxImagesOpt = 256,
    max_pixels: MaxPixelsOpt = 40_000_000,
    max_request_pixels: MaxRequestPixelsOpt = 100_000_000,
) -> None:
    """Serve embeddings over HTTP: POST /embed, GET /metadata, /healthz, /readyz, /metrics."""
    uvicorn, server = _serve_modules()
    existing(model, "file")
    from ressl.export.serve_settings import ServeSettings

    settings = ServeSettings(  # each value checked against its range (serve_settings.RULES)
        str(model),
        host=host,
        port=port,
        device=device,
        workers=workers,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        max_images=max_images,
        max_pixels=max_pixels,
        max_request_pixels=max_request_pixels,
    )
    app = server.create_app(settings)  # loads the model: a bad file fails here, in one line
    url = f"http://{host}:{port}"
    typer.echo(
        server.describe(settings, app.state.service, url) + f", {workers} worker(s)", err=True
    )
    try:  # uvicorn finishes in-flight requests on SIGTERM / Ctrl-C, then passes the signal on
        _run(uvicorn, app, settings)
    except Interrupted as e:
        typer.echo(f"stopped on {signal.Signals(e.signum).name}", err=True)


def _serve_modules() -> tuple[ModuleType, ModuleType]:
    """uvicorn and ``ressl.export.server``, or a one-line error naming the serve extra."""
    try:
        import uvicorn
        from ressl.export import server
    except ImportError as e:
        fail(f"ressl serve needs the serve extra ({e.name} is missing): {INSTALL}")
    return uvicorn, server


def _run(uvicorn: ModuleType, app: Any, settings: ServeSettings) -> None:
    """Serve ``app`` in this process, or ``settings.workers`` processes that each build it."""
    log = "warning"
    if settings.workers == 1:
        uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log)
        ).run()
    else:
        os.environ["RESSL_SERVE"] = json.dumps(settings.__dict__)
        uvicorn.run(
            "ressl.export.server:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=log,
        )
