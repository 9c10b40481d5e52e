"""The GPU suite (benchmarks/gpu_suite.py) runs on a CPU with tiny sizes: every section's
rows reach its file, a failed, crashed or hung section is a row saying so and the suite
goes on, a tree without an installed ressl imports through the finder, and the tables
are read back from the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = ["machine", "nvjpeg", "cuda_tests", "eager", "compiled", "train", "jpeg"]


def suite(*args: str, env: dict[str, str] | None = None, python: list[str] | None = None):
    return subprocess.run(
        [*(python or [sys.executable]), str(SUITE), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def rows(out: Path, section: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{section}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole tiny suite once (about 3 minutes on 2 cores: the compiles), with a fault
    injected into the nvjpeg section."""
    out = tmp_path_factory.mktemp("suite")
    done = suite("--out", str(out), "--tiny", env={"RESSL_SUITE_FAULT": "nvjpeg=raise"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_tiny_suite_writes_every_sections_rows(tiny_run: Path):
    out = tiny_run
    facts = json.loads((out / "machine.json").read_text())
    assert facts["ressl_import"] == "installed" and facts["device"] == "cpu"
    assert {"cpus", "ulimit_n", "dev_shm_gib", "torch", "cuda", "nvidia_smi"} <= set(facts)
    status = {r["row"]: r["status"] for r in rows(out, "suite") if r["row"] != "setup"}
    assert status == dict.fromkeys(SECTIONS, "ok") | {"nvjpeg": "failed"}
    *tests, summary = rows(out, "cuda_tests")
    assert summary["tests"] == summary["skipped"] == len(tests) >= 1  # no CUDA here
    assert {(r["outcome"], r["message"]) for r in tests} == {("skipped", "Skipped: needs CUDA")}
    eager = rows(out, "eager")
    assert [(r["backbone"], r["cudnn_benchmark"]) for r in eager] == [
        ("small", True),
        ("small", False),
        ("resnet18", True),
        ("resnet18", False),
    ]
    assert all(r["images_per_second"] > 0 and r["flops_per_image"] > 0 for r in eager)
    compiled = {r["mode"]: r for r in rows(out, "compiled")}
    assert set(compiled) == {"compiled", "cuda graphs"}
    assert all(r["compile_seconds"] > 0 and r["dynamo_graphs"] >= 1 for r in compiled.values())
    assert compiled["compiled"]["cudagraph_skips"] == 0
    assert compiled["cuda graphs"]["cudagraph_skips"] >= 1  # no CUDA graphs on a CPU: counted
    trained = rows(out, "train")
    assert [r["compile"] for r in trained] == ["off", "on"]
    assert all(r["images_per_second"] > 0 and r["step_images_per_second"] > 0 for r in trained)
    assert [r["decode"] for r in rows(out, "jpeg")] == ["workers", "device"]


@pytest.mark.slow
def test_a_failed_section_is_a_row_and_the_tables_show_it(tiny_run: Path):
    [failed] = rows(tiny_run, "nvjpeg")
    assert failed["row"] == "section" and "fault injected" in failed["error"]
    assert "Traceback" in (tiny_run / "nvjpeg.log").read_text()
    done = suite("--tables", str(tiny_run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| nvjpeg | section | RuntimeError: fault injected" in done.stdout
    assert "| `pytest -m cuda` | " in done.stdout
    assert "| resnet18 16 px, batch 4, one crop | cuda graphs | True |" in done.stdout
    assert "| in the workers (PIL) | 24 photo-like, 80x60 |" in done.stdout


@pytest.mark.slow
def test_a_crashed_and_a_hung_section_are_rows_and_the_suite_goes_on(tmp_path: Path):
    faults = {"RESSL_SUITE_FAULT": "machine=die,nvjpeg=hang"}
    args = ["--out", str(tmp_path), "--tiny", "--only", "machine,nvjpeg", "--budget", "6"]
    done = suite(*args, env=faults)
    assert done.returncode == 0, done.stderr[-2000:]
    [died] = rows(tmp_path, "machine")
    assert died["error"].startswith("exit code 3")
    [hung] = rows(tmp_path, "nvjpeg")
    assert hung["error"].startswith("timed out after")
    status = {r["row"]: r["status"] for r in rows(tmp_path, "suite") if r["row"] != "setup"}
    assert status == {"machine": "failed", "nvjpeg": "timed out"}


@pytest.mark.slow
def test_a_python_without_ressl_imports_the_tree_through_the_finder(tmp_path: Path):
    # -S: no site-packages processing, so no installed (editable) ressl; the packages
    # come from PYTHONPATH, and the suite passes -S on to its sections
    paths = subprocess.run(
        [sys.executable, "-c", "import os, sys; print(os.pathsep.join(filter(None, sys.path)))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    env = {"PYTHONPATH": paths}
    args = ["--out", str(tmp_path), "--tiny", "--no-install", "--only", "nvjpeg"]
    done = suite(*args, env=env, python=[sys.executable, "-S"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "machine.json").read_text())["ressl_import"] == "finder"
    [probe] = rows(tmp_path, "nvjpeg")  # the section imports gpu.py, which imports ressl
    assert probe["decoded_on"] == "cpu" and probe["max_diff"] == 0 and probe["batch_of_8_equal"]


def test_the_finder_maps_the_package_dirs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import source_tree
    finally:
        sys.path.pop(0)
    folders = source_tree.package_dirs()
    assert folders == {
        "ressl": ROOT / "ressl",
        "ressl.cli": ROOT / "cli",
        "ressl.export": ROOT / "export",
    }
    spec = source_tree.TreeFinder(folders).find_spec("ressl.cli")
    assert spec is not None and spec.origin == str(ROOT / "cli" / "__init__.py")
    assert spec.submodule_search_locations == [str(ROOT / "cli")]
    assert source_tree.TreeFinder(folders).find_spec("ressl.views") is None  # found as usual


@pytest.mark.slow
def test_one_marker_selects_the_cuda_tests():
    collect = ["-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider"]
    files = ["tests/data/test_jpegs.py", "tests/views/test_views.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *collect, *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    selected = [line for line in done.stdout.splitlines() if "::" in line]
    assert "tests/data/test_jpegs.py::test_nvjpeg_decodes_what_the_cpu_decodes" in selected
    assert "tests/views/test_views.py::test_determinism[weak_view-1-cuda]" in selected
    assert not any(line.endswith("-cpu]") for line in selected)


def test_tables_read_back_rows_and_errors(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_tables
    finally:
        sys.path.pop(0)
    (tmp_path / "machine.json").write_text(json.dumps({"gpu": "H100", "ulimit_n": 1024}))
    jpeg = {"section": "jpeg", "row": "crops, decode device", "decode": "device"}
    jpeg |= {"device": "cuda", "workers": 16, "files": 1024, "file_sides": [500, 375]}
    jpeg |= {"size": 224, "batch": 128, "images_per_second": 4321.0}
    (tmp_path / "jpeg.jsonl").write_text(json.dumps(jpeg) + '\n{"section": "jpeg", "ro')
    train = {"section": "train", "row": "section", "error": "timed out after 85 s"}
    (tmp_path / "train.jsonl").write_text(json.dumps(train) + "\n")
    text = gpu_tables.tables(tmp_path)
    assert "H100;" in text and "`ulimit -n` 1024" in text
    assert "| on cuda | 1024 photo-like, 500x375 | 224 px, 128 | 16 | 4,321 |" in text
    assert "| train | section | timed out after 85 s |" in text  # the cut line is skipped
