"""Named image datasets as uint8 tensors + labels, and the batches the trainer draws from them.

``load_dataset(spec)`` turns a dataset name into an :class:`ImageData`: uint8 images
``(N, C, S, S)`` with int64 labels, split into the images ReSSL trains on, a labelled
memory bank for the kNN monitor and a labelled test split, plus the normalisation
constants the views need. Augmentation and normalisation happen later, on the device
(``ressl.views``); this module only decodes.

Two kinds of :class:`ImageSource` hold the images:

* :class:`TensorImages`: the whole split in one tensor (every built-in dataset, and
  image folders up to :data:`MAX_IN_MEMORY_BYTES`). ``.to("cuda")`` moves it to the GPU
  once and batches are then indexed on the device.
* :class:`FolderImages`: a ``Dataset`` over image files, decoded and resized in
  ``DataLoader`` workers, for folders too large to hold in memory.

Both draw batches in an order that is a pure function of ``(seed, epoch)``
(:func:`epoch_order`), so a resumed run sees exactly the batches it would have seen.

Example:
    >>> data = load_dataset("fashion-mnist")                     # doctest: +SKIP
    >>> for x, y in data.train.batches(256, epoch=0, seed=0):     # doctest: +SKIP
    ...     pass  # x: (256, 1, 28, 28) uint8, y: (256,) int64
"""

from __future__ import annotations

import codecs
import gzip
import logging
import math
import os
import pickle
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "FolderImages",
    "ImageData",
    "ImageSource",
    "TensorImages",
    "cache_dir",
    "dataset_names",
    "decode_image",
    "epoch_order",
    "load_dataset",
    "read_idx",
]

#: Image folders whose decoded uint8 split (N * 3 * S * S bytes) fits under this are
#: decoded once into a TensorImages; larger ones stream through FolderImages. Applied
#: to each split on its own.
MAX_IN_MEMORY_BYTES = 2 * 1024**3
#: Where Debian's dataset-* packages install (``apt-get install dataset-fashion-mnist``).
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
#: File extensions (lower case) read from image folders; matching is case-insensitive.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
#: Default stored side for image folders (shorter side resized, then centre-cropped).
FOLDER_IMAGE_SIZE = 64
#: Default stored side for STL-10 (downsized from 96, as in the paper).
STL10_IMAGE_SIZE = 64

# Fashion-MNIST is not in the paper: computed from its 60,000 training images
# (pixels / 255: mean 0.28604, std 0.35302); tests check them against the real files.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
STL10_MEAN, STL10_STD = (0.4408, 0.4279, 0.3867), (0.2682, 0.2610, 0.2686)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip

_NAMES = ["fashion-mnist", "cifar10", "cifar100", "stl10", "folder:PATH"]
_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100",
    "stl10": "stl10", "stl-10": "stl10",
}  # fmt: skip
_DECODE_WORKERS = min(8, os.cpu_count() or 1)
_PARALLEL_MIN_FILES = 512  # below this, decoding in-process beats starting workers
_RESIZE_CHUNK = 2048  # images per interpolate call: bounds the float32 working memory


def dataset_names() -> list[str]:
    """The dataset specs :func:`load_dataset` accepts (``folder:PATH`` takes any path)."""
    return list(_NAMES)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ressl`` (default ``~/.cache/ressl``): where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ressl"


