"""Will it fit? The memory a training run needs, estimated before anything is allocated.

The model is built on the ``meta`` device (shapes, no memory) to count its weights, and
one image per crop size is run through it there, summing the outputs of its layers: what
autograd keeps for the backward pass. Settings whose estimate exceeds the device's whole
memory are refused with the estimate, naming the setting that dominates it; a run that
merely comes close is left to try. Host memory is the machine's physical memory; a CUDA
device's is its total memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ressl.config.specs import ModelSpec
from ressl.device import device_memory, human_bytes
from ressl.errors import ConfigError
from ressl.models.network import model_from_spec

__all__ = [
    "MemoryEstimate",
    "check_fits",
    "training_memory",
]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of a run: ``parts`` maps a part's name to (bytes, the settings to lower)."""

    parts: dict[str, tuple[int, tuple[str, ...]]]

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.parts.values())

    def describe(self) -> str:
        """``"queue 32.0 TB, weights 1.1 MB, ..."``, largest first."""
        parts = sorted(self.parts.items(), key=lambda kv: -kv[1][0])
        return ", ".join(f"{name} {human_bytes(n)}" for name, (n, _) in parts)

    @property
    def largest(self) -> tuple[str, ...]:
        """The settings behind the largest part."""
        return max(self.parts.values())[1]


def _activations_per_image(net: nn.Module, channels: int, side: int) -> int:
    """Elements the layers of ``net`` output for one ``side`` x ``side`` image (on the
    device of its parameters: meta, so free, unless it cannot run there)."""
    total = [0]

    def count(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and not getattr(module, "inplace", False):
            total[0] += output.numel()

    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    training = net.training
    try:
        with torch.no_grad():
            net.eval()  # the same shapes; BatchNorm takes a batch of one
            param = next(iter(net.parameters()), None)
            device = param.device if param is not None else torch.device("meta")
            net(torch.zeros(1, channels, side, side, device=device))
    finally:
        net.train(training)
        for hook in hooks:
            hook.remove()
    return total[0]


def _activations_by_side(net: nn.Module, channels: int, sides: Sequence[int]) -> dict[int, int]:
    """``_activations_per_image`` for each distinct side in ``sides``."""
    return {s: _activations_per_image(net, channels, s) for s in set(sides)}


def training_memory(
    spec: ModelSpec,
    *,
    backbone: nn.Module | None = None,
    batch_per_process: int,
    student_sides: Sequence[int],
    autocast: bool,
    data_bytes: int = 0,
) -> MemoryEstimate:
    """The memory of one training process: weights, queue, a step's activations, its data.

    Args:
        spec: The model.
        backbone: The module of a ``custom:`` backbone.
        student_sides: The side of each student crop of a step (both views when symmetric).
        autocast: bf16/fp16 activations (2 bytes) instead of fp32 (4).
        data_bytes: The training images held in this device's memory.
    """
    shape = dataclasses.replace(spec, queue_size=1)  # the queue is counted from its size
    model = model_from_spec(shape, backbone=backbone, meta=True)
    params = sum(p.numel() for p in model.student.parameters())
    buffers = sum(b.numel() for b in model.student.buffers())
    # student + teacher weights and buffers, the student's gradients and SGD momentum
    weights = 4 * (4 * params + 2 * buffers)
    channels, queue_size, embed_dim = spec.channels, spec.queue_size, spec.embed_dim
    try:
        per_image = _activations_by_side(model.student, channels, student_sides)
    except RuntimeError:  # a module holding tensors of its own: counted on a real copy
        model = model_from_spec(shape, backbone=backbone)
        per_image = _activations_by_side(model.student, channels, student_sides)
    activations = batch_per_process * sum(per_image[s] for s in student_sides)
    activations *= 2 if autocast else 4
    inputs = batch_per_process * 4 * channels * sum(s * s for s in student_sides) * 2
    return MemoryEstimate(
        {
            "weights and optimiser state": (
                weights,
                ("width", "hidden_dim") if spec.backbone == "small" else ("backbone", "hidden_dim"),
            ),
            "queue": (4 * queue_size * embed_dim, ("queue_size", "embed_dim")),
            "activations of a step": (activations + inputs, ("batch_size", "image_size")),
            "training images": (data_bytes, ("image_size", "subset")),
        }
    )


def check_fits(estimate: MemoryEstimate, device: torch.device) -> None:
    """Refuse settings that need more memory than ``device`` has, before any is allocated.

    Raises:
        ConfigError: naming the estimate, its parts and the setting to lower.
    """
    available = device_memory(device)
    if available is None or estimate.total <= available:
        return
    names = estimate.largest
    raise ConfigError(
        f"these settings need about {human_bytes(estimate.total)} of {device} memory "
        f"({estimate.describe()}), more than its {human_bytes(available)}; lower "
        + " or ".join(f"{{{name}}}" for name in names),
        *names,
    )
