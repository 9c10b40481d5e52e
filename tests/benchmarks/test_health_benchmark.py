"""benchmarks/health.py: its Spearman correlation on inputs with known answers, and the
whole benchmark at tiny sizes, end to end into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "health.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("health_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_average_ranks_share_the_mean_rank_of_a_tie(bench):
    assert bench.average_ranks([10.0, 30.0, 20.0]) == [1.0, 3.0, 2.0]
    assert bench.average_ranks([5.0, 1.0, 5.0, 5.0]) == [3.0, 1.0, 3.0, 3.0]
    assert bench.average_ranks([]) == []


def test_spearman_of_a_monotone_relation_is_one_and_of_a_reversed_one_minus_one(bench):
    x = [0.1, 0.4, 0.2, 3.0, 1.5]
    assert bench.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)  # not linear: ranks only
    assert bench.spearman(x, [-math.exp(v) for v in x]) == pytest.approx(-1.0)


def test_spearman_with_ties_matches_the_pearson_r_of_average_ranks(bench):
    # ranks x: 1, 2.5, 2.5, 4; ranks y: 1, 2, 3, 4 -> r = 4.5 / sqrt(4.5 * 5) (by hand)
    assert bench.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) = 0.8
    assert bench.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_spearman_is_nan_when_undefined_and_refuses_unequal_lengths(bench):
    assert math.isnan(bench.spearman([1.0], [2.0]))
    assert math.isnan(bench.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # one side constant
    with pytest.raises(ValueError, match="same length"):
        bench.spearman([1.0, 2.0], [1.0])


def test_training_measures_are_read_from_the_last_epoch_row_when_present(bench, tmp_path):
    assert bench.training_measures(tmp_path) == {}  # no metrics.jsonl
    rows = [{"epoch": 1, "loss": 5.0, "std_ratio": 0.2}, {"epoch": 2, "std_ratio": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert bench.training_measures(tmp_path) == {"std_ratio": 0.5}


def test_the_correlations_skip_rows_without_a_value(bench):
    rows = [
        {"id": "a", "knn_top1": 10.0, "linear_top1": 20.0, "rankme": 1.0, "training": {}},
        {"id": "b", "knn_top1": 50.0, "linear_top1": 60.0, "rankme": 9.0, "training": {}},
        {"id": "c", "knn_top1": 70.0, "linear_top1": 50.0, "rankme": 20.0, "training": {}},
        {"id": "stopped", "status": "DivergedError", "training": {}},
    ]
    got = {c["measure"]: c for c in bench.correlations(rows)}
    assert got["RankMe"]["n"] == 3
    assert got["RankMe"]["rho_knn"] == pytest.approx(1.0)
    assert got["RankMe"]["rho_linear"] == pytest.approx(0.5)
    assert got["uniformity"]["n"] == 0 and math.isnan(got["uniformity"]["rho_knn"])


@pytest.mark.slow
def test_the_tiny_benchmark_runs_end_to_end_and_prints_its_tables(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--no-doc"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | setting | epochs | status | kNN top-1 | linear top-1 |")
    assert [line.split(" | ")[0] for line in table[1:4]] == [
        "| random-init",
        "| default-1ep",
        "| tau-1.0",
    ]
    for line in table[1:4]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        knn, linear, rank = float(cells[4]), float(cells[5]), float(cells[6])
        assert 0 <= knn <= 100 and 0 <= linear <= 100 and rank >= 1
    assert any(line.startswith("| RankMe |") for line in table)
    result = json.loads((tmp_path / "health.json").read_text())
    assert [r["id"] for r in result["rows"]] == ["random-init", "default-1ep", "tau-1.0"]
    assert {c["measure"] for c in result["correlations"]} >= {"RankMe", "std ratio"}
    assert (tmp_path / "health-vs-knn.png").stat().st_size > 0
    assert (tmp_path / "default-1ep" / "last.safetensors").exists()
