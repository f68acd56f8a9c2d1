"""The incremental cycle's pure half: changes read from the feed, merged into the last snapshot,
and the desired state and links sliced to the entities they touch (README "How changes flow").

    merge         the last snapshot + what `changes.read_affected` read anew -> the snapshot as
                  PingOne is now, and the users whose state may have changed (`Increment`)
    repinned      the increment widened by the groups a name pin moved to (`resolve_pins`)
    desire_slice  the desired state of those users and of the pushed groups' membership of them,
                  computed from them alone (`NameIndex` finds who else maps to a userName)
    slice_to      the desired state and links reduced to those users and the groups they touch:
                  the planner over the slice plans nothing for any other entity, so an incremental
                  cycle never removes what no event names, and a user outside every scope costs
                  no target request

`slice_to(desire_slice(...))` is `slice_to(desired_state(...))` of the whole snapshot (checked on
random directories by tests/test_incremental.py), at the cost of the changes, not the directory.

Pure: no I/O, no clock, no logging. The engine (`Engine.incremental_cycle`) runs the same
desire -> plan -> apply -> finish steps over the slice as a full cycle runs over everything.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Container, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

from daemon.links import Actual, GroupLink
from daemon.mapping import (
    CONFLICT,
    MALFORMED_SOURCE,
    Desired,
    DesiredGroup,
    DesiredUser,
    MappedUser,
    MappingCache,
    Rules,
    Skipped,
    cache_user,
    content_hash,
    username_key,
)
from daemon.mapping import _map as map_one
from daemon.model import JSON, UNCHANGED, Members, Snapshot
from daemon.source.changes import GroupRead, Reads

INCREMENTAL_KIND = "incremental"    # cycle.kind of an incremental cycle (logs, SQLite, `status`)


@dataclass(frozen=True, slots=True)
class Increment:
    """The snapshot with the changes merged in, and what the changes touch."""

    snapshot: Snapshot
    users: frozenset[str]           # users named by an event, or whose groups a changed group changed (`merge`)
    groups: frozenset[str]          # groups named by an event
    deleted_users: frozenset[str]
    changed_at: Mapping[str, str] = field(default_factory=dict)   # user id -> when PingOne recorded its change
    saved_users: frozenset[str] = frozenset()      # users whose stored row the merge changes
    saved_groups: frozenset[str] = frozenset()     # groups whose stored row the merge changes


def _source_user(raw: Mapping[str, Any]) -> tuple[JSON, set[str] | None]:
    """A user as the snapshot holds it (no `_links`, no membership includes) and its direct group
    ids (None when PingOne did not say). Taken as direct, as `sync-user` does (pingone.md §4.3)."""
    user = dict(raw)
    user.pop("_links", None)
    ids = user.pop("memberOfGroupIDs", None)
    user.pop("memberOfGroupNames", None)
    return user, ({str(g) for g in ids} if isinstance(ids, list) else None)


def _without(members: AbstractSet[str], drop: Iterable[str]) -> AbstractSet[str]:
    if isinstance(members, Members):
        return members.minus(drop)
    gone = set(drop)
    return Members.of(m for m in members if m not in gone)


def _with(members: AbstractSet[str], uid: str) -> AbstractSet[str]:
    return members.plus((uid,)) if isinstance(members, Members) else Members.of([*members, uid])


def merge(base: Snapshot, reads: Reads, recorded: Mapping[str, str] | None = None, *,
          in_place: bool = False) -> Increment:
    """*base* with *reads* merged in: a copy (a full cycle may be running on *base*), or, with
    *in_place*, *base* itself changed (the engine's own copy, which no full cycle reads). Either
    way the work is the changes' own: the dicts are copied, not walked.

    A group read anew takes its members and parents; a deleted group leaves. A user read anew
    takes its JSON (and hash, so the mapping runs again) and its direct membership in every
    group the snapshot holds members of; a deleted user leaves the users and every member set.
    The users touched (their scope and memberships planned again) are those read, and of each
    group read anew: every user (nested ones included, before and after) when the group itself
    changed (created, deleted, its JSON or its parents), else only the users whose membership
    changed (joined or left it directly, or as a member of a nested group). A user whose groups
    are what they were is not planned again for a group's sake: its desired state is the same."""
    snap = base if in_place else own_copy(base)
    touched: set[str] = set(reads.users)
    rows: set[str] = set()            # groups whose stored row (name, members, parents) changes
    before_children = base.children()
    # group id -> its users before (direct, and with nested groups'), when only they may change
    before: dict[str, tuple[AbstractSet[str], AbstractSet[str]]] = {}
    for gid, read in reads.groups.items():
        members = base.member_ids(gid, transitive=True, children=before_children)
        if read is None or _reshaped(base, gid, read):
            touched.update(members)
        else:
            before[gid] = (base.members.get(gid, _NONE), members)
    for gid, read in reads.groups.items():
        if read is None:
            snap.groups.pop(gid, None)
            snap.members.pop(gid, None)
            snap.parents.pop(gid, None)
            for child, parents in list(snap.parents.items()):
                if gid in parents:
                    snap.parents[child] = frozenset(p for p in parents if p != gid)
                    rows.add(child)
            continue
        group = dict(read.group)
        group.pop("_links", None)
        snap.groups[gid] = group
        snap.members[gid] = Members.of(read.member_ids)
        snap.parents[gid] = frozenset(read.parent_ids)
        rows.add(gid)
    for uid, raw in reads.users.items():
        if raw is None:
            snap.users.pop(uid, None)
            snap.hashes.pop(uid, None)
            for gid, members in list(snap.members.items()):
                if uid in members:
                    snap.members[gid] = _without(members, (uid,))
                    rows.add(gid)
            continue
        user, direct = _source_user(raw)
        snap.users[uid] = user
        snap.hashes[uid] = content_hash(user)
        if direct is None:
            continue
        for gid, members in list(snap.members.items()):
            inside = uid in members
            if gid in direct and not inside:
                snap.members[gid] = _with(members, uid)
                rows.add(gid)
            elif gid not in direct and inside:
                snap.members[gid] = _without(members, (uid,))
                rows.add(gid)
    after_children = snap.children()
    for gid in reads.groups:
        if gid in snap.groups:
            members = snap.member_ids(gid, transitive=True, children=after_children)
            was = before.get(gid)
            if was is None:
                touched.update(members)
                continue
            # Joined or left: directly (a target without nesting sees that) or through nesting.
            touched.update(frozenset(snap.members.get(gid, _NONE)).symmetric_difference(was[0]))
            touched.update(frozenset(members).symmetric_difference(was[1]))
    recorded = recorded or {}
    group_times = [recorded[g] for g in reads.groups if g in recorded]
    earliest = min(group_times) if group_times else None
    changed_at: dict[str, str] = {}
    for uid in touched:
        at = recorded.get(uid, earliest)
        if at is not None:
            changed_at[uid] = at
    return Increment(snap, frozenset(touched), frozenset(reads.groups), reads.deleted_users, changed_at,
                     frozenset(u for u, raw in reads.users.items() if raw is not None),
                     frozenset(g for g in rows if g in snap.groups))


# Keys of a group's JSON that change with its membership alone (a member or a nested group added
# or removed bumps `updatedAt`): the member counts, which no group selector reads (a rule compares
# the group's strings: GROUP_RULE_DIALECT), and the time of the change, which no rule should.
_MEMBER_COUNTS = ("_links", "directMemberCounts", "totalMemberCounts", "updatedAt")


def _reshaped(base: Snapshot, gid: str, read: GroupRead) -> bool:
    """Whether the group read anew is new, or its JSON (but for `_MEMBER_COUNTS`) or parents differ
    from *base*'s: then every user in it may be planned differently (a rename or a nesting can
    move a scope or a pushed group)."""
    held = base.groups.get(gid)
    if held is None or frozenset(read.parent_ids) != base.parents.get(gid, frozenset()):
        return True
    return any(read.group.get(key) != held.get(key) for key in read.group.keys() | held.keys()
               if key not in _MEMBER_COUNTS)


def repinned(inc: Increment, old_pins: Mapping[str, str], pins: Mapping[str, str]) -> Increment:
    """*inc* widened by every group a name pin moved to (its pinned group deleted, another group
    of that name now selected) and the users in it: their scope and the group's pushing change
    although no event names them."""
    moved = {gid for name, gid in pins.items() if old_pins.get(name, gid) != gid}
    if not moved:
        return inc
    children = inc.snapshot.children()
    users = set(inc.users)
    for gid in moved:
        users.update(inc.snapshot.member_ids(gid, transitive=True, children=children))
    return replace(inc, users=frozenset(users), groups=inc.groups | moved)


def own_copy(base: Snapshot) -> Snapshot:
    """A snapshot that may be changed without changing *base*: its dicts copied, the values shared."""
    return Snapshot(users=dict(base.users), groups=dict(base.groups), members=dict(base.members),
                    parents=dict(base.parents), complete=base.complete, problems=list(base.problems),
                    started_at=base.started_at, finished_at=base.finished_at, hashes=dict(base.hashes),
                    wanted=base.wanted)


def slice_to(desired: Desired, actual: Actual, users: AbstractSet[str],
             groups: AbstractSet[str], *, held: bool = False) -> tuple[Desired, Actual]:
    """The desired state and links reduced to *users* and the groups they touch.

    Users: those of *users* that are desired, skipped or linked. Groups: the ones named
    (*groups*: created, renamed, deleted as PingOne now says), and every other pushed group whose
    membership of *users* differs between desired and linked, or, not linked yet, that one of
    *users* belongs in. Member sets on both sides are cut to *users* and foreign members are
    hidden, so no other member is ever added or removed; a group link no event names is never
    deleted here. *held* (a target with a groups-per-user cap): the groups some of *users* are
    in on both sides are kept too, so that the planner's cap counts the memberships they hold."""
    part_users = {sid: wuser for sid in users if (wuser := desired.users.get(sid)) is not None}
    part_skipped = {sid: skip for sid in users if (skip := desired.skipped.get(sid)) is not None}
    links = {sid: ulink for sid in users if (ulink := actual.users.get(sid)) is not None}
    want_groups: dict[str, DesiredGroup] = {}
    link_groups: dict[str, GroupLink] = {}
    for gid in desired.groups.keys() | actual.groups.keys():
        want = desired.groups.get(gid)
        link = actual.groups.get(gid)
        wanted_members = _cut(want.members, users) if want is not None else frozenset()
        linked_members = _cut(link.members, users) if link is not None else frozenset()
        if gid in groups:
            pass
        elif want is None:
            continue       # linked, not desired, not named: the next full cycle's business
        elif link is None:
            if not wanted_members:
                continue
        elif wanted_members == linked_members and not (held and linked_members):
            continue
        if want is not None:
            want_groups[gid] = replace(want, members=Members.of(wanted_members))
        if link is not None:
            link_groups[gid] = replace(link, members=Members.of(linked_members), foreign=frozenset())
    part = Desired(users=part_users, skipped=part_skipped, groups=want_groups, missing_groups=[],
                   present_users=desired.present_users, present_groups=desired.present_groups,
                   in_scope=len(part_users), create_only=desired.create_only)
    return part, Actual(links, link_groups)


# Below this many members per user asked about, walking the members at C speed (a hash lookup
# each) is cheaper than asking a sorted `Members` about each user (a bisection in Python each).
_WALK_RATIO = 32


def _cut(members: AbstractSet[str], users: AbstractSet[str]) -> AbstractSet[str]:
    """*members* & *users*, at the cost of the smaller side (a pushed group may hold 1,000,000)."""
    if len(members) <= _WALK_RATIO * len(users):
        keep = users if isinstance(users, frozenset | set) else frozenset(users)
        return keep.intersection(members)
    return frozenset(u for u in users if u in members)


# --- the desired state of the slice ---------------------------------------------------------------

def _name_key(user: DesiredUser) -> str:
    return user.key or username_key(user.user_name)


class NameIndex:
    """userName key -> the ids of the users a mapping cache maps to it: who else a user's
    userName may clash with, without mapping the directory. A superset: an id whose entry has
    since changed stays listed until looked up (`desire_slice` checks each against the cache).

    Built from a cache that every user of the snapshot is in with its current hash (after a full
    snapshot); kept current by `desire_slice`, which adds every user it maps."""

    __slots__ = ("cache", "keys")

    def __init__(self, cache: MappingCache) -> None:
        self.cache = cache
        self.keys: dict[str, str | list[str]] = {}
        for uid, entry in cache.items():
            if isinstance(entry, DesiredUser):
                self.add(_name_key(entry), uid)

    def add(self, key: str, uid: str) -> None:
        held = self.keys.get(key)
        if held is None:
            self.keys[key] = uid          # one id (the usual case) held without a list around it
        elif isinstance(held, str):
            if held != uid:
                self.keys[key] = [held, uid]
        elif uid not in held:
            held.append(uid)

    def ids(self, key: str) -> tuple[str, ...]:
        held = self.keys.get(key)
        if held is None:
            return ()
        return (held,) if isinstance(held, str) else tuple(held)


class _InGroup(Container[str]):
    """A group's members as `desired_state` sees them (`Snapshot.member_ids`), answering `in`
    from the member sets of the group and its nested groups, without building their union."""

    __slots__ = ("sets",)

    def __init__(self, sets: list[AbstractSet[str]]) -> None:
        self.sets = sets

    def __contains__(self, uid: object) -> bool:
        return any(uid in found for found in self.sets)


def desire_slice(snapshot: Snapshot, rules: Rules, pins: Mapping[str, str] | None, users: AbstractSet[str], *,
                 cache: MappingCache, index: NameIndex, stale: Iterable[str] = ()) -> Desired:
    """The desired state of *users* and of the pushed groups' membership of them: what
    `slice_to(desired_state(snapshot, rules, pins, hashes=snapshot.hashes, cache=cache), ...)`
    holds, computed from the slice alone.

    For each user of *users*: its scope (the scope groups' member sets asked about it, the
    filter run on it), its mapping (the cache, or mapped anew and cached), and whether another
    user in scope maps to its userName key (*index*, each id found checked as the user itself).
    The groups are every pushed group, as `desired_state` selects them, with their members cut
    to *users*. Users whose JSON the changes replaced and that no slice mapped yet (*stale*:
    merged while this target's cycle was skipped) are mapped into the cache first, so that the
    index knows their userName. Pure but for the cache and the index, which it keeps current."""
    hashes = snapshot.hashes
    for uid in stale:
        user = snapshot.users.get(uid)
        digest = hashes.get(uid)
        if user is None or user is UNCHANGED or not isinstance(user, dict) or digest is None:
            continue
        before = cache.get(uid)
        cache_user(cache, rules, uid, user, digest)
        after = cache[uid]
        if after is not before and isinstance(after, DesiredUser):
            index.add(_name_key(after), uid)
    children = snapshot.children()
    sets_of: dict[str, list[AbstractSet[str]]] = {}

    def sets(group_id: str) -> list[AbstractSet[str]]:
        """The member sets `member_ids(group_id)` is the union of."""
        found = sets_of.get(group_id)
        if found is None:
            groups = snapshot.descendants(group_id, children) if rules.transitive else (group_id,)
            found = sets_of[group_id] = [m for gid in groups if (m := snapshot.members.get(gid))]
        return found

    scope: list[AbstractSet[str]] | None = None
    if rules.scope_groups:
        scope = []
        for selector in rules.scope_groups:
            for group in selector.select(snapshot, pins):
                scope.extend(sets(group["id"]))
    members_of = lambda group_id: _InGroup(sets(group_id))   # noqa: E731
    results: dict[str, MappedUser | None] = {}

    def mapped(uid: str) -> MappedUser | None:
        """The user as `desired_state` takes it: None when out of scope (or absent)."""
        if uid in results:
            return results[uid]
        result: MappedUser | None = None
        user = snapshot.users.get(uid)
        if user is None or (scope is not None and not any(uid in found for found in scope)):
            pass
        elif user is UNCHANGED:
            hit = cache.get(uid)
            if hit is None:
                raise RuntimeError(f"user {uid}: the snapshot dropped its JSON but the mapping cache "
                                   "does not hold it")
            result = hit if hit.passes else None
        elif not isinstance(user, dict):
            result = Skipped(uid, None, MALFORMED_SOURCE, "user is not an object")
        elif rules.scope_filter is None or rules.scope_filter.matches(user, members_of):
            digest = hashes.get(uid)
            hit = cache.get(uid) if digest is not None else None
            if hit is not None and hit.digest == digest:
                result = hit
            else:
                result = map_one(uid, user, rules, digest or 0)
                if digest is not None:
                    cache[uid] = result
                    if isinstance(result, DesiredUser):
                        index.add(_name_key(result), uid)
        results[uid] = result
        return result

    desired = Desired(present_users=snapshot.users.keys(), present_groups=snapshot.groups.keys(),
                      create_only=rules.create_only)
    for uid in users:
        result = mapped(uid)
        if result is None:
            continue
        desired.in_scope += 1
        if isinstance(result, Skipped):
            desired.skipped[uid] = result
            continue
        key = _name_key(result)
        others = [other for other in index.ids(key)
                  if other != uid and isinstance(found := mapped(other), DesiredUser) and _name_key(found) == key]
        if others:
            desired.skipped[uid] = Skipped(
                uid, result.user_name, CONFLICT,
                f"userName {result.user_name!r} is also mapped from {', '.join(sorted(others))}")
            continue
        desired.users[uid] = result
    provisioned = frozenset(desired.users)
    for selector in rules.groups:
        for group in selector.select(snapshot, pins):
            group_id = group["id"]
            name = group.get("name")
            if group_id in desired.groups or not isinstance(name, str) or not name:
                continue
            inside: set[str] = set()
            for held in sets(group_id):
                inside.update(_cut(held, provisioned))
            desired.groups[group_id] = DesiredGroup(group_id, unicodedata.normalize("NFC", name),
                                                    Members.of(inside) if inside else _NONE)
    return desired


_NONE = Members.of(())


def removal_window(entries: Iterable[tuple[float, int]], now: float, window: float) -> tuple[list[tuple[float, int]], int]:
    """The removals applied within *window* seconds before *now*: the entries kept and their sum."""
    kept = [(at, n) for at, n in entries if now - at < window and n > 0]
    return kept, sum(n for _, n in kept)
