"""Building a run: data, specs, model, optimiser, crop plan and a fresh state, from its config.

:class:`Run` is what stays fixed while a run trains (frozen); what changes is its
:class:`ressl.runs.checkpoint.TrainState` (weights, optimiser, generators, counters), saved
whole in every checkpoint with the config and the specs (``Run.settings``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ressl.config.notes import check_data, combination_notes, fit_data
from ressl.config.seeds import queue_seed, views_seed
from ressl.config.settings import TrainConfig
from ressl.config.specs import DataSpec, ModelSpec, run_settings
from ressl.data.jpegs import decode_place
from ressl.data.loading import load_dataset
from ressl.data.sources import FolderImages, ImageData, ImageSource, TensorImages
from ressl.device import autocast_dtype, select_device
from ressl.distributed import World, batchnorm_for, convert_batchnorm, wrap_ddp
from ressl.errors import ConfigError, first_line
from ressl.models.network import ReSSL
from ressl.rules import Note
from ressl.runs.checkpoint import TrainState
from ressl.schedules import cosine_lr, momentum_schedule
from ressl.training.compiled import Compiled, compile_step
from ressl.training.fits import check_fits, training_memory
from ressl.training.step import EncodeCrops
from ressl.training.steplog import require_tensorboard
from ressl.views import StrongView, WeakView
from ressl.views.plan import CropPlan

__all__ = ["Run", "build"]

log = logging.getLogger("ressl")


@dataclass(frozen=True)
class Run:
    """A built run: everything fixed while it trains, and the state it trains (``state``)."""

    config: TrainConfig
    model: ModelSpec
    data_spec: DataSpec
    world: World
    device: torch.device
    amp: torch.dtype | None
    data: ImageData
    source: ImageSource  # the training split, on the device when it fits there
    plan: CropPlan
    student_view: StrongView
    teacher_view: WeakView | StrongView
    student: nn.Module  # the student's forward over a step's crops (DDP-wrapped when distributed)
    compiled: Compiled | None  # the step's networks under torch.compile, before their warm-up
    state: TrainState
    run_dir: Path
    steps_per_epoch: int
    base_lr: float

    @property
    def settings(self) -> dict[str, Any]:
        """What every checkpoint stores: the config and the specs."""
        return run_settings(self.config, self.model, self.data_spec)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def lr(self, step: int, epochs: int | None = None) -> float:
        """The learning rate of ``step`` (warm-up, then cosine) in a plan of ``epochs``
        (default: the config's)."""
        c, spe = self.config, self.steps_per_epoch
        total = (c.epochs if epochs is None else epochs) * spe
        return cosine_lr(
            step,
            total,
            self.base_lr,
            min(c.warmup_epochs * spe, total),
            warmup_from_zero=c.warmup_start == "zero",
        )

    def momentum(self, step: int) -> float:
        """The teacher's EMA momentum at ``step``."""
        c = self.config
        return momentum_schedule(step, self.total_steps, c.ema_momentum, c.momentum_schedule)

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


def build(
    config: TrainConfig,
    world: World,
    run_dir: Path,
    module: nn.Module | None = None,
    given: set[str] | None = None,
) -> Run:
    """Data, specs, model, optimiser, crop plan and a fresh state, from the config.

    A new run's defaults that cannot fit its data are fitted to it (``given``: the settings
    the user set, kept; ``ressl.config.notes.fit_data``); a resumed one (``given`` None) keeps its
    checkpoint's. The order of random draws (weights, queue, generators) is fixed: resumed
    and distributed runs depend on it.
    """
    if config.log == "tensorboard":
        require_tensorboard()  # on every rank, before anything is loaded
    device = select_device(world.device(config.device))
    amp = autocast_dtype(config.precision, device)
    config, data, plan, spec = _data(config, world, device, amp, module, given)
    source = data.train.to(device) if isinstance(data.train, TensorImages) else data.train
    if data.labelled is data.train:
        data.labelled = source  # the kNN monitor's bank is the training split
    model, student = _model(spec, config, world, device, module)
    base_lr = config.lr * config.batch_size / 256  # lr is per 256 images
    groups = param_groups(model.student, config.weight_decay, config.decay_exempt)
    optimizer = sgd(groups, base_lr, config, world)
    views = torch.Generator(device=device).manual_seed(views_seed(config.seed, world.rank))
    strong = StrongView(
        jitter=config.jitter,
        jitter_p=config.jitter_p,
        grayscale_p=config.grayscale_p,
        blur_p=config.blur,
        blur_mode=config.blur_mode,
    )
    return Run(
        config,
        spec,
        DataSpec.of(data.mean, data.std, len(data.classes), data.files),
        world,
        device,
        amp,
        data,
        source,
        plan,
        strong,
        strong if config.teacher_view == "strong" else WeakView(),
        student,
        _compiled(config, device, student, model.teacher),
        TrainState(model, optimizer, views),
        run_dir,
        steps_per_epoch=len(data.train) // config.batch_size,
        base_lr=base_lr,
    )


def _data(
    config: TrainConfig,
    world: World,
    device: torch.device,
    amp: torch.dtype | None,
    module: nn.Module | None,
    given: set[str] | None,
) -> tuple[TrainConfig, ImageData, CropPlan, ModelSpec]:
    """The data, the config fitted to it, the crop plan and the model's spec, checked (memory
    included) before anything is on the device; the config's notes logged."""
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
        config, fitted = fit_data(config, len(data.train), given, world.size)
    notes = check_data(config, len(data.train), world.size)  # errors first, then the notes
    spec = ModelSpec.of(config, channels=data.channels, image_size=data.image_size)
    _check_memory(spec, config, data, plan, device, amp, world, module)
    if world.main:
        for note in combination_notes(config) + notes:
            log.warning("%s", note)
        for note in fitted:
            log.info("fitted to the data: %s", note)
    return config, data, plan, spec


def _model(
    spec: ModelSpec,
    config: TrainConfig,
    world: World,
    device: torch.device,
    module: nn.Module | None,
) -> tuple[ReSSL, nn.Module]:
    """The model ``spec`` describes, on the device, and the student's forward over a step's
    crops (DDP-wrapped when distributed)."""
    torch.manual_seed(config.seed)  # the same initial weights and queue on every rank
    net = spec.backbone if module is None else copy.deepcopy(module)  # never the caller's
    model = ReSSL(
        net,
        in_channels=spec.channels,
        image_size=spec.image_size,
        hidden_dim=spec.hidden_dim,
        embed_dim=spec.embed_dim,
        queue_size=spec.queue_size,
        width=spec.width,
        generator=torch.Generator().manual_seed(queue_seed(config.seed)),
    ).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    student: nn.Module = EncodeCrops(model.student)
    if world.distributed:
        # batch statistics over the global batch, student and teacher
        convert_batchnorm(model, batchnorm_for(torch.distributed.get_backend()))
        student = wrap_ddp(student, device)
    return model, student


def _check_memory(
    spec: ModelSpec,
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
            spec,
            backbone=module,
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
        raise ConfigError(
            f"{{backbone}} {config.backbone} cannot take the crops of {{crops}} "
            f"{', '.join(map(str, sides))}: {first_line(e)}",
            "backbone",
            "crops",
        ) from None
    check_fits(estimate, device)


def _exempt(name: str, param: Tensor, rule: str) -> bool:
    """No weight decay: every 1-D parameter (``1d``), or those whose names contain "bn" or
    "bias" (``names``, the official ImageNet code's rule)."""
    return param.ndim <= 1 if rule == "1d" else ("bn" in name or "bias" in name)


def param_groups(model: nn.Module, weight_decay: float, rule: str) -> list[dict[str, Any]]:
    """The parameters with weight decay, and those exempt from it (``decay_exempt``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not _exempt(n, p, rule)]
    no_decay = [p for n, p in named if _exempt(n, p, rule)]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def sgd(
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


def _compiled(
    config: TrainConfig, device: torch.device, student: nn.Module, teacher: nn.Module
) -> Compiled | None:
    """The step's networks under ``torch.compile`` when ``compile`` says so (auto: CUDA)."""
    if config.compile == "off" or (config.compile == "auto" and device.type != "cuda"):
        return None
    return compile_step(student, teacher, config.compile_mode)
