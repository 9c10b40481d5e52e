"""Geometry kernels: RandomResizedCrop boxes, bilinear resized crops, flips, multi-crop scales.

Boxes follow torchvision's ``RandomResizedCrop.get_params``; resizing is bilinear,
``align_corners=False``, without antialiasing (``resized_crop(..., antialias=False)``).
The horizontal flip is folded into the crop's sampling grid: every later op commutes
with it, so this is exact and free.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ressl.errors import ConfigError
from ressl.views.checks import (
    check_generator,
    check_images,
    check_per_image,
    check_range,
    check_size,
    device_constant,
    per_image,
)

__all__ = [
    "flipped",
    "multicrop_scales",
    "random_resized_crop",
    "resample",
    "resized_crop",
    "sample_crop_boxes",
]

_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params: 10 tries, then a fallback
_CPU_CHUNK = 64 * 3 * 32 * 32  # output elements per resampling chunk on CPU


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Draws one RandomResizedCrop box per image, as ``RandomResizedCrop.get_params``.

    Vectorised: every image gets 10 candidates at once (area fraction uniform in
    ``scale``, aspect ratio w / h log-uniform in ``ratio``) and keeps the first that fits
    in the image; an image with none gets torchvision's fallback, the central crop of
    the whole image clipped to ``ratio``. Kept whole, like torchvision's, so the two
    read side by side.

    Args:
        batch: Number of boxes B.
        height: Image height H.
        width: Image width W.
        generator: Source of randomness; the boxes are on its device.
        scale: Range of the crop area as a fraction of the image, ``0 < a <= b <= 1``.
        ratio: Range of the crop aspect ratio w / h, ``0 < a <= b``.

    Returns:
        int64 (B, 4) of ``(top, left, h, w)`` in pixels.

    Raises:
        ValueError: If ``scale`` or ``ratio`` is not a valid range.
    """
    scale = check_range("scale", scale, high=1.0)
    ratio = check_range("ratio", ratio)
    for name, value, least in (("batch", batch, 0), ("height", height, 1), ("width", width, 1)):
        if not isinstance(value, numbers.Integral) or value < least:
            raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = torch.device(generator.device)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    area = rand(batch, _CROP_TRIES) * (scale[1] - scale[0]) + scale[0]
    area *= height * width  # (B, T) candidate areas in pixels
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(rand(batch, _CROP_TRIES) * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, T)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax gives the first max
    found = fits.any(dim=1)

    if width / height < ratio[0]:
        fb_h, fb_w = round(width / ratio[0]), width
    elif width / height > ratio[1]:
        fb_h, fb_w = height, round(height * ratio[1])
    else:
        fb_h, fb_w = height, width
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fb_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fb_w))
    # offsets uniform over the valid positions; minimum() guards float32 rand * n == n
    top = torch.minimum((rand(batch) * (height - h + 1)).floor_(), height - h)
    left = torch.minimum((rand(batch) * (width - w + 1)).floor_(), width - w)
    top = torch.where(found, top, float((height - fb_h) // 2))
    left = torch.where(found, left, float((width - fb_w) // 2))
    return torch.stack((top, left, h, w), dim=1).to(torch.int64)


def _grid_coords(start: Tensor, length: Tensor, size: int, full: tuple[int, int]) -> Tensor:
    """(B, 2, size) grid_sample coordinates of torch's bilinear resize of a crop, rows then
    columns: ``start`` and ``length`` (B, 2) are the box's (top, left) and (h, w) in an
    image of ``full`` = (H, W).

    Source pixel of output ``u`` is ``(u + 0.5) * length / size - 0.5`` clamped to the
    crop (as F.interpolate clamps to the input), then mapped to [-1, 1] for
    ``align_corners=False``.
    """
    centres = tuple(u + 0.5 for u in range(size))  # output pixel centres, exact in float32
    dst = device_constant(centres, start.device, torch.float32)
    src = dst * (length / size)[..., None] - 0.5
    src = torch.minimum(src.clamp_(min=0.0), (length - 1)[..., None]) + start[..., None]
    to_unit = tuple(2.0 / n for n in full), tuple(1.0 / n - 1.0 for n in full)
    scale, shift = (device_constant(v, start.device, torch.float32)[:, None] for v in to_unit)
    return src.mul_(scale).add_(shift)


def resized_crop(images: Tensor, boxes: Tensor, size: int, *, flip: Tensor | None = None) -> Tensor:
    """Crops a box per image, resizes it bilinearly to ``size`` and optionally flips it.

    Equal, to float rounding, to torchvision's
    ``resized_crop(img, top, left, h, w, [size, size], antialias=False)`` per image
    (uint8 scaled to [0, 1]), followed by a horizontal flip where ``flip`` is True.

    Args:
        images: uint8, or float in [0, 1], (B, C, H, W).
        boxes: int (B, 4) of ``(top, left, h, w)``, each box inside its image.
        size: Output height and width.
        flip: Optional bool (B,); True flips that image horizontally.

    Returns:
        float32 (B, C, size, size) in [0, 1].

    Raises:
        ValueError: On bad shapes.
    """
    images = check_images(images)
    size = check_size(size)
    b = images.shape[0]
    if not isinstance(boxes, Tensor) or boxes.shape != (b, 4):
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a tensor of shape ({b}, 4), got {shape}")
    if flip is not None:
        flip = check_per_image("flip", flip, b)
    out = resample(images, boxes, size, flip)
    return out.mul_(1.0 / 255.0) if images.dtype == torch.uint8 else out


def resample(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None) -> Tensor:
    """resized_crop without the uint8 scaling: float32 in the input's value range."""
    b, c, height, width = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    gy, gx = _grid_coords(boxes[:, :2], boxes[:, 2:], size, (height, width)).unbind(1)  # (B, size)
    if flip is not None:
        gx = torch.where(flip.to(images.device)[:, None], gx.flip(1), gx)
    # On CPU, run in chunks whose temporaries stay in L2 and below the allocator's
    # trim threshold: batch-sized temporaries cost more in page faults than the
    # resampling itself (256x3x32x32: 5 ms -> 1.8 ms on one core). grid_sample beat
    # per-image interpolation matmuls and roi_align there.
    step = b if images.device.type != "cpu" else max(1, _CPU_CHUNK // (c * size * size))
    if step >= b:
        return _grid_sample(images, gx, gy)
    out = images.new_empty((b, c, size, size), dtype=torch.float32)
    for i in range(0, b, step):
        out[i : i + step] = _grid_sample(images[i : i + step], gx[i : i + step], gy[i : i + step])
    return out


def _grid_sample(images: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    n, size = gx.shape
    grid = torch.stack(
        (gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), 3
    )
    return F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def random_resized_crop(
    images: Tensor,
    size: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """RandomResizedCrop with an independent box per image (see ``sample_crop_boxes``).

    Args:
        images: uint8, or float in [0, 1], (B, C, H, W) with C in {1, 3}.
        size: Output height and width.
        generator: Source of randomness, on the device of ``images``.
        scale: Crop area fraction range, ``0 < a <= b <= 1``.
        ratio: Crop aspect ratio range, ``0 < a <= b``.

    Returns:
        float32 (B, C, size, size) in [0, 1].

    Raises:
        TypeError: If ``images`` or ``generator`` has the wrong type.
        ValueError: On bad shapes or ranges, or a generator on another device.
    """
    images = check_images(images)
    size = check_size(size)
    generator = check_generator(generator, images.device)
    b, _, height, width = images.shape
    boxes = sample_crop_boxes(b, height, width, generator=generator, scale=scale, ratio=ratio)
    return resized_crop(images, boxes, size)


def flipped(images: Tensor, size: int, flip: Tensor) -> Tensor:
    """Pre-cropped ``(B, C, size, size)`` images as float32 in [0, 1], flipped where ``flip``."""
    if images.shape[2:] != (size, size):
        raise ConfigError(
            f"with crop=False the images must already be {size}x{size} (cropped elsewhere, e.g. in "
            f"DataLoader workers), got {tuple(images.shape[2:])}; pass crop=True to crop here"
        )
    x = images.float()
    if images.dtype == torch.uint8:
        x = x.mul_(1.0 / 255.0)
    return torch.where(per_image(flip.to(x.device)), x.flip(3), x)


def multicrop_scales(
    sizes: Sequence[int], full_size: int, scale: tuple[float, float] = (0.2, 1.0)
) -> list[tuple[float, float]]:
    """RandomResizedCrop area ranges for multi-crop, as in the paper: ``scale * size / full_size``.

    The paper's ImageNet crops 224, 192, 160, 128, 96 get (0.2, 1), (0.171, 0.857),
    (0.143, 0.714), (0.114, 0.571), (0.086, 0.429): each range shrinks with the crop's
    side, so smaller crops see smaller parts of the image.

    Args:
        sizes: Crop sides, each in ``[1, full_size]``.
        full_size: The full (teacher) crop side.
        scale: The full-size crop's area range.

    Returns:
        One ``(lo, hi)`` range per size.

    Raises:
        ValueError: On an empty ``sizes``, a size outside ``[1, full_size]`` or a bad ``scale``.
    """
    full_size = check_size(full_size)
    scale = check_range("scale", scale, high=1.0)
    if not sizes:
        raise ConfigError("sizes must hold at least one crop size")
    out: list[tuple[float, float]] = []
    for size in sizes:
        if not isinstance(size, numbers.Integral) or not 1 <= size <= full_size:
            raise ConfigError(f"each crop size must be an int in [1, {full_size}], got {size!r}")
        r = int(size) / full_size
        out.append((scale[0] * r, scale[1] * r))
    return out
