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
import math
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
    save_checkpoint,
)
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
from .model import BACKBONES, ReSSL
from .step import EncodeCrops, training_step

__all__ = ["train", "resolve_settings", "DATASET_DEFAULTS", "TrainEvent", "select_device"]

log = logging.getLogger("ressl")

# Per-dataset recipe (RESSL.md; Fashion-MNIST tuned here, see docs/results.md).
# Fashion-MNIST is not in the paper: lr 0.15, 1 warm-up epoch and stronger brightness /
# contrast jitter (the only colour ops that act on grayscale) won a search over crop
# scale, lr, queue size, tau_t, blur and jitter (docs/results.md); the rest is the CIFAR recipe.
_PAPER = {
    "lr": 0.06,
    "weight_decay": 5e-4,
    "warmup_epochs": 5,
    "epochs": 200,
    "jitter": (0.4, 0.4, 0.4, 0.1),
    "backbone": "resnet18",
    "hidden_dim": 512,
    "embed_dim": 128,
    "blur": 0.0,
}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        **_PAPER,
        "queue_size": 4096,
        "ema_momentum": 0.99,
        "lr": 0.15,
        "warmup_epochs": 1,
        "epochs": 50,
        "jitter": (0.8, 0.8, 0.4, 0.1),
    },
    "cifar10": {**_PAPER, "queue_size": 4096, "ema_momentum": 0.99},
    "cifar100": {**_PAPER, "queue_size": 4096, "ema_momentum": 0.99},
    "stl10": {**_PAPER, "queue_size": 16384, "ema_momentum": 0.996},
    "folder": {**_PAPER, "queue_size": 16384, "ema_momentum": 0.996},
    # The paper's ImageNet recipe: for imagenet:PATH, and folders at 224 px or more.
    "imagenet": {
        "backbone": "resnet50",
        "hidden_dim": 4096,
        "embed_dim": 512,
        "queue_size": 131072,
        "ema_momentum": 0.999,
        "lr": 0.05,
        "weight_decay": 1e-4,
        "warmup_epochs": 5,
        "epochs": 200,
        "jitter": (0.4, 0.4, 0.4, 0.1),
        "blur": 0.5,
    },
}
#: Folder data at this side or more is ImageNet-like and gets the "imagenet" recipe.
IMAGENET_LIKE_SIZE = 224

# Settings a resumed run may change; everything else comes from the checkpoint.
_RESUMABLE_OVERRIDES = ("epochs", "device", "num_workers", "progress_every", "knn_every")

_DEFAULTS: dict[str, Any] = dict(
    dataset="fashion-mnist",
    data_root=None,
    out=None,
    epochs=None,
    batch_size=256,
    backbone=None,
    width=32,
    hidden_dim=None,
    embed_dim=None,
    queue_size=None,
    ema_momentum=None,
    momentum_schedule="constant",
    student_temperature=0.1,
    teacher_temperature=0.04,
    lr=None,
    weight_decay=None,
    sgd_momentum=0.9,
    warmup_epochs=None,
    crop_scale=(0.2, 1.0),
    crops=None,
    crop_scales=None,
    symmetric=False,
    teacher_view="weak",
    jitter=None,
    jitter_p=0.8,
    grayscale_p=0.2,
    blur=None,
    image_size=None,
    subset=None,
    knn_every=5,
    knn_k=200,
    knn_temperature=0.1,
    device="auto",
    precision="auto",
    channels_last=True,
    seed=0,
    num_workers=4,
    progress_every=10,
    download=True,
)


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


def _family(dataset: str, image_size: int | None = None) -> str:
    """The ``DATASET_DEFAULTS`` entry of a dataset spec."""
    kind = dataset.split(":", 1)[0].lower() if ":" in dataset else dataset
    if kind == "imagenet" or (kind == "folder" and (image_size or 0) >= IMAGENET_LIKE_SIZE):
        return "imagenet"
    return kind


def _check(name: str, ok: bool, expect: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expect}, got {value!r}")


