"""One ReSSL training step, shared by single-process and distributed training.

``training_step`` composes the functional pieces in the official order:
student forward on every student crop -> EMA update -> teacher forward (no grad)
-> relation loss against the queue as it was -> SGD step -> all-gather the
teacher embeddings (distributed) -> enqueue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ressl.functional import ema_update_, relation_loss, symmetric_relation_loss
from ressl.models.network import ReSSL

__all__ = ["EncodeCrops", "training_step"]


class EncodeCrops(nn.Module):
    """``[x_1, ..., x_n] -> [encoder(x_1), ..., encoder(x_n)]`` in one forward call.

    Crops of different sides cannot share a batch; this wrapper lets
    ``DistributedDataParallel`` see all of a step's student forwards as one.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, crops: list[Tensor]) -> list[Tensor]:
        return [self.encoder(x) for x in crops]


def training_step(
    model: ReSSL,
    optimizer: torch.optim.Optimizer,
    x_teacher: Sequence[Tensor],
    x_student: Sequence[Tensor],
    *,
    momentum: float,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    symmetric: bool = False,
    autocast_dtype: torch.dtype | None = None,
    student: Callable[[list[Tensor]], list[Tensor]] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    teacher_bn: str = "own",
    teacher: Callable[[Tensor], Tensor] | None = None,
    observe: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """One optimisation step; returns the loss (detached, on the device, no host sync).

    Args:
        model: student, teacher and queue.
        optimizer: over the student's parameters (learning rate already set).
        x_teacher: the teacher's input batches, one per teacher crop (two with
            ``symmetric``).
        x_student: the student's input batches, one per student crop.
        momentum: EMA momentum for this step.
        student_temperature, teacher_temperature: tau_s, tau_t.
        symmetric: 2x backprop (``symmetric_relation_loss``); otherwise every
            student crop is compared with the first teacher crop's relation.
        autocast_dtype: run the forwards under autocast with this dtype.
        student: the student forward over a list of crops; default
            ``EncodeCrops(model.student)`` (pass the DDP-wrapped one when distributed).
        gather: applied to the teacher embeddings before enqueueing (the
            distributed all-gather); default identity.
        teacher_bn: ``"own"``: the teacher's BatchNorm statistics follow its own
            forward passes (the official code); ``"student"``: copied from the student.
        teacher: the teacher forward; default ``model.teacher`` (pass a compiled one).
        observe: called as ``observe(z_student, z_teacher, queue)`` after the loss and before
            the enqueue, with the first student crop's embeddings, the teacher embeddings
            whose relation it learns, and the queue the loss used (the training-time health
            measures, ``ressl.training.vitals``); it must not sync or change them.
    """
    device_type = model.queue.device.type
    forward = student if student is not None else EncodeCrops(model.student)
    ctx = (
        torch.autocast(device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx:
        z_s = forward(list(x_student))  # one (B, D) per student crop
        with torch.no_grad():
            ema_update_(  # official order: EMA before the teacher forward
                model.teacher, model.student, momentum, copy_buffers=teacher_bn == "student"
            )
            teach = teacher if teacher is not None else model.teacher
            z_t = [teach(x) for x in x_teacher]  # (B, D); two with symmetric
        if symmetric:
            loss = symmetric_relation_loss(
                z_s, z_t, model.queue, student_temperature, teacher_temperature
            )
        else:  # one crop, or multi-crop sharing the teacher relation
            loss = relation_loss(z_s, z_t[0], model.queue, student_temperature, teacher_temperature)
    if observe is not None:  # outside autocast; symmetric: crop a learns teacher crop b's relation
        observe(z_s[0].detach(), z_t[1 if symmetric else 0], model.queue)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # After the loss, so no embedding meets itself; each crop's batch gathered whole, in rank order,
    # so a distributed run enqueues what one process with the global batch would.
    keys = [gather(z) if gather is not None else z for z in z_t]
    model.enqueue_(keys[0] if len(keys) == 1 else torch.cat(keys))
    return loss.detach()