# --------------------------------------------------------------------------- sources


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The order in which an epoch visits ``n`` items: a pure function of (seed, epoch).

    Args:
        n: Number of items.
        seed: Run seed.
        epoch: Epoch index.
        shuffle: False gives ``0, 1, ..., n - 1``.

    Returns:
        ``(n,)`` int64 CPU tensor, a permutation of ``range(n)``.
    """
    if not shuffle:
        return torch.arange(n)
    # Masked to 64 bits so any (seed, epoch), negative included, is a valid seed.
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randperm(n, generator=g)


class ImageSource(ABC):
    """A split of uint8 images with int64 labels (-1 = unlabelled), drawn in batches."""

    labels: Tensor  # (N,) int64, CPU

    @abstractmethod
    def __len__(self) -> int: ...

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches per epoch: ``N // batch_size``, or rounded up when not ``drop_last``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    @abstractmethod
    def batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = True,
        start: int = 0,
        num_workers: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield one epoch of ``(images (B, C, H, W) uint8, labels (B,) int64)`` on ``device``.

        Args:
            batch_size: Images per batch.
            epoch: Epoch index; with ``seed`` it fixes the order (:func:`epoch_order`).
            seed: Run seed.
            device: Where the batches are delivered.
            shuffle: False visits the images in stored order (feature extraction).
            drop_last: Drop the final short batch; False yields it.
            start: Skip the first ``start`` batches of the epoch without decoding them
                (mid-epoch resume); ``0 <= start <= num_batches``.
            num_workers: DataLoader decode workers (FolderImages only).
        """

    def _plan(
        self, batch_size: int, *, epoch: int, seed: int, shuffle: bool, drop_last: bool, start: int
    ) -> tuple[Tensor, range]:
        nb = self.num_batches(batch_size, drop_last)
        if not 0 <= start <= nb:
            raise ValueError(f"start must be in [0, {nb}] (batches per epoch), got {start}")
        return epoch_order(len(self), seed=seed, epoch=epoch, shuffle=shuffle), range(start, nb)


