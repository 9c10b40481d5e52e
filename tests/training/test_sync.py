"""The steady-state step waits for nothing: no host sync on a GPU.

On CUDA this is proven directly, with ``torch.cuda.set_sync_debug_mode("error")`` over
several steps. On a CPU (CI), the kernels take their accelerator paths (``syncs_are_free``
patched to False) and a dispatch mode fails the step on every op that would wait for a
GPU: reading a value (``.item()``, ``float()``, ``if tensor``), an output shape that
depends on data (``nonzero``, boolean-mask indexing, ``unique``, ``bincount``), or host
data copied in (``torch.tensor(...)`` inside the step).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ressl.views.blur
import ressl.views.color
from ressl import ReSSL
from ressl.data.sources import TensorImages
from ressl.training.step import training_step
from ressl.views import StrongView, WeakView
from ressl.views.plan import CropPlan

#: aten ops that wait for the device when it is a GPU.
WAITS = {
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "allclose",
    "nonzero",
    "argwhere",
    "masked_select",
    "bincount",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "lift_fresh",
    "lift_fresh_copy",
    "_assert_async",
}


class WouldWait(TorchDispatchMode):
    """Records every op that would make the host wait for a GPU. ``tolist`` and ``numpy``
    read a CPU tensor's memory without dispatching, so they are watched directly."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._patched: dict[str, object] = {}

    def __enter__(self):  # type: ignore[no-untyped-def]
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def watched(t, *args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                self.ops.append(f"Tensor.{_name}")
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.split("::")[-1]
        if name in WAITS:
            self.ops.append(str(func))
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.ops.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


CASES = {
    "one crop": dict(crops=None, symmetric=False, blur_mode="pil"),
    "multi-crop": dict(crops=(16, 12, 8), symmetric=False, blur_mode="pil"),
    "symmetric": dict(crops=None, symmetric=True, blur_mode="pil"),
    "relative blur": dict(crops=None, symmetric=False, blur_mode="relative"),
}


def _steps(
    device: torch.device,
    *,
    crops: tuple[int, ...] | None,
    symmetric: bool,
    blur_mode: str,
    channels: int = 3,
    sgd: dict | None = None,
    warm: int = 2,
) -> Iterator[None]:
    """Yields once after ``warm`` steps (lazy initialisation may sync), then runs one step
    per ``next``: the trainer's step from whole images on the device."""
    torch.manual_seed(0)
    model = ReSSL(
        "small",
        in_channels=channels,
        image_size=16,
        width=8,
        hidden_dim=32,
        embed_dim=16,
        queue_size=64,
    ).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1, momentum=0.9, **(sgd or {}))
    plan = CropPlan.build(16, (0.2, 1.0), crops, None, symmetric)
    strong = StrongView(blur_p=0.5, blur_mode=blur_mode)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (64, channels, 16, 16), dtype=torch.uint8)
    source = TensorImages(images, torch.zeros(64, dtype=torch.int64)).to(device)
    batches = source.batches(8, epoch=0, seed=0, device=device)
    stats = dict(mean=(0.5,) * channels, std=(0.25,) * channels)
    for i, (x, _) in enumerate(batches):
        x_t, x_s = plan.views(x, generator=g, **stats, student=strong, teacher=WeakView())
        x_t = [v.contiguous(memory_format=torch.channels_last) for v in x_t]
        x_s = [v.contiguous(memory_format=torch.channels_last) for v in x_s]
        for group in opt.param_groups:
            group["lr"] = 0.1 / (i + 1)  # a Python float, as the trainer sets it
        training_step(
            model, opt, x_t, x_s, momentum=0.99, symmetric=symmetric, autocast_dtype=torch.bfloat16
        )
        if i + 1 >= warm:
            yield


@pytest.fixture
def accelerator_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels branch as on a GPU: no subset gathered on the host's word."""
    for module in (ressl.views.color, ressl.views.blur):
        monkeypatch.setattr(module, "syncs_are_free", lambda device: False)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("sgd", ["fused", "foreach"])
def test_the_steady_step_never_waits_for_the_device(accelerator_paths, case, sgd):
    steps = _steps(torch.device("cpu"), **CASES[case], sgd={sgd: True})
    next(steps)
    with WouldWait() as watch:
        for _ in range(3):
            next(steps)
    assert watch.ops == []


def test_grayscale_steps_never_wait_either(accelerator_paths):
    steps = _steps(torch.device("cpu"), **CASES["one crop"], channels=1, sgd={"fused": True})
    next(steps)
    with WouldWait() as watch:
        next(steps)
    assert watch.ops == []


def test_the_watch_sees_what_would_wait():
    """The detector itself: each kind of wait is caught (so an empty list means something)."""
    x = torch.arange(6.0)
    with WouldWait() as watch:
        float(x.sum())
        x[x > 2] = 0.0
        torch.tensor([1.0, 2.0])
        x.nonzero()
        x.tolist()
    for kind in ("_local_scalar_dense", "boolean mask", "lift_fresh", "nonzero", "tolist"):
        assert any(kind in op for op in watch.ops), (kind, watch.ops)


def test_the_cpu_paths_do_read_values_on_the_host():
    """Without the patch the CPU kernels gather subsets (free there): the patch is what
    makes the test above take the GPU's paths."""
    steps = _steps(torch.device("cpu"), **CASES["one crop"])
    next(steps)
    with WouldWait() as watch:
        next(steps)
    assert any("bincount" in op or "nonzero" in op for op in watch.ops), watch.ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_no_host_sync_in_the_steady_state_on_cuda(case):
    """A host sync inside the steps raises (debug mode "error"), failing the test."""
    steps = _steps(torch.device("cuda"), **CASES[case], sgd={"fused": True})
    next(steps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert torch.cuda.get_sync_debug_mode() == 2  # "error": the check is armed
        for _ in range(3):
            next(steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(RuntimeError, match="synchroniz"):  # the mode does catch a sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.zeros(1, device="cuda").item()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
def test_compiled_views_take_the_sync_free_paths_and_never_recompile():
    """Under torch.compile a value read on the host is a graph break and a value the graph
    specialises on: the CPU's gather paths (hue counts, blurred subsets) would recompile at
    every batch. ``syncs_are_free`` is False while compiling, so the graphs stay the same."""
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    plan = CropPlan.build(16, (0.2, 1.0))
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    views = functools.partial(
        plan.views,
        images,
        generator=g,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        student=StrongView(blur_p=0.5),
        teacher=WeakView(),
    )

    def graphs_after_calls() -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(views, backend="eager")
        compiled()
        first = counters["stats"]["unique_graphs"]
        for _ in range(4):  # other hue counts and blurred subsets at every call
            compiled()
        return first, counters["stats"]["unique_graphs"]

    first, later = graphs_after_calls()
    assert first > 0 and later == first
    with pytest.MonkeyPatch.context() as patch:  # the CPU's gather paths, compiled: recompiles
        for module in (ressl.views.color, ressl.views.blur):
            patch.setattr(module, "syncs_are_free", lambda device: device.type == "cpu")
        first, later = graphs_after_calls()
    assert later > first
