"""Kernels that one training step's views launch, per component, and the views' CPU time.

Counts the aten ops of a one-crop step's views (strong + weak, ``CropPlan.views``) under
a dispatch mode, with the kernels' GPU paths (``syncs_are_free`` patched to False and the
CPU's cache-sized chunks off, as on a GPU), so the counts are the launches a GPU would
see. View ops (reshapes, slices) launch nothing and are counted apart. Each op is put to
the component whose code runs it (the innermost ``ressl.views`` frame that says).

``--against REV`` loads that revision's ``ressl/views`` from git beside the working
tree's and prints both, and times both on this CPU side by side: their CPU paths (what
a CPU run uses) and their GPU paths (the arithmetic a GPU would do, at a CPU's speed).

    python benchmarks/view_ops.py --against HEAD~1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import linecache
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ressl.views  # noqa: F401  (looked up in sys.modules by name)
from ressl.views.plan import CropPlan

ROOT = Path(__file__).resolve().parents[1]
#: Ops that launch no kernel: allocations without a fill, and the like.
NO_KERNEL = {"empty", "empty_like", "new_empty", "empty_strided", "detach", "alias", "lift_fresh"}
COMPONENTS = (
    "crop",
    "flip",
    "jitter: draws and masks",
    "jitter: blends",
    "jitter: hue",
    "grayscale",
    "blur",
    "normalize",
    "other",
)


def _component(frames: list[tuple[str, str]]) -> str:
    """The component of an op from its ``ressl.views`` frames, innermost first
    (function name, source line)."""
    for func, line in frames:
        if "_hue_(" in line or "_hue(" in line or func in ("_hue_", "_hue", "_hue_where_"):
            return "jitter: hue"
        if func == "_blend_":
            return "jitter: blends"
        if func in ("random_blur", "pil_gaussian_blur", "_gaussian_blur", "_box_passes"):
            return "blur"
        if func in ("sample_jitter_params", "adjust_colors_"):
            return "jitter: draws and masks"
        if func in ("_normalize_", "_affine", "normalize"):
            return "normalize"
        if func in (
            "sample_crop_boxes",
            "resample",
            "resized_crop",
            "flipped",
            "_grid_sample",
            "_grid_coords",
        ):
            return "flip" if "flip" in line else "crop"
        if func in ("strong_view", "weak_view"):
            for word, component in (
                ("grey", "grayscale"),
                ("flip", "flip"),
                ("jitter", "jitter: draws and masks"),
                ("apply", "jitter: draws and masks"),
                ("crop", "crop"),
                ("normal", "normalize"),
            ):
                if word in line:
                    return component
    return "other"


class CountOps(TorchDispatchMode):
    """Counts kernels (non-view ops) and random draws per component."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.prefix = str(Path(sys.modules[package].__file__).parent)  # type: ignore[arg-type]
        self.kernels: collections.Counter[str] = collections.Counter()
        self.views = 0
        self.draws = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in NO_KERNEL:
            self.views += 1
        else:
            frames, f = [], sys._getframe(1)
            while f is not None:
                if f.f_code.co_filename.startswith(self.prefix):
                    line = linecache.getline(f.f_code.co_filename, f.f_lineno)
                    frames.append((f.f_code.co_name, line))
                f = f.f_back
            self.kernels[_component(frames)] += 1
            self.draws += name in ("rand", "uniform", "normal", "randint", "bernoulli")
        return func(*args, **(kwargs or {}))


