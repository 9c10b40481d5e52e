"""The ``health`` protocol on constructed encoders and data: collapse, a random projection,
the sample, determinism, and its refusals."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ressl
from ressl.data.sources import FolderImages, ImageData, TensorImages
from ressl.errors import ConfigError, DataError
from ressl.eval.protocols import PROTOCOLS, default_protocol
from ressl.eval.sampled_health import health_sample, sample_health
from ressl.eval.sources import FeatureSource

SIDE, DIM = 8, 32


def images(n: int, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    return TensorImages(pixels, torch.full((n,), -1, dtype=torch.int64))


def dataset(train: int = 96, test: int | None = None) -> ImageData:
    """Random images, unlabelled (and a test split of ``test`` images when given)."""
    half = (0.5, 0.5, 0.5)
    held_out = images(test, seed=1) if test is not None else None
    return ImageData("noise", images(train), None, held_out, half, half, 3, SIDE, [])


def source(fn) -> FeatureSource:
    return FeatureSource(fn=fn, mean=(0.5,) * 3, std=(0.5,) * 3, channels=3, image_size=SIDE)


def collapsed(x: torch.Tensor) -> torch.Tensor:
    """Every image to the same point: the representation of a collapsed encoder."""
    return torch.ones(len(x), DIM)


def projection(seed: int = 0):
    """A random linear map of the pixels: features that use every direction."""
    w = torch.randn(3 * SIDE * SIDE, DIM, generator=torch.Generator().manual_seed(seed))
    return lambda x: x.flatten(1) @ w


def run_health(fn, data: ImageData, **kw) -> dict:
    return PROTOCOLS["health"].run(source(fn), data, device="cpu", **kw)


def test_a_collapsed_encoder_reads_as_collapsed():
    row = run_health(collapsed, dataset())
    assert row["protocol"] == "health" and row["dim"] == DIM and row["rank_cap"] == DIM
    assert row["rankme"] == pytest.approx(1.0, abs=1e-3)  # one direction
    assert row["std"] == pytest.approx(0.0, abs=1e-6) and row["std_ratio"] == pytest.approx(
        0.0, abs=1e-5
    )
    assert row["uniformity"] == pytest.approx(0.0, abs=1e-5)  # every image the same point
    assert row["alignment"] == pytest.approx(0.0, abs=1e-6)  # and so, trivially, aligned
    assert row["healthy_std"] == pytest.approx(1 / math.sqrt(DIM), rel=1e-5)


def test_a_random_projection_uses_most_directions():
    row = run_health(projection(), dataset(train=128))
    assert row["rank_cap"] == DIM and row["rankme"] > 0.6 * DIM  # near full rank
    assert 0.5 < row["std_ratio"] < 1.2 and row["uniformity"] < -1.0
    assert 0.0 < row["alignment"] < 4.0  # crops of noise land apart, unlike the collapse


def test_the_sample_is_the_test_split_when_there_is_one_else_the_train_split():
    row = run_health(projection(), dataset(train=96, test=40))
    assert (row["split"], row["images"]) == ("test", 40)
    row = run_health(projection(), dataset(train=96), images=64)
    assert (row["split"], row["images"]) == ("train", 64)
    sample, split = health_sample(dataset(train=96), 50, seed=3)
    kept = sample.images  # type: ignore[attr-defined]
    assert split == "train" and len(sample) == 50
    full = dataset(train=96).train.images  # type: ignore[attr-defined]
    index = [next(i for i in range(96) if torch.equal(full[i], img)) for img in kept]
    assert index == sorted(set(index))  # distinct images, in stored order


def test_deterministic_for_a_seed_whatever_the_batch_size():
    data, fn = dataset(train=96), projection()
    a = run_health(fn, data, images=64, seed=5, batch_size=512)
    b = run_health(fn, data, images=64, seed=5, batch_size=7)
    measures = ("rankme", "std", "uniformity", "alignment")
    for key in measures:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for seed in (-1, 2**80):  # any int is a seed
        assert run_health(fn, data, images=64, seed=seed)["seed"] == seed
    c = run_health(fn, data, images=64, seed=6)
    assert any(abs(a[key] - c[key]) > 1e-6 for key in measures)  # another sample, other views


@pytest.mark.parametrize("bad", [31, 8193, 0, -5, 100.0, True, "64"])
def test_the_sample_size_is_refused_outside_its_range(bad):
    with pytest.raises(ConfigError, match=r"images must be an integer in \[32, 8192\]"):
        run_health(collapsed, dataset(), images=bad)


def test_the_range_is_stated_once_in_the_flags_help():
    assert "an integer in [32, 8192]" in PROTOCOLS["health"].options["images"]
    assert PROTOCOLS["health"].defaults() == {"images": 4096, "seed": 0}


def test_too_few_images_to_compare_are_refused():
    with pytest.raises(DataError, match="has 1 image"):
        run_health(collapsed, dataset(train=1))


def test_a_streamed_folder_is_sampled_by_file(tmp_path: Path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(40):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)).save(files[-1])
    streamed = FolderImages(files, [-1] * 40, SIDE, 3)
    data = ImageData("files", streamed, None, None, (0.5,) * 3, (0.5,) * 3, 3, SIDE, [])
    sample, _ = health_sample(data, 32, seed=0)
    assert isinstance(sample, FolderImages) and len(sample) == 32
    row = run_health(projection(), data, images=32)
    assert row["images"] == 32 and row["rankme"] > 0.5 * DIM


def test_sample_health_measures_two_views_of_the_same_images():
    """An encoder that sees only the mean colour is blind to crops and flips of a flat image."""
    flat = torch.arange(40, dtype=torch.uint8).mul(6).view(40, 1, 1, 1).expand(40, 3, SIDE, SIDE)
    source_ = TensorImages(flat.contiguous(), torch.full((40,), -1))

    def mean_colour(x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))  # (B, 3)
        return torch.cat([m, m.square(), torch.ones_like(m)], dim=1)

    out = sample_health(mean_colour, source_, mean=(0.5,) * 3, std=(0.5,) * 3, side=SIDE)
    assert out["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert out["dim"] == 9 and out["rank_cap"] == 9


def test_without_labels_knn_and_the_probes_point_at_health_and_health_is_the_default():
    unlabelled = dataset()
    for name in ("knn", "linear", "linear-paper"):
        with pytest.raises(DataError, match="has no labels .* `ressl eval health`"):
            PROTOCOLS[name].run(source(projection()), unlabelled, device="cpu")
    assert default_protocol(unlabelled) == "health"
    row = ressl.evaluate(source(projection()), data=unlabelled, images=32)
    assert row["protocol"] == "health" and row["images"] == 32
    labelled = ImageData(
        "two",
        images(8),
        TensorImages(images(8).images, torch.tensor([0, 1] * 4)),
        TensorImages(images(4, seed=2).images, torch.tensor([0, 1] * 2)),
        (0.5,) * 3,
        (0.5,) * 3,
        3,
        SIDE,
        ["a", "b"],
    )
    assert default_protocol(labelled) == "knn"
    assert ressl.evaluate(source(projection()), data=labelled, k=3)["protocol"] == "knn"
