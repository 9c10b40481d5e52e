"""The one command to run when a GPU machine is lent: every row written as it is measured.

    timeout 540 python3 benchmarks/gpu_suite.py --out $OUT

It makes this tree's ``ressl`` importable (``source_tree``), records the machine in
``OUT/machine.json``, then runs the sections below in order, each in a process of its
own under its own time budget (a section past it is killed with its workers and the
suite goes on; all of them fit in 8 minutes with a cold compile cache). Each row is
appended to ``OUT/<section>.jsonl`` and flushed as soon as it is measured; a section
that fails or runs out of time leaves a row with its error; its output is in
``OUT/<section>.log``, and ``OUT/suite.jsonl`` has one row per section (status, seconds).

Back on a CPU machine, the tables for docs/benchmarks.md:

    python benchmarks/gpu_suite.py --tables DIR [--write]

On a CPU, with tiny sizes (what the tests run): ``--tiny``. ``RESSL_SUITE_FAULT`` injects
faults for the tests: ``eager=raise,jpeg=hang,train=die``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import source_tree

HERE = Path(__file__).resolve().parent
FAULT_ENV = "RESSL_SUITE_FAULT"
TOTAL_BUDGET = 480.0  # seconds for all sections: 8 minutes, within a 540 s command timeout


@dataclass(frozen=True)
class Sizes:
    """The workload of every section: full (one GPU) or tiny (a CPU, the tests)."""

    steps: int  # timed steps per step row
    compiled_steps: int  # timed steps of a compiled row: with compile and warm-up, ~30 steps
    small: tuple[int, int]  # small CNN: side, batch
    resnet18: tuple[int, int]  # ResNet-18: side, batch
    train_batches: int  # batches per epoch of `ressl train` (2 epochs; the last is timed)
    jpeg_count: int  # photo-like JPEGs in the folder
    jpeg_sides: tuple[int, int]  # their width, height (and portrait the other way)
    jpeg_crop: tuple[int, int]  # crop side, batch
    workers: int  # DataLoader workers (at most)


FULL = Sizes(20, 28, (28, 1024), (32, 512), 8, 1024, (500, 375), (224, 128), 16)
TINY = Sizes(2, 2, (16, 8), (16, 4), 3, 24, (80, 60), (32, 8), 2)


class Rows:
    """``OUT/<section>.jsonl``, one JSON object a line, flushed as each is added."""

    def __init__(self, out: Path, section: str) -> None:
        self.path, self.section = out / f"{section}.jsonl", section

    def add(self, **row: Any) -> dict[str, Any]:
        row = {"section": self.section, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
        return row

    def error(self, what: str, error: BaseException | str) -> dict[str, Any]:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return self.add(row=what, error=text.strip()[-1000:])


def guarded(
    rows: Rows, what: str, fn: Callable[..., dict[str, Any]], *args: Any, **kw: Any
) -> None:
    """The row ``fn(*args, **kw)`` returns, or a row with its error (and the traceback in the
    log): one failed row does not end its section."""
    try:
        rows.add(row=what, **fn(*args, **kw))
    except Exception as e:  # noqa: BLE001 - every failure is a row; the traceback goes to the log
        traceback.print_exc()
        rows.error(what, e)


# --- the sections (each runs in a process of its own; torch is imported there) ------------


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine(rows: Rows, sizes: Sizes, out: Path) -> None:
    """torch's view of the machine, added to machine.json (the parent wrote the rest)."""
    import torch
    import torchvision

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(_device()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            gpus=torch.cuda.device_count(),
        )
    path = out / "machine.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**record, **facts}, indent=1))
    rows.add(row="torch", **facts)


def nvjpeg(rows: Rows, sizes: Sizes, out: Path) -> None:
    """One photo-like JPEG decoded by ``torchvision.io.decode_jpeg`` on the device against the
    CPU: the largest and mean difference, and which device the pixels came back on (a
    decoder that quietly fell back to the CPU is seen here)."""
    import io

    import numpy as np
    import torch
    from gpu import photo_like
    from PIL import Image
    from torchvision.io import decode_jpeg

    device = _device()
    buffer = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(0), *sizes.jpeg_sides)).save(
        buffer, "JPEG", quality=90
    )
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def probe() -> dict[str, Any]:
        cpu = decode_jpeg(data)  # (3, H, W) uint8
        decoded = decode_jpeg(data, device=device)
        batch = decode_jpeg([data] * 8, device=device)
        diff = (decoded.cpu().int() - cpu.int()).abs()
        same = all(torch.equal(b.cpu(), decoded.cpu()) for b in batch)
        return {
            "device": str(device),
            "decoded_on": str(decoded.device),
            "shape": list(decoded.shape),
            "max_diff": int(diff.max()),
            "mean_diff": float(diff.float().mean()),
            "batch_of_8_equal": same,
        }

    guarded(rows, "decode_jpeg, one file", probe)


