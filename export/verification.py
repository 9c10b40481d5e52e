"""Checking an exported graph: ``onnx.checker``, then onnxruntime against PyTorch.

An export is written only after its graph passed: onnxruntime (CPU) runs it on
``sample_images`` batches and its embeddings are compared with PyTorch eager fp32
(max |diff| for fp32 exports, per-row cosine for fp16 ones).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ressl.errors import ExportError, first_line

from .embedder import open_session
from .metadata import INPUT_NAME, OUTPUT_NAME

__all__ = ["FP16_MIN_COSINE", "FP32_MAX_ABS_DIFF", "Verification", "check_graph", "sample_images"]

FP32_MAX_ABS_DIFF = 1e-4  # onnxruntime vs PyTorch, L2-normalised embeddings, fp32 export
FP16_MIN_COSINE = 0.999  # per-row cosine similarity of an fp16 export with fp32 PyTorch


def sample_images(n: int, channels: int, size: int, seed: int = 0) -> Tensor:
    """Real-looking test images, float32 ``(n, channels, size, size)`` in [0, 1].

    Smooth random shapes (bicubic upsampling of a 4x4 grid), a lighting ramp and
    a little sensor noise: statistics closer to photos than uniform noise, so a
    verification sees realistic activations.
    """
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(
        torch.rand(n, channels, 4, 4, generator=g),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    )
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size) * torch.rand(n, 1, 1, 1, generator=g)
    x = 0.7 * x + 0.3 * ramp + 0.03 * torch.randn(n, channels, size, size, generator=g)
    return x.clamp_(0, 1)


@dataclass(frozen=True)
class Verification:
    """onnxruntime (CPU) against PyTorch eager fp32 on ``sample_images`` batches.

    Attributes:
        shapes: the input shapes checked, ``(N, C, H, W)``.
        max_abs_diff: largest absolute difference of any embedding element.
        min_cosine: smallest cosine similarity of a row with its PyTorch counterpart.
        criterion: what had to hold, e.g. ``"max |diff| <= 0.0001"``.
        passed: whether it held (an export that fails raises instead of writing).
    """

    shapes: tuple[tuple[int, int, int, int], ...]
    max_abs_diff: float
    min_cosine: float
    criterion: str
    passed: bool

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.shapes)
        return (
            f"onnx.checker ok; onnxruntime vs PyTorch: max |diff| {self.max_abs_diff:.2e}, "
            f"min cosine {self.min_cosine:.6f} ({self.criterion}: {'passed' if self.passed else 'FAILED'}) "
            f"on batches {shapes}"
        )

    def to_json(self) -> str:
        """The ``verification`` metadata entry of an exported file."""
        return json.dumps(
            {
                "max_abs_diff": self.max_abs_diff,
                "min_cosine": self.min_cosine,
                "criterion": self.criterion,
                "shapes": [list(v) for v in self.shapes],
            }
        )


def check_graph(
    proto: onnx.ModelProto,
    reference: nn.Module,
    shapes: Sequence[tuple[int, int, int, int]],
    fp16: bool,
) -> Verification:
    """``onnx.checker``, then onnxruntime against PyTorch on ``shapes``.

    Raises:
        ExportError: either check failed.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {first_line(e)}") from None
    verification = _verify(proto.SerializeToString(), reference, shapes, fp16)
    if not verification.passed:
        raise ExportError(f"export verification failed, nothing written: {verification.describe()}")
    return verification


def _verify(
    model_bytes: bytes,
    reference: nn.Module,
    shapes: Sequence[tuple[int, int, int, int]],
    fp16: bool,
) -> Verification:
    session = open_session(model_bytes, device="cpu")
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed run is reported below, in one line
    worst_diff, worst_cos = 0.0, 1.0
    for i, (n, c, h, w) in enumerate(shapes):
        x = sample_images(n, c, h, seed=100 + i)  # (n, c, h, h); shapes are square
        with torch.no_grad():
            want = reference(x).numpy()
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()}, quiet)[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            raise ExportError(
                f"onnxruntime cannot run the exported graph on input {(n, c, h, w)}: {first_line(e)}"
            ) from None
        if got.shape != want.shape:
            raise ExportError(
                f"onnxruntime returned shape {got.shape} but PyTorch {want.shape} for input {(n, c, h, w)}"
            )
        diff, cos = _compare(got, want)
        worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
    if fp16:
        criterion, passed = f"min cosine >= {FP16_MIN_COSINE}", worst_cos >= FP16_MIN_COSINE
    else:
        criterion, passed = f"max |diff| <= {FP32_MAX_ABS_DIFF:g}", worst_diff <= FP32_MAX_ABS_DIFF
    return Verification(tuple(shapes), worst_diff, worst_cos, criterion, passed)


def _compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """``(max |diff|, min row cosine)`` of onnxruntime's rows against PyTorch's; a non-finite
    output is the worst there is, ``(inf, -1)``."""
    if not np.isfinite(got).all():
        return float("inf"), -1.0
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
    return float(np.abs(got - want).max()), float(cos.min())
