"""Issue 14: `provisiond run` tells the truth under faults.

Each test drives the real daemon (`python -m daemon run` in a subprocess with `http_listen`), sets
faults on the emulators over HTTP (`/_admin/faults`), reads `/healthz` and `/metrics` over HTTP,
reads the SCIM targets back over HTTP and sends signals to the process.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from daemon.metrics import Health
from daemon.sandbox.runner import ZPA_TOKEN
from tests.harness import (
    Daemon,
    World,
    daemon_running,
    gauge,
    get,
    listening,
    poll_healthz,
    ready,
    run_command,
    scrape,
    stamp,
    stop,
    until,
    with_listen,
    world,
    write_zpa_config,
)

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------


def fast_world(tmp_path: Path, *, users: int = 40) -> AbstractAsyncContextManager[World]:
    """The emulators (zia without its 5 requests/s limit) and a notify socket, on loopback."""
    return world(tmp_path, users=users, zia_rps=1000.0)


def write_both(w: World, *, interval: str = "1s", zia_extra: str = "") -> Path:
    text = w.sb.config_text(str(w.state), interval=interval, zia_rps=1000.0)
    text = text.replace('log_level = "info"\n', 'log_level = "info"\ngrace_period = "3s"\n')
    w.config.write_text(text)
    w.config.chmod(0o600)
    with_listen(w.config, zia=zia_extra)
    return w.config


async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status < 300, await resp.text()
        result: dict[str, Any] = await resp.json() if resp.content_type.endswith("json") else {}
        return result


def origin(url: str) -> str:
    match = re.match(r"https?://[^/]+", url)
    assert match is not None
    return match.group(0)


async def set_faults(base_url: str, **faults: Any) -> None:
    """POST /_admin/faults on an emulator (PingOne or SCIM), over HTTP."""
    await post(origin(base_url) + "/_admin/faults", faults)


async def scim_user(base_url: str, token: str, user_name: str) -> dict[str, Any] | None:
    """Read a target back over HTTP: the user with this userName, or None."""
    params = {"filter": f'userName eq "{user_name}"'}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/scim+json"}
    async with aiohttp.ClientSession() as session, session.get(
            f"{base_url}/Users", params=params, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        found = (await resp.json()).get("Resources") or []
    return found[0] if found else None


async def scim_user_names(base_url: str, token: str) -> list[str]:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/scim+json"}
    names: list[str] = []
    start = 1
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{base_url}/Users", params={"startIndex": str(start), "count": "100"},
                                   headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            resources = page.get("Resources") or []
            names += [str(r["userName"]).lower() for r in resources]
            start += len(resources)
            if not resources or start > int(page.get("totalResults", 0)):
                return names


async def add_pingone_user(w: World, name: str, group: str) -> None:
    """A new user in a PingOne group, through the emulator's admin API."""
    base = w.sb.pingone_url
    user = await post(f"{base}/_admin/users", {"username": name, "email": name, "given": "New", "family": "Hire"})
    gid = w.sb.directory.group_by_name(group)["id"]
    await post(f"{base}/_admin/groups/{gid}/members", {"userId": user["id"]})


# -- the log schema README documents --------------------------------------------------------------

JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "number": (int, float), "str": (str,), "bool": (bool,),
                                           "list": (list,), "object": (dict,), "null": (type(None),)}
ONE_TYPE_KEYS = ("failed", "users", "groups", "targets", "user_count", "group_count", "outcome", "reason")


def documented_schema() -> dict[str, dict[str, tuple[bool, tuple[str, ...]]]]:
    """README's event table: event -> key -> (optional, JSON type names)."""
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- event-schema -->", 1)[1].split("<!-- /event-schema -->", 1)[0]
    schema: dict[str, dict[str, tuple[bool, tuple[str, ...]]]] = {}
    for row in table.splitlines():
        match = re.match(r"\| `([a-z_.]+)` \| (.*) \|$", row)
        if match is None:
            continue
        keys: dict[str, tuple[bool, tuple[str, ...]]] = {}
        for part in match.group(2).split(", "):
            key = re.match(r"`(\w+)`(\??): (.+)", part.strip())
            assert key is not None, part
            keys[key.group(1)] = (key.group(2) == "?", tuple(key.group(3).split("\\|")))
        schema[match.group(1)] = keys
    return schema


def json_type(value: Any) -> str:
    for name in ("bool", "int", "number", "str", "list", "object", "null"):
        if isinstance(value, JSON_TYPES[name]) and not (name in ("int", "number") and isinstance(value, bool)):
            return name
    return type(value).__name__


