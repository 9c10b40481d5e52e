"""Image folders: which files belong to which split and class, and loading them as a dataset.

A folder is one split, or holds ``train/`` plus ``test/`` (or ``val/``). In a split,
first-level sub-folders that hold images are classes (as torchvision's ImageFolder);
without them every image is unlabelled (-1). :func:`load_folder` decodes each split
into memory when it fits under :data:`MAX_IN_MEMORY_BYTES`, and streams it from disk
(:class:`ressl.data.sources.FolderImages`) when it does not.

What a folder holds decides, unless given: its channels (1 when every sampled file is
greyscale, else 3: RGB), its mean/std (ImageNet's for RGB, as the paper's code;
computed from the training images for greyscale), and, for ``folder:PATH``, its side
(the files' median shorter side, at most 64 px: small images are not upscaled).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from ressl.data.decode import decode_images, readable_images
from ressl.data.imagefiles import (
    GRAYSCALE_MODES,
    IMAGE_EXTENSIONS,
    images_under,
    is_image_name,
    opened_image,
)
from ressl.data.registry import DatasetInfo
from ressl.data.sources import FolderImages, ImageData, ImageSource, TensorImages
from ressl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["MAX_IN_MEMORY_BYTES", "load_folder", "scan_test", "scan_train", "split_dirs"]

#: Image folders whose decoded uint8 split (N * 3 * S * S bytes) fits under this are
#: decoded once into a TensorImages; larger ones stream through FolderImages. Applied
#: to each split on its own.
MAX_IN_MEMORY_BYTES = 2 * 1024**3
_DECODE_WORKERS = min(8, os.cpu_count() or 1)
_PARALLEL_MIN_FILES = 512  # below this, decoding in-process beats starting workers
_SAMPLE = 64  # files whose headers decide a folder's channels and side
_STATS_SAMPLE = 2000  # streamed greyscale images decoded for the mean/std
#: The largest side a folder defaults to (larger images are resized down to it).
DEFAULT_MAX_SIDE = 64


def _sample(files: Sequence[T], n: int) -> list[T]:
    """Up to ``n`` items spread evenly over ``files`` (sorted, so over the classes)."""
    step = max(1, len(files) // n)
    return list(files[::step][:n])


def _headers(files: Sequence[Path]) -> list[tuple[str, int]]:
    """``(mode, shorter side)`` of the sampled files PIL can open (headers only)."""
    found = []
    for f in _sample(files, _SAMPLE):
        try:
            with opened_image(f) as im:
                found.append((im.mode, min(im.size)))
        except Exception:  # noqa: BLE001 - unreadable files are skipped (and counted) later
            continue
    return found


def folder_channels(headers: Sequence[tuple[str, int]]) -> int:
    """1 when every sampled file is greyscale (``GRAYSCALE_MODES``), else 3."""
    modes = [mode for mode, _ in headers]
    return 1 if modes and all(m in GRAYSCALE_MODES for m in modes) else 3


def folder_side(headers: Sequence[tuple[str, int]]) -> int:
    """The sampled files' median shorter side, in [8, ``DEFAULT_MAX_SIDE``]."""
    sides = [side for _, side in headers]
    median = int(np.median(sides)) if sides else DEFAULT_MAX_SIDE
    return max(8, min(DEFAULT_MAX_SIDE, median))


def _grayscale_stats(source: ImageSource) -> tuple[tuple[float], tuple[float]]:
    """Mean and std in [0, 1] of greyscale training images (a sample when streamed),
    summed in float64 chunks (never a float copy of the whole split)."""
    if isinstance(source, TensorImages):
        chunks = source.images.split(4096)
    else:
        assert isinstance(source, FolderImages)
        picked = _sample(range(len(source)), _STATS_SAMPLE)
        chunks = (torch.stack([source[i][0] for i in picked]),)
    total = square = count = 0.0
    for chunk in chunks:
        values = chunk.double() / 255
        total, square = total + float(values.sum()), square + float((values * values).sum())
        count += values.numel()
    mean = total / max(count, 1.0)
    std = max(count / max(count - 1, 1.0) * (square / max(count, 1.0) - mean * mean), 0.0) ** 0.5
    return (mean,), (max(std, 1e-3),)


