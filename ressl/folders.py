"""Image folders: which files belong to which split and class, and loading them as a dataset.

A folder is one split, or holds ``train/`` plus ``test/`` (or ``val/``). In a split,
first-level sub-folders that hold images are classes (as torchvision's ImageFolder);
without them every image is unlabelled (-1). :func:`load_folder` decodes each split
into memory when it fits under :data:`MAX_IN_MEMORY_BYTES`, and streams it from disk
(:class:`ressl.sources.FolderImages`) when it does not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .datasets import DatasetInfo
from .decode import decode_images, readable_images
from .imagefiles import IMAGE_EXTENSIONS, images_under, is_image_name
from .sources import FolderImages, ImageData, ImageSource, TensorImages

logger = logging.getLogger(__name__)

__all__ = ["MAX_IN_MEMORY_BYTES", "load_folder", "scan_test", "scan_train", "split_dirs"]

#: Image folders whose decoded uint8 split (N * 3 * S * S bytes) fits under this are
#: decoded once into a TensorImages; larger ones stream through FolderImages. Applied
#: to each split on its own.
MAX_IN_MEMORY_BYTES = 2 * 1024**3
_DECODE_WORKERS = min(8, os.cpu_count() or 1)
_PARALLEL_MIN_FILES = 512  # below this, decoding in-process beats starting workers


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
            split, len(loose), loose[0].name,
        )  # fmt: skip
    classes = sorted(per_class)
    files = [f for c in classes for f in per_class[c]]
    labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
    return files, labels, classes


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
        raise ValueError(f"folder:PATH must name a directory, got the file {path}")
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
        raise ValueError(
            f"no image file in {train_dir} (accepted extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    if subset is not None:
        if subset > len(files):
            logger.warning("subset=%d exceeds the %d files in %s; keeping all",
                           subset, len(files), train_dir)  # fmt: skip
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
            path, test_dir.name,
        )  # fmt: skip
        return None
    unknown = sorted(set(t_classes) - set(classes))
    if unknown:
        raise ValueError(f"{test_dir} has classes not in {train_dir}: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    return t_files, [index[f.relative_to(test_dir).parts[0]] for f in t_files]


def _folder_source(
    files: list[Path], labels: list[int], size: int, split: Path
) -> tuple[ImageSource, int]:
    """Decode a split into memory, or wrap it for streaming when too large; (source, skipped)."""
    names = [str(f) for f in files]
    workers = _DECODE_WORKERS if len(names) >= _PARALLEL_MIN_FILES else 0
    source: ImageSource
    if len(names) * 3 * size * size <= MAX_IN_MEMORY_BYTES:
        images, kept = decode_images(names, size, workers)
        source = TensorImages(images, torch.tensor(labels, dtype=torch.int64)[kept])
        readable = kept.tolist()
    else:
        readable = readable_images(names, workers)
        source = FolderImages([names[i] for i in readable], [labels[i] for i in readable], size)
        logger.info(
            "%s: %d images do not fit in memory at %d px; streaming them from disk",
            split, len(source), size,
        )  # fmt: skip
    bad = [names[i] for i in sorted(set(range(len(names))) - set(readable))]
    if bad:
        logger.warning(
            "skipped %d unreadable image file(s) under %s, e.g. %s",
            len(bad), split, ", ".join(bad[:3]),
        )  # fmt: skip
    if len(source) == 0:
        raise ValueError(
            f"no readable image in {split} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}, "
            "any case)"
        )
    return source, len(bad)


def load_folder(path: Path, size: int, subset: int | None, entry: DatasetInfo) -> ImageData:
    """An image folder as a dataset: its splits decoded (or streamed) at ``size`` px.

    Args:
        path: The folder (``train/`` + ``test/`` or ``val/``, or one split).
        size: Side of the square images (shorter side resized, centre crop).
        subset: Keep the first ``subset`` training files (sorted, so grouped by class).
        entry: The registry entry (``folder`` or ``imagenet``): name and normalisation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file instead of a folder, no readable image, or test classes
            the training split lacks.
    """
    path, train_dir, test_dir = split_dirs(path)
    files, labels, classes = scan_train(train_dir, subset)
    train, skipped = _folder_source(files, labels, size, train_dir)
    memory = train if classes else None

    test = None
    if test_dir is not None:
        labelled = scan_test(path, train_dir, test_dir, classes)
        if labelled is not None:
            test, t_skipped = _folder_source(*labelled, size, test_dir)
            skipped += t_skipped
    return ImageData(
        f"{entry.name}:{path}", train, memory, test, entry.mean, entry.std, entry.channels, size,
        classes, skipped,
    )  # fmt: skip
