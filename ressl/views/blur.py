"""Gaussian blur with a sigma per image: PIL's (the paper's code) or a Gaussian kernel.

``pil_gaussian_blur`` is ``PIL.ImageFilter.GaussianBlur(sigma)`` computed for a
batch on the device, bit for bit: PIL approximates the Gaussian by three "extended"
box blurs per direction (Gwosdek et al. 2011: a box of fractional radius, its two
outer taps weighted by the fraction), in 8-bit fixed point with rounding after
every pass and the edge pixels repeated. The radius and weights are computed in
float32 as PIL's C code does; each pass is a few int64 multiply-adds of shifted
slices, exact integers, so every pixel equals PIL's (tested per image).
``gaussian_blur`` is torchvision's kernel blur (reflect padding, a kernel of about 10%
of the side: ``blur_kernel_size``), what ressl used before 0.2.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import functional as F

from ressl.errors import ConfigError
from ressl.views.checks import check_images, check_per_image, coin, device_constant, syncs_are_free

__all__ = ["BLUR_MODES", "blur_kernel_size", "gaussian_blur", "pil_gaussian_blur", "random_blur"]

#: ``pil``: PIL's GaussianBlur; ``relative``: a Gaussian kernel of about 10% of the side.
BLUR_MODES = ("pil", "relative")
#: Pixels per chunk of PIL-mode blur on CPU (64x64 RGB: 5 images; 224x224: 1). Measured for
#: 128 images at 64 px: 224 ms whole, 104 ms in chunks; 16 at 224 px: 362 ms -> 135 ms.
_CPU_CHUNK = 65_536


def _box_radius(sigma: Tensor, passes: int = 3) -> Tensor:
    """The extended box's radius for ``passes`` boxes approximating ``sigma`` (PIL's
    ``_gaussian_blur_radius``, its float32 arithmetic included)."""
    s2 = sigma.float() * sigma.float() / passes
    big = torch.sqrt(12.0 * s2.double() + 1.0).float()
    whole = torch.floor((big.double() - 1.0) / 2.0).float()
    a = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2)
    return whole + a / (6 * (s2 - (whole + 1) * (whole + 1)))


@torch.compiler.disable  # host arithmetic: run as is, not traced
@functools.lru_cache(maxsize=64)
def _whole_radius(sigma: float) -> int:
    """The integer part of the box radius of ``sigma`` (host arithmetic, computed once)."""
    return int(torch.floor(_box_radius(torch.tensor([sigma]))).item())


def _box_taps(radius: Tensor, most: int) -> Tensor:
    """(B, 2 R + 3) int64 tap weights of each image's extended box, R = ``most`` (a bound of
    the integer radii), with PIL's 24-bit fixed-point weights: ``ww`` on the ``2 r + 1``
    taps of the box, ``fw`` on the two just outside it, 0 beyond. One pass of the box is then
    ``sum_j w_j x[i + j]`` (an exact integer), rounded: ``(sum + 2^23) >> 24``."""
    r = torch.floor(radius).long()[:, None]  # (B, 1)
    ww = torch.trunc(torch.full_like(radius, float(1 << 24)) / (radius * 2 + 1)).long()[:, None]
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2
    span = tuple(abs(j) for j in range(-most - 1, most + 2))
    dist = device_constant(span, radius.device, torch.int64)  # (T,) |tap offset|
    return torch.where(dist <= r, ww, torch.where(dist == r + 1, fw, 0))  # (B, T)


def _box_pass(x: Tensor, taps: Tensor, dim: int) -> Tensor:
    """One extended box blur along ``dim`` (-1: rows, -2: columns) of int64 ``x``
    (B, C, H, W), the edge pixels repeated: ``taps`` (B, T) from ``_box_taps``. A few
    multiply-adds of shifted slices, the same for every image: no branch on its radius."""
    b, n, t = x.shape[0], x.shape[dim], taps.shape[1]
    pad = t // 2
    edges = tuple(min(max(i, 0), n - 1) for i in range(-pad, n + pad))
    padded = x.index_select(dim, device_constant(edges, x.device, torch.int64))  # edges repeated
    half = device_constant((1 << 23,), x.device, torch.int64)
    out = torch.addcmul(half, padded.narrow(dim, 0, n), taps[:, 0].view(b, 1, 1, 1))
    for j in range(1, t):
        out.addcmul_(padded.narrow(dim, j, n), taps[:, j].view(b, 1, 1, 1))
    return out.bitwise_right_shift_(24)


def pil_gaussian_blur(images: Tensor, sigma: Tensor, max_sigma: float | None = None) -> Tensor:
    """``PIL.ImageFilter.GaussianBlur(sigma)`` per image, batched on the device.

    Args:
        images: uint8, or float in [0, 1] (quantised to 8 bits, as PIL holds them),
            (B, C, H, W).
        sigma: float (B,), >= 0 (PIL's ``radius``); 0 leaves an image unchanged.
        max_sigma: an upper bound of ``sigma``, known on the host: then nothing waits
            for the device (otherwise one sync reads the box radii).

    Returns:
        The blurred images, in the dtype given (float: the 8-bit result / 255).
    """
    images = check_images(images)
    b = images.shape[0]
    sigma = check_per_image("sigma", sigma, b).to(images.device)
    x = (images if images.dtype == torch.uint8 else (images * 255).round().clamp(0, 255)).long()
    radius = _box_radius(sigma)
    if max_sigma is not None:  # the radius grows with sigma: every box up to the bound's
        most = _whole_radius(float(max_sigma))
    else:
        most = int(torch.floor(radius).max().item()) if b else 0  # one host sync
    taps = _box_taps(radius, most)
    per_chunk = b if not syncs_are_free(x.device) else max(1, _CPU_CHUNK // x[0].numel())
    if per_chunk < b:  # on CPU, chunks whose int64 temporaries stay in cache: 2-3x faster
        x = torch.cat(
            [
                _box_passes(x[i : i + per_chunk], taps[i : i + per_chunk])
                for i in range(0, b, per_chunk)
            ]
        )
    else:
        x = _box_passes(x, taps)
    if images.dtype == torch.uint8:
        return x.to(torch.uint8).contiguous()
    return (x.to(images.dtype) / 255).contiguous()


def _box_passes(x: Tensor, taps: Tensor) -> Tensor:
    for dim in (-1, -1, -1, -2, -2, -2):  # PIL: three passes along rows, then three along columns
        x = _box_pass(x, taps, dim)
    return x


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
        raise ConfigError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if kernel_size // 2 >= min(height, width):
        raise ConfigError(
            f"kernel_size {kernel_size} needs images larger than {kernel_size // 2} pixels "
            f"(reflect padding), got {height}x{width}"
        )
    if not bool((sigma > 0).all()):  # a device sync, but a zero sigma would give NaNs
        raise ConfigError(f"sigma must be > 0 for every image, got min {sigma.min().item()}")
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
    images: Tensor,
    p: float,
    sigma_range: tuple[float, float],
    generator: torch.Generator,
    mode: str = "pil",
) -> Tensor:
    """Blur each image with probability ``p``, sigma uniform in ``sigma_range``: sigma is
    drawn, then the coin (nothing is drawn when ``p`` is 0, or in ``relative`` mode when
    the kernel would be 1 pixel)."""
    b, device = images.shape[0], images.device
    kernel_size = blur_kernel_size(images.shape[-1])
    if p == 0 or (mode == "relative" and kernel_size == 1):
        return images
    sigma = torch.rand(b, generator=generator, device=device)
    sigma = sigma * (sigma_range[1] - sigma_range[0]) + sigma_range[0]
    blur = coin(b, p, generator, device)
    if mode == "pil":
        if syncs_are_free(device):  # only the images that are blurred
            chosen = blur.nonzero().squeeze(1)
            out = images.clone()
            out[chosen] = pil_gaussian_blur(images[chosen], sigma[chosen], sigma_range[1]).to(
                images.dtype
            )
            return out
        blurred = pil_gaussian_blur(images, sigma, sigma_range[1])  # no host sync on a GPU
        return torch.where(blur.view(b, 1, 1, 1), blurred.to(images.dtype), images)
    # unblurred images get a delta kernel (identity, to float rounding) instead of a subset
    sigma = torch.where(blur, sigma, 1e-6)
    return _gaussian_blur(images, sigma, kernel_size)
