"""Training-time health: the label-free measures of every step, and the collapse alarm.

Each step hands its student and teacher embeddings and the queue the loss used to
:meth:`StepHealth.observe`, which computes the batch measures of
:mod:`ressl.eval.health` on the device and keeps them there; the window's one host sync
reads their mean together with the losses (:meth:`StepHealth.take`). The queue's own
measure is taken once per window (the queue changes by one batch a step). The relation
measures use the first ``RELATION_ROWS`` rows of the batch: each is a ``(rows, K)``
product, and 64 rows keep their cost under 0.2% of a CPU step at K = 4096.

The alarm (:func:`collapse`) reads a window's means, from the end of the learning-rate
warm-up on (:func:`grace_epochs`), and knows two collapses. *To a
point*: every image maps to nearly one direction, so the per-dimension std of the
normalised embeddings falls to 0 (healthy: about 1/sqrt(D), a ratio of 1; the default
Fashion-MNIST recipe sits at 0.2-0.4 in its first epochs) and every pair of embeddings
is close (uniformity near 0; the recipe sits below -0.2). *A flat target*: the
teacher's relation over the queue is uniform, so the loss is log K and teaches nothing
(equal teacher and student temperatures at 0.5 or 1 reach 0.999 of the maximum entropy
within an epoch; the recipe's tau_t = 0.04 sits below 0.95, tau_t = tau_s = 0.1 at
0.993). See docs/evaluation.md, "The collapse alarm", for the runs behind the thresholds.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ressl.distributed import any_rank
from ressl.errors import CollapseError
from ressl.eval.health import (
    alignment,
    embedding_std,
    healthy_std,
    queue_similarity,
    relation_agreement,
    relation_entropy,
    uniformity,
)
from ressl.runs.folder import CHECKPOINT

if TYPE_CHECKING:
    from ressl.training.build import Run

__all__ = [
    "COLLAPSE_ENTROPY_RATIO",
    "COLLAPSE_STD_RATIO",
    "COLLAPSE_UNIFORMITY",
    "MEASURES",
    "RELATION_ROWS",
    "StepHealth",
    "alarm",
    "grace_epochs",
    "collapse",
]

log = logging.getLogger("ressl")

#: The measures a run logs, in the order of :meth:`StepHealth.take`'s vector (names of
#: :class:`ressl.eval.health.Health` fields).
MEASURES = (
    "alignment",
    "uniformity",
    "std_ratio",
    "teacher_entropy_ratio",
    "agreement",
    "queue_similarity",
)

#: Rows of the batch the relation measures (entropy, agreement) use.
RELATION_ROWS = 64

#: Collapse to a point: the std of the normalised student embeddings below this fraction
#: of its healthy value 1/sqrt(D) ...
COLLAPSE_STD_RATIO = 0.05
#: ... and the embeddings' uniformity above this (0 = every embedding the same point).
COLLAPSE_UNIFORMITY = -0.05
#: A flat target: the teacher relation's entropy above this fraction of log K.
COLLAPSE_ENTROPY_RATIO = 0.998


class StepHealth:
    """The health measures of the steps since the last :meth:`take`, kept on the device.

    Args:
        teacher_temperature: tau_t, for the teacher relation's entropy.
    """

    def __init__(self, teacher_temperature: float) -> None:
        self.teacher_temperature = teacher_temperature
        self.steps: list[Tensor] = []  # one (len(MEASURES) - 1,) vector per step
        self.queue: Tensor | None = None
        self.warned_epoch = -1  # the epoch of the last collapse warning

    @torch.no_grad()
    def observe(self, z_student: Tensor, z_teacher: Tensor, queue: Tensor) -> None:
        """One step's batch measures (no host sync); ``queue`` is the one the loss used."""
        s, t = z_student.detach().float(), z_teacher.detach().float()
        rows = min(RELATION_ROWS, s.shape[0])
        k, d = queue.shape
        entropy = relation_entropy(t[:rows], queue, self.teacher_temperature)
        measures = [
            alignment(s, t),
            uniformity(s),
            embedding_std(s) / healthy_std(d),
            entropy / math.log(k),
            relation_agreement(s[:rows], t[:rows], queue),
        ]
        self.steps.append(torch.stack(measures))
        self.queue = queue

    def forget(self, steps: int) -> None:
        """Drop all but the first ``steps`` steps (a step that is taken again)."""
        del self.steps[steps:]

    def take(self) -> Tensor | None:
        """The mean of each measure over the steps since the last ``take`` (``MEASURES``'
        order; the queue's measure of the latest queue), on the device; None without steps."""
        if not self.steps or self.queue is None:
            return None
        steps = torch.stack(self.steps).mean(dim=0)
        out = torch.cat([steps, queue_similarity(self.queue).view(1)])
        self.steps, self.queue = [], None
        return out