class TensorImages(ImageSource):
    """A split held whole in one uint8 tensor, on the CPU or a GPU.

    Args:
        images: ``(N, C, H, W)`` uint8, on any device.
        labels: ``(N,)`` integer labels, -1 for unlabelled (kept on the CPU as ``labels``).
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a (N, C, H, W) uint8 tensor, got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"labels must have shape ({len(images)},) to match images, "
                f"got {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to("cpu", torch.int64)
        self._device_labels = self.labels.to(images.device)  # indexed next to the images

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"TensorImages({tuple(self.images.shape)}, device={self.images.device})"

    @property
    def device(self) -> torch.device:
        """The device holding the images."""
        return self.images.device

    def to(self, device: torch.device | str) -> TensorImages:
        """A copy with the images (and a copy of the labels) on ``device``."""
        return TensorImages(self.images.to(device), self.labels)

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = True,
        start: int = 0,
        num_workers: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """See :meth:`ImageSource.batches`; ``num_workers`` is ignored (nothing to decode).

        Batches are gathered where the images live and then moved to ``device``; with the
        images already there (``.to(device)`` once) no host round trip happens: the order
        is built on the CPU and copied to the device once per epoch.
        """
        order, todo = self._plan(
            batch_size, epoch=epoch, seed=seed, shuffle=shuffle, drop_last=drop_last, start=start
        )
        order = order.to(self.images.device)
        for b in todo:
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = self.images.index_select(0, idx)  # (B, C, H, W)
            y = self._device_labels.index_select(0, idx)  # (B,)
            yield x.to(device), y.to(device)  # no-op when already there

    def head(self, n: int) -> TensorImages:
        """A copy of the first ``n`` images (copied so the rest can be freed)."""
        return TensorImages(self.images[:n].clone(), self.labels[:n].clone())


class FolderImages(ImageSource, Dataset):
    """Image files decoded on demand: RGB, shorter side resized to ``image_size``, centre crop.

    Args:
        files: Image paths.
        labels: One label per file, -1 for unlabelled.
        image_size: Side of the square uint8 images returned.

    ``dataset[i]`` returns ``(image (3, S, S) uint8, label int)``. A file that fails to
    decode (it passed the header check at load time) yields a black image and a warning
    rather than stopping a long run.
    """

    def __init__(
        self, files: Sequence[str | Path], labels: Tensor | Sequence[int], image_size: int
    ) -> None:
        self.files = [str(f) for f in files]
        self.labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if self.labels.shape != (len(self.files),):
            raise ValueError(
                f"labels must have shape ({len(self.files)},), got {tuple(self.labels.shape)}"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} files, image_size={self.image_size})"

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = decode_image(self.files[i], self.image_size)
        if image is None:
            logger.warning("could not decode %s; using a black image", self.files[i])
            image = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return image, int(self.labels[i])

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = True,
        start: int = 0,
        num_workers: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """See :meth:`ImageSource.batches`: decodes in a DataLoader with ``num_workers``."""
        device = torch.device(device)
        order, todo = self._plan(
            batch_size, epoch=epoch, seed=seed, shuffle=shuffle, drop_last=drop_last, start=start
        )
        sampler = [order[b * batch_size : (b + 1) * batch_size].tolist() for b in todo]
        loader = DataLoader(
            self, batch_sampler=sampler, num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# --------------------------------------------------------------------------- the result


@dataclass
class ImageData:
    """A loaded dataset: uint8 splits plus what the views and the evaluation need.

    Attributes:
        name: The dataset, e.g. ``"fashion-mnist"`` or ``"folder:/abs/path"``.
        train: The images ReSSL trains on (labels may be -1 = unlabelled).
        memory: Labelled images for the kNN monitor's memory bank: the same object as
            ``train`` when that is labelled, STL-10's labelled train split, None when
            there are no labels.
        test: Labelled test split for kNN / linear evaluation, None if there is none.
        mean: Per-channel mean of pixels / 255 (``len == channels``).
        std: Per-channel standard deviation of pixels / 255.
        channels: 1 or 3.
        image_size: Side of the stored square images.
        classes: Class names, index = label; ``[]`` when unlabelled.
        skipped: Unreadable image files skipped while loading (folders).
    """

    name: str
    train: ImageSource
    memory: ImageSource | None
    test: ImageSource | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    image_size: int
    classes: list[str]
    skipped: int = 0

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need {self.channels} values (one per channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )


def load_dataset(
    spec: str,
    *,
    root: str | Path | None = None,
    download: bool = True,
    image_size: int | None = None,
    subset: int | None = None,
) -> ImageData:
    """Load a named dataset as uint8 images and int64 labels.

    Args:
        spec: One of :func:`dataset_names`: ``"fashion-mnist"`` (1 channel, 28 px),
            ``"cifar10"`` / ``"cifar100"`` (32 px), ``"stl10"`` (100,000 unlabelled +
            5,000 labelled train images, stored at 64 px), or ``"folder:PATH"``.
        root: Directory holding the dataset files (checked first). Ignored for folders.
        download: Download missing built-in datasets with torchvision into
            :func:`cache_dir` (needs internet).
        image_size: Side of the stored images; default 28 / 32 / 64 / 64 (folders).
            Built-in datasets are resized with antialiased bilinear interpolation.
        subset: Keep only the first ``subset`` training images (for folders: the first
            ``subset`` files in sorted order, which are grouped by class). Larger than
            the split keeps it all, with a warning.

    Returns:
        The :class:`ImageData`.

    Raises:
        ValueError: Unknown ``spec``, bad ``image_size`` / ``subset``, corrupt files, or
            a folder with no readable image.
        FileNotFoundError: The dataset files are not found (and cannot be downloaded),
            or a folder's path does not exist.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be a positive int or None, got {subset!r}")
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string, one of {_NAMES}, got {spec!r}")
    t0 = time.perf_counter()
    spec = spec.strip()
    if spec.lower().startswith("folder:"):
        path = spec[len("folder:") :]
        if not path:
            raise ValueError("spec 'folder:' needs a path, e.g. 'folder:/data/images'")
        data = _load_folder(Path(path).expanduser(), image_size or FOLDER_IMAGE_SIZE, subset)
    else:
        name = _ALIASES.get(spec.lower().replace("_", "-"))
        if name is None:
            raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(_NAMES)}")
        root = Path(root).expanduser() if root is not None else None
        if name == "fashion-mnist":
            data = _load_fashion_mnist(root, download, subset)
        elif name in ("cifar10", "cifar100"):
            data = _load_cifar(name, root, download, subset)
        else:
            data = _load_stl10(root, download, image_size or STL10_IMAGE_SIZE, subset)
        if image_size is not None and image_size != data.image_size:
            data = _resized(data, image_size)
    logger.info(
        "loaded %s: %d train, %s memory, %s test images of %d px in %.1f s",
        data.name, len(data.train), _len(data.memory), _len(data.test), data.image_size,
        time.perf_counter() - t0,
    )  # fmt: skip
    return data


