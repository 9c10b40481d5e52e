"""JSON read from files ressl did not necessarily write: checkpoint and ONNX metadata, run
logs. Parsed with a bound on nesting and size, so a crafted file costs at most what its
bound allows and fails with one line, never a ``RecursionError`` (Python's parser, and
everything that walks its result, recurses once per level). No torch here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ressl.errors import DataError

__all__ = ["MAX_JSON_CHARS", "MAX_JSON_DEPTH", "parse_json"]

#: Deepest nesting accepted. ressl writes at most 4 levels (the optimiser's state in a
#: checkpoint: ``{"state": {"0": {"step": ...}}}``); 32 leaves room for any custom value.
MAX_JSON_DEPTH = 32
#: Longest text accepted: 16 MiB. ressl's largest, the optimiser's parameter groups, is a
#: few kB for a ResNet-50; safetensors itself caps a header (all metadata) at 100 MB.
MAX_JSON_CHARS = 16 * 2**20

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``text`` nests its arrays and objects (brackets inside strings do not
    count), counting no further than ``limit + 1``; linear time, no recursion."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def parse_json(
    text: str, what: str, *, max_depth: int = MAX_JSON_DEPTH, max_chars: int = MAX_JSON_CHARS
) -> Any:
    """``json.loads(text)`` for text from outside: at most ``max_depth`` levels of nesting
    and ``max_chars`` characters.

    Args:
        what: the text's origin for the message (``"RUN/last.safetensors: its metadata
            'settings'"``).

    Raises:
        ValueError: not JSON, too deep or too long, naming ``what`` and the bound.
    """
    if len(text) > max_chars:
        raise DataError(
            f"{what} is {len(text):,} characters of JSON; at most {max_chars:,} are read"
        )
    if json_depth(text, max_depth) > max_depth:
        raise DataError(f"{what} nests JSON deeper than {max_depth} levels; refused")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # (RecursionError: a bound above the stack's)
        raise DataError(f"{what} is not valid JSON") from None
