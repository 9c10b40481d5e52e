"""The GPU benchmark runs on a CPU with tiny sizes and prints its whole table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_a_cpu_with_tiny_sizes():
    out = subprocess.run(
        [sys.executable, "gpu.py", "--tiny", "--no-compile"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| small")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| small 16 px, batch 8, one crop",
        "| small 16 px, batch 8, multi-crop 16,12",
        "| small 16 px, batch 8, symmetric",
    ]
    for row in rows:
        _, mode, ips, views, _, flops = row.split(" | ")[:6]
        assert mode == "eager" and float(ips.replace(",", "")) > 0 and float(flops) > 0
        assert float(views.rstrip("%")) >= 0  # the views' share of the step (timing: noisy)
    assert "`ressl train` on the first row's settings" in out.stdout
    jpeg = [line for line in out.stdout.splitlines() if line.startswith(("| decoded", "| bytes"))]
    assert len(jpeg) == 2  # the JPEG folder decoded in the workers, and on the device
    for row in jpeg:
        assert all(float(v.strip(" |").replace(",", "")) > 0 for v in row.split(" | ")[1:])


@pytest.mark.slow
def test_the_health_cost_benchmark_prints_a_row_per_backbone():
    args = ["--steps", "2", "--rounds", "1", "--batch", "8", "--queue", "32", "--window", "2"]
    out = subprocess.run(
        [sys.executable, "health_cost.py", *args, "--backbones", "small"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| small")]
    assert len(rows) == 1
    _, off, on, share = rows[0].strip(" |").split(" | ")
    assert float(off) > 0 and float(on) > 0 and share.endswith("%")
