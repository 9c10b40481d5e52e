"""Training-time health: each window's measures reach steps.jsonl, metrics.jsonl and the
progress line; the collapse alarm stops (or warns about) runs that collapse, and never fires
on the default recipes."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, run_cli, tiny_args

from ressl import CollapseError, train
from ressl.runs.checkpoint import load_checkpoint
from ressl.training.steplog import STEPS, read_steps
from ressl.training.vitals import (
    COLLAPSE_ENTROPY_RATIO,
    COLLAPSE_STD_RATIO,
    MEASURES,
    StepHealth,
    collapse,
)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
HEALTHY = dict(std_ratio=0.4, uniformity=-0.6, teacher_entropy_ratio=0.9)


def test_collapse_to_a_point_needs_both_std_and_uniformity():
    assert collapse(HEALTHY) is None
    assert collapse({}) is None  # no measures (a window without steps): no alarm
    point = dict(HEALTHY, std_ratio=0.01, uniformity=-0.001)
    assert "every image maps to nearly one point" in collapse(point)
    assert collapse(dict(point, uniformity=-0.5)) is None  # spread out: dimensional, not a point
    assert collapse(dict(point, std_ratio=COLLAPSE_STD_RATIO)) is None
    assert collapse(dict(HEALTHY, std_ratio=math.nan, uniformity=math.nan)) is None


def test_a_flat_target_is_collapse():
    flat = dict(HEALTHY, teacher_entropy_ratio=0.9995)
    assert "the target is flat" in collapse(flat)
    assert collapse(dict(HEALTHY, teacher_entropy_ratio=COLLAPSE_ENTROPY_RATIO)) is None
    assert collapse(dict(HEALTHY, teacher_entropy_ratio=0.993)) is None  # tau_t = tau_s = 0.1


def test_step_health_means_the_steps_of_a_window_and_forgets_a_retaken_step():
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    meter = StepHealth(teacher_temperature=0.04)
    assert meter.take() is None
    batches = [F.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(3)]
    meter.observe(batches[0], batches[0], queue)
    meter.observe(batches[1], batches[2], queue)
    meter.observe(batches[2], batches[1], queue)
    meter.forget(2)  # the third step failed and is taken again
    values = dict(zip(MEASURES, meter.take().tolist()))
    assert meter.take() is None  # taken: the next window starts empty
    assert values["alignment"] == pytest.approx(
        (0 + float((batches[1] - batches[2]).norm(dim=1).square().mean())) / 2, abs=1e-6
    )
    assert 0 < values["std_ratio"] < 1.5 and values["uniformity"] < 0
    assert 0 < values["teacher_entropy_ratio"] < 1 and 0 <= values["agreement"] <= 1
    assert abs(values["queue_similarity"]) < 0.2  # random directions


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_its_health_in_every_window_and_epoch(tmp_path, tiny_settings):
    run = tmp_path / "run"
    train(**dict(tiny_settings, out=str(run), epochs=2, progress_every=2))
    windows, epochs = read_steps(run / STEPS), _rows(run)
    assert all(set(MEASURES) <= set(w) for w in windows)
    for row, pair in zip(epochs, (windows[:2], windows[2:])):
        for name in MEASURES:  # the epoch's mean of its windows (each of 2 steps)
            assert row[name] == pytest.approx(sum(w[name] for w in pair) / 2, abs=2e-6), name
        assert 1 <= row["rankme"] <= 8  # the monitor's RankMe of the backbone features
    _, meta = load_checkpoint(run)
    assert json.loads(meta["epoch_health"]) == {"steps": 0, "sum": {}}  # the epoch ended


def test_a_resume_mid_epoch_keeps_the_epochs_health_mean(tmp_path, tiny_settings):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(**dict(tiny_settings, out=str(whole), epochs=2))

    def interrupt_at_step_6(event):
        if event.kind == "step" and event.step == 6:  # epoch 2, batch 2 of 4
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(**dict(tiny_settings, out=str(cut), epochs=2), callback=interrupt_at_step_6)
    _, meta = load_checkpoint(cut)
    assert json.loads(meta["epoch_health"])["steps"] == 2  # 2 of the epoch's 4 steps
    train(resume=cut)
    drop = {"images_per_second", "epoch_seconds"}
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _rows(whole)]
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(cut)] == strip
    assert set(MEASURES) <= set(strip[-1])


@pytest.mark.parametrize(
    "settings, measure",
    [
        (dict(student_temperature=1.0, teacher_temperature=1.0), "the target is flat"),
        (dict(student_temperature=0.5, teacher_temperature=0.5), "the target is flat"),
        (dict(lr=50.0), "every image maps to nearly one point"),
    ],
)
def test_settings_that_collapse_are_stopped_within_two_epochs(
    tmp_path, tiny_settings, settings, measure
):
    run = tmp_path / "run"
    with pytest.raises(CollapseError, match=measure) as caught:
        train(**dict(tiny_settings, out=str(run), epochs=6, **settings))
    message = str(caught.value)
    step = int(message.split("at step ")[1].split(" ")[0])
    assert step == 5  # 4 steps an epoch: the first step after the one warm-up epoch
    assert f"{run / 'last.safetensors'} keeps the last state before it" in message
    assert "Try a lower lr" in message and "collapse warn to train on" in message
    _, meta = load_checkpoint(run)
    assert int(meta["step"]) < step  # nothing of the collapse was saved


def test_warn_trains_on_and_off_is_silent(tmp_path, tiny_settings, caplog):
    flat = dict(student_temperature=1.0, teacher_temperature=1.0, epochs=3)
    with caplog.at_level("WARNING", logger="ressl"):
        train(**dict(tiny_settings, out=str(tmp_path / "warn"), collapse="warn", **flat))
    warnings = [r.message for r in caplog.records if "collapsed" in r.message]
    assert len(warnings) == 2  # once an epoch, from the epoch it began in
    assert "(--collapse warn)" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ressl"):
        train(**dict(tiny_settings, out=str(tmp_path / "off"), collapse="off", **flat))
    assert not [r for r in caplog.records if "collapsed" in r.message]


def test_the_cli_says_a_collapse_in_one_line_naming_the_flags(capsys, tmp_path, image_folder):
    run = tmp_path / "run"
    args = tiny_args(image_folder, run, student_temperature=1.0, teacher_temperature=1.0)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "training collapsed at step")
    assert "--teacher-temperature" in err and "--collapse warn" in err
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--collapse", "warn")
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize("recipe", ["fashion-mnist", "cifar10"])
def test_the_default_recipes_never_set_off_the_alarm(tmp_path, recipe):
    """Each recipe's method settings (lr, queue, EMA, temperatures) with the README's small
    CNN on 4096 Fashion-MNIST images, three epochs (48 steps: the queue of 4096 is the
    teacher's from step 16, the alarm judges from step 17)."""
    from ressl import TrainConfig

    r = TrainConfig(dataset=recipe)
    method = dict(lr=r.lr, queue_size=r.queue_size, ema_momentum=r.ema_momentum)
    run = tmp_path / "r"
    kw = dict(dataset="fashion-mnist", backbone="small", subset=4096, epochs=3, knn_every=-1)
    train(**kw, out=str(run), **method)
    rows = read_steps(run / STEPS)
    assert len(rows) == 6 and all(collapse(row) is None for row in rows[2:])
