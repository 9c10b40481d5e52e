"""Checking an int8 graph against the fp32 graph it was quantised from, on the run's data.

Both graphs embed the same held-out images (the run's test split, else training images
outside the calibration sample), read through the evaluation's own machinery
(:func:`ressl.eval.sources.extract` on :func:`.features.onnx_source`). The check records
the cosine of each int8 embedding with its fp32 one (min and mean) and, when the data has
labels, the kNN top-1 of both (``ressl.eval.knn``, the bank a seeded sample of the
labelled training images, the queries the held-out test images) and its change.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ressl.errors import ExportError
from ressl.rules import KNN_K, KNN_TEMPERATURE

from .features import onnx_source
from .quantization import CALIBRATION_SEED, pick_images, sample_indices

if TYPE_CHECKING:
    from torch import Tensor

    from ressl.data.sources import ImageData, ImageSource
    from ressl.eval.sources import FeatureSource

__all__ = [
    "HELD_OUT_IMAGES",
    "KNN_BANK_IMAGES",
    "MAX_KNN_CHANGE",
    "MIN_COSINE",
    "Int8Check",
    "check_int8",
]

MIN_COSINE = 0.98  # the worst held-out image's cosine, int8 vs fp32 embedding
MAX_KNN_CHANGE = 1.0  # kNN top-1 points, int8 - fp32, either way
HELD_OUT_IMAGES = 2000  # queries (and cosine images): one flipped query is 0.05 points
KNN_BANK_IMAGES = 5000  # labelled training images the queries vote with


@dataclass(frozen=True)
class Int8Check:
    """An int8 graph against its fp32 graph (the int8 file's ``verification`` entry).

    Attributes:
        images: held-out images both embedded.
        held_out: which images those are, in words.
        min_cosine, mean_cosine: cosine of each int8 embedding with its fp32 one.
        max_abs_diff: the largest difference of any embedding element.
        knn_fp32, knn_int8: kNN top-1 (%) of each graph, None without labels.
        bank: labelled training images in the kNN bank (0 without labels).
        criterion: what had to hold.
        passed: whether it held.
    """

    images: int
    held_out: str
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    knn_fp32: float | None
    knn_int8: float | None
    bank: int
    criterion: str
    passed: bool

    @property
    def knn_change(self) -> float | None:
        """int8 - fp32 kNN top-1, in points."""
        if self.knn_fp32 is None or self.knn_int8 is None:
            return None
        return self.knn_int8 - self.knn_fp32

    def describe(self) -> str:
        knn = "no labels, no kNN"
        if self.knn_change is not None:
            knn = (
                f"kNN top-1 {self.knn_fp32:.2f}% -> {self.knn_int8:.2f}% "
                f"({self.knn_change:+.2f} points, bank {self.bank})"
            )
        return (
            f"int8 vs fp32 on {self.images} {self.held_out}: min cosine {self.min_cosine:.5f}, "
            f"mean {self.mean_cosine:.5f}; {knn} ({self.criterion}: "
            f"{'passed' if self.passed else 'FAILED'})"
        )

    def to_json(self) -> str:
        """The ``verification`` metadata entry of an int8 file (``max_abs_diff`` and
        ``min_cosine`` as in an fp32 file's, so older readers show them too)."""
        return json.dumps({"against": "fp32 export", **dataclasses.asdict(self)})


def check_int8(fp32: bytes, int8: bytes, data: ImageData, calibrated: int) -> Int8Check:
    """Embed held-out images of ``data`` with both graphs and compare (``calibrated``: how
    many training images the calibration sample took, left out when no test split exists).

    Raises:
        ExportError: onnxruntime could not run a graph.
    """
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="ressl-int8-check-") as tmp:
        sources = []
        for name, model in (("fp32", fp32), ("int8", int8)):
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(model)
            sources.append(onnx_source(path, device))
        labelled = data.labelled is not None and data.test is not None and bool(data.classes)
        if labelled:
            return _with_knn(sources, data)
        held_out, what = _held_out(data, calibrated)
        feats = [_embed(s, held_out) for s in sources]
    return _result(feats[0], feats[1], what, None, 0)


def _embed(source: FeatureSource, images: ImageSource) -> Tensor:
    """``(N, D)`` L2-normalised embeddings of ``images`` (the graph takes pixels / 255)."""
    from ressl.eval.features import extract_features

    feats, _ = extract_features(source.fn, images, mean=source.mean, std=source.std)
    return feats


def _with_knn(sources: list[FeatureSource], data: ImageData) -> Int8Check:
    """Cosine on the held-out test images and the kNN top-1 of both graphs."""
    from ressl.eval.knn import knn_accuracy
    from ressl.eval.sources import extract

    assert data.labelled is not None and data.test is not None
    bank = _sample(data.labelled, KNN_BANK_IMAGES)
    queries = _sample(data.test, HELD_OUT_IMAGES)
    small = dataclasses.replace(data, train=bank, labelled=bank, test=queries)
    top1, test_feats = [], []
    for source in sources:
        train_f, train_y, test_f, test_y = extract(source, small, torch.device("cpu"), 256)
        acc = knn_accuracy(
            train_f, train_y, test_f, test_y, len(data.classes), KNN_K, KNN_TEMPERATURE
        )
        top1.append(acc["top1"])
        test_feats.append(test_f)
    what = f"{data.name} test images"
    return _result(test_feats[0], test_feats[1], what, (top1[0], top1[1]), len(bank))


def _sample(source: ImageSource, count: int) -> ImageSource:
    return pick_images(source, sample_indices(len(source), count, CALIBRATION_SEED))


def _held_out(data: ImageData, calibrated: int) -> tuple[ImageSource, str]:
    """Held-out images of a dataset without a labelled test split: the test split when there
    is one, else training images outside the calibration sample (the same seeded order)."""
    if data.test is not None:
        return _sample(data.test, HELD_OUT_IMAGES), f"{data.name} test images"
    order = sample_indices(len(data.train), len(data.train), CALIBRATION_SEED)
    rest = order[calibrated : calibrated + HELD_OUT_IMAGES]
    if len(rest) == 0:
        raise ExportError(
            f"{data.name} has {len(data.train)} training images and no test split: all of them "
            "calibrated the int8 model, none is left to check it on; pass fewer "
            "{calibration_images}"
        )
    return pick_images(data.train, rest), f"{data.name} training images outside the calibration"


def _result(
    fp32: Tensor, int8: Tensor, what: str, top1: tuple[float, float] | None, bank: int
) -> Int8Check:
    """The comparison of two ``(N, D)`` L2-normalised feature sets, judged by the tolerances."""
    cos = (fp32 * int8).sum(1)  # (N,) rows are unit length
    if not torch.isfinite(int8).all():
        cos = torch.full_like(cos, -1.0)
    knn_change = None if top1 is None else top1[1] - top1[0]
    criterion = f"min cosine >= {MIN_COSINE:g}" + (
        f", |kNN change| <= {MAX_KNN_CHANGE:g} points" if top1 is not None else ""
    )
    passed = float(cos.min()) >= MIN_COSINE and (
        knn_change is None or abs(knn_change) <= MAX_KNN_CHANGE
    )
    return Int8Check(
        images=len(cos),
        held_out=what,
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs_diff=float((fp32 - int8).abs().max()),
        knn_fp32=None if top1 is None else top1[0],
        knn_int8=None if top1 is None else top1[1],
        bank=bank,
        criterion=criterion,
        passed=passed,
    )