def load_views(rev: str) -> str:
    """Imports ``rev``'s ``ressl/views`` as ``ressl.views_<rev>``; returns the name."""
    tree = Path(tempfile.mkdtemp()) / "views"
    tree.mkdir()
    files = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:ressl/views"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        text = subprocess.run(
            ["git", "show", f"{rev}:ressl/views/{name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (tree / name).write_text(text)
    package = "ressl.views_" + "".join(c if c.isalnum() else "_" for c in rev)
    spec = importlib.util.spec_from_file_location(
        package, tree / "__init__.py", submodule_search_locations=[str(tree)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return package


@contextlib.contextmanager
def gpu_paths(package: str) -> Iterator[None]:
    """The kernels branch as on a GPU: no host reads, no CPU chunks."""
    saved: list[tuple[types.ModuleType, str, object]] = []
    for module_name, attr, value in (
        ("colour", "syncs_are_free", lambda device: False),
        ("blur", "syncs_are_free", lambda device: False),
        ("geometry", "_CPU_CHUNK", 1 << 62),
    ):
        module = sys.modules[f"{package}.{module_name}"]
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def step_views(package: str, batch: int, size: int, blur_p: float):  # type: ignore[no-untyped-def]
    """A callable running one one-crop step's views with ``package``'s view configs."""
    views = sys.modules[package]
    plan = CropPlan.build(size, (0.2, 1.0))
    images = torch.randint(
        0,
        256,
        (batch, 3, size, size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    student, teacher = views.StrongView(blur_p=blur_p), views.WeakView()
    generator = torch.Generator().manual_seed(0)

    def run():  # type: ignore[no-untyped-def]
        return plan.views(
            images,
            generator=generator,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            student=student,
            teacher=teacher,
        )

    return run


def count(package: str, batch: int, size: int, blur_p: float) -> CountOps:
    run = step_views(package, batch, size, blur_p)
    with gpu_paths(package):
        run()  # first call: constants copied to the device
        with CountOps(package) as counter:
            run()
    return counter


def cpu_ms(package: str, batch: int, size: int, blur_p: float, repeat: int) -> list[float]:
    run = step_views(package, batch, size, blur_p)
    run()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision to compare with, e.g. HEAD~1")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    packages = {"this tree": "ressl.views"}
    if args.against:
        packages = {args.against: load_views(args.against), **packages}
    for blur_p in (0.0, 0.5):
        counts = {label: count(p, args.batch, args.size, blur_p) for label, p in packages.items()}
        print(
            f"\nkernels of one one-crop step's views, GPU paths, {args.batch} images at "
            f"{args.size} px, blur p {blur_p} (PIL)\n"
        )
        print("| component | " + " | ".join(counts) + " |")
        print("|---|" + "---:|" * len(counts))
        for component in COMPONENTS:
            if any(c.kernels[component] for c in counts.values()):
                cells = " | ".join(str(c.kernels[component]) for c in counts.values())
                print(f"| {component} | {cells} |")
        total = " | ".join(f"**{sum(c.kernels.values())}**" for c in counts.values())
        print(f"| **all** | {total} |")
        print("| (random draws) | " + " | ".join(str(c.draws) for c in counts.values()) + " |")
        print(
            "| (view ops, no kernel) | " + " | ".join(str(c.views) for c in counts.values()) + " |"
        )
    print(
        f"\nCPU time of the views, ms per step, median of {args.repeat}, interleaved; "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    for blur_p in (0.0, 0.5):
        for paths in ("CPU paths", "GPU paths"):
            times: dict[str, list[float]] = {label: [] for label in packages}
            for _ in range(3):  # interleaved rounds, so drift hits both alike
                for label, p in packages.items():
                    with gpu_paths(p) if paths == "GPU paths" else contextlib.nullcontext():
                        times[label] += cpu_ms(
                            p, args.batch, args.size, blur_p, args.repeat // 3 + 1
                        )
            medians = {label: sorted(t)[len(t) // 2] for label, t in times.items()}
            cells = ", ".join(f"{label} {ms:.2f}" for label, ms in medians.items())
            ratio = ""
            if len(medians) == 2:
                before, after = medians.values()
                ratio = f" ({before / after:.2f}x)"
            print(f"- blur p {blur_p}, {paths}: {cells}{ratio}")


if __name__ == "__main__":
    main()
