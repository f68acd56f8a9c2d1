"""`provisiond sync-user USER`: provision one user now, through the same code a cycle runs.

The steps, in order:

1. read the user from PingOne now (`find_user`: by id, username or email, with its direct
   `memberOfGroupIDs`), every group (names and renames), and, when a target counts nested
   membership, the parents of the user's groups up to the top;
2. per target: the one-user snapshot through the target's `Rules` (scope by groups and filter,
   mapping, skips), exactly as `desired_state` does in a cycle;
3. plan with the pure planner against this user's stored link, the group links reduced to this
   user (so no other member is ever removed);
4. record a cycle whose summary says `"kind": "sync-user"` and its plan, apply the plan with the
   `Applier` (the cycle's code path: journal, links, one log event per entity), finish the cycle;
5. bump the meta key `links.generation.<target>` so that a running daemon re-reads its links.

Running beside the daemon: there is no control socket. Both processes share the state file,
which is SQLite in WAL mode with a busy timeout, so each write transaction waits for the other's
instead of failing, and readers never block. The daemon keeps its links in memory between cycles
and compares `links.generation.<target>` at the start of each cycle: a new value makes it re-read
them, so the user provisioned here is not created a second time. A cycle of the daemon that is
applying at the very moment may write its own (older) copy of a pushed group's members; the next
cycle then sees this user missing from the group and adds it again (an idempotent PATCH).

`--dry-run`: the target client is wrapped by `DryRunClient`, which lets reads through and answers
every write itself, and the applier records into a scratch state file: nothing is sent, nothing
in the real state file changes, and each step is printed as it would happen.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from daemon import approvals
from daemon.applier import APPLIED, FAILED, Applier
from daemon.config import Config, TargetConfig
from daemon.engine import (
    META_LINKS_GENERATION,
    build_runtime,
    group_rules,
    rules_for,
    snapshot_needs,
    source_client,
)
from daemon.errors import NotFound
from daemon.explain import (
    SYNC_USER_KIND,
    UnknownUser,
    direct_group_ids,
    find_linked_id,
    find_user,
    group_links,
    namesake_links,
    namesakes,
    pins_for,
    plan_for_user,
    policy_for,
    user_link,
    user_snapshot,
)
from daemon.links import HELD, PENDING, REMOVALS_HELD, Actual, Op, Plan
from daemon.mapping import Desired, desired_state, resolve_pins
from daemon.model import JSON, Snapshot
from daemon.planner import plan
from daemon.progress import ProgressSink
from daemon.source.pingone import PingOneClient
from daemon.source.snapshot import take_snapshot
from daemon.store import Store
from daemon.target.scim import ScimClient, refuse_unsafe

DEFAULT_MAX_NESTING = 64      # parent levels followed above the user's groups (cycles are cut anyway)
DRY_RUN_ID_PREFIX = "dry-run-"

Emit = Callable[[str], None]


# -- dry run: the guard at the write chokepoint ------------------------------------------------


class DryRunClient(ScimClient):
    """A ScimClient whose `request` chokepoint sends reads and answers writes itself.

    Every write is kept in `writes` as (method, path, body). A POST answers the body back with a
    made-up id, other writes answer 204, so the applier goes on exactly as if the target agreed.
    """

    def __init__(self, inner: ScimClient) -> None:
        self.__dict__.update(vars(inner))
        self.writes: list[tuple[str, str, Any]] = []

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: Mapping[str, str] | None = None,
                      attempts: list[int] | None = None) -> tuple[int, dict[str, Any] | None]:
        method = method.upper()
        refuse_unsafe(method, path, json)      # what the real client would refuse, refused here too
        if method in ("GET", "HEAD") or path.endswith("/.search"):
            return await super().request(method, path, json=json, params=params, attempts=attempts)
        self.writes.append((method, path, json))
        if attempts is not None:
            attempts.append(0)
        if method == "POST":
            body = dict(json) if isinstance(json, dict) else {}
            body["id"] = f"{DRY_RUN_ID_PREFIX}{len(self.writes)}"
            return 201, body
        return 204, None


# -- results ----------------------------------------------------------------------------------


@dataclass
class TargetSync:
    target: str
    in_scope: bool = False
    skipped: str | None = None
    cycle_id: int | None = None
    ops: list[Op] = field(default_factory=list)
    results: dict[int, str] = field(default_factory=dict)      # seq -> applied | failed | skipped
    events: list[dict[str, Any]] = field(default_factory=list)
    writes: list[tuple[str, str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for status in self.results.values() if status == FAILED)

    def as_json(self, *, in_scope_key: str) -> dict[str, Any]:
        """This target's part of `sync-user --json` (`in_scope`) or `sync-group --json` (`pushed`)."""
        return {
            "target": self.target, in_scope_key: self.in_scope, "skipped": self.skipped, "cycle": self.cycle_id,
            "operations": [{"seq": op.seq, "kind": op.kind, "op": op.op, "name": op.name, "reason": op.reason,
                            "status": self.results.get(op.seq, op.status), "skip_reason": op.skip_reason}
                           for op in self.ops],
            "events": self.events,
            "writes": [{"method": m, "path": p} for m, p, _ in self.writes],
        }


