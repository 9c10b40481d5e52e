"""Checkpoints written by earlier releases keep loading: info, load_encoder, export, eval, resume.

``tests/fixtures/v1-run`` is a run folder written by ressl 0.1.0 (checkpoint format 1):
a small CNN on the first 96 Fashion-MNIST images, interrupted in epoch 2 after batch 1
of 3. ``v1-final.safetensors`` is the same run trained straight to its end by that
release; resuming the folder with today's code must arrive there. ``v2-run`` and
``v2-final.safetensors`` are the same run written by the code just before 0.2 (with
the metrics row and the fault checks, before the backbone record and the settings
whose legacy values old runs keep: teacher BatchNorm, warm-up start, blur). ``v3-run``
(with its ``steps.jsonl``) and ``v3-final.safetensors`` are the same run written by ressl
0.3.0, before the health measures (no ``epoch_health`` metadata, no ``collapse`` setting).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from ressl import load_checkpoint, load_encoder, read_metadata, train

FIXTURES = Path(__file__).parents[1] / "fixtures"
VERSIONS = ["v1", "v2", "v3"]
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed"
)


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run_copy(tmp_path: Path, version: str) -> Path:
    """A copy of the fixture run folder (resume and eval write into the folder)."""
    return Path(shutil.copytree(FIXTURES / f"{version}-run", tmp_path / "run"))


def test_v1_metadata_and_encoder_load(version: str):
    run = FIXTURES / f"{version}-run"
    meta = read_metadata(run)
    assert (meta["format"], meta["format_version"]) == ("ressl-checkpoint", "1")
    assert (meta["epoch"], meta["batch_in_epoch"], meta["step"]) == ("1", "1", "4")
    settings = json.loads(meta["settings"])
    assert (
        settings["backbone"] == "small"
        and settings["channels"] == 1
        and settings["image_size"] == 28
    )
    encoder, loaded = load_encoder(run, weights="teacher")
    with torch.no_grad():
        z = encoder(torch.zeros(2, 1, 28, 28))
    assert z.shape == (2, 8) and loaded == settings
    assert torch.allclose(z.norm(dim=1), torch.ones(2))


def test_v1_info(capsys, version: str):
    run, final = FIXTURES / f"{version}-run", FIXTURES / f"{version}-final.safetensors"
    code, out, err = run_cli(capsys, "info", run)
    assert code == 0, err
    assert "epoch 2 of 2, 33% done (1.33 epochs), step 4" in out and '"fashion-mnist"' in out
    code, out, err = run_cli(capsys, "info", final, "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["queue_size"] == 64


def test_v1_exports_verified(capsys, tmp_path: Path, version: str):
    code, out, err = run_cli(
        capsys,
        "export",
        FIXTURES / f"{version}-run",
        "-o",
        tmp_path / "encoder.onnx",
        "--weights",
        "teacher",
    )
    assert code == 0, err
    assert "verified:" in out and (tmp_path / "encoder.onnx").stat().st_size > 0


@pytest.mark.slow
@needs_fmnist
def test_v1_evaluates(capsys, run_copy: Path):
    code, out, err = run_cli(capsys, "eval", "knn", run_copy, "--device", "cpu", "--json")
    assert code == 0, err
    row = json.loads(out)
    # where the run is: 1 of 3 batches into its second epoch (ressl.runs.position)
    assert (
        row["dataset"] == "fashion-mnist" and row["epoch"] == 1.33 and row["test_images"] == 10000
    )
    assert 10.0 < row["top1"] <= 100.0  # better than chance even this early


@needs_fmnist
def test_v1_resumes_to_where_the_old_release_ended(run_copy: Path, version: str):
    path = train(resume=run_copy)
    new, meta = load_checkpoint(path)
    old, old_meta = load_checkpoint(FIXTURES / f"{version}-final.safetensors")
    assert (meta["epoch"], meta["batch_in_epoch"], meta["step"]) == ("2", "0", "6")
    assert {k for k in new if not k.startswith("rng.")} == {
        k for k in old if not k.startswith("rng.")
    }
    for key, value in old.items():
        if not key.startswith("rng."):  # fp32 CPU run: equal up to kernel rounding on other CPUs
            torch.testing.assert_close(new[key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    old_row = json.loads(old_meta["metrics"])
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["loss"] == pytest.approx(old_row["loss"], rel=1e-4)
