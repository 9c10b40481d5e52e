"""An ONNX model as an evaluation feature source (``ressl eval MODEL.onnx``), run with
onnxruntime: the ONNX side of :class:`ressl.eval.sources.FeatureSource` (``ressl/`` imports
no onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ressl.errors import ExportError
from ressl.eval.sources import FeatureSource
from ressl.jsontext import parse_json
from ressl.rules import MAX_IMAGE_SIZE

from .metadata import FORMAT, ModelInfo

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["onnx_source"]


def _onnx_session(path: Path, device: torch.device) -> Any:
    """An onnxruntime session of ``path`` (CUDA first when asked for and offered)."""
    try:
        from ressl.export.embedder import open_session
    except ImportError:
        raise ExportError(
            "evaluating an ONNX model needs onnxruntime: pip install onnxruntime"
        ) from None
    return open_session(path, "auto" if device.type == "cuda" else "cpu")


def _onnx_input(
    path: Path, meta: dict[str, str], shape: list[Any], out_shape: list[Any]
) -> tuple[int, Any, dict[str, Any]]:
    """``(channels, image size or None, settings)`` of an ONNX model's input. A ressl export's
    metadata is checked as such (and against the graph); any other graph is read as it is."""
    if meta.get("format") == FORMAT:
        try:
            info = ModelInfo.from_metadata(meta, str(path))
            info.check_signature(shape, out_shape, str(path))
        except ValueError as e:
            raise ExportError(str(e)) from None
        return info.channels, None if info.dynamic_spatial else info.image_size, info.settings
    try:
        settings = parse_json(meta.get("settings", "{}"), f"{path}: metadata 'settings'")
    except ValueError:
        settings = {}
    settings = settings if isinstance(settings, dict) else {}
    channels = shape[1] if isinstance(shape[1], int) else settings.get("channels", 3)
    size = shape[2] if isinstance(shape[2], int) else settings.get("image_size")
    # Not rules.IMAGE_SIZE: a graph ressl did not export is read as it is, and its fixed input
    # may be smaller than the 8 pixels ressl's backbones need (any side >= 1 is an image);
    # the upper bound stays, since evaluation decodes every image at this size.
    if not (isinstance(channels, int) and channels >= 1) or not (
        size is None or (isinstance(size, int) and 1 <= size <= MAX_IMAGE_SIZE)
    ):
        raise ExportError(
            f"{path}: cannot tell its input's channels and size (input shape {shape})"
        )
    return channels, size, settings


def onnx_source(path: Path, device: torch.device) -> FeatureSource:
    """An ONNX model run with onnxruntime on images in [0, 1] (its graph normalises them).

    Raises:
        ExportError: the file is not a loadable ONNX model of images, or onnxruntime is missing.
    """
    import torch

    session = _onnx_session(path, device)
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ExportError(
            f"{path}: expected an image input (N, C, H, W), got input {inp.name!r} of shape {shape}"
        )
    outputs = [o.name for o in session.get_outputs()]
    out_name = "embedding" if "embedding" in outputs else outputs[0]
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    channels, size, settings = _onnx_input(path, meta, shape, list(session.get_outputs()[0].shape))

    def run(x: Tensor) -> Tensor:
        (y,) = session.run([out_name], {inp.name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(y).to(x.device)

    # Which representation the graph outputs decides what the numbers mean: ressl's exporter
    # records it ("head": "true" for the projection head's embedding, "false" for backbone features).
    what = {
        "true": "projection-head embedding, not backbone features",
        "false": "backbone features",
    }
    weights = meta.get("weights")
    info: dict[str, Any] = {
        "model": path.name,
        **({"weights": weights} if weights else {}),
        **({"head": meta["head"] == "true"} if "head" in meta else {}),
    }
    return FeatureSource(
        fn=run,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        channels=channels,
        image_size=int(size) if size is not None else None,
        default_dataset=meta.get("dataset") or settings.get("dataset"),
        description=f"ONNX output {out_name!r} "
        f"({what.get(meta.get('head', ''), 'not a ressl export: unknown whether head or backbone')})",
        features=f"onnx:{out_name}",
        run_dir=path.parent,
        info=info,
        recorded=False,
    )
