"""``export_onnx``: a trained encoder to a self-describing, verified ONNX file.

The graph is the whole serving function: float32 images in [0, 1] -> the
dataset normalisation -> backbone (-> projection head) -> L2 norm. Batch size is
dynamic, and so are height and width when the network accepts other sizes (every
ressl backbone ends in global pooling). The file's metadata says how it was made
(see ``ressl.export.metadata``), so a server needs no other file.

Exported with PyTorch's TorchScript-based exporter (``dynamo=False``): it needs
no extra package (the dynamo exporter needs onnxscript), handles dynamic axes
with one ``dynamic_axes`` mapping, folds BatchNorm into the convolutions and
constants at export time, and takes about a second for a ResNet-18.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ressl._version import __version__
from ressl.atomic import check_writable, write_atomic
from ressl.errors import CheckpointError, ConfigError, ExportError, first_line
from ressl.models.network import Encoder, ReSSL
from ressl.runs.checkpoint import open_encoder
from ressl.runs.folder import resolve_checkpoint
from ressl.views import normalize

from .embedder import open_session
from .metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo

__all__ = [
    "ExportError",
    "ExportReport",
    "ServingEncoder",
    "Verification",
    "export_onnx",
    "sample_images",
    "FP32_MAX_ABS_DIFF",
    "FP16_MIN_COSINE",
]

FP32_MAX_ABS_DIFF = 1e-4  # onnxruntime vs PyTorch, L2-normalised embeddings, fp32 export
FP16_MIN_COSINE = 0.999  # per-row cosine similarity of an fp16 export with fp32 PyTorch
DEFAULT_OPSET = 17


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
    verification: Verification | None = field(default=None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pick_net(encoder: nn.Module, head: bool) -> nn.Module:
    if isinstance(encoder, Encoder):
        return nn.Sequential(encoder.backbone, encoder.head) if head else encoder.backbone
    if head:
        raise ConfigError(
            f"head=True needs an Encoder (backbone + head) or a ReSSL module, got {type(encoder).__name__}; "
            "export the module as it is with head=False"
        )
    return encoder


def _from_checkpoint(
    path: Path, weights: str, head: bool
) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    file = resolve_checkpoint(path)
    sha = _sha256(file)
    encoder, checked = open_encoder(file, weights)
    if _sha256(file) != sha:  # a running training rewrote last.safetensors meanwhile
        raise CheckpointError(
            f"{file} changed while it was being read (a run still training?); export again"
        )
    model, data, meta = checked.model, checked.data, checked.meta
    fields: dict[str, Any] = dict(
        backbone=model.backbone,
        image_size=model.image_size,
        channels=model.channels,
        mean=data.mean,
        std=data.std,
        weights=weights,
        source=file.name,
        source_sha256=sha,
        settings=checked.settings,
    )
    extra: dict[str, str] = {k: meta[k] for k in ("epoch", "step") if k in meta}
    extra["source_ressl_version"] = meta.get("ressl_version", "")
    return _pick_net(encoder, head), fields, extra


def _from_module(
    module: nn.Module,
    weights: str | None,
    head: bool,
    backbone: str | None,
    image_size: int | None,
    channels: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    missing = [
        n
        for n, v in (
            ("image_size", image_size),
            ("channels", channels),
            ("mean", mean),
            ("std", std),
        )
        if v is None
    ]
    if missing:
        raise TypeError(
            f"exporting an nn.Module needs {', '.join(missing)} (the checkpoint would supply them)"
        )
    assert image_size is not None and channels is not None and mean is not None and std is not None
    if isinstance(module, ReSSL):
        encoder: nn.Module = getattr(module, weights or "student")
        name = backbone or type(module.student.backbone).__name__
    elif weights is not None:
        raise ConfigError(
            f"weights={weights!r} picks the student or teacher of a checkpoint or ReSSL module; "
            f"a {type(module).__name__} has one set of weights, leave weights unset"
        )
    else:
        encoder = module
        name = backbone or type(module.backbone if isinstance(module, Encoder) else module).__name__
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"std values must be > 0, got {list(std)}")
    if image_size < 1 or channels < 1:
        raise ConfigError(f"image_size and channels must be >= 1, got {image_size} and {channels}")
    fields: dict[str, Any] = dict(
        backbone=name,
        image_size=int(image_size),
        channels=int(channels),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        weights=(weights or "student") if isinstance(module, ReSSL) else "module",
        source="",
        source_sha256="",
        settings={},
    )
    return _pick_net(encoder, head), fields


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
        worst_diff = max(worst_diff, float(np.abs(got - want).max()))
        cos = (got * want).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12
        )
        worst_cos = min(worst_cos, float(cos.min()))
        if not np.isfinite(got).all():
            worst_diff, worst_cos = float("inf"), -1.0
    if fp16:
        criterion, passed = f"min cosine >= {FP16_MIN_COSINE}", worst_cos >= FP16_MIN_COSINE
    else:
        criterion, passed = f"max |diff| <= {FP32_MAX_ABS_DIFF:g}", worst_diff <= FP32_MAX_ABS_DIFF
    return Verification(tuple(shapes), worst_diff, worst_cos, criterion, passed)


def export_onnx(
    source: str | os.PathLike[str] | nn.Module,
    out: str | os.PathLike[str],
    *,
    weights: str | None = None,
    head: bool = False,
    fp16: bool = False,
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
    it passed the verification. (Long for this reference: the body is the phases
    resolve -> prepare -> trace -> check -> write, each a helper.)

    Args:
        source: a ressl checkpoint (``.safetensors`` or run folder), or a module:
            a ``ReSSL``, an ``Encoder``, or any ``(N, C, H, W) -> (N, D)`` network.
        out: the ``.onnx`` file to write; parent folders are created.
        weights: ``"student"`` (default) or ``"teacher"`` (the EMA weights), for
            checkpoints and ``ReSSL`` modules; leave unset for other modules.
        head: include the projection head (output dim ``embed_dim``); default:
            backbone features, what kNN and linear evaluation use.
        fp16: compute in float16 (for GPU serving); inputs and outputs stay float32.
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
        ExportError: the check failed; nothing is written.

    Example:
        >>> report = export_onnx("runs/fmnist", "encoder.onnx")        # doctest: +SKIP
        >>> report.verification.max_abs_diff < 1e-4                   # doctest: +SKIP
        True
    """
    if weights is not None and weights not in ("student", "teacher"):
        raise ConfigError(f"weights must be 'student' or 'teacher', got {weights!r}")
    if not 9 <= opset <= 20:
        raise ConfigError.invalid("opset", "in [9, 20] (the TorchScript exporter's range)", opset)
    out = check_writable(out, "ONNX file")
    net, fields, extra = _resolve_source(
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
    c, s = fields["channels"], fields["image_size"]
    extra.update(
        opset=str(opset),
        exporter=f"torch {torch.__version__} (TorchScript-based torch.onnx.export)",
    )
    info = ModelInfo(
        embedding_dim=dim,
        head=head,
        precision="fp16" if fp16 else "fp32",
        dynamic_spatial=other_size is not None,
        ressl_version=__version__,
        metadata=extra,
        **fields,
    )
    proto = _graph(served, example, opset, info)
    verification = None
    if verify:
        shapes = [(1, c, s, s), (5, c, s, s)]
        if other_size is None:
            verification = _check(proto, reference, shapes, fp16)
        else:
            try:
                verification = _check(
                    proto, reference, [*shapes, (3, c, other_size, other_size)], fp16
                )
            except ExportError:  # PyTorch took another size, the traced graph does not: fix it
                info = dataclasses.replace(info, dynamic_spatial=False)
                proto = _graph(served, example, opset, info)
                verification = _check(proto, reference, shapes, fp16)
        extra["verification"] = verification.to_json()
        info = dataclasses.replace(info, metadata=extra)
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


def _resolve_source(
    source: str | os.PathLike[str] | nn.Module,
    weights: str | None,
    head: bool,
    **module_fields: Any,
) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    """``(network, ModelInfo fields, extra metadata)`` of a checkpoint or a module."""
    if isinstance(source, nn.Module):
        net, fields = _from_module(source, weights, head, **module_fields)
        return net, fields, {}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a checkpoint path or an nn.Module, got {type(source).__name__}"
        )
    given = [name for name, value in module_fields.items() if value is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: the checkpoint's settings supply these; pass them only with a module"
        )
    return _from_checkpoint(Path(source), weights or "student", head)


def _check(
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
