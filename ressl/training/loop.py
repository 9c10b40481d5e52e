"""The ReSSL trainer: ``train()`` reads build -> (restore) -> epochs -> end.

One step composes the functional pieces (``ressl.training.step.training_step``): views ->
student and EMA teacher -> relation loss against the queue -> SGD step -> enqueue.
Around it: the run is *built* from a :class:`ressl.config.settings.TrainConfig`
(``ressl.training.build``), *restored* from its checkpoint when resuming
(``ressl.training.resume``), trained *epoch* by epoch (progress windows, the kNN monitor, a
checkpoint per epoch; the step, compiled or not, is ``ressl.training.stepper``), and
*ended* with a final checkpoint. The settings and specs are stored in every checkpoint, so
``train(resume=run_dir)`` needs nothing else.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from ressl.config.settings import TrainConfig
from ressl.distributed import World, any_rank
from ressl.errors import ConfigError, DivergedError
from ressl.eval.monitor import knn_monitor
from ressl.models.backbones import custom_spec
from ressl.runs.checkpoint import save_state
from ressl.runs.folder import CHECKPOINT, METRICS, resolve_checkpoint, write_metrics
from ressl.runs.lock import hold_run_folder
from ressl.runs.position import Position
from ressl.training.build import Run, build
from ressl.training.resume import open_folder, read_saved, restore, saved_device
from ressl.training.steplog import RunLog
from ressl.training.stepper import Meter, Stepper, Stopwatch
from ressl.training.stopping import StopAgreement, Stopped
from ressl.training.vitals import MEASURES, StepHealth, alarm

__all__ = ["train", "DivergedError", "TrainEvent"]

log = logging.getLogger("ressl")

Notify = Callable[["TrainEvent"], None]


@dataclass
class TrainEvent:
    """What ``train`` reports to its ``callback``: ``kind`` is "start", "step", "epoch" or "end"."""

    kind: str
    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    batch_in_epoch: int = 0
    loss: float | None = None
    images_per_second: float | None = None
    metrics: dict[str, Any] | None = None
    health: dict[str, float] | None = None


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
    **settings: Any,
) -> Path:
    """Pre-train an encoder with ReSSL and return the path of the final checkpoint.

    The configuration is ``config`` (a :class:`ressl.config.settings.TrainConfig`) or, config-free,
    the keyword arguments: every field of ``TrainConfig`` is a keyword (``ressl train
    --help`` lists them), ``None`` means the default, and the dataset's recipe fills the
    rest (``ressl.data.registry``). The main ones: ``dataset`` ("fashion-mnist", "cifar10",
    "cifar100", "stl10", "folder:PATH", "imagenet:PATH"), ``epochs`` (the total, also when
    resuming), ``batch_size``, ``backbone`` (a name, or any ``nn.Module`` mapping images to
    ``(B, F)`` features: it is copied, trained, and recorded as ``custom:ClassName``; resume
    such a run with the same module), ``out`` (run folder), ``queue_size``,
    ``ema_momentum``, ``lr`` (per 256 images), ``device``, ``seed``.

    The run folder gets ``last.safetensors`` (rewritten atomically at every
    epoch end and on Ctrl-C) and ``metrics.jsonl`` (one JSON object per epoch).

    Args:
        config: the whole configuration; then no other settings may be given.
        resume: a run folder or checkpoint file to continue from; the saved
            settings are used, and only those marked resumable (``epochs``,
            ``device``, ``num_workers``, ``knn_every``, ``progress_every``) may
            be given with a new value.
        callback: receives a ``TrainEvent`` at start, every ``progress_every``
            steps, at each epoch end and at the end (the CLI draws its progress
            bar from these).
        **settings: the training configuration, config-free.

    Returns:
        Path of ``RUN_DIR/last.safetensors``.

    Raises:
        ConfigError: (a ``ValueError``) on invalid settings, naming the setting and
            its valid range, a batch larger than the dataset, or an existing run in ``out``.
        CheckpointError: if ``resume`` is not a ressl checkpoint.
    """
    notify = callback or (lambda event: None)
    module = settings.pop("backbone") if isinstance(settings.get("backbone"), nn.Module) else None
    if config is not None and (settings or resume is not None):
        raise TypeError("pass either config or keyword settings (or resume=), not both")
    if resume is not None:  # the folder is held before its checkpoint is read
        file = resolve_checkpoint(resume)
        run_dir, device = file.parent, settings.get("device") or saved_device(file)
    else:
        cfg, given = _new_config(config, settings, module)
        run_dir, device = cfg.run_dir, cfg.device
    world = World.join(device)
    try:
        with _held(run_dir, world, resuming=resume is not None):
            world.barrier()  # the other ranks read the checkpoint once rank 0 holds the folder
            if resume is None:
                _refuse_existing(run_dir)
                return _train(build(cfg, world, run_dir, module, given), notify)
            saved = read_saved(file, settings, module)
            run = build(saved.config, world, run_dir, module)
            return _train(run, notify, resave=restore(run, saved), saved_row=saved.row)
    finally:
        world.leave()


def _new_config(
    config: TrainConfig | None, keywords: dict[str, Any], module: nn.Module | None
) -> tuple[TrainConfig, set[str]]:
    """A new run's config (its ``out`` resolved), and the settings its user chose (kept as
    given; the rest may be fitted to the data): the keywords given, or a config's values
    that differ from its dataset's defaults."""
    custom = {} if module is None else {"backbone": custom_spec(module)}
    if config is None:
        cfg = TrainConfig.from_keywords(**keywords, **custom)
        given = {k for k, v in keywords.items() if v is not None}
    else:
        cfg = config.replace(**custom)
        defaults = TrainConfig(dataset=cfg.dataset, image_size=cfg.image_size).to_dict()
        given = {k for k, v in cfg.to_dict().items() if v != defaults[k]}
    return cfg.replace(out=str(cfg.run_dir)), given


