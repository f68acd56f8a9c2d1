"""The harnesses shared by the tests.

In process (`harness`, for the engine and safety tests): the emulators run in the test process on
loopback and the Engine in-process against them, with a real SQLite file and a config written by
`daemon.sandbox.runner` (fast limits).

The real daemon (`world`, `daemon_running`, for the tests of `provisiond run`): the emulators run
in the test process, the daemon as `python -m daemon run -c FILE` in a subprocess whose
$NOTIFY_SOCKET is a datagram socket the test owns, its /healthz and /metrics on a free loopback
port (`with_listen`, `listening`, `scrape`). Everything is loopback; every wait is a poll with a
bound (`until`), never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import structlog
from anyio.abc import Process, TaskGroup
from anyio.streams.text import TextReceiveStream
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from structlog.typing import EventDict

from daemon.config import Config, load_config
from daemon.engine import CycleReport, Engine, TargetReport
from daemon.sandbox.activities import FeedSettings
from daemon.sandbox.directory import Directory
from daemon.sandbox.runner import Sandbox, build_sandbox, running, write_config
from daemon.sandbox.scim import ScimEmulator
from daemon.source.changes import ChangeFeed
from daemon.store import Store

FAST_RPS = 5000.0          # tests are bounded by the loopback, not by a rate
TARGETS = ("zpa", "zia")


@dataclass
class Harness:
    sb: Sandbox
    config: Config
    config_path: Path
    store: Store
    engine: Engine
    state_path: Path
    logs: list[EventDict] = field(default_factory=list)
    last_logs: list[EventDict] = field(default_factory=list)
    report: CycleReport | None = None
    strict: bool = False          # every cycle must read PingOne (tests that never break the source)

    @property
    def directory(self) -> Directory:
        return self.sb.directory

    def emulator(self, target: str) -> ScimEmulator:
        return self.sb.zpa if target == "zpa" else self.sb.zia

    async def cycle(self) -> CycleReport:
        for em in (self.sb.zpa, self.sb.zia):
            em.reset_counters()
        with capture_logs() as captured:
            report = await self.engine.cycle()
        self.last_logs = captured
        self.logs.extend(captured)
        self.report = report
        if self.strict:
            assert report.source_error is None, report.source_error
        return report

    def target_report(self, target: str) -> TargetReport:
        assert self.report is not None
        return next(t for t in self.report.targets if t.target == target)

    def retarget(self, target: str, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, targets=tuple(
            dataclasses.replace(t, **changes) if t.name == target else t for t in self.config.targets))
        self.engine.reconfigure(self.config)

    def events(self, name: str, **match: Any) -> list[EventDict]:
        return [e for e in self.last_logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]

    def all_events(self, name: str, **match: Any) -> list[EventDict]:
        return [e for e in self.logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    users: int = 60,
    groups: int = 6,
    seed: int = 5,
    prepare: Callable[[Sandbox], None] | None = None,
    daemon: dict[str, Any] | None = None,
    **overrides: dict[str, Any],
) -> AsyncIterator[Harness]:
    """Emulators, a config for them (fast limits), a state file and an Engine.

    `prepare` edits the sandbox before anything runs; `daemon` replaces DaemonConfig fields;
    `overrides` maps a target name to the TargetConfig fields to replace."""
    sb = build_sandbox(users=users, groups=groups, seed=seed, zia_rps=FAST_RPS)
    sb.zpa.faults.rate_limit_rps = None
    if prepare is not None:
        prepare(sb)
    state_path = tmp_path / "state.db"
    async with running(sb, port=0):
        config_path = write_config(sb, tmp_path / "provisiond.toml", state_path=str(state_path), zia_rps=FAST_RPS)
        config = load_config(config_path)
        config = dataclasses.replace(config, targets=tuple(
            dataclasses.replace(t, **{"requests_per_second": FAST_RPS, "burst": FAST_RPS, "concurrency": 8,
                                      **overrides.get(t.name, {})})
            for t in config.targets))
        if daemon:
            config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, **daemon))
        store = await Store.open(state_path)
        try:
            async with aiohttp.ClientSession() as session:
                engine = Engine(config, store, session, log=structlog.get_logger())
                yield Harness(sb, config, config_path, store, engine, state_path)
        finally:
            await store.close()




# -- the real daemon: `provisiond run` under a stand-in for systemd ----------------------------------

STARTUP_TIMEOUT = 20.0     # python start, imports, first READY=1 (a loaded CI machine is slow)
STEP_TIMEOUT = 15.0


@dataclass
class Message:
    at: float                      # time.monotonic() at arrival
    fields: dict[str, str]


class NotifySocket:
    """$NOTIFY_SOCKET: records every datagram with its arrival time."""

    def __init__(self, env_value: str) -> None:
        self.env_value = env_value
        address = "\0" + env_value[1:] if env_value.startswith("@") else env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[Message] = []

    async def pump(self) -> None:
        while True:
            await anyio.wait_readable(self.sock)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(Message(time.monotonic(), fields))

    def having(self, key: str, value: str | None = None, since: int = 0) -> list[Message]:
        return [m for m in self.messages[since:] if key in m.fields and (value is None or m.fields[key] == value)]

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.messages if "STATUS" in m.fields]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    """A `provisiond run` subprocess and what it printed."""

    process: Process
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def named(self, event: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[since:] if e.get("event") == event]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, within: float) -> int:
        with anyio.fail_after(within):
            return await self.process.wait()

    async def pump_stdout(self) -> None:
        assert self.process.stdout is not None
        buffer = ""
        async for chunk in TextReceiveStream(self.process.stdout):
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "(not json)", "text": line}
                event["_at"] = time.monotonic()
                self.events.append(event)

    async def pump_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in TextReceiveStream(self.process.stderr):
            self.stderr.append(chunk)

    def describe(self) -> str:
        tail = [{k: v for k, v in e.items() if k != "_at"} for e in self.events[-15:]]
        return f"last events: {json.dumps(tail, default=str)[:3000]}\nstderr: {''.join(self.stderr)[-2000:]}"


async def until(check: Callable[[], Any], what: str, within: float = STEP_TIMEOUT,
                explain: Callable[[], str] = lambda: "") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}\n{explain()}")
        await anyio.sleep(0.02)


def child_env(notify: NotifySocket | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PROVISIOND_CONFIG")}
    env["PYTHONUNBUFFERED"] = "1"
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.env_value
    env.update(extra)
    return env


@asynccontextmanager
async def daemon_running(config: Path, notify: NotifySocket | None, tg: TaskGroup,
                         **env: str) -> AsyncIterator[Daemon]:
    process = await anyio.open_process([sys.executable, "-m", "daemon", "run", "-c", str(config)],
                                       env=child_env(notify, **env), stdin=subprocess.DEVNULL)
    daemon = Daemon(process)
    tg.start_soon(daemon.pump_stdout)
    tg.start_soon(daemon.pump_stderr)
    try:
        yield daemon
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()


async def run_command(*args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process([sys.executable, "-m", "daemon", *args], check=False,
                                       env=child_env(None))


def write_zpa_config(sb: Sandbox, path: Path, *, interval: str = "1s", grace: str = "5s",
                     zpa_groups: tuple[str, ...] = ("ZPA Users", "ZPA Contractors"),
                     daemon_extra: str = "") -> Path:
    """The sandbox config with the zpa target only (the zia emulator is 5 requests/s: too slow here)."""
    text = sb.config_text(str(path.with_suffix(".db")), interval=interval)
    head, zpa, _zia = text.split("\n[[target]]\n")
    head = head.replace('log_level = "info"\n', f'log_level = "info"\ngrace_period = "{grace}"\n{daemon_extra}')
    groups = ", ".join(json.dumps(g) for g in zpa_groups)
    zpa = re.sub(r"^groups = .*$", f"groups = [{groups}]", zpa, flags=re.MULTILINE)
    path.write_text(head + "\n[[target]]\n" + zpa, encoding="utf-8")
    path.chmod(0o600)
    return path


@dataclass
class World:
    sb: Sandbox
    notify: NotifySocket
    tmp: Path
    tg: TaskGroup

    @property
    def config(self) -> Path:
        return self.tmp / "provisiond.toml"

    @property
    def state(self) -> Path:
        return self.config.with_suffix(".db")


@asynccontextmanager
async def world(tmp_path: Path, *, users: int = 60, abstract: bool = False,
                zia_rps: float | None = None) -> AsyncIterator[World]:
    """The emulators on free loopback ports and a notify socket (`abstract`: in the abstract
    namespace, `@…`); `zia_rps` lifts the zia emulator's 5 requests/s limit."""
    sb = build_sandbox(users=users, groups=8, seed=3, zia_rps=zia_rps)
    notify_name = f"@provisiond-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    notify = NotifySocket(notify_name)
    try:
        async with running(sb, port=0), anyio.create_task_group() as tg:
            tg.start_soon(notify.pump)
            yield World(sb, notify, tmp_path, tg)
            tg.cancel_scope.cancel()
    finally:
        notify.close()