def resolve_settings(**overrides: Any) -> dict[str, Any]:
    """Fill the per-dataset defaults into a set of training settings and validate them.

    Args:
        **overrides: any keyword of ``train``; ``None`` means "default".

    Returns:
        The complete settings dict (JSON-serialisable).

    Raises:
        ValueError: naming any setting whose value is out of range.
    """
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown setting(s): {', '.join(sorted(unknown))}; valid: {', '.join(_DEFAULTS)}"
        )
    s = dict(_DEFAULTS)
    s.update({k: v for k, v in overrides.items() if v is not None})
    fam = _family(str(s["dataset"]), s["image_size"] if isinstance(s["image_size"], int) else None)
    if fam not in DATASET_DEFAULTS or (
        fam in ("folder", "imagenet") and ":" not in str(s["dataset"])
    ):
        raise ValueError(
            f"dataset must be one of {', '.join(k for k in DATASET_DEFAULTS if k not in ('folder', 'imagenet'))}, "
            f"folder:PATH or imagenet:PATH, got {s['dataset']!r}"
        )
    for key, value in DATASET_DEFAULTS[fam].items():
        if s.get(key) is None:
            s[key] = value
    s["crop_scale"] = tuple(float(v) for v in s["crop_scale"])
    s["jitter"] = tuple(float(v) for v in s["jitter"])
    _check(
        "epochs", isinstance(s["epochs"], int) and s["epochs"] >= 1, "an integer >= 1", s["epochs"]
    )
    _check(
        "batch_size",
        isinstance(s["batch_size"], int) and s["batch_size"] >= 2,
        "an integer >= 2",
        s["batch_size"],
    )
    _check("backbone", s["backbone"] in BACKBONES, f"one of {', '.join(BACKBONES)}", s["backbone"])
    for key in ("width", "hidden_dim", "embed_dim", "queue_size", "knn_k", "progress_every"):
        _check(key, isinstance(s[key], int) and s[key] >= 1, "an integer >= 1", s[key])
    _check(
        "knn_every",
        isinstance(s["knn_every"], int) and s["knn_every"] >= -1,
        "an integer >= -1 (0: only at the end, -1: never)",
        s["knn_every"],
    )
    _check("symmetric", isinstance(s["symmetric"], bool), "True or False", s["symmetric"])
    per_step = s["batch_size"] * (
        2 if s["symmetric"] else 1
    )  # teacher embeddings enqueued per step
    _check(
        "queue_size",
        s["queue_size"] >= per_step,
        f">= 2 x batch_size ({per_step}: symmetric enqueues both crops' teacher embeddings)"
        if s["symmetric"]
        else f">= batch_size ({per_step})",
        s["queue_size"],
    )
    _check("ema_momentum", 0.0 <= s["ema_momentum"] <= 1.0, "in [0, 1]", s["ema_momentum"])
    _check(
        "momentum_schedule",
        s["momentum_schedule"] in ("constant", "cosine"),
        "'constant' or 'cosine'",
        s["momentum_schedule"],
    )
    for key in ("student_temperature", "teacher_temperature", "knn_temperature"):
        _check(
            key, isinstance(s[key], (int, float)) and 0 < s[key] < math.inf, "a number > 0", s[key]
        )
    _check("lr", 0 < s["lr"] < math.inf, "a number > 0", s["lr"])
    _check("weight_decay", 0 <= s["weight_decay"] < math.inf, "a number >= 0", s["weight_decay"])
    _check("sgd_momentum", 0 <= s["sgd_momentum"] < 1, "in [0, 1)", s["sgd_momentum"])
    _check(
        "warmup_epochs",
        isinstance(s["warmup_epochs"], int) and 0 <= s["warmup_epochs"],
        "an integer >= 0",
        s["warmup_epochs"],
    )
    lo, hi = s["crop_scale"] if len(s["crop_scale"]) == 2 else (-1.0, -1.0)
    _check(
        "crop_scale",
        len(s["crop_scale"]) == 2 and 0 < lo <= hi <= 1,
        "two numbers 0 < lo <= hi <= 1",
        s["crop_scale"],
    )
    _check(
        "teacher_view",
        s["teacher_view"] in ("weak", "strong"),
        "'weak' or 'strong'",
        s["teacher_view"],
    )
    if s["crops"] is not None:
        s["crops"] = tuple(s["crops"])
        _check(
            "crops",
            len(s["crops"]) >= 1 and all(isinstance(v, int) and v >= 8 for v in s["crops"]),
            "crop sides >= 8 like (32, 28, 24, 20, 16)",
            s["crops"],
        )
    if s["crop_scales"] is not None:
        s["crop_scales"] = tuple(tuple(float(v) for v in r) for r in s["crop_scales"])
        _check(
            "crop_scales",
            s["crops"] is not None and len(s["crop_scales"]) == len(s["crops"]),
            "one (lo, hi) range per crop in crops",
            s["crop_scales"],
        )
        _check(
            "crop_scales",
            all(len(r) == 2 and 0 < r[0] <= r[1] <= 1 for r in s["crop_scales"]),
            "(lo, hi) ranges with 0 < lo <= hi <= 1",
            s["crop_scales"],
        )
    if s["symmetric"] and s["crops"] is not None and len(s["crops"]) > 1:
        raise ValueError(
            "symmetric (2x backprop) and multi-crop cannot be combined; drop crops or symmetric"
        )
    _check(
        "jitter",
        len(s["jitter"]) == 4
        and all(0 <= v < math.inf for v in s["jitter"])
        and s["jitter"][3] <= 0.5,
        "four numbers >= 0 (brightness, contrast, saturation, hue <= 0.5)",
        s["jitter"],
    )
    for key in ("jitter_p", "grayscale_p", "blur"):
        _check(key, 0 <= s[key] <= 1, "a probability in [0, 1]", s[key])
    _check(
        "precision",
        s["precision"] in ("auto", "bf16", "fp32"),
        "'auto', 'bf16' or 'fp32'",
        s["precision"],
    )
    if s["subset"] is not None:
        _check(
            "subset",
            isinstance(s["subset"], int) and s["subset"] >= 1,
            "an integer >= 1",
            s["subset"],
        )
    if s["image_size"] is not None:
        _check(
            "image_size",
            isinstance(s["image_size"], int) and s["image_size"] >= 8,
            "an integer >= 8",
            s["image_size"],
        )
    _check(
        "num_workers",
        isinstance(s["num_workers"], int) and s["num_workers"] >= 0,
        "an integer >= 0",
        s["num_workers"],
    )
    for key in ("data_root", "out"):
        if s[key] is not None:
            s[key] = str(s[key])
    return s


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


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("epoch", 0) <= upto_epoch:
                rows.append(row)
    return rows


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _resume_settings(
    resume: str | Path, given: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str], Path]:
    path = Path(resume)
    file = path / "last.safetensors" if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"nothing to resume at {path}: no checkpoint file there")
    tensors, meta = load_checkpoint(file)
    settings = json.loads(meta["settings"])
    for key, value in given.items():
        if value is None or key in _RESUMABLE_OVERRIDES or key in ("out", "progress"):
            continue
        saved = settings.get(key)
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(value, default=str)) and not (
            key == "data_root" and str(value) == str(saved)
        ):
            raise ValueError(
                f"--resume continues a run with its saved settings, but {key}={value!r} differs from the "
                f"checkpoint's {key}={saved!r}; drop the option or start a new run"
            )
    for key in _RESUMABLE_OVERRIDES:
        if given.get(key) is not None:
            settings[key] = given[key]
    settings["out"] = str(file.parent)
    return settings, tensors, meta, file.parent