@dataclass
class SyncResult:
    user_id: str
    user_name: str | None
    in_source: bool
    dry_run: bool
    targets: list[TargetSync] = field(default_factory=list)
    took_s: float = 0.0

    @property
    def failed(self) -> bool:
        return any(t.failed for t in self.targets)

    def as_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id, "user": self.user_name, "in_source": self.in_source,
            "dry_run": self.dry_run, "took_s": round(self.took_s, 3), "failed": self.failed,
            "targets": [t.as_json(in_scope_key="in_scope") for t in self.targets],
        }


# -- reading PingOne --------------------------------------------------------------------------


@dataclass
class _SourceUser:
    user_id: str
    user: JSON | None                # None: deleted in PingOne
    direct: set[str]
    groups: dict[str, JSON]
    parents: dict[str, frozenset[str]]


async def _read_source(source: PingOneClient, store: Store, ref: str, *, nested: bool) -> _SourceUser:
    user = await source.find_user(ref)
    if user is not None:
        user_id = str(user["id"])
    else:
        stored = await find_user(store, ref)
        known = str(stored["id"]) if stored is not None else await find_linked_id(store, ref)
        if known is None:
            raise UnknownUser(f"no PingOne user {ref!r}, and none in the state file")
        user_id = known
        try:
            user = await source.get_user(user_id)
        except NotFound:
            user = None
    direct: set[str] = set()
    if user is not None:
        user.pop("_links", None)
        ids = user.pop("memberOfGroupIDs", None)
        user.pop("memberOfGroupNames", None)
        # UNCONFIRMED (pingone.md §4.3): whether memberOfGroupIDs lists nested groups as well; taken
        # as direct. With `membership = "direct"` a nested-only group would then count as direct.
        direct = {str(g) for g in ids} if isinstance(ids, list) else set()
    groups: dict[str, JSON] = {}
    for group in await source.list_groups():
        group.pop("_links", None)
        groups[str(group["id"])] = group
    parents: dict[str, frozenset[str]] = {}
    if nested:
        frontier = [g for g in direct if g in groups]
        for _ in range(DEFAULT_MAX_NESTING):
            if not frontier:
                break
            found: list[str] = []
            for gid in frontier:
                ups = frozenset(await source.group_parents(gid))
                parents[gid] = ups
                found.extend(p for p in ups if p not in parents and p in groups)
            frontier = sorted(set(found))
    return _SourceUser(user_id, user, direct, groups, parents)


# -- one target -------------------------------------------------------------------------------


async def _gone(source: PingOneClient, user_id: str) -> bool:
    """Is this PingOne user gone (404 now)?"""
    try:
        await source.get_user(user_id)
    except NotFound:
        return True
    return False


def hold_unreleased(the_plan: Plan, user_id: str, released: frozenset[str]) -> None:
    """The target's latest plan held this user's removal: hold it here too unless `released`
    (an approval of a plan that held it) releases it, with the user's member removals, as the
    planner holds them."""
    if approvals.removal_key("user", user_id) in released:
        return
    removals = [op for op in the_plan.ops if op.is_removal and op.kind == "user" and op.source_id == user_id
                and op.status == PENDING]
    if not removals:
        return
    held = {op.seq for op in removals} | {op.seq for op in the_plan.ops
                                          if op.op == "remove_members" and op.status == PENDING}
    the_plan.removals_held += len(removals)
    the_plan.ops = [replace(op, status=HELD, skip_reason=REMOVALS_HELD) if op.seq in held else op
                    for op in the_plan.ops]


