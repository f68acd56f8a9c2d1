"""One provisioning cycle, step by step (DESIGN.md "What it is"); each step is one `Engine` method:

    1 snapshot PingOne                      (source.snapshot)            cycle_snapshot, save_snapshot
    2 gate it: complete? shrunk?            removals only from a         gate
                                            complete, unshrunk snapshot
    3 per target, concurrently:                                          run_targets, target_cycle
      a recover what an interrupted cycle left in flight                 recover
        (lookup before any create)
      b derive the desired state            (mapping, pure)              desire
      c the links provisiond holds: the last cycle's, else SQLite's;     known_links
        on a full sync, read the target and repair them (drift, adoption)   refresh_actual
      d plan                                (planner, pure) -> SQLite    plan_cycle, report_plan
      e apply                               (applier) -> SQLite + one    apply_plan
                                            log event per entity
      f summarise                           -> SQLite + `cycle.finished` finish

The incremental cycle (`merge_changes`, then `incremental_cycle` per target; README "How changes
flow") runs b-f over the entities the change feed names: the changes merged into the last
snapshot (`daemon.incremental.merge`), the desired state and links sliced to what they touch
(`slice_to`), removals counted against `max_deletes` over a rolling window (meta
`change_removals.<target>`), `cycle.kind = "incremental"`. That step is `reconcile`, and
`provisiond sync-user` / `sync-group` (daemon/ondemand.py) run it too, over one user or one
group (`Reconcile` says what differs: links, slice, approvals). Every apply claims each entity
in SQLite before its first write (`Store.mark_in_flight`), so that two processes (the daemon
and a sync-user) never have two writes in flight to one entity.

`_target_cycle` is 3a-3f on one screen; the steps take the desired state, links and plan as
arguments, so a cycle over a subset of entities can call them in the same order. A target that
fails (auth, mostly transient failures, unreachable) is quarantined with a growing back-off;
the other targets carry on.
"""

from __future__ import annotations

import functools
import gc
import json
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import anyio

from daemon import approvals, refusals
from daemon.applier import APPLIED, BUSY, FAILED, Applier, ApplyResult, Observer, TargetUnhealthy
from daemon.backoff import RetryPolicy
from daemon.config import Config, GroupRef, TargetConfig
from daemon.errors import Forbidden, NotFound, RemoteError, TransientError, Unauthorized
from daemon.incremental import (
    INCREMENTAL_KIND,
    Increment,
    NameIndex,
    desire_slice,
    merge,
    own_copy,
    removal_window,
    repinned,
    slice_to,
)
from daemon.links import GROUP_LIMIT, HELD, PENDING, REMOVALS_HELD, Actual, GroupLink, Op, Plan, UserLink
from daemon.mapping import (
    Desired,
    GroupSelector,
    MappingCache,
    Rules,
    cache_user,
    desired_state,
    resolve_pins,
    username_key,
)
from daemon.model import JSON, UNCHANGED, Members, Snapshot, shared
from daemon.pingone_filter import GROUP_RULE_DIALECT, compile_filter
from daemon.planner import Policy, in_sync, plan
from daemon.ratelimit import RateGovernor
from daemon.source.changes import Reads
from daemon.source.pingone import PingOneClient
from daemon.source.snapshot import UserHook, take_snapshot
from daemon.store import CYCLE_KIND, MalformedRow, Store, StoreError
from daemon.target.auth import auth_from
from daemon.target.profiles import profile_for
from daemon.target.resource import read_active, read_user
from daemon.target.scim import ScimClient

QUARANTINE_BASE = 60.0
QUARANTINE_CAP = 3600.0
RECOVERY_LOG_EVERY = 5.0      # seconds between two `recovery.progress` lines
META_LAST_GOOD_USERS = "source.last_good_users"
META_ACCEPT_SHRINK = approvals.META_ACCEPT_SHRINK
# Bumped by another process that writes a target's links (`provisiond sync-user`), so that a
# running daemon drops its in-memory copy: "links.generation.<target>".
META_LINKS_GENERATION = "links.generation"
# Set by `provisiond approve --reload`: the running daemon activates its staged config.
META_RELOAD_APPROVED = approvals.META_RELOAD_APPROVED
# Set by `provisiond resync` ("resync.requested.<target>" = a fresh token): the next cycle of that
# target is a full sync; the token is cleared once the target has been read whole.
META_RESYNC = approvals.META_RESYNC
# What `status` and the daemon's health read about PingOne (written by every cycle's snapshot):
# when the last complete snapshot ended, and since when (and why) the source has been failing.
META_SOURCE_LAST_COMPLETE = "source.last_complete"
META_SOURCE_FAILING_SINCE = "source.failing_since"
META_SOURCE_ERROR = "source.error"
# A target cycle that applied everything it planned from an incomplete snapshot: not a success,
# since what PingOne could not say (removals, users on unread pages) was not done.
SOURCE_INCOMPLETE = "source_incomplete"
# Removals applied by incremental cycles, per target ("change_removals.<target>": JSON
# [[epoch, count], ...]): a burst of deletions arriving as events meets `max_deletes` over
# this window as one seen in a snapshot does.
META_CHANGE_REMOVALS = "change_removals"
DEFAULT_REMOVAL_WINDOW = 3600.0
# An entity another process holds (`busy`): how long a reconcile step waits for it before it plans
# it again from the current state, and how often it looks (one indexed query per entity).
DEFAULT_BUSY_WAIT = 10.0
PLANNED = "planned"          # the outcome of a plan-only `reconcile` (`Reconcile.plan_only`): nothing applied
BUSY_POLL = 0.1
_MEMBER_OF_RE = re.compile(r'memberOfGroups\[\s*id\s+eq\s+"([^"]+)"\s*\]', re.IGNORECASE)

ProgressHook = Callable[[str, int, int], None]


class SourceUnavailable(Exception):
    """PingOne could not be read at all (or refused our credentials)."""


@dataclass
class Quarantine:
    until: float = 0.0
    backoff: float = 0.0
    reason: str | None = None

    def active(self, now: float) -> bool:
        return self.reason is not None and now < self.until


@dataclass
class TargetRuntime:
    """What lives across cycles for one target: its client, limits and health."""

    config: TargetConfig
    rules: Rules
    client: ScimClient
    governor: RateGovernor
    limiter: anyio.CapacityLimiter
    quarantine: Quarantine = field(default_factory=Quarantine)
    unmanaged: int | None = None          # target users provisiond does not manage (last full sync)
    mapped: MappingCache = field(default_factory=dict)   # valid for these rules only
    links: Actual | None = None           # the store's links as of the end of the last cycle
    links_generation: str | None = None   # META_LINKS_GENERATION as of `links`
    links_loaded_at: float | None = None  # when `links` were read from SQLite: the claims' `since`
    reported: dict[str, str] = field(default_factory=dict)   # skips logged at info last cycle


@dataclass
class TargetReport:
    target: str
    cycle_id: int | None
    outcome: str
    full_sync: bool = False
    plan_counts: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    failed: int = 0
    busy: int = 0          # entities left `skipped`/`busy`: another process held them (`reconcile`)


@dataclass(frozen=True, slots=True)
class CycleContext:
    """One target's cycle under way: what its steps after the first share."""

    rt: TargetRuntime
    cycle_id: int
    full: bool             # a full sync: the target is read whole
    complete: bool         # the gate's answer: removals may be planned from this snapshot
    log: Any               # bound to the target and the cycle
    started: float
    source_complete: bool = True   # PingOne was read whole (else the outcome is SOURCE_INCOMPLETE)
    approval: approvals.Approval | None = None   # the approval the plan honoured (consumed at the end)
    kind: str = CYCLE_KIND         # or "incremental", "sync-user", "sync-group" (`reconcile`)
    summary: Mapping[str, Any] = field(default_factory=dict)   # more keys for the cycle's summary


@dataclass(frozen=True)
class Reconcile:
    """How `Engine.reconcile` runs over a set of entities: what differs between the incremental
    cycle, `sync-user` and `sync-group` (the steps are the same)."""

    kind: str                          # cycle.kind: incremental | sync-user | sync-group
    recover: bool = True               # resolve an interrupted cycle's operations first (the daemon)
    approvals: bool = False            # honour (and consume) an approval of a held plan (sync-user)
    complete: bool | None = None       # may removals be planned; None: as the last full snapshot said
    announce: bool = False             # another process than the daemon: bump links.generation
    busy_wait: float = DEFAULT_BUSY_WAIT
    # The links to plan against (default: the daemon's, `known_links`); sync-user reads its few.
    links: Callable[[Desired], Awaitable[Actual]] | None = None
    # The slice (default: `slice_to` the increment's users and groups); sync-group's keeps one group.
    slice: Callable[[Desired, Actual], tuple[Desired, Actual]] | None = None
    on_plan: Callable[[Desired, Plan], None] | None = None   # sees (and may trim) each plan before it is saved
    summary: Mapping[str, Any] = field(default_factory=dict)   # more keys for the cycle's summary
    # Stop after the first plan (`why`'s prediction): no cycle row, no plan rows, no claim, no
    # recovery, no pins or links written, nothing sent or logged; `Reconciled.ops` is the plan.
    plan_only: bool = False


@dataclass
class Reconciled:
    """What one `reconcile` did for one target."""

    report: TargetReport
    cycle_id: int | None = None
    ops: list[Op] = field(default_factory=list)          # every round's plan (seqs unique)
    statuses: dict[int, str] = field(default_factory=dict)   # seq -> applied | failed | skipped
    desired: Desired | None = None                      # the slice planned
    busy: int = 0
    approval: approvals.Approval | None = None
    approval_used: str | None = None                    # consumed | kept | None
    error: str | None = None


@dataclass
class Rounds:
    """What a target's apply rounds (`Engine._apply_rounds`) did so far: the plans merged (seqs
    unique), their outcomes, the slice first planned, the links after the last apply and the
    entities still `busy` (another process held them) after the last."""

    merged: Plan
    result: ApplyResult
    part: Desired | None = None
    after: Actual = field(default_factory=lambda: Actual({}, {}))
    left_busy: AbstractSet[tuple[str, str]] = frozenset()

    @property
    def busy(self) -> int:
        return len(self.left_busy)


def busy_entities(the_plan: Plan, result: ApplyResult) -> set[tuple[str, str]]:
    """The (kind, source id) of every entity an operation of *the_plan* was skipped `busy` for."""
    return {(op.kind, op.source_id) for op in the_plan.ops
            if (o := result.outcomes.get(op.seq)) is not None and o.skip_reason == BUSY}


