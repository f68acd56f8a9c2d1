"""The change feed wired end to end: `provisiond run` in a subprocess with `interval` left at its
default (a day) or an hour, the emulators in the test process; the targets read back over SCIM
HTTP, the daemon's log lines, /healthz, and `provisiond why` / `status` run as commands."""

from __future__ import annotations

import io
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from daemon.config import DEFAULT_INTERVAL
from daemon.sandbox.runner import ZIA_TOKEN, ZPA_TOKEN, Sandbox, build_sandbox, running, write_config
from daemon.source.changes import DEFAULT_OVERLAP, epoch
from tests.test_alerts import scrape
from tests.test_faults_daemon import assert_log_schema, set_faults
from tests.test_service import Daemon, daemon_running, run_command, until
from tests.test_service_tools import free_port

pytestmark = pytest.mark.timeout(120)

POLL = "1s"


MAX_DELETES = 4


def configure(sb: Sandbox, tmp_path: Path, **source: str) -> Path:
    path = write_config(sb, tmp_path / "provisiond.toml", state_path=str(tmp_path / "state.db"), interval="1h",
                        zia_rps=5000.0)
    extra = "".join(f'{key} = "{value}"\n' for key, value in {"change_poll_interval": POLL, **source}.items())
    text = path.read_text(encoding="utf-8").replace("page_size = 500\n", "page_size = 500\n" + extra, 1)
    text = text.replace('max_deletes = "10%"', f"max_deletes = {MAX_DELETES}")
    text = text.replace('log_level = "info"\n', f'log_level = "info"\nhttp_listen = "127.0.0.1:{free_port()}"\n', 1)
    path.write_text(text, encoding="utf-8")
    return path


