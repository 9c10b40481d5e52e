"""Shared fixtures: tiny image folders the tests write themselves (no network, no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import TINY
from PIL import Image


def write_image_folder(
    root: Path, *, classes: int = 3, per_class: int = 12, size: int = 20, seed: int = 0
) -> Path:
    """``root/{train,test}/class_k/*.png``: each class a distinct colour with noise, so kNN can separate them."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(classes, 3))
    for split, n in (("train", per_class), ("test", max(per_class // 3, 2))):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(palette[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def needs_cuda(item: pytest.Item) -> bool:
    """A test skipped without CUDA (``reason="needs CUDA"``) or whose ``device`` parameter is
    ``cuda`` (not any parameter that merely names it: a device-selection rule tested as text)."""
    skips = any(m.kwargs.get("reason") == "needs CUDA" for m in item.iter_markers("skipif"))
    params = getattr(item, "callspec", None)
    device = params.params.get("device") if params is not None else None
    return skips or str(device) == "cuda"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # one marker selects every CUDA test (`pytest -m cuda`, what benchmarks/gpu_suite.py runs
    # first on a GPU machine); each keeps its own skip condition
    for item in items:
        if needs_cuda(item):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def tiny_settings(image_folder: Path) -> dict:
    """Settings for a seconds-long CPU run on the image folder (``cli_helpers.TINY``)."""
    return dict(TINY, dataset=f"folder:{image_folder}")