def hold_unreleased(the_plan: Plan, user_id: str, released: frozenset[str]) -> None:
    """The target's latest plan held this user's removal: hold it here too unless `released`
    (an approval of a plan that held it) releases it, with the member removals, as the planner
    holds them."""
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


@dataclass
class CycleReport:
    started: float
    finished: float = 0.0
    snapshot_users: int = 0
    snapshot_complete: bool = True
    targets: list[TargetReport] = field(default_factory=list)
    source_error: str | None = None        # PingOne could not be read at all
    source_incomplete: str | None = None   # it was read, but not all of it: the first problems

    @property
    def source_problem(self) -> str | None:
        """Why this cycle's snapshot is not a complete picture of PingOne, or None."""
        if self.source_error is not None:
            return self.source_error
        if self.source_incomplete is not None:
            return f"snapshot incomplete: {self.source_incomplete}"
        return None

    @property
    def failed(self) -> bool:
        return self.source_problem is not None or any(
            t.failed or t.outcome in ("failed", "quarantined") for t in self.targets)

    @property
    def outcome(self) -> str:
        """One word for the whole cycle: `source_failed`, `source_incomplete`, `failed` (some
        target failed or is quarantined), `partial_failure` (some entities failed) or `success`."""
        if self.source_error is not None:
            return "source_failed"
        if self.source_incomplete is not None:
            return SOURCE_INCOMPLETE
        if any(t.outcome in ("failed", "quarantined", "aborted") for t in self.targets):
            return "failed"
        if any(t.failed or t.outcome == "partial_failure" for t in self.targets):
            return "partial_failure"
        return "success"


def rules_for(target: TargetConfig) -> Rules:
    def selector(ref: GroupRef) -> GroupSelector:
        rule = compile_filter(ref.filter, GROUP_RULE_DIALECT) if ref.filter is not None else None
        return GroupSelector(name=ref.name, id=ref.id, prefix=ref.prefix, rule=rule)

    return Rules.compile(
        target.mapping,
        scope_groups=tuple(selector(g) for g in target.scope.groups),
        scope_filter=target.scope.filter,
        groups=tuple(selector(g) for g in target.groups),
        transitive=target.membership == "transitive",
        require_email_username=target.require_email_username,
        create_only=frozenset(path for path, _ in target.mapping if path.lower() in target.create_only),
    )


def build_runtime(target: TargetConfig, session: aiohttp.ClientSession) -> TargetRuntime:
    def reveal(secret: Any) -> str | None:
        return secret.reveal() if secret is not None else None

    auth = auth_from(target.auth, token=reveal(target.token), username=target.username,
                     password=reveal(target.password), token_url=target.token_url,
                     client_id=target.client_id, client_secret=reveal(target.client_secret))
    profile = profile_for(target.profile, active_false_deletes=target.active_false_deletes,
                          page_size=target.page_size, membership_batch=target.membership_batch,
                          **profile_overrides(target))
    governor = RateGovernor(target.requests_per_second, target.burst)
    client = ScimClient(
        session, target.base_url, auth, profile=profile, governor=governor,
        policy=RetryPolicy(), timeout=target.timeout, match_filter=target.match_filter,
        group_match_filter=target.group_match_filter, page_size=target.page_size,
        membership_batch=target.membership_batch, update_method=target.update_method)
    return TargetRuntime(target, rules_for(target), client, governor, anyio.CapacityLimiter(target.concurrency))


def profile_overrides(target: TargetConfig) -> dict[str, Any]:
    """The profile knobs the target's config sets (`username_mutable`, `max_groups_per_user`)."""
    out: dict[str, Any] = {}
    if target.username_mutable is not None:
        out["username_mutable"] = target.username_mutable
    if target.max_groups_per_user is not None:
        out["max_groups_per_user"] = target.max_groups_per_user
    return out


def source_client(config: Config, session: aiohttp.ClientSession, log: Any = None) -> PingOneClient:
    src = config.source
    return PingOneClient(
        session, api_url=src.api_url, auth_url=src.auth_url, environment_id=src.environment_id,
        client_id=src.client_id, client_secret=src.client_secret.reveal(), client_auth=src.client_auth,
        page_size=src.page_size, timeout=src.timeout, log=log)


def group_rules(rules: Iterable[Rules]) -> list[Callable[[JSON], bool]]:
    """The group rules (prefix, filter) of these targets' `groups` and `scope.groups`: the
    snapshot reads the members of every PingOne group one of them matches."""
    return [selector.matches for r in rules for selector in (*r.scope_groups, *r.groups) if selector.is_rule]


def snapshot_needs(targets: Sequence[TargetConfig]) -> tuple[set[str], set[str], bool]:
    names: set[str] = set()
    ids: set[str] = set()
    transitive = False
    for t in targets:
        for ref in (*t.groups, *t.scope.groups):
            if ref.id is not None:
                ids.add(ref.id)
            elif ref.name is not None:
                names.add(ref.name)
        if t.scope.filter:
            ids.update(_MEMBER_OF_RE.findall(t.scope.filter))
        transitive = transitive or t.membership == "transitive"
    return names, ids, transitive


