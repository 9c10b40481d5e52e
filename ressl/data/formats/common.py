"""What every reader shares: the Splits it returns, finding (or downloading) its files,
subsets, and resizing uint8 images."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ressl.errors import DataError, DataNotFoundError

logger = logging.getLogger("ressl.data.formats")

__all__ = [
    "Split",
    "Splits",
    "gz_fallback",
    "locate",
    "read_maybe_gz",
    "resize_chunk",
    "resize_uint8",
    "take_subset",
]

RESIZE_CHUNK = 2048  # images per interpolate call: bounds the float32 working memory

#: ``(images (N, C, S, S) uint8, labels (N,) int64)``, labels -1 = unlabelled.
Split = tuple[Tensor, Tensor]


class Splits(NamedTuple):
    """What a reader returns.

    Attributes:
        train: The images to train on (after ``subset``).
        test: The labelled test split.
        classes: Class names stored with the files, index = label; None when the files
            store none (the caller supplies them).
        labelled: Labelled training images when ``train`` is partly unlabelled (STL-10);
            None when ``train`` itself is labelled.
    """

    train: Split
    test: Split
    classes: list[str] | None
    labelled: Split | None = None


def take_subset(split: Split, subset: int | None, name: str) -> Split:
    images, labels = split
    if subset is None or subset == len(images):
        return split
    if subset > len(images):
        logger.warning(
            "subset=%d exceeds the %d %s training images; keeping all", subset, len(images), name
        )
        return split
    return images[:subset].clone(), labels[:subset].clone()  # copied so the rest can be freed


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of ``(N, C, H, W)`` uint8 to ``(N, C, size, size)``."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, len(images), RESIZE_CHUNK):
        out[s : s + RESIZE_CHUNK] = resize_chunk(images[s : s + RESIZE_CHUNK], size)
    return out


def resize_chunk(images: Tensor, size: int) -> Tensor:
    x = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _find_dir(candidates: Sequence[Path], required: Sequence[str], gz_ok: bool) -> Path | None:
    """The first candidate directory holding every required file (or ``file.gz``)."""
    for d in candidates:
        if all((d / f).is_file() or (gz_ok and (d / f"{f}.gz").is_file()) for f in required):
            return d
    return None


def locate(
    what: str,
    candidates: Sequence[Path],
    required: Sequence[str],
    download: bool,
    fetch: Callable[[], None],
    how: str,  # what to do, naming {data_root} and {download} (keywords, or flags on the CLI)
    cache: Path,
    gz_ok: bool = False,
) -> Path:
    """Find the dataset directory, downloading into ``cache`` with ``fetch`` once if missing."""
    found = _find_dir(candidates, required, gz_ok)
    error: BaseException | None = None
    if found is None and download:
        logger.info("%s not found locally; downloading into %s", what, cache)
        try:
            fetch()
        except Exception as e:  # noqa: BLE001 - offline, mirror down, disk full: reported below
            error = e
        found = _find_dir(candidates, required, gz_ok)
    if found is None:
        dirs = "\n  ".join(str(d) for d in dict.fromkeys(candidates))
        msg = f"{what} not found: looked for {', '.join(required)} in\n  {dirs}\n{how}"
        if error is not None:
            msg += f"\nThe download failed: {type(error).__name__}: {error}"
        raise DataNotFoundError(msg, "data_root", "download")
    return found


def gz_fallback(path: Path) -> Path:
    """``path`` itself if it exists, else ``path.gz``."""
    return path if path.is_file() else path.with_name(path.name + ".gz")


def read_maybe_gz(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}); delete it and reload") from e
