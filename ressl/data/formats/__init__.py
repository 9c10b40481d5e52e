"""The built-in datasets' files: found (or downloaded) and read as uint8 tensors.

* Fashion-MNIST: idx files (:func:`read_idx`), gzipped or not, in its own layout or
  torchvision's.
* CIFAR-10 / CIFAR-100: the "python version" pickled batches, read with an unpickler
  that refuses every global but the few numpy ones the batches hold.
* STL-10: the column-major ``*_X.bin`` / ``*_y.bin`` binaries, memory-mapped and resized
  in chunks.

Each ``read_*`` returns :class:`Splits` of plain tensors; :mod:`ressl.data.loading` wraps them
in sources. Missing files are downloaded with torchvision into the ``cache`` directory
the caller names. Nothing here imports :mod:`ressl.data.loading`.
"""

from ressl.data.formats.cifar import read_cifar
from ressl.data.formats.common import Split, Splits, resize_uint8
from ressl.data.formats.fashion_mnist import read_fashion_mnist, read_idx
from ressl.data.formats.stl10 import read_stl10

__all__ = [
    "Split",
    "Splits",
    "read_cifar",
    "read_fashion_mnist",
    "read_idx",
    "read_stl10",
    "resize_uint8",
]
