"""The dataset registry: every dataset ressl knows, as data.

One :class:`DatasetInfo` per dataset holds what the rest of the package needs to
know about it: its names, channels and default image side, the normalisation
constants, class names, the paper's training recipe for it, and the reader of its
files. Adding a dataset is adding one entry to :data:`DATASETS` (a test adds one).

This module imports no torch (the command line builds its help from it); the
readers import :mod:`ressl.data.formats` when they run.

Example:
    >>> find("CIFAR-10")[0].name
    'cifar10'
    >>> recipe_for("folder:/data/imagenet", image_size=224)["queue_size"]
    131072
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ressl.errors import ConfigError
from ressl.rules import JITTER_STRENGTHS

if TYPE_CHECKING:
    from ressl.data.formats import Splits

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "IMAGENET_LIKE_SIZE",
    "dataset_names",
    "find",
    "recipe_for",
    "spec_problem",
]

#: Reads a built-in dataset's files: ``(root, *, cache, system_dirs, download, size, subset)``.
Reader = Callable[..., "Splits"]

#: Folder data at this side or more is ImageNet-like and gets the ImageNet recipe.
IMAGENET_LIKE_SIZE = 224


def _recipe(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType(values)


# The paper's small-dataset recipe (RESSL.md): SGD lr 0.06 per 256 images, 5 warm-up
# epochs then cosine, 200 epochs, ResNet-18 with a 512 -> 128 head, no blur.
_SMALL_IMAGES = dict(
    backbone="resnet18",
    hidden_dim=512,
    embed_dim=128,
    lr=0.06,
    weight_decay=5e-4,
    warmup_epochs=5,
    epochs=200,
    jitter=JITTER_STRENGTHS,
    blur=0.0,
    decay_exempt="1d",
)
CIFAR_RECIPE = _recipe(**_SMALL_IMAGES, queue_size=4096, ema_momentum=0.99)
STL10_RECIPE = _recipe(**_SMALL_IMAGES, queue_size=16384, ema_momentum=0.996)
# Fashion-MNIST is not in the paper: lr 0.15, 1 warm-up epoch, 50 epochs and stronger
# brightness / contrast jitter (the only colour ops that act on grey images) won a search
# over crop scale, lr, queue size, tau_t, blur and jitter (docs/results.md).
FASHION_MNIST_RECIPE = _recipe(
    **{**CIFAR_RECIPE, "lr": 0.15, "warmup_epochs": 1, "epochs": 50, "jitter": (0.8, 0.8, 0.4, 0.1)}
)
# The paper's ImageNet recipe: ResNet-50, head 2048 -> 4096 -> 512, blur p 0.5.
IMAGENET_RECIPE = _recipe(
    backbone="resnet50",
    hidden_dim=4096,
    embed_dim=512,
    queue_size=131072,
    ema_momentum=0.999,
    lr=0.05,
    weight_decay=1e-4,
    warmup_epochs=5,
    epochs=200,
    jitter=JITTER_STRENGTHS,
    blur=0.5,
    decay_exempt="names",  # the official ImageNet code's rule
)

# Fashion-MNIST is not in the paper: computed from its 60,000 training images
# (pixels / 255: mean 0.28604, std 0.35302); tests check them against the real files.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
STL10_MEAN, STL10_STD = (0.4408, 0.4279, 0.3867), (0.2682, 0.2610, 0.2686)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What ressl knows about one dataset.

    Attributes:
        name: The canonical name (``"cifar10"``); for image folders the spec's
            prefix (``"folder"`` in ``folder:PATH``).
        summary: One line for help texts.
        channels: Image channels (1 or 3).
        image_size: Default side of the stored square images.
        mean: Per-channel mean of pixels / 255.
        std: Per-channel standard deviation of pixels / 255.
        recipe: The training settings the paper (or our search) uses for it.
        classes: Class names, index = label; empty when the files or folders name them.
        aliases: Other spellings accepted (lower case).
        reader: Reads the built-in files into ``ressl.data.formats.Splits``; None for an
            image folder given as ``NAME:PATH``.
        stored_size: The reader resizes to ``size`` itself (STL-10 from 96 px);
            otherwise a size other than ``image_size`` is resized after reading.
    """

    name: str
    summary: str
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    recipe: Mapping[str, Any]
    classes: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    reader: Reader | None = None
    stored_size: bool = False

    @property
    def takes_path(self) -> bool:
        """Given as ``NAME:PATH`` (an image folder)."""
        return self.reader is None

    @property
    def spec(self) -> str:
        """How a user names it: ``cifar10``, or ``folder:PATH``."""
        return f"{self.name}:PATH" if self.takes_path else self.name


