"""The views ReSSL trains with, composed from the kernels: weak (teacher) and strong (student).

``weak_view`` and ``strong_view`` are the functions; :class:`WeakView` and
:class:`StrongView` are small frozen configs of them (what the trainer builds once
from its settings and calls every step). ``normalize`` is the package's one
per-channel normalisation, used by training, evaluation and export alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ressl.errors import ConfigError
from ressl.rules import JITTER_P, JITTER_STRENGTHS
from ressl.views.blur import BLUR_MODES, random_blur
from ressl.views.checks import (
    check_channel_stats,
    check_generator,
    check_images,
    check_jitter,
    check_prob,
    check_range,
    check_size,
    coin,
    device_constant,
    per_image,
)
from ressl.views.color import adjust_colors_, rgb_to_grayscale, sample_jitter_params
from ressl.views.geometry import flipped, resample, resized_crop, sample_crop_boxes

__all__ = ["StrongView", "WeakView", "normalize", "strong_view", "weak_view"]


def normalize(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    input_scale: float = 1.0,
) -> Tensor:
    """Per channel ``(x * input_scale - mean) / std``, in one pass: the package's one
    normalisation (training views, feature extraction and the exported graph).

    Args:
        images: float (B, C, H, W) in [0, 1] (or uint8 with ``input_scale=1 / 255``).
        mean: C values.
        std: C values, all > 0.
        input_scale: Multiplies the input first (``1 / 255`` for uint8 images).

    Returns:
        float32 (B, C, H, W), a new tensor.

    Raises:
        TypeError: If ``mean`` or ``std`` is not a sequence of numbers.
        ValueError: If ``mean`` or ``std`` does not have C values, or ``std <= 0``.
    """
    c = check_images(images, any_channels=True).shape[1]
    scale, shift = _affine(mean, std, c, input_scale, images.device)
    return torch.addcmul(shift, images.float(), scale)


def _affine(
    mean: Sequence[float], std: Sequence[float], c: int, input_scale: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    m = device_constant(tuple(check_channel_stats("mean", mean, c)), device, torch.float32)
    s = device_constant(tuple(check_channel_stats("std", std, c)), device, torch.float32)
    return (input_scale / s).view(1, c, 1, 1), (-m / s).view(1, c, 1, 1)


def _normalize_(
    x: Tensor, mean: Sequence[float], std: Sequence[float], input_scale: float = 1.0
) -> Tensor:
    c = x.shape[1]
    if torch.compiler.is_compiling():  # a traced graph holds its own constants
        scale, shift = _affine(mean, std, c, input_scale, x.device)
    else:
        scale, shift = _steady_affine(tuple(mean), tuple(std), c, input_scale, x.device)
    return x.mul_(scale).add_(shift)


@functools.lru_cache(maxsize=64)
def _steady_affine(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    c: int,
    input_scale: float,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """``_affine``, computed on the device once per setting (read-only), as the views' other
    constants: four kernels less per view."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors whatever the mode
        return _affine(mean, std, c, input_scale, device)


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
    images = check_images(images)
    size, flip_p = check_size(size), check_prob("flip_p", flip_p)
    generator = check_generator(generator, images.device)
    check_channel_stats("mean", mean, images.shape[1])
    check_channel_stats("std", std, images.shape[1])
    b, _, height, width = images.shape
    if not crop:
        flip = coin(b, flip_p, generator, images.device)
        return _normalize_(flipped(images, size, flip), mean, std)
    boxes = sample_crop_boxes(b, height, width, generator=generator, scale=scale)
    flip = coin(b, flip_p, generator, images.device)
    input_scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    return _normalize_(resample(images, boxes, size, flip), mean, std, input_scale)