def assert_log_schema(events: list[dict[str, Any]]) -> set[str]:
    """Every event README documents has its keys with their types; the shared keys keep one type
    across every event. Returns the documented events seen."""
    schema = documented_schema()
    seen: set[str] = set()
    for event in events:
        name = event.get("event")
        if name not in schema:
            continue
        seen.add(str(name))
        for key, (optional, types) in schema[str(name)].items():
            if key not in event:
                assert optional, f"{name}: {key} missing: {event}"
                continue
            got = json_type(event[key])
            assert got in types or (got == "int" and "number" in types), f"{name}.{key}: {got}, not {types}: {event}"
    for key in ONE_TYPE_KEYS:
        kinds = {(json_type(e[key]), e["event"]) for e in events if key in e and e[key] is not None}
        assert len({k for k, _ in kinds}) <= 1, f"{key} has several types: {sorted(kinds)}"
    return seen


def finished(d: Daemon, target: str, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in d.named("cycle.finished", since) if e.get("target") == target]


# -- 1: a PingOne outage is not a success ----------------------------------------------------------


async def test_a_hanging_pingone_is_logged_turns_healthz_503_stops_the_success_gauge_and_leads_status(
        tmp_path: Path) -> None:
    async with fast_world(tmp_path) as w:
        write_zpa_config(w.sb, w.config, interval="1s")
        with_listen(w.config, source='timeout = "300ms"')
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            url = await listening(d)
            await until(lambda: [e for e in finished(d, "zpa") if e["outcome"] == "success"],
                        "a successful cycle", explain=d.describe)
            assert (await get(url + "/healthz"))[0] == 200
            samples = await scrape(url)
            success_before = gauge(samples, "provisiond_last_success_timestamp_seconds", target="zpa")
            assert success_before is not None

            await set_faults(w.sb.pingone_url, hang_rate=1.0)           # PingOne stops answering
            faulted = time.time()
            mark = len(d.events)
            # every request timeout is logged as it happens, not once at the end
            await until(lambda: d.named("source.retry", mark), "source.retry", explain=d.describe)
            summary = await until(lambda: [e for e in d.named("cycle.summary", mark)
                                           if e["outcome"] == "source_incomplete"],
                                  "a cycle.summary with outcome source_incomplete", 60, d.describe)
            failing = await until(lambda: d.named("source.failing", mark), "source.failing", explain=d.describe)
            # the cycles begun after the fault (one begun before it may still end in success)
            (began, *_) = await until(lambda: [i for i, e in enumerate(d.events) if e.get("event") == "cycle.started"
                                               and stamp(e) > faulted], "a cycle begun after the fault",
                                      explain=d.describe)
            await until(lambda: finished(d, "zpa", began), "the end of a zpa cycle begun after the fault", 60,
                        d.describe)
            status, body = await get(url + "/healthz")
            samples = await scrape(url)
            cli = await run_command("status", "-c", str(w.config))
            zpa_outcomes = [e["outcome"] for e in finished(d, "zpa", began)]

            await set_faults(w.sb.pingone_url, reset=True)             # PingOne is back
            back = len(d.events)
            await until(lambda: d.named("source.recovered", back), "source.recovered", 60, d.describe)
            await until(lambda: [e for e in finished(d, "zpa", back) if e["outcome"] == "success"],
                        "a successful cycle again", explain=d.describe)
            status_after, body_after = await get(url + "/healthz")
            samples_after = await scrape(url)
            code = await stop(d)

    assert code == 0, d.describe()
    seen = assert_log_schema(d.events)
    assert {"cycle.started", "snapshot.taken", "snapshot.incomplete", "source.retry", "source.failing",
            "cycle.finished", "cycle.summary", "daemon.ready"} <= seen, seen
    assert summary[0]["failed"] == 0 and isinstance(summary[0]["failed"], int)
    assert summary[0]["source_error"].startswith("snapshot incomplete: ")
    assert "source_incomplete" in zpa_outcomes and "success" not in zpa_outcomes, zpa_outcomes
    assert failing[0]["failing_after_s"] == 2.0              # two intervals of 1s
    assert status == 503, body
    assert body["status"] == "failing" and body["reason"].startswith("source: failing for "), body
    assert body["source"]["ok"] is False
    # the last-success gauge stopped while PingOne failed, the source gauge too
    assert gauge(samples, "provisiond_last_success_timestamp_seconds", target="zpa") == success_before
    assert (gauge(samples, "provisiond_cycles_total", target="zpa", outcome="source_incomplete") or 0) >= 1
    assert cli.returncode == 0, cli.stderr.decode()
    first_line = cli.stdout.decode().splitlines()[0]
    assert first_line.startswith("SOURCE FAILING: PingOne has not been read completely since "), first_line
    # PingOne back: 200 again and the gauges move
    assert status_after == 200 and body_after["source"]["ok"] is True, body_after
    after = gauge(samples_after, "provisiond_last_success_timestamp_seconds", target="zpa")
    assert after is not None and after > success_before
    assert (gauge(samples_after, "provisiond_source_last_complete_timestamp_seconds") or 0) >= after - 60


