"""Progress for ``ressl train``: a bar per epoch in a terminal, and elsewhere (a log file,
CI, Slurm) a plain progress line at a regular interval; a summary line per epoch in both."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from ressl.training.loop import TrainEvent


def health_text(health: dict[str, float] | None) -> str:
    """``  std x0.39  target entropy 0.89``: the collapse alarm's measures of a window (the
    embeddings' std as a multiple of its healthy value, the teacher relation's entropy as a
    fraction of its maximum); empty without them."""
    h = health or {}
    if "std_ratio" not in h or "teacher_entropy_ratio" not in h:
        return ""
    return f"  std x{h['std_ratio']:.2f}  target entropy {h['teacher_entropy_ratio']:.2f}"


def duration(seconds: float) -> str:
    """``3725 -> "1h02m"``, ``75 -> "1m15s"``, ``8 -> "8s"``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TrainProgress:
    """A ``train`` callback drawing progress on stderr.

    In a terminal: a bar per epoch. Elsewhere: a line at most every ``interval`` seconds
    (steps done of all, epoch, images/s, loss, ETA), so a log never goes quiet for long.

    Args:
        interval: Seconds between plain progress lines (when stderr is not a terminal).
        clock: The time source (tests give their own).
    """

    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self.plain = not sys.stderr.isatty()
        self._started: tuple[float, int] | None = None  # (time, step) when the run started
        self._last_line = 0.0
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ips]} img/s  loss {task.fields[loss]}{task.fields[health]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=self.plain,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def _new_task(self, event: TrainEvent, completed: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            "train",
            total=event.steps_per_epoch,
            completed=completed,
            epoch=f"{event.epoch + 1}/{event.epochs}",
            ips="-",
            loss="-",
            health="",
        )

    def _plain_line(self, event: TrainEvent) -> None:
        """``step 120/400 (30%, epoch 2/5)  1,234 img/s  loss 3.4567  ETA 1m15s``."""
        now = self.clock()
        if self._started is None:
            self._started = (now, event.step)
        if now - self._last_line < self.interval:
            return
        self._last_line = now
        total = event.steps_per_epoch * event.epochs
        began, first = self._started
        done = event.step - first
        eta = (total - event.step) * (now - began) / done if done > 0 else None
        self.console.print(
            f"step {event.step}/{total} ({100 * event.step / max(total, 1):.0f}%, epoch "
            f"{event.epoch + 1}/{event.epochs})  {event.images_per_second or 0:,.0f} img/s  "
            f"loss {event.loss if event.loss is not None else float('nan'):.4f}"
            + health_text(event.health)
            + (f"  ETA {duration(eta)}" if eta is not None else ""),
            highlight=False,
        )

    def __call__(self, event: TrainEvent) -> None:
        if event.kind == "start":
            self._started = (self.clock(), event.step)
            self._last_line = self._started[0]  # the first line comes an interval in
            self._new_task(event, event.batch_in_epoch)
        elif event.kind == "step" and self.plain:
            self._plain_line(event)
        elif event.kind == "step":
            if self.task is None:
                self._new_task(event, 0)
            assert self.task is not None
            self.progress.update(
                self.task,
                completed=event.batch_in_epoch,
                ips=f"{event.images_per_second:,.0f}",
                loss=f"{event.loss:.4f}",
                health=health_text(event.health),
            )
        elif event.kind == "epoch":
            m = event.metrics or {}
            knn = f"  knn top-1 {m['knn_top1']:.2f}%" if "knn_top1" in m else ""
            knn += f"  rankme {m['rankme']:.1f}" if "rankme" in m else ""
            self.console.print(
                f"epoch {event.epoch}/{event.epochs}  loss {m.get('loss', float('nan')):.4f}  lr {m.get('lr', 0):.4f}  "
                f"{m.get('images_per_second', 0):,.0f} img/s  {m.get('epoch_seconds', 0):.1f} s{knn}",
                highlight=False,
            )
            if event.epoch < event.epochs:
                self._new_task(event, 0)
        elif event.kind == "end" and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


class CountProgress:
    """Progress of a known number of items (images extracted, files embedded) on stderr.

    In a terminal a bar; elsewhere a line at most every ``interval`` seconds and one at
    the end: ``embed: 12,000/60,000 (20%)  1,234 img/s  ETA 40s``. Call it with the count
    done so far. A ``heading`` (what is being counted) is printed first; then a job done
    within one interval adds no line of its own, so it is said once.
    """

    def __init__(
        self,
        label: str,
        total: int,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "img/s",
        heading: str | None = None,
    ) -> None:
        self.label, self.total, self.interval, self.clock = label, total, interval, clock
        self.unit, self.heading, self.lines = unit, heading, 0
        self.plain = not sys.stderr.isatty()
        self.console = Console(stderr=True)
        self.start = self._last = clock()
        self.done = 0
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ips]} " + unit),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=self.plain,
        )
        self.task = self.progress.add_task(label, total=total, ips="-")

    def __enter__(self) -> CountProgress:
        if self.heading:
            self.console.print(self.heading, highlight=False, soft_wrap=True)
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        said = self.heading is None or self.lines > 0  # else the heading said it all
        if self.plain and exc[0] is None and self.done and self._last != self.clock() and said:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.console.print(
            f"{self.label}: {self.done:,}/{self.total:,} ({100 * self.done / max(self.total, 1):.0f}%)"
            f"  {rate:,.{1 if rate < 10 else 0}f} {self.unit}"
            + (f"  ETA {duration(eta)}" if self.done < self.total else ""),
            highlight=False,
        )
        self._last, self.lines = now, self.lines + 1

    def __call__(self, done: int) -> None:
        self.done = done
        now = self.clock()
        rate = done / max(now - self.start, 1e-9)
        self.progress.update(self.task, completed=done, ips=f"{rate:,.0f}")
        if self.plain and now - self._last >= self.interval:
            self._line(now)
