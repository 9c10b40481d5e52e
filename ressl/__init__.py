"""ressl: ReSSL (Relational Self-Supervised Learning with Weak Augmentation) for PyTorch.

Composable pure pieces (relation, sharpen, relation loss, queue and EMA
updates, weak/strong views), a minimal trainer built from them, safetensors
checkpoints, and evaluation protocols. ONNX export and serving live in
``ressl.export``; the command line in ``ressl.cli``.
"""

from ._version import __version__

try:
    import torch as _torch  # noqa: F401  (the library needs it; serving with ressl.export does not)
except (
    ImportError
):  # a serving machine: ressl.export.Embedder runs on onnxruntime, numpy and pillow
    _HAVE_TORCH = False
else:
    _HAVE_TORCH = True

if _HAVE_TORCH:
    from .checkpoint import (
        CheckpointError,
        load_checkpoint,
        load_encoder,
        read_metadata,
        save_checkpoint,
    )
    from .crops import CropPlan
    from .data import (
        FolderImages,
        ImageData,
        ImageSource,
        TensorImages,
        dataset_names,
        load_dataset,
    )
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
    from .model import BACKBONES, Encoder, ProjectionHead, ReSSL, SmallCNN, build_backbone
    from .step import EncodeCrops, training_step
    from .train import DATASET_DEFAULTS, TrainEvent, resolve_settings, train
    from .tsne import tsne
    from .views import multicrop_scales, random_resized_crop, strong_view, weak_view

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
    # training
    "train",
    "training_step",
    "EncodeCrops",
    # distributed
    "CrossRankBatchNorm",
    "convert_batchnorm",
    "all_gather_cat",
    "resolve_settings",
    "TrainEvent",
    "DATASET_DEFAULTS",
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


def __getattr__(name: str) -> object:
    if name in __all__ and not _HAVE_TORCH:
        raise ImportError(
            f"ressl.{name} needs PyTorch, which is not installed here; pip install torch "
            "(serving embeddings with ressl.export.Embedder needs only onnxruntime, numpy and pillow)"
        )
    raise AttributeError(f"module 'ressl' has no attribute {name!r}")
