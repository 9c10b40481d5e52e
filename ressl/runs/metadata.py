"""A checkpoint's string metadata: the format tags, and its fields read with their checks.

The layer below both the checkpoint format (``ressl.runs.checkpoint``) and the checks
(``ressl.runs.checks``): each reads metadata through these, and neither imports the other's
readers back.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ressl.errors import CheckpointError
from ressl.jsontext import parse_json
from ressl.runs.folder import resolve_checkpoint

__all__ = ["EMPTY_HEALTH", "FORMAT", "FORMAT_VERSION", "count", "metadata_json", "read_metadata"]

FORMAT = "ressl-checkpoint"
FORMAT_VERSION = "1"
#: ``epoch_health`` of an epoch with no health measures yet (and of checkpoints before 0.4).
EMPTY_HEALTH = '{"steps": 0, "sum": {}}'


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _check_meta(path: Path, meta: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a ressl checkpoint (no format={FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; "
            f"this ressl reads version {FORMAT_VERSION}"
        )
    return meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ressl checkpoint (a file, or a run folder's ``last.safetensors``).

    Raises:
        CheckpointError: if the file is missing, not safetensors, or not a ressl checkpoint.
    """
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return _check_meta(path, f.metadata())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def metadata_json(
    path: Path, meta: Mapping[str, str], key: str, kind: type, default: Any = None
) -> Any:
    """The JSON metadata field ``key`` (a ``kind``), ``default`` when absent if one is given."""
    if key not in meta and default is not None:
        return default
    if key not in meta:
        raise _fail(path, f"its metadata has no {key!r} (a ressl checkpoint always has one)")
    try:
        value = parse_json(meta[key], f"its metadata {key!r}")
    except ValueError as e:
        raise _fail(path, str(e)) from None
    if not isinstance(value, kind):
        raise _fail(path, f"its metadata {key!r} is not a JSON {kind.__name__}")
    return value


def count(path: Path, meta: Mapping[str, str], key: str, low: int = 0) -> int:
    """The integer metadata field ``key`` (>= ``low``), or a CheckpointError naming it."""
    text = meta.get(key)
    if text is None:
        raise _fail(path, f"its metadata has no {key!r}")
    try:
        value = int(text)
    except ValueError:
        raise _fail(path, f"its metadata {key!r} is {text[:40]!r}, not an integer") from None
    if value < low:
        raise _fail(path, f"its metadata {key!r} is {value}; it must be >= {low}")
    return value
