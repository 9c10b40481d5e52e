"""The training configuration: one typed, frozen object, the single source of truth for every setting.

Each field of :class:`TrainConfig` declares, once, its type, default, help text and
valid range, whether the per-dataset recipe fills it (:mod:`ressl.data.registry`), and
whether ``--resume`` may change it. Validation lives here, including the rules that
tie settings together. ``ressl train``'s options are generated from these fields
(``ressl.cli.train_cmd``), and ``ressl.train(**keywords)`` builds one from its
keywords, so a new setting is one field, its use, and a test.

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
import os
import typing
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ressl.data.registry import DATASETS, dataset_names, find, recipe_for, spec_problem
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
    NO_LEGACY,
    PATH,
    PROBABILITY,
    SCALE,
    WEIGHT_DECAY,
    Note,
    Rule,
    Setting,
    as_type,
    backbone_help,
    choice,
    integer,
    is_int,
    number,
    numbers_text,
    ranges_text,
    sides_text,
)

__all__ = [
    "BACKBONES",
    "FIT_UNUSED",
    "FIT_WARMUP",
    "MAX_IMAGE_SIZE",
    "TrainConfig",
    "dataset_choices",
    "dataset_help",
    "queue_seed",
    "settings",
    "views_seed",
]

#: The backbones ressl defines (``ressl.build_backbone`` also builds ``torchvision:NAME``,
#: ``timm:NAME`` and any ``nn.Module`` given through the API).
BACKBONES = BUILTIN_BACKBONES
#: A default batch leaving more than this share of the training images out of every epoch
#: (the dropped last batch) is fitted to the data (``TrainConfig.fit_data``): 480 images at
#: 256 would use 53% of them. Fashion-MNIST's 60,000 at 256 leave out 0.2%.
FIT_UNUSED = 0.1
#: The default warm-up is cut to at most this share of the run (the recipes' own: 1 of 50
#: epochs, 5 of 200), so a short run's learning rate still decays.
FIT_WARMUP = 0.1

#: The sharpest softmax temperature accepted (teacher and student). The relation logits are
#: cosines / tau, and the cosines come from a bf16 matmul under autocast, which resolves
#: them to 2**-8 (0.004) near 1: at tau 1e-3 one such step is already a logit gap of 4,
#: and a cosine gap of 0.09 one of 88, where fp32's exp underflows. Below it the teacher's
#: target is a one-hot of rounding noise and the student's gradient grows as 1/tau.
#: ReSSL uses 0.04 (teacher) and 0.1 (student), 40x and 100x above it.
MIN_TEMPERATURE = 1e-3
#: A seed is a signed 64-bit integer: torch's generators take [-2**63, 2**64), and ressl
#: derives the others by adding small offsets (``queue_seed``, ``views_seed``).
SEED_RANGE = (-(2**63), 2**63 - 1)


def queue_seed(seed: int) -> int:
    """The seed of the relation queue's initial embeddings (the weights draw from ``seed``)."""
    return seed + 1


def views_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s augmentation generator: each rank draws its own views,
    and rank 0's stream is the single-process run's (1000003, a prime, keeps ranks' streams
    apart from the other offsets)."""
    return seed + 2 + 1_000_003 * rank


#: The teacher's EMA momentum m: 1 would leave the teacher at its initial weights forever.
EMA_MOMENTUM = number(0.0, strict=False, below=1.0).explained(
    "(1 would keep the teacher at its random initial weights: it would never learn)"
)
TEMPERATURE = number(MIN_TEMPERATURE, strict=False).explained(
    "(a sharper softmax is a one-hot of bf16 rounding noise; ReSSL uses 0.04 and 0.1)"
)


def _spec_ok(value: Any) -> bool:
    return not spec_problem(value)


def dataset_choices() -> str:
    """The registry's datasets: ``fashion-mnist, cifar10, ..., folder:PATH or imagenet:PATH``."""
    names = dataset_names()
    return ", ".join(names[:-1]) + " or " + names[-1]


def dataset_help() -> str:
    """``--dataset``'s help: the registry's datasets, and what each ``NAME:PATH`` one is."""
    folders = [f" {d.spec}: {d.summary}." for d in DATASETS.values() if d.takes_path]
    return dataset_choices() + "." + "".join(folders)


