"""``export_onnx``: a trained encoder to a self-describing, verified ONNX file.

The graph is the whole serving function: float32 images in [0, 1] -> the
dataset normalisation -> backbone (-> projection head) -> L2 norm. Batch size is
dynamic, and so are height and width when the network accepts other sizes (every
ressl backbone ends in global pooling). The file's metadata says how it was made
(see ``ressl.export.metadata``), so a server needs no other file. What is exported
comes from ``ressl.export.source``; the check before writing is
``ressl.export.verification``.

Exported with PyTorch's TorchScript-based exporter (``dynamo=False``): it needs
no extra package (the dynamo exporter needs onnxscript), handles dynamic axes
with one ``dynamic_axes`` mapping, folds BatchNorm into the convolutions and
constants at export time, and takes about a second for a ResNet-18.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ressl._version import __version__
from ressl.atomic import check_writable, write_atomic
from ressl.errors import ConfigError, ExportError, first_line
from ressl.views import normalize

from .int8_check import Int8Check, check_int8
from .metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo
from .quantization import (
    CALIBRATION,
    CALIBRATION_IMAGES,
    CALIBRATION_SEED,
    Calibration,
    quantize_graph,
    run_dataset,
)
from .quantization import calibration_images as calibration_images_of
from .source import resolve_source
from .verification import Verification, check_graph, sample_images

__all__ = ["DEFAULT_OPSET", "ExportReport", "ServingEncoder", "export_onnx"]

DEFAULT_OPSET = 17
EXPORTER = f"torch {torch.__version__} (TorchScript-based torch.onnx.export)"


class ServingEncoder(nn.Module):
    """The served function: ``(N, C, H, W)`` float32 in [0, 1] -> ``(N, D)`` L2-normalised float32.

    Args:
        net: ``(N, C, H, W)`` normalised images -> ``(N, D)`` (a backbone, or backbone + head).
        mean, std: per-channel normalisation, applied inside the graph.
        fp16: run ``net`` in float16 (normalisation and the L2 norm stay in float32).
    """

    def __init__(
        self, net: nn.Module, mean: Sequence[float], std: Sequence[float], fp16: bool = False
    ) -> None:
        super().__init__()
        self.net = net.half() if fp16 else net
        self.fp16 = fp16
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def forward(self, images: Tensor) -> Tensor:
        x = normalize(images, self.mean, self.std)  # (N, C, H, W), constants in the graph
        if self.fp16:
            x = x.half()
        return F.normalize(self.net(x).float(), dim=1)  # (N, D)


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote.

    Attributes:
        path: the ONNX file.
        info: its metadata, parsed.
        size_bytes: file size.
        verification: the check's result (None with ``verify=False``).
    """

    path: Path
    info: ModelInfo
    size_bytes: int
    verification: Verification | Int8Check | None = field(default=None)


