"""``ServeSettings``: how ``ressl serve`` serves a model, and ``RULES``, each setting's valid
values (the command line's ``serve`` flags are these names)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from ressl.errors import ConfigError
from ressl.rules import Rule, choice, integer, interval

__all__ = ["RULES", "ServeSettings"]


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
