"""Tests for ressl.data.loading: every format is written here by hand, so nothing is downloaded."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ressl.data import folders
from ressl.data import loading as data
from ressl.data import registry as datasets
from ressl.data.decode import decode_image
from ressl.data.formats import read_idx
from ressl.data.loading import dataset_names, load_dataset
from ressl.data.sources import FolderImages, ImageSource, TensorImages, epoch_order

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No system datasets, an empty cache: only what a test writes is found."""
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _pixels(source: ImageSource | None) -> torch.Tensor:
    """The uint8 tensor of an in-memory split."""
    assert isinstance(source, TensorImages)
    return source.images


# --------------------------------------------------------------------------- specs


def test_dataset_names() -> None:
    assert dataset_names() == [
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "stl10",
        "folder:PATH",
        "imagenet:PATH",
    ]


def test_unknown_spec_lists_valid_names() -> None:
    with pytest.raises(
        ValueError, match="dataset must be one of fashion-mnist.*folder:PATH.*got 'mnist'"
    ):
        load_dataset("mnist")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subset": 0}, "subset must be"),
        ({"image_size": 0}, "image_size must be"),
        ({"image_size": 7}, r"image_size must be an integer in \[8, 4096\] or None, got 7"),
        ({"image_size": 4097}, "image_size must be an integer in .* got 4097"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("fashion-mnist", **kwargs)


# --------------------------------------------------------------------------- fashion-mnist


def _write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = True) -> None:
    magic = 0x800 + array.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _fake_fmnist(root: Path, n_train: int = 7, n_test: int = 3, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(root / name, array, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = _fake_fmnist(tmp_path, gz=gz)
    d = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert (d.name, d.channels, d.image_size, len(d.classes)) == ("fashion-mnist", 1, 28, 10)
    assert d.mean == datasets.FASHION_MNIST_MEAN and d.std == datasets.FASHION_MNIST_STD
    assert isinstance(d.train, TensorImages) and isinstance(d.test, TensorImages)
    assert d.labelled is d.train
    assert _pixels(d.train).shape == (7, 1, 28, 28) and _pixels(d.train).dtype == torch.uint8
    assert torch.equal(_pixels(d.train)[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert d.train.labels.dtype == torch.int64
    assert d.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(_pixels(d.test)[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert d.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_torchvision_layout_subset_and_resize(tmp_path: Path) -> None:
    arrays = _fake_fmnist(tmp_path / "FashionMNIST" / "raw")
    d = load_dataset("fashion-mnist", root=tmp_path, download=False, subset=4, image_size=14)
    assert _pixels(d.train).shape == (4, 1, 14, 14) and d.labelled is d.train
    assert d.test is not None and _pixels(d.test).shape == (3, 1, 14, 14)  # test is not cut
    assert d.train.labels.tolist() == arrays["train-labels-idx1-ubyte"][:4].tolist()
    full = torch.from_numpy(arrays["train-images-idx3-ubyte"][:4]).unsqueeze(1).float()
    want = F.interpolate(full, size=(14, 14), mode="bilinear", antialias=True)
    assert torch.equal(_pixels(d.train), want.round().clamp(0, 255).to(torch.uint8))
    assert d.image_size == 14


def test_subset_larger_than_the_data_keeps_all(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path)
    assert len(load_dataset("fashion-mnist", root=tmp_path, subset=1000).train) == 7


def test_idx_bad_magic_is_a_clear_error(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), magic=0x12345678)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: bad idx magic.*0x12345678"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


def test_idx_truncated_and_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 0x801, 10) + bytes(4))
    with pytest.raises(ValueError, match=r"shape \(10,\).*holds 4 bytes"):
        read_idx(path, ndim=1)
    (tmp_path / "y.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a valid gzip file"):
        read_idx(tmp_path / "y.gz")


def test_fashion_mnist_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", root=tmp_path / "nowhere", download=False)
    assert str(tmp_path / "nowhere") in str(e.value)
    assert str(tmp_path / "cache" / "ressl" / "fashion-mnist") in str(e.value)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_and_its_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (REAL_FMNIST.parent,))
    d = load_dataset("fashion-mnist", download=False)
    assert len(d.train) == 60000 and d.test is not None and len(d.test) == 10000
    assert torch.bincount(d.train.labels).tolist() == [6000] * 10
    pixels = _pixels(d.train).double() / 255
    assert abs(pixels.mean().item() - d.mean[0]) < 1e-3
    assert abs(pixels.std().item() - d.std[0]) < 1e-3


# --------------------------------------------------------------------------- cifar


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10_batches(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    batches = []
    for i in range(1, 6):  # 2 images per batch; bytes keys as in the official files
        x, y = rng.integers(0, 256, (2, 3072), dtype=np.uint8), [i % 10, (i + 3) % 10]
        _pickle(d / f"data_batch_{i}", {b"data": x, b"labels": y, b"batch_label": b"b"})
        batches.append((x, y))
    test_x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _pickle(d / "test_batch", {b"data": test_x, b"labels": [0, 1, 9]})
    names = [f"c{i}".encode() for i in range(10)]
    _pickle(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})

    out = load_dataset("cifar10", root=tmp_path, download=False)
    assert (out.channels, out.image_size, out.mean) == (3, 32, datasets.CIFAR10_MEAN)
    assert out.classes == [f"c{i}" for i in range(10)] and out.labelled is out.train
    images = _pixels(out.train)
    assert images.shape == (10, 3, 32, 32)
    # A row is the R plane, then G, then B, each row-major 32 x 32.
    first = batches[0][0][0]
    assert images[0, 1, 2, 3].item() == first[1 * 1024 + 2 * 32 + 3]
    assert torch.equal(images[8:], torch.from_numpy(batches[4][0].reshape(2, 3, 32, 32)))
    assert out.train.labels.tolist() == [v for _, y in batches for v in y]
    assert out.test is not None and out.test.labels.tolist() == [0, 1, 9]
    assert torch.equal(_pixels(out.test), torch.from_numpy(test_x.reshape(3, 3, 32, 32)))


def test_cifar100_fine_labels_and_classes(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072).astype(np.uint8)
    _pickle(d / "train", {b"data": x, b"fine_labels": [5, 99, 0, 42], b"coarse_labels": [1] * 4})
    _pickle(d / "test", {b"data": x[:1], b"fine_labels": [7], b"coarse_labels": [1]})
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    out = load_dataset("cifar100", root=d, download=False, subset=3)  # root = the batch dir
    assert out.classes[99] == "f99" and len(out.classes) == 100
    assert out.train.labels.tolist() == [5, 99, 0] and out.mean == datasets.CIFAR100_MEAN
    assert torch.equal(_pixels(out.train), torch.from_numpy(x[:3].reshape(3, 3, 32, 32)))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("this must never run",))

    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name in ("train", "test", "meta"):
        _pickle(d / name, {b"data": Evil()})
    with pytest.raises(
        ValueError, match=r"meta is not a readable CIFAR batch: refusing to unpickle \w+\.print"
    ):
        load_dataset("cifar100", root=tmp_path, download=False)


# --------------------------------------------------------------------------- stl-10


def _stl_images(n: int, offset: int) -> np.ndarray:
    """(n, 3, 96, 96) with a different value at every (image, channel, row, column)."""
    i, c, h, w = np.meshgrid(*(np.arange(k) for k in (n, 3, 96, 96)), indexing="ij")
    return ((offset + 7 * i + 50 * c + 2 * h + w) % 256).astype(np.uint8)


def _write_stl(path: Path, images: np.ndarray) -> None:
    path.write_bytes(images.transpose(0, 1, 3, 2).tobytes())  # column-major, as shipped


@pytest.fixture
def stl_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path / "stl10_binary"
    d.mkdir()
    arrays = {
        "unlabeled": _stl_images(4, 0),
        "train": _stl_images(3, 100),
        "test": _stl_images(2, 200),
    }
    for split, images in arrays.items():
        _write_stl(d / f"{split}_X.bin", images)
    (d / "train_y.bin").write_bytes(bytes([1, 10, 5]))  # stored 1-based
    (d / "test_y.bin").write_bytes(bytes([2, 3]))
    return tmp_path, arrays


def test_stl10_orientation_and_splits(stl_root: tuple[Path, dict]) -> None:
    root, arrays = stl_root
    d = load_dataset("stl10", root=root, download=False, image_size=96)
    assert d.image_size == 96 and d.classes == list(datasets.STL10_CLASSES)
    x = _pixels(d.train)
    assert x.shape == (7, 3, 96, 96)
    # Rows stay rows: pixel (c, h, w) = 50c + 2h + w for the first image.
    assert x[0, 1, 3, 5].item() == 50 + 6 + 5 and x[0, 0, 5, 3].item() == 10 + 3
    assert torch.equal(x[:4], torch.from_numpy(arrays["unlabeled"]))
    assert torch.equal(x[4:], torch.from_numpy(arrays["train"]))
    assert d.train.labels.tolist() == [-1, -1, -1, -1, 0, 9, 4]
    assert d.labelled is not None and d.labelled.labels.tolist() == [0, 9, 4]
    assert torch.equal(_pixels(d.labelled), torch.from_numpy(arrays["train"]))
    assert d.test is not None and d.test.labels.tolist() == [1, 2]


def test_stl10_default_64px_is_an_antialiased_resize(stl_root: tuple[Path, dict]) -> None:
    root, arrays = stl_root
    d = load_dataset("stl10", root=root, download=False)
    assert d.image_size == 64 and d.mean == datasets.STL10_MEAN
    want = F.interpolate(
        torch.from_numpy(arrays["test"]).float(), size=(64, 64), mode="bilinear", antialias=True
    )
    assert torch.equal(_pixels(d.test), want.round().clamp(0, 255).to(torch.uint8))
    assert _pixels(d.train).shape == (7, 3, 64, 64)


@pytest.mark.parametrize(("subset", "labels"), [(2, [-1, -1]), (5, [-1, -1, -1, -1, 0])])
def test_stl10_subset_keeps_first_training_images(
    stl_root: tuple[Path, dict], subset: int, labels: list[int]
) -> None:
    d = load_dataset("stl10", root=stl_root[0], download=False, subset=subset, image_size=96)
    assert d.train.labels.tolist() == labels
    assert d.labelled is not None and len(d.labelled) == 3  # the kNN bank stays whole


def test_stl10_truncated_file(stl_root: tuple[Path, dict]) -> None:
    root, _ = stl_root
    with open(root / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ValueError, match="test_X.bin.*not a whole number of 3x96x96"):
        load_dataset("stl10", root=root, download=False)


# --------------------------------------------------------------------------- folders

COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 200, 0)}


