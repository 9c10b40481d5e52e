"""``ressl info``: what a checkpoint, run folder or exported ONNX encoder holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ressl.jsontext import parse_json

from .common import fail

__all__ = ["info_cmd", "onnx_info", "size_text"]


def size_text(n: int) -> str:
    """A file size for people: ``12.3 MB`` or ``45.6 kB``."""
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def shown(value: Any) -> str:
    """A metric for people: floats to 4 significant digits (``7.386``, ``0.0003162``)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _weights_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a backbone weights file (``ressl export -o X.safetensors``), else None."""
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    from ressl.runs.weights import FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None  # the checkpoint path says what is wrong with the file
    return meta if meta.get("format") == FORMAT else None


def _weights_info(path: Path, meta: dict[str, str], as_json: bool) -> str:
    from ressl.models.families import BackboneBuild

    try:
        build = BackboneBuild.from_json(meta["backbone_build"])
        described = build.describe()
    except (KeyError, TypeError, ValueError, AttributeError):
        fail(f"{path}: its backbone_build metadata is not a backbone description")
    code = _code_for(path, build, meta)
    if as_json:
        return json.dumps({k: v for k, v in meta.items() if k != "code"} | {"code": code}, indent=2)
    return "\n".join(
        [
            f"weights        {path} ({size_text(path.stat().st_size)}): the {meta.get('weights', '?')} "
            f"backbone of {meta.get('source', '?')} (ressl {meta.get('ressl_version', '?')})",
            f"backbone       {described}",
            "load it without ressl:",
            code.rstrip(),
        ]
    )


def _code_for(path: Path, build: Any, meta: dict[str, str]) -> str:
    """The loading code for the file where it is now (its full path, eval mode, the run's
    mean/std); the code stored at export when the file does not say its mean/std."""
    from ressl.config.specs import DataSpec
    from ressl.runs.weights import loading_code

    try:
        settings = json.loads(meta.get("settings", "{}"))
        data = DataSpec.from_settings(settings, settings.get("channels"), str(path))
        return loading_code(build, path, data.mean, data.std)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return meta.get("code", "")


InfoPathArg = Annotated[
    Path,
    typer.Argument(
        help="A ressl checkpoint (.safetensors), run folder or exported .onnx file "
        "(default: the current folder, a run folder).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")]


def info_cmd(path: InfoPathArg = Path("."), as_json: JsonOpt = False) -> None:
    """Describe a checkpoint (format, versions, progress, metrics, settings) or an exported ONNX encoder."""
    if not path.exists():  # before torch is imported (seconds)
        fail(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        typer.echo(onnx_info(path, as_json))
        return
    weights = _weights_metadata(path)
    if weights is not None:
        typer.echo(_weights_info(path, weights, as_json))
        return
    typer.echo(_checkpoint_info(path, as_json))


def _checkpoint_info(path: Path, as_json: bool) -> str:
    """What ``ressl info`` prints for a checkpoint or run folder."""
    from ressl.runs.checks import check_file, metadata_json
    from ressl.runs.position import Position

    checked = check_file(path)
    meta, settings = checked.meta, checked.settings
    metrics = metadata_json(checked.path, meta, "metrics", dict, default={})
    if as_json:
        plain = {k: v for k, v in meta.items() if k not in ("settings", "optimizer", "metrics")}
        return json.dumps({"metadata": plain, "settings": settings, "metrics": metrics}, indent=2)
    where = Position.from_metadata(meta, settings.get("epochs"))
    lines = [
        f"checkpoint     {path}",
        f"format         {meta['format']} v{meta['format_version']} (ressl {meta.get('ressl_version', '?')})",
        f"progress       {where}, step {meta.get('step')}",
    ]
    if metrics:
        lines.append("last metrics   " + ", ".join(f"{k}={shown(v)}" for k, v in metrics.items()))
    return "\n".join(lines + _settings_lines(settings))


def _settings_lines(settings: dict[str, Any]) -> list[str]:
    """``settings`` and one indented, aligned line per setting, its value as JSON."""
    width = max((len(k) for k in settings), default=0)
    return ["settings"] + [f"  {k:<{width}}  {json.dumps(v)}" for k, v in settings.items()]


def _verification(meta: dict[str, str], path: Path) -> dict[str, Any] | None:
    """An exported file's verification record, None when it has none (or not in ressl's form)."""
    if not meta.get("verification"):
        return None
    try:
        v = parse_json(meta["verification"], f"{path}: metadata 'verification'")
    except ValueError as e:
        fail(str(e))
    numbers = isinstance(v, dict) and all(
        isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool)
        for k in ("max_abs_diff", "min_cosine")
    )
    return {**v, "criterion": str(v.get("criterion", "?"))} if numbers else None


def _calibration(text: str, path: Path) -> str:
    """An int8 file's calibration entry in words (as exported: images, dataset, seed, method)."""
    c = parse_json(text, f"{path}: metadata 'calibration'")
    if not isinstance(c, dict):
        return str(c)
    per = "per-channel" if c.get("per_channel") else "per-tensor"
    return (
        f"{c.get('format', '?')} {per} int8; {c.get('method', '?')} ranges from "
        f"{c.get('images', '?')} {c.get('dataset', '?')} training images (seed {c.get('seed', '?')})"
    )


