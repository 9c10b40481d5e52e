"""Image files with PIL alone: which files count as images, and the evaluation resize.

No torch here, so the serving side (``ressl.export``) shares these with training
(``ressl.folders``) on machines without PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "as_mode", "images_under", "is_image_name", "resize_center_crop"]

#: File extensions (lower case) read from image folders; matching is case-insensitive.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    """A visible file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(top: Path) -> list[Path]:
    """Image files anywhere under ``top``, sorted (links followed, cycles and hidden entries not)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if is_image_name(f)]
    return sorted(found)


#: Modes whose values go up to 65535 (16-bit PNG and TIFF greyscale): scaled, not clipped.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` upright (its EXIF orientation applied) in ``mode`` ("L" or "RGB").

    16-bit greyscale is scaled to 8 bits (``/ 257``, rounded) rather than clipped at 255,
    which PIL's own ``convert`` does; palette, alpha, CMYK and the rest convert as PIL does.
    """
    if image.getexif().get(0x0112, 1) != 1:  # an orientation other than "upright"
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), "L")
    return image.convert(mode)  # (a copy even in the same mode: the file may close after)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased), then crop the centre ``size x size``."""
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