def train(
    *,
    resume: str | Path | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
    **settings: Any,
) -> Path:
    """Pre-train an encoder with ReSSL and return the path of the final checkpoint.

    Every keyword is a setting (see ``resolve_settings`` for the list and
    ``DATASET_DEFAULTS`` for per-dataset values); ``None`` means the default.
    The main ones: ``dataset`` ("fashion-mnist", "cifar10", "cifar100", "stl10",
    "folder:PATH"), ``epochs`` (the total, also when resuming), ``batch_size``,
    ``backbone`` ("small", "resnet18", "resnet50"), ``out`` (run folder),
    ``queue_size``, ``ema_momentum``, ``student_temperature``,
    ``teacher_temperature``, ``lr`` (per 256 images; scaled by batch/256),
    ``device`` ("auto", "cpu", "cuda"), ``seed``, ``subset``.

    The run folder gets ``last.safetensors`` (rewritten atomically at every
    epoch end and on Ctrl-C) and ``metrics.jsonl`` (one JSON object per epoch).

    Args:
        resume: a run folder or checkpoint file to continue from; the saved
            settings are used, except ``epochs``, ``device``, ``num_workers``,
            ``knn_every`` and ``progress_every``, which may be changed.
        callback: receives a ``TrainEvent`` at start, every ``progress_every``
            steps, at each epoch end and at the end (the CLI draws its progress
            bar from these).
        **settings: the training configuration.

    Returns:
        Path of ``RUN_DIR/last.safetensors``.

    Raises:
        ValueError: on invalid settings (naming the setting and the valid range),
            a batch larger than the dataset, or an existing run in ``out``.
        CheckpointError: if ``resume`` is not a ressl checkpoint.
    """
    notify = callback or (lambda event: None)
    if resume is not None:
        s, state, meta, run_dir = _resume_settings(resume, settings)
        s = resolve_settings(**{k: v for k, v in s.items() if k in _DEFAULTS})
    else:
        s = resolve_settings(**settings)
        state, meta = {}, {}
        run_dir = Path(
            s["out"] or Path("runs") / s["dataset"].replace(":", "-", 1).replace("/", "_")
        )
        if (run_dir / "last.safetensors").exists():
            raise ValueError(
                f"{run_dir} already holds a run (last.safetensors); continue it with --resume {run_dir} "
                "or choose another --out"
            )
        s["out"] = str(run_dir)

    world = World.join(s["device"])
    try:
        return _run(world, s, state, meta, run_dir, resume is not None, notify)
    finally:
        world.leave()


def _run(
    world: World,
    s: dict[str, Any],
    state: dict[str, Tensor],
    meta: dict[str, str],
    run_dir: Path,
    resuming: bool,
    notify: Callable[[TrainEvent], None],
) -> Path:
    if s["batch_size"] % world.size:
        raise ValueError(
            f"batch_size is the global batch and must be divisible by the {world.size} processes, "
            f"got {s['batch_size']}; use a multiple of {world.size}"
        )
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
    if s["batch_size"] > n_train:
        raise ValueError(
            f"batch_size {s['batch_size']} is larger than the training set ({n_train} images); "
            f"use a batch size <= {n_train}"
        )
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
    metrics_path = run_dir / "metrics.jsonl"
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
    rows = _read_metrics(metrics_path, epoch)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_metrics(metrics_path, rows)

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
        path = run_dir / "last.safetensors"
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
                _write_metrics(metrics_path, rows)
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
    path = run_dir / "last.safetensors"
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
