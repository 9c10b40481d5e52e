"""JPEGs decoded where the model trains: workers read bytes, the device decodes and crops.

The ``device`` decode path of streamed folders (``FolderImages.crop_batches``). A
DataLoader worker reads a file's header and bytes and draws its crop boxes, the same
draws as the PIL path (:func:`ressl.decode.decode_crops`), so both paths cut the same
crops. The main process hands a batch's bytes to ``torchvision.io.decode_jpeg`` on the
training device (nvjpeg on CUDA, the whole batch in one call) and cuts the crops there,
resized with antialiased bilinear filtering (PIL's filter; the pixels differ by the
decoders' rounding and at a crop's border, where PIL's filter reads the pixels just
outside the box and torch's stops at its edge). Files that
are not plain JPEGs (PNG and other formats, CMYK, an EXIF rotation) are decoded by PIL
in the worker as before; a JPEG the device cannot decode falls back to PIL too.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .decode import crop_boxes, cut_crops, decode_crops, pil_mode
from .imagefiles import as_mode, is_upright, opened_image

__all__ = ["EncodedBatch", "EncodedFile", "decode_on_device", "read_for_device"]

logger = logging.getLogger(__name__)

#: The PIL modes of JPEGs that ``decode_jpeg`` turns into RGB or greyscale as PIL does.
_PLAIN_MODES = ("RGB", "L")


@dataclass
class EncodedFile:
    """A worker's part of one file: its bytes and crop boxes, or crops PIL already cut.

    Attributes:
        path: The file.
        data: The file's bytes (uint8, 1-D) for the device to decode; None when ``crops``
            holds the result (not a plain JPEG), or when the file could not be read at all.
        boxes: ``(top, left, h, w)`` per crop, drawn on the image's full size.
        crops: The crops decoded in the worker (one ``(C, s, s)`` uint8 per crop), or None.
    """

    path: str
    data: Tensor | None
    boxes: list[tuple[int, int, int, int]]
    crops: list[Tensor] | None = None


@dataclass
class EncodedBatch:
    """A batch as the workers deliver it: the files, and their labels."""

    files: list[EncodedFile]
    labels: Tensor

    def pin_memory(self) -> EncodedBatch:
        """Page-locked bytes, so the copies to the GPU do not wait (``DataLoader(pin_memory=True)``)."""
        for f in self.files:
            if f.data is not None:
                f.data = f.data.pin_memory()
        return EncodedBatch(self.files, self.labels.pin_memory())


def collate_encoded(items: list[tuple[EncodedFile, int]]) -> EncodedBatch:
    """The DataLoader's ``collate_fn``: files of different sizes stay a list."""
    return EncodedBatch([f for f, _ in items], torch.tensor([y for _, y in items]))


