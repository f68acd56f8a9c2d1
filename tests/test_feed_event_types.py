"""Every kind of PingOne change reaches the targets through the change feed alone (issue 15's
"Tests": every event type; duplicates; an event about a user that no longer exists; a burst of
deletions held by `max_deletes`). In-process: the feed polled from the PingOne emulator, the
incremental cycle applied through the engine, the SCIM emulators' contents and request logs
checked after each event; and the full cycle after them all finds nothing left to do."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import MaxDeletes
from daemon.engine import TargetReport
from daemon.sandbox.activities import FeedSettings
from daemon.source.changes import ChangeFeed, read_affected
from daemon.target.resource import ENTERPRISE_USER
from tests.harness import Harness, follow_feed, harness
from tests.safety import assert_converged, removal_requests, target_users
from tests.test_incremental import feed_of, incremental, members, outside

pytestmark = pytest.mark.timeout(120)

OTHER_POP = "00000000-0000-4000-8000-0000000000b2"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    # max_deletes out of the way: these tests are about each change arriving (a burst is held below)
    loose = {"max_deletes": MaxDeletes(count=1000)}
    async with harness(tmp_path, users=40, groups=4, zpa=loose, zia=loose) as h:
        h.strict = True
        await follow_feed(h)
        yield h


def resource(h: Harness, target: str, uid: str) -> dict[str, Any] | None:
    return target_users(h.emulator(target)).get(str(h.directory.users[uid]["username"]).lower())


def active(res: dict[str, Any] | None) -> bool:
    return res is not None and res.get("active", True) is not False


def writes(h: Harness, target: str) -> list[dict[str, Any]]:
    return [r for r in h.emulator(target).request_log if r["method"] != "GET"]


def member_names(h: Harness, target: str, group: str) -> set[str]:
    em = h.emulator(target)
    found = em.group_by_name(group)
    assert found is not None, f"{target}: no group {group}"
    by_id = {res["id"]: str(res["userName"]).lower() for res in em.users.values()}
    return {by_id[m["value"]] for m in found.get("members", [])}


async def step(h: Harness, *, converged: bool = True) -> list[TargetReport]:
    reports = await incremental(h)
    assert all(r.outcome == "success" for r in reports), [(r.target, r.outcome) for r in reports]
    if converged:
        for target in ("zpa", "zia"):
            assert_converged(h.directory, h.emulator(target), target)
    return reports


async def test_every_event_type_reaches_the_targets_and_leaves_the_full_cycle_nothing(h: Harness) -> None:
    d = h.directory
    zpa_users = d.group_by_name("ZPA Users")["id"]

    # user created (into scope by a membership added in the same poll)
    new = d.add_user("feed.new@example.com", email="feed.new@example.com", given="Feed", family="New",
                     department="Ops")["id"]
    d.add_member(zpa_users, new)
    await step(h)
    assert active(resource(h, "zpa", new)) and resource(h, "zia", new) is None
    assert "feed.new@example.com" in member_names(h, "zpa", "ZPA Users")

    # user updated: a mapped attribute
    await step(h)
    d.update_user(new, department="Legal")
    await step(h)
    res = resource(h, "zpa", new)
    assert res is not None and res[ENTERPRISE_USER]["department"] == "Legal", res
    assert [w["method"] for w in writes(h, "zpa")] in (["PATCH"], ["PUT"]) and not writes(h, "zia")

    # disabled, enabled
    d.set_enabled(new, False)
    await step(h)
    assert not active(resource(h, "zpa", new))
    d.set_enabled(new, True)
    await step(h)
    assert active(resource(h, "zpa", new))

    # population move: carried, read anew, and nothing the targets hold depends on it
    d.update_user(new, population={"id": OTHER_POP})
    await step(h)
    assert active(resource(h, "zpa", new)) and not writes(h, "zpa") and not writes(h, "zia")

    # group renamed (the pushed group keeps its PingOne id), then renamed back
    contractors = d.group_by_name("ZPA Contractors")["id"]
    d.rename_group(contractors, "ZPA Partners")
    await step(h, converged=False)
    assert h.sb.zpa.group_by_name("ZPA Partners") is not None and h.sb.zpa.group_by_name("ZPA Contractors") is None
    d.rename_group(contractors, "ZPA Contractors")
    await step(h)

    # group updated: a userFilter makes it dynamic; its members follow the users' attributes
    d.set_user_filter(contractors, 'department eq "Legal"')
    await step(h)
    assert "feed.new@example.com" in member_names(h, "zpa", "ZPA Contractors")   # and every other Legal one

    # membership added to a pushed group, then removed
    static = next(u for u in members(h, "ZPA Users") if u != new)
    d.set_user_filter(contractors, None)
    await step(h)
    d.add_member(contractors, static)
    await step(h)
    assert str(d.users[static]["username"]).lower() in member_names(h, "zpa", "ZPA Contractors")
    d.remove_member(contractors, static)
    await step(h)
    assert str(d.users[static]["username"]).lower() not in member_names(h, "zpa", "ZPA Contractors")

    # nesting added: the members of a nested group come into zpa's scope (transitive); removed: they leave
    stranger = outside(h)
    team = d.add_group("Nested Team")["id"]
    d.add_member(team, stranger)
    await step(h)
    assert resource(h, "zpa", stranger) is None                  # not in any scope yet: nothing sent
    d.nest(team, zpa_users)
    await step(h)
    assert active(resource(h, "zpa", stranger))
    d.unnest(team, zpa_users)
    await step(h)
    assert not active(resource(h, "zpa", stranger))

    # group deleted in PingOne: the pushed group leaves the target; created again: it comes back
    d.delete_group(contractors)
    await step(h, converged=False)
    assert h.sb.zpa.group_by_name("ZPA Contractors") is None
    again = d.add_group("ZPA Contractors")["id"]
    d.add_member(again, new)
    await step(h)
    assert member_names(h, "zpa", "ZPA Contractors") == {"feed.new@example.com"}

    # membership removed from the scope group, then the user deleted
    d.remove_member(zpa_users, new)
    await step(h)
    assert not active(resource(h, "zpa", new))
    gone = next(u for u in members(h, "ZIA Users") if u in members(h, "ZPA Users"))
    d.delete_user(gone)
    await step(h)

    # The feed left the backstop nothing: a full cycle plans and sends no write.
    for em in (h.sb.zpa, h.sb.zia):
        em.reset_counters()
    report = await h.cycle()
    assert all(t.outcome == "success" and not t.results.get("applied") for t in report.targets), \
        [(t.target, t.outcome, t.results) for t in report.targets]
    assert not writes(h, "zpa") and not writes(h, "zia")


async def test_an_event_delivered_twice_and_out_of_order_is_applied_once(h: Harness) -> None:
    """The webhook and the poll hand on the same records (the webhook's newest first):
    de-duplicated by activity id, applied once from PingOne's state now, never again."""
    d = h.directory
    uid = next(u for u in members(h, "ZIA Users") if u in members(h, "ZPA Users"))
    d.update_user(uid, department="Finance")
    d.set_enabled(uid, False)
    records = [a.body for a in h.sb.pingone.feed.records[-2:]]
    async with h.store.transaction() as db:      # what the webhook stored, newest first
        await db.execute("INSERT INTO change_inbox(received, body) VALUES (?, ?)",
                         (time.time(), json.dumps(list(reversed(records)))))
    batch = await feed_of(h).poll()               # looked at, not committed: the step polls again
    assert batch.polled == 2 and sorted(a.id for a in batch.activities) == sorted(r["id"] for r in records)
    await step(h, converged=False)               # (a disabled user keeps its ZIA groups: not `converged`)
    for target in ("zpa", "zia"):
        assert not active(resource(h, target, uid))
        sent = [json.dumps(w, sort_keys=True) for w in writes(h, target)]
        assert sent and len(sent) == len(set(sent)), sent          # no write sent twice
    res = resource(h, "zia", uid)
    assert res is not None and res[ENTERPRISE_USER]["department"] == "Finance"
    async with h.store.db.execute("SELECT count(*) FROM change_inbox") as cur:
        assert (await cur.fetchone())[0] == 0                        # consumed with the commit
    await step(h, converged=False)               # the same records seen again: nothing sent
    assert not writes(h, "zpa") and not writes(h, "zia")


async def test_an_event_about_a_user_that_no_longer_exists_costs_no_target_request(h: Harness) -> None:
    d = h.directory
    ghost = d.add_user("ghost@example.com")["id"]
    d.add_member(d.group_by_name("ZPA Users")["id"], ghost)
    d.update_user(ghost, department="Gone")
    d.delete_user(ghost)                          # before the poll: every event names a 404
    reports = await step(h)
    assert all(r.outcome == "success" for r in reports)
    assert not h.sb.zpa.request_log and not h.sb.zia.request_log


async def test_a_burst_of_1000_deletions_through_the_feed_is_held_by_max_deletes(tmp_path: Path) -> None:
    async with harness(tmp_path, users=1060, groups=4) as h:
        h.sb.pingone.feed.settings = FeedSettings(indexing_delay=0.0, seed=1, rate_rps=0)
        h.engine.keep_snapshot = True
        h.strict = True
        d = h.directory
        zpa_users = d.group_by_name("ZPA Users")["id"]
        for uid in sorted(d.users):               # everyone in zpa's scope
            if uid not in d.direct_member_ids(zpa_users):
                d.add_member(zpa_users, uid)
        started = time.time()
        await h.cycle()
        await feed_of(h).start_at(started)
        before = {n for n, res in target_users(h.sb.zpa).items() if active(res)}
        doomed = sorted(u for u in d.direct_member_ids(zpa_users) if str(d.users[u]["username"]).lower() in before)
        assert len(doomed) > 1000              # (a few generated usernames are not emails: never provisioned)
        doomed = doomed[:1000]
        for uid in doomed:
            d.delete_user(uid)
        feed = ChangeFeed(h.engine.source, h.store)
        batch = await feed.poll()
        assert set(doomed) <= batch.changes.user_ids     # (and the scope additions the snapshot re-hands)
        reads = await read_affected(h.engine.source, batch.changes, concurrency=16)
        assert len(reads.deleted_users) == 1000
        inc = await h.engine.merge_changes(reads)
        assert inc is not None
        for em in (h.sb.zpa, h.sb.zia):
            em.reset_counters()
        reports = [await h.engine.incremental_cycle(rt, inc) for rt in h.engine.runtimes.values()]
        await feed.commit(batch)
        assert not removal_requests(h.sb.zpa) and not removal_requests(h.sb.zia)
        after = {n for n, res in target_users(h.sb.zpa).items() if active(res)}
        assert after == before, "not one of the 1,000 removed"
        zpa = next(r for r in reports if r.target == "zpa")
        assert zpa.summary and zpa.outcome in ("success", "held"), zpa
        with pytest.raises(AssertionError):
            assert_converged(d, h.sb.zpa, "zpa")  # the removals wait for an approval
