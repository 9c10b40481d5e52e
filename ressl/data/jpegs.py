"""JPEGs decoded where the model trains: workers read bytes, the device decodes and crops.

The ``device`` decode path of streamed folders (``FolderImages.crop_batches``). A
DataLoader worker reads a file's header and bytes and draws its crop boxes, the same
draws as the PIL path (:func:`ressl.data.decode.decode_crops`), so both paths cut the same
crops. The main process hands a batch's bytes to ``torchvision.io.decode_jpeg`` on the
training device (nvjpeg on CUDA, the whole batch in one call) and cuts the crops there,
resized with antialiased bilinear filtering (PIL's filter; the pixels differ by the
decoders' rounding and at a crop's border, where PIL's filter reads the pixels just
outside the box and torch's stops at its edge). Files that
are not plain JPEGs (PNG and other formats, CMYK, an EXIF rotation) are decoded by PIL
in the worker as before; a JPEG the device cannot decode falls back to PIL too.

A batch crosses from the workers as a few tensors (all its bytes in one, the crops PIL
cut stacked per crop), not one shared-memory file descriptor per file. Each device's
decoder (:func:`decoder_for`) is probed once, remembers when it is broken, and counts
where it decoded what (:class:`DecodeCounts`), so a test can tell device decodes from
PIL fallbacks.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from ressl.data.decode import crop_boxes, cut_crops, decode_crops, pil_mode
from ressl.data.imagefiles import as_mode, is_upright, opened_image
from ressl.errors import first_line

__all__ = [
    "MAX_RESIZE_FACTOR",
    "DecodeCounts",
    "DeviceDecoder",
    "EncodedBatch",
    "EncodedFile",
    "decode_on_device",
    "decode_place",
    "decoder_for",
    "read_for_device",
    "resize_box",
]

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
    """A batch as the workers deliver it: every file's bytes in one tensor, the crops PIL
    cut stacked per crop, the boxes and labels.

    A worker hands each tensor of a batch to the main process through a shared-memory
    file descriptor, held open while the batch waits in the prefetch queue. One tensor
    per file held two descriptors per file in flight (about 4,000 with 16 workers and
    batches of 128, past a ``ulimit -n`` of 1024); packed, a batch holds a few.

    Attributes:
        paths: The files, in batch order.
        boxes: Per file, ``(top, left, h, w)`` per crop (``[]`` where never drawn).
        data: ``(N,)`` uint8: the bytes of the files the device decodes, one after another.
        spans: Per file, ``(start, stop)`` of its bytes in ``data``; None where it has none.
        crops: Per crop, ``(M, C, s, s)`` uint8: the crops PIL cut in the workers for the
            rows ``crop_rows`` (``[]`` when no file needed it).
        crop_rows: The batch rows whose crops ``crops`` holds.
        labels: ``(B,)`` int64.
    """

    paths: list[str]
    boxes: list[list[tuple[int, int, int, int]]]
    data: Tensor
    spans: list[tuple[int, int] | None]
    crops: list[Tensor]
    crop_rows: list[int]
    labels: Tensor

    @property
    def files(self) -> list[EncodedFile]:
        """The batch's files, their bytes and crops views into the batch's tensors."""
        crops_of = {row: [c[j] for c in self.crops] for j, row in enumerate(self.crop_rows)}
        out = []
        for i, (path, boxes, span) in enumerate(zip(self.paths, self.boxes, self.spans)):
            data = None if span is None else self.data[span[0] : span[1]]
            out.append(EncodedFile(path, data, boxes, crops_of.get(i)))
        return out

    def pin_memory(self) -> EncodedBatch:
        """Page-locked tensors, so the copies to the GPU do not wait (``DataLoader(pin_memory=True)``)."""
        return replace(
            self,
            data=self.data.pin_memory(),
            crops=[c.pin_memory() for c in self.crops],
            labels=self.labels.pin_memory(),
        )


def collate_encoded(items: list[tuple[EncodedFile, int]]) -> EncodedBatch:
    """The DataLoader's ``collate_fn`` (run in the worker): a batch's files packed into
    one byte tensor and one crop stack per crop (:class:`EncodedBatch`)."""
    files = [f for f, _ in items]
    chunks: list[Tensor] = []
    spans: list[tuple[int, int] | None] = []
    start = 0
    for f in files:
        if f.data is None:
            spans.append(None)
            continue
        chunks.append(f.data)
        spans.append((start, start + len(f.data)))
        start += len(f.data)
    data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    rows = [i for i, f in enumerate(files) if f.crops is not None]
    per_file = [files[i].crops for i in rows]
    crops = [torch.stack(c) for c in zip(*per_file)]  # type: ignore[misc]
    labels = torch.tensor([y for _, y in items])
    paths, boxes = [f.path for f in files], [f.boxes for f in files]
    return EncodedBatch(paths, boxes, data, spans, crops, rows, labels)


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
    decoded here with PIL (:func:`ressl.data.decode.decode_crops`; None when that fails).

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


#: One side stream per CUDA device for nvjpeg (see ``_decode_jpegs``).
_STREAMS: dict[torch.device, Any] = {}

#: Device types on which ``--decode auto`` decodes on the device (when its decoder works).
AUTO_DEVICE_TYPES = ("cuda",)

#: The probe JPEG's colour, and how far (levels of 255) the decoded mean may be from it.
_PROBE_RGB, _PROBE_TOLERANCE = (200, 40, 90), 8.0


@dataclass
class DecodeCounts:
    """The files of the batches a :class:`DeviceDecoder` was handed, by who decoded them."""

    device: int = 0  # decode_jpeg on the device
    workers: int = 0  # PIL in the workers: not plain JPEGs
    fallback: int = 0  # PIL in this process: JPEGs the device did not decode
    failed: int = 0  # nothing: black crops


@dataclass
class DeviceDecoder:
    """``decode_jpeg`` on one device: whether it works (probed at most once) and its counts.

    Attributes:
        device: Where it decodes.
        works: Whether it decoded the probe JPEG; None until probed. Once False, batches
            skip the device and go to PIL at once.
        failure: Why the probe failed ("" until it has).
        counts: Where the files handed to :func:`decode_on_device` were decoded.
    """

    device: torch.device
    works: bool | None = None
    failure: str = ""
    counts: DecodeCounts = field(default_factory=DecodeCounts)

    def probe(self) -> bool:
        """Whether the device decodes a 16 x 16 JPEG to its colour: tried once, then known."""
        if self.works is None:
            self.failure = _probe_failure(self.device)
            self.works = not self.failure
        return self.works


#: The decoder of each device (``decoder_for``).
_DECODERS: dict[str, DeviceDecoder] = {}


def decoder_for(device: torch.device | str) -> DeviceDecoder:
    """The one :class:`DeviceDecoder` of ``device`` (``cuda`` is the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _DECODERS.setdefault(str(device), DeviceDecoder(device))


def _probe_jpeg() -> Tensor:
    """A 16 x 16 JPEG of one colour (``_PROBE_RGB``), as ``(N,)`` uint8 bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), _PROBE_RGB).save(buffer, format="JPEG", quality=90)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _probe_failure(device: torch.device) -> str:
    """Why ``decode_jpeg`` on ``device`` does not decode the probe JPEG to its colour ("":
    it does)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():  # torchvision >= 0.29: TorchCodec will take this over
            warnings.simplefilter("ignore", DeprecationWarning)
            (image,) = decode_jpeg([_probe_jpeg()], mode=ImageReadMode.RGB, device=device)
        mean = image.float().mean(dim=(1, 2)).cpu()  # (3,); a sync, once per device
    except Exception as error:  # noqa: BLE001 - a missing or broken decoder raises anything
        return f"{type(error).__name__}: {first_line(error)}"  # CUDA errors run long
    expected = torch.tensor(_PROBE_RGB, dtype=torch.float32)
    if image.shape != (3, 16, 16) or (mean - expected).abs().max() > _PROBE_TOLERANCE:
        return f"decoded {tuple(image.shape)} of mean {mean.tolist()}, not {_PROBE_RGB}"
    return ""


def decode_place(requested: str, device: torch.device | str) -> str:
    """Where a run decodes its streamed JPEGs: ``"workers"`` or ``"device"``.

    ``auto`` is ``device`` on CUDA when the device decodes a probe JPEG
    (:meth:`DeviceDecoder.probe`, once per device), else ``workers``. Where the probe
    fails (a torchvision without nvjpeg), one warning says so and the workers decode:
    otherwise every batch would fall back to PIL in the training process, 10-20x slower.
    ``workers`` and ``device`` are kept as asked.
    """
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type not in AUTO_DEVICE_TYPES:
        return "workers"
    decoder = decoder_for(device)
    first = decoder.works is None
    if decoder.probe():
        return "device"
    if first:
        why = f"decode_jpeg failed on a probe image on {device} ({decoder.failure})"
        logger.warning("%s; --decode auto decodes the JPEGs in the DataLoader workers", why)
    return "workers"


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
        return _decode_all(data, device, channels)
    main = torch.cuda.current_stream(device)
    side = _STREAMS.setdefault(device, torch.cuda.Stream(device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = _decode_all(data, device, channels)
    main.wait_stream(side)
    for image in out:
        if image is not None:
            image.record_stream(main)
    return out


#: The largest downscale (box pixels per crop pixel, per axis) left to one antialiased
#: resize; a larger one is area-averaged first (``adaptive_avg_pool2d``) to within this
#: factor. CUDA's antialiased bilinear kernel holds its weights in a block's 48 KiB of
#: shared memory, about ``(2 * ceil(factor) + 1) * 65`` float32 values, and refuses
#: factors above about 94 (a 4000-px box to a 32-px crop is 125); 32 leaves a margin of
#: 3. Evidence: smooth boxes of 1,000 to 4,000 px cut to 24 and 32 px came within 0.2
#: levels of 255 of the direct resize on average, 1.3 at most (integer pooling with
#: partial windows: 0.5 and 3); tests/data/test_jpegs.py checks a 4000-px box.
MAX_RESIZE_FACTOR = 32


def _pooled_size(length: int, side: int) -> int:
    """The length an axis is area-averaged to before resizing it to ``side``: itself
    when within ``MAX_RESIZE_FACTOR`` of ``side``, else ``length`` divided by the
    smallest integer that brings it there (rounded up)."""
    return math.ceil(length / max(1, math.ceil(length / (side * MAX_RESIZE_FACTOR))))


def resize_box(image: Tensor, box: tuple[int, int, int, int], side: int) -> Tensor:
    """The ``box`` ``(top, left, h, w)`` of a uint8 ``(C, H, W)`` image resized to a float
    ``(C, side, side)`` crop (antialiased bilinear).

    Only the box is converted to float, never the whole image. A box more than
    ``MAX_RESIZE_FACTOR`` times the side along an axis is area-averaged to within that
    factor first, which CUDA's antialiased resize can then take.
    """
    top, left, h, w = box
    crop = image[None, :, top : top + h, left : left + w].float()  # (1, C, h, w)
    pooled = (_pooled_size(h, side), _pooled_size(w, side))
    if pooled != (h, w):
        crop = F.adaptive_avg_pool2d(crop, pooled)  # (1, C, h / k_h, w / k_w)
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

    The device's decoder (:func:`decoder_for`) counts where each file was decoded. When
    it decodes none of a batch's JPEGs, it is probed; if it fails the probe too, one
    warning says so, and from then on its batches go to PIL here without trying it.

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
    decoder = decoder_for(device)
    todo = [i for i, f in enumerate(files) if f.data is not None]
    decoded: dict[int, Tensor | None] = {}
    if todo and decoder.works is not False:
        data = [files[i].data for i in todo]
        decoded = dict(zip(todo, _decode_jpegs(data, device, channels)))  # type: ignore[arg-type]
        if all(image is None for image in decoded.values()) and not decoder.probe():
            why = f"decode_jpeg decoded none of a batch's {len(todo)} JPEGs on {device}"
            then = "they are decoded with PIL in this process from now on (slow)"
            advice = "train with --decode workers"
            logger.warning("%s, nor a probe image (%s): %s; %s", why, decoder.failure, then, advice)
    per_crop: list[list[Tensor]] = [[] for _ in sides]
    counts = decoder.counts
    for i, f in enumerate(files):
        image = decoded.get(i)
        if image is not None:
            counts.device += 1
            for k, side in enumerate(sides):
                per_crop[k].append(resize_box(image, f.boxes[k], side))
            continue
        if f.crops is not None:
            counts.workers += 1
            crops: list[Tensor] | None = f.crops
        else:
            crops = _pil_crops(f, sides, channels)
            counts.fallback += crops is not None
        if crops is None or len(crops) != len(sides):
            counts.failed += 1
            logger.warning("could not decode %s; using black crops", f.path)
            crops = [torch.zeros(channels, s, s, dtype=torch.uint8) for s in sides]
        for k, crop in enumerate(crops):
            per_crop[k].append(crop.to(device, non_blocking=True).float())
    return [torch.stack(c).round_().clamp_(0, 255).to(torch.uint8) for c in per_crop]
