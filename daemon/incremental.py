"""The incremental cycle's pure half: changes read from the feed, merged into the last snapshot,
and the desired state and links sliced to the entities they touch (README "How changes flow").

    merge      the last snapshot + what `changes.read_affected` read anew -> the snapshot as
               PingOne is now, and the users whose state may have changed (`Increment`)
    slice_to   the desired state and links reduced to those users and the groups they touch:
               the planner over the slice plans nothing for any other entity, so an incremental
               cycle never removes what no event names, and a user outside every scope costs
               no target request

Pure: no I/O, no clock, no logging. The engine (`Engine.incremental_cycle`) runs the same
desire -> plan -> apply -> finish steps over the slice as a full cycle runs over everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

from daemon.links import Actual, GroupLink
from daemon.mapping import Desired, DesiredGroup, content_hash
from daemon.model import JSON, Members, Snapshot
from daemon.source.changes import Reads

INCREMENTAL_KIND = "incremental"    # cycle.kind of an incremental cycle (logs, SQLite, `status`)


@dataclass(frozen=True, slots=True)
class Increment:
    """The snapshot with the changes merged in, and what the changes touch."""

    snapshot: Snapshot
    users: frozenset[str]           # users named by an event, or members (before or after) of a changed group
    groups: frozenset[str]          # groups named by an event
    deleted_users: frozenset[str]
    changed_at: Mapping[str, str] = field(default_factory=dict)   # user id -> when PingOne recorded its change


def _source_user(raw: Mapping[str, Any]) -> tuple[JSON, set[str] | None]:
    """A user as the snapshot holds it (no `_links`, no membership includes) and its direct group
    ids (None when PingOne did not say). Taken as direct, as `sync-user` does (pingone.md §4.3)."""
    user = dict(raw)
    user.pop("_links", None)
    ids = user.pop("memberOfGroupIDs", None)
    user.pop("memberOfGroupNames", None)
    return user, ({str(g) for g in ids} if isinstance(ids, list) else None)


def _without(members: AbstractSet[str], drop: Iterable[str]) -> AbstractSet[str]:
    gone = set(drop)
    return Members.of(m for m in members if m not in gone)


def merge(base: Snapshot, reads: Reads, recorded: Mapping[str, str] | None = None) -> Increment:
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


def slice_to(desired: Desired, actual: Actual, users: AbstractSet[str],
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


def removal_window(entries: Iterable[tuple[float, int]], now: float, window: float) -> tuple[list[tuple[float, int]], int]:
    """The removals applied within *window* seconds before *now*: the entries kept and their sum."""
    kept = [(at, n) for at, n in entries if now - at < window and n > 0]
    return kept, sum(n for _, n in kept)
