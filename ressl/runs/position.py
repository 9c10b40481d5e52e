"""Where a run is: epochs completed plus the share of the next one done (torch-free).

One definition for every place that says it: the trainer's stop message, ``ressl info``,
the evaluations ``eval.jsonl`` records (and ``ressl plot`` draws), the t-SNE's title.
A checkpoint saved after 86 of 100 batches of the second epoch of ten is at ``1.86``
epochs, shown as ``epoch 2 of 10, 86% done (1.86 epochs)``.

Example:
    >>> str(Position(epoch=1, batch=86, steps_per_epoch=100, epochs=10))
    'epoch 2 of 10, 86% done (1.86 epochs)'
    >>> str(Position(epoch=3, batch=0, steps_per_epoch=100, epochs=10))
    '3 of 10 epochs done'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ressl.errors import CheckpointError

__all__ = ["Position"]


@dataclass(frozen=True)
class Position:
    """A run's place: ``epoch`` epochs completed and ``batch`` batches into the next.

    Attributes:
        epoch: completed epochs.
        batch: finished batches of the epoch in progress (0 at an epoch's end).
        steps_per_epoch: batches per epoch (None: unknown, an old checkpoint stopped in
            its first epoch).
        epochs: the epochs the run is planned for (None: unknown).
    """

    epoch: int
    batch: int = 0
    steps_per_epoch: int | None = None
    epochs: int | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], epochs: object = None) -> Position:
        """The position a checkpoint's (checked) metadata records. Checkpoints before
        ``steps_per_epoch`` was recorded give it by ``step = epoch * steps + batch``."""
        epoch, batch = _integer(meta, "epoch"), _integer(meta, "batch_in_epoch")
        steps: int | None = None
        if "steps_per_epoch" in meta:
            steps = _integer(meta, "steps_per_epoch")
        elif epoch > 0 and "step" in meta:
            steps = (_integer(meta, "step") - batch) // epoch
        total = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None
        return cls(epoch, batch, steps if steps and steps > 0 else None, total)

    @property
    def epochs_done(self) -> float:
        """Epochs completed, with the share of the next one: ``1.86`` (``epoch`` when the
        share is unknown)."""
        if not self.batch or not self.steps_per_epoch:
            return float(self.epoch)
        return round(self.epoch + self.batch / self.steps_per_epoch, 2)

    def __str__(self) -> str:
        of = f" of {self.epochs}" if self.epochs is not None else ""
        if not self.batch:
            return f"{self.epoch}{of} epochs done"
        if not self.steps_per_epoch:
            return f"epoch {self.epoch + 1}{of}, {self.batch} batches done"
        share = int(100 * self.batch / self.steps_per_epoch)  # never 100% before its end
        return f"epoch {self.epoch + 1}{of}, {share}% done ({self.epochs_done:.2f} epochs)"


def _integer(meta: Mapping[str, str], key: str) -> int:
    """The integer metadata field ``key`` (0 when absent), or a CheckpointError naming it."""
    text = meta.get(key, "0")
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"its metadata {key!r} is {text[:40]!r}, not an integer") from None