_gc_pauses = 0


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a cycle builds 100,000s of acyclic dicts.

    Each collection would traverse every object the snapshot and the caches hold, again and
    again as they grow (half of a 100k no-op cycle's CPU); what is built here is freed by
    reference counting. Response bodies are read without being kept on the response object
    (`daemon.responses.read_body`), so the few cycles HTTP leaves behind are small until the
    collector returns. Nested and concurrent pauses (targets plan side by side) are counted;
    the last one re-enables it. Applies run with it on.
    """
    global _gc_pauses
    if _gc_pauses == 0 and not gc.isenabled():
        yield                      # someone else turned it off: leave it alone
        return
    _gc_pauses += 1
    gc.disable()
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0:
            gc.enable()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim     # the process's own libc, no library search
    except Exception:      # not glibc (musl, macOS), or ctypes refused to load: nothing to hand back
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`); True if any were.

    A cycle parses ~2.6 GB of PingOne JSON at 1,000,000 users; the page buffers and the
    per-cycle maps are freed, but glibc keeps the pages they used until something trims them:
    called after the snapshot is saved and after each cycle (20-40 MB at 200,000 users). ctypes
    is imported on first use, and any failure to load it only means nothing is trimmed.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def share_member_sets(desired: Desired, actual: Actual) -> None:
    """A desired group whose members equal its link's takes the link's set: the links live from
    cycle to cycle, so an unchanged group is then one set in memory, not a new copy per cycle."""
    for gid, want in desired.groups.items():
        link = actual.groups.get(gid)
        if link is not None and (members := shared(want.members, link.members)) is not want.members:
            desired.groups[gid] = replace(want, members=members)


def share_with_desired(users: dict[str, UserLink], groups: dict[str, GroupLink], desired: Desired) -> None:
    """Links kept for the next cycle share the mapped attributes' dicts and the member sets where
    equal: at 100k users a second copy of every user's attributes is ~70 MB. Walks the smaller
    side (an incremental cycle's desired state holds a few users, its links all of them)."""
    ids: Iterable[str] = (users.keys() if len(users) <= len(desired.users)
                          else [sid for sid in desired.users if sid in users])
    for sid in ids:
        link = users[sid]
        want = desired.users.get(sid)
        if want is not None and (attrs := shared(link.attrs, want.attrs)) is not link.attrs:
            users[sid] = replace(link, attrs=attrs)
    for gid, glink in groups.items():
        wanted = desired.groups.get(gid)
        if wanted is not None and (members := shared(glink.members, wanted.members)) is not glink.members:
            groups[gid] = replace(glink, members=members)


def source_updated(snapshot: Snapshot, ops: Sequence[Op]) -> dict[str, str]:
    """PingOne's `updatedAt` of the users these operations touch (for the propagation latency in
    their events), where the snapshot holds their JSON: an unchanged user's was not held, and
    its record did not change."""
    out: dict[str, str] = {}
    for op in ops:
        if op.kind == "user":
            value = snapshot.users.get(op.source_id, UNCHANGED).get("updatedAt")
            if isinstance(value, str):
                out[op.source_id] = value
    return out


class Engine:
    """Runs cycles for every configured target against one state file."""

    def __init__(self, config: Config, store: Store, session: aiohttp.ClientSession, *, log: Any) -> None:
        self.store = store
        self.session = session
        self.log = log
        self.config = config
        self.runtimes: dict[str, TargetRuntime] = {}
        self.source = source_client(config, session, log)
        self.progress: ProgressHook | None = None
        # Told (target, done, total) as a recovery looks up what an interrupted cycle sent.
        self.recovery: ProgressHook | None = None
        # Called with every entity event of an apply and with `cycle.finished` (metrics, health).
        self.observers: list[Observer] = []
        # Called after every HTTP attempt to a target: (target, method, status or None, seconds).
        self.request_observers: list[Callable[[str, str, int | None, float], None]] = []
        self.quarantine_base = QUARANTINE_BASE
        # Targets whose next cycle reads the target whole whatever `full_sync_every` says (`once --full`).
        self.full_sync_now: set[str] = set()
        self._resync_tokens: dict[str, str | None] = {}
        self._last_members: dict[str, AbstractSet[str]] = {}    # the last cycle's snapshot.members
        # A mapping cache (some target's) whose every entry's hash is the one `source_user` holds:
        # set once a snapshot has been saved, cleared while one is being taken.
        self._stored_cache: MappingCache | None = None
        # The last snapshot, with the changes since merged in: the base of the incremental cycle.
        # Kept only when `keep_snapshot` (the service, with a change feed); dropped when a target's
        # rules change (its mapping cache no longer covers the users held as `UNCHANGED`).
        self.keep_snapshot = False
        self.last_snapshot: Snapshot | None = None
        self.last_complete = False
        self.removal_window = DEFAULT_REMOVAL_WINDOW
        self.busy_wait = DEFAULT_BUSY_WAIT     # an incremental cycle's wait for an entity another process holds
        # The incremental path's own copy of the last snapshot (changed in place by every poll, read
        # by no full cycle), the users each target has not mapped since they were merged, and each
        # target's userName index (`NameIndex`) with the `_cache_epoch` it was built at: odd while
        # a snapshot fills the mapping caches.
        self._owned: Snapshot | None = None
        self._stale: dict[str, set[str]] = {}
        self._name_index: dict[str, tuple[int, NameIndex]] = {}
        self._cache_epoch = 0
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Adopt a new config from the next cycle on; live limits are resized in place."""
        old = self.runtimes
        self.runtimes = {}
        for target in config.targets:
            previous = old.get(target.name)
            if previous is not None and previous.config == target:
                self.runtimes[target.name] = previous
                continue
            runtime = build_runtime(target, self.session)
            runtime.client.on_request = self._request_hook(target.name)
            self.last_snapshot = None       # its UNCHANGED users are not in this runtime's cache
            self._owned = None
            if previous is not None:
                runtime.quarantine = previous.quarantine
            self.runtimes[target.name] = runtime
        if config.source != self.config.source:
            self.source = source_client(config, self.session, self.log)
        self.config = config

    # -- the cycle ------------------------------------------------------------------------

    async def snapshot(self, on_user: UserHook | None = None,
                       previous_members: dict[str, AbstractSet[str]] | None = None,
                       canonical: Callable[[str], str] = sys.intern) -> Snapshot:
        names, ids, transitive = snapshot_needs(self.config.targets)
        # Groups already resolved are fetched by id too: one renamed in PingOne no longer answers
        # to its configured name, and its members must still be read (else everyone would
        # seem to leave scope).
        for target in self.config.targets:
            ids.update((await self.pins(target.name)).values())
        keep: set[str] | None = set()
        for rt in self.runtimes.values():
            keys = rt.rules.source_keys()
            keep = None if keys is None or keep is None else keep | keys
        try:
            return await take_snapshot(self.source, group_names=names, group_ids=ids, transitive=transitive,
                                       group_rules=group_rules(rt.rules for rt in self.runtimes.values()),
                                       log=self.log, keep=keep, on_user=on_user,
                                       previous_members=previous_members, canonical=canonical)
        except RemoteError as exc:
            raise SourceUnavailable(str(exc)) from exc

    async def _streaming_hook(self) -> UserHook:
        """Map every user into every target's cache as its page arrives, and let the snapshot
        drop the JSON of a user that the state file already holds as it is (`UNCHANGED`): a
        no-op cycle then holds no user JSON at all, only hashes and the mapped attributes.

        What the state file holds is known from a cache that was filled by a snapshot since
        saved; only before there is one (the first cycle, or after a failed snapshot) are the
        stored hashes read, and dropped again with the hook."""
        caches = [(rt.mapped, rt.rules) for rt in self.runtimes.values()]
        known = self._stored_cache
        if known is not None and not any(known is cache for cache, _ in caches):
            known = None       # its target was reconfigured away
        stored = await self.store.source_hashes() if known is None else None
        # The hook updates the caches: until the snapshot it serves is saved, they may hold hashes
        # that the state file does not.
        self._stored_cache = None

        def on_user(user_id: str, user: JSON, digest: int) -> bool:
            if known is not None:
                hit = known.get(user_id)     # read before this page updates it
                droppable = hit is not None and hit.digest == digest
            else:
                droppable = stored is not None and stored.get(user_id) == digest
            for cache, rules in caches:
                if not cache_user(cache, rules, user_id, user, digest):
                    droppable = False
            return droppable

        return on_user

    def _first_cache(self) -> MappingCache | None:
        """Some target's mapping cache: after a snapshot, every target's holds every user."""
        return next((rt.mapped for rt in self.runtimes.values()), None)

    def _canonical_ids(self) -> Callable[[str], str]:
        """The string object to hold for a user id: the one a mapping cache holds it by (as its
        `source_id`), else the first seen this cycle. Not `sys.intern`: the interpreter's table
        would keep an entry per user (~40 MB at 1,000,000) for what the caches already index."""
        known = self._first_cache()
        fresh: dict[str, str] = {}

        def canonical(uid: str) -> str:
            hit = known.get(uid) if known is not None else None
            return hit.source_id if hit is not None else fresh.setdefault(uid, uid)

        return canonical

    def _forget_gone_users(self, snapshot: Snapshot) -> None:
        """Drop the mapping-cache entries of users no longer in PingOne (a complete snapshot says
        so): without this the caches would grow with every user ever deleted."""
        present = snapshot.users
        for rt in self.runtimes.values():
            gone = [uid for uid in rt.mapped if uid not in present]
            for uid in gone:
                del rt.mapped[uid]

    async def pins(self, target: str) -> dict[str, str]:
        stored = await self.store.get_meta(f"group_pins.{target}")
        return dict(json.loads(stored)) if stored else {}

    async def gate(self, snapshot: Snapshot) -> bool:
        """May removals be planned from this snapshot? Logs why not."""
        if not snapshot.complete:
            self.log.warning("snapshot.incomplete", user_count=len(snapshot.users), problems=snapshot.problems[:10],
                             problem_count=len(snapshot.problems))
            return False
        last = await self.store.get_meta(META_LAST_GOOD_USERS)
        accept = await self.store.get_meta(META_ACCEPT_SHRINK)
        count = len(snapshot.users)
        if last is not None and not approvals.shrink_accepted(accept, count):
            previous = int(last)
            floor = previous * (1.0 - self.config.daemon.max_source_shrink)
            if previous > 0 and count < floor:
                self.log.warning("snapshot.shrunk", user_count=count, last_good_users=previous,
                                 shrink_pct=round(100.0 * (previous - count) / previous, 1),
                                 max_source_shrink_pct=round(100 * self.config.daemon.max_source_shrink, 1),
                                 hint="provisiond approve --source-shrink accepts it")
                await approvals.record_shrunk(self.store, count, previous)
                return False
        await self.store.set_meta(META_LAST_GOOD_USERS, str(count))
        await approvals.clear_shrunk(self.store)
        if accept is not None:
            await self.store.set_meta(META_ACCEPT_SHRINK, "0")
        return True

    async def cycle(self, *, targets: Sequence[str] | None = None) -> CycleReport:
        """One cycle, every target joined (`once`, tests); `run` schedules the two halves itself:
        `source_step`, then each target's `target_cycle` on its own."""
        report = CycleReport(started=time.time())
        self.log.info("cycle.started", targets=[t for t in self.runtimes if targets is None or t in targets])
        taken = await self.source_step(report)                            # 1, 2
        if taken is None:
            return report
        snapshot, complete = taken
        chosen = [rt for name, rt in self.runtimes.items() if targets is None or name in targets]
        report.targets = await self.run_targets(chosen, snapshot, complete)   # 3
        report.finished = time.time()
        release_free_memory()
        return report

    async def cycle_snapshot(self) -> Snapshot:
        """Step 1 as a cycle takes it: users mapped into the caches as their pages arrive, the
        JSON of users the state file holds as they are dropped, ids made canonical."""
        self._cache_epoch += 1          # the caches change under any userName index built before
        try:
            with gc_paused():
                snapshot = await self.snapshot(await self._streaming_hook(), self._last_members,
                                               self._canonical_ids())
                self._last_members = snapshot.members
        finally:
            self._cache_epoch += 1
        return snapshot

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Step 1's end: the snapshot to SQLite; the caches forget users PingOne no longer has."""
        await self.store.save_snapshot(snapshot, snapshot.hashes)
        if snapshot.complete:
            self._forget_gone_users(snapshot)
        self._stored_cache = self._first_cache()
        release_free_memory()

    async def run_targets(self, chosen: Sequence[TargetRuntime], snapshot: Snapshot,
                          complete: bool) -> list[TargetReport]:
        """Step 3: every chosen target's cycle, concurrently; their reports in `chosen`'s order."""
        results: dict[str, TargetReport] = {}

        async def run(rt: TargetRuntime) -> None:
            results[rt.config.name] = await self.target_cycle(rt, snapshot, complete)

        async with anyio.create_task_group() as tg:
            for rt in chosen:
                tg.start_soon(run, rt)
        return [results[rt.config.name] for rt in chosen]

    async def source_step(self, report: CycleReport) -> tuple[Snapshot, bool] | None:
        """Snapshot PingOne, gate it and save it; (snapshot, removals allowed), or None when
        PingOne could not be read at all. `report` gets the source's problems."""
        try:
            snapshot = await self.cycle_snapshot()                        # 1
        except SourceUnavailable as exc:
            report.source_error = str(exc)
            report.finished = time.time()
            self.log.error("snapshot.failed", error=str(exc))
            await self.record_source(report)
            return None
        complete = await self.gate(snapshot)                              # 2
        if not snapshot.complete:
            shown = "; ".join(snapshot.problems[:3])
            more = len(snapshot.problems) - 3
            report.source_incomplete = shown + (f" (and {more} more)" if more > 0 else "")
        await self.record_source(report)
        await self.save_snapshot(snapshot)
        if self.keep_snapshot:
            self.last_snapshot, self.last_complete = snapshot, complete
            self._owned = None          # the last merged copy is not kept beside the new snapshot
        report.snapshot_users = len(snapshot.users)
        report.snapshot_complete = complete
        self.log.info("snapshot.taken", user_count=len(snapshot.users), group_count=len(snapshot.groups),
                      complete=complete, duration_ms=round((snapshot.finished_at - snapshot.started_at) * 1000))
        return snapshot, complete

    async def record_source(self, report: CycleReport) -> None:
        """Write what `status` says about PingOne: the last complete snapshot, or since when and
        why it has been failing (kept from the first failing cycle until a complete one)."""
        problem = report.source_problem
        if problem is None:
            await self.store.set_meta(META_SOURCE_LAST_COMPLETE, repr(report.finished or time.time()))
            await self.store.delete_meta(META_SOURCE_FAILING_SINCE, META_SOURCE_ERROR)
            return
        if await self.store.get_meta(META_SOURCE_FAILING_SINCE) is None:
            await self.store.set_meta(META_SOURCE_FAILING_SINCE, repr(report.started))
        await self.store.set_meta(META_SOURCE_ERROR, problem[:500])

    async def preview(self) -> tuple[dict[str, Plan], bool]:
        """Snapshot and plan every target from what SQLite knows; write nothing, send nothing."""
        snapshot = await self.snapshot()
        complete = snapshot.complete
        last = await self.store.get_meta(META_LAST_GOOD_USERS)
        if complete and last is not None and int(last) > 0:
            complete = len(snapshot.users) >= int(last) * (1.0 - self.config.daemon.max_source_shrink)
        plans: dict[str, Plan] = {}
        for name, rt in self.runtimes.items():
            pins = resolve_pins(snapshot, rt.rules, await self.pins(name))
            desired = desired_state(snapshot, rt.rules, pins)
            actual = await self.store.load_links(name)
            plans[name] = await self.make_plan(rt, desired, actual, complete,
                                               approval=await approvals.in_effect(self.store, name))
        return plans, complete

    async def preview_reload(self, config: Config) -> dict[str, dict[str, Any]]:
        """What `config` would remove, per target, planned against the last stored snapshot.

        A target whose removals exceed its `max_deletes` under the new config is `held`: the
        daemon keeps the new config staged until `provisiond approve --reload`.
        """
        snapshot = await self.store.load_snapshot()
        impact: dict[str, dict[str, Any]] = {}
        if not snapshot.users:
            return impact
        for target in config.targets:
            rules = rules_for(target)
            desired = desired_state(snapshot, rules, resolve_pins(snapshot, rules, await self.pins(target.name)))
            actual = await self.store.load_links(target.name)
            limit = target.max_deletes.limit(len(actual.users))
            policy = Policy(
                create=target.actions.create, update=target.actions.update, disable=target.actions.disable,
                deprovision=target.actions.deprovision, remove_action=target.remove_action,
                delete_after=target.delete_after, group_membership=target.group_membership, max_deletes=None)
            preview = plan(desired, actual, policy, complete=True, now=time.time())
            removals = sum(1 for op in preview.ops if op.is_removal and op.status == PENDING)
            impact[target.name] = {"removals": removals, "limit": limit, "held": removals > limit,
                                   "operations": len(preview.pending())}
        return impact

    async def target_cycle(self, rt: TargetRuntime, snapshot: Snapshot, complete: bool) -> TargetReport:
        name = rt.config.name
        log = self.log.bind(target=name)
        now = time.time()
        if rt.quarantine.active(now):
            log.info("target.skipped", reason="quarantined", quarantine_reason=rt.quarantine.reason,
                     retry_in_s=round(rt.quarantine.until - now))
            return TargetReport(name, None, "quarantined")
        full = await self._full_sync_due(rt)
        cycle_id = await self.store.start_cycle(name, full_sync=full)
        log = log.bind(cycle=cycle_id)
        try:
            report = await self._target_cycle(rt, snapshot, complete, cycle_id, full, log)
        except (Unauthorized, Forbidden, TransientError, TargetUnhealthy) as exc:
            reason = exc.reason if isinstance(exc, TargetUnhealthy) else (
                "auth_failed" if isinstance(exc, Unauthorized | Forbidden) else "unreachable")
            self._quarantine(rt, reason, str(exc), log)
            await self.store.finish_cycle(cycle_id, "quarantined", {"reason": reason, "error": str(exc)})
            log.warning("cycle.finished", outcome="quarantined", reason=reason)
            self._notify("cycle.finished", {"target": name, "outcome": "quarantined", "reason": reason,
                                            "started": now, "finished": time.time()})
            return TargetReport(name, cycle_id, "quarantined", full)
        except StoreError:
            raise                  # the state file is fatal for every target
        except Exception as exc:   # a malformed answer or a defect: this target's cycle fails, not the others'
            reason = exc.reason if isinstance(exc, RemoteError) else "internal_error"
            error = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
            await self.store.finish_cycle(cycle_id, "failed", {"reason": reason, "error": error[:500]})
            log.error("cycle.finished", outcome="failed", reason=reason, error=error,
                      exc_info=not isinstance(exc, RemoteError))
            self._notify("cycle.finished", {"target": name, "outcome": "failed", "reason": reason,
                                            "started": now, "finished": time.time()})
            return TargetReport(name, cycle_id, "failed", full)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.finish_cycle(cycle_id, "aborted", {})
            raise
        if rt.quarantine.reason is not None and report.outcome != "quarantined":
            log.info("target.recovered", after_reason=rt.quarantine.reason)
            rt.quarantine = Quarantine()
        return report

    def _request_hook(self, target: str) -> Callable[[str, int | None, float], None]:
        def hook(method: str, status: int | None, seconds: float) -> None:
            for observer in self.request_observers:
                observer(target, method, status, seconds)
        return hook

    def _notify(self, event: str, fields: dict[str, Any]) -> None:
        for observer in self.observers:
            observer(event, fields)

    def _quarantine(self, rt: TargetRuntime, reason: str, detail: str, log: Any) -> None:
        q = rt.quarantine
        first = q.reason is None
        q.backoff = min(QUARANTINE_CAP, self.quarantine_base if first else q.backoff * 2)
        q.until = time.time() + q.backoff
        q.reason = reason
        if first:
            log.error("target.quarantined", reason=reason, error=detail, retry_in_s=q.backoff)
        else:
            log.warning("target.still_quarantined", reason=reason, error=detail, retry_in_s=q.backoff)

    async def _full_sync_due(self, rt: TargetRuntime) -> bool:
        if await self._resync_requested(rt):
            return True
        last = await self.store.last_full_sync(rt.config.name)
        every = rt.config.full_sync_every or self.config.daemon.full_sync_every
        return last is None or time.time() - last >= every

    async def _resync_requested(self, rt: TargetRuntime) -> bool:
        """A full sync asked for: `once --full` (`full_sync_now`) or `provisiond resync` (the state file)."""
        name = rt.config.name
        token = await self.store.get_meta(f"{META_RESYNC}.{name}")
        self._resync_tokens[name] = token or None
        return name in self.full_sync_now or bool(token)

    async def _resync_done(self, rt: TargetRuntime, log: Any) -> None:
        """The target was read whole: a resync request seen at the cycle's start is answered (one
        made while the target was being read stays, for the next cycle)."""
        name = rt.config.name
        self.full_sync_now.discard(name)
        token = self._resync_tokens.pop(name, None)
        if token is not None and await self.store.get_meta(f"{META_RESYNC}.{name}") == token:
            await self.store.set_meta(f"{META_RESYNC}.{name}", "")
            log.info("target.resynced", reason="resync_requested")

    async def _target_cycle(self, rt: TargetRuntime, snapshot: Snapshot, complete: bool, cycle_id: int,
                            full: bool, log: Any) -> TargetReport:
        """Steps 3a-3f for one target; `target_cycle` wraps them in quarantine and failure handling."""
        cx = CycleContext(rt, cycle_id, full, complete, log, time.time(), snapshot.complete,
                          approval=await approvals.in_effect(self.store, rt.config.name))
        await self.recover(rt, log)                                               # a
        desired = await self.desire(rt, snapshot)                                 # b
        actual = await self.known_links(rt, desired, log)                         # c
        if full:
            actual = await self.refresh_actual(rt, actual, desired, log)
            await self._resync_done(rt, log)
        the_plan = await self.plan_cycle(cx, desired, actual)                     # d
        self.report_plan(cx, desired, the_plan)
        result, after = await self.apply_plan(cx, snapshot, desired, actual, the_plan)   # e
        rounds = await self._busy_rounds(cx, snapshot, desired, the_plan, result, after)
        return await self.finish(cx, desired, rounds.after, the_plan, result, busy=rounds.left_busy)   # f

    async def desire(self, rt: TargetRuntime, snapshot: Snapshot, *, keep_pins: bool = True) -> Desired:
        """Step b: what the target should hold (mapping, pure); the group pins it resolved are kept
        (unless not *keep_pins*: a plan-only reconcile writes nothing)."""
        name = rt.config.name
        old_pins = await self.pins(name)
        pins = resolve_pins(snapshot, rt.rules, old_pins)
        if pins != old_pins and keep_pins:
            await self.store.set_meta(f"group_pins.{name}", json.dumps(pins, sort_keys=True))
        with gc_paused():
            return desired_state(snapshot, rt.rules, pins, hashes=snapshot.hashes, cache=rt.mapped)

    async def known_links(self, rt: TargetRuntime, desired: Desired, log: Any) -> Actual:
        """Step c: the links as the last cycle left them in memory, unless another process has
        written this target's links since (then SQLite's, a malformed row contained to its
        entity: `load_links`); unchanged groups share one member set."""
        name = rt.config.name
        generation = await self.store.get_meta(f"{META_LINKS_GENERATION}.{name}")
        cached = rt.links if rt.links is not None and generation == rt.links_generation else None
        if cached is None:
            rt.links_loaded_at = time.time()
        actual = cached if cached is not None else await self.load_links(rt, desired, log)
        share_member_sets(desired, actual)
        rt.links = None   # until this cycle ends well, the store is the only truth
        rt.links_generation = generation
        return actual

    async def plan_cycle(self, cx: CycleContext, desired: Desired, actual: Actual) -> Plan:
        """Step d: the plan (planner, pure), saved before anything is sent."""
        with gc_paused():
            the_plan = await self.make_plan(cx.rt, desired, actual, cx.complete, approval=cx.approval)
        # Standing refusals (ZIA admin-linked deletes) are not sent again before a full sync.
        refusals.hold(the_plan, await refusals.load(self.store, cx.rt.config.name), full_sync=cx.full)
        await self.store.save_plan(cx.cycle_id, cx.rt.config.name, the_plan.ops)
        return the_plan

    def report_plan(self, cx: CycleContext, desired: Desired, the_plan: Plan) -> None:
        """Step d's log: what is skipped or held and why, then `cycle.apply_started`.

        A skip is logged at info when it starts (or its reason changes), at debug while it lasts:
        the journal says why once, not every cycle."""
        rt, log = cx.rt, cx.log
        reported: dict[str, str] = {}

        def report_skip(key: str, reason: str) -> Any:
            reported[key] = reason
            return log.info if rt.reported.get(key) != reason else log.debug

        for skip in desired.skipped.values():
            report_skip(f"user:{skip.source_id}", skip.reason)(
                "user.skipped", source_id=skip.source_id, user=skip.user_name, op="provision",
                outcome="skipped", reason=skip.reason, detail=skip.detail)
        for missing in desired.missing_groups:
            log.warning("group.not_found_in_source", group=missing)
        if the_plan.removals_held:
            log.warning("plan.removals_held", held=the_plan.removals_held, limit=the_plan.removals_limit,
                        hint=f"provisiond approve --target {rt.config.name}")
        if the_plan.removals_deferred:
            log.warning("plan.removals_deferred", deferred=the_plan.removals_deferred,
                        reason="snapshot_incomplete")
        pending = the_plan.pending()
        eta = self.eta(rt, len(pending))
        log.info("cycle.apply_started", operations=len(pending), planned=the_plan.counts(), eta_s=eta,
                 full_sync=cx.full)
        for op in the_plan.ops:
            if op.status != PENDING:
                report_skip(f"{op.kind}:{op.source_id}:{op.op}", op.skip_reason or "")(
                    f"{op.kind}.skipped", source_id=op.source_id, target_id=op.target_id,
                    **{("user" if op.kind == "user" else "group"): op.name}, op=op.op, outcome="skipped",
                    reason=op.skip_reason, planned_reason=op.reason)
        report_capped(the_plan, desired, report_skip)
        rt.reported = reported

    async def apply_plan(self, cx: CycleContext, snapshot: Snapshot, desired: Desired, actual: Actual,
                         the_plan: Plan, changed_at: Mapping[str, str] | None = None, *,
                         claim_since: float | None = None, in_place: bool = False) -> tuple[ApplyResult, Actual]:
        """Step e: send the plan's pending operations; the links after them are kept in memory
        for the next cycle, sharing the desired state's objects where equal. Each entity is
        claimed before its first write (`Store.mark_in_flight`): one another process holds, or
        wrote since the links were read (*claim_since*, default when they were loaded), is
        skipped `busy`."""
        rt, name = cx.rt, cx.rt.config.name
        pending = the_plan.pending()
        # The applier updates these in place; with nothing to apply, the links are reused as they
        # are rather than copied (1,000,000 entries).
        # *in_place*: *actual*'s own dicts, which no one else reads (`rt.links` is cleared until the
        # apply ends, and dropped if it does not end well): an incremental cycle's apply.
        keep = in_place or not pending
        users: dict[str, UserLink] = (actual.users if keep and isinstance(actual.users, dict)
                                      else dict(actual.users))
        groups: dict[str, GroupLink] = (actual.groups if keep and isinstance(actual.groups, dict)
                                        else dict(actual.groups))
        hook = self.progress
        applier = Applier(
            target=name, cycle_id=cx.cycle_id, client=rt.client, store=self.store, log=cx.log,
            limiter=rt.limiter, users=users, groups=groups, paths=rt.rules.paths,
            can_create=rt.config.actions.create, active_false_deletes=rt.config.active_false_deletes,
            progress=(lambda done, total: hook(name, done, total)) if hook is not None else None,
            observer=self._notify if self.observers else None,
            source_updated={**source_updated(snapshot, pending), **(changed_at or {})},
            claim_since=claim_since if claim_since is not None else rt.links_loaded_at)
        result = await applier.apply(the_plan.ops)
        share_with_desired(users, groups, desired)
        rt.links = Actual(users, groups)
        return result, rt.links

    async def finish(self, cx: CycleContext, desired: Desired, after: Actual, the_plan: Plan,
                     result: ApplyResult, *, busy: AbstractSet[tuple[str, str]] | None = None) -> TargetReport:
        """Step f: the summary and outcome to SQLite, `cycle.finished` to the log and observers.

        *busy*: the entities still skipped `busy` after the waits (default: every one an
        operation was skipped `busy` for). When there are any, the summary says how many per
        kind (`busy`: {"user": n, "group": n}) and `cycle.finished` their count (`busy`); a full
        cycle that would have succeeded is then a `partial_failure` (not everything was written:
        the target is retried on its back-off, /healthz says `degraded`)."""
        rt, name, log = cx.rt, cx.rt.config.name, cx.log
        if the_plan.approval is not None:
            # An approval releases held removals once: the one this plan read, not one given
            # while it was applying (that one is kept for the next cycle).
            await self.store.consume_approval(name, the_plan.approval)
        counts = result.counts()
        summary = self.summarize(desired, after, the_plan, result, snapshot_complete=cx.complete)
        summary["refused"] = await self._standing_refusals(rt, the_plan, result, after, desired)
        summary["group_limit"] = capped_counts(the_plan)
        if rt.unmanaged is None:
            known = await self.store.get_meta(f"unmanaged.{name}")
            rt.unmanaged = int(known) if known is not None else None
        summary["unmanaged_users"] = rt.unmanaged   # as of the last full sync
        if busy is None:
            busy = busy_entities(the_plan, result)
        if busy:
            kinds = sorted({kind for kind, _ in busy})
            summary["busy"] = {kind: sum(1 for k, _ in busy if k == kind) for kind in kinds}
        if cx.kind != CYCLE_KIND:
            summary = {"kind": cx.kind, **cx.summary, **summary}
        failed = counts.get(FAILED, 0)
        outcome = "success" if not failed and not (busy and cx.kind == CYCLE_KIND) else "partial_failure"
        if outcome == "success" and not cx.source_complete:
            outcome = SOURCE_INCOMPLETE
        if result.stopped is not None:
            outcome = "quarantined"
        await self.store.finish_cycle(cx.cycle_id, outcome, summary)
        log.info("cycle.finished", outcome=outcome, applied=counts.get(APPLIED, 0), failed=failed,
                 skipped=counts.get("skipped", 0) + sum(1 for op in the_plan.ops if op.status != PENDING),
                 held=the_plan.removals_held, users=summary["users"], groups=summary["groups"],
                 full_sync=cx.full, kind=cx.kind, **({"busy": len(busy)} if busy else {}),
                 **({"reason": result.stopped.reason} if result.stopped is not None else {}))
        report = TargetReport(name, cx.cycle_id, outcome, cx.full, the_plan.counts(), counts, summary, failed,
                              busy=len(busy))
        if result.stopped is not None:
            self._quarantine(rt, result.stopped.reason, result.stopped.detail, log)
        if cx.kind != CYCLE_KIND:
            return report          # /healthz and the cycle metrics follow the full cycles only
        self._notify("cycle.finished", {"target": name, "outcome": outcome, "summary": summary,
                                        "started": cx.started, "finished": time.time(),
                                        "queue": 0, "reason": result.stopped.reason if result.stopped else None})
        return report

    # -- the incremental cycle (README "How changes flow") ----------------------------------

    async def merge_changes(self, reads: Reads, recorded: Mapping[str, str] | None = None) -> Increment | None:
        """The changes read from the feed merged into the last snapshot, which they then are;
        None when there is none to merge into (no full snapshot since the start or a reload):
        the caller runs a full cycle first. The merged snapshot is saved (`why`, a reload's
        preview); the next snapshot compares with the state file's hashes, not a cache's.
        *recorded* (entity id -> the activity's `recordedAt`) dates each user's change for the
        propagation latency (`source_updated_at` of its events)."""
        base = self.last_snapshot
        if base is None:
            return None
        if base is not self._owned:
            # A full snapshot, which a full cycle may still be reading: copied once (its dicts, not
            # their values), then changed in place by every poll until the next one. Every mapping
            # cache holds every user of it: nothing is left to map, the userName indexes are rebuilt.
            base = self._owned = own_copy(base)
            self._stale = {}
            self._name_index = {}
        inc = merge(base, reads, recorded or {}, in_place=True)
        self.last_snapshot = inc.snapshot
        self._stored_cache = None
        for name in self.runtimes:
            self._stale.setdefault(name, set()).update(inc.saved_users)
        # The rows the changes touch, as a save of the whole merged snapshot would write them (as
        # incomplete: it adds and updates rows, never drops one; a full snapshot saved meanwhile
        # may hold users this merge's base did not).
        await self.store.save_snapshot_rows(inc.snapshot, users=inc.saved_users, groups=inc.saved_groups)
        return inc

    async def incremental_cycle(self, rt: TargetRuntime, inc: Increment) -> TargetReport:
        """Steps b-f over what *inc* touches, for one target (`cycle.kind = "incremental"`).

        The caller serialises it with the target's full cycle (the service's per-target lock);
        across processes, each write claims its entity (`reconcile`)."""
        return (await self.reconcile(rt, inc, Reconcile(INCREMENTAL_KIND, busy_wait=self.busy_wait))).report

    # -- one reconcile step over a set of entities (README "How changes flow") ----------------

    async def reconcile(self, rt: TargetRuntime, inc: Increment, how: Reconcile) -> Reconciled:
        """Steps b-f over the entities *inc* names, for one target: the incremental cycle (the
        changed ones), `sync-user` (one user) and `sync-group` (one group and its members) are
        this one step; the full cycle runs the same steps over everything (`_target_cycle`).

        desired state over `inc.snapshot` -> links -> the slice (`slice_to`, or `how.slice`) ->
        plan (`max_deletes` less the removals of the rolling window; a removal the target's
        latest plan held stays held unless an approval of that plan releases it, honoured only
        with `how.approvals`) -> apply -> summary. Each write first claims its entity across
        processes (`Store.mark_in_flight`): an entity another process holds is skipped `busy`;
        this step waits for it (up to `how.busy_wait` seconds) and plans it again from the
        current state, and what is still busy then stays `skipped`/`busy` (`report.busy`).
        A quarantined target is skipped; a target that fails is quarantined as in a full cycle."""
        if how.plan_only:
            return await self._plan_only(rt, inc, how)
        name = rt.config.name
        kind = how.kind
        log = self.log.bind(target=name)
        now = time.time()
        if rt.quarantine.active(now):
            log.info("target.skipped", reason="quarantined", kind=kind,
                     quarantine_reason=rt.quarantine.reason, retry_in_s=round(rt.quarantine.until - now))
            return Reconciled(TargetReport(name, None, "quarantined"))
        cycle_id = await self.store.start_cycle(name, full_sync=False, kind=kind)
        log = log.bind(cycle=cycle_id)
        log.info("cycle.started", targets=[name], kind=kind, user_count=len(inc.users), group_count=len(inc.groups))
        complete = self.last_complete if how.complete is None else how.complete
        cx = CycleContext(rt, cycle_id, False, complete, log, now, inc.snapshot.complete, kind=kind,
                          summary=how.summary)
        out = Reconciled(TargetReport(name, cycle_id, "running"), cycle_id=cycle_id)
        try:
            if how.recover:
                await self.recover(rt, log)
            # The daemon's merged snapshot, sliced by the increment: the desired state of the slice
            # alone (`_desire_slice`); sync-group's own slice needs the whole desired state.
            desired, inc, fast = await self._reconcile_desired(rt, inc, how)
            approval = await approvals.in_effect(self.store, name) if how.approvals else None
            deadline = time.monotonic() + how.busy_wait
            rounds = Rounds(Plan(ops=[]), ApplyResult())
            await self._apply_rounds(cx, inc, desired, how, approval, rounds, deadline, fast=fast)
            merged, result, part, after = rounds.merged, rounds.result, rounds.part, rounds.after
            out.busy = rounds.busy
            if approval is not None:
                out.approval = approval
                out.approval_used = await self._use_approval(name, approval, merged, result)
            out.report = await self.finish(cx, part or desired, after, merged, result, busy=rounds.left_busy)
            out.ops = merged.ops
            out.statuses = {seq: o.status for seq, o in result.outcomes.items()}
            out.desired = part
        except (Unauthorized, Forbidden, TransientError, TargetUnhealthy) as exc:
            reason = exc.reason if isinstance(exc, TargetUnhealthy) else (
                "auth_failed" if isinstance(exc, Unauthorized | Forbidden) else "unreachable")
            self._quarantine(rt, reason, str(exc), log)
            await self.store.finish_cycle(cycle_id, "quarantined", {"reason": reason, "error": str(exc)})
            log.warning("cycle.finished", outcome="quarantined", reason=reason, kind=kind)
            out.report = TargetReport(name, cycle_id, "quarantined")
        except StoreError:
            raise
        except Exception as exc:   # a malformed answer or a defect: this target's step fails
            reason = exc.reason if isinstance(exc, RemoteError) else "internal_error"
            error = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
            await self.store.finish_cycle(cycle_id, "failed", {"reason": reason, "error": error[:500]})
            log.error("cycle.finished", outcome="failed", reason=reason, error=error, kind=kind,
                      exc_info=not isinstance(exc, RemoteError))
            out.report = TargetReport(name, cycle_id, "failed")
            out.error = error
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.finish_cycle(cycle_id, "aborted", {})
            raise
        return out

    async def _plan_only(self, rt: TargetRuntime, inc: Increment, how: Reconcile) -> Reconciled:
        """`reconcile` stopped after its plan (`how.plan_only`): the same desired state, links,
        slice and plan (with `on_plan`), read from SQLite and never written: no cycle, no plan
        rows, no claim, no pins, nothing sent. The report's outcome is `planned`."""
        name = rt.config.name
        complete = self.last_complete if how.complete is None else how.complete
        cx = CycleContext(rt, 0, False, complete, self.log.bind(target=name), time.time(), inc.snapshot.complete,
                          kind=how.kind, summary=how.summary)
        desired, inc, fast = await self._reconcile_desired(rt, inc, how)
        approval = await approvals.in_effect(self.store, name) if how.approvals else None
        _, _, piece, the_plan = await self._reconcile_round(cx, inc, how, desired, approval, first_seq=0, fast=fast)
        return Reconciled(TargetReport(name, None, PLANNED), ops=the_plan.ops, desired=piece, approval=approval)

    async def _reconcile_desired(self, rt: TargetRuntime, inc: Increment,
                                 how: Reconcile) -> tuple[Desired, Increment, bool]:
        """Step b of `reconcile`: the daemon's merged snapshot, sliced by the increment, is desired
        for the slice alone (`_desire_slice`, "fast"); sync-group's own slice needs the whole."""
        fast = how.slice is None and inc.snapshot is self._owned and not how.plan_only
        if fast:
            desired, inc = await self._desire_slice(rt, inc)
        else:
            desired = await self.desire(rt, inc.snapshot, keep_pins=not how.plan_only)
        return desired, inc, fast

    async def _reconcile_round(self, cx: CycleContext, inc: Increment, how: Reconcile, desired: Desired,
                               approval: approvals.Approval | None, *, first_seq: int,
                               fast: bool) -> tuple[float, Actual, Desired, Plan]:
        """Steps c-d of one `reconcile` round: the links (and when they were read: the claims'
        `since`), the slice and its plan, shown to `how.on_plan`. Not saved here."""
        rt = cx.rt
        since = time.time()
        actual = await (how.links(desired) if how.links is not None else self.known_links(rt, desired, cx.log))
        if how.links is None:
            since = rt.links_loaded_at or since
        piece, links = (how.slice(desired, actual) if how.slice is not None
                        else slice_to(desired, actual, inc.users, inc.groups,
                                      held=rt.client.profile.max_groups_per_user is not None))
        the_plan = await self._reconcile_plan(cx, inc, piece, links, actual, approval, first_seq=first_seq,
                                              managed=len(actual.users) if fast else None)
        if how.on_plan is not None:
            how.on_plan(piece, the_plan)
        return since, actual, piece, the_plan
    async def _apply_rounds(self, cx: CycleContext, inc: Increment, desired: Desired, how: Reconcile,
                            approval: approvals.Approval | None, rounds: Rounds, deadline: float, *,
                            fast: bool = False) -> None:
        """Plan and apply the slice of *desired* that *inc* names, then, while some of its entities
        were skipped `busy` (another process held them) and they come free before *deadline*,
        plan and apply those again from the current state and links: `reconcile`'s rounds, and
        the full cycle's after its apply (`_busy_rounds`). Every round's plan and outcomes are
        added to *rounds*; `rounds.busy` is what is still busy after the last."""
        rt, name, log = cx.rt, cx.rt.config.name, cx.log
        merged, result = rounds.merged, rounds.result
        while True:
            since, actual, piece, the_plan = await self._reconcile_round(
                cx, inc, how, desired, approval, first_seq=len(merged.ops), fast=fast)
            rounds.part = rounds.part or piece
            await self.store.save_plan(cx.cycle_id, name, the_plan.ops)
            if the_plan.ops:
                self.report_plan(cx, piece, the_plan)
            elif the_plan.removals_deferred:      # no operation to report, but removals left for later
                cx.log.warning("plan.removals_deferred", deferred=the_plan.removals_deferred,
                               reason="snapshot_incomplete")
            if how.announce and the_plan.pending():
                await self._announce_links(name)
            round_result, rounds.after = await self.apply_plan(cx, inc.snapshot, piece, actual, the_plan,
                                                               inc.changed_at, claim_since=since, in_place=fast)
            if how.announce and round_result.counts().get(APPLIED):
                await self._announce_links(name)
            await self._count_removals(rt, the_plan, round_result)
            merged.ops.extend(the_plan.ops)
            merged.removals_held += the_plan.removals_held
            merged.removals_deferred += the_plan.removals_deferred
            merged.removals_limit = the_plan.removals_limit
            result.outcomes.update(round_result.outcomes)
            result.requests += round_result.requests
            result.stopped = round_result.stopped or result.stopped
            busy = busy_entities(the_plan, round_result)
            if not busy or result.stopped is not None or not await self._wait_free(name, busy, deadline):
                rounds.left_busy = busy
                return
            log.info("reconcile.replanned", kind=cx.kind, entities=len(busy), reason=BUSY)
            rt.links = None    # another process wrote this target: its links are read again

    async def _busy_rounds(self, cx: CycleContext, snapshot: Snapshot, desired: Desired, the_plan: Plan,
                           result: ApplyResult, after: Actual) -> Rounds:
        """The full cycle's entities skipped `busy` (another process held them: an operator's
        `sync-user`, ...): waited for (up to `busy_wait`, while this cycle holds its target) and,
        once free, planned again from the current state and links as `reconcile` does (a busy
        group brings its members into the slice, so its whole membership is planned again). The
        rounds' plans are added to *the_plan*; `left_busy` is what is still busy at the end."""
        rounds = Rounds(the_plan, result, desired, after)
        busy = busy_entities(the_plan, result)
        rounds.left_busy = busy
        if not busy or result.stopped is not None:
            return rounds
        rt, name = cx.rt, cx.rt.config.name
        if not await self._wait_free(name, busy, time.monotonic() + self.busy_wait):
            return rounds
        cx.log.info("reconcile.replanned", kind=cx.kind, entities=len(busy), reason=BUSY)
        rt.links = None    # another process wrote this target: its links are read again
        groups = frozenset(sid for kind, sid in busy if kind == "group")
        users = {sid for kind, sid in busy if kind == "user"}
        for gid in groups:
            if (want := desired.groups.get(gid)) is not None:
                users.update(want.members)
            if (link := after.groups.get(gid)) is not None:
                users.update(link.members)
        inc = Increment(snapshot, frozenset(users), groups, frozenset())
        reported = rt.reported
        deadline = time.monotonic() + self.busy_wait
        await self._apply_rounds(cx, inc, desired, Reconcile(cx.kind, recover=False, busy_wait=self.busy_wait),
                                 None, rounds, deadline)
        rt.reported = {**reported, **rt.reported}   # the full cycle's skips stay reported
        return rounds

    async def _desire_slice(self, rt: TargetRuntime, inc: Increment) -> tuple[Desired, Increment]:
        """Step b over what *inc* touches in the daemon's merged snapshot: what `desire` cut to the
        slice would hold (`slice_to` of either is the same), computed from the touched users and
        the pushed groups' membership of them only (`incremental.desire_slice`). *inc* comes
        back widened by the groups a name pin moved to, and their users (`repinned`)."""
        name = rt.config.name
        old_pins = await self.pins(name)
        pins = resolve_pins(inc.snapshot, rt.rules, old_pins)
        if pins != old_pins:
            await self.store.set_meta(f"group_pins.{name}", json.dumps(pins, sort_keys=True))
            inc = repinned(inc, old_pins, pins)
        epoch = self._cache_epoch
        built = self._name_index.get(name)
        with gc_paused():
            if built is not None and built[0] == epoch and built[1].cache is rt.mapped:
                index = built[1]
            else:
                index = NameIndex(rt.mapped)
                # While a snapshot fills the caches (odd epoch), an index is good for this poll only.
                if epoch % 2 == 0:
                    self._name_index[name] = (epoch, index)
            want = desire_slice(inc.snapshot, rt.rules, pins, inc.users, cache=rt.mapped, index=index,
                                stale=self._stale.get(name, ()))
        self._stale.pop(name, None)
        return want, inc

    async def _reconcile_plan(self, cx: CycleContext, inc: Increment, desired: Desired, links: Actual,
                              actual: Actual, approval: approvals.Approval | None, *, first_seq: int = 0,
                              managed: int | None = None) -> Plan:
        """Step d over the slice: `max_deletes` less the removals applied within the rolling
        window, so a burst of deletions arriving as events is held as a whole; the removals an
        approval of a held plan releases (`approval`, sync-user only: an incremental cycle
        neither uses nor consumes one) are not counted. A removal the target's latest plan held
        stays held unless released. A departed namesake's link is shown to the planner (a
        rehire takes its account over), nothing else is planned for it. Not saved here.
        *managed*: the target's linked users when *actual* holds them all (as a full cycle counts
        them), else SQLite's count."""
        rt = cx.rt
        cfg = rt.config
        _, recent = removal_window(await self._removals(rt), time.time(), self.removal_window)
        if managed is None:
            managed = await self.store.managed_count(cfg.name)
        limit = cfg.max_deletes.limit(managed)
        released = approval.releases if approval is not None else frozenset()
        policy = Policy(
            create=cfg.actions.create, update=cfg.actions.update, disable=cfg.actions.disable,
            deprovision=cfg.actions.deprovision, remove_action=cfg.remove_action, delete_after=cfg.delete_after,
            group_membership=cfg.group_membership, max_deletes=max(0, limit - recent),
            approved=False, released=released,
            max_groups_per_user=rt.client.profile.max_groups_per_user)
        departed = await self._departed_namesakes(cfg.name, inc.snapshot, desired, links, actual)
        if departed:
            links = Actual({**links.users, **{link.source_id: link for link in departed}}, links.groups)
        the_plan = plan(desired, links, policy, complete=cx.complete, now=time.time())
        if departed:     # a departed namesake's own removal is the next full cycle's business
            gone = {link.source_id for link in departed}
            the_plan.ops = [op for op in the_plan.ops if not (op.kind == "user" and op.source_id in gone)]
        for op in the_plan.ops:
            if (op.is_removal and op.kind == "user" and op.status == PENDING
                    and approvals.removal_key("user", op.source_id) not in released
                    and await approvals.held_removal(self.store, cfg.name, "user", op.source_id) is not None):
                hold_unreleased(the_plan, op.source_id, released)
        refusals.hold(the_plan, await refusals.load(self.store, cfg.name), full_sync=False)
        if first_seq:
            the_plan.ops = [replace(op, seq=op.seq + first_seq) for op in the_plan.ops]
        return the_plan

    async def _departed_namesakes(self, target: str, snapshot: Snapshot, desired: Desired, links: Actual,
                                  actual: Actual) -> list[UserLink]:
        """The links of users gone from the snapshot whose userName (as servers compare it) is
        that of a user of the slice without a link: a rehire takes one of these accounts over."""
        out: dict[str, UserLink] = {}
        for sid, want in desired.users.items():
            if sid in links.users:
                continue
            key = username_key(want.user_name)
            for other in await self.store.linked_namesakes(target, want.user_name, sid):
                link = actual.users.get(other)
                if (link is not None and other not in snapshot.users and other not in links.users
                        and username_key(link.user_name) == key):
                    out[other] = link
        return list(out.values())

    async def _wait_free(self, target: str, busy: AbstractSet[tuple[str, str]], deadline: float) -> bool:
        """Wait until no other live process has a write in flight on these entities; False when
        the deadline came first."""
        while time.monotonic() < deadline:
            if not await self.store.busy_entities(target, busy):
                return True
            await anyio.sleep(BUSY_POLL)
        return False

    async def _announce_links(self, target: str) -> None:
        """Tell a running daemon that this process writes the target's links: its next cycle
        (or re-plan) reads them from SQLite, and its claims count what was written since."""
        await self.store.set_meta(f"{META_LINKS_GENERATION}.{target}", uuid.uuid4().hex)

    async def _use_approval(self, target: str, approval: approvals.Approval, the_plan: Plan,
                            result: ApplyResult) -> str | None:
        """An approval of a held plan that released removals sent here is consumed when all it
        released was used ("consumed"), else kept for the next cycle ("kept"); None: unused."""
        applied = frozenset(approvals.removal_key(op.kind, op.source_id) for op in the_plan.ops
                            if op.is_removal and (o := result.outcomes.get(op.seq)) is not None
                            and o.status == APPLIED and approvals.removal_key(op.kind, op.source_id) in approval.releases)
        if approvals.used_up(approval, applied):
            await approvals.consume(self.store, target, approval)
            return "consumed"
        return "kept" if applied else None

    async def _removals(self, rt: TargetRuntime) -> list[tuple[float, int]]:
        text = await self.store.get_meta(f"{META_CHANGE_REMOVALS}.{rt.config.name}")
        try:
            return [(float(at), int(n)) for at, n in json.loads(text)] if text else []
        except (ValueError, TypeError):
            return []

    async def _count_removals(self, rt: TargetRuntime, the_plan: Plan, result: ApplyResult) -> None:
        """Add the removals this apply sent to the rolling window (SQLite meta)."""
        sent = sum(1 for op in the_plan.ops if op.is_removal and (outcome := result.outcomes.get(op.seq)) is not None
                   and outcome.status == APPLIED)
        if not sent:
            return
        now = time.time()
        kept, _ = removal_window(await self._removals(rt), now, self.removal_window)
        kept.append((now, sent))
        await self.store.set_meta(f"{META_CHANGE_REMOVALS}.{rt.config.name}", json.dumps(kept))

    async def _standing_refusals(self, rt: TargetRuntime, the_plan: Plan, result: ApplyResult,
                                 after: Actual, desired: Desired) -> dict[str, int]:
        """Keep the refusals that stand after this apply (said once: a later skip of the same
        delete is logged at debug), and count them by reason for `status`."""
        name = rt.config.name
        refused = await refusals.load(self.store, name)
        now = refusals.after_apply(refused, the_plan, result.outcomes, after.users.keys(), desired.users,
                                   reason=rt.client.profile.delete_refused_reason)
        if now != refused:
            await refusals.save(self.store, name, now)
        for sid, reason in now.items():
            rt.reported[f"user:{sid}:delete"] = reason
        return refusals.counts(now)

    def eta(self, rt: TargetRuntime, operations: int) -> float:
        """Seconds an apply of `operations` should take at this target's rate and concurrency."""
        if operations == 0:
            return 0.0
        return round(operations / max(rt.governor.rate, 0.01), 1)

    async def make_plan(self, rt: TargetRuntime, desired: Desired, actual: Actual, complete: bool, *,
                        approval: approvals.Approval | None = None) -> Plan:
        """The planner's plan; the removals `approval` (of a held plan) names are released.
        `max_deletes` less what the change feed's incremental cycles removed within the rolling
        window: a mass removal split between the feed and a full cycle (one the feed held, owed to
        the target's full cycle at once) is held as a whole."""
        cfg = rt.config
        managed = len(actual.users)
        granted = approval.granted if approval is not None else None   # consumed by finish, exactly this one
        _, recent = removal_window(await self._removals(rt), time.time(), self.removal_window)
        policy = Policy(
            create=cfg.actions.create, update=cfg.actions.update, disable=cfg.actions.disable,
            deprovision=cfg.actions.deprovision, remove_action=cfg.remove_action, delete_after=cfg.delete_after,
            group_membership=cfg.group_membership, max_deletes=max(0, cfg.max_deletes.limit(managed) - recent),
            released=approval.releases if approval is not None else frozenset(),
            max_groups_per_user=rt.client.profile.max_groups_per_user)
        result = plan(desired, actual, policy, complete=complete, now=time.time())
        result.approval = granted
        return result

    # -- recovery and actual state --------------------------------------------------------

    async def recover(self, rt: TargetRuntime, log: Any) -> None:
        """Resolve what an interrupted cycle left in flight, before anything new is created.

        Only creates that were sent (journaled `in_flight`) may exist in the target unlinked: each
        is looked up by name, at the target's concurrency. A found object is linked at once and
        its operation closed, so that a stop during recovery loses nothing already looked up;
        `recovery.progress` is logged every RECOVERY_LOG_EVERY seconds and the `recovery` hook
        (STATUS=, /healthz) is told of every lookup.
        """
        name = rt.config.name
        unfinished = await self.store.unfinished_ops(name)
        if not unfinished:
            return
        rt.links = None
        links = await self.store.load_links(name)
        lookups = [op for op in unfinished if op["status"] == "in_flight" and op["op"] == "create"
                   and op["source_id"] not in (links.users if op["kind"] == "user" else links.groups)]
        total = len(lookups)
        # Target ids the links hold: a lookup takes only an object named exactly so that no link
        # (nor another lookup here) holds (`ScimClient.find_user`, README "Identity").
        held: dict[str, set[str]] = {}
        if total:
            held = {"user": {link.target_id for link in links.users.values()},
                    "group": {link.target_id for link in links.groups.values()}}
        found_users = found_groups = 0
        done = 0
        started = last_log = time.monotonic()
        hook = self.recovery
        if total:
            log.info("recovery.started", lookups=total, unfinished=len(unfinished), concurrency=rt.config.concurrency)
            if hook is not None:
                hook(name, 0, total)

        async def look_up(op: dict[str, Any]) -> None:
            nonlocal found_users, found_groups, done, last_log
            ids = held[op["kind"]]

            def taken(target_id: str) -> bool:
                return target_id in ids

            async with rt.limiter:
                found = await (rt.client.find_user(op["name"], taken=taken) if op["kind"] == "user"
                               else rt.client.find_group(op["name"], taken=taken))
            if found is not None:
                if str(found["id"]) in ids:
                    found = None             # another lookup here took it meanwhile
                else:
                    ids.add(str(found["id"]))
            user: UserLink | None = None
            group: GroupLink | None = None
            if found is not None and op["kind"] == "user":
                attrs = op["payload"].get("attrs", {})
                user = UserLink(op["source_id"], str(found["id"]), op["name"],
                                read_user(found, rt.rules.paths) or attrs, read_active(found))
                found_users += 1
            elif found is not None:
                group = GroupLink(op["source_id"], str(found["id"]), op["name"], frozenset())
                found_groups += 1
            await self.store.recovered(name, op["cycle"], op["seq"], user=user, group=group)
            if found is not None:
                kind = op["kind"]
                log.info(f"{kind}.recovered", source_id=op["source_id"], target_id=found["id"],
                         **{kind: op["name"]}, op="create", outcome="applied", reason="found_after_interruption")
            done += 1
            if hook is not None:
                hook(name, done, total)
            now = time.monotonic()
            if now - last_log >= RECOVERY_LOG_EVERY and done < total:
                last_log = now
                log.info("recovery.progress", done=done, lookups=total, found=found_users + found_groups,
                         elapsed_s=round(now - started, 1))

        queue = iter(lookups)

        async def worker() -> None:
            for op in queue:
                await look_up(op)

        async with anyio.create_task_group() as tg:
            for _ in range(min(total, max(1, int(rt.limiter.total_tokens)))):
                tg.start_soon(worker)
        closed = await self.store.supersede(name)
        log.info("cycle.resumed", unfinished=len(unfinished), lookups=total, recovered_users=found_users,
                 recovered_groups=found_groups, superseded=closed,
                 took_s=round(time.monotonic() - started, 3))

    async def load_links(self, rt: TargetRuntime, desired: Desired, log: Any) -> Actual:
        """The stored links of this target. A row that cannot be read is contained to its entity:
        logged (`state.row_malformed`), re-read from the target by the id it names where that is
        known and still there, else dropped so that the entity is planned anew (a create then
        meets its object through an exact lookup). The rest of the cycle runs as usual."""
        name = rt.config.name
        bad: list[MalformedRow] = []
        actual = await self.store.load_links(name, share=desired, malformed=bad)
        if not bad:
            return actual
        users = dict(actual.users)
        groups = dict(actual.groups)
        fixed_users: list[UserLink] = []
        fixed_groups: list[GroupLink] = []
        drops: dict[str, list[str]] = {"user": [], "group": []}
        for row in bad:
            action = "re_planned"
            sid = row.source_id
            if sid is not None and row.kind == "user":
                found = await _get_or_none(rt.client.get_user, row.target_id)
                if found is not None and isinstance(found.get("userName"), str):
                    link = UserLink(sid, str(found["id"]), str(found["userName"]),
                                    read_user(found, rt.rules.paths), read_active(found))
                    users[sid] = link
                    fixed_users.append(link)
                    action = "re_read"
                else:
                    drops["user"].append(sid)
            elif sid is not None and row.kind == "group":
                found = await _get_or_none(rt.client.get_group, row.target_id)
                if found is not None and isinstance(found.get("displayName"), str):
                    listed = await rt.client.group_member_ids(str(found["id"]))
                    by_target = {link.target_id: s for s, link in users.items()}
                    ours = Members.of(by_target[t] for t in listed or () if t in by_target)
                    foreign = frozenset(t for t in listed or () if t not in by_target)
                    origin = row.origin if row.origin in ("created", "adopted") else "adopted"
                    glink = GroupLink(sid, str(found["id"]), str(found["displayName"]), ours, foreign, origin)
                    groups[sid] = glink
                    fixed_groups.append(glink)
                    action = "re_read"
                else:
                    drops["group"].append(sid)
            log.warning("state.row_malformed", kind=row.kind, source_id=sid, target_id=row.target_id,
                        name=row.name, error=row.error, action=action)
        await self.store.write_links(name, users=fixed_users, groups=fixed_groups, drop_users=drops["user"],
                                     drop_groups=drops["group"])
        return Actual(users, groups)

    async def refresh_actual(self, rt: TargetRuntime, actual: Actual, desired: Desired, log: Any) -> Actual:
        """Read the target whole; links follow what is really there (drift), matches are adopted."""
        name = rt.config.name
        paths = rt.rules.paths
        by_id: dict[str, dict[str, Any]] = {}
        by_name: dict[str, dict[str, Any]] = {}
        async for res in rt.client.iter_users():
            rid = res.get("id")
            uname = res.get("userName")
            if not isinstance(rid, str) or not isinstance(uname, str):
                continue
            by_id[rid] = res
            by_name[username_key(uname)] = res
        users: dict[str, UserLink] = {}
        dropped: list[str] = []
        for sid, link in actual.users.items():
            found = by_id.get(link.target_id)
            if found is None:
                dropped.append(sid)
                log.info("user.missing_in_target", source_id=sid, target_id=link.target_id, user=link.user_name)
                continue
            users[sid] = replace(link, attrs=read_user(found, paths), active=read_active(found))
        linked_ids = {link.target_id for link in users.values()}
        for sid, want in desired.users.items():
            if sid in users:
                continue
            match = by_name.get(username_key(want.user_name))
            if match is None or match["id"] in linked_ids:
                continue
            users[sid] = UserLink(sid, str(match["id"]), want.user_name, read_user(match, paths),
                                  read_active(match), origin="adopted")
            linked_ids.add(str(match["id"]))
            log.info("user.adopted", source_id=sid, target_id=match["id"], user=want.user_name, op="adopt",
                     outcome="applied", reason="same_username_in_target")
        unmanaged = len(by_id) - len(linked_ids & by_id.keys())
        rt.unmanaged = unmanaged
        await self.store.set_meta(f"unmanaged.{name}", str(unmanaged))

        groups: dict[str, GroupLink] = {}
        dropped_groups: list[str] = []
        by_gid: dict[str, dict[str, Any]] = {}
        by_gname: dict[str, dict[str, Any]] = {}
        async for g in rt.client.iter_groups():
            gid = g.get("id")
            gname = g.get("displayName")
            if isinstance(gid, str) and isinstance(gname, str):
                by_gid[gid] = g
                by_gname[username_key(gname)] = g
        target_to_source = {link.target_id: sid for sid, link in users.items()}

        async def read_members(gid: str) -> tuple[AbstractSet[str], frozenset[str]] | None:
            found = await rt.client.group_member_ids(gid)
            if found is None:
                if not rt.client.profile.group_get_returns_members:
                    return None    # the target does not tell: keep provisiond's own state
                found = set()
            ours = Members.of(target_to_source[t] for t in found if t in target_to_source)
            return ours, frozenset(t for t in found if t not in target_to_source)

        for sid, glink in actual.groups.items():
            seen = by_gid.get(glink.target_id)
            if seen is None:
                dropped_groups.append(sid)
                log.info("group.missing_in_target", source_id=sid, target_id=glink.target_id,
                         group=glink.display_name)
                continue
            members = await read_members(glink.target_id)
            new = replace(glink, display_name=str(seen["displayName"]))
            if members is not None:
                new = replace(new, members=members[0], foreign=members[1])
            groups[sid] = new
        linked_groups = {gl.target_id for gl in groups.values()}
        for sid, wantg in desired.groups.items():
            if sid in groups:
                continue
            other = by_gname.get(username_key(wantg.display_name))
            if other is None or other["id"] in linked_groups:
                continue
            members = await read_members(str(other["id"]))
            ours, foreign = members if members is not None else (frozenset(), frozenset())
            groups[sid] = GroupLink(sid, str(other["id"]), str(other["displayName"]), ours, foreign,
                                    origin="adopted")
            log.info("group.adopted", source_id=sid, target_id=other["id"], group=wantg.display_name, op="adopt",
                     outcome="applied", reason="same_name_in_target", foreign_members=len(foreign))
        await self.store.write_links(name, users=users.values(), groups=groups.values(),
                                     drop_users=dropped, drop_groups=dropped_groups)
        log.info("target.read", user_count=len(by_id), group_count=len(by_gid), unmanaged_users=unmanaged,
                 missing=len(dropped) + len(dropped_groups))
        return Actual(users=users, groups=groups)

    # -- summary --------------------------------------------------------------------------

    @staticmethod
    def summarize(desired: Desired, after: Actual, the_plan: Plan, result: Any, *,
                  snapshot_complete: bool) -> dict[str, Any]:
        """PingOne's sync summary (impacted / success / unsynced / partial / failed) plus op counts."""
        failed_users: set[str] = set()
        failed_groups: set[str] = set()
        for op in the_plan.ops:
            outcome = result.outcomes.get(op.seq)
            if outcome is not None and outcome.status == FAILED:
                (failed_users if op.kind == "user" else failed_groups).add(op.source_id)
        u = {"impacted": desired.in_scope, "success": 0, "unsynced": 0, "partial": 0, "failed": 0, "skipped": 0}
        for sid, want in desired.users.items():
            link = after.users.get(sid)
            if sid in failed_users:
                u["failed"] += 1
            elif link is None:
                u["unsynced"] += 1
            elif (link.attrs is want.attrs or in_sync(want.attrs, link.attrs, desired.create_only)) \
                    and link.active == want.active:
                u["success"] += 1
            elif not want.active and link.active is False:
                u["success"] += 1
            else:
                u["partial"] += 1
        for sid in desired.skipped:
            u["skipped"] += 1
            if sid in after.users:
                u["partial"] += 1
            else:
                u["unsynced"] += 1
        g = {"impacted": len(desired.groups), "success": 0, "unsynced": 0, "partial": 0, "failed": 0}
        linked = after.users.keys()
        for sid, wantg in desired.groups.items():
            glink = after.groups.get(sid)
            if sid in failed_groups:
                g["failed"] += 1
            elif glink is None:
                g["unsynced"] += 1
            elif glink.display_name == wantg.display_name and (
                    glink.members is wantg.members
                    or glink.members == (wantg.members if wantg.members <= linked else wantg.members & linked)):
                g["success"] += 1
            else:
                g["partial"] += 1
        ops: dict[str, int] = {}
        for op in the_plan.ops:
            outcome = result.outcomes.get(op.seq)
            status = outcome.status if outcome is not None else op.status
            key = f"{op.kind}.{op.op}.{status}"
            ops[key] = ops.get(key, 0) + 1
        return {"users": u, "groups": g, "operations": ops, "held": the_plan.removals_held,
                "deferred_removals": the_plan.removals_deferred, "snapshot_complete": snapshot_complete,
                "missing_groups": desired.missing_groups}


def report_capped(the_plan: Plan, desired: Desired, report: Callable[[str, str], Any]) -> None:
    """One `group.member_skipped` event per membership beyond the target's groups-per-user cap
    (`group_limit`), at info when it starts and at debug while it lasts."""
    for op in the_plan.ops:
        if op.op != "add_members":
            continue
        for sid in op.payload.get("capped", ()):
            want = desired.users.get(sid)
            report(f"member:{op.source_id}:{sid}", GROUP_LIMIT)(
                "group.member_skipped", source_id=op.source_id, target_id=op.target_id, group=op.name,
                member_source_id=sid, user=want.user_name if want is not None else None, op=op.op,
                outcome="skipped", reason=GROUP_LIMIT, limit=op.payload.get("limit"))


def capped_counts(the_plan: Plan) -> dict[str, int]:
    """Memberships (and their users) beyond the target's groups-per-user cap, for `status`."""
    capped = [sid for op in the_plan.ops if op.op == "add_members" for sid in op.payload.get("capped", ())]
    return {"memberships": len(capped), "users": len(set(capped))} if capped else {}


async def _get_or_none(get: Callable[[str], Awaitable[dict[str, Any]]], target_id: str | None
                       ) -> dict[str, Any] | None:
    """The object by id, or None when there is no id or the target no longer has it."""
    if target_id is None:
        return None
    try:
        return await get(target_id)
    except (NotFound, ValueError):
        return None


def held_ops(the_plan: Plan) -> int:
    return sum(1 for op in the_plan.ops if op.status == HELD)
