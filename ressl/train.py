"""The ReSSL trainer: one function whose keyword arguments are the whole configuration.

``train()`` composes the functional pieces top to bottom: views -> student and
EMA teacher -> relation loss against the queue -> SGD step -> enqueue -> log ->
checkpoint. Settings left as ``None`` take the per-dataset defaults of the
paper (``DATASET_DEFAULTS``); the resolved settings are stored in every
checkpoint, so ``train(resume=run_dir)`` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .crops import CropPlan
from .data import FolderImages, ImageData, ImageSource, load_dataset, source_part
from .distributed import (
    World,
    all_gather_cat,
    all_gather_rows,
    any_rank,
    convert_batchnorm,
    wrap_ddp,
)
from .evaluate import extract_features, knn_accuracy
from .functional import cosine_lr, momentum_schedule
from .model import ReSSL
from .runs import CHECKPOINT, METRICS, read_metrics, write_metrics
from .step import EncodeCrops, training_step

__all__ = ["train", "TrainEvent", "select_device"]

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


def select_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; otherwise the named device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    if precision == "bf16" and not supported:
        raise ValueError(
            f"precision 'bf16' is not supported on this {device.type}; use --precision fp32"
        )
    return torch.bfloat16 if supported else None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on BatchNorm weights and biases (1-d parameters), as the paper's ImageNet recipe.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self, also_sigterm: bool = False) -> None:
        self.stop = False
        # torchrun answers Ctrl-C by sending SIGTERM to its workers: treat it as the first Ctrl-C
        self._signals = [signal.SIGINT, signal.SIGTERM] if also_sigterm else [signal.SIGINT]
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        try:
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        log.warning(
            "interrupt: stopping after this step (distributed: at the next progress window) and "
            "saving a checkpoint (Ctrl-C again to abort)"
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _knn_monitor(
    model: ReSSL,
    data: ImageData,
    s: dict[str, Any],
    device: torch.device,
    amp: torch.dtype | None,
    world: World,
) -> dict[str, float]:
    if data.memory is None or data.test is None or not data.classes:
        return {}
    encoder = model.student
    was_training = encoder.training
    encoder.eval()  # BatchNorm in eval mode: no collectives, ranks may run different batches
    kw: dict[str, Any] = dict(
        mean=data.mean,
        std=data.std,
        batch_size=512,
        device=device,
        autocast_dtype=amp,
        channels_last=s["channels_last"],
    )

    def features(source: ImageSource) -> tuple[Tensor, Tensor]:
        n = len(source)
        if not world.distributed or n < world.size:
            return extract_features(encoder.features, source, **kw)
        # each rank extracts its contiguous part; the parts are gathered in rank order
        part = source_part(source, n * world.rank // world.size, n * (world.rank + 1) // world.size)
        f, y = extract_features(encoder.features, part, **kw)
        return all_gather_rows(f), all_gather_rows(y)

    mem_f, mem_y = features(data.memory)
    test_f, test_y = features(data.test)
    encoder.train(was_training)
    acc = knn_accuracy(
        mem_f, mem_y, test_f, test_y, len(data.classes), s["knn_k"], s["knn_temperature"]
    )
    return {f"knn_{k}": round(v, 4) for k, v in acc.items()}


def _rng_tensors(view_gen: torch.Generator, world: World) -> dict[str, Tensor]:
    """The generators' states; distributed, every rank's view generator (a collective)."""
    out = {"rng.views": view_gen.get_state(), "rng.torch": torch.get_rng_state()}
    if world.distributed:
        states: list[Any] = [None] * world.size
        torch.distributed.all_gather_object(states, view_gen.get_state())
        out.update({f"rng.views.rank{r}": state for r, state in enumerate(states) if r > 0})
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def _resume_config(
    resume: str | Path, given: dict[str, Any]
) -> tuple[TrainConfig, dict[str, Tensor], dict[str, str], Path]:
    file = resolve_checkpoint(resume)
    tensors, meta = load_checkpoint(file)
    try:
        saved = json.loads(meta["settings"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{file} holds no training settings; it cannot be resumed") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: its settings are not a JSON object; it cannot be resumed")
    config = TrainConfig.from_saved(saved).resumed(given).replace(out=str(file.parent))
    return config, tensors, meta, file.parent


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
    **settings: Any,
) -> Path:
    """Pre-train an encoder with ReSSL and return the path of the final checkpoint.

    The configuration is ``config`` (a :class:`ressl.config.TrainConfig`) or, config-free,
    the keyword arguments: every field of ``TrainConfig`` is a keyword (``ressl train
    --help`` lists them), ``None`` means the default, and the dataset's recipe fills the
    rest (``ressl.datasets``). The main ones: ``dataset`` ("fashion-mnist", "cifar10",
    "cifar100", "stl10", "folder:PATH", "imagenet:PATH"), ``epochs`` (the total, also when
    resuming), ``batch_size``, ``backbone``, ``out`` (run folder), ``queue_size``,
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
    if config is not None and (settings or resume is not None):
        raise TypeError("pass either config or keyword settings (or resume=), not both")
    if resume is not None:
        cfg, state, meta, run_dir = _resume_config(resume, settings)
    else:
        cfg = config if config is not None else TrainConfig.from_keywords(**settings)
        state, meta = {}, {}
        run_dir = cfg.run_dir
        if (run_dir / CHECKPOINT).exists():
            raise ConfigError(
                f"{run_dir} already holds a run (last.safetensors); continue it with --resume "
                f"{run_dir} or choose another {{out}}",
                "out",
            )
        cfg = cfg.replace(out=str(run_dir))
    world = World.join(cfg.device)
    try:
        return _run(world, cfg, state, meta, run_dir, resume is not None, notify)
    finally:
        world.leave()


