"""The training step under ``torch.compile``: the compiled networks, which modes capture CUDA
graphs, and the warm-up steps whose failure sends the run back to eager from the state the
step started in (``StepSnapshot``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ressl.runs.checkpoint import TrainState

__all__ = ["WARMUP_STEPS", "Compiled", "StepSnapshot", "compile_step", "uses_cudagraphs"]

#: Steps that run under the eager fallback. Inductor compiles at a network's first call;
#: CUDA-graph trees then run the compiled graph once to warm up, record (capture) it at the
#: second call and replay it from the third, so an error of capture or first replay comes
#: by step 3. Later errors are bugs, and keep their traceback.
WARMUP_STEPS = 3


def uses_cudagraphs(mode: str) -> bool:
    """Whether ``torch.compile(mode=mode)`` captures CUDA graphs: torch's own notion, the
    mode's ``triton.cudagraphs`` option over inductor's setting (reduce-overhead and
    max-autotune do; default and max-autotune-no-cudagraphs do not, unless the setting is on)."""
    from torch._inductor import config, list_mode_options

    options = {} if mode == "default" else list_mode_options(mode)
    return bool(options.get("triton.cudagraphs", config.triton.cudagraphs))


@dataclass
class Compiled:
    """A compiled run's networks, the eager student to fall back to, and its warm-up."""

    student: Any  # torch.compile's wrappers
    teacher: Any
    eager_student: nn.Module
    graphs: bool  # the mode captures CUDA graphs: each step is marked as a new one
    warmup_left: int = WARMUP_STEPS  # steps still run under the eager fallback
    seconds: float = 0.0  # the warm-up steps' time: compile and capture, kept out of images/s


def compile_step(student: nn.Module, teacher: nn.Module, mode: str) -> Compiled:
    """The student's forward and backward and the teacher's forward under ``torch.compile``."""
    kw: dict[str, Any] = dict(mode=None if mode == "default" else mode, dynamic=False)
    return Compiled(
        torch.compile(student, **kw),
        torch.compile(teacher, **kw),
        student,
        graphs=uses_cudagraphs(mode),
    )


@dataclass
class StepSnapshot:
    """Copies of everything a training step changes, taken before it: the model's parameters
    and buffers (student, EMA teacher, BatchNorm statistics, queue and pointer), the
    optimiser's state (momentum buffers) and the generators (the views', torch's, CUDA's).

    A warm-up step that fails part-way has moved some of these; ``restore_`` puts them back,
    so the eager re-run of the step starts where the failed one did. It costs one copy of the
    model and the optimiser state on the device, for the warm-up steps only.
    """

    model: dict[str, Tensor]
    optimizer: dict[Tensor, dict[str, Any]]
    views: Tensor
    cpu_rng: Tensor
    cuda_rng: Tensor | None = None  # on CUDA: its generator's state on the views' device
    cuda_device: torch.device | None = None

    @classmethod
    def take(cls, state: TrainState) -> StepSnapshot:
        model = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        optimizer = {
            p: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in s.items()}
            for p, s in state.optimizer.state.items()
        }
        device = torch.device(state.views.device)
        if device.type != "cuda":
            return cls(model, optimizer, state.views.get_state(), torch.get_rng_state())
        return cls(
            model,
            optimizer,
            state.views.get_state(),
            torch.get_rng_state(),
            torch.cuda.get_rng_state(device),
            device,
        )

    def restore_(self, state: TrainState) -> None:
        """Put ``state`` back to where it was when the snapshot was taken (in place)."""
        state.optimizer.zero_grad(set_to_none=True)  # a failed backward's partial gradients
        state.model.load_state_dict(self.model)  # copied into the live tensors
        state.optimizer.state.clear()
        state.optimizer.state.update(self.optimizer)  # (the snapshot is used once)
        state.views.set_state(self.views)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None and self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.cuda_device)
