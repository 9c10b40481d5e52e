"""Distributed scaling on this machine: ``torchrun`` with 1 and N processes, in one run.

Each configuration trains the same global batch on the same CIFAR-shaped data
(random uint8; CIFAR cannot be downloaded here) for one epoch with ``ressl train``
under ``torchrun --standalone``; threads are split evenly between the processes
(``OMP_NUM_THREADS = cores / N``), so on a CPU this measures what DDP costs
(gradient all-reduce, cross-rank BatchNorm, queue all-gather over gloo) rather
than a speed-up from more hardware. The configurations are interleaved over
``--repeats`` rounds and each keeps its best. Throughput is global images/s from
the run's ``metrics.jsonl``. Prints a markdown table; ``--write`` puts it in
docs/benchmarks.md.

    python benchmarks/scaling.py --procs 1,2 --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from throughput import write_fake_cifar10  # noqa: E402


def run(procs: int, root: Path, out: Path, args: argparse.Namespace) -> float:
    threads = max(1, (os.cpu_count() or 1) // procs)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        "-m",
        "ressl",
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        str(root),
        "--backbone",
        args.backbone,
        "--batch-size",
        str(args.batch_size),
        "--subset",
        str(args.batch_size * (args.steps + 1)),
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--queue-size",
        "4096",
        "--knn-every",
        "-1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return float(row["images_per_second"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2])
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument(
        "--steps", type=int, default=6, help="steps per epoch (the epoch is the timed unit)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()

    best = {n: 0.0 for n in args.procs}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fake_cifar10(Path(tmp) / "data", args.batch_size * (args.steps + 1))
        for r in range(args.repeats):
            for n in args.procs:
                ips = run(n, root, Path(tmp) / f"run-{r}-{n}", args)
                best[n] = max(best[n], ips)
                print(f"round {r + 1}: {n} process(es): {ips:.1f} images/s", flush=True)

    base = best[args.procs[0]]
    cores = os.cpu_count() or 1
    procs = ",".join(str(n) for n in args.procs)
    cmd = (
        f"python benchmarks/scaling.py --procs {procs} --batch-size {args.batch_size} --steps {args.steps} "
        f"--repeats {args.repeats} --backbone {args.backbone}"
    )
    lines = [
        f"`torchrun` scaling on CPU (gloo), {args.backbone} at 32 px, global batch {args.batch_size}, one epoch of "
        f"{args.steps} steps (the first included), bf16 autocast where supported; {cpu_model()}, {cores} cores "
        f"split evenly between the processes; best of {args.repeats} interleaved rounds; torch {torch.__version__}.",
        "",
        "| processes | threads each | images/s (global) | vs 1st row |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {max(1, cores // n)} | {best[n]:,.1f} | {best[n] / base:.2f}x |"
        for n in args.procs
    ]
    lines += ["", f"Command: `{cmd}`"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("scaling", table, "Distributed training on CPU (torchrun, gloo)")


if __name__ == "__main__":
    main()
