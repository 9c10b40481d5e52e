"""What every ``ressl`` command shares: the one-line user error, option types, and helpers.

Command modules import from here, and ``cli/app.py`` imports the command modules to
register them, so no command module imports the app (no import cycles).
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ressl.errors import ResslError

__all__ = [
    "DataRootOpt",
    "DeviceOpt",
    "Interrupted",
    "OnnxModelArg",
    "OverwriteOpt",
    "UserError",
    "Weights",
    "WeightsOpt",
    "checkpoint_file",
    "existing",
    "explicit_options",
    "fail",
    "launch_rank",
    "new_output",
]


class UserError(ResslError):
    """An error caused by the user's input to a command (its message names the flags as
    typed); ``ressl`` prints it as one line, exit status 2."""


class Interrupted(BaseException):  # noqa: N818 - not an error: a stop the user asked for
    """A signal stopped the command; ``ressl`` prints ``message`` and exits ``128 + signum``.

    A ``BaseException``, so it passes every ``except Exception`` on its way out (and an
    output being written is removed by ``write_atomic``'s clean-up).
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(signum, message)
        self.signum, self.message = signum, message


def fail(message: str) -> NoReturn:
    """Stop with a one-line user error (``ressl: error: MESSAGE``, exit status 2)."""
    raise UserError(message)


class Weights(str, Enum):
    """Which of a checkpoint's encoders: the student, or the EMA teacher."""

    student = "student"
    teacher = "teacher"


WeightsOpt = Annotated[
    Weights, typer.Option(help="Checkpoint weights: the student, or the EMA teacher.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
DataRootOpt = Annotated[
    Path | None, typer.Option(help="Where datasets are looked for / downloaded.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
OnnxModelArg = Annotated[Path, typer.Argument(help="An ONNX encoder written by `ressl export`.")]


def new_output(path: Path, overwrite: bool, flag: str = "-o") -> Path:
    """``path``, or a one-line error when it exists and ``--overwrite`` was not given."""
    if path.is_file() and not overwrite:  # (a folder is refused by the write itself)
        fail(f"{flag} {path} exists; pass --overwrite to replace it, or choose another {flag}")
    return path


def existing(path: Path, what: str = "file or folder", flag: str = "") -> Path:
    """``path``, or a one-line error when it does not exist (naming ``flag`` when the path
    came from an option, not an argument)."""
    if not path.exists():
        fail(f"{flag} {path}: no such {what}".lstrip())
    return path


def checkpoint_file(path: Path, flag: str = "") -> Path:
    """The checkpoint a path names (a run folder's ``last.safetensors``), or a one-line error
    (naming ``flag`` when the path came from an option)."""
    from ressl.errors import CheckpointError
    from ressl.runs.folder import resolve_checkpoint

    existing(path, flag=flag)
    try:
        return resolve_checkpoint(path)
    except CheckpointError as e:
        fail(f"{flag} {path}: {e}" if flag else str(e))


def explicit_options(ctx: typer.Context) -> set[str]:
    """Names of the options the user actually typed (not defaults)."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and getattr(source, "name", "") not in ("DEFAULT", "DEFAULT_MAP"):
            out.add(name)
    return out


def launch_rank() -> int:
    """This process's rank under ``torchrun`` (0 when not distributed)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
