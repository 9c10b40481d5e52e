"""A trained backbone as a plain safetensors state dict, for fine-tuning in its own library.

The file holds exactly ``backbone.state_dict()``: the names its library gives them
(``torchvision.models.get_model(NAME)`` or ``timm.create_model(NAME, num_classes=0)``,
with the changes ressl made, e.g. the small-image stem, and the classifier removed).
Its metadata says how to rebuild the network (``backbone_build``) and gives the code
that does it (``code``, from :func:`loading_code`), so the file loads without ressl and
gives ressl's features (the file named by its full path, eval mode, the run's mean/std)::

    net = torchvision.models.get_model("resnet18", weights=None)
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file("/abs/path/backbone.safetensors"))
    net.eval()
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, -1, 1, 1)
    ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save
from torch import nn

from ressl._version import __version__
from ressl.atomic import write_atomic
from ressl.errors import ConfigError
from ressl.models.families import BackboneBuild
from ressl.runs.checkpoint import open_encoder
from ressl.runs.folder import resolve_checkpoint

__all__ = ["BackboneWeights", "loading_code", "save_backbone_weights"]

#: The ``format`` metadata value of a backbone weights file.
FORMAT = "ressl-backbone-weights"


@dataclass(frozen=True)
class BackboneWeights:
    """What :func:`save_backbone_weights` wrote.

    Attributes:
        path: the file.
        build: how to rebuild the network it fits.
        tensors: the number of tensors.
        parameters: the number of parameter values (buffers not counted).
        mean, std: the per-channel normalisation the backbone was trained with.
    """

    path: Path
    build: BackboneBuild
    tensors: int
    parameters: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def loading_code(
    build: BackboneBuild, path: str | Path, mean: Sequence[float], std: Sequence[float]
) -> str:
    """Python that loads the weights file at ``path`` without ressl and computes ressl's
    backbone features: the network rebuilt with its own library, the file by its absolute
    path (the code runs from any folder), ``eval()`` (BatchNorm's running statistics, as
    ressl evaluates; train mode gives other features), and the run's mean/std.

    Raises:
        ValueError: for a custom module (only its author can build it).
    """
    mean_text = ", ".join(f"{float(m)!r}" for m in mean)
    std_text = ", ".join(f"{float(s)!r}" for s in std)
    return (
        build.code(str(Path(path).resolve()))
        + "\n".join(
            [
                "net.eval()  # BatchNorm's running statistics, as ressl evaluates (train mode differs)",
                f"mean = torch.tensor([{mean_text}]).view(1, -1, 1, 1)",
                f"std = torch.tensor([{std_text}]).view(1, -1, 1, 1)",
                "",
                "",
                "def features(images):",
                '    """(B, C, H, W) floats in [0, 1] -> (B, F) backbone features, as ressl computes them."""',
                "    with torch.no_grad():",
                "        return net((images - mean) / std)",
            ]
        )
        + "\n"
    )


def save_backbone_weights(
    checkpoint: str | Path,
    out: str | Path,
    *,
    weights: str = "student",
    backbone: nn.Module | None = None,
) -> BackboneWeights:
    """Write a checkpoint's backbone as a plain safetensors state dict (atomically).

    Args:
        checkpoint: a ressl checkpoint file or run folder.
        out: the ``.safetensors`` file to write.
        weights: ``"student"`` or ``"teacher"``.
        backbone: the module of a run trained with a custom backbone (see ``load_encoder``).

    Raises:
        CheckpointError: on a bad checkpoint.
        ValueError: on bad arguments.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"out must name a .safetensors file, got {out}")
    file = resolve_checkpoint(checkpoint)
    encoder, checked = open_encoder(file, weights, backbone=backbone)
    model, data = checked.model, checked.data
    net: nn.Module = encoder.backbone  # type: ignore[assignment]
    build: BackboneBuild = net.ressl_build  # type: ignore[assignment]
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    try:
        code = loading_code(build, out, data.mean, data.std)
    except ValueError as e:
        code = f"# {e}"
    described = {
        "dataset": checked.settings.get("dataset"),
        "image_size": model.image_size,
        "channels": model.channels,
        "mean": list(data.mean),
        "std": list(data.std),
        "epochs": checked.settings.get("epochs"),
    }
    meta = {
        "format": FORMAT,
        "ressl_version": __version__,
        "backbone_build": build.to_json(),
        "code": code,
        "weights": weights,
        "source": file.name,
        "settings": json.dumps(described),
    }
    write_atomic(out, save(state, metadata=meta), "backbone weights")
    params = sum(p.numel() for p in net.parameters())
    return BackboneWeights(out, build, len(state), params, data.mean, data.std)