def _solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _class_tree(root: Path) -> None:
    _solid(root / "cat" / "a.png", COLORS["cat"])
    _solid(root / "cat" / "deep" / "b.JPG", COLORS["cat"])  # nested, upper-case extension
    _solid(root / "dog" / "c.bmp", COLORS["dog"])
    _solid(root / "emu" / "d.webp", COLORS["emu"], size=(16, 50))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "empty_dir").mkdir()


def test_folder_with_classes(tmp_path: Path) -> None:
    _class_tree(tmp_path)
    d = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert d.name == f"folder:{tmp_path.resolve()}"
    assert d.classes == ["cat", "dog", "emu"] and d.skipped == 1  # broken.jpg; notes.txt ignored
    assert (d.channels, d.image_size, d.mean, d.std) == (
        3,
        8,
        datasets.IMAGENET_MEAN,
        datasets.IMAGENET_STD,
    )
    assert isinstance(d.train, TensorImages) and d.labelled is d.train and d.test is None
    assert d.train.labels.tolist() == [0, 0, 1, 2]
    assert _pixels(d.train).shape == (4, 3, 8, 8)
    for image, label in zip(_pixels(d.train), d.train.labels):
        color = torch.tensor(COLORS[d.classes[label]], dtype=torch.float)
        assert (image.float().mean(dim=(1, 2)) - color).abs().max() < 3  # JPEG/WebP loss