def strong_view(
    images: Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    jitter: tuple[float, float, float, float] = JITTER_STRENGTHS,
    jitter_p: float = JITTER_P,
    grayscale_p: float = 0.2,
    blur_p: float = 0.0,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    flip_p: float = 0.5,
    crop: bool = True,
    blur_mode: str = "pil",
) -> Tensor:
    """ReSSL's student view (MoCo v2): crop, jitter, grayscale, blur, flip, normalise.

    Per image and independently: RandomResizedCrop(size, scale); ColorJitter(*jitter)
    with probability ``jitter_p``, in a random op order; RandomGrayscale(grayscale_p);
    GaussianBlur(sigma uniform in ``blur_sigma`` pixels; PIL's, as the paper's code,
    bit for bit) with probability ``blur_p``; RandomHorizontalFlip(flip_p);
    Normalize(mean, std). The paper blurs with p 0.5 on ImageNet; small datasets
    usually skip it (the default). The random draws follow torchvision's order.

    Args:
        images: uint8, or float in [0, 1], (B, C, H, W) with C in {1, 3}.
        size: Output height and width.
        mean: Normalisation mean, one value per channel.
        std: Normalisation std, one value per channel.
        generator: Source of randomness, on the device of ``images``.
        scale: Crop area fraction range, ``0 < a <= b <= 1``; aspect ratio in [3/4, 4/3].
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue).
        jitter_p: Probability of color jitter.
        grayscale_p: Probability of grayscale (nothing to do when C == 1).
        blur_p: Probability of Gaussian blur.
        blur_sigma: Range of the blur's sigma, ``0 < a <= b``.
        flip_p: Probability of a horizontal flip.
        crop: ``False`` when the images were already randomly cropped to ``size``
            (e.g. in DataLoader workers): no crop here, the rest as above.
        blur_mode: ``"pil"`` (PIL's GaussianBlur, the paper's) or ``"relative"`` (a
            Gaussian kernel of about 10% of the side, ressl before 0.2).

    Returns:
        float32 (B, C, size, size), normalised.

    Raises:
        TypeError: If ``images``, ``generator``, ``mean`` or ``std`` has the wrong type.
        ValueError: On bad shapes, ranges, probabilities, mean/std, or a generator on
            another device.
    """
    images = check_images(images)
    size = check_size(size)
    generator = check_generator(generator, images.device)
    jitter = check_jitter(jitter)
    jitter_p = check_prob("jitter_p", jitter_p)
    grayscale_p = check_prob("grayscale_p", grayscale_p)
    blur_p = check_prob("blur_p", blur_p)
    flip_p = check_prob("flip_p", flip_p)
    blur_sigma = check_range("blur_sigma", blur_sigma)
    if blur_mode not in BLUR_MODES:
        raise ConfigError(f"blur_mode must be one of {', '.join(BLUR_MODES)}, got {blur_mode!r}")
    check_channel_stats("mean", mean, images.shape[1])
    check_channel_stats("std", std, images.shape[1])
    b = images.shape[0]
    x = _crop_and_flip(images, size, scale, flip_p, crop, generator)
    factors, order = sample_jitter_params(b, generator=generator, jitter=jitter)
    apply = coin(b, jitter_p, generator, images.device)
    if jitter_p > 0:
        x = adjust_colors_(x, factors, order, apply, [j > 0 for j in jitter])
    if images.shape[1] == 3 and grayscale_p > 0:
        x = _random_grayscale_(x, grayscale_p, generator)
    x = random_blur(x, blur_p, blur_sigma, generator, blur_mode)
    return _normalize_(x, mean, std)


def _crop_and_flip(
    images: Tensor,
    size: int,
    scale: tuple[float, float],
    flip_p: float,
    crop: bool,
    generator: torch.Generator,
) -> Tensor:
    """float (B, C, size, size) in [0, 1]: a random resized crop (unless ``crop`` is
    False) and flip of each image."""
    b, _, height, width = images.shape
    if not crop:
        return flipped(images, size, coin(b, flip_p, generator, images.device))
    boxes = sample_crop_boxes(b, height, width, generator=generator, scale=scale)
    flip = coin(b, flip_p, generator, images.device)
    return resized_crop(images, boxes, size, flip=flip)  # the flip commutes with all after it


def _random_grayscale_(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Turn each RGB image of float ``x`` (B, 3, H, W) grayscale with probability ``p``,
    in place."""
    to_gray = per_image(coin(x.shape[0], p, generator, x.device).to(x.dtype))
    gray = rgb_to_grayscale(x)  # (B, 1, H, W), before x changes
    # x <- x (1 - m) + gray m: exact for m in {0, 1}, in place, no batch-sized temporary
    return x.mul_(1.0 - to_gray).addcmul_(gray, to_gray)


@dataclass(frozen=True)
class _View:
    """A view as a config: its fields are the view function's options."""

    def __call__(
        self,
        images: Tensor,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator,
        scale: tuple[float, float] = (0.2, 1.0),
        crop: bool = True,
    ) -> Tensor:
        """The view of ``images`` with this config (arguments as the view function's)."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return self._view(
            images,
            size=size,
            mean=mean,
            std=std,
            generator=generator,
            scale=scale,
            crop=crop,
            **options,
        )

    def _view(self, images: Tensor, **kw: Any) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class WeakView(_View):
    """The weak (teacher) view as a config: crop, flip, normalise (:func:`weak_view`).

    Args:
        flip_p: Probability of a horizontal flip.
    """

    flip_p: float = 0.5

    def __post_init__(self) -> None:
        check_prob("flip_p", self.flip_p)

    def _view(self, images: Tensor, **kw: Any) -> Tensor:
        return weak_view(images, **kw)


@dataclass(frozen=True)
class StrongView(_View):
    """The strong (student) view as a config: crop, jitter, grayscale, blur, flip, normalise
    (:func:`strong_view`).

    Args:
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue).
        jitter_p: Probability of color jitter.
        grayscale_p: Probability of grayscale.
        blur_p: Probability of Gaussian blur.
        blur_sigma: Range of the blur's sigma.
        flip_p: Probability of a horizontal flip.
        blur_mode: ``"pil"`` (PIL's GaussianBlur) or ``"relative"``.

    Raises:
        ValueError: on a strength, probability or range out of bounds.
    """

    jitter: tuple[float, float, float, float] = JITTER_STRENGTHS
    jitter_p: float = JITTER_P
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    blur_mode: str = "pil"

    def __post_init__(self) -> None:
        check_jitter(self.jitter)
        for name in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
            check_prob(name, getattr(self, name))
        check_range("blur_sigma", self.blur_sigma)
        if self.blur_mode not in BLUR_MODES:
            raise ConfigError(
                f"blur_mode must be one of {', '.join(BLUR_MODES)}, got {self.blur_mode!r}"
            )

    def _view(self, images: Tensor, **kw: Any) -> Tensor:
        return strong_view(images, **kw)