def stamp(event: dict[str, Any]) -> float:
    """The wall-clock time (epoch seconds) the daemon logged this event at."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


async def ready(w: World, d: Daemon) -> None:
    await until(lambda: w.notify.having("READY", "1"), "READY=1", STARTUP_TIMEOUT, d.describe)


async def stop(d: Daemon, within: float = 10.0) -> int:
    d.signal(signal.SIGTERM)
    return await d.exit_code(within)


# -- /healthz and /metrics of the real daemon ------------------------------------------------------

_PORTS_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port that is free now, for `http_listen` (which takes no port 0).

    The daemon binds it a second or so later. Drawn below the kernel's ephemeral range, so no
    socket that binds port 0 or connects out (the emulators, the clients of tests running in
    parallel) can be given it in between; at random and never twice in one process, so parallel
    test workers rarely draw the same one; and bound once here, so a port in use is passed over."""
    low = _ephemeral_low()
    draw = random.Random()
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low) if low > 2048 else 0
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def with_listen(config: Path, *, source: str = "", zpa: str = "", zia: str = "") -> None:
    """Serve /healthz and /metrics on a free loopback port; extra keys per section."""
    text = config.read_text()
    text = text.replace("[daemon]\n", f'[daemon]\nhttp_listen = "127.0.0.1:{free_port()}"\n', 1)
    if source:
        text = text.replace("[source]\n", f"[source]\n{source}\n", 1)
    for name, extra in (("zpa", zpa), ("zia", zia)):
        if extra:
            text = text.replace(f'name = "{name}"\n', f'name = "{name}"\n{extra}\n', 1)
    config.write_text(text)


