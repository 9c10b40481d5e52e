"""Image files with PIL alone: which files count as images, opening them, and the one
evaluation decode.

:func:`decode_to_size` is the single path from an encoded image (a file, its bytes, or
a PIL image) to the ``S x S`` pixels a model sees: training folders
(``ressl.data.decode``), ``ressl embed``, ``Embedder`` and ``ressl serve`` all call it, so
they give the same pixels bit for bit. Its cost is bounded by the file's own pixels
and the output, whatever the aspect ratio (:func:`resize_center_crop`).

No torch here, so the serving side (``ressl.export``) shares these with training
(``ressl.data.folders``) on machines without PyTorch.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

from ressl.errors import DataError

__all__ = [
    "GRAYSCALE_MODES",
    "IMAGE_EXTENSIONS",
    "EncodedImage",
    "TooManyPixels",
    "as_mode",
    "decode_to_size",
    "decoded_pixels",
    "images_under",
    "is_image_name",
    "is_upright",
    "opened_image",
    "resize_center_crop",
]

#: An encoded image: a file path or the file's bytes (a PIL image is already decoded).
EncodedImage = Union[str, os.PathLike, bytes]  # noqa: UP007 - a runtime alias

#: File extensions (lower case) read from image folders; matching is case-insensitive.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    """A visible file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(top: Path) -> list[Path]:
    """Image files anywhere under ``top``, sorted.

    Only regular files count: a named pipe, socket or device with an image name is
    passed over (reading a pipe would block forever). Links are followed, also out of
    ``top`` (datasets are often trees of links), each folder once (no cycles); hidden
    entries are skipped.
    """
    found: list[Path] = []
    seen: set[str] = set()
    todo = [str(top)]
    while todo:
        folder = todo.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable or vanished: as os.walk, pass over it
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    todo.append(entry.path)
                elif entry.is_file() and is_image_name(entry.name):  # regular (after links)
                    found.append(Path(entry.path))
            except OSError:  # a link to nowhere, or one we may not follow
                continue
    return sorted(found)


class TooManyPixels(ValueError):
    """An image larger (width x height, as it would be decoded) than the caller allows."""


@contextmanager
def opened_image(source: EncodedImage) -> Iterator[Image.Image]:
    """PIL's lazy image of a regular file or of encoded bytes (only the header is read).

    A path is opened without blocking and must be a regular file once open (a link to
    one is fine): a named pipe would block forever, and a device never ends.

    Raises:
        IsADirectoryError, ValueError: the path is a folder, or not a regular file.
        OSError, PIL's errors: the file cannot be read or is not an image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(source)) as image:
            yield image
        return
    with _regular_file(source) as file, Image.open(file) as image:
        yield image


@contextmanager
def _regular_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """``path`` open for reading, refused unless it is a regular file (checked on the open file)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a pipe does not wait for a writer
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{os.fspath(path)}: a folder, not an image file")
        if not stat.S_ISREG(mode):
            raise DataError(f"{os.fspath(path)}: not a regular file (a pipe, socket or device)")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        yield file


def decode_to_size(
    source: EncodedImage | Image.Image, size: int, mode: str, *, max_pixels: int | None = None
) -> Image.Image:
    """The ``size x size`` image a model sees, in ``mode`` ("L" or "RGB").

    A JPEG is decoded at the smallest of PIL's reduced scales (1/2, 1/4, 1/8) that
    keeps both sides >= ``size`` (``draft``); then the image is put upright, converted
    to ``mode`` (:func:`as_mode`), its shorter side resized to ``size`` and its centre
    cropped (:func:`resize_center_crop`). A PIL image is taken as decoded.

    Args:
        source: a file path, the file's bytes, or a PIL image.
        size: the side S of the result.
        mode: "L" or "RGB".
        max_pixels: refuse images with more pixels than this, as they would be
            decoded (after ``draft``), before decoding them; None: PIL's own limit.

    Raises:
        TooManyPixels: over ``max_pixels``.
        OSError, ValueError, PIL's errors: not a readable image (see :func:`opened_image`).
    """
    if isinstance(source, Image.Image):
        _check_pixels(source, max_pixels)
        return resize_center_crop(as_mode(source, mode), size)
    with opened_image(source) as image:
        image.draft(mode, (size, size))  # JPEG: decode at a reduced scale >= size
        _check_pixels(image, max_pixels)
        upright = as_mode(image, mode)  # palette, 16-bit, alpha, CMYK -> mode; GIF: frame 1
    return resize_center_crop(upright, size)


