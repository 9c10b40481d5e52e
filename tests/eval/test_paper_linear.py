"""The paper's linear evaluation: it learns a known answer, and `ressl eval linear --protocol paper`
records its final epoch."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli

from ressl import train
from ressl.data.sources import TensorImages
from ressl.eval.paper_linear import paper_linear_eval
from ressl.runs.checkpoint import read_metadata


def _brightness_classes(n: int, seed: int) -> TensorImages:
    """Two classes told apart by brightness, which no crop or flip changes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    level = torch.where(labels == 1, 190, 60).view(n, 1, 1, 1)
    noise = torch.randint(-40, 40, (n, 3, 16, 16), generator=g)
    return TensorImages((level + noise).clamp(0, 255).to(torch.uint8), labels)


def test_the_papers_linear_evaluation_learns_a_known_answer():
    train_set, test_set = _brightness_classes(64, 0), _brightness_classes(32, 1)

    def pooled(x: torch.Tensor) -> torch.Tensor:  # a frozen "backbone": the channel means
        return x.mean(dim=(2, 3))

    seen = []
    result = paper_linear_eval(
        pooled,
        train_set,
        test_set,
        2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        image_size=16,
        epochs=5,
        lr=0.3,
        batch_size=16,
        progress=seen.append,
    )
    assert (
        result["top1"] == 100.0 and len(result["top1_per_epoch"]) == 5 and seen == [1, 2, 3, 4, 5]
    )
    assert result["best_top1"] == max(result["top1_per_epoch"]) and 1 <= result["best_epoch"] <= 5
    again = paper_linear_eval(
        pooled,
        train_set,
        test_set,
        2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        image_size=16,
        epochs=5,
        lr=0.3,
        batch_size=16,
    )
    assert again["top1_per_epoch"] == result["top1_per_epoch"]  # seeded
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        paper_linear_eval(
            pooled,
            train_set,
            test_set,
            2,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            image_size=16,
            epochs=0,
        )


def test_eval_linear_with_the_papers_protocol_records_the_final_epoch(
    capsys, tmp_path, tiny_settings
):
    run = tmp_path / "run"
    train(**dict(tiny_settings, out=str(run), epochs=1))
    code, out, err = run_cli(
        capsys,
        "eval",
        "linear",
        run,
        "--protocol",
        "paper",
        "--epochs",
        "2",
        "--probe-batch-size",
        "8",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "(final epoch); best" in out and "selected on the test set" in out
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["protocol"] == "linear-paper" and row["lr"] == 0.3 and row["epochs"] == 2
    assert row["top1"] == row["top1_per_epoch"][-1] and "best_epoch" in row
    assert read_metadata(run / "last.safetensors")["epoch"] == "1"