def _len(source: ImageSource | None) -> str:
    return "no" if source is None else str(len(source))


def _take_subset(train: TensorImages, subset: int | None, name: str) -> TensorImages:
    if subset is None or subset == len(train):
        return train
    if subset > len(train):
        logger.warning("subset=%d exceeds the %d %s training images; keeping all",
                       subset, len(train), name)  # fmt: skip
        return train
    return train.head(subset)


def _resize_uint8(images: Tensor, size: int) -> Tensor:
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


def _resized(data: ImageData, size: int) -> ImageData:
    """Resize every TensorImages split of a built-in dataset, keeping shared objects shared."""
    done: dict[int, ImageSource] = {}

    def resize(source: ImageSource | None) -> ImageSource | None:
        if source is None or not isinstance(source, TensorImages):
            return source
        if id(source) not in done:
            done[id(source)] = TensorImages(_resize_uint8(source.images, size), source.labels)
        return done[id(source)]

    train = resize(data.train)
    assert train is not None
    return ImageData(
        data.name, train, resize(data.memory), resize(data.test), data.mean, data.std,
        data.channels, size, data.classes, data.skipped,
    )  # fmt: skip


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
    gz_ok: bool = False,
) -> Path:
    """Find the dataset directory, downloading with ``fetch`` once if it is missing."""
    found = _find_dir(candidates, required, gz_ok)
    error: BaseException | None = None
    if found is None and download:
        logger.info("%s not found locally; downloading into %s", what, cache_dir())
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


def _fmnist_split(d: Path, split: str) -> TensorImages:
    img_name, lbl_name = _FMNIST_FILES[split]
    images = read_idx(d / img_name, ndim=3)  # (N, 28, 28)
    labels = read_idx(d / lbl_name, ndim=1)  # (N,)
    if len(images) != len(labels):
        raise ValueError(
            f"{d}: {img_name} holds {len(images)} images but {lbl_name} {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{d / lbl_name}: label {labels.max()} out of range 0..9")
    return TensorImages(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    )


def _load_fashion_mnist(root: Path | None, download: bool, subset: int | None) -> ImageData:
    bases = ([root, root / "fashion-mnist"] if root else []) + [
        *(d / "fashion-mnist" for d in SYSTEM_DATA_DIRS),
        cache_dir() / "fashion-mnist",
    ]
    # torchvision's layout too, so an existing torchvision download can be passed as root.
    candidates = [p for b in bases for p in (b, b / "FashionMNIST" / "raw")]
    required = [f for pair in _FMNIST_FILES.values() for f in pair]

    def fetch() -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache_dir() / "fashion-mnist"), train=True, download=True)

    d = _locate(
        "Fashion-MNIST", candidates, required, download, fetch,
        "Install it with `apt-get install dataset-fashion-mnist`, pass root=DIR holding "
        "the four idx files (gzipped or not), or use download=True with internet access.",
        gz_ok=True,
    )  # fmt: skip
    train = _take_subset(_fmnist_split(d, "train"), subset, "fashion-mnist")
    return ImageData(
        "fashion-mnist", train, train, _fmnist_split(d, "test"), FASHION_MNIST_MEAN,
        FASHION_MNIST_STD, 1, 28, list(FASHION_MNIST_CLASSES),
    )  # fmt: skip


# --------------------------------------------------------------------------- cifar

_CIFAR = {
    # name: (directory, train files, test file, meta file, label key, class key, mean, std)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names", CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels",
                 "fine_label_names", CIFAR100_MEAN, CIFAR100_STD),
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


def _cifar_split(d: Path, files: Sequence[str], label_key: str) -> TensorImages:
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
    return TensorImages(
        torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    )


