"""One daemon per state file: an exclusive flock on `<state_path>.lock`, holding the owner's pid."""

from __future__ import annotations

import fcntl
import os
from typing import Final

LOCK_SUFFIX: Final = ".lock"


class StateLocked(Exception):
    """Another provisiond holds the state file's lock."""

    def __init__(self, state_path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another provisiond is running on {state_path} ({holder})")
        self.state_path = state_path
        self.pid = pid


class StateLock:
    """An exclusive flock on `<state_path>.lock` (created 0600), holding the owner's pid."""

    def __init__(self, state_path: str) -> None:
        self.state_path = state_path
        self.path = state_path + LOCK_SUFFIX
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `StateLocked` (or OSError when the file cannot be opened)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateLocked(self.state_path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)           # closing drops the flock; the file stays (unlinking races)
        self._fd = None


def lock_holder(state_path: str) -> int | None:
    """The pid of the process holding `state_path`'s lock (0 when unknown), or None when free.

    Read-only: a shared flock tried and dropped at once, nothing written."""
    try:
        fd = os.open(state_path + LOCK_SUFFIX, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None                  # no lock file: nobody ever held it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
