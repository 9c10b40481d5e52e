"""Fashion-MNIST: idx files (:func:`read_idx`), gzipped or not, in its own layout or torchvision's."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ressl.data.formats.common import Split, Splits, gz_fallback, locate, read_maybe_gz, take_subset
from ressl.errors import DataError

__all__ = ["read_fashion_mnist", "read_idx"]

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FMNIST_NUM_CLASSES = 10


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an idx file (the MNIST format) of unsigned bytes, gzipped or not.

    Args:
        path: The file; ``X`` falls back to ``X.gz``.
        ndim: Expected number of dimensions (3 for images, 1 for labels), or None.

    Returns:
        A uint8 array of the stored shape.

    Raises:
        ValueError: Bad magic number, unexpected dimensions, or truncated data.
    """
    path = gz_fallback(Path(path))
    raw = read_maybe_gz(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    dims_n = raw[3]
    if raw[:3] != b"\x00\x00\x08" or (ndim is not None and dims_n != ndim):
        want = f"0x{0x800 + ndim:08x}" if ndim is not None else "0x000008NN (unsigned bytes)"
        raise DataError(
            f"{path}: bad idx magic number 0x{magic:08x}, expected {want}; "
            "the file is corrupt or not an idx file"
        )
    header = 4 + 4 * dims_n
    if len(raw) < header:
        raise DataError(f"{path}: idx header truncated")
    dims = struct.unpack(f">{dims_n}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{path}: idx header says shape {dims} ({math.prod(dims)} bytes) but the file "
            f"holds {len(raw) - header} bytes of data; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fmnist_split(d: Path, split: str) -> Split:
    img_name, lbl_name = _FMNIST_FILES[split]
    images = read_idx(d / img_name, ndim=3)  # (N, 28, 28)
    labels = read_idx(d / lbl_name, ndim=1)  # (N,)
    if len(images) != len(labels):
        raise DataError(
            f"{d}: {img_name} holds {len(images)} images but {lbl_name} {len(labels)} labels"
        )
    if labels.size and labels.max() >= _FMNIST_NUM_CLASSES:
        raise DataError(f"{d / lbl_name}: label {labels.max()} out of range 0..9")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def read_fashion_mnist(
    root: Path | None,
    *,
    system_dirs: Sequence[Path],
    cache: Path,
    download: bool,
    subset: int | None,
) -> Splits:
    """Fashion-MNIST's train and test splits: ``(N, 1, 28, 28)`` uint8, labels 0..9.

    Args:
        root: Directory checked first, in its own or torchvision's layout; or None.
        system_dirs: Where system packages install datasets (``DIR/fashion-mnist``).
        cache: Where downloads go (``cache/fashion-mnist``).
        download: Download with torchvision when not found.
        subset: Keep only the first ``subset`` training images.

    Returns:
        :class:`Splits`, ``classes`` None (the files do not name them).

    Raises:
        FileNotFoundError: The four idx files are not found and cannot be downloaded.
        ValueError: A file is corrupt.
    """
    bases = ([root, root / "fashion-mnist"] if root else []) + [
        *(d / "fashion-mnist" for d in system_dirs),
        cache / "fashion-mnist",
    ]
    # torchvision's layout too, so an existing torchvision download can be passed as root.
    candidates = [p for b in bases for p in (b, b / "FashionMNIST" / "raw")]
    required = [f for pair in _FMNIST_FILES.values() for f in pair]

    def fetch() -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache / "fashion-mnist"), train=True, download=True)

    d = locate(
        "Fashion-MNIST",
        candidates,
        required,
        download,
        fetch,
        "Install it with `apt-get install dataset-fashion-mnist`, set {data_root} to a folder "
        "holding the four idx files (gzipped or not), or allow {download} with internet access.",
        cache,
        gz_ok=True,
    )
    train = take_subset(_fmnist_split(d, "train"), subset, "fashion-mnist")
    return Splits(train, _fmnist_split(d, "test"), None)
