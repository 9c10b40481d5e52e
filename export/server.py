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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ressl.errors import ConfigError, InputError
from ressl.jsontext import json_depth
from ressl.rules import Rule, choice, integer, interval

from .batching import MicroBatcher
from .embedder import RUN_INPUT_BYTES, Embedder
from .images import TooManyPixels, decoded_pixels, load_image, unreadable_reason

__all__ = ["ServeSettings", "create_app"]

#: The most decoded input one request may hold, bytes: its images wait, decoded, for their
#: batch. Four model runs' worth (``RUN_INPUT_BYTES``): 256 RGB images at 256 px, one at 4096 px.
REQUEST_INPUT_BYTES = 4 * RUN_INPUT_BYTES

#: Latency histogram buckets, seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _host(value: object) -> bool:
    """An IP address to listen on, or ``localhost`` (no name lookups: ``"0"`` would resolve to
    every interface, ``""`` means every interface to asyncio, any other name needs DNS)."""
    if value == "localhost":
        return True
    try:
        ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


#: Each setting's valid values, the one place they are stated: checked on construction, and the
#: command line's flags are these names (``max_wait_ms`` is ``--max-wait-ms``). Every bound is
#: finite: an endless wait holds a request forever, an endless upload limit is no limit.
RULES: dict[str, Rule] = {
    "host": Rule("an IP address (127.0.0.1, 0.0.0.0, ::) or 'localhost'", _host),
    "port": integer(1, high=65535),
    "device": choice("auto", "cpu", "cuda"),
    "workers": integer(1, high=64),
    "max_batch": integer(1, high=4096),
    "max_wait_ms": interval(0.0, 10_000.0, "a number of milliseconds in [0, 10000]"),
    "max_upload_mb": interval(0.001, 1024.0, "a number of MB in [0.001, 1024]"),
    "max_images": integer(1, high=10_000),
    "max_pixels": integer(1, high=1_000_000_000),
    "max_request_pixels": integer(1, high=100_000_000_000),
    "decode_threads": integer(1, high=256),
}


