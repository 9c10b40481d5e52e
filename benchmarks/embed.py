"""Embedding throughput: onnxruntime (an exported file) vs PyTorch eager, same encoder, same inputs, one run.

Both compute the served function, float32 images in [0, 1] -> normalisation ->
backbone -> L2-normalised features, for ResNet-18 (small-image stem) and the
small CNN (width 32) at 32 px RGB, randomly initialised (speed does not depend
on the weights). PyTorch runs fp32 eager under ``inference_mode``;
onnxruntime runs the file ``export_onnx`` wrote, through ``Embedder.run``, on
the CPU, with its default options and with the variants tried while tuning, and
the int8 file ``export_onnx(..., int8=True)`` would write (``quantize_graph``,
calibrated on 256 ``sample_images``; speed does not depend on the calibration),
whose rows also give the ratio to the fp32 file at the same thread setting.

Timing: each configuration runs one untimed warm-up batch, then the
configurations take turns for ``--rounds`` rounds of ``--images`` images (so
a busy neighbour on a shared CPU hits them alike), with a pause before each
block so one configuration's spin-waiting threads do not slow the next; the
table gives the median round. Prints a markdown table and, with ``--write``, puts it in docs/benchmarks.md.

    python benchmarks/embed.py --write
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from ressl.export import Embedder, export_onnx, sample_images
from ressl.export.exporter import ServingEncoder
from ressl.export.quantization import quantize_graph

from ressl import ReSSL

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


Runner = Callable[[np.ndarray], object]


def _ort_runner(path: Path, level: str | None, threads: int | None) -> Runner:
    """A ``Embedder`` (the default configuration) or a session with one option changed."""
    embedder = Embedder(path, device="cpu", batch_size=1 << 20, threads=threads)
    if level is not None:
        so = ort.SessionOptions()
        so.graph_optimization_level = LEVELS[level]
        if threads is not None:
            so.intra_op_num_threads = threads
        embedder.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return embedder.run


def _export_bare(backbone: torch.nn.Module, path: Path) -> Path:
    """The backbone alone, without the in-graph normalisation and L2 norm: the most that folding
    the normalisation into the first convolution could save."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone,
            (sample_images(2, 3, 32),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
        )
    return path


def _int8_file(path: Path) -> Path:
    """The int8 file of an fp32 export, as ``ressl export --int8`` quantises it."""
    int8 = path.with_name(path.stem + "-int8.onnx")
    int8.write_bytes(quantize_graph(path.read_bytes(), sample_images(256, 3, 32, seed=1).numpy()))
    return int8


#: int8 rows -> the fp32 row they are compared with (same thread setting).
INT8_BASELINE = {
    "onnxruntime int8 (Embedder defaults)": "onnxruntime (Embedder defaults)",
    "onnxruntime int8, intra_op threads 1": "onnxruntime, intra_op threads 1",
}


def _bare_runner(path: Path) -> Runner:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"images": batch})


