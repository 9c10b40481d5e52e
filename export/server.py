"""``ressl serve``: an HTTP embedding service for an exported encoder (Starlette on uvicorn).

Endpoints:

- ``POST /embed``: images as multipart files (any field name), or JSON
  ``{"images": [BASE64, ...]}`` (encoded image files); returns
  ``{"embeddings": [[...], ...], "count": N, "dim": D}``, or the raw float32 ``(N, D)``
  bytes (C order, shape in the ``X-Shape`` header) with ``?format=raw`` or
  ``Accept: application/octet-stream``.
- ``GET /metadata``: what the model is (backbone, input, embedding size, source hash).
- ``GET /healthz`` (the process answers) and ``GET /readyz`` (the model is loaded).
- ``GET /metrics``: Prometheus counters (requests, images, errors, latency).

Images are decoded exactly as :class:`ressl.export.Embedder` decodes files and as
training decodes folders (the same ``load_image`` on the uploaded bytes), so a served
embedding equals ``Embedder`` on the same file bit for bit.
Decoding runs in a thread pool and the model in its own thread (``MicroBatcher``),
never on the event loop. Bad input gets a 4xx with ``{"error": ...}`` naming the
problem. Needs the ``serve`` extra (``pip install 'ressl[serve]'``); no torch.

The settings and their ranges are ``ressl.export.serve_settings``; how a request's images
are read, ``ressl.export.uploads``; the ``/metrics`` counters, ``ressl.export.metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ressl.errors import InputError

from .batching import MicroBatcher
from .embedder import RUN_INPUT_BYTES, Embedder
from .images import TooManyPixels, decoded_pixels, load_image, unreadable_reason
from .metrics import CLIENT_CLOSED, Counters, CountRequests
from .serve_settings import ServeSettings
from .uploads import BadInput, uploaded_images

__all__ = ["EmbeddingService", "app_from_environment", "create_app", "describe"]

#: The most decoded input one request may hold, bytes: its images wait, decoded, for their
#: batch. Four model runs' worth (``RUN_INPUT_BYTES``): 256 RGB images at 256 px, one at 4096 px.
REQUEST_INPUT_BYTES = 4 * RUN_INPUT_BYTES


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class EmbeddingService:
    """The model, its batcher and counters, and the request handlers."""

    def __init__(self, settings: ServeSettings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.embedder = embedder or Embedder(
            settings.model, device=settings.device, batch_size=settings.max_batch
        )
        # A request's decoded images are held until its batch runs: their memory is bounded by
        # REQUEST_INPUT_BYTES whatever size the model's metadata asks for (one image at least).
        self.max_images = min(
            settings.max_images, max(1, REQUEST_INPUT_BYTES // self.embedder.image_bytes)
        )
        self.batcher = MicroBatcher(
            self.embedder.run,
            min(settings.max_batch, self.embedder.images_per_run),
            settings.max_wait_ms / 1000,
        )
        self.decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.counters = Counters()
        self.ready = False

    # ------------------------------------------------------------------ decoding

    def _decode(self, name: str, data: bytes) -> np.ndarray:
        """One encoded image -> float32 ``(C, S, S)``: the bytes go through the same decode
        as ``Embedder``'s files and training folders (``load_image``), so a served
        embedding equals theirs bit for bit."""
        info = self.embedder.info
        if not data:
            raise BadInput(400, f"{name} is empty")
        try:
            return load_image(
                data, info.image_size, info.channels, max_pixels=self.settings.max_pixels
            )
        except TooManyPixels as e:
            raise BadInput(413, f"{name} is {e}") from None
        except Image.DecompressionBombError as e:
            raise BadInput(413, f"{name}: {unreadable_reason(e)}") from None
        except InputError as e:  # a model that takes no image files (pil_mode)
            raise BadInput(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
            raise BadInput(
                400, f"{name} is not an image PIL can read ({unreadable_reason(e)})"
            ) from None

    def _decode_all(self, items: list[tuple[str, bytes]]) -> np.ndarray:
        self._check_request_pixels(items)
        return np.stack([self._decode(name, data) for name, data in items])

    def _check_request_pixels(self, items: list[tuple[str, bytes]]) -> None:
        """Refuse a request whose images would take more than ``max_request_pixels`` to
        decode, from their headers alone (an image PIL cannot read, or over ``max_pixels``,
        counts 0: its decode refuses it, naming it)."""
        info, limit = self.embedder.info, self.settings.max_request_pixels
        mode = "L" if info.channels == 1 else "RGB"
        total = 0
        for _, data in items:
            pixels = decoded_pixels(data, info.image_size, mode)
            total += pixels if pixels <= self.settings.max_pixels else 0
            if total > limit:
                raise BadInput(
                    413,
                    f"the request's {len(items)} images hold {total:,}+ pixels as decoded, "
                    f"over the limit of {limit:,} per request; send them in smaller requests",
                )

    async def _images(self, request: Request) -> list[tuple[str, bytes]]:
        """``(name, bytes)`` of each image a request carries, at most ``max_images``."""
        s = self.settings
        items = await uploaded_images(request, s.max_upload_bytes, s.max_images)
        if len(items) > self.max_images:
            raise BadInput(
                413,
                f"the request carries {len(items)} images; the limit is "
                f"{self.max_images} per request{self._why_fewer()}",
            )
        return items

    def _why_fewer(self) -> str:
        if self.max_images == self.settings.max_images:
            return ""
        info = self.embedder.info
        return (
            f" (this model's {info.channels}x{info.image_size}x{info.image_size} input is "
            f"{self.embedder.image_bytes / 2**20:.1f} MiB an image decoded)"
        )

    # ------------------------------------------------------------------ endpoints

    async def embed(self, request: Request) -> Response:
        start, count = time.perf_counter(), 0
        try:
            with self.batcher.arriving():  # a batch being gathered waits for this one
                items = await self._images(request)
                loop = asyncio.get_running_loop()
                batch = await loop.run_in_executor(self.decoders, self._decode_all, items)
            rows = await self.batcher.submit(batch)
            count = len(rows)
            raw = request.query_params.get("format") == "raw" or (
                "application/octet-stream" in request.headers.get("accept", "")
            )
            if raw:
                response: Response = Response(
                    np.ascontiguousarray(rows, np.float32).tobytes(),
                    media_type="application/octet-stream",
                    headers={"X-Shape": f"{rows.shape[0]},{rows.shape[1]}", "X-Dtype": "float32"},
                )
            else:
                response = JSONResponse(
                    {"embeddings": rows.tolist(), "count": count, "dim": int(rows.shape[1])}
                )
        except BadInput as e:
            response = _error(e.status, str(e))
        except ClientDisconnect:  # gone mid-upload: nobody reads the answer, nor is it an error
            response = Response(status_code=CLIENT_CLOSED)
        except Exception as e:  # noqa: BLE001 - the model failed or a bug: the server stays up
            logging.getLogger(__name__).exception("embedding failed (HTTP 500)")
            response = _error(500, f"embedding failed: {type(e).__name__}: {e}")
        self.counters.embedded(time.perf_counter() - start, count)
        return response

    async def metadata(self, request: Request) -> Response:
        info = self.embedder.info
        body = {
            "model": os.path.basename(self.settings.model),
            "backbone": info.backbone,
            "weights": info.weights,
            "head": info.head,
            "precision": info.precision,
            "input": {
                "channels": info.channels,
                "image_size": info.image_size,
                "any_size": info.dynamic_spatial,
            },
            "embedding_dim": info.embedding_dim,
            "provider": self.embedder.provider,
            "source": info.source,
            "source_sha256": info.source_sha256,
            "ressl_version": info.ressl_version,
            "max_batch": self.settings.max_batch,
            "max_images": self.max_images,
        }
        return JSONResponse(body)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.ready:
            return _error(503, "the model is not ready")
        return JSONResponse({"status": "ready"})

    async def metrics(self, request: Request) -> Response:
        text = self.counters.text(self.batcher.batches, self.batcher.batched_images)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.batcher.start()
        self.ready = True
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish: drain the batcher, then stop
            self.ready = False
            await self.batcher.stop()
            self.decoders.shutdown(wait=True)


def create_app(settings: ServeSettings, embedder: Embedder | None = None) -> Starlette:
    """The ASGI app serving ``settings.model`` (``app.state.service`` holds the service)."""
    service = EmbeddingService(settings, embedder)
    routes = [
        Route("/embed", service.embed, methods=["POST"]),
        Route("/metadata", service.metadata, methods=["GET"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/readyz", service.readyz, methods=["GET"]),
        Route("/metrics", service.metrics, methods=["GET"]),
    ]
    paths = frozenset(route.path for route in routes)
    app = Starlette(
        routes=routes,
        middleware=[Middleware(CountRequests, counters=service.counters, paths=paths)],
        lifespan=service.lifespan,
    )
    app.state.service = service
    return app


def app_from_environment() -> Starlette:
    """The app for ``uvicorn --factory`` worker processes: settings from ``RESSL_SERVE``."""
    return create_app(ServeSettings(**json.loads(os.environ["RESSL_SERVE"])))


def describe(settings: ServeSettings, service: Any, url: str) -> str:
    """The startup line: model, what it computes, provider, address."""
    info = service.embedder.info
    return (
        f"serving {settings.model} ({info.describe()}) on "
        f"{service.embedder.provider.removesuffix('ExecutionProvider')} at {url} "
        f"(max batch {settings.max_batch}, max wait {settings.max_wait_ms:g} ms)"
    )
