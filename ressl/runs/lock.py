"""One run per folder: a lock the kernel holds on ``RUN/.lock`` while a run trains there.

The lock is an advisory ``flock`` (``msvcrt.locking`` on Windows) on an open file, so the
operating system releases it when the process ends, however it ends: there are no stale
locks to clean up. The file names its holder (pid, host, start time) for the message a
second run gets. While a run holds its folder, the temporary files that earlier, killed
writes of its own left behind are removed. No torch here.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ressl.errors import ConfigError, RunInUseError
from ressl.runs.folder import (
    CHECKPOINT,
    LOCK,
    METRICS,
    check_run_folder,
    open_run_file,
    read_run_file,
)

__all__ = ["LOCK", "RunInUseError", "hold_run_folder", "remove_stale_temp_files"]

try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True


def _holder(lock: Path) -> str:
    try:
        text = (read_run_file(lock) or "").split()
    except (OSError, ConfigError):
        return "another process"
    if len(text) >= 2 and text[0].isdigit():
        since = f", since {' '.join(text[2:])}" if len(text) > 2 else ""
        return f"pid {text[0]} on {text[1]}{since}"
    return "another process"


def _open_locked(lock: Path) -> int | None:
    """A descriptor holding the lock on ``lock`` as it is now, or None when another holds it."""
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)  # its last holder may have removed it
        fd = open_run_file(lock, os.O_RDWR | os.O_CREAT)  # a link there is refused
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:  # its last holder may have removed it meanwhile: lock the file that is there
            if os.lstat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def hold_run_folder(folder: str | os.PathLike[str], *, resuming: bool = False) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for one run; yields the folder.

    On leaving, a folder this call created and that holds nothing but the lock is removed
    again (a run that failed before writing anything leaves no trace).

    Raises:
        RunInUseError: another process holds the folder; the message names it.
        RunFileError: a file ressl writes there is a link or not a regular file (nothing
            is written, here or where it points).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    check_run_folder(folder)
    lock = folder / LOCK
    fd = _open_locked(lock)
    if fd is None:
        what = "wait for it to end" if resuming else "wait for it to end or choose another {out}"
        raise RunInUseError(
            f"{folder} is in use by another ressl run ({_holder(lock)}); {what}", "out"
        )
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode())
        remove_stale_temp_files(folder)
        yield folder
    finally:
        try:
            if created and [p.name for p in folder.iterdir()] == [LOCK]:
                lock.unlink()
                folder.rmdir()
        except OSError:  # another run took the folder meanwhile: it is theirs now
            pass
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writes of the run's checkpoint and metrics left
    in ``folder`` (``ressl.atomic.write_atomic`` names them ``.NAME.XXXX.tmp``); only call it
    while holding the folder. Returns what it removed."""
    stale = [p for name in (CHECKPOINT, METRICS) for p in folder.glob(f".{name}.*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