def test_folder_default_size_follows_the_files_and_loose_files_are_ignored(tmp_path: Path) -> None:
    _solid(tmp_path / "cat" / "a.png", COLORS["cat"])  # 40 x 30: shorter side 30
    _solid(tmp_path / "loose.png", COLORS["dog"])
    d = load_dataset(f"folder:{tmp_path}")
    assert d.image_size == 30 and len(d.train) == 1  # small images are not upscaled
    assert d.classes == ["cat"]
    _solid(tmp_path / "cat" / "b.png", COLORS["cat"], size=(300, 200))
    _solid(tmp_path / "cat" / "c.png", COLORS["cat"], size=(300, 200))
    assert load_dataset(f"folder:{tmp_path}").image_size == folders.DEFAULT_MAX_SIDE == 64


def _grayscale_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c, level in (("dark", 40), ("light", 200)):
            for i in range(n):
                pixels = np.clip(level + rng.integers(-30, 30, (28, 28)), 0, 255).astype(np.uint8)
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "L").save(root / split / c / f"{i}.png")
    return root


def test_a_grayscale_folder_keeps_one_channel_with_its_own_mean_and_std(tmp_path: Path) -> None:
    root = _grayscale_folder(tmp_path)
    d = load_dataset(f"folder:{root}")
    assert (d.channels, d.image_size) == (1, 28)
    assert d.train.images.shape[1:] == (1, 28, 28) and d.test.images.shape[1] == 1
    pixels = d.train.images.float() / 255
    assert d.mean == pytest.approx((float(pixels.mean()),)) and d.std == pytest.approx(
        (float(pixels.std()),)
    )
    # an explicit setting wins: three channels with ImageNet's statistics
    rgb = load_dataset(f"folder:{root}", channels=3)
    assert rgb.channels == 3 and rgb.mean == datasets.DATASETS["folder"].mean
    assert torch.equal(rgb.train.images[:, 0], d.train.images[:, 0])
    streamed = FolderImages(
        [str(p) for p in sorted((root / "train").rglob("*.png"))], [0] * 12, 28, 1
    )
    assert streamed[0][0].shape == (1, 28, 28)
    with pytest.raises(ValueError, match=r"image_size must be an integer in \[8, 4096\], got 7"):
        FolderImages([str(root / "train" / "cat" / "a.png")], [0], 7, 1)