def _shown(value: object) -> str:
    """``repr(value)``, cut short when long (a 5,000-character value is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:32]}... ({len(text)} characters)"


@dataclass(frozen=True)
class ServeSettings:
    """How ``ressl serve`` serves a model (valid values: ``RULES``).

    Attributes:
        model: The ONNX file (written by ``ressl export``).
        host: The address to listen on.
        port: The port to listen on.
        device: ``auto``, ``cpu`` or ``cuda``.
        workers: Server processes, each with its own copy of the model.
        max_batch: Images per model call.
        max_wait_ms: How long a request waits for others to share its batch.
        max_upload_mb: The largest request body accepted, MB (2**20 bytes).
        max_images: The most images one request may carry.
        max_pixels: The largest image (width x height, as decoded) accepted: larger is
            a decompression bomb.
        max_request_pixels: The most pixels (width x height, as decoded) one request's
            images may hold together: decoding costs about 1 s of a core per 100
            million (a 6000x6000 PNG: 0.35 s), so this bounds the CPU a request takes,
            refused (413) from the headers before anything is decoded.
        decode_threads: Threads decoding images.

    Raises:
        ConfigError: a value out of its range, naming the setting (as its flag on the CLI).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    workers: int = 1
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_upload_mb: float = 32.0
    max_images: int = 256
    max_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000  # 1 s of decoding on one core (about 100 MP/s)
    decode_threads: int = max(2, min(8, os.cpu_count() or 2))

    def __post_init__(self) -> None:
        for name, rule in RULES.items():
            value = getattr(self, name)
            if not rule.ok(value):
                raise ConfigError(f"{{{name}}} must be {rule.expect}, got {_shown(value)}", name)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class BadInput(Exception):
    """A request the server refuses: ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: The ``path`` label of a request to no route (a 404): one label for every unknown path, so
#: that a client cannot create a metric series per URL it makes up.
OTHER_PATH = "other"
#: The status a request gets when its client went away before the answer (nginx's 499): the
#: client's doing, not the server's, and never sent.
CLIENT_CLOSED = 499


@dataclass
class Counters:
    """What ``/metrics`` reports, in the Prometheus text format (version 0.0.4)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    images: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    latency_sum: float = 0.0
    latency_count: int = 0

    def request(self, path: str, status: int) -> None:
        """Count one answered request (every route, ``OTHER_PATH`` for unknown ones)."""
        key = (path, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 400 and status != CLIENT_CLOSED:
            self.errors[status] = self.errors.get(status, 0) + 1

    def embedded(self, seconds: float, images: int) -> None:
        """One ``POST /embed``: its latency and the images it embedded."""
        self.images += images
        self.latency_sum += seconds
        self.latency_count += 1
        for i, edge in enumerate(BUCKETS):
            if seconds <= edge:
                self.buckets[i] += 1

    def text(self, batches: int, batched: int) -> str:
        requests = [
            f'ressl_requests_total{{path="{p}",status="{s}"}} {n}'
            for (p, s), n in sorted(self.requests.items())
        ]
        errors = [f'ressl_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.errors.items())]
        buckets = [
            f'ressl_embed_seconds_bucket{{le="{edge}"}} {n}'
            for edge, n in zip(BUCKETS, self.buckets)
        ]
        lines = [
            "# HELP ressl_requests_total HTTP requests by path and status (499: client went away).",
            "# TYPE ressl_requests_total counter",
            *requests,
            "# HELP ressl_images_total Images embedded.",
            "# TYPE ressl_images_total counter",
            f"ressl_images_total {self.images}",
            "# HELP ressl_errors_total Requests answered with an error, by status.",
            "# TYPE ressl_errors_total counter",
            *errors,
            "# HELP ressl_batches_total Model calls (micro-batches).",
            "# TYPE ressl_batches_total counter",
            f"ressl_batches_total {batches}",
            "# HELP ressl_batched_images_total Images in those model calls.",
            "# TYPE ressl_batched_images_total counter",
            f"ressl_batched_images_total {batched}",
            "# HELP ressl_embed_seconds Latency of POST /embed.",
            "# TYPE ressl_embed_seconds histogram",
            *buckets,
            f'ressl_embed_seconds_bucket{{le="+Inf"}} {self.latency_count}',
            f"ressl_embed_seconds_sum {self.latency_sum:.6f}",
            f"ressl_embed_seconds_count {self.latency_count}",
        ]
        return "\n".join(lines) + "\n"


class CountRequests:
    """ASGI middleware counting every HTTP request by route and status (``Counters.request``)."""

    def __init__(self, app: ASGIApp, counters: Counters, paths: frozenset[str]) -> None:
        self.app, self.counters, self.paths = app, counters, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server sends when the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in self.paths else OTHER_PATH
            self.counters.request(path, status)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes.

    Raises:
        BadInput: 413 over the limit.
        ClientDisconnect: the client went away before sending all of it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


#: How deep a JSON body may nest: ``{"images": [...]}`` is 2 levels.
JSON_DEPTH = 2


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
        """``(name, bytes)`` of each image a request carries."""
        s = self.settings
        body = await _body(request, s.max_upload_bytes)
        if not body:
            raise BadInput(
                400,
                "the request has no body; send images as multipart files or "
                'JSON {"images": [base64, ...]}',
            )
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            request._body = body  # the form parser reads the body already read
            try:
                form = await request.form(max_files=s.max_images + 1, max_fields=s.max_images + 16)
            except Exception as e:  # noqa: BLE001 - malformed multipart, too many parts
                raise BadInput(400, f"the multipart body cannot be parsed ({e})") from None
            items = [
                (v.filename or k, await v.read())
                for k, v in form.multi_items()
                if isinstance(v, UploadFile)
            ]
        elif kind == "application/json":
            items = self._json_images(body)
        else:
            raise BadInput(
                415,
                f"content type {kind or 'none'!r} is not accepted; send "
                "multipart/form-data files or application/json",
            )
        if not items:
            raise BadInput(400, "the request carries no image")
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

    @staticmethod
    def _json_images(body: bytes) -> list[tuple[str, bytes]]:
        # measured before parsing (json.loads recurses once per level), counted to the end
        depth = json_depth(body.decode("utf-8", errors="replace"), limit=len(body))
        if depth > JSON_DEPTH:
            raise BadInput(
                400,
                f"the JSON body nests {depth} levels deep; JSON bodies must be "
                '{"images": [base64 string, ...]} (2 levels)',
            )
        try:
            payload = json.loads(body)
        except ValueError:
            raise BadInput(400, "the body is not valid JSON") from None
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise BadInput(400, 'JSON bodies must be {"images": [base64 string, ...]}')
        items = []
        for i, text in enumerate(images):
            try:
                items.append((f"images[{i}]", base64.b64decode(text, validate=True)))
            except (binascii.Error, ValueError):
                raise BadInput(400, f"images[{i}] is not valid base64") from None
        return items

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
