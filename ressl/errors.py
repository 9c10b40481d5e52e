"""The errors ressl raises for bad input, one small hierarchy.

Every kind is a :class:`ResslError` (a ``ValueError``): a setting out of range, a file
that is not what it claims, a run folder in use, a run that diverged, an export that
failed its checks. The command line prints a ``ResslError`` as one line and exits
non-zero; anything else escaping ressl is a bug and keeps its traceback.

A message may name settings as ``{name}`` placeholders (``names``): ``str(e)`` says the
Python keyword, ``e.render(flag)`` the command-line flag. Only the names given are
replaced, so any other braces in a message are kept as they are. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "DivergedError",
    "ExportError",
    "ResslError",
    "RunFileError",
    "RunInUseError",
    "flag",
    "render",
]


def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def render(template: str, names: tuple[str, ...], name: Callable[[str], str]) -> str:
    """``template`` with each ``{setting}`` of ``names`` replaced by ``name(setting)``."""
    for setting in names:
        template = template.replace("{" + setting + "}", name(setting))
    return template


class ResslError(ValueError):
    """Bad input to ressl. ``template`` may name the settings in ``names`` as ``{name}``."""

    def __init__(self, template: str, *names: str) -> None:
        self.template, self.names = template, names
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every setting called ``name(setting)`` (``flag`` on the CLI)."""
        return render(self.template, self.names, name)

    def __str__(self) -> str:
        return self.render(str)

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and copy keep the template
        return (type(self), (self.template, *self.names))


class ConfigError(ResslError):
    """An invalid setting."""

    @classmethod
    def invalid(cls, setting: str, expect: str, value: Any) -> ConfigError:
        """``"{setting} must be <expect>, got <value>"``."""
        return cls(f"{{{setting}}} must be {expect}, got {value!r}", setting)


class DataNotFoundError(ResslError, FileNotFoundError):
    """A built-in dataset's files are not found; the message says which settings fetch them
    (``{data_root}``, ``{download}``)."""


class CheckpointError(ResslError):
    """A file is missing, not a safetensors file, or not a ressl checkpoint."""


class RunFileError(ResslError):
    """A file of a run folder is a link or not a regular file: ressl neither follows nor uses it."""


class RunInUseError(ResslError):
    """Another process is training in the run folder."""


class DivergedError(ResslError):
    """Training diverged: a loss or a weight is not finite. Nothing of it was saved: the run
    folder keeps its last checkpoint and metrics as they were."""


class ExportError(ResslError):
    """An export failed: the graph failed ``onnx.checker`` or disagrees with PyTorch."""