def test_an_rgb_folder_read_as_one_channel_is_its_luma(tmp_path: Path) -> None:
    _solid(tmp_path / "a" / "x.png", (200, 100, 50), size=(12, 12))
    d = load_dataset(f"folder:{tmp_path}", channels=1)
    assert d.channels == 1 and int(d.train.images[0, 0, 0, 0]) == round(
        200 * 0.299 + 100 * 0.587 + 50 * 0.114
    )
    assert load_dataset(f"folder:{tmp_path}").channels == 3


@pytest.mark.parametrize(
    "mode, values, want",
    [
        ("I", [[0, 128, 255]], [0, 128, 255]),  # 8-bit values in a 32-bit image stay
        ("I", [[0, 32896, 65535]], [0, 128, 255]),  # 16-bit values are scaled
        ("F", [[0.0, 0.5, 1.0]], [0, 128, 255]),  # floats in [0, 1] are scaled
        ("F", [[0.0, 128.0, 300.0]], [0, 128, 255]),  # floats above 1 are levels, clipped
    ],
)
def test_high_bit_depth_and_float_images_are_scaled_not_clipped(mode, values, want) -> None:
    from ressl.data.imagefiles import as_mode

    array = np.array(values, dtype=np.int32 if mode == "I" else np.float32)
    got = np.asarray(as_mode(Image.fromarray(array, mode), "L"))
    assert got[0].tolist() == want


