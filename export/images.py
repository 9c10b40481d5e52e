"""Images to model input with PIL and numpy alone (serving machines have no PyTorch).

Files, their bytes and PIL images go through the one decode ressl trains and
evaluates folders with (``ressl.data.imagefiles.decode_to_size``): JPEGs decoded at a
reduced scale >= S, upright, converted to the model's colour mode (``"L"`` for 1
channel, ``"RGB"`` for 3), the shorter side resized to S with PIL's antialiased
bilinear filter, the centre S x S cropped. So ``ressl serve`` (bytes), ``Embedder``
(paths) and training give the same pixels bit for bit. uint8 arrays take the same
resize; they must already have the model's channel count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from ressl.data.imagefiles import (  # torch-free
    IMAGE_EXTENSIONS,
    TooManyPixels,
    decode_to_size,
    decoded_pixels,
    images_under,
    resize_center_crop,
)
from ressl.errors import InputError, first_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageInput",
    "TooManyPixels",
    "decoded_pixels",
    "image_files",
    "load_image",
    "pil_mode",
    "resize_center_crop",
    "to_batch",
]


#: One image: a file path, a file's bytes, a PIL image, uint8 (H, W[, C]) or float (C, H, W) in [0, 1].
ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias

_MODES = {1: "L", 3: "RGB"}


def pil_mode(channels: int) -> str:
    """The PIL mode images are converted to for a ``channels``-channel model ("L" or "RGB").

    Raises:
        ValueError: for other channel counts (files cannot be decoded to them).
    """
    if channels not in _MODES:
        raise InputError(
            f"the model takes {channels}-channel input; image files and PIL images can be fed only to "
            "1-channel (grey) or 3-channel (RGB) models, pass float (N, C, H, W) arrays instead"
        )
    return _MODES[channels]


def load_image(
    image: str | os.PathLike[str] | bytes | Image.Image,
    size: int,
    channels: int,
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """A file, its bytes or a PIL image as float32 ``(C, size, size)`` in [0, 1].

    Args:
        image: a path, the encoded file's bytes, or a PIL image.
        size: the model's input side S.
        channels: 1 or 3.
        max_pixels: refuse larger images (width x height as decoded) before decoding.

    Raises:
        TooManyPixels: over ``max_pixels``.
        OSError, ValueError, SyntaxError, ...: whatever PIL raises on an unreadable file;
            ValueError for a path that is not a regular file.
    """
    pixels = decode_to_size(image, size, pil_mode(channels), max_pixels=max_pixels)
    return _hwc_to_chw(np.asarray(pixels, dtype=np.uint8))


def _hwc_to_chw(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def _uint8_image(array: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 ``(H, W)`` or ``(H, W, C)`` -> float32 ``(C, size, size)``."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != channels:
        raise InputError(
            f"the model takes {channels}-channel images but a uint8 array has shape {array.shape} "
            f"({array.shape[2]} channels, read as H, W, C); pass (H, W, {channels}) arrays"
        )
    mode = pil_mode(channels)
    pil = Image.fromarray(array[:, :, 0] if channels == 1 else array, mode=mode)
    return _hwc_to_chw(np.asarray(resize_center_crop(pil, size), dtype=np.uint8))


def _float_batch(array: np.ndarray, size: int, channels: int, any_size: bool) -> np.ndarray:
    """float ``(N, C, H, W)`` in [0, 1], checked, as contiguous float32."""
    if array.shape[1] != channels:
        raise InputError(
            f"the model takes {channels}-channel images but a float array has shape {array.shape} "
            f"({array.shape[1]} channels, read as N, C, H, W); pass (N, {channels}, H, W) arrays"
        )
    if not any_size and array.shape[2:] != (size, size):
        raise InputError(
            f"the model takes {size}x{size} images but a float array is {array.shape[2]}x{array.shape[3]}; "
            "float arrays are fed unchanged: resize them, or pass uint8 (H, W, C) arrays or files"
        )
    if array.size:
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(
                f"float arrays must hold pixel values in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "pass uint8 arrays for 0..255 pixels"
            )
    return np.ascontiguousarray(array, dtype=np.float32)


def to_batch(
    images: ImageInput | Sequence[ImageInput], size: int, channels: int, *, any_size: bool = False
) -> np.ndarray:
    """Bring images of any accepted kind to one float32 ``(N, C, size, size)`` batch in [0, 1].

    Accepted: a file path, a PIL image, a uint8 array ``(H, W)``, ``(H, W, C)`` or
    ``(N, H, W, C)``, a float array ``(C, H, W)`` or ``(N, C, H, W)`` with values
    in [0, 1] (fed unchanged, no resize), or a list of any of these.

    Args:
        images: what to embed.
        size: the model's input side S.
        channels: the model's input channels C.
        any_size: accept float arrays of any H, W (models with dynamic spatial size).

    Raises:
        TypeError: on an unsupported type or dtype.
        ValueError: on a wrong shape, channel count or value range.
        OSError: when a file cannot be read or decoded.
    """
    if isinstance(images, np.ndarray):
        return _array_batch(images, size, channels, any_size)
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    if not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a path, a PIL image, a numpy array or a list of those, got {type(images).__name__}"
        )
    parts = [_one(item, size, channels, any_size) for item in images]
    if not parts:
        return np.zeros((0, channels, size, size), np.float32)
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise InputError(f"images in one call must share one size, got {sorted(shapes)}")
    return np.concatenate(parts)


def _one(item: Any, size: int, channels: int, any_size: bool) -> np.ndarray:
    if isinstance(item, np.ndarray):
        if item.ndim == 4:
            raise InputError(
                f"a list of images holds a 4-D array of shape {item.shape}; pass batches on their own"
            )
        return _array_batch(item, size, channels, any_size)
    if isinstance(item, Image.Image):
        return load_image(item, size, channels)[None]
    if isinstance(item, (str, os.PathLike, bytes)):
        pil_mode(channels)  # a model files cannot be fed to: say so before reading any
        name = "image bytes" if isinstance(item, bytes) else os.fspath(item)
        try:
            return load_image(item, size, channels)[None]
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise OSError(f"{name}: not a readable image ({unreadable_reason(e)})") from None
    raise TypeError(
        f"each image must be a path, a PIL image or a numpy array, got {type(item).__name__}"
    )


def _array_batch(array: np.ndarray, size: int, channels: int, any_size: bool) -> np.ndarray:
    if array.dtype == np.uint8:
        if array.ndim in (2, 3):
            return _uint8_image(array, size, channels)[None]
        if array.ndim == 4:
            return (
                np.stack([_uint8_image(a, size, channels) for a in array])
                if len(array)
                else (np.zeros((0, channels, size, size), np.float32))
            )
        raise InputError(
            f"uint8 arrays must be (H, W), (H, W, C) or (N, H, W, C), got shape {array.shape}"
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise InputError(
                f"float arrays must be (C, H, W) or (N, C, H, W), got shape {array.shape}"
            )
        return _float_batch(array, size, channels, any_size)
    raise TypeError(
        f"arrays must be uint8 (H, W, C) pixels or float (N, C, H, W) in [0, 1], got dtype {array.dtype}"
    )


def unreadable_reason(error: BaseException, name: str | None = None) -> str:
    """Why an image could not be read, in one line, without what PIL repeats: the file's
    ``name`` (``cannot identify image file 'x.png'``) or the file object it was handed
    (``<_io.BytesIO object at 0x...>``)."""
    text = first_line(error)
    if name:
        text = text.replace(repr(name), "").replace(name, "")
    text = re.sub(r"\s*(<[^<>]* object at 0x[0-9a-fA-F]+>|'[^']*')$", "", text).strip(" :'\"")
    return text or type(error).__name__


def image_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files to embed: files as given, folders searched recursively for images.

    In folders, regular files with an extension in ``IMAGE_EXTENSIONS`` (any case)
    count; hidden files and folders, pipes, sockets and devices are skipped, links
    followed (cycles not). Files named directly are taken whatever their extension (one
    that is not a regular file is skipped when read, with its reason). Order: arguments in order,
    each folder's files sorted; duplicates dropped.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a folder holds no image file, no path or an empty one was given.
    """
    if not paths:
        raise InputError("no input given: name image files or folders to embed")
    found: list[Path] = []
    for given in paths:
        if not os.fspath(given).strip():
            raise InputError("an empty path was given; name an image file or folder")
        p = Path(given)
        if p.is_dir():
            files = images_under(p)
            if not files:
                raise InputError(
                    f"{p}: no image file in this folder or below (accepted extensions: "
                    f"{', '.join(IMAGE_EXTENSIONS)}, any case)"
                )
            found += files
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return list(dict.fromkeys(found))
