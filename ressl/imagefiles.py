"""Image files with PIL alone: which files count as images, and the evaluation resize.

No torch here, so the serving side (``ressl.export``) shares these with training
(``ressl.folders``) on machines without PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "images_under", "is_image_name", "resize_center_crop"]

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


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased), then crop the centre ``size x size``."""
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
