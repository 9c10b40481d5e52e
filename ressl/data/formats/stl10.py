"""STL-10: the column-major ``*_X.bin`` / ``*_y.bin`` binaries, memory-mapped and resized in chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from ressl.data.formats.common import RESIZE_CHUNK, Splits, locate, logger, resize_chunk
from ressl.errors import DataError

__all__ = ["read_stl10"]

_STL_SIDE = 96
_STL_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]


def _stl_count(path: Path) -> int:
    per = 3 * _STL_SIDE * _STL_SIDE
    size = path.stat().st_size
    if size == 0 or size % per:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of 3x96x96 images; the file is "
            "truncated or corrupt"
        )
    return size // per


def _read_stl_images(path: Path, size: int, count: int | None = None) -> Tensor:
    """``(N, 3, size, size)`` uint8 from an STL-10 ``*_X.bin``, resized in chunks."""
    n_all = _stl_count(path)
    n = n_all if count is None else min(count, n_all)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    # memmap + chunks: the 2.7 GB unlabeled file is never held whole in memory.
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(n_all, 3, _STL_SIDE, _STL_SIDE))
    try:
        for s in range(0, n, RESIZE_CHUNK):
            block = torch.from_numpy(np.array(mm[s : min(s + RESIZE_CHUNK, n)]))  # copy
            block = rearrange(block, "n c w h -> n c h w")  # stored column-major
            out[s : s + len(block)] = block if size == _STL_SIDE else resize_chunk(block, size)
    finally:
        del mm
    return out


def _read_stl_labels(path: Path, n: int) -> Tensor:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    if len(labels) != n or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path}: expected {n} labels in 1..10, got {len(labels)} labels")
    return torch.from_numpy(labels)


def read_stl10(
    root: Path | None, *, cache: Path, download: bool, size: int, subset: int | None
) -> Splits:
    """STL-10 at ``size`` px: unlabelled + labelled train images, the labelled ones, test.

    Args:
        root: Directory holding ``stl10_binary/``, or that directory itself; or None.
        cache: Where downloads go.
        download: Download with torchvision when not found (2.6 GB).
        size: Side of the returned images (antialiased resize from 96).
        subset: Keep only the first ``subset`` training images; only the unlabelled
            images kept are read.

    Returns:
        :class:`Splits`: ``train`` is the unlabelled images (label -1) then the labelled
        train split, ``labelled`` the labelled train split, ``classes`` from
        ``class_names.txt`` or None when that file is missing.

    Raises:
        FileNotFoundError: The binaries are not found and cannot be downloaded.
        ValueError: A file is truncated or holds labels outside 1..10.
    """
    candidates = ([root / "stl10_binary", root] if root else []) + [cache / "stl10_binary"]

    def fetch() -> None:
        from torchvision.datasets import STL10

        STL10(str(cache), split="train+unlabeled", download=True)
        (cache / "stl10_binary.tar.gz").unlink(missing_ok=True)

    d = locate(
        "STL-10",
        candidates,
        _STL_FILES,
        download,
        fetch,
        "Set {data_root} to a folder holding stl10_binary/, or allow {download} with internet "
        "access (a 2.6 GB download).",
        cache,
    )
    names_file = d / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else None

    labelled = _read_stl_images(d / "train_X.bin", size)
    labelled_y = _read_stl_labels(d / "train_y.bin", len(labelled))
    test_x = _read_stl_images(d / "test_X.bin", size)
    test_y = _read_stl_labels(d / "test_y.bin", len(test_x))

    # train = unlabeled + labelled train; a subset reads only the unlabeled images it keeps.
    n_unl = _stl_count(d / "unlabeled_X.bin")
    total = n_unl + len(labelled)
    keep = total if subset is None else min(subset, total)
    if subset is not None and subset > total:
        logger.warning("subset=%d exceeds the %d stl10 training images; keeping all", subset, total)
    images = torch.empty((keep, 3, size, size), dtype=torch.uint8)
    k_unl = min(keep, n_unl)
    images[:k_unl] = _read_stl_images(d / "unlabeled_X.bin", size, k_unl)
    images[k_unl:] = labelled[: keep - k_unl]
    labels = torch.cat([torch.full((k_unl,), -1, dtype=torch.int64), labelled_y])[:keep]
    return Splits((images, labels), (test_x, test_y), classes, labelled=(labelled, labelled_y))