def export_onnx(
    source: str | os.PathLike[str] | nn.Module,
    out: str | os.PathLike[str],
    *,
    weights: str | None = None,
    head: bool = False,
    fp16: bool = False,
    int8: bool = False,
    calibration_images: int = CALIBRATION_IMAGES,
    verify: bool = True,
    opset: int = DEFAULT_OPSET,
    backbone: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ExportReport:
    """Export an encoder to a verified ONNX file that carries its own preprocessing and metadata.

    The graph maps input ``images``, float32 ``(N, C, H, W)`` in [0, 1], to output
    ``embedding``, float32 ``(N, D)`` L2-normalised; the dataset's mean/std
    normalisation is inside. ``N`` is dynamic, and ``H``, ``W`` too where the
    network accepts other sizes. The file is written atomically, and only after
    it passed the verification.

    Args:
        source: a ressl checkpoint (``.safetensors`` or run folder), or a module:
            a ``ReSSL``, an ``Encoder``, or any ``(N, C, H, W) -> (N, D)`` network.
        out: the ``.onnx`` file to write; parent folders are created.
        weights: ``"student"`` (default) or ``"teacher"`` (the EMA weights), for
            checkpoints and ``ReSSL`` modules; leave unset for other modules.
        head: include the projection head (output dim ``embed_dim``); default:
            backbone features, what kNN and linear evaluation use.
        fp16: compute in float16 (for GPU serving); inputs and outputs stay float32.
        int8: quantise statically to int8 (for CPU serving; ``ressl.export.quantization``),
            calibrated on ``calibration_images`` of the run's training images (checkpoints
            only) and checked against the fp32 graph on held-out images
            (``ressl.export.int8_check``); inputs and outputs stay float32.
        verify: run ``onnx.checker`` and compare onnxruntime with PyTorch:
            max |diff| <= 1e-4 (fp32) or per-row cosine >= 0.999 (fp16).
        opset: ONNX opset.
        backbone: name recorded in the metadata (modules; default: the class name).
        image_size, channels, mean, std: the served input, for modules only
            (a checkpoint's settings supply them).

    Returns:
        An ``ExportReport``: path, parsed metadata, size, verification result.

    Raises:
        ValueError: bad arguments, or ``CheckpointError`` for a bad checkpoint file.
        TypeError: a module given without ``image_size``/``channels``/``mean``/``std``.
        ExportError: the check failed (int8: beyond ``int8_check``'s tolerances); nothing is
            written.

    Example:
        >>> report = export_onnx("runs/fmnist", "encoder.onnx")        # doctest: +SKIP
        >>> report.verification.max_abs_diff < 1e-4                   # doctest: +SKIP
        True
    """
    _check_arguments(weights, opset)
    _check_int8(source, int8, fp16, calibration_images)
    out = check_writable(out, "ONNX file")
    net, fields, extra = resolve_source(
        source,
        weights,
        head,
        backbone=backbone,
        image_size=image_size,
        channels=channels,
        mean=mean,
        std=std,
    )
    reference, served, example, dim, other_size = _prepare(net, fields, fp16)
    extra.update(opset=str(opset), exporter=EXPORTER)
    info = ModelInfo(
        embedding_dim=dim,
        head=head,
        precision="fp16" if fp16 else "fp32",
        dynamic_spatial=other_size is not None,
        ressl_version=__version__,
        metadata=extra,
        **fields,
    )
    retrace = partial(_graph, served, example, opset)
    proto = retrace(info)
    verification: Verification | Int8Check | None = None
    if verify:
        proto, info, verification = _verified(proto, info, retrace, reference, fp16, other_size)
    if int8:
        proto, info, verification = _quantized(proto, info, calibration_images, verify)
    return _write(out, proto, info, verification)


def _check_arguments(weights: str | None, opset: int) -> None:
    if weights is not None and weights not in ("student", "teacher"):
        raise ConfigError(f"weights must be 'student' or 'teacher', got {weights!r}")
    if not 9 <= opset <= 20:
        raise ConfigError.invalid("opset", "in [9, 20] (the TorchScript exporter's range)", opset)


def _check_int8(source: object, int8: bool, fp16: bool, calibration_images: int) -> None:
    """An int8 export's arguments: not fp16 too, a checkpoint, a calibration count in range."""
    if not int8:
        return
    if fp16:
        raise ConfigError("int8 and fp16 are two precisions; ask for one of them")
    if isinstance(source, nn.Module):
        raise ConfigError(
            "int8 export calibrates on the run's training images, which a module does not "
            "name; export a ressl checkpoint or run folder"
        )
    CALIBRATION.check("calibration_images", calibration_images)


def _quantized(
    proto: onnx.ModelProto, info: ModelInfo, calibration_images: int, verify: bool
) -> tuple[onnx.ModelProto, ModelInfo, Int8Check | None]:
    """``(int8 graph, its info, its check against the fp32 graph or None)``: the fp32 graph
    calibrated on a seeded sample of the run's training images (:mod:`.quantization`).

    Raises:
        ExportError: quantisation failed, or the int8 graph is beyond the check's tolerances.
    """
    data = run_dataset(info.settings, info.channels, info.image_size)
    images = calibration_images_of(data, calibration_images)
    fp32 = proto.SerializeToString()
    int8 = quantize_graph(fp32, images)
    calibration = Calibration(len(images), CALIBRATION_SEED, data.name)
    metadata = {**info.metadata, "calibration": calibration.to_json()}
    metadata.pop("verification", None)  # the fp32 graph's; the int8 file records its own
    check = None
    if verify:
        check = check_int8(fp32, int8, data, len(images))
        if not check.passed:
            raise ExportError(f"int8 verification failed, nothing written: {check.describe()}")
        metadata["verification"] = check.to_json()
    quantized = onnx.load_from_string(int8)
    quantized.producer_name, quantized.producer_version = (
        proto.producer_name,
        proto.producer_version,
    )
    quantized.doc_string = proto.doc_string.replace(f", {info.precision}", ", int8")
    return quantized, dataclasses.replace(info, precision="int8", metadata=metadata), check


def _verified(
    proto: onnx.ModelProto,
    info: ModelInfo,
    retrace: Callable[[ModelInfo], onnx.ModelProto],
    reference: nn.Module,
    fp16: bool,
    other_size: int | None,
) -> tuple[onnx.ModelProto, ModelInfo, Verification]:
    """``(graph, info, verification)`` once the graph passed ``check_graph`` at the served size,
    and at ``other_size`` where PyTorch takes it (a graph that does not is traced again with a
    fixed size); the verification is recorded in the info's metadata.

    Raises:
        ExportError: the check failed.
    """
    c, s = info.channels, info.image_size
    shapes = [(1, c, s, s), (5, c, s, s)]
    if other_size is None:
        verification = check_graph(proto, reference, shapes, fp16)
    else:
        try:
            verification = check_graph(
                proto, reference, [*shapes, (3, c, other_size, other_size)], fp16
            )
        except ExportError:  # PyTorch took another size, the traced graph does not: fix it
            info = dataclasses.replace(info, dynamic_spatial=False)
            proto = retrace(info)
            verification = check_graph(proto, reference, shapes, fp16)
    metadata = {**info.metadata, "verification": verification.to_json()}
    return proto, dataclasses.replace(info, metadata=metadata), verification


def _write(
    out: Path,
    proto: onnx.ModelProto,
    info: ModelInfo,
    verification: Verification | Int8Check | None,
) -> ExportReport:
    """Write the graph with ``info`` as its metadata, atomically."""
    del proto.metadata_props[:]
    for key, value in sorted(info.to_metadata().items()):
        proto.metadata_props.add(key=key, value=value)
    write_atomic(out, data := proto.SerializeToString(), "ONNX file")
    return ExportReport(
        out, ModelInfo.from_metadata(info.to_metadata(), str(out)), len(data), verification
    )


def _prepare(
    net: nn.Module, fields: dict[str, Any], fp16: bool
) -> tuple[nn.Module, nn.Module, Tensor, int, int | None]:
    """``(reference, served, example, embedding dim, another accepted size or None)``: the
    fp32 served function to verify against, the one to trace (fp16 when asked), and an
    example batch. The user's module is copied, never changed."""
    net = copy.deepcopy(net).cpu().float().eval()
    reference = ServingEncoder(net, fields["mean"], fields["std"]).eval()
    c, s = fields["channels"], fields["image_size"]
    example = sample_images(2, c, s)  # batch 2, so the tracer cannot freeze the batch size at 1
    with torch.no_grad():
        dim = int(reference(example).shape[1])
    other_size = _accepts_other_sizes(reference, c, s)
    served = reference
    if fp16:
        served = ServingEncoder(copy.deepcopy(net), fields["mean"], fields["std"], fp16=True).eval()
    return reference, served, example, dim, other_size


def _accepts_other_sizes(model: nn.Module, channels: int, size: int) -> int | None:
    """A second input side the network handles like ``size`` (same output shape), or None."""
    other = size + 16
    try:
        with torch.no_grad():
            a = model(sample_images(1, channels, size))
            b = model(sample_images(1, channels, other))
    except Exception:  # noqa: BLE001 - a fixed-size network raises whatever its first mismatched layer raises
        return None
    return other if a.shape == b.shape else None


def _graph(served: nn.Module, example: Tensor, opset: int, info: ModelInfo) -> onnx.ModelProto:
    """The traced graph, its producer, output shape and description set."""
    proto = onnx.load_from_string(_trace(served, example, opset, info.dynamic_spatial))
    proto.producer_name, proto.producer_version = "ressl", __version__
    out_dim = proto.graph.output[0].type.tensor_type.shape.dim[1]  # the tracer leaves D symbolic
    out_dim.Clear()
    out_dim.dim_value = info.embedding_dim
    proto.doc_string = (
        f"ressl encoder: {info.describe()}; input {INPUT_NAME} (N, C, H, W) in [0, 1]"
    )
    return proto


def _trace(model: nn.Module, example: Tensor, opset: int, dynamic_spatial: bool) -> bytes:
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_spatial else {0: "batch"}
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX has no match for
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _export(model, example, opset, axes, buf)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; the reason is its text
        raise ExportError(f"torch.onnx cannot export this network: {first_line(e)}") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export(
    model: nn.Module, example: Tensor, opset: int, axes: dict[int, str], buf: io.BytesIO
) -> bytes:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter takes file objects
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
        )
    return buf.getvalue()
