"""The ReSSL computation as pure tensor functions.

Everything here is stateless: functions map tensors to tensors, and the two
state updates (`queue_push_`, `ema_update_`) change only what they are handed,
marked by the trailing underscore. Each works on CPU and CUDA, with fp32 or bf16
inputs (softmaxes are computed in fp32), and under ``torch.compile``.

Reference: Zheng et al., "ReSSL: Relational Self-Supervised Learning with Weak
Augmentation", NeurIPS 2021, arXiv:2107.09282.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ressl.errors import ConfigError

__all__ = [
    "sharpen",
    "relation",
    "relation_loss",
    "symmetric_relation_loss",
    "queue_push_",
    "ema_update_",
    "random_queue",
]

_Ptr = TypeVar("_Ptr", int, Tensor)


def _check_temperature(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _check_embeddings(name: str, z: Tensor, queue: Tensor) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim != 2:
        raise ValueError(f"{name} must have shape (B, D), got {tuple(z.shape)}")
    if z.shape[1] != queue.shape[1]:
        raise ValueError(
            f"queue has dim {queue.shape[1]} but {name} has dim {z.shape[1]}; "
            "the embedding dimension of both must match"
        )
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")


def _check_queue(queue: Tensor) -> None:
    if not isinstance(queue, Tensor):
        raise TypeError(f"queue must be a torch.Tensor, got {type(queue).__name__}")
    if queue.ndim != 2 or queue.shape[0] < 1:
        raise ValueError(f"queue must have shape (K, D) with K >= 1, got {tuple(queue.shape)}")


def sharpen(logits: Tensor, temperature: float) -> Tensor:
    """Softmax of ``logits / temperature``, computed in fp32.

    A temperature below 1 sharpens the distribution; ReSSL's teacher uses 0.04.

    Args:
        logits: ``(..., K)`` similarity logits, any float dtype.
        temperature: softmax temperature, ``> 0``.

    Returns:
        ``(..., K)`` float32 probabilities summing to 1 over the last dim.

    Raises:
        ValueError: if ``temperature`` is not a positive finite number.

    Example:
        >>> sharpen(torch.tensor([1.0, 0.0]), 0.1)
        tensor([9.9995e-01, 4.5398e-05])
    """
    _check_temperature("temperature", temperature)
    return torch.softmax(logits.float() / temperature, dim=-1)


@overload
def relation(
    z: Tensor, queue: Tensor, temperature: float, *, log: Literal[False] = ...
) -> Tensor: ...
@overload
def relation(z: Tensor, queue: Tensor, temperature: float, *, log: Literal[True]) -> Tensor: ...
def relation(z: Tensor, queue: Tensor, temperature: float, *, log: bool = False) -> Tensor:
    """The relation of each embedding to the queue: a distribution over its K entries.

    ``softmax(z @ queue.T / temperature)``; the matmul runs in the inputs' dtype
    (bf16 under autocast), the softmax in fp32.

    Args:
        z: ``(B, D)`` L2-normalised embeddings.
        queue: ``(K, D)`` L2-normalised queue of past teacher embeddings.
        temperature: softmax temperature, ``> 0``.
        log: return log-probabilities (numerically stable) instead of probabilities.

    Returns:
        ``(B, K)`` float32 (log-)probabilities.

    Raises:
        ValueError: on mismatched shapes or a non-positive temperature.
    """
    _check_queue(queue)
    _check_embeddings("z", z, queue)
    _check_temperature("temperature", temperature)
    logits = (z @ queue.to(z.dtype).T).float() / temperature  # (B, K)
    return torch.log_softmax(logits, dim=-1) if log else torch.softmax(logits, dim=-1)


def relation_loss(
    z_student: Tensor | Sequence[Tensor],
    z_teacher: Tensor,
    queue: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> Tensor:
    """ReSSL's relational loss: cross-entropy from the teacher's to the student's relation.

    ``-(softmax(z_t Q^T / tau_t) * log_softmax(z_s Q^T / tau_s)).sum(1).mean()``,
    i.e. KL(p_t || p_s) plus the (constant) teacher entropy. The teacher side
    carries no gradient. ``queue`` must be the queue as it was *before* this
    batch is enqueued, so no embedding is compared with itself.

    Several student views (multi-crop) may share one teacher relation: pass a
    sequence of ``(B, D)`` tensors or one ``(V, B, D)`` tensor; the teacher
    relation is computed once and the per-view losses are averaged.

    Args:
        z_student: ``(B, D)``, ``(V, B, D)`` or a sequence of ``(B, D)``
            L2-normalised student embeddings (with grad).
        z_teacher: ``(B, D)`` L2-normalised teacher embeddings.
        queue: ``(K, D)`` L2-normalised queue.
        student_temperature: tau_s, default 0.1.
        teacher_temperature: tau_t, default 0.04 (sharper than the student's).

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: on mismatched shapes or non-positive temperatures.

    Example:
        >>> q = F.normalize(torch.randn(4096, 128), dim=1)
        >>> zs, zt = F.normalize(torch.randn(2, 8, 128), dim=-1)
        >>> loss = relation_loss(zs, zt, q)
    """
    _check_queue(queue)
    _check_embeddings("z_teacher", z_teacher, queue)
    _check_temperature("student_temperature", student_temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    if isinstance(z_student, Tensor):
        views = list(z_student.unbind(0)) if z_student.ndim == 3 else [z_student]
    else:
        views = list(z_student)
    if not views:
        raise ValueError("z_student must hold at least one view, got an empty sequence")
    with torch.no_grad():
        p_teacher = relation(z_teacher.detach(), queue, teacher_temperature)  # (B, K)
    total = z_teacher.new_zeros((), dtype=torch.float32)
    for i, z in enumerate(views):
        _check_embeddings(f"z_student[{i}]" if len(views) > 1 else "z_student", z, queue)
        if z.shape[0] != z_teacher.shape[0]:
            raise ValueError(
                f"z_student has batch size {z.shape[0]} but z_teacher has {z_teacher.shape[0]}; "
                "each student view must pair with the teacher batch row by row"
            )
        log_p_student = relation(z, queue, student_temperature, log=True)  # (B, K)
        total = total - (p_teacher * log_p_student).sum(dim=1).mean()
    return total / len(views)


def symmetric_relation_loss(
    z_student: Sequence[Tensor],
    z_teacher: Sequence[Tensor],
    queue: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> Tensor:
    """The paper's "2x backprop" loss over two crops ``a`` and ``b`` of every image.

    ``1/2 [L(z_s_a, z_t_b) + L(z_s_b, z_t_a)]`` with ``L = relation_loss``: the
    student's embedding of each crop's strong view learns the teacher's relation
    for the *other* crop's weak view. Both halves use the same (pre-enqueue)
    queue; afterwards enqueue both teacher batches.

    Args:
        z_student: ``(z_s_a, z_s_b)``, each ``(B, D)``, with grad.
        z_teacher: ``(z_t_a, z_t_b)``, each ``(B, D)``.
        queue: ``(K, D)`` L2-normalised queue.
        student_temperature: tau_s.
        teacher_temperature: tau_t.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: unless exactly two student and two teacher embeddings are given,
            or on the checks of ``relation_loss``.
    """
    if len(z_student) != 2 or len(z_teacher) != 2:
        raise ValueError(
            f"symmetric_relation_loss takes two crops per side, (a, b); got {len(z_student)} student and "
            f"{len(z_teacher)} teacher embeddings"
        )
    (s_a, s_b), (t_a, t_b) = z_student, z_teacher
    loss_ab = relation_loss(s_a, t_b, queue, student_temperature, teacher_temperature)
    loss_ba = relation_loss(s_b, t_a, queue, student_temperature, teacher_temperature)
    return 0.5 * (loss_ab + loss_ba)


def queue_push_(queue: Tensor, ptr: _Ptr, keys: Tensor) -> _Ptr:
    """Write ``keys`` into the ring buffer ``queue`` at ``ptr``, in place; oldest entries go out.

    Wraps around the end of the queue, so K need not be a multiple of B.
    ``ptr`` may be a Python int or a 0-dim integer tensor (kept on the device,
    which avoids a host sync); the new pointer comes back in the same form.

    Args:
        queue: ``(K, D)`` queue, modified in place.
        ptr: index of the oldest entry, in ``[0, K)``.
        keys: ``(B, D)`` new entries (cast to the queue's dtype), ``B <= K``.

    Returns:
        The new pointer, ``(ptr + B) % K``.

    Raises:
        ValueError: if shapes do not match or ``B > K``.
    """
    _check_queue(queue)
    if not isinstance(keys, Tensor) or keys.ndim != 2:
        raise ValueError(f"keys must be a (B, D) tensor, got {getattr(keys, 'shape', keys)!r}")
    k, d = queue.shape
    b = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"queue has dim {d} but keys have dim {keys.shape[1]}")
    if b > k:
        raise ConfigError(f"cannot push {b} keys into a queue of size {k}; use queue_size >= batch")
    keys = keys.detach().to(queue.dtype)
    if isinstance(ptr, Tensor):
        index = (ptr.to(queue.device) + torch.arange(b, device=queue.device)) % k
        queue.index_copy_(0, index, keys)
        return (ptr + b) % k
    if not isinstance(ptr, int) or not 0 <= ptr < k:
        raise ValueError(f"ptr must be an int in [0, {k}), got {ptr!r}")
    end = ptr + b
    if end <= k:
        queue[ptr:end] = keys
    else:
        queue[ptr:] = keys[: k - ptr]
        queue[: end - k] = keys[k - ptr :]
    return end % k


@torch.no_grad()
def ema_update_(
    teacher: nn.Module, student: nn.Module, momentum: float, *, copy_buffers: bool = False
) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, in place.

    Parameters are blended with one fused ``torch._foreach_lerp_``. Buffers
    (BatchNorm running statistics) are the teacher's own, as in the official code
    (its momentum update covers parameters only): they follow the teacher's forward
    passes in train mode. ``copy_buffers=True`` copies the student's instead.

    Args:
        teacher: module updated in place.
        student: module of the same architecture.
        momentum: EMA momentum in ``[0, 1]``; 1 leaves the teacher unchanged.
        copy_buffers: also copy the student's buffers into the teacher (ressl < 0.2).

    Raises:
        ValueError: if ``momentum`` is outside ``[0, 1]`` or the modules differ.
    """
    if not (0.0 <= float(momentum) <= 1.0):
        raise ConfigError(f"momentum must be in [0, 1], got {momentum}")
    t_params: list[Tensor] = list(teacher.parameters())
    s_params: list[Tensor] = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher has {len(t_params)} parameters but student has {len(s_params)}; "
            "they must share an architecture"
        )
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(
                f"parameter shapes differ: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
            )
    if t_params:
        torch._foreach_lerp_(t_params, [s.detach() for s in s_params], 1.0 - float(momentum))
    if copy_buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            tb.copy_(sb)


def random_queue(
    size: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A ``(size, dim)`` queue of random unit vectors, as ReSSL initialises it.

    Args:
        size: K, number of entries, ``>= 1``.
        dim: D, embedding dimension, ``>= 1``.
        generator: source of randomness (on ``device``).
        device: where the queue lives.

    Returns:
        ``(K, D)`` float32 L2-normalised rows.
    """
    if size < 1 or dim < 1:
        raise ConfigError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
    q = torch.randn(size, dim, generator=generator, device=device)
    return F.normalize(q, dim=1)
