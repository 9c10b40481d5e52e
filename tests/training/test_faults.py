"""Never lose a run: divergence stops it, the folder is held by one run, a stop at any point of
a save loses and repeats nothing, and SIGTERM saves like Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_injection
import pytest
import torch
from cli_helpers import TINY, assert_one_line_error, run_cli, tiny_args

import ressl.training.resume
import ressl.training.stepper
from ressl import DivergedError, train
from ressl.errors import RunInUseError
from ressl.runs.checkpoint import load_checkpoint
from ressl.runs.lock import hold_run_folder
from ressl.training.stopping import Stopped


def _poison_step(monkeypatch, at_call, how):
    """Make the ``at_call``-th training step (1-based) return a NaN loss or leave an inf weight."""
    real, calls = ressl.training.stepper.training_step, [0]

    def step(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] >= at_call:
            if how == "loss":
                return loss * float("nan")
            with torch.no_grad():
                next(model.student.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(ressl.training.stepper, "training_step", step)


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
    from ressl.runs.folder import write_metrics

    with pytest.raises(ValueError, match="not finite"):
        write_metrics("unused.jsonl", [{"loss": float("nan")}])


def test_sigterm_saves_like_ctrl_c_and_resumes_exactly(tmp_path, tiny_settings):
    straight = train(out=tmp_path / "a", **tiny_settings)

    def terminate_at_step_6(event):
        if event.kind == "step" and event.step == 6:  # epoch 2, batch 2 of 4
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Stopped) as e:
        train(out=tmp_path / "b", callback=terminate_at_step_6, **tiny_settings)
    assert e.value.signum == signal.SIGTERM and e.value.checkpoint.endswith("last.safetensors")
    _, meta = load_checkpoint(tmp_path / "b")
    assert (meta["epoch"], meta["batch_in_epoch"]) == ("1", "2")
    resumed = train(resume=tmp_path / "b")
    a, b = load_checkpoint(straight)[0], load_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))


@pytest.mark.slow
def test_sigterm_to_the_cli_saves_and_exits_143(tmp_path, image_folder):
    run = tmp_path / "run"
    args = tiny_args(image_folder, run, epochs=500, knn_every=-1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ressl", *args], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run / "last.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: stopping after this step" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("ressl: error: interrupted by SIGTERM; saved ")
    _, meta = load_checkpoint(run)
    assert 0 < int(meta["step"]) < 500 * 4
    assert not list(run.glob(".*.tmp"))


def test_a_second_run_on_a_held_folder_fails_at_once(capsys, tmp_path, image_folder):
    run = tmp_path / "run"
    with hold_run_folder(run):
        code, _, err = run_cli(capsys, *tiny_args(image_folder, run))
    assert_one_line_error(code, err, f"{run} is in use by another ressl run (pid {os.getpid()} on")
    assert "choose another --out" in err
    assert not run.exists()  # the failed start left nothing behind


def test_the_lock_dies_with_its_process(tmp_path, tiny_settings):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ressl.runs.lock import hold_run_folder\n"
            f"with hold_run_folder({str(run)!r}):\n print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUseError, match=f"pid {holder.pid} on"):
        train(out=run, **dict(tiny_settings, epochs=1))
    holder.kill()  # SIGKILL: no clean-up ran, the kernel released the lock
    holder.wait()
    assert train(out=run, **dict(tiny_settings, epochs=1)).exists()


def test_stale_temp_files_of_killed_saves_are_removed_on_the_next_start(tmp_path, tiny_settings):
    run = tmp_path / "run"
    train(out=run, **dict(tiny_settings, epochs=1))
    stale = [run / ".last.safetensors.k1ll3d.tmp", run / ".metrics.jsonl.x0x0.tmp"]
    mine = run / ".notes.tmp"
    for path in [*stale, mine]:
        path.write_bytes(b"partial")
    train(resume=run, epochs=2)
    assert not any(path.exists() for path in stale) and mine.exists()


def test_sigterm_while_writing_an_output_leaves_no_temporary_file(capsys, tmp_path):
    from ressl.cli import app

    from ressl.atomic import write_atomic

    def terminated_midway(f):
        f.write(b"half")
        signal.raise_signal(signal.SIGTERM)

    previous = app._terminate_as_interrupt()
    try:
        with pytest.raises(app.Interrupted) as e:
            write_atomic(tmp_path / "model.onnx", terminated_midway)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.signum == signal.SIGTERM and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- exactly once

# The save that ends epoch 2 of 3: its checkpoint is the 2nd write of last.safetensors, its
# metrics the 3rd of metrics.jsonl (the run's start writes the file once).
CRASH_POINTS = [
    (file, nth, stage)
    for file, nth in (("last.safetensors", 2), ("metrics.jsonl", 3))
    for stage in fault_injection.STAGES
]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, image_folder):
    settings = dict(TINY, dataset=f"folder:{image_folder}", epochs=3)
    run = tmp_path_factory.mktemp("straight") / "run"
    train(out=run, **settings)
    return settings, run


def _assert_exactly_once(run, straight):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # each epoch once, in order
    tensors, meta = load_checkpoint(run)
    assert json.loads(meta["metrics"]) == rows[-1]  # consistent with the checkpoint
    reference = load_checkpoint(straight)[0]
    assert all(torch.equal(tensors[k], reference[k]) for k in reference if not k.startswith("rng"))
    timing = {"images_per_second", "epoch_seconds"}
    want = [
        {k: v for k, v in json.loads(line).items() if k not in timing}
        for line in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == want
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("file,nth,stage", CRASH_POINTS)
def test_a_kill_at_any_point_of_a_save_loses_and_repeats_no_metrics_row(
    tmp_path, straight_run, file, nth, stage
):
    settings, straight = straight_run
    run = tmp_path / "run"
    script = Path(fault_injection.__file__)
    proc = subprocess.run(
        [sys.executable, str(script), file, str(nth), stage, str(run), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 9, proc.stderr  # killed there, with no clean-up
    train(resume=run)
    _assert_exactly_once(run, straight)


@pytest.mark.parametrize("file,nth,stage", CRASH_POINTS)
def test_a_failed_write_at_any_point_of_a_save_loses_and_repeats_no_metrics_row(
    monkeypatch, tmp_path, straight_run, file, nth, stage
):
    settings, straight = straight_run
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        fault_injection.arm(patch, file, nth, stage, kill=False)
        with pytest.raises(OSError, match="cannot write the .*No space left") as e:
            train(out=run, **settings)
    assert e.value.filename == str(run / file)
    train(resume=run)
    _assert_exactly_once(run, straight)


# --------------------------------------------------------------------------- resume plans


def test_resume_with_fewer_epochs_than_done_is_refused(capsys, tmp_path, tiny_settings):
    run = tmp_path / "run"
    train(out=run, **tiny_settings)  # 2 epochs
    before = (run / "last.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "1")
    assert_one_line_error(code, err, f"--epochs 1 is fewer than {run} has trained (2 epochs)")
    assert "give --epochs 2 or more" in err
    assert (run / "last.safetensors").read_bytes() == before


def test_resume_says_when_there_is_nothing_to_train(caplog, tmp_path, tiny_settings):
    run = tmp_path / "run"
    train(out=run, **tiny_settings)
    before = (run / "last.safetensors").read_bytes()
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run)
    assert "has finished its 2 epochs; nothing to train" in caplog.text
    assert (run / "last.safetensors").read_bytes() == before


def test_extending_a_run_states_the_replanned_schedule(caplog, tmp_path, tiny_settings):
    from ressl.schedules import cosine_lr

    run = tmp_path / "run"
    train(out=run, **tiny_settings)  # 2 epochs of 4 steps, 1 of warm-up
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run, epochs=4)
    base = tiny_settings.get("lr", 0.06) * 8 / 256
    new, old = cosine_lr(8, 16, base, 4), cosine_lr(8, 8, base, 4)
    assert (
        f"extending from 2 to 4 epochs: the cosine schedule is re-planned over 4 epochs, "
        f"so at step 8 the lr is {new:.4g} (it was {old:.4g} in the 2-epoch plan)" in caplog.text
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["lr"] == pytest.approx(cosine_lr(15, 16, base, 4))
    _, meta = load_checkpoint(run)
    assert json.loads(meta["settings"])["epochs"] == 4  # the next resume plans from 4


def test_a_resume_holds_the_folder_before_it_reads_the_checkpoint(
    monkeypatch, tmp_path, tiny_settings
):
    run = tmp_path / "run"
    train(out=run, **dict(tiny_settings, epochs=1))

    def read_too_early(*args, **kwargs):
        pytest.fail("the checkpoint was read before the folder was held")

    monkeypatch.setattr(ressl.training.resume, "load_checkpoint", read_too_early)
    with hold_run_folder(run), pytest.raises(RunInUseError, match="wait for it to end"):
        train(resume=run, epochs=2)


def test_shortening_a_run_to_the_epochs_done_ends_it_there(caplog, tmp_path, tiny_settings):
    run = tmp_path / "run"

    def stop_after_epoch_2(event):
        if event.kind == "epoch" and event.epoch == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Stopped):
        train(out=run, callback=stop_after_epoch_2, **dict(tiny_settings, epochs=4))
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run, epochs=2)
    assert "has finished its 2 epochs; nothing to train" in caplog.text
    assert "re-planned" not in caplog.text
    _, meta = load_checkpoint(run)
    assert json.loads(meta["settings"])["epochs"] == 2 and meta["epoch"] == "2"


def test_a_second_signal_aborts_without_saving(tmp_path, tiny_settings):
    def twice(event):
        if event.kind == "step" and event.step == 2:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Stopped) as e:
        train(out=tmp_path / "run", callback=twice, **tiny_settings)
    assert e.value.signum == signal.SIGTERM and e.value.checkpoint == ""
    assert not (tmp_path / "run" / "last.safetensors").exists()
