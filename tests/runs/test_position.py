"""``ressl.runs.position``: one definition of where a run is (epochs done + share of the next)."""

from __future__ import annotations

from ressl.runs.position import Position


def test_mid_epoch_is_the_epoch_in_progress_and_the_share_done():
    where = Position(epoch=1, batch=86, steps_per_epoch=100, epochs=10)
    assert where.epochs_done == 1.86
    assert str(where) == "epoch 2 of 10, 86% done (1.86 epochs)"


def test_an_epoch_end_counts_whole_epochs():
    assert str(Position(3, 0, 100, 10)) == "3 of 10 epochs done"
    assert Position(3, 0, 100, 10).epochs_done == 3.0
    assert str(Position(10, 0, 100, 10)) == "10 of 10 epochs done"


def test_a_share_is_never_rounded_up_to_the_whole_epoch():
    assert str(Position(0, 999, 1000, 1)).startswith("epoch 1 of 1, 99% done")


def test_from_metadata_reads_steps_per_epoch_or_derives_it_from_old_checkpoints():
    new = {"epoch": "1", "batch_in_epoch": "86", "step": "186", "steps_per_epoch": "100"}
    assert Position.from_metadata(new, 10) == Position(1, 86, 100, 10)
    old = {"epoch": "1", "batch_in_epoch": "1", "step": "4"}  # ressl <= 0.3: step = 3 + 1
    assert Position.from_metadata(old, 2) == Position(1, 1, 3, 2)
    first = {"epoch": "0", "batch_in_epoch": "5", "step": "5"}  # unknown steps per epoch
    assert str(Position.from_metadata(first, 2)) == "epoch 1 of 2, 5 batches done"
    assert Position.from_metadata(first, "x").epochs is None
