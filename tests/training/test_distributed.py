"""Distributed training on CPU: 2 processes, gloo backend (the same code runs NCCL on GPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_helpers import tiny_args
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ressl import (
    ReSSL,
    extract_features,
    knn_accuracy,
    load_checkpoint,
    load_dataset,
    load_encoder,
    train,
)
from ressl.data.sources import FolderImages, TensorImages, source_part
from ressl.distributed import (
    CrossRankBatchNorm,
    all_gather_cat,
    all_gather_rows,
    batchnorm_for,
    convert_batchnorm,
    rank_device,
    wrap_ddp,
)
from ressl.errors import ConfigError
from ressl.training.step import EncodeCrops, training_step

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model() -> ReSSL:
    torch.manual_seed(0)
    return ReSSL(
        "small",
        in_channels=3,
        image_size=16,
        hidden_dim=16,
        embed_dim=8,
        queue_size=64,
        width=4,
        generator=torch.Generator().manual_seed(1),
    )


def batches() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(16, 3, 16, 16, generator=g)
    x_s = [
        torch.randn(16, 3, 16, 16, generator=g),
        torch.randn(16, 3, 12, 12, generator=g),
    ]  # two student crops
    return x_t, x_s


def run_steps(model: ReSSL, x_t, x_s, student=None, gather=None) -> None:
    opt = torch.optim.SGD(model.student.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        training_step(model, opt, [x_t], x_s, momentum=0.9, student=student, gather=gather)


def _step_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = convert_batchnorm(tiny_model())
        student = wrap_ddp(EncodeCrops(model.student), torch.device("cpu"))
        x_t, x_s = batches()
        per = x_t.shape[0] // world
        part = slice(rank * per, (rank + 1) * per)
        run_steps(model, x_t[part], [x[part] for x in x_s], student=student, gather=all_gather_cat)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["uneven"] = all_gather_rows(
            torch.full((rank + 1, 2), float(rank))
        )  # 1 row from rank 0, 2 from rank 1
        save_file(state, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_cross_rank_batchnorm_is_batchnorm_in_one_process():
    bn = nn.BatchNorm2d(3)
    converted = convert_batchnorm(nn.Sequential(bn))[0]
    assert isinstance(converted, CrossRankBatchNorm) and converted.weight is bn.weight
    assert set(converted.state_dict()) == set(bn.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), nn.BatchNorm2d(3)(x))


@pytest.mark.slow
def test_two_process_steps_equal_one_process_on_the_global_batch(tmp_path):
    # 3 steps, 2 student crops (one DDP forward), cross-rank BatchNorm, gathered queue:
    # 2 ranks x 8 images must give what 1 process gives on the 16 images.
    mp.spawn(_step_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    single = tiny_model()
    x_t, x_s = batches()
    run_steps(single, x_t, x_s)
    want = single.state_dict()
    initial = tiny_model().state_dict()
    for got in ranks:
        assert torch.equal(got.pop("uneven"), torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert set(ranks[0]) == set(want)
    for key, value in want.items():
        for got in ranks:
            torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # identical, not just close
    assert not torch.allclose(
        want["student.backbone.features.0.weight"], initial["student.backbone.features.0.weight"]
    )
    assert int(want["queue_ptr"]) == 3 * 16


def _train_worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    train_module = sys.modules["ressl.training.build"]
    models: list[ReSSL] = []

    class Recorded(ReSSL):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(self)

    train_module.ReSSL = Recorded  # type: ignore[attr-defined]
    train(**settings)
    save_file(
        {"queue": models[0].queue.contiguous(), "ptr": models[0].queue_ptr.reshape(1)},
        f"{out}/queue{rank}.safetensors",
    )


@pytest.mark.slow
def test_distributed_trainer_shares_the_queue_and_resumes_in_one_process(tmp_path, tiny_settings):
    run = tmp_path / "run"
    settings = dict(tiny_settings, out=str(run), epochs=1, precision="fp32")
    mp.spawn(_train_worker, args=(2, free_port(), settings, str(tmp_path)), nprocs=2, join=True)
    q0, q1 = (load_file(str(tmp_path / f"queue{r}.safetensors")) for r in range(2))
    assert torch.equal(q0["queue"], q1["queue"]) and int(q0["ptr"]) == (36 // 8) * 8 % 32
    tensors, meta = load_checkpoint(run / "last.safetensors")
    assert meta["world_size"] == "2" and "rng.views.rank1" in tensors
    assert torch.equal(tensors["model.queue"], q0["queue"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # rank 0 alone writes
    # the kNN monitor, sharded over the ranks, equals one process evaluating the checkpoint
    encoder, saved = load_encoder(run / "last.safetensors")
    data = load_dataset(settings["dataset"], image_size=16)
    kw = dict(mean=saved["mean"], std=saved["std"])
    mem = extract_features(encoder.eval().features, data.labelled, **kw)
    test = extract_features(encoder.features, data.test, **kw)
    knn = knn_accuracy(*mem, *test, len(data.classes), settings["knn_k"], 0.1)
    assert rows[0]["knn_top1"] == pytest.approx(knn["top1"], abs=1e-3)
    # the distributed checkpoint continues in a single process
    train(resume=run, epochs=2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["loss"] > 0


def test_ranks_get_disjoint_shards_covering_each_batch():
    source = TensorImages(
        torch.arange(24, dtype=torch.uint8).view(24, 1, 1, 1).expand(24, 1, 2, 2).contiguous(),
        torch.arange(24),
    )
    whole = [y for _, y in source.batches(8, epoch=1, seed=3)]
    shards = [[y for _, y in source.batches(8, epoch=1, seed=3, shard=(r, 2))] for r in range(2)]
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([shards[0][b], shards[1][b]]), batch)
    with pytest.raises(ValueError, match="shard must be"):
        next(iter(source.batches(8, epoch=0, seed=0, shard=(0, 3))))


def test_source_part_and_gather_of_uneven_rows():
    source = TensorImages(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
        torch.arange(10),
    )
    part = source_part(source, 3, 7)
    assert (
        part.labels.tolist() == [3, 4, 5, 6]
        and part.images.data_ptr() == source.images[3].data_ptr()
    )
    with pytest.raises(ValueError, match="0 <= start <= stop <= 10"):
        source_part(source, 5, 11)


def test_source_part_of_a_grayscale_folder_keeps_one_channel(tmp_path):
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 10), 60 * i, np.uint8), "L").save(files[-1])
    part = source_part(FolderImages(files, [0, 1, 2, 3], 8, channels=1), 1, 3)
    assert isinstance(part, FolderImages) and part.channels == 1 and part.labels.tolist() == [1, 2]
    image, label = part[0]
    assert image.shape == (1, 8, 8) and label == 1 and int(image[0, 0, 0]) == 60


@pytest.mark.slow
def test_torchrun_cli_end_to_end(tmp_path, image_folder):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ressl",
        *tiny_args(image_folder, run, epochs=1, warmup_epochs=0),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(run / "last.safetensors")]  # rank 0 alone prints
    row = json.loads((run / "metrics.jsonl").read_text())
    assert row["epoch"] == 1 and "knn_top1" in row
    _, meta = load_checkpoint(run / "last.safetensors")
    assert meta["world_size"] == "2"


def test_global_batch_must_split_evenly(tmp_path, tiny_settings, monkeypatch):
    from ressl.distributed import World

    monkeypatch.setattr(World, "join", classmethod(lambda cls, device="auto": cls(0, 3, 0)))
    with pytest.raises(ValueError, match="must be divisible by the 3 processes"):
        train(out=str(tmp_path / "run"), **dict(tiny_settings))


def test_world_from_environment(monkeypatch):
    from ressl.distributed import World

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.join() == World()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE, RANK and LOCAL_RANK must be integers"):
        World.join()


def _interrupted_worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    import signal

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )

    def ctrl_c_on_rank_1(event):
        if rank == 1 and event.kind == "step" and event.step == 6:  # epoch 2, batch 2 of 4
            signal.raise_signal(signal.SIGINT)

    try:
        train(callback=ctrl_c_on_rank_1, **settings)
    except KeyboardInterrupt:
        Path(out, f"interrupted{rank}").touch()


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_all_ranks_together(tmp_path, tiny_settings):
    run = tmp_path / "run"
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=_interrupted_worker,
            args=(r, 2, port, dict(tiny_settings, out=str(run)), str(tmp_path)),
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill()
    assert not hung, "a rank hung after Ctrl-C on the other"
    assert (tmp_path / "interrupted0").exists() and (tmp_path / "interrupted1").exists()
    _, meta = load_checkpoint(run / "last.safetensors")
    # the ranks agree at the next progress window (every step here): after batch 3 of epoch 2
    assert (meta["epoch"], meta["batch_in_epoch"]) == ("1", "3")
    train(resume=run)  # and the run continues (in one process)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def _compiled_worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    """One rank of a run; its ressl log lines go to ``out/log{rank}.txt``."""
    import logging

    handler = logging.FileHandler(f"{out}/log{rank}.txt")
    logging.getLogger("ressl").addHandler(handler)
    logging.getLogger("ressl").setLevel(logging.INFO)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    train(**settings)


@pytest.mark.slow
def test_a_compiled_distributed_run_trains_what_the_eager_one_trains(tmp_path, tiny_settings):
    """torch.compile of the DDP-wrapped student (DDPOptimizer splits its graph at the
    gradient buckets) and of the teacher, on 2 gloo ranks."""
    pytest.importorskip("torch._inductor")
    runs = {}
    for mode in ("off", "on"):
        settings = dict(
            tiny_settings,
            out=str(tmp_path / mode),
            epochs=1,
            precision="fp32",
            compile=mode,
            knn_every=0,
        )
        mp.spawn(
            _compiled_worker, args=(2, free_port(), settings, str(tmp_path)), nprocs=2, join=True
        )
        runs[mode] = load_checkpoint(tmp_path / mode / "last.safetensors")[0]
    log = (tmp_path / "log0.txt").read_text()
    if "torch.compile failed" in log:
        pytest.skip("torch.compile cannot build here (no C++ compiler?)")
    assert "compiled the step in" in log
    for key, value in runs["off"].items():
        if key.startswith("model.") and value.is_floating_point():
            torch.testing.assert_close(runs["on"][key], value, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize(
    ("requested", "world", "local", "gpus", "device"),
    [
        ("cuda:1", 1, 0, 2, "cuda:1"),  # one process: the setting itself
        ("auto", 1, 0, 2, "auto"),
        ("auto", 4, 3, 4, "cuda:3"),  # torchrun: each rank its own GPU
        ("cuda", 4, 2, 4, "cuda:2"),
        ("auto", 2, 1, 0, "cpu"),  # no GPU: gloo on the CPU
        ("cpu", 2, 1, 8, "cpu"),
        ("cuda", 2, 1, 0, "cuda:1"),  # no GPU: select_device says so
    ],
)
def test_each_rank_trains_on_its_own_gpu(requested, world, local, gpus, device):
    assert rank_device(requested, world, local, gpus) == device


@pytest.mark.parametrize(
    ("requested", "local", "gpus", "needle"),
    [
        ("cuda:0", 0, 8, "{device} cuda:0 names one GPU, but 2 processes were started"),
        ("cuda", 1, 1, "{device} cuda: this process has LOCAL_RANK 1, but 1 GPU(s) are visible"),
    ],
)
def test_a_device_that_ranks_would_share_is_refused(requested, local, gpus, needle):
    with pytest.raises(ConfigError) as e:
        rank_device(requested, 2, local, gpus)
    assert e.value.names == ("device",) and needle in e.value.template


def test_torchrun_with_one_named_gpu_fails_before_the_rendezvous(monkeypatch):
    """Before, ``--device cuda:0`` under torchrun chose gloo and put every rank on GPU 0."""
    from ressl.distributed import World

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("rendezvous"))
    with pytest.raises(ConfigError, match="device cuda:0 names one GPU"):
        World.join("cuda:0")


def test_nccl_gets_sync_batchnorm_and_gloo_cross_rank_batchnorm():
    assert batchnorm_for("nccl") is nn.SyncBatchNorm
    assert batchnorm_for("gloo") is CrossRankBatchNorm


def test_sync_batchnorm_holds_the_same_tensors_as_plain_batchnorm():
    """Checkpoints move between the two kinds and a plain model; in one process both are
    BatchNorm."""
    bn = nn.BatchNorm2d(3)
    model = convert_batchnorm(nn.Sequential(nn.Sequential(bn)), nn.SyncBatchNorm)
    converted = model[0][0]
    assert type(converted) is nn.SyncBatchNorm and converted.weight is bn.weight
    assert converted.running_var is bn.running_var
    cross = convert_batchnorm(nn.Sequential(nn.Sequential(nn.BatchNorm2d(3))))
    assert type(cross[0][0]) is CrossRankBatchNorm
    assert cross.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), nn.BatchNorm2d(3)(x))


def test_sync_batchnorm_refuses_cpu_inputs_so_gloo_keeps_cross_rank_batchnorm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            nn.SyncBatchNorm(3)(torch.randn(4, 3, 5, 5))
    finally:
        dist.destroy_process_group()


def _failing_compile_worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    """One rank of a compiled run whose student's backward fails at step 2 on every rank."""
    from test_compile import _compile_failing_at

    torch.compile = _compile_failing_at(2, "backward")[0]  # type: ignore[assignment]
    _compiled_worker(rank, world, port, settings, out)


@pytest.mark.slow
def test_a_distributed_step_failing_in_the_warmup_reruns_eager_from_its_start(
    tmp_path, tiny_settings
):
    """DDP's gradient hooks have fired part-way when a compiled backward fails: the eager
    re-run of the step on every rank must still end where the eager run ends."""
    runs = {}
    for name, worker in (("off", _compiled_worker), ("fails", _failing_compile_worker)):
        settings = dict(
            tiny_settings,
            out=str(tmp_path / name),
            epochs=1,
            precision="fp32",
            compile="off" if name == "off" else "on",
            knn_every=0,
        )
        mp.spawn(worker, args=(2, free_port(), settings, str(tmp_path)), nprocs=2, join=True)
        runs[name] = load_checkpoint(tmp_path / name / "last.safetensors")[0]
    assert "torch.compile failed at step 2" in (tmp_path / "log0.txt").read_text()
    for key, value in runs["off"].items():
        torch.testing.assert_close(runs["fails"][key], value, atol=0, rtol=0, msg=key)
