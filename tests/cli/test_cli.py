import json
import subprocess
import sys

from cli_helpers import assert_one_line_error, run_cli, tiny_args


def test_train_then_resume_then_info(capsys, tmp_path, image_folder):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *tiny_args(image_folder, run, epochs=1))
    assert code == 0, err
    assert out.strip() == str(run / "last.safetensors")
    assert "epoch 1/1" in err and "knn top-1" in err
    code, out, err = run_cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 0, err
    assert "epoch 2/2" in err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    code, out, err = run_cli(capsys, "info", run)
    assert code == 0 and "2 of 2 epochs done" in out and '"small"' in out
    code, out, _ = run_cli(capsys, "info", run / "last.safetensors", "--json")
    assert code == 0 and json.loads(out)["settings"]["queue_size"] == 32


def test_user_errors_are_one_line(capsys, tmp_path, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        (["train", "--dataset", f"folder:{tmp_path / 'missing'}"], "does not exist"),
        (["train", "--dataset", f"folder:{empty}"], "no image file"),
        (["train", "--resume", tmp_path / "notes.txt"], "not a readable safetensors file"),
        (["train", "--resume", tmp_path / "nowhere"], "no such file or folder"),
        (["train", "--epochs", "abc"], "--epochs"),
        (["train", "--epochs", "0"], "--epochs must be an integer >= 1"),
        (
            ["train", "--teacher-temperature", "-1"],
            "--teacher-temperature must be a number >= 0.001",
        ),
        (["train", "--crop-scale", "big"], "--crop-scale must be 2 comma-separated numbers"),
        (["train", "--jitter", "0.4,0.4"], "--jitter must be 4 comma-separated numbers"),
        (["train", "--jitter-p", "1.5"], "--jitter-p must be a probability in [0, 1]"),
        (["train", "--backbone", "vit"], "--backbone"),
        (["train", "--dataset", "mnist"], "--dataset must be one of"),
        (["train", "--device", "tpu"], "--device must be"),
        (["info", tmp_path / "notes.txt"], "not a readable safetensors file"),
        (["info", tmp_path / "absent.safetensors"], "no such file or folder"),
        (["frobnicate"], "frobnicate"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, needle)
    args = tiny_args(image_folder, tmp_path / "big")
    args[args.index("--batch-size") + 1] = "64"
    args[args.index("--queue-size") + 1] = "64"
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "--batch-size 64 is larger than the training set")


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ressl", "info", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ressl: error: {tmp_path / 'none'}: no such file or folder"
    help_proc = subprocess.run(
        [sys.executable, "-m", "ressl", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_proc.returncode == 0 and "--queue-size" in help_proc.stdout


def test_multicrop_and_symmetric_options(capsys, tmp_path, image_folder):
    args = tiny_args(image_folder, tmp_path / "run")
    code, _, err = run_cli(
        capsys, *args, "--epochs", "1", "--crops", "16,12", "--crop-scales", "0.2:1,0.1:0.5"
    )
    assert code == 0, err
    code, out, _ = run_cli(capsys, "info", tmp_path / "run", "--json")
    settings = json.loads(out)["settings"]
    assert settings["crops"] == [16, 12] and settings["crop_scales"] == [[0.2, 1.0], [0.1, 0.5]]
    code, _, err = run_cli(
        capsys, *tiny_args(image_folder, tmp_path / "sym"), "--symmetric", "--queue-size", "12"
    )
    assert_one_line_error(code, err, "--queue-size must be >= 2 x --batch-size")
    code, _, err = run_cli(capsys, *tiny_args(image_folder, tmp_path / "x"), "--crops", "16,big")
    assert_one_line_error(code, err, "--crops must be comma-separated crop sides")
    code, _, err = run_cli(
        capsys, *tiny_args(image_folder, tmp_path / "y"), "--crops", "16,8", "--crop-scales", "0.2"
    )
    assert_one_line_error(code, err, "--crop-scales must be comma-separated lo:hi ranges")


def _commands():
    """Every ``ressl`` command, by its full name (``train``, ``eval knn``, ...)."""
    import typer
    from ressl.cli.app import app

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    return dict(walk(typer.main.get_command(app), ""))


def test_every_setting_has_a_flag_with_the_config_default():
    from ressl.config.settings import TrainConfig, settings
    from ressl.config.settings import coerce_setting as coerce
    from ressl.errors import flag

    options = {p.name: p for p in _commands()["train"].params}
    assert set(options) == {name for name, _, _ in settings()} | {"resume"}
    for name, default, meta in settings():
        option = options[name]
        assert flag(name) in option.opts, name
        cli = None if option.default is None else coerce(name, option.default)
        assert cli == default, name  # the same default, typed as text where it is a tuple
        if meta.rule.expect == "True or False":
            assert option.secondary_opts == [f"--no-{flag(name)[2:]}"], name
    assert TrainConfig().to_dict() == {n: d for n, d, _ in settings()} | {
        n: getattr(TrainConfig(), n) for n, _, m in settings() if m.recipe
    }


def test_readme_and_options_doc_are_generated_from_the_config():
    from pathlib import Path

    from ressl.cli.train_cmd import README_BEGIN, README_END, options_summary, options_table

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == options_summary(), "README option list is stale: python -m ressl.cli.train_cmd"
    stale = "docs/options.md is stale: python -m ressl.cli.train_cmd"
    assert (root / "docs" / "options.md").read_text() == options_table(), stale


def test_every_flag_the_readme_mentions_exists():
    import re
    from pathlib import Path

    torchrun = {"--standalone", "--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint"}
    other = {
        "--rdzv_id",
        "--help",
        "--check",
        "--index-url",
        "--logdir",
    }  # torchrun, all, ruff, pip, tensorboard
    import typer
    from ressl.cli.app import app

    commands = [typer.main.get_command(app), *_commands().values()]  # ressl --version, -q too
    known = {o for cmd in commands for p in cmd.params for o in p.opts + p.secondary_opts}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme))
    assert mentioned - known - torchrun - other == set()


