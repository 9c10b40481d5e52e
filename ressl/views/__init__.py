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

The kernels live in ``geometry`` (crop boxes, resized crops, flips), ``color``
(ColorJitter, grayscale) and ``blur``; ``compose`` builds the two views from them,
and :class:`WeakView` / :class:`StrongView` are their frozen configs.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    >>> strong_view(x, size=32, mean=mean, std=std, generator=g).shape
    torch.Size([8, 3, 32, 32])
"""

from ressl.views.blur import BLUR_MODES, blur_kernel_size, gaussian_blur, pil_gaussian_blur
from ressl.views.color import (
    adjust_brightness,
    adjust_colors,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    random_grayscale,
    rgb_to_grayscale,
    sample_jitter_params,
)
from ressl.views.compose import StrongView, WeakView, normalize, strong_view, weak_view
from ressl.views.geometry import (
    multicrop_scales,
    random_resized_crop,
    resized_crop,
    sample_crop_boxes,
)

__all__ = [
    "StrongView",
    "WeakView",
    "adjust_brightness",
    "adjust_colors",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "color_jitter",
    "gaussian_blur",
    "pil_gaussian_blur",
    "BLUR_MODES",
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
