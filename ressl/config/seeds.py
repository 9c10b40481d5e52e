"""The run's seeds: the range of the ``seed`` setting, and the seeds derived from it.

This module imports no torch.
"""

from __future__ import annotations

from ressl.rules import integer

__all__ = ["SEED", "SEED_RANGE", "queue_seed", "views_seed"]

#: A seed is a signed 64-bit integer: torch's generators take [-2**63, 2**64), and ressl
#: derives the others by adding small offsets (``queue_seed``, ``views_seed``).
SEED_RANGE = (-(2**63), 2**63 - 1)
#: The ``seed`` setting's rule.
SEED = integer(SEED_RANGE[0], " (64 bits)", high=SEED_RANGE[1])


def queue_seed(seed: int) -> int:
    """The seed of the relation queue's initial embeddings (the weights draw from ``seed``)."""
    return seed + 1


def views_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s augmentation generator: each rank draws its own views,
    and rank 0's stream is the single-process run's (1000003, a prime, keeps ranks' streams
    apart from the other offsets)."""
    return seed + 2 + 1_000_003 * rank
