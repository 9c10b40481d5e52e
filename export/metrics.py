"""What ``GET /metrics`` reports: ``Counters`` in the Prometheus text format, and the
``CountRequests`` middleware counting every HTTP request by route and status."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CLIENT_CLOSED", "OTHER_PATH", "CountRequests", "Counters"]

#: Latency histogram buckets, seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
