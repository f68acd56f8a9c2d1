"""`provisiond run` under a stand-in for systemd.

The emulators run in the test process; the daemon runs as `python -m daemon run -c FILE` in a
subprocess whose $NOTIFY_SOCKET is a datagram socket the test owns (the machinery is in
`tests/harness.py`). Everything is loopback.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from daemon.lock import StateLock, StateLocked
from daemon.sandbox.server import serve
from daemon.service import RequestGate, eta_text, next_start
from tests.harness import Daemon as Daemon
from tests.harness import child_env as child_env
from tests.harness import cycled, daemon_running, ready, run_command, stamp, stop, until, world
from tests.harness import write_zpa_config as write_config


def lock_file_text(state: Path) -> str:
    return Path(str(state) + ".lock").read_text(encoding="utf-8")


# -- acceptance ---------------------------------------------------------------------------------


async def test_ready_arrives_then_cycles_run_start_to_start_at_the_interval(tmp_path: Path) -> None:
    async with world(tmp_path, abstract=True) as w:
        write_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await cycled(w, d, 4)
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
            await cycled(w, d)
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
            await cycled(w, d)
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
        # requests in flight outlast the test's patience (and any delay of a loaded machine): a
        # drain would wait 25 s for them, the forced exit does not
        w.sb.zpa.faults.latency_ms = 25_000.0
        write_config(w.sb, w.config, interval="1h", grace="30s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: w.sb.zpa._inflight, "requests in flight at the target", explain=d.describe)
            d.signal(signal.SIGTERM)
            await until(lambda: d.named("daemon.stopping"), "daemon.stopping", explain=d.describe)
            assert w.sb.zpa._inflight, "the drain has requests to wait for"
            d.signal(signal.SIGTERM)
            code = await d.exit_code(5)

    assert code == 128 + signal.SIGTERM
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
