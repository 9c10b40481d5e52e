"""``ressl plot RUN_DIR``: PNG curves and t-SNE from a seconds-long run; bad input as one line."""

import builtins
import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import TINY, assert_one_line_error, run_cli

from ressl.training.loop import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_folder: Path) -> Path:
    run = tmp_path_factory.mktemp("plotrun") / "run"
    train(dataset=f"folder:{image_folder}", out=str(run), **dict(TINY, epochs=3))
    return run


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, (path, len(data))


def test_plot_writes_curves_and_tsne(capsys, tmp_path: Path, tiny_run: Path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    code, stdout, err = run_cli(
        capsys,
        "plot",
        tiny_run,
        "--out",
        out,
        "--tsne-points",
        "12",
        "--iterations",
        "100",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert stdout.split() == [str(out / "curves.png"), str(out / "tsne.png")]
    assert_png(out / "curves.png")
    assert_png(out / "tsne.png")
    assert "t-SNE of 12 of them: 100 gradient steps" in err


def test_plot_without_checkpoint_or_tsne_draws_only_curves(capsys, tmp_path: Path, tiny_run: Path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "metrics-only"
    run.mkdir()
    shutil.copy(tiny_run / "metrics.jsonl", run / "metrics.jsonl")
    code, stdout, err = run_cli(capsys, "plot", run)
    assert code == 0, err
    assert stdout.split() == [str(run / "curves.png")] and "no t-SNE" in err
    assert_png(run / "curves.png")
    # no kNN rows: two panels, still a figure
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if "knn" not in k}) + "\n" for r in rows)
    )
    code, stdout, err = run_cli(capsys, "plot", run, "--no-tsne")
    assert code == 0 and stdout.split() == [str(run / "curves.png")] and err == ""
    assert_png(run / "curves.png")


def test_plot_user_errors_are_one_line(capsys, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file.txt").write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"epoch": 1, "loss": 5.0}\nnot json\n')
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "metrics.jsonl").write_text("")
    cases = [
        (["plot", tmp_path / "absent"], "no such folder"),
        (["plot", tmp_path / "file.txt"], "is not a folder"),
        (["plot", empty], "has no metrics.jsonl"),
        (["plot", broken], "line 2 is not valid JSON"),
        (["plot", blank], "is empty"),
        (["plot", broken, "--tsne-points", "2"], "line 2 is not valid JSON"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, needle)


def test_plot_without_matplotlib_says_how_to_install(capsys, monkeypatch, tiny_run: Path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run_cli(capsys, "plot", tiny_run, "--no-tsne")
    assert_one_line_error(code, err, "ressl plot needs matplotlib: pip install 'ressl[plot]'")


def test_plot_draws_the_step_stream_and_the_recorded_evaluations(
    capsys, tmp_path: Path, image_folder: Path
):
    pytest.importorskip("matplotlib")
    from ressl.cli import plot_cmd

    run = tmp_path / "one-epoch"
    train(dataset=f"folder:{image_folder}", out=str(run), **dict(TINY, epochs=1))
    code, _, err = run_cli(capsys, "eval", "knn", run, "--k", "3", "--device", "cpu")
    assert code == 0, err
    drawn = {}
    real = plot_cmd.plot_curves

    def spy(plt, rows, title, path, knn_title="kNN monitor", steps=None, evaluations=None):
        drawn.update(rows=rows, steps=steps, evaluations=evaluations)
        return real(plt, rows, title, path, knn_title, steps, evaluations)

    plot_cmd.plot_curves = spy
    try:
        code, _, err = run_cli(capsys, "plot", run, "--no-tsne")
    finally:
        plot_cmd.plot_curves = real
    assert code == 0, err
    assert len(drawn["rows"]) == 1 and len(drawn["steps"]) == 4  # 36 images / batch 8: 4 steps
    assert [r["protocol"] for r in drawn["evaluations"]] == ["knn"] and drawn["evaluations"][0][
        "epoch"
    ] == 1
    assert_png(run / "curves.png")


def test_plot_of_an_unlabelled_run_draws_its_health_and_an_uncoloured_tsne(
    capsys, tmp_path: Path, image_folder: Path
):
    pytest.importorskip("matplotlib")
    from ressl.cli import plot_cmd

    flat = tmp_path / "images"
    flat.mkdir()
    for i, f in enumerate(sorted((image_folder / "train").rglob("*.png"))):
        shutil.copy(f, flat / f"{i}.png")
    run = tmp_path / "run"
    train(dataset=f"folder:{flat}", out=str(run), **dict(TINY, epochs=2))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("rankme" in r and "knn_top1" not in r for r in rows)  # the monitor, no labels
    panels = []
    real = plot_cmd._health_panel
    plot_cmd._health_panel = lambda ax, rows, steps: (
        panels.append(len(steps)) or real(ax, rows, steps)
    )
    try:
        code, out, err = run_cli(capsys, "plot", run, "--tsne-points", "20", "--iterations", "20")
    finally:
        plot_cmd._health_panel = real
    assert code == 0, err
    assert panels == [8] and "no t-SNE" not in err  # 36 images / batch 8: 4 steps an epoch
    assert_png(run / "curves.png")
    assert_png(run / "tsne.png")
