"""The step's smaller kernels on this CPU, each against its alternative, side by side in one run.

- SGD's update: fused, foreach, and PyTorch's default (a loop over parameters on CPUs),
  for the small CNN and ResNet-18 (the optimiser step alone, gradients given).
- PIL-mode blur (``random_blur``, p 0.5): the whole batch at once, and in the
  cache-sized chunks ressl uses on CPUs (the same bits).
- The views of a one-crop step (strong + weak): eager, and under ``torch.compile``.

Prints a markdown table; ``--write`` puts it in docs/benchmarks.md.

    python benchmarks/kernels.py --write
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from common import cpu_model, write_block

import ressl.views.blur as blur
from ressl import ReSSL
from ressl.views import StrongView, WeakView
from ressl.views.plan import CropPlan


def _ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def sgd_rows(repeat: int) -> list[str]:
    rows = []
    for backbone in ("small", "resnet18"):
        model = ReSSL(backbone, in_channels=3, image_size=32)
        params = list(model.student.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        times = {}
        for kernel, kw in (
            ("fused", {"fused": True}),
            ("foreach", {"foreach": True}),
            ("default", {}),
        ):
            opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, **kw)
            times[kernel] = _ms(opt.step, repeat)
        rows.append(
            f"| SGD step, {backbone} ({len(params)} tensors) | fused {times['fused']:.2f} ms | "
            f"default {times['default']:.2f} ms, foreach {times['foreach']:.2f} ms | "
            f"{times['default'] / times['fused']:.2f}x |"
        )
    return rows


def blur_rows(repeat: int) -> list[str]:
    rows = []
    for size, batch in ((32, 256), (64, 256), (224, 32)):
        x = torch.rand(batch, 3, size, size)

        def run(x: torch.Tensor = x) -> torch.Tensor:
            return blur.random_blur(x, 0.5, (0.1, 2.0), torch.Generator().manual_seed(0), "pil")

        chunked = _ms(run, repeat)
        saved, blur._CPU_CHUNK = blur._CPU_CHUNK, 1 << 62
        try:
            whole = _ms(run, repeat)
        finally:
            blur._CPU_CHUNK = saved
        rows.append(
            f"| PIL blur p 0.5, {batch} images at {size} px | chunked {chunked:.1f} ms | "
            f"whole batch {whole:.1f} ms | {whole / chunked:.2f}x |"
        )
    return rows


def views_rows(repeat: int) -> list[str]:
    rows = []
    for size, batch in ((32, 256), (16, 32)):
        plan = CropPlan.build(size, (0.2, 1.0))
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        views = functools.partial(
            plan.views,
            images,
            generator=torch.Generator().manual_seed(0),
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            student=StrongView(),
            teacher=WeakView(),
        )
        compiled = torch.compile(views)
        compiled()  # compiles
        eager_ms, compiled_ms = _ms(views, repeat), _ms(compiled, repeat)
        rows.append(
            f"| one-crop views, {batch} images at {size} px | eager {eager_ms:.2f} ms | "
            f"compiled {compiled_ms:.2f} ms | {compiled_ms / eager_ms:.2f}x |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per cell")
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    lines = ["| kernel | ressl's choice | the alternative | ratio |", "|---|---:|---:|---:|"]
    lines += sgd_rows(args.repeat) + blur_rows(args.repeat) + views_rows(args.repeat)
    table = "\n".join(lines) + (
        f"\n\nMilliseconds per call, mean of {args.repeat} after one warm-up, one run; "
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        "`python benchmarks/kernels.py`. Ratio: the alternative's time over ressl's choice; "
        "for the views, compiled over eager (ressl keeps them eager)."
    )
    print(table)
    if args.write:
        print(write_block("kernels", table, "The step's smaller kernels (CPU)"))


if __name__ == "__main__":
    main()
