"""Never lose a run: divergence stops it, the folder is held by one run, a stop at any point of
a save loses and repeats nothing, and SIGTERM saves like Ctrl-C."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli, tiny_args

import ressl.trainer
from ressl import DivergedError, train
from ressl.checkpoint import load_checkpoint


def _poison_step(monkeypatch, at_call, how):
    """Make the ``at_call``-th training step (1-based) return a NaN loss or leave an inf weight."""
    real, calls = ressl.trainer.training_step, [0]

    def step(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] >= at_call:
            if how == "loss":
                return loss * float("nan")
            with torch.no_grad():
                next(model.student.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(ressl.trainer, "training_step", step)


@pytest.mark.parametrize("how", ["loss", "weight"])
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(
    monkeypatch, tmp_path, tiny_settings, how
):
    run = tmp_path / "run"
    train(out=run, **dict(tiny_settings, epochs=1))
    before = (run / "last.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()
    steps = 36 // 8  # per epoch
    # the loss: at the resumed run's second step; a weight: after the last step of epoch 2
    _poison_step(monkeypatch, 2 if how == "loss" else steps, how)
    with pytest.raises(DivergedError) as e:
        train(resume=run, epochs=3)
    message = str(e.value)
    assert "training diverged" in message and "lr" in message and str(run) in message
    if how == "loss":
        assert f"the loss is nan at step {steps + 2} (epoch 2, batch 2)" in message
    else:
        assert f"student.backbone.features.0.weight is not finite after step {2 * steps}" in message
    assert (run / "last.safetensors").read_bytes() == before[0]  # untouched
    assert (run / "metrics.jsonl").read_text() == before[1]
    tensors, _ = load_checkpoint(run)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_a_diverging_run_exits_with_one_line_and_writes_no_nan(capsys, tmp_path, image_folder):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny_args(image_folder, run, lr=1e9, warmup_epochs=0))
    lines = [line for line in err.splitlines() if line.startswith("ressl: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "training diverged: " in lines[0] and "--lr (now 1e+09)" in lines[0]
    assert not (run / "last.safetensors").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_metrics_are_strict_json():
    from ressl.runs import write_metrics

    with pytest.raises(ValueError, match="not finite"):
        write_metrics("unused.jsonl", [{"loss": float("nan")}])