def _scan_split(split: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and classes of one split directory.

    With first-level sub-folders that hold images, each is a class (sorted names ->
    indices, images found recursively inside it) and loose files in the split root are
    ignored, as in torchvision's ImageFolder. Otherwise every image is unlabelled (-1).
    """
    per_class = {
        d.name: files
        for d in sorted(split.iterdir())
        if d.is_dir() and not d.name.startswith(".") and (files := images_under(d))
    }
    if not per_class:
        files = images_under(split)
        return files, [-1] * len(files), []
    loose = [f for f in split.iterdir() if f.is_file() and is_image_name(f.name)]
    if loose:
        logger.warning(
            "%s has class sub-folders; ignoring %d image(s) directly inside it, e.g. %s",
            split,
            len(loose),
            loose[0].name,
        )
    classes = sorted(per_class)
    files = [f for c in classes for f in per_class[c]]
    labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
    return files, labels, classes


def file_list_digest(files: Sequence[Path], labels: Sequence[int], root: Path) -> str:
    """A short sha256 of a split's file names (relative to ``root``) and labels, in order:
    cheap (no file is read or stat'ed), and it changes when a file is added, removed,
    renamed or moved to another class (not when one is edited in place)."""
    digest = hashlib.sha256()
    for file, label in zip(files, labels, strict=True):
        try:
            name = file.relative_to(root).as_posix()
        except ValueError:
            name = file.as_posix()
        digest.update(f"{label}\t{name}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def split_dirs(path: Path) -> tuple[Path, Path, Path | None]:
    """``(folder resolved, train directory, test directory or None)`` of an image folder.

    ``train/`` with ``test/`` (or ``val/``) are the splits; otherwise the whole folder is
    the training split and there is no test split.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a file.
    """
    if not path.exists():
        raise FileNotFoundError(f"image folder {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"folder:PATH must name a directory, got the file {path}")
    path = path.resolve()
    test_dir = next((path / s for s in ("test", "val") if (path / s).is_dir()), None)
    train_dir = path / "train" if (path / "train").is_dir() and test_dir else path
    if train_dir == path:
        test_dir = None
    return path, train_dir, test_dir


def scan_train(train_dir: Path, subset: int | None) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and classes of the training split, cut to the first ``subset`` files.

    Raises:
        ValueError: No image file in ``train_dir``.
    """
    files, labels, classes = _scan_split(train_dir)
    if not files:
        raise DataError(
            f"no image file in {train_dir} (accepted extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    if subset is not None:
        if subset > len(files):
            logger.warning(
                "subset=%d exceeds the %d files in %s; keeping all", subset, len(files), train_dir
            )
        files, labels = files[:subset], labels[:subset]
    return files, labels, classes


def scan_test(
    path: Path, train_dir: Path, test_dir: Path, classes: Sequence[str]
) -> tuple[list[Path], list[int]] | None:
    """Files and labels of the test split, labelled with the training split's ``classes``.

    Returns:
        None (with a warning) when either split lacks class sub-folders: evaluation
        needs labels in both.

    Raises:
        ValueError: The test split has a class the training split lacks.
    """
    t_files, _, t_classes = _scan_split(test_dir)
    if not classes or not t_classes:
        logger.warning(
            "%s: ignoring the %s split: evaluation needs class sub-folders in both splits",
            path,
            test_dir.name,
        )
        return None
    unknown = sorted(set(t_classes) - set(classes))
    if unknown:
        raise DataError(f"{test_dir} has classes not in {train_dir}: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    return t_files, [index[f.relative_to(test_dir).parts[0]] for f in t_files]


def _folder_source(
    files: list[Path], labels: list[int], size: int, split: Path, channels: int
) -> tuple[ImageSource, int]:
    """Decode a split into memory, or wrap it for streaming when too large; (source, skipped)."""
    names = [str(f) for f in files]
    workers = _DECODE_WORKERS if len(names) >= _PARALLEL_MIN_FILES else 0
    source: ImageSource
    if len(names) * channels * size * size <= MAX_IN_MEMORY_BYTES:
        images, kept = decode_images(names, size, workers, channels)
        source = TensorImages(images, torch.tensor(labels, dtype=torch.int64)[kept])
        readable = kept.tolist()
    else:
        readable = readable_images(names, workers)
        source = FolderImages(
            [names[i] for i in readable], [labels[i] for i in readable], size, channels
        )
        logger.info(
            "%s: %d images do not fit in memory at %d px; streaming them from disk",
            split,
            len(source),
            size,
        )
    bad = [names[i] for i in sorted(set(range(len(names))) - set(readable))]
    if bad:
        logger.warning(
            "skipped %d unreadable image file(s) under %s, e.g. %s",
            len(bad),
            split,
            ", ".join(bad[:3]),
        )
    if len(source) == 0:
        raise DataError(
            f"no readable image in {split} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}, "
            "any case)"
        )
    return source, len(bad)


def _channels_and_side(
    files: Sequence[Path],
    train_dir: Path,
    entry: DatasetInfo,
    channels: int | None,
    size: int | None,
) -> tuple[int, int]:
    """The channels and side to train on: as given, else read from the files' headers
    (channels; the side for ``folder``) or the entry's side."""
    headers = _headers(files) if channels is None or size is None else []
    if channels is None:
        channels = folder_channels(headers)
        if channels == 1:
            logger.info("%s: the images are greyscale; training on 1 channel", train_dir)
    if size is None and entry.name == "folder":
        size = folder_side(headers)
        logger.info(
            "%s: images of %d px (the files' median shorter side, at most %d)",
            train_dir,
            size,
            DEFAULT_MAX_SIDE,
        )
    return channels, size or entry.image_size


def load_folder(
    path: Path,
    size: int | None,
    subset: int | None,
    entry: DatasetInfo,
    channels: int | None = None,
) -> ImageData:
    """An image folder as a dataset: its splits decoded (or streamed) at ``size`` px.

    Args:
        path: The folder (``train/`` + ``test/`` or ``val/``, or one split).
        size: Side of the square images (shorter side resized, centre crop); None: the
            entry's side for ``imagenet``, the files' (``folder_side``) for ``folder``.
        subset: Keep the first ``subset`` training files (sorted, so grouped by class).
        entry: The registry entry (``folder`` or ``imagenet``): name and normalisation.
        channels: 1 (greyscale) or 3 (RGB); None: the files' (``folder_channels``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file instead of a folder, no readable image, or test classes
            the training split lacks.
    """
    path, train_dir, test_dir = split_dirs(path)
    files, labels, classes = scan_train(train_dir, subset)
    identity = (len(files), file_list_digest(files, labels, train_dir))
    channels, size = _channels_and_side(files, train_dir, entry, channels, size)
    train, skipped = _folder_source(files, labels, size, train_dir, channels)
    labelled_train = train if classes else None

    test = None
    if test_dir is not None:
        labelled = scan_test(path, train_dir, test_dir, classes)
        if labelled is not None:
            test, t_skipped = _folder_source(*labelled, size, test_dir, channels)
            skipped += t_skipped
    mean, std = (entry.mean, entry.std) if channels == 3 else _grayscale_stats(train)
    return ImageData(
        f"{entry.name}:{path}",
        train,
        labelled_train,
        test,
        mean,
        std,
        channels,
        size,
        classes,
        skipped,
        identity,
    )
