"""The incremental cycle in-process: the change feed polled from the PingOne emulator, the
changes merged into the last snapshot and applied through the engine; the SCIM targets read
back over HTTP (request logs and contents)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.engine import TargetReport
from daemon.incremental import slice_to
from daemon.links import Actual, GroupLink
from daemon.mapping import Desired, DesiredGroup
from daemon.model import Members
from daemon.sandbox.activities import FeedSettings
from daemon.source.changes import ChangeFeed, read_affected
from tests.harness import Harness, harness
from tests.safety import assert_converged, removal_requests, scope_group_of, target_users

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path, users=40, groups=4) as h:
        h.sb.pingone.feed.settings = FeedSettings(indexing_delay=0.0, seed=1)
        h.engine.keep_snapshot = True
        h.strict = True
        started = time.time()
        await h.cycle()
        await feed_of(h).start_at(started)
        yield h


def feed_of(h: Harness) -> ChangeFeed:
    return ChangeFeed(h.engine.source, h.store)


async def incremental(h: Harness) -> list[TargetReport]:
    """One poll, applied to every target, then committed: what the service's poll loop does."""
    for em in (h.sb.zpa, h.sb.zia):
        em.reset_counters()
    feed = feed_of(h)
    batch = await feed.poll()
    reads = await read_affected(h.engine.source, batch.changes)
    inc = await h.engine.merge_changes(reads)
    assert inc is not None
    reports = [await h.engine.incremental_cycle(rt, inc) for rt in h.engine.runtimes.values()]
    await feed.commit(batch)
    return reports


def members(h: Harness, name: str) -> list[str]:
    d = h.directory
    return sorted(d.direct_member_ids(d.group_by_name(name)["id"]))


def outside(h: Harness) -> str:
    d = h.directory
    inside = set(members(h, "ZPA Users")) | set(members(h, "ZIA Users"))
    for g in ("ZPA Contractors",):
        inside |= set(members(h, g))
    return next(uid for uid in sorted(d.users) if uid not in inside)


async def test_a_disabled_user_reaches_both_targets_and_nothing_else_is_sent(h: Harness) -> None:
    uid = next(u for u in members(h, "ZIA Users") if u in members(h, "ZPA Users"))
    h.directory.set_enabled(uid, False)
    reports = await incremental(h)
    assert [r.outcome for r in reports] == ["success", "success"]
    name = h.directory.users[uid]["username"].lower()
    for target in ("zpa", "zia"):
        have = target_users(h.emulator(target))
        assert name not in have or have[name].get("active") is False, (target, have.get(name))
        writes = [r for r in h.emulator(target).request_log if r["method"] != "GET"]
        assert writes and all("/Users/" in r["path"] for r in writes), writes
    # Applied once: the same poll again finds nothing new and sends nothing.
    await incremental(h)
    assert not any(em.request_log for em in (h.sb.zpa, h.sb.zia))


async def test_membership_add_and_remove_update_scope_and_the_pushed_group(h: Harness) -> None:
    uid = outside(h)
    d = h.directory
    zpa = d.group_by_name(scope_group_of("zpa"))["id"]
    d.add_member(zpa, uid)
    await incremental(h)
    assert_converged(d, h.sb.zpa, "zpa")
    assert not h.sb.zia.request_log          # zia's scope is not touched by a ZPA group
    name = d.users[uid]["username"].lower()
    assert any(name == str(u["userName"]).lower() for u in h.sb.zpa.users.values())
    d.remove_member(zpa, uid)
    await incremental(h)
    assert_converged(d, h.sb.zpa, "zpa")
    assert removal_requests(h.sb.zpa), "leaving the scope group deprovisions the user"


async def test_an_event_for_a_user_outside_every_scope_costs_no_target_request(h: Harness) -> None:
    uid = outside(h)
    h.directory.update_user(uid, title="Somebody else")
    reports = await incremental(h)
    assert [r.outcome for r in reports] == ["success", "success"]
    assert not h.sb.zpa.request_log and not h.sb.zia.request_log


async def test_a_deleted_user_is_deprovisioned(h: Harness) -> None:
    uid = members(h, "ZPA Users")[0]
    h.directory.delete_user(uid)
    await incremental(h)
    for target in ("zpa", "zia"):
        assert_converged(h.directory, h.emulator(target), target)


async def test_a_burst_of_deletions_above_max_deletes_is_held_also_when_spread_over_polls(h: Harness) -> None:
    d = h.directory
    scoped = members(h, "ZPA Users")
    limit = max(1, len(scoped) // 10)      # max_deletes = "10%"
    for uid in scoped[:limit + 2]:
        d.delete_user(uid)
    await incremental(h)
    assert not removal_requests(h.sb.zpa, members=False)
    # Within the window: one deletion now, then more than what is left of the limit.
    for uid in scoped[limit + 2:limit + 3]:
        d.delete_user(uid)
    await incremental(h)
    first = len(removal_requests(h.sb.zpa, members=False))
    assert first == 1
    for uid in scoped[limit + 3:2 * limit + 3]:
        d.delete_user(uid)
    await incremental(h)
    assert not removal_requests(h.sb.zpa, members=False), "the window's removals count"


# --- pure: the slice ---------------------------------------------------------------------------

def _group(gid: str, members: set[str]) -> tuple[DesiredGroup, GroupLink]:
    return (DesiredGroup(gid, gid.upper(), Members.of(members)),
            GroupLink(gid, f"t-{gid}", gid.upper(), Members.of(members), frozenset({"foreign"})))


def test_the_slice_cuts_member_sets_to_the_touched_users_and_leaves_unnamed_groups_alone() -> None:
    want_g, link_g = _group("g", {"a", "b"})
    _, link_c = _group("c", {"b", "c"})               # no longer desired, named by no event
    link_g = replace(link_g, members=Members.of({"a", "b", "c"}))   # c: left g, not named
    desired = Desired(groups={"g": want_g})
    actual = Actual({}, {"g": link_g, "c": link_c})
    part, links = slice_to(desired, actual, frozenset({"a"}), frozenset())
    assert part.groups == {} and links.groups == {}   # a's membership did not change: nothing to plan
    part, links = slice_to(desired, actual, frozenset({"a", "b", "x"}), frozenset())
    assert set(links.groups) == set() and set(part.groups) == set()
    desired = Desired(groups={"g": replace(want_g, members=Members.of({"b"}))})
    part, links = slice_to(desired, actual, frozenset({"a"}), frozenset())
    assert part.groups["g"].members == set() and links.groups["g"].members == {"a"}
    assert links.groups["g"].foreign == frozenset() and "c" not in links.groups
    part, links = slice_to(desired, actual, frozenset(), frozenset({"c"}))
    assert "c" in links.groups and "c" not in part.groups   # named: its deletion is planned
