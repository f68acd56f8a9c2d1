"""`provisiond sync-user USER` and `sync-group GROUP`: one user, or one group, provisioned now,
through the reconcile step the daemon's incremental cycle runs (`Engine.reconcile`).

sync-user, in order:

1. read the user from PingOne now (`find_user`: by id, username or email, with its direct
   `memberOfGroupIDs`), every group (names and renames), and, when a target counts nested
   membership, the parents of the user's groups up to the top; the other PingOne users with its
   userName (the stored snapshot's, and those linked in a target) are read too: one still there
   makes a `conflict`, one gone is a departed namesake whose account a rehire takes over;
2. turn what was read into the change feed's shape (`Reads`) and merge it into a snapshot of
   just those users and every group (`daemon.incremental.merge`): an `Increment` naming this
   one user;
3. per target, `Engine.reconcile` (`cycle.kind = "sync-user"`): the desired state through the
   target's `Rules`, sliced to this user (`slice_to`: no other member is ever removed), planned
   with the same `max_deletes` window and held-plan rules, applied with the `Applier`, summarised.
   Only here is an approval of a held plan honoured for what that plan held, and consumed when
   all it released was used.

sync-group reads PingOne as a cycle does (every user; the groups it needs) and reconciles one
group and its in-scope members (`_group_slice`): no user is deprovisioned, no other group touched.

Running beside the daemon: there is no control socket. Both processes share the state file,
which is SQLite in WAL mode with a busy timeout. Each write claims its entity in SQLite first
(`Store.mark_in_flight`): one the daemon is writing, or wrote after this plan read the links, is
not sent; the step waits for it and plans it again from the current state, or reports it
`skipped`/`busy`. Before and after writing, the meta key `links.generation.<target>` is bumped,
so that a running daemon reads its links from SQLite again (and its own claims count what was
written here): never two writes in flight to one entity, and none built from stale links.

`why USER`'s prediction is this same step run plan-only (`plan_user`: `Reconcile.plan_only`),
fed from the stored snapshot instead of PingOne: nothing is read from the network, written to
SQLite or sent.

`--dry-run`: the target client is wrapped by `DryRunClient`, which lets reads through and answers
every write itself, and the engine records into a scratch state file (`ScratchWrites`: reads
the real one): nothing is sent, nothing in the real state file changes, and each step is printed
as it would happen.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from daemon.config import Config, TargetConfig
from daemon.engine import (
    DEFAULT_BUSY_WAIT,
    Engine,
    Reconcile,
    Reconciled,
    group_rules,
    rules_for,
    snapshot_needs,
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
    stored_groups,
    user_link,
    user_snapshot,
)
from daemon.incremental import Increment, merge
from daemon.links import PENDING, Actual, Op, Plan
from daemon.mapping import Desired, desired_state, resolve_pins
from daemon.model import JSON, Snapshot
from daemon.progress import ProgressSink
from daemon.source.changes import Reads
from daemon.source.pingone import PingOneClient
from daemon.source.snapshot import take_snapshot
from daemon.store import ScratchWrites, Store
from daemon.target.scim import ScimClient, refuse_unsafe

DEFAULT_MAX_NESTING = 64      # parent levels followed above the user's groups (cycles are cut anyway)
DRY_RUN_ID_PREFIX = "dry-run-"
FAILED = "failed"
BUSY_WAIT = DEFAULT_BUSY_WAIT    # seconds an entity the daemon is writing is waited for, then planned again

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
    outcome: str | None = None       # the reconcile step's: success, partial_failure, failed, quarantined
    busy: int = 0                    # entities left skipped: another process held them

    @property
    def failed(self) -> int:
        broken = self.outcome in ("failed", "quarantined") and not any(s == FAILED for s in self.results.values())
        return sum(1 for status in self.results.values() if status == FAILED) + int(broken)

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


class _Results:
    """`failed` of a sync-user or sync-group result: some operation of some target failed."""

    targets: list[TargetSync]

    @property
    def failed(self) -> bool:
        return any(t.failed for t in self.targets)


@dataclass
class SyncResult(_Results):
    user_id: str
    user_name: str | None
    in_source: bool
    dry_run: bool
    targets: list[TargetSync] = field(default_factory=list)
    took_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id, "user": self.user_name, "in_source": self.in_source,
            "dry_run": self.dry_run, "took_s": round(self.took_s, 3), "failed": self.failed,
            "targets": [t.as_json(in_scope_key="in_scope") for t in self.targets],
        }


# -- the engine, for real or as a dry run --------------------------------------------------------


@asynccontextmanager
async def _engine(config: Config, store: Store, session: aiohttp.ClientSession, *, dry_run: bool,
                  log: Any) -> AsyncIterator[Engine]:
    """An Engine over the state file; for a dry run, over `ScratchWrites` and `DryRunClient`s."""
    if not dry_run:
        yield Engine(config, store, session, log=log)
        return
    with tempfile.TemporaryDirectory(prefix="provisiond-dry-run-") as scratch:
        overlay = ScratchWrites(store, await Store.open(Path(scratch) / "dry-run.db"))
        try:
            engine = Engine(config, overlay, session, log=log)
            for rt in engine.runtimes.values():
                rt.client = DryRunClient(rt.client)
            yield engine
        finally:
            await overlay.close()


def _observe(engine: Engine, out: dict[str, TargetSync], *, dry_run: bool, emit: Emit,
             progress: ProgressSink | None) -> None:
    """Every entity event of the applies: kept per target, printed, and told to `progress`."""

    def observe(event: str, fields: dict[str, Any]) -> None:
        target = out.get(str(fields.get("target")))
        if target is None:
            return
        target.events.append({"event": event, **{k: v for k, v in fields.items() if k != "target"}})
        detail = ""
        if fields.get("http_status"):
            detail += f" HTTP {fields['http_status']}"
        if fields.get("scim_type"):
            detail += f" {fields['scim_type']}"
        if fields.get("error"):
            detail += f": {fields['error']}"
        if fields.get("holder"):
            detail += f": held by {fields['holder']}"
        if progress is not None:
            progress.observe(event, fields)
        who = fields.get("user") or fields.get("group")
        prefix = "would be " if dry_run else ""
        emit(f"  {prefix}{event} {who} -> target id {fields.get('target_id')} "
             f"({fields.get('reason')}, {fields.get('outcome')}){detail}")

    engine.observers.append(observe)
    if progress is not None:
        engine.progress = progress.update


def _print_plan(emit: Emit, name: str, head: str, the_plan: Plan, *, dry_run: bool) -> None:
    if not the_plan.ops:
        emit(f"{name}: {head}; nothing to do: the target already holds what PingOne says")
        return
    emit(f"{name}: {head}; {len(the_plan.pending())} operation(s)" + (" (dry run)" if dry_run else ""))
    for op in the_plan.ops:
        note = "" if op.status == PENDING else f"  [{op.status}: {op.skip_reason}]"
        emit(f"  plan: {op.kind} {op.op} {op.name} ({op.reason}){note}")


def _finish(out: TargetSync, done: Reconciled, engine: Engine, emit: Emit) -> None:
    out.cycle_id = done.cycle_id
    out.ops = done.ops
    out.results = done.statuses
    out.outcome = done.report.outcome
    out.busy = done.busy
    client = engine.runtimes[out.target].client
    if isinstance(client, DryRunClient):
        out.writes = list(client.writes)
    if done.error is not None:
        emit(f"  {out.target}: FAILED: {done.error}")
    elif done.report.outcome == "quarantined":
        emit(f"  {out.target}: FAILED: the target refused or stopped answering")
    if done.busy:
        emit(f"  {out.target}: {done.busy} entit{'y' if done.busy == 1 else 'ies'} left skipped (busy): another "
             "provisiond process was writing to it; the daemon's next cycle plans it again")


# -- reading PingOne ---


@dataclass
class _SourceUser:
    user_id: str
    user: JSON | None                # as PingOne answers it (with `memberOfGroupIDs`); None: deleted
    groups: dict[str, JSON]
    parents: dict[str, frozenset[str]]


def _direct(user: JSON | None) -> set[str]:
    # UNCONFIRMED (pingone.md §4.3): whether memberOfGroupIDs lists nested groups as well; taken
    # as direct. With `membership = "direct"` a nested-only group would then count as direct.
    ids = user.get("memberOfGroupIDs") if user is not None else None
    return {str(g) for g in ids} if isinstance(ids, list) else set()


async def _read_source(source: PingOneClient, store: Store, ref: str) -> _SourceUser:
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
    groups: dict[str, JSON] = {}
    for group in await source.list_groups():
        group.pop("_links", None)
        groups[str(group["id"])] = group
    return _SourceUser(user_id, user, groups, {})


async def _parents(source: PingOneClient, src: _SourceUser, users: Mapping[str, JSON | None]) -> None:
    """The nesting above these users' direct groups, up to the top (transitive targets)."""
    frontier = sorted({g for u in users.values() for g in _direct(u) if g in src.groups and g not in src.parents})
    for _ in range(DEFAULT_MAX_NESTING):
        if not frontier:
            break
        found: list[str] = []
        for gid in frontier:
            ups = frozenset(await source.group_parents(gid))
            src.parents[gid] = ups
            found.extend(p for p in ups if p not in src.parents and p in src.groups)
        frontier = sorted(set(found))