# -- 2: a hanging target never stalls the healthy one ----------------------------------------------


async def test_a_hanging_target_is_quarantined_and_never_delays_the_other_targets_cycles(tmp_path: Path) -> None:
    async with fast_world(tmp_path) as w:
        write_both(w, interval="1s", zia_extra='timeout = "300ms"')
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            url = await listening(d)
            await until(lambda: finished(d, "zia") and finished(d, "zpa"), "both targets' first cycles",
                        30, d.describe)
            await set_faults(w.sb.zia_url, hang_rate=1.0)              # every zia request hangs
            for n in range(12):                                         # work for zia: 12 creates
                await add_pingone_user(w, f"zia.hire{n}@example.com", "ZIA Users")
            mark = len(d.events)
            await until(lambda: [e for e in d.named("cycle.apply_started", mark) if e.get("target") == "zia"],
                        "zia applying into the hang", explain=d.describe)
            zia_running = len(d.events)
            await add_pingone_user(w, "zpa.hire@example.com", "ZPA Users")
            reached = await until(lambda: [e for e in d.named("user.created", zia_running)
                                           if e.get("target") == "zpa" and e.get("user") == "zpa.hire@example.com"],
                                  "the new ZPA user created while zia hangs", 30, d.describe)
            zia_done_when_zpa_created = finished(d, "zia", zia_running)
            in_zpa = await scim_user(w.sb.zpa_url, ZPA_TOKEN, "zpa.hire@example.com")
            quarantined = await until(lambda: [e for e in finished(d, "zia", mark) if e["outcome"] == "quarantined"],
                                      "zia quarantined", 60, d.describe)
            status, body = await get(url + "/healthz")
            overruns = [e for e in d.named("cycle.overrun", mark) if e.get("target") == "zia"]
            zpa_cycles = len([e for e in finished(d, "zpa", zia_running) if e["_at"] < quarantined[0]["_at"]])
            code = await stop(d)

    assert code == 0, d.describe()
    assert {"cycle.overrun", "target.quarantined", "cycle.apply_started"} <= assert_log_schema(d.events)
    assert reached and in_zpa is not None
    assert zia_done_when_zpa_created == [], "zpa's user waited for zia's cycle"
    assert zpa_cycles >= 2, zpa_cycles
    assert overruns, "zia's long cycle missed ticks, logged with its name"
    assert quarantined[0]["reason"] == "mostly_failing", quarantined[0]
    assert status == 503 and "zia: quarantined (mostly_failing)" in body["reason"], body
    assert d.named("target.quarantined")


# -- 4: recovery after a stop: only what was sent, concurrent, logged, durable ---------------------


def journal(state: Path) -> dict[str, int]:
    with sqlite3.connect(state) as db:
        return dict(db.execute("SELECT status, count(*) FROM operation GROUP BY status").fetchall())


