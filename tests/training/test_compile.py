"""A compiled step (``compile``): the same training to float tolerance, compile time kept
out of images/s, one warning and eager training when compiling fails."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from ressl import load_checkpoint, train
from ressl.training.compiled import uses_cudagraphs


def _run(tmp_path, settings, name, **changes):
    return load_checkpoint(
        train(**dict(settings, out=str(tmp_path / name), epochs=1, precision="fp32", **changes))
    )[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_step_trains_what_the_eager_step_trains(tmp_path, tiny_settings, caplog, mode):
    """reduce-overhead: CUDA graphs on a GPU (each step marked as a new one); here the
    same code path, without the graphs."""
    pytest.importorskip("torch._inductor")
    eager = _run(tmp_path, tiny_settings, "eager", compile="off")
    with caplog.at_level(logging.INFO, logger="ressl"):
        compiled = _run(tmp_path, tiny_settings, "compiled", compile="on", compile_mode=mode)
    if any("torch.compile failed" in r.message for r in caplog.records):
        pytest.skip("torch.compile cannot build here (no C++ compiler?)")
    assert any("compiled the step in" in r.message for r in caplog.records)
    assert compiled.keys() == eager.keys()  # the checkpoint does not see the compiled wrappers
    for key, value in eager.items():
        if key.startswith("model.") and value.is_floating_point():
            torch.testing.assert_close(compiled[key], value, atol=1e-4, rtol=1e-4, msg=key)


def test_auto_compiles_on_cuda_only(tmp_path, tiny_settings, caplog):
    with caplog.at_level(logging.INFO, logger="ressl"):
        _run(tmp_path, tiny_settings, "auto")
    assert not any("compiled the step" in r.message for r in caplog.records)  # a CPU


def test_a_failed_compile_trains_eager_with_one_warning(
    tmp_path, tiny_settings, caplog, monkeypatch
):
    def broken(module, **kw):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="ressl"):
        state = _run(tmp_path, tiny_settings, "fallback", compile="on")
    warned = [r.message for r in caplog.records if "torch.compile failed" in r.message]
    assert warned == [
        "torch.compile failed at step 1 (RuntimeError: inductor: no C++ compiler found); "
        "training eager from its start"
    ]
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())


@pytest.mark.parametrize("plan", [dict(crops=(16, 12)), dict(symmetric=True, queue_size=64)])
def test_compiled_multicrop_and_symmetric_runs_compile_once_and_resume(
    tmp_path, tiny_settings, plan
):
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    graphs: list[int] = []

    def after_epoch(event):
        if event.kind == "epoch":
            graphs.append(counters["stats"]["unique_graphs"])

    settings = dict(tiny_settings, precision="fp32", compile="on", **plan)
    straight = train(
        **dict(settings, out=str(tmp_path / "straight"), epochs=2), callback=after_epoch
    )
    assert graphs[0] == graphs[1]  # nothing recompiled after the first epoch's warm-up
    train(**dict(settings, out=str(tmp_path / "resumed"), epochs=1))
    resumed = train(resume=tmp_path / "resumed", epochs=2)
    a, b = load_checkpoint(straight)[0], load_checkpoint(resumed)[0]
    for key, value in a.items():  # a compiled run resumes to where it would have gone, to 1e-5
        if key.startswith("model.") and value.is_floating_point():
            torch.testing.assert_close(b[key], value, atol=1e-5, rtol=1e-5, msg=key)


def _compile_failing_at(call: int, where: str) -> tuple[Any, list[str]]:
    """A stand-in for ``torch.compile`` whose networks run eager (so a run that never fails is
    the eager run, bit for bit) and raise at their ``call``-th call, after the step's state
    has moved: in the teacher's forward (the views drawn, the student's BatchNorm statistics,
    the EMA and the teacher's own moved), or in the student's backward at the first layer's
    gradient (the other gradients computed and, distributed, reduced)."""
    calls = {"student": 0, "teacher": 0}
    compiled: list[str] = []

    def fake_compile(module, **kw):
        name = "student" if not compiled else "teacher"  # the trainer compiles the student first
        compiled.append(name)

        def run(*args, **kwargs):
            out = module(*args, **kwargs)
            calls[name] += 1
            if name == where == "teacher" and calls[name] == call:
                raise RuntimeError("CUDA graph capture failed\nmore detail")
            if name == "student" and where == "backward" and calls[name] == call:
                first = next(module.parameters())  # its gradient comes last in the backward

                def fail(grad):
                    handle.remove()
                    raise RuntimeError("compiled backward failed")

                handle = first.register_hook(fail)
            return out

        return run

    return fake_compile, compiled


@pytest.mark.parametrize(
    ("call", "where"),
    [
        pytest.param(1, "teacher", marks=pytest.mark.slow),
        (2, "teacher"),
        pytest.param(3, "teacher", marks=pytest.mark.slow),
        (2, "backward"),
    ],
)
def test_a_step_failing_in_the_warmup_reruns_eager_from_the_state_it_started_in(
    tmp_path, tiny_settings, caplog, monkeypatch, call, where
):
    """Compiling (step 1), capturing CUDA graphs (step 2) and their first replay (step 3) may
    fail after the step has drawn its views and moved the EMA, BatchNorm statistics, queue
    and optimiser: the run then goes on eager from the state before that step, so it ends
    where an eager run ends, bit for bit."""
    settings = dict(tiny_settings, knn_every=0)
    eager = _run(tmp_path, settings, "eager", compile="off")
    fake_compile, compiled = _compile_failing_at(call, where)
    monkeypatch.setattr(torch, "compile", fake_compile)
    resets: list[int] = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    with caplog.at_level(logging.WARNING, logger="ressl"):
        fallback = _run(tmp_path, settings, "fallback", compile="on")
    assert compiled == ["student", "teacher"]
    assert fallback.keys() == eager.keys()
    for key, value in eager.items():
        assert torch.equal(fallback[key], value), key
    warned = [r.message for r in caplog.records if "torch.compile failed" in r.message]
    assert len(warned) == 1 and f"at step {call}" in warned[0], warned
    assert resets == [1]  # the graphs' memory is given back before the eager re-run


@pytest.mark.parametrize(
    ("mode", "marked"), [("default", 0), ("reduce-overhead", 4), ("max-autotune", 4)]
)
def test_every_mode_with_cuda_graphs_marks_each_step(
    tmp_path, tiny_settings, monkeypatch, mode, marked
):
    """CUDA graphs may reuse the last step's outputs only once a new step is marked."""
    marks: list[int] = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    _run(tmp_path, dict(tiny_settings, knn_every=0), mode, compile="on", compile_mode=mode)
    assert len(marks) == marked  # 36 images, batch 8: 4 steps


@pytest.mark.parametrize(
    ("mode", "graphs"),
    [
        ("default", False),
        ("reduce-overhead", True),
        ("max-autotune", True),
        ("max-autotune-no-cudagraphs", False),
    ],
)
def test_which_modes_capture_cuda_graphs(mode, graphs):
    pytest.importorskip("torch._inductor")
    assert uses_cudagraphs(mode) is graphs