def collapse(values: dict[str, float]) -> str | None:
    """What says a window's embeddings collapsed, or None: the std of the normalised student
    embeddings below ``COLLAPSE_STD_RATIO`` of its healthy value *and* their uniformity above
    ``COLLAPSE_UNIFORMITY`` (every image maps to nearly one point), or the teacher relation's
    entropy above ``COLLAPSE_ENTROPY_RATIO`` of its maximum (a flat target)."""
    std, uni = values.get("std_ratio", math.nan), values.get("uniformity", math.nan)
    entropy = values.get("teacher_entropy_ratio", math.nan)
    if std < COLLAPSE_STD_RATIO and uni > COLLAPSE_UNIFORMITY:
        return (
            f"the embeddings' std is {std:.3f} of its healthy value 1/sqrt(D) (collapse: < "
            f"{COLLAPSE_STD_RATIO:g}) and their uniformity {uni:.3f} (collapse: > "
            f"{COLLAPSE_UNIFORMITY:g}): every image maps to nearly one point"
        )
    if entropy > COLLAPSE_ENTROPY_RATIO:
        return (
            f"the teacher relation's entropy is {entropy:.4f} of its maximum log K (collapse: > "
            f"{COLLAPSE_ENTROPY_RATIO:g}): the target is flat and the loss teaches nothing"
        )
    return None


def grace_epochs(warmup_epochs: int) -> int:
    """The epochs the alarm does not judge: the learning-rate warm-up's, at least one. A
    network at its random start can pass near a point before it spreads out (ResNet-18 on
    Fashion-MNIST reaches an embedding std of 0.008 of its healthy value in its first epoch)."""
    return max(warmup_epochs, 1)


def alarm(run: Run, health: StepHealth, values: dict[str, float], step: int) -> None:
    """The collapse alarm on a window's measures, per ``run.config.collapse``: ``stop`` raises
    a :class:`CollapseError` on every rank, ``warn`` warns once an epoch, ``off`` is silent.
    Distributed, the ranks agree (one collective a window); each judges its own batch."""
    mode, epoch = run.config.collapse, run.state.epoch
    if mode == "off" or epoch < grace_epochs(run.config.warmup_epochs):
        return
    what = collapse(values)
    if not any_rank(what is not None, run.device):
        return
    where = f"step {step} (epoch {epoch + 1})"
    if mode == "warn":
        if run.world.main and what is not None and health.warned_epoch != epoch:
            health.warned_epoch = epoch
            log.warning(
                "the embeddings collapsed at %s: %s; training on (--collapse warn)", where, what
            )
        return
    raise collapsed(run, f"at {where}, {what or 'on another process'}")


def collapsed(run: Run, what: str) -> CollapseError:
    """The error that stops a collapsed run: what the measures said, what was kept, what to try."""
    c, path = run.config, run.run_dir / CHECKPOINT
    kept = (
        f"{path} keeps the last state before it" if path.exists() else "no checkpoint was written"
    )
    return CollapseError(
        f"training collapsed {what}; nothing of it was saved ({kept}). Try a lower {{lr}} "
        f"(now {c.lr:g}) or a {{teacher_temperature}} sharper than {{student_temperature}} (now "
        f"{c.teacher_temperature:g} and {c.student_temperature:g}), then train again; or "
        "{collapse} warn to train on",
        "lr",
        "teacher_temperature",
        "student_temperature",
        "collapse",
    )
