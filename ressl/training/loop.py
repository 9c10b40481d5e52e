"""The ReSSL trainer: ``train()`` reads build -> restore -> epochs -> end.

One step composes the functional pieces (``ressl.training.step.training_step``): views ->
student and EMA teacher -> relation loss against the queue -> SGD step -> enqueue.
Around it: the run is *built* from a :class:`ressl.config.settings.TrainConfig` (data, model,
optimiser, crop plan, state), *restored* from a checkpoint when resuming, trained
*epoch* by epoch (progress windows, the kNN monitor, a checkpoint per epoch), and
*ended* with a final checkpoint. The resolved settings are stored in every
checkpoint, so ``train(resume=run_dir)`` needs nothing else.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ressl.config.settings import TrainConfig
from ressl.data.jpegs import decode_place
from ressl.data.loading import load_dataset
from ressl.data.sources import FolderImages, ImageData, ImageSource, TensorImages
from ressl.device import autocast_dtype, select_device
from ressl.distributed import (
    World,
    all_gather_cat,
    any_rank,
    batchnorm_for,
    convert_batchnorm,
    reset_ddp_,
    wrap_ddp,
)
from ressl.errors import CheckpointError, ConfigError, DivergedError
from ressl.eval.monitor import knn_monitor
from ressl.models.backbones import custom_spec
from ressl.models.network import ReSSL
from ressl.rules import Note, is_int
from ressl.runs.checkpoint import (
    TrainState,
    load_checkpoint,
    read_metadata,
    resolve_checkpoint,
    restore_state,
    save_state,
)
from ressl.runs.checks import check_file, check_resumable, metadata_json
from ressl.runs.folder import CHECKPOINT, METRICS, read_metrics, write_metrics
from ressl.runs.lock import hold_run_folder
from ressl.runs.position import Position
from ressl.schedules import cosine_lr, momentum_schedule
from ressl.training.compiled import WARMUP_STEPS, Compiled, StepSnapshot, compile_step
from ressl.training.fits import check_fits, training_memory
from ressl.training.step import EncodeCrops, training_step
from ressl.training.steplog import RunLog, require_tensorboard
from ressl.training.stopping import StopAgreement, Stopped
from ressl.views import StrongView, WeakView
from ressl.views.plan import CropPlan

__all__ = ["train", "DivergedError", "TrainEvent"]

log = logging.getLogger("ressl")


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


def _exempt(name: str, param: Tensor, rule: str) -> bool:
    """No weight decay: every 1-D parameter (``1d``), or those whose names contain "bn" or
    "bias" (``names``, the official ImageNet code's rule)."""
    return param.ndim <= 1 if rule == "1d" else ("bn" in name or "bias" in name)


def _param_groups(model: nn.Module, weight_decay: float, rule: str) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not _exempt(n, p, rule)]
    no_decay = [p for n, p in named if _exempt(n, p, rule)]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _sgd(
    groups: list[dict[str, Any]], lr: float, config: TrainConfig, world: World
) -> torch.optim.SGD:
    """SGD with the update kernel of ``sgd_kernel``; where fused is not supported (a device or
    dtype without the kernel: PyTorch would refuse it only at the first step), foreach,
    with one warning."""
    kw: dict[str, Any] = dict(lr=lr, momentum=config.sgd_momentum, nesterov=config.nesterov)
    if config.sgd_kernel == "default":
        return torch.optim.SGD(groups, **kw)
    params = [p for g in groups for p in g["params"]]
    try:  # a private helper of torch >= 2.2; the devices it names have the kernel
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = _get_fused_kernels_supported_devices()
    except ImportError:
        supported = ["cuda", "cpu"]
    unfit = next(
        (p for p in params if p.device.type not in supported or not p.is_floating_point()), None
    )
    if config.sgd_kernel == "fused" and unfit is None:
        return torch.optim.SGD(groups, **kw, fused=True)
    if config.sgd_kernel == "fused" and unfit is not None and world.main:
        log.warning(
            "fused SGD has no kernel for %s %s parameters; using foreach",
            unfit.dtype,
            unfit.device.type,
        )
    return torch.optim.SGD(groups, **kw, foreach=True)


