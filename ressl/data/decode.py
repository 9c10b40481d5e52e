"""Decoding image files to uint8 tensors with PIL: one file, its random crops, or many in workers.

:func:`decode_image` turns one file into ``(3, S, S)`` uint8: RGB, shorter side resized,
centre crop (the evaluation resize, shared with ``ressl.export``). :func:`decode_crops`
cuts RandomResizedCrops from the full-resolution file (streamed training folders).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ressl.data.imagefiles import as_mode, decode_to_size, opened_image
from ressl.errors import ConfigError

__all__ = [
    "crop_boxes",
    "cut_crops",
    "decode_crops",
    "decode_image",
    "decode_images",
    "ignore_stop_signals",
    "pil_mode",
    "readable_images",
]


def pil_mode(channels: int) -> str:
    """The PIL mode of ``channels``: "L" for 1, "RGB" for 3."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


def decode_image(path: str | Path, size: int, channels: int = 3) -> Tensor | None:
    """Decode one image file to ``(C, size, size)`` uint8: RGB (or greyscale for one
    channel), shorter side resized, centre crop.

    Args:
        path: The image file.
        size: Side of the result.
        channels: 3 (RGB) or 1 (greyscale).

    Returns:
        The image, or None when the file cannot be decoded.
    """
    mode = pil_mode(channels)
    try:
        image = decode_to_size(path, size, mode)  # the one decode, shared with ressl.export
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None
    return _chw(image)


def decode_crops(
    path: str | Path,
    crops: Sequence[tuple[int, tuple[float, float]]],
    generator: torch.Generator,
    channels: int = 3,
) -> list[Tensor] | None:
    """Decode one file at full resolution and cut RandomResizedCrops from it.

    The standard ImageNet pipeline: each crop's box is drawn on the original image
    (area fraction in its scale range, aspect ratio in [3/4, 4/3], as
    ``RandomResizedCrop.get_params``), then resized to its side with PIL's
    antialiased bilinear filter. Flips and colour ops are left to the device.

    Args:
        path: The image file.
        crops: ``(side, (scale_lo, scale_hi))`` per crop.
        generator: CPU generator the boxes are drawn from.
        channels: 3 (RGB) or 1 (greyscale).

    Returns:
        One ``(C, side, side)`` uint8 tensor per crop, or None when the file cannot
        be decoded.
    """
    mode = pil_mode(channels)
    try:
        with opened_image(path) as im:  # a regular file (a pipe would block)
            rgb = as_mode(im, mode)
        boxes = crop_boxes(rgb.size[1], rgb.size[0], crops, generator)
        return cut_crops(rgb, [side for side, _ in crops], boxes)
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None


def crop_boxes(
    height: int,
    width: int,
    crops: Sequence[tuple[int, tuple[float, float]]],
    generator: torch.Generator,
) -> list[tuple[int, int, int, int]]:
    """One RandomResizedCrop box ``(top, left, h, w)`` per crop of a ``height x width``
    image, drawn in order from ``generator`` (both decode paths draw these)."""
    from ressl.views import sample_crop_boxes  # views imports nothing from here

    return [
        tuple(sample_crop_boxes(1, height, width, generator=generator, scale=scale)[0].tolist())
        for _, scale in crops
    ]  # type: ignore[misc]


def cut_crops(
    image: Image.Image, sides: Sequence[int], boxes: Sequence[tuple[int, int, int, int]]
) -> list[Tensor]:
    """Each box of ``image`` resized to its side with PIL's antialiased bilinear filter:
    one ``(C, side, side)`` uint8 tensor per box."""
    out = []
    for side, (top, left, bh, bw) in zip(sides, boxes):
        crop = image.resize(
            (side, side), Image.Resampling.BILINEAR, box=(left, top, left + bw, top + bh)
        )
        out.append(_chw(crop))
    return out


def _chw(image: Image.Image | np.ndarray) -> Tensor:
    """A PIL image or ``(H, W, C)`` array as a contiguous ``(C, H, W)`` uint8 tensor of its own."""
    array = np.array(image, dtype=np.uint8)  # np.array copies: PIL's buffer is read-only
    hwc = torch.from_numpy(array if array.ndim == 3 else array[:, :, None])  # greyscale: (H, W)
    return rearrange(hwc, "h w c -> c h w").contiguous()


def _can_open(path: str | Path) -> bool:
    """Header check only (cheap): can PIL identify the image and its size?"""
    try:
        with opened_image(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:  # noqa: BLE001 - as in decode_image
        return False


class _MapFiles(Dataset):
    """``(index, fn(file))`` pairs, so a DataLoader can run ``fn`` over files in workers.

    A tensor result travels as a numpy array: pickled through the workers' queue, not
    shared through one file descriptor per tensor (per file, here), whose hand-over
    broke with a traceback when the main process stopped on a signal mid-transfer.
    """

    def __init__(self, fn: Callable[[str], Any], files: Sequence[str]) -> None:
        self.fn, self.files = fn, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        out = self.fn(self.files[i])
        return i, out.numpy() if isinstance(out, Tensor) else out


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM and Ctrl-C are left to the main process.

    ``timeout``, Slurm's ``scancel`` and a terminal's Ctrl-C signal the whole process
    group. A worker that died of the signal (or raised the main process's stop
    exception) made the main process's DataLoader report "worker killed by signal"
    with a traceback, even as it was stopping cleanly. Ignoring them, workers finish
    when the main process shuts its loader down (or exits: they watch it).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _map_files(
    fn: Callable[[str], Any], files: Sequence[str], workers: int
) -> Iterator[tuple[int, Any]]:
    """``(index, fn(file))`` for every file, in order; in ``workers`` processes when > 1."""
    if workers <= 1:
        yield from ((i, fn(f)) for i, f in enumerate(files))
        return
    loader = DataLoader(
        _MapFiles(fn, files),
        batch_size=64,
        num_workers=workers,
        collate_fn=_as_list,
        worker_init_fn=ignore_stop_signals,
    )
    for chunk in loader:
        yield from (
            (i, torch.from_numpy(out) if isinstance(out, np.ndarray) else out) for i, out in chunk
        )


def decode_images(
    files: Sequence[str], size: int, workers: int = 0, channels: int = 3
) -> tuple[Tensor, Tensor]:
    """Decode every file with :func:`decode_image`, skipping those that fail.

    Args:
        files: Image paths.
        size: Side of the square images.
        workers: Decode in this many worker processes (0 or 1: in this process).
        channels: 3 (RGB) or 1 (greyscale).

    Returns:
        ``(images (K, C, size, size) uint8, kept (K,) int64)``: the decodable files, in
        order, and their indices into ``files``.
    """
    images = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    ok = torch.zeros(len(files), dtype=torch.bool)
    for i, image in _map_files(partial(decode_image, size=size, channels=channels), files, workers):
        if image is not None:
            images[i], ok[i] = image, True
    kept = ok.nonzero().squeeze(1)
    if len(kept) < len(files):
        images = images.index_select(0, kept)
    return images, kept


def readable_images(files: Sequence[str], workers: int = 0) -> list[int]:
    """Indices of the files whose header PIL can read (cheap: nothing is decoded)."""
    return [i for i, good in _map_files(_can_open, files, workers) if good]