async def _sync_target(cfg: TargetConfig, src: _SourceUser, *, store: Store, writes_to: Store,
                       session: aiohttp.ClientSession, dry_run: bool, log: Any, emit: Emit,
                       source: PingOneClient, progress: ProgressSink | None = None) -> TargetSync:
    name = cfg.name
    out = TargetSync(name)
    rt = build_runtime(cfg, session)
    client: ScimClient = DryRunClient(rt.client) if dry_run else rt.client
    users = {src.user_id: src.user} if src.user is not None else {}
    memberships: dict[str, set[str]] = {src.user_id: src.direct}
    snap = user_snapshot(users, src.groups, src.parents, memberships)
    pins = resolve_pins(snap, rt.rules, await pins_for(store, name))
    desired = desired_state(snap, rt.rules, pins)
    want = desired.users.get(src.user_id)
    if want is not None:
        # the stored snapshot's namesakes that PingOne still has (a departed one is no conflict:
        # its account is the one a rehire takes over)
        others = {str(o["id"]): o for o in await namesakes(store, want.user_name, src.user_id)
                  if not await _gone(source, str(o["id"]))}
        if others:   # the stored snapshot's namesakes: a userName shared in scope is a conflict
            extra = await direct_group_ids(store, others)
            snap = user_snapshot({**users, **others}, src.groups, src.parents, {**memberships, **extra})
            desired = desired_state(snap, rt.rules, pins)
            want = desired.users.get(src.user_id)
    skip = desired.skipped.get(src.user_id)
    out.in_scope = want is not None or skip is not None
    if skip is not None:
        out.skipped = f"{skip.reason}: {skip.detail}"
        emit(f"{name}: skipped ({out.skipped}); nothing is sent")
        return out
    link = await user_link(store, name, src.user_id)
    glinks = await group_links(store, name)
    actual = Actual({src.user_id: link} if link is not None else {}, glinks)
    # Namesakes' links: a lookup never takes their objects (the applier knows them), and the
    # account of one gone from PingOne is taken over (a rehire), as a cycle would.
    namesakes_linked = await namesake_links(store, name, want.user_name, src.user_id) if want is not None else []
    departed = [n for n in namesakes_linked if link is None and await _gone(source, n.source_id)]
    managed = await store.managed_count(name)
    limit = cfg.max_deletes.limit(managed)
    # Like a cycle, sync-user honours an approval of a held plan: it releases this user's removal
    # only when that plan held it (by `kind:source_id`, the engine's identity); any other removal
    # is judged by max_deletes again, and one the target's latest plan holds stays held.
    approval = await approvals.in_effect(store, name)
    released = approval.releases if approval is not None else frozenset()
    the_plan = plan_for_user(desired, actual, src.user_id, cfg, now=time.time(), max_deletes=limit,
                             released=released, departed=departed)
    if await approvals.held_removal(store, name, "user", src.user_id) is not None:
        hold_unreleased(the_plan, src.user_id, released)
    out.ops = the_plan.ops
    verdict = "in scope" if want is not None else "not in scope" if src.user is not None else "deleted in PingOne"
    if not the_plan.ops:
        emit(f"{name}: {verdict}; nothing to do: the target already holds what PingOne says")
        return out
    emit(f"{name}: {verdict}; {len(the_plan.pending())} operation(s)" + (" (dry run)" if dry_run else ""))
    for op in the_plan.ops:
        note = "" if op.status == PENDING else f"  [{op.status}: {op.skip_reason}]"
        emit(f"  plan: {op.kind} {op.op} {op.name} ({op.reason}){note}")
    pending = the_plan.pending()
    if not pending:
        return out
    cycle_id = await writes_to.start_cycle(name, full_sync=False, kind=SYNC_USER_KIND)
    out.cycle_id = cycle_id
    await writes_to.save_plan(cycle_id, name, the_plan.ops)

    def observe(event: str, fields: dict[str, Any]) -> None:
        out.events.append({"event": event, **{k: v for k, v in fields.items() if k != "target"}})
        detail = ""
        if fields.get("http_status"):
            detail += f" HTTP {fields['http_status']}"
        if fields.get("scim_type"):
            detail += f" {fields['scim_type']}"
        if fields.get("error"):
            detail += f": {fields['error']}"
        if progress is not None:
            progress.observe(event, {**fields, "target": name})
        who = fields.get("user") or fields.get("group")
        prefix = "would be " if dry_run else ""
        emit(f"  {prefix}{event} {who} -> target id {fields.get('target_id')} "
             f"({fields.get('reason')}, {fields.get('outcome')}){detail}")

    source_updated = {sid: u["updatedAt"] for sid, u in snap.users.items() if isinstance(u.get("updatedAt"), str)}
    applier = Applier(
        target=name, cycle_id=cycle_id, client=client, store=writes_to, log=log.bind(target=name, cycle=cycle_id),
        limiter=rt.limiter, users={**{n.source_id: n for n in namesakes_linked}, **actual.users},
        groups=dict(glinks), paths=rt.rules.paths,
        can_create=cfg.actions.create, active_false_deletes=cfg.active_false_deletes,
        observer=observe, source_updated=source_updated,
        progress=(lambda done, total: progress.update(name, done, total)) if progress is not None else None)
    result = await applier.apply(the_plan.ops)
    out.results = {seq: o.status for seq, o in result.outcomes.items()}
    if isinstance(client, DryRunClient):
        out.writes = list(client.writes)
    counts = result.counts()
    if approval is not None and not dry_run:
        applied = frozenset(approvals.removal_key(op.kind, op.source_id) for op in the_plan.ops
                            if op.is_removal and op.seq in result.outcomes
                            and result.outcomes[op.seq].status == APPLIED
                            and approvals.removal_key(op.kind, op.source_id) in approval.releases)
        if approvals.used_up(approval, applied):
            await approvals.consume(store, name, approval)
            emit(f"  the approval of {name} (plan {approval.plan_id}) was used (and consumed) for this user's removal")
        elif applied:
            emit(f"  the approval of {name} (plan {approval.plan_id}) released this user's removal; "
                 "it is kept for the next cycle, which sends the rest of that plan")
    outcome = "success" if not counts.get(FAILED) else "partial_failure"
    await writes_to.finish_cycle(cycle_id, outcome, {
        "kind": SYNC_USER_KIND, "user": src.user_id, "operations": counts,
        "dry_run": dry_run})
    if counts.get(APPLIED) and not dry_run:
        await store.set_meta(f"{META_LINKS_GENERATION}.{name}", uuid.uuid4().hex)
    return out