@dataclass
class _Run:
    """A built run: everything the epochs need, and the state they change."""

    config: TrainConfig
    world: World
    device: torch.device
    amp: torch.dtype | None
    data: ImageData
    source: ImageSource  # the training split, on the device when it fits there
    plan: CropPlan
    student_view: StrongView
    teacher_view: WeakView | StrongView
    student: nn.Module  # the student's forward over a step's crops (DDP-wrapped when distributed)
    state: TrainState
    run_dir: Path
    settings: dict[str, Any]  # stored in checkpoints: the config and what the data told
    steps_per_epoch: int
    base_lr: float
    resave: bool = False  # write the checkpoint at the end even if no step was taken
    logs: RunLog | None = None  # steps.jsonl and TensorBoard (rank 0)
    compiled: Compiled | None = None  # the compiled networks, until the warm-up ends or fails
    teacher_fn: Any = None  # the compiled teacher forward, when compiled
    graphs: bool = False  # the step runs CUDA graphs: each step is marked as a new one

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return min(self.config.warmup_epochs * self.steps_per_epoch, self.total_steps)

    def lr(self, step: int) -> float:
        """The learning rate of ``step`` (warm-up, then cosine)."""
        return cosine_lr(
            step,
            self.total_steps,
            self.base_lr,
            self.warmup_steps,
            warmup_from_zero=self.config.warmup_start == "zero",
        )

    def event(self, kind: str, **fields: Any) -> TrainEvent:
        s = self.state
        return TrainEvent(
            kind,
            s.epoch,
            s.step(self.steps_per_epoch),
            self.steps_per_epoch,
            self.config.epochs,
            s.batch_in_epoch,
            **fields,
        )

    def save(self) -> Path:
        """The checkpoint of the current state (a collective when distributed), refused when a
        weight is not finite."""
        bad = _non_finite(self.state.model)
        if bad is not None:
            raise self.diverged(
                f"{bad} is not finite after step {self.state.step(self.steps_per_epoch)}"
            )
        return save_state(
            self.run_dir / CHECKPOINT,
            self.state,
            settings=self.settings,
            steps_per_epoch=self.steps_per_epoch,
            world=self.world,
        )

    def diverged(self, what: str) -> DivergedError:
        """The error that stops a diverged run: what went wrong, what was kept, what to try."""
        c, path = self.config, self.run_dir / CHECKPOINT
        kept = (
            f"{path} keeps the last finite state" if path.exists() else "no checkpoint was written"
        )
        fp32 = ", {precision} fp32" if self.amp is not None else ""
        return DivergedError(
            f"training diverged: {what}; nothing of it was saved ({kept}). Try a lower {{lr}} "
            f"(now {c.lr:g}){fp32}, or a higher {{student_temperature}} "
            f"(now {c.student_temperature:g}), then train again",
            "lr",
            "student_temperature",
            *(["precision"] if fp32 else []),
        )

    def batches(self) -> Iterator[tuple[Tensor | list[Tensor], Tensor]]:
        """The rest of the epoch in progress; streamed folders are cropped in the workers."""
        c, s = self.config, self.state
        kw: dict[str, Any] = dict(
            epoch=s.epoch,
            seed=c.seed,
            device=self.device,
            start=s.batch_in_epoch,
            num_workers=c.num_workers,
            shard=(self.world.rank, self.world.size),
        )
        if isinstance(self.source, FolderImages):
            decode = decode_place(c.decode, self.device)  # auto: probes the device's decoder
            return self.source.crop_batches(
                c.batch_size, self.plan.worker_crops, **kw, decode=decode
            )
        return self.source.batches(c.batch_size, **kw)  # type: ignore[return-value]

    def step(self, batch: Tensor | list[Tensor], lr: float, momentum: float) -> Tensor:
        """One optimisation step on a batch (whole images, or crops cut in the workers)."""
        c = self.config
        view_kw: dict[str, Any] = dict(
            generator=self.state.views,
            mean=self.data.mean,
            std=self.data.std,
            student=self.student_view,
            teacher=self.teacher_view,
        )
        if isinstance(batch, Tensor):
            x_t, x_s = self.plan.views(batch, **view_kw)
        else:
            x_t, x_s = self.plan.views_of_crops(batch, **view_kw)
        if c.channels_last:
            x_t = [x.contiguous(memory_format=torch.channels_last) for x in x_t]
            x_s = [x.contiguous(memory_format=torch.channels_last) for x in x_s]
        for group in self.state.optimizer.param_groups:
            group["lr"] = lr
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead
        return training_step(
            self.state.model,
            self.state.optimizer,
            x_t,
            x_s,
            momentum=momentum,
            student_temperature=c.student_temperature,
            teacher_temperature=c.teacher_temperature,
            symmetric=self.plan.symmetric,
            autocast_dtype=self.amp,
            student=self.student,
            gather=all_gather_cat if self.world.distributed else None,
            teacher_bn=c.teacher_bn,
            teacher=self.teacher_fn,
        )

    def warmup_step(self, batch: Tensor | list[Tensor], lr: float, momentum: float) -> Tensor:
        """A step of a compiled run's warm-up (compile, CUDA-graph capture, first replay:
        ``WARMUP_STEPS``), its time logged at the end. When it fails, the state goes back to
        where the step started (``StepSnapshot``) and the run trains eager from this step on,
        with one warning; so no step is taken twice."""
        compiled = self.compiled
        assert compiled is not None
        self.student, self.teacher_fn = compiled.student, compiled.teacher
        self.graphs = compiled.graphs
        step = self.state.step(self.steps_per_epoch) + 1
        before = StepSnapshot.take(self.state)
        t = time.perf_counter()
        try:
            loss = self.step(batch, lr, momentum)
            float(loss)  # the compiled graphs have run
        except Exception as e:  # noqa: BLE001 - dynamo, inductor and CUDA graphs raise many kinds
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if self.world.main:
                log.warning(
                    "torch.compile failed at step %d (%s: %s); training eager from its start",
                    step,
                    type(e).__name__,
                    first,
                )
            before.restore_(self.state)
            reset_ddp_(compiled.eager_student)  # a backward may have failed part-way
            torch.compiler.reset()  # frees the compiled graphs and their CUDA-graph memory pool
            self.compiled, self.student, self.teacher_fn, self.graphs = (
                None,
                compiled.eager_student,
                None,
                False,
            )
            return self.step(batch, lr, momentum)
        compiled.seconds += time.perf_counter() - t
        compiled.warmup_left -= 1
        if compiled.warmup_left == 0:
            self.compiled = None
            if self.world.main:
                log.info(
                    "compiled the step in %.1f s (its first %d steps, kept out of images/s)",
                    compiled.seconds,
                    WARMUP_STEPS,
                )
        return loss


