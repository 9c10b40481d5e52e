"""ONNX export and onnxruntime serving (installed as ``ressl.export``).

``export_onnx`` turns a checkpoint's encoder into a verified ONNX file that
carries its own preprocessing and metadata; ``Embedder`` computes embeddings
from such a file with onnxruntime, numpy and PIL. The exporter (which needs
torch) is imported on first use, so serving code that only needs ``Embedder``
does not load it.

    >>> from ressl.export import Embedder, export_onnx           # doctest: +SKIP
    >>> export_onnx("runs/fmnist", "encoder.onnx")                # doctest: +SKIP
    >>> Embedder("encoder.onnx")(["a.png", "b.png"]).shape       # doctest: +SKIP
    (2, 256)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .embedder import Embedder, FileEmbeddings, cuda_device_count, open_session
from .images import IMAGE_EXTENSIONS, image_files, load_image, to_batch
from .metadata import FORMAT, FORMAT_VERSION, INPUT_NAME, OUTPUT_NAME, ModelInfo
from .modelfile import describe_model, read_model_info
from .outputs import load_embeddings, save_embeddings

if TYPE_CHECKING:
    from ressl.errors import ExportError

    from .exporter import ExportReport, export_onnx
    from .verification import Verification, sample_images

__all__ = [
    # export (needs torch)
    "export_onnx",
    "ExportReport",
    "ExportError",
    "Verification",
    "sample_images",
    # serving (onnxruntime, numpy, PIL)
    "Embedder",
    "FileEmbeddings",
    "ModelInfo",
    "open_session",
    "cuda_device_count",
    "to_batch",
    "load_image",
    "image_files",
    "IMAGE_EXTENSIONS",
    "save_embeddings",
    "load_embeddings",
    "read_model_info",
    "describe_model",
    # file format
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAME",
]

#: The names that need torch, and the module each is imported from on first use.
_EXPORTER = {
    "export_onnx": ".exporter",
    "ExportReport": ".exporter",
    "ExportError": "ressl.errors",
    "Verification": ".verification",
    "sample_images": ".verification",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTER:
        return getattr(importlib.import_module(_EXPORTER[name], __name__), name)
    raise AttributeError(f"module 'ressl.export' has no attribute {name!r}")
