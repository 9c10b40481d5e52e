import json
import pickle

import pytest
import torch

from ressl import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from ressl.runs.checkpoint import load_optimizer_tensors, optimizer_tensors


def test_round_trip_with_metadata(tmp_path):
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.long)}
    path = save_checkpoint(
        tmp_path / "sub" / "c.safetensors", t, {"settings": json.dumps({"x": 1})}
    )
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["a"], t["a"]) and torch.equal(tensors["b"], t["b"])
    assert meta["format"] == "ressl-checkpoint" and json.loads(meta["settings"]) == {"x": 1}
    assert read_metadata(tmp_path / "sub" / "c.safetensors")["format_version"] == "1"


def test_non_contiguous_tensors_are_saved(tmp_path):
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    tensors, _ = load_checkpoint(save_checkpoint(tmp_path / "c.safetensors", {"x": x}, {}))
    assert torch.equal(tensors["x"], x)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(2)}, {})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ressl.atomic.os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": torch.zeros(2)}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left behind


def test_bad_files_are_clear_errors_and_never_unpickled(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(junk)
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError):
        load_checkpoint(pickled)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(1)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a ressl checkpoint"):
        load_checkpoint(foreign)


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, blob = optimizer_tensors(opt)
    assert set(tensors) == {"optimizer.0.momentum_buffer", "optimizer.1.momentum_buffer"}
    opt2 = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    load_optimizer_tensors(opt2, tensors, blob)
    assert opt2.param_groups[0]["lr"] == 0.1
    for p in net.parameters():
        assert torch.equal(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_restored_momentum_buffers_take_the_parameters_channels_last_layout():
    """safetensors stores tensors contiguous; fused SGD reads parameter, gradient and buffer
    as one flat layout, so a buffer restored contiguous next to a channels-last weight
    would update the wrong elements (it did: a resumed run drifted by 2.2)."""

    def run(opt, params, steps):
        for i in steps:
            g = torch.Generator().manual_seed(i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).contiguous(
                    memory_format=torch.channels_last
                )
            opt.step()

    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    a = [w.clone().requires_grad_()]
    opt_a = torch.optim.SGD(a, lr=0.1, momentum=0.9, fused=True)
    run(opt_a, a, range(4))
    b = [w.clone().requires_grad_()]
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=0.9, fused=True)
    run(opt_b, b, range(2))
    tensors, blob = optimizer_tensors(opt_b)
    c = [b[0].detach().contiguous().to(memory_format=torch.channels_last).requires_grad_()]
    opt_c = torch.optim.SGD(c, lr=0.1, momentum=0.9, fused=True)
    load_optimizer_tensors(opt_c, {k: v.contiguous() for k, v in tensors.items()}, blob)
    assert opt_c.state[c[0]]["momentum_buffer"].stride() == c[0].stride()
    run(opt_c, c, range(2, 4))
    assert torch.equal(a[0], c[0])
