"""The errors ressl raises for bad input, one small hierarchy.

Every kind is a :class:`ResslError` (a ``ValueError``)::

    ResslError            bad input to ressl
    ├── ConfigError       a setting, flag or keyword out of its range
    ├── DataError         a dataset, image or JSON file that is not what it claims
    │   └── DataNotFoundError   a built-in dataset's files are not there
    ├── InputError        images or a request handed to embed/serve that the model cannot take
    ├── CheckpointError   a file that is not a (usable) ressl checkpoint
    ├── RunFileError      a run folder's file that is a link or not a regular file
    ├── RunInUseError     another process trains in the run folder
    ├── DivergedError     a loss or weight went non-finite
    ├── CollapseError     the embeddings collapsed to nearly one point
    └── ExportError       an ONNX model file, or an export that failed its checks

The rule: anything a user's file, flag, request or keyword can reach raises one of these.
A ``ValueError``/``TypeError`` that is not a ``ResslError`` is a programming-contract
check (a caller passed the wrong kind of thing into a function) or a bug. The command
line prints a ``ResslError`` (and an ``OSError``) as one line and exits non-zero;
anything else escaping ressl is a bug and keeps its traceback (``RESSL_DEBUG=1``
shows the traceback of every error).

A message may name settings as ``{name}`` placeholders (``names``): ``str(e)`` says the
Python keyword, ``e.render(flag)`` the command-line flag. Only the names given are
replaced, so any other braces in a message are kept as they are. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "CheckpointError",
    "CollapseError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "DivergedError",
    "ExportError",
    "InputError",
    "ResslError",
    "RunFileError",
    "RunInUseError",
    "first_line",
    "flag",
    "render",
]


def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``str(error)`` (at most ``limit`` characters), else the
    error's type name: a library's error quoted inside a one-line message."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(error).__name__


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
    """An invalid setting: a flag, a keyword, a ``TrainConfig`` field, an output path."""

    @classmethod
    def invalid(cls, setting: str, expect: str, value: Any) -> ConfigError:
        """``"{setting} must be <expect>, got <value>"``."""
        return cls(f"{{{setting}}} must be {expect}, got {value!r}", setting)


class DataError(ResslError):
    """A dataset, image or JSON file whose contents are not what it claims (truncated,
    corrupt, another format), or a data folder that holds no usable image."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A built-in dataset's files are not found; the message says which settings fetch them
    (``{data_root}``, ``{download}``)."""


class InputError(ResslError):
    """Images, arrays or a request given to ``embed``/``serve`` (or the ``Embedder``) that
    the model cannot take: wrong channels, size, dtype or value range, no image at all."""


class CheckpointError(ResslError):
    """A file is missing, not a safetensors file, or not a ressl checkpoint."""


class RunFileError(ResslError):
    """A file of a run folder is a link or not a regular file: ressl neither follows nor uses it."""


class RunInUseError(ResslError):
    """Another process is training in the run folder."""


class DivergedError(ResslError):
    """Training diverged: a loss or a weight is not finite. Nothing of it was saved: the run
    folder keeps its last checkpoint and metrics as they were."""


class CollapseError(ResslError):
    """Training collapsed: the health measures say every image maps to nearly one point
    (``ressl.training.vitals``). Nothing of it was saved: the run folder keeps its last
    checkpoint and metrics as they were."""


class ExportError(ResslError):
    """An ONNX model file that is not a usable ressl encoder, or an export that failed: the
    graph failed ``onnx.checker`` or disagrees with PyTorch."""