class TestRows:
    """A pytest plugin: a row per test as it finishes (a section killed mid-run keeps them)."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome != "passed":  # a setup skip or error too
            why = report.longrepr  # a skip's is (file, line, reason)
            message = str(why[2] if isinstance(why, tuple) else why).splitlines()[-1][:300]
            self.rows.add(
                row="test",
                test=report.nodeid,
                when=report.when,
                outcome=report.outcome,
                seconds=round(report.duration, 2),
                message=message if why else None,
            )


def cuda_tests(rows: Rows, sizes: Sizes, out: Path) -> None:
    """``pytest -m cuda`` (the tests skipped without CUDA): a row per test, a summary row,
    and the report in ``cuda_tests.xml``."""
    import xml.etree.ElementTree as ET

    import pytest

    report = out / "cuda_tests.xml"
    args = ["-m", "cuda", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={report}"]
    args += ["--continue-on-collection-errors", "-o", "faulthandler_timeout=60"]
    os.chdir(HERE.parent)
    code = pytest.main(args, plugins=[TestRows(rows)])
    counts: dict[str, Any] = {"exit_code": int(code)}
    if report.exists():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        counts["failed"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    rows.add(row="pytest -m cuda", **counts)


def _step_row(case: Any, steps: int, **extra: Any) -> dict[str, Any]:
    """gpu.py's measurement of one case, as a JSON row."""
    import dataclasses

    import gpu

    device = _device()
    row = gpu.measure(case, device, steps)
    if "error" in row:
        raise RuntimeError(row["error"])
    row.pop("case")
    return {"label": case.label, **dataclasses.asdict(case), "device": str(device), **extra, **row}


def eager(rows: Rows, sizes: Sizes, out: Path) -> None:
    """The eager step, small CNN and ResNet-18, cuDNN benchmark on and off."""
    import gpu
    import torch

    for backbone, (side, batch) in (("small", sizes.small), ("resnet18", sizes.resnet18)):
        for benchmark in (True, False):
            gpu.reset_device(_device())
            torch.backends.cudnn.benchmark = benchmark
            case = gpu.Case(backbone, side, batch)
            what = f"{backbone} eager, cudnn.benchmark {benchmark}"
            guarded(rows, what, _step_row, case, sizes.steps, cudnn_benchmark=benchmark)


def _cuda_graphs_recorded(device: Any) -> int | None:
    """CUDA graphs recorded by inductor's graph trees on ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
    if manager is None:
        return 0
    count, nodes = 0, list(manager.get_roots())
    while nodes:
        node = nodes.pop()
        count += 1
        nodes += [child for children in node.children.values() for child in children]
    return count


def _compiled_row(case: Any, steps: int, skipped: list[str]) -> dict[str, Any]:
    """A compiled step's row, with what dynamo and inductor counted while it ran."""
    from torch._dynamo.utils import counters

    row = _step_row(case, steps, cudnn_benchmark=True)
    try:  # inductor's internals: a torch without them loses this cell, not the row
        cuda_graphs: int | str | None = _cuda_graphs_recorded(_device())
    except Exception as e:  # noqa: BLE001
        cuda_graphs = f"unknown ({type(e).__name__}: {e})"
    return {
        **row,
        "steps_run": 3 + steps,  # 2 compiling, 1 warm-up, the timed ones
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "skip_reasons": list(skipped),
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
        "cuda_graphs": cuda_graphs,
    }