def _compiled(
    config: TrainConfig, device: torch.device, student: nn.Module, teacher: nn.Module
) -> Compiled | None:
    """The step's networks under ``torch.compile`` when ``compile`` says so (auto: CUDA)."""
    if config.compile == "off" or (config.compile == "auto" and device.type != "cuda"):
        return None
    return compile_step(student, teacher, config.compile_mode)


class _Window:
    """The steps between two host syncs: their losses stay on the device until ``flush``."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss: Tensor, images: int) -> None:
        self.losses.append(loss)
        self.images += images

    def flush(self, run: _Run) -> tuple[float, float, float]:
        """Add the window's losses to the epoch's; ``(last loss, mean loss, images per second)``.

        Raises:
            DivergedError: a loss is not finite (on any rank, when distributed).
        """
        state = run.state
        losses = torch.stack(self.losses).tolist()  # the one host sync per window
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if any_rank(bad is not None, run.device):  # every rank stops together
            if bad is None:
                raise run.diverged("the loss is not finite on another process")
            step = state.step(run.steps_per_epoch) - len(losses) + bad + 1
            raise run.diverged(
                f"the loss is {losses[bad]} at step {step} (epoch {state.epoch + 1}, batch "
                f"{state.batch_in_epoch - len(losses) + bad + 1})"
            )
        state.loss_sum += sum(losses)
        state.loss_count += len(losses)
        now = time.perf_counter()
        ips = self.images / max(now - self.start, 1e-9)
        self.losses, self.images, self.start = [], 0, now
        return losses[-1], sum(losses) / len(losses), ips


def _non_finite(model: nn.Module) -> str | None:
    """The name of the first weight or buffer holding a NaN or an infinity (one host sync)."""
    named = [(n, t) for n, t in model.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return next((n for (n, _), ok in zip(named, finite) if not ok), None)


def _build(
    config: TrainConfig,
    world: World,
    run_dir: Path,
    module: nn.Module | None = None,
    given: set[str] | None = None,
) -> _Run:
    """Phase 1: data, model, optimiser, crop plan and a fresh state, from the config.

    A new run's defaults that cannot fit its data are fitted to it (``given``: the settings
    the user set, kept; ``TrainConfig.fit_data``); a resumed one (``given`` None) keeps its
    checkpoint's. The order of random draws (weights, queue, generators) is fixed: resumed
    and distributed runs depend on it, which is why the build stays in one function.
    """
    if config.log == "tensorboard":
        require_tensorboard()  # on every rank, before anything is loaded
    device = select_device(world.device(config.device))
    amp = autocast_dtype(config.precision, device)
    data = load_dataset(
        config.dataset,
        root=config.data_root,
        download=config.download,
        image_size=config.image_size,
        subset=config.subset,
        channels=config.channels,
    )
    if config.channels is not None and config.channels != data.channels:
        raise ConfigError(
            f"{{channels}} {config.channels}: {data.name} has {data.channels}-channel images "
            "(a built-in dataset keeps its own; the setting converts image folders)",
            "channels",
        )
    plan = CropPlan.build(
        data.image_size, config.crop_scale, config.crops, config.crop_scales, config.symmetric
    )
    fitted: list[Note] = []
    if given is not None:
        config, fitted = config.fit_data(len(data.train), given, world.size)
    notes = config.check_data(len(data.train), world.size)  # errors first, then the notes
    _check_memory(config, data, plan, device, amp, world, module)  # before data moves to device
    if world.main:
        for note in config.notes() + notes:
            log.warning("%s", note)
        for note in fitted:
            log.info("fitted to the data: %s", note)
    source = data.train.to(device) if isinstance(data.train, TensorImages) else data.train
    if data.memory is data.train:
        data.memory = source  # the kNN monitor's memory bank is the training split
    settings = {
        **config.to_dict(),
        "image_size": data.image_size,
        "channels": data.channels,
        "mean": list(data.mean),
        "std": list(data.std),
        "num_classes": len(data.classes),
    }
    if data.files is not None:  # which files a folder held: a resume compares them
        settings["data_files"], settings["data_digest"] = data.files
    torch.manual_seed(config.seed)  # the same initial weights and queue on every rank
    net = config.backbone if module is None else copy.deepcopy(module)  # never the caller's
    model = ReSSL(
        net,
        in_channels=data.channels,
        image_size=data.image_size,
        hidden_dim=config.hidden_dim,
        embed_dim=config.embed_dim,
        queue_size=config.queue_size,
        width=config.width,
        generator=torch.Generator().manual_seed(config.seed + 1),
    ).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    student: nn.Module = EncodeCrops(model.student)
    if world.distributed:
        # batch statistics over the global batch, student and teacher
        convert_batchnorm(model, batchnorm_for(torch.distributed.get_backend()))
        student = wrap_ddp(student, device)
    base_lr = config.lr * config.batch_size / 256  # lr is per 256 images
    groups = _param_groups(model.student, config.weight_decay, config.decay_exempt)
    optimizer = _sgd(groups, base_lr, config, world)
    # each rank draws its own augmentations; rank 0's stream is the single-process one
    views = torch.Generator(device=device).manual_seed(_view_seed(config, world))
    strong = StrongView(
        jitter=config.jitter,
        jitter_p=config.jitter_p,
        grayscale_p=config.grayscale_p,
        blur_p=config.blur,
        blur_mode=config.blur_mode,
    )
    teacher = strong if config.teacher_view == "strong" else WeakView()
    return _Run(
        config,
        world,
        device,
        amp,
        data,
        source,
        plan,
        strong,
        teacher,
        student,
        TrainState(model, optimizer, views),
        run_dir,
        settings,
        steps_per_epoch=len(data.train) // config.batch_size,
        base_lr=base_lr,
        compiled=_compiled(config, device, student, model.teacher),
    )


def _check_memory(
    config: TrainConfig,
    data: ImageData,
    plan: CropPlan,
    device: torch.device,
    amp: torch.dtype | None,
    world: World,
    module: nn.Module | None,
) -> None:
    """Refuse a backbone that cannot take the data, and settings that cannot fit in the
    device's memory, before the model is built (on the meta device)."""
    sides = [side for side, _ in plan.student]  # symmetric: both views
    held = data.train.images.numel() if isinstance(data.train, TensorImages) else 0
    try:
        estimate = training_memory(
            backbone=config.backbone if module is None else module,
            channels=data.channels,
            image_size=data.image_size,
            width=config.width,
            hidden_dim=config.hidden_dim,
            embed_dim=config.embed_dim,
            queue_size=config.queue_size,
            batch_per_process=config.batch_size // world.size,
            student_sides=sides,
            autocast=amp is not None,
            data_bytes=held,
        )
    except ConfigError:
        raise
    except ValueError as e:  # the backbone's own words: "timm:x needs timm ...", "... cannot take"
        raise ConfigError(f"{{backbone}} {e}", "backbone") from None
    except (RuntimeError, AssertionError) as e:  # a crop side the backbone cannot take
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{{backbone}} {config.backbone} cannot take the crops of {{crops}} "
            f"{', '.join(map(str, sides))}: {first}",
            "backbone",
            "crops",
        ) from None
    check_fits(estimate, device)


