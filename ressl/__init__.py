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

from ._version import __version__

if TYPE_CHECKING:
    from .backbones import BackboneBuild
    from .checkpoint import (
        CheckpointError,
        load_checkpoint,
        load_encoder,
        read_metadata,
        save_checkpoint,
    )
    from .config import TrainConfig
    from .crops import CropPlan
    from .data import load_dataset
    from .datasets import DATASETS, DatasetInfo, dataset_names
    from .distributed import CrossRankBatchNorm, all_gather_cat, convert_batchnorm
    from .evaluate import extract_features, knn_accuracy, knn_predict, linear_probe, split_features
    from .functional import (
        cosine_lr,
        ema_update_,
        momentum_schedule,
        queue_push_,
        random_queue,
        relation,
        relation_loss,
        sharpen,
        symmetric_relation_loss,
    )
    from .manifold import tsne
    from .model import BACKBONES, Encoder, ProjectionHead, ReSSL, SmallCNN, build_backbone
    from .rules import ConfigError
    from .sources import FolderImages, ImageData, ImageSource, TensorImages
    from .step import EncodeCrops, training_step
    from .trainer import DivergedError, TrainEvent, train
    from .views import (
        StrongView,
        WeakView,
        multicrop_scales,
        normalize,
        random_resized_crop,
        strong_view,
        weak_view,
    )

# public name -> the module that defines it
_HOME: dict[str, str] = {
    **dict.fromkeys(
        ["sharpen", "relation", "relation_loss", "symmetric_relation_loss", "queue_push_"]
        + ["ema_update_", "momentum_schedule", "cosine_lr", "random_queue"],
        "functional",
    ),
    **dict.fromkeys(
        ["weak_view", "strong_view", "WeakView", "StrongView", "normalize"]
        + ["random_resized_crop", "multicrop_scales"],
        "views",
    ),
    "CropPlan": "crops",
    "BackboneBuild": "backbones",
    **dict.fromkeys(["ImageData", "ImageSource", "TensorImages", "FolderImages"], "sources"),
    "load_dataset": "data",
    **dict.fromkeys(
        ["BACKBONES", "SmallCNN", "ProjectionHead", "Encoder", "ReSSL", "build_backbone"], "model"
    ),
    **dict.fromkeys(["train", "TrainEvent", "DivergedError"], "trainer"),
    "TrainConfig": "config",
    "ConfigError": "rules",
    **dict.fromkeys(["DATASETS", "DatasetInfo", "dataset_names"], "datasets"),
    **dict.fromkeys(["training_step", "EncodeCrops"], "step"),
    **dict.fromkeys(["CrossRankBatchNorm", "convert_batchnorm", "all_gather_cat"], "distributed"),
    **dict.fromkeys(
        ["extract_features", "split_features", "knn_predict", "knn_accuracy", "linear_probe"],
        "evaluate",
    ),
    "tsne": "manifold",
    **dict.fromkeys(
        ["save_checkpoint", "load_checkpoint", "read_metadata", "load_encoder", "CheckpointError"],
        "checkpoint",
    ),
}

__all__ = [
    "__version__",
    # functional
    "sharpen",
    "relation",
    "relation_loss",
    "symmetric_relation_loss",
    "queue_push_",
    "ema_update_",
    "momentum_schedule",
    "cosine_lr",
    "random_queue",
    # views
    "weak_view",
    "strong_view",
    "WeakView",
    "StrongView",
    "normalize",
    "random_resized_crop",
    "multicrop_scales",
    "CropPlan",
    # data
    "ImageData",
    "ImageSource",
    "TensorImages",
    "FolderImages",
    "load_dataset",
    "dataset_names",
    # model
    "BACKBONES",
    "SmallCNN",
    "ProjectionHead",
    "Encoder",
    "ReSSL",
    "build_backbone",
    "BackboneBuild",
    # training
    "train",
    "TrainConfig",
    "ConfigError",
    "DivergedError",
    "DATASETS",
    "DatasetInfo",
    "training_step",
    "EncodeCrops",
    # distributed
    "CrossRankBatchNorm",
    "convert_batchnorm",
    "all_gather_cat",
    "TrainEvent",
    # evaluation
    "extract_features",
    "split_features",
    "knn_predict",
    "knn_accuracy",
    "linear_probe",
    "tsne",
    # checkpoints
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "load_encoder",
    "CheckpointError",
]


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
        from .datasets import DATASETS

        return {key: dict(entry.recipe) for key, entry in DATASETS.items()}

    def resolve_settings(**settings: Any) -> dict[str, Any]:
        from .config import TrainConfig

        return TrainConfig.from_keywords(**settings).to_dict()

    return resolve_settings


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