def compiled(rows: Rows, sizes: Sizes, out: Path) -> None:
    """ResNet-18 compiled, default and reduce-overhead (CUDA graphs): images/s, compile
    seconds, CUDA-graph skips and their reasons, dynamo graphs and CUDA graphs after ~30
    steps."""
    import logging

    import gpu
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    device = _device()
    torch.backends.cudnn.benchmark = True
    skipped: list[str] = []

    class Skips(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()[:300]
            if "cudagraph" in message and message not in skipped:
                skipped.append(message)

    # inductor logs each skip's reason on GPUs (off GPUs it only counts them): to
    # `cudagraphs_log` in recent torch, to `perf_hint_log` in older ones
    for name in ("cudagraphs_log", "perf_hint_log"):
        if hasattr(cudagraph_utils, name):
            getattr(cudagraph_utils, name).addHandler(Skips())
    side, batch = sizes.resnet18
    for mode in ("compiled", "cuda graphs"):
        gpu.reset_device(device)
        counters.clear()
        skipped.clear()
        case = gpu.Case("resnet18", side, batch, mode=mode)
        guarded(rows, f"resnet18 {mode}", _compiled_row, case, sizes.compiled_steps, skipped)


def _step_images_per_second(out: Path, backbone: str, mode: str) -> float | None:
    """The step's images/s for the same network and mode, from the rows already measured."""
    for name in ("eager", "compiled"):
        path = out / f"{name}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            if row.get("backbone") == backbone and row.get("mode") == mode and "error" not in row:
                return row["images_per_second"]
    return None


def _trained_row(
    out: Path, root: Path, compile: str, mode: str, side: int, batch: int
) -> dict[str, Any]:
    """``ressl train``'s images/s on ``root``, and the step's of the same mode."""
    import gpu

    device = _device()
    t = time.perf_counter()
    ips = gpu.trainer_images_per_second(
        device,
        compile=compile,
        dataset=f"folder:{root}",
        backbone="resnet18",
        batch_size=batch,
        image_size=side,
        epochs=2,
        queue_size=max(4096, 2 * batch),
    )
    step = _step_images_per_second(out, "resnet18", mode)
    return {
        "compile": compile,
        "device": str(device),
        "batch": batch,
        "size": side,
        "images_per_second": ips,
        "step_images_per_second": step,
        "of_step": ips / step if step else None,
        "seconds": time.perf_counter() - t,
    }


def train_end_to_end(rows: Rows, sizes: Sizes, out: Path) -> None:
    """``ressl train`` on CUDA, eager and compiled, on an in-memory folder of the ResNet-18
    rows' size: its images/s (the last of 2 epochs) against the step's."""
    import tempfile

    import gpu

    device = _device()
    side, batch = sizes.resnet18
    with tempfile.TemporaryDirectory() as tmp:
        root = gpu._image_folder(Path(tmp), batch * sizes.train_batches, side, ".png")
        for compile, mode in (("off", "eager"), ("on", "compiled")):
            gpu.reset_device(device)
            what = f"ressl train resnet18, compile {compile}"
            guarded(rows, what, _trained_row, out, root, compile, mode, side, batch)


def _crops_row(root: Path, sizes: Sizes, workers: int, decode: str) -> dict[str, Any]:
    """Images/s of the crops of ``root`` alone, decoded the ``decode`` way."""
    import gpu

    device = _device()
    side, batch = sizes.jpeg_crop
    return {
        "decode": decode,
        "device": str(device),
        "workers": workers,
        "files": sizes.jpeg_count,
        "file_sides": list(sizes.jpeg_sides),
        "size": side,
        "batch": batch,
        "images_per_second": gpu.pipeline_images_per_second(
            root, side, batch, workers, device, decode
        ),
    }


def jpeg(rows: Rows, sizes: Sizes, out: Path) -> None:
    """Random crops of a streamed folder of photo-like JPEGs, decoded in the DataLoader
    workers (PIL) and on the device (nvjpeg on CUDA): images/s of the crops alone."""
    import tempfile

    import gpu

    from ressl.data import folders

    workers = min(sizes.workers, os.cpu_count() or 1)
    folders.MAX_IN_MEMORY_BYTES = 0  # streamed from disk however small the folder is
    with tempfile.TemporaryDirectory() as tmp:
        root = gpu.photo_folder(Path(tmp), sizes.jpeg_count, sizes.jpeg_sides)
        for decode in ("workers", "device"):
            what = f"crops, decode {decode}"
            guarded(rows, what, _crops_row, root, sizes, workers, decode)


@dataclass(frozen=True)
class Section:
    run: Callable[[Rows, Sizes, Path], None]
    budget: float  # seconds, with a cold compile cache on one H100 (the tiny suite's: x2)


#: In the order they run. Budgets sum to 480 s.
SECTIONS: dict[str, Section] = {
    "machine": Section(machine, 20),
    "nvjpeg": Section(nvjpeg, 25),
    "cuda_tests": Section(cuda_tests, 80),
    "eager": Section(eager, 60),
    "compiled": Section(compiled, 150),
    "train": Section(train_end_to_end, 85),
    "jpeg": Section(jpeg, 60),
}


def run_section(name: str, out: Path, tiny: bool) -> int:
    """The body of a section's own process: its rows, or a row with its error."""
    source_tree.finder_if_asked()
    rows = Rows(out, name)
    faults = dict(
        item.split("=", 1) for item in os.environ.get(FAULT_ENV, "").split(",") if "=" in item
    )
    try:
        if faults.get(name) == "raise":
            raise RuntimeError(f"fault injected by {FAULT_ENV}")
        if faults.get(name) == "hang":
            time.sleep(10**6)
        if faults.get(name) == "die":  # no row, no traceback: as a crash in native code
            os._exit(3)
        SECTIONS[name].run(rows, TINY if tiny else FULL, out)
    except Exception as e:  # noqa: BLE001 - the suite goes on; the row says what failed
        traceback.print_exc()
        rows.error("section", e)
        return 1
    return 0


# --- the suite (standard library only: it runs before ressl or torch may be importable) --


def _command(args: list[str], seconds: float = 10) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_facts() -> dict[str, Any]:
    """What the machine offers, before torch is imported."""
    import resource

    shm = os.statvfs("/dev/shm") if os.path.exists("/dev/shm") else None
    smi = "--query-gpu=name,driver_version,memory.total"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ulimit_n": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "dev_shm_gib": round(shm.f_frsize * shm.f_blocks / 2**30, 2) if shm else None,
        "nvidia_smi": _command(["nvidia-smi", smi, "--format=csv,noheader"])
        if shutil.which("nvidia-smi")
        else None,
    }


