"""Named image datasets as uint8 tensors + labels: ``load_dataset(spec)``.

``load_dataset`` looks a spec up in the registry (:mod:`ressl.data.registry`), reads the
files with the entry's reader (:mod:`ressl.data.formats`) or as an image folder
(:mod:`ressl.data.folders`), and returns an :class:`ressl.data.sources.ImageData`: uint8 images
``(N, C, S, S)`` with int64 labels, split into the images ReSSL trains on, a labelled
bank for the kNN monitor (``labelled``) and a labelled test split, plus the normalisation
constants the views need. Augmentation and normalisation happen later, on the device
(``ressl.views``).

Example:
    >>> data = load_dataset("fashion-mnist")                     # doctest: +SKIP
    >>> for x, y in data.train.batches(256, epoch=0, seed=0):     # doctest: +SKIP
    ...     pass  # x: (256, 1, 28, 28) uint8, y: (256,) int64
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ressl.data.folders import load_folder
from ressl.data.formats import Splits, resize_uint8
from ressl.data.registry import DatasetInfo, dataset_names, find
from ressl.data.sources import (
    FolderImages,
    ImageData,
    ImageSource,
    TensorImages,
    epoch_order,
    source_part,
)
from ressl.device import device_memory, human_bytes
from ressl.errors import ConfigError
from ressl.rules import IMAGE_SIZE

logger = logging.getLogger(__name__)

__all__ = [
    "SYSTEM_DATA_DIRS",
    "cache_dir",
    "dataset_names",
    "load_dataset",
    # where ressl 0.1.0 had them (they live in ressl.data.sources)
    "FolderImages",
    "ImageData",
    "ImageSource",
    "TensorImages",
    "epoch_order",
    "source_part",
]

#: Where Debian's dataset-* packages install (``apt-get install dataset-fashion-mnist``).
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ressl`` (default ``~/.cache/ressl``): where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ressl"


def load_dataset(
    spec: str,
    *,
    root: str | Path | None = None,
    download: bool = True,
    image_size: int | None = None,
    subset: int | None = None,
    channels: int | None = None,
) -> ImageData:
    """Load a named dataset as uint8 images and int64 labels (long only by this docstring
    and the argument checks).

    Args:
        spec: One of :func:`dataset_names`: ``"fashion-mnist"`` (1 channel, 28 px),
            ``"cifar10"`` / ``"cifar100"`` (32 px), ``"stl10"`` (100,000 unlabelled +
            5,000 labelled train images, stored at 64 px), ``"folder:PATH"`` or
            ``"imagenet:PATH"`` (an image folder at 224 px, e.g. ImageNet's
            ``train/`` + ``val/`` class folders).
        root: Directory holding the dataset files (checked first). Ignored for folders.
        download: Download missing built-in datasets with torchvision into
            :func:`cache_dir` (needs internet).
        image_size: Side of the stored images; default 28 / 32 / 64 (STL-10) / the
            files' median shorter side up to 64 (folders) / 224 (imagenet:PATH).
            Built-in datasets are resized with antialiased bilinear interpolation.
        subset: Keep only the first ``subset`` training images (for folders: the first
            ``subset`` files in sorted order, which are grouped by class). Larger than
            the split keeps it all, with a warning.
        channels: Image folders: 1 (greyscale) or 3 (RGB); default: 1 when every
            sampled file is greyscale. Built-in datasets keep their own (the caller
            compares).

    Returns:
        The :class:`ImageData`.

    Raises:
        ValueError: Unknown ``spec``, bad ``image_size`` / ``subset``, corrupt files, or
            a folder with no readable image.
        FileNotFoundError: The dataset files are not found (and cannot be downloaded),
            or a folder's path does not exist.
    """
    if image_size is not None and not IMAGE_SIZE.ok(image_size):
        raise ConfigError(f"image_size must be {IMAGE_SIZE.expect} or None, got {image_size!r}")
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise ConfigError(f"subset must be a positive int or None, got {subset!r}")
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (greyscale), 3 (RGB) or None, got {channels!r}")
    entry, path = find(spec)
    t0 = time.perf_counter()
    size = image_size or entry.image_size
    if path is not None:  # an image folder
        data = load_folder(Path(path).expanduser(), image_size, subset, entry, channels)
    else:
        assert entry.reader is not None
        splits = entry.reader(
            Path(root).expanduser() if root is not None else None,
            cache=cache_dir(),
            system_dirs=SYSTEM_DATA_DIRS,
            download=download,
            size=size,
            subset=subset,
        )
        data = _from_splits(entry, splits, size if entry.stored_size else entry.image_size)
        if data.image_size != size:
            data = _resized(data, size)
    logger.info(
        "loaded %s: %d train%s, %s test images of %d px in %.1f s",
        data.name,
        len(data.train),
        _labels(data),
        "no" if data.test is None else len(data.test),
        data.image_size,
        time.perf_counter() - t0,
    )
    return data


def _labels(data: ImageData) -> str:
    """Which training images have labels: all, some (STL-10's), or none (a flat folder,
    where nothing needs saying)."""
    if data.labelled is None:
        return ""
    return " (labelled)" if data.labelled is data.train else f" ({len(data.labelled)} labelled)"


def _resized(data: ImageData, size: int) -> ImageData:
    """Resize every TensorImages split of a built-in dataset, keeping shared objects shared."""
    done: dict[int, ImageSource] = {}

    def resize(source: ImageSource | None) -> ImageSource | None:
        if source is None or not isinstance(source, TensorImages):
            return source
        if id(source) not in done:
            n, c = source.images.shape[:2]
            check_images_fit(n, c, size)
            done[id(source)] = TensorImages(resize_uint8(source.images, size), source.labels)
        return done[id(source)]

    train = resize(data.train)
    assert train is not None
    return ImageData(
        data.name,
        train,
        resize(data.labelled),
        resize(data.test),
        data.mean,
        data.std,
        data.channels,
        size,
        data.classes,
        data.skipped,
    )


def _from_splits(entry: DatasetInfo, splits: Splits, size: int) -> ImageData:
    """A built-in dataset's splits as an ImageData (class names from the files, else the entry)."""
    train = TensorImages(*splits.train)
    labelled = TensorImages(*splits.labelled) if splits.labelled is not None else train
    classes = list(splits.classes) if splits.classes else list(entry.classes)
    return ImageData(
        entry.name,
        train,
        labelled,
        TensorImages(*splits.test),
        entry.mean,
        entry.std,
        entry.channels,
        size,
        classes,
    )


def check_images_fit(count: int, channels: int, side: int) -> None:
    """Refuse resizing ``count`` images to ``side`` px in host memory when it cannot fit.

    Raises:
        ConfigError: naming the estimate and ``image_size``.
    """
    need, available = count * channels * side * side, device_memory(torch.device("cpu"))
    if available is not None and need > available:
        raise ConfigError(
            f"{count} images of {channels}x{side}x{side} need {human_bytes(need)} of memory, "
            f"more than this machine's {human_bytes(available)}; lower {{image_size}}",
            "image_size",
        )
