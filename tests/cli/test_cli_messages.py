"""What a first run of ``ressl`` says: start-up lines, fitted defaults, where a run is, help
texts, fast path errors, and messages that name flags (issue 21, items 10-12)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli, tiny_args
from safetensors import safe_open


def test_train_says_what_it_loaded_and_decided_and_q_keeps_only_warnings(
    capsys, tmp_path, image_folder
):
    code, _, err = run_cli(capsys, *tiny_args(image_folder, tmp_path / "a", epochs=1))
    assert code == 0, err
    start = next(line for line in err.splitlines() if line.startswith("training small on"))
    assert "36 images of 16 px, 3 channels; batch 8" in start and " on cpu in " in start
    assert re.search(r"in (fp32|bf16 autocast)", start)
    assert "backbone: ressl small" in err
    code, _, err = run_cli(capsys, "-q", *tiny_args(image_folder, tmp_path / "b", epochs=1))
    assert code == 0, err
    assert "training small" not in err and "backbone:" not in err and "epoch 1/1" in err


def test_defaults_are_fitted_to_a_small_folder_said_and_recorded(capsys, tmp_path, image_folder):
    args = tiny_args(image_folder, tmp_path / "run", epochs=2)
    for name in ("--batch-size", "--queue-size", "--warmup-epochs"):  # the defaults, then
        i = args.index(name)
        del args[i : i + 2]
    args += ["--queue-size", "4096"]  # given: kept, with the warning
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "fitted to the data: --batch-size 36 (default 256)" in err
    assert "fitted to the data: --warmup-epochs 0 (default 5)" in err  # the folder recipe's
    assert "--queue-size 4096 is larger than the training set (36 images)" in err
    with safe_open(str(tmp_path / "run" / "last.safetensors"), "pt") as f:
        settings = json.loads(f.metadata()["settings"])
    assert (settings["batch_size"], settings["queue_size"], settings["warmup_epochs"]) == (
        36,
        4096,
        0,
    )


def test_info_and_eval_agree_on_where_an_interrupted_run_is(capsys):
    fixture = (
        Path(__file__).parents[1] / "fixtures" / "v2-run"
    )  # stopped 1 of 3 batches into epoch 2
    code, out, err = run_cli(capsys, "info", fixture)
    assert code == 0, err
    assert "progress       epoch 2 of 2, 33% done (1.33 epochs), step 4" in out
    metrics = next(line for line in out.splitlines() if line.startswith("last metrics"))
    assert "loss=2.989," in metrics  # 4 significant digits, not 2.9886...


def test_version_and_help_texts(capsys):
    from ressl import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"ressl {__version__}"
    for args in (["--help"], ["train", "--help"], ["eval", "knn", "--help"]):
        code, out, _ = run_cli(capsys, *args)
        assert code == 0 and "<bool>" not in out, args


def test_train_help_at_80_columns_breaks_no_word(monkeypatch):
    """Every word of ``--help`` at 80 columns is a word of it at 200 (no ``defau`` / ``lt``)."""

    def words(columns: int, *args: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-m", "ressl.cli", *args, "--help"],
            capture_output=True,
            text=True,
            env={"COLUMNS": str(columns), "TERM": "dumb"},
        )
        return set(re.sub(r"[│╭╮╰╯─]", " ", done.stdout).split())

    for args in (["train"], ["eval", "linear"], ["plot"]):
        broken = words(80, *args) - words(200, *args)
        assert not broken, (args, sorted(broken))


def test_a_missing_builtin_dataset_names_the_flags(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "train",
        "--dataset",
        "cifar10",
        "--no-download",
        "--data-root",
        tmp_path,
        "--out",
        tmp_path / "run",
    )
    assert code != 0 and "Traceback" not in err
    assert "--data-root" in err and "--download" in err
    assert "root=DIR" not in err and "download=True" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["info", "/no/such"],
        ["eval", "knn", "/no/such"],
        ["eval", "linear", "/no/such"],
        ["export", "/no/such", "-o", "x.onnx"],
        ["plot", "/no/such"],
        ["train", "--resume", "/no/such"],
        ["train", "--dataset", "folder:/no/such"],
        ["train", "--batch-size", "1"],
    ],
)
def test_path_and_setting_errors_come_before_torch_is_imported(args):
    script = (
        "import sys\nfrom ressl.cli.app import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
    assert done.stderr.strip().startswith("ressl: error:") and "Traceback" not in done.stderr


def test_the_dataset_aliases_are_documented():
    from ressl.data.registry import DATASETS

    options = (Path(__file__).resolve().parents[2] / "docs" / "options.md").read_text()
    for entry in DATASETS.values():
        for alias in entry.aliases:
            assert f"`{alias}`" in options, alias


@pytest.mark.slow
def test_eval_of_an_onnx_model_says_its_extraction_once_and_records_only_when_asked(
    capsys, tmp_path, image_folder, monkeypatch
):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny_args(image_folder, run, epochs=1))
    assert code == 0, err
    model = tmp_path / "models" / "m.onnx"
    code, _, err = run_cli(capsys, "export", run, "-o", model)
    assert code == 0, err
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    knn = ["eval", "knn", model, "--dataset", f"folder:{image_folder}", "--k", "5"]
    code, out, err = run_cli(capsys, *knn)
    assert code == 0, err
    assert [line for line in err.splitlines() if "extract" in line] == [
        f"extracting ONNX output 'embedding' (backbone features) of 36 + 12 folder:{image_folder} "
        "images on cpu"
    ]
    assert list(work.iterdir()) == [] and not (model.parent / "eval.jsonl").exists()
    code, out, err = run_cli(capsys, *knn, "--record")
    assert code == 0 and (model.parent / "eval.jsonl").is_file(), err
    code, out, err = run_cli(capsys, "eval", "knn", run, "--k", "5")  # a checkpoint: recorded
    assert code == 0 and json.loads((run / "eval.jsonl").read_text())["epoch"] == 1.0, err
    code, out, err = run_cli(capsys, "plot", run, "--tsne-points", "8", "--iterations", "20")
    assert code == 0, err
    assert "t-SNE of 8 of them: 20 gradient steps" in err
