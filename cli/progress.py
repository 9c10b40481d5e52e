"""Terminal progress for ``ressl train``: one bar per epoch, a summary line per epoch."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from ressl.trainer import TrainEvent


class TrainProgress:
    """A ``train`` callback drawing progress on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ips]} img/s  loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not sys.stderr.isatty(),
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
        )

    def __call__(self, event: TrainEvent) -> None:
        if event.kind == "start":
            self._new_task(event, event.batch_in_epoch)
        elif event.kind == "step":
            if self.task is None:
                self._new_task(event, 0)
            assert self.task is not None
            self.progress.update(
                self.task,
                completed=event.batch_in_epoch,
                ips=f"{event.images_per_second:,.0f}",
                loss=f"{event.loss:.4f}",
            )
        elif event.kind == "epoch":
            m = event.metrics or {}
            knn = f"  knn top-1 {m['knn_top1']:.2f}%" if "knn_top1" in m else ""
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
