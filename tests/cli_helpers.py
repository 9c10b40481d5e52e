"""Running the ``ressl`` CLI in-process from tests, and checking its one-line errors."""

from __future__ import annotations

import pytest
from ressl.cli.app import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``ressl ARGS...`` -> (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    """A non-zero exit with exactly one ``ressl: error: ...`` line containing ``needle``, no traceback."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ressl: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err