def _load_cifar(name: str, root: Path | None, download: bool, subset: int | None) -> ImageData:
    dirname, train_files, test_file, meta_file, label_key, class_key, mean, std = _CIFAR[name]
    candidates = ([root / dirname, root] if root else []) + [cache_dir() / dirname]

    def fetch() -> None:
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if name == "cifar10" else CIFAR100)(str(cache_dir()), download=True)
        for archive in cache_dir().glob("cifar-*-python.tar.gz"):
            archive.unlink()  # extracted; 160 MB not worth keeping

    d = _locate(
        name, candidates, [*train_files, test_file, meta_file], download, fetch,
        f"Pass root=DIR holding {dirname}/ (the CIFAR 'python version'), "
        "or use download=True with internet access.",
    )  # fmt: skip
    meta = _unpickle(d / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(class_key, [])]
    train = _take_subset(_cifar_split(d, train_files, label_key), subset, name)
    test = _cifar_split(d, [test_file], label_key)
    top = int(max(train.labels.max(), test.labels.max()))
    if len(classes) <= top:
        raise ValueError(f"{d / meta_file}: {len(classes)} class names but label {top} occurs")
    return ImageData(name, train, train, test, mean, std, 3, 32, classes)


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


def _load_stl10(root: Path | None, download: bool, size: int, subset: int | None) -> ImageData:
    candidates = ([root / "stl10_binary", root] if root else []) + [cache_dir() / "stl10_binary"]

    def fetch() -> None:
        from torchvision.datasets import STL10

        STL10(str(cache_dir()), split="train+unlabeled", download=True)
        (cache_dir() / "stl10_binary.tar.gz").unlink(missing_ok=True)

    d = _locate(
        "STL-10", candidates, _STL_FILES, download, fetch,
        "Pass root=DIR holding stl10_binary/, or use download=True with internet access "
        "(a 2.6 GB download).",
    )  # fmt: skip
    names_file = d / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)

    labelled = _read_stl_images(d / "train_X.bin", size)
    memory = TensorImages(labelled, _read_stl_labels(d / "train_y.bin", len(labelled)))
    test_x = _read_stl_images(d / "test_X.bin", size)
    test = TensorImages(test_x, _read_stl_labels(d / "test_y.bin", len(test_x)))

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
    labels = torch.cat([torch.full((k_unl,), -1, dtype=torch.int64), memory.labels])[:keep]
    train = TensorImages(images, labels)
    return ImageData("stl10", train, memory, test, STL10_MEAN, STL10_STD, 3, size, classes)


# --------------------------------------------------------------------------- folders


def decode_image(path: str | Path, size: int) -> Tensor | None:
    """Decode one image file to ``(3, size, size)`` uint8: RGB, shorter side resized, centre crop.

    Args:
        path: The image file.
        size: Side of the result.

    Returns:
        The image, or None when the file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
            rgb = im.convert("RGB")  # palette, grey, alpha, CMYK -> RGB; GIF: first frame
        w, h = rgb.size
        if min(w, h) != size:
            scale = size / min(w, h)
            w, h = max(size, round(w * scale)), max(size, round(h * scale))
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
        array = np.asarray(rgb, dtype=np.uint8)  # (S, S, 3)
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _can_open(path: str | Path) -> bool:
    """Header check only (cheap): can PIL identify the image and its size?"""
    try:
        with Image.open(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:  # noqa: BLE001 - as in decode_image
        return False


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(top: Path) -> list[Path]:
    """Image files anywhere under ``top`` (links followed, cycles and hidden entries not)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if _is_image(f)]
    return sorted(found)


