"""What a run logs between epochs: the per-step stream (``steps.jsonl``) and TensorBoard.

``steps.jsonl`` gets one JSON object per progress window (``--progress-every``
steps): ``step`` (the global step at the window's end), ``epoch`` (fractional:
2.5 is half-way through the third epoch), ``loss`` (the window's mean), ``lr``,
``ema_momentum``, ``images_per_second`` and the window's means of the health measures
(``ressl.training.vitals.MEASURES``: ``alignment``, ``uniformity``, ``std_ratio``,
``teacher_entropy_ratio``, ``agreement``, ``queue_similarity``). Rows are appended as they come; a
resumed run first drops the rows after its checkpoint's step, so each step is
logged once, as for ``metrics.jsonl``.

With ``--log tensorboard`` the same values (the measures as ``health/NAME``), and each
epoch's row (loss, kNN accuracy, RankMe, the epoch's health means), go to TensorBoard
event files in ``RUN/tensorboard`` (the ``tensorboard`` extra); a resumed run's writer
purges the steps after its checkpoint's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ressl.atomic import write_atomic
from ressl.errors import ConfigError
from ressl.jsontext import parse_json
from ressl.runs.folder import STEPS, TENSORBOARD, append_run_file, check_run_folder, read_run_file
from ressl.training.vitals import MEASURES

__all__ = ["STEPS", "TENSORBOARD", "RunLog", "read_steps", "require_tensorboard"]


def read_steps(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``steps.jsonl`` (those with ``step <= upto`` when given); a line that
    is not a JSON object with an integer step (the tail of a killed write) is skipped.

    Raises:
        RunFileError: the file is a link or not a regular file.
    """
    rows: list[dict[str, Any]] = []
    for line in (read_run_file(path) or "").splitlines():
        try:
            row = parse_json(line, str(path))
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            if upto is None or row["step"] <= upto:
                rows.append(row)
    return rows


def require_tensorboard() -> Any:
    """``SummaryWriter``, or a ConfigError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "{log} tensorboard needs the tensorboard package: pip install 'ressl[tensorboard]'",
            "log",
        ) from None
    return SummaryWriter


class RunLog:
    """The per-step stream and (optionally) TensorBoard of one run; rank 0 keeps it.

    Args:
        run_dir: the run folder.
        step: the step the run starts from (a resume's checkpoint step; 0 when fresh).
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, run_dir: Path, step: int, *, tensorboard: bool = False) -> None:
        check_run_folder(run_dir)  # no file or folder written here is a link out of it
        # the steps after the checkpoint's (a fresh run: all) belong to a past that is redone
        self.writer = (
            require_tensorboard()(str(run_dir / TENSORBOARD), purge_step=step + 1)
            if tensorboard
            else None
        )
        self.path = run_dir / STEPS
        kept = read_steps(self.path, upto=step)  # rewritten whole: no cut line stays behind
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode(), STEPS)

    def window(self, row: dict[str, Any]) -> None:
        """One progress window's row (``step``, ``epoch``, ``loss``, ``lr``, ...)."""
        clean = {
            k: v for k, v in row.items() if not (isinstance(v, float) and not math.isfinite(v))
        }
        append_run_file(self.path, json.dumps(clean) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "ema_momentum", "images_per_second"):
                if key in clean:
                    self.writer.add_scalar(f"train/{key}", clean[key], row["step"])
            for key in MEASURES:
                if key in clean:
                    self.writer.add_scalar(f"health/{key}", clean[key], row["step"])

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch's ``metrics.jsonl`` row: its loss, kNN accuracy, RankMe and health means go
        to TensorBoard."""
        if self.writer is None:
            return
        for key in ("loss", "knn_top1", "knn_top5", "rankme", "epoch_seconds", *MEASURES):
            if key in row:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
