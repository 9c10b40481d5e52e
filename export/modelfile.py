"""Reading an exported file without running it: its metadata and graph signature (with ``onnx``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ressl.errors import ExportError, first_line

from .metadata import ModelInfo

if TYPE_CHECKING:
    import onnx

__all__ = ["read_model_info", "describe_model"]


def _load(path: Path) -> onnx.ModelProto:
    import onnx  # here, so that serving (Embedder) needs onnxruntime but not the onnx package

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ExportError(f"{path} is a folder, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, onnx's own errors
        raise ExportError(
            f"{path} is not a valid ONNX file (truncated or another format: {first_line(e)})"
        ) from None
    if not proto.HasField("graph") or not proto.graph.input or not proto.graph.output:
        raise ExportError(f"{path} is not a valid ONNX file (no graph with inputs and outputs)")
    return proto


def _signature(values: Any) -> list[dict[str, Any]]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append(
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": dims,
            }
        )
    return out


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The parsed ressl metadata of an exported file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ONNX file, or not one written by ressl.
    """
    path = Path(path)
    proto = _load(path)
    return ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``ressl info`` shows about an exported file, as JSON-ready data.

    Returns:
        ``{"file", "size_bytes", "opset", "producer", "inputs", "outputs", "info": ModelInfo, "metadata"}``.

    Raises:
        FileNotFoundError, ValueError: as ``read_model_info``.
    """
    path = Path(path)
    proto = _load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_metadata(meta, str(path))
    inputs, outputs = _signature(proto.graph.input), _signature(proto.graph.output)
    if len(inputs) == 1 and len(outputs) == 1:
        info.check_signature(inputs[0]["shape"], outputs[0]["shape"], str(path))
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "opset": opset,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": inputs,
        "outputs": outputs,
        "info": info,
        "metadata": meta,
    }
