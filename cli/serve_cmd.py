"""``ressl serve``: an exported encoder behind HTTP (``ressl.export.server``; the serve extra)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from .common import Interrupted, existing, fail

INSTALL = "pip install 'ressl[serve]'"


def serve_cmd(
    model: Annotated[Path, typer.Argument(help="An ONNX encoder written by `ressl export`.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="auto (CUDA when usable), cpu or cuda.")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Images per model call (micro-batch).")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a request waits for others to share its batch, ms.")
    ] = 5.0,
    workers: Annotated[int, typer.Option(help="Server processes, each with the model.")] = 1,
    max_upload_mb: Annotated[float, typer.Option(help="The largest request body, MB.")] = 32.0,
    max_images: Annotated[int, typer.Option(help="The most images per request.")] = 256,
    max_pixels: Annotated[
        int, typer.Option(help="The largest image, width x height as decoded (a bomb: 413).")
    ] = 40_000_000,
    max_request_pixels: Annotated[
        int, typer.Option(help="The most pixels one request's images hold, as decoded (~1 s/100M).")
    ] = 100_000_000,
) -> None:
    """Serve embeddings over HTTP: POST /embed, GET /metadata, /healthz, /readyz, /metrics."""
    try:
        import uvicorn
        from ressl.export.serve_settings import ServeSettings
        from ressl.export.server import create_app, describe
    except ImportError as e:
        fail(f"ressl serve needs the serve extra ({e.name} is missing): {INSTALL}")
    existing(model, "file")
    settings = ServeSettings(  # each value checked against its range (serve_settings.RULES), named as its flag
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
    app = create_app(settings)  # loads the model: a bad file fails here, in one line
    url = f"http://{host}:{port}"
    typer.echo(describe(settings, app.state.service, url) + f", {workers} worker(s)", err=True)
    log = "warning"
    try:  # uvicorn finishes in-flight requests on SIGTERM / Ctrl-C, then passes the signal on
        if workers == 1:
            uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log)).run()
        else:
            os.environ["RESSL_SERVE"] = json.dumps(settings.__dict__)
            uvicorn.run(
                "ressl.export.server:app_from_environment",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                log_level=log,
            )
    except Interrupted as e:
        typer.echo(f"stopped on {signal.Signals(e.signum).name}", err=True)