def _view_seed(config: TrainConfig, world: World) -> int:
    return config.seed + 2 + 1_000_003 * world.rank


def _restore(run: _Run, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Phase 2 (resuming): the checkpoint's state, then the metrics rows it had written."""
    batch = int(meta["batch_in_epoch"])
    if batch >= run.steps_per_epoch:
        raise CheckpointError(
            f"{run.run_dir / CHECKPOINT} stopped after batch {batch} of an epoch, but the data "
            f"now makes {run.steps_per_epoch} batches per epoch; it cannot be resumed on it"
        )
    try:
        restore_state(
            run.state, tensors, meta, world=run.world, reseed=_view_seed(run.config, run.world)
        )
    except CheckpointError as e:
        raise CheckpointError(f"{run.run_dir / CHECKPOINT}: {e}") from None
    if run.world.main:
        log.info(
            "resuming %s at epoch %d, batch %d",
            run.run_dir,
            run.state.epoch,
            run.state.batch_in_epoch,
        )


def _open_folder(run: _Run, saved_row: dict[str, Any] | None = None) -> None:
    """The run folder and its metrics, made to agree with the state: one row per finished
    epoch, each once. A resumed run's later rows belong to a future it will write again;
    the checkpoint's own last row (``saved_row``) stands for its epoch (it fills in for one
    that a stop between the checkpoint's rename and the metrics file's never wrote). A line that is not a row (a
    damaged file) is dropped with a warning: the checkpoint is the truth, and the file is
    rewritten from the rows kept."""

    def damaged(problem: str) -> None:
        if run.world.main:
            log.warning("%s; dropping it (the file is rewritten)", problem)

    rows: dict[int, dict[str, Any]] = {
        row["epoch"]: row
        for row in read_metrics(run.run_dir / METRICS, run.state.epoch, on_bad_line=damaged)
    }
    if saved_row and saved_row.get("epoch") == run.state.epoch:
        rows[run.state.epoch] = saved_row
    run.state.rows = [rows[e] for e in sorted(rows)]
    missing = sorted(set(range(1, run.state.epoch + 1)) - set(rows))
    if run.world.main:
        if missing:
            log.warning(
                "%s has no rows for epochs %s", run.run_dir / METRICS, ", ".join(map(str, missing))
            )
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.logs = RunLog(
            run.run_dir,
            run.state.step(run.steps_per_epoch),
            tensorboard=run.config.log == "tensorboard",
        )
        write_metrics(run.run_dir / METRICS, run.state.rows)


def _epochs(run: _Run, notify: Callable[[TrainEvent], None]) -> Path:
    """Phase 3: epoch after epoch until the last, or until a stop (saved, then re-raised)."""
    c, world = run.config, run.world
    notify(run.event("start"))
    if world.main:
        d = run.data
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
    try:
        return _train_epochs(run, notify)
    finally:
        if run.logs is not None:
            run.logs.close()


def _train_epochs(run: _Run, notify: Callable[[TrainEvent], None]) -> Path:
    """The epochs, then the end (or a stop: saved, then re-raised)."""
    c, state, world = run.config, run.state, run.world
    saved = False
    with StopAgreement(world, run.device) as stop:
        while state.epoch < c.epochs and not stop.agree():
            done = _epoch(run, stop, notify)
            if done is None:  # interrupted mid-epoch
                break
            _end_epoch(run, *done, notify)
            saved = True
        if stop.stopping and state.epoch < c.epochs:
            path = run.save()
            if world.main:
                where = Position(state.epoch, state.batch_in_epoch, run.steps_per_epoch, c.epochs)
                log.warning(
                    "interrupted at %s: saved %s; continue with --resume %s",
                    where,
                    path,
                    run.run_dir,
                )
            notify(run.event("end", metrics={"interrupted": True}))
            raise Stopped(stop.signum or signal.SIGINT, str(path))
    return _end(run, saved, notify)


def _epoch(
    run: _Run, stop: StopAgreement, notify: Callable[[TrainEvent], None]
) -> tuple[int, float, float, float] | None:
    """The batches of one epoch; ``(images, seconds, last lr, last EMA momentum)``, or None
    when a stop came first."""
    c, state, world = run.config, run.state, run.world
    state.model.train()
    t_epoch, seen, window = time.perf_counter(), 0, _Window()
    lr = momentum = 0.0
    for images, labels in run.batches():
        step = state.step(run.steps_per_epoch)
        lr = run.lr(step)
        momentum = momentum_schedule(step, run.total_steps, c.ema_momentum, c.momentum_schedule)
        if run.compiled is not None:  # compile and capture time are kept out of images/s
            t = time.perf_counter()
            window.add(run.warmup_step(images, lr, momentum), 0)
            t_epoch += time.perf_counter() - t
            window.start += time.perf_counter() - t
            seen -= labels.shape[0] * world.size
        else:
            window.add(run.step(images, lr, momentum), labels.shape[0] * world.size)
        state.batch_in_epoch += 1
        seen += labels.shape[0] * world.size  # images of the global batch
        ends = len(window.losses) >= c.progress_every or state.batch_in_epoch == run.steps_per_epoch
        if ends or stop.flush_now:  # distributed ranks end windows together, and agree there
            stop.agree()
            _flush(run, window, lr, momentum, notify)
        if stop.after_step():
            break
    if window.losses:  # a stop that came between the window check and the break
        _flush(run, window, lr, momentum, notify)
    if state.batch_in_epoch < run.steps_per_epoch:
        return None
    return seen, time.perf_counter() - t_epoch, lr, momentum


def _flush(
    run: _Run, window: _Window, lr: float, momentum: float, notify: Callable[[TrainEvent], None]
) -> None:
    """A progress window's end: its losses checked, its row logged, the progress event."""
    loss, mean, ips = window.flush(run)
    if run.logs is not None:
        s = run.state
        run.logs.window(
            {
                "step": s.step(run.steps_per_epoch),
                "epoch": round(s.epoch + s.batch_in_epoch / run.steps_per_epoch, 6),
                "loss": mean,
                "lr": lr,
                "ema_momentum": momentum,
                "images_per_second": round(ips, 2),
            }
        )
    notify(run.event("step", loss=loss, images_per_second=ips))


def _end_epoch(
    run: _Run,
    seen: int,
    seconds: float,
    lr: float,
    momentum: float,
    notify: Callable[[TrainEvent], None],
) -> None:
    """An epoch's metrics row (with the kNN monitor when due), checkpoint and metrics file."""
    c, state = run.config, run.state
    epoch = state.epoch + 1
    row: dict[str, Any] = {
        "epoch": epoch,
        "step": epoch * run.steps_per_epoch,
        "loss": state.loss_sum / max(state.loss_count, 1),
        "lr": lr,
        "ema_momentum": momentum,
        "images_per_second": round(seen / max(seconds, 1e-9), 2),
        "epoch_seconds": round(seconds, 3),
    }
    every = c.knn_every
    if every >= 0 and ((every and epoch % every == 0) or epoch == c.epochs):
        model = run.state.model
        row.update(knn_monitor(model.student, run.data, c, run.device, run.amp, run.world))
    state.next_epoch(row)
    run.save()
    if run.world.main:
        write_metrics(run.run_dir / METRICS, state.rows)
        if run.logs is not None:
            run.logs.epoch(row)
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


def _end(run: _Run, saved: bool, notify: Callable[[TrainEvent], None]) -> Path:
    """Phase 4: the final checkpoint (written now if this call trained nothing) and the end event."""
    path = run.run_dir / CHECKPOINT
    if not saved and (run.resave or not path.exists()):
        path = run.save()
    notify(run.event("end", metrics=run.state.rows[-1] if run.state.rows else {}))
    return path


def _replan(run: _Run, planned: int) -> None:
    """A resume with other ``epochs`` than planned re-plans the schedules over the new total:
    said, with the lr it changes (fewer epochs than done were refused by ``_resume_config``)."""
    c, s, spe = run.config, run.state, run.steps_per_epoch
    if s.epoch == c.epochs:  # (and no batch of another epoch: refused before)
        run.resave = c.epochs != planned  # the checkpoint then says its run ends here
        if run.world.main:
            log.warning(
                "%s has finished its %d epochs; nothing to train (a higher %s extends it)",
                run.run_dir,
                c.epochs,
                Note("{epochs}", "epochs"),
            )
    elif c.epochs != planned and run.world.main:
        step, warmup = s.step(spe), c.warmup_epochs * spe
        old = cosine_lr(
            step,
            planned * spe,
            run.base_lr,
            min(warmup, planned * spe),
            warmup_from_zero=c.warmup_start == "zero",
        )
        new = run.lr(step)
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
            new,
            old,
            planned,
        )


