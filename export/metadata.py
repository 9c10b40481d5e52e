"""What an exported encoder file says about itself: the metadata keys and ``ModelInfo``.

An exported file carries string key/value pairs in its ONNX ``metadata_props``
(listed in docs/export.md). :class:`ModelInfo` is their parsed form: everything
a server needs to feed the graph (input size, channels, preprocessing) and to
know what it serves (backbone, weights, source checkpoint). Nothing here
imports torch, onnx or onnxruntime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ressl.errors import ExportError
from ressl.jsontext import parse_json
from ressl.rules import IMAGE_SIZE

__all__ = ["FORMAT", "FORMAT_VERSION", "INPUT_NAME", "OUTPUT_NAME", "ModelInfo"]

FORMAT = "ressl-onnx-encoder"
FORMAT_VERSION = "1"
INPUT_NAME = "images"  # float32 (N, C, H, W) in [0, 1]
OUTPUT_NAME = "embedding"  # float32 (N, D), L2-normalised

#: How the files and uint8 arrays are brought to the model's input (see ``ressl.export.images``).
PREPROCESS = "shorter side resized to image_size (bilinear, antialiased), centre crop, pixels / 255"


def _flag(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class ModelInfo:
    """The parsed metadata of an exported encoder.

    Attributes:
        backbone: ``"small"``, ``"resnet18"``, ``"resnet50"`` or a custom module's name.
        image_size: side S the model is served at (files are resized and cropped to S x S).
        channels: input channels C (1: grey, 3: RGB).
        mean, std: per-channel normalisation applied inside the graph.
        embedding_dim: D.
        weights: ``"student"``, ``"teacher"`` or ``"module"`` (exported from an ``nn.Module``).
        head: True when the output is the projection head's, False for backbone features.
        precision: ``"fp32"`` or ``"fp16"`` (compute; inputs and outputs are float32 either way).
        dynamic_spatial: True when the graph accepts any H, W (not only S x S).
        ressl_version: the package version that exported the file.
        source: file name of the source checkpoint ("" for a module).
        source_sha256: sha256 of the source checkpoint file ("" for a module).
        settings: the source run's training settings.
        metadata: every raw key/value pair of the file.
    """

    backbone: str
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedding_dim: int
    weights: str
    head: bool
    precision: str
    dynamic_spatial: bool
    ressl_version: str = ""
    source: str = ""
    source_sha256: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """The string key/value pairs written into the ONNX file (``metadata`` entries kept)."""
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            ressl_version=self.ressl_version,
            backbone=self.backbone,
            weights=self.weights,
            head=_flag(self.head),
            image_size=str(self.image_size),
            channels=str(self.channels),
            mean=json.dumps(list(self.mean)),
            std=json.dumps(list(self.std)),
            embedding_dim=str(self.embedding_dim),
            precision=self.precision,
            dynamic_spatial=_flag(self.dynamic_spatial),
            input=INPUT_NAME,
            output=OUTPUT_NAME,
            preprocess=PREPROCESS,
            source=self.source,
            source_sha256=self.source_sha256,
            settings=json.dumps(self.settings, sort_keys=True),
        )
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str = "model") -> ModelInfo:
        """Parse an exported file's metadata.

        Args:
            meta: the file's ``metadata_props`` as a dict.
            where: the file's name, for error messages.

        Raises:
            ValueError: if the file is not a ressl encoder or a key is missing or malformed.
        """
        meta = dict(meta)
        _check_format(meta, where)

        def get(key: str) -> str:
            if key not in meta:
                raise ExportError(f"{where}: metadata key {key!r} is missing")
            return meta[key]

        try:
            mean = tuple(float(v) for v in parse_json(get("mean"), f"{where}: metadata 'mean'"))
            std = tuple(float(v) for v in parse_json(get("std"), f"{where}: metadata 'std'"))
            info = cls(
                backbone=get("backbone"),
                image_size=int(get("image_size")),
                channels=int(get("channels")),
                mean=mean,
                std=std,
                embedding_dim=int(get("embedding_dim")),
                weights=get("weights"),
                head=get("head") == "true",
                precision=get("precision"),
                dynamic_spatial=get("dynamic_spatial") == "true",
                ressl_version=meta.get("ressl_version", ""),
                source=meta.get("source", ""),
                source_sha256=meta.get("source_sha256", ""),
                settings=parse_json(meta.get("settings") or "{}", f"{where}: metadata 'settings'"),
                metadata=meta,
            )
        except TypeError as e:
            raise ExportError(f"{where}: malformed ressl metadata ({e})") from None
        except ValueError as e:
            if str(e).startswith(where):
                raise
            raise ExportError(f"{where}: malformed ressl metadata ({e})") from None
        info._check_values(where)
        return info

    def _check_values(self, where: str) -> None:
        """Each parsed value in its range (a ValueError naming the file otherwise)."""
        if self.channels < 1 or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ExportError(
                f"{where}: metadata says {self.channels} channels but mean/std have "
                f"{len(self.mean)}/{len(self.std)} values"
            )
        if not IMAGE_SIZE.ok(self.image_size) or self.embedding_dim < 1:
            raise ExportError(
                f"{where}: metadata has image_size {self.image_size}, embedding_dim "
                f"{self.embedding_dim}; they must be {IMAGE_SIZE.expect} and >= 1"
            )
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(v) and v > 0 for v in self.std
        ):
            raise ExportError(f"{where}: metadata mean/std must be finite numbers (std > 0)")
        if not isinstance(self.settings, dict):
            raise ExportError(f"{where}: metadata settings is not a JSON object")

    def check_signature(self, inputs: list[Any], outputs: list[Any], where: str = "model") -> None:
        """Refuse a graph whose input or output shape (dims: int, or a name / None when
        symbolic) is not what this metadata describes: metadata copied onto a foreign graph.

        Every fixed dimension must agree with the metadata, whatever ``dynamic_spatial``
        says: the batch is never fixed (inputs are batched as they come), the channels are
        ``channels``, a fixed height and width are ``image_size`` and only where the metadata
        does not promise any size, the output is ``(batch, embedding_dim)``. A graph that
        disagrees would fail on every run (or be fed images resized to a size it never takes).

        Raises:
            ValueError: naming the shape and what the metadata says.
        """
        fixed = [isinstance(d, int) and d > 0 for d in inputs]
        if len(inputs) != 4 or (fixed[1] and inputs[1] != self.channels):
            raise ExportError(
                f"{where}: graph input has shape {inputs} but the metadata says "
                f"{self.channels} channels"
            )
        if fixed[0]:
            raise ExportError(
                f"{where}: graph input has shape {inputs}: it takes batches of exactly "
                f"{inputs[0]} images, but a ressl encoder takes any batch size"
            )
        spatial = [d for d, f in zip(inputs[2:], fixed[2:]) if f]
        if spatial and (self.dynamic_spatial or spatial != [self.image_size] * len(spatial)):
            says = (
                "any image size" if self.dynamic_spatial else f"{self.image_size}x{self.image_size}"
            )
            raise ExportError(
                f"{where}: graph input has shape {inputs} but the metadata says {says} "
                f"(image_size {self.image_size}); the metadata is not this graph's"
            )
        if (
            len(outputs) != 2
            or outputs[1] != self.embedding_dim
            or (isinstance(outputs[0], int) and outputs[0] > 0)
        ):
            raise ExportError(
                f"{where}: graph output has shape {outputs} but the metadata says "
                f"(batch, {self.embedding_dim}) embeddings; the metadata is not this graph's"
            )

    def describe(self) -> str:
        """One line: what the file computes, e.g. ``resnet18 student backbone features, 3x32x32 -> 512``."""
        what = "projection head" if self.head else "backbone features"
        return (
            f"{self.backbone} {self.weights} {what}, {self.channels}x{self.image_size}x{self.image_size} "
            f"-> {self.embedding_dim}-d embedding, {self.precision}"
        )


def _check_format(meta: Mapping[str, str], where: str) -> None:
    """A ressl encoder's format tags, or a ValueError saying what the file is instead."""
    if meta.get("format") != FORMAT:
        raise ExportError(
            f"{where} is an ONNX file but not a ressl encoder (no format={FORMAT!r} in its metadata); "
            "export one with `ressl export CHECKPOINT -o MODEL.onnx`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{where} has ressl encoder format version {meta.get('format_version')!r}; "
            f"this ressl reads version {FORMAT_VERSION}"
        )
