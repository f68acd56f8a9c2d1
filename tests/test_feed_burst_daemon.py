"""Issue 15's "burst of 1,000 deletions through the feed (held by `max_deletes`)" as the daemon
does it: `provisiond run` in a subprocess following the feed (`changes = "poll"`), 1,000 users of
zpa's scope deleted in PingOne over two polls; the SCIM emulators' request logs, the daemon's log
lines, /healthz and the `status` / `approve` commands checked from outside the process."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.sandbox.runner import build_sandbox, running
from daemon.sandbox.scim import ScimEmulator
from tests.harness import until
from tests.safety import assert_converged, removal_requests, target_users
from tests.test_changes_daemon import MAX_DELETES, Targets, World, configure, first_cycle
from tests.test_service import Daemon, run_command

pytestmark = pytest.mark.timeout(150)

USERS = 1100          # ~1,060 of them provisioned to zpa (a few are disabled or have no email userName)
BURST = 1000


def removed_users(em: ScimEmulator, since: float, names: dict[str, str]) -> list[str]:
    """The userNames (lowercased) of every user removal *em* received since *since*, once per request."""
    return [names[req["path"].rsplit("/Users/", 1)[1]] for req in removal_requests(em, members=False)
            if req["started"] >= since and "/Users/" in req["path"]]


def held_by(d: Daemon, target: str, since: int, *, incremental: bool) -> list[dict[str, Any]]:
    """*target*'s `plan.removals_held` since event *since*, of its incremental cycles or of its full ones."""
    feed_cycles = {e.get("cycle") for e in d.named("cycle.started")
                   if e.get("kind") == "incremental" and e.get("target") == target}
    return [e for e in d.named("plan.removals_held", since)
            if e.get("target") == target and (e.get("cycle") in feed_cycles) == incremental]


def approved_cycle_done(d: Daemon, since: int) -> bool:
    """A full cycle started for `approve --target` since event *since* has logged its summary."""
    started = [i for i in range(since, len(d.events)) if d.events[i].get("event") == "cycle.started"
               and d.events[i].get("reason") == "approved"]
    return bool(started) and bool(d.named("cycle.summary", started[0]))


async def status_json(config: Path) -> dict[str, Any]:
    shown = await run_command("status", "--json", "-c", str(config))
    assert shown.returncode == 0, shown.stderr.decode()
    out: dict[str, Any] = json.loads(shown.stdout)
    return out


