"""Apply a plan to one target: stages in order, bounded concurrency within a stage.

The first stage runs the planner's phases 1-3 together: user creates/enables/updates and group
creates/renames share one worker pool (group operations first, they are few), and each group's
member add is pipelined into it: it starts once its group exists and sends its members chunk by
chunk, each chunk once every member in it whose user operation is in this plan has finished.
A waiting member add holds no concurrency slot; every request still goes through the one
limiter, and one group never has two PATCHes in flight. Phases 4, 5 and 6 (member removals,
disables, deletes) then run one after another, each after the previous has finished.

A member chunk the target refuses with 400 is split in halves until the members at fault are
alone (the rest go in); a userName change the target refuses is applied as create, move the
memberships, delete the old account (`user.recreated`); a DELETE answered 409 is a standing
refusal, `skipped` (ZIA admin-linked users, `daemon.refusals`).

Each operation is journaled `in_flight` before its request and its outcome written after it
(in batches, by a flush that runs beside the workers); links change only on success. A failure
is contained to its entity: it is recorded, logged with who, what and why, and the others go on.
Only a target that refuses our credentials (401/403), or whose recent requests mostly fail
transiently, stops the apply early: the rest is recorded `skipped` with the reason, and the
engine quarantines it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from daemon.errors import BadRequest, Conflict, Forbidden, NotFound, RemoteError, TransientError, Unauthorized
from daemon.links import (
    DISABLED_IN_SOURCE,
    HELD_BY_ANOTHER_LINK,
    PENDING,
    PHASE_GROUPS,
    PHASE_MEMBER_ADD,
    PHASE_USERS,
    GroupLink,
    Op,
    UserLink,
)
from daemon.planner import changed_attributes
from daemon.store import Holder, Outcome, Store
from daemon.target.resource import read_active, read_user
from daemon.target.scim import ScimClient

FLUSH_EVERY = 200
UNHEALTHY_WINDOW = 20       # the last N request outcomes considered
UNHEALTHY_RATIO = 0.8       # transient failures among them that stop the apply
REQUEST_WINDOW = 10         # the last N HTTP attempts considered (retries included)
REQUEST_RATIO = 0.8         # unanswered (timeout, connection) or 5xx among them that stop the apply

APPLIED = "applied"
FAILED = "failed"
SKIPPED = "skipped"
BUSY = "busy"               # skip reason: another process holds a claim on the entity (`Store.mark_in_flight`)

PAST = {
    "create": "created", "update": "updated", "enable": "enabled", "disable": "disabled",
    "delete": "deleted", "rename": "renamed", "add_members": "members_added",
    "remove_members": "members_removed", "release": "released", "adopt": "adopted", "retire": "retired",
}

Progress = Callable[[int, int], None]
Observer = Callable[[str, dict[str, Any]], None]   # (event name, event fields incl. target)
Handled = tuple[str, str | None, dict[str, Any]]    # (status, target id, event fields)
Handler = Callable[[Op, list[int]], Awaitable[Handled]]

# The phases whose operations a member add may depend on: they run in the first stage, with
# the member adds pipelined into them.
PREREQUISITE_PHASES = (PHASE_USERS, PHASE_GROUPS)


class TargetUnhealthy(Exception):
    """The apply stopped early; `reason` says why (auth_failed, mostly_failing)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class ApplyResult:
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    stopped: TargetUnhealthy | None = None
    requests: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            out[o.status] = out.get(o.status, 0) + 1
        return out


@dataclass
class _Health:
    """Whether the target still works, from two windows: operations (after their retries) and
    single HTTP attempts. A target whose requests mostly time out stops the apply after a few
    request timeouts, not after 20 operations that each spent all their retries."""

    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=UNHEALTHY_WINDOW))
    requests: deque[bool] = field(default_factory=lambda: deque(maxlen=REQUEST_WINDOW))
    stopped: TargetUnhealthy | None = None

    def record(self, transient_failure: bool) -> None:
        self.recent.append(transient_failure)
        if (self.stopped is None and len(self.recent) == UNHEALTHY_WINDOW
                and sum(self.recent) >= UNHEALTHY_RATIO * UNHEALTHY_WINDOW):
            self.stopped = TargetUnhealthy(
                "mostly_failing", f"{sum(self.recent)} of the last {UNHEALTHY_WINDOW} operations failed transiently")

    def record_request(self, status: int | None) -> None:
        """One HTTP attempt: None (no answer: timeout, connection trouble) and 5xx count as failing."""
        self.requests.append(status is None or status >= 500)
        if (self.stopped is None and len(self.requests) == REQUEST_WINDOW
                and sum(self.requests) >= REQUEST_RATIO * REQUEST_WINDOW):
            self.stopped = TargetUnhealthy(
                "mostly_failing", f"{sum(self.requests)} of the last {REQUEST_WINDOW} requests got no answer "
                                  "(timeout, connection) or a 5xx")

    def finish(self) -> None:
        """At the end of an apply: one in which every operation that was sent failed transiently
        (all of them, even fewer than a window) is a failing target, not a partial failure."""
        if self.stopped is None and self.recent and all(self.recent):
            self.stopped = TargetUnhealthy(
                "mostly_failing", f"all {len(self.recent)} operations sent failed transiently")


class TakenByAnotherLink(Exception):
    """A link would take a target object that another PingOne id's link holds (never allowed)."""


class _NotStarted(Exception):
    """The apply stopped before an operation sent anything: it is skipped like the others."""


class _Busy(Exception):
    """Another process holds the entity's claim: the operation sends nothing."""

    def __init__(self, holder: Holder) -> None:
        super().__init__(holder.text())
        self.holder = holder