def test_lab_images_are_converted_by_color_transform(tmp_path: Path) -> None:
    from PIL import ImageCms

    from ressl.data.imagefiles import as_mode

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    to_lab = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    lab = ImageCms.applyTransform(rgb, to_lab)
    back = np.asarray(as_mode(lab, "RGB")).astype(int)
    assert np.abs(back - np.asarray(rgb)).mean() < 4  # 8-bit L*a*b* loses a little
    gray = np.asarray(as_mode(lab, "L")).astype(int)  # PIL's own convert refuses LAB -> L
    assert np.abs(gray - np.asarray(rgb.convert("L"))).mean() < 4


def test_a_mode_pil_cannot_convert_is_refused_with_its_name() -> None:
    from ressl.data.imagefiles import as_mode

    with pytest.raises(ValueError, match="PIL cannot convert a mode La image to L"):
        as_mode(Image.new("La", (4, 4)), "L")


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i, name in enumerate(["b.png", "a.gif", "c.TIFF"]):
        _solid(tmp_path / name, (i * 100, 0, 0))
    d = load_dataset(f"folder:{tmp_path}", image_size=8)  # the smallest side (rules.IMAGE_SIZE)
    assert d.classes == [] and d.labelled is None and d.test is None
    assert _pixels(d.train).shape == (3, 3, 8, 8)
    assert d.train.labels.tolist() == [-1, -1, -1]
    # Sorted by name: a.gif (100), b.png (0), c.TIFF (200).
    assert _pixels(d.train)[:, 0, 0, 0].tolist() == [100, 0, 200]


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no image file in .*accepted extensions: \.bmp"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable image in"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_folder_train_test_splits(tmp_path: Path, test_name: str) -> None:
    _class_tree(tmp_path / "train")
    _solid(tmp_path / test_name / "emu" / "x.png", COLORS["emu"])
    _solid(tmp_path / test_name / "cat" / "y.png", COLORS["cat"])
    d = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert d.classes == ["cat", "dog", "emu"] and len(d.train) == 4 and d.skipped == 1
    assert d.test is not None and d.test.labels.tolist() == [0, 2]  # test uses train's indices


def test_folder_test_class_unknown_to_train(tmp_path: Path) -> None:
    _class_tree(tmp_path / "train")
    _solid(tmp_path / "test" / "yak" / "x.png", COLORS["emu"])
    with pytest.raises(ValueError, match="classes not in .*train: yak"):
        load_dataset(f"folder:{tmp_path}", image_size=8)


def test_decode_image_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    # 40 x 20: red | green | blue vertical bands of width 14, 12, 14.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :14, 0], array[:, 14:26, 1], array[:, 26:, 2] = 255, 255, 255
    Image.fromarray(array).save(tmp_path / "bands.png")
    image = decode_image(tmp_path / "bands.png", 10)  # -> 20 x 10 (bands 7, 6, 7), crop 5..15
    assert image is not None and image.shape == (3, 10, 10) and image.dtype == torch.uint8
    assert image[1, :, 3:7].min() == 255 and image[0, :, 3:7].max() == 0  # green centre
    assert image[0, :, 0].min() == 255 and image[2, :, -1].min() == 255  # red left, blue right
    assert image[:, 0].equal(image[:, -1])  # every row alike: nothing cropped vertically


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_decode_image_any_mode_gives_rgb(tmp_path: Path, mode: str) -> None:
    Image.new(mode, (12, 12), 100).save(tmp_path / "x.png")
    image = decode_image(tmp_path / "x.png", 6)
    assert image is not None and image.shape == (3, 6, 6)


def test_folder_streaming_matches_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _class_tree(tmp_path)
    for i in range(5):
        _solid(tmp_path / "dog" / f"more{i}.png", (i * 40, 10, 200), size=(30 + i, 20))
    kept = load_dataset(f"folder:{tmp_path}", image_size=8)
    monkeypatch.setattr(folders, "MAX_IN_MEMORY_BYTES", 0)
    streamed = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert isinstance(streamed.train, FolderImages) and isinstance(kept.train, TensorImages)
    assert streamed.skipped == kept.skipped == 1 and streamed.labelled is streamed.train
    assert torch.equal(streamed.train.labels, kept.train.labels)
    for workers in (0, 2):
        args: dict[str, Any] = {"epoch": 3, "seed": 1, "drop_last": False, "num_workers": workers}
        got = list(streamed.train.batches(4, **args))
        want = list(kept.train.batches(4, **args))
        assert len(got) == len(want) == 3
        for (xs, ys), (xk, yk) in zip(got, want):
            assert xs.dtype == torch.uint8 and torch.equal(xs, xk) and torch.equal(ys, yk)


