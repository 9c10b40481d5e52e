"""What the training-time health measures cost: a training step with and without them.

The same model, optimiser and batch step alternately with ``observe`` off and on (blocks of
``--steps`` steps, ``--rounds`` rounds, so drift in the machine's speed hits both), and each
window's read (``StepHealth.take`` and the one ``.tolist()``) is timed as the trainer does
it, every ``--window`` steps. Inputs are ready-made views, so the views' own cost is left
out and the share is an upper bound of what a real step pays.

Usage:
    python benchmarks/health_cost.py                    # small CNN and ResNet-18, 28 px, batch 256
    python benchmarks/health_cost.py --steps 3 --rounds 1 --batch 16 --queue 64   # a smoke test
"""

from __future__ import annotations

import argparse
import time

import torch

from ressl import ReSSL, training_step
from ressl.training.vitals import StepHealth


def _model(backbone: str, args: argparse.Namespace) -> tuple[ReSSL, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ReSSL(backbone, in_channels=1, image_size=args.size, queue_size=args.queue)
    opt = torch.optim.SGD(model.student.parameters(), lr=0.01, momentum=0.9)
    return model, opt


def measure(backbone: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step without and with the measures, and per window read."""
    model, opt = _model(backbone, args)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(args.batch, 1, args.size, args.size, generator=g) for _ in range(2)]
    health = StepHealth(teacher_temperature=0.04)
    amp = torch.bfloat16 if args.bf16 else None

    def steps(observe: bool) -> float:
        t = time.perf_counter()
        for i in range(args.steps):
            loss = training_step(
                model,
                opt,
                [x[0]],
                [x[1]],
                momentum=0.99,
                autocast_dtype=amp,
                observe=health.observe if observe else None,
            )
            if (i + 1) % args.window == 0:
                read = health.take() if observe else None
                values = torch.stack([loss]) if read is None else torch.cat([loss.view(1), read])
                values.tolist()
        return time.perf_counter() - t

    steps(True)  # warm-up: allocator, oneDNN kernels
    off = on = 0.0
    for _ in range(args.rounds):
        off += steps(False)
        on += steps(True)
    n = args.steps * args.rounds
    return {"off": off / n, "on": on / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="small,resnet18")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=10, help="steps per progress window")
    parser.add_argument("--bf16", action="store_true", help="autocast as the CPU trainer does")
    args = parser.parse_args()
    print(
        f"batch {args.batch}, {args.size} px, K {args.queue}, window {args.window}, "
        f"{args.rounds} x {args.steps} steps each way, {torch.get_num_threads()} threads"
    )
    print("| backbone | ms/step without | ms/step with | overhead |")
    print("|---|---:|---:|---:|")
    for backbone in args.backbones.split(","):
        r = measure(backbone, args)
        share = 100 * (r["on"] - r["off"]) / r["off"]
        print(f"| {backbone} | {1000 * r['off']:.1f} | {1000 * r['on']:.1f} | {share:+.2f}% |")


if __name__ == "__main__":
    main()
