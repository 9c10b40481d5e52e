"""Weak and strong views of ReSSL as batched tensor ops with per-sample randomness.

ReSSL (Zheng et al., NeurIPS 2021, arXiv:2107.09282) feeds the teacher a *weak* view
(RandomResizedCrop + horizontal flip) and the student a *strong*, MoCo-v2 style view
(RandomResizedCrop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale p 0.2,
optional GaussianBlur, horizontal flip). This module builds both for a whole batch at
once, on whatever device holds the batch, with every random parameter drawn per image
from an explicitly passed ``torch.Generator`` (never the global RNG).

Distributions and formulas follow torchvision: crop boxes as
``RandomResizedCrop.get_params``; jitter factors, the per-image random order of the four
jitter ops and the ops themselves as ``torchvision.transforms.v2.functional.adjust_*``
(clamped to [0, 1] after each); the blur as ``gaussian_blur`` (reflect padding).
Resizing is bilinear, ``align_corners=False``, without antialiasing, i.e.
``resized_crop(..., antialias=False)``. Outputs agree with torchvision to ~1e-6.

The horizontal flip is folded into the crop's sampling grid: every later op commutes
with it (colour ops act per pixel or on image means; the blur kernel is symmetric and
padding reflects), so this is exact and free.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    >>> strong_view(x, size=32, mean=mean, std=std, generator=g).shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "adjust_brightness",
    "adjust_colors",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "color_jitter",
    "gaussian_blur",
    "multicrop_scales",
    "normalize",
    "random_grayscale",
    "random_resized_crop",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "sample_jitter_params",
    "strong_view",
    "weak_view",
]

_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params: 10 tries, then a fallback
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_CPU_CHUNK = 64 * 3 * 32 * 32  # output elements per resampling chunk on CPU


# --------------------------------------------------------------------------- validation


def _check_images(images: object, *, float_only: bool = False) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or 0 in images.shape[2:]:
        raise ValueError(
            f"images must have shape (B, C, H, W) with C in {{1, 3}} and H, W >= 1, "
            f"got {tuple(images.shape)}"
        )
    if not (images.is_floating_point() or (images.dtype == torch.uint8 and not float_only)):
        valid = "a floating dtype in [0, 1]" if float_only else "uint8 or a floating dtype"
        raise TypeError(f"images must be {valid}, got dtype {images.dtype}")
    return images


def _check_generator(generator: object, device: torch.device) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator on {device}, got {type(generator).__name__}"
        )
    gdev = torch.device(generator.device)
    if gdev.type != device.type or (gdev.index or 0) != (device.index or 0):
        raise ValueError(
            f"generator is on {gdev} but images are on {device}; pass "
            f"torch.Generator(device={str(device)!r})"
        )
    return generator


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_size(size: object) -> int:
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    return int(size)


def _check_prob(name: str, p: object) -> float:
    if not _is_number(p) or not 0.0 <= p <= 1.0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)  # type: ignore[arg-type]


def _check_range(name: str, value: object, *, high: float = math.inf) -> tuple[float, float]:
    ok = isinstance(value, Sequence) and len(value) == 2 and all(map(_is_number, value))
    if not ok or not 0 < value[0] <= value[1] <= high:  # type: ignore[index]
        rule = "0 < a <= b" + ("" if high == math.inf else f" <= {high:g}")
        raise ValueError(f"{name} must be a pair (a, b) with {rule}, got {value!r}")
    return float(value[0]), float(value[1])  # type: ignore[index]


def _check_jitter(jitter: object) -> tuple[float, float, float, float]:
    ok = isinstance(jitter, Sequence) and len(jitter) == 4 and all(map(_is_number, jitter))
    if not ok or min(jitter[:3]) < 0 or not 0 <= jitter[3] <= 0.5:  # type: ignore[index]
        raise ValueError(
            "jitter must be (brightness, contrast, saturation, hue) with the first three "
            f">= 0 and hue in [0, 0.5], got {jitter!r}"
        )
    b, c, s, h = (float(v) for v in jitter)  # type: ignore[attr-defined]
    return b, c, s, h


def _check_channel_stats(name: str, values: object, channels: int) -> list[float]:
    if not isinstance(values, Sequence) or not all(map(_is_number, values)):
        raise TypeError(f"{name} must be a sequence of {channels} numbers, got {values!r}")
    if len(values) != channels:
        raise ValueError(
            f"{name} has {len(values)} values but images have {channels} channel(s); "
            f"pass one value per channel"
        )
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be > 0 for every channel, got {values!r}")
    return [float(v) for v in values]


def _check_per_image(name: str, values: object, batch: int) -> Tensor:
    if not isinstance(values, Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a tensor of shape ({batch},), one per image, got {shape}")
    return values


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), broadcasts over C, H, W


# --------------------------------------------------------------------------- crop + resize


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
    the whole image clipped to ``ratio``.

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
    scale = _check_range("scale", scale, high=1.0)
    ratio = _check_range("ratio", ratio)
    for name, value, least in (("batch", batch, 0), ("height", height, 1), ("width", width, 1)):
        if not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
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


def _grid_coords(start: Tensor, length: Tensor, size: int, full: int) -> Tensor:
    """(B, size) grid_sample coordinates of torch's bilinear resize of a crop.

    Source pixel of output ``u`` is ``(u + 0.5) * length / size - 0.5`` clamped to the
    crop (as F.interpolate clamps to the input), then mapped to [-1, 1] for
    ``align_corners=False``.
    """
    dst = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    src = dst * (length / size)[:, None] - 0.5
    src = torch.minimum(src.clamp_(min=0.0), (length - 1)[:, None]) + start[:, None]
    return src.mul_(2.0 / full).add_(1.0 / full - 1.0)


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
    images = _check_images(images)
    size = _check_size(size)
    b = images.shape[0]
    if not isinstance(boxes, Tensor) or boxes.shape != (b, 4):
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a tensor of shape ({b}, 4), got {shape}")
    if flip is not None:
        flip = _check_per_image("flip", flip, b)
    out = _resample(images, boxes, size, flip)
    return out.mul_(1.0 / 255.0) if images.dtype == torch.uint8 else out


def _resample(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None) -> Tensor:
    """resized_crop without the uint8 scaling: float32 in the input's value range."""
    b, c, height, width = images.shape
    top, left, h, w = boxes.to(device=images.device, dtype=torch.float32).unbind(1)
    gy = _grid_coords(top, h, size, height)  # (B, size)
    gx = _grid_coords(left, w, size, width)
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
    images = _check_images(images)
    size = _check_size(size)
    generator = _check_generator(generator, images.device)
    b, _, height, width = images.shape
    boxes = sample_crop_boxes(b, height, width, generator=generator, scale=scale, ratio=ratio)
    return resized_crop(images, boxes, size)


