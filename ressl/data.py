"""Named image datasets as uint8 tensors + labels, and the batches the trainer draws from them.

``load_dataset(spec)`` turns a dataset name into an :class:`ImageData`: uint8 images
``(N, C, S, S)`` with int64 labels, split into the images ReSSL trains on, a labelled
memory bank for the kNN monitor and a labelled test split, plus the normalisation
constants the views need. Augmentation and normalisation happen later, on the device
(``ressl.views``). The files themselves are read by :mod:`ressl.formats` (Fashion-MNIST,
CIFAR, STL-10) and :mod:`ressl.folders` (image folders); this module wraps what they
return and decides, per folder split, between memory and streaming.

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

import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .folders import (
    IMAGE_EXTENSIONS,
    decode_crops,
    decode_image,
    decode_images,
    readable_images,
    scan_test,
    scan_train,
    split_dirs,
)
from .formats import read_cifar, read_fashion_mnist, read_idx, read_stl10, resize_uint8

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
    "source_part",
]

#: Image folders whose decoded uint8 split (N * 3 * S * S bytes) fits under this are
#: decoded once into a TensorImages; larger ones stream through FolderImages. Applied
#: to each split on its own.
MAX_IN_MEMORY_BYTES = 2 * 1024**3
#: Where Debian's dataset-* packages install (``apt-get install dataset-fashion-mnist``).
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
#: Default stored side for image folders (shorter side resized, then centre-cropped).
FOLDER_IMAGE_SIZE = 64
#: Default side for ``imagenet:PATH`` folders (the ImageNet recipe's 224 px crops).
IMAGENET_IMAGE_SIZE = 224
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

_NAMES = ["fashion-mnist", "cifar10", "cifar100", "stl10", "folder:PATH", "imagenet:PATH"]
_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100",
    "stl10": "stl10", "stl-10": "stl10",
}  # fmt: skip
_DECODE_WORKERS = min(8, os.cpu_count() or 1)
_PARALLEL_MIN_FILES = 512  # below this, decoding in-process beats starting workers


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
        shard: tuple[int, int] = (0, 1),
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
            shard: ``(rank, world_size)``: yield only this rank's slice of every
                batch (``batch_size / world_size`` images; distributed training).
                The ranks' slices are disjoint and together are the whole batch.
        """

    def _plan(
        self, batch_size: int, *, epoch: int, seed: int, shuffle: bool, drop_last: bool, start: int
    ) -> tuple[Tensor, range]:
        nb = self.num_batches(batch_size, drop_last)
        if not 0 <= start <= nb:
            raise ValueError(f"start must be in [0, {nb}] (batches per epoch), got {start}")
        return epoch_order(len(self), seed=seed, epoch=epoch, shuffle=shuffle), range(start, nb)

    @staticmethod
    def _slice(order: Tensor, b: int, batch_size: int, shard: tuple[int, int]) -> Tensor:
        """Indices of batch ``b`` (this rank's part of it, with ``shard``)."""
        idx = order[b * batch_size : (b + 1) * batch_size]
        rank, world = shard
        if world == 1:
            return idx
        if not 0 <= rank < world or batch_size % world:
            raise ValueError(
                f"shard must be (rank, world_size) with 0 <= rank < world_size dividing batch_size "
                f"{batch_size}, got {shard}"
            )
        per = batch_size // world
        return idx[rank * per : (rank + 1) * per]


