"""``ressl export`` / ``embed`` / ``info MODEL.onnx``: a tiny train -> export -> embed round trip, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli, tiny_args
from ressl.export import Embedder, export_onnx, load_embeddings

from ressl import SmallCNN


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """One epoch of the tiny CLI run (see tests/cli/test_cli.py)."""
    from ressl.cli.app import main as cli_main

    run = tmp_path_factory.mktemp("run") / "run"
    args = tiny_args(image_folder, run, epochs=1)
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 0
    return run


def test_train_export_info_embed_round_trip(capsys, tmp_path, trained_run, image_folder):
    model = tmp_path / "models" / "encoder.onnx"
    code, out, err = run_cli(capsys, "export", trained_run, "-o", model, "--weights", "teacher")
    assert code == 0, err
    assert (
        out.splitlines()[0].startswith(f"wrote {model}")
        and "small teacher backbone features" in out
    )
    assert "verified: onnx.checker ok" in out and "passed" in out

    code, out, err = run_cli(capsys, "info", model)
    assert code == 0, err
    assert "3x16x16 -> 32-d embedding" in out and "sha256" in out and "epoch 1" in out
    code, out, _ = run_cli(capsys, "info", model, "--json")
    info = json.loads(out)
    assert info["metadata"]["weights"] == "teacher" and info["settings"]["image_size"] == 16
    assert info["inputs"][0]["shape"] == ["batch", 3, "height", "width"]

    photos = tmp_path / "photos"
    shutil.copytree(image_folder / "test", photos)
    (photos / "class_1" / "broken.png").write_bytes(b"not a png")
    expected = sorted(p for p in photos.rglob("*.png") if p.name != "broken.png")
    one_more = image_folder / "train" / "class_0" / "0.png"
    out_file = tmp_path / "emb.npz"
    code, out, err = run_cli(
        capsys, "embed", model, photos, one_more, "-o", out_file, "--batch-size", "4"
    )
    assert code == 0, err
    assert (
        f"wrote {out_file}: {len(expected) + 1} embeddings of dim 32" in out
        and "1 unreadable skipped" in out
    )
    assert "broken.png" in err and "Traceback" not in err

    emb, paths, extra = load_embeddings(out_file)
    assert paths == [str(p) for p in expected] + [str(one_more)]
    assert extra["skipped"] == [str(photos / "class_1" / "broken.png")]
    assert extra["model"]["weights"] == "teacher"
    np.testing.assert_allclose(emb, Embedder(model, device="cpu").embed(paths), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # an existing output is never replaced unless asked
    for args in (["export", trained_run, "-o", model], ["embed", model, photos, "-o", out_file]):
        before = Path(args[-1]).read_bytes()
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, f"-o {args[-1]} exists; pass --overwrite to replace it")
        assert Path(args[-1]).read_bytes() == before
        code, _, err = run_cli(capsys, *args, "--overwrite")
        assert code == 0, err


def test_export_head_fp16_no_verify(capsys, tmp_path, trained_run):
    code, out, err = run_cli(
        capsys,
        "export",
        trained_run / "last.safetensors",
        "-o",
        tmp_path / "h.onnx",
        "--head",
        "--fp16",
    )
    assert code == 0, err
    assert "projection head" in out and "fp16" in out and "min cosine >= 0.999: passed" in out
    code, out, err = run_cli(
        capsys, "export", trained_run, "-o", tmp_path / "n.onnx", "--no-verify"
    )
    assert code == 0 and "not verified" in out


def test_bad_input_is_one_line_and_leaves_nothing(capsys, tmp_path, trained_run, image_folder):
    good = tmp_path / "good.onnx"
    export_onnx(trained_run, good)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "notes.onnx").write_text("hello")
    (tmp_path / "cut.onnx").write_bytes(good.read_bytes()[:4000])
    (tmp_path / "empty").mkdir()
    four = tmp_path / "four.onnx"  # a model whose input (4 channels) no image file can match
    export_onnx(
        SmallCNN(4, width=4), four, image_size=16, channels=4, mean=[0.5] * 4, std=[0.25] * 4
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.npz"
    cases = [
        (
            ["embed", tmp_path / "notes.onnx", image_folder, "-o", out],
            "notes.onnx is not a valid ONNX model",
        ),
        (
            ["embed", tmp_path / "cut.onnx", image_folder, "-o", out],
            "cut.onnx is not a valid ONNX model",
        ),
        (["embed", four, image_folder, "-o", out], "4-channel input"),
        (["embed", good, tmp_path / "empty", "-o", out], "no image file in this folder"),
        (["embed", good, tmp_path / "missing", "-o", out], "missing: no such file or folder"),
        (["embed", good, tmp_path / "notes.txt", "-o", out], "none of the 1 files could be read"),
        (
            ["embed", good, image_folder, "-o", tmp_path / "notes.txt" / "out.npz"],
            "is not a folder",
        ),
        (["embed", good, image_folder, "-o", tmp_path / "out.npy"], "-o must name a .npz file"),
        (
            ["embed", good, image_folder, "-o", out, "--batch-size", "0"],
            "--batch-size must be >= 1",
        ),
        (["embed", tmp_path / "absent.onnx", image_folder, "-o", out], "no such file"),
        (["info", tmp_path / "cut.onnx"], "cut.onnx is not a valid ONNX file"),
        (["info", tmp_path / "notes.onnx"], "notes.onnx is not a valid ONNX file"),
        (
            ["export", tmp_path / "notes.txt", "-o", tmp_path / "x.onnx"],
            "not a readable safetensors file",
        ),
        (["export", tmp_path / "nowhere", "-o", tmp_path / "x.onnx"], "no such file or folder"),
        (["export", trained_run, "-o", tmp_path / "notes.txt" / "x.onnx"], "is not a folder"),
        (["export", trained_run, "-o", tmp_path / "empty"], "is a folder"),
        (["export", trained_run, "-o", tmp_path / "x.onnx", "--weights", "ema"], "--weights"),
        (["export", trained_run], "-o"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(
            code, err if "none of" not in needle else err.splitlines()[-1], needle
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp files
    assert not list((tmp_path / "empty").iterdir())


def test_embed_accepts_device_and_threads(capsys, tmp_path, trained_run, image_folder):
    model = tmp_path / "m.onnx"
    export_onnx(trained_run, model)
    code, out, err = run_cli(
        capsys,
        "embed",
        model,
        image_folder / "test",
        "-o",
        tmp_path / "e.npz",
        "--device",
        "cpu",
        "--threads",
        "1",
    )
    assert code == 0, err
    assert "(CPU)" in out
    emb, paths, _ = load_embeddings(tmp_path / "e.npz")
    assert emb.shape == (len(paths), 32) and emb.dtype == np.float32
    assert np.isfinite(emb).all()


def test_embed_refuses_an_empty_path_and_skips_pipes(capsys, tmp_path, trained_run, image_folder):
    """'' is not the working directory; a named pipe with an image name is skipped, not read."""
    import os

    model = tmp_path / "m.onnx"
    export_onnx(trained_run, model, verify=False)
    code, _, err = run_cli(capsys, "embed", model, "", "-o", tmp_path / "e.npz")
    assert_one_line_error(code, err, "an empty path was given")
    assert not (tmp_path / "e.npz").exists()
    if not hasattr(os, "mkfifo"):
        return
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    one = next((image_folder / "test").rglob("*.png"))
    code, out, err = run_cli(capsys, "embed", model, pipe, one, "-o", tmp_path / "e.npz")
    assert code == 0, err
    assert "pipe.png: not a regular file (a pipe, socket or device)" in err
    _, paths, extra = load_embeddings(tmp_path / "e.npz")
    assert paths == [str(one)] and extra["skipped"] == [str(pipe)]
