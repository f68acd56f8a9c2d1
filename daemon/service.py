"""`provisiond run`: the daemon as a well-mannered systemd service.

    start    load the config (bad: message on stderr, exit 78); lock `<state_path>.lock` (held by
             another daemon: message, exit 1); open the state file; READY=1
    loop     a tick at once, then one per `interval` measured start to start, plus 0..`jitter`: it
             snapshots PingOne and starts a cycle from it for each target whose previous cycle has
             ended. Targets never wait for one another: one still running misses the tick
             (`cycle.overrun` with its `target`) and takes the next one after it ends.
    wake-ups nothing waits for the interval but the backstop itself (README "When cycles run"):
             between ticks the scheduler looks every second for what is due now and ticks early,
             for every idle target or only the targets concerned (`cycle.started` says `reason`):
             an incomplete snapshot is retried on a back-off (`retry_backoff` doubling, up to the
             lesser of `interval` and 5 min); a quarantined target when its quarantine ends; a
             target whose cycle failed on its own back-off; a target that missed a batch of
             changes (meta `changes.missed.<target>`) as soon as it is healthy; and what other
             processes wrote to the state file (`approve`, `approve --reload`, `--source-shrink`,
             `resync`) within a second.
    SIGHUP   RELOADING=1; re-read the config and its secret files. Valid: it applies from the next
             cycle, concurrency and rate limits are resized at once, `config.reloaded` says what
             changed. Invalid: `config.reload_failed`, the old config stays. Then READY=1.
    SIGTERM  STOPPING=1; no new cycle and no new HTTP request (held at the session); requests in
    SIGINT   flight finish within `grace_period`, then the cycle is cancelled: its unfinished
             operations stay recorded and the next start resumes them. The state file is closed,
             exit 0. A second SIGTERM/SIGINT exits at once.
    STATUS=  the last cycle's result, the apply progress ("zpa: applying 1200/5000, ETA 2m"), or
             a recovery's ("zpa: recovering 120/448 operations in flight at the last stop").
    changes  with `[source] changes` "poll" or "webhook" (README "How changes flow"), a second loop
             every `change_poll_interval`: poll the feed, read the affected users and groups, run
             an incremental cycle per target (never beside that target's full cycle: one lock
             per target), commit the batch once every target took it. A complete snapshot moves
             the watermark to its start; a feed gap, or a feed failing for FEED_FAILING_POLLS
             polls, starts a full cycle now. Webhook mode mounts POST /pingone/events on
             `http_listen`.
    WATCHDOG=1 while the main loop keeps beating (see `daemon.notify`): the idle scheduler beats
             every second, a cycle on every HTTP request that starts or ends and every operation
             applied; a target's Retry-After pause excuses a silent cycle.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
import anyio
from anyio.abc import TaskGroup

from daemon import approvals, logs
from daemon.config import Config, ConfigError, diff_configs, load_config
from daemon.durations import format_duration
from daemon.engine import (
    CycleReport,
    Engine,
    TargetReport,
    TargetRuntime,
    release_free_memory,
)
from daemon.errors import ProvisiondError
from daemon.http_session import DEFAULT_HTTP_CONNECTIONS
from daemon.http_session import http_session as plain_session
from daemon.lock import StateLock, StateLocked
from daemon.metrics import Health, Metrics, serve_http
from daemon.model import Snapshot
from daemon.notify import Heartbeat, Notifier, NotifyAddressError, watchdog, watchdog_timeout
from daemon.source.changes import Carried, ChangeFeed, FeedGap, Inbox, mount_webhook, read_affected
from daemon.store import Store, StoreError

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1          # another daemon holds the state file, or it cannot be opened
EXIT_CONFIG: Final = 78          # EX_CONFIG, as `provisiond once` and `check-config` use it

MEMORY_STATE: Final = ":memory:"       # an in-memory state (tests) is private to its process: no lock
DEFAULT_BEAT_EVERY: Final = 1.0          # seconds: the idle scheduler beats the heartbeat this often
DEFAULT_STATUS_EVERY: Final = 1.0        # seconds between two progress STATUS= updates
SOURCE_FAILING_INTERVALS: Final = 2     # /healthz fails once PingOne has failed for this many intervals,
SOURCE_FAILING_BOUND: Final = 600.0     # or for this long, whichever is shorter (a long interval is a backstop)
SOURCE_RETRY_CAP: Final = 300.0         # an incomplete snapshot is retried at most this far apart (or interval)
TARGET_RETRY_CAP: Final = 3600.0        # a target whose cycle failed is retried at most this far apart
# A target whose full cycle ended so is retried on its own back-off, not at the next interval.
RETRIED_OUTCOMES: Final = ("failed", "crashed", "partial_failure")
# An incremental cycle that ended so (or held removals) left its target without the batch: the
# target's full cycle is owed as soon as it is healthy.
MISSED_OUTCOMES: Final = ("quarantined", "failed", "partial_failure")
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# The change feed failing for this many polls in a row (30 s at the default 5 s) starts a full
# cycle now, and again every as many polls while it lasts: the snapshot is the backstop.
FEED_FAILING_POLLS: Final = 6
# Keys a reload records but cannot apply to a running daemon.
RESTART_KEYS: Final = ("daemon.state_path", "daemon.http_listen")


# -- one daemon per state file ------------------------------------------------------------------


# -- the HTTP chokepoint ------------------------------------------------------------------------


class RequestGate:
    """Counts the service's HTTP requests in flight; once closed, holds every new one.

    It sits in the session's trace hooks, so it sees the PingOne and every target's requests.
    A held request never starts; it waits until the stop cancels the cycle.
    """

    def __init__(self, on_activity: Callable[[], None]) -> None:
        self.in_flight = 0
        self.closed = False
        self._on_activity = on_activity
        self._drained = anyio.Event()

    def trace_config(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._started)
        trace.on_request_end.append(self._ended)
        trace.on_request_exception.append(self._failed)
        return trace

    def close(self) -> None:
        """Hold new requests from now on."""
        self.closed = True
        if self.in_flight == 0:
            self._drained.set()

    async def drained(self) -> None:
        """Return once the gate is closed and no request is in flight."""
        await self._drained.wait()

    async def _started(self, session: aiohttp.ClientSession, ctx: SimpleNamespace,
                       params: aiohttp.TraceRequestStartParams) -> None:
        if self.closed:
            await anyio.sleep_forever()
        self.in_flight += 1
        self._on_activity()

    async def _ended(self, session: aiohttp.ClientSession, ctx: SimpleNamespace,
                     params: aiohttp.TraceRequestEndParams) -> None:
        self._done()

    async def _failed(self, session: aiohttp.ClientSession, ctx: SimpleNamespace,
                      params: aiohttp.TraceRequestExceptionParams) -> None:
        self._done()

    def _done(self) -> None:
        self.in_flight -= 1
        self._on_activity()
        if self.closed and self.in_flight == 0:
            self._drained.set()


def http_session(gate: RequestGate, *, limit: int = DEFAULT_HTTP_CONNECTIONS) -> aiohttp.ClientSession:
    """The daemon's one HTTP session (`daemon.http_session`: TLS verified, pooled), behind `gate`."""
    return plain_session(limit=limit, trace_configs=[gate.trace_config()])