async def test_a_burst_of_1000_deletions_through_the_feed_is_held_until_approved(tmp_path: Path) -> None:
    sb = build_sandbox(users=USERS, groups=4, seed=7, zia_rps=5000.0)
    sb.zpa.faults.rate_limit_rps = None
    d_ = sb.directory
    zpa_users = d_.group_by_name("ZPA Users")["id"]
    # Everyone in zpa's scope from the start, as generated: no activity records for the set-up.
    listeners, d_.activity_listeners = d_.activity_listeners, []
    for uid in sorted(d_.users):
        d_.add_member(zpa_users, uid)
    d_.activity_listeners = listeners

    async with running(sb, port=0), aiohttp.ClientSession() as session:
        config = configure(sb, tmp_path)
        text = config.read_text(encoding="utf-8")
        assert text.count("requests_per_second = 40\n") == 1 and f"max_deletes = {MAX_DELETES}\n" in text
        # zpa's 40/s would make 2,000 writes take a minute. These 1,100 users stand for a large
        # directory, where 1,000 deletions are well under the source-shrink guard's 10%: here that
        # guard would defer every removal first, and max_deletes is what is under test.
        text = text.replace("requests_per_second = 40\n", "requests_per_second = 5000\n")
        config.write_text(text.replace("[daemon]\n", '[daemon]\nmax_source_shrink = "95%"\n', 1), encoding="utf-8")
        w = World(sb, config, Targets(sb, session), tmp_path)
        await w.feed_settings(indexing_delay=0.2)
        async with w.daemon() as d:
            await first_cycle(d)
            healthz = str(d.named("http.listening")[0]["url"]) + "/healthz"
            names = {res["id"]: key for key, res in target_users(sb.zpa).items()}
            zia_names = {res["id"]: key for key, res in target_users(sb.zia).items()}
            before = {key for key, res in target_users(sb.zpa).items() if res.get("active") is not False}
            scoped = sorted(u for u in d_.direct_member_ids(zpa_users)
                            if str(d_.users[u]["username"]).lower() in before)
            assert len(scoped) > BURST + 30, len(scoped)
            doomed = scoped[:BURST]
            doomed_names = {str(d_.users[u]["username"]).lower() for u in doomed}
            kept_names = before - doomed_names
            started, mark = time.time(), len(d.events)

            # 500 deleted, seen by a poll and held whole; the full cycle that hold owes runs at once
            # and holds them too. Then 500 more, seen by a later poll: held the same way.
            owed = 0
            for batch in (doomed[:BURST // 2], doomed[BURST // 2:]):
                since = len(d.events)
                for uid in batch:
                    d_.delete_user(uid)
                owed += len(batch)
                await until(lambda since=since: held_by(d, "zpa", since, incremental=True),
                            "zpa's incremental cycle holding the batch", within=30, explain=d.describe)
                held = await until(
                    lambda since=since, owed=owed: [
                        e for e in held_by(d, "zpa", since, incremental=False)
                        if e["held"] + len(removed_users(sb.zpa, started, names)) == owed],
                    "zpa's owed full cycle holding all deleted so far", within=30, explain=d.describe)
                await until(lambda since=since: d.named("cycle.summary", since), "that full cycle's summary",
                            explain=d.describe)
            feed_held = held_by(d, "zpa", mark, incremental=True)
            assert len({e["cycle"] for e in feed_held}) >= 2, feed_held
            # After each full snapshot the feed hands the deletions of its overlap on again, and the
            # incremental cycle holds them again: the latest full plan holds them already, so no
            # further full cycle is owed (before the fix, one ran after every poll for 30 s).
            at = next(i for i, e in enumerate(d.events) if e is held[-1])
            full_done = await until(lambda: next((i for i in range(at, len(d.events))
                                                  if d.events[i].get("event") == "cycle.summary"), None),
                                    "the summary of that full cycle", explain=d.describe)
            await until(lambda: held_by(d, "zpa", full_done + 1, incremental=True), "the burst handed on again",
                        within=30, explain=d.describe)

            removed = removed_users(sb.zpa, started, names)
            assert len(removed) <= MAX_DELETES and set(removed) <= doomed_names, removed
            assert held[-1]["held"] == BURST - len(removed), (held, removed)
            assert len(removed_users(sb.zia, started, zia_names)) <= MAX_DELETES   # zia's share is held too
            async with session.get(healthz) as resp:
                assert resp.status == 200, await resp.text()
            status = await status_json(config)
            zpa = next(t for t in status["targets"] if t["target"] == "zpa")
            assert zpa["held_plan"] is not None and zpa["held_plan"]["removals"] == BURST - len(removed), zpa
            assert zpa["held"] >= BURST - len(removed) and zpa["approved_plan"] is None, zpa
            assert not status["source_shrunk"], status["source_shrunk"]

            # Released: the next full cycle removes exactly those 1,000, each once, and nothing else.
            mark = len(d.events)
            approved = await run_command("approve", "--target", "zpa", "-c", str(config))
            assert approved.returncode == 0, approved.stderr.decode()
            await until(lambda: len(set(removed_users(sb.zpa, started, names))) >= BURST, "the 1,000 removals at zpa",
                        within=40, explain=d.describe)
            await until(lambda: approved_cycle_done(d, mark), "the approved cycle's summary", within=30,
                        explain=d.describe)
            owed = [e for e in d.events[full_done:mark] if e.get("event") == "cycle.started"
                    and (e.get("reasons") or {}).get("zpa") == "missed_changes"]
            assert not owed, owed
            removed = removed_users(sb.zpa, started, names)
            assert sorted(removed) == sorted(doomed_names), "each of the 1,000 removed once, and no other"
            have = target_users(sb.zpa)
            assert all(have[n].get("active") is not False for n in kept_names)
            assert not [n for n in doomed_names if n in have and have[n].get("active") is not False]   # ZPA drops them
            assert_converged(d_, sb.zpa, "zpa")
            assert len(removed_users(sb.zia, started, zia_names)) <= MAX_DELETES, "zia's removals still held"

            async with session.get(healthz) as resp:
                assert resp.status == 200, await resp.text()
            d.signal(signal.SIGTERM)
            assert await d.exit_code(20) == 0
