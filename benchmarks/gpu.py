"""The ReSSL step on the hardware users train on: images/s, peak memory, FLOPs and the
fraction of the device's bf16 peak, eager and compiled, one crop, multi-crop and
symmetric; a ResNet-50 run through the JPEG folder path; and a check that
``ressl train``'s own images/s agrees with the step's.

The step is the trainer's (``CropPlan.views`` + ``training_step``: views, student
forward and backward, EMA, teacher forward, relation loss, enqueue) on uint8 images
already on the device, bf16 autocast where supported, channels-last. "compiled"
wraps the student and the teacher in ``torch.compile`` (one graph per crop side);
its compile time is reported and kept out of images/s. FLOPs per image come from
``torch.utils.flop_counter`` over one step. The 200-epoch projection is for
50,000 training images (CIFAR-size).

One H100/H200 (under 5 minutes):

    python benchmarks/gpu.py --write

On a CPU, with tiny sizes (what the tests run):

    python benchmarks/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import cpu_model, write_block
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ressl import ReSSL, folders, train
from ressl.crops import CropPlan
from ressl.device import autocast_dtype
from ressl.step import EncodeCrops, training_step
from ressl.views import StrongView, WeakView

#: Dense bf16 tensor-core peaks, FLOP/s, by a substring of the device name.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
CIFAR_IMAGES, CIFAR_EPOCHS = 50_000, 200


@dataclass(frozen=True)
class Case:
    """One row: a network, its input side and batch, the crop plan, and the mode."""

    backbone: str
    size: int
    batch: int
    crops: tuple[int, ...] | None = None
    symmetric: bool = False
    compiled: bool = False

    @property
    def label(self) -> str:
        plan = (f"multi-crop {','.join(map(str, self.crops))}" if self.crops
                else "symmetric" if self.symmetric else "one crop")  # fmt: skip
        return f"{self.backbone} {self.size} px, batch {self.batch}, {plan}"


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(case: Case, device: torch.device, channels: int) -> tuple[Any, float]:
    """A function running one training step, and the seconds compiling took (0 eager)."""
    plan = CropPlan.build(case.size, (0.2, 1.0), case.crops, None, case.symmetric)
    model = ReSSL(case.backbone, in_channels=channels, image_size=case.size, hidden_dim=512,
                  embed_dim=128, queue_size=max(4096, 2 * case.batch)).to(device)  # fmt: skip
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    opt = torch.optim.SGD(model.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    amp = autocast_dtype("auto", device)
    views = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (case.batch, channels, case.size, case.size), dtype=torch.uint8,
                           device=device)  # fmt: skip
    mean, std = (0.5,) * channels, (0.25,) * channels
    student: nn.Module = EncodeCrops(model.student)
    teacher: nn.Module = model.teacher
    seconds = 0.0
    if case.compiled:
        student, teacher = torch.compile(student), torch.compile(teacher)
        model.teacher = teacher  # type: ignore[assignment]

    def step() -> torch.Tensor:
        x_t, x_s = plan.views(images, generator=views, mean=mean, std=std, student=StrongView(),
                              teacher=WeakView())  # fmt: skip
        x_t = [x.contiguous(memory_format=torch.channels_last) for x in x_t]
        x_s = [x.contiguous(memory_format=torch.channels_last) for x in x_s]
        return training_step(model, opt, x_t, x_s, momentum=0.99, symmetric=plan.symmetric,
                             autocast_dtype=amp, student=student)  # fmt: skip

    if case.compiled:
        t = time.perf_counter()
        step()
        step()  # the second call compiles what the first did not (e.g. backward)
        _sync(device)
        seconds = time.perf_counter() - t
    return step, seconds


def measure(case: Case, device: torch.device, steps: int, channels: int = 3) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step, compile_seconds = _step_fn(case, device, channels)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row saying so
        return {"case": case, "error": str(e).splitlines()[0][:80]}
    step()  # warm-up
    _sync(device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / case.batch
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - t
    assert torch.isfinite(loss)
    ips = case.batch * steps / seconds
    peak = _peak(device)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"case": case, "images_per_second": ips, "flops_per_image": flops,
            "peak_fraction": ips * flops / peak if peak else None, "memory": memory,
            "compile_seconds": compile_seconds,
            "cifar_200_epochs_min": CIFAR_IMAGES * CIFAR_EPOCHS / ips / 60}  # fmt: skip


def _image_folder(root: Path, count: int, side: int, suffix: str) -> Path:
    """``count`` random RGB images of ``side`` px in two class folders."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"c{c}" / f"{i}{suffix}")
    return root


