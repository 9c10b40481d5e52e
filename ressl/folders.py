"""Image folders: which files belong to which split and class, and decoding them to uint8.

A folder is one split, or holds ``train/`` plus ``test/`` (or ``val/``). In a split,
first-level sub-folders that hold images are classes (as torchvision's ImageFolder);
without them every image is unlabelled (-1). :func:`decode_image` turns one file into
``(3, S, S)`` uint8: RGB, shorter side resized, centre crop.

:mod:`ressl.data` decides whether a split is decoded into memory or streamed, and wraps
the result in a source. Nothing here imports :mod:`ressl.data`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .imagefiles import IMAGE_EXTENSIONS, images_under, is_image_name, resize_center_crop

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "decode_crops",
    "decode_image",
    "decode_images",
    "readable_images",
    "scan_test",
    "scan_train",
    "split_dirs",
]


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
        array = np.asarray(resize_center_crop(rgb, size), dtype=np.uint8)  # (S, S, 3)
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_crops(
    path: str | Path, crops: Sequence[tuple[int, tuple[float, float]]], generator: torch.Generator
) -> list[Tensor] | None:
    """Decode one file at full resolution and cut RandomResizedCrops from it.

    The standard ImageNet pipeline: each crop's box is drawn on the original image
    (area fraction in its scale range, aspect ratio in [3/4, 4/3], as
    ``RandomResizedCrop.get_params``), then resized to its side with PIL's
    antialiased bilinear filter. Flips and colour ops are left to the device.

    Args:
        path: The image file.
        crops: ``(side, (scale_lo, scale_hi))`` per crop.
        generator: CPU generator the boxes are drawn from.

    Returns:
        One ``(3, side, side)`` uint8 tensor per crop, or None when the file cannot
        be decoded.
    """
    from .views import sample_crop_boxes  # views imports nothing from here

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        out = []
        for side, scale in crops:
            top, left, bh, bw = sample_crop_boxes(1, h, w, generator=generator, scale=scale)[
                0
            ].tolist()
            crop = rgb.resize(
                (side, side), Image.Resampling.BILINEAR, box=(left, top, left + bw, top + bh)
            )
            out.append(
                torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy())
                .permute(2, 0, 1)
                .contiguous()
            )
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None
    return out


def _can_open(path: str | Path) -> bool:
    """Header check only (cheap): can PIL identify the image and its size?"""
    try:
        with Image.open(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:  # noqa: BLE001 - as in decode_image
        return False


# --------------------------------------------------------------------------- decoding many


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


def _map_files(
    fn: Callable[[str], Any], files: Sequence[str], workers: int
) -> Iterator[tuple[int, Any]]:
    """``(index, fn(file))`` for every file, in order; in ``workers`` processes when > 1."""
    if workers <= 1:
        yield from ((i, fn(f)) for i, f in enumerate(files))
        return
    loader = DataLoader(
        _MapFiles(fn, files), batch_size=64, num_workers=workers, collate_fn=_as_list
    )
    for chunk in loader:
        yield from chunk


def decode_images(files: Sequence[str], size: int, workers: int = 0) -> tuple[Tensor, Tensor]:
    """Decode every file with :func:`decode_image`, skipping those that fail.

    Args:
        files: Image paths.
        size: Side of the square images.
        workers: Decode in this many worker processes (0 or 1: in this process).

    Returns:
        ``(images (K, 3, size, size) uint8, kept (K,) int64)``: the decodable files, in
        order, and their indices into ``files``.
    """
    images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    ok = torch.zeros(len(files), dtype=torch.bool)
    for i, image in _map_files(partial(decode_image, size=size), files, workers):
        if image is not None:
            images[i], ok[i] = image, True
    kept = ok.nonzero().squeeze(1)
    if len(kept) < len(files):
        images = images.index_select(0, kept)
    return images, kept


def readable_images(files: Sequence[str], workers: int = 0) -> list[int]:
    """Indices of the files whose header PIL can read (cheap: nothing is decoded)."""
    return [i for i, good in _map_files(_can_open, files, workers) if good]


# --------------------------------------------------------------------------- scanning


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
