"""ressl.export: ONNX export parity, metadata, the Embedder and bad input (CPU, tiny models)."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from ressl.export import (
    IMAGE_EXTENSIONS,
    Embedder,
    ExportError,
    cuda_device_count,
    describe_model,
    export_onnx,
    image_files,
    load_embeddings,
    read_model_info,
    sample_images,
    save_embeddings,
)
from ressl.export import exporter as exporter_module
from ressl.export.outputs import write_atomic

from ressl import ReSSL, save_checkpoint
from ressl.data.decode import decode_image
from ressl.data.imagefiles import IMAGE_EXTENSIONS as FOLDER_EXTENSIONS

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def reference(net: torch.nn.Module, x: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """What the exported graph must compute, written out independently of the exporter."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return F.normalize(net((x - m) / s), dim=1).numpy()


def make_checkpoint(
    path: Path, backbone: str = "small", channels: int = 3, image_size: int = 16, seed: int = 0
) -> tuple[Path, ReSSL, dict]:
    """A ressl checkpoint written with the public API (no training); the teacher differs from the student."""
    torch.manual_seed(seed)
    model = ReSSL(
        backbone,
        in_channels=channels,
        image_size=image_size,
        hidden_dim=16,
        embed_dim=8,
        queue_size=32,
        width=4,
    )
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():  # non-trivial BN statistics, so BN folding is exercised
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    settings = dict(
        backbone=backbone,
        channels=channels,
        image_size=image_size,
        hidden_dim=16,
        embed_dim=8,
        queue_size=32,
        width=4,
        mean=list(MEAN[:channels]),
        std=list(STD[:channels]),
        dataset="folder:images",
        epochs=3,
    )
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, {"settings": json.dumps(settings), "epoch": "3", "step": "30"})
    return path, model.eval(), settings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReSSL, dict]:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.safetensors")


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "small.onnx"
    export_onnx(checkpoint[0], out)
    return out


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    encoder = ReSSL("resnet18", image_size=32, queue_size=16).student.eval()
    out = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    export_onnx(encoder, out, image_size=32, channels=3, mean=MEAN, std=STD, backbone="resnet18")
    return out, encoder.backbone


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("batch", [2, 7])
def test_fp32_parity_small_cnn(small_onnx, checkpoint, batch):
    _, model, _ = checkpoint
    x = sample_images(batch, 3, 16, seed=batch)
    got = Embedder(small_onnx, device="cpu").run(x.numpy())
    want = reference(model.student.backbone, x)
    assert got.shape == (batch, 32) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 7])
def test_fp32_parity_resnet18(resnet18_onnx, batch):
    path, backbone = resnet18_onnx
    x = sample_images(batch, 3, 32, seed=batch)
    got = Embedder(path, device="cpu").run(x.numpy())
    assert got.shape == (batch, 512)
    assert np.abs(got - reference(backbone, x)).max() <= 1e-4


def test_spatial_size_is_dynamic(small_onnx, checkpoint):
    x = sample_images(3, 3, 24)
    emb = Embedder(small_onnx, device="cpu")
    assert emb.info.dynamic_spatial
    assert np.abs(emb.run(x.numpy()) - reference(checkpoint[1].student.backbone, x)).max() <= 1e-4


def test_teacher_and_head(tmp_path, checkpoint):
    path, model, _ = checkpoint
    report = export_onnx(path, tmp_path / "t.onnx", weights="teacher", head=True)
    assert report.info.weights == "teacher" and report.info.head and report.info.embedding_dim == 8
    x = sample_images(4, 3, 16)
    got = Embedder(report.path, device="cpu").run(x.numpy())
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        teacher, student = model.teacher((x - m) / s).numpy(), model.student((x - m) / s).numpy()
    assert np.abs(got - teacher).max() <= 1e-4
    assert np.abs(got - student).max() > 1e-2  # really the teacher's weights


