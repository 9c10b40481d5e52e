"""``Embedder``: embeddings from an exported encoder with onnxruntime, numpy and PIL (no PyTorch).

The file carries everything needed: the input size and channels come from its
metadata, the normalisation and the L2 norm are inside the graph. The CUDA
provider is used when a GPU is really usable, else the CPU provider; probing
prints nothing on machines without CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ressl.errors import ConfigError, ExportError, first_line

from .images import ImageInput, load_image, pil_mode, to_batch, unreadable_reason
from .metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo

__all__ = ["RUN_INPUT_BYTES", "Embedder", "FileEmbeddings", "cuda_device_count", "open_session"]

logger = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_ORT_DEFAULT_SEVERITY = 2  # onnxruntime's default logger level (warning); it has no getter

#: The most input one onnxruntime run is handed, bytes. A run's memory grows with its input (a
#: CNN's first activations are several times the image), so bounding the input bounds the run
#: whatever image size a file's metadata claims: 64 MiB is 64 images at the default batch up to
#: 3x512x512, 111 at 224 px, and one (run alone, never refused) at 4096 px.
RUN_INPUT_BYTES = 64 * 2**20
#: How onnxruntime says an allocation failed (its CPU arena, or C++'s std::bad_alloc).
_ALLOCATION = re.compile(r"Failed to allocate memory[^\n]*|bad_alloc")


def cuda_device_count() -> int:
    """GPUs the CUDA driver reports (0 without a driver or GPU), asked without PyTorch.

    Loads the driver library with ctypes and calls ``cuInit`` / ``cuDeviceGetCount``:
    cheap, silent, and true only when a GPU is usable, unlike
    ``ort.get_available_providers()``, which lists CUDA whenever onnxruntime-gpu is installed.
    """
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Silence onnxruntime's global logger while a provider is probed (it prints load failures as errors)."""
    ort.set_default_logger_severity(4)
    try:
        yield None
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = (
        3  # session warnings (e.g. nodes placed on CPU) are not the user's concern
    )
    if threads is not None:
        if threads < 0:
            raise ConfigError.invalid("threads", ">= 0 (0: onnxruntime's choice)", threads)
        so.intra_op_num_threads = threads
    return so