class Targets:
    """The SCIM targets as a client sees them."""

    def __init__(self, sb: Sandbox, session: aiohttp.ClientSession) -> None:
        self.sb = sb
        self.session = session

    async def users(self, target: str, user_name: str) -> list[dict[str, Any]]:
        """Every object of the target with this userName (a duplicate shows as two)."""
        base, token = (self.sb.zpa_url, ZPA_TOKEN) if target == "zpa" else (self.sb.zia_url, ZIA_TOKEN)
        async with self.session.get(f"{base}/Users", params={"filter": f'userName eq "{user_name}"'},
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
            found: list[dict[str, Any]] = (await resp.json()).get("Resources") or []
        return found

    async def user(self, target: str, user_name: str) -> dict[str, Any] | None:
        found = await self.users(target, user_name)
        return found[0] if found else None

    async def group_members(self, target: str, name: str) -> list[str]:
        """The group's member ids as the target lists them (a member twice shows twice)."""
        base, token = (self.sb.zpa_url, ZPA_TOKEN) if target == "zpa" else (self.sb.zia_url, ZIA_TOKEN)
        async with self.session.get(f"{base}/Groups", params={"filter": f'displayName eq "{name}"'},
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
            found = (await resp.json()).get("Resources") or []
        if not found:
            return []
        async with self.session.get(f"{base}/Groups/{found[0]['id']}",
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
            return [str(m["value"]) for m in (await resp.json()).get("members") or []]

    async def group_member_ids(self, target: str, name: str) -> set[str]:
        return set(await self.group_members(target, name))


async def gone_or_inactive(t: Targets, target: str, name: str) -> bool:
    user = await t.user(target, name)
    return user is None or user.get("active") is False


async def wait_for(check: Any, what: str, d: Daemon, within: float = 20.0) -> None:
    with anyio.move_on_after(within):
        while True:
            if await check():
                return
            await anyio.sleep(0.05)
    pytest.fail(f"timed out after {within}s waiting for {what}\n{d.describe()}")


class World:
    def __init__(self, sb: Sandbox, config: Path, targets: Targets, tmp_path: Path) -> None:
        self.sb, self.config, self.targets, self.tmp_path = sb, config, targets, tmp_path

    @asynccontextmanager
    async def daemon(self) -> AsyncIterator[Daemon]:
        async with anyio.create_task_group() as tg, daemon_running(self.config, None, tg) as d:
            try:
                yield d
            finally:
                tg.cancel_scope.cancel()

    def members(self, group: str) -> list[str]:
        d = self.sb.directory
        return sorted(d.direct_member_ids(d.group_by_name(group)["id"]))

    def name(self, uid: str) -> str:
        return str(self.sb.directory.users[uid]["username"])

    def outside(self) -> str:
        inside = set(self.members("ZPA Users")) | set(self.members("ZIA Users")) | set(self.members("ZPA Contractors"))
        return next(uid for uid in sorted(self.sb.directory.users) if uid not in inside)

    def subscribe(self, url: str, secret: str) -> None:
        """The PingOne subscription README tells operators to create: every action type, to *url*."""
        self.sb.pingone.feed.subscribe({
            "name": "provisiond", "enabled": True, "format": "ACTIVITY",
            "httpEndpoint": {"url": url, "headers": {"X-Provisiond-Webhook-Secret": secret}},
            "filterOptions": {"includedActionTypes": sorted(set(self.sb.pingone.feed.settings.action_types.values()))}})

    async def feed_settings(self, **settings: Any) -> None:
        async with self.targets.session.post(f"{self.sb.pingone_url}/_admin/activities/settings",
                                             json=settings) as resp:
            assert resp.status == 200, await resp.text()

    def last_activity(self, entity: str) -> dict[str, Any]:
        """The emulator's newest audit record naming *entity* (what PingOne's feed says)."""
        named = [a for a in self.sb.pingone.feed.records
                 if any(r.get("id") == entity for r in a.body["resources"])]
        return max(named, key=lambda a: (a.recorded, a.seq)).body


@asynccontextmanager
async def feed_world(tmp_path: Path, config: Callable[[Sandbox], Path] | None = None) -> AsyncIterator[World]:
    """30 users in 4 groups on emulators that index audit records in 0.2 s; the config written by
    *config* (default `configure`)."""
    sb = build_sandbox(users=30, groups=4, seed=7, zia_rps=5000.0)
    sb.zpa.faults.rate_limit_rps = None
    async with running(sb, port=0), aiohttp.ClientSession() as session:
        path = config(sb) if config is not None else configure(sb, tmp_path)
        w = World(sb, path, Targets(sb, session), tmp_path)
        await w.feed_settings(indexing_delay=0.2)
        yield w


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with feed_world(tmp_path) as w:
        yield w


async def first_cycle(d: Daemon) -> None:
    await until(lambda: d.named("cycle.summary"), "the first full cycle", within=30, explain=d.describe)


def incremental_finished(d: Daemon, since: int) -> int:
    return sum(1 for e in d.events[since:] if e.get("event") == "cycle.finished" and e.get("kind") == "incremental")


def why_lines(text: str) -> dict[str, tuple[int, str]]:
    """`why`'s "<target> incremental cycle N (outcome)" parts: target -> (N, outcome)."""
    return {m[1]: (int(m[2]), m[3]) for m in re.finditer(r"(\w+) incremental cycle (\d+) \((\w+)\)", text)}


async def test_changes_reach_the_targets_within_seconds_with_the_interval_left_at_its_default(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    text = w.config.read_text(encoding="utf-8")
    assert 'interval = "1h"\n' in text
    w.config.write_text(text.replace('interval = "1h"\n', "", 1), encoding="utf-8")   # the default: a day
    async with w.daemon() as d:
        await first_cycle(d)
        assert d.named("daemon.ready")[0]["interval_s"] == DEFAULT_INTERVAL == 86400.0
        both = next(u for u in w.members("ZIA Users") if u in w.members("ZPA Users"))
        d_.set_enabled(both, False)                                                  # disable
        for target in ("zpa", "zia"):
            await wait_for(lambda target=target: gone_or_inactive(t, target, w.name(both)), f"{target} disable", d)

        # `why USER` names the event that carried the disable and each target's incremental cycle.
        event = w.last_activity(both)
        state = w.tmp_path / "state.db"
        await until(lambda: _event_status(state, both) == ("applied", event["id"]), "the batch committed",
                    explain=d.describe)
        shown = await run_command("why", w.name(both), "-c", str(w.config))
        out = shown.stdout.decode()
        assert shown.returncode == 0, shown.stderr.decode()
        assert f"last change-feed event: {event['action']['type']} (activity {event['id']}), " \
               f"recorded {event['recordedAt']}" in out, out
        assert "    applied " in out, out
        carried = why_lines(out)
        incremental = {(e["target"], e["cycle"]) for e in d.events
                       if e.get("event") == "cycle.finished" and e.get("kind") == "incremental"}
        assert set(carried) == {"zpa", "zia"}, out
        for target, (cycle, outcome) in carried.items():
            assert (target, cycle) in incremental and outcome == "success", (target, cycle, incremental)

        new = w.outside()                                                            # membership add
        zpa_users = d_.group_by_name("ZPA Users")["id"]
        d_.add_member(zpa_users, new)

        async def added() -> bool:
            user = await t.user("zpa", w.name(new))
            return user is not None and user.get("active") is not False and \
                str(user["id"]) in await t.group_member_ids("zpa", "ZPA Users")
        await wait_for(added, "zpa create + group add", d)
        d_.remove_member(zpa_users, new)                                             # membership remove
        await wait_for(lambda: gone_or_inactive(t, "zpa", w.name(new)), "zpa leave scope", d)

        victim = next(u for u in w.members("ZIA Users") if u != both)               # deleted (404)
        victim_name = w.name(victim)
        d_.delete_user(victim)
        await wait_for(lambda: gone_or_inactive(t, "zia", victim_name), "zia delete", d)

        other = w.outside()                                                          # out of scope
        for em in (w.sb.zpa, w.sb.zia):
            em.reset_counters()
        mark = len(d.events)
        d_.update_user(other, title="Elsewhere")
        await until(lambda: incremental_finished(d, mark) >= 2, "the incremental cycles of the event",
                    explain=d.describe)
        assert not w.sb.zpa.request_log and not w.sb.zia.request_log
        assert len(d.named("cycle.summary")) == 1, "no full cycle ran: the feed carried every change"
        assert {"cycle.started", "cycle.finished"} <= assert_log_schema(d.events)   # README's event table
        port = int(str(d.named("http.listening")[0]["url"]).rsplit(":", 1)[1])
        samples = await scrape(port)
        counts = {s[0]["target"]: s[1] for s in samples["provisiond_propagation_latency_seconds_count"]}
        assert counts.get("zia", 0) >= 2 and counts.get("zpa", 0) >= 3, counts
        (lag,) = samples["provisiond_change_feed_lag_seconds"]
        assert 0.0 <= lag[1] < 30.0
        # `provisiond resync` (drift repaired on demand) is not left for tomorrow's cycle.
        resync = await run_command("resync", "-c", str(w.config))
        assert resync.returncode == 0, resync.stderr.decode()
        await until(lambda: len(d.named("cycle.summary")) == 2 and len(d.named("target.resynced")) == 2,
                    "the full cycle it asked for", within=30, explain=d.describe)
        assert [e.get("reason") for e in d.named("cycle.started") if "cycle_number" in e] == ["start", "resync"]
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0
    shown = await run_command("status", "-c", str(w.config))
    out = shown.stdout.decode()
    assert shown.returncode == 0 and "change feed (poll): watermark" in out and "last incremental cycle" in out, out


def _event_status(state: Path, user_id: str) -> tuple[str, str] | None:
    with sqlite3.connect(state) as db:
        row = db.execute("SELECT status, activity_id FROM change_event WHERE user_id=?", (user_id,)).fetchone()
    return (str(row[0]), str(row[1])) if row else None


async def test_a_burst_of_deletions_through_the_feed_is_held_by_max_deletes(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    async with w.daemon() as d:
        await first_cycle(d)
        scoped = w.members("ZPA Users")
        names = [w.name(u) for u in scoped]
        for uid in scoped[:MAX_DELETES + 1]:
            d_.delete_user(uid)
        await until(lambda: [e for e in d.named("plan.removals_held") if e.get("target") == "zpa"],
                    "zpa holding the removals", explain=d.describe)
        # The deletions may arrive over two polls: then those within what is left of the window's
        # max_deletes go through, and the rest are held; never more than max_deletes in all.
        removed = [name for name in names[:MAX_DELETES + 1] if await gone_or_inactive(t, "zpa", name)]
        assert len(removed) < MAX_DELETES + 1, removed


async def test_a_feed_outage_falls_back_to_full_cycles_and_recovers(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    async with w.daemon() as d:
        await first_cycle(d)
        await w.feed_settings(outage_status=503)
        uid = w.members("ZIA Users")[0]
        d_.set_enabled(uid, False)
        await until(lambda: d.named("changes.fallback"), "the fallback", within=30, explain=d.describe)
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(uid)), "the change by a full cycle", d)
        await until(lambda: len(d.named("cycle.summary")) >= 2, "the full cycle's summary", explain=d.describe)
        await w.feed_settings(outage_status=None)
        await until(lambda: d.named("changes.recovered"), "the feed back", explain=d.describe)
        d_.set_enabled(uid, True)
        await wait_for(lambda: _active(t, "zia", w.name(uid)), "re-enabled through the feed", d)


async def _active(t: Targets, target: str, name: str) -> bool:
    user = await t.user(target, name)
    return user is not None and user.get("active") is not False


def watermark(path: Path) -> float | None:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT value FROM meta WHERE key='change_watermark'").fetchone()
    return float(row[0]) if row else None


async def test_the_watermark_survives_a_restart(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    state = w.tmp_path / "state.db"
    async with w.daemon() as d:
        await first_cycle(d)
        await until(lambda: incremental_finished(d, 0) or watermark(state), "a watermark", explain=d.describe)
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0
    before = watermark(state)
    assert before is not None
    uid = w.members("ZIA Users")[0]
    d_.set_enabled(uid, False)                    # while the daemon is down
    async with w.daemon() as d:
        await until(lambda: d.named("daemon.ready"), "ready", explain=d.describe)
        assert watermark(state) is not None and watermark(state) >= before
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(uid)), "the change made while down", d)
        mark = len(d.events)
        d_.set_enabled(uid, True)
        await wait_for(lambda: _active(t, "zia", w.name(uid)), "a change through the feed after the restart", d)
        assert not d.named("changes.gap"), "the stored watermark was used: no gap, no extra full cycle"
        assert incremental_finished(d, mark) >= 1

        # A gap longer than the audit log's retention (the host suspended for 15 days): the feed
        # cannot say what changed, so a full cycle comes first, and incremental cycles after it.
        mark, summaries = len(d.events), len(d.named("cycle.summary"))
        d_.set_enabled(uid, False)
        for _ in range(5):                           # a poll in flight may commit over the first write
            set_watermark(state, time.time() - 15 * 86400)
            if await seen_within(lambda: d.named("changes.gap", mark), 3.0):
                break
        else:
            pytest.fail(f"no changes.gap for a watermark 15 days old\n{d.describe()}")
        await until(lambda: len(d.named("cycle.summary")) > summaries, "the full cycle after the gap",
                    within=30, explain=d.describe)
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(uid)), "the change made across the gap", d)
        gap_at = next(i for i in range(mark, len(d.events)) if d.events[i].get("event") == "changes.gap")
        full_at = next(i for i in range(gap_at, len(d.events)) if d.events[i].get("event") == "cycle.summary")
        assert incremental_finished(d, gap_at) == incremental_finished(d, full_at), \
            "no incremental cycle between the gap and the full cycle"
        assert (watermark(state) or 0.0) > time.time() - 300, "the full snapshot moved the watermark to its start"
        d_.set_enabled(uid, True)
        await wait_for(lambda: _active(t, "zia", w.name(uid)), "a change through the feed after the gap", d)
        assert incremental_finished(d, full_at) >= 1
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0


async def seen_within(check: Any, within: float) -> bool:
    with anyio.move_on_after(within):
        while True:
            if check():
                return True
            await anyio.sleep(0.05)
    return False


def set_watermark(path: Path, moment: float) -> None:
    with sqlite3.connect(path, timeout=10) as db:
        db.execute("UPDATE meta SET value=? WHERE key='change_watermark'", (repr(moment),))


async def test_a_sigkill_mid_apply_lands_the_change_exactly_once_after_the_restart(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    state = w.tmp_path / "state.db"
    new = w.outside()
    name = w.name(new)
    zpa_users = d_.group_by_name("ZPA Users")["id"]

    def created() -> bool:     # the target has processed the create (its answer may still be on its way)
        return any(str(u.get("userName")).lower() == name.lower() for u in w.sb.zpa.users.values())

    async with w.daemon() as d:
        await first_cycle(d)
        await until(lambda: watermark(state), "a watermark", explain=d.describe)
        # zpa takes a create at once and answers it 5 s later: the apply is in flight until then.
        await set_faults(w.sb.zpa_url, latency_ms=5000.0, latency_mode="deadline")
        mark = len(d.events)
        d_.add_member(zpa_users, new)
        await until(created, "the create at the target", explain=d.describe)
        assert [e for e in d.named("cycle.started", mark) if e.get("kind") == "incremental" and "zpa" in e["targets"]]
        d.signal(signal.SIGKILL)
        assert await d.exit_code(10) == -signal.SIGKILL
        assert not [e for e in d.named("cycle.finished", mark) if e.get("target") == "zpa"], \
            "killed while zpa's incremental apply was in flight"

    # The state file after the kill: the batch was not committed, so the next poll hands it on again.
    event = w.last_activity(new)
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT 1 FROM change_seen WHERE id=?", (event["id"],)).fetchone() is None
    recorded = epoch(event["recordedAt"])
    mark = watermark(state)
    assert recorded is not None and mark is not None and mark - DEFAULT_OVERLAP < recorded, (mark, recorded)
    assert _event_status(state, new) == ("pending", event["id"])

    await set_faults(w.sb.zpa_url, latency_ms=0.0, latency_mode="before")
    async with w.daemon() as d:
        await first_cycle(d)
        full_at = next(i for i, e in enumerate(d.events) if e.get("event") == "cycle.summary")
        assert incremental_finished(d, 0) == incremental_finished(d, full_at), "the full cycle comes first"

        async def member() -> bool:
            found = await t.users("zpa", name)
            return len(found) == 1 and str(found[0]["id"]) in await t.group_member_ids("zpa", "ZPA Users")
        await wait_for(member, "the user in zpa and its group", d)
        await until(lambda: _event_status(state, new) not in (None, ("pending", event["id"])),
                    "the event no longer pending", explain=d.describe)
        found = await t.users("zpa", name)
        assert len(found) == 1, f"one object for the user, not {len(found)}"
        members = await t.group_members("zpa", "ZPA Users")
        assert members.count(str(found[0]["id"])) == 1, members
        assert not [e for e in d.named("user.created") if e.get("source_id") == new], \
            "the create sent before the kill is recovered, not sent again"
        port = int(str(d.named("http.listening")[0]["url"]).rsplit(":", 1)[1])
        async with t.session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200, await resp.text()
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0


async def test_a_webhook_delivery_is_applied_at_once_not_at_the_next_poll(world: World) -> None:
    """The audit log is read once an hour here and lags 10 minutes: a change reaching the target
    within seconds came through the webhook, whose stored batch wakes the feed at once."""
    w, t, d_ = world, world.targets, world.sb.directory
    secret = "webhook-shared-secret-for-the-wake-up"
    text = w.config.read_text(encoding="utf-8").replace(
        f'change_poll_interval = "{POLL}"', f'changes = "webhook"\nwebhook_secret = "{secret}"\n'
        'change_poll_interval = "1h"', 1)
    w.config.write_text(text, encoding="utf-8")
    await w.feed_settings(indexing_delay=600.0)
    async with w.daemon() as d:
        await first_cycle(d)
        url = str(d.named("http.listening")[0]["url"]) + "/pingone/events"
        w.subscribe(url, secret)
        uid = w.members("ZIA Users")[0]
        d_.set_enabled(uid, False)
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(uid)), "the change through the webhook", d)
        assert d.named("webhook.received")
        assert [e for e in d.named("cycle.started") if e.get("kind") == "incremental"]
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0


