"""Which crops a training step draws per image, and which network sees which view.

Three settings of the paper share one step (``ressl.train``):

- **one crop** (the default, "1x backprop"): the student sees a strong view of one
  random crop, the teacher a weak view of another;
- **multi-crop**: the teacher sees one weak full-size crop, the student several
  strong crops at decreasing sides and scales (:func:`ressl.views.multicrop_scales`);
  the teacher relation is shared and the per-crop losses averaged;
- **symmetric** ("2x backprop"): two crops ``a`` and ``b`` per image, each seen
  strongly by the student and weakly by the teacher; the loss pairs the student's
  ``a`` with the teacher's ``b`` and vice versa
  (:func:`ressl.functional.symmetric_relation_loss`), and both teacher batches
  are enqueued.

Crops are cut either on the device from in-memory images (``CropPlan.views``) or in
DataLoader workers from the full-resolution files (``CropPlan.worker_crops`` ->
``FolderImages.crop_batches`` -> ``CropPlan.views_of_crops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ressl.errors import ConfigError
from ressl.views import StrongView, WeakView, multicrop_scales, resized_crop, sample_crop_boxes

__all__ = ["CropPlan"]

Crop = tuple[int, tuple[float, float]]  # (side, (area fraction lo, hi))


@dataclass(frozen=True)
class CropPlan:
    """The crops of one training step.

    Attributes:
        teacher: ``(side, scale)`` of each teacher crop (one, or ``a`` and ``b``).
        student: ``(side, scale)`` of each student crop.
        symmetric: 2x backprop: the student's crops *are* the teacher's crops
            ``a`` and ``b`` (each seen once weakly and once strongly).
    """

    teacher: tuple[Crop, ...]
    student: tuple[Crop, ...]
    symmetric: bool = False

    @classmethod
    def build(
        cls,
        image_size: int,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crops: Sequence[int] | None = None,
        crop_scales: Sequence[tuple[float, float]] | None = None,
        symmetric: bool = False,
    ) -> CropPlan:
        """The plan for a run's settings.

        Args:
            image_size: Side of the teacher's (full-size) crop.
            crop_scale: Area range of full-size crops.
            crops: Student crop sides (multi-crop); None: one crop of ``image_size``.
            crop_scales: One area range per student crop; None: derived as in the
                paper, ``crop_scale * side / image_size``.
            symmetric: 2x backprop (one crop size only).

        Raises:
            ValueError: On crop sides outside ``[8, image_size]``, a ``crop_scales``
                of another length than ``crops``, or symmetric with several crops.
        """
        sides = list(crops) if crops else [image_size]
        for side in sides:
            if not isinstance(side, int) or isinstance(side, bool) or not 8 <= side <= image_size:
                raise ConfigError(
                    f"{{crops}} must be sides in [8, {image_size}] (the image size), e.g. "
                    f"{_example(image_size)}; got {list(sides)}",
                    "crops",
                )
        if crop_scales is None:
            scales = multicrop_scales(sides, image_size, crop_scale)
        else:
            scales = [(float(lo), float(hi)) for lo, hi in crop_scales]
            if len(scales) != len(sides):
                raise ConfigError(
                    f"{{crop_scales}} needs one (lo, hi) range per crop: {len(sides)} crop(s) "
                    f"{sides}, got {len(scales)} range(s)",
                    "crop_scales",
                )
        full = (image_size, (float(crop_scale[0]), float(crop_scale[1])))
        student = tuple(zip(sides, scales))
        if symmetric:
            if len(sides) != 1:
                raise ConfigError(
                    "symmetric (2x backprop) takes one crop size; drop --crops or --symmetric"
                )
            return cls(teacher=(full, full), student=(full, full), symmetric=True)
        return cls(teacher=(full,), student=student)

    @property
    def multicrop(self) -> bool:
        return len(self.student) > 1

    @property
    def worker_crops(self) -> list[Crop]:
        """The distinct crops to cut per image: the teacher's, then the student's own."""
        return list(self.teacher) if self.symmetric else [*self.teacher, *self.student]

    def views(
        self,
        images: Tensor,
        *,
        generator: torch.Generator,
        mean: Sequence[float],
        std: Sequence[float],
        student: StrongView,
        teacher: WeakView | StrongView,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(teacher inputs, student inputs)`` from whole images, cropped on their device.

        Args:
            images: uint8 ``(B, C, H, W)``.
            generator: The views' generator, on the images' device.
            mean, std: Normalisation.
            student: The student's (strong) view.
            teacher: The teacher's view: ``WeakView()`` in the paper, or a strong one.
        """
        common: dict[str, Any] = dict(mean=mean, std=std, generator=generator)
        if self.symmetric:
            b, _, h, w = images.shape
            size, scale = self.teacher[0]
            cut = [
                resized_crop(
                    images, sample_crop_boxes(b, h, w, generator=generator, scale=scale), size
                )
                for _ in range(2)
            ]  # crops a and b, float in [0, 1]
            x_s = [student(c, size=size, crop=False, **common) for c in cut]
            x_t = [teacher(c, size=size, crop=False, **common) for c in cut]
            return x_t, x_s
        # students first, then the teacher: the one-crop run draws in this order
        x_s = [student(images, size=size, scale=scale, **common) for size, scale in self.student]
        ((size, scale),) = self.teacher
        return [teacher(images, size=size, scale=scale, **common)], x_s

    def views_of_crops(
        self,
        crops: Sequence[Tensor],
        *,
        generator: torch.Generator,
        mean: Sequence[float],
        std: Sequence[float],
        student: StrongView,
        teacher: WeakView | StrongView,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(teacher inputs, student inputs)`` from crops cut in workers (``worker_crops`` order)."""
        if len(crops) != len(self.worker_crops):
            raise ValueError(f"expected {len(self.worker_crops)} crops per image, got {len(crops)}")
        common: dict[str, Any] = dict(mean=mean, std=std, generator=generator, crop=False)
        n_t = len(self.teacher)
        t_crops = crops[:n_t]
        s_crops = crops[:n_t] if self.symmetric else crops[n_t:]
        x_s = [student(c, size=c.shape[-1], **common) for c in s_crops]
        x_t = [teacher(c, size=c.shape[-1], **common) for c in t_crops]
        return x_t, x_s


def _example(image_size: int) -> str:
    return ",".join(str(max(8, round(image_size * f))) for f in (1, 6 / 7, 5 / 7, 4 / 7, 3 / 7))