def _check_not_fewer(epochs: int, done: int, batches: int, run_dir: Path) -> None:
    if epochs < done or (epochs == done and batches):
        trained = f"{done} epochs" + (f" and {batches} batches" if batches else "")
        raise ConfigError(
            f"{{epochs}} {epochs} is fewer than {run_dir} has trained ({trained}); give "
            f"{{epochs}} {done + (1 if batches else 0)} or more to continue it",
            "epochs",
        )


def _resume_config(
    file: Path, given: dict[str, Any], module: nn.Module | None
) -> tuple[TrainConfig, dict[str, Tensor], dict[str, str], int]:
    """The config, tensors and metadata of the checkpoint a resume continues, each checked
    before use (``ressl.runs.checks``), and the epochs it was planned for."""
    saved = metadata_json(file, read_metadata(file), "settings", dict).get("backbone")
    if isinstance(saved, str) and saved.startswith("custom:") and module is None:
        raise ConfigError(
            f"{file.parent} was trained with a module given through the API ({saved}); "
            "continue it there: ressl.train(resume=..., backbone=module)"
        )
    checked = check_file(file, module)
    tensors, meta = load_checkpoint(file)
    check_resumable(checked, tensors)
    config = TrainConfig.from_saved(checked.settings, given).replace(out=str(file.parent))
    _check_not_fewer(config.epochs, int(meta["epoch"]), int(meta["batch_in_epoch"]), file.parent)
    planned = checked.settings.get("epochs", config.epochs)
    return config, tensors, meta, planned if is_int(planned) else config.epochs


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
    **settings: Any,
) -> Path:
    """Pre-train an encoder with ReSSL and return the path of the final checkpoint.

    (Most of its length is this docstring; a resume is handed to ``_continue``.)

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
        run_dir, device = file.parent, settings.get("device") or _saved_device(file)
    else:
        custom = {} if module is None else {"backbone": custom_spec(module)}
        cfg = (
            config.replace(**custom)
            if config is not None
            else TrainConfig.from_keywords(**settings, **custom)
        )
        given = _given(cfg, config, settings)
        cfg = cfg.replace(out=str(cfg.run_dir))
        run_dir, device = cfg.run_dir, cfg.device
    world = World.join(device)
    try:
        with _held(run_dir, world, resuming=resume is not None):
            world.barrier()  # the other ranks read the checkpoint once rank 0 holds the folder
            if resume is not None:
                return _continue(file, settings, world, notify, module)
            if (run_dir / CHECKPOINT).exists():
                raise ConfigError(
                    f"{run_dir} already holds a run (last.safetensors); continue it with "
                    f"--resume {run_dir} or choose another {{out}}",
                    "out",
                )
            run = _build(cfg, world, run_dir, module, given)
            _open_folder(run)
            return _epochs(run, notify)
    finally:
        world.leave()


def _continue(
    file: Path,
    given: dict[str, Any],
    world: World,
    notify: Callable[[TrainEvent], None],
    module: nn.Module | None,
) -> Path:
    """A resumed run, in the folder this process holds: checked, restored, re-planned, trained."""
    cfg, state, meta, planned = _resume_config(file, given, module)
    run = _build(cfg, world, file.parent, module)
    _check_same_files(run, metadata_json(file, meta, "settings", dict))
    _restore(run, state, meta)
    _replan(run, planned)
    _open_folder(run, metadata_json(file, meta, "metrics", dict, default={}) or None)
    return _epochs(run, notify)


def _given(cfg: TrainConfig, config: TrainConfig | None, keywords: dict[str, Any]) -> set[str]:
    """The settings a new run's user chose (kept as given; the rest may be fitted to the
    data): the keywords given, or a config's values that differ from its dataset's defaults."""
    if config is None:
        return {k for k, v in keywords.items() if v is not None}
    defaults = TrainConfig(dataset=cfg.dataset, image_size=cfg.image_size).to_dict()
    return {k for k, v in cfg.to_dict().items() if v != defaults[k]}


def _check_same_files(run: _Run, saved: dict[str, Any]) -> None:
    """Say so when an image folder's training files are not those the checkpoint's run
    trained on (files added, removed, renamed or moved between classes). The run goes on
    with the files there now, which may be what the user wants (more data); a checkpoint
    from before ressl recorded them (``data_files`` and ``data_digest`` in its settings)
    is not compared."""
    then = (saved.get("data_files"), saved.get("data_digest"))
    now = run.data.files
    if now is None or not is_int(then[0]) or not isinstance(then[1], str) or now == then:
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


def _saved_device(file: Path) -> str:
    """The device a checkpoint's run trained on (what ``World.join`` needs to pick a backend)."""
    device = metadata_json(file, read_metadata(file), "settings", dict).get("device", "auto")
    return device if isinstance(device, str) else "auto"


def _held(run_dir: Path, world: World, *, resuming: bool) -> AbstractContextManager[Any]:
    """The run folder, held by this run (rank 0 holds it for all when distributed)."""
    return hold_run_folder(run_dir, resuming=resuming) if world.main else nullcontext()
