"""CIFAR-10 / CIFAR-100: the "python version" pickled batches, read with an unpickler that
refuses every global but the few numpy ones the batches hold."""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from ressl.data.formats.common import Split, Splits, locate, take_subset
from ressl.errors import DataError

__all__ = ["read_cifar"]

_CIFAR = {
    # name: (directory, train files, test file, meta file, label key, class key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def _np_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, strings, numpy arrays).

    A plain ``pickle.load`` runs whatever code a file names; these files come from the
    internet or a user's disk, so every global outside this list is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            ("_codecs", "encode"): lambda: codecs.encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: CIFAR batches hold only dicts, "
                "lists and numpy arrays"
            )
        return allowed[(module, name)]()


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR "python version" batch; keys come back as str."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a readable CIFAR batch: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(  # noqa: TRY004 - bad file content, not a bad argument
            f"{path} is not a CIFAR batch: holds {type(obj).__name__}, not dict"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(d: Path, files: Sequence[str], label_key: str) -> Split:
    images, labels = [], []
    for name in files:
        batch = _unpickle(d / name)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{d / name} lacks 'data' or {label_key!r}: not a CIFAR batch")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DataError(
                f"{d / name}: data of shape {data.shape} with {len(lab)} labels; "
                "expected (N, 3072) with N labels"
            )
        images.append(rearrange(data, "n (c h w) -> n c h w", c=3, h=32))  # R, G, B planes
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_cifar(
    name: str, root: Path | None, *, cache: Path, download: bool, subset: int | None
) -> Splits:
    """CIFAR-10 or CIFAR-100 ("python version"): ``(N, 3, 32, 32)`` uint8 and class names.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        root: Directory holding the batch directory, or the batch directory itself; or None.
        cache: Where downloads go.
        download: Download with torchvision when not found.
        subset: Keep only the first ``subset`` training images.

    Returns:
        :class:`Splits` with the class names from the meta file.

    Raises:
        FileNotFoundError: The batches are not found and cannot be downloaded.
        ValueError: A batch is corrupt, holds anything but plain data, or a label has no
            class name.
    """
    dirname, train_files, test_file, meta_file, label_key, class_key = _CIFAR[name]
    candidates = ([root / dirname, root] if root else []) + [cache / dirname]

    def fetch() -> None:
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if name == "cifar10" else CIFAR100)(str(cache), download=True)
        for archive in cache.glob("cifar-*-python.tar.gz"):
            archive.unlink()  # extracted; 160 MB not worth keeping

    d = locate(
        name,
        candidates,
        [*train_files, test_file, meta_file],
        download,
        fetch,
        f"Set {{data_root}} to a folder holding {dirname}/ (the CIFAR 'python version'), "
        "or allow {download} with internet access.",
        cache,
    )
    meta = _unpickle(d / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(class_key, [])]
    train = take_subset(_cifar_split(d, train_files, label_key), subset, name)
    test = _cifar_split(d, [test_file], label_key)
    top = int(max(train[1].max(), test[1].max()))
    if len(classes) <= top:
        raise DataError(f"{d / meta_file}: {len(classes)} class names but label {top} occurs")
    return Splits(train, test, classes)