#: Valid datasets are the registry's; its ``spec_problem`` words the error.
DATASET = Rule("one of " + ", ".join(dataset_names()), _spec_ok)


def _field(panel: str, default: Any, help: str, rule: Rule, **kw: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (typed Any so recipe fields may
    default to None while their type says what they hold once resolved)."""
    return field(default=default, metadata={"setting": Setting(help, rule, panel=panel, **kw)})


def _recipe(panel: str, help: str, rule: Rule, **kw: Any) -> Any:
    return _field(panel, None, help, rule, recipe=True, **kw)


DATA, MODEL, METHOD, OPTIM, VIEWS, MONITOR, RUN = (
    "Data",
    "Model",
    "Method",
    "Optimiser",
    "Views",
    "Monitor",
    "Run",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of a ReSSL training run (see each field's help in ``ressl train --help``).

    Fields the dataset's recipe fills (``recipe``) may be left out or None; after
    construction every field holds its resolved value and the whole config is valid.
    Build one from keywords that may be None with :meth:`from_keywords`.

    Raises:
        ConfigError: (a ``ValueError``) naming the first invalid setting and its valid range.
    """

    dataset: str = _field(
        DATA,
        "fashion-mnist",
        dataset_help(),
        DATASET,
    )
    data_root: str | None = _field(
        DATA,
        None,
        "Where built-in datasets are looked for and downloaded to.",
        PATH,
        optional=True,
        resumable=True,
    )
    image_size: int | None = _field(
        DATA,
        None,
        "Side of the stored images (default: 28, 32, 64 for STL-10, 224 for imagenet:PATH; "
        "folders: the files' median shorter side, at most 64).",
        IMAGE_SIZE,
        optional=True,
    )
    channels: int | None = _field(
        DATA,
        None,
        "Image channels: 1 (greyscale) or 3 (RGB) (default: the data's; a folder of "
        "greyscale files trains on 1, with its own mean/std).",
        CHANNELS,
        optional=True,
    )
    subset: int | None = _field(
        DATA, None, "Train on the first N images only (quick runs).", integer(1), optional=True
    )
    download: bool = _field(
        DATA, True, "Download a missing built-in dataset with torchvision.", BOOL, resumable=True
    )
    num_workers: int = _field(
        DATA, 4, "DataLoader workers for streamed folders.", integer(0), resumable=True
    )
    decode: Literal["auto", "workers", "device"] = _field(
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
    backbone: str = _recipe(
        MODEL,
        backbone_help(),
        BACKBONE,
        metavar="NAME",
    )
    width: int = _field(MODEL, 32, "Width of the small CNN's first stage.", integer(1))
    hidden_dim: int = _recipe(MODEL, "Projection head hidden width.", integer(1))
    embed_dim: int = _recipe(MODEL, "Embedding dimension D.", integer(1))
    queue_size: int = _recipe(METHOD, "Relation queue length K.", integer(1))
    ema_momentum: float = _recipe(METHOD, "Teacher EMA momentum m.", EMA_MOMENTUM)
    teacher_bn: Literal["own", "student"] = _field(
        METHOD,
        "own",
        "Teacher BatchNorm running statistics: its own, from its forward passes on the teacher "
        "view (the official code), or copied from the student at every EMA step (ressl < 0.2).",
        choice("own", "student"),
        legacy="student",
    )
    momentum_schedule: Literal["constant", "cosine"] = _field(
        METHOD,
        "constant",
        "EMA momentum schedule: constant m (the paper), or cosine from m to 1.",
        choice("constant", "cosine"),
    )
    student_temperature: float = _field(METHOD, 0.1, "tau_s.", TEMPERATURE)
    teacher_temperature: float = _field(METHOD, 0.04, "tau_t (sharper than tau_s).", TEMPERATURE)
    epochs: int = _recipe(OPTIM, "Total epochs (also when resuming).", integer(1), resumable=True)
    batch_size: int = _field(
        OPTIM, 256, "Images per step (the global batch when distributed).", integer(2)
    )
    lr: float = _recipe(
        OPTIM, "SGD learning rate per 256 images (scaled by batch_size / 256).", LEARNING_RATE
    )
    weight_decay: float = _recipe(
        OPTIM, "Weight decay (not on BatchNorm weights and biases).", WEIGHT_DECAY
    )
    sgd_momentum: float = _field(OPTIM, 0.9, "SGD momentum.", number(0.0, strict=False, below=1.0))
    nesterov: bool = _field(
        OPTIM, False, "Nesterov momentum for SGD (needs --sgd-momentum > 0).", BOOL
    )
    sgd_kernel: Literal["fused", "foreach", "default"] = _field(
        OPTIM,
        "fused",
        "SGD's update: fused (one kernel for all parameters), foreach (a few kernels), or "
        "default, PyTorch's choice (foreach on GPUs, one update per parameter on CPUs; "
        "ressl < 0.3). The same arithmetic, rounded differently.",
        choice("fused", "foreach", "default"),
        legacy="default",
        resumable=True,
    )
    warmup_epochs: int = _recipe(
        OPTIM, "Linear warm-up epochs before the cosine decay.", integer(0)
    )
    warmup_start: Literal["zero", "one-step"] = _field(
        OPTIM,
        "zero",
        "The warm-up's first lr: 0 (the official code), or one step's share lr/steps "
        "(ressl < 0.2).",
        choice("zero", "one-step"),
        legacy="one-step",
    )
    decay_exempt: Literal["1d", "names"] = _recipe(
        OPTIM,
        "Parameters without weight decay: 1d, every 1-D one (BatchNorm weights, biases); "
        "names, those named *bn* or *bias* (the official ImageNet code).",
        choice("1d", "names"),
        legacy="1d",
    )
    crop_scale: tuple[float, float] = _field(
        VIEWS,
        (0.2, 1.0),
        "RandomResizedCrop area range of full-size crops.",
        SCALE,
        parse=numbers_text(2, "0.2,1.0"),
        metavar="LO,HI",
    )
    crops: tuple[int, ...] | None = _field(
        VIEWS,
        None,
        "Multi-crop: the student's crop sides, e.g. 32,28,24,20,16 or 224,192,160,128,96.",
        CROPS,
        parse=sides_text,
        metavar="S1,S2,...",
        optional=True,
    )
    crop_scales: tuple[tuple[float, float], ...] | None = _field(
        VIEWS,
        None,
        "Area range per --crops side, e.g. 0.2:1,0.15:0.75 (default: crop scale x side / image size).",
        CROP_SCALES,
        parse=ranges_text,
        metavar="LO:HI,...",
        optional=True,
    )
    symmetric: bool = _field(
        VIEWS, False, "2x backprop: two crops per image, each seen by both networks.", BOOL
    )
    teacher_view: Literal["weak", "strong"] = _field(
        VIEWS, "weak", "Teacher augmentation (the paper: weak).", choice("weak", "strong")
    )
    jitter: tuple[float, float, float, float] = _recipe(
        VIEWS,
        "Strong view colour jitter strengths.",
        JITTER,
        parse=numbers_text(4, ",".join(f"{j:g}" for j in JITTER_STRENGTHS)),
        metavar="B,C,S,H",
    )
    jitter_p: float = _field(
        VIEWS, JITTER_P, "Probability of colour jitter on the strong view.", PROBABILITY
    )
    grayscale_p: float = _field(
        VIEWS, 0.2, "Probability of grayscale on the strong view.", PROBABILITY
    )
    blur: float = _recipe(VIEWS, "Probability of Gaussian blur on the strong view.", PROBABILITY)
    blur_mode: Literal["pil", "relative"] = _field(
        VIEWS,
        "pil",
        "pil: PIL's GaussianBlur with sigma 0.1-2 px at every size (the paper's code); "
        "relative: a Gaussian kernel of about 10% of the side (ressl < 0.2).",
        choice("pil", "relative"),
        legacy="relative",
    )
    knn_every: int = _field(
        MONITOR,
        5,
        "kNN monitor every N epochs (0: only at the end, -1: never, e.g. for ImageNet-size data).",
        integer(-1, " (0: only at the end, -1: never)"),
        resumable=True,
    )
    knn_k: int = _field(MONITOR, KNN_K, "Neighbours that vote in the kNN monitor.", integer(1))
    knn_temperature: float = _field(
        MONITOR, KNN_TEMPERATURE, "kNN vote weight exp(similarity / t).", number(0.0)
    )
    progress_every: int = _field(
        MONITOR,
        10,
        "Steps between progress reports (the one host sync per window); each window's "
        "mean loss is a row of RUN/steps.jsonl.",
        integer(1),
        resumable=True,
    )
    log: Literal["none", "tensorboard"] = _field(
        MONITOR,
        "none",
        "Also log loss, lr, EMA momentum, images/s and kNN to TensorBoard event files in "
        "RUN/tensorboard (needs the tensorboard extra).",
        choice("none", "tensorboard"),
        resumable=True,
    )
    out: str | None = _field(
        RUN, None, "Run folder (default: runs/DATASET).", PATH, optional=True, short="-o"
    )
    device: str = _field(
        RUN, "auto", "auto (CUDA when present), cpu, cuda or cuda:N.", DEVICE, resumable=True
    )
    precision: Literal["auto", "bf16", "fp32"] = _field(
        RUN,
        "auto",
        "auto: bf16 autocast where supported; bf16; fp32.",
        choice("auto", "bf16", "fp32"),
    )
    channels_last: bool = _field(
        RUN, True, "Channels-last memory format for images and weights.", BOOL
    )
    compile: Literal["auto", "off", "on"] = _field(
        RUN,
        "auto",
        "torch.compile the step's networks (student forward and backward, teacher forward): "
        "auto is on CUDA only (on CPUs it measured slower); a compile or CUDA-graph capture "
        "that fails in the first steps falls back to eager with a warning.",
        choice("auto", "off", "on"),
        resumable=True,
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = _field(
        RUN,
        "default",
        "torch.compile mode (reduce-overhead and max-autotune capture CUDA graphs).",
        choice("default", "reduce-overhead", "max-autotune"),
        resumable=True,
    )
    seed: int = _field(
        RUN,
        0,
        "Random seed (model init, data order, augmentations).",
        integer(SEED_RANGE[0], " (64 bits)", high=SEED_RANGE[1]),
    )

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
            object.__setattr__(self, f.name, _coerce(f.name, value))
        for f, meta in _settings():
            value = getattr(self, f.name)
            if not (value is None and meta.optional) and not meta.rule.ok(value):
                raise ConfigError.invalid(f.name, meta.rule.expect, value)
        self._check_together()

    def _check_together(self) -> None:
        per_step = self.batch_size * (2 if self.symmetric else 1)  # enqueued per step
        if self.queue_size < per_step:
            why = " ({per_step}: symmetric enqueues both crops' teacher embeddings)"
            expect = (
                f">= 2 x {{batch_size}}{why.format(per_step=per_step)}"
                if self.symmetric
                else f">= {{batch_size}} ({per_step})"
            )
            raise ConfigError(
                f"{{queue_size}} must be {expect}, got {self.queue_size}",
                "queue_size",
                "batch_size",
            )
        if self.nesterov and self.sgd_momentum == 0:
            raise ConfigError("{nesterov} needs {sgd_momentum} > 0", "nesterov", "sgd_momentum")
        if self.symmetric and self.crops is not None and len(self.crops) > 1:
            raise ConfigError(
                "{symmetric} (2x backprop) and multi-crop ({crops}) cannot be combined; "
                "drop one of them",
                "symmetric",
                "crops",
            )
        if self.crop_scales is not None and (
            self.crops is None or len(self.crop_scales) != len(self.crops)
        ):
            raise ConfigError(
                "{crop_scales} must be one (lo, hi) range per crop in {crops}: "
                f"{len(self.crops or ())} crop(s), got {len(self.crop_scales)} range(s)",
                "crop_scales",
                "crops",
            )

    @classmethod
    def from_keywords(cls, **keywords: Any) -> TrainConfig:
        """A config from keywords where None means "the default" (``ressl.train``'s API).

        Raises:
            ConfigError: an unknown keyword (listing the valid ones) or an invalid value.
        """
        _refuse_unknown(keywords)
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

    def notes(self) -> list[Note]:
        """Legal but probably unintended combinations, one sentence each (the trainer logs them)."""
        out = []
        if self.warmup_epochs >= self.epochs:
            out.append(
                Note(
                    f"{{warmup_epochs}} {self.warmup_epochs} >= {{epochs}} {self.epochs}: the whole run "
                    "is warm-up, so the learning rate never decays",
                    "warmup_epochs",
                    "epochs",
                )
            )
        if self.decay_exempt == "names" and "resnet" not in self.backbone:
            out.append(
                Note(
                    f"{{decay_exempt}} names is the official ResNet code's rule; {self.backbone} may "
                    "name its BatchNorms otherwise (e.g. features.N.1), and those are then decayed: "
                    "{decay_exempt} 1d exempts every 1-D parameter",
                    "decay_exempt",
                )
            )
        if self.decode == "device" and self.device == "cpu":
            out.append(
                Note(
                    "{decode} device on {device} cpu decodes every JPEG in the training process, "
                    "one core: {decode} workers spreads it over the DataLoader workers (faster "
                    "with 2 or more)",
                    "decode",
                    "device",
                )
            )
        return out

    def fit_data(
        self, train_images: int, given: Collection[str], world_size: int = 1
    ) -> tuple[TrainConfig, list[Note]]:
        """This config with the defaults that cannot fit a small run made to follow it.

        Only settings not in ``given`` (those the user set keep their value, and
        :meth:`check_data` and :meth:`notes` say what is wrong with them) change:

        - ``batch_size``: when the last, dropped, partial batch would leave more than
          ``FIT_UNUSED`` of the training images out of every epoch, the epoch is cut into
          as many steps as the default batch makes, of equal size (480 images, batch 256:
          2 steps of 240 rather than 1 of 256).
        - ``queue_size``: at most what one epoch's batches fill (a multiple of the images
          enqueued per step, not above the training set), so the queue holds no stale
          copies of the same images.
        - ``warmup_epochs``: at most ``FIT_WARMUP`` of the run.

        The fitted values are the run's settings (its checkpoint records them); a resumed
        run keeps its checkpoint's.

        Returns:
            ``(config, notes)``: the notes say which default changed, to what and why.
        """
        changes: dict[str, Any] = {}
        notes = []
        batch = self.batch_size
        if "batch_size" not in given and train_images >= 2 * world_size:
            unused = train_images % batch if batch <= train_images else train_images
            if unused > FIT_UNUSED * train_images:
                steps = -(-train_images // batch)  # ceil: the steps the default batch makes
                batch = max(train_images // steps // world_size * world_size, 2)
                kept = train_images // batch * batch
                changes["batch_size"] = batch
                notes.append(
                    Note(
                        f"{{batch_size}} {batch} (default {self.batch_size}): an epoch of "
                        f"{train_images} images uses {kept} of them, not "
                        f"{train_images - unused}",
                        "batch_size",
                    )
                )
        per_step = batch * (2 if self.symmetric else 1)  # teacher embeddings enqueued per step
        if "queue_size" not in given and self.queue_size > train_images:
            queue = max(train_images // per_step, 1) * per_step
            changes["queue_size"] = queue
            notes.append(
                Note(
                    f"{{queue_size}} {queue} (default {self.queue_size}): one epoch fills it; a "
                    f"longer queue than the {train_images} training images holds stale copies of "
                    "them",
                    "queue_size",
                )
            )
        most = int(FIT_WARMUP * self.epochs)
        if "warmup_epochs" not in given and self.warmup_epochs > most:
            changes["warmup_epochs"] = most
            notes.append(
                Note(
                    f"{{warmup_epochs}} {most} (default {self.warmup_epochs}): at most "
                    f"{FIT_WARMUP:.0%} of {self.epochs} epochs, so the learning rate decays",
                    "warmup_epochs",
                )
            )
        return (self.replace(**changes) if changes else self), notes

    def check_data(self, train_images: int, world_size: int = 1) -> list[Note]:
        """Check the settings against the data and the process count.

        Returns:
            Notes to log (a queue longer than the training set).

        Raises:
            ConfigError: a batch larger than the training set, or one the processes
                cannot share evenly.
        """
        if self.batch_size % world_size:
            raise ConfigError(
                "{batch_size} is the global batch and must be divisible by the "
                f"{world_size} processes, got {self.batch_size}; use a multiple of {world_size}",
                "batch_size",
            )
        if self.batch_size > train_images:
            raise ConfigError(
                f"{{batch_size}} {self.batch_size} is larger than the training set "
                f"({train_images} images); use a batch size <= {train_images}",
                "batch_size",
            )
        if self.queue_size > train_images:
            return [
                Note(
                    f"{{queue_size}} {self.queue_size} is larger than the training set ({train_images} "
                    "images): the queue holds several embeddings of each image, older ones stale",
                    "queue_size",
                )
            ]
        return []

    def resumed(self, given: Mapping[str, Any]) -> TrainConfig:
        """This config (a checkpoint's) continued with the settings a user ``given`` again
        (see :meth:`from_saved`)."""
        return TrainConfig.from_saved(self.to_dict(), given)

    @classmethod
    def from_saved(
        cls, saved: Mapping[str, Any], given: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """The config a checkpoint's ``settings`` describe, continued with ``given`` settings.

        Settings marked ``resumable`` take the given value (applied before the saved ones are
        checked, so a saved value that is no longer valid can be replaced); any other given
        setting must equal the saved one, compared as the config stores it (``out`` is where
        the checkpoint is, so it is ignored). The checkpoint's extra data fields are ignored.

        Raises:
            ConfigError: invalid saved settings, a setting that may not change that does,
                or an unknown one.
        """
        names = {f.name: meta for f, meta in _settings()}
        given = {k: v for k, v in (given or {}).items() if v is not None and k != "out"}
        _refuse_unknown(given)
        changes = {k: v for k, v in given.items() if names[k].resumable}
        legacy = {
            k: meta.legacy
            for k, meta in names.items()
            if k not in saved and meta.legacy is not NO_LEGACY
        }
        config = cls(**{**legacy, **{k: v for k, v in saved.items() if k in names}, **changes})
        for key, value in given.items():
            if key not in changes and not _same(key, _coerce(key, value), getattr(config, key)):
                raise ConfigError(
                    f"--resume continues a run with its saved settings, but {{{key}}} {value!r} "
                    f"differs from the checkpoint's {getattr(config, key)!r}; drop the option or "
                    "start a new run",
                    key,
                )
        return config


def _refuse_unknown(keywords: Mapping[str, Any]) -> None:
    known = [f.name for f, _ in _settings()]
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; valid: {', '.join(known)}")


def _same(key: str, given: Any, saved: Any) -> bool:
    """Equal settings; datasets by what they name (aliases, ``_`` for ``-``, the path's spelling)."""
    if key == "dataset" and not spec_problem(given) and not spec_problem(saved):
        (a, pa), (b, pb) = find(given), find(saved)
        return (
            a is b
            and (pa is None) == (pb is None)
            and os.path.normpath(pa or "") == os.path.normpath(pb or "")
        )
    return bool(given == saved)


def _settings() -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    for f in dataclasses.fields(TrainConfig):
        yield f, f.metadata["setting"]


def settings() -> list[tuple[str, Any, Setting]]:
    """``(name, default, Setting)`` of every field, in declaration order."""
    return [(f.name, f.default, meta) for f, meta in _settings()]


@functools.cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """A value as the field stores it: text parsed (tuples), sequences as tuples, paths as
    str, integers as floats where the field holds floats. Anything else is left for the
    field's rule to refuse."""
    meta: Setting = TrainConfig.__dataclass_fields__[name].metadata["setting"]
    if isinstance(value, str) and meta.parse is not None:
        try:
            return meta.parse(value)
        except ValueError as e:
            raise ConfigError(f"{{{name}}} must be {e}, got {value!r}", name) from None
    if isinstance(value, Path):
        return str(value)
    if meta.rule is PATH and isinstance(value, str) and value:
        return os.path.normpath(value)  # "./data/" and "data" are one folder
    return as_type(_types()[name], value)
