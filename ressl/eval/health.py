"""Label-free health measures: is the representation alive, without any labels?

Pure tensor functions, each mapping embeddings (and the queue) to one 0-dim tensor
on the inputs' device. None calls ``.item()`` or branches on a tensor's value, so
the step-level ones (everything but ``rankme``) add no host sync: the trainer can
accumulate them on the device and read them with its one sync per window. Inputs
of any float dtype (bf16 under autocast) are computed in fp32; sums that cancel
(``queue_similarity``) and the SVD of ``rankme`` in fp64. ``alignment``,
``uniformity``, ``embedding_std`` and ``relation_entropy`` carry gradients (Wang &
Isola train with the first two); all work under ``torch.no_grad``, and ``health``
runs under it.

Conventions as in ``ressl.functional``: embeddings are ``(B, D)`` rows, the queue
``(K, D)`` with one past teacher embedding per row, and ``relation(z, queue, t)``
is a row's distribution over the K queue entries. Cosine-based measures normalise
rows themselves, so raw or L2-normalised embeddings give the same answer (a zero row
has no direction and stays the zero vector).

References: "Seeing quality without labels" in RESSL.md; docs/evaluation.md,
"Health without labels", gives the formulas and healthy ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ressl.functional import relation

__all__ = [
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
]


def _check_matrix(name: str, z: Tensor, min_rows: int = 1) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim != 2 or z.shape[0] < min_rows or z.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (N, D) with N >= {min_rows} and D >= 1, got {tuple(z.shape)}"
        )
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")


def _check_pair(name_a: str, z_a: Tensor, name_b: str, z_b: Tensor) -> None:
    _check_matrix(name_a, z_a)
    _check_matrix(name_b, z_b)
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(z_a.shape)} but {name_b} has {tuple(z_b.shape)}; "
            "row i of both must embed the same image"
        )


def _unit(z: Tensor) -> Tensor:
    """``(N, D)`` rows scaled to unit L2 norm in fp32 (a zero row stays zero)."""
    return F.normalize(z.float(), dim=1)


def rankme(features: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe: the effective rank of a feature matrix, between 1 and ``min(N, D)``.

    With singular values ``s_k`` of ``features`` and ``p_k = s_k / sum(s) + eps``,
    ``RankMe = exp(-sum_k p_k log p_k)`` (Garrido et al., "RankMe: Assessing the
    downstream performance of pretrained self-supervised representations by their
    rank", ICML 2023; ``eps = 1e-7`` as there). ``k`` equal singular values give
    exactly ``k`` when ``eps = 0``; with ``eps > 0`` the ``min(N, D) - k`` null
    directions add about ``(min(N, D) - k) * eps * log(1 / eps)`` to the entropy.
    Rows are used as given (the paper neither centres nor normalises them); pass
    ``N >= D`` rows so the rank is not capped by the sample.

    The SVD runs in fp64. On CUDA ``torch.linalg.svdvals`` synchronises the device
    with the CPU (PyTorch documents it), so this is for evaluation and monitor points,
    not for every step. A non-finite input gives NaN, not an exception; an all-zero
    matrix (collapse to a point) gives 1 when ``eps = 0``.

    Args:
        features: ``(N, D)`` features, any float dtype.
        eps: added to each normalised singular value, ``>= 0``.

    Returns:
        0-dim float32 tensor on ``features``' device.

    Example:
        >>> rankme(torch.eye(4), eps=0.0)
        tensor(4.)
    """
    _check_matrix("features", features)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < 1):
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    x = features.detach().double()
    finite = torch.isfinite(x).all()
    s = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))  # (min(N, D),)
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    effective_rank = torch.exp(-torch.special.xlogy(p, p).sum())
    return torch.where(finite, effective_rank, torch.nan).float()


