"""Nothing waits for the interval but the backstop itself (README "When cycles run").

`provisiond run` in a subprocess with `interval = "24h"`, the emulators in the test process; faults
set over `/_admin/faults`, `/healthz` read over HTTP, the targets read back over SCIM HTTP, the
operator's commands (`approve`, `resync`) run as separate processes. With a day between full
cycles, each outcome below can only come from an early wake-up.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon import approvals
from daemon.config import MaxDeletes
from daemon.engine import META_CHANGE_REMOVALS
from daemon.sandbox.runner import ZPA_TOKEN, write_config
from daemon.store import Store
from tests.safety import harness, removal_requests
from tests.safety.test_deletion_threshold import remove_from_scope
from tests.test_changes_daemon import World, feed_world, gone_or_inactive, wait_for
from tests.test_faults_daemon import assert_log_schema, get, set_faults
from tests.test_service import Daemon, run_command, until
from tests.test_service_tools import free_port

pytestmark = pytest.mark.timeout(120)

ZPA_MAX_DELETES = 2


def configure(tmp_path: Path, sb: Any, *, changes: str = "poll") -> Path:
    """The sandbox config, both targets, a day between full cycles, retries from 1 s."""
    path = write_config(sb, tmp_path / "provisiond.toml", state_path=str(tmp_path / "state.db"),
                        interval="24h", zia_rps=5000.0)
    text = path.read_text(encoding="utf-8")
    text = text.replace("page_size = 500\n", f'page_size = 500\nchanges = "{changes}"\nchange_poll_interval = "1s"\n', 1)
    text = text.replace('max_deletes = "10%"', f"max_deletes = {ZPA_MAX_DELETES}", 1)    # zpa's
    text = text.replace('max_deletes = "10%"', "max_deletes = 4", 1)                    # zia's
    text = text.replace('log_level = "info"\n', 'log_level = "info"\nretry_backoff = "1s"\n'
                        f'http_listen = "127.0.0.1:{free_port()}"\n', 1)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with feed_world(tmp_path, lambda sb: configure(tmp_path, sb)) as w:
        yield w


def started(d: Daemon, reason: str, target: str | None = None, since: int = 0) -> list[dict[str, Any]]:
    """The full cycles' `cycle.started` with this reason (and for this target)."""
    return [e for e in d.named("cycle.started", since) if e.get("reason") == reason
            and (target is None or target in e.get("targets", ()))]


def full_finished(d: Daemon, target: str, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in d.named("cycle.finished", since) if e.get("target") == target and e.get("kind") == "cycle"]


