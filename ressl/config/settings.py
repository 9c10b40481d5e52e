"""The training configuration: one typed, frozen object, the single source of truth for every setting.

Each field of :class:`TrainConfig` declares, once, its type, default, help text and
valid range, whether the per-dataset recipe fills it (:mod:`ressl.data.registry`), and
whether ``--resume`` may change it. Validation lives here; the rules that tie settings
together are :mod:`ressl.config.together`. ``ressl train``'s options are generated from these fields
(``ressl.cli.train_cmd``), and ``ressl.train(**keywords)`` builds one from its
keywords, so a new setting is one field, its use, and a test. Beside it:
:mod:`ressl.config.fields` (what fields are made of), :mod:`ressl.config.resuming`
(a saved config continued) and :mod:`ressl.config.notes` (notes, and the fit to the data).

This module imports no torch.

Example:
    >>> config = TrainConfig(dataset="cifar10", epochs=100)
    >>> config.lr, config.queue_size              # filled from the CIFAR recipe
    (0.06, 4096)
    >>> TrainConfig(batch_size=1)                 # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ConfigError: batch_size must be an integer >= 2, got 1
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ressl.config.fields import (
    DATA,
    DATASET,
    EMA_MOMENTUM,
    METHOD,
    MODEL,
    MONITOR,
    OPTIM,
    RUN,
    TEMPERATURE,
    VIEWS,
    coerce,
    dataset_help,
    recipe_field,
    setting_field,
)
from ressl.config.seeds import SEED
from ressl.config.together import check_together
from ressl.data.registry import recipe_for, spec_problem
from ressl.errors import ConfigError
from ressl.rules import (
    BACKBONE,
    BOOL,
    BUILTIN_BACKBONES,
    CHANNELS,
    CROP_SCALES,
    CROPS,
    DECODE_PLACES,
    DEVICE,
    IMAGE_SIZE,
    JITTER,
    JITTER_P,
    JITTER_STRENGTHS,
    KNN_K,
    KNN_TEMPERATURE,
    LEARNING_RATE,
    MAX_IMAGE_SIZE,
    PATH,
    PROBABILITY,
    SCALE,
    WEIGHT_DECAY,
    Setting,
    backbone_help,
    choice,
    integer,
    is_int,
    number,
    numbers_text,
    ranges_text,
    sides_text,
)

COLLAPSE_HELP = (
    "The collapse alarm on each progress window's health measures (every image mapped to "
    "nearly one point, or a flat target): stop the run like a divergence, warn once an "
    "epoch, or off."
)

__all__ = [
    "BACKBONES",
    "MAX_IMAGE_SIZE",
    "TrainConfig",
    "coerce_setting",
    "refuse_unknown",
    "settings",
]

#: The backbones ressl defines (``ressl.build_backbone`` also builds ``torchvision:NAME``,
#: ``timm:NAME`` and any ``nn.Module`` given through the API).
BACKBONES = BUILTIN_BACKBONES


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of a ReSSL training run (see each field's help in ``ressl train --help``).

    Fields the dataset's recipe fills (``recipe``) may be left out or None; after
    construction every field holds its resolved value and the whole config is valid.
    Build one from keywords that may be None with :meth:`from_keywords`.

    Raises:
        ConfigError: (a ``ValueError``) naming the first invalid setting and its valid range.
    """

    dataset: str = setting_field(DATA, "fashion-mnist", dataset_help(), DATASET)
    data_root: str | None = setting_field(
        DATA,
        None,
        "Where built-in datasets are looked for and downloaded to.",
        PATH,
        optional=True,
        resumable=True,
    )
    image_size: int | None = setting_field(
        DATA,
        None,
        "Side of the stored images (default: 28, 32, 64 for STL-10, 224 for imagenet:PATH; "
        "folders: the files' median shorter side, at most 64).",
        IMAGE_SIZE,
        optional=True,
    )
    channels: int | None = setting_field(
        DATA,
        None,
        "Image channels: 1 (greyscale) or 3 (RGB) (default: the data's; a folder of "
        "greyscale files trains on 1, with its own mean/std).",
        CHANNELS,
        optional=True,
    )
    subset: int | None = setting_field(
        DATA, None, "Train on the first N images only (quick runs).", integer(1), optional=True
    )
    download: bool = setting_field(
        DATA, True, "Download a missing built-in dataset with torchvision.", BOOL, resumable=True
    )
    num_workers: int = setting_field(
        DATA, 4, "DataLoader workers for streamed folders.", integer(0), resumable=True
    )
    decode: Literal["auto", "workers", "device"] = setting_field(
        DATA,
        "auto",
        "Where streamed folders' JPEGs are decoded and cropped: workers (PIL, in the "
        "DataLoader workers), or device (the workers read bytes; the training device "
        "decodes a batch in one call, nvjpeg on CUDA, and cuts the crops); auto: device on "
        "CUDA. Other files are decoded in the workers either way (ressl < 0.3: workers).",
        choice("auto", *DECODE_PLACES),
        legacy="workers",
        resumable=True,
    )
    backbone: str = recipe_field(MODEL, backbone_help(), BACKBONE, metavar="NAME")
    width: int = setting_field(MODEL, 32, "Width of the small CNN's first stage.", integer(1))
    hidden_dim: int = recipe_field(MODEL, "Projection head hidden width.", integer(1))
    embed_dim: int = recipe_field(MODEL, "Embedding dimension D.", integer(1))
    queue_size: int = recipe_field(METHOD, "Relation queue length K.", integer(1))
    ema_momentum: float = recipe_field(METHOD, "Teacher EMA momentum m.", EMA_MOMENTUM)
    teacher_bn: Literal["own", "student"] = setting_field(
        METHOD,
        "own",
        "Teacher BatchNorm running statistics: its own, from its forward passes on the teacher "
        "view (the official code), or copied from the student at every EMA step (ressl < 0.2).",
        choice("own", "student"),
        legacy="student",
    )
    momentum_schedule: Literal["constant", "cosine"] = setting_field(
        METHOD,
        "constant",
        "EMA momentum schedule: constant m (the paper), or cosine from m to 1.",
        choice("constant", "cosine"),
    )
    student_temperature: float = setting_field(METHOD, 0.1, "tau_s.", TEMPERATURE)
    teacher_temperature: float = setting_field(
        METHOD, 0.04, "tau_t (sharper than tau_s).", TEMPERATURE
    )
    epochs: int = recipe_field(
        OPTIM, "Total epochs (also when resuming).", integer(1), resumable=True
    )
    batch_size: int = setting_field(
        OPTIM, 256, "Images per step (the global batch when distributed).", integer(2)
    )
    lr: float = recipe_field(
        OPTIM, "SGD learning rate per 256 images (scaled by batch_size / 256).", LEARNING_RATE
    )
    weight_decay: float = recipe_field(
        OPTIM, "Weight decay (not on BatchNorm weights and biases).", WEIGHT_DECAY
    )
    sgd_momentum: float = setting_field(
        OPTIM, 0.9, "SGD momentum.", number(0.0, strict=False, below=1.0)
    )
    nesterov: bool = setting_field(
        OPTIM, False, "Nesterov momentum for SGD (needs --sgd-momentum > 0).", BOOL
    )
    sgd_kernel: Literal["fused", "foreach", "default"] = setting_field(
        OPTIM,
        "fused",
        "SGD's update: fused (one kernel for all parameters), foreach (a few kernels), or "
        "default, PyTorch's choice (foreach on GPUs, one update per parameter on CPUs; "
        "ressl < 0.3). The same arithmetic, rounded differently.",
        choice("fused", "foreach", "default"),
        legacy="default",
        resumable=True,
    )
    warmup_epochs: int = recipe_field(
        OPTIM, "Linear warm-up epochs before the cosine decay.", integer(0)
    )
    warmup_start: Literal["zero", "one-step"] = setting_field(
        OPTIM,
        "zero",
        "The warm-up's first lr: 0 (the official code), or one step's share lr/steps "
        "(ressl < 0.2).",
        choice("zero", "one-step"),
        legacy="one-step",
    )
    decay_exempt: Literal["1d", "names"] = recipe_field(
        OPTIM,
        "Parameters without weight decay: 1d, every 1-D one (BatchNorm weights, biases); "
        "names, those named *bn* or *bias* (the official ImageNet code).",
        choice("1d", "names"),
        legacy="1d",
    )
    crop_scale: tuple[float, float] = setting_field(
        VIEWS,
        (0.2, 1.0),
        "RandomResizedCrop area range of full-size crops.",
        SCALE,
        parse=numbers_text(2, "0.2,1.0"),
        metavar="LO,HI",
    )
    crops: tuple[int, ...] | None = setting_field(
        VIEWS,
        None,
        "Multi-crop: the student's crop sides, e.g. 32,28,24,20,16 or 224,192,160,128,96.",
        CROPS,
        parse=sides_text,
        metavar="S1,S2,...",
        optional=True,
    )
    crop_scales: tuple[tuple[float, float], ...] | None = setting_field(
        VIEWS,
        None,
        "Area range per --crops side, e.g. 0.2:1,0.15:0.75 (default: crop scale x side / image size).",
        CROP_SCALES,
        parse=ranges_text,
        metavar="LO:HI,...",
        optional=True,
    )
    symmetric: bool = setting_field(
        VIEWS, False, "2x backprop: two crops per image, each seen by both networks.", BOOL
    )
    teacher_view: Literal["weak", "strong"] = setting_field(
        VIEWS, "weak", "Teacher augmentation (the paper: weak).", choice("weak", "strong")
    )
    jitter: tuple[float, float, float, float] = recipe_field(
        VIEWS,
        "Strong view colour jitter strengths.",
        JITTER,
        parse=numbers_text(4, ",".join(f"{j:g}" for j in JITTER_STRENGTHS)),
        metavar="B,C,S,H",
    )
    jitter_p: float = setting_field(
        VIEWS, JITTER_P, "Probability of colour jitter on the strong view.", PROBABILITY
    )
    grayscale_p: float = setting_field(
        VIEWS, 0.2, "Probability of grayscale on the strong view.", PROBABILITY
    )
    blur: float = recipe_field(
        VIEWS, "Probability of Gaussian blur on the strong view.", PROBABILITY
    )
    blur_mode: Literal["pil", "relative"] = setting_field(
        VIEWS,
        "pil",
        "pil: PIL's GaussianBlur with sigma 0.1-2 px at every size (the paper's code); "
        "relative: a Gaussian kernel of about 10% of the side (ressl < 0.2).",
        choice("pil", "relative"),
        legacy="relative",
    )
    knn_every: int = setting_field(
        MONITOR,
        5,
        "kNN monitor every N epochs (0: only at the end, -1: never, e.g. for ImageNet-size data).",
        integer(-1, " (0: only at the end, -1: never)"),
        resumable=True,
    )
    knn_k: int = setting_field(
        MONITOR, KNN_K, "Neighbours that vote in the kNN monitor.", integer(1)
    )
    knn_temperature: float = setting_field(
        MONITOR, KNN_TEMPERATURE, "kNN vote weight exp(similarity / t).", number(0.0)
    )
    progress_every: int = setting_field(
        MONITOR,
        10,
        "Steps between progress reports (the one host sync per window); each window's "
        "mean loss is a row of RUN/steps.jsonl.",
        integer(1),
        resumable=True,
    )
    collapse: Literal["stop", "warn", "off"] = setting_field(
        MONITOR, "stop", COLLAPSE_HELP, choice("stop", "warn", "off"), resumable=True, legacy="off"
    )
    log: Literal["none", "tensorboard"] = setting_field(
        MONITOR,
        "none",
        "Also log loss, lr, EMA momentum, images/s and kNN to TensorBoard event files in "
        "RUN/tensorboard (needs the tensorboard extra).",
        choice("none", "tensorboard"),
        resumable=True,
    )
    out: str | None = setting_field(
        RUN, None, "Run folder (default: runs/DATASET).", PATH, optional=True, short="-o"
    )
    device: str = setting_field(
        RUN, "auto", "auto (CUDA when present), cpu, cuda or cuda:N.", DEVICE, resumable=True
    )
    precision: Literal["auto", "bf16", "fp32"] = setting_field(
        RUN,
        "auto",
        "auto: bf16 autocast where supported; bf16; fp32.",
        choice("auto", "bf16", "fp32"),
    )
    channels_last: bool = setting_field(
        RUN, True, "Channels-last memory format for images and weights.", BOOL
    )
    compile: Literal["auto", "off", "on"] = setting_field(
        RUN,
        "auto",
        "torch.compile the step's networks (student forward and backward, teacher forward): "
        "auto is on CUDA only (on CPUs it measured slower); a compile or CUDA-graph capture "
        "that fails in the first steps falls back to eager with a warning.",
        choice("auto", "off", "on"),
        resumable=True,
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = setting_field(
        RUN,
        "default",
        "torch.compile mode (reduce-overhead and max-autotune capture CUDA graphs).",
        choice("default", "reduce-overhead", "max-autotune"),
        resumable=True,
    )
    seed: int = setting_field(RUN, 0, "Random seed (model init, data order, augmentations).", SEED)

    def __post_init__(self) -> None:
        problem = spec_problem(self.dataset)
        if problem:
            raise ConfigError("{dataset} " + problem, "dataset")
        size = self.image_size if is_int(self.image_size) else None
        recipe = recipe_for(self.dataset, size)
        for f, meta in _settings():
            value = getattr(self, f.name)
            if value is None and meta.recipe:
                value = recipe.get(f.name)
            object.__setattr__(self, f.name, coerce_setting(f.name, value))
        for f, meta in _settings():
            value = getattr(self, f.name)
            if not (value is None and meta.optional) and not meta.rule.ok(value):
                raise ConfigError.invalid(f.name, meta.rule.expect, value)
        check_together(self)

    @classmethod
    def from_keywords(cls, **keywords: Any) -> TrainConfig:
        """A config from keywords where None means "the default" (``ressl.train``'s API).

        Raises:
            ConfigError: an unknown keyword (listing the valid ones) or an invalid value.
        """
        refuse_unknown(keywords)
        return cls(**{k: v for k, v in keywords.items() if v is not None})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied and checked (recipe values already resolved stay)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name (JSON-serialisable; tuples become lists in JSON)."""
        return {f.name: getattr(self, f.name) for f, _ in _settings()}

    @property
    def run_dir(self) -> Path:
        """The run folder: ``out``, or ``runs/DATASET`` (``folder:/a/b`` -> ``runs/folder-_a_b``)."""
        if self.out is not None:
            return Path(self.out)
        return Path("runs") / self.dataset.replace(":", "-", 1).replace("/", "_")


def refuse_unknown(keywords: Mapping[str, Any]) -> None:
    """Refuse keywords that name no setting, listing the valid ones."""
    known = [f.name for f, _ in _settings()]
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; valid: {', '.join(known)}")


def _settings() -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    for f in dataclasses.fields(TrainConfig):
        yield f, f.metadata["setting"]


def settings() -> list[tuple[str, Any, Setting]]:
    """``(name, default, Setting)`` of every field, in declaration order."""
    return [(f.name, f.default, meta) for f, meta in _settings()]


@functools.cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def coerce_setting(name: str, value: Any) -> Any:
    """A value as field ``name`` stores it (see :func:`ressl.config.fields.coerce`)."""
    meta: Setting = TrainConfig.__dataclass_fields__[name].metadata["setting"]
    return coerce(name, meta, _types()[name], value)