async def _namesakes(read: Callable[[str], Awaitable[JSON | None]], store: Store, src: _SourceUser,
                     targets: list[TargetConfig]) -> dict[str, JSON]:
    """The other PingOne users that map to this user's userName in some target, read now
    (`read`: PingOne for sync-user, the stored snapshot for `why`; None: gone): the stored
    snapshot's and those linked in a target. One still in PingOne is in the snapshot (a
    userName shared in scope is a `conflict`); one gone is left out, so its link is a departed
    namesake's (a rehire takes its account over)."""
    if src.user is None:
        return {}
    one = user_snapshot({src.user_id: src.user}, src.groups, src.parents, {src.user_id: _direct(src.user)})
    names: set[str] = set()
    for cfg in targets:
        rules = rules_for(cfg)
        mapped = desired_state(one, rules, resolve_pins(one, rules, await pins_for(store, cfg.name)))
        want = mapped.users.get(src.user_id) or mapped.skipped.get(src.user_id)
        if want is not None and want.user_name:
            names.add(want.user_name)
    candidates: set[str] = set()
    for name in names:
        candidates.update(str(o["id"]) for o in await namesakes(store, name, src.user_id))
        for cfg in targets:
            candidates.update(await store.linked_namesakes(cfg.name, name, src.user_id))
    out: dict[str, JSON] = {}
    for other in sorted(candidates - {src.user_id}):
        found = await read(other)
        if found is not None:
            out[other] = found
    return out