def test_errors_name_the_flag_the_user_typed(capsys):
    cases = [
        (["train", "--batch-size", "1"], "--batch-size must be an integer >= 2, got 1"),
        (["train", "--sgd-momentum", "1.5"], "--sgd-momentum must be a number >= 0 and < 1"),
        (
            ["train", "--backbone", "vit"],
            "--backbone must be one of small, resnet18, resnet50, torchvision:NAME",
        ),
        (["train", "--queue-size", "64"], "--queue-size must be >= --batch-size (256), got 64"),
        (["train", "--crop-scales", "0.2:1"], "--crop-scales must be one (lo, hi) range per crop"),
        (["train", "--lr", "abc"], "'--lr'"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, needle)


def test_notes_and_errors_with_braces_in_paths(capsys, tmp_path, image_folder):
    run = tmp_path / "run{x}"
    code, _, err = run_cli(capsys, *tiny_args(image_folder, run, epochs=1))
    assert code == 0, err
    assert "--warmup-epochs 1 >= --epochs 1" in err  # the library's note, in flags
    code, _, err = run_cli(capsys, *tiny_args(image_folder, run, epochs=1))
    assert_one_line_error(code, err, f"{run} already holds a run")


def test_multi_line_errors_reach_the_user_whole(capsys, tmp_path):
    # without the files (and no download): where it looked, and how to provide them
    code, _, err = run_cli(
        capsys,
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        tmp_path / "none",
        "--no-download",
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
    )
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[0].startswith("ressl: error: cifar10 not found: looked for data_batch_1")
    assert any(str(tmp_path / "none") in line for line in lines[1:]), err
    assert all(line.startswith("  ") for line in lines[1:]), err
    assert len(lines) >= 3
