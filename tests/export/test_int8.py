"""``ressl export --int8``: a tiny run -> int8 export -> info / embed / eval, its calibration
sample, and its refusals (one line each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli, tiny_args
from ressl.export import Embedder, int8_check, quantization, read_model_info

from ressl.data.loading import load_dataset


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """One epoch of the tiny CLI run (see tests/cli/test_cli.py)."""
    from ressl.cli.app import main as cli_main

    run = tmp_path_factory.mktemp("run") / "run"
    with pytest.raises(SystemExit) as exc:
        cli_main(tiny_args(image_folder, run, epochs=1))
    assert exc.value.code == 0
    return run


@pytest.fixture(scope="module")
def models(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run exported as fp32 and as int8 (module-wide: each export takes seconds)."""
    from ressl.export.exporter import export_onnx

    folder = tmp_path_factory.mktemp("models")
    paths = {"fp32": folder / "fp32.onnx", "int8": folder / "int8.onnx"}
    export_onnx(trained_run, paths["fp32"])
    export_onnx(trained_run, paths["int8"], int8=True, calibration_images=16)
    return paths


def test_export_int8_cli_says_calibration_and_check(capsys, tmp_path, trained_run):
    model = tmp_path / "int8.onnx"
    code, out, err = run_cli(capsys, "export", trained_run, "-o", model, "--int8")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("calibrated: QOperator per-channel int8 weights")
    assert "36 folder:" in lines[0] and "(seed 0)" in lines[0]  # 36 < 256: the whole train split
    assert lines[1].startswith(f"wrote {model}") and lines[1].endswith("-> 32-d embedding, int8")
    assert lines[2].startswith("verified: int8 vs fp32 on 12 ") and "kNN top-1" in lines[2]
    assert "passed" in lines[2]


def test_int8_metadata_is_its_own(models):
    info = read_model_info(models["int8"])
    assert info.precision == "int8" and info.describe().endswith(", int8")
    calibration = json.loads(info.metadata["calibration"])
    assert calibration == {
        "images": 16,
        "seed": 0,
        "dataset": calibration["dataset"],
        "method": "minmax",
        "format": "QOperator",
        "per_channel": True,
        "weights": "int8",
        "activations": "uint8",
    }
    assert calibration["dataset"].startswith("folder:")
    check = json.loads(info.metadata["verification"])
    assert check["against"] == "fp32 export" and check["images"] == 12 and check["bank"] == 36
    assert (
        check["min_cosine"] >= int8_check.MIN_COSINE and check["mean_cosine"] >= check["min_cosine"]
    )
    assert abs(check["knn_int8"] - check["knn_fp32"]) <= int8_check.MAX_KNN_CHANGE
    # the fp32 graph's check (max |diff| against PyTorch) is not carried over
    assert "shapes" not in check
    assert read_model_info(models["fp32"]).precision == "fp32"


def test_info_embed_eval_work_on_int8(capsys, tmp_path, models, image_folder):
    code, out, err = run_cli(capsys, "info", models["int8"])
    assert code == 0, err
    assert "-> 32-d embedding, int8" in out
    assert "calibrated     QOperator per-channel int8; minmax ranges from 16 " in out
    assert "verified       int8 vs fp32 on 12 " in out and "max |diff|" not in out

    out_file = tmp_path / "emb.npz"
    code, out, err = run_cli(capsys, "embed", models["int8"], image_folder / "test", "-o", out_file)
    assert code == 0, err
    emb = np.load(out_file)["embeddings"]
    fp32 = Embedder(models["fp32"], device="cpu")(list(np.load(out_file)["paths"]))
    cos = (emb * fp32).sum(1)
    assert emb.shape == (12, 32) and cos.min() >= int8_check.MIN_COSINE
    assert json.loads(str(np.load(out_file)["model"]))["precision"] == "int8"

    code, out, err = run_cli(capsys, "eval", "knn", models["int8"], "--k", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["test_images"] == 12


def test_beyond_tolerance_is_refused_in_one_line(capsys, tmp_path, trained_run, monkeypatch):
    monkeypatch.setattr(int8_check, "MIN_COSINE", 1.5)  # no graph reaches it
    model = tmp_path / "int8.onnx"
    code, _, err = run_cli(capsys, "export", trained_run, "-o", model, "--int8")
    assert_one_line_error(
        code, err, "int8 verification failed, nothing written: int8 vs fp32 on 12"
    )
    assert "min cosine >= 1.5" in err and "FAILED" in err
    assert not model.exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--int8", "--fp16"], "int8 and fp16 are two precisions"),
        (
            ["--int8", "--calibration-images", "8"],
            "--calibration-images must be an integer in [16, 4096]",
        ),
    ],
)
def test_bad_int8_flags_are_one_line(capsys, tmp_path, trained_run, flags, needle):
    code, _, err = run_cli(capsys, "export", trained_run, "-o", tmp_path / "m.onnx", *flags)
    assert_one_line_error(code, err, needle)


def test_int8_weights_file_is_refused(capsys, tmp_path, trained_run):
    code, _, err = run_cli(
        capsys, "export", trained_run, "-o", tmp_path / "b.safetensors", "--int8"
    )
    assert_one_line_error(code, err, "--int8 is for ONNX files")


def test_module_int8_is_refused():
    from ressl.export.exporter import export_onnx

    from ressl import SmallCNN

    with pytest.raises(ValueError, match="int8 export calibrates on the run's training images"):
        export_onnx(
            SmallCNN(width=4),
            "m.onnx",
            int8=True,
            image_size=16,
            channels=3,
            mean=(0.5,) * 3,
            std=(0.2,) * 3,
        )


def test_calibration_sample_is_seeded_and_bounded(image_folder):
    data = load_dataset(f"folder:{image_folder}", image_size=16)
    a = quantization.calibration_images(data, 16)
    assert a.shape == (16, 3, 16, 16) and a.dtype == np.float32 and 0 <= a.min() <= a.max() <= 1
    np.testing.assert_array_equal(a, quantization.calibration_images(data, 16))
    assert not np.array_equal(a, quantization.calibration_images(data, 16, seed=1))
    assert len(quantization.calibration_images(data, 4096)) == len(data.train) == 36
    # the model's input exactly: the loader's pixels / 255
    first = quantization.sample_indices(36, 16, 0)[0]
    np.testing.assert_array_equal(a[0], data.train.images[first].numpy() / np.float32(255))


def test_cli_default_is_the_library_default():
    import inspect

    from ressl.cli.export_cmd import export_cmd

    default = inspect.signature(export_cmd).parameters["calibration_images"].default
    assert default == quantization.CALIBRATION_IMAGES


def test_serve_says_int8(models):
    pytest.importorskip("uvicorn")  # the serve extra
    import asyncio

    from ressl.export.serve_settings import ServeSettings
    from ressl.export.server import EmbeddingService, describe

    settings = ServeSettings(str(models["int8"]), device="cpu")
    service = EmbeddingService(settings)
    assert "-> 32-d embedding, int8)" in describe(settings, service, "http://127.0.0.1:0")
    response = asyncio.run(service.metadata(None))  # type: ignore[arg-type]  # the request is unused
    assert json.loads(response.body)["precision"] == "int8"