# -- status lines -------------------------------------------------------------------------------


@dataclass(slots=True)
class ApplyProgress:
    """One target's apply, as the engine's progress hook reports it."""

    done: int
    total: int
    first_at: float          # monotonic time of the first report (done == first_done)
    first_done: int


def eta_text(seconds: float) -> str:
    """A short duration for STATUS=: whole seconds, whole minutes from 10 minutes on."""
    whole = max(1, round(seconds))
    if whole >= 600:
        whole = round(whole / 60) * 60
    return format_duration(whole)


def _clock_text(epoch: float) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(epoch))


def report_text(report: CycleReport) -> str:
    """One line for a finished cycle, e.g. "zpa success 12 applied; zia partial_failure 3 failed"."""
    if report.source_error is not None:
        return f"source failed: {report.source_error}"
    parts: list[str] = ["source incomplete"] if report.source_incomplete is not None else []
    for t in report.targets:
        counts = [f"{n} {k}" for k in ("applied", "failed") if (n := t.results.get(k, 0))]
        counts += [f"{t.busy} busy"] if t.busy else []
        parts.append(f"{t.target} {t.outcome}" + (" " + ", ".join(counts) if counts else ""))
    return "; ".join(parts) or "no targets"


def source_bound(config: Config) -> float:
    """Seconds PingOne may fail (no complete snapshot) before /healthz answers 503: two intervals,
    at most SOURCE_FAILING_BOUND (the snapshot is retried on its back-off, whatever the interval)."""
    return min(SOURCE_FAILING_INTERVALS * config.daemon.interval, SOURCE_FAILING_BOUND)


@dataclass(slots=True, frozen=True)
class Backoff:
    """The next attempt of something that failed: when (wall clock), and the wait before it."""

    at: float
    wait: float


def backoff_after(previous: Backoff | None, base: float, cap: float, now: float) -> Backoff:
    """The attempt after a failure: `base` at first, doubling with each failure in a row, at most `cap`."""
    wait = min(cap, base if previous is None else previous.wait * 2)
    return Backoff(now + wait, wait)


# Why a tick starts (`cycle.started`'s `reason`) and, when it is not for every idle target, the
# targets it is for, each with its own reason.
Wake = tuple[str, dict[str, str] | None]


@dataclass(slots=True)
class CycleRun:
    """One tick's snapshot and the target cycles started from it; summarised when all have ended."""

    number: int
    report: CycleReport
    busy: list[str]
    waiting: set[str] = field(default_factory=set)
    everyone: bool = True      # for every idle target (False: an early tick for some of them)


def next_start(started: float, interval: float, jitter: float,
               draw: Callable[[float, float], float] = random.uniform) -> float:
    """When the cycle after one that started at `started` is due: `interval` plus 0..`jitter` later."""
    return started + interval + (draw(0.0, jitter) if jitter > 0 else 0.0)


# -- the service --------------------------------------------------------------------------------


