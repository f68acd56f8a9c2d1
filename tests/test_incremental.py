"""The incremental cycle in-process: the change feed polled from the PingOne emulator, the
changes merged into the last snapshot and applied through the engine; the SCIM targets read
back over HTTP (request logs and contents)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.engine import TargetReport
from daemon.incremental import (
    Increment,
    NameIndex,
    _source_user,
    _without,
    desire_slice,
    merge,
    own_copy,
    repinned,
    slice_to,
)
from daemon.links import Actual, GroupLink, UserLink
from daemon.mapping import (
    CONFLICT,
    Desired,
    DesiredGroup,
    GroupSelector,
    MappingCache,
    Rules,
    cache_user,
    content_hash,
    desired_state,
    resolve_pins,
)
from daemon.model import JSON, UNCHANGED, Members, Snapshot
from daemon.planner import Policy, plan
from daemon.source.changes import ChangeFeed, GroupRead, Reads, read_affected
from tests.harness import Harness, follow_feed, harness
from tests.safety import assert_converged, removal_requests, scope_group_of, target_users

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path, users=40, groups=4) as h:
        h.strict = True
        await follow_feed(h)
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


async def _poll_merged(h: Harness) -> tuple[Increment, Any]:
    """One poll read and merged (PingOne's request log cleared first), not yet applied."""
    h.sb.pingone.request_log.clear()
    batch = await feed_of(h).poll()
    inc = await h.engine.merge_changes(await read_affected(h.engine.source, batch.changes))
    assert inc is not None
    return inc, batch


async def _apply(h: Harness, inc: Increment, batch: Any) -> None:
    for rt in h.engine.runtimes.values():
        await h.engine.incremental_cycle(rt, inc)
    await feed_of(h).commit(batch)


@pytest.mark.parametrize("user_read_includes_groups", [True, False])
async def test_a_membership_change_plans_its_user_alone_not_the_whole_group(
        h: Harness, user_read_includes_groups: bool) -> None:
    """A user added to the scope group: the merge touches that user only, not the group's other
    members; PingOne is asked for the group's member list only when the user's read does not say
    its groups (an emulator knob: UNCONFIRMED whether GET users/{id} honours the include)."""
    h.sb.pingone.user_read_includes_groups = user_read_includes_groups
    uid = outside(h)
    d = h.directory
    zpa = d.group_by_name(scope_group_of("zpa"))["id"]
    assert len(members(h, scope_group_of("zpa"))) > 3
    d.add_member(zpa, uid)
    inc, batch = await _poll_merged(h)
    listed = [path for _, path in h.sb.pingone.request_log if "memberOfGroups" in path]
    assert bool(listed) is not user_read_includes_groups, listed
    assert inc.users == {uid}
    await _apply(h, inc, batch)
    assert_converged(d, h.sb.zpa, "zpa")
    name = d.users[uid]["username"].lower()
    assert any(name == str(u["userName"]).lower() for u in h.sb.zpa.users.values())


async def test_unnesting_a_group_plans_the_nested_groups_users_not_the_parents(h: Harness) -> None:
    d = h.directory
    parent = d.group_by_name(scope_group_of("zpa"))["id"]
    child = d.group_by_name("ZPA Contractors")["id"]
    inside = set(d.transitive_member_ids(parent))
    for uid in [u for u in sorted(d.users) if u not in inside][:1]:   # one: max_deletes here is 1
        d.add_member(child, uid)
    await _apply(h, *await _poll_merged(h))
    assert_converged(d, h.sb.zpa, "zpa")
    nested = set(d.transitive_member_ids(child))
    assert len(nested) == 1 and set(d.direct_member_ids(parent)) - nested
    d.unnest(child, parent)
    inc, batch = await _poll_merged(h)
    assert inc.users == nested and inc.groups == {child, parent}
    await _apply(h, inc, batch)
    assert_converged(d, h.sb.zpa, "zpa")
    d.nest(child, parent)
    inc, batch = await _poll_merged(h)
    assert inc.users == nested
    await _apply(h, inc, batch)
    assert_converged(d, h.sb.zpa, "zpa")


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


async def test_a_deletion_while_the_last_snapshot_is_incomplete_is_deferred_and_logged(h: Harness) -> None:
    """An incremental cycle over an incomplete snapshot (a failed page, a source shrink not yet
    accepted) removes nothing, and says so: `plan.removals_deferred`, even with no operation."""
    uid = members(h, "ZPA Users")[0]
    name = h.directory.users[uid]["username"].lower()
    h.engine.last_complete = False
    h.directory.delete_user(uid)
    with capture_logs() as logs:
        await incremental(h)
    assert not removal_requests(h.sb.zpa)
    assert _active_on(h, "zpa", name)
    deferred = [e for e in logs if e["event"] == "plan.removals_deferred" and e.get("target") == "zpa"]
    assert deferred and deferred[0]["deferred"] >= 1 and deferred[0]["reason"] == "snapshot_incomplete"


def _active_on(h: Harness, target: str, name: str) -> bool:
    user = target_users(h.emulator(target)).get(name)
    return user is not None and user.get("active") is not False


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


async def test_a_poll_writes_the_rows_it_changes_and_leaves_the_full_cycles_snapshot_alone(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    d = h.directory
    full = h.engine.last_snapshot
    assert full is not None
    users_before, members_before = dict(full.users), dict(full.members)

    def whole(*_: Any, **__: Any) -> Any:
        raise AssertionError("an incremental cycle took a pass over the whole snapshot")

    monkeypatch.setattr(h.engine, "desire", whole)
    monkeypatch.setattr(h.store, "save_snapshot", whole)
    uid = outside(h)
    zpa = d.group_by_name(scope_group_of("zpa"))["id"]
    d.update_user(uid, title="Moved")
    d.add_member(zpa, uid)
    d.rename_group(d.group_by_name("ZPA Contractors")["id"], "ZPA Contractors (renamed)")
    await incremental(h)
    owned = h.engine.last_snapshot
    assert owned is not None and owned is not full
    # The full cycle's snapshot is as it was: the poll changed the engine's own copy.
    assert full.users == users_before and full.members == members_before
    assert owned.users[uid]["title"] == "Moved" and uid in owned.members[zpa]
    d.update_user(uid, title="Moved again")
    await incremental(h)
    assert h.engine.last_snapshot is owned, "later polls change the copy in place"
    # The state file holds what the merged snapshot holds for every entity a poll touched.
    stored = await h.store.load_snapshot()
    assert stored.users[uid]["title"] == "Moved again"
    for gid, group in owned.groups.items():
        assert stored.groups[gid]["name"] == group["name"], gid
        assert set(stored.members[gid]) == set(owned.members.get(gid, ())), gid
        assert stored.parents[gid] == owned.parents.get(gid, frozenset()), gid
    # And the target got the changes (read back over SCIM).
    name = d.users[uid]["username"].lower()
    assert name in target_users(h.sb.zpa)
    assert h.sb.zpa.group_by_name("ZPA Contractors (renamed)") is not None


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


# --- the slice's desired state equals the whole one's, cut (the path before it, kept as reference) -

# The incremental path as it was before `desire_slice`: the merge copied the snapshot, the desired
# state was computed for every user and group (`desired_state`) and cut to the slice (`slice_to`).
# Verbatim, but for the names.

def reference_merge(base: Snapshot, reads: Reads, recorded: Mapping[str, str] | None = None) -> Increment:
    """*base* with *reads* merged in (a copy: a full cycle may be running on *base*).

    A group read anew takes its members and parents; a deleted group leaves. A user read anew
    takes its JSON (and hash, so the mapping runs again) and its direct membership in every
    group the snapshot holds members of; a deleted user leaves the users and every member set.
    The users touched are those read, and every user of a changed group (nested ones included,
    before and after the change): their scope and memberships are planned again."""
    snap = Snapshot(users=dict(base.users), groups=dict(base.groups), members=dict(base.members),
                    parents=dict(base.parents), complete=base.complete, problems=list(base.problems),
                    started_at=base.started_at, finished_at=base.finished_at, hashes=dict(base.hashes),
                    wanted=base.wanted)
    touched: set[str] = set(reads.users)
    before_children = base.children()
    for gid in reads.groups:
        touched.update(base.member_ids(gid, transitive=True, children=before_children))
    for gid, read in reads.groups.items():
        if read is None:
            snap.groups.pop(gid, None)
            snap.members.pop(gid, None)
            snap.parents.pop(gid, None)
            for child, parents in list(snap.parents.items()):
                if gid in parents:
                    snap.parents[child] = frozenset(p for p in parents if p != gid)
            continue
        group = dict(read.group)
        group.pop("_links", None)
        snap.groups[gid] = group
        snap.members[gid] = Members.of(read.member_ids)
        snap.parents[gid] = frozenset(read.parent_ids)
    for uid, raw in reads.users.items():
        if raw is None:
            snap.users.pop(uid, None)
            snap.hashes.pop(uid, None)
            for gid, members in list(snap.members.items()):
                if uid in members:
                    snap.members[gid] = _without(members, (uid,))
            continue
        user, direct = _source_user(raw)
        snap.users[uid] = user
        snap.hashes[uid] = content_hash(user)
        if direct is None:
            continue
        for gid, members in list(snap.members.items()):
            inside = uid in members
            if gid in direct and not inside:
                snap.members[gid] = Members.of([*members, uid])
            elif gid not in direct and inside:
                snap.members[gid] = _without(members, (uid,))
    after_children = snap.children()
    for gid in reads.groups:
        if gid in snap.groups:
            touched.update(snap.member_ids(gid, transitive=True, children=after_children))
    recorded = recorded or {}
    group_times = [recorded[g] for g in reads.groups if g in recorded]
    earliest = min(group_times) if group_times else None
    changed_at: dict[str, str] = {}
    for uid in touched:
        at = recorded.get(uid, earliest)
        if at is not None:
            changed_at[uid] = at
    return Increment(snap, frozenset(touched), frozenset(reads.groups), reads.deleted_users, changed_at)


def reference_slice_to(desired: Desired, actual: Actual, users: AbstractSet[str],
                       groups: AbstractSet[str]) -> tuple[Desired, Actual]:
    """The desired state and links reduced to *users* and the groups they touch.

    Users: those of *users* that are desired, skipped or linked. Groups: the ones named
    (*groups*: created, renamed, deleted as PingOne now says), and every other pushed group whose
    membership of *users* differs between desired and linked, or, not linked yet, that one of
    *users* belongs in. Member sets on both sides are cut to *users* and foreign members are
    hidden, so no other member is ever added or removed; a group link no event names is never
    deleted here."""
    part_users = {sid: wuser for sid in users if (wuser := desired.users.get(sid)) is not None}
    part_skipped = {sid: skip for sid in users if (skip := desired.skipped.get(sid)) is not None}
    links = {sid: ulink for sid in users if (ulink := actual.users.get(sid)) is not None}
    want_groups: dict[str, DesiredGroup] = {}
    link_groups: dict[str, GroupLink] = {}
    for gid in desired.groups.keys() | actual.groups.keys():
        want = desired.groups.get(gid)
        link = actual.groups.get(gid)
        wanted_members = want.members & users if want is not None else frozenset()
        linked_members = link.members & users if link is not None else frozenset()
        if gid in groups:
            pass
        elif want is None:
            continue       # linked, not desired, not named: the next full cycle's business
        elif link is None:
            if not wanted_members:
                continue
        elif wanted_members == linked_members:
            continue
        if want is not None:
            want_groups[gid] = replace(want, members=Members.of(wanted_members))
        if link is not None:
            link_groups[gid] = replace(link, members=Members.of(linked_members), foreign=frozenset())
    part = Desired(users=part_users, skipped=part_skipped, groups=want_groups, missing_groups=[],
                   present_users=desired.present_users, present_groups=desired.present_groups,
                   in_scope=len(part_users), create_only=desired.create_only)
    return part, Actual(links, link_groups)


_NAMES = ("a@x.io", "A@x.io", "b@x.io", "c@x.io", "d@x.io", "bad", "")
_DEPTS = ("Eng", "Ops", "Sales")
_GROUP_NAMES = ("Staff", "Eng", "Ops", "Push-1", "Push-2", "", "Eng")
_GIDS = tuple(f"g{i}" for i in range(6))


def _user(rng: random.Random, uid: str) -> JSON:
    user: JSON = {"id": uid, "enabled": rng.random() < 0.8, "department": rng.choice(_DEPTS),
                  "name": {"family": rng.choice(("Lee", "Kim", "Ode"))}}
    if rng.random() < 0.9:
        user["username"] = rng.choice(_NAMES)
    return user


def _rules(rng: random.Random) -> Rules:
    scope = rng.choice([(), (GroupSelector(name="Staff"),), (GroupSelector(id="g1"),), (GroupSelector(prefix="Push"),)])
    flt = rng.choice([None, None, "enabled eq true", 'memberOfGroups[id eq "g2"]', 'department eq "Eng"'])
    pushed = tuple(s for s in (GroupSelector(name="Eng"), GroupSelector(prefix="Push"), GroupSelector(id="g0"),
                               GroupSelector(name="Missing")) if rng.random() < 0.6)
    return Rules.compile({"userName": "username", "name.familyName": "name.family", "title": "department"},
                         scope_groups=scope, scope_filter=flt, groups=pushed, transitive=rng.random() < 0.6,
                         require_email_username=rng.random() < 0.3)


def _full_snapshot(rng: random.Random, users: dict[str, Any], groups: dict[str, JSON],
                   members: dict[str, Any], parents: dict[str, frozenset[str]],
                   caches: list[MappingCache], rules: Rules) -> Snapshot:
    """A snapshot as a cycle takes it: every user mapped into the caches as its page arrives
    (`cache_user`), some held as `UNCHANGED`, the others with their hash."""
    snap = Snapshot(groups=dict(groups), members={g: Members.of(m) for g, m in members.items()},
                    parents=dict(parents))
    for uid, user in users.items():
        digest = content_hash(user)
        droppable = isinstance(user, dict)
        for cache in caches:
            if isinstance(user, dict):
                droppable = cache_user(cache, rules, uid, user, digest) and droppable
        if droppable and rng.random() < 0.7:
            snap.users[uid] = UNCHANGED
        else:
            snap.users[uid] = user
            snap.hashes[uid] = digest
    return snap


def _links(rng: random.Random, desired: Desired, user_ids: list[str]) -> Actual:
    users: dict[str, UserLink] = {}
    for sid, want in desired.users.items():
        if rng.random() < 0.7:
            attrs = want.attrs if rng.random() < 0.7 else {**dict(want.attrs), "title": "Old"}
            users[sid] = UserLink(sid, f"t-{sid}", want.user_name, attrs, rng.random() < 0.8)
    for sid in rng.sample([*user_ids, "gone1", "gone2"], min(3, len(user_ids) + 2)):
        if sid not in users:
            users[sid] = UserLink(sid, f"t-{sid}", rng.choice(_NAMES) or "x@x.io", {}, True)
    groups: dict[str, GroupLink] = {}
    for gid in [*desired.groups, "g5", "g7"]:
        if rng.random() < 0.7:
            mine = Members.of(m for m in [*user_ids, "gone1"] if rng.random() < 0.4)
            groups[gid] = GroupLink(gid, f"t-{gid}", gid.upper(), mine, frozenset({"f1"}) if rng.random() < 0.3 else frozenset())
    return Actual(users, groups)


def _reads(rng: random.Random, user_ids: list[str], step: int, base: Snapshot | None = None) -> Reads:
    users: dict[str, JSON | None] = {}
    pool = [*user_ids, f"n{step}a", f"n{step}b"]
    for uid in rng.sample(pool, min(len(pool), rng.randint(1, 3))):
        if rng.random() < 0.2:
            users[uid] = None
            continue
        user = _user(rng, uid)
        if rng.random() < 0.7:
            user["memberOfGroupIDs"] = [g for g in _GIDS if rng.random() < 0.3]
        users[uid] = user
    groups: dict[str, GroupRead | None] = {}
    for gid in rng.sample([*_GIDS, "g9"], rng.randint(0, 2)):
        if rng.random() < 0.2:
            groups[gid] = None
            continue
        held = base.groups.get(gid) if base is not None else None
        if base is not None and held is not None and rng.random() < 0.5:
            # Only its members changed (the group itself as it was, but for its member count).
            groups[gid] = GroupRead({**held, "directMemberCounts": {"users": step}, "updatedAt": str(step),
                                     "_links": {}},
                                    tuple(u for u in [*user_ids, f"n{step}a"] if rng.random() < 0.3),
                                    tuple(base.parents.get(gid, ())))
            continue
        groups[gid] = GroupRead({"id": gid, "name": rng.choice(_GROUP_NAMES), "_links": {}},
                                tuple(u for u in [*user_ids, f"n{step}a"] if rng.random() < 0.3),
                                tuple(p for p in _GIDS if p != gid and rng.random() < 0.15))
    return Reads(users, groups)


def _plan_of(part: Desired, links: Actual, complete: bool) -> list[Any]:
    return plan(part, links, Policy(max_deletes=2), complete=complete, now=1000.0).ops


def _same_snapshot(a: Snapshot, b: Snapshot) -> None:
    assert a.users.keys() == b.users.keys() and all(a.users[u] is b.users[u] or a.users[u] == b.users[u]
                                                    for u in a.users)
    assert a.groups == b.groups and a.parents == b.parents and a.hashes == b.hashes
    assert {g: set(m) for g, m in a.members.items()} == {g: set(m) for g, m in b.members.items()}


def _standing(desired: Desired, uid: str) -> tuple[Any, ...] | None:
    """How a desired state holds one user: provisioned as mapped, skipped and why, or not at all."""
    if (user := desired.users.get(uid)) is not None:
        return ("user", user)
    if (skip := desired.skipped.get(uid)) is not None:
        return ("skipped", skip.reason, skip.detail)
    return None


def check_untouched_unchanged(before: Snapshot, after: Snapshot, rules: Rules, old_pins: Mapping[str, str],
                              pins: Mapping[str, str], cache: MappingCache, inc: Increment) -> None:
    """The oracle of what a poll must plan, from the whole desired state before and after the
    changes: every user the increment leaves out is held as it was, in the same pushed groups,
    and every pushed group that appeared, left or was renamed is named. A user skipped for a
    userName conflict on either side is left out (a namesake's change, not its own)."""
    was = desired_state(before, rules, old_pins, hashes=before.hashes, cache=dict(cache))
    now = desired_state(after, rules, pins, hashes=after.hashes, cache=dict(cache))
    changed_groups = {g for g in was.groups.keys() | now.groups.keys()
                      if g not in was.groups or g not in now.groups
                      or was.groups[g].display_name != now.groups[g].display_name}
    assert changed_groups <= inc.groups
    both = was.groups.keys() & now.groups.keys()
    for uid in (was.users.keys() | was.skipped.keys() | now.users.keys() | now.skipped.keys()) - inc.users:
        standing = (_standing(was, uid), _standing(now, uid))
        if any(s is not None and s[0] == "skipped" and s[1] == CONFLICT for s in standing):
            continue
        assert standing[0] == standing[1], uid
        for gid in both:
            assert (uid in was.groups[gid].members) == (uid in now.groups[gid].members), (uid, gid)


def check_slices_equal(seed: int, polls: int = 4) -> None:
    """One world, a warm cache, then *polls* polls: each merged in place and desired for the slice
    only must give the merged snapshot, the slice and the plan the whole-snapshot path gives."""
    rng = random.Random(seed)
    rules = _rules(rng)
    user_ids = [f"u{i}" for i in range(rng.randint(0, 10))]
    users: dict[str, Any] = {uid: _user(rng, uid) for uid in user_ids}
    if user_ids and rng.random() < 0.1:
        users[user_ids[0]] = ["not", "an", "object"]
    groups = {gid: {"id": gid, "name": rng.choice(_GROUP_NAMES)} for gid in _GIDS}
    members = {gid: {u for u in user_ids if rng.random() < 0.4} for gid in _GIDS}
    parents = {gid: frozenset(p for p in _GIDS if p != gid and rng.random() < 0.15) for gid in _GIDS}
    ref_cache: MappingCache = {}
    new_cache: MappingCache = {}
    ref = _full_snapshot(rng, users, groups, members, parents, [ref_cache, new_cache], rules)
    pins = resolve_pins(ref, rules, {})
    actual = _links(rng, desired_state(ref, rules, pins, hashes=ref.hashes, cache=dict(ref_cache)), user_ids)
    own = own_copy(ref)
    index = NameIndex(new_cache)
    stale: set[str] = set()
    for step in range(polls):
        reads = _reads(rng, sorted(ref.users), step, ref)
        want = reference_merge(ref, reads)
        got = merge(own, reads, in_place=True)
        assert got.snapshot is own
        _same_snapshot(got.snapshot, want.snapshot)
        # The reference touches every user of a changed group; the merge only those whose state
        # may change, which the whole desired state, before and after, shows is enough.
        assert got.users <= want.users
        assert (got.groups, got.deleted_users) == (want.groups, want.deleted_users)
        assert got.changed_at == {u: at for u, at in want.changed_at.items() if u in got.users}
        old_pins = pins
        pins = resolve_pins(want.snapshot, rules, pins)
        got = repinned(got, old_pins, pins)
        check_untouched_unchanged(ref, want.snapshot, rules, old_pins, pins, dict(ref_cache), got)
        ref = want.snapshot
        stale |= got.saved_users
        if rng.random() < 0.2:
            continue                      # this target skipped the poll (quarantined, or its full cycle ran)
        whole = desired_state(ref, rules, pins, hashes=ref.hashes, cache=ref_cache)
        ref_part, ref_links = reference_slice_to(whole, actual, got.users, got.groups)
        desired = desire_slice(own, rules, pins, got.users, cache=new_cache, index=index, stale=stale)
        stale = set()
        part, links = slice_to(desired, actual, got.users, got.groups)
        assert (part.users, part.skipped, part.groups) == (ref_part.users, ref_part.skipped, ref_part.groups)
        assert part.in_scope == ref_part.in_scope and set(part.present_users) == set(ref_part.present_users)
        assert links == ref_links
        complete = rng.random() < 0.8
        assert _plan_of(part, links, complete) == _plan_of(ref_part, ref_links, complete)
        if rng.random() < 0.25:           # a full snapshot: a new base, copied anew, the index rebuilt
            users = {u: ref.users[u] if ref.users[u] is not UNCHANGED else users[u] for u in ref.users}
            ref = _full_snapshot(rng, users, ref.groups, dict(ref.members), ref.parents, [ref_cache, new_cache], rules)
            own = own_copy(ref)
            index = NameIndex(new_cache)
            stale = set()
        else:
            users = {u: ref.users[u] if ref.users[u] is not UNCHANGED else users[u] for u in ref.users}


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_the_slice_path_plans_what_the_whole_snapshot_path_planned(seed: int) -> None:
    check_slices_equal(seed)


def test_the_slice_path_plans_what_the_whole_snapshot_path_planned_over_many_worlds() -> None:
    for seed in range(300):
        check_slices_equal(seed)
