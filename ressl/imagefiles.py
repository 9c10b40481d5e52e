"""Image files with PIL alone: which files count as images, and the evaluation resize.

No torch here, so the serving side (``ressl.export``) shares these with training
(``ressl.folders``) on machines without PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "GREY_MODES",
    "IMAGE_EXTENSIONS",
    "as_mode",
    "images_under",
    "is_image_name",
    "is_upright",
    "resize_center_crop",
]

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
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
#: Greyscale modes: a folder of these trains on one channel.
GREY_MODES = ("1", "L", "LA", "La", "I", "F", *_SIXTEEN_BIT)


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
        raise ValueError(f"PIL cannot convert a mode {image.mode} image to {mode} ({e})") from None


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased), then crop the centre ``size x size``."""
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
