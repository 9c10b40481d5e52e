"""Continuing a run: its checkpoint read once and checked, the state restored, the schedules
re-planned for new ``epochs``, and the run folder's metrics made to agree with the state."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ressl.config.resuming import from_saved
from ressl.config.seeds import views_seed
from ressl.config.settings import TrainConfig
from ressl.errors import CheckpointError, ConfigError
from ressl.rules import Note, is_int
from ressl.runs.checkpoint import load_checkpoint, restore_state
from ressl.runs.checks import CheckedFile, check_loaded, check_resumable
from ressl.runs.folder import CHECKPOINT, METRICS, read_metrics, write_metrics
from ressl.runs.metadata import metadata_json, read_metadata
from ressl.training.build import Run
from ressl.training.steplog import RunLog

__all__ = ["Saved", "open_folder", "read_saved", "restore", "saved_device"]

log = logging.getLogger("ressl")


@dataclass(frozen=True)
class Saved:
    """The checkpoint a resume continues: read once, checked, and what it says.

    Attributes:
        checked: Its metadata, settings and specs, checked.
        tensors: Every tensor it holds, on the CPU.
        config: The config it continues with (its settings and the resumable ones given).
        planned: The epochs it was planned for (a different ``epochs`` re-plans the schedules).
        row: Its last metrics row (None before the first epoch's end).
    """

    checked: CheckedFile
    tensors: dict[str, Tensor]
    config: TrainConfig
    planned: int
    row: dict[str, Any] | None

    @property
    def file(self) -> Path:
        return self.checked.path


def saved_device(file: Path) -> str:
    """The device a checkpoint's run trained on: what ``World.join`` needs to pick a backend,
    before the folder is held (so only this, from the file's header)."""
    settings = metadata_json(file, read_metadata(file), "settings", dict)
    device = settings.get("device", "auto")
    return device if isinstance(device, str) else "auto"


def read_saved(file: Path, given: dict[str, Any], module: nn.Module | None) -> Saved:
    """The checkpoint at ``file``, read once and checked before use (``ressl.runs.checks``),
    with the config it continues with.

    Raises:
        CheckpointError: the file is not a resumable ressl checkpoint.
        ConfigError: a given setting cannot change, or ``epochs`` is fewer than done.
    """
    tensors, meta = load_checkpoint(file)  # the one read of the file
    checked = check_loaded(file, tensors, meta, module)
    if checked.model.backbone.startswith("custom:") and module is None:
        raise ConfigError(
            f"{file.parent} was trained with a module given through the API "
            f"({checked.model.backbone}); continue it there: "
            "ressl.train(resume=..., backbone=module)"
        )
    check_resumable(checked, tensors)
    config = from_saved(checked.settings, given).replace(out=str(file.parent))
    _check_not_fewer(config.epochs, int(meta["epoch"]), int(meta["batch_in_epoch"]), file.parent)
    planned = checked.settings.get("epochs", config.epochs)
    row = metadata_json(file, meta, "metrics", dict, default={}) or None
    return Saved(checked, tensors, config, planned if is_int(planned) else config.epochs, row)


def _check_not_fewer(epochs: int, done: int, batches: int, run_dir: Path) -> None:
    if epochs < done or (epochs == done and batches):
        trained = f"{done} epochs" + (f" and {batches} batches" if batches else "")
        raise ConfigError(
            f"{{epochs}} {epochs} is fewer than {run_dir} has trained ({trained}); give "
            f"{{epochs}} {done + (1 if batches else 0)} or more to continue it",
            "epochs",
        )


def restore(run: Run, saved: Saved) -> bool:
    """The checkpoint's state in the built run (built from its settings: the same specs),
    then re-planned for new ``epochs``; whether the checkpoint must be written again at the end
    (its run now ends at the epochs done)."""
    path, meta = run.run_dir / CHECKPOINT, saved.checked.meta
    batch = int(meta["batch_in_epoch"])
    if batch >= run.steps_per_epoch:
        raise CheckpointError(
            f"{path} stopped after batch {batch} of an epoch, but the data "
            f"now makes {run.steps_per_epoch} batches per epoch; it cannot be resumed on it"
        )
    _check_same_files(run, saved)
    reseed = views_seed(run.config.seed, run.world.rank)
    try:
        restore_state(run.state, saved.tensors, meta, world=run.world, reseed=reseed)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if run.world.main:
        log.info(
            "resuming %s at epoch %d, batch %d",
            run.run_dir,
            run.state.epoch,
            run.state.batch_in_epoch,
        )
    return _replan(run, saved.planned)


def _check_same_files(run: Run, saved: Saved) -> None:
    """Say so when an image folder's training files are not those the checkpoint's run
    trained on (files added, removed, renamed or moved between classes). The run goes on
    with the files there now, which may be what the user wants (more data); a checkpoint
    from before ressl recorded them is not compared."""
    then, now = saved.checked.data.files, run.data.files
    if now is None or then is None or now == then:
        return
    if run.world.main:
        change = (
            f"{now[0]} image files where it trained on {then[0]}"
            if now[0] != then[0]
            else f"{now[0]} image files, as before, but not the same ones"
        )
        log.warning(
            "%s changed since %s was trained on it: it now holds %s. The run continues on the "
            "files there now, so its epoch order and kNN numbers are not those of the data it "
            "started on; to continue on that data, restore the folder, or train this data "
            "from the start in a new run folder",
            run.data.name,
            run.run_dir,
            change,
        )


def _replan(run: Run, planned: int) -> bool:
    """A resume with other ``epochs`` than planned re-plans the schedules over the new total:
    said, with the lr it changes (fewer epochs than done were refused by ``read_saved``).
    True when the run has no epoch left and the checkpoint must say that it ends here."""
    c, s, spe = run.config, run.state, run.steps_per_epoch
    if s.epoch == c.epochs:  # (and no batch of another epoch: refused before)
        if run.world.main:
            log.warning(
                "%s has finished its %d epochs; nothing to train (a higher %s extends it)",
                run.run_dir,
                c.epochs,
                Note("{epochs}", "epochs"),
            )
        return c.epochs != planned
    if c.epochs != planned and run.world.main:
        step = s.step(spe)
        log.warning(
            "%s: %s from %d to %d epochs: the cosine schedule%s is re-planned over %d epochs, "
            "so at step %d the lr is %.4g (it was %.4g in the %d-epoch plan)",
            run.run_dir,
            "extending" if c.epochs > planned else "shortening",
            planned,
            c.epochs,
            " (and the EMA momentum's)" if c.momentum_schedule == "cosine" else "",
            c.epochs,
            step,
            run.lr(step),
            run.lr(step, planned),
            planned,
        )
    return False


def open_folder(run: Run, saved_row: dict[str, Any] | None = None) -> RunLog | None:
    """The run folder and its metrics, made to agree with the state: one row per finished
    epoch, each once; the step log (rank 0; None on the others).

    A resumed run's later rows belong to a future it will write again; the checkpoint's own
    last row (``saved_row``) stands for its epoch (it fills in for one that a stop between
    the checkpoint's rename and the metrics file's never wrote). A line that is not a row (a
    damaged file) is dropped with a warning: the checkpoint is the truth, and the file is
    rewritten from the rows kept."""

    def damaged(problem: str) -> None:
        if run.world.main:
            log.warning("%s; dropping it (the file is rewritten)", problem)

    state, metrics = run.state, run.run_dir / METRICS
    rows = {row["epoch"]: row for row in read_metrics(metrics, state.epoch, on_bad_line=damaged)}
    if saved_row and saved_row.get("epoch") == state.epoch:
        rows[state.epoch] = saved_row
    state.rows = [rows[e] for e in sorted(rows)]
    if not run.world.main:
        return None
    missing = sorted(set(range(1, state.epoch + 1)) - set(rows))
    if missing:
        log.warning("%s has no rows for epochs %s", metrics, ", ".join(map(str, missing)))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    logs = RunLog(
        run.run_dir, state.step(run.steps_per_epoch), tensorboard=run.config.log == "tensorboard"
    )
    write_metrics(metrics, state.rows)
    return logs
