"""`provisiond backup PATH`: a consistent copy of the state file, taken while the daemon runs.

SQLite's online backup API copies the database as of one read transaction: in WAL mode that
reader never blocks the daemon's writes, and the copy holds every committed transaction up to
its start and none after (the WAL's frames included, which a plain `cp` of the main file would
miss). The copy is written to a temporary file beside PATH, created 0600 (the state file holds
no secret, but it names every user), checked (`PRAGMA quick_check`), flushed to disk, then
renamed over PATH: a reader of PATH never sees half a copy.

For a warm standby: copy PATH to the standby host's `state_path`. A standby started from it
has the links, held approvals, staged-deprovision timers and history as of the copy; one started
from no state file at all rebuilds the links by adoption (README "Standby and backup").
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_MODE = 0o600


class BackupError(Exception):
    """The state file could not be read, or the copy could not be written or failed its check."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    source: Path
    path: Path
    pages: int
    bytes: int
    schema_version: int


def backup_state(state_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> BackupResult:
    """Copy the SQLite state file at `state_path` to `dest` (replaced atomically, mode 0600)."""
    source = Path(state_path)
    target = Path(dest)
    if not source.is_file():
        raise BackupError(f"{source}: no state file")
    if target.exists() and target.resolve() == source.resolve():
        raise BackupError(f"{target}: is the state file itself")
    if target.is_dir():
        raise BackupError(f"{target}: is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise BackupError(f"{target}: cannot write there: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, STATE_MODE)
        os.close(fd)
        try:
            # mode=rw: never create a state file where there was none
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=30.0)
        except sqlite3.Error as exc:
            raise BackupError(f"{source}: {exc}") from exc
        try:
            dst = sqlite3.connect(tmp, timeout=30.0)
            try:
                src.backup(dst)       # one step: one read transaction, one consistent picture
                pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
                version = int(dst.execute("PRAGMA user_version").fetchone()[0])
                check = dst.execute("PRAGMA quick_check").fetchone()[0]
                # the copy is self-contained: no -wal beside it to carry along
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        except sqlite3.Error as exc:
            raise BackupError(f"{source} -> {target}: {exc}") from exc
        finally:
            src.close()
        if check != "ok":
            raise BackupError(f"{target}: the copy failed its integrity check: {check}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BackupResult(source, target, pages, target.stat().st_size, version)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
