"""One consistent-enough picture of PingOne per cycle: users, groups, nesting, direct members.

The steps, in order:

1. every user, in one paged listing (`_links` dropped from each, nothing else copied);
2. every group, in one listing (names resolve here; renames and deletions show here);
3. the wanted groups: those named or ided that exist; with `transitive`, the parents of every
   group are read and the wanted set grows by every group nested in a wanted one, at any depth;
4. the direct members of every wanted group.

A refusal (401/403) is fatal for the cycle and propagates. Any other failure, after the client's
retries, marks the snapshot incomplete, adds a line to `problems` and the snapshot goes on with
what it has: removals are then not planned from it (the engine's gate). One unusable item in a
page (not an object, no string id) is dropped the same way: a problem, not a failed page. So is a
listing (users, groups, a group's members) whose items do not add up to the `count` PingOne
reported for it, where it reported one: a page lost or a set changed mid-read.

Memory: over 100,000 users the JSON dominates. Each user is projected to the keys the targets
read (`keep`) and hashed as its page arrives; `on_user` may then let the snapshot hold
`UNCHANGED` instead of the JSON (and no hash) (the engine does once every target has mapped the
user and the state file holds that same JSON). Ids are canonical (`canonical`), so that the snapshot, the
membership sets, the caches and the links share one string per user. Treat the JSON as read-only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence, Set

import anyio
import structlog

from daemon.errors import Forbidden, RemoteError, Unauthorized
from daemon.mapping import content_hash
from daemon.model import JSON, UNCHANGED, Members, Snapshot
from daemon.source.pingone import DEFAULT_CONCURRENCY, PingOneClient

_FATAL = (Unauthorized, Forbidden)
# (user id, its projected JSON, its content hash) -> True when the snapshot need not keep the JSON.
UserHook = Callable[[str, JSON, int], bool]


async def take_snapshot(
    client: PingOneClient,
    *,
    group_names: Collection[str] = (),
    group_ids: Collection[str] = (),
    transitive: bool = True,
    concurrency: int = DEFAULT_CONCURRENCY,
    log: structlog.typing.FilteringBoundLogger | None = None,
    keep: Collection[str] | None = None,
    on_user: UserHook | None = None,
    previous_members: Mapping[str, Set[str]] | None = None,
    canonical: Callable[[str], str] = sys.intern,
    group_rules: Sequence[Callable[[JSON], bool]] = (),
) -> Snapshot:
    """Read PingOne into a `Snapshot`; `complete` is False if anything could not be read.

    `keep`: the only user keys to hold (what the targets' rules read); None keeps every key.
    `on_user`: called for every user as its page arrives; True stores `UNCHANGED` for it.
    `previous_members`: the last cycle's `members`; a group whose members did not change keeps
    the same set object (so that the links and the desired state, which share it, hold one copy).
    `canonical`: the one string object to hold for a user id, wherever it appears (the users
    listing, member lists): `sys.intern` unless the caller knows them already.
    `group_rules`: predicates over a group's JSON (a target's `{ prefix }` / `{ filter }` rules);
    every group one of them matches is wanted too.
    """
    earlier = previous_members or {}
    snap = Snapshot(started_at=time.time())
    # A fixed key order, so that the same user hashes the same in every process.
    kept = None if keep is None else tuple(sorted(keep))
    limiter = anyio.CapacityLimiter(max(1, concurrency))

    async def read_users() -> None:
        page_no = 0
        rejected: list[str] = []
        try:
            async for page in client.iter_users(rejected=rejected):
                page_no += 1
                _rejections(snap, f"users page {page_no}", rejected)
                users = snap.users
                hashes = snap.hashes
                intern = canonical
                for user in page:
                    uid = intern(user["id"])
                    if kept is not None:
                        user = {k: user[k] for k in kept if k in user}
                    else:
                        user.pop("_links", None)
                    user["id"] = uid      # what maps `id` (externalId) holds the shared string too
                    digest = content_hash(user)
                    if on_user is not None and on_user(uid, user, digest):
                        users[uid] = UNCHANGED     # its hash is the one the state file holds
                    else:
                        users[uid] = user
                        hashes[uid] = digest
                if log is not None:
                    log.debug("snapshot.page", kind="users", page=page_no, size=len(page), total=len(users))
            _rejections(snap, "users listing", rejected)   # its count against what arrived
        except _FATAL:
            raise
        except RemoteError as exc:
            _problem(snap, f"users page {page_no + 1}: {exc}")

    async def read_groups() -> None:
        page_no = 0
        rejected: list[str] = []
        try:
            async for page in client.pages("groups", "groups", rejected=rejected):
                page_no += 1
                _rejections(snap, f"groups page {page_no}", rejected)
                for group in page:
                    group.pop("_links", None)
                    snap.groups[group["id"]] = group
                if log is not None:
                    log.debug("snapshot.page", kind="groups", page=page_no, size=len(page),
                              total=len(snap.groups))
            _rejections(snap, "groups listing", rejected)
        except _FATAL:
            raise
        except RemoteError as exc:
            _problem(snap, f"groups page {page_no + 1}: {exc}")

        names = set(group_names)
        wanted = {gid for gid in group_ids if gid in snap.groups}
        wanted.update(gid for gid, group in snap.groups.items()
                      if isinstance(group.get("name"), str) and group["name"] in names)
        if group_rules:
            wanted.update(gid for gid, group in snap.groups.items() if any(rule(group) for rule in group_rules))
        if transitive and snap.groups:
            parents: dict[str, frozenset[str]] = {}

            async def read_parents(gid: str) -> None:
                parents[gid] = frozenset(await client.group_parents(gid))

            await _fan_out(snap, limiter, list(snap.groups), read_parents, "parents")
            snap.parents = parents
            children = snap.children()
            for gid in list(wanted):
                wanted |= snap.descendants(gid, children)

        members: dict[str, Set[str]] = {}

        async def read_members(gid: str) -> None:
            dropped: list[str] = []
            found = frozenset(await client.group_member_ids(gid, rejected=dropped))
            before = earlier.get(gid)
            # Kept as the last cycle's set when equal (compared by value: no id is looked up); a new
            # or changed one is stored compactly, with the canonical id strings.
            members[gid] = (before if before is not None and before == found
                            else Members.of(map(canonical, found)))
            _rejections(snap, f"group {gid} members", dropped)

        await _fan_out(snap, limiter, sorted(wanted), read_members, "members")
        snap.members = members
        snap.wanted = len(wanted)

    # The users listing and the group reads (groups -> nesting -> members) go on side by side:
    # a cycle with nothing to do is then as long as the longer of the two, not their sum.
    fatal: list[BaseException] = []

    async def guarded(read: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        try:
            await read()
        except _FATAL as exc:
            fatal.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded, read_users, tg.cancel_scope)
        tg.start_soon(guarded, read_groups, tg.cancel_scope)
    if fatal:
        raise fatal[0]
    snap.finished_at = time.time()
    if log is not None:
        log.debug("snapshot.taken", user_count=len(snap.users), group_count=len(snap.groups),
                         wanted_groups=snap.wanted, complete=snap.complete,
                         problems=len(snap.problems),
                         duration_ms=round((snap.finished_at - snap.started_at) * 1000))
    return snap


async def _fan_out(
    snap: Snapshot,
    limiter: anyio.CapacityLimiter,
    group_ids: list[str],
    read: Callable[[str], Awaitable[None]],
    what: str,
) -> None:
    """Run *read* for every group, *limiter* at a time. A failure becomes a problem; a refusal
    cancels the rest and is raised as itself (not inside an exception group)."""
    fatal: list[BaseException] = []

    async def one(gid: str, scope: anyio.CancelScope) -> None:
        async with limiter:
            try:
                await read(gid)
            except _FATAL as exc:
                fatal.append(exc)
                scope.cancel()
            except RemoteError as exc:
                _problem(snap, f"group {gid} {what}: {exc}")

    async with anyio.create_task_group() as tg:
        for gid in group_ids:
            tg.start_soon(one, gid, tg.cancel_scope)
    if fatal:
        raise fatal[0]


def _problem(snap: Snapshot, text: str) -> None:
    snap.complete = False
    snap.problems.append(text)


def _rejections(snap: Snapshot, where: str, rejected: list[str]) -> None:
    """Items a page dropped (not an object, no string id) are problems: the snapshot is incomplete."""
    for text in rejected:
        _problem(snap, f"{where}: {text}")
    rejected.clear()
