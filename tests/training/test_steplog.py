"""The per-step stream (steps.jsonl), each step once across a resume, and TensorBoard logging."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ressl import ConfigError, train
from ressl.training.steplog import STEPS, TENSORBOARD, read_steps
from ressl.training.vitals import MEASURES


def _steps(run: Path) -> list[int]:
    return [row["step"] for row in read_steps(run / STEPS)]


def test_every_progress_window_is_a_row(tmp_path, tiny_settings):
    run = tmp_path / "run"
    train(**dict(tiny_settings, out=str(run), epochs=2, progress_every=2))
    rows = read_steps(run / STEPS)
    # 36 images, batch 8: 4 steps per epoch, windows of 2 steps
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0]
    logged = {"step", "epoch", "loss", "lr", "ema_momentum", "images_per_second"}
    assert set(rows[0]) == logged | set(MEASURES)  # and the window's health measures
    assert all(r["loss"] > 0 and 0 < r["std_ratio"] and r["uniformity"] < 0 for r in rows)


def test_a_resume_logs_each_step_once(tmp_path, tiny_settings):
    run = tmp_path / "run"
    train(**dict(tiny_settings, out=str(run), epochs=1))
    assert _steps(run) == [1, 2, 3, 4]
    with open(
        run / STEPS, "a"
    ) as f:  # rows a killed run wrote after its checkpoint, and a cut line
        f.write(json.dumps({"step": 5, "epoch": 1.25, "loss": 9.0}) + "\n" + '{"step": 6, "lo')
    train(resume=run, epochs=2)
    assert _steps(run) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert read_steps(run / STEPS)[4]["loss"] != 9.0
    with open(run / STEPS, "a") as f:  # only a cut line: the next row must not be glued to it
        f.write('{"step": 9, "lo')
    train(resume=run, epochs=3)
    assert _steps(run) == list(range(1, 13))
    assert (run / STEPS).read_text().count("\n") == 12


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_loss_lr_momentum_speed_and_knn(tmp_path, tiny_settings):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(**dict(tiny_settings, out=str(run), epochs=1, log="tensorboard"))
    train(resume=run, epochs=2, log="none")  # --log may change on resume (else it is kept)
    train(resume=run, epochs=3, log="tensorboard")
    scalars = _scalars(run / TENSORBOARD)
    for tag in ("train/loss", "train/lr", "train/ema_momentum", "train/images_per_second"):
        assert tag in scalars, sorted(scalars)
    for name in MEASURES:
        assert [s for s, _ in scalars[f"health/{name}"]] == [1, 2, 3, 4, 9, 10, 11, 12]
    assert scalars["health/std_ratio"][-1][1] == pytest.approx(
        read_steps(run / STEPS)[-1]["std_ratio"]
    )
    assert [s for s, _ in scalars["epoch/rankme"]] == [4, 12]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 9, 10, 11, 12]
    steps = read_steps(run / STEPS)
    assert scalars["train/lr"][-1][1] == pytest.approx(steps[-1]["lr"])
    assert [s for s, _ in scalars["epoch/knn_top1"]] == [4, 12]  # knn_every 1: epochs 1 and 3


def test_tensorboard_without_the_package_says_how_to_install(tmp_path, tiny_settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(
        ConfigError,
        match=r"log tensorboard needs the tensorboard package: pip install 'ressl\[tensorboard\]'",
    ):
        train(**dict(tiny_settings, out=str(tmp_path / "run"), log="tensorboard"))
    assert not (tmp_path / "run" / STEPS).exists()
