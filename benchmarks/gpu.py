"""The ReSSL step on the hardware users train on: images/s, the views' share of the step,
peak memory, FLOPs and the fraction of the device's bf16 peak, eager, compiled and under
CUDA graphs, one crop, multi-crop and symmetric; a ResNet-50 run through the JPEG folder
path, decoded in the workers and on the device; and a check that ``ressl train``'s own
images/s agrees with the step's.

The step is the trainer's (``CropPlan.views`` + ``training_step``: views, student
forward and backward, EMA, teacher forward, relation loss, fused SGD, enqueue) on uint8
images already on the device, bf16 autocast where supported, channels-last. "compiled"
wraps the student and the teacher in ``torch.compile`` (one graph per crop side);
"cuda graphs" is the same with ``mode="reduce-overhead"``; compile time is reported and
kept out of images/s. The views' share is the views alone (crops, colour, blur,
normalisation) timed the same way, over the step's time. FLOPs per image come from
``torch.utils.flop_counter`` over one eager step. A second table times the views alone,
eager and under ``torch.compile`` (graphs between the random draws): on a CPU the
compiled views ran 2-2.5x slower at batch 256 (the eager kernels gather subsets and work
in cache-sized chunks there) and 1.4x faster at batch 32, where launch overhead rules,
as on a GPU; this table says whether compiling them pays there. The 200-epoch projection is for
50,000 training images (CIFAR-size). The JPEG rows time the crops alone (the
DataLoader and the decode, no training) and ``ressl train`` on them.

One H100/H200 (under 5 minutes):

    python benchmarks/gpu.py --write

On a lent GPU machine, run ``gpu_suite.py`` instead: it uses these functions section by
section, each row written to a file as soon as it is measured (docs/speed.md).

On a CPU, with tiny sizes (what the tests run):

    python benchmarks/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
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

from ressl import ReSSL, load_dataset, train
from ressl.data import folders
from ressl.data.sources import FolderImages
from ressl.device import autocast_dtype
from ressl.training.step import EncodeCrops, training_step
from ressl.views import StrongView, WeakView
from ressl.views.plan import CropPlan

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
    mode: str = "eager"  # or "compiled", or "cuda graphs" (compile mode reduce-overhead)

    @property
    def label(self) -> str:
        plan = (
            f"multi-crop {','.join(map(str, self.crops))}"
            if self.crops
            else "symmetric"
            if self.symmetric
            else "one crop"
        )
        return f"{self.backbone} {self.size} px, batch {self.batch}, {plan}"


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_device(device: torch.device) -> None:
    """Forget the previous row: dynamo's caches and the CUDA-graph trees and their memory
    pools, cached blocks, and the peak-memory statistics (else a row's peak is its
    predecessors')."""
    torch._dynamo.reset()
    try:  # also part of dynamo's reset in recent torch; explicit for older ones
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except (ImportError, AttributeError):
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _step_fn(case: Case, device: torch.device, channels: int) -> tuple[Any, float]:
    """A function running one training step, and the seconds compiling took (0 eager)."""
    plan = CropPlan.build(case.size, (0.2, 1.0), case.crops, None, case.symmetric)
    model = ReSSL(
        case.backbone,
        in_channels=channels,
        image_size=case.size,
        hidden_dim=512,
        embed_dim=128,
        queue_size=max(4096, 2 * case.batch),
    ).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    opt = torch.optim.SGD(
        model.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True
    )  # as ressl train (--sgd-kernel fused)
    amp = autocast_dtype("auto", device)
    views = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(
        0, 256, (case.batch, channels, case.size, case.size), dtype=torch.uint8, device=device
    )
    mean, std = (0.5,) * channels, (0.25,) * channels
    student: nn.Module = EncodeCrops(model.student)
    teacher: nn.Module = model.teacher
    seconds = 0.0
    if case.mode != "eager":
        mode = "reduce-overhead" if case.mode == "cuda graphs" else None
        student = torch.compile(student, mode=mode, dynamic=False)
        teacher = torch.compile(teacher, mode=mode, dynamic=False)

    def make_views() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x_t, x_s = plan.views(
            images, generator=views, mean=mean, std=std, student=StrongView(), teacher=WeakView()
        )
        x_t = [x.contiguous(memory_format=torch.channels_last) for x in x_t]
        x_s = [x.contiguous(memory_format=torch.channels_last) for x in x_s]
        return x_t, x_s

    def step() -> torch.Tensor:
        if case.mode == "cuda graphs":
            torch.compiler.cudagraph_mark_step_begin()  # as ressl train does
        x_t, x_s = make_views()
        return training_step(
            model,
            opt,
            x_t,
            x_s,
            momentum=0.99,
            symmetric=plan.symmetric,
            autocast_dtype=amp,
            student=student,
            teacher=teacher,
        )

    step.views = make_views  # type: ignore[attr-defined]
    if case.mode != "eager":
        t = time.perf_counter()
        step()
        step()  # the second call compiles what the first did not (e.g. backward)
        _sync(device)
        seconds = time.perf_counter() - t
    return step, seconds


def _timed(fn: Any, device: torch.device, steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (the device's queue drained)."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = fn()
    _sync(device)
    if isinstance(out, torch.Tensor):
        assert torch.isfinite(out)
    return (time.perf_counter() - t) / steps


def measure(case: Case, device: torch.device, steps: int, channels: int = 3) -> dict[str, Any]:
    print(f"{case.label}, {case.mode}", file=sys.stderr, flush=True)  # where the minutes go
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step, compile_seconds = _step_fn(case, device, channels)
        step()  # warm-up
        _sync(device)
        flops = 0.0
        if case.mode == "eager":  # the compiled step does the same arithmetic
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops() / case.batch
        seconds = _timed(step, device, steps)
        views = _timed(step.views, device, steps)  # the views alone: their share of a step
    except Exception as e:  # noqa: BLE001 - a failed compile or step is a row saying so
        return {"case": case, "error": str(e).strip().splitlines()[0][:80]}
    ips = case.batch / seconds
    peak = _peak(device)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "case": case,
        "images_per_second": ips,
        "flops_per_image": flops or None,
        "peak_fraction": ips * flops / peak if peak and flops else None,
        "memory": memory,
        "compile_seconds": compile_seconds,
        "views_share": views / seconds,
        "cifar_200_epochs_min": CIFAR_IMAGES * CIFAR_EPOCHS / ips / 60,
    }


def _image_folder(root: Path, count: int, side: int, suffix: str) -> Path:
    """``count`` random RGB images of ``side`` px in two class folders."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"c{c}" / f"{i}{suffix}")
    return root


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 image that compresses and decodes like a photo: smooth
    gradients, a few objects with sharp edges, and a fine texture (pixel noise would make
    JPEGs several times larger and slower to decode than photos of the same size)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)  # (H, W)
    slope = rng.uniform(-120, 120, (2, 3)).astype(np.float32)
    image = (
        rng.uniform(60, 190, 3).astype(np.float32)
        + x[..., None] * slope[0]
        + y[..., None] * slope[1]
    )
    for _ in range(int(rng.integers(3, 7))):  # objects: ellipses with their own shading
        cx, cy = rng.uniform(0, 1, 2) * (x[0, -1], y[-1, 0])
        rx, ry = rng.uniform(0.03, 0.3, 2)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1  # (H, W)
        shade = rng.uniform(0, 255, 3).astype(np.float32) - 40 * y[..., None]
        image = np.where(inside[..., None], shade, image)
    # texture: noise on a coarse grid, smoothly upsampled, and a little pixel noise
    coarse = rng.normal(128, 40, (max(height // 3, 1), max(width // 3, 1), 3)).clip(0, 255)
    smooth = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    image += 0.25 * (np.asarray(smooth, np.float32) - 128) + rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def photo_folder(root: Path, count: int, sides: tuple[int, int] = (500, 375)) -> Path:
    """``count`` photo-like JPEGs (quality 90, landscape and portrait ``sides``) in two class
    folders under ``root/train``. 64 images are drawn (0.04 s each at 500x375) and each file
    is one of them rolled sideways by its index, so no two files are the same bytes."""
    rng = np.random.default_rng(0)
    drawn = [photo_like(rng, *(sides if i % 3 else sides[::-1])) for i in range(min(count, 64))]
    for i in range(count):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.roll(drawn[i % len(drawn)], i, axis=1)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def trainer_images_per_second(device: torch.device, compile: str = "off", **settings: Any) -> float:
    """``ressl train``'s own images/s: the last epoch's ``metrics.jsonl`` row; eager by
    default (as the first row it is compared with; and no compile time in the budget)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(
            out=f"{tmp}/run",
            device=str(device),
            knn_every=-1,
            warmup_epochs=0,
            compile=compile,
            **settings,
        )
        rows = [
            json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
        ]
    print(
        f"ressl train {settings.get('backbone')}: {time.perf_counter() - t:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return float(rows[-1]["images_per_second"])


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rows(cases: list[Case], device: torch.device, steps: int) -> list[dict[str, Any]]:
    """Every case measured; a compiled row takes the FLOPs of its eager twin."""
    rows = []
    for case in cases:
        reset_device(device)
        rows.append(measure(case, device, steps))
    eager = {r["case"]: r for r in rows if "error" not in r and r["case"].mode == "eager"}
    peak = _peak(device)
    for r in rows:
        twin = eager.get(dataclasses.replace(r["case"], mode="eager"))
        if "error" not in r and r["flops_per_image"] is None and twin is not None:
            r["flops_per_image"] = twin["flops_per_image"]
            if peak and r["flops_per_image"]:
                r["peak_fraction"] = r["images_per_second"] * r["flops_per_image"] / peak
    return rows


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| step | mode | images/s | views' share | peak memory (GiB) | GFLOP/image | "
        "of bf16 peak | compile | 200 CIFAR epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        case = r["case"]
        if "error" in r:
            lines.append(f"| {case.label} | {case.mode} | failed: {r['error']} | | | | | | |")
            continue
        memory = None if r["memory"] is None else r["memory"] / 2**30
        flops = None if r["flops_per_image"] is None else r["flops_per_image"] / 1e9
        lines.append(
            f"| {case.label} | {case.mode} | {r['images_per_second']:,.0f} | "
            f"{r['views_share']:.0%} | {_cell(memory, '.2f')} | {_cell(flops, '.3f')} | "
            f"{_cell(r['peak_fraction'], '.1%')} | {r['compile_seconds']:.0f} s | "
            f"{r['cifar_200_epochs_min']:,.0f} min |"
        )
    return lines


def views_rows(device: torch.device, steps: int, tiny: bool) -> list[str]:
    """The views alone, eager and under ``torch.compile`` (graphs between the draws): what a
    compiled views phase would gain (not in ``ressl train`` until a GPU says it pays)."""
    cases = [(16, 8, 0.0), (32, 8, 0.5)] if tiny else [(32, 512, 0.0), (224, 128, 0.5)]
    lines = ["| views alone | eager | compiled | compiled / eager |", "|---|---:|---:|---:|"]
    for size, batch, blur in cases:
        plan = CropPlan.build(size, (0.2, 1.0))
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        strong = StrongView(blur_p=blur)

        views = functools.partial(
            plan.views,
            images,
            generator=g,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            student=strong,
            teacher=WeakView(),
        )

        reset_device(device)
        compiled = torch.compile(views, dynamic=False)
        try:
            compiled()
            compiled()
            times = [_timed(fn, device, steps) for fn in (views, compiled)]
        except Exception as e:  # noqa: BLE001 - a failed compile is a row saying so
            lines.append(
                f"| {size} px, batch {batch}, blur {blur} | failed: "
                f"{str(e).strip().splitlines()[0][:60]} | | |"
            )
            continue
        eager_ips, compiled_ips = (batch / t for t in times)
        lines.append(
            f"| {size} px, batch {batch}, blur p {blur} | {eager_ips:,.0f} images/s | "
            f"{compiled_ips:,.0f} images/s | {compiled_ips / eager_ips:.2f}x |"
        )
    return lines


def pipeline_images_per_second(
    root: Path, side: int, batch: int, workers: int, device: torch.device, decode: str
) -> float:
    """The streamed folder's crops alone (no training): images/s delivered on ``device``."""
    data = load_dataset(f"folder:{root}", image_size=side)
    plan = CropPlan.build(side, (0.2, 1.0))
    assert isinstance(data.train, FolderImages)
    batches = data.train.crop_batches(
        batch, plan.worker_crops, epoch=0, seed=0, device=device, num_workers=workers, decode=decode
    )
    next(iter(batches))  # workers started
    _sync(device)
    t, n = time.perf_counter(), 0
    for _, labels in batches:
        n += labels.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, for a CPU (the tests)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = ("eager",) if args.no_compile else ("eager", "compiled", "cuda graphs")
    if args.tiny:
        steps = args.steps or 2
        cases = [Case("small", 16, 8, mode=m) for m in modes]
        cases += [Case("small", 16, 8, crops=(16, 12)), Case("small", 16, 8, symmetric=True)]
        folder = dict(backbone="small", image_size=32, batch_size=8, count=32, side=48, epochs=1)
    else:
        steps = args.steps or 20
        cases = [Case("small", 28, 1024, mode=m) for m in modes]
        cases += [Case("resnet18", 32, 512, mode=m) for m in modes]
        cases += [Case("resnet18", 32, 256, mode=m) for m in modes[:2]]
        cases += [
            Case("resnet18", 32, 256, crops=(32, 28, 24, 20, 16)),
            Case("resnet18", 32, 256, symmetric=True),
        ]
        folder = dict(
            backbone="resnet50", image_size=224, batch_size=128, count=2048, side=500, epochs=2
        )
    rows = _rows(cases, device, steps)
    lines = _table(rows)
    views = [] if args.no_compile else ["", *views_rows(device, steps, args.tiny)]
    first, workers = rows[0], min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:  # the first row's step, through ressl train
        c = first["case"]
        root = _image_folder(Path(tmp), c.batch * (min(steps, 10) + 1), c.size, ".png")
        trained = trainer_images_per_second(
            device,
            dataset=f"folder:{root}",
            backbone=c.backbone,
            batch_size=c.batch,
            image_size=c.size,
            epochs=2,
            queue_size=max(4096, 2 * c.batch),
        )
    folders.MAX_IN_MEMORY_BYTES = 0  # the folder is streamed from disk however small it is
    jpeg = [
        "| JPEG folder, " + f"{folder['backbone']} {folder['image_size']} px, batch "
        f"{folder['batch_size']} | crops alone | ressl train |",
        "|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        spec = folder.copy()
        side = spec.pop("side")
        root = photo_folder(Path(tmp), spec.pop("count"), (side, side * 3 // 4))
        for decode in ("workers", "device"):
            alone = pipeline_images_per_second(
                root, spec["image_size"], spec["batch_size"], workers, device, decode
            )
            trained_jpeg = trainer_images_per_second(
                device, dataset=f"folder:{root}", num_workers=workers, decode=decode, **spec
            )
            where = (
                f"decoded in {workers} DataLoader workers (PIL)"
                if decode == "workers"
                else f"bytes read in {workers} workers, decoded on the {device.type}"
            )
            jpeg.append(f"| {where} | {alone:,.0f} | {trained_jpeg:,.0f} |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    table = "\n".join(lines + views) + (
        f"\n\n`ressl train` on the first row's settings (an in-memory folder): {trained:,.0f} "
        f"images/s, against the step's {first.get('images_per_second', 0):,.0f}.\n\n"
        + "\n".join(jpeg)
        + "\n\n"
        f"{name}, torch {torch.__version__}, {steps} timed steps per row, fused SGD; images/s "
        "of the JPEG folder from `ressl train`'s last epoch; "
        f"`python benchmarks/gpu.py{' --tiny' if args.tiny else ''}`."
    )
    print(table)
    if args.write:
        print(write_block("gpu", table, "The step on one GPU"))


if __name__ == "__main__":
    main()
