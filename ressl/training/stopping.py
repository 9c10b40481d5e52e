"""When a training run stops early: Ctrl-C or SIGTERM, agreed across ranks.

SIGTERM is what ``timeout``, Slurm, Kubernetes and ``docker stop`` send before they kill a
process, and what torchrun sends its workers on Ctrl-C: it is handled as the first Ctrl-C.
One process stops after the step in flight. Distributed ranks must stop together, or
one would wait forever in a collective the others have left, so they agree at
fixed points that every rank reaches in the same order: the start of each epoch and
the end of each progress window (:class:`StopAgreement`).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch

from ressl.distributed import World, any_rank

__all__ = ["StopAgreement", "Stopped"]

log = logging.getLogger("ressl")


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal; ``signum`` is the signal, ``checkpoint`` what it saved
    (empty after a second signal, which aborts at once without saving).

    A ``KeyboardInterrupt``, so code that catches Ctrl-C catches it; the CLI exits with
    ``128 + signum`` (130 after Ctrl-C, 143 after SIGTERM), the shell's convention.
    """

    def __init__(self, signum: int, checkpoint: str = "") -> None:
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopAgreement:
    """Signals in, one decision out: should the run stop now?

    Used as a context manager around the training loop: the first Ctrl-C or SIGTERM asks
    for a stop (and a checkpoint); a second one aborts at once with ``KeyboardInterrupt``.

    Args:
        world: This process's place in the run.
        device: Where the agreement's all-reduce runs (the training device).
    """

    def __init__(self, world: World, device: torch.device) -> None:
        self.world, self.device = world, device
        self.requested = False  # this process got a signal
        self.signum = 0  # which one
        self.stopping = False  # the run stops (agreed by every rank, when distributed)
        self._signals = [signal.SIGINT, signal.SIGTERM]
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopAgreement:
        try:
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second: abort now, without saving
            raise Stopped(signum)
        self.requested, self.signum = True, signum
        log.warning(
            "%s: stopping after this step (distributed: at the next progress window) and "
            "saving a checkpoint (again to abort)",
            "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name,
        )

    def agree(self) -> bool:
        """Decide now, at a point every rank reaches (a collective when distributed)."""
        self.stopping = (
            any_rank(self.requested, self.device) if self.world.distributed else self.requested
        )
        return self.stopping

    @property
    def flush_now(self) -> bool:
        """End the progress window early: one process stops right after the step in flight."""
        return self.requested and not self.world.distributed

    def after_step(self) -> bool:
        """Stop now? One process: whenever asked; distributed: only as last agreed."""
        if not self.world.distributed and self.requested:
            self.stopping = True
        return self.stopping