def _held(run_dir: Path, world: World, *, resuming: bool) -> AbstractContextManager[Any]:
    """The run folder, held by this run (rank 0 holds it for all when distributed)."""
    return hold_run_folder(run_dir, resuming=resuming) if world.main else nullcontext()


def _refuse_existing(run_dir: Path) -> None:
    if (run_dir / CHECKPOINT).exists():
        raise ConfigError(
            f"{run_dir} already holds a run (last.safetensors); continue it with "
            f"--resume {run_dir} or choose another {{out}}",
            "out",
        )


def _train(
    run: Run, notify: Notify, *, resave: bool = False, saved_row: dict[str, Any] | None = None
) -> Path:
    """The run's epochs, from its state to its last (or a stop: saved, then re-raised), then
    its final checkpoint: written now if no epoch ended here and ``resave`` says so or there
    is none."""
    logs = open_folder(run, saved_row)
    try:
        notify(_event(run, "start"))
        _announce(run)
        stepper, saved = Stepper(run), False
        with StopAgreement(run.world, run.device) as stop:
            while run.state.epoch < run.config.epochs and not stop.agree():
                done = _epoch(run, stepper, stop, logs, notify)
                if done is None:  # interrupted mid-epoch
                    break
                _end_epoch(run, done, logs, notify)
                saved = True
            if stop.stopping and run.state.epoch < run.config.epochs:
                _stopped(run, stop, notify)
        path = run.run_dir / CHECKPOINT
        if not saved and (resave or not path.exists()):
            path = save(run)
        notify(_event(run, "end", metrics=run.state.rows[-1] if run.state.rows else {}))
        return path
    finally:
        if logs is not None:
            logs.close()


@dataclass(frozen=True)
class _EpochEnd:
    images: int  # of the global batches, the compile warm-up's left out
    seconds: float  # the compile warm-up's left out
    lr: float  # of its last step
    momentum: float


