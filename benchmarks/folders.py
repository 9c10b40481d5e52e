"""Folder pipeline throughput: decoding JPEGs and cutting crops in DataLoader workers, in one run.

The ImageNet recipe streams image folders: every file is decoded at full
resolution and its random crops are cut in the DataLoader workers
(``FolderImages.crop_batches``); flips and colour ops then run batched on the
device. This measures the worker side alone, on ImageNet-like files (JPEG,
500x375, quality 90, synthetic smooth content with noise), for the crop plans
of the one-crop, symmetric and 5-crop runs, so one can read off how many worker
cores a GPU needs. Prints a markdown table; ``--write`` puts it in
docs/benchmarks.md.

    python benchmarks/folders.py --images 256 --workers 0,2 --write
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from PIL import Image

from ressl.data.sources import FolderImages
from ressl.views.plan import CropPlan


def write_jpegs(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    files = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, size=3)
        base = (
            np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], axis=-1) * 100
            + 128
        )
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        path = root / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        files.append(path)
    return files


def rate(
    source: FolderImages, batch: int, workers: int, crops: list | None, decode: str = "workers"
) -> float:
    t0 = time.perf_counter()
    n = 0
    if crops is None:
        for x, _ in source.batches(batch, epoch=0, seed=0, num_workers=workers):
            n += x.shape[0]
    else:
        for views, _ in source.crop_batches(
            batch, crops, epoch=0, seed=0, num_workers=workers, decode=decode
        ):
            n += views[0].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=lambda t: [int(v) for v in t.split(",")], default=[0, 2])
    p.add_argument(
        "--decode",
        type=lambda t: t.split(","),
        default=["workers", "device"],
        help="where crops are decoded: workers (PIL), device (torchvision, the CPU here)",
    )
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()

    plans = [
        ("centre crop 224 (kNN monitor / evaluation)", None),
        ("one crop: teacher + student 224", CropPlan.build(224).worker_crops),
        ("symmetric: crops a + b 224", CropPlan.build(224, symmetric=True).worker_crops),
        (
            "multi-crop: teacher 224 + 224,192,160,128,96",
            CropPlan.build(224, crops=[224, 192, 160, 128, 96]).worker_crops,
        ),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(Path(tmp), args.images)
        source = FolderImages(files, [0] * len(files), 224)
        for decode in args.decode:  # warm the file cache, and each decoder's first call
            rate(source, args.batch_size, 0, plans[1][1], decode)
        for name, crops in plans:
            for decode in args.decode if crops is not None else ["workers"]:
                for w in args.workers:
                    ips = rate(source, args.batch_size, w, crops, decode)
                    rows.append((name, decode, w, ips))
                    print(f"{name}, {decode}, {w} workers: {ips:.1f} images/s", flush=True)

    cores = os.cpu_count() or 1
    workers = ",".join(str(w) for w in args.workers)
    lines = [
        f"Folder pipeline, worker side only: {args.images} JPEGs of 500x375 (quality 90), batch "
        f"{args.batch_size}, decode + crops + resize (PIL, bilinear with antialiasing) per image; "
        f"{cpu_model()}, {cores} cores; torch {torch.__version__}. 0 workers = in the training process.",
        "",
        "| what is cut per image | decoded | workers | images/s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {name} | {d} | {w} | {ips:,.1f} |" for name, d, w, ips in rows]
    lines += [
        "",
        f"Command: `python benchmarks/folders.py --images {args.images} --batch-size {args.batch_size} "
        f"--workers {workers} --decode {','.join(args.decode)}`. decoded = workers: PIL decodes "
        "and crops in the workers; device: the workers read bytes and the training device (here "
        "the CPU, in the training process) decodes the batch with torchvision and cuts the crops.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("folders", table, "Folder pipeline for ImageNet-like data (CPU)")


if __name__ == "__main__":
    main()
