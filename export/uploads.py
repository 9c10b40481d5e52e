"""The images a ``POST /embed`` request uploads: its body read within a limit, then its
multipart files or its JSON ``{"images": [BASE64, ...]}`` as ``(name, bytes)`` pairs.
A request that cannot be read so is a ``BadInput`` naming the problem and its HTTP status."""

from __future__ import annotations

import base64
import binascii
import json

from starlette.datastructures import UploadFile
from starlette.requests import Request

from ressl.jsontext import json_depth

__all__ = ["JSON_DEPTH", "BadInput", "uploaded_images"]

#: How deep a JSON body may nest: ``{"images": [...]}`` is 2 levels.
JSON_DEPTH = 2


class BadInput(Exception):
    """A request the server refuses: ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def uploaded_images(
    request: Request, max_bytes: int, max_images: int
) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each image a request carries (at least one; a multipart body is
    parsed up to ``max_images + 1`` files, enough to tell that it has too many).

    Raises:
        BadInput: no body, or over ``max_bytes``, a body that cannot be parsed, another
            content type, or no image.
        ClientDisconnect: the client went away before sending all of it.
    """
    body = await _body(request, max_bytes)
    if not body:
        raise BadInput(
            400,
            "the request has no body; send images as multipart files or "
            'JSON {"images": [base64, ...]}',
        )
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        items = await _form_images(request, body, max_images)
    elif kind == "application/json":
        items = _json_images(body)
    else:
        raise BadInput(
            415,
            f"content type {kind or 'none'!r} is not accepted; send "
            "multipart/form-data files or application/json",
        )
    if not items:
        raise BadInput(400, "the request carries no image")
    return items


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


async def _form_images(request: Request, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    request._body = body  # the form parser reads the body already read
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except Exception as e:  # noqa: BLE001 - malformed multipart, too many parts
        raise BadInput(400, f"the multipart body cannot be parsed ({e})") from None
    return [
        (v.filename or k, await v.read())
        for k, v in form.multi_items()
        if isinstance(v, UploadFile)
    ]


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
