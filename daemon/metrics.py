"""Metrics and health for monitoring: `/metrics` (Prometheus text) and `/healthz`, over aiohttp.

Wiring (the service does this once, after it built its Engine):

    metrics = Metrics()                          # its own CollectorRegistry, never the global one
    health = Health()
    metrics.attach(engine); health.attach(engine)
    engine.observers += [metrics.observe, health.observe]
    engine.progress = metrics.progress           # (or call it from the service's own hook)
    async with serve_http(metrics, health, config.daemon.http_listen) as url: ...

What is measured, from the engine's observer events (`daemon.applier` entity events and
`cycle.finished`) and, at scrape time, from the live clients' counters:

    provisiond_operations_total{target,op,outcome}          counter   op = "user.create", ...
    provisiond_operation_duration_seconds{target,op}        histogram from each event's duration_ms
    provisiond_http_requests_total{target}                  counter   requests sent (incl. retries)
    provisiond_http_429_total{target}                       counter   429 answers (source: "pingone")
    provisiond_http_retries_total{target}                   counter
    provisiond_queue_depth{target}                          gauge     operations left in the apply
    provisiond_cycles_total{target,outcome}                 counter
    provisiond_cycle_duration_seconds{target}               histogram
    provisiond_entities_left_busy_total{target,kind}        counter   entities a full cycle left unwritten:
                                                                      another process held them (kind user|group)
    provisiond_last_success_timestamp_seconds{target}       gauge     end of the last successful cycle
    provisiond_source_last_complete_timestamp_seconds       gauge     end of the last complete snapshot
    provisiond_propagation_latency_seconds{target}          histogram PingOne updatedAt (or, on the change
                                                                      feed, the activity's recordedAt) -> applied
    provisiond_change_feed_lag_seconds                      gauge     now - the feed's watermark, at each poll
    provisiond_removals_held{target}                        gauge     removals the last cycle held
    provisiond_target_quarantined{target}                   gauge     1 while the target is quarantined
    provisiond_source_up                                    gauge     1 when the last snapshot read PingOne
    provisiond_cycle_interval_seconds                       gauge     the configured `interval`
    provisiond_build_info{version}                          gauge     always 1

The alert rules in `contrib/prometheus/provisiond-alerts.yml` read these (a test checks that
every metric a rule names is exported).

Propagation latency counts only users whose `updatedAt` is later than the moment metrics began
(`since`): a user changed while the daemon was down, or first provisioned years after its last
change, says nothing about how fast provisiond is.
"""

from __future__ import annotations

import importlib.metadata
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

DEFAULT_LISTEN = "127.0.0.1:9477"
NAMESPACE = "provisiond"
SOURCE_LABEL = "pingone"
OPERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CYCLE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Around the change feed's seconds (p95 target 10 s) finely, then out to the full cycle's day.
PROPAGATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                       86400.0)
# Last-cycle outcomes that make /healthz answer 503. `partial_failure` (some entities failed, the
# target works) is reported as "degraded" with 200: one refused user must not page anyone.
DEFAULT_UNHEALTHY_OUTCOMES = frozenset({"quarantined", "failed", "aborted"})
# Last-cycle outcomes that are "degraded" (200): the target works, not everything was done. An
# incomplete snapshot turns /healthz 503 only once the source has failed for `source_bound`.
DEGRADED_OUTCOMES = frozenset({"partial_failure", "source_incomplete"})
CYCLE_FINISHED = "cycle.finished"
DEFAULT_SHUTDOWN_TIMEOUT = 1.0   # seconds a scrape in progress may take to finish at stop
_STAT_KEYS = (("requests", "http_requests"), ("429", "http_429"), ("retries", "http_retries"))