def _pingone_reader(source: PingOneClient) -> Callable[[str], Awaitable[JSON | None]]:
    async def read(user_id: str) -> JSON | None:
        try:
            return await source.get_user(user_id)
        except NotFound:
            return None
    return read


def _stored_reader(store: Store) -> Callable[[str], Awaitable[JSON | None]]:
    """A stored snapshot user as PingOne would answer it: with its direct `memberOfGroupIDs`."""
    async def read(user_id: str) -> JSON | None:
        async with store.db.execute("SELECT data FROM source_user WHERE id=?", (user_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        user: JSON = json.loads(row[0])
        direct = await direct_group_ids(store, [user_id])
        return {**user, "memberOfGroupIDs": sorted(direct.get(user_id, ()))}
    return read


def _increment(src: _SourceUser, others: Mapping[str, JSON]) -> Increment:
    """What was read, as the change feed hands it on (`Reads`), merged into a snapshot of every
    group and no user: the snapshot then holds this user and its namesakes with their direct
    groups; the increment names this user alone."""
    base = Snapshot(groups=dict(src.groups), members={gid: frozenset() for gid in src.groups},
                    parents=dict(src.parents), complete=True, started_at=time.time())
    reads = Reads(users={src.user_id: src.user, **others}, groups={})
    inc = merge(base, reads)
    return replace(inc, users=frozenset({src.user_id}), groups=frozenset(),
                   deleted_users=inc.deleted_users & {src.user_id})


# -- one target -------------------------------------------------------------------------------


def _user_step(store: Store, cfg: TargetConfig, user_id: str, out: TargetSync, *, in_source: bool,
               dry_run: bool, emit: Emit, plan_only: bool = False) -> Reconcile:
    """The `Reconcile` of sync-user for one target, and of `why`'s prediction (`plan_only`)."""
    name = cfg.name

    async def links(desired: Desired) -> Actual:
        """This user's link, its linked namesakes' (no lookup takes their objects; a departed
        one's is taken over), and every group link (few): read now, not the daemon's copy."""
        link = await user_link(store, name, user_id)
        users = {user_id: link} if link is not None else {}
        want = desired.users.get(user_id)
        if want is not None:
            users.update({n.source_id: n for n in await namesake_links(store, name, want.user_name, user_id)})
        return Actual(users, await group_links(store, name))

    def on_plan(part: Desired, the_plan: Plan) -> None:
        want = part.users.get(user_id)
        skip = part.skipped.get(user_id)
        out.in_scope = want is not None or skip is not None
        if skip is not None:
            out.skipped = f"{skip.reason}: {skip.detail}"
            emit(f"{name}: skipped ({out.skipped}); nothing is sent")
            the_plan.ops = []
            return
        verdict = "in scope" if want is not None else "not in scope" if in_source else "deleted in PingOne"
        _print_plan(emit, name, verdict, the_plan, dry_run=dry_run)

    return Reconcile(
        SYNC_USER_KIND, recover=False, approvals=True, complete=True, announce=not dry_run, busy_wait=BUSY_WAIT,
        links=links, on_plan=on_plan, summary={"user": user_id, "dry_run": dry_run}, plan_only=plan_only)


async def _sync_target(engine: Engine, cfg: TargetConfig, inc: Increment, user_id: str, out: TargetSync, *,
                       in_source: bool, dry_run: bool, emit: Emit) -> TargetSync:
    name = cfg.name
    done = await engine.reconcile(engine.runtimes[name], inc, _user_step(
        engine.store, cfg, user_id, out, in_source=in_source, dry_run=dry_run, emit=emit))
    _finish(out, done, engine, emit)
    if done.approval is not None and not dry_run:
        approval = done.approval
        if done.approval_used == "consumed":
            emit(f"  the approval of {name} (plan {approval.plan_id}) was used (and consumed) for this user's removal")
        elif done.approval_used == "kept":
            emit(f"  the approval of {name} (plan {approval.plan_id}) released this user's removal; "
                 "it is kept for the next cycle, which sends the rest of that plan")
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
    async with _engine(config, store, session, dry_run=dry_run, log=log) as engine:
        source = engine.source
        src = await _read_source(source, store, ref)
        name = src.user.get("username") if src.user is not None else None
        result = SyncResult(src.user_id, name if isinstance(name, str) else None, src.user is not None, dry_run)
        emit(f"user {result.user_name or src.user_id} ({src.user_id}): "
             + ("read from PingOne" if src.user is not None else "not in PingOne (deleted)"))
        nested = any(t.membership == "transitive" for t in targets)
        if nested:
            await _parents(source, src, {src.user_id: src.user})
        others = await _namesakes(_pingone_reader(source), store, src, targets)
        if nested and others:
            await _parents(source, src, others)
        inc = _increment(src, others)
        outs = {cfg.name: TargetSync(cfg.name) for cfg in targets}
        _observe(engine, outs, dry_run=dry_run, emit=emit, progress=progress)
        for cfg in targets:
            result.targets.append(await _sync_target(engine, cfg, inc, src.user_id, outs[cfg.name],
                                                     in_source=src.user is not None, dry_run=dry_run, emit=emit))
    result.took_s = time.perf_counter() - started
    return result


# -- why: the sync-user step, plan-only, from the state file ----------------------------------


@dataclass
class UserPlan:
    """What `sync-user` would do for one user now, planned from the stored snapshot."""

    user_id: str
    user: JSON | None                 # as stored (None: gone from the last snapshot, still linked)
    snapshot: Snapshot                # the increment's: this user and its namesakes, every stored group
    targets: dict[str, tuple[TargetSync, Reconciled]] = field(default_factory=dict)


async def plan_user(config: Config, store: Store, ref: str, *, target: str | None = None, log: Any) -> UserPlan:
    """`why`'s prediction: the sync-user step (`_user_step`, `Engine.reconcile`) run plan-only
    over the user as the last snapshot holds it, read from SQLite as sync-user reads PingOne:
    the user with its direct groups, every group, and the namesakes (one not in the snapshot
    is a departed one). No request is made, nothing is written to SQLite or sent to a target.
    Raises UnknownUser, KeyError (no such target)."""
    targets = [config.target(target)] if target is not None else list(config.targets)
    read = _stored_reader(store)
    stored = await find_user(store, ref)
    user_id = str(stored["id"]) if stored is not None else await find_linked_id(store, ref)
    if user_id is None:
        raise UnknownUser(f"no user {ref!r} in the state file {store.path}")
    groups = await stored_groups(store)
    src = _SourceUser(user_id, await read(user_id), dict(groups.groups), dict(groups.parents))
    inc = _increment(src, await _namesakes(read, store, src, targets))
    out = UserPlan(user_id, stored, inc.snapshot)
    async with aiohttp.ClientSession() as session:     # the Engine's clients; plan-only sends nothing
        engine = Engine(config, store, session, log=log)
        for cfg in targets:
            sync = TargetSync(cfg.name)
            done = await engine.reconcile(engine.runtimes[cfg.name], inc, _user_step(
                store, cfg, user_id, sync, in_source=src.user is not None, dry_run=True, emit=lambda _: None,
                plan_only=True))
            out.targets[cfg.name] = (sync, done)
    return out


# -- sync-group: one group and its in-scope members -------------------------------------------

SYNC_GROUP_KIND = "sync-group"    # `cycle.summary.kind` of a cycle written by `provisiond sync-group`


class UnknownGroup(Exception):
    """No PingOne group has that id or name."""


@dataclass
class GroupSyncResult(_Results):
    group_id: str
    group_name: str
    dry_run: bool
    complete: bool = True
    targets: list[TargetSync] = field(default_factory=list)
    took_s: float = 0.0

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
    plans no removal of any user nor of any other group. Empty when the group is not pushed."""
    want = desired.groups.get(group_id)
    if want is None:
        return Desired(present_users=desired.present_users, present_groups=desired.present_groups), Actual({}, {})
    users = {sid: desired.users[sid] for sid in want.members if sid in desired.users}
    part = Desired(users=users, groups={group_id: want}, present_users=desired.present_users,
                   present_groups=desired.present_groups, in_scope=len(users), create_only=desired.create_only)
    links = Actual({sid: actual.users[sid] for sid in users if sid in actual.users},
                   {group_id: actual.groups[group_id]} if group_id in actual.groups else {})
    return part, links


async def _sync_group_target(engine: Engine, cfg: TargetConfig, inc: Increment, group_id: str, out: TargetSync, *,
                             dry_run: bool, emit: Emit) -> TargetSync:
    name = cfg.name

    def on_plan(part: Desired, the_plan: Plan) -> None:
        if group_id not in part.groups:
            out.skipped = "not_pushed"
            emit(f"{name}: the group is not pushed to this target (its `groups` do not select it); nothing is sent")
            the_plan.ops = []
            return
        out.in_scope = True
        members = len(part.groups[group_id].members)
        _print_plan(emit, name, f"{members} in-scope member(s)", the_plan, dry_run=dry_run)

    done = await engine.reconcile(engine.runtimes[name], inc, Reconcile(
        SYNC_GROUP_KIND, recover=False, complete=inc.snapshot.complete, announce=not dry_run, busy_wait=BUSY_WAIT,
        slice=lambda desired, actual: _group_slice(desired, actual, group_id), on_plan=on_plan,
        summary={"group": group_id, "dry_run": dry_run}))
    _finish(out, done, engine, emit)
    return out


async def sync_group(config: Config, store: Store, session: aiohttp.ClientSession, ref: str, *,
                     target: str | None = None, dry_run: bool = False, log: Any, emit: Emit = print,
                     progress: ProgressSink | None = None) -> GroupSyncResult:
    """Push one PingOne group (by id or name) and its in-scope members to every target that
    pushes it (or `target`) now, through the reconcile step the incremental cycle runs.

    PingOne is read as a cycle reads it, but only for the groups this needs: every user (the
    listing), the group, the targets' scope groups and, with nesting, the groups below them.
    Members who left the group are removed from it (from a complete read only); no user is
    deprovisioned and no other group is touched. Raises UnknownGroup, KeyError (no such target)
    and the source's RemoteError."""
    started = time.perf_counter()
    targets = [config.target(target)] if target is not None else list(config.targets)
    async with _engine(config, store, session, dry_run=dry_run, log=log) as engine:
        source = engine.source
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
        inc = Increment(snap, frozenset(snap.member_ids(group_id, transitive=transitive)), frozenset({group_id}),
                        frozenset())
        outs = {cfg.name: TargetSync(cfg.name) for cfg in targets}
        _observe(engine, outs, dry_run=dry_run, emit=emit, progress=progress)
        for cfg in targets:
            result.targets.append(await _sync_group_target(engine, cfg, inc, group_id, outs[cfg.name],
                                                           dry_run=dry_run, emit=emit))
    result.took_s = time.perf_counter() - started
    return result
