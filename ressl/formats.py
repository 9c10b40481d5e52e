"""The built-in datasets' files: found (or downloaded) and read as uint8 tensors.

* Fashion-MNIST: idx files (:func:`read_idx`), gzipped or not, in its own layout or
  torchvision's.
* CIFAR-10 / CIFAR-100: the "python version" pickled batches, read with an unpickler
  that refuses every global but the few numpy ones the batches hold.
* STL-10: the column-major ``*_X.bin`` / ``*_y.bin`` binaries, memory-mapped and resized
  in chunks.

Each ``read_*`` returns :class:`Splits` of plain tensors; :mod:`ressl.data` wraps them
in sources. Missing files are downloaded with torchvision into the ``cache`` directory
the caller names. Nothing here imports :mod:`ressl.data`.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import math
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "Split",
    "Splits",
    "read_cifar",
    "read_fashion_mnist",
    "read_idx",
    "read_stl10",
    "resize_uint8",
]

_RESIZE_CHUNK = 2048  # images per interpolate call: bounds the float32 working memory

#: ``(images (N, C, S, S) uint8, labels (N,) int64)``, labels -1 = unlabelled.
Split = tuple[Tensor, Tensor]


class Splits(NamedTuple):
    """What a reader returns.

    Attributes:
        train: The images to train on (after ``subset``).
        test: The labelled test split.
        classes: Class names stored with the files, index = label; None when the files
            store none (the caller supplies them).
        memory: Labelled training images when ``train`` is partly unlabelled (STL-10);
            None when ``train`` itself is the labelled memory bank.
    """

    train: Split
    test: Split
    classes: list[str] | None
    memory: Split | None = None


def _take_subset(split: Split, subset: int | None, name: str) -> Split:
    images, labels = split
    if subset is None or subset == len(images):
        return split
    if subset > len(images):
        logger.warning("subset=%d exceeds the %d %s training images; keeping all",
                       subset, len(images), name)  # fmt: skip
        return split
    return images[:subset].clone(), labels[:subset].clone()  # copied so the rest can be freed


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of ``(N, C, H, W)`` uint8 to ``(N, C, size, size)``."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, len(images), _RESIZE_CHUNK):
        out[s : s + _RESIZE_CHUNK] = _resize_chunk(images[s : s + _RESIZE_CHUNK], size)
    return out


def _resize_chunk(images: Tensor, size: int) -> Tensor:
    x = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return x.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- finding files


def _find_dir(candidates: Sequence[Path], required: Sequence[str], gz_ok: bool) -> Path | None:
    """The first candidate directory holding every required file (or ``file.gz``)."""
    for d in candidates:
        if all((d / f).is_file() or (gz_ok and (d / f"{f}.gz").is_file()) for f in required):
            return d
    return None


def _locate(
    what: str,
    candidates: Sequence[Path],
    required: Sequence[str],
    download: bool,
    fetch: Callable[[], None],
    how: str,
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
        raise FileNotFoundError(msg)
    return found


def _gz_fallback(path: Path) -> Path:
    """``path`` itself if it exists, else ``path.gz``."""
    return path if path.is_file() else path.with_name(path.name + ".gz")


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a valid gzip file ({e}); delete it and reload") from e


# --------------------------------------------------------------------------- fashion-mnist

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
    path = _gz_fallback(Path(path))
    raw = _read_maybe_gz(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    dims_n = raw[3]
    if raw[:3] != b"\x00\x00\x08" or (ndim is not None and dims_n != ndim):
        want = f"0x{0x800 + ndim:08x}" if ndim is not None else "0x000008NN (unsigned bytes)"
        raise ValueError(
            f"{path}: bad idx magic number 0x{magic:08x}, expected {want}; "
            "the file is corrupt or not an idx file"
        )
    header = 4 + 4 * dims_n
    if len(raw) < header:
        raise ValueError(f"{path}: idx header truncated")
    dims = struct.unpack(f">{dims_n}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(
            f"{path}: idx header says shape {dims} ({math.prod(dims)} bytes) but the file "
            f"holds {len(raw) - header} bytes of data; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fmnist_split(d: Path, split: str) -> Split:
    img_name, lbl_name = _FMNIST_FILES[split]
    images = read_idx(d / img_name, ndim=3)  # (N, 28, 28)
    labels = read_idx(d / lbl_name, ndim=1)  # (N,)
    if len(images) != len(labels):
        raise ValueError(
            f"{d}: {img_name} holds {len(images)} images but {lbl_name} {len(labels)} labels"
        )
    if labels.size and labels.max() >= _FMNIST_NUM_CLASSES:
        raise ValueError(f"{d / lbl_name}: label {labels.max()} out of range 0..9")
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

    d = _locate(
        "Fashion-MNIST", candidates, required, download, fetch,
        "Install it with `apt-get install dataset-fashion-mnist`, pass root=DIR holding "
        "the four idx files (gzipped or not), or use download=True with internet access.",
        cache, gz_ok=True,
    )  # fmt: skip
    train = _take_subset(_fmnist_split(d, "train"), subset, "fashion-mnist")
    return Splits(train, _fmnist_split(d, "test"), None)


# --------------------------------------------------------------------------- cifar

_CIFAR = {
    # name: (directory, train files, test file, meta file, label key, class key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels",
                 "fine_label_names"),
}  # fmt: skip


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
        raise ValueError(f"{path} is not a readable CIFAR batch: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
            f"{path} is not a CIFAR batch: holds {type(obj).__name__}, not dict"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(d: Path, files: Sequence[str], label_key: str) -> Split:
    images, labels = [], []
    for name in files:
        batch = _unpickle(d / name)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{d / name} lacks 'data' or {label_key!r}: not a CIFAR batch")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise ValueError(
                f"{d / name}: data of shape {data.shape} with {len(lab)} labels; "
                "expected (N, 3072) with N labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R then G then B planes
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

    d = _locate(
        name, candidates, [*train_files, test_file, meta_file], download, fetch,
        f"Pass root=DIR holding {dirname}/ (the CIFAR 'python version'), "
        "or use download=True with internet access.",
        cache,
    )  # fmt: skip
    meta = _unpickle(d / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(class_key, [])]
    train = _take_subset(_cifar_split(d, train_files, label_key), subset, name)
    test = _cifar_split(d, [test_file], label_key)
    top = int(max(train[1].max(), test[1].max()))
    if len(classes) <= top:
        raise ValueError(f"{d / meta_file}: {len(classes)} class names but label {top} occurs")
    return Splits(train, test, classes)


# --------------------------------------------------------------------------- stl-10

_STL_SIDE = 96
_STL_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]


def _stl_count(path: Path) -> int:
    per = 3 * _STL_SIDE * _STL_SIDE
    size = path.stat().st_size
    if size == 0 or size % per:
        raise ValueError(
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
        for s in range(0, n, _RESIZE_CHUNK):
            block = torch.from_numpy(np.array(mm[s : min(s + _RESIZE_CHUNK, n)]))  # copy
            block = block.transpose(2, 3)  # stored column-major: (N, C, W, H) -> (N, C, H, W)
            out[s : s + len(block)] = block if size == _STL_SIDE else _resize_chunk(block, size)
    finally:
        del mm
    return out


def _read_stl_labels(path: Path, n: int) -> Tensor:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    if len(labels) != n or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"{path}: expected {n} labels in 1..10, got {len(labels)} labels")
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
        train split, ``memory`` the labelled train split, ``classes`` from
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

    d = _locate(
        "STL-10", candidates, _STL_FILES, download, fetch,
        "Pass root=DIR holding stl10_binary/, or use download=True with internet access "
        "(a 2.6 GB download).",
        cache,
    )  # fmt: skip
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
    return Splits((images, labels), (test_x, test_y), classes, memory=(labelled, labelled_y))