# -- the command ------------------------------------------------------------------------------


async def sync_user(config: Config, store: Store, session: aiohttp.ClientSession, ref: str, *,
                    target: str | None = None, dry_run: bool = False, log: Any,
                    emit: Emit = print, progress: ProgressSink | None = None) -> SyncResult:
    """Fetch one user from PingOne and provision it in every target (or `target`) now.

    Raises UnknownUser, KeyError (no such target), the source's RemoteError (PingOne unreadable)
    and AmbiguousUser (several PingOne users share the username or email)."""
    started = time.perf_counter()
    targets = [config.target(target)] if target is not None else list(config.targets)
    source = source_client(config, session)
    src = await _read_source(source, store, ref, nested=any(t.membership == "transitive" for t in targets))
    name = src.user.get("username") if src.user is not None else None
    result = SyncResult(src.user_id, name if isinstance(name, str) else None, src.user is not None, dry_run)
    emit(f"user {result.user_name or src.user_id} ({src.user_id}): "
         + ("read from PingOne" if src.user is not None else "not in PingOne (deleted)"))
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="provisiond-dry-run-") as scratch:
            writes_to = await Store.open(Path(scratch) / "dry-run.db")
            try:
                for cfg in targets:
                    result.targets.append(await _sync_target(cfg, src, store=store, writes_to=writes_to,
                                                             session=session, dry_run=True, log=log, emit=emit,
                                                             source=source, progress=progress))
            finally:
                await writes_to.close()
    else:
        for cfg in targets:
            result.targets.append(await _sync_target(cfg, src, store=store, writes_to=store, session=session,
                                                     dry_run=False, log=log, emit=emit, source=source,
                                                     progress=progress))
    result.took_s = time.perf_counter() - started
    return result


