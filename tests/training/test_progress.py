"""``ressl train`` progress outside a terminal: a plain line at a regular interval."""

from __future__ import annotations

from ressl.cli.progress import TrainProgress, duration

from ressl.training.loop import TrainEvent


def test_plain_progress_lines_come_at_the_interval_with_an_eta(capsys):
    now = [0.0]
    progress = TrainProgress(interval=30.0, clock=lambda: now[0])
    assert progress.plain  # stderr is captured, not a terminal
    with progress:
        progress(TrainEvent("start", 0, 0, 100, 4))
        for step in range(1, 401):
            now[0] = step * 0.5  # 2 steps per second
            epoch, batch = divmod(step, 100)
            progress(TrainEvent("step", epoch, step, 100, 4, batch, 3.25, 1000.0))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 6  # every 30 s of a 200 s run
    assert lines[0] == "step 60/400 (15%, epoch 1/4)  1,000 img/s  loss 3.2500  ETA 2m50s"
    assert lines[-1].startswith("step 360/400 (90%, epoch 4/4)") and lines[-1].endswith("ETA 20s")


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (8, 75, 3725, -3)] == ["8s", "1m15s", "1h02m", "0s"]


def test_count_progress_prints_lines_at_the_interval_and_at_the_end(capsys):
    from ressl.cli.progress import CountProgress

    now = [0.0]
    with CountProgress("extract", 1000, interval=30.0, clock=lambda: now[0]) as progress:
        for done in range(100, 1001, 100):
            now[0] += 10.0  # 10 images/s
            progress(done)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "extract: 300/1,000 (30%)  10 img/s  ETA 1m10s",
        "extract: 600/1,000 (60%)  10 img/s  ETA 40s",
        "extract: 900/1,000 (90%)  10 img/s  ETA 10s",
        "extract: 1,000/1,000 (100%)  10 img/s",
    ]