def _torch_runner(model: torch.nn.Module) -> Runner:
    def run(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    return run


def bench(
    runners: dict[str, tuple[Runner, int]], batch: np.ndarray, batches: int, rounds: int
) -> dict[str, float]:
    """Median embeddings/s per runner over ``rounds`` interleaved rounds of ``batches`` batches.

    ``runners`` maps a name to ``(run, torch_threads)``; PyTorch's thread count is
    set once before each timed block (changing it per call would cost time).
    """
    default_threads = torch.get_num_threads()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run, threads in runners.values():
        torch.set_num_threads(threads)
        run(batch)  # warm-up: allocations, lazy initialisation
    for _ in range(rounds):
        for name, (run, threads) in runners.items():
            torch.set_num_threads(threads)
            time.sleep(
                0.5
            )  # the previous configuration's worker threads stop spin-waiting and park
            t = time.perf_counter()
            for _ in range(batches):
                run(batch)
            times[name].append(time.perf_counter() - t)
    torch.set_num_threads(default_threads)
    return {name: len(batch) * batches / statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--batch-sizes",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[64, 128],
        help="comma-separated batch sizes, e.g. 64,128",
    )
    p.add_argument(
        "--images", type=int, default=256, help="images per timed round (per configuration)"
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; the median is reported"
    )
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()

    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, int, str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone, label in (
            ("resnet18", "ResNet-18 (small-image stem)"),
            ("small", "small CNN (width 32)"),
        ):
            torch.manual_seed(0)
            encoder = ReSSL(backbone, in_channels=3, image_size=32, queue_size=16).student.eval()
            path = Path(tmp) / f"{backbone}.onnx"
            export_onnx(
                encoder, path, image_size=32, channels=3, mean=MEAN, std=STD, backbone=backbone
            )
            served = ServingEncoder(encoder.backbone, MEAN, STD).eval()
            int8 = _int8_file(path)
            runners = {
                f"PyTorch eager fp32, {threads} threads": (_torch_runner(served), threads),
                "PyTorch eager fp32, 1 thread": (_torch_runner(served), 1),
                "onnxruntime (Embedder defaults)": (_ort_runner(path, None, None), threads),
                f"onnxruntime, intra_op threads {threads}": (
                    _ort_runner(path, None, threads),
                    threads,
                ),
                "onnxruntime, intra_op threads 1": (_ort_runner(path, None, 1), threads),
                "onnxruntime, graph optimisation extended": (
                    _ort_runner(path, "extended", None),
                    threads,
                ),
                "onnxruntime, graph optimisation basic": (
                    _ort_runner(path, "basic", None),
                    threads,
                ),
                "onnxruntime, graph optimisation off": (_ort_runner(path, "off", None), threads),
                "onnxruntime, backbone alone (no normalisation, no L2 norm)": (
                    _bare_runner(
                        _export_bare(encoder.backbone, Path(tmp) / f"{backbone}-bare.onnx")
                    ),
                    threads,
                ),
                "onnxruntime int8 (Embedder defaults)": (
                    _ort_runner(int8, None, None),
                    threads,
                ),
                "onnxruntime int8, intra_op threads 1": (
                    _ort_runner(int8, None, 1),
                    threads,
                ),
            }
            for batch_size in args.batch_sizes:
                batch = sample_images(batch_size, 3, 32).numpy()
                result = bench(runners, batch, max(1, args.images // batch_size), args.rounds)
                base = max(eps for name, eps in result.items() if name.startswith("PyTorch"))
                for name, eps in result.items():
                    fp32 = INT8_BASELINE.get(name)
                    vs_fp32 = f"{eps / result[fp32]:.2f}x" if fp32 else ""
                    rows.append((label, batch_size, name, eps, eps / base, vs_fp32))
                    print(
                        f"{label:30s} {batch_size:4d} {name:42s} {eps:10.1f} emb/s  "
                        f"{eps / base:.2f}x {vs_fp32}",
                        flush=True,
                    )

    sizes = ",".join(map(str, args.batch_sizes))
    cmd = f"python benchmarks/embed.py --batch-sizes {sizes} --images {args.images} --rounds {args.rounds}"
    lines = [
        f"Embedding throughput at 32 px RGB, median of {args.rounds} interleaved rounds of {args.images} images "
        f"per configuration; {cpu_model()}, {threads} threads; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (the CPU is shared with other jobs). Both compute normalisation -> "
        "backbone -> L2 norm on the same inputs; ratios are against the faster PyTorch eager fp32 row of the "
        "same encoder and batch size; int8 rows also against the onnxruntime fp32 file at the same "
        "thread setting.",
        "",
        "| encoder | batch | runtime | embeddings/s | vs best PyTorch eager | int8 vs fp32 |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {enc} | {b} | {name} | {eps:,.1f} | {ratio:.2f}x | {vs} |"
        for enc, b, name, eps, ratio, vs in rows
    ]
    lines += ["", f"Command: `{cmd}`"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("embed", table, "Embedding throughput: onnxruntime vs PyTorch (CPU)")


if __name__ == "__main__":
    main()