def open_session(
    model: str | os.PathLike[str] | bytes, device: str = "auto", threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session on the best usable provider.

    Args:
        model: an ONNX file or its bytes.
        device: ``"auto"`` (CUDA when a GPU is usable, else CPU), ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for one run (``None``: onnxruntime's default, the physical cores).

    Raises:
        ConfigError: a bad ``device``, or CUDA asked for but unusable.
        ExportError: a file onnxruntime cannot load.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError.invalid("device", "'auto', 'cpu' or 'cuda'", device)
    name = "model bytes" if isinstance(model, bytes) else os.fspath(model)
    src: str | bytes = model if isinstance(model, bytes) else os.fspath(model)
    options = _options(threads)
    want_cuda = (
        device != "cpu" and _CUDA in ort.get_available_providers() and cuda_device_count() > 0
    )
    if device == "cuda" and not want_cuda:
        raise ConfigError(
            "device='cuda' but no usable GPU: "
            + (
                "onnxruntime has no CUDA provider (install onnxruntime-gpu)"
                if _CUDA not in ort.get_available_providers()
                else "no CUDA driver or GPU found"
            )
        )
    if want_cuda:
        if "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
                ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels, when installed that way
        with _quiet_ort():
            session = _load(src, name, options, [_CUDA, _CPU])
        if session.get_providers()[0] == _CUDA:
            return session
        if device == "cuda":
            raise ConfigError(
                "device='cuda' but onnxruntime's CUDA provider failed to load (CUDA or cuDNN libraries "
                "missing or of the wrong version)"
            )
        logger.info("a GPU is present but onnxruntime's CUDA provider did not load; using the CPU")
        return session
    return _load(src, name, options, [_CPU])


def _load(
    src: str | bytes, name: str, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own RuntimeError subclasses
        raise ExportError(
            f"{name} is not a valid ONNX model onnxruntime can load ({first_line(e)})"
        ) from None


@dataclass
class FileEmbeddings:
    """What ``Embedder.embed_files`` returns.

    Attributes:
        embeddings: float32 ``(N, D)``, row i for ``paths[i]``.
        paths: the files embedded, in input order.
        skipped: ``(file, reason)`` for each file that could not be read.
    """

    embeddings: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Embedder:
    """Embeddings from an exported ressl encoder, with onnxruntime.

    Args:
        path: an ONNX file written by ``export_onnx`` / ``ressl export``.
        device: ``"auto"`` (CUDA when a GPU is usable, else CPU), ``"cpu"`` or ``"cuda"``.
        batch_size: images per onnxruntime run.
        threads: CPU threads per run (``None``: onnxruntime's default).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ONNX file, not a ressl encoder, or its graph disagrees with its metadata.

    Example:
        >>> emb = Embedder("encoder.onnx")                  # doctest: +SKIP
        >>> z = emb(["a.jpg", "b.png"])                       # (2, D) float32, rows L2-normalised
        >>> z = emb(np.zeros((4, 32, 32, 3), np.uint8))      # uint8 (N, H, W, C) pixels
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch_size: int = 64,
        threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError.invalid("batch_size", ">= 1", batch_size)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no such file"
                if not self.path.exists()
                else f"{self.path} is a folder, not an ONNX file"
            )
        self.batch_size = batch_size
        self.session = open_session(self.path, device, threads)
        self.info = ModelInfo.from_metadata(
            self.session.get_modelmeta().custom_metadata_map, str(self.path)
        )
        self._check_graph()
        self.images_per_run = max(1, min(batch_size, RUN_INPUT_BYTES // self.image_bytes))

    def _check_graph(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = ([i.name for i in inputs], [o.name for o in outputs])
        if names != ([INPUT_NAME], [OUTPUT_NAME]):
            raise ExportError(
                f"{self.path}: graph has inputs {names[0]} and outputs {names[1]}, expected "
                f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
            )
        self.info.check_signature(inputs[0].shape, outputs[0].shape, str(self.path))
        if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
            raise ExportError(
                f"{self.path}: graph input/output must be float32, got {inputs[0].type}/{outputs[0].type}"
            )

    @property
    def provider(self) -> str:
        """The provider runs go to: ``"CUDAExecutionProvider"`` or ``"CPUExecutionProvider"``."""
        return str(self.session.get_providers()[0])

    @property
    def embedding_dim(self) -> int:
        return self.info.embedding_dim

    @property
    def image_bytes(self) -> int:
        """Bytes of one decoded image: float32 ``(C, S, S)``."""
        return 4 * self.info.channels * self.info.image_size**2

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Images of any accepted kind -> float32 ``(N, C, S, S)`` in [0, 1] (see ``ressl.export.images.to_batch``)."""
        return to_batch(
            images, self.info.image_size, self.info.channels, any_size=self.info.dynamic_spatial
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(N, C, H, W)`` in [0, 1] -> float32 ``(N, D)``, in runs of at most
        ``batch_size`` images and ``RUN_INPUT_BYTES`` of input (one image at least).

        Raises:
            ValueError: onnxruntime ran out of memory (naming the input it was given).
        """
        per_run = max(1, min(self.batch_size, RUN_INPUT_BYTES // max(1, batch[:1].nbytes)))
        out = [self._run_once(batch[i : i + per_run]) for i in range(0, len(batch), per_run)]
        if not out:
            return np.zeros((0, self.info.embedding_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _run_once(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]  # type: ignore[no-any-return]
        except Exception as e:
            failed = _ALLOCATION.search(str(e))
            if failed is None:
                raise  # anything else is a bug, not the input's size
            n, c, h, w = batch.shape
            raise ExportError(
                f"{self.path}: onnxruntime ran out of memory running {n} {c}x{h}x{w} image(s) "
                f"(the file's metadata asks for {self.info.image_size}x{self.info.image_size} "
                f"input): {failed.group(0).strip()}"
            ) from None

    def embed(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Embed images: paths, PIL images, uint8 ``(H, W, C)`` / ``(N, H, W, C)`` or float ``(N, C, H, W)`` arrays.

        Files, PIL images and uint8 arrays are resized (shorter side to S,
        bilinear) and centre-cropped to S x S; float arrays in [0, 1] are fed unchanged.
        Lists and 4-D arrays are brought to the model's input ``images_per_run`` at a
        time, so their decoded memory is bounded by ``RUN_INPUT_BYTES``, not their number.

        Returns:
            float32 ``(N, D)``, rows L2-normalised.

        Raises:
            TypeError, ValueError: on inputs of the wrong kind, shape, channels or range.
            OSError: a file cannot be read.
        """
        many = isinstance(images, np.ndarray) and images.ndim == 4
        many = many or (isinstance(images, Sequence) and not isinstance(images, (str, bytes)))
        if not many or len(images) <= self.images_per_run:  # type: ignore[arg-type]
            return self.run(self.preprocess(images))
        n, items = self.images_per_run, images
        rows = [self.run(self.preprocess(items[i : i + n])) for i in range(0, len(items), n)]  # type: ignore[index, arg-type]
        return np.concatenate(rows)

    __call__ = embed

    def embed_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        progress: Callable[[int], None] | None = None,
    ) -> FileEmbeddings:
        """Embed image files, skipping (and listing) the ones that cannot be read.

        Args:
            paths: image files.
            progress: called with the number of files handled after each batch.

        Returns:
            ``FileEmbeddings`` with one row per readable file, in input order.
        """
        size, channels = self.info.image_size, self.info.channels
        pil_mode(channels)  # a model files cannot be fed to fails here, not as N skipped files
        rows: list[np.ndarray] = []
        done: list[str] = []
        skipped: list[tuple[str, str]] = []
        per_run = self.images_per_run  # decoded images held at once: RUN_INPUT_BYTES at most
        for start in range(0, len(paths), per_run):
            chunk, names = [], []
            for p in paths[start : start + per_run]:
                try:
                    chunk.append(load_image(p, size, channels))
                    names.append(os.fspath(p))
                except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                    skipped.append((os.fspath(p), unreadable_reason(e, os.fspath(p))))
            if chunk:
                rows.append(self.run(np.stack(chunk)))
                done += names
            if progress is not None:
                progress(min(start + per_run, len(paths)))
        emb = np.concatenate(rows) if rows else np.zeros((0, self.info.embedding_dim), np.float32)
        return FileEmbeddings(emb, done, skipped)
