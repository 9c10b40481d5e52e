"""A run's optimisation step on a batch, eager or compiled, and the clock of its throughput.

A compiled run's first ``WARMUP_STEPS`` steps are its warm-up (compile, CUDA-graph capture,
first replay): :class:`Stepper` times them and holds their time and images out of images/s
(:class:`Stopwatch`), and when one fails it puts the state back to where the step started
(``StepSnapshot``) and trains eager from that step on, with one warning, so no step is
taken twice. The epoch loop calls the step and never sees any of this.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

from ressl.distributed import all_gather_cat, reset_ddp_
from ressl.errors import first_line
from ressl.training.build import Run
from ressl.training.compiled import WARMUP_STEPS, StepSnapshot
from ressl.training.step import training_step
from ressl.training.vitals import StepHealth

__all__ = ["Meter", "Stepper", "Stopwatch"]

log = logging.getLogger("ressl")


class Stopwatch:
    """Training seconds and images, less those held out of images/s (the compile warm-up's)."""

    def __init__(self) -> None:
        self.held_seconds = 0.0
        self.held_images = 0

    def now(self) -> float:
        """A time to subtract from a later ``now()``: seconds held meanwhile do not count."""
        return time.perf_counter() - self.held_seconds

    def hold(self, seconds: float, images: int) -> None:
        self.held_seconds += seconds
        self.held_images += images


class Meter:
    """Images and seconds since the last ``measure``, the compile warm-up's held out."""

    def __init__(self, watch: Stopwatch) -> None:
        self.watch, self.images = watch, 0
        self.start, self.held = watch.now(), watch.held_images

    def add(self, images: int) -> None:
        self.images += images

    def measure(self) -> tuple[int, float]:
        """``(images, seconds)`` since the start; then a new start."""
        now, held = self.watch.now(), self.watch.held_images
        out = (self.images - (held - self.held), now - self.start)
        self.images, self.start, self.held = 0, now, held
        return out


class Stepper:
    """``stepper(batch, lr, momentum, images)``: one optimisation step of ``run`` on a batch
    (whole images, or crops cut in the workers) of ``images`` images over all processes.
    Each step's health measures wait on the device in ``health`` until the window reads them."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.watch = Stopwatch()
        self.health = StepHealth(run.config.teacher_temperature)
        self.compiled = run.compiled  # until its warm-up ends or fails
        self.student: Any = run.student if self.compiled is None else self.compiled.student
        self.teacher: Any = None if self.compiled is None else self.compiled.teacher
        self.graphs = self.compiled is not None and self.compiled.graphs

    def __call__(
        self, batch: Tensor | list[Tensor], lr: float, momentum: float, images: int
    ) -> Tensor:
        if self.compiled is None:
            return self._step(batch, lr, momentum)
        t = time.perf_counter()
        loss = self._warmup_step(batch, lr, momentum)
        self.watch.hold(time.perf_counter() - t, images)
        return loss

    def _step(self, batch: Tensor | list[Tensor], lr: float, momentum: float) -> Tensor:
        run, c = self.run, self.run.config
        view_kw: dict[str, Any] = dict(
            generator=run.state.views,
            mean=run.data.mean,
            std=run.data.std,
            student=run.student_view,
            teacher=run.teacher_view,
        )
        if isinstance(batch, Tensor):
            x_t, x_s = run.plan.views(batch, **view_kw)
        else:
            x_t, x_s = run.plan.views_of_crops(batch, **view_kw)
        if c.channels_last:
            x_t = [x.contiguous(memory_format=torch.channels_last) for x in x_t]
            x_s = [x.contiguous(memory_format=torch.channels_last) for x in x_s]
        for group in run.state.optimizer.param_groups:
            group["lr"] = lr
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead
        return training_step(
            run.state.model,
            run.state.optimizer,
            x_t,
            x_s,
            momentum=momentum,
            student_temperature=c.student_temperature,
            teacher_temperature=c.teacher_temperature,
            symmetric=run.plan.symmetric,
            autocast_dtype=run.amp,
            student=self.student,
            gather=all_gather_cat if run.world.distributed else None,
            teacher_bn=c.teacher_bn,
            teacher=self.teacher,
            observe=self.health.observe,
        )

    def _warmup_step(self, batch: Tensor | list[Tensor], lr: float, momentum: float) -> Tensor:
        """A warm-up step; its failure sends the run back to eager from the step's start."""
        compiled, state = self.compiled, self.run.state
        assert compiled is not None
        before, measured = StepSnapshot.take(state), len(self.health.steps)
        t = time.perf_counter()
        try:
            loss = self._step(batch, lr, momentum)
            float(loss)  # the compiled graphs have run
        except Exception as e:  # noqa: BLE001 - dynamo, inductor and CUDA graphs raise many kinds
            self._fall_back(e, before)
            self.health.forget(measured)
            return self._step(batch, lr, momentum)
        compiled.seconds += time.perf_counter() - t
        compiled.warmup_left -= 1
        if compiled.warmup_left == 0:
            self.compiled = None
            if self.run.world.main:
                log.info(
                    "compiled the step in %.1f s (its first %d steps, kept out of images/s)",
                    compiled.seconds,
                    WARMUP_STEPS,
                )
        return loss

    def _fall_back(self, error: Exception, before: StepSnapshot) -> None:
        """Eager from now on, from the state ``before`` the failed step: the compiled graphs
        freed, the eager student's DDP state reset."""
        compiled, run = self.compiled, self.run
        assert compiled is not None
        if run.world.main:
            log.warning(
                "torch.compile failed at step %d (%s: %s); training eager from its start",
                run.state.step(run.steps_per_epoch) + 1,
                type(error).__name__,
                first_line(error, 200),
            )
        before.restore_(run.state)
        reset_ddp_(compiled.eager_student)  # a backward may have failed part-way
        torch.compiler.reset()  # frees the compiled graphs and their CUDA-graph memory pool
        self.compiled, self.student, self.teacher, self.graphs = (
            None,
            compiled.eager_student,
            None,
            False,
        )
