"""Stopping a training run at an exact point of a save: the Nth write of a run file, at a stage
of ``ressl.atomic.write_atomic``; by a kill (``os._exit``, no clean-up runs, as ``kill -9``)
or by a failed write (``OSError``, as a full disk).

As a script (``python fault_injection.py FILE NTH STAGE RUN SETTINGS_JSON``) it trains
``RUN`` with that kill armed, for the tests to resume in a fresh process.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

import ressl.atomic
import ressl.runs.checkpoint
import ressl.runs.folder

#: Where a save can stop: its data written (not yet flushed), flushed (not yet renamed), and
#: renamed (the folder's entry not yet flushed).
STAGES = ("written", "flushed", "renamed")


class _Os:
    """``os`` as ``write_atomic`` sees it, reporting the stages of the write in progress."""

    def __init__(self, hit: Any) -> None:
        self.hit = hit

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        self.hit("written")
        os.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self.hit("flushed")
        os.replace(src, dst)
        self.hit("renamed")


def arm(monkeypatch: Any, file: str, nth: int, stage: str, kill: bool) -> None:
    """Stop at ``stage`` of the ``nth`` write of ``file`` ("last.safetensors" or "metrics.jsonl")."""
    counts = {"last.safetensors": 0, "metrics.jsonl": 0}
    current: list[str] = []

    def hit(where: str) -> None:
        if current and current[-1] == file and counts[file] == nth and where == stage:
            if kill:
                os._exit(9)
            raise OSError(errno.ENOSPC, "No space left on device")

    def wrap(real: Any) -> Any:
        def write_atomic(path: Any, *args: Any, **kwargs: Any) -> Any:
            name = os.path.basename(str(path))
            counts[name] = counts.get(name, 0) + 1
            current.append(name)
            try:
                return real(path, *args, **kwargs)
            finally:
                current.pop()

        return write_atomic

    monkeypatch.setattr(ressl.atomic, "os", _Os(hit))
    monkeypatch.setattr(
        ressl.runs.checkpoint, "write_atomic", wrap(ressl.runs.checkpoint.write_atomic)
    )
    monkeypatch.setattr(ressl.runs.folder, "write_atomic", wrap(ressl.runs.folder.write_atomic))


class _Patch:
    def setattr(self, obj: Any, name: str, value: Any) -> None:
        setattr(obj, name, value)


if __name__ == "__main__":
    from ressl import train

    file, nth, stage, run, settings = sys.argv[1:]
    arm(_Patch(), file, int(nth), stage, kill=True)
    train(out=run, **json.loads(settings))
    sys.exit("the kill never came")