# -- sync-group: one group and its in-scope members -------------------------------------------

SYNC_GROUP_KIND = "sync-group"    # `cycle.summary.kind` of a cycle written by `provisiond sync-group`


class UnknownGroup(Exception):
    """No PingOne group has that id or name."""


@dataclass
class GroupSyncResult:
    group_id: str
    group_name: str
    dry_run: bool
    complete: bool = True
    targets: list[TargetSync] = field(default_factory=list)
    took_s: float = 0.0

    @property
    def failed(self) -> bool:
        return any(t.failed for t in self.targets)

    def as_json(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id, "group": self.group_name, "dry_run": self.dry_run,
            "snapshot_complete": self.complete, "took_s": round(self.took_s, 3), "failed": self.failed,
            "targets": [t.as_json(in_scope_key="pushed") for t in self.targets],
        }


def _find_group(groups: Mapping[str, JSON], ref: str) -> JSON | None:
    if ref in groups:
        return groups[ref]
    named = [g for g in groups.values() if g.get("name") == ref]
    if not named:
        folded = ref.casefold()
        named = [g for g in groups.values() if isinstance(g.get("name"), str) and g["name"].casefold() == folded]
    return named[0] if len(named) == 1 else None


def _group_slice(desired: Desired, actual: Actual, group_id: str) -> tuple[Desired, Actual]:
    """The desired state and links reduced to one group and its in-scope members: the planner
    then creates, updates or re-enables those members and sets the group's membership, and
    plans no removal of any user nor of any other group."""
    want = desired.groups[group_id]
    users = {sid: desired.users[sid] for sid in want.members if sid in desired.users}
    part = Desired(users=users, groups={group_id: want}, present_users=desired.present_users,
                   present_groups=desired.present_groups, in_scope=len(users))
    links = Actual({sid: actual.users[sid] for sid in users if sid in actual.users},
                   {group_id: actual.groups[group_id]} if group_id in actual.groups else {})
    return part, links


async def _sync_group_target(cfg: TargetConfig, snap: Snapshot, group_id: str, *, store: Store,
                             writes_to: Store, session: aiohttp.ClientSession, dry_run: bool, log: Any,
                             emit: Emit, progress: ProgressSink | None) -> TargetSync:
    name = cfg.name
    out = TargetSync(name)
    rt = build_runtime(cfg, session)
    client: ScimClient = DryRunClient(rt.client) if dry_run else rt.client
    pins = resolve_pins(snap, rt.rules, await pins_for(store, name))
    desired = desired_state(snap, rt.rules, pins)
    if group_id not in desired.groups:
        out.skipped = "not_pushed"
        emit(f"{name}: the group is not pushed to this target (its `groups` do not select it); nothing is sent")
        return out
    out.in_scope = True
    actual = await store.load_links(name)
    part, links = _group_slice(desired, actual, group_id)
    managed = len(actual.users)
    the_plan = plan(part, links, policy_for(cfg, max_deletes=cfg.max_deletes.limit(managed),
                                            approved=await store.approved(name)),
                    complete=snap.complete, now=time.time())
    out.ops = the_plan.ops
    members = len(part.groups[group_id].members)
    if not the_plan.ops:
        emit(f"{name}: {members} in-scope member(s); nothing to do: the target already holds what PingOne says")
        return out
    emit(f"{name}: {members} in-scope member(s); {len(the_plan.pending())} operation(s)"
         + (" (dry run)" if dry_run else ""))
    for op in the_plan.ops:
        note = "" if op.status == PENDING else f"  [{op.status}: {op.skip_reason}]"
        emit(f"  plan: {op.kind} {op.op} {op.name} ({op.reason}){note}")
    pending = the_plan.pending()
    if not pending:
        return out
    cycle_id = await writes_to.start_cycle(name, full_sync=False, kind=SYNC_GROUP_KIND)
    out.cycle_id = cycle_id
    await writes_to.save_plan(cycle_id, name, the_plan.ops)

    def observe(event: str, fields: dict[str, Any]) -> None:
        out.events.append({"event": event, **{k: v for k, v in fields.items() if k != "target"}})
        detail = f" HTTP {fields['http_status']}" if fields.get("http_status") else ""
        if fields.get("error"):
            detail += f": {fields['error']}"
        if progress is not None:
            progress.observe(event, {**fields, "target": name})
        who = fields.get("user") or fields.get("group")
        emit(f"  {'would be ' if dry_run else ''}{event} {who} -> target id {fields.get('target_id')} "
             f"({fields.get('reason')}, {fields.get('outcome')}){detail}")

    source_updated = {sid: u["updatedAt"] for sid, u in snap.users.items()
                      if sid in part.users and isinstance(u.get("updatedAt"), str)}
    applier = Applier(
        target=name, cycle_id=cycle_id, client=client, store=writes_to, log=log.bind(target=name, cycle=cycle_id),
        limiter=rt.limiter, users=dict(actual.users), groups=dict(actual.groups), paths=rt.rules.paths,
        can_create=cfg.actions.create, active_false_deletes=cfg.active_false_deletes, observer=observe,
        source_updated=source_updated,
        progress=(lambda done, total: progress.update(name, done, total)) if progress is not None else None)
    result = await applier.apply(the_plan.ops)
    out.results = {seq: o.status for seq, o in result.outcomes.items()}
    if isinstance(client, DryRunClient):
        out.writes = list(client.writes)
    counts = result.counts()
    await writes_to.finish_cycle(cycle_id, "success" if not counts.get(FAILED) else "partial_failure", {
        "kind": SYNC_GROUP_KIND, "group": group_id, "operations": counts, "dry_run": dry_run})
    if counts.get(APPLIED) and not dry_run:
        await store.set_meta(f"{META_LINKS_GENERATION}.{name}", uuid.uuid4().hex)
    return out