def _epoch(
    run: Run, step: Stepper, stop: StopAgreement, logs: RunLog | None, notify: Notify
) -> _EpochEnd | None:
    """The batches of one epoch, or None when a stop came first."""
    c, state, world = run.config, run.state, run.world
    state.model.train()
    epoch, window = Meter(step.watch), _Window(step.watch)
    lr = momentum = 0.0
    for images, labels in run.batches():
        at = state.step(run.steps_per_epoch)
        lr, momentum = run.lr(at), run.momentum(at)
        n = labels.shape[0] * world.size  # images of the global batch
        window.add(step(images, lr, momentum, n), n)
        epoch.add(n)
        state.batch_in_epoch += 1
        ends = len(window.losses) >= c.progress_every or state.batch_in_epoch == run.steps_per_epoch
        if ends or stop.flush_now:  # distributed ranks end windows together, and agree there
            stop.agree()
            _flush(run, window, step, lr, momentum, logs, notify)
        if stop.after_step():
            break
    if window.losses:  # a stop that came between the window check and the break
        _flush(run, window, step, lr, momentum, logs, notify)
    if state.batch_in_epoch < run.steps_per_epoch:
        return None
    seen, seconds = epoch.measure()
    return _EpochEnd(seen, seconds, lr, momentum)


class _Window:
    """Steps between two host syncs: their losses stay on the device until ``flush``."""

    def __init__(self, watch: Stopwatch) -> None:
        self.losses: list[Tensor] = []
        self.meter = Meter(watch)

    def add(self, loss: Tensor, images: int) -> None:
        self.losses.append(loss)
        self.meter.add(images)

    def flush(self, run: Run, health: StepHealth) -> _Read:
        """Add the window's losses (and health measures) to the epoch's and read them.

        Raises:
            DivergedError: a loss is not finite (on any rank, when distributed).
        """
        state, n = run.state, len(self.losses)
        measured = health.take()
        values = torch.stack(self.losses)
        if measured is not None:
            values = torch.cat([values.float(), measured])
        read = values.tolist()  # the one host sync per window
        losses = read[:n]
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if any_rank(bad is not None, run.device):  # every rank stops together
            if bad is None:
                raise diverged(run, "the loss is not finite on another process")
            step = state.step(run.steps_per_epoch) - n + bad + 1
            raise diverged(
                run,
                f"the loss is {losses[bad]} at step {step} (epoch {state.epoch + 1}, batch "
                f"{state.batch_in_epoch - n + bad + 1})",
            )
        state.loss_sum += sum(losses)
        state.loss_count += n
        measures = dict(zip(MEASURES, read[n:]))
        if measures and all(math.isfinite(v) for v in measures.values()):
            for key, value in measures.items():
                state.health_sum[key] = state.health_sum.get(key, 0.0) + value * n
            state.health_steps += n
        images, seconds = self.meter.measure()
        self.losses = []
        return _Read(losses[-1], sum(losses) / n, images / max(seconds, 1e-9), measures)


@dataclass(frozen=True)
class _Read:
    """A window as read: its last and mean loss, images/s and health measures' means."""

    loss: float
    mean: float
    images_per_second: float
    health: dict[str, float]


def _flush(
    run: Run,
    window: _Window,
    step: Stepper,
    lr: float,
    momentum: float,
    logs: RunLog | None,
    notify: Notify,
) -> None:
    """A progress window's end: its losses checked, its row logged, the progress event, and
    the collapse alarm on its health measures."""
    read = window.flush(run, step.health)
    s = run.state
    at = s.step(run.steps_per_epoch)
    health = {key: round(v, 6) for key, v in read.health.items()}
    if logs is not None:
        logs.window(
            {
                "step": at,
                "epoch": round(s.epoch + s.batch_in_epoch / run.steps_per_epoch, 6),
                "loss": read.mean,
                "lr": lr,
                "ema_momentum": momentum,
                "images_per_second": round(read.images_per_second, 2),
                **health,
            }
        )
    notify(
        _event(run, "step", loss=read.loss, images_per_second=read.images_per_second, health=health)
    )
    alarm(run, step.health, read.health, at)


