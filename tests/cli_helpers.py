"""Running the ``ressl`` CLI in-process from tests, checking its one-line errors, and the
settings of a seconds-long run (``TINY``) as keywords or as flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ressl.cli.app import main

#: A seconds-long CPU run: small CNN, 16 px, batch 8, queue 32 (add ``dataset`` and ``out``).
TINY: dict[str, Any] = dict(
    backbone="small",
    width=4,
    hidden_dim=16,
    embed_dim=8,
    image_size=16,
    batch_size=8,
    queue_size=32,
    epochs=2,
    warmup_epochs=1,
    knn_every=1,
    knn_k=5,
    device="cpu",
    seed=0,
    num_workers=0,
    progress_every=1,
)


def tiny_args(folder: Path, out: Path | str, **changes: Any) -> list[str]:
    """``ressl train`` arguments for a ``TINY`` run on an image folder, ``--out`` last."""
    settings = dict(TINY, dataset=f"folder:{folder}", **changes)
    args = ["train"]
    for name, value in settings.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return [*args, "--out", str(out)]


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``ressl ARGS...`` -> (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    """A non-zero exit with exactly one ``ressl: error: ...`` line, the last, containing
    ``needle``, and no traceback (the start-up lines of what was loaded may come before it)."""
    assert code != 0
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("ressl: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert needle in lines[-1], lines[-1]
    assert "Traceback" not in err