async def sync_group(config: Config, store: Store, session: aiohttp.ClientSession, ref: str, *,
                     target: str | None = None, dry_run: bool = False, log: Any, emit: Emit = print,
                     progress: ProgressSink | None = None) -> GroupSyncResult:
    """Push one PingOne group (by id or name) and its in-scope members to every target that
    pushes it (or `target`) now, through the planner and the applier as a cycle does.

    PingOne is read as a cycle reads it, but only for the groups this needs: every user (the
    listing), the group, the targets' scope groups and, with nesting, the groups below them.
    Members who left the group are removed from it (from a complete read only); no user is
    deprovisioned and no other group is touched. Raises UnknownGroup, KeyError (no such target)
    and the source's RemoteError."""
    started = time.perf_counter()
    targets = [config.target(target)] if target is not None else list(config.targets)
    source = source_client(config, session)
    groups = {str(g["id"]): g for g in await source.list_groups()}
    group = _find_group(groups, ref)
    if group is None:
        raise UnknownGroup(f"no PingOne group {ref!r} (or several share that name: give its id)")
    group_id = str(group["id"])
    names, ids, transitive = snapshot_needs(targets)
    ids.add(group_id)
    for cfg in targets:
        ids.update((await pins_for(store, cfg.name)).values())
    snap = await take_snapshot(source, group_names=names, group_ids=ids, transitive=transitive, log=None,
                               group_rules=group_rules(rules_for(t) for t in targets))
    result = GroupSyncResult(group_id, str(group.get("name")), dry_run, snap.complete)
    emit(f"group {result.group_name} ({group_id}): read from PingOne with {len(snap.users)} users"
         + ("" if snap.complete else " (the read was incomplete: no member is removed)"))
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="provisiond-dry-run-") as scratch:
            writes_to = await Store.open(Path(scratch) / "dry-run.db")
            try:
                for cfg in targets:
                    result.targets.append(await _sync_group_target(
                        cfg, snap, group_id, store=store, writes_to=writes_to, session=session, dry_run=True,
                        log=log, emit=emit, progress=progress))
            finally:
                await writes_to.close()
    else:
        for cfg in targets:
            result.targets.append(await _sync_group_target(
                cfg, snap, group_id, store=store, writes_to=store, session=session, dry_run=False, log=log,
                emit=emit, progress=progress))
    result.took_s = time.perf_counter() - started
    return result
