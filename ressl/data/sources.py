"""Where a split's images live, and the batches the trainer draws from them.

Two kinds of :class:`ImageSource` hold uint8 images with int64 labels (-1: unlabelled):

* :class:`TensorImages`: the whole split in one tensor (every built-in dataset, and
  image folders that fit in memory). ``.to("cuda")`` moves it to the GPU once and
  batches are then indexed on the device.
* :class:`FolderImages`: a ``Dataset`` over image files, decoded and resized in
  ``DataLoader`` workers, for folders too large to hold in memory.

Both draw batches in an order that is a pure function of ``(seed, epoch)``
(:func:`epoch_order`), so a resumed run sees exactly the batches it would have seen.
:class:`ImageData` is a loaded dataset: its splits and what the views and the
evaluation need to know about them.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ressl.data.decode import decode_crops, decode_image, ignore_stop_signals
from ressl.data.jpegs import EncodedFile, collate_encoded, decode_on_device, read_for_device
from ressl.errors import ConfigError
from ressl.rules import DECODE_PLACES, IMAGE_SIZE

logger = logging.getLogger(__name__)

__all__ = [
    "FolderImages",
    "ImageData",
    "ImageSource",
    "TensorImages",
    "epoch_order",
    "source_part",
]


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
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
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
        return FolderImages(
            source.files[start:stop], source.labels[start:stop], source.image_size, source.channels
        )
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


class FolderImages(ImageSource, Dataset):
    """Image files decoded on demand: RGB (or greyscale), shorter side resized to
    ``image_size``, centre crop.

    Args:
        files: Image paths.
        labels: One label per file, -1 for unlabelled.
        image_size: Side of the square uint8 images returned.
        channels: 3 (RGB) or 1 (greyscale).

    ``dataset[i]`` returns ``(image (C, S, S) uint8, label int)``. A file that fails to
    decode (it passed the header check at load time) yields a black image and a warning
    rather than stopping a long run.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        labels: Tensor | Sequence[int],
        image_size: int,
        channels: int = 3,
    ) -> None:
        self.files = [str(f) for f in files]
        self.labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if self.labels.shape != (len(self.files),):
            raise ValueError(
                f"labels must have shape ({len(self.files)},), got {tuple(self.labels.shape)}"
            )
        if not IMAGE_SIZE.ok(image_size):
            raise ConfigError(f"image_size must be {IMAGE_SIZE.expect}, got {image_size!r}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"FolderImages({len(self)} files, image_size={self.image_size}, "
            f"channels={self.channels})"
        )

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = decode_image(self.files[i], self.image_size, self.channels)
        if image is None:
            logger.warning("could not decode %s; using a black image", self.files[i])
            image = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
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
            self,
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
        )
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
        decode: str = "workers",
    ) -> Iterator[tuple[list[Tensor], Tensor]]:
        """One shuffled epoch of random crops cut from the full-resolution files.

        Each file is decoded at full resolution and ``crops`` are cut from it, so
        small-scale crops keep their detail and the device only flips, colours and
        normalises. The boxes come from a generator seeded by ``(seed, epoch, index)``:
        the same crops for any number of workers, and after a resume. ``shard`` as in
        :meth:`batches`.

        Args:
            decode: ``"workers"``: PIL decodes and crops in the DataLoader workers
                (:func:`ressl.data.decode.decode_crops`); ``"device"``: the workers only read
                JPEG bytes and ``device`` decodes them, batched, and cuts the same boxes
                (:mod:`ressl.data.jpegs`; other files are decoded in the workers).

        Yields:
            ``([crop_1 (B, C, s_1, s_1) uint8, ...], labels (B,))`` on ``device``.
        """
        if decode not in DECODE_PLACES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_PLACES)}, got {decode!r}")
        device = torch.device(device)
        order, todo = self._plan(
            batch_size, epoch=epoch, seed=seed, shuffle=True, drop_last=True, start=start
        )
        sampler = [self._slice(order, b, batch_size, shard).tolist() for b in todo]
        plan = [(int(s), (float(a), float(b))) for s, (a, b) in crops]
        dataset = _CroppedFiles(self, plan, seed, epoch, on_device=decode == "device")
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
            collate_fn=collate_encoded if decode == "device" else None,
        )
        if decode == "device":
            sides = [s for s, _ in plan]
            for batch in loader:
                views = decode_on_device(batch.files, sides, device, self.channels)
                yield views, batch.labels.to(device, non_blocking=True)
            return
        for views, y in loader:
            yield [v.to(device, non_blocking=True) for v in views], y.to(device, non_blocking=True)


class _CroppedFiles(Dataset):
    """``(crops, label)`` per file, or, ``on_device``, ``(EncodedFile, label)``."""

    def __init__(
        self,
        source: FolderImages,
        crops: list[tuple[int, tuple[float, float]]],
        seed: int,
        epoch: int,
        on_device: bool = False,
    ) -> None:
        self.files, self.labels, self.crops, self.seed, self.epoch = (
            source.files,
            source.labels,
            crops,
            seed,
            epoch,
        )
        self.channels, self.on_device = source.channels, on_device

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[list[Tensor] | EncodedFile, int]:
        key = (self.seed * 1_000_003 + self.epoch) * 2**31 + i
        generator = torch.Generator().manual_seed(key % (2**63 - 1))
        if self.on_device:
            return read_for_device(self.files[i], self.crops, generator, self.channels), int(
                self.labels[i]
            )
        views = decode_crops(self.files[i], self.crops, generator, self.channels)
        if views is None:
            logger.warning("could not decode %s; using black crops", self.files[i])
            views = [torch.zeros(self.channels, s, s, dtype=torch.uint8) for s, _ in self.crops]
        return views, int(self.labels[i])


@dataclass
class ImageData:
    """A loaded dataset: uint8 splits plus what the views and the evaluation need.

    Attributes:
        name: The dataset, e.g. ``"fashion-mnist"`` or ``"folder:/abs/path"``.
        train: The images ReSSL trains on (labels may be -1 = unlabelled).
        labelled: The labelled training images (the kNN monitor's bank): the same object as
            ``train`` when that is labelled, STL-10's labelled train split, None when
            there are no labels.
        test: Labelled test split for kNN / linear evaluation, None if there is none.
        mean: Per-channel mean of pixels / 255 (``len == channels``).
        std: Per-channel standard deviation of pixels / 255.
        channels: 1 or 3.
        image_size: Side of the stored square images.
        classes: Class names, index = label; ``[]`` when unlabelled.
        skipped: Unreadable image files skipped while loading (folders).
        files: What identifies the training split's files (folders; None for a built-in
            dataset, whose files do not change): their count and a digest of their names
            and labels (``ressl.data.folders.file_list_digest``). A resume compares it with
            the checkpoint's.
    """

    name: str
    train: ImageSource
    labelled: ImageSource | None
    test: ImageSource | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    image_size: int
    classes: list[str]
    skipped: int = 0
    files: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"mean and std need {self.channels} values (one per channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
