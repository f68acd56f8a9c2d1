"""The change feed wired end to end: `provisiond run` in a subprocess with `interval` left at an
hour, the emulators in the test process; the targets read back over SCIM HTTP."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from daemon.sandbox.runner import ZIA_TOKEN, ZPA_TOKEN, Sandbox, build_sandbox, running, write_config
from tests.test_alerts import scrape
from tests.test_faults_daemon import assert_log_schema
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

    async def user(self, target: str, user_name: str) -> dict[str, Any] | None:
        base, token = (self.sb.zpa_url, ZPA_TOKEN) if target == "zpa" else (self.sb.zia_url, ZIA_TOKEN)
        async with self.session.get(f"{base}/Users", params={"filter": f'userName eq "{user_name}"'},
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
            found = (await resp.json()).get("Resources") or []
        return found[0] if found else None

    async def group_member_ids(self, target: str, name: str) -> set[str]:
        base, token = (self.sb.zpa_url, ZPA_TOKEN) if target == "zpa" else (self.sb.zia_url, ZIA_TOKEN)
        async with self.session.get(f"{base}/Groups", params={"filter": f'displayName eq "{name}"'},
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
            found = (await resp.json()).get("Resources") or []
        if not found:
            return set()
        async with self.session.get(f"{base}/Groups/{found[0]['id']}",
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
            return {str(m["value"]) for m in (await resp.json()).get("members") or []}


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

    async def feed_settings(self, **settings: Any) -> None:
        async with self.targets.session.post(f"{self.sb.pingone_url}/_admin/activities/settings",
                                             json=settings) as resp:
            assert resp.status == 200, await resp.text()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    sb = build_sandbox(users=30, groups=4, seed=7, zia_rps=5000.0)
    sb.zpa.faults.rate_limit_rps = None
    async with running(sb, port=0), aiohttp.ClientSession() as session:
        w = World(sb, configure(sb, tmp_path), Targets(sb, session), tmp_path)
        await w.feed_settings(indexing_delay=0.2)
        yield w


async def first_cycle(d: Daemon) -> None:
    await until(lambda: d.named("cycle.summary"), "the first full cycle", within=30, explain=d.describe)


def incremental_finished(d: Daemon, since: int) -> int:
    return sum(1 for e in d.events[since:] if e.get("event") == "cycle.finished" and e.get("kind") == "incremental")


async def test_changes_reach_the_targets_within_seconds_with_an_hour_interval(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    async with w.daemon() as d:
        await first_cycle(d)
        both = next(u for u in w.members("ZIA Users") if u in w.members("ZPA Users"))
        d_.set_enabled(both, False)                                                  # disable
        for target in ("zpa", "zia"):
            await wait_for(lambda target=target: gone_or_inactive(t, target, w.name(both)), f"{target} disable", d)

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
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0
    shown = await run_command("status", "-c", str(w.config))
    out = shown.stdout.decode()
    assert shown.returncode == 0 and "change feed (poll): watermark" in out and "last incremental cycle" in out, out


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
        w.sb.pingone.feed.subscribe({
            "name": "provisiond", "enabled": True, "format": "ACTIVITY",
            "httpEndpoint": {"url": url, "headers": {"X-Provisiond-Webhook-Secret": secret}},
            "filterOptions": {"includedActionTypes": sorted(set(w.sb.pingone.feed.settings.action_types.values()))}})
        uid = w.members("ZIA Users")[0]
        d_.set_enabled(uid, False)
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(uid)), "the change through the webhook", d)
        assert d.named("webhook.received")
        assert len(d.named("cycle.summary")) == 1
