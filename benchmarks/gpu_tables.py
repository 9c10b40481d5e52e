"""The docs tables of a GPU suite's folder (``gpu_suite.py --tables DIR [--write]``), read
back on any machine: every row of ``DIR/*.jsonl``, failures included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import write_block


def read_rows(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``<section>.jsonl`` -> its rows; a line cut short by a killed section is skipped."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.setdefault(path.stem, []).append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _cell(value: Any, fmt: str = "", unit: str = "") -> str:
    return "-" if value is None else f"{format(value, fmt)}{unit}"


def machine_line(facts: dict[str, Any]) -> str:
    gpu = facts.get("nvidia_smi") or facts.get("gpu") or "no GPU"
    shm = facts.get("dev_shm_gib")
    return (
        f"{gpu}; torch {facts.get('torch', '?')}, CUDA {facts.get('cuda')}, "
        f"cuDNN {facts.get('cudnn')}; {facts.get('cpus')} CPUs, `ulimit -n` "
        f"{facts.get('ulimit_n')}, /dev/shm {_cell(shm, '.1f', ' GiB')}; Python "
        f"{facts.get('python')}; ressl imported via {facts.get('ressl_import')}."
    )


def correctness(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| check | result |", "|---|---|"]
    for r in rows.get("nvjpeg", []):
        if "error" not in r:
            lines.append(
                f"| nvjpeg: decode_jpeg on {r['device']} vs the CPU, {r['shape']} | decoded on "
                f"{r['decoded_on']}; max difference {r['max_diff']}, mean {r['mean_diff']:.3f}; "
                f"a batch of 8 equal: {r['batch_of_8_equal']} |"
            )
    tests = [r for r in rows.get("cuda_tests", []) if r.get("row") == "test"]
    for r in tests:
        if r["outcome"] == "failed":
            lines.append(f"| {r['test']} ({r['when']}) | failed: {r['message']} |")
    for r in rows.get("cuda_tests", []):
        if "error" not in r and r.get("row") != "test":
            failed = ", ".join(r.get("failed", [])) or "none"
            lines.append(
                f"| `pytest -m cuda` | {r.get('tests', '?')} tests, {r.get('failures', '?')} "
                f"failed, {r.get('errors', '?')} errors, {r.get('skipped', '?')} skipped "
                f"(exit code {r['exit_code']}); failed: {failed} |"
            )
    return lines


def steps(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| step | mode | cudnn.benchmark | images/s | views' share | peak memory (GiB) | "
        "GFLOP/image | compile | CUDA-graph skips | dynamo graphs | CUDA graphs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.get("eager", []) + rows.get("compiled", []):
        if "error" in r:
            continue
        memory = None if r.get("memory") is None else r["memory"] / 2**30
        flops = None if r.get("flops_per_image") is None else r["flops_per_image"] / 1e9
        lines.append(
            f"| {r['label']} | {r['mode']} | {r.get('cudnn_benchmark')} | "
            f"{r['images_per_second']:,.0f} | {r['views_share']:.0%} | {_cell(memory, '.2f')} | "
            f"{_cell(flops, '.3f')} | {r['compile_seconds']:.0f} s | "
            f"{_cell(r.get('cudagraph_skips'))} | {_cell(r.get('dynamo_graphs'))} | "
            f"{_cell(r.get('cuda_graphs'))} |"
        )
    reasons = {m for r in rows.get("compiled", []) for m in r.get("skip_reasons", [])}
    return lines + [f"\nCUDA graphs skipped: {m}" for m in sorted(reasons)]


def trained(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| `ressl train` | images/s | the step's | train / step |", "|---|---:|---:|---:|"]
    for r in rows.get("train", []):
        if "error" not in r:
            lines.append(
                f"| resnet18 {r['size']} px, batch {r['batch']}, compile {r['compile']} | "
                f"{r['images_per_second']:,.0f} | {_cell(r['step_images_per_second'], ',.0f')} | "
                f"{_cell(r['of_step'], '.2f')} |"
            )
    return lines


def jpegs(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| JPEG crops, decoded | files | crop, batch | workers | images/s |"]
    lines.append("|---|---|---|---:|---:|")
    for r in rows.get("jpeg", []):
        if "error" not in r:
            where = "in the workers (PIL)" if r["decode"] == "workers" else f"on {r['device']}"
            lines.append(
                f"| {where} | {r['files']} photo-like, {'x'.join(map(str, r['file_sides']))} | "
                f"{r['size']} px, {r['batch']} | {r['workers']} | {r['images_per_second']:,.0f} |"
            )
    return lines


def failures(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    found = [(s, r) for s, rs in rows.items() for r in rs if "error" in r]
    lines = ["| section | row | error |", "|---|---|---|"]
    for section, r in found:
        error = " ".join(str(r["error"]).split())[:200].replace("|", "/")
        lines.append(f"| {section} | {r.get('row')} | {error} |")
    return lines if found else ["No row failed."]


def timing(rows: dict[str, list[dict[str, Any]]]) -> str:
    parts = [
        f"{r['row']} {r.get('status', '')} {r.get('seconds', '-')} s"
        for r in rows.get("suite", [])
        if r.get("row") != "setup"
    ]
    return "Sections: " + "; ".join(parts) + "."


def tables(folder: Path) -> str:
    rows = read_rows(folder)
    facts_path = folder / "machine.json"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    command = "python3 benchmarks/gpu_suite.py" + (" --tiny" if facts.get("tiny") else "")
    blocks = [
        machine_line(facts),
        "\n".join(correctness(rows)),
        "\n".join(steps(rows)),
        "\n".join(trained(rows)),
        "\n".join(jpegs(rows)),
        "\n".join(failures(rows)),
        f"{timing(rows)} `{command} --out DIR`, then `python benchmarks/gpu_suite.py "
        "--tables DIR --write`.",
    ]
    return "\n\n".join(blocks)


def main(folder: Path, write: bool = False) -> None:
    text = tables(folder)
    print(text)
    if write:
        print(write_block("gpu_suite", text, "The GPU suite (benchmarks/gpu_suite.py)"))