def alignment(z_a: Tensor, z_b: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment of two views: ``mean_i ||z_a_i - z_b_i||^alpha`` on L2-normalised rows.

    Wang & Isola, "Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere", ICML 2020 (their ``align_loss``,
    ``alpha = 2``). 0 when both views embed identically, at most ``2^alpha``
    (opposite points); lower is better aligned. With ``alpha = 2`` it equals
    ``2 - 2 * mean cosine``.

    Args:
        z_a: ``(B, D)`` embeddings of one view.
        z_b: ``(B, D)`` embeddings of another view of the same images, row by row.
        alpha: exponent, ``> 0``.

    Returns:
        0-dim float32 tensor on the inputs' device.
    """
    _check_pair("z_a", z_a, "z_b", z_b)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    return (_unit(z_a) - _unit(z_b)).norm(dim=1).pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity: ``log mean_{i != j} exp(-t ||z_i - z_j||^2)`` on L2-normalised rows.

    Wang & Isola, ICML 2020 (their ``uniform_loss``, ``t = 2``). 0 when every row is
    the same point (collapse), negative otherwise; lower is more uniform. For rows
    spread uniformly over the sphere in D dimensions it tends to ``-2t`` as D grows
    (``-2t + 2t^2/D`` for Gaussian directions). Computed from the fp32 Gram matrix,
    ``||z_i - z_j||^2 = 2 - 2 z_i . z_j``, with a log-sum-exp, so it never
    underflows; ``B^2 D`` work.

    Args:
        z: ``(B, D)`` embeddings, ``B >= 2``.
        t: the kernel's scale, ``> 0``.

    Returns:
        0-dim float32 tensor on ``z``'s device.
    """
    _check_matrix("z", z, min_rows=2)
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0):
        raise ValueError(f"t must be a number > 0, got {t!r}")
    u = _unit(z)
    n = u.shape[0]
    sq_dist = (2 - 2 * (u @ u.T)).clamp_min(0)  # (B, B)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=u.device)
    log_kernel = (-t * sq_dist).masked_fill(~off_diagonal, -torch.inf)
    return torch.logsumexp(log_kernel.flatten(), dim=0) - math.log(n * (n - 1))


def healthy_std(dim: int) -> float:
    """``1 / sqrt(dim)``: ``embedding_std`` of directions spread evenly over the sphere."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    return 1.0 / math.sqrt(dim)


def embedding_std(z: Tensor) -> Tensor:
    """The mean over dimensions of the per-dimension std of L2-normalised embeddings.

    The collapse signal of Chen & He, "Exploring Simple Siamese Representation
    Learning", CVPR 2021 (section 4.1; lightly logs it as ``std_of_l2_normalized``):
    unit vectors spread evenly over the sphere in D dimensions have each
    coordinate's variance exactly ``1/D``, so about ``healthy_std(D) = 1/sqrt(D)``;
    rows collapsing to one point drive it to 0. Unbiased std (``N - 1``), fp32.

    Args:
        z: ``(B, D)`` embeddings, ``B >= 2``.

    Returns:
        0-dim float32 tensor on ``z``'s device; compare with ``healthy_std(D)``.
    """
    _check_matrix("z", z, min_rows=2)
    return _unit(z).std(dim=0).mean()


def relation_entropy(z: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """The mean entropy (nats) of ``relation(z, queue, temperature)``: how sharp a target is.

    ReSSL's own measure (Zheng et al., NeurIPS 2021: the teacher's sharpened
    relation is the target the student learns). Pass the teacher's embeddings and
    temperature for the target's sharpness. 0 when every row puts all its mass on
    one queue entry, ``log K`` when a row relates equally to all K entries (queue
    entries all alike, or a collapsed encoder); divide by ``log K`` for a value in
    [0, 1]. Computed from fp32 log-probabilities, so a vanishing probability
    contributes 0, never NaN.

    Args:
        z: ``(B, D)`` L2-normalised embeddings.
        queue: ``(K, D)`` L2-normalised queue.
        temperature: softmax temperature, ``> 0``.

    Returns:
        0-dim float32 tensor on ``z``'s device, in ``[0, log K]``.
    """
    log_p = relation(z, queue, temperature, log=True)  # (B, K)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def relation_agreement(z_student: Tensor, z_teacher: Tensor, queue: Tensor) -> Tensor:
    """The fraction of rows whose student and teacher relations peak at the same queue entry.

    ReSSL's own measure: top-1 agreement of ``relation(z_student, queue, tau_s)`` and
    ``relation(z_teacher, queue, tau_t)``. The argmax of a softmax does not depend on
    its temperature, so none is needed. 1 when both pick the same nearest entry
    for every image; about ``1/K`` for unrelated embeddings.

    Args:
        z_student: ``(B, D)`` student embeddings.
        z_teacher: ``(B, D)`` teacher embeddings of the same images, row by row.
        queue: ``(K, D)`` queue.

    Returns:
        0-dim float32 tensor on the inputs' device, in [0, 1].
    """
    _check_pair("z_student", z_student, "z_teacher", z_teacher)
    _check_matrix("queue", queue)
    if queue.shape[1] != z_student.shape[1]:
        raise ValueError(
            f"queue has dim {queue.shape[1]} but the embeddings have dim {z_student.shape[1]}; "
            "the embedding dimension of both must match"
        )
    q = queue.float()
    top_student = (z_student.float() @ q.T).argmax(dim=1)  # (B,)
    top_teacher = (z_teacher.float() @ q.T).argmax(dim=1)  # (B,)
    return (top_student == top_teacher).float().mean()


def queue_similarity(queue: Tensor) -> Tensor:
    """The mean cosine similarity between distinct queue entries: how alike the memory is.

    ReSSL's own measure. 1 when every entry is the same direction (a collapsed
    memory gives every relation the same shape), about 0 for random directions
    (the initial queue), and it can go down to ``-1/(K-1)``. Computed in fp64 in
    ``O(K D)``: with ``s = sum_i u_i`` over unit rows, the off-diagonal sum of cosines is
    ``||s||^2 - sum_i ||u_i||^2``.

    Args:
        queue: ``(K, D)`` queue, ``K >= 2``.

    Returns:
        0-dim float32 tensor on ``queue``'s device.
    """
    _check_matrix("queue", queue, min_rows=2)
    u = F.normalize(queue.detach().double(), dim=1)  # (K, D)
    k = u.shape[0]
    total = u.sum(dim=0).square().sum() - u.square().sum()  # sum over i != j of u_i . u_j
    return (total / (k * (k - 1))).float()


@dataclass(frozen=True)
class Health:
    """One step's health measures, each a 0-dim float32 tensor on the step's device.

    Attributes:
        alignment: ``alignment(z_student, z_teacher)``; 0 = the two views agree.
        uniformity: ``uniformity(z_student)``; 0 = collapsed, about -4 = spread out.
        std: ``embedding_std(z_student)``; compare with ``healthy_std(D)``, 0 = collapsed.
        std_ratio: ``std / healthy_std(D)``; about 1 healthy, 0 collapsed.
        teacher_entropy: ``relation_entropy(z_teacher, queue, tau_t)`` in nats.
        teacher_entropy_ratio: ``teacher_entropy / log K``, in [0, 1]; 1 = a flat target.
        agreement: ``relation_agreement(z_student, z_teacher, queue)``.
        queue_similarity: ``queue_similarity(queue)``; 1 = every entry alike.
    """

    alignment: Tensor
    uniformity: Tensor
    std: Tensor
    std_ratio: Tensor
    teacher_entropy: Tensor
    teacher_entropy_ratio: Tensor
    agreement: Tensor
    queue_similarity: Tensor

    def to_dict(self) -> dict[str, Tensor]:
        """``{name: tensor}`` in field order, tensors as they are (no copy, no sync)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@torch.no_grad()