class Service:
    """The run loop, its signals and its notifications, around one Engine."""

    def __init__(self, config_path: str, config: Config, *, notifier: Notifier,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = notifier
        self.watchdog_timeout = watchdog_timeout(environ)
        self.heartbeat = Heartbeat()
        self.log: Any = logs.get_logger()
        self.stopping = False
        self.cycles = 0
        self.last_status = ""
        self._engine: Engine | None = None
        self._gate: RequestGate | None = None
        self._work_scope: anyio.CancelScope | None = None     # the ticks and every target cycle
        self._running: dict[str, int] = {}                      # target -> the cycle number it runs
        self._snapshotting = False
        self._next_at = 0.0                                     # wall-clock time of the next tick
        self._sleep_scope: anyio.CancelScope | None = None
        self._progress: dict[str, ApplyProgress] = {}
        self._status_at = 0.0
        self._last_line = "no cycle yet"
        self.staged: Config | None = None      # a reload held by its impact preview
        self._staged_id: str | None = None     # its id in the state file (`approve --reload` names it)
        self.metrics = Metrics()
        self.health = Health(source_bound=source_bound(config))
        self._locks: dict[str, anyio.Lock] = {}                 # target -> held by its full or incremental cycle
        self.feed_failing_since: float | None = None
        self._feed_fallback_at = 0.0
        self._poll_now: anyio.Event | None = None   # set by the webhook when a batch is stored: poll at once
        self._asked_at_tick = -1                                # the tick after which a full cycle was asked for
        self._asked: Wake | None = None                         # that request (the feed, a reload)
        self._wake_event = anyio.Event()                        # set: look for what is due now
        self._source_retry: Backoff | None = None               # PingOne's next attempt after a bad snapshot
        self._target_retry: dict[str, Backoff] = {}             # a failed target's next attempt
        # (what, target) -> the value of the request or timer a tick already answered (a new
        # approval, token or quarantine has a new value)
        self._answered: dict[tuple[str, str], object] = {}
        self._wake_error: str | None = None

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the engine exists only while run() runs"
        return self._engine

    async def run(self) -> int:
        """Serve until stopped; exit code 0 on a clean stop. StoreError when the state cannot open."""
        self._gate = gate = RequestGate(self.heartbeat.beat)
        with anyio.open_signal_receiver(signal.SIGHUP, *STOP_SIGNALS) as signals:
            store = await Store.open(self.config.daemon.state_path)
            try:
                await approvals.clear_held_reload(store)   # a staged reload does not outlive its process
                async with http_session(gate) as session, AsyncExitStack() as stack:
                    self._engine = engine = Engine(self.config, store, session, log=self.log)
                    engine.progress = self._on_progress
                    engine.recovery = self._on_recovery
                    self.metrics.attach(engine)
                    self.health.attach(engine)
                    engine.observers += [self.metrics.observe, self.health.observe]
                    engine.request_observers.append(self.metrics.observe_request)
                    engine.keep_snapshot = self.config.source.changes != "off"
                    engine.quarantine_base = self.config.daemon.retry_backoff
                    listen = self.config.daemon.http_listen
                    if listen:   # /metrics and /healthz (a change needs a restart)
                        mount, paths = await self._webhook(stack, store)
                        url = await stack.enter_async_context(serve_http(self.metrics, self.health, listen, mount))
                        self.log.info("http.listening", url=url, paths=["/metrics", "/healthz", *paths])
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._handle_signals, signals, tg)
                        if self.watchdog_timeout is not None:
                            tg.start_soon(self._watchdog, self.watchdog_timeout)
                        self.log.info("daemon.ready", pid=os.getpid(), config=self.config_path,
                                      state=self.config.daemon.state_path, targets=[t.name for t in self.config.targets],
                                      interval_s=self.config.daemon.interval, notify=self.notifier.enabled,
                                      watchdog_s=self.watchdog_timeout)
                        if not self.notifier.ready(status="ready; first cycle starting") and self.notifier.enabled:
                            self.log.warning("notify.failed", socket=os.environ.get("NOTIFY_SOCKET"),
                                             hint="systemd did not receive READY=1")
                        await self._schedule()
                        tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await store.close()
        self.log.info("daemon.stopped", cycles=self.cycles)
        return EXIT_OK

    # -- scheduling ---------------------------------------------------------------------------
    #
    # A tick every `interval` (start to start, plus jitter) snapshots PingOne once, then starts a
    # cycle from that snapshot for every target whose previous cycle has ended. Target cycles run
    # side by side in the work group and never wait for one another: a target that hangs or
    # applies slowly misses ticks (`cycle.overrun` with its name) while the others keep theirs.
    # `cycle.summary` is logged when every target cycle started from a tick has ended.

    async def _schedule(self) -> None:
        with anyio.CancelScope() as work_scope:
            self._work_scope = work_scope
            async with anyio.create_task_group() as work:
                work.start_soon(self._follow_changes)
                wake: Wake = ("start", None)
                due = anyio.current_time()
                while not self.stopping:
                    started = anyio.current_time()
                    await self._tick(work, wake)
                    if self.stopping:
                        break
                    daemon = self.engine.config.daemon
                    if wake[1] is None:       # a tick for every target: the interval counts from it
                        due = next_start(started, daemon.interval, daemon.jitter)
                        now = anyio.current_time()
                        if now >= due:
                            self.log.warning("cycle.overrun", cycle_number=self.cycles,
                                             took_s=round(now - started, 3), interval_s=daemon.interval,
                                             overrun_s=round(now - due, 3))
                            wake = ("interval", None)
                            continue
                    self._next_at = time.time() + due - anyio.current_time()
                    self._set_status(self._waiting_text(self._next_at), force=True)
                    wake = await self._sleep_until(due)
        self._work_scope = None

    def _waiting_text(self, next_at: float) -> str:
        running = ", ".join(f"{name} (cycle {number})" for name, number in sorted(self._running.items()))
        head = f"running: {running}; " if running else "idle; "
        return f"{head}last cycle {self._last_line}; next at {_clock_text(next_at)}"

    async def _sleep_until(self, due: float) -> Wake:
        """Wait for the interval's tick at `due`, or for something due earlier (looked for every
        second, and at once when the feed or a reload asks); why the next tick starts."""
        wake: Wake = ("interval", None)
        with anyio.CancelScope() as scope:
            self._sleep_scope = scope
            while (left := due - anyio.current_time()) > 0:
                self.heartbeat.beat()
                self._wake_event = anyio.Event()
                early = await self._due_now_or_none()
                if early is not None:
                    wake = early
                    break
                with anyio.move_on_after(min(left, DEFAULT_BEAT_EVERY)):
                    await self._wake_event.wait()
        self._sleep_scope = None
        self.heartbeat.beat()
        return wake

    # -- early wake-ups (README "When cycles run") ---------------------------------------------

    async def _due_now_or_none(self) -> Wake | None:
        """`_due_now`; a defect or an unreadable state file there is logged (once per error) and
        the wait goes on: the interval still comes."""
        try:
            wake = await self._due_now()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != self._wake_error:
                self.log.error("cycle.crashed", step="wake_check", error=error, exc_info=True)
            self._wake_error = error
            return None
        self._wake_error = None
        return wake

    async def _due_now(self) -> Wake | None:
        """What cannot wait for the interval, if anything is due now: a request of the feed or a
        reload, PingOne's retry, what other processes asked for (approve, resync), a target's
        quarantine or back-off ending, a target that missed changes."""
        self._check_state_file()
        now = time.time()
        source_waits = self._source_retry is not None and now < self._source_retry.at
        if self._asked is not None:
            asked, self._asked = self._asked, None
            if not source_waits:       # else PingOne's retry is that full cycle
                return asked
        if self._source_retry is not None and not source_waits:
            return ("source_retry", None)
        engine = self.engine
        asked_for = await approvals.requests(engine.store)
        if self.staged is not None and asked_for.reload_approved == self._staged_id:
            await self._adopt_staged_if_approved()
            return ("reload_approved", None)
        if asked_for.accept_shrink is not None and self._answered.get(("shrink", "")) != asked_for.accept_shrink:
            self._answered[("shrink", "")] = asked_for.accept_shrink
            return ("shrink_approved", None)
        chosen: dict[str, str] = {}
        for name, rt in engine.runtimes.items():
            if name not in self._running:
                reason = self._target_due(name, rt, asked_for, now, automatic=not source_waits)
                if reason is not None:
                    chosen[name] = reason
        if not chosen:
            return None
        return (next(iter(chosen.values())), chosen)

    def _target_due(self, name: str, rt: TargetRuntime, asked_for: approvals.Requests, now: float, *,
                    automatic: bool) -> str | None:
        """Why this idle target's cycle is due now, or None. Nothing is due while it is in
        quarantine (its cycle would be skipped); an operator's request is due at once, a retry
        when its back-off ends, missed changes once it is past its back-off."""
        answered = self._answered
        q = rt.quarantine
        if q.active(now):
            return None
        granted = asked_for.approved.get(name)
        if granted is not None and answered.get(("approved", name)) != granted:
            return "approved"
        token = asked_for.resync.get(name)
        if token is not None and answered.get(("resync", name)) != token:
            return "resync"
        if not automatic:
            return None
        if q.reason is not None and answered.get(("quarantine", name)) != q.until:
            return "quarantine_expired"
        retry = self._target_retry.get(name)
        if retry is not None:
            if now < retry.at:
                return None
            if answered.get(("retry", name)) != retry.at:
                return "target_retry"
        missed = asked_for.missed.get(name)
        if missed is not None and answered.get(("missed", name)) != missed:
            return "missed_changes"
        return None

    def _answer(self, name: str, asked_for: approvals.Requests) -> None:
        """A tick starts this target's cycle: what is asked of it now is answered by it."""
        answered = self._answered
        for what, value in (("approved", asked_for.approved.get(name)), ("resync", asked_for.resync.get(name)),
                            ("missed", asked_for.missed.get(name))):
            if value is not None:
                answered[(what, name)] = value
        now = time.time()
        rt = self.engine.runtimes.get(name)
        if rt is not None and rt.quarantine.reason is not None and not rt.quarantine.active(now):
            answered[("quarantine", name)] = rt.quarantine.until     # tried now (a skip is no try)
        retry = self._target_retry.get(name)
        if retry is not None and now >= retry.at:
            answered[("retry", name)] = retry.at

    async def _tick(self, work: TaskGroup, wake: Wake = ("interval", None)) -> None:
        """Snapshot PingOne, then start a cycle from it for every target not still in one (or,
        for an early tick, for the idle targets it is for)."""
        await self._adopt_staged_if_approved()
        self._check_state_file()
        self.cycles += 1
        number = self.cycles
        self.heartbeat.beat()
        engine = self.engine
        reason, only = wake
        if only is None:
            self._asked = None     # this tick is the full cycle the feed or a reload asked for
                                   # (one asked while its snapshot is taken is kept: see _full_cycle_now)
        self._set_status(f"cycle {number} running; last cycle {self._last_line}", force=True)
        report = CycleReport(started=time.time())
        self.log.info("cycle.started", cycle_number=number, reason=reason,
                      targets=[name for name in engine.runtimes if only is None or name in only],
                      busy=sorted(self._running), **({"reasons": only} if only is not None else {}))
        self._snapshotting = True
        try:
            taken = await engine.source_step(report)
        except anyio.get_cancelled_exc_class():
            self.log.warning("cycle.interrupted", cycle_number=number, took_s=round(time.time() - report.started, 3),
                             reason="stopping", step="snapshot", hint="unfinished operations resume at the next start")
            self._last_line = f"{_clock_text(report.started)} interrupted by stop"
            raise
        except Exception as exc:   # a defect or a broken state file: log it, retry on PingOne's back-off
            self.log.error("cycle.crashed", cycle_number=number, step="snapshot",
                           error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._last_line = f"{_clock_text(report.started)} crashed: {type(exc).__name__}"
            self._source_failed()
            return
        finally:
            self._snapshotting = False
        self._record_source(report)
        if taken is None or not taken[1]:
            self._source_failed()          # unread, incomplete or shrunk: removals wait for a retry
        else:
            self._source_retry = None
        if taken is not None and taken[1] and report.source_problem is None \
                and engine.config.source.changes != "off":
            # Every change before the snapshot began is in it; the feed follows from there.
            await self._feed_from(taken[0].started_at or report.started, everyone=only is None)
        # Which targets take this snapshot is decided now that it is here: one whose cycle ended
        # while it was taken does.
        chosen = [name for name in engine.runtimes if only is None or name in only]
        idle = [name for name in chosen if name not in self._running]
        busy = [name for name in chosen if name in self._running]
        run = CycleRun(number, report, busy=busy, everyone=only is None)
        asked_for = await approvals.requests(engine.store)
        for name in idle:
            self._answer(name, asked_for)
        for name in busy:      # at warning for the first tick a cycle misses, at debug for the next ones
            first_miss = self._running[name] == number - 1
            (self.log.warning if first_miss else self.log.debug)(
                "cycle.overrun", cycle_number=number, target=name, running_cycle=self._running[name],
                hint="this target's cycle is still running; it takes the next snapshot after it ends")
        if taken is not None:
            snapshot, complete = taken
            for name in idle:
                run.waiting.add(name)
                self._running[name] = number
                work.start_soon(self._target_cycle, run, engine.runtimes[name], snapshot, complete)
        if not run.waiting:
            self._summarize(run)

    async def _target_cycle(self, run: CycleRun, rt: TargetRuntime, snapshot: Snapshot, complete: bool) -> None:
        name = rt.config.name
        self._progress.pop(name, None)
        result: TargetReport
        try:
            async with self._lock(name):
                result = await self.engine.target_cycle(rt, snapshot, complete)
                if complete and self.engine.config.source.changes != "off":
                    # This target now holds the snapshot's view: what changed since it began is
                    # handed on again, and the next poll brings the target up to date.
                    await self._feed_from(snapshot.started_at or run.report.started, everyone=run.everyone)
                if complete and result.outcome in ("success", "partial_failure"):
                    await self._changes_caught_up(name, snapshot.started_at or run.report.started)
        except anyio.get_cancelled_exc_class():
            self.log.warning("cycle.interrupted", cycle_number=run.number, target=name,
                             took_s=round(time.time() - run.report.started, 3), reason="stopping",
                             hint="unfinished operations resume at the next start")
            self._last_line = f"{_clock_text(run.report.started)} interrupted by stop"
            raise
        except Exception as exc:   # a defect or a broken state file: logged, the next tick tries again
            self.log.error("cycle.crashed", cycle_number=run.number, target=name,
                           error=f"{type(exc).__name__}: {exc}", exc_info=True)
            result = TargetReport(name, None, "crashed")
        finally:
            if self._running.get(name) == run.number:
                del self._running[name]
            self._progress.pop(name, None)
            self.heartbeat.beat()
            self._wake_event.set()     # a request that waited for this target's cycle to end
        self._retry_later(name, result.outcome)
        run.report.targets.append(result)
        run.waiting.discard(name)
        if not run.waiting:
            self._summarize(run)
        if self._sleep_scope is not None and not self.stopping:     # between ticks: say what is left
            self._set_status(self._waiting_text(self._next_at), force=True)

    def _summarize(self, run: CycleRun) -> None:
        report = run.report
        report.finished = time.time()
        report.targets.sort(key=lambda t: t.target)
        took = round(report.finished - report.started, 3)
        self._last_line = f"{_clock_text(report.started)} ({took:g}s): {report_text(report)}"
        self.log.info("cycle.summary", cycle_number=run.number, took_s=took, outcome=report.outcome,
                      failed=sum(t.failed for t in report.targets), source_error=report.source_problem,
                      targets=[t.target for t in report.targets], busy=run.busy,
                      results={t.target: {"outcome": t.outcome, **t.results} for t in report.targets})
        release_free_memory()

    def _source_failed(self) -> None:
        """PingOne gave no complete (or an unacceptably shrunk) snapshot: the next full attempt
        comes on a back-off, not at the interval."""
        daemon = self.engine.config.daemon
        self._source_retry = backoff_after(self._source_retry, daemon.retry_backoff,
                                           min(daemon.interval, SOURCE_RETRY_CAP), time.time())

    def _retry_later(self, name: str, outcome: str) -> None:
        """A target whose full cycle failed (not quarantined: its quarantine is its back-off) is
        retried on its own back-off; one that succeeded, or has its quarantine, drops it."""
        if outcome in RETRIED_OUTCOMES:
            daemon = self.engine.config.daemon
            self._target_retry[name] = backoff_after(self._target_retry.get(name), daemon.retry_backoff,
                                                     TARGET_RETRY_CAP, time.time())
        else:
            self._target_retry.pop(name, None)

    async def _missed_changes(self, name: str, outcome: str, held: int) -> None:
        """An incremental cycle left this target without its batch (the batch is committed for the
        others): say so in the state file, so that its full cycle runs as soon as it is healthy,
        after a restart too."""
        key = f"{approvals.META_MISSED_CHANGES}.{name}"
        store = self.engine.store
        first = not await store.get_meta(key)
        await store.set_meta(key, repr(time.time()))
        (self.log.warning if first else self.log.debug)(
            "changes.missed", target=name, outcome=outcome, held=held,
            hint="this target's full cycle runs as soon as it is healthy")
        self._wake_event.set()

    async def _changes_caught_up(self, name: str, snapshot_started: float) -> None:
        """A full cycle of this target from a snapshot begun after it last missed changes: it holds them."""
        key = f"{approvals.META_MISSED_CHANGES}.{name}"
        store = self.engine.store
        value = await store.get_meta(key)
        if not value:
            return
        try:
            missed = float(value)
        except ValueError:
            missed = 0.0
        if missed <= snapshot_started:
            await store.delete_meta(key)

    async def _feed_from(self, moment: float, *, everyone: bool) -> None:
        """A complete snapshot begun at `moment`: the feed follows from there. From an early tick
        for some targets only, the watermark only moves back (the others have not taken it)."""
        feed = ChangeFeed(self.engine.source, self.engine.store)
        if not everyone:
            mark = await feed.watermark()
            if mark is not None:
                moment = min(moment, mark)
        await feed.start_at(moment)

    def _record_source(self, report: CycleReport) -> None:
        """Health and the source gauge follow every snapshot; the journal, only its transitions."""
        problem = report.source_problem
        was_failing = self.health.source_error is not None
        self.health.record_source(problem, since=report.started)
        self.metrics.observe_source(problem is None)
        self.metrics.record_source(problem)
        if problem is not None and not was_failing:
            self.log.error("source.failing", error=problem, failing_after_s=self.health.source_bound,
                           hint="removals are deferred; /healthz turns 503 once it has failed for failing_after_s")
        elif problem is None and was_failing:
            self.log.info("source.recovered")

    def _check_state_file(self) -> None:
        """The state file must still be the one the daemon opened (inode check, every tick)."""
        problem = self.engine.store.file_problem()
        if problem is not None and problem != self.health.state_problem:
            self.log.error("state.replaced", path=self.engine.store.path, problem=problem,
                           hint="what the daemon writes now is lost at its next start; restart it")
        elif problem is None and self.health.state_problem is not None:
            self.log.info("state.restored", path=self.engine.store.path)
        self.health.state_problem = problem

    # -- the change feed (README "How changes flow") ------------------------------------------

    def _lock(self, target: str) -> anyio.Lock:
        """The one lock a target's full and incremental cycles share: never two writers at once."""
        return self._locks.setdefault(target, anyio.Lock())

    async def _webhook(self, stack: AsyncExitStack, store: Store) -> tuple[Callable[[Any], None] | None, list[str]]:
        """Webhook mode: the inbox (its own SQLite connection) and the route to mount on http_listen."""
        src = self.config.source
        if src.changes != "webhook" or src.webhook_secret is None:
            return None, []
        inbox = await Inbox.open(store.path)
        stack.push_async_callback(inbox.close)
        secret = src.webhook_secret.reveal()
        return (lambda app: mount_webhook(app, inbox, secret, on_stored=self._wake_poll)), ["/pingone/events"]

    def _wake_poll(self) -> None:
        if self._poll_now is not None:
            self._poll_now.set()

    async def _follow_changes(self) -> None:
        """One poll of the feed every `change_poll_interval`, start to start (a poll's own work
        is not added to the wait), applied to every target; in webhook mode also at once when a
        batch was stored."""
        next_audit = anyio.current_time() + self.engine.config.source.change_poll_interval
        self._poll_now = anyio.Event()
        while not self.stopping:
            with anyio.move_on_after(max(0.0, next_audit - anyio.current_time())):
                await self._poll_now.wait()
            self._poll_now = anyio.Event()     # a batch stored from now on wakes the next round
            # The audit log is read on the timer only; a webhook wake-up reads just the inbox, so a
            # storm of deliveries never multiplies the requests PingOne sees.
            audit = anyio.current_time() >= next_audit
            if audit:
                next_audit = anyio.current_time() + self.engine.config.source.change_poll_interval
            engine = self.engine
            if self.stopping or engine.config.source.changes == "off" or engine.last_snapshot is None:
                continue          # no full snapshot yet (start, reload): the next tick takes one
            try:
                await self._apply_changes(audit=audit)
            except FeedGap as exc:
                self.log.warning("changes.gap", error=str(exc), hint="a full cycle starts now")
                self._full_cycle_now("feed_gap")
            except (ProvisiondError, OSError) as exc:
                self._feed_failed(exc)
            except Exception as exc:   # a defect: logged, the loop and the daemon go on
                self.log.error("changes.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
                self._feed_failed(exc)
            else:
                if audit and self.feed_failing_since is not None:
                    self.log.info("changes.recovered", failed_for_s=round(time.time() - self.feed_failing_since, 1))
                    self.feed_failing_since = None

    def _feed_failed(self, exc: Exception) -> None:
        """Logged when it starts failing; a full cycle once it has failed FEED_FAILING_POLLS polls."""
        now = time.time()
        bound = FEED_FAILING_POLLS * self.engine.config.source.change_poll_interval
        if self.feed_failing_since is None:
            self.feed_failing_since = now
            self._feed_fallback_at = now + bound
            self.log.error("changes.failing", error=f"{type(exc).__name__}: {exc}", fallback_after_s=bound,
                           hint="changes wait for the next full cycle")
        elif now >= self._feed_fallback_at:
            self._feed_fallback_at = now + bound
            self.log.warning("changes.fallback", error=f"{type(exc).__name__}: {exc}",
                             failing_s=round(now - self.feed_failing_since, 1), hint="a full cycle starts now")
            self._full_cycle_now("feed_failing")

    def _full_cycle_now(self, reason: str) -> None:
        """End the wait between ticks (if waiting): the next full cycle, for every idle target,
        starts at once (`reason` in its `cycle.started`). Asked once per tick, and not before
        PingOne's retry while its snapshots fail: a gap that a full cycle cannot close (an
        incomplete snapshot) does not turn the schedule into back-to-back snapshots. A reload
        asks during a snapshot too: that snapshot was taken for the old config."""
        if self.stopping:
            return
        if reason == "reload" or (self._sleep_scope is not None and self._asked_at_tick != self.cycles):
            self._asked_at_tick = self.cycles
            self._asked = (reason, None)
            self._wake_event.set()

    async def _apply_changes(self, *, audit: bool = True) -> None:
        """One poll: read what the batch names, an incremental cycle per target, then commit.

        A target running its full cycle is left out and the batch is not committed: the next
        poll hands it on again (applying it twice changes nothing). A target quarantined or
        failing in its incremental cycle, or holding its removals, misses the batch: it is
        committed for the others, and that target's full cycle is owed (`_missed_changes`)."""
        engine = self.engine
        feed = ChangeFeed(engine.source, engine.store)
        batch = await feed.poll() if audit else await feed.poll(audit=False)
        if batch.activities:
            await feed.note(batch)            # `why USER`: pending until committed
        complete = True
        carried: dict[str, Carried] = {}
        if batch.changes:
            reads = await read_affected(engine.source, batch.changes)
            inc = await engine.merge_changes(reads, batch.changes.first_recorded)
            if inc is None:
                await feed.note(batch, detail="waiting for a full snapshot to merge into")
                return
            for name, rt in list(engine.runtimes.items()):
                if name in self._running or self._lock(name).locked():
                    complete = False
                    carried[name] = Carried(None, "busy with its full cycle")
                    continue
                async with self._lock(name):
                    report = await engine.incremental_cycle(rt, inc)
                    held = int(report.summary.get("held") or 0)
                    if held and report.cycle_id is not None:      # what the latest full plan holds is not missed
                        held = await approvals.held_anew(engine.store, name, report.cycle_id)
                    if report.outcome in MISSED_OUTCOMES or held:
                        await self._missed_changes(name, report.outcome, held)
                carried[name] = Carried(report.cycle_id, report.outcome if not report.busy else
                                        f"{report.outcome}; {report.busy} held by another process")
                self.heartbeat.beat()
                if report.outcome == "aborted" or report.busy:
                    complete = False     # an entity another process held: the next poll hands it on again
        if complete:
            await feed.commit(batch, carried)
        elif batch.activities:
            await feed.note(batch, detail="not committed: the next poll hands it on again", carried=carried)
        lag = await feed.lag()
        if lag is not None:
            self.metrics.record_feed_lag(lag)

    # -- signals ------------------------------------------------------------------------------

    async def _handle_signals(self, signals: AsyncIterator[signal.Signals], tg: TaskGroup) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self.stopping:
                    continue
                await self.reload()
            elif self.stopping:
                self.log.warning("daemon.stop_forced", signal=signal.Signals(signum).name,
                                 in_flight=self._gate.in_flight if self._gate else None)
                sys.stdout.flush()
                os._exit(128 + int(signum))
            else:
                self.stop(signal.Signals(signum).name, tg)

    def stop(self, reason: str, tg: TaskGroup) -> None:
        """Stop scheduling, hold new requests, and cancel the cycle once its requests are done."""
        self.stopping = True
        grace = self.engine.config.daemon.grace_period
        in_flight = self._gate.in_flight if self._gate else 0
        self.notifier.stopping(status=f"stopping ({reason}); {in_flight} request(s) in flight")
        self.log.info("daemon.stopping", signal=reason, grace_period_s=grace, in_flight=in_flight,
                      cycle_running=self._snapshotting or bool(self._running), targets_running=sorted(self._running))
        if self._gate is not None:
            self._gate.close()
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()
        if self._work_scope is not None:
            tg.start_soon(self._drain_then_cancel, self._work_scope, grace)

    async def _drain_then_cancel(self, cycle: anyio.CancelScope, grace: float) -> None:
        assert self._gate is not None
        started = anyio.current_time()
        with anyio.move_on_after(grace) as waited:
            await self._gate.drained()
        if waited.cancelled_caught:
            self.log.warning("daemon.grace_expired", grace_period_s=grace, in_flight=self._gate.in_flight)
        else:
            self.log.info("daemon.drained", waited_s=round(anyio.current_time() - started, 3))
        cycle.cancel()

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config and its secrets; True when the new one was taken.

        Before it is taken, the new config is planned against the last snapshot: one that
        would remove more than a target's `max_deletes` is staged, not taken
        (`config.reload_held`), until `provisiond approve --reload`.
        """
        self.notifier.reloading(status="reloading configuration")
        engine = self.engine
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
        except ConfigError as exc:
            self.log.error("config.reload_failed", path=self.config_path, error=str(exc),
                           kept="the running configuration")
            self.notifier.ready(status=f"reload failed, old config kept: {exc}")
            return False
        try:
            impact = await engine.preview_reload(new)
        except Exception as exc:   # the preview must never cost the reload itself
            self.log.warning("config.preview_failed", error=f"{type(exc).__name__}: {exc}")
            impact = {}
        held = {name: i for name, i in impact.items() if i["held"]}
        if held:
            self.staged = new
            self._staged_id = await approvals.record_held_reload(engine.store, self.config_path, held)
            self.log.warning("config.reload_held", path=self.config_path, impact=held,
                             hint="provisiond approve --reload activates it; the running config stays")
            self.notifier.ready(status="reload held: it would remove more than max_deletes; "
                                       "`provisiond approve --reload` activates it")
            return False
        if self.staged is not None:
            self.staged = self._staged_id = None
            await approvals.clear_held_reload(engine.store)
        return self._adopt(new, impact)

    async def _adopt_staged_if_approved(self) -> None:
        if self.staged is None or not await approvals.reload_approved(self.engine.store, self._staged_id):
            return
        staged, self.staged, self._staged_id = self.staged, None, None
        await approvals.clear_held_reload(self.engine.store)
        self.log.info("config.reload_approved", path=self.config_path)
        self._adopt(staged, {})

    def _adopt(self, new: Config, impact: dict[str, dict[str, Any]]) -> bool:
        """Take `new` from the next cycle on; resize live limits of a running cycle now."""
        engine = self.engine
        old = engine.config
        previous = dict(engine.runtimes)
        try:
            engine.reconfigure(new)
        except Exception as exc:   # a runtime the new config cannot build: keep the old whole
            engine.runtimes = previous
            engine.config = old
            self.log.error("config.reload_failed", path=self.config_path, error=f"{type(exc).__name__}: {exc}",
                           kept="the running configuration")
            self.notifier.ready(status="reload failed, old config kept")
            return False
        # A running cycle holds the previous runtimes: give them the new limits now.
        resized: dict[str, dict[str, float]] = {}
        for name, runtime in engine.runtimes.items():
            before = previous.get(name)
            if before is None or before is runtime:
                continue
            target = runtime.config
            limits = {"concurrency": target.concurrency, "requests_per_second": target.requests_per_second,
                      "burst": target.burst}
            if limits != {"concurrency": before.config.concurrency,
                          "requests_per_second": before.config.requests_per_second, "burst": before.config.burst}:
                before.governor.resize(target.requests_per_second, target.burst)
                before.limiter.total_tokens = target.concurrency
                resized[name] = limits
        logs.configure(fmt=new.daemon.log_format, level=new.daemon.log_level,
                       secrets=(*old.secrets(), *new.secrets()))
        self.log = logs.get_logger()
        engine.log = self.log
        self.config = new
        self.health.source_bound = source_bound(new)
        engine.quarantine_base = new.daemon.retry_backoff
        diff = diff_configs(old, new)
        restart = [key for key in diff["changed"] if key in RESTART_KEYS]
        self.log.info("config.reloaded", path=self.config_path, **diff, resized=resized,
                      **({"restart_required": restart} if restart else {}),
                      **({"impact": impact} if impact else {}))
        for warning in new.warnings:
            self.log.warning("config.warning", warning=warning)
        self.notifier.ready(status=f"reloaded; last cycle {self._last_line}")
        rebuilt = any(previous.get(name) is not runtime for name, runtime in engine.runtimes.items())
        if self.cycles and (rebuilt or new.source != old.source):
            # A target's scope, mapping or connection changed (and the change feed waits for a full
            # snapshot): its cycle under the new config does not wait for the interval.
            self._full_cycle_now("reload")
        return True

    # -- status and health --------------------------------------------------------------------

    def _on_progress(self, target: str, done: int, total: int) -> None:
        self.heartbeat.beat()
        self.metrics.progress(target, done, total)
        now = anyio.current_time()
        entry = self._progress.get(target)
        if entry is None or entry.total != total or done < entry.done:
            self._progress[target] = ApplyProgress(done, total, now, done)
        else:
            entry.done = done
        if now - self._status_at >= DEFAULT_STATUS_EVERY or done == total:
            self._set_status(f"cycle {self.cycles}: " + self.progress_text(now), force=done == total)

    def _on_recovery(self, target: str, done: int, total: int) -> None:
        self.heartbeat.beat()
        self.health.record_recovery(target, done, total)
        now = anyio.current_time()
        if now - self._status_at >= DEFAULT_STATUS_EVERY or done in (0, total):
            self._set_status(f"cycle {self.cycles}: {target}: recovering {done}/{total} operations in flight "
                             "at the last stop", force=done in (0, total))

    def progress_text(self, now: float) -> str:
        """ "zpa: applying 1200/5000, ETA 2m; zia: applied 10/10" for the targets applying now."""
        parts: list[str] = []
        for target, p in self._progress.items():
            if p.done >= p.total:
                parts.append(f"{target}: applied {p.done}/{p.total}")
                continue
            remaining = p.total - p.done
            elapsed = now - p.first_at
            if p.done > p.first_done and elapsed > 0:
                eta = remaining * elapsed / (p.done - p.first_done)
            else:
                runtime = self.engine.runtimes.get(target)
                eta = self.engine.eta(runtime, remaining) if runtime is not None else 0.0
            parts.append(f"{target}: applying {p.done}/{p.total}, ETA {eta_text(eta)}")
        return "; ".join(parts)

    def _set_status(self, text: str, *, force: bool = False) -> None:
        now = anyio.current_time()
        if not force and now - self._status_at < DEFAULT_STATUS_EVERY:
            return
        self._status_at = now
        self.last_status = text
        self.notifier.status(text)

    async def _watchdog(self, window: float) -> None:
        await watchdog(self.notifier, window, self.heartbeat, log=self.log, excused=self._told_to_wait)

    def _told_to_wait(self) -> bool:
        """A target asked for silence (Retry-After): a quiet cycle is not a wedged one."""
        return any(rt.governor.paused_for > 0 for rt in self.engine.runtimes.values())


# -- the command --------------------------------------------------------------------------------


def run_service(config_path: str) -> int:
    """The `run` command: 0 after a clean stop, 1 when the state is locked or unusable, 78 bad config."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"provisiond: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(fmt=config.daemon.log_format, level=config.daemon.log_level, secrets=config.secrets())
    log = logs.get_logger()
    for warning in config.warnings:
        log.warning("config.warning", warning=warning)
    try:
        notifier = Notifier.from_environ()
    except NotifyAddressError as exc:
        print(f"provisiond: {exc}; notifications disabled", file=sys.stderr)
        notifier = Notifier(None)
    lock = StateLock(config.daemon.state_path)
    try:
        if config.daemon.state_path != MEMORY_STATE:
            lock.acquire()
    except StateLocked as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"provisiond: state: cannot lock {lock.path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return anyio.run(Service(config_path, config, notifier=notifier).run)
    except StoreError as exc:
        print(f"provisiond: state: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()
        notifier.close()