async def test_webhook_mode_takes_changes_posted_with_the_secret_and_refuses_the_rest(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    secret = "webhook-shared-secret-for-the-test"
    text = w.config.read_text(encoding="utf-8").replace(
        'change_poll_interval = ', f'changes = "webhook"\nwebhook_secret = "{secret}"\nchange_poll_interval = ', 1)
    w.config.write_text(text, encoding="utf-8")
    await w.feed_settings(indexing_delay=600.0)      # the audit log lags: only the webhook is in time
    async with w.daemon() as d:
        await first_cycle(d)
        url = str(d.named("http.listening")[0]["url"]) + "/pingone/events"
        async with t.session.post(url, json=[{"id": "x", "recordedAt": "2026-01-01T00:00:00.000Z"}],
                                  headers={"X-Provisiond-Webhook-Secret": "wrong"}) as resp:
            assert resp.status == 401
        w.subscribe(url, secret)
        uid = w.members("ZIA Users")[0]
        d_.set_enabled(uid, False)
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(uid)), "the change through the webhook", d)
        assert d.named("webhook.received")
        assert len(d.named("cycle.summary")) == 1

        # Oversized, malformed or mistyped bodies are refused with the secret too, and logged.
        good = {"X-Provisiond-Webhook-Secret": secret}
        for body, kind, status in ((b"[" + b" " * (1 << 20) + b"]", "application/json", 413),
                                   (b'{"id": "a1"', "application/json", 400),
                                   (b'[{"id": "a1"}]', "application/json", 400),
                                   (b"[]", "text/plain", 415)):
            async with t.session.post(url, data=io.BytesIO(body), headers={**good, "Content-Type": kind}) as resp:
                assert resp.status == status, (body[:20], resp.status)
        await until(lambda: len(d.named("webhook.refused")) == 5, "the refusals logged", explain=d.describe)
        assert sorted(e["status"] for e in d.named("webhook.refused")) == [400, 400, 401, 413, 415]

        # Nothing is lost when PingOne's deliveries are refused (a secret rotated on one side only):
        # the poller still reads the audit log, once it has indexed the change.
        (sub,) = w.sb.pingone.feed.subscriptions.values()
        sub.body["httpEndpoint"]["headers"] = {"X-Provisiond-Webhook-Secret": "rotated-elsewhere"}
        await w.feed_settings(indexing_delay=0.2)
        d_.set_enabled(uid, True)
        await wait_for(lambda: _active(t, "zia", w.name(uid)), "the change through the poll", d)
        assert sub.last_status == 401 and sub.attempts > sub.delivered, sub.stats()
        assert len(d.named("cycle.summary")) == 1, "carried by the feed, not by a full cycle"
