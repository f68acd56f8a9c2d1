"""Apply a plan to one target: phases in order, bounded concurrency within a phase.

Each operation is journaled `in_flight` before its request and its outcome written after it
(in batches); links change only on success. A failure is contained to its entity: it is
recorded, logged with who, what and why, and the others go on. Only a target that refuses
our credentials (401/403), or whose recent requests mostly fail transiently, stops the apply
early: the rest is recorded `skipped` with the reason, and the engine quarantines it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from daemon.errors import Conflict, Forbidden, NotFound, RemoteError, TransientError, Unauthorized
from daemon.planner import PENDING, GroupLink, Op, UserLink
from daemon.store import Outcome, Store
from daemon.target.resource import read_active, read_user
from daemon.target.scim import ScimClient

FLUSH_EVERY = 200
UNHEALTHY_WINDOW = 20       # the last N request outcomes considered
UNHEALTHY_RATIO = 0.8       # transient failures among them that stop the apply

APPLIED = "applied"
FAILED = "failed"
SKIPPED = "skipped"

PAST = {
    "create": "created", "update": "updated", "enable": "enabled", "disable": "disabled",
    "delete": "deleted", "rename": "renamed", "add_members": "members_added",
    "remove_members": "members_removed", "release": "released",
}

Progress = Callable[[int, int], None]
Observer = Callable[[str, dict[str, Any]], None]   # (event name, event fields incl. target)


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
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=UNHEALTHY_WINDOW))
    stopped: TargetUnhealthy | None = None

    def record(self, transient_failure: bool) -> None:
        self.recent.append(transient_failure)
        if (self.stopped is None and len(self.recent) == UNHEALTHY_WINDOW
                and sum(self.recent) >= UNHEALTHY_RATIO * UNHEALTHY_WINDOW):
            self.stopped = TargetUnhealthy(
                "mostly_failing", f"{sum(self.recent)} of the last {UNHEALTHY_WINDOW} operations failed transiently")


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
        self.health = _Health()
        self.result = ApplyResult()
        self._buffer: list[Outcome] = []
        self._user_upserts: dict[str, UserLink] = {}
        self._user_drops: set[str] = set()
        self._group_upserts: dict[str, GroupLink] = {}
        self._group_drops: set[str] = set()
        self._lock = anyio.Lock()
        self._done = 0
        self._total = 0

    async def apply(self, ops: Iterable[Op]) -> ApplyResult:
        pending = [op for op in ops if op.status == PENDING]
        self._total = len(pending)
        phases: dict[int, list[Op]] = {}
        for op in pending:
            phases.setdefault(op.phase, []).append(op)
        try:
            for phase in sorted(phases):
                batch = phases[phase]
                await self.store.mark_in_flight(self.cycle_id, [op.seq for op in batch])
                # A pool of workers pulls from one queue: 100,000 creates are not 100,000 tasks.
                queue = iter(batch)
                workers = max(1, min(len(batch), int(self.limiter.total_tokens)))
                async with anyio.create_task_group() as tg:
                    for _ in range(workers):
                        tg.start_soon(self._worker, queue)
                await self._flush()
        finally:
            # Stopped midway (SIGTERM, grace expired): what finished is recorded with its links,
            # so the next start neither repeats it nor loses it; the rest stays in_flight.
            with anyio.CancelScope(shield=True):
                await self._flush()
        self.result.stopped = self.health.stopped
        return self.result

    async def _worker(self, queue: Iterator[Op]) -> None:
        for op in queue:
            await self._run(op)

    # -- bookkeeping ----------------------------------------------------------------------

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

    def _link_user(self, link: UserLink) -> None:
        self.users[link.source_id] = link
        self._user_upserts[link.source_id] = link
        self._user_drops.discard(link.source_id)

    def _drop_user(self, source_id: str) -> None:
        """The user is gone from the target: so are its memberships there."""
        self.users.pop(source_id, None)
        self._user_upserts.pop(source_id, None)
        self._user_drops.add(source_id)
        for link in list(self.groups.values()):
            if source_id in link.members:
                self._link_group(replace(link, members=link.members - {source_id}))

    def _link_group(self, link: GroupLink) -> None:
        self.groups[link.source_id] = link
        self._group_upserts[link.source_id] = link
        self._group_drops.discard(link.source_id)

    def _drop_group(self, source_id: str) -> None:
        self.groups.pop(source_id, None)
        self._group_upserts.pop(source_id, None)
        self._group_drops.add(source_id)

    # -- one operation --------------------------------------------------------------------

    async def _run(self, op: Op) -> None:
        started = time.time()
        attempts: list[int] = []
        extra: dict[str, Any] = {}
        if self.health.stopped is not None:
            outcome = Outcome(op.seq, SKIPPED, skip_reason=f"target_{self.health.stopped.reason}",
                              started=started, finished=time.time())
            self._finish(op, outcome, {"reason": outcome.skip_reason})
            return
        async with self.limiter:
            try:
                status, target_id, extra = await self._dispatch(op, attempts)
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
            except Exception as exc:  # a defect or a hostile answer: contained to this entity
                self.health.record(False)
                outcome = Outcome(op.seq, FAILED, attempts=sum(attempts) or 1,
                                  error=f"{type(exc).__name__}: {exc}"[:500], started=started, finished=time.time())
                extra["reason"] = "internal_error"
        self._finish(op, outcome, extra)
        if len(self._buffer) >= FLUSH_EVERY:
            await self._flush()

    def _finish(self, op: Op, outcome: Outcome, extra: dict[str, Any]) -> None:
        self.result.outcomes[op.seq] = outcome
        self._buffer.append(outcome)
        self._done += 1
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

    async def _dispatch(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        handler = getattr(self, f"_{op.kind}_{op.op}")
        result: tuple[str, str | None, dict[str, Any]] = await handler(op, attempts)
        return result

    # -- users ----------------------------------------------------------------------------

    async def _create_user(self, op: Op, attrs: dict[str, Any], attempts: list[int]) -> tuple[str, dict[str, Any]]:
        """POST; a 409 adopts the existing object (and updates it where it differs)."""
        try:
            created = await self.client.create_user(attrs, active=True, attempts=attempts)
        except Conflict:
            existing = await self.client.find_user(op.name)
            if existing is None:
                raise
            target_id = str(existing["id"])
            current = read_user(existing, self.paths)
            changed = {p: v for p, v in attrs.items() if current.get(p) != v}
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
        active = link.active if link is not None else True
        try:
            await self.client.update_user(op.target_id, dict(op.payload["changed"]), full=attrs,
                                          active=active, attempts=attempts)
        except NotFound:
            return await self._recreate(op, attrs, attempts)
        base = link or UserLink(op.source_id, op.target_id, op.name, attrs, True)
        self._link_user(replace(base, attrs=attrs, user_name=op.name))
        return APPLIED, op.target_id, {"changed": sorted(op.payload["changed"])}

    async def _user_enable(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        assert op.target_id is not None
        attrs = dict(op.payload["attrs"])
        link = self.users.get(op.source_id)
        try:
            await self.client.set_active(op.target_id, True, full=attrs, attempts=attempts)
        except NotFound:
            return await self._recreate(op, attrs, attempts)
        base = link or UserLink(op.source_id, op.target_id, op.name, attrs, True)
        self._link_user(replace(base, active=True, disabled_reason=None, disabled_at=None))
        return APPLIED, op.target_id, {}

    async def _user_disable(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        assert op.target_id is not None
        link = self.users.get(op.source_id)
        try:
            await self.client.set_active(op.target_id, False, full=dict(op.payload.get("attrs", {})),
                                         attempts=attempts)
        except NotFound:
            self._drop_user(op.source_id)
            return APPLIED, op.target_id, {"reason": "already_gone"}
        if self.active_false_deletes:
            # This target deletes a user set inactive (ZPA, UNCONFIRMED): nothing is left to link.
            self._drop_user(op.source_id)
        elif link is not None:
            self._link_user(replace(link, active=False, disabled_reason=op.reason, disabled_at=time.time()))
        return APPLIED, op.target_id, {}

    async def _user_delete(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        assert op.target_id is not None
        try:
            await self.client.delete_user(op.target_id, attempts=attempts)
        except NotFound:
            self._drop_user(op.source_id)
            return APPLIED, op.target_id, {"reason": "already_gone"}
        self._drop_user(op.source_id)
        return APPLIED, op.target_id, {}

    # -- groups ---------------------------------------------------------------------------

    async def _group_create(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        name = str(op.payload["display_name"])
        try:
            created = await self.client.create_group(name, external_id=op.source_id, attempts=attempts)
        except Conflict:
            existing = await self.client.find_group(name)
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

    async def _group_add_members(self, op: Op, attempts: list[int]) -> tuple[str, str | None, dict[str, Any]]:
        link = self.groups.get(op.source_id)
        if link is None:
            return SKIPPED, None, {"skip_reason": "dependency_failed", "reason": "group_not_created"}
        wanted = [str(s) for s in op.payload["source_ids"]]
        resolved = [(sid, self.users[sid].target_id) for sid in wanted if sid in self.users]
        if not resolved:
            return SKIPPED, link.target_id, {"skip_reason": "dependency_failed", "reason": "members_not_created",
                                             "members": 0}
        try:
            requests = await self.client.add_members(link.target_id, [t for _, t in resolved], attempts=attempts)
        except NotFound:
            self._drop_group(op.source_id)
            raise
        self._link_group(replace(link, members=link.members | {s for s, _ in resolved}))
        return APPLIED, link.target_id, {"members": len(resolved), "requests": requests,
                                         "unresolved": len(wanted) - len(resolved)}

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
        assert op.target_id is not None
        try:
            await self.client.delete_group(op.target_id, attempts=attempts)
        except NotFound:
            self._drop_group(op.source_id)
            return APPLIED, op.target_id, {"reason": "already_gone"}
        self._drop_group(op.source_id)
        return APPLIED, op.target_id, {}