def test_fp16_export(tmp_path, checkpoint, small_onnx):
    report = export_onnx(checkpoint[0], tmp_path / "h.onnx", fp16=True)
    assert report.info.precision == "fp16" and report.verification is not None
    assert report.verification.min_cosine >= 0.999
    emb = Embedder(report.path, device="cpu")
    x = sample_images(5, 3, 16)
    got = emb.run(x.numpy())  # float32 in and out
    want = reference(checkpoint[1].student.backbone, x)
    assert got.dtype == np.float32 and (got * want).sum(1).min() >= 0.999
    assert report.size_bytes < 0.75 * small_onnx.stat().st_size  # weights stored in half precision


def test_export_does_not_touch_the_module(tmp_path):
    torch.manual_seed(0)
    model = ReSSL("small", image_size=16, queue_size=16, width=4)
    model.train()
    before = copy.deepcopy(model.state_dict())
    export_onnx(
        model, tmp_path / "m.onnx", weights="teacher", image_size=16, channels=3, mean=MEAN, std=STD
    )
    assert model.training and model.student.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert read_model_info(tmp_path / "m.onnx").weights == "teacher"


# ----------------------------------------------------------------------------- metadata


def test_metadata_round_trip(small_onnx, checkpoint):
    path, _, settings = checkpoint
    info = read_model_info(small_onnx)
    assert (info.backbone, info.image_size, info.channels, info.embedding_dim) == (
        "small",
        16,
        3,
        32,
    )
    assert info.mean == pytest.approx(MEAN) and info.std == pytest.approx(STD)
    assert (info.weights, info.head, info.precision) == ("student", False, "fp32")
    assert info.source == "last.safetensors"
    assert info.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.settings == settings
    assert info.ressl_version == __import__("ressl").__version__
    assert info.metadata["epoch"] == "3" and info.metadata["step"] == "30"
    assert json.loads(info.metadata["verification"])["max_abs_diff"] <= 1e-4
    # the same through onnxruntime, which is what a server reads
    assert Embedder(small_onnx, device="cpu").info == info
    # and the graph itself
    proto = onnx.load(str(small_onnx))
    assert [i.name for i in proto.graph.input] == ["images"] and [
        o.name for o in proto.graph.output
    ] == ["embedding"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    d = describe_model(small_onnx)
    assert d["outputs"][0]["shape"] == ["batch", 32] and d["opset"] == 17


def test_module_export_needs_its_input_described(tmp_path):
    net = ReSSL("small", image_size=16, queue_size=16, width=4).student
    with pytest.raises(TypeError, match="image_size, channels, mean, std"):
        export_onnx(net, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        export_onnx(net, tmp_path / "x.onnx", image_size=16, channels=3, mean=[0.5], std=[0.2])
    with pytest.raises(ValueError, match=r"image_size must be an integer in \[8, 4096\], got 4"):
        export_onnx(net, tmp_path / "x.onnx", image_size=4, channels=3, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="head=True needs an Encoder"):
        export_onnx(
            net.backbone,
            tmp_path / "x.onnx",
            head=True,
            image_size=16,
            channels=3,
            mean=MEAN,
            std=STD,
        )
    with pytest.raises(ValueError, match="leave weights unset"):
        export_onnx(
            net,
            tmp_path / "x.onnx",
            weights="teacher",
            image_size=16,
            channels=3,
            mean=MEAN,
            std=STD,
        )
    assert not list(tmp_path.iterdir())


def test_checkpoint_export_bad_arguments(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="weights must be 'student' or 'teacher'"):
        export_onnx(checkpoint[0], tmp_path / "x.onnx", weights="ema")
    with pytest.raises(ValueError, match="image_size: the checkpoint's settings supply"):
        export_onnx(checkpoint[0], tmp_path / "x.onnx", image_size=32)
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(checkpoint[0], tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        export_onnx(tmp_path / "notes.txt", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="checkpoint not found"):  # a CheckpointError
        export_onnx(tmp_path / "missing.safetensors", tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="source must be"):
        export_onnx(42, tmp_path / "x.onnx")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_failed_verification_raises_and_writes_nothing(tmp_path, checkpoint, monkeypatch):
    real_trace = exporter_module._trace

    def perturbed_trace(model, example, opset, dynamic_spatial):  # the graph drifts from PyTorch
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(model.parameters()).add_(1e-2)
        return real_trace(model, example, opset, dynamic_spatial)

    monkeypatch.setattr(exporter_module, "_trace", perturbed_trace)
    with pytest.raises(ExportError, match="verification failed"):
        export_onnx(checkpoint[0], tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- Embedder


def _photos(folder: Path) -> list[Path]:
    """RGB PNGs of different sizes and aspect ratios, smooth like photos."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate([(16, 16), (30, 40), (50, 20), (17, 23)]):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        paths.append(folder / f"img{i}.png")
        img.save(paths[-1])
    return paths


def test_embedder_files_pil_and_arrays_agree(tmp_path, small_onnx, checkpoint):
    paths = _photos(tmp_path / "photos")
    emb = Embedder(small_onnx, device="cpu", batch_size=3)
    from_files = emb.embed(paths)
    assert from_files.shape == (4, 32) and from_files.dtype == np.float32
    pil = [Image.open(p) for p in paths]
    np.testing.assert_array_equal(emb.embed(pil), from_files)
    np.testing.assert_array_equal(
        np.concatenate([emb.embed(np.asarray(im)) for im in pil]), from_files
    )
    # the preprocessing is the one ressl trains and evaluates folders with
    decoded = torch.stack([decode_image(p, 16) for p in paths]).float() / 255  # (4, 3, 16, 16)
    np.testing.assert_allclose(emb.embed(decoded.numpy()), from_files, atol=1e-6)
    assert np.abs(from_files - reference(checkpoint[1].student.backbone, decoded)).max() <= 1e-4
    # a uint8 (N, H, W, C) batch of same-sized images
    batch = np.stack([np.asarray(Image.open(paths[0]))] * 2)
    np.testing.assert_array_equal(emb(batch), np.repeat(from_files[:1], 2, axis=0))
    assert emb.embed([]).shape == (0, 32)


def test_embed_files_skips_unreadable(tmp_path, small_onnx):
    paths = _photos(tmp_path / "photos")
    bad = tmp_path / "photos" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    emb = Embedder(small_onnx, device="cpu", batch_size=2)
    seen = []
    result = emb.embed_files([paths[0], bad, *paths[1:]], progress=seen.append)
    assert result.paths == [str(p) for p in paths]
    assert [name for name, _ in result.skipped] == [str(bad)] and result.skipped[0][1]
    np.testing.assert_array_equal(result.embeddings, emb.embed(paths))
    assert seen == [2, 4, 5]
    with pytest.raises(OSError, match="broken.png: not a readable image"):
        emb.embed([bad])


def test_gray_model_takes_files_and_2d_arrays(tmp_path):
    path, _, _ = make_checkpoint(tmp_path / "grey.safetensors", channels=1)
    report = export_onnx(path, tmp_path / "grey.onnx")
    emb = Embedder(report.path, device="cpu")
    assert emb.info.channels == 1
    rgb = _photos(tmp_path / "photos")[1]
    gray = np.asarray(Image.open(rgb).convert("L"))  # (H, W)
    np.testing.assert_array_equal(emb.embed(rgb), emb.embed(gray))
    with pytest.raises(ValueError, match=r"1-channel images .*\(3 channels"):
        emb.embed(np.asarray(Image.open(rgb)))


def test_bad_arrays_name_what_was_wrong(small_onnx):
    emb = Embedder(small_onnx, device="cpu")
    with pytest.raises(ValueError, match=r"3-channel images but a float array .*\(1 channels"):
        emb.embed(np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got values in \[0, 255\]"):
        emb.embed(
            np.full((1, 3, 16, 16), 255.0, np.float32) * np.linspace(0, 1, 16, dtype=np.float32)
        )
    with pytest.raises(TypeError, match="dtype int64"):
        emb.embed(np.zeros((16, 16, 3), np.int64))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\), got shape"):
        emb.embed(np.zeros((1, 1, 16, 16, 3), np.uint8))
    with pytest.raises(TypeError, match="got int"):
        emb.embed([1, 2])
    with pytest.raises(TypeError, match="got dict"):
        emb.embed({"a": 1})  # type: ignore[arg-type]


def test_bad_model_files(tmp_path, small_onnx):
    (tmp_path / "notes.onnx").write_text("hello")
    (tmp_path / "half.onnx").write_bytes(small_onnx.read_bytes()[:5000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch.nn.Conv2d(3, 4, 3),
            (torch.zeros(1, 3, 8, 8),),
            str(tmp_path / "plain.onnx"),
            dynamo=False,
            input_names=["images"],
            output_names=["embedding"],
        )
    for name in ("notes.onnx", "half.onnx"):
        with pytest.raises(ValueError, match=f"{name} is not a valid ONNX"):
            Embedder(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name} is not a valid ONNX file"):
            read_model_info(tmp_path / name)
    with pytest.raises(ValueError, match="not a ressl encoder"):
        Embedder(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a ressl encoder"):
        read_model_info(tmp_path / "plain.onnx")
    with pytest.raises(FileNotFoundError):
        Embedder(tmp_path / "absent.onnx")
    with pytest.raises(ValueError, match="device must be"):
        Embedder(small_onnx, device="tpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Embedder(small_onnx, batch_size=0)


def test_provider_probe_is_silent_and_honest(small_onnx):
    code = (
        "from ressl.export import Embedder, cuda_device_count\n"
        f"e = Embedder({str(small_onnx)!r})\n"
        "print(e.provider, cuda_device_count())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    provider, gpus = proc.stdout.split()
    assert proc.stderr == ""  # no provider-load error spam from onnxruntime-gpu
    assert provider == ("CUDAExecutionProvider" if int(gpus) > 0 else "CPUExecutionProvider")
    assert cuda_device_count() == int(gpus)


def test_serving_code_needs_no_torch(small_onnx, tmp_path):
    """``from ressl.export import Embedder`` works where torch, torchvision and onnx cannot be imported."""
    photo = _photos(tmp_path)[0]
    code = f"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, NoTorch())
from ressl.export import Embedder
print(Embedder({str(small_onnx)!r}, device="cpu").embed([{str(photo)!r}]).shape)
try:
    from ressl import train
except ImportError as e:
    print("needs PyTorch" in str(e))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["(1, 32)", "True"]


# ----------------------------------------------------------------------------- files


def test_image_files(tmp_path):
    assert IMAGE_EXTENSIONS == FOLDER_EXTENSIONS
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for p in ("a/1.png", "a/b/2.JPG", "a/notes.txt", ".hidden/3.png", "a/.4.png"):
        (tmp_path / p).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    extra = tmp_path / "any.name"
    extra.write_bytes(b"")
    assert image_files([tmp_path / "a", extra, tmp_path / "a" / "1.png"]) == [
        tmp_path / "a/1.png",
        tmp_path / "a/b/2.JPG",
        extra,
    ]
    with pytest.raises(ValueError, match="empty: no image file"):
        image_files([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        image_files([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no input"):
        image_files([])


def test_embedding_file_round_trip_and_atomic_writes(tmp_path):
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = save_embeddings(
        tmp_path / "sub" / "e.npz",
        emb,
        ["a.png", "b.png", "c.png"],
        ["bad.png"],
        {"backbone": "small"},
    )
    got, paths, extra = load_embeddings(out)
    np.testing.assert_array_equal(got, emb)
    assert paths == ["a.png", "b.png", "c.png"] and extra == {
        "skipped": ["bad.png"],
        "model": {"backbone": "small"},
    }
    with pytest.raises(ValueError, match="3 paths"):
        save_embeddings(tmp_path / "x.npz", emb[:2], ["a", "b", "c"])

    def crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, crash)
    np.testing.assert_array_equal(load_embeddings(out)[0], emb)  # the old file is intact
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["e.npz"]  # no temp file left


def _variant(src: Path, dst: Path, meta: dict | None = None, dims: dict | None = None) -> Path:
    """``src`` with metadata values replaced and input dims fixed (``{axis: size}``)."""
    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        prop.value = (meta or {}).get(prop.key, prop.value)
    shape = proto.graph.input[0].type.tensor_type.shape.dim
    for axis, size in (dims or {}).items():
        shape[axis].ClearField("dim_param")
        shape[axis].dim_value = size
    onnx.save(proto, str(dst))
    return dst


def test_a_graph_whose_fixed_shape_contradicts_its_metadata_is_refused_at_load(
    tmp_path, small_onnx, capsys
):
    """Metadata says any size (or 4096, in range) but the graph takes only 28x28, or batches
    of exactly one: every run would fail, so the file is refused when it is opened."""
    from cli_helpers import assert_one_line_error, run_cli

    cases = [
        ({"image_size": "4096"}, {2: 28, 3: 28}, "metadata says any image size (image_size 4096)"),
        ({"image_size": "28"}, {2: 16, 3: 16}, "metadata says any image size (image_size 28)"),
        ({"image_size": "4096", "dynamic_spatial": "false"}, {2: 28, 3: 28}, "says 4096x4096"),
        ({}, {0: 1}, "takes batches of exactly 1 images"),
    ]
    for i, (meta, dims, needle) in enumerate(cases):
        path = _variant(small_onnx, tmp_path / f"v{i}.onnx", meta, dims)
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            Embedder(path, device="cpu")
        with pytest.raises(ValueError, match="graph input has shape"):
            describe_model(path)
        code, _, err = run_cli(capsys, "embed", path, tmp_path, "-o", tmp_path / "e.npz")
        assert_one_line_error(code, err, needle)


def test_onnxruntime_runs_hold_a_bounded_input(tmp_path, small_onnx, monkeypatch):
    """Images per run follow from RUN_INPUT_BYTES and the model's image size, whatever the
    batch size: a file claiming a huge image size gets small runs (one image at least)."""
    from ressl.export import embedder as embedder_module

    paths = _photos(tmp_path / "photos") * 2  # 8 files
    whole = Embedder(small_onnx, device="cpu", batch_size=64)
    expected = whole.embed(paths)
    monkeypatch.setattr(embedder_module, "RUN_INPUT_BYTES", 3 * 3 * 16 * 16 * 4)  # 3 images
    emb = Embedder(small_onnx, device="cpu", batch_size=64)
    assert emb.images_per_run == 3 and whole.images_per_run == 64
    sizes: list[int] = []

    class Recorder:
        def run(self, names, feeds):
            sizes.append(len(feeds["images"]))
            return whole.session.run(names, feeds)

    emb.session = Recorder()  # type: ignore[assignment]
    np.testing.assert_allclose(emb.embed(paths), expected, atol=1e-6)
    np.testing.assert_allclose(emb.embed_files(paths).embeddings, expected, atol=1e-6)
    pixels = np.zeros((8, 16, 16, 3), np.uint8)
    np.testing.assert_allclose(emb.embed(pixels), whole.embed(pixels), atol=1e-6)
    assert sizes and max(sizes) == 3 and sum(sizes) == 24
    monkeypatch.setattr(embedder_module, "RUN_INPUT_BYTES", 1)
    assert Embedder(small_onnx, device="cpu").images_per_run == 1  # never zero


def test_an_onnxruntime_allocation_failure_is_one_clean_error(small_onnx):
    emb = Embedder(small_onnx, device="cpu")

    class Failing:
        def __init__(self, message):
            self.message = message

        def run(self, names, feeds):
            raise RuntimeError(self.message)

    emb.session = Failing(  # type: ignore[assignment]
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node.\n"
        "Status Message: bfc_arena.cc:360 Failed to allocate memory for requested buffer of "
        "size 68719476736"
    )
    with pytest.raises(ValueError) as e:
        emb.run(np.zeros((2, 3, 16, 16), np.float32))
    assert len(str(e.value).splitlines()) == 1
    assert "ran out of memory running 2 3x16x16 image(s)" in str(e.value)
    assert "buffer of size 68719476736" in str(e.value)
    emb.session = Failing("something else broke")  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="something else broke"):  # a bug keeps its traceback
        emb.run(np.zeros((2, 3, 16, 16), np.float32))


def test_an_exported_files_image_size_is_ressls_rule(tmp_path, small_onnx):
    """A ressl file's metadata takes ``rules.IMAGE_SIZE`` (8 to 4096), as the checkpoints do."""
    path = _variant(small_onnx, tmp_path / "tiny.onnx", {"image_size": "4"})
    with pytest.raises(ValueError, match=r"image_size 4, .* must be an integer in \[8, 4096\]"):
        Embedder(path, device="cpu")