class _StoppedMidway(Exception):
    """The apply stopped (target unhealthy) while an operation had sent part of its requests."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"apply stopped midway: target {reason}")
        self.reason = reason


def _is_member_add(op: Op) -> bool:
    return op.phase == PHASE_MEMBER_ADD and op.kind == "group" and op.op == "add_members"


def _stages(pending: list[Op]) -> list[list[Op]]:
    """Phases 1-3 as one stage (group operations first, then users, then member adds), then
    every later phase on its own, in order."""
    first = ([op for op in pending if op.phase == PHASE_GROUPS]
             + [op for op in pending if op.phase == PHASE_USERS]
             + [op for op in pending if _is_member_add(op)])
    rest: dict[int, list[Op]] = {}
    for op in pending:
        if op.phase not in PREREQUISITE_PHASES and not _is_member_add(op):
            rest.setdefault(op.phase, []).append(op)
    return ([first] if first else []) + [rest[phase] for phase in sorted(rest)]


def _member_order(queued: list[Op], adds: list[Op]) -> list[tuple[Op, list[str]]]:
    """Each member add with its members in the order their user operations are queued (those
    without one first): its first chunks are complete while the later users are created."""
    position: dict[str, int] = {}
    for i, op in enumerate(queued):
        if op.kind == "user" and op.phase == PHASE_USERS:
            position[op.source_id] = i
    return [(op, sorted((str(s) for s in op.payload["source_ids"]), key=lambda s: position.get(s, -1)))
            for op in adds]


class Applier:
    """Runs one cycle's plan against one target."""

    def __init__(
        self,
        *,
        target: str,
        cycle_id: int,
        client: ScimClient,
        store: Store,
        log: Any,
        limiter: anyio.CapacityLimiter,
        users: dict[str, UserLink],
        groups: dict[str, GroupLink],
        paths: tuple[str, ...],
        can_create: bool,
        active_false_deletes: bool,
        progress: Progress | None = None,
        observer: Observer | None = None,
        source_updated: Mapping[str, str | None] | None = None,
        claim_since: float | None = None,
    ) -> None:
        self.target = target
        self.cycle_id = cycle_id
        self.client = client
        self.store = store
        self.log = log
        self.limiter = limiter
        self.users = users
        self.groups = groups
        self.paths = paths
        self.can_create = can_create
        self.active_false_deletes = active_false_deletes
        self.progress = progress
        self.observer = observer
        self.source_updated = source_updated or {}
        # When the plan's links were read: another process's write to an entity recorded after
        # it makes this plan stale for that entity (skipped `busy`, re-planned by the caller).
        self.claim_since = claim_since
        self._refused: dict[int, Holder] = {}       # seq -> who holds its entity
        self.health = _Health()
        self.result = ApplyResult()
        self._buffer: list[Outcome] = []
        self._user_upserts: dict[str, UserLink] = {}
        self._user_drops: set[str] = set()
        self._group_upserts: dict[str, GroupLink] = {}
        self._group_drops: set[str] = set()
        self._lock = anyio.Lock()
        self._to_mark: list[int] = []
        self._mark_lock = anyio.Lock()
        self._done = 0
        self._total = 0
        # The stage running now: its task group (flushes run in it, beside the workers), and
        # for each user/group with operations of phases 1-2 in it, how many have not finished.
        self._stage: TaskGroup | None = None
        self._flushing = False
        self._unfinished: dict[str, dict[str, int]] = {"user": {}, "group": {}}
        self._waiters: dict[tuple[str, str], list[anyio.Event]] = {}
        self._group_locks: dict[str, anyio.Lock] = {}
        # target id -> the source id whose link holds it, per kind: built on first need (a 409
        # adoption, a removal), then kept current by every link change of this apply.
        self._holders: dict[str, dict[str, str]] = {}
        # (kind, target id) -> source id, for every link made or moved by this apply: a removal
        # checks it without indexing every link (`_held_by_another`).
        self._claims: dict[tuple[str, str], str] = {}
        self._busy: set[tuple[str, str]] = set()       # (kind, source id) with a write in flight
        self._busy_waiters: dict[tuple[str, str], list[anyio.Event]] = {}

    async def apply(self, ops: Iterable[Op]) -> ApplyResult:
        pending = [op for op in ops if op.status == PENDING]
        self._total = len(pending)
        observed = self.client.on_request

        def on_request(method: str, status: int | None, seconds: float) -> None:
            self.health.record_request(status)
            if observed is not None:
                observed(method, status, seconds)

        self.client.on_request = on_request
        try:
            for stage in _stages(pending):
                await self._run_stage(stage)
                await self._flush()
        finally:
            self.client.on_request = observed
            # Stopped midway (SIGTERM, grace expired): what finished is recorded with its links,
            # so the next start neither repeats it nor loses it; what was sent and not answered
            # stays in_flight, what was never sent stays pending.
            with anyio.CancelScope(shield=True):
                await self._flush()
        self.health.finish()
        self.result.stopped = self.health.stopped
        return self.result

    async def _mark_sent(self, op: Op) -> Holder | None:
        """Journal `op` in flight before its first request, which claims its entity across
        processes (group commit: the operations that reach this point together are written in
        one statement). None when claimed; else who holds the entity: nothing may be sent."""
        self._to_mark.append(op.seq)
        async with self._mark_lock:
            if self._to_mark:     # else written by the one who held the lock before
                seqs, self._to_mark = self._to_mark, []
                self._refused.update(await self.store.mark_in_flight(self.cycle_id, seqs, since=self.claim_since))
        return self._refused.pop(op.seq, None)

    def _busy_outcome(self, op: Op, started: float, holder: Holder) -> tuple[Outcome, dict[str, Any]]:
        """Not sent: another process holds this entity (its write is in flight, or it wrote since
        this plan was made). The caller re-plans it from the current state, or the next cycle does."""
        outcome = Outcome(op.seq, SKIPPED, skip_reason=BUSY, started=started, finished=time.time())
        pid = holder.owner.partition(":")[0]
        return outcome, {"reason": BUSY, "holder": holder.text(), "holder_pid": int(pid) if pid.isdigit() else None,
                         "holder_cycle": holder.cycle_id, "holder_kind": holder.kind, "holder_state": holder.state}

    async def _run_stage(self, stage: list[Op]) -> None:
        queued = [op for op in stage if not _is_member_add(op)]
        adds = [op for op in stage if _is_member_add(op)]
        self._expect_prerequisites(queued)
        ordered = _member_order(queued, adds)
        # A pool of workers pulls from one queue: 100,000 creates are not 100,000 tasks. A member
        # add is one task per group, waiting without a concurrency slot.
        queue = iter(queued)
        workers = max(1, min(len(queued), int(self.limiter.total_tokens))) if queued else 0
        try:
            async with anyio.create_task_group() as tg:
                self._stage = tg
                for _ in range(workers):
                    tg.start_soon(self._worker, queue)
                for op, members in ordered:
                    tg.start_soon(self._run_member_add, op, members)
        finally:
            self._stage = None

    def _expect_prerequisites(self, queued: list[Op]) -> None:
        """Count, per user and group, the operations of phases 1-2 a member add must wait for."""
        for op in queued:
            if op.phase in PREREQUISITE_PHASES:
                counts = self._unfinished.setdefault(op.kind, {})
                counts[op.source_id] = counts.get(op.source_id, 0) + 1

    async def _worker(self, queue: Iterator[Op]) -> None:
        for op in queue:
            await self._run(op)

    # -- bookkeeping ----------------------------------------------------------------------

    def _request_flush(self) -> None:
        """Enough outcomes buffered: flush them beside the workers, one flush at a time."""
        if len(self._buffer) < FLUSH_EVERY or self._flushing or self._stage is None:
            return
        self._flushing = True
        self._stage.start_soon(self._flush_aside)

    async def _flush_aside(self) -> None:
        try:
            while len(self._buffer) >= FLUSH_EVERY:
                await self._flush()
        finally:
            self._flushing = False

    async def _flush(self) -> None:
        async with self._lock:
            outcomes, self._buffer = self._buffer, []
            users, self._user_upserts = list(self._user_upserts.values()), {}
            drops, self._user_drops = list(self._user_drops), set()
            groups, self._group_upserts = list(self._group_upserts.values()), {}
            gdrops, self._group_drops = list(self._group_drops), set()
            with anyio.CancelScope(shield=True):
                await self.store.write_links(self.target, users=users, groups=groups,
                                             drop_users=drops, drop_groups=gdrops)
                await self.store.record_outcomes(self.cycle_id, outcomes)

    def holder(self, kind: str, target_id: str) -> str | None:
        """The source id whose link holds this target object now, if any."""
        index = self._holders.get(kind)
        if index is None:
            links: Mapping[str, UserLink | GroupLink] = self.users if kind == "user" else self.groups
            index = self._holders[kind] = {link.target_id: sid for sid, link in links.items()}
        return index.get(target_id)

    def _taken_from(self, kind: str, source_id: str) -> Callable[[str], bool]:
        """For a lookup on behalf of `source_id`: is this target id held by another link?"""
        def taken(target_id: str) -> bool:
            return self.holder(kind, target_id) not in (None, source_id)
        return taken

    def _held_by_another(self, kind: str, source_id: str, target_id: str) -> bool:
        """Does a link other than `source_id`'s hold this target object now? (Links made by this
        apply, and every link once an index was built.) A removal then sends nothing."""
        claimed = self._claims.get((kind, target_id))
        if claimed is not None and claimed != source_id:
            return True
        index = self._holders.get(kind)
        holder = index.get(target_id) if index is not None else None
        return holder is not None and holder != source_id

    def _index(self, kind: str, old: UserLink | GroupLink | None, new: UserLink | GroupLink | None) -> None:
        if old is not None and self._claims.get((kind, old.target_id)) == old.source_id:
            del self._claims[(kind, old.target_id)]
        if new is not None:
            self._claims[(kind, new.target_id)] = new.source_id
        index = self._holders.get(kind)
        if index is None:
            return
        if old is not None and index.get(old.target_id) == old.source_id:
            del index[old.target_id]
        if new is not None:
            index[new.target_id] = new.source_id

    def _link_user(self, link: UserLink) -> None:
        current = self.users.get(link.source_id)
        moved = current is None or current.target_id != link.target_id
        if moved and self._held_by_another("user", link.source_id, link.target_id):
            holder = self._claims.get(("user", link.target_id)) or self.holder("user", link.target_id)
            # The rule "one PingOne id per target object", kept where links are made.
            raise TakenByAnotherLink(f"target user {link.target_id} is held by the link of {holder}")
        self._index("user", self.users.get(link.source_id), link)
        self.users[link.source_id] = link
        self._user_upserts[link.source_id] = link
        self._user_drops.discard(link.source_id)

    def _drop_user(self, source_id: str) -> None:
        """The user is gone from the target: so are its memberships there."""
        self._index("user", self.users.pop(source_id, None), None)
        self._user_upserts.pop(source_id, None)
        self._user_drops.add(source_id)
        for link in list(self.groups.values()):
            if source_id in link.members:
                self._link_group(replace(link, members=link.members - {source_id}))

    def _link_group(self, link: GroupLink) -> None:
        holder = self.holder("group", link.target_id)       # groups are few: always indexed
        if holder not in (None, link.source_id):
            raise TakenByAnotherLink(f"target group {link.target_id} is held by the link of {holder}")
        self._index("group", self.groups.get(link.source_id), link)
        self.groups[link.source_id] = link
        self._group_upserts[link.source_id] = link
        self._group_drops.discard(link.source_id)

    def _hand_over_user(self, old_id: str, link: UserLink) -> None:
        """The departed user's link is retired (no request) and its target object linked to the
        new user; the object's memberships follow it, under the new user's id."""
        self._index("user", self.users.pop(old_id, None), None)
        self._user_upserts.pop(old_id, None)
        self._user_drops.add(old_id)
        self._link_user(link)
        for glink in list(self.groups.values()):
            if old_id in glink.members:
                self._link_group(replace(glink, members=(glink.members - {old_id}) | {link.source_id}))

    def _drop_group(self, source_id: str) -> None:
        self._index("group", self.groups.pop(source_id, None), None)
        self._group_upserts.pop(source_id, None)
        self._group_drops.add(source_id)

    # -- one operation --------------------------------------------------------------------

    @asynccontextmanager
    async def _exclusive(self, kind: str, source_id: str) -> AsyncIterator[None]:
        """At most one write in flight per entity: an operation on a user or group waits here
        while another one on it is in flight (the planner plans one per entity and stage; this
        holds whatever the plan). Taken before a concurrency slot, so a waiter holds none."""
        key = (kind, source_id)
        while key in self._busy:
            event = anyio.Event()
            self._busy_waiters.setdefault(key, []).append(event)
            await event.wait()
        self._busy.add(key)
        try:
            yield
        finally:
            self._busy.discard(key)
            for event in self._busy_waiters.pop(key, ()):
                event.set()

    async def _run(self, op: Op) -> None:
        started = time.time()
        done: tuple[Outcome, dict[str, Any]] | None = None
        if self.health.stopped is None:
            async with self._exclusive(op.kind, op.source_id), self.limiter:
                if self.health.stopped is None:   # again: it may have stopped while this waited
                    holder = await self._mark_sent(op)
                    done = (self._busy_outcome(op, started, holder) if holder is not None
                            else await self._attempt(op, started, self._dispatch))
        if done is None:
            self._skip_stopped(op, started)
            return
        self._finish(op, *done)
        self._request_flush()

    async def _run_member_add(self, op: Op, members: list[str]) -> None:
        """One group's member add, pipelined: it takes a concurrency slot only to send a chunk."""
        await self._finished("group", op.source_id)   # its create or rename in this plan
        started = time.time()
        if self.health.stopped is not None:
            self._skip_stopped(op, started)
            return

        async def handler(op: Op, attempts: list[int]) -> Handled:
            return await self._group_add_members(op, attempts, members)

        async with self._exclusive(op.kind, op.source_id):
            outcome, extra = await self._attempt(op, started, handler)
        self._finish(op, outcome, extra)
        self._request_flush()

    def _skip_stopped(self, op: Op, started: float) -> None:
        assert self.health.stopped is not None
        outcome = Outcome(op.seq, SKIPPED, skip_reason=f"target_{self.health.stopped.reason}",
                          started=started, finished=time.time())
        self._finish(op, outcome, {"reason": outcome.skip_reason})
        self._request_flush()

    async def _attempt(self, op: Op, started: float, handler: Handler) -> tuple[Outcome, dict[str, Any]]:
        """Run the operation's handler; its outcome, whatever happened (a failure is contained)."""
        attempts: list[int] = []
        extra: dict[str, Any] = {}
        try:
            status, target_id, extra = await handler(op, attempts)
            outcome = Outcome(op.seq, status, attempts=sum(attempts) or 1, target_id=target_id,
                              started=started, finished=time.time(), skip_reason=extra.pop("skip_reason", None))
            self.health.record(False)
        except RemoteError as exc:
            transient = isinstance(exc, TransientError)
            self.health.record(transient)
            if isinstance(exc, Unauthorized | Forbidden) and self.health.stopped is None:
                self.health.stopped = TargetUnhealthy("auth_failed", str(exc))
            outcome = Outcome(op.seq, FAILED, attempts=sum(attempts) or 1, http_status=exc.status,
                              error=str(exc), scim_type=exc.scim_type, started=started, finished=time.time())
            extra["reason"] = exc.reason
        except _StoppedMidway as exc:
            outcome = Outcome(op.seq, FAILED, attempts=sum(attempts) or 1, error=str(exc),
                              started=started, finished=time.time())
            extra["reason"] = f"target_{exc.reason}"
        except TakenByAnotherLink as exc:
            outcome = Outcome(op.seq, FAILED, attempts=sum(attempts) or 1, error=str(exc)[:500],
                              started=started, finished=time.time())
            extra["reason"] = "taken_by_another_link"
        except Exception as exc:  # a defect or a hostile answer: contained to this entity
            self.health.record(False)
            outcome = Outcome(op.seq, FAILED, attempts=sum(attempts) or 1,
                              error=f"{type(exc).__name__}: {exc}"[:500], started=started, finished=time.time())
            extra["reason"] = "internal_error"
        return outcome, extra

    # -- dependencies within the first stage -------------------------------------------------

    async def _finished(self, kind: str, source_id: str) -> None:
        """Return once every phase 1-2 operation of this user/group in the stage has finished."""
        unfinished = self._unfinished.get(kind, {})
        while source_id in unfinished:
            event = anyio.Event()
            self._waiters.setdefault((kind, source_id), []).append(event)
            await event.wait()

    def _prerequisite_done(self, op: Op) -> None:
        unfinished = self._unfinished.get(op.kind, {})
        left = unfinished.get(op.source_id)
        if left is None:
            return
        if left > 1:
            unfinished[op.source_id] = left - 1
            return
        del unfinished[op.source_id]
        for event in self._waiters.pop((op.kind, op.source_id), ()):
            event.set()

    def _finish(self, op: Op, outcome: Outcome, extra: dict[str, Any]) -> None:
        self.result.outcomes[op.seq] = outcome
        self._buffer.append(outcome)
        self._done += 1
        if op.phase in PREREQUISITE_PHASES:
            self._prerequisite_done(op)   # a member add waiting on it may go on
        if self.progress is not None:
            self.progress(self._done, self._total)
        if outcome.status == APPLIED:
            event = f"{op.kind}.{extra.pop('event', PAST.get(op.op, op.op))}"
            method = self.log.info
        elif outcome.status == FAILED:
            event = f"{op.kind}.{op.op}_failed"
            method = self.log.warning
        else:
            event = f"{op.kind}.skipped"
            method = self.log.info
        fields: dict[str, Any] = {
            "source_id": op.source_id,
            "target_id": outcome.target_id or op.target_id,
            ("user" if op.kind == "user" else "group"): op.name,
            "op": op.op,
            "outcome": outcome.status,
            "reason": extra.pop("reason", None) or op.reason,
            "attempts": outcome.attempts,
            "duration_ms": round(((outcome.finished or 0) - (outcome.started or 0)) * 1000, 1),
        }
        if outcome.http_status is not None:
            fields["http_status"] = outcome.http_status
        if outcome.scim_type:
            fields["scim_type"] = outcome.scim_type
        if outcome.error:
            fields["error"] = outcome.error
        fields.update(extra)
        if op.kind == "user" and outcome.status == APPLIED:
            updated = self.source_updated.get(op.source_id)
            if updated:
                fields["source_updated_at"] = updated   # PingOne updatedAt: propagation latency
        method(event, **fields)
        if self.observer is not None:
            self.observer(event, {"target": self.target, "kind": op.kind, **fields})

    async def _dispatch(self, op: Op, attempts: list[int]) -> Handled:
        handler = getattr(self, f"_{op.kind}_{op.op}")
        result: Handled = await handler(op, attempts)
        return result

    # -- users ----------------------------------------------------------------------------

    async def _create_user(self, op: Op, attrs: dict[str, Any], attempts: list[int]) -> tuple[str, dict[str, Any]]:
        """POST; a 409 adopts the existing object (and updates it where it differs)."""
        try:
            created = await self.client.create_user(attrs, active=True, attempts=attempts)
        except Conflict:
            # Only an object named exactly so, and held by no other link (a rehire's departed
            # namesake is handed over by the planner, not taken here).
            existing = await self.client.find_user(op.name, taken=self._taken_from("user", op.source_id))
            if existing is None:
                raise
            target_id = str(existing["id"])
            current = read_user(existing, self.paths)
            create_only = op.payload.get("create_only", ())      # the target keeps its own values
            changed = {p: v for p, v in attrs.items() if current.get(p) != v and p not in create_only}
            active = read_active(existing)
            if changed or not active:
                await self.client.update_user(target_id, changed, full=attrs, active=True, attempts=attempts)
            self._link_user(UserLink(op.source_id, target_id, op.name, attrs, True, origin="adopted"))
            return target_id, {"event": "adopted", "reason": "existing_user_adopted",
                               "changed": sorted(changed)}
        target_id = str(created["id"])
        self._link_user(UserLink(op.source_id, target_id, op.name, attrs, True))
        return target_id, {}

    async def _user_create(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        target_id, extra = await self._create_user(op, dict(op.payload["attrs"]), attempts)
        return APPLIED, target_id, extra

    async def _recreate(self, op: Op, attrs: dict[str, Any], attempts: list[int]
                        ) -> tuple[str, str | None, dict[str, Any]]:
        """The target lost the object (404): create it again when creating is allowed."""
        self._drop_user(op.source_id)
        if not self.can_create:
            return SKIPPED, None, {"skip_reason": "gone_in_target", "reason": "gone_in_target"}
        target_id, extra = await self._create_user(op, attrs, attempts)
        extra.setdefault("reason", "recreated_after_404")
        return APPLIED, target_id, extra

    async def _user_update(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        link = self.users.get(op.source_id)
        assert op.target_id is not None
        attrs = dict(op.payload["attrs"])
        current = link.active if link is not None else True
        changed = dict(op.payload["changed"])
        if "userName" in changed and not self.client.profile.username_mutable:
            return await self._user_recreate(op, attrs, current, attempts)
        # A PATCH carries only the changes, never `active` (it is not this operation's to set);
        # a PUT must say it, as the link says now.
        active = current if self.client.update_method == "put" else None
        try:
            await self.client.update_user(op.target_id, changed, full=attrs,
                                          active=active, attempts=attempts)
        except NotFound:
            return await self._recreate(op, attrs, attempts)
        except BadRequest as exc:
            if exc.scim_type == "mutability" and "userName" in changed:
                return await self._user_recreate(op, attrs, current, attempts)   # the target refused it
            raise
        base = link or UserLink(op.source_id, op.target_id, op.name, attrs, True)
        self._link_user(replace(base, attrs=attrs, user_name=op.name))
        return APPLIED, op.target_id, {"changed": sorted(op.payload["changed"])}

    async def _user_recreate(self, op: Op, attrs: dict[str, Any], active: bool, attempts: list[int]
                             ) -> tuple[str, str | None, dict[str, Any]]:
        """A userName change the target refuses (the profile's `username_mutable` false, ZPA; or a
        400 `mutability`): create the account under the new userName, move the old one's
        memberships to it, then delete the old one (`user.recreated`, `username_changed`).

        A change of case only cannot have both accounts at once (userNames are unique without
        regard to case): the old one is deleted first. A new userName already taken in the target
        is taken over only when no other link holds that object (the account this path created
        before an interruption); otherwise the change fails and the old account stays."""
        old_id = op.target_id
        assert old_id is not None
        link = self.users.get(op.source_id)
        before = link.user_name if link is not None else None
        groups = [g for g in self.groups.values() if op.source_id in g.members]
        case_only = before is not None and before.lower() == op.name.lower()
        if case_only:
            await self._delete_old_account(old_id, attempts)
        try:
            created = await self.client.create_user(attrs, active=active, attempts=attempts)
            new_id = str(created["id"])
        except Conflict:
            existing = await self.client.find_user(op.name)
            held = existing is not None and any(
                u.target_id == str(existing["id"]) for sid, u in self.users.items() if sid != op.source_id)
            if existing is None or held or str(existing["id"]) == old_id:
                raise
            new_id = str(existing["id"])
            if read_active(existing) != active:
                await self.client.set_active(new_id, active, full=attrs, attempts=attempts)
        self._link_user(UserLink(op.source_id, new_id, op.name, attrs, active))
        moved = 0
        for group in groups:
            await self._finished("group", group.source_id)    # its create or rename in this plan
            async with self._group_lock(group.source_id):
                try:
                    await self.client.add_members(group.target_id, [new_id], attempts=attempts)
                    moved += 1
                except RemoteError:
                    # Not moved: the group's link forgets the member, so the next plan adds it.
                    current = self.groups.get(group.source_id)
                    if current is not None:
                        self._link_group(replace(current, members=current.members - {op.source_id}))
        if not case_only:
            await self._delete_old_account(old_id, attempts)
        return APPLIED, new_id, {"event": "recreated", "reason": "username_changed", "before": before,
                                 "old_target_id": old_id, "memberships_moved": moved,
                                 "memberships": len(groups)}

    async def _delete_old_account(self, target_id: str, attempts: list[int]) -> None:
        try:
            await self.client.delete_user(target_id, attempts=attempts)
        except NotFound:
            pass

    def _group_lock(self, source_id: str) -> anyio.Lock:
        """One member PATCH at a time on a group, whoever sends it (member adds, recreates)."""
        lock = self._group_locks.get(source_id)
        if lock is None:
            lock = self._group_locks[source_id] = anyio.Lock()
        return lock

    async def _user_enable(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        assert op.target_id is not None
        attrs = dict(op.payload["attrs"])
        changed = dict(op.payload.get("changed") or {})
        link = self.users.get(op.source_id)
        try:
            if changed:      # re-enabled with changes: one request, `active` and the changes
                await self.client.update_user(op.target_id, changed, full=attrs, active=True, attempts=attempts)
            else:
                await self.client.set_active(op.target_id, True, full=attrs, attempts=attempts)
        except NotFound:
            return await self._recreate(op, attrs, attempts)
        base = link or UserLink(op.source_id, op.target_id, op.name, attrs, True)
        new = replace(base, active=True, disabled_reason=None, disabled_at=None)
        if changed:
            new = replace(new, attrs=attrs, user_name=op.name)
        self._link_user(new)
        return APPLIED, op.target_id, {"changed": sorted(changed)} if changed else {}

    async def _user_disable(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        target = self._target_of(op)
        if target is None:
            return self._let_go(op)
        link = self.users.get(op.source_id)
        try:
            await self.client.set_active(target, False, full=dict(op.payload.get("attrs", {})),
                                         attempts=attempts)
        except NotFound:
            self._drop_user(op.source_id)
            return APPLIED, target, {"reason": "already_gone"}
        if self.active_false_deletes:
            # This target deletes a user set inactive (ZPA, UNCONFIRMED): nothing is left to link.
            self._drop_user(op.source_id)
        elif link is not None:
            self._link_user(replace(link, active=False, disabled_reason=op.reason, disabled_at=time.time()))
        return APPLIED, target, {}

    async def _user_delete(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        target = self._target_of(op)
        if target is None:
            return self._let_go(op)
        try:
            await self.client.delete_user(target, attempts=attempts)
        except NotFound:
            self._drop_user(op.source_id)
            return APPLIED, target, {"reason": "already_gone"}
        except Conflict as exc:
            # A standing refusal (ZIA: the user is linked to an admin account): the user and its
            # link stay; the engine keeps the refusal and asks again only at a full sync.
            reason = self.client.profile.delete_refused_reason
            return SKIPPED, target, {"skip_reason": reason, "reason": reason,
                                     "http_status": exc.status, "error": exc.detail}
        self._drop_user(op.source_id)
        return APPLIED, target, {}

    async def _user_adopt(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        """A rehire: take over the departed user's target object (planner, `ADOPTED_FROM_DEPARTED`).
        One request at most, built from the object's current link: the changed attributes and
        `active` where it differs. The departed link is retired without a request of its own."""
        assert op.target_id is not None
        old_id = str(op.payload["from_source_id"])
        old = self.users.get(old_id)
        if old is None or old.target_id != op.target_id or self._held_by_another("user", old_id, op.target_id):
            # The departed link changed since the plan was made: the next cycle plans again.
            return SKIPPED, op.target_id, {"skip_reason": "link_changed", "reason": "link_changed"}
        attrs = dict(op.payload["attrs"])
        changed = changed_attributes(attrs, old.attrs)
        want_active = bool(op.payload.get("active", True))
        extra: dict[str, Any] = {"from_source_id": old_id, "from_user": old.user_name, "changed": sorted(changed)}
        put = self.client.update_method == "put"
        if "userName" in changed and not self.client.profile.username_mutable:
            return await self._adopt_by_recreate(op, old, attrs, want_active, extra, attempts)
        if changed or want_active != old.active or put:
            try:
                await self.client.update_user(op.target_id, changed, full=attrs,
                                              active=want_active if want_active != old.active or put else None,
                                              attempts=attempts)
            except NotFound:
                self._drop_user(old_id)     # the object is gone: the new user is created
                if not want_active:
                    return SKIPPED, None, {"skip_reason": "gone_in_target", "reason": "gone_in_target"}
                return await self._recreate(op, attrs, attempts)
            except BadRequest as exc:
                if exc.scim_type == "mutability" and "userName" in changed:   # the target refused it
                    return await self._adopt_by_recreate(op, old, attrs, want_active, extra, attempts)
                raise
        current = self.users.get(old_id) or old
        link = UserLink(op.source_id, op.target_id, op.name, attrs, want_active, origin="adopted")
        if not want_active:
            link = replace(link, disabled_reason=DISABLED_IN_SOURCE, disabled_at=time.time())
        self._hand_over_user(current.source_id, link)
        if not want_active and self.active_false_deletes:
            self._drop_user(op.source_id)    # this target deletes a user set inactive
        return APPLIED, op.target_id, extra

    async def _adopt_by_recreate(self, op: Op, old: UserLink, attrs: dict[str, Any], active: bool,
                                 extra: dict[str, Any], attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        """A rehire whose userName differs (in case, say) where the target refuses userName
        changes: the departed link is handed over as it is (no request), then the new user's
        userName change takes the recreate path (`_user_recreate`: create, move memberships,
        delete the old account)."""
        assert op.target_id is not None
        current = self.users.get(old.source_id) or old
        self._hand_over_user(current.source_id, replace(current, source_id=op.source_id, origin="adopted",
                                                        disabled_reason=None, disabled_at=None))
        status, target_id, more = await self._user_recreate(op, attrs, active, attempts)
        more.pop("reason", None)     # the operation's own: adopted_from_departed
        return status, target_id, {**more, **extra, "event": "adopted", "recreated": True}

    async def _user_retire(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        """A departing link whose target object another link holds: forgotten, nothing sent."""
        link = self.users.get(op.source_id)
        if link is not None and link.target_id == op.target_id:
            self._drop_user(op.source_id)
        return APPLIED, op.target_id, {"holder": op.payload.get("holder")}

    def _target_of(self, op: Op) -> str | None:
        """The object a write for this entity goes to now: the one its link holds (it may have
        moved in this apply, e.g. a userName change applied as a recreate), else the planned one;
        None when another link holds that object (a rehire took it over, in this apply or before):
        then nothing is sent to it."""
        assert op.target_id is not None
        link = self.users.get(op.source_id) if op.kind == "user" else self.groups.get(op.source_id)
        target = link.target_id if link is not None else op.target_id
        return None if self._held_by_another(op.kind, op.source_id, target) else target

    def _let_go(self, op: Op) -> tuple[str, str | None, dict[str, Any]]:
        """The removal's object is another link's: this entity's link goes, nothing is sent."""
        if op.kind == "user" and op.source_id in self.users:
            self._drop_user(op.source_id)
        elif op.kind == "group" and op.source_id in self.groups:
            self._drop_group(op.source_id)
        return SKIPPED, op.target_id, {"skip_reason": HELD_BY_ANOTHER_LINK, "reason": HELD_BY_ANOTHER_LINK}

    # -- groups ---------------------------------------------------------------------------

    async def _group_adopt(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        """A group re-created in PingOne under its name takes over the departed group's object
        (and its members): a rename only where the name differs (in case), else no request."""
        assert op.target_id is not None
        old_id = str(op.payload["from_source_id"])
        old = self.groups.get(old_id)
        if old is None or old.target_id != op.target_id or self._held_by_another("group", old_id, op.target_id):
            return SKIPPED, op.target_id, {"skip_reason": "link_changed", "reason": "link_changed"}
        name = str(op.payload["display_name"])
        if name != old.display_name:
            try:
                await self.client.rename_group(op.target_id, name, attempts=attempts)
            except NotFound:
                self._drop_group(old_id)
                return SKIPPED, op.target_id, {"skip_reason": "gone_in_target", "reason": "gone_in_target"}
        current = self.groups.get(old_id) or old    # memberships may have moved meanwhile
        self._drop_group(old_id)
        self._link_group(replace(current, source_id=op.source_id, display_name=name))
        return APPLIED, op.target_id, {"from_source_id": old_id, "from_group": old.display_name}

    async def _group_create(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        name = str(op.payload["display_name"])
        try:
            created = await self.client.create_group(name, external_id=op.source_id, attempts=attempts)
        except Conflict:
            existing = await self.client.find_group(name, taken=self._taken_from("group", op.source_id))
            if existing is None:
                raise
            target_id = str(existing["id"])
            found = await self.client.group_member_ids(target_id)
            by_target = {link.target_id: sid for sid, link in self.users.items()}
            ours = frozenset(by_target[t] for t in (found or ()) if t in by_target)
            foreign = frozenset(t for t in (found or ()) if t not in by_target)
            self._link_group(GroupLink(op.source_id, target_id, name, ours, foreign, origin="adopted"))
            return APPLIED, target_id, {"event": "adopted", "reason": "existing_group_adopted",
                                        "foreign_members": len(foreign)}
        target_id = str(created["id"])
        self._link_group(GroupLink(op.source_id, target_id, name, frozenset()))
        return APPLIED, target_id, {}

    async def _group_rename(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        assert op.target_id is not None
        name = str(op.payload["display_name"])
        try:
            await self.client.rename_group(op.target_id, name, attempts=attempts)
        except NotFound:
            self._drop_group(op.source_id)
            return SKIPPED, op.target_id, {"skip_reason": "gone_in_target", "reason": "gone_in_target"}
        link = self.groups.get(op.source_id)
        if link is not None:
            self._link_group(replace(link, display_name=name))
        return APPLIED, op.target_id, {"before": op.payload.get("before")}

    async def _group_add_members(self, op: Op, attempts: list[int], members: list[str] | None = None
                                 ) -> Handled:
        """Add the op's members chunk by chunk (at most `membership_batch` each, as the client
        would), a chunk once every member in it has finished its user operations of this stage;
        `members` is the op's `source_ids` in the order to send them. Chunks go one after
        another: never two PATCHes on one group at once."""
        link = self.groups.get(op.source_id)
        if link is None:
            return SKIPPED, None, {"skip_reason": "dependency_failed", "reason": "group_not_created"}
        wanted = members if members is not None else [str(s) for s in op.payload["source_ids"]]
        batch = max(1, int(self.client.membership_batch))
        group_id = link.target_id
        resolved = 0                  # wanted members that exist in the target
        requests = 0
        added: list[str] = []         # source ids really added (sent in a chunk that succeeded)
        chunk: list[str] = []         # source ids resolved, not yet sent
        chunk_ids: list[str] = []     # their target ids, without repeats
        seen: set[str] = set()
        refused: list[str] = []       # target ids the target refused one by one (400)
        refusal: list[BadRequest] = []

        async def post(ids: list[str]) -> None:
            nonlocal requests
            async with self.limiter:
                if self.health.stopped is not None:   # nothing more is sent to a stopped target
                    if not requests:
                        raise _NotStarted
                    raise _StoppedMidway(self.health.stopped.reason)
                if not requests and (holder := await self._mark_sent(op)) is not None:
                    raise _Busy(holder)
                try:
                    async with self._group_lock(op.source_id):
                        requests += await self.client.add_members(group_id, ids, attempts=attempts)
                except NotFound:
                    self._drop_group(op.source_id)
                    raise
                except BadRequest:
                    requests += 1
                    raise

        async def send(sids: list[str], ids: list[str], *, top: bool = True) -> None:
            """A chunk refused with 400 (ZIA refuses the whole PATCH for one user over its groups
            cap) is split in halves until the members at fault are alone: the rest go in. A chunk
            every member of which is refused is a systematic refusal, not one member's: raised."""
            try:
                await post(ids)
            except BadRequest as exc:
                if len(ids) == 1:
                    refused.append(ids[0])
                    refusal[:] = [exc]
                    return
                before = len(refused)
                half = len(ids) // 2
                for part in (ids[:half], ids[half:]):
                    part_set = set(part)
                    await send([s for s in sids if self.users[s].target_id in part_set], part, top=False)
                if top and len(refused) - before == len(ids):
                    raise exc from None
                return
            added.extend(sids)

        try:
            for start in range(0, len(wanted), batch):
                window = wanted[start:start + batch]
                # The last one queued first: when it has finished, the others mostly have too.
                for sid in reversed(window):
                    await self._finished("user", sid)
                for sid in window:
                    user = self.users.get(sid)
                    if user is None:
                        continue      # not created (failed, skipped, never provisionable)
                    resolved += 1
                    chunk.append(sid)
                    if user.target_id not in seen:
                        seen.add(user.target_id)
                        chunk_ids.append(user.target_id)
                    if len(chunk_ids) == batch:
                        await send(chunk, chunk_ids)
                        chunk, chunk_ids = [], []
            if chunk_ids:
                await send(chunk, chunk_ids)
        except _Busy as busy:
            _, extra = self._busy_outcome(op, time.time(), busy.holder)
            return SKIPPED, None, {"skip_reason": BUSY, **extra}
        except _NotStarted:
            assert self.health.stopped is not None
            reason = f"target_{self.health.stopped.reason}"
            return SKIPPED, None, {"skip_reason": reason, "reason": reason}
        finally:
            current = self.groups.get(op.source_id)
            if added and current is not None:
                self._link_group(replace(current, members=current.members | set(added)))
        if refused:
            # The others went in (and are linked, above); the op fails for the members refused.
            first = refusal[0]
            shown = ", ".join(refused[:10]) + (", …" if len(refused) > 10 else "")
            raise BadRequest(f"{len(refused)} of {resolved} member(s) refused (target ids {shown}); the others "
                             f"were added: {first.detail}", method=first.method, path=first.path,
                             scim_type=first.scim_type)
        if not resolved:
            return SKIPPED, group_id, {"skip_reason": "dependency_failed", "reason": "members_not_created",
                                       "members": 0}
        return APPLIED, group_id, {"members": resolved, "requests": requests,
                                   "unresolved": len(wanted) - resolved}

    async def _group_remove_members(self, op: Op, attempts: list[int]
                                    ) -> tuple[str, str | None, dict[str, Any]]:
        link = self.groups.get(op.source_id)
        if link is None:
            return SKIPPED, None, {"skip_reason": "dependency_failed", "reason": "group_not_linked"}
        source_ids = [str(s) for s in op.payload.get("source_ids", ())]
        foreign = [str(t) for t in op.payload.get("target_ids", ())]
        target_ids = [self.users[s].target_id for s in source_ids if s in self.users] + foreign
        requests = 0
        if target_ids:
            try:
                requests = await self.client.remove_members(link.target_id, target_ids, attempts=attempts)
            except NotFound:
                self._drop_group(op.source_id)
                raise
        self._link_group(replace(link, members=link.members - set(source_ids), foreign=link.foreign - set(foreign)))
        return APPLIED, link.target_id, {"members": len(target_ids), "requests": requests}

    async def _group_release(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        """An adopted group no longer pushed: forget it, send nothing (it was not ours to delete)."""
        self._drop_group(op.source_id)
        return APPLIED, op.target_id, {}

    async def _group_delete(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        target = self._target_of(op)
        if target is None:
            return self._let_go(op)
        try:
            await self.client.delete_group(target, attempts=attempts)
        except NotFound:
            self._drop_group(op.source_id)
            return APPLIED, target, {"reason": "already_gone"}
        self._drop_group(op.source_id)
        return APPLIED, target, {}