def _end_epoch(run: Run, done: _EpochEnd, logs: RunLog | None, notify: Notify) -> None:
    """An epoch's metrics row (with the kNN monitor when due), checkpoint and metrics file."""
    c, state = run.config, run.state
    epoch = state.epoch + 1
    row: dict[str, Any] = {
        "epoch": epoch,
        "step": epoch * run.steps_per_epoch,
        "loss": state.loss_sum / max(state.loss_count, 1),
        "lr": done.lr,
        "ema_momentum": done.momentum,
        "images_per_second": round(done.images / max(done.seconds, 1e-9), 2),
        "epoch_seconds": round(done.seconds, 3),
        **{k: round(v / state.health_steps, 6) for k, v in state.health_sum.items()},
    }
    every = c.knn_every
    if every >= 0 and ((every and epoch % every == 0) or epoch == c.epochs):
        encoder = state.model.student
        row.update(knn_monitor(encoder, run.data, c, run.device, run.amp, run.world))
    state.next_epoch(row)
    save(run)
    if run.world.main:
        write_metrics(run.run_dir / METRICS, state.rows)
        if logs is not None:
            logs.epoch(row)
    notify(
        TrainEvent(
            "epoch",
            epoch,
            epoch * run.steps_per_epoch,
            run.steps_per_epoch,
            c.epochs,
            0,
            row["loss"],
            row["images_per_second"],
            row,
        )
    )


def _stopped(run: Run, stop: StopAgreement, notify: Notify) -> NoReturn:
    """A stop before the last epoch's end: the state saved, said, and the stop re-raised."""
    path, state = save(run), run.state
    if run.world.main:
        where = Position(state.epoch, state.batch_in_epoch, run.steps_per_epoch, run.config.epochs)
        log.warning(
            "interrupted at %s: saved %s; continue with --resume %s", where, path, run.run_dir
        )
    notify(_event(run, "end", metrics={"interrupted": True}))
    raise Stopped(stop.signum or signal.SIGINT, str(path))


def _announce(run: Run) -> None:
    """What trains on what, where (rank 0)."""
    c, d, world = run.config, run.data, run.world
    if not world.main:
        return
    log.info(
        "training %s on %s: %d images of %d px, %d channel%s; batch %d (%d steps/epoch), "
        "%d epochs; on %s in %s%s",
        c.backbone,
        c.dataset,
        len(d.train),
        d.image_size,
        d.channels,
        "s" if d.channels > 1 else "",
        c.batch_size,
        run.steps_per_epoch,
        c.epochs,
        run.device,
        "bf16 autocast" if run.amp else "fp32",
        f", {world.size} processes of {c.batch_size // world.size} images per step"
        if world.distributed
        else "",
    )
    log.info("backbone: %s", run.state.model.backbone_build.describe())


def _event(run: Run, kind: str, **fields: Any) -> TrainEvent:
    s = run.state
    return TrainEvent(
        kind,
        s.epoch,
        s.step(run.steps_per_epoch),
        run.steps_per_epoch,
        run.config.epochs,
        s.batch_in_epoch,
        **fields,
    )


def save(run: Run) -> Path:
    """The checkpoint of the current state (a collective when distributed), refused when a
    weight is not finite."""
    bad = _non_finite(run.state.model)
    if bad is not None:
        raise diverged(run, f"{bad} is not finite after step {run.state.step(run.steps_per_epoch)}")
    return save_state(
        run.run_dir / CHECKPOINT,
        run.state,
        settings=run.settings,
        steps_per_epoch=run.steps_per_epoch,
        world=run.world,
    )


def diverged(run: Run, what: str) -> DivergedError:
    """The error that stops a diverged run: what went wrong, what was kept, what to try."""
    c, path = run.config, run.run_dir / CHECKPOINT
    kept = f"{path} keeps the last finite state" if path.exists() else "no checkpoint was written"
    fp32 = ", {precision} fp32" if run.amp is not None else ""
    return DivergedError(
        f"training diverged: {what}; nothing of it was saved ({kept}). Try a lower {{lr}} "
        f"(now {c.lr:g}){fp32}, or a higher {{student_temperature}} "
        f"(now {c.student_temperature:g}), then train again",
        "lr",
        "student_temperature",
        *(["precision"] if fp32 else []),
    )


def _non_finite(model: nn.Module) -> str | None:
    """The name of the first weight or buffer holding a NaN or an infinity (one host sync)."""
    named = [(n, t) for n, t in model.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return next((n for (n, _), ok in zip(named, finite) if not ok), None)
