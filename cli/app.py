"""The ``ressl`` command line: ``ressl train``, ``info``, ``export``, ``embed``,
``eval knn|linear`` and ``plot``.

The CLI owns the terminal: progress bars and summary lines go to stderr,
results to stdout. Every user error (a ``ResslError``, an ``OSError``, a usage error)
becomes one line on stderr and a non-zero exit status, never a traceback; anything else
is a bug in ressl and prints its traceback and a line asking for a report (exit 1).
``RESSL_DEBUG=1`` prints the traceback of every error. Commands live in their own modules and import
torch only when they run, so ``ressl --help`` starts in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ressl._version import __version__
from ressl.errors import ResslError, flag
from ressl.rules import NAME_MAX, Note, names_fit

from .common import Interrupted
from .eval_cmd import eval_app
from .export_cmd import embed_cmd, export_cmd
from .info_cmd import info_cmd
from .plot_cmd import plot_cmd
from .serve_cmd import serve_cmd
from .train_cmd import train_cmd


def _without_flag_types(command: Any, ctx: Any) -> None:
    """A flag takes no value, so ``--help`` shows none for it (Typer would print ``<bool>``)."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.metavar = ""


def _check_path_names(command: Any, ctx: Any) -> None:
    """Every path a command was given has names a file system takes; a longer one is a usage
    error naming its option or argument (not ENAMETOOLONG from wherever it is first used)."""
    for param in command.get_params(ctx):
        value = ctx.params.get(param.name)
        paths = value if isinstance(value, (list, tuple)) else [value]
        for path in paths:
            if isinstance(path, Path) and not names_fit(path):
                longest = max(len(os.fsencode(part)) for part in path.parts)
                raise typer.BadParameter(
                    f"a name in the path is {longest} bytes long; file systems take {NAME_MAX}",
                    ctx=ctx,
                    param=param,
                )


class _Command(TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _without_flag_types(self, ctx)
        super().format_help(ctx, formatter)

    def invoke(self, ctx: Any) -> Any:
        _check_path_names(self, ctx)
        return super().invoke(ctx)


class _Group(TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _without_flag_types(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="ressl",
    help="ReSSL: relational self-supervised pre-training of image encoders.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_Group,
)
app.command("train", cls=_Command)(train_cmd)
app.command("info", cls=_Command)(info_cmd)
app.command("export", cls=_Command)(export_cmd)
app.command("embed", cls=_Command)(embed_cmd)
eval_app.info.cls = _Group
for _info in eval_app.registered_commands:
    _info.cls = _Command
app.add_typer(eval_app, name="eval")
app.command("plot", cls=_Command)(plot_cmd)
app.command("serve", cls=_Command)(serve_cmd)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ressl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Warnings and errors only, without the lines that say what a command loaded "
            "and decided (dataset, device, precision, image size, backbone changes, fitted "
            "defaults). Give it before the command: ressl -q train ...",
        ),
    ] = False,
) -> None:
    """ReSSL: relational self-supervised pre-training of image encoders."""
    logging.getLogger("ressl").setLevel(logging.WARNING if quiet else logging.INFO)


def _is_usage_error(e: BaseException) -> bool:
    # click's (or typer's vendored click's) UsageError / BadParameter / NoSuchOption.
    return any(c.__name__ in ("UsageError", "ClickException") for c in type(e).__mro__)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the app, turn user errors into one line and an exit
    status, and a bug into its traceback and a request to report it.

    The ``ressl`` logger writes what a command loads and decides (INFO: the dataset, device,
    precision, backbone changes, fitted defaults) and its warnings to stderr, settings named
    as flags, for the duration of the call (``ressl -q``: warnings only), and is put back as
    it was, for callers in the same process.
    """
    previous = _terminate_as_interrupt()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_notes_with_flags)
    log = logging.getLogger("ressl")
    before = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the CLI owns the terminal
    try:
        _run(argv)
    finally:
        log.removeHandler(handler)
        log.setLevel(before[0])
        log.propagate = before[1]
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: Sequence[str] | None) -> NoReturn:
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except ResslError as e:  # bad input; its settings named as the flags the user typed
        _die(e.render(flag), error=e)
    except Interrupted as e:  # exit 128 + the signal: 130 after Ctrl-C, 143 after SIGTERM
        _die(e.message, code=128 + e.signum, error=e)
    except OSError as e:  # a full disk, an unreadable file: name the file
        filename = getattr(e, "filename", None)
        _die(f"{filename}: {e.strerror or e}" if filename else str(e), error=e)
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # the help went to stdout: nothing to add
            sys.exit(2)
        if _is_usage_error(e):
            _die(e.format_message() if hasattr(e, "format_message") else str(e), error=e)  # type: ignore[attr-defined]
        if type(e).__name__ == "Abort":
            _die("aborted", code=130, error=e)
        _report_bug()  # anything else is ressl's own bug: it keeps its traceback
    sys.exit(code if isinstance(code, int) else 0)


def _debug() -> bool:
    """``RESSL_DEBUG=1`` (any value but empty or 0): every error shows its traceback."""
    return os.environ.get("RESSL_DEBUG", "") not in ("", "0")


def _report_bug() -> NoReturn:
    """The traceback of the error being handled, then one line asking for a report; exit 1."""
    traceback.print_exc()
    print(
        f"ressl: internal error (ressl {__version__}): this is a bug in ressl, "
        "please report it with the traceback above",
        file=sys.stderr,
    )
    sys.exit(1)


def _terminate_as_interrupt() -> Any:
    """SIGTERM unwinds like Ctrl-C (exit 143): an output being written is removed, not left as a
    temporary file; ``ressl train`` replaces this with its own stop-after-the-step handler."""

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum, "terminated by SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, stop)  # the handler it replaces
    except ValueError:  # not the main thread
        return None


def _notes_with_flags(record: logging.LogRecord) -> bool:
    """The library logs ``Note`` objects naming settings; on the command line they name flags."""
    if isinstance(record.args, tuple) and any(isinstance(a, Note) for a in record.args):
        record.args = tuple(a.render(flag) if isinstance(a, Note) else a for a in record.args)
    return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now, so log lines go above a live progress bar."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _die(message: str, code: int = 2, error: BaseException | None = None) -> NoReturn:
    """``ressl: error: FIRST LINE``; the message's further lines follow whole, indented.
    With ``RESSL_DEBUG`` set, ``error``'s traceback comes first."""
    if error is not None and _debug():
        traceback.print_exception(type(error), error, error.__traceback__)
    first, *rest = message.strip().splitlines() or ["error"]
    lines = [f"ressl: error: {first}", *(f"  {line}" for line in rest if line.strip())]
    print("\n".join(lines), file=sys.stderr)
    sys.exit(code)