def trainer_images_per_second(device: torch.device, **settings: Any) -> float:
    """``ressl train``'s own images/s: the last epoch's ``metrics.jsonl`` row."""
    with tempfile.TemporaryDirectory() as tmp:
        train(out=f"{tmp}/run", device=str(device), knn_every=-1, warmup_epochs=0,
              **settings)  # fmt: skip
        rows = [
            json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
        ]
    return float(rows[-1]["images_per_second"])


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, for a CPU (the tests)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compiled = (False,) if args.no_compile else (False, True)
    if args.tiny:
        steps = args.steps or 2
        cases = [Case("small", 16, 8, compiled=c) for c in compiled]
        cases += [Case("small", 16, 8, crops=(16, 12)), Case("small", 16, 8, symmetric=True)]
        folder = dict(backbone="small", image_size=32, batch_size=8, count=32, side=40, epochs=1)
    else:
        steps = args.steps or 20
        cases = [Case("small", 28, 1024, compiled=c) for c in compiled]
        cases += [Case("resnet18", 32, b, compiled=c) for b in (256, 512) for c in compiled]
        cases += [Case("resnet18", 32, 256, crops=(32, 28, 24, 20, 16)),
                  Case("resnet18", 32, 256, symmetric=True)]  # fmt: skip
        folder = dict(
            backbone="resnet50", image_size=224, batch_size=128, count=2048, side=256, epochs=2
        )
    rows = [measure(case, device, steps) for case in cases]
    lines = ["| step | mode | images/s | peak memory (GiB) | GFLOP/image | of bf16 peak | compile | 200 CIFAR epochs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        case = r["case"]
        mode = "compiled" if case.compiled else "eager"
        if "error" in r:
            lines.append(f"| {case.label} | {mode} | failed: {r['error']} | | | | | |")
            continue
        memory = None if r["memory"] is None else r["memory"] / 2**30
        lines.append(
            f"| {case.label} | {mode} | {r['images_per_second']:,.0f} | {_cell(memory, '.2f')} | "
            f"{r['flops_per_image'] / 1e9:.3f} | {_cell(r['peak_fraction'], '.1%')} | "
            f"{r['compile_seconds']:.0f} s | {r['cifar_200_epochs_min']:,.0f} min |"
        )
    first, workers = rows[0], min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:  # the first row's step, through ressl train
        c = first["case"]
        root = _image_folder(Path(tmp), c.batch * (min(steps, 10) + 1), c.size, ".png")
        trained = trainer_images_per_second(device, dataset=f"folder:{root}", backbone=c.backbone,
                                            batch_size=c.batch, image_size=c.size, epochs=2,
                                            queue_size=max(4096, 2 * c.batch))  # fmt: skip
    folders.MAX_IN_MEMORY_BYTES = 0  # the folder is streamed from disk however small it is
    with tempfile.TemporaryDirectory() as tmp:
        spec = folder.copy()
        root = _image_folder(Path(tmp), spec.pop("count"), spec.pop("side"), ".jpg")
        folder_ips = trainer_images_per_second(device, dataset=f"folder:{root}",
                                               num_workers=workers, **spec)  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    table = "\n".join(lines) + (
        f"\n\n`ressl train` on the first row's settings (an in-memory folder): {trained:,.0f} "
        f"images/s, against the step's {first.get('images_per_second', 0):,.0f}. "
        f"{folder['backbone']} at {folder['image_size']} px through a JPEG folder streamed "
        f"from disk (decoded and cropped in {workers} DataLoader workers): "
        f"{folder_ips:,.0f} images/s.\n\n"
        f"{name}, torch {torch.__version__}, {steps} timed steps per row; "
        f"`python benchmarks/gpu.py{' --tiny' if args.tiny else ''}`."
    )
    print(table)
    if args.write:
        print(write_block("gpu", table, "The step on one GPU"))


if __name__ == "__main__":
    main()
