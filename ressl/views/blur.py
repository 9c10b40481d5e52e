"""Blur kernel: Gaussian blur with a sigma per image (torchvision's ``gaussian_blur``)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import functional as F

from .checks import check_images, check_per_image, coin

__all__ = ["blur_kernel_size", "gaussian_blur", "random_blur"]


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
    images = check_images(images, float_only=True)
    b, _, height, width = images.shape
    sigma = check_per_image("sigma", sigma, b)
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
    b, c = images.shape[:2]
    half = kernel_size // 2
    if half == 0:
        return images
    sigma = sigma.to(device=images.device, dtype=images.dtype)
    taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.softmax(-0.5 * (taps / sigma[:, None]) ** 2, dim=1)  # (B, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k): one group per image channel
    x = F.pad(images, (half, half, half, half), mode="reflect")
    x = rearrange(x, "b c h w -> 1 (b c) h w")  # every image channel its own conv group
    x = F.conv2d(x, rearrange(kernel, "g k -> g 1 1 k"), groups=b * c)  # along rows
    x = F.conv2d(x, rearrange(kernel, "g k -> g 1 k 1"), groups=b * c)  # along columns
    return rearrange(x, "1 (b c) h w -> b c h w", b=b)


def random_blur(
    images: Tensor, p: float, sigma_range: tuple[float, float], generator: torch.Generator
) -> Tensor:
    b, device = images.shape[0], images.device
    kernel_size = blur_kernel_size(images.shape[-1])
    if p == 0 or kernel_size == 1:
        return images
    sigma = torch.rand(b, generator=generator, device=device)
    sigma = sigma * (sigma_range[1] - sigma_range[0]) + sigma_range[0]
    blur = coin(b, p, generator, device)
    # unblurred images get a delta kernel (identity, to float rounding) instead of a subset
    sigma = torch.where(blur, sigma, 1e-6)
    return _gaussian_blur(images, sigma, kernel_size)
