"""A compiled step (``compile``): the same training to float tolerance, compile time kept
out of images/s, one warning and eager training when compiling fails."""

from __future__ import annotations

import logging

import pytest
import torch

from ressl import load_checkpoint, train


def _run(tmp_path, settings, name, **changes):
    return load_checkpoint(train(**dict(settings, out=str(tmp_path / name), epochs=1,
                                        precision="fp32", **changes)))[0]  # fmt: skip


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
        "torch.compile failed (RuntimeError: inductor: no C++ compiler found); training eager"
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