def health(
    z_student: Tensor,
    z_teacher: Tensor,
    queue: Tensor,
    teacher_temperature: float = 0.04,
) -> Health:
    """The step-level health measures from the tensors a training step has, with no host sync.

    Pass what ``training_step`` computes, before the batch is enqueued: a student
    crop's embeddings, the teacher embeddings of the same images (the teacher crop
    whose relation that student crop learns), and the queue the loss used. RankMe is
    left out: its SVD synchronises on CUDA (see ``rankme``).

    Args:
        z_student: ``(B, D)`` L2-normalised student embeddings (gradients are ignored).
        z_teacher: ``(B, D)`` L2-normalised teacher embeddings, row by row the same images.
        queue: ``(K, D)`` L2-normalised queue, ``K >= 2``.
        teacher_temperature: tau_t, the temperature of the teacher's relation.

    Returns:
        A :class:`Health` of 0-dim float32 tensors on the inputs' device.
    """
    _check_pair("z_student", z_student, "z_teacher", z_teacher)
    _check_matrix("queue", queue, min_rows=2)
    k, d = queue.shape
    std = embedding_std(z_student)
    entropy = relation_entropy(z_teacher, queue, teacher_temperature)
    return Health(
        alignment=alignment(z_student, z_teacher),
        uniformity=uniformity(z_student),
        std=std,
        std_ratio=std / healthy_std(d),
        teacher_entropy=entropy,
        teacher_entropy_ratio=entropy / math.log(k),
        agreement=relation_agreement(z_student, z_teacher, queue),
        queue_similarity=queue_similarity(queue),
    )