def _run(
    world: World,
    cfg: TrainConfig,
    state: dict[str, Tensor],
    meta: dict[str, str],
    run_dir: Path,
    resuming: bool,
    notify: Callable[[TrainEvent], None],
) -> Path:
    s = cfg.to_dict()
    per_rank = s["batch_size"] // world.size
    device = select_device(world.device(s["device"]))
    amp = _autocast_dtype(s["precision"], device)
    data = load_dataset(
        s["dataset"],
        root=s["data_root"],
        download=s["download"],
        image_size=s["image_size"],
        subset=s["subset"],
    )
    s.update(
        image_size=data.image_size,
        channels=data.channels,
        mean=list(data.mean),
        std=list(data.std),
        num_classes=len(data.classes),
    )
    n_train = len(data.train)
    for note in cfg.notes() + cfg.check_data(n_train, world.size):
        if world.main:
            log.warning("%s", note)
    train_source = data.train.to(device) if hasattr(data.train, "to") else data.train
    if hasattr(data.memory, "to") and data.memory is data.train:
        data.memory = train_source
    steps_per_epoch = n_train // s["batch_size"]
    total_steps = s["epochs"] * steps_per_epoch
    warmup_steps = min(s["warmup_epochs"] * steps_per_epoch, total_steps)
    base_lr = s["lr"] * s["batch_size"] / 256

    torch.manual_seed(s["seed"])  # the same initial weights and queue on every rank
    model = ReSSL(
        s["backbone"],
        in_channels=data.channels,
        image_size=data.image_size,
        hidden_dim=s["hidden_dim"],
        embed_dim=s["embed_dim"],
        queue_size=s["queue_size"],
        width=s["width"],
        generator=torch.Generator().manual_seed(s["seed"] + 1),
    ).to(device)
    if s["channels_last"]:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    student: nn.Module = EncodeCrops(model.student)
    if world.distributed:
        convert_batchnorm(model)  # batch statistics over the global batch, student and teacher
        student = wrap_ddp(student, device)
    optimizer = torch.optim.SGD(
        _param_groups(model.student, s["weight_decay"]), lr=base_lr, momentum=s["sgd_momentum"]
    )
    # each rank draws its own augmentations; rank 0's stream is the single-process one
    view_gen = torch.Generator(device=device).manual_seed(s["seed"] + 2 + 1_000_003 * world.rank)

    epoch, batch_in_epoch, loss_sum, loss_count = 0, 0, 0.0, 0
    metrics_path = run_dir / METRICS
    if resuming:
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        load_optimizer_tensors(optimizer, state, meta["optimizer"])
        rng_key = "rng.views" if world.rank == 0 else f"rng.views.rank{world.rank}"
        saved_world = int(meta.get("world_size", "1"))
        if (
            meta.get("rng_device", "cpu") == device.type
            and saved_world == world.size
            and rng_key in state
        ):
            view_gen.set_state(state[rng_key])
        else:  # a generator's state does not carry across device types or world sizes
            if world.main:
                log.warning(
                    "checkpoint was written by %d process(es) on %s, resuming with %d on %s: "
                    "augmentations are reseeded, so the run continues correctly but not "
                    "bitwise-identically",
                    saved_world,
                    meta.get("rng_device"),
                    world.size,
                    device.type,
                )
            view_gen.manual_seed(s["seed"] + 2 + 1_000_003 * world.rank + int(meta["step"]))
        torch.set_rng_state(state["rng.torch"])
        if "rng.cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng.cuda"])
        epoch, batch_in_epoch = int(meta["epoch"]), int(meta["batch_in_epoch"])
        loss_sum, loss_count = float(meta["epoch_loss_sum"]), int(meta["epoch_loss_count"])
        if world.main:
            log.info("resuming %s at epoch %d, batch %d", run_dir, epoch, batch_in_epoch)
    rows = read_metrics(metrics_path, epoch)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(metrics_path, rows)

    plan = CropPlan.build(
        data.image_size, s["crop_scale"], s["crops"], s["crop_scales"], s["symmetric"]
    )
    strong_kw: dict[str, Any] = dict(
        jitter=s["jitter"], jitter_p=s["jitter_p"], grayscale_p=s["grayscale_p"], blur_p=s["blur"]
    )
    view_kw: dict[str, Any] = dict(
        generator=view_gen,
        mean=data.mean,
        std=data.std,
        strong=strong_kw,
        teacher_view=s["teacher_view"],
    )
    # Streamed folders (FolderImages) are cropped in the DataLoader workers from the full-resolution files.

    def checkpoint() -> Path:
        rng = _rng_tensors(
            view_gen, world
        )  # a collective when distributed: every rank calls checkpoint()
        path = run_dir / CHECKPOINT
        if not world.main:
            return path
        opt_tensors, opt_blob = optimizer_tensors(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(opt_tensors)
        tensors.update(rng)
        step = epoch * steps_per_epoch + batch_in_epoch
        return save_checkpoint(
            path,
            tensors,
            {
                "world_size": str(world.size),
                "settings": json.dumps(s),
                "optimizer": opt_blob,
                "epoch": str(epoch),
                "batch_in_epoch": str(batch_in_epoch),
                "step": str(step),
                "epoch_loss_sum": repr(loss_sum),
                "epoch_loss_count": str(loss_count),
                "metrics": json.dumps(rows[-1] if rows else {}),
                "rng_device": device.type,
            },
        )

    def step_fn(batch: Tensor | list[Tensor], lr: float, momentum: float) -> Tensor:
        if isinstance(batch, Tensor):
            x_t, x_s = plan.views(batch, **view_kw)
        else:
            x_t, x_s = plan.views_of_crops(batch, **view_kw)
        if s["channels_last"]:
            x_t = [x.contiguous(memory_format=torch.channels_last) for x in x_t]
            x_s = [x.contiguous(memory_format=torch.channels_last) for x in x_s]
        for group in optimizer.param_groups:
            group["lr"] = lr
        return training_step(
            model,
            optimizer,
            x_t,
            x_s,
            momentum=momentum,
            student_temperature=s["student_temperature"],
            teacher_temperature=s["teacher_temperature"],
            symmetric=plan.symmetric,
            autocast_dtype=amp,
            student=student,
            gather=all_gather_cat if world.distributed else None,
        )

    notify(
        TrainEvent(
            "start",
            epoch,
            epoch * steps_per_epoch + batch_in_epoch,
            steps_per_epoch,
            s["epochs"],
            batch_in_epoch,
        )
    )
    if world.main:
        log.info(
            "training %s on %s (%d images, %d steps/epoch) on %s%s%s",
            s["backbone"],
            s["dataset"],
            n_train,
            steps_per_epoch,
            device,
            " with bf16 autocast" if amp else "",
            f", {world.size} processes of {per_rank} images per step" if world.distributed else "",
        )
    saved = False
    stopping = False  # distributed: the ranks' agreed stop, updated together at epoch starts and window ends

    def agree(flag_value: bool) -> bool:
        return any_rank(flag_value, device) if world.distributed else flag_value

    with _StopFlag(also_sigterm=world.distributed) as flag:
        while epoch < s["epochs"]:
            stopping = agree(flag.stop)
            if stopping:
                break
            model.train()
            batches: Iterator[tuple[Tensor | list[Tensor], Tensor]]
            if isinstance(train_source, FolderImages):
                batches = train_source.crop_batches(
                    s["batch_size"],
                    plan.worker_crops,
                    epoch=epoch,
                    seed=s["seed"],
                    device=device,
                    start=batch_in_epoch,
                    num_workers=s["num_workers"],
                    shard=(world.rank, world.size),
                )
            else:
                batches = train_source.batches(
                    s["batch_size"],
                    epoch=epoch,
                    seed=s["seed"],
                    device=device,
                    start=batch_in_epoch,
                    num_workers=s["num_workers"],
                    shard=(world.rank, world.size),
                )
            t_epoch = time.perf_counter()
            seen, t_window, seen_window = 0, time.perf_counter(), 0
            pending: list[Tensor] = []
            for images, labels in batches:
                step = epoch * steps_per_epoch + batch_in_epoch
                lr = cosine_lr(step, total_steps, base_lr, warmup_steps)
                m = momentum_schedule(step, total_steps, s["ema_momentum"], s["momentum_schedule"])
                pending.append(step_fn(images, lr, m))
                batch_in_epoch += 1
                seen += labels.shape[0] * world.size  # images of the global batch
                seen_window += labels.shape[0] * world.size
                # Distributed ranks must agree on when to stop: they check together, at window ends.
                stop_now = flag.stop and not world.distributed
                if (
                    len(pending) >= s["progress_every"]
                    or batch_in_epoch == steps_per_epoch
                    or stop_now
                ):
                    stopping = agree(flag.stop)
                    losses = torch.stack(pending).tolist()  # the one host sync per window
                    pending.clear()
                    loss_sum += sum(losses)
                    loss_count += len(losses)
                    now = time.perf_counter()
                    ips = seen_window / max(now - t_window, 1e-9)
                    t_window, seen_window = now, 0
                    notify(
                        TrainEvent(
                            "step",
                            epoch,
                            step + 1,
                            steps_per_epoch,
                            s["epochs"],
                            batch_in_epoch,
                            losses[-1],
                            ips,
                        )
                    )
                if stopping if world.distributed else flag.stop:  # one process: at once
                    stopping = True
                    break
            if batch_in_epoch < steps_per_epoch:  # interrupted mid-epoch
                break
            elapsed = time.perf_counter() - t_epoch
            epoch += 1
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": epoch * steps_per_epoch,
                "loss": loss_sum / max(loss_count, 1),
                "lr": lr,
                "ema_momentum": m,
                "images_per_second": round(seen / max(elapsed, 1e-9), 2),
                "epoch_seconds": round(elapsed, 3),
            }
            every = s["knn_every"]
            if every >= 0 and ((every and epoch % every == 0) or epoch == s["epochs"]):
                row.update(_knn_monitor(model, data, s, device, amp, world))
            rows.append(row)
            batch_in_epoch, loss_sum, loss_count = 0, 0.0, 0
            path, saved = checkpoint(), True
            if world.main:
                write_metrics(metrics_path, rows)
            notify(
                TrainEvent(
                    "epoch",
                    epoch,
                    epoch * steps_per_epoch,
                    steps_per_epoch,
                    s["epochs"],
                    0,
                    row["loss"],
                    row["images_per_second"],
                    row,
                )
            )
        if stopping and epoch < s["epochs"]:
            path = checkpoint()
            if world.main:
                log.warning(
                    "interrupted: saved %s in epoch %d after batch %d of %d; continue with --resume %s",
                    path,
                    epoch + 1,
                    batch_in_epoch,
                    steps_per_epoch,
                    run_dir,
                )
            notify(
                TrainEvent(
                    "end",
                    epoch,
                    epoch * steps_per_epoch + batch_in_epoch,
                    steps_per_epoch,
                    s["epochs"],
                    batch_in_epoch,
                    metrics={"interrupted": True},
                )
            )
            raise KeyboardInterrupt
    path = run_dir / CHECKPOINT
    if not saved and not path.exists():  # resumed a run that had already finished
        path = checkpoint()
    notify(
        TrainEvent(
            "end",
            epoch,
            epoch * steps_per_epoch,
            steps_per_epoch,
            s["epochs"],
            metrics=rows[-1] if rows else {},
        )
    )
    return path
