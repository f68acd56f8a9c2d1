"""Apply progress for the interactive commands (`once`, `sync-user`, `sync-group`, `demo`).

One display per command, fed by the engine's two hooks: `update(target, done, total)` (the
progress hook, called after each operation) and `observe(event, fields)` (an observer: entity
events carry `outcome`, so failures are counted). Per target it shows done/total, the rate,
the ETA and the failures so far.

- On a terminal (the stream is a TTY and TERM is not "dumb"): a live `rich` progress display,
  redrawn in place on that stream (stderr), never touching stdout, where the JSON log goes.
- Otherwise: plain lines, one when a target's apply starts, at most one every `every` seconds
  while it runs, and one when it ends: "zpa: 300/609 operations, 120.5/s, ETA 3s, 0 failed".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

DEFAULT_EVERY = 5.0     # seconds between plain progress lines per target


class ProgressSink(Protocol):
    """What an apply reports progress to (`ApplyProgress`)."""

    def update(self, target: str, done: int, total: int) -> None: ...

    def observe(self, event: str, fields: dict[str, Any]) -> None: ...


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
    except (AttributeError, ValueError):
        return False


@dataclass
class _Target:
    total: int = 0
    done: int = 0
    failed: int = 0
    started: float = 0.0
    last_line: float = 0.0
    task: TaskID | None = None
    finished: bool = False
    ended: float = 0.0
    reported: bool = False

    def rate(self, now: float) -> float:
        took = now - self.started
        return self.done / took if took > 0 else 0.0

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        return (self.total - self.done) / rate if rate > 0 else None


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")


class _FailedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        failed = int(task.fields.get("failed", 0))
        return Text(f"{failed} failed", style="red" if failed else "progress.remaining")


def _eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"


class ApplyProgress:
    """The progress display of one command; a context manager (the live display runs inside)."""

    def __init__(self, stream: TextIO, *, live: bool | None = None, every: float = DEFAULT_EVERY) -> None:
        self.stream = stream
        self.live = is_terminal(stream) if live is None else live
        self.every = every
        self.targets: dict[str, _Target] = {}
        self._progress: Progress | None = None
        if self.live:
            console = Console(file=stream, force_terminal=True)
            self._progress = Progress(
                TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), _FailedColumn(),
                console=console, redirect_stdout=False, redirect_stderr=False, transient=False)

    def __enter__(self) -> ApplyProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._report_finished()

    def update(self, target: str, done: int, total: int) -> None:
        """The engine's progress hook (and the applier's, with the target bound)."""
        now = time.monotonic()
        t = self.targets.get(target)
        if t is not None and t.finished and done < t.done:   # a new apply for this target
            self._report_finished()
            t = None
        if t is None:
            t = self.targets[target] = _Target(total=total, started=now, last_line=now)
            if self._progress is not None:
                t.task = self._progress.add_task(target, total=total, failed=0)
            else:
                self._line(f"{target}: applying {total} operation(s)")
        t.total, t.done = total, done
        if self._progress is not None and t.task is not None:
            self._progress.update(t.task, completed=done, total=total, failed=t.failed)
        if done >= total:
            t.finished = True
            t.ended = now
        elif self._progress is None and now - t.last_line >= self.every:
            t.last_line = now
            self._line(f"{target}: {done}/{total} operations, {t.rate(now):.1f}/s, "
                       f"ETA {_eta_text(t.eta(now))}, {t.failed} failed")

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """An engine observer: failed operations, per target."""
        if fields.get("outcome") != "failed" or event == "cycle.finished":
            return
        t = self.targets.get(str(fields.get("target", "")))
        if t is None:
            return
        t.failed += 1
        if self._progress is not None and t.task is not None:
            self._progress.update(t.task, failed=t.failed)

    def _report_finished(self) -> None:
        """Plain mode: one closing line per finished apply (after its last failure was counted)."""
        if self._progress is not None:
            return
        for name, t in self.targets.items():
            if t.finished and not t.reported:
                t.reported = True
                took = t.ended - t.started
                rate = t.done / took if took > 0 else 0.0
                self._line(f"{name}: {t.done}/{t.total} operations done in {took:.1f}s, {rate:.1f}/s, "
                           f"{t.failed} failed")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
