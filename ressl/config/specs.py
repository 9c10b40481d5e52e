"""What a run builds, as typed, frozen specs: the model's shape and the data's statistics.

A run builds its specs once (``ModelSpec.of``, ``DataSpec.of``), stores them in every
checkpoint's ``settings`` JSON beside the config (``to_settings``: the same keys and values
checkpoints have always held) and reads them back once (``from_settings``), checking each
field there. The model builder, the memory estimate, the checkpoint checks and both
exports take the specs, so a setting that changes the model's shape is a field here, its
use, and its test.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ressl.config.settings import TrainConfig
from ressl.config.settings import settings as config_fields
from ressl.errors import CheckpointError
from ressl.rules import Rule, integer, is_int, is_number

__all__ = ["DataSpec", "ModelSpec", "run_settings"]


def _shown(value: Any) -> str:
    return json.dumps(value)[:60]


def _need(source: str, settings: Mapping[str, Any], key: str, rule: Rule) -> Any:
    """``settings[key]`` when ``rule`` takes it, else a CheckpointError naming ``source``."""
    if key not in settings:
        raise CheckpointError(f"{source}: its settings have no {key!r}")
    value = settings[key]
    if not rule.ok(value):
        raise CheckpointError(
            f"{source}: its settings' {key} is {_shown(value)}; it must be {rule.expect}"
        )
    return value


@dataclass(frozen=True)
class ModelSpec:
    """The settings the model's shapes follow; each field's valid range is its
    ``TrainConfig`` field's rule.

    Attributes:
        backbone: ``"small"``, ``"resnet18"``, ``"torchvision:NAME"``, ``"timm:NAME"`` or
            ``"custom:ClassName"`` (a module given through the API).
        width: The small CNN's first-stage width (ignored by the other backbones).
        hidden_dim: The projection head's hidden width.
        embed_dim: The embedding size D.
        queue_size: K, the teacher embeddings the relation queue keeps.
        channels: Image channels, the data's.
        image_size: The side of the stored images, the data's.
    """

    backbone: str
    width: int
    hidden_dim: int
    embed_dim: int
    queue_size: int
    channels: int
    image_size: int

    @classmethod
    def of(cls, config: TrainConfig, *, channels: int, image_size: int) -> ModelSpec:
        """A new run's model: the config's shape settings on the data's images."""
        return cls(
            backbone=config.backbone,
            width=config.width,
            hidden_dim=config.hidden_dim,
            embed_dim=config.embed_dim,
            queue_size=config.queue_size,
            channels=channels,
            image_size=image_size,
        )

    @classmethod
    def rules(cls) -> dict[str, Rule]:
        """Field name -> its valid range (the config field's of the same name)."""
        rules = {name: setting.rule for name, _, setting in config_fields()}
        return {f.name: rules[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], source: str) -> ModelSpec:
        """The spec a checkpoint's ``settings`` hold, every field checked.

        Raises:
            CheckpointError: a field missing or out of range, naming ``source``.
        """
        return cls(**{k: _need(source, settings, k, rule) for k, rule in cls.rules().items()})

    def to_settings(self) -> dict[str, Any]:
        """The fields as checkpoint ``settings`` hold them."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataSpec:
    """What the data told the run, beside the model's channels and image size.

    Attributes:
        mean, std: Per-channel normalisation (one value per channel; std > 0).
        num_classes: Labelled classes (0: unlabelled).
        files: An image folder's ``(file count, digest)`` (a resume compares them); None for
            other data, and in checkpoints from before ressl recorded it.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    files: tuple[int, str] | None = None

    @classmethod
    def of(
        cls,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        files: tuple[int, str] | None = None,
    ) -> DataSpec:
        return cls(tuple(mean), tuple(std), num_classes, files)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], channels: int, source: str) -> DataSpec:
        """The spec a checkpoint's ``settings`` hold for ``channels``-channel images, checked.

        Raises:
            CheckpointError: a field missing or out of range, naming ``source``.
        """

        def values(low: float, expect: str) -> Rule:
            def ok(v: Any) -> bool:
                return (
                    isinstance(v, list)
                    and len(v) == channels
                    and all(is_number(x) and x > low for x in v)
                )

            return Rule(f"a list of {channels} finite numbers{expect}", ok)

        mean = _need(source, settings, "mean", values(-float("inf"), ""))
        std = _need(source, settings, "std", values(0.0, " > 0"))
        classes = _need(source, {"num_classes": 0, **settings}, "num_classes", integer(0))
        count: Any = settings.get("data_files")
        digest = settings.get("data_digest")
        files = (int(count), digest) if is_int(count) and isinstance(digest, str) else None
        return cls.of(mean, std, classes, files)

    def to_settings(self) -> dict[str, Any]:
        """The fields as checkpoint ``settings`` hold them."""
        out: dict[str, Any] = {
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
        }
        if self.files is not None:
            out["data_files"], out["data_digest"] = self.files
        return out


def run_settings(config: TrainConfig, model: ModelSpec, data: DataSpec) -> dict[str, Any]:
    """A checkpoint's ``settings``: the config, with the specs' fields (the data's image size
    and channels in place of the config's, which may be None)."""
    return {**config.to_dict(), **model.to_settings(), **data.to_settings()}