def test_imagenet_spec_is_a_folder_at_224_px(tmp_path: Path) -> None:
    _class_tree(tmp_path)
    d = load_dataset(f"imagenet:{tmp_path}")
    assert (
        d.name == f"imagenet:{tmp_path.resolve()}"
        and d.image_size == 224 == datasets.DATASETS["imagenet"].image_size
    )
    assert d.classes == ["cat", "dog", "emu"] and _pixels(d.train).shape == (4, 3, 224, 224)
    with pytest.raises(ValueError, match="imagenet:PATH needs the folder's path"):
        load_dataset("imagenet:")


def test_decode_crops_cuts_boxes_from_the_full_resolution_file(tmp_path: Path) -> None:
    from ressl.data.decode import decode_crops

    left_red = np.zeros((60, 200, 3), dtype=np.uint8)
    left_red[:, :100, 0] = 255
    left_red[:, 100:, 2] = 255
    Image.fromarray(left_red).save(tmp_path / "a.png")
    crops = [(32, (0.2, 1.0)), (16, (0.05, 0.1))]
    got = decode_crops(tmp_path / "a.png", crops, torch.Generator().manual_seed(0))
    assert got is not None and [tuple(c.shape) for c in got] == [(3, 32, 32), (3, 16, 16)]
    again = decode_crops(tmp_path / "a.png", crops, torch.Generator().manual_seed(0))
    assert again is not None and all(torch.equal(a, b) for a, b in zip(got, again))
    # small crops of a 200 px wide image are mostly one colour; over many draws both colours occur
    colors = set()
    for seed in range(20):
        small = decode_crops(
            tmp_path / "a.png", [(16, (0.02, 0.03))], torch.Generator().manual_seed(seed)
        )
        assert small is not None
        red, blue = small[0][0].float().mean(), small[0][2].float().mean()
        colors.add("red" if red > blue else "blue")
    assert colors == {"red", "blue"}
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert decode_crops(tmp_path / "bad.jpg", crops, torch.Generator()) is None


def test_crop_batches_follow_the_epoch_order_and_are_worker_independent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _class_tree(tmp_path)
    for i in range(5):
        _solid(tmp_path / "dog" / f"more{i}.png", (i * 40, 10, 200), size=(30 + i, 20))
    monkeypatch.setattr(folders, "MAX_IN_MEMORY_BYTES", 0)
    train = load_dataset(f"folder:{tmp_path}", image_size=8).train
    assert isinstance(train, FolderImages)
    crops = [(8, (0.2, 1.0)), (6, (0.1, 0.5))]
    args: dict[str, Any] = {"epoch": 2, "seed": 1}
    plain = [y for _, y in train.batches(3, **args)]
    runs = [list(train.crop_batches(3, crops, num_workers=w, **args)) for w in (0, 2)]
    for (views0, y0), (views2, y2), y in zip(*runs, plain):
        assert torch.equal(y0, y) and torch.equal(y2, y)
        assert [tuple(v.shape) for v in views0] == [(3, 3, 8, 8), (3, 3, 6, 6)]
        assert all(torch.equal(a, b) for a, b in zip(views0, views2))
    tail = list(train.crop_batches(3, crops, start=1, **args))
    assert len(tail) == len(runs[0]) - 1 and torch.equal(tail[0][0][1], runs[0][1][0][1])
    other_epoch = next(iter(train.crop_batches(3, crops, epoch=3, seed=1)))
    assert not torch.equal(other_epoch[0][0], runs[0][0][0][0])


