"""The health of an encoder on a fixed sample of a dataset, labels or not (``ressl eval health``).

:func:`health_sample` draws the sample: up to ``count`` images of the test split, or of the
train split (the whole folder) when there is none, picked by a seeded permutation, so a
seed names the same images on every machine. :func:`sample_health` runs the encoder on
them three times: the images as they are (normalised, as the other protocols see them)
and two weak views of each, and returns the label-free measures of :mod:`ressl.eval.health`:

* ``rankme``: the effective rank of the raw ``(N, D)`` backbone features, at most
  ``min(N, D)`` (``rank_cap``);
* ``std``, ``healthy_std``, ``std_ratio``: the per-dimension std of the L2-normalised
  features, its value for directions spread evenly over the sphere (``1/sqrt(D)``) and their
  ratio (about 1 healthy, 0 collapsed);
* ``uniformity``: of the normalised features (0 collapsed, towards -4 spread out);
* ``alignment``: between the features of two weak views of each image (ReSSL's teacher
  view: RandomResizedCrop with area in [0.2, 1] and a horizontal flip with p 0.5), 0 when
  the encoder maps both views of an image to the same direction.

The views' crops and flips are drawn for the whole sample at once from ``seed`` on the CPU,
so the result does not depend on ``batch_size`` or on the device (beyond float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ressl.data.sources import FolderImages, ImageData, ImageSource, TensorImages
from ressl.errors import DataError
from ressl.eval.health import alignment, embedding_std, healthy_std, rankme, uniformity
from ressl.views import normalize, resized_crop, sample_crop_boxes

__all__ = ["VIEW_SCALE", "health_sample", "sample_health"]

_SEED_MASK = 0xFFFF_FFFF_FFFF_FFFF  # any int seed, negative or huge, is a valid torch seed
#: The weak views' crop area range, ReSSL's teacher view (Zheng et al., 2021).
VIEW_SCALE = (0.2, 1.0)


def _subset(source: ImageSource, index: Tensor) -> ImageSource:
    """The images of ``source`` at the sorted ``index``, in that order."""
    if isinstance(source, TensorImages):
        return TensorImages(source.images[index], source.labels[index])
    if isinstance(source, FolderImages):
        files = [source.files[i] for i in index.tolist()]
        return FolderImages(files, source.labels[index], source.image_size, source.channels)
    raise TypeError(f"cannot sample a {type(source).__name__}")


def health_sample(data: ImageData, count: int, seed: int) -> tuple[ImageSource, str]:
    """Up to ``count`` images of ``data``'s test split (its train split when it has none),
    picked by a permutation seeded with ``seed`` and kept in stored order.

    Returns:
        ``(images, split)``, ``split`` being ``"test"`` or ``"train"``.

    Raises:
        DataError: when the split holds fewer than 2 images (the measures compare images).
    """
    split, source = ("test", data.test) if data.test is not None else ("train", data.train)
    n = len(source)
    if n < 2:
        raise DataError(f"{data.name}'s {split} split has {n} image(s); health needs at least 2")
    if n <= count:
        return source, split
    g = torch.Generator().manual_seed(seed & _SEED_MASK)
    index = torch.randperm(n, generator=g)[:count].sort().values
    return _subset(source, index), split


def _views(n: int, side: int, seed: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """Two weak views' ``(boxes (n, 4), flips (n,))`` for ``n`` images of ``side`` px."""
    g = torch.Generator().manual_seed(seed & _SEED_MASK)
    views = []
    for _ in range(2):
        boxes = sample_crop_boxes(n, side, side, generator=g, scale=VIEW_SCALE)
        flips = torch.rand(n, generator=g) < 0.5
        views.append((boxes, flips))
    return tuple(views)


@torch.no_grad()
def sample_health(
    fn: Callable[[Tensor], Tensor],
    images: ImageSource,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    side: int,
    seed: int = 0,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, int | float]:
    """The label-free measures of ``fn``'s features of ``images`` (see the module docstring).

    Args:
        fn: ``(B, C, H, W)`` normalised float -> ``(B, D)`` features; call it in eval mode.
        images: the sample (:func:`health_sample`), uint8 or float in [0, 1], ``side`` px.
        mean, std: per-channel normalisation the encoder expects.
        side: the images' side, and the size the views are resized to.
        seed: draws the two views' crops and flips.
        batch_size: images per forward pass.
        device: where to compute.
        progress: called with the number of images done after each batch.

    Returns:
        ``{"dim", "rank_cap", "rankme", "std", "healthy_std", "std_ratio", "uniformity",
        "alignment"}``: the feature dimension D and ``min(N, D)`` as ints, the measures as
        Python floats (NaN where the features are not finite).
    """
    device = torch.device(device)
    (boxes_a, flip_a), (boxes_b, flip_b) = _views(len(images), side, seed)
    feats: list[Tensor] = []
    view_a: list[Tensor] = []
    view_b: list[Tensor] = []
    done = 0
    for x, _ in images.batches(
        batch_size, epoch=0, seed=0, device=device, shuffle=False, drop_last=False
    ):
        scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
        part = slice(done, done + len(x))
        feats.append(fn(normalize(x, mean, std, input_scale=scale)).float())  # (B, D) raw
        for boxes, flips, out in ((boxes_a, flip_a, view_a), (boxes_b, flip_b, view_b)):
            view = resized_crop(x, boxes[part].to(device), side, flip=flips[part].to(device))
            out.append(F.normalize(fn(normalize(view, mean, std)).float(), dim=1))
        done += len(x)
        if progress is not None:
            progress(done)
    f = torch.cat(feats)  # (N, D)
    n, d = f.shape
    spread = embedding_std(f).item()
    return {
        "dim": d,
        "rank_cap": min(n, d),
        "rankme": rankme(f).item(),
        "std": spread,
        "healthy_std": healthy_std(d),
        "std_ratio": spread / healthy_std(d),
        "uniformity": uniformity(f).item(),
        "alignment": alignment(torch.cat(view_a), torch.cat(view_b)).item(),
    }