def _int8_check(v: dict[str, Any]) -> str:
    """An int8 file's own check against its fp32 graph, in one line."""
    knn = ""
    if isinstance(v.get("knn_fp32"), (int, float)) and isinstance(v.get("knn_int8"), (int, float)):
        knn = (
            f"; kNN top-1 {v['knn_fp32']:.2f}% -> {v['knn_int8']:.2f}% "
            f"({v['knn_int8'] - v['knn_fp32']:+.2f} points)"
        )
    mean = v.get("mean_cosine")
    mean_text = f", mean {mean:.5f}" if isinstance(mean, (int, float)) else ""
    return (
        f"int8 vs fp32 on {v.get('images', '?')} {v.get('held_out', 'images')}: min cosine "
        f"{v['min_cosine']:.5f}{mean_text}{knn} ({v['criterion']})"
    )


def onnx_info(path: Path, as_json: bool) -> str:
    """What ``ressl info`` prints for an exported ONNX file."""
    from ressl.export.modelfile import describe_model

    d = describe_model(path)
    return _onnx_json(d, path) if as_json else "\n".join(_onnx_lines(d, path))


def _onnx_json(d: dict[str, Any], path: Path) -> str:
    meta = d["metadata"]
    plain = {k: v for k, v in meta.items() if k not in ("settings", "verification")}
    return json.dumps(
        {
            "file": d["file"],
            "size_bytes": d["size_bytes"],
            "opset": d["opset"],
            "producer": d["producer"],
            "inputs": d["inputs"],
            "outputs": d["outputs"],
            "metadata": plain,
            "verification": _verification(meta, path),
            "settings": d["info"].settings,
        },
        indent=2,
    )


def _signature(v: dict[str, Any]) -> str:
    """An ONNX input or output: ``name dtype (shape)``."""
    return f"{v['name']} {v['dtype']} ({', '.join(map(str, v['shape']))})"


def _onnx_lines(d: dict[str, Any], path: Path) -> list[str]:
    info, meta = d["info"], d["metadata"]
    mode = {1: "grey", 3: "RGB"}.get(info.channels, f"{info.channels}-channel")
    lines = [
        f"onnx encoder   {path} ({size_text(d['size_bytes'])}, opset {d['opset']}, ressl {info.ressl_version})",
        f"computes       {info.describe()}",
        f"input          {_signature(d['inputs'][0])}, values in [0, 1]; served at {info.image_size}x{info.image_size}"
        + (" (any size accepted)" if info.dynamic_spatial else ""),
        f"preprocess     {mode}; {meta.get('preprocess', '')}",
        f"normalise      mean {list(info.mean)} std {list(info.std)} (inside the graph)",
        f"output         {_signature(d['outputs'][0])}, L2-normalised",
    ]
    if info.source:
        progress = (
            f", epoch {meta['epoch']} step {meta['step']}"
            if "epoch" in meta and "step" in meta
            else ""
        )
        lines.append(f"source         {info.source} (sha256 {info.source_sha256}{progress})")
    v = _verification(meta, path)
    if meta.get("calibration"):
        lines.append(f"calibrated     {_calibration(meta['calibration'], path)}")
    if v is not None and v.get("against") == "fp32 export":
        lines.append(f"verified       {_int8_check(v)}")
    elif v is not None:
        lines.append(
            f"verified       max |diff| {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.6f} "
            f"({v['criterion']})"
        )
    return lines + (_settings_lines(info.settings) if info.settings else [])