def parse_timestamp(text: str) -> float | None:
    """Epoch seconds of a PingOne timestamp ("2024-05-01T10:00:00.123Z"); None when unparsable."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class _ClientStats(Collector):
    """Request, 429 and retry counts read from the live clients at scrape time.

    A reload builds new clients whose counters start at zero: what the old ones counted is carried
    over, so the exported counters never go down."""

    def __init__(self) -> None:
        self.engine: Any = None
        self._carried: dict[tuple[str, str], float] = {}
        self._seen: dict[str, tuple[int, dict[str, float]]] = {}

    def _clients(self) -> Iterable[tuple[str, Any]]:
        if self.engine is None:
            return []
        out: list[tuple[str, Any]] = [(SOURCE_LABEL, self.engine.source)]
        out.extend((name, rt.client) for name, rt in self.engine.runtimes.items())
        return out

    def collect(self) -> Iterable[Metric]:
        families = {key: CounterMetricFamily(f"{NAMESPACE}_{name}", _HELP[name], labels=["target"])
                    for key, name in _STAT_KEYS}
        for label, client in self._clients():
            stats: Mapping[str, float] = getattr(client, "stats", {})
            now = {key: float(stats.get(key, 0)) for key, _ in _STAT_KEYS}
            seen = self._seen.get(label)
            if seen is not None and seen[0] != id(client):
                for key, value in seen[1].items():
                    self._carried[(label, key)] = self._carried.get((label, key), 0.0) + value
            self._seen[label] = (id(client), now)
            for key, _ in _STAT_KEYS:
                families[key].add_metric([label], self._carried.get((label, key), 0.0) + now[key])
        return list(families.values())


def build_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare source tree)."""
    try:
        return importlib.metadata.version("provisiond")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _OperatorGauges(Collector):
    """What the shipped alert rules read: held removals and quarantine per target, whether the
    source answers, the configured interval and the build.

    Quarantine is read from the engine at scrape time: 1 from the moment a target is quarantined
    until a cycle with it succeeds again (between back-off retries too, unlike /healthz, which
    is 503 only while the back-off runs), so that an alert's `for:` does not restart at each
    retry. Held removals are the last finished cycle's count, kept while a target is skipped."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.held: dict[str, float] = {}
        self.source_up: float | None = None
        self.feed_lag: float | None = None
        self.version = build_version()

    def observe_cycle(self, target: str, fields: Mapping[str, Any]) -> None:
        summary = fields.get("summary")
        if isinstance(summary, Mapping) and isinstance(summary.get("held"), int):
            self.held[target] = float(summary["held"])

    def collect(self) -> Iterable[Metric]:
        held = GaugeMetricFamily(f"{NAMESPACE}_removals_held",
                                 "Removals the last cycle held above max_deletes (release: provisiond approve).",
                                 labels=["target"])
        quarantined = GaugeMetricFamily(f"{NAMESPACE}_target_quarantined",
                                        "1 from a target's quarantine (auth refused, mostly failing) until "
                                        "a cycle succeeds with it again.", labels=["target"])
        runtimes: Mapping[str, Any] = self.engine.runtimes if self.engine is not None else {}
        for name in sorted(set(runtimes) | set(self.held)):
            held.add_metric([name], self.held.get(name, 0.0))
            rt = runtimes.get(name)
            quarantined.add_metric([name], 1.0 if rt is not None and rt.quarantine.reason is not None else 0.0)
        out: list[Metric] = [held, quarantined]
        if self.feed_lag is not None:
            out.append(GaugeMetricFamily(f"{NAMESPACE}_change_feed_lag_seconds",
                                         "Seconds between now and the change feed's watermark, at the last poll "
                                         "(absent until the feed has been polled).", value=self.feed_lag))
        if self.source_up is not None:
            out.append(GaugeMetricFamily(f"{NAMESPACE}_source_up",
                                         "1 when the last snapshot read PingOne, 0 when it failed.",
                                         value=self.source_up))
        if self.engine is not None:
            out.append(GaugeMetricFamily(f"{NAMESPACE}_cycle_interval_seconds",
                                         "The configured time between cycle starts ([daemon] interval).",
                                         value=float(self.engine.config.daemon.interval)))
        info = GaugeMetricFamily(f"{NAMESPACE}_build_info", "The running provisiond's version; always 1.",
                                 labels=["version"])
        info.add_metric([self.version], 1.0)
        out.append(info)
        return out


_HELP = {
    "http_requests": "HTTP requests sent, retries included.",
    "http_429": "HTTP 429 (rate limited) answers received.",
    "http_retries": "HTTP requests retried after a transient failure.",
}


class Metrics:
    """The daemon's metrics, in a registry of their own."""

    def __init__(self, *, since: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.since = time.time() if since is None else since
        r = self.registry
        self.operations = Counter("operations", "Operations applied, failed or skipped, by target, op and outcome.",
                                  ["target", "op", "outcome"], namespace=NAMESPACE, registry=r)
        self.operation_seconds = Histogram("operation_duration_seconds",
                                           "Time to apply one operation, retries included.", ["target", "op"],
                                           namespace=NAMESPACE, registry=r, buckets=OPERATION_BUCKETS)
        self.queue = Gauge("queue_depth", "Operations left in the apply running now.", ["target"],
                           namespace=NAMESPACE, registry=r)
        self.cycles = Counter("cycles", "Target cycles by outcome.", ["target", "outcome"],
                              namespace=NAMESPACE, registry=r)
        self.cycle_seconds = Histogram("cycle_duration_seconds", "Duration of one target's cycle.", ["target"],
                                       namespace=NAMESPACE, registry=r, buckets=CYCLE_BUCKETS)
        self.last_success = Gauge("last_success_timestamp_seconds", "End of the last successful cycle.",
                                  ["target"], namespace=NAMESPACE, registry=r)
        self.propagation = Histogram("propagation_latency_seconds",
                                     "From a user's PingOne updatedAt to its change applied in the target.",
                                     ["target"], namespace=NAMESPACE, registry=r, buckets=PROPAGATION_BUCKETS)
        self.request_seconds = Histogram("http_request_duration_seconds",
                                         "One HTTP attempt to a target, from send to the body read.",
                                         ["target", "method", "status"], namespace=NAMESPACE, registry=r,
                                         buckets=OPERATION_BUCKETS)
        self.entities_left_busy = Counter(
            "entities_left_busy", "Entities a full cycle left unwritten because another provisiond process "
            "held them after its wait (busy_wait); the target is retried on its back-off.", ["target", "kind"],
            namespace=NAMESPACE, registry=r)
        self.source_complete = Gauge("source_last_complete_timestamp_seconds",
                                     "End of the last cycle whose PingOne snapshot was complete.",
                                     namespace=NAMESPACE, registry=r)
        self._clients = _ClientStats()
        r.register(self._clients)
        self._operator = _OperatorGauges()
        r.register(self._operator)

    def attach(self, engine: Any) -> None:
        """Read the HTTP counters of this engine's clients (and its targets' quarantine) at every scrape."""
        self._clients.engine = engine
        self._operator.engine = engine

    def record_feed_lag(self, seconds: float) -> None:
        """The change feed's lag after a poll (now - its watermark)."""
        self._operator.feed_lag = seconds

    def record_source(self, error: str | None) -> None:
        """The last snapshot's failure (`CycleReport.source_error`), or None when PingOne was read."""
        self._operator.source_up = 0.0 if error is not None else 1.0

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """An engine observer: entity events and `cycle.finished`."""
        target = str(fields.get("target", ""))
        if event == CYCLE_FINISHED:
            self._operator.observe_cycle(target, fields)
            result = str(fields.get("outcome"))
            self.cycles.labels(target, result).inc()
            self.queue.labels(target).set(0)
            started, finished = fields.get("started"), fields.get("finished")
            if isinstance(started, int | float) and isinstance(finished, int | float):
                self.cycle_seconds.labels(target).observe(max(0.0, finished - started))
            summary = fields.get("summary")
            busy = summary.get("busy") if isinstance(summary, Mapping) else None
            if isinstance(busy, Mapping):
                for kind, count in busy.items():
                    if isinstance(count, int) and count > 0:
                        self.entities_left_busy.labels(target, str(kind)).inc(count)
            if result == "success":
                self.last_success.labels(target).set(finished if isinstance(finished, int | float) else time.time())
            return
        op = fields.get("op")
        outcome = fields.get("outcome")
        if op is None or outcome is None:
            return
        name = f"{fields.get('kind', event.split('.', 1)[0])}.{op}"
        self.operations.labels(target, name, str(outcome)).inc()
        duration = fields.get("duration_ms")
        if isinstance(duration, int | float) and outcome != "skipped":
            self.operation_seconds.labels(target, name).observe(duration / 1000.0)
        updated = fields.get("source_updated_at")
        if outcome == "applied" and isinstance(updated, str):
            at = parse_timestamp(updated)
            if at is not None and at >= self.since:
                self.propagation.labels(target).observe(max(0.0, time.time() - at))

    def observe_source(self, complete: bool, at: float | None = None) -> None:
        """A cycle's snapshot: the source gauge moves only when it was complete."""
        if complete:
            self.source_complete.set(time.time() if at is None else at)

    def observe_request(self, target: str, method: str, status: int | None, seconds: float) -> None:
        """An engine request observer: the request latency histogram (status "none": no answer)."""
        self.request_seconds.labels(target, method, str(status) if status is not None else "none").observe(seconds)

    def progress(self, target: str, done: int, total: int) -> None:
        """An engine progress hook: the apply's queue depth."""
        self.queue.labels(target).set(max(0, total - done))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """What /healthz answers: per target, the last cycle's outcome and whether the engine holds it
    in quarantine or is recovering it; the source's state; the state file's.

    Failing (503) when a target is quarantined or its last cycle failed, PingOne has not been read
    completely for longer than `source_bound` seconds (the service sets twice the interval), or the
    state file was deleted or replaced under the daemon.
    """

    def __init__(self, *, unhealthy: frozenset[str] = DEFAULT_UNHEALTHY_OUTCOMES,
                 source_bound: float = 0.0) -> None:
        self.unhealthy = unhealthy
        self.source_bound = source_bound
        self.engine: Any = None
        self.last: dict[str, dict[str, Any]] = {}
        self.source_error: str | None = None
        self.source_failing_since: float | None = None
        self.source_last_complete: float | None = None
        self.recovering: dict[str, tuple[int, int]] = {}
        self.state_problem: str | None = None

    def attach(self, engine: Any) -> None:
        self.engine = engine

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        if event == CYCLE_FINISHED:
            self.last[str(fields.get("target"))] = {
                "outcome": fields.get("outcome"), "reason": fields.get("reason"), "finished": fields.get("finished")}

    def record_source(self, error: str | None, *, since: float | None = None) -> None:
        """The last snapshot's problem (`CycleReport.source_problem`), or None once PingOne was
        read completely. `since`: when the failing cycle started (now when not given); the first
        failure's time is kept until a complete snapshot."""
        now = time.time()
        self.source_error = error
        if error is None:
            self.source_failing_since = None
            self.source_last_complete = now
        elif self.source_failing_since is None:
            self.source_failing_since = since if since is not None else now

    def record_recovery(self, target: str, done: int, total: int) -> None:
        """A target's recovery of in-flight operations: `done` of `total` looked up."""
        if done >= total:
            self.recovering.pop(target, None)
        else:
            self.recovering[target] = (done, total)

    def status(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON body of /healthz)."""
        now = time.time() if now is None else now
        names = list(self.engine.runtimes) if self.engine is not None else sorted(self.last)
        problems: list[str] = []
        targets: dict[str, Any] = {}
        for name in names:
            last = self.last.get(name)
            entry: dict[str, Any] = {"last_outcome": last["outcome"] if last else None,
                                     "last_finished": last["finished"] if last else None}
            quarantine = self.engine.runtimes[name].quarantine if self.engine is not None else None
            if name in self.recovering:
                done, total = self.recovering[name]
                entry["recovering"] = {"done": done, "total": total}
            if quarantine is not None and quarantine.active(now):
                entry["quarantined"] = {"reason": quarantine.reason, "retry_in_s": round(quarantine.until - now, 1)}
                problems.append(f"{name}: quarantined ({quarantine.reason})")
            elif last is not None and last["outcome"] in self.unhealthy:
                problems.append(f"{name}: last cycle {last['outcome']}"
                                + (f" ({last['reason']})" if last.get("reason") else ""))
            targets[name] = entry
        source: dict[str, Any] = {"ok": self.source_error is None, "last_complete": self.source_last_complete}
        if self.source_error is not None and self.source_failing_since is not None:
            failing_for = max(0.0, now - self.source_failing_since)
            source.update(error=self.source_error, failing_since=self.source_failing_since,
                          failing_for_s=round(failing_for, 1), failing_after_s=self.source_bound)
            if failing_for >= self.source_bound:
                problems.append(f"source: failing for {round(failing_for)}s: {self.source_error}")
        if self.state_problem is not None:
            problems.append(f"state: {self.state_problem}")
        degraded = [n for n, e in targets.items() if e["last_outcome"] in DEGRADED_OUTCOMES]
        if self.source_error is not None:
            degraded.append("source")
        if problems:
            body: dict[str, Any] = {"status": "failing", "reason": "; ".join(problems)}
        elif self.recovering:
            body = {"status": "recovering"}
        elif not self.last:
            body = {"status": "starting"}
        else:
            body = {"status": "degraded" if degraded else "ok"}
        body["targets"] = targets
        body["source"] = source
        return not problems, body


# -- the HTTP server --------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    """"127.0.0.1:9477" -> ("127.0.0.1", 9477); "[::1]:9477" -> ("::1", 9477)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ValueError(f"{listen!r} is not host:port")
    return host, int(port)


def make_app(metrics: Metrics, health: Health,
             mount: Callable[[web.Application], None] | None = None) -> web.Application:
    """/healthz and /metrics; *mount* adds more routes (the change feed's `POST /pingone/events`,
    `daemon.source.changes.mount_webhook`)."""
    async def healthz(_request: web.Request) -> web.Response:
        ok, body = health.status()
        return web.Response(status=200 if ok else 503, text=json.dumps(body, default=str),
                            content_type="application/json")

    async def metrics_view(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    if mount is not None:
        mount(app)
    return app


@asynccontextmanager
async def serve_http(metrics: Metrics, health: Health, listen: str = DEFAULT_LISTEN,
                     mount: Callable[[web.Application], None] | None = None) -> AsyncIterator[str]:
    """Serve /metrics and /healthz (and what *mount* adds) on `listen` ("host:port"; port 0 picks
    one); yields the base URL."""
    host, port = split_listen(listen)
    runner = web.AppRunner(make_app(metrics, health, mount), access_log=None, handle_signals=False,
                           shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        await web.SockSite(runner, sock).start()
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