def test_folder_parallel_decode_matches_sequential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _class_tree(tmp_path)
    sequential = load_dataset(f"folder:{tmp_path}", image_size=8)
    monkeypatch.setattr(folders, "_PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(folders, "_DECODE_WORKERS", 2)
    parallel = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert parallel.skipped == sequential.skipped == 1
    assert torch.equal(_pixels(parallel.train), _pixels(sequential.train))
    assert torch.equal(parallel.train.labels, sequential.train.labels)


def test_folder_subset_takes_first_files(tmp_path: Path) -> None:
    _class_tree(tmp_path)
    d = load_dataset(f"folder:{tmp_path}", image_size=8, subset=2)
    assert d.train.labels.tolist() == [0, 0]


# --------------------------------------------------------------------------- batches


def _indexed(n: int) -> TensorImages:
    """Image i is filled with i, so a batch tells which indices it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorImages(images, torch.arange(n) * 10)


def _indices(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    out = []
    for x, y in batches:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(y, x[:, 0, 0, 0].long() * 10)  # labels travel with their images
        out.append(x[:, 0, 0, 0].tolist())
    return out


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(50, seed=3, epoch=2), epoch_order(50, seed=3, epoch=2))
    assert not torch.equal(epoch_order(50, seed=3, epoch=2), epoch_order(50, seed=3, epoch=3))
    assert not torch.equal(epoch_order(50, seed=3, epoch=2), epoch_order(50, seed=4, epoch=2))
    assert sorted(epoch_order(50, seed=-7, epoch=0).tolist()) == list(range(50))
    assert epoch_order(5, seed=0, epoch=0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_batches_deterministic_and_different_across_epochs() -> None:
    src = _indexed(23)
    e0 = _indices(list(src.batches(5, epoch=0, seed=1)))
    assert e0 == _indices(list(src.batches(5, epoch=0, seed=1)))
    assert e0 != _indices(list(src.batches(5, epoch=1, seed=1)))
    assert len(e0) == src.num_batches(5) == 4 and all(len(b) == 5 for b in e0)
    assert len({i for b in e0 for i in b}) == 20  # drop_last: 3 images left out, none repeated


def test_batches_cover_every_index_once_without_drop_last() -> None:
    src = _indexed(23)
    got = _indices(list(src.batches(5, epoch=4, seed=0, drop_last=False)))
    assert [len(b) for b in got] == [5, 5, 5, 5, 3] and src.num_batches(5, drop_last=False) == 5
    assert sorted(i for b in got for i in b) == list(range(23))


def test_batches_sequential_without_shuffle() -> None:
    got = _indices(list(_indexed(7).batches(3, epoch=9, seed=9, shuffle=False, drop_last=False)))
    assert got == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("start", [0, 1, 3, 4])
def test_batches_start_equals_slicing_the_epoch(start: int) -> None:
    src = _indexed(23)
    full = _indices(list(src.batches(5, epoch=2, seed=5)))
    assert _indices(list(src.batches(5, epoch=2, seed=5, start=start))) == full[start:]


def test_batches_bad_arguments() -> None:
    src = _indexed(10)
    with pytest.raises(ValueError, match=r"start must be in \[0, 2\]"):
        list(src.batches(5, epoch=0, seed=0, start=3))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(src.batches(0, epoch=0, seed=0))


def test_tensor_images_validation_and_to() -> None:
    with pytest.raises(ValueError, match="uint8"):
        TensorImages(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        TensorImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))
    src = _indexed(4)
    moved = src.to("cpu")
    assert moved is not src and torch.equal(moved.images, src.images)
    assert moved.labels.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_match_cpu() -> None:
    src = _indexed(23)
    on_gpu = src.to("cuda")
    assert on_gpu.images.is_cuda and on_gpu.labels.device.type == "cpu"
    for gpu, cpu in zip(
        on_gpu.batches(5, epoch=1, seed=2, device="cuda"), src.batches(5, epoch=1, seed=2)
    ):
        assert gpu[0].is_cuda and gpu[1].is_cuda
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    # CPU-held images delivered to the GPU batch by batch.
    x, y = next(src.batches(5, epoch=1, seed=2, device="cuda"))
    assert x.is_cuda and y.is_cuda


def test_a_new_dataset_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import MappingProxyType

    from ressl.config.settings import TrainConfig
    from ressl.data.formats import Splits

    def read(root, *, cache, system_dirs, download, size, subset):  # the files, as uint8 tensors
        x = torch.arange(5 * 3 * 12 * 12, dtype=torch.int64).remainder(256).to(torch.uint8)
        y = torch.tensor([0, 1, 0, 1, 0])
        return Splits((x.view(5, 3, 12, 12), y), (x.view(5, 3, 12, 12)[:2], y[:2]), ["a", "b"])

    recipe = dict(datasets.DATASETS["cifar10"].recipe, queue_size=64)
    entry = datasets.DatasetInfo(
        "toy",
        "five toy images",
        3,
        12,
        (0.5,) * 3,
        (0.25,) * 3,
        MappingProxyType(recipe),
        aliases=("toy-set",),
        reader=read,
    )
    monkeypatch.setattr(datasets, "DATASETS", MappingProxyType({**datasets.DATASETS, "toy": entry}))
    d = load_dataset("TOY_SET", image_size=8)
    assert (d.name, d.image_size, d.classes, len(d.train)) == ("toy", 8, ["a", "b"], 5)
    assert d.labelled is d.train and d.mean == (0.5,) * 3
    assert TrainConfig(dataset="toy", batch_size=4).queue_size == 64  # its recipe
    assert "toy" in dataset_names()


def test_sixteen_bit_images_are_scaled_not_clipped_everywhere(tmp_path):
    from ressl.export.images import load_image

    from ressl.data.decode import decode_image

    ramp = (np.arange(32 * 32, dtype=np.float64).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    eight = np.round(ramp / 257).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    trained = decode_image(tmp_path / "deep.png", 32)  # training and evaluation
    assert torch.equal(trained, decode_image(tmp_path / "eight.png", 32))
    assert len(torch.unique(trained)) > 200  # not binarised to {0, 255}
    served = load_image(tmp_path / "deep.png", 32, 1)  # Embedder, ressl embed, ressl serve
    np.testing.assert_array_equal(served, load_image(tmp_path / "eight.png", 32, 1))


def test_exif_orientation_is_honoured(tmp_path):
    from ressl.export.images import load_image

    from ressl.data.decode import decode_image

    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # white left half of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    upright = np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270))
    Image.fromarray(upright).save(tmp_path / "upright.png")
    assert torch.equal(
        decode_image(tmp_path / "rotated.png", 16), decode_image(tmp_path / "upright.png", 16)
    )
    np.testing.assert_array_equal(
        load_image(tmp_path / "rotated.png", 16, 3), load_image(tmp_path / "upright.png", 16, 3)
    )


class _WorkerSignals(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import signal

        return int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN) + 2 * int(
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        )


def test_decode_workers_leave_stop_signals_to_the_main_process():
    """A group SIGTERM (timeout, scancel) or Ctrl-C must not kill workers under a loader the
    main process is stopping cleanly: they ignore both (ressl.data.decode.ignore_stop_signals)."""
    from ressl.data.decode import ignore_stop_signals

    loader = torch.utils.data.DataLoader(
        _WorkerSignals(), num_workers=1, worker_init_fn=ignore_stop_signals
    )
    assert [int(x) for x in loader] == [3, 3]


def test_decoding_in_workers_equals_decoding_here(tmp_path):
    """Worker results come back as arrays (no file descriptor per image), the same pixels."""
    from ressl.data.decode import decode_images

    files = []
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (i * 40, 10, 200)).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    files.insert(2, str(tmp_path / "bad.png"))
    here, kept_here = decode_images(files, 28, workers=0)
    there, kept_there = decode_images(files, 28, workers=2)
    assert torch.equal(here, there) and torch.equal(kept_here, kept_there)
    assert kept_here.tolist() == [0, 1, 3, 4, 5]
