"""Training throughput of multi-crop and symmetric (2x backprop) relative to one crop, in one run.

All three run the real trainer (``ressl.train``) on the same CIFAR-shaped data
(random uint8; CIFAR cannot be downloaded here) with the same backbone, batch and
precision; only the crop settings differ:

- one crop: student 32 px strong, teacher 32 px weak;
- multi-crop ``--crops 32,28,24,20,16``: five student crops, one teacher crop;
- symmetric ``--symmetric``: two crops, each through student and teacher.

Each mode's speed is its fastest step (after one warm-up step), and the modes
are interleaved over ``--repeats`` rounds keeping the best, so that load from
other processes on a shared machine distorts the ratios as little as possible.
Throughput counts images (not crops) per second. Prints a markdown table; ``--write`` puts it in
docs/benchmarks.md.

    python benchmarks/crops.py --steps 4 --repeats 2 --write
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from throughput import bench_ressl, write_fake_cifar10  # noqa: E402

MODES: list[tuple[str, dict[str, Any], float]] = [
    # name, settings, student pixels per image relative to one crop (the compute that grows)
    ("one crop (1x backprop)", {}, 1.0),
    (
        "multi-crop 32,28,24,20,16",
        {"crops": (32, 28, 24, 20, 16)},
        (32**2 + 28**2 + 24**2 + 20**2 + 16**2) / 32**2,
    ),
    ("symmetric (2x backprop)", {"symmetric": True}, 2.0),
]


def fastest_step(
    root: Path, batch: int, steps: int, backbone: str, out: Path, **settings: Any
) -> float:
    """Images/s of the real trainer's fastest step among ``steps`` (one more runs first, untimed)."""
    return bench_ressl(root, batch, steps, backbone, out, fastest=True, knn_every=-1, **settings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved rounds; each mode keeps its best"
    )
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()

    n = args.batch_size * (args.steps + 1)
    best = {name: 0.0 for name, _, _ in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fake_cifar10(Path(tmp), n)
        fastest_step(
            root, args.batch_size, 2, args.backbone, Path(tmp) / "warm-up"
        )  # first-call costs, untimed
        for r in range(args.repeats):
            for i, (name, settings, _) in enumerate(MODES):
                ips = fastest_step(
                    root,
                    args.batch_size,
                    args.steps,
                    args.backbone,
                    Path(tmp) / f"run{r}-{i}",
                    **settings,
                )
                best[name] = max(best[name], ips)
                print(f"round {r + 1}: {name}: {ips:.1f} images/s", flush=True)

    base = best[MODES[0][0]]
    device = f"{cpu_model()}, {torch.get_num_threads()} threads"
    cmd = (
        f"python benchmarks/crops.py --steps {args.steps} --repeats {args.repeats} "
        f"--batch-size {args.batch_size} --backbone {args.backbone}"
    )
    lines = [
        f"Training throughput by crop setting, {args.backbone} (small-image stem) at 32 px, batch "
        f"{args.batch_size}, bf16 autocast where supported, channels-last; fastest of {args.steps} timed steps, "
        f"best of {args.repeats} interleaved rounds; {device}; torch {torch.__version__}.",
        "",
        "| setting | images/s | vs one crop | student pixels vs one crop |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {best[name]:,.1f} | {best[name] / base:.2f}x | {pixels:.2f}x |"
        for name, _, pixels in MODES
    ]
    lines += ["", f"Command: `{cmd}`"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("crops", table, "Multi-crop and symmetric training (CPU)")


if __name__ == "__main__":
    main()