async def test_after_a_kill_only_sent_operations_are_in_flight_and_recovery_is_visible_and_durable(
        tmp_path: Path) -> None:
    concurrency = 8
    async with fast_world(tmp_path, users=400) as w:
        write_zpa_config(w.sb, w.config, interval="1h")
        with_listen(w.config)
        await set_faults(w.sb.zpa_url, latency_ms=300.0)
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            applying = re.compile(r"zpa: applying (\d+)/(\d+)")
            await until(lambda: any((m := applying.search(s)) and int(m.group(1)) >= 8
                                    for s in w.notify.statuses()), "apply progress", explain=d.describe)
            d.signal(signal.SIGKILL)
            await d.exit_code(10)
        left = journal(w.state)
        writes = sum(n for key, n in w.sb.zpa.counters.items() if key.split()[0] in ("POST", "PATCH", "PUT"))
        # in flight: only what was sent (answered or not, its outcome not yet written); the rest of
        # the stage, never sent, is still pending
        assert 0 < left.get("in_flight", 0) <= writes + concurrency, (left, writes)
        assert left.get("pending", 0) > left["in_flight"], left

        # restart slowly, at concurrency 2: the recovery shows in /healthz and STATUS=, and a kill
        # during it keeps what it had looked up
        w.config.write_text(w.config.read_text().replace("concurrency = 8", "concurrency = 2"))
        await set_faults(w.sb.zpa_url, latency_ms=300.0)
        marks = len(w.notify.messages)
        async with daemon_running(w.config, w.notify, w.tg) as d2:
            url = await listening(d2)
            started = await until(lambda: d2.named("recovery.started"), "recovery.started", explain=d2.describe)
            peak = 0

            async def sample() -> None:      # lookups in flight at the emulator, seen from outside
                nonlocal peak
                while True:
                    peak = max(peak, len(w.sb.zpa._inflight))
                    await anyio.sleep(0.01)

            async with anyio.create_task_group() as sampling:
                sampling.start_soon(sample)
                health = await poll_healthz(url, "recovering")
                await until(lambda: d2.named("user.recovered"), "a user recovered", explain=d2.describe)
                sampling.cancel_scope.cancel()
            d2.signal(signal.SIGKILL)
            await d2.exit_code(10)
        statuses = [m.fields["STATUS"] for m in w.notify.messages[marks:] if "STATUS" in m.fields]

        await set_faults(w.sb.zpa_url, latency_ms=0.0)
        async with daemon_running(w.config, w.notify, w.tg) as d3:
            resumed = await until(lambda: d3.named("cycle.resumed"), "cycle.resumed", explain=d3.describe)
            await until(lambda: finished(d3, "zpa"), "the cycle after recovery", 60, d3.describe)
            code = await stop(d3)
        names = await scim_user_names(w.sb.zpa_url, ZPA_TOKEN)

    assert code == 0, d3.describe()
    assert {"recovery.started", "cycle.resumed"} <= assert_log_schema(d2.events + d3.events)
    first = started[0]["lookups"]
    assert first > 0 and started[0]["concurrency"] == 2
    assert peak == 2, peak            # the lookups run side by side, at the target's concurrency
    assert health["status"] == "recovering" and health["targets"]["zpa"]["recovering"]["total"] == first, health
    assert any(re.search(r"zpa: recovering \d+/\d+", s) for s in statuses), statuses
    assert resumed[0]["lookups"] < first                     # what was looked up before the kill is kept
    assert len(names) == len(set(names)), "duplicate userName in zpa"
    assert finished(d3, "zpa")[0]["outcome"] == "success", finished(d3, "zpa")


# -- also: the state file, side commands, log keys -----------------------------------------------------


async def test_a_state_file_deleted_under_the_daemon_is_an_error_and_side_commands_do_not_recreate_it(
        tmp_path: Path) -> None:
    async with fast_world(tmp_path) as w:
        write_zpa_config(w.sb, w.config, interval="1s")
        with_listen(w.config)
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            url = await listening(d)
            await until(lambda: finished(d, "zpa"), "a cycle", explain=d.describe)
            w.state.unlink()
            replaced = await until(lambda: d.named("state.replaced"), "state.replaced", explain=d.describe)
            status, body = await get(url + "/healthz")
            side = await run_command("status", "-c", str(w.config))
            recreated = w.state.exists()
            code = await stop(d)

    assert code == 0, d.describe()
    assert "state.replaced" in assert_log_schema(d.events)
    assert replaced[0]["level"] == "error" and "deleted" in replaced[0]["problem"]
    assert status == 503 and "state:" in body["reason"], body
    assert side.returncode == 1
    assert "holds its lock" in side.stderr.decode() and f"pid {d.pid}" in side.stderr.decode()
    assert not recreated


def test_healthz_fails_on_the_source_only_once_it_has_failed_for_the_bound() -> None:
    health = Health(source_bound=600.0)
    health.last["zpa"] = {"outcome": "source_incomplete", "reason": None, "finished": 1000.0}
    health.record_source("snapshot incomplete: users page 1: HTTP 503", since=1000.0)
    ok, body = health.status(now=1599.0)
    assert ok and body["status"] == "degraded" and body["source"]["failing_for_s"] == 599.0
    health.record_source("snapshot incomplete: users page 1: HTTP 503", since=1500.0)   # the first failure counts
    ok, body = health.status(now=1600.0)
    assert not ok and body["reason"].startswith("source: failing for 600s: snapshot incomplete")
    health.record_source(None)
    ok, body = health.status(now=1601.0)
    assert ok and body["source"]["ok"] is True and body["source"]["last_complete"] is not None
