"""Colour kernels: torchvision's ColorJitter ops and RandomGrayscale, per image, batched.

Jitter factors, the per-image random order of the four ops and the ops themselves
follow ``torchvision.transforms.v2.functional.adjust_*`` (clamped to [0, 1] after each).
In-place kernels (trailing underscore) do the work on tensors the caller owns; the
public functions run them on a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ressl.rules import JITTER_STRENGTHS
from ressl.views.checks import (
    check_generator,
    check_images,
    check_jitter,
    check_per_image,
    check_prob,
    coin,
    device_constant,
    per_image,
    syncs_are_free,
)

__all__ = [
    "adjust_brightness",
    "adjust_colors",
    "adjust_colors_",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "random_grayscale",
    "rgb_to_grayscale",
    "sample_jitter_params",
]

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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

    ``ref`` per image is 0 (brightness), the mean grey level where ``contrast`` is 1, or
    the grey image where ``saturation`` is 1 (float (B,) masks of 0 and 1, at most one 1
    per image). A factor of 1 leaves an image exactly as it is.
    """
    f = per_image(factor)
    if contrast is None and saturation is None:
        return x.mul_(f).clamp_(0.0, 1.0)
    gray = rgb_to_grayscale(x)  # (B, 1, H, W); x itself when C == 1
    if x.shape[1] == 1:
        saturation = None  # a grey image is its own grey: nothing to blend
    if contrast is None:
        ref = gray * per_image(saturation) if saturation is not None else gray.new_zeros(())
    else:
        ref = per_image(gray.mean(dim=(1, 2, 3)) * contrast)  # (B, 1, 1, 1)
        if saturation is not None:  # masks of 0 and 1: ref + gray s is exact, fused or not
            ref = torch.addcmul(ref, gray, per_image(saturation))  # (B, 1, H, W)
    # lerp: x + (1 - f) (ref - x), one pass instead of two; exactly x where f == 1
    return x.lerp_(ref.expand_as(x), 1.0 - f).clamp_(0.0, 1.0)