def source_part(source: ImageSource, start: int, stop: int) -> ImageSource:
    """Images ``start:stop`` of a source, in order, without copying pixels.

    Raises:
        TypeError: for a source type this does not know how to slice.
        ValueError: unless ``0 <= start <= stop <= len(source)``.
    """
    if not 0 <= start <= stop <= len(source):
        raise ValueError(f"need 0 <= start <= stop <= {len(source)}, got {start}:{stop}")
    if isinstance(source, TensorImages):
        return TensorImages(source.images[start:stop], source.labels[start:stop])
    if isinstance(source, FolderImages):
        return FolderImages(source.files[start:stop], source.labels[start:stop], source.image_size)
    raise TypeError(f"source_part takes TensorImages or FolderImages, got {type(source).__name__}")


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
        shard: tuple[int, int] = (0, 1),
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
            idx = self._slice(order, b, batch_size, shard)
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
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """See :meth:`ImageSource.batches`: decodes in a DataLoader with ``num_workers``."""
        device = torch.device(device)
        order, todo = self._plan(
            batch_size, epoch=epoch, seed=seed, shuffle=shuffle, drop_last=drop_last, start=start
        )
        sampler = [self._slice(order, b, batch_size, shard).tolist() for b in todo]
        loader = DataLoader(
            self, batch_sampler=sampler, num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def crop_batches(
        self,
        batch_size: int,
        crops: Sequence[tuple[int, tuple[float, float]]],
        *,
        epoch: int,
        seed: int,
        device: torch.device | str = "cpu",
        start: int = 0,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[list[Tensor], Tensor]]:
        """One shuffled epoch of random crops cut in the DataLoader workers.

        Each file is decoded at full resolution and ``crops`` are cut from it
        (:func:`ressl.folders.decode_crops`), so small-scale crops keep their
        detail and the device only flips, colours and normalises. The boxes come
        from a generator seeded by ``(seed, epoch, index)``: the same crops for any
        number of workers, and after a resume. ``shard`` as in :meth:`batches`.

        Yields:
            ``([crop_1 (B, 3, s_1, s_1) uint8, ...], labels (B,))`` on ``device``.
        """
        device = torch.device(device)
        order, todo = self._plan(
            batch_size, epoch=epoch, seed=seed, shuffle=True, drop_last=True, start=start
        )
        sampler = [self._slice(order, b, batch_size, shard).tolist() for b in todo]
        dataset = _CroppedFiles(
            self, [(int(s), (float(a), float(b))) for s, (a, b) in crops], seed, epoch
        )
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        for views, y in loader:
            yield [v.to(device, non_blocking=True) for v in views], y.to(device, non_blocking=True)


class _CroppedFiles(Dataset):
    def __init__(
        self,
        source: FolderImages,
        crops: list[tuple[int, tuple[float, float]]],
        seed: int,
        epoch: int,
    ) -> None:
        self.files, self.labels, self.crops, self.seed, self.epoch = (
            source.files, source.labels, crops, seed, epoch,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[list[Tensor], int]:
        key = (self.seed * 1_000_003 + self.epoch) * 2**31 + i
        generator = torch.Generator().manual_seed(key % (2**63 - 1))
        views = decode_crops(self.files[i], self.crops, generator)
        if views is None:
            logger.warning("could not decode %s; using black crops", self.files[i])
            views = [torch.zeros(3, s, s, dtype=torch.uint8) for s, _ in self.crops]
        return views, int(self.labels[i])


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
            5,000 labelled train images, stored at 64 px), ``"folder:PATH"`` or
            ``"imagenet:PATH"`` (an image folder at 224 px, e.g. ImageNet's
            ``train/`` + ``val/`` class folders).
        root: Directory holding the dataset files (checked first). Ignored for folders.
        download: Download missing built-in datasets with torchvision into
            :func:`cache_dir` (needs internet).
        image_size: Side of the stored images; default 28 / 32 / 64 / 64 (folders) /
            224 (imagenet:PATH).
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
    kind, _, path = spec.partition(":")
    if kind.lower() in ("folder", "imagenet") and _:
        if not path:
            raise ValueError(f"spec '{kind}:' needs a path, e.g. '{kind}:/data/images'")
        default = IMAGENET_IMAGE_SIZE if kind.lower() == "imagenet" else FOLDER_IMAGE_SIZE
        data = _load_folder(Path(path).expanduser(), image_size or default, subset)
        if kind.lower() == "imagenet":
            data.name = "imagenet:" + data.name[len("folder:") :]
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


def _resized(data: ImageData, size: int) -> ImageData:
    """Resize every TensorImages split of a built-in dataset, keeping shared objects shared."""
    done: dict[int, ImageSource] = {}

    def resize(source: ImageSource | None) -> ImageSource | None:
        if source is None or not isinstance(source, TensorImages):
            return source
        if id(source) not in done:
            done[id(source)] = TensorImages(resize_uint8(source.images, size), source.labels)
        return done[id(source)]

    train = resize(data.train)
    assert train is not None
    return ImageData(
        data.name, train, resize(data.memory), resize(data.test), data.mean, data.std,
        data.channels, size, data.classes, data.skipped,
    )  # fmt: skip


# --------------------------------------------------------------------------- built-in datasets


def _load_fashion_mnist(root: Path | None, download: bool, subset: int | None) -> ImageData:
    splits = read_fashion_mnist(
        root, system_dirs=SYSTEM_DATA_DIRS, cache=cache_dir(), download=download, subset=subset
    )
    train = TensorImages(*splits.train)
    return ImageData(
        "fashion-mnist", train, train, TensorImages(*splits.test), FASHION_MNIST_MEAN,
        FASHION_MNIST_STD, 1, 28, list(FASHION_MNIST_CLASSES),
    )  # fmt: skip


def _load_cifar(name: str, root: Path | None, download: bool, subset: int | None) -> ImageData:
    splits = read_cifar(name, root, cache=cache_dir(), download=download, subset=subset)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    train = TensorImages(*splits.train)
    return ImageData(
        name, train, train, TensorImages(*splits.test), mean, std, 3, 32, splits.classes or []
    )


def _load_stl10(root: Path | None, download: bool, size: int, subset: int | None) -> ImageData:
    splits = read_stl10(root, cache=cache_dir(), download=download, size=size, subset=subset)
    assert splits.memory is not None  # STL-10's labelled train split
    classes = list(STL10_CLASSES) if splits.classes is None else splits.classes
    return ImageData(
        "stl10", TensorImages(*splits.train), TensorImages(*splits.memory),
        TensorImages(*splits.test), STL10_MEAN, STL10_STD, 3, size, classes,
    )  # fmt: skip


# --------------------------------------------------------------------------- folders


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


def _load_folder(path: Path, size: int, subset: int | None) -> ImageData:
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
        f"folder:{path}", train, memory, test, IMAGENET_MEAN, IMAGENET_STD, 3, size,
        classes, skipped,
    )  # fmt: skip
