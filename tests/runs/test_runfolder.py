"""The run folder's files: never written (or read) through a link, never a named pipe that
blocks; a link among them is refused with one line and the file it points to is untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import TINY, run_cli

from ressl import train
from ressl.atomic import write_atomic
from ressl.errors import RunFileError
from ressl.runs.folder import (
    CHECKPOINT,
    EVAL_LOG,
    LOCK,
    METRICS,
    RUN_FILES,
    STEPS,
    TENSORBOARD,
    append_run_file,
    check_run_folder,
    open_run_file,
    read_metrics,
    read_run_file,
)
from ressl.runs.lock import hold_run_folder

PRECIOUS = b"the user's own file\n"
posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file of the user's outside any run folder."""
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(PRECIOUS)
    return victim


def _link(folder: Path, name: str, target: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(target)
    return folder / name


@pytest.mark.parametrize(
    "use",
    [
        lambda p: open_run_file(p, os.O_RDWR | os.O_CREAT),  # the lock's open
        lambda p: append_run_file(p, "row\n"),
        read_run_file,
        lambda p: read_metrics(p),
    ],
    ids=["lock", "append", "read", "metrics"],
)
def test_a_link_is_refused_and_its_target_untouched(tmp_path, outside, use):
    link = _link(tmp_path / "run", "file", outside)
    with pytest.raises(RunFileError, match="is a symbolic link; ressl does not follow links"):
        use(link)
    assert outside.read_bytes() == PRECIOUS and link.is_symlink()


def test_a_dangling_link_creates_nothing(tmp_path):
    link = _link(tmp_path / "run", LOCK, tmp_path / "elsewhere" / "new")
    with pytest.raises(RunFileError, match="symbolic link"):
        open_run_file(link, os.O_RDWR | os.O_CREAT)
    assert not (tmp_path / "elsewhere").exists()


@posix_only
@pytest.mark.parametrize("name", [EVAL_LOG, METRICS, STEPS, LOCK])
def test_a_named_pipe_is_refused_without_blocking(tmp_path, name):
    pipe = tmp_path / name
    os.mkfifo(pipe)
    for use in (append_run_file, open_run_file, read_run_file):
        args = (pipe, "x") if use is append_run_file else (pipe, os.O_RDWR | os.O_CREAT)
        args = (pipe,) if use is read_run_file else args
        with pytest.raises(RunFileError, match="is not a regular file"):
            use(*args)  # type: ignore[operator]
    with pytest.raises(RunFileError, match="not a regular file"):
        check_run_folder(tmp_path)


def test_regular_files_are_read_appended_and_locked(tmp_path):
    path = tmp_path / EVAL_LOG
    assert read_run_file(path) is None
    append_run_file(path, "a\n")
    append_run_file(path, "b\n")
    assert read_run_file(path) == "a\nb\n"
    fd = open_run_file(path, os.O_RDWR)
    os.close(fd)


@pytest.mark.parametrize("name", [*RUN_FILES, TENSORBOARD])
def test_holding_a_folder_refuses_any_link_among_its_files(tmp_path, outside, name):
    target = outside.parent if name == TENSORBOARD else outside
    _link(tmp_path / "run", name, target)
    with pytest.raises(RunFileError, match=f"{name} is a symbolic link"):
        with hold_run_folder(tmp_path / "run", resuming=True):
            pytest.fail("held a folder with a link in it")
    assert outside.read_bytes() == PRECIOUS and sorted(os.listdir(outside.parent)) == ["victim.txt"]


def test_the_lock_as_a_link_is_not_truncated(tmp_path, outside):
    """The fault: ``.lock`` was opened with O_CREAT following links, then truncated."""
    _link(tmp_path / "run", LOCK, outside)
    with pytest.raises(RunFileError):
        with hold_run_folder(tmp_path / "run"):
            pass
    assert outside.read_bytes() == PRECIOUS


def test_wrong_kinds_are_named(tmp_path):
    (tmp_path / METRICS).mkdir()
    with pytest.raises(RunFileError, match=f"{METRICS} is a folder"):
        check_run_folder(tmp_path)
    (tmp_path / METRICS).rmdir()
    (tmp_path / TENSORBOARD).write_text("")
    with pytest.raises(RunFileError, match=f"{TENSORBOARD} is not a folder"):
        check_run_folder(tmp_path)


def test_atomic_writes_replace_a_link_never_write_through_it(tmp_path, outside):
    link = _link(tmp_path / "run", CHECKPOINT, outside)
    write_atomic(link, b"new")
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert outside.read_bytes() == PRECIOUS
    assert [p.name for p in link.parent.iterdir()] == [CHECKPOINT]  # no temporary file left


def test_a_damaged_metrics_line_is_reported_or_skipped(tmp_path):
    path = tmp_path / METRICS
    path.write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 2, "lo\n[1]\n{"epoch": 0}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(path)
    problems: list[str] = []
    assert read_metrics(path, on_bad_line=problems.append) == [{"epoch": 1, "loss": 2.0}]
    assert [p.split("line ")[1][:1] for p in problems] == ["2", "3", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    run = tmp_path_factory.mktemp("runfolder") / "run"
    train(out=run, **dict(TINY, dataset=f"folder:{image_folder}", epochs=1, knn_every=1))
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [LOCK, CHECKPOINT, METRICS, STEPS, EVAL_LOG, TENSORBOARD, "curves.png"]
)
def test_every_file_ressl_writes_as_a_link_leaves_the_outside_byte_identical(
    capsys, tmp_path, trained, image_folder, name
):
    """Each file (and the TensorBoard folder) a command writes in a run folder, made a link
    to a file outside: every command refuses with one line (or, writing atomically,
    replaces the link) and the outside is byte-identical, its folder holding nothing new."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(PRECIOUS)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    if (run / name).exists():
        (run / name).unlink()
    (run / name).symlink_to(outside if name == TENSORBOARD else victim)
    commands = [
        [
            "train",
            "--resume",
            run,
            "--epochs",
            "2",
            "--log",
            "tensorboard" if name == TENSORBOARD else "none",
        ],
        ["eval", "knn", run, "--dataset", f"folder:{image_folder}", "--k", "5", "--device", "cpu"],
        ["plot", run, "--no-tsne"],
    ]
    for command in commands:
        code, _, err = run_cli(capsys, *command)
        lines = err.strip().splitlines()
        errors = [line for line in lines if line.startswith("ressl: error:")]
        assert "Traceback" not in err and errors == (lines[-1:] if code else []), err
        # (a checkpoint is read through a link before the folder is held: it fails as junk)
        refused = {"train": {*RUN_FILES, TENSORBOARD} - {CHECKPOINT}, "eval": {EVAL_LOG}}
        if name in refused.get(command[0], ()):
            assert code == 2 and f"{name} is a symbolic link" in errors[0]
        assert victim.read_bytes() == PRECIOUS, command
        assert sorted(os.listdir(outside)) == ["victim"], command
