"""Static int8 quantisation of an exported encoder (``ressl export --int8``).

onnxruntime's ``quantize_static`` turns the verified fp32 graph into an int8 one: int8
weights (per output channel), uint8 activations whose ranges come from a calibration run
on a fixed, seeded sample of the run's own training images, decoded and scaled exactly as
the fp32 model's inputs are (the dataset loader's one decode path, pixels / 255; the graph
normalises). The int8 graph is then checked against the fp32 one (:mod:`.int8_check`).

Settings, with the measurements they come from (docs/export.md, "int8"):

* QOperator format (QLinearConv), not QDQ: at 1 thread and batch 64 it ran 176 vs 166
  images/s for ResNet-18 and 2878 vs 2822 for the small CNN (fp32: 47 and 1565).
* per-channel weights: the same speed, and ResNet-18's min cosine to fp32 0.99756 vs
  0.99710 per tensor (randomly initialised encoders, ``sample_images`` inputs).
* MinMax calibration (onnxruntime's default); dynamic quantisation was 5-6x slower than fp32
  for these conv nets (issue 25), so it is not offered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ressl.errors import DataError, ExportError, first_line
from ressl.rules import integer

from .metadata import INPUT_NAME

if TYPE_CHECKING:
    from ressl.data.sources import ImageData, ImageSource

__all__ = [
    "CALIBRATION",
    "CALIBRATION_IMAGES",
    "CALIBRATION_SEED",
    "Calibration",
    "calibration_images",
    "pick_images",
    "quantize_graph",
    "run_dataset",
]

CALIBRATION_IMAGES = 256  # default sample; 128 already gave the cosines in the module docstring
CALIBRATION = integer(16, " (training images that calibrate the int8 ranges)", high=4096)
CALIBRATION_SEED = 0  # the sample is a pure function of (training set, count, seed)
CALIBRATION_METHOD = "minmax"
QUANT_FORMAT = "QOperator"
PER_CHANNEL = True
#: Input bytes per calibration run (a batch of 224 px RGB images is 6 images, of 28 px 64).
#: onnxruntime (1.31) keeps every intermediate output of every calibration batch until it
#: computes the ranges (its ``CalibMaxIntermediateOutputs`` drops the batches it clears), so
#: calibration memory grows with the image count: a reason for the range's upper end.
CALIBRATION_BATCH_BYTES = 4 << 20


@dataclass(frozen=True)
class Calibration:
    """How an int8 file was calibrated (its ``calibration`` metadata entry)."""

    images: int
    seed: int
    dataset: str
    method: str = CALIBRATION_METHOD
    quant_format: str = QUANT_FORMAT
    per_channel: bool = PER_CHANNEL

    def to_json(self) -> str:
        return json.dumps(
            {
                "images": self.images,
                "seed": self.seed,
                "dataset": self.dataset,
                "method": self.method,
                "format": self.quant_format,
                "per_channel": self.per_channel,
                "weights": "int8",
                "activations": "uint8",
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """The entry as ``to_json`` wrote it (a file ressl exported; read for display)."""
        d = json.loads(text)
        return cls(
            images=int(d["images"]),
            seed=int(d["seed"]),
            dataset=str(d["dataset"]),
            method=str(d["method"]),
            quant_format=str(d["format"]),
            per_channel=bool(d["per_channel"]),
        )

    def describe(self) -> str:
        per = "per-channel" if self.per_channel else "per-tensor"
        return (
            f"{self.quant_format} {per} int8 weights, uint8 activations; {self.method} ranges "
            f"from {self.images} {self.dataset} training images (seed {self.seed})"
        )


def run_dataset(settings: dict[str, Any], channels: int, image_size: int) -> ImageData:
    """The run's dataset as it trained on it (``subset`` included), at the served size.

    Raises:
        ExportError: the export's source has no run settings (a module, not a checkpoint).
        FileNotFoundError, DataError: the run's data is not where its settings say.
    """
    from ressl.data.loading import load_dataset

    if not settings.get("dataset"):
        raise ExportError(
            "int8 export calibrates on the run's training images, but this source names no "
            "dataset; export a ressl checkpoint (or run folder), not a module"
        )
    return load_dataset(
        settings["dataset"],
        root=settings.get("data_root"),
        download=False,
        image_size=image_size,
        subset=settings.get("subset"),
        channels=channels,
    )


def pick_images(source: ImageSource, idx: torch.Tensor) -> ImageSource:
    """The images ``idx`` of a source, in that order, without decoding anything."""
    from ressl.data.sources import FolderImages, TensorImages

    if isinstance(source, TensorImages):
        return TensorImages(source.images[idx.to(source.device)], source.labels[idx])
    if isinstance(source, FolderImages):
        files = [source.files[int(i)] for i in idx]
        return FolderImages(files, source.labels[idx], source.image_size, source.channels)
    raise TypeError(f"pick_images takes TensorImages or FolderImages, got {type(source).__name__}")


def sample_indices(n: int, count: int, seed: int) -> torch.Tensor:
    """``min(count, n)`` distinct indices of ``range(n)``, a pure function of the arguments."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(count, n)]


def model_inputs(source: ImageSource, batch_size: int) -> Iterator[np.ndarray]:
    """A source's images as the fp32 model takes them: float32 ``(B, C, S, S)``, pixels / 255."""
    for images, _ in source.batches(batch_size, epoch=0, seed=0, shuffle=False, drop_last=False):
        yield (images.float() / 255).numpy()


def calibration_images(data: ImageData, count: int, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """A seeded sample of ``count`` training images (all of them when there are fewer), float32
    ``(N, C, S, S)`` in [0, 1].

    Raises:
        ConfigError: ``count`` outside :data:`CALIBRATION`.
        DataError: no training image could be read.
    """
    CALIBRATION.check("calibration_images", count)
    picked = pick_images(data.train, sample_indices(len(data.train), count, seed))
    batches = list(model_inputs(picked, 64))
    if not batches:
        raise DataError(f"{data.name} has no training images to calibrate the int8 model on")
    return np.concatenate(batches)


class _Reader:
    """onnxruntime's ``CalibrationDataReader``: the calibration images in bounded batches."""

    def __init__(self, images: np.ndarray) -> None:
        per_image = max(1, images[0].nbytes)
        step = max(1, min(64, CALIBRATION_BATCH_BYTES // per_image))
        self._batches = iter([images[i : i + step] for i in range(0, len(images), step)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs a warning per tensor it leaves in float (the shape
    arithmetic of the L2 norm); those are expected, not the user's concern."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(model: bytes, calibration: np.ndarray) -> bytes:
    """The int8 graph of an fp32 ressl graph, calibrated on ``calibration`` (float32
    ``(N, C, S, S)`` in [0, 1]); metadata is left to the caller.

    Raises:
        ExportError: onnxruntime could not quantise the graph.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="ressl-int8-") as tmp:
        fp32, pre, int8 = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(model)
        try:
            with _quiet_quantizer():
                quant_pre_process(str(fp32), str(pre))
                quantize_static(
                    str(pre),
                    str(int8),
                    _Reader(calibration),
                    quant_format=getattr(QuantFormat, QUANT_FORMAT),
                    per_channel=PER_CHANNEL,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
        except Exception as e:  # noqa: BLE001 - onnxruntime.quantization raises many kinds
            raise ExportError(
                f"onnxruntime could not quantise the graph: {first_line(e)}"
            ) from None
        return int8.read_bytes()