def _scan_split(split: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and classes of one split directory.

    With first-level sub-folders that hold images, each is a class (sorted names ->
    indices, images found recursively inside it) and loose files in the split root are
    ignored, as in torchvision's ImageFolder. Otherwise every image is unlabelled (-1).
    """
    per_class = {
        d.name: files
        for d in sorted(split.iterdir())
        if d.is_dir() and not d.name.startswith(".") and (files := _images_under(d))
    }
    if not per_class:
        files = _images_under(split)
        return files, [-1] * len(files), []
    loose = [f for f in split.iterdir() if f.is_file() and _is_image(f.name)]
    if loose:
        logger.warning(
            "%s has class sub-folders; ignoring %d image(s) directly inside it, e.g. %s",
            split, len(loose), loose[0].name,
        )  # fmt: skip
    classes = sorted(per_class)
    files = [f for c in classes for f in per_class[c]]
    labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
    return files, labels, classes


class _MapFiles(Dataset):
    """``(index, fn(file))`` pairs, so a DataLoader can run ``fn`` over files in workers."""

    def __init__(self, fn: Callable[[str], Any], files: Sequence[str]) -> None:
        self.fn, self.files = fn, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.fn(self.files[i])


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _map_files(fn: Callable[[str], Any], files: Sequence[str]) -> Iterator[tuple[int, Any]]:
    """``(index, fn(file))`` for every file, in order; in worker processes when many."""
    workers = _DECODE_WORKERS if len(files) >= _PARALLEL_MIN_FILES else 0
    if workers <= 1:
        yield from ((i, fn(f)) for i, f in enumerate(files))
        return
    loader = DataLoader(
        _MapFiles(fn, files), batch_size=64, num_workers=workers, collate_fn=_as_list
    )
    for chunk in loader:
        yield from chunk


def _folder_source(
    files: list[Path], labels: list[int], size: int, split: Path
) -> tuple[ImageSource, int]:
    """Decode a split into memory, or wrap it for streaming when too large; (source, skipped)."""
    names = [str(f) for f in files]
    bad: list[str] = []
    if len(names) * 3 * size * size <= MAX_IN_MEMORY_BYTES:
        images = torch.empty((len(names), 3, size, size), dtype=torch.uint8)
        ok = torch.zeros(len(names), dtype=torch.bool)
        for i, image in _map_files(partial(decode_image, size=size), names):
            if image is None:
                bad.append(names[i])
            else:
                images[i], ok[i] = image, True
        keep = ok.nonzero().squeeze(1)
        if bad:
            images = images.index_select(0, keep)
        source: ImageSource = TensorImages(images, torch.tensor(labels, dtype=torch.int64)[keep])
    else:
        readable = [i for i, good in _map_files(_can_open, names) if good]
        bad = [names[i] for i in sorted(set(range(len(names))) - set(readable))]
        source = FolderImages([names[i] for i in readable], [labels[i] for i in readable], size)
        logger.info(
            "%s: %d images do not fit in memory at %d px; streaming them from disk",
            split, len(source), size,
        )  # fmt: skip
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


def _load_folder(path: Path, size: int, subset: int | None) -> ImageData:
    if not path.exists():
        raise FileNotFoundError(f"image folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"folder:PATH must name a directory, got the file {path}")
    path = path.resolve()
    test_dir = next((path / s for s in ("test", "val") if (path / s).is_dir()), None)
    train_dir = path / "train" if (path / "train").is_dir() and test_dir else path
    if train_dir == path:
        test_dir = None

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
    train, skipped = _folder_source(files, labels, size, train_dir)
    memory = train if classes else None

    test = None
    if test_dir is not None:
        t_files, _, t_classes = _scan_split(test_dir)
        if not classes or not t_classes:
            logger.warning(
                "%s: ignoring the %s split: evaluation needs class sub-folders in both splits",
                path, test_dir.name,
            )  # fmt: skip
        else:
            unknown = sorted(set(t_classes) - set(classes))
            if unknown:
                raise ValueError(
                    f"{test_dir} has classes not in {train_dir}: {', '.join(unknown[:5])}"
                )
            index = {c: i for i, c in enumerate(classes)}
            t_labels = [index[f.relative_to(test_dir).parts[0]] for f in t_files]
            test, t_skipped = _folder_source(t_files, t_labels, size, test_dir)
            skipped += t_skipped
    return ImageData(
        f"folder:{path}", train, memory, test, IMAGENET_MEAN, IMAGENET_STD, 3, size,
        classes, skipped,
    )  # fmt: skip
