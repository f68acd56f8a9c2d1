"""`provisiond run` under a stand-in for systemd.

The emulators run in the test process; the daemon runs as `python -m daemon run -c FILE` in a
subprocess whose $NOTIFY_SOCKET is a datagram socket the test owns. Everything is loopback.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import stat
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
from aiohttp import web
from anyio.abc import Process, TaskGroup
from anyio.streams.text import TextReceiveStream

from daemon.lock import StateLock, StateLocked
from daemon.sandbox.runner import Sandbox, build_sandbox, running
from daemon.sandbox.server import serve
from daemon.service import RequestGate, eta_text, next_start

STARTUP_TIMEOUT = 20.0     # python start, imports, first READY=1 (a loaded CI machine is slow)
STEP_TIMEOUT = 15.0


# -- the test's side of systemd -----------------------------------------------------------------


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


# -- configs for the emulators ------------------------------------------------------------------


def write_config(sb: Sandbox, path: Path, *, interval: str = "1s", grace: str = "5s",
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
async def world(tmp_path: Path, *, users: int = 60, abstract: bool = False) -> AsyncIterator[World]:
    sb = build_sandbox(users=users, groups=8, seed=3)
    notify_name = f"@provisiond-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    notify = NotifySocket(notify_name)
    try:
        async with running(sb, port=0), anyio.create_task_group() as tg:
            tg.start_soon(notify.pump)
            yield World(sb, notify, tmp_path, tg)
            tg.cancel_scope.cancel()
    finally:
        notify.close()


def lock_file_text(state: Path) -> str:
    return Path(str(state) + ".lock").read_text(encoding="utf-8")


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


async def ready(w: World, d: Daemon) -> None:
    await until(lambda: w.notify.having("READY", "1"), "READY=1", STARTUP_TIMEOUT, d.describe)


async def stop(d: Daemon, within: float = 10.0) -> int:
    d.signal(signal.SIGTERM)
    return await d.exit_code(within)


# -- acceptance ---------------------------------------------------------------------------------


async def test_ready_arrives_then_cycles_run_start_to_start_at_the_interval(tmp_path: Path) -> None:
    async with world(tmp_path, abstract=True) as w:
        write_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: len(d.named("cycle.summary")) >= 4, "four cycles", explain=d.describe)
            code = await stop(d)

    assert code == 0, d.describe()
    starts = [stamp(e) for e in d.named("cycle.started")]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) >= 3
    assert all(0.9 <= g <= 1.6 for g in gaps[:3]), gaps
    # never overlapping: each cycle's summary comes before the next cycle starts
    order = [e["event"] for e in d.events if e.get("event") in ("cycle.started", "cycle.summary")]
    assert all(a != b for a, b in itertools.pairwise(order)), order
    statuses = w.notify.statuses()
    assert len(set(statuses)) >= 4, statuses
    assert any("cycle 3 running" in s for s in statuses), statuses
    assert any(s.startswith("idle; last cycle") and "zpa success" in s for s in statuses), statuses
    assert w.notify.having("STOPPING", "1")
    assert d.named("daemon.stopped")
    assert len(w.sb.zpa.users) > 0


async def test_sighup_with_a_changed_config_takes_effect_in_the_next_cycle(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, zpa_groups=("ZPA Users",))
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.summary"), "first cycle", explain=d.describe)
            assert w.sb.zpa.group_by_name("ZPA Users") is not None
            assert w.sb.zpa.group_by_name("ZPA Contractors") is None
            text = write_config(w.sb, w.config, zpa_groups=("ZPA Users", "ZPA Contractors")).read_text()
            w.config.write_text(text.replace("concurrency = 8", "concurrency = 3"))
            mark = len(w.notify.messages)
            before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.signal(signal.SIGHUP)
            reloaded = await until(lambda: d.named("config.reloaded"), "config.reloaded", explain=d.describe)
            await until(lambda: w.sb.zpa.group_by_name("ZPA Contractors"), "the added group in the target",
                        explain=d.describe)
            code = await stop(d)

    assert code == 0, d.describe()
    assert "target.zpa.groups" in reloaded[0]["changed"]
    assert "target.zpa.concurrency" in reloaded[0]["changed"]
    assert reloaded[0]["targets_added"] == [] and reloaded[0]["targets_removed"] == []
    assert reloaded[0]["resized"] == {"zpa": {"concurrency": 3, "requests_per_second": 40, "burst": 40}}
    after = w.notify.messages[mark:]
    kinds = [k for m in after for k in ("RELOADING", "READY") if k in m.fields]
    assert kinds[:2] == ["RELOADING", "READY"], [m.fields for m in after]
    reloading = next(m for m in after if "RELOADING" in m.fields)
    assert before_usec <= int(reloading.fields["MONOTONIC_USEC"]) <= before_usec + 10_000_000


async def test_sighup_with_an_invalid_config_keeps_the_old_one_and_cycling_goes_on(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.summary"), "first cycle", explain=d.describe)
            w.config.write_text(w.config.read_text().replace('interval = "1s"', 'interval = "soon"'))
            mark = len(w.notify.messages)
            d.signal(signal.SIGHUP)
            failed = await until(lambda: d.named("config.reload_failed"), "config.reload_failed",
                                 explain=d.describe)
            seen = d.events.index(failed[0])
            await until(lambda: len(d.named("cycle.summary", since=seen)) >= 2, "two more cycles",
                        explain=d.describe)
            code = await stop(d)

    assert code == 0, d.describe()
    assert "daemon.interval" in failed[0]["error"]
    assert not d.named("config.reloaded")
    starts = [stamp(e) for e in d.named("cycle.started", since=seen)]
    assert all(g <= 1.6 for g in (b - a for a, b in itertools.pairwise(starts))), starts
    kinds = [k for m in w.notify.messages[mark:] for k in ("RELOADING", "READY") if k in m.fields]
    assert kinds[:2] == ["RELOADING", "READY"]


async def test_sigterm_during_an_apply_exits_zero_within_grace_and_once_finishes_without_duplicates(
        tmp_path: Path) -> None:
    grace = 5.0
    async with world(tmp_path, users=150) as w:
        w.sb.zpa.faults.latency_ms = 250.0
        write_config(w.sb, w.config, interval="1h", grace="5s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            applying = re.compile(r"zpa: applying (\d+)/(\d+)")
            await until(lambda: any((m := applying.search(s)) and int(m.group(1)) >= 8
                                    for s in w.notify.statuses()),
                        "STATUS with apply progress", explain=d.describe)
            in_target = len(w.sb.zpa.users)
            signalled = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.exit_code(grace + 5)
            took = time.monotonic() - signalled
        assert code == 0, d.describe()
        assert took < grace, took
        assert d.named("daemon.drained"), d.describe()
        assert d.named("cycle.interrupted")
        assert w.notify.having("STOPPING", "1")
        left = len(w.sb.zpa.users)
        assert left >= in_target

        w.sb.zpa.faults.latency_ms = 0.0
        once = await run_command("once", "-c", str(w.config))
        plan = await run_command("plan", "--json", "-c", str(w.config))
    events = [json.loads(line) for line in once.stdout.decode().splitlines() if line.startswith("{")]
    assert once.returncode == 0, once.stderr.decode()[-2000:]
    resumed = [e for e in events if e["event"] == "cycle.resumed"]
    assert resumed and resumed[0]["unfinished"] > 0
    finished = next(e for e in events if e["event"] == "cycle.finished" and e["target"] == "zpa")
    assert finished["failed"] == 0 and finished["users"]["failed"] == 0, finished
    names = [str(u["userName"]).lower() for u in w.sb.zpa.users.values()]
    assert len(names) == len(set(names)), "duplicate userName in the target"
    assert left < len(names) == finished["users"]["success"]      # the stop left work; `once` did it
    remaining = [op for op in json.loads(plan.stdout)["zpa"]["operations"] if op["status"] == "pending"]
    assert remaining == [], remaining[:5]


async def test_watchdog_pings_every_half_period_while_a_long_cycle_runs(tmp_path: Path) -> None:
    async with world(tmp_path, users=150) as w:
        w.sb.zpa.faults.latency_ms = 300.0
        write_config(w.sb, w.config, interval="1h")
        async with daemon_running(w.config, w.notify, w.tg, WATCHDOG_USEC="1000000") as d:
            await ready(w, d)
            began = w.notify.having("READY", "1")[0].at
            await until(lambda: d.named("cycle.summary"), "the first (long) cycle", explain=d.describe)
            ended = d.named("cycle.summary")[0]["_at"]
            code = await stop(d)

    assert code == 0, d.describe()
    assert ended - began >= 2.0, "the cycle was meant to be long"
    pings = [m.at for m in w.notify.having("WATCHDOG", "1") if began <= m.at <= ended]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= (ended - began) / 0.5 - 2, (len(pings), ended - began)
    assert max(gaps) < 0.85, gaps
    assert not d.named("watchdog.stalled")


async def test_a_second_run_on_the_same_state_file_refuses_with_the_holders_pid(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1h")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            second = await run_command("run", "-c", str(w.config))
            lock_text = lock_file_text(w.state)
            code = await stop(d)

    assert code == 0, d.describe()
    assert second.returncode == 1
    assert f"another provisiond is running on {w.state} (pid {d.pid})" in second.stderr.decode()
    assert lock_text.strip() == str(d.pid)


async def test_a_second_stop_signal_exits_at_once(tmp_path: Path) -> None:
    async with world(tmp_path, users=150) as w:
        w.sb.zpa.faults.latency_ms = 3000.0       # requests in flight outlast the test's patience
        write_config(w.sb, w.config, interval="1h", grace="30s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.started"), "a cycle", explain=d.describe)
            await anyio.sleep(0.3)
            d.signal(signal.SIGTERM)
            await until(lambda: d.named("daemon.stopping"), "daemon.stopping", explain=d.describe)
            signalled = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.exit_code(5)
            took = time.monotonic() - signalled

    assert code == 128 + signal.SIGTERM
    assert took < 1.5
    assert d.named("daemon.stop_forced")


async def test_an_invalid_config_at_start_exits_78_with_the_error_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[daemon]\ninterval = "soon"\n', encoding="utf-8")
    done = await run_command("run", "-c", str(config))
    assert done.returncode == 78
    assert "daemon.interval" in done.stderr.decode()


# -- parts, in process --------------------------------------------------------------------------


def test_state_lock_is_exclusive_0600_and_names_the_holder(tmp_path: Path) -> None:
    state = str(tmp_path / "state.db")
    first = StateLock(state)
    first.acquire()
    try:
        assert stat.S_IMODE(os.stat(state + ".lock").st_mode) == 0o600
        with pytest.raises(StateLocked) as caught:
            StateLock(state).acquire()
        assert caught.value.pid == os.getpid()
        assert str(caught.value) == f"another provisiond is running on {state} (pid {os.getpid()})"
    finally:
        first.release()
    again = StateLock(state)
    again.acquire()      # released: free to take
    again.release()


def test_next_cycle_is_due_an_interval_after_the_last_start_plus_up_to_the_jitter() -> None:
    assert next_start(100.0, 30.0, 0.0) == 130.0
    assert next_start(100.0, 30.0, 5.0, draw=lambda low, high: high) == 135.0
    assert next_start(100.0, 30.0, 5.0, draw=lambda low, high: low) == 130.0
    assert all(130.0 <= next_start(100.0, 30.0, 5.0) <= 135.0 for _ in range(100))


def test_eta_is_whole_seconds_then_whole_minutes() -> None:
    assert eta_text(0.2) == "1s"
    assert eta_text(125.4) == "2m5s"
    assert eta_text(120) == "2m"
    assert eta_text(3599) == "1h"


async def test_request_gate_lets_in_flight_requests_finish_and_holds_new_ones() -> None:
    arrived: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await anyio.sleep(0.3)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{name}", slow)
    gate = RequestGate(lambda: None)
    results: dict[str, int] = {}
    async with serve(app) as base, aiohttp.ClientSession(trace_configs=[gate.trace_config()]) as session:

        async def get(name: str) -> None:
            async with session.get(f"{base}/{name}") as resp:
                results[name] = resp.status

        async with anyio.create_task_group() as tg:
            tg.start_soon(get, "first")
            await until(lambda: gate.in_flight == 1, "the first request in flight", 5)
            gate.close()
            tg.start_soon(get, "second")
            with anyio.fail_after(5):
                await gate.drained()
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    assert results == {"first": 200}
    assert arrived == ["/first"]
    assert gate.in_flight == 0