async def listening(d: Daemon) -> str:
    """The base URL of the daemon's /healthz and /metrics, once its `http.listening` is logged."""
    events = await until(lambda: d.named("http.listening"), "http.listening", STARTUP_TIMEOUT, d.describe)
    return str(events[0]["url"])


async def get(url: str) -> tuple[int, Any]:
    """GET over HTTP: the status and the body (parsed when it is JSON)."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if resp.content_type == "application/json" else text)


async def poll_healthz(url: str, status: str, within: float = 15.0) -> dict[str, Any]:
    """GET /healthz every 50 ms until its body's status is `status`; that body."""
    seen: list[Any] = []
    with anyio.move_on_after(within):
        while True:
            _, body = await get(url + "/healthz")
            seen.append(body.get("status"))
            if body.get("status") == status:
                return dict(body)
            await anyio.sleep(0.05)
    pytest.fail(f"/healthz never said {status!r}: {seen[-5:]}")


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Prometheus text: sample name -> (labels, value) of each sample."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


async def scrape(where: int | str) -> Samples:
    """GET /metrics of the daemon listening on this loopback port or base URL."""
    base = f"http://127.0.0.1:{where}" if isinstance(where, int) else where
    status, text = await get(base + "/metrics")
    assert status == 200, text
    return parse_metrics(str(text))


def gauge(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the first sample `name` whose labels include `labels`; None if there is none."""
    for have, value in samples.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return None


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples `name` whose labels include `labels`."""
    return sum(value for have, value in samples.get(name, []) if all(have.get(k) == v for k, v in labels.items()))


async def cycled(w: World, d: Daemon, cycles: int = 1) -> None:
    """Wait for READY=1, then for the daemon's first `cycles` cycle.summary events."""
    await ready(w, d)
    await until(lambda: len(d.named("cycle.summary")) >= cycles,
                "first cycle" if cycles == 1 else f"{cycles} cycles", explain=d.describe)


@asynccontextmanager
async def daemon_serving(w: World, cycles: int = 1, **env: str) -> AsyncIterator[tuple[Daemon, str]]:
    """`provisiond run` on `w.config` with /healthz and /metrics on a free loopback port: once it
    is READY=1, past its first `cycles` cycles and listening, the daemon and the routes' base URL."""
    with_listen(w.config)
    async with daemon_running(w.config, w.notify, w.tg, **env) as d:
        await cycled(w, d, cycles)
        yield d, await listening(d)


async def follow_feed(h: Harness) -> None:
    """*h* as a daemon following the change feed finds itself after its first full cycle: the
    PingOne emulator's records visible at once (no indexing delay), the engine keeping its merged
    snapshot, the feed's watermark at that cycle's start."""
    h.sb.pingone.feed.settings = FeedSettings(indexing_delay=0.0, seed=1)
    h.engine.keep_snapshot = True
    started = time.time()
    await h.cycle()
    await ChangeFeed(h.engine.source, h.store).start_at(started)