def _plain_jpeg(path: str) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG that ``decode_jpeg`` decodes as PIL would (header only)."""
    try:
        with opened_image(path) as im:
            if im.format != "JPEG" or im.mode not in _PLAIN_MODES:
                return None
            if not is_upright(im):  # decode_jpeg on CUDA ignores the EXIF rotation
                return None
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None


def read_for_device(
    path: str,
    crops: Sequence[tuple[int, tuple[float, float]]],
    generator: torch.Generator,
    channels: int = 3,
) -> EncodedFile:
    """The worker side: a plain JPEG's bytes and boxes, or, for any other file, its crops
    decoded here with PIL (:func:`ressl.decode.decode_crops`; None when that fails).

    Args:
        path: The image file.
        crops: ``(side, (scale_lo, scale_hi))`` per crop.
        generator: CPU generator the boxes are drawn from (as ``decode_crops`` draws them).
        channels: 3 (RGB) or 1 (greyscale).
    """
    size = _plain_jpeg(path)
    if size is None:
        return EncodedFile(path, None, [], decode_crops(path, crops, generator, channels))
    boxes = crop_boxes(*size, crops, generator)
    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError:
        return EncodedFile(path, None, boxes)
    return EncodedFile(path, data, boxes)


#: Devices whose decoder failed on every file of a batch (warned once each).
_BROKEN: set[str] = set()
#: One side stream per CUDA device for nvjpeg (see ``_decode_jpegs``).
_STREAMS: dict[torch.device, Any] = {}


def _decode_all(data: list[Tensor], device: torch.device, channels: int) -> list[Tensor | None]:
    """``decode_jpeg`` of every file: one call for the batch; when it fails (one damaged
    file fails them all), file by file, None for those that fail."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():  # torchvision >= 0.29 says TorchCodec will take this over
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=mode, device=device))
        except RuntimeError:
            out: list[Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=mode, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _decode_jpegs(data: list[Tensor], device: torch.device, channels: int) -> list[Tensor | None]:
    """The batch decoded on ``device`` (:func:`_decode_all`).

    On CUDA nvjpeg writes its outputs from a stream of its own that does not wait for the
    training step in flight. Allocated on the training stream, an output could reuse
    memory the queued step still reads. So they are allocated on a side stream (its own
    memory pool), which waits for the training stream; the training stream then waits
    for the side stream, and each image is recorded as used there, so its memory is not
    reused before the step that reads it has run.
    """
    if not data:  # every file of the batch was decoded in the workers
        return []
    if device.type != "cuda":
        out = _decode_all(data, device, channels)
    else:
        main = torch.cuda.current_stream(device)
        side = _STREAMS.setdefault(device, torch.cuda.Stream(device))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = _decode_all(data, device, channels)
        main.wait_stream(side)
        for image in out:
            if image is not None:
                image.record_stream(main)
    if len(out) > 1 and all(image is None for image in out) and str(device) not in _BROKEN:
        _BROKEN.add(str(device))
        logger.warning("decode_jpeg decoded none of a batch's %d JPEGs on %s; they are decoded "
                       "with PIL here (slow): if this repeats, train with --decode workers",
                       len(out), device)  # fmt: skip
    return out


def _resized(image: Tensor, box: tuple[int, int, int, int], side: int) -> Tensor:
    """The ``box`` of a float ``(C, H, W)`` image resized to ``side`` (antialiased bilinear)."""
    top, left, h, w = box
    crop = image[None, :, top : top + h, left : left + w]
    return F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True)[0]


def _pil_crops(f: EncodedFile, sides: Sequence[int], channels: int) -> list[Tensor] | None:
    """The crops of a file the device could not decode, cut by PIL at the same boxes (None
    for a file whose boxes were never drawn: the worker could not read it)."""
    if len(f.boxes) != len(sides):
        return None
    try:
        with opened_image(f.path) as im:
            image = as_mode(im, pil_mode(channels))
        return cut_crops(image, sides, f.boxes)
    except Exception:  # noqa: BLE001 - as in decode_crops
        return None


def decode_on_device(
    files: Sequence[EncodedFile], sides: Sequence[int], device: torch.device, channels: int = 3
) -> list[Tensor]:
    """The main-process side: a batch's crops on ``device``.

    Args:
        files: What the workers read, in batch order.
        sides: The side of each crop (``crop_batches``' order).
        device: Where the files are decoded and the crops cut.
        channels: 3 (RGB) or 1 (greyscale).

    Returns:
        One ``(B, C, side, side)`` uint8 batch per crop, on ``device``. A file no path
        could decode gives black crops, with a warning.
    """
    device = torch.device(device)
    todo = [i for i, f in enumerate(files) if f.data is not None]
    decoded = dict(zip(todo, _decode_jpegs([files[i].data for i in todo], device, channels)))  # type: ignore[misc]
    per_crop: list[list[Tensor]] = [[] for _ in sides]
    for i, f in enumerate(files):
        image = decoded.get(i)
        if image is not None:
            x = image.float()  # (C, H, W), once per file
            for k, side in enumerate(sides):
                per_crop[k].append(_resized(x, f.boxes[k], side))
            continue
        crops = f.crops if f.crops is not None else _pil_crops(f, sides, channels)
        if crops is None or len(crops) != len(sides):
            logger.warning("could not decode %s; using black crops", f.path)
            crops = [torch.zeros(channels, s, s, dtype=torch.uint8) for s in sides]
        for k, crop in enumerate(crops):
            per_crop[k].append(crop.to(device, non_blocking=True).float())
    return [torch.stack(c).round_().clamp_(0, 255).to(torch.uint8) for c in per_crop]