def _coin(batch: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(batch, generator=generator, device=device) < p  # (B,) bool


def _flipped(images: Tensor, size: int, flip: Tensor) -> Tensor:
    """Pre-cropped ``(B, C, size, size)`` images as float32 in [0, 1], flipped where ``flip``."""
    if images.shape[2:] != (size, size):
        raise ValueError(
            f"with crop=False the images must already be {size}x{size} (cropped elsewhere, e.g. in "
            f"DataLoader workers), got {tuple(images.shape[2:])}; pass crop=True to crop here"
        )
    x = images.float()
    if images.dtype == torch.uint8:
        x = x.mul_(1.0 / 255.0)
    return torch.where(_per_image(flip.to(x.device)), x.flip(3), x)


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
    full_size = _check_size(full_size)
    scale = _check_range("scale", scale, high=1.0)
    if not sizes:
        raise ValueError("sizes must hold at least one crop size")
    out: list[tuple[float, float]] = []
    for size in sizes:
        if not isinstance(size, numbers.Integral) or not 1 <= size <= full_size:
            raise ValueError(f"each crop size must be an int in [1, {full_size}], got {size!r}")
        r = int(size) / full_size
        out.append((scale[0] * r, scale[1] * r))
    return out


# --------------------------------------------------------------------------- colour ops
# In-place kernels (trailing underscore) do the work on tensors this module owns; the
# public functions run them on a copy.


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``, torchvision's ``rgb_to_grayscale``.

    Args:
        images: float (B, C, H, W); C == 1 is returned as is.

    Returns:
        float (B, 1, H, W).
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend_(
    x: Tensor, factor: Tensor, *, contrast: Tensor | None = None, saturation: Tensor | None = None
) -> Tensor:
    """In place ``x <- clamp(f x + (1 - f) ref, 0, 1)``, torchvision's ``_blend``.

    ``ref`` per image is 0 (brightness), the mean grey level where ``contrast`` is True,
    or the grey image where ``saturation`` is True (bool (B,) masks, at most one True per
    image). A factor of 1 leaves an image exactly as it is.
    """
    f = _per_image(factor)
    if contrast is None and saturation is None:
        return x.mul_(f).clamp_(0.0, 1.0)
    grey = rgb_to_grayscale(x)  # (B, 1, H, W); x itself when C == 1
    ref: Tensor = torch.zeros((), device=x.device, dtype=x.dtype)
    if contrast is not None:
        ref = _per_image(grey.mean(dim=(1, 2, 3)) * contrast.to(x.dtype))  # (B, 1, 1, 1)
    if saturation is not None and x.shape[1] == 3:
        ref = grey.mul_(_per_image(saturation.to(x.dtype))).add_(ref)  # grey is fresh here
    # lerp: x + (1 - f) (ref - x), one pass instead of two; exactly x where f == 1
    return x.lerp_(ref.expand_as(x), 1.0 - f).clamp_(0.0, 1.0)


def _hue_(x: Tensor, factor: Tensor) -> Tensor:
    # Closed form of torchvision's RGB -> HSV -> shift hue -> RGB. With V = max,
    # chroma = max - min and t_c = (V - x_c) / chroma, the hue in sextants is
    # t_b - t_g, 2 + t_r - t_b or 4 + t_g - t_r where R, G or B is the max (ties: R, then
    # G); after the shift h, channel c is V - chroma * clamp(2 - dist(h, a_c), 0, 1) with
    # dist on the circle of length 6 and a = (3, 5, 1). Float arithmetic only: bool
    # kernels (==, where) run ~20x slower than float ones on CPU.
    if x.shape[1] == 1:
        return x
    maxc = x.amax(dim=1, keepdim=True)  # (B, 1, H, W)
    chroma = maxc - x.amin(dim=1, keepdim=True)
    inv = chroma.clamp(min=1e-12).reciprocal_()  # chroma == 0: grey, the hue is moot
    t = (maxc - x).mul_(inv)  # (B, 3, H, W) in [0, 1]; 0 where the channel is the max
    t_r, t_g, t_b = t.unbind(1)
    is_r = 1.0 - torch.sign(t_r)  # 1.0 where R is the max
    is_g = (1.0 - torch.sign(t_g)).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hue = (t_b - t_g).mul_(is_r)
    hue.addcmul_(t_r - t_b + 2.0, is_g).addcmul_(t_g - t_r + 4.0, is_b)  # (B, H, W)
    hue += (6.0 * factor).view(-1, 1, 1)  # the rotation, in sextants
    anchors = torch.tensor([3.0, 5.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    u = hue.unsqueeze(1) - anchors  # (B, 3, H, W)
    dist = u.sub_(torch.round(u * (1.0 / 6.0)).mul_(6.0)).abs_()  # circular, in [0, 3]
    ramp = dist.neg_().add_(2.0).clamp_(0.0, 1.0)
    return torch.addcmul(maxc, chroma, ramp, value=-1.0, out=x)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image ``clamp(x * factor, 0, 1)``, torchvision's ``adjust_brightness``.

    Args:
        images: float (B, C, H, W) in [0, 1].
        factor: float (B,), >= 0.

    Returns:
        float (B, C, H, W), a new tensor.
    """
    return _blend_(images.clone(), _check_per_image("factor", factor, images.shape[0]))


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image blend with the image's mean grey level, torchvision's ``adjust_contrast``.

    Args:
        images: float (B, C, H, W) in [0, 1].
        factor: float (B,), >= 0; 0 gives a uniform grey image, 1 the input.

    Returns:
        float (B, C, H, W), a new tensor.
    """
    factor = _check_per_image("factor", factor, images.shape[0])
    every = torch.ones_like(factor, dtype=torch.bool)
    return _blend_(images.clone(), factor, contrast=every)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image blend with the grey image, torchvision's ``adjust_saturation``.

    Args:
        images: float (B, C, H, W) in [0, 1]; C == 1 is left unchanged.
        factor: float (B,), >= 0; 0 gives grey, 1 the input.

    Returns:
        float (B, C, H, W), a new tensor.
    """
    factor = _check_per_image("factor", factor, images.shape[0])
    if images.shape[1] == 1:
        return images.clone()
    every = torch.ones_like(factor, dtype=torch.bool)
    return _blend_(images.clone(), factor, saturation=every)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image hue rotation by ``factor`` turns, torchvision's ``adjust_hue``.

    Args:
        images: float (B, C, H, W) in [0, 1]; C == 1 is left unchanged.
        factor: float (B,) in [-0.5, 0.5].

    Returns:
        float (B, C, H, W), a new tensor.
    """
    return _hue_(images.clone(), _check_per_image("factor", factor, images.shape[0]))


def adjust_colors(
    images: Tensor,
    factors: Tensor,
    order: Tensor,
    *,
    apply: Tensor | None = None,
    enabled: Sequence[bool] = (True, True, True, True),
) -> Tensor:
    """Brightness, contrast, saturation and hue, in an order chosen per image.

    Image ``b`` gets op ``order[b, 0]``, then ``order[b, 1]``, ... of (0 brightness,
    1 contrast, 2 saturation, 3 hue) with factor ``factors[b, op]``: torchvision's
    ``ColorJitter`` with fixed parameters.

    Args:
        images: float (B, C, H, W) in [0, 1].
        factors: float (B, 4): brightness, contrast, saturation (>= 0), hue ([-0.5, 0.5]).
        order: int (B, 4), each row a permutation of 0..3.
        apply: Optional bool (B,); False leaves that image as it is.
        enabled: Per op, False skips it for every image (an op of strength 0).

    Returns:
        float (B, C, H, W), a new tensor.

    Raises:
        ValueError: If ``factors`` or ``order`` is not (B, 4).
    """
    images = _check_images(images, float_only=True)
    b = images.shape[0]
    if factors.shape != (b, 4) or order.shape != (b, 4):
        raise ValueError(
            f"factors and order must have shape ({b}, 4), got {tuple(factors.shape)} "
            f"and {tuple(order.shape)}"
        )
    if apply is not None:
        apply = _check_per_image("apply", apply, b)
    return _adjust_colors_(images.clone(), factors, order, apply, enabled)


def _adjust_colors_(
    x: Tensor,
    factors: Tensor,
    order: Tensor,
    apply: Tensor | None,
    enabled: Sequence[bool],
    *,
    gather_hue: bool | None = None,
) -> Tensor:
    # At each of the 4 steps every image has one op due. Brightness, contrast and
    # saturation are all blends, so one in-place blend over the whole batch serves them
    # (factor 1, an exact identity, for images whose op is another); hue runs only on the
    # images whose hue is due, gathered. Same results as a loop over images, with no
    # batch-sized temporaries (on CPU each costs page faults, more than the arithmetic).
    # Gathering needs the per-step counts on the host, a sync; on accelerators hue runs
    # instead on the whole batch at every step and is kept only where due (no sync).
    b, device = x.shape[0], x.device
    if gather_hue is None:
        gather_hue = device.type == "cpu"
    order = order.to(device=device, dtype=torch.int64)
    factors = factors.to(device=device, dtype=x.dtype)
    todo = torch.ones(b, dtype=torch.bool, device=device) if apply is None else apply.to(device)
    on = [bool(e) for e in enabled]
    if x.shape[1] == 1:  # saturation and hue leave grey images unchanged
        on[2] = on[3] = False
    blends = [op for op in range(3) if on[op]]
    on_t = torch.tensor(on, device=device)
    hue_counts = [0] * 5  # images whose hue is due at step 0, 1, 2, 3, never
    if on[3]:
        hue_step = torch.where(todo, (order == 3).to(torch.uint8).argmax(dim=1), 4)  # (B,)
        if gather_hue:
            by_step = torch.argsort(hue_step, stable=True)
            hue_counts = torch.bincount(hue_step, minlength=5).tolist()  # the one host sync
    for step in range(4):
        op = order[:, step]  # (B,)
        if blends:
            due = todo & on_t[op] & (op < 3)
            f = torch.where(due, factors.gather(1, op[:, None]).squeeze(1), 1.0)
            contrast = due & (op == 1) if 1 in blends else None
            saturation = due & (op == 2) if 2 in blends else None
            _blend_(x, f, contrast=contrast, saturation=saturation)
        if on[3] and not gather_hue:
            due_hue = _per_image((hue_step == step).to(x.dtype))  # (B, 1, 1, 1)
            x.lerp_(_hue_(x.clone(), factors[:, 3]), due_hue)  # exactly x where not due
        elif hue_counts[step]:
            start = sum(hue_counts[:step])
            idx = by_step[start : start + hue_counts[step]]
            x.index_copy_(0, idx, _hue_(x.index_select(0, idx), factors[idx, 3]))
    return x


def sample_jitter_params(
    batch: int,
    *,
    generator: torch.Generator,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
) -> tuple[Tensor, Tensor]:
    """Draws ColorJitter parameters per image, as torchvision's ``ColorJitter``.

    Args:
        batch: Number of images B.
        generator: Source of randomness; the parameters are on its device.
        jitter: Strengths (brightness, contrast, saturation, hue).

    Returns:
        ``factors``, float32 (B, 4): brightness, contrast and saturation uniform in
        ``[max(0, 1 - x), 1 + x]``, hue uniform in ``[-hue, hue]``; and ``order``, int64
        (B, 4): a uniformly random permutation of the 4 ops per image. Feed both to
        ``adjust_colors``.

    Raises:
        ValueError: On bad strengths.
    """
    jitter = _check_jitter(jitter)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = torch.device(generator.device)
    lo = torch.tensor([max(0.0, 1.0 - j) for j in jitter[:3]] + [-jitter[3]], device=device)
    hi = torch.tensor([1.0 + j for j in jitter[:3]] + [jitter[3]], device=device)
    factors = torch.rand(batch, 4, generator=generator, device=device) * (hi - lo) + lo
    order = torch.argsort(torch.rand(batch, 4, generator=generator, device=device), dim=1)
    return factors, order


def color_jitter(
    images: Tensor,
    *,
    generator: torch.Generator,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    p: float = 1.0,
) -> Tensor:
    """``RandomApply([ColorJitter(*jitter)], p)`` with independent parameters per image.

    Factors are uniform in ``[max(0, 1 - x), 1 + x]`` for brightness, contrast and
    saturation and in ``[-hue, hue]`` for hue; each image draws its own op order.

    Args:
        images: float (B, C, H, W) in [0, 1].
        generator: Source of randomness, on the device of ``images``.
        jitter: Strengths (brightness, contrast, saturation, hue).
        p: Probability that an image is jittered at all.

    Returns:
        float (B, C, H, W) in [0, 1], a new tensor.

    Raises:
        TypeError: If ``images`` or ``generator`` has the wrong type.
        ValueError: On bad shapes, strengths or ``p``, or a generator on another device.
    """
    images = _check_images(images, float_only=True)
    generator = _check_generator(generator, images.device)
    jitter, p = _check_jitter(jitter), _check_prob("p", p)
    factors, order = sample_jitter_params(images.shape[0], generator=generator, jitter=jitter)
    apply = _coin(images.shape[0], p, generator, images.device)
    return adjust_colors(images, factors, order, apply=apply, enabled=[j > 0 for j in jitter])


def random_grayscale(images: Tensor, *, generator: torch.Generator, p: float = 0.2) -> Tensor:
    """``RandomGrayscale(p)``: each image independently turns grey with probability ``p``.

    Args:
        images: float (B, C, H, W); C == 1 is returned as is, drawing no randomness.
        generator: Source of randomness, on the device of ``images``.
        p: Probability per image.

    Returns:
        float (B, C, H, W); grey images have C equal channels.

    Raises:
        TypeError: If ``images`` or ``generator`` has the wrong type.
        ValueError: On a bad shape or ``p``, or a generator on another device.
    """
    images = _check_images(images, float_only=True)
    generator = _check_generator(generator, images.device)
    p = _check_prob("p", p)
    if images.shape[1] == 1 or p == 0:
        return images
    grey = _per_image(_coin(images.shape[0], p, generator, images.device))
    return torch.where(grey, rgb_to_grayscale(images), images)


# --------------------------------------------------------------------------- blur


def blur_kernel_size(size: int) -> int:
    """Odd kernel size of about 10% of the image side, as SimCLR: 32 -> 3, 224 -> 23."""
    return int(0.1 * size) // 2 * 2 + 1


def gaussian_blur(images: Tensor, sigma: Tensor, *, kernel_size: int) -> Tensor:
    """Gaussian blur with a sigma per image and reflect padding.

    Equal, to float rounding, to torchvision's ``gaussian_blur(img, [k, k], [s, s])``
    per image; computed separably as two grouped convolutions.

    Args:
        images: float (B, C, H, W) with ``kernel_size // 2 < min(H, W)``.
        sigma: float (B,), > 0; a tiny sigma (1e-6) makes the blur an identity.
        kernel_size: Odd, >= 1.

    Returns:
        float (B, C, H, W).

    Raises:
        ValueError: On a bad ``kernel_size`` or shape.
    """
    images = _check_images(images, float_only=True)
    b, _, height, width = images.shape
    sigma = _check_per_image("sigma", sigma, b)
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if kernel_size // 2 >= min(height, width):
        raise ValueError(
            f"kernel_size {kernel_size} needs images larger than {kernel_size // 2} pixels "
            f"(reflect padding), got {height}x{width}"
        )
    if not bool((sigma > 0).all()):  # a device sync, but a zero sigma would give NaNs
        raise ValueError(f"sigma must be > 0 for every image, got min {sigma.min().item()}")
    return _gaussian_blur(images, sigma, kernel_size)


def _gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    b, c, height, width = images.shape
    half = kernel_size // 2
    if half == 0:
        return images
    sigma = sigma.to(device=images.device, dtype=images.dtype)
    taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.softmax(-0.5 * (taps / sigma[:, None]) ** 2, dim=1)  # (B, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k): one group per image channel
    x = F.pad(images, (half, half, half, half), mode="reflect")
    x = x.reshape(1, b * c, height + 2 * half, width + 2 * half)
    x = F.conv2d(x, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.view(b, c, height, width)


def _random_blur(
    images: Tensor, p: float, sigma_range: tuple[float, float], generator: torch.Generator
) -> Tensor:
    b, device = images.shape[0], images.device
    kernel_size = blur_kernel_size(images.shape[-1])
    if p == 0 or kernel_size == 1:
        return images
    sigma = torch.rand(b, generator=generator, device=device)
    sigma = sigma * (sigma_range[1] - sigma_range[0]) + sigma_range[0]
    blur = _coin(b, p, generator, device)
    # unblurred images get a delta kernel (identity, to float rounding) instead of a subset
    sigma = torch.where(blur, sigma, 1e-6)
    return _gaussian_blur(images, sigma, kernel_size)


# --------------------------------------------------------------------------- views


def normalize(
    images: Tensor, mean: Sequence[float], std: Sequence[float], *, input_scale: float = 1.0
) -> Tensor:
    """Per channel ``(x * input_scale - mean) / std``, in one pass.

    Args:
        images: float (or uint8 with ``input_scale=1 / 255``) (B, C, H, W).
        mean: C values.
        std: C values, all > 0.
        input_scale: Multiplies the input first (``1 / 255`` for uint8-range floats).

    Returns:
        float32 (B, C, H, W), a new tensor.

    Raises:
        TypeError: If ``mean`` or ``std`` is not a sequence of numbers.
        ValueError: If ``mean`` or ``std`` does not have C values, or ``std <= 0``.
    """
    c = _check_images(images).shape[1]
    scale, shift = _affine(mean, std, c, input_scale, images.device)
    return torch.addcmul(shift, images.float(), scale)


def _affine(
    mean: Sequence[float], std: Sequence[float], c: int, input_scale: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    m = torch.tensor(_check_channel_stats("mean", mean, c), device=device)
    s = torch.tensor(_check_channel_stats("std", std, c), device=device)
    return (input_scale / s).view(1, c, 1, 1), (-m / s).view(1, c, 1, 1)


def _normalize_(
    x: Tensor, mean: Sequence[float], std: Sequence[float], input_scale: float = 1.0
) -> Tensor:
    scale, shift = _affine(mean, std, x.shape[1], input_scale, x.device)
    return x.mul_(scale).add_(shift)


def weak_view(
    images: Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    flip_p: float = 0.5,
    crop: bool = True,
) -> Tensor:
    """ReSSL's teacher view: RandomResizedCrop, RandomHorizontalFlip, Normalize.

    Args:
        images: uint8, or float in [0, 1], (B, C, H, W) with C in {1, 3}.
        size: Output height and width.
        mean: Normalisation mean, one value per channel.
        std: Normalisation std, one value per channel.
        generator: Source of randomness, on the device of ``images``.
        scale: Crop area fraction range, ``0 < a <= b <= 1``; aspect ratio in [3/4, 4/3].
        flip_p: Probability of a horizontal flip.
        crop: ``False`` when the images were already randomly cropped to ``size``
            (e.g. in DataLoader workers, from the full-resolution files): only
            flip and normalise here; ``scale`` is then unused.

    Returns:
        float32 (B, C, size, size), normalised.

    Raises:
        TypeError: If ``images``, ``generator``, ``mean`` or ``std`` has the wrong type.
        ValueError: On bad shapes, ranges, probabilities, mean/std, or a generator on
            another device.
    """
    images = _check_images(images)
    size, flip_p = _check_size(size), _check_prob("flip_p", flip_p)
    generator = _check_generator(generator, images.device)
    _check_channel_stats("mean", mean, images.shape[1])
    _check_channel_stats("std", std, images.shape[1])
    b, _, height, width = images.shape
    if not crop:
        flip = _coin(b, flip_p, generator, images.device)
        return _normalize_(_flipped(images, size, flip), mean, std)
    boxes = sample_crop_boxes(b, height, width, generator=generator, scale=scale)
    flip = _coin(b, flip_p, generator, images.device)
    input_scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    return _normalize_(_resample(images, boxes, size, flip), mean, std, input_scale)


def strong_view(
    images: Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.0,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    flip_p: float = 0.5,
    crop: bool = True,
) -> Tensor:
    """ReSSL's student view (MoCo v2): crop, jitter, grayscale, blur, flip, normalise.

    Per image and independently: RandomResizedCrop(size, scale); ColorJitter(*jitter)
    with probability ``jitter_p``, in a random op order; RandomGrayscale(grayscale_p);
    GaussianBlur(``blur_kernel_size(size)``, sigma uniform in ``blur_sigma``) with
    probability ``blur_p``; RandomHorizontalFlip(flip_p); Normalize(mean, std). The
    paper blurs with p 0.5 on ImageNet; small datasets usually skip it (the default).

    Args:
        images: uint8, or float in [0, 1], (B, C, H, W) with C in {1, 3}.
        size: Output height and width.
        mean: Normalisation mean, one value per channel.
        std: Normalisation std, one value per channel.
        generator: Source of randomness, on the device of ``images``.
        scale: Crop area fraction range, ``0 < a <= b <= 1``; aspect ratio in [3/4, 4/3].
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue).
        jitter_p: Probability of colour jitter.
        grayscale_p: Probability of grayscale (nothing to do when C == 1).
        blur_p: Probability of Gaussian blur.
        blur_sigma: Range of the blur's sigma, ``0 < a <= b``.
        flip_p: Probability of a horizontal flip.
        crop: ``False`` when the images were already randomly cropped to ``size``
            (e.g. in DataLoader workers): no crop here, the rest as above.

    Returns:
        float32 (B, C, size, size), normalised.

    Raises:
        TypeError: If ``images``, ``generator``, ``mean`` or ``std`` has the wrong type.
        ValueError: On bad shapes, ranges, probabilities, mean/std, or a generator on
            another device.
    """
    images = _check_images(images)
    size = _check_size(size)
    generator = _check_generator(generator, images.device)
    jitter = _check_jitter(jitter)
    jitter_p = _check_prob("jitter_p", jitter_p)
    grayscale_p = _check_prob("grayscale_p", grayscale_p)
    blur_p = _check_prob("blur_p", blur_p)
    flip_p = _check_prob("flip_p", flip_p)
    blur_sigma = _check_range("blur_sigma", blur_sigma)
    _check_channel_stats("mean", mean, images.shape[1])
    _check_channel_stats("std", std, images.shape[1])
    b, _, height, width = images.shape
    device = images.device

    if crop:
        boxes = sample_crop_boxes(b, height, width, generator=generator, scale=scale)
        flip = _coin(b, flip_p, generator, device)
        x = resized_crop(images, boxes, size, flip=flip)  # the flip commutes with all below
    else:
        x = _flipped(images, size, _coin(b, flip_p, generator, device))
    factors, order = sample_jitter_params(b, generator=generator, jitter=jitter)
    apply = _coin(b, jitter_p, generator, device)
    if jitter_p > 0:
        x = _adjust_colors_(x, factors, order, apply, [j > 0 for j in jitter])
    if images.shape[1] == 3 and grayscale_p > 0:
        to_grey = _per_image(_coin(b, grayscale_p, generator, device).to(x.dtype))
        grey = rgb_to_grayscale(x)  # (B, 1, H, W), before x changes
        # x <- x (1 - m) + grey m: exact for m in {0, 1}, in place, no batch-sized temporary
        x.mul_(1.0 - to_grey).addcmul_(grey, to_grey)
    x = _random_blur(x, blur_p, blur_sigma, generator)
    return _normalize_(x, mean, std)