async def scim_delete_user(base_url: str, token: str, user_id: str) -> None:
    """Drift behind provisiond's back: a user deleted in the target directly."""
    async with aiohttp.ClientSession() as session, session.delete(
            f"{base_url}/Users/{user_id}", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 204, await resp.text()


async def test_a_failed_target_an_approval_and_a_resync_do_not_wait_for_a_daily_interval(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    zia_only = [u for u in w.members("ZIA Users") if u not in w.members("ZPA Users")]
    zpa_only = [u for u in w.members("ZPA Users") if u not in w.members("ZIA Users")]
    assert len(zia_only) >= 1 and len(zpa_only) >= ZPA_MAX_DELETES + 2, (zia_only, zpa_only)
    async with w.daemon() as d:
        await until(lambda: d.named("cycle.summary"), "the first full cycle", within=30, explain=d.describe)
        assert d.named("cycle.started")[0]["reason"] == "start"

        # 1. zia refuses our credentials while a change for it arrives: it misses the batch (the
        # feed commits it for zpa); once zia answers again, its quarantine ends and its full cycle
        # brings the change, a day before the interval would.
        await set_faults(w.sb.zia_url, error_rate=1.0, error_statuses=[401])
        victim = zia_only[0]
        d_.set_enabled(victim, False)
        await until(lambda: [e for e in d.named("changes.missed") if e.get("target") == "zia"],
                    "zia missing the batch", explain=d.describe)
        shown = await run_command("status", "-c", str(w.config))
        assert shown.returncode == 0 and "CHANGES MISSED" in shown.stdout.decode(), shown.stdout.decode()
        await set_faults(w.sb.zia_url, reset=True)
        await wait_for(lambda: gone_or_inactive(t, "zia", w.name(victim)), "the missed change in zia", d)
        retried = [e for e in d.named("cycle.started")[1:] if "reason" in e and "zia" in e["targets"]]
        assert retried and retried[0]["reason"] in ("quarantine_expired", "missed_changes"), retried
        assert retried[0]["targets"] == ["zia"] and "zia" in retried[0]["reasons"], retried

        # 2. A mass removal through the feed is held (zpa's max_deletes); the target's full cycle
        # comes at once and holds it as a plan `approve` can name; approving it applies it now.
        leaving = zpa_only[:ZPA_MAX_DELETES + 2]
        names = [w.name(u) for u in leaving]
        zpa_users = d_.group_by_name("ZPA Users")["id"]
        mark = len(d.events)
        for uid in leaving:
            d_.remove_member(zpa_users, uid)
        held = await until(lambda: [e for e in full_finished(d, "zpa", mark) if e.get("held")],
                           "zpa's full cycle holding the removals", within=30, explain=d.describe)
        assert started(d, "missed_changes", "zpa", mark), d.describe()
        still = [n for n in names if not await gone_or_inactive(t, "zpa", n)]
        assert still and held[0]["held"] > 0, (still, held)        # held: not sent before the approval
        approved = await run_command("approve", "-c", str(w.config), "--target", "zpa")
        assert approved.returncode == 0, approved.stderr.decode()
        for name in names:
            await wait_for(lambda name=name: gone_or_inactive(t, "zpa", name), f"{name} removed once approved", d)
        assert started(d, "approved", "zpa", mark), d.describe()

        # 3. `provisiond resync` from another process: the target is read whole within seconds,
        # and a user deleted behind provisiond's back is there again.
        kept = next(u for u in w.members("ZPA Users") if u not in leaving)
        found = await t.user("zpa", w.name(kept))
        assert found is not None
        await scim_delete_user(w.sb.zpa_url, ZPA_TOKEN, str(found["id"]))
        mark = len(d.events)
        asked = await run_command("resync", "-c", str(w.config), "--target", "zpa")
        assert asked.returncode == 0, asked.stderr.decode()

        async def back() -> bool:
            return await t.user("zpa", w.name(kept)) is not None
        await wait_for(back, "the drifted user re-created by the resync", d)
        assert started(d, "resync", "zpa", mark) and d.named("target.resynced", mark), d.describe()

        assert len(started(d, "interval")) == 0, "no full cycle came from the 24 h interval"
        shown = await run_command("status", "-c", str(w.config))
        assert "CHANGES MISSED" not in shown.stdout.decode(), shown.stdout.decode()   # caught up
        assert {"cycle.started", "changes.missed"} <= assert_log_schema(d.events)
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0


async def test_a_pingone_outage_is_retried_on_a_backoff_and_healthz_recovers(world: World) -> None:
    w, t = world, world.targets
    await set_faults(w.sb.pingone_url, error_rate=1.0, error_statuses=[503])    # down from the start
    async with w.daemon() as d:
        url = str((await until(lambda: d.named("http.listening"), "http.listening", explain=d.describe))[0]["url"])
        await until(lambda: d.named("source.failing"), "source.failing", within=40, explain=d.describe)
        status, body = await get(url + "/healthz")
        # the bound is 10 min, not twice 24 h; the daemon has not failed that long yet: degraded
        assert status == 200 and body["source"]["ok"] is False, body
        assert body["source"]["failing_after_s"] == 600.0, body
        assert d.named("source.failing")[0]["failing_after_s"] == 600.0
        await set_faults(w.sb.pingone_url, reset=True)
        await until(lambda: d.named("source.recovered"), "source.recovered", within=40, explain=d.describe)
        assert started(d, "source_retry"), d.describe()
        member = w.members("ZPA Users")[0]

        async def provisioned() -> bool:
            return await t.user("zpa", w.name(member)) is not None
        await wait_for(provisioned, "the first complete cycle's users in zpa", d)
        await until(lambda: full_finished(d, "zpa") and full_finished(d, "zia"), "both targets' cycles",
                    explain=d.describe)

        async def healthy() -> bool:
            code, _ = await get(url + "/healthz")
            return code == 200 and (await get(url + "/healthz"))[1]["source"]["ok"] is True
        await wait_for(healthy, "/healthz 200 with the source ok", d)
        assert len(started(d, "interval")) == 0
        d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0


async def test_a_full_cycle_counts_the_removals_the_feed_made_within_the_window(tmp_path: Path) -> None:
    """A removal the feed held is owed to the target's full cycle at once (`missed_changes`): that
    cycle's `max_deletes` is what the window left, so a mass removal split between the feed and
    the full cycle is held as a whole, and released by `approve` as one plan."""
    async with harness(tmp_path, users=80) as h:
        h.retarget("zpa", max_deletes=MaxDeletes(count=4))
        assert not (await h.cycle()).failed
        zpa_em = h.emulator("zpa")
        leaving = remove_from_scope(h, 0.0)[:3]            # 3 removals: under 4, over 4 - 2
        key = f"{META_CHANGE_REMOVALS}.zpa"
        await h.store.set_meta(key, json.dumps([[time.time(), 2]]))   # the feed removed 2 just now
        await h.cycle()
        (held,) = h.events("plan.removals_held", target="zpa")
        assert held["held"] >= len(leaving) and held["limit"] == 2, held
        assert removal_requests(zpa_em, members=False) == []
        await h.store.set_meta(key, json.dumps([[time.time() - 3601.0, 2]]))   # an hour later
        await h.cycle()
        assert not h.events("plan.removals_held", target="zpa")
        assert len(removal_requests(zpa_em, members=False)) == len(leaving)


async def test_the_requests_a_running_daemon_reads_each_second(tmp_path: Path) -> None:
    """What `approve`, `approve --reload`, `--source-shrink` and `resync` write, as the daemon's
    one-second look reads it back (a new request has a new value; an answered one is empty)."""
    store = await Store.open(str(tmp_path / "state.db"))
    try:
        assert await approvals.requests(store) == approvals.Requests()
        await store.set_meta(f"{approvals.META_RESYNC}.zpa", "token-1")
        await store.set_meta(f"{approvals.META_RESYNC}.zia", "")            # answered
        await store.set_meta(f"{approvals.META_MISSED_CHANGES}.zia", "1700000000.5")
        await store.set_meta(approvals.META_RELOAD_APPROVED, "0")           # nothing approved
        await store.set_meta(approvals.META_ACCEPT_SHRINK, "1200")
        await store.approve("zpa")
        found = await approvals.requests(store)
        assert found.resync == {"zpa": "token-1"} and found.missed == {"zia": 1700000000.5}
        assert found.reload_approved is None and found.accept_shrink == "1200"
        assert set(found.approved) == {"zpa"}
        await store.set_meta(approvals.META_RELOAD_APPROVED, "1700000001.000000")
        await store.set_meta(approvals.META_ACCEPT_SHRINK, "0")             # taken by a snapshot
        found = await approvals.requests(store)
        assert found.reload_approved == "1700000001.000000" and found.accept_shrink is None
    finally:
        await store.close()
