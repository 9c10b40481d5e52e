"""Every option of every command that takes a value, set to ``0``, ``-1``, ``nan``, ``inf``,
``1e300``, ``''`` and a 5,000-character value (issue 21, "What to build").

The commands and their options are read from the Typer app itself, so a new command or flag
is fuzzed without touching this file (a new command needs a valid invocation in ``_BASE``).
Each case runs ``ressl`` in-process with otherwise valid arguments (a tiny trained run and its
exported ONNX model); ``serve`` reaches a patched server start that returns at once. Each case
must end with exit 0, or a non-zero exit with one ``ressl: error:`` line that names the flag;
never a traceback, never a hang. ``pytest -s`` prints the totals.
"""

from __future__ import annotations

import collections
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from cli_helpers import TINY, run_cli, tiny_args
from ressl.cli.app import app

#: The hostile values, by the name a case id shows. The long one is digits, so a numeric flag
#: sees a 5,000-digit number (past Python's 4,300-digit int limit, ``inf`` as a float).
VALUES = {
    "0": "0",
    "-1": "-1",
    "nan": "nan",
    "inf": "inf",
    "1e300": "1e300",
    "empty": "",
    "5000-chars": "9" * 5000,
}
HANG_S = 60  # one case past this counts as a hang (a valid one trains one tiny epoch: seconds)


def _commands() -> Iterator[tuple[str, Any]]:
    """(``"eval knn"``, click command) for every leaf command of the app."""

    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield " ".join(path), command

    yield from walk(typer.main.get_command(app), ())


def _value_options(command: Any) -> list[tuple[str, tuple[str, ...]]]:
    """(the long flag as typed, all its names) for each option that takes a value."""
    out = []
    for param in command.params:
        if param.param_type_name == "option" and not param.is_flag:
            names = tuple(param.opts)
            out.append((next(n for n in names if n.startswith("--")), names))
    return out


COMMANDS = dict(_commands())
CASES = [
    pytest.param(cmd, flag, names, value, id=f"{cmd} {flag}={label}")
    for cmd, command in COMMANDS.items()
    for flag, names in _value_options(command)
    for label, value in VALUES.items()
]


@dataclass
class Setup:
    run: Path  # a one-epoch tiny run folder
    model: Path  # its encoder as ONNX
    images: Path  # an image folder (train/ and test/)


def _base(command: str, s: Setup, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """A valid, seconds-long invocation of ``command``: (arguments, options by long flag)."""
    if command == "train":
        args = tiny_args(s.images, tmp / "run", epochs=1)[1:]
        return [], dict(zip(args[::2], args[1::2]))
    quick_eval = {"--device": "cpu", "--batch-size": "8", "--record": None}
    table: dict[str, tuple[list[str], dict[str, Any]]] = {
        "info": ([str(s.run)], {}),
        "export": ([str(s.run)], {"--out": str(tmp / "e.onnx"), "--verify": None}),
        "embed": (
            [str(s.model), str(s.images / "test")],
            {"--out": str(tmp / "e.npz"), "--device": "cpu"},
        ),
        "plot": (
            [str(s.run)],
            {
                "--out": str(tmp / "plots"),
                "--tsne-points": "8",
                "--iterations": "20",
                "--perplexity": "2",
                "--device": "cpu",
            },
        ),
        "serve": ([str(s.model)], {"--device": "cpu"}),
        "eval knn": ([str(s.run)], {**quick_eval, "--k": "5"}),
        "eval linear": ([str(s.run)], {**quick_eval, "--epochs": "2", "--probe-batch-size": "8"}),
        "eval health": ([str(s.run)], {**quick_eval, "--images": "32"}),
    }
    assert command in table, f"add a valid, seconds-long invocation of `ressl {command}` to _BASE"
    return table[command]


def _argv(command: str, args: list[str], options: dict[str, Any]) -> list[str]:
    """``--flag value`` for each option; a value of None is a switch turned off (``--no-x``)."""
    argv = command.split()
    for flag, value in options.items():
        argv += ["--no-" + flag[2:]] if value is None else [flag, value]
    return [*argv, *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Setup:
    from ressl.cli.app import main as cli_main

    run = tmp_path_factory.mktemp("run") / "run"
    model = run.parent / "encoder.onnx"
    for argv in (
        tiny_args(image_folder, run, epochs=1),
        ["export", str(run), "-o", str(model), "--no-verify"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 0, argv
    return Setup(run, model, image_folder)


TOTALS: collections.Counter[str] = collections.Counter()
ACCEPTED: list[str] = []  # the cases that ran to exit 0, for a reader to judge


@pytest.fixture(scope="module", autouse=True)
def _print_totals() -> Iterator[None]:
    yield
    if TOTALS:
        print(
            f"\nflag fuzz: {sum(TOTALS.values())} cases, {TOTALS['clean error']} clean errors, "
            f"{TOTALS['exit 0']} successes, {TOTALS['traceback']} tracebacks, "
            f"{TOTALS['hang']} hangs, {TOTALS['unclear error']} errors without the flag"
        )
        print("accepted: " + ", ".join(ACCEPTED))


class _Hang(BaseException):
    pass


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The server start, patched to return at once; a list of the starts it reached."""
    import uvicorn

    started: list[str] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append("server"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append("workers"))
    return started


def _names(err_line: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", err_line) for n in names)


def _outcome(capsys: pytest.CaptureFixture[str], argv: list[str], names: tuple[str, ...]) -> str:
    def alarm(signum: int, frame: Any) -> None:
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        code, _, err = run_cli(capsys, *argv)
    except _Hang:
        return "hang"
    except Exception as e:  # anything but SystemExit escaping main is a traceback
        capsys.readouterr()
        return f"traceback: {type(e).__name__}: {e}"[:500]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if "Traceback" in err:
        return "traceback: " + err[-500:]
    if code == 0:
        return "exit 0"
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("ressl: error:")]
    if len(errors) == 1 and lines[-1] == errors[0] and _names(errors[0], names):
        return "clean error"
    return f"unclear error (exit {code}): " + (lines[-1] if lines else "")[:500]


@pytest.mark.parametrize(("command", "flag", "names", "value"), CASES)
def test_flag_value(capsys, tmp_path, monkeypatch, setup, served, command, flag, names, value):
    monkeypatch.chdir(tmp_path)  # a relative or empty path lands here, not in the repository
    args, options = _base(command, setup, tmp_path)
    argv = _argv(command, args, {**options, flag: value})
    outcome = _outcome(capsys, argv, names)
    TOTALS[outcome.split(":")[0].split(" (")[0]] += 1
    if outcome == "exit 0":
        ACCEPTED.append(f"{command} {flag}={value[:8]}")
    assert outcome in ("exit 0", "clean error"), outcome


def test_every_command_is_fuzzed():
    """The app's commands, read from Typer; each needs a valid invocation above."""
    assert {
        "train",
        "info",
        "export",
        "embed",
        "plot",
        "serve",
        "eval knn",
        "eval linear",
        "eval health",
    } <= set(COMMANDS)
    setup = Setup(Path("run"), Path("m.onnx"), Path("images"))
    for command in COMMANDS:
        _base(command, setup, Path("tmp"))
    assert sum(1 for c in CASES if c.values[0] == "train") == 7 * len(
        _value_options(COMMANDS["train"])
    )
    assert TINY["epochs"]  # the tiny settings the base invocations use
