"""``ressl eval health`` on seconds-long runs of a labelled folder and of a flat, unlabelled
one; kNN and the probes refusing unlabelled data in one line; the unlabelled run exported,
evaluated and embedded end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import TINY, assert_one_line_error, run_cli

import ressl
from ressl.training.loop import train


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory, image_folder: Path) -> Path:
    """The train images of ``image_folder`` in one folder, without class sub-folders."""
    flat = tmp_path_factory.mktemp("flat") / "images"
    flat.mkdir()
    for i, f in enumerate(sorted((image_folder / "train").rglob("*.png"))):
        shutil.copy(f, flat / f"{i}.png")
    return flat


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, image_folder: Path) -> Path:
    run = tmp_path_factory.mktemp("labelled") / "run"
    train(dataset=f"folder:{image_folder}", out=str(run), **TINY)
    return run


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory, flat_folder: Path) -> Path:
    run = tmp_path_factory.mktemp("unlabelled") / "run"
    train(dataset=f"folder:{flat_folder}", out=str(run), **TINY)
    return run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_health_on_a_labelled_run_measures_its_test_split(capsys, labelled_run: Path):
    code, out, err = run_cli(capsys, "eval", "health", labelled_run, "--device", "cpu")
    assert code == 0, err
    heading, result = out.strip().splitlines()
    assert heading.startswith("health on folder:") and "12 test images (seed 0)" in heading
    assert "student backbone features (32-d)" in heading
    row = records(labelled_run)[-1]
    assert row["protocol"] == "health" and row["split"] == "test" and row["images"] == 12
    assert row["checkpoint"] == "last.safetensors" and row["weights"] == "student"
    assert row["dim"] == 32 and row["rank_cap"] == 12 and 1.0 <= row["rankme"] <= 12.0
    assert row["std_ratio"] == pytest.approx(row["std"] / row["healthy_std"], rel=1e-4)
    assert -4.0 <= row["uniformity"] <= 0.0 and 0.0 <= row["alignment"] <= 4.0
    assert result.startswith(f"RankMe {row['rankme']:.1f} of 12  std {row['std_ratio']:.2f}x")
    assert result.endswith("(recorded in " + str(labelled_run / "eval.jsonl") + ")")


def test_health_on_an_unlabelled_run_measures_its_folder(capsys, flat_run: Path):
    code, out, err = run_cli(capsys, "eval", "health", flat_run, "--device", "cpu", "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert printed == records(flat_run)[-1]  # recorded as printed
    assert printed["split"] == "train" and printed["images"] == 36 and printed["seed"] == 0
    assert "label" not in err.lower()  # nothing about labels when none are needed
    again = ressl.evaluate(flat_run, "health", device="cpu")  # the same images and views
    assert again["rankme"] == pytest.approx(printed["rankme"], rel=1e-4)
    monitor = json.loads((flat_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert monitor["rankme"] == pytest.approx(printed["rankme"], abs=1e-4)  # its last point
    assert again["alignment"] == pytest.approx(printed["alignment"], rel=1e-4, abs=1e-6)


def test_without_labels_the_default_evaluation_is_health(flat_run: Path, labelled_run: Path):
    assert ressl.evaluate(flat_run, device="cpu")["protocol"] == "health"
    assert ressl.evaluate(labelled_run, device="cpu")["protocol"] == "knn"  # as before


def test_knn_and_the_probes_refuse_unlabelled_data_in_one_line(capsys, flat_run: Path):
    for args in (["knn"], ["linear"], ["linear", "--protocol", "paper"]):
        code, _, err = run_cli(capsys, "eval", *args, flat_run, "--device", "cpu")
        assert_one_line_error(code, err, "has no labels (class sub-folders)")
        assert "`ressl eval health`" in err.strip().splitlines()[-1]
        assert "extracting" not in err  # refused before any feature is computed


def test_health_user_errors_are_one_line(capsys, flat_run: Path):
    for value in ("31", "8193"):
        code, _, err = run_cli(capsys, "eval", "health", flat_run, "--images", value)
        assert_one_line_error(code, err, f"--images must be an integer in [32, 8192], got {value}")
    code, out, _ = run_cli(capsys, "eval", "health", "--help")
    assert code == 0 and "--images" in out and "--seed" in out


def test_an_unlabelled_run_exports_evaluates_and_embeds(capsys, tmp_path, flat_run, flat_folder):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tmp_path / "model.onnx"
    code, _, err = run_cli(capsys, "export", flat_run, "--out", model)
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "health", model, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["protocol"] == "health" and row["model"] == "model.onnx" and row["images"] == 36
    assert not (tmp_path / "eval.jsonl").exists()  # an ONNX model's result: only with --record
    code, out, err = run_cli(capsys, "embed", model, flat_folder, "--out", tmp_path / "e.npz")
    assert code == 0, err
    with np.load(tmp_path / "e.npz") as saved:
        assert saved["embeddings"].shape == (36, 32)