def _hue(x: Tensor, factor: Tensor) -> Tensor:
    # A new tensor. Closed form of torchvision's RGB -> HSV -> shift hue -> RGB. With V = max,
    # chroma = max - min and t_c = (V - x_c) / chroma, the hue in sextants is
    # t_b - t_g, 2 + t_r - t_b or 4 + t_g - t_r where R, G or B is the max (ties: R, then
    # G); after the shift h, channel c is V - chroma * clamp(2 - dist(h, a_c), 0, 1) with
    # dist on the circle of length 6 and a = (3, 5, 1). Float arithmetic only: bool
    # kernels (==, where) run ~20x slower than float ones on CPU.
    if x.shape[1] == 1:
        return x.clone()
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
    anchors = device_constant((3.0, 5.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    u = hue.unsqueeze(1) - anchors  # (B, 3, H, W)
    dist = u.sub_(torch.round(u * (1.0 / 6.0)).mul_(6.0)).abs_()  # circular, in [0, 3]
    ramp = dist.neg_().add_(2.0).clamp_(0.0, 1.0)
    return torch.addcmul(maxc, chroma, ramp, value=-1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image ``clamp(x * factor, 0, 1)``, torchvision's ``adjust_brightness``.

    Args:
        images: float (B, C, H, W) in [0, 1].
        factor: float (B,), >= 0.

    Returns:
        float (B, C, H, W), a new tensor.
    """
    return _blend_(images.clone(), check_per_image("factor", factor, images.shape[0]))


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image blend with the image's mean grey level, torchvision's ``adjust_contrast``.

    Args:
        images: float (B, C, H, W) in [0, 1].
        factor: float (B,), >= 0; 0 gives a uniform grey image, 1 the input.

    Returns:
        float (B, C, H, W), a new tensor.
    """
    factor = check_per_image("factor", factor, images.shape[0])
    return _blend_(images.clone(), factor, contrast=torch.ones_like(factor))


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image blend with the grey image, torchvision's ``adjust_saturation``.

    Args:
        images: float (B, C, H, W) in [0, 1]; C == 1 is left unchanged.
        factor: float (B,), >= 0; 0 gives grey, 1 the input.

    Returns:
        float (B, C, H, W), a new tensor.
    """
    factor = check_per_image("factor", factor, images.shape[0])
    if images.shape[1] == 1:
        return images.clone()
    return _blend_(images.clone(), factor, saturation=torch.ones_like(factor))


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image hue rotation by ``factor`` turns, torchvision's ``adjust_hue``.

    Args:
        images: float (B, C, H, W) in [0, 1]; C == 1 is left unchanged.
        factor: float (B,) in [-0.5, 0.5].

    Returns:
        float (B, C, H, W), a new tensor.
    """
    return _hue(images, check_per_image("factor", factor, images.shape[0]))


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
    images = check_images(images, float_only=True)
    b = images.shape[0]
    if factors.shape != (b, 4) or order.shape != (b, 4):
        raise ValueError(
            f"factors and order must have shape ({b}, 4), got {tuple(factors.shape)} "
            f"and {tuple(order.shape)}"
        )
    if apply is not None:
        apply = check_per_image("apply", apply, b)
    return adjust_colors_(images.clone(), factors, order, apply, enabled)


def adjust_colors_(
    x: Tensor,
    factors: Tensor,
    order: Tensor,
    apply: Tensor | None,
    enabled: Sequence[bool],
    *,
    gather_hue: bool | None = None,
) -> Tensor:
    # Brightness, contrast and saturation are all in-place blends, so one blend over the
    # whole batch serves a slot of every image's op sequence (factor 1, an exact identity,
    # for an image with nothing there); the hue runs between slots. Each image gets its
    # ops in its order, as alone. Two layouts of the slots, the same results:
    # - sync-free (accelerators): the blends before the hue right-aligned in slots 0-2,
    #   those after it left-aligned in slots 3-5, so every image's hue falls before slot 3:
    #   one hue pass over the batch (kept where it is due), 6 blend passes.
    # - gathered (CPU, where a host read is free): the blends at their positions 0-3 and
    #   each image's hue at its own, run on the images due there only, gathered by count:
    #   4 blend passes, and each image's hue computed once. No batch-sized temporaries
    #   beyond the blends' (on CPU each costs page faults, more than the arithmetic).
    b, device = x.shape[0], x.device
    if gather_hue is None:
        gather_hue = syncs_are_free(device)
    order = order.to(device=device, dtype=torch.int64)
    factors = factors.to(device=device, dtype=x.dtype)
    todo = torch.ones(b, dtype=torch.bool, device=device) if apply is None else apply.to(device)
    on = [bool(e) for e in enabled]
    if x.shape[1] == 1:  # saturation and hue leave grey images unchanged
        on[2] = on[3] = False
    blends = [op for op in range(3) if on[op]]
    hue_at = order == 3  # (B, 4)
    k = hue_at.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1) the hue's position
    hue_counts, by_step = [0] * 5, None  # gathered: images whose hue is due before slot s
    if on[3] and gather_hue:
        hue_counts, by_step = _hue_groups(todo, k)
    if not blends:
        if on[3] and not gather_hue:
            _hue_where_(x, factors[:, 3], todo)
        elif on[3]:
            _hue_at_(x, factors, by_step, 0, b - hue_counts[4])
        return x
    ops, slots = _blend_slots(order, k, hue_at, hue=on[3], gather_hue=gather_hue)
    on_t = device_constant(tuple(on), device, torch.bool)
    due = todo[:, None] & on_t[ops] & (ops < 3)  # (B, 7)
    f = torch.where(due, factors.gather(1, ops.clamp(max=2)), 1.0)  # (B, 7), 1 where none
    contrast = (due & (ops == 1)).to(x.dtype) if 1 in blends else None  # (B, 7) 0 or 1
    saturation = (due & (ops == 2)).to(x.dtype) if 2 in blends else None
    for s in range(slots):
        if on[3] and not gather_hue and s == 3:  # after every image's blends before its hue
            _hue_where_(x, factors[:, 3], todo)
        elif gather_hue and hue_counts[s]:  # gathered: the images whose hue is at position s
            _hue_at_(x, factors, by_step, sum(hue_counts[:s]), hue_counts[s])
        to_mean = None if contrast is None else contrast[:, s]  # (B,) 0 or 1
        to_gray = None if saturation is None else saturation[:, s]
        _blend_(x, f[:, s], contrast=to_mean, saturation=to_gray)
    return x


def _hue_groups(todo: Tensor, k: Tensor) -> tuple[list[int], Tensor]:
    """The images by the position of their hue (4: not jittered), and how many at each:
    the gathered layout's one host sync."""
    hue_step = torch.where(todo, k.squeeze(1), 4)  # (B,)
    by_step = torch.argsort(hue_step, stable=True)
    return torch.bincount(hue_step, minlength=5).tolist(), by_step


def _hue_at_(x: Tensor, factors: Tensor, by_step: Tensor | None, start: int, count: int) -> None:
    """In place: the hue of the ``count`` images from ``start`` in ``by_step``'s order."""
    assert by_step is not None
    idx = by_step[start : start + count]
    x.index_copy_(0, idx, _hue(x.index_select(0, idx), factors[idx, 3]))


def _blend_slots(
    order: Tensor, k: Tensor, hue_at: Tensor, *, hue: bool, gather_hue: bool
) -> tuple[Tensor, int]:
    """The op of each image in each blend slot, (B, 7) (3: none), and the number of slots."""
    b = order.shape[0]
    p = device_constant((0, 1, 2, 3), order.device, torch.int64)  # (4,) positions in the order
    after = (p > k).to(torch.int64)  # (B, 4) 1 after the hue
    if hue and not gather_hue:  # slot p + 3 - k before the hue, p + 2 - k after it
        slot, slots = p + (3 - k) - after, 6
    elif hue:  # slot p; the hue's own position holds no blend
        slot, slots = p.expand(b, 4), 4
    else:  # the blends in their order in slots 0-2 (the hue does nothing)
        slot, slots = p - after, 3
    slot = torch.where(hue_at, 6, slot)  # the hue's own entry: slot 6, dropped
    return order.new_full((b, 7), 3).scatter_(1, slot, order), slots


def _hue_where_(x: Tensor, factor: Tensor, todo: Tensor) -> Tensor:
    """In place: the hue of ``x`` (B, C, H, W) rotated by ``factor`` (B,) where ``todo``
    (bool (B,)), computed for the whole batch (no host read)."""
    # lerp: exactly x where the weight is 0, exactly the hue where it is 1
    return x.lerp_(_hue(x, factor), per_image(todo.to(x.dtype)))


def sample_jitter_params(
    batch: int,
    *,
    generator: torch.Generator,
    jitter: tuple[float, float, float, float] = JITTER_STRENGTHS,
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
    jitter = check_jitter(jitter)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = torch.device(generator.device)
    lo = device_constant(
        (*(max(0.0, 1.0 - j) for j in jitter[:3]), -jitter[3]), device, torch.float32
    )
    hi = device_constant((*(1.0 + j for j in jitter[:3]), jitter[3]), device, torch.float32)
    factors = torch.rand(batch, 4, generator=generator, device=device) * (hi - lo) + lo
    order = torch.argsort(torch.rand(batch, 4, generator=generator, device=device), dim=1)
    return factors, order


def color_jitter(
    images: Tensor,
    *,
    generator: torch.Generator,
    jitter: tuple[float, float, float, float] = JITTER_STRENGTHS,
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
    images = check_images(images, float_only=True)
    generator = check_generator(generator, images.device)
    jitter, p = check_jitter(jitter), check_prob("p", p)
    factors, order = sample_jitter_params(images.shape[0], generator=generator, jitter=jitter)
    apply = coin(images.shape[0], p, generator, images.device)
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
    images = check_images(images, float_only=True)
    generator = check_generator(generator, images.device)
    p = check_prob("p", p)
    if images.shape[1] == 1 or p == 0:
        return images
    to_gray = per_image(coin(images.shape[0], p, generator, images.device))
    return torch.where(to_gray, rgb_to_grayscale(images), images)