def decoded_pixels(source: EncodedImage, size: int, mode: str) -> int:
    """Width x height of ``source`` as :func:`decode_to_size` would decode it (after the JPEG
    draft), from its header alone; 0 when PIL cannot read it."""
    try:
        with opened_image(source) as image:
            image.draft(mode, (size, size))
            return int(image.width * image.height)
    except Exception:  # noqa: BLE001 - not an image: its decode will say why
        return 0


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise TooManyPixels(
            f"{image.width}x{image.height} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb?)"
        )


#: Modes whose values go up to 65535 (16-bit PNG and TIFF greyscale): scaled, not clipped.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
#: Greyscale modes: a folder of these trains on one channel.
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "F", *_SIXTEEN_BIT)


def _eight_bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image as 8-bit "L", scaled rather than clipped.

    16-bit modes are divided by 257 (65535 -> 255). A 32-bit integer image ("I", which
    older Pillow gives 16-bit PNGs) is taken as 8-bit when its values fit, else as
    16-bit, else scaled by its maximum; a float image ("F") in [0, 1] is scaled by 255.
    """
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and 255 < top <= 65535):
        values = values / 257
    elif image.mode == "I" and top > 65535:
        values = values * (255 / top)
    elif image.mode == "F" and top <= 1.0:
        values = values * 255
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """CIE L*a*b* to sRGB through a colour transform (PIL's ``convert`` has no LAB -> L)."""
    from PIL import ImageCms

    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    transform = ImageCms.buildTransformFromOpenProfiles(lab, srgb, "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)  # type: ignore[return-value]


def is_upright(image: Image.Image) -> bool:
    """Whether the image needs no EXIF rotation (orientation 1, or none recorded)."""
    return image.getexif().get(0x0112, 1) == 1


def as_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` upright (its EXIF orientation applied) in ``mode`` ("L" or "RGB").

    16-bit, 32-bit and float greyscale are scaled to 8 bits (see ``_eight_bit``) rather
    than clipped at 255, which PIL's own ``convert`` does; L*a*b* goes through a colour
    transform; palette, alpha (dropped), CMYK, YCbCr and HSV convert as PIL does.

    Raises:
        ValueError: a mode PIL cannot convert to ``mode`` (e.g. premultiplied "La"),
            naming it.
    """
    if not is_upright(image):
        image = ImageOps.exif_transpose(image)
    if image.mode in (*_SIXTEEN_BIT, "I", "F"):
        image = _eight_bit(image)
    elif image.mode == "LAB":
        image = _lab_to_rgb(image)
    try:
        return image.convert(mode)  # (a copy even in the same mode: the file may close after)
    except ValueError as e:
        raise DataError(f"PIL cannot convert a mode {image.mode} image to {mode} ({e})") from None


#: The resized image :func:`resize_center_crop` may build whole, in multiples of the
#: output's pixels, when it is larger than the source (an upscale).
_WHOLE_RESIZE_LIMIT = 4


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased), then crop the centre ``size x size``.

    Its cost is bounded by the source's pixels and the output's, whatever the aspect
    ratio. The image resized whole (PIL's ``resize`` then ``crop``) is built only when
    it is no larger than the source or than 4 outputs; otherwise (an upscale of a
    long, thin image: a 1 x N image would become S x N*S) PIL resizes just the
    centre's box of the source (``resize(box=...)``), across then down as the whole
    resize does, reading only the source rows the centre needs. The two agree to 1
    level on 0.03% of pixels (PIL computes the filter's positions from the box;
    measured on 1,248 random such images), and only such images take the box.
    """
    w, h = image.size
    if min(w, h) == size:
        left, top = (w - size) // 2, (h - size) // 2
        return image.crop((left, top, left + size, top + size))
    scale = size / min(w, h)
    big_w, big_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (big_w - size) // 2, (big_h - size) // 2
    if big_w * big_h <= max(w * h, _WHOLE_RESIZE_LIMIT * size * size):
        image = image.resize((big_w, big_h), Image.Resampling.BILINEAR)
        return image.crop((left, top, left + size, top + size))
    sx, sy = w / big_w, h / big_h  # source pixels per resized pixel
    x0, x1, y0, y1 = left * sx, (left + size) * sx, top * sy, (top + size) * sy
    # The rows the vertical pass reads (the filter reaches 1 resized pixel, sy source
    # rows, past the box), resized across first, as PIL's whole resize does
    reach = max(sy, 1.0) + 1
    first, last = max(0, math.floor(y0 - reach)), min(h, math.ceil(y1 + reach))
    rows = image.crop((0, first, w, last))
    rows = rows.resize(
        (size, last - first), Image.Resampling.BILINEAR, box=(x0, 0, x1, last - first)
    )
    return rows.resize(
        (size, size), Image.Resampling.BILINEAR, box=(0, y0 - first, size, y1 - first)
    )