def _section_process(name: str, out: Path, tiny: bool, budget: float) -> dict[str, Any]:
    """Run one section in its own process group; kill the group past ``budget`` seconds."""
    command = [*source_tree.python(), str(Path(__file__).resolve()), "--section", name]
    command += ["--out", str(out), *(["--tiny"] if tiny else [])]
    t = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=budget)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the section and its workers
            process.wait()
            code, status = None, "timed out"
    rows = Rows(out, name)
    if status == "timed out":
        rows.error("section", f"timed out after {budget:.0f} s (its budget); log in {name}.log")
    elif status == "failed":
        last = rows.path.read_text().splitlines()[-1:] if rows.path.exists() else []
        if not (last and '"error": ' in last[0]):  # died without saying why
            tail = (out / f"{name}.log").read_text()[-1000:]
            rows.error("section", f"exit code {code}: {tail}")
    return {"status": status, "exit_code": code, "seconds": round(time.perf_counter() - t, 1)}


def run_suite(out: Path, tiny: bool, install: bool, only: list[str] | None, total: float) -> None:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    suite = Rows(out, "suite")
    try:
        how = source_tree.ensure_importable(install=install)
    except Exception as e:  # noqa: BLE001 - the sections will say what does not import
        how = {"ressl_import": "failed", "error": f"{type(e).__name__}: {e}"}
    facts = {**machine_facts(), **how, "tiny": tiny}
    (out / "machine.json").write_text(json.dumps(facts, indent=1))
    suite.add(row="setup", seconds=round(time.perf_counter() - start, 1), **how)
    scale = 2 if tiny else 1  # a 2-core CPU compiles the tiny networks slower than a GPU machine
    for name, section in SECTIONS.items():
        if only and name not in only:
            continue
        left = scale * total - (time.perf_counter() - start)
        budget = min(scale * section.budget, left)
        if left <= 5:
            Rows(out, name).error("section", "not run: the suite's time was spent")
            suite.add(row=name, status="not run")
            continue
        result = _section_process(name, out, tiny, budget)
        suite.add(row=name, budget=round(budget), **result)
        print(f"{name}: {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for machine.json and the *.jsonl rows")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU (the tests)")
    parser.add_argument("--only", help="comma-separated sections, of: " + ", ".join(SECTIONS))
    parser.add_argument("--no-install", action="store_true", help="never pip install the tree")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="seconds in all")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--tables", type=Path, help="print the docs tables of a suite's folder")
    parser.add_argument("--write", action="store_true", help="with --tables: into docs/")
    args = parser.parse_args()
    if args.tables:
        import gpu_tables

        gpu_tables.main(args.tables, write=args.write)
    elif args.section:
        sys.exit(run_section(args.section, args.out.resolve(), args.tiny))
    elif args.out:
        only = args.only.split(",") if args.only else None
        unknown = sorted(set(only or ()) - set(SECTIONS))
        if unknown:
            parser.error(
                f"--only {','.join(unknown)}: not a section; sections: {', '.join(SECTIONS)}"
            )
        run_suite(args.out.resolve(), args.tiny, not args.no_install, only, args.budget)
    else:
        parser.error("give --out DIR (run the suite) or --tables DIR")


if __name__ == "__main__":
    main()
