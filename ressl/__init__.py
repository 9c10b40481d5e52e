"""ressl: ReSSL (Relational Self-Supervised Learning with Weak Augmentation) for PyTorch.

Composable pure pieces (relation, sharpen, relation loss, queue and EMA
updates, weak/strong views), a minimal trainer built from them, safetensors
checkpoints, and evaluation protocols. ONNX export and serving live in
``ressl.export``; the command line in ``ressl.cli``.

Every name below is imported on first use (PEP 562), so ``import ressl`` loads
no PyTorch: the command line starts fast, and a serving machine without torch
can still use ``ressl.export.Embedder``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ressl._version import __version__

# The public API, each name listed once: the module that defines it -> its public names.
# ``__all__`` follows from it; the type checkers' imports below are checked equal to it by
# tests/core/test_api.py.
_PUBLIC: dict[str, tuple[str, ...]] = {
    "functional": (
        "sharpen",
        "relation",
        "relation_loss",
        "symmetric_relation_loss",
        "queue_push_",
        "ema_update_",
        "random_queue",
    ),
    "schedules": ("cosine_lr", "momentum_schedule"),
    "views": (
        "weak_view",
        "strong_view",
        "WeakView",
        "StrongView",
        "normalize",
        "random_resized_crop",
        "multicrop_scales",
    ),
    "views.plan": ("CropPlan",),
    "data.sources": ("ImageData", "ImageSource", "TensorImages", "FolderImages"),
    "data.loading": ("load_dataset",),
    "data.registry": ("DATASETS", "DatasetInfo", "dataset_names"),
    "models.backbones": ("SmallCNN",),
    "models.families": (
        "BackboneBuild",
        "build_backbone",
        "BackboneFamily",
        "FAMILIES",
        "register_family",
    ),
    "config.settings": ("TrainConfig", "BACKBONES"),
    "models.network": ("ProjectionHead", "Encoder", "ReSSL"),
    "errors": (
        "ResslError",
        "ConfigError",
        "CheckpointError",
        "DivergedError",
        "CollapseError",
        "RunInUseError",
        "ExportError",
    ),
    "training.loop": ("train", "TrainEvent"),
    "training.step": ("training_step", "EncodeCrops"),
    "distributed": ("CrossRankBatchNorm", "convert_batchnorm", "all_gather_cat"),
    "eval.features": ("extract_features", "split_features"),
    "eval.knn": ("knn_predict", "knn_accuracy"),
    "eval.linear": ("linear_probe",),
    "eval.tsne": ("tsne",),
    "eval.health": (
        "rankme",
        "alignment",
        "uniformity",
        "embedding_std",
        "healthy_std",
        "relation_entropy",
        "relation_agreement",
        "queue_similarity",
        "Health",
        "health",
    ),
    "eval.protocols": ("evaluate", "PROTOCOLS", "Protocol", "register_protocol"),
    "eval.sources": ("FeatureSource",),
    "runs.checkpoint": ("save_checkpoint", "load_checkpoint", "read_metadata", "load_encoder"),
}

_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = ["__version__", *_HOME]

if TYPE_CHECKING:
    from ressl.config.settings import BACKBONES, TrainConfig
    from ressl.data.loading import load_dataset
    from ressl.data.registry import DATASETS, DatasetInfo, dataset_names
    from ressl.data.sources import FolderImages, ImageData, ImageSource, TensorImages
    from ressl.distributed import CrossRankBatchNorm, all_gather_cat, convert_batchnorm
    from ressl.errors import (
        CheckpointError,
        CollapseError,
        ConfigError,
        DivergedError,
        ExportError,
        ResslError,
        RunInUseError,
    )
    from ressl.eval.features import extract_features, split_features
    from ressl.eval.health import (
        Health,
        alignment,
        embedding_std,
        health,
        healthy_std,
        queue_similarity,
        rankme,
        relation_agreement,
        relation_entropy,
        uniformity,
    )
    from ressl.eval.knn import knn_accuracy, knn_predict
    from ressl.eval.linear import linear_probe
    from ressl.eval.protocols import PROTOCOLS, Protocol, evaluate, register_protocol
    from ressl.eval.sources import FeatureSource
    from ressl.eval.tsne import tsne
    from ressl.functional import (
        ema_update_,
        queue_push_,
        random_queue,
        relation,
        relation_loss,
        sharpen,
        symmetric_relation_loss,
    )
    from ressl.models.backbones import SmallCNN
    from ressl.models.families import (
        FAMILIES,
        BackboneBuild,
        BackboneFamily,
        build_backbone,
        register_family,
    )
    from ressl.models.network import Encoder, ProjectionHead, ReSSL
    from ressl.runs.checkpoint import load_checkpoint, load_encoder, read_metadata, save_checkpoint
    from ressl.schedules import cosine_lr, momentum_schedule
    from ressl.training.loop import TrainEvent, train
    from ressl.training.step import EncodeCrops, training_step
    from ressl.views import (
        StrongView,
        WeakView,
        multicrop_scales,
        normalize,
        random_resized_crop,
        strong_view,
        weak_view,
    )
    from ressl.views.plan import CropPlan


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        return _deprecated(name)
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'ressl' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{home}", __name__)
    except ImportError as e:
        if not _torch_missing():  # torch is there: a real import error, shown as it is
            raise
        raise ImportError(
            f"ressl.{name} needs PyTorch, which is not installed here; pip install torch "
            "(serving embeddings with ressl.export.Embedder needs only onnxruntime, numpy and pillow)"
        ) from e
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def _torch_missing() -> bool:
    try:
        return importlib.util.find_spec("torch") is None
    except (ImportError, ValueError):  # a finder that refuses torch
        return True


# Names of ressl 0.1.0 that moved: they still work, with a warning saying where to go.
_DEPRECATED = {
    "resolve_settings": "TrainConfig.from_keywords(**settings).to_dict()",
    "DATASET_DEFAULTS": "ressl.DATASETS[name].recipe",
}


def _deprecated(name: str) -> Any:
    import warnings

    warnings.warn(f"ressl.{name} is deprecated; use {_DEPRECATED[name]}", DeprecationWarning, 2)
    if name == "DATASET_DEFAULTS":
        from ressl.data.registry import DATASETS

        return {key: dict(entry.recipe) for key, entry in DATASETS.items()}

    def resolve_settings(**settings: Any) -> dict[str, Any]:
        from ressl.config.settings import BACKBONES, TrainConfig

        return TrainConfig.from_keywords(**settings).to_dict()

    return resolve_settings


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