def _read_fashion_mnist(root: Path | None, **kw: Any) -> Splits:
    from ressl.data.formats import read_fashion_mnist

    kw.pop("size")
    return read_fashion_mnist(root, **kw)


def _cifar(name: str) -> Reader:
    def read(root: Path | None, *, size: int, system_dirs: Any, **kw: Any) -> Splits:
        from ressl.data.formats import read_cifar

        return read_cifar(name, root, **kw)

    return read


def _read_stl10(root: Path | None, *, system_dirs: Any, **kw: Any) -> Splits:
    from ressl.data.formats import read_stl10

    return read_stl10(root, **kw)


_ENTRIES = (
    DatasetInfo(
        "fashion-mnist",
        "Fashion-MNIST, 28 px grey (the default; offline on Debian)",
        1,
        28,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        FASHION_MNIST_RECIPE,
        FASHION_MNIST_CLASSES,
        aliases=("fashionmnist", "fmnist"),
        reader=_read_fashion_mnist,
    ),
    DatasetInfo(
        "cifar10",
        "CIFAR-10, 32 px",
        3,
        32,
        CIFAR10_MEAN,
        CIFAR10_STD,
        CIFAR_RECIPE,
        aliases=("cifar-10",),
        reader=_cifar("cifar10"),
    ),
    DatasetInfo(
        "cifar100",
        "CIFAR-100 (fine labels), 32 px",
        3,
        32,
        CIFAR100_MEAN,
        CIFAR100_STD,
        CIFAR_RECIPE,
        aliases=("cifar-100",),
        reader=_cifar("cifar100"),
    ),
    DatasetInfo(
        "stl10",
        "STL-10, stored at 64 px (from 96)",
        3,
        64,
        STL10_MEAN,
        STL10_STD,
        STL10_RECIPE,
        STL10_CLASSES,
        aliases=("stl-10",),
        reader=_read_stl10,
        stored_size=True,
    ),
    DatasetInfo(
        "folder",
        "any tree of images; sub-folders are classes",
        3,
        64,
        IMAGENET_MEAN,
        IMAGENET_STD,
        STL10_RECIPE,
    ),
    DatasetInfo(
        "imagenet",
        "an ImageNet-like folder (train/ + val/) with the ImageNet recipe",
        3,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        IMAGENET_RECIPE,
    ),
)

#: Every dataset, by canonical name, in the order help texts list them.
DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({d.name: d for d in _ENTRIES})


def dataset_names() -> list[str]:
    """The dataset specs ressl accepts (``folder:PATH`` takes any path)."""
    return [d.spec for d in DATASETS.values()]


def _lookup(spec: object) -> tuple[DatasetInfo | None, str | None, str]:
    """``(entry, path, problem)``: the entry and path of a spec, or what is wrong with it."""
    valid = ", ".join(dataset_names())
    if not isinstance(spec, str):
        return None, None, f"must be a string, one of {valid}, got {spec!r}"
    kind, colon, path = spec.strip().partition(":")
    name = kind.lower().replace("_", "-")
    entry = next((d for d in DATASETS.values() if name == d.name or name in d.aliases), None)
    if entry is not None and entry.takes_path:
        if not colon or not path.strip():
            return (
                None,
                None,
                (f"{kind}:PATH needs the folder's path, e.g. {kind}:/data/images, got {spec!r}"),
            )
        return entry, path, ""
    if entry is None or colon:
        return None, None, f"must be one of {valid}, got {spec!r}"
    return entry, None, ""


def spec_problem(spec: object) -> str:
    """What is wrong with a dataset spec ("" when nothing), worded to follow its name:
    ``must be one of fashion-mnist, ..., got 'mnist'``."""
    return _lookup(spec)[2]


def find(spec: str) -> tuple[DatasetInfo, str | None]:
    """The registry entry of a dataset spec, and the path of a ``NAME:PATH`` spec.

    Names are matched case-insensitively, ``_`` as ``-``, aliases included.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: an unknown name, or a folder kind without its path.
    """
    entry, path, problem = _lookup(spec)
    if entry is None:
        if not isinstance(spec, str):
            raise TypeError(f"dataset {problem}")
        raise ConfigError("{dataset} " + problem, "dataset")
    return entry, path


def recipe_for(spec: str, image_size: int | None = None) -> Mapping[str, Any]:
    """The training recipe of a dataset spec: a folder at ``IMAGENET_LIKE_SIZE`` px or more is
    ImageNet-like and gets the ImageNet recipe.

    Raises:
        ValueError, TypeError: as :func:`find`.
    """
    entry, _ = find(spec)
    if entry.name == "folder" and (image_size or 0) >= IMAGENET_LIKE_SIZE:
        return DATASETS["imagenet"].recipe
    return entry.recipe
