"""Approvals of held removals: an approval names the held plan it releases, and releases only that.

A target's cycle whose removals exceed `max_deletes` holds them (operation status `held`, in the
state file under that cycle's id: the plan id `status` shows). `provisiond approve --target T
[--plan ID]` records an approval of that plan; the target's next cycle releases exactly the
removals that plan held (by entity: `kind:source_id`). A removal the plan did not hold is judged
by `max_deletes` again, so a later, different mass removal is held again. With nothing held, an
approval is refused and nothing is written.

Every reader and writer of approvals goes through this module (the engine, `sync-user`, the
CLI), so that what "approved" means lives in one place:

    approve(store, target, plan_id)      the CLI: record an approval of a held plan (or refuse)
    in_effect(store, target)             the planner's input: the approval and what it releases
    consume(store, target, approval)     after the cycle that planned with it; an approval given
                                         since (a newer one) is kept for the next cycle
    held_removal(store, target, k, id)   whether the latest plan held one entity's removal (sync-user)
    used_up(approval, applied)           whether a one-user apply used all an approval releases
    held_plan(store, target, plan_id)    what a plan held (for `status` and the CLI)

`requests(store)` is what the running daemon reads every second between cycles: the approvals,
resync requests, accepted shrinks and approved reloads that other processes wrote, so that it
acts on them at once (README "When cycles run").

A reload held by its impact preview is recorded too (`record_held_reload`), so that `approve
--reload` with nothing staged is refused and `status` shows the staged reload.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Final

from daemon.store import CYCLE_KIND, Store

META_APPROVED_PLAN: Final = "approval.plan"      # "approval.plan.<target>": the approved plan id
META_RELOAD_HELD: Final = "reload.held"           # JSON of the reload the running daemon holds
META_RELOAD_APPROVED: Final = "reload.approved"   # the id of the staged reload `approve --reload` took
META_SOURCE_SHRUNK: Final = "source.shrunk"       # JSON of the shrunk snapshot the gate refused
META_ACCEPT_SHRINK: Final = "source.accept_shrink"   # the user count `approve --source-shrink` took
META_RESYNC: Final = "resync.requested"         # "resync.requested.<target>": `provisiond resync`'s token
# "changes.missed.<target>": when an incremental cycle last left this target without a batch of
# changes (quarantined, failed, or held removals): its next full cycle is owed at once.
META_MISSED_CHANGES: Final = "changes.missed"
MEMBER_REMOVAL: Final = "remove_members"


class NothingHeld(Exception):
    """`approve` found no held plan to release (or not the one named)."""


@dataclass(frozen=True, slots=True)
class HeldPlan:
    """What one cycle of one target held: its removals by operation, and the member removals."""

    target: str
    plan_id: int                                   # the cycle id that held it
    removals: dict[str, int] = field(default_factory=dict)   # op -> count ("disable": 97)
    member_removals: int = 0
    held_at: float | None = None

    @property
    def total_removals(self) -> int:
        return sum(self.removals.values())

    def text(self) -> str:
        """ "plan 42: 97 removals (disable 97) and 3 member removals" """
        ops = ", ".join(f"{op} {count}" for op, count in sorted(self.removals.items()))
        members = f" and {self.member_removals} group member removal(s)" if self.member_removals else ""
        return f"plan {self.plan_id}: {self.total_removals} removal(s) ({ops}){members}"

    def as_dict(self) -> dict[str, Any]:
        return {"plan": self.plan_id, "removals": self.total_removals, "by_op": dict(self.removals),
                "member_removals": self.member_removals, "held_at": self.held_at}


@dataclass(frozen=True, slots=True)
class Approval:
    """An approval in effect: the plan it names and the removals it releases (`kind:source_id`)."""

    target: str
    plan_id: int
    granted: float
    releases: frozenset[str]


def removal_key(kind: str, source_id: str) -> str:
    """How a released removal is named: one entity, whatever the removal op (disable or delete)."""
    return f"{kind}:{source_id}"


async def held_plan(store: Store, target: str, plan_id: int | None = None) -> HeldPlan | None:
    """The plan `plan_id` of `target` (default: its latest cycle) when it held anything, else None."""
    if plan_id is None:
        async with store.db.execute("SELECT max(id) FROM cycle WHERE target=? AND kind=?",
                                    (target, CYCLE_KIND)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return None
        plan_id = int(row[0])
    async with store.db.execute(
            "SELECT o.op, count(*), c.started FROM operation o JOIN cycle c ON c.id = o.cycle_id "
            "WHERE o.cycle_id=? AND o.target=? AND c.target=? AND c.kind=? AND o.status='held' "
            "GROUP BY o.op", (plan_id, target, target, CYCLE_KIND)) as cur:
        rows = [(str(r[0]), int(r[1]), r[2]) async for r in cur]
    removals = {op: count for op, count, _ in rows if op != MEMBER_REMOVAL}
    members = sum(count for op, count, _ in rows if op == MEMBER_REMOVAL)
    if not removals and not members:
        return None
    return HeldPlan(target, plan_id, removals, members, rows[0][2])


async def approve(store: Store, target: str, plan_id: int | None = None) -> HeldPlan:
    """Approve the held plan `plan_id` (default: the target's latest plan); NothingHeld if none."""
    held = await held_plan(store, target, plan_id)
    if held is None:
        which = f"plan {plan_id}" if plan_id is not None else "its latest cycle"
        raise NothingHeld(f"target {target}: nothing is held in {which}")
    await store.set_meta(f"{META_APPROVED_PLAN}.{target}", str(held.plan_id))
    await store.approve(target)   # its `granted` is strictly later than any before it
    return held


async def pending(store: Store, target: str) -> int | None:
    """The plan id an approval of `target` names, while it is not consumed; None without one."""
    async with store.db.execute("SELECT 1 FROM approval WHERE target=?", (target,)) as cur:
        if await cur.fetchone() is None:
            return None
    value = await store.get_meta(f"{META_APPROVED_PLAN}.{target}")
    return int(value) if value is not None and value.isdigit() else None


async def in_effect(store: Store, target: str) -> Approval | None:
    """The approval a plan of `target` made now honours, with the removals it releases; or None.

    An approval without a plan id (written by an older provisiond) releases nothing: a blind
    approval is never honoured.
    """
    async with store.db.execute("SELECT granted FROM approval WHERE target=?", (target,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    plan_id = await pending(store, target)
    if plan_id is None:
        return Approval(target, -1, float(row[0]), frozenset())
    async with store.db.execute(
            "SELECT kind, source_id FROM operation WHERE cycle_id=? AND target=? AND status='held' "
            "AND op != ?", (plan_id, target, MEMBER_REMOVAL)) as cur:
        releases = frozenset([removal_key(str(r[0]), str(r[1])) async for r in cur])
    return Approval(target, plan_id, float(row[0]), releases)


async def consume(store: Store, target: str, approval: Approval | None) -> None:
    """Drop `approval` once a cycle planned with it; a newer approval (given since) stays."""
    if approval is None:
        return
    async with store.transaction() as db:
        async with db.execute("SELECT granted FROM approval WHERE target=?", (target,)) as cur:
            row = await cur.fetchone()
        if row is None or float(row[0]) != approval.granted:
            return
        await db.execute("DELETE FROM approval WHERE target=?", (target,))
        await db.execute("DELETE FROM meta WHERE key=?", (f"{META_APPROVED_PLAN}.{target}",))


async def held_removal(store: Store, target: str, kind: str, source_id: str) -> int | None:
    """The target's latest plan (its latest daemon cycle), when it held this entity's removal; else None.

    `sync-user` holds such a removal unless an approval releases it: a held mass removal is not
    sent piecewise, one user at a time, without the approval of the plan that held it.
    """
    async with store.db.execute("SELECT max(id) FROM cycle WHERE target=? AND kind=?", (target, CYCLE_KIND)) as cur:
        row = await cur.fetchone()
    if row is None or row[0] is None:
        return None
    plan_id = int(row[0])
    async with store.db.execute(
            "SELECT 1 FROM operation WHERE cycle_id=? AND target=? AND kind=? AND source_id=? "
            "AND status='held' AND op != ? LIMIT 1", (plan_id, target, kind, source_id, MEMBER_REMOVAL)) as cur:
        return plan_id if await cur.fetchone() is not None else None


async def held_anew(store: Store, target: str, cycle_id: int) -> int:
    """How many removals cycle *cycle_id* (an incremental one) held that the target's latest full
    plan did not already hold. Only those make the target's full cycle owed: one the latest plan
    holds waits for its approval, and planning it again would hold it again (the feed hands a
    held batch on again after each full snapshot, which would run a full cycle per poll)."""
    async with store.db.execute(
            "SELECT count(*) FROM operation o WHERE o.cycle_id=? AND o.target=? AND o.status='held' "
            "AND o.op != ? AND NOT EXISTS (SELECT 1 FROM operation p WHERE p.cycle_id="
            "(SELECT max(id) FROM cycle WHERE target=? AND kind=?) AND p.target=o.target AND p.kind=o.kind "
            "AND p.source_id=o.source_id AND p.status='held' AND p.op != ?)",
            (cycle_id, target, MEMBER_REMOVAL, target, CYCLE_KIND, MEMBER_REMOVAL)) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


def used_up(approval: Approval | None, applied: frozenset[str]) -> bool:
    """Whether a partial apply (`sync-user`: one user's removals, `applied`) used all `approval`
    releases. Only then is it consumed; otherwise the removals it still releases are the next
    cycle's, which consumes it as usual. An approval releasing nothing is left to the cycle."""
    return approval is not None and bool(approval.releases) and approval.releases <= applied


# -- held reloads ---------------------------------------------------------------------------------


async def record_held_reload(store: Store, path: str, targets: dict[str, Any]) -> str:
    """The running daemon holds a reload (its impact preview removes too much): say so in the store.

    Returns the staged reload's id; `approve --reload` approves that id only, so a reload staged
    after the operator looked is not activated by the approval of the one before.
    """
    reload_id = f"{time.time():.6f}"
    await store.set_meta(META_RELOAD_HELD, json.dumps({"id": reload_id, "path": path, "held_at": time.time(),
                                                       "targets": targets}, sort_keys=True, default=str))
    await store.set_meta(META_RELOAD_APPROVED, "0")
    return reload_id


async def approve_reload(store: Store) -> dict[str, Any]:
    """Approve the reload the running daemon holds; NothingHeld when none is staged."""
    held = await held_reload(store)
    if held is None or not isinstance(held.get("id"), str):
        raise NothingHeld("no reload is staged: the running daemon holds none")
    await store.set_meta(META_RELOAD_APPROVED, held["id"])
    return held


async def reload_approved(store: Store, reload_id: str | None) -> bool:
    """Whether the staged reload `reload_id` has been approved."""
    return reload_id is not None and await store.get_meta(META_RELOAD_APPROVED) == reload_id


async def held_reload(store: Store) -> dict[str, Any] | None:
    """The reload a running daemon holds, or None."""
    value = await store.get_meta(META_RELOAD_HELD)
    if not value:
        return None
    try:
        found = json.loads(value)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


async def clear_held_reload(store: Store) -> None:
    """No reload is held any more (taken, replaced by a good one, or the daemon restarted)."""
    await store.set_meta(META_RELOAD_HELD, "")
    await store.set_meta(META_RELOAD_APPROVED, "0")


# -- a shrunk source snapshot ---------------------------------------------------------------------


async def record_shrunk(store: Store, users: int, last_good_users: int) -> None:
    """The gate refused a shrunk snapshot (removals deferred for every target): say how shrunk."""
    await store.set_meta(META_SOURCE_SHRUNK, json.dumps({"users": users, "last_good_users": last_good_users,
                                                         "at": time.time()}))


async def shrunk(store: Store) -> dict[str, Any] | None:
    """The last shrunk snapshot the gate refused, while no snapshot has passed since; or None."""
    value = await store.get_meta(META_SOURCE_SHRUNK)
    try:
        found = json.loads(value) if value else None
    except ValueError:
        return None
    return found if isinstance(found, dict) and isinstance(found.get("users"), int) else None


async def clear_shrunk(store: Store) -> None:
    if await store.get_meta(META_SOURCE_SHRUNK):
        await store.set_meta(META_SOURCE_SHRUNK, "")


async def accept_shrink(store: Store) -> dict[str, Any]:
    """Accept the shrunk snapshot the gate refused: a next one of at least that many users passes."""
    found = await shrunk(store)
    if found is None:
        raise NothingHeld("no shrunk source snapshot is waiting: nothing to accept")
    await store.set_meta(META_ACCEPT_SHRINK, str(found["users"]))
    return found


def shrink_accepted(accepted: str | None, users: int) -> bool:
    """Whether an acceptance (the user count the operator accepted) covers a snapshot of `users`."""
    return accepted is not None and accepted.isdigit() and int(accepted) > 0 and users >= int(accepted)


# -- what the running daemon is asked for ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requests:
    """The state file's requests to the running daemon as they stand now, each with the value
    that names it (a new request has a new value)."""

    approved: dict[str, float] = field(default_factory=dict)   # target -> when its approval was granted
    resync: dict[str, str] = field(default_factory=dict)       # target -> the `resync` token
    missed: dict[str, float] = field(default_factory=dict)     # target -> when it last missed changes
    reload_approved: str | None = None                          # the staged reload's id, once approved
    accept_shrink: str | None = None                            # the user count `--source-shrink` took


async def requests(store: Store) -> Requests:
    """Every request in two reads (the daemon asks every second)."""
    found = Requests()
    async with store.db.execute(
            "SELECT key, value FROM meta WHERE key GLOB ? OR key GLOB ? OR key IN (?, ?)",
            (f"{META_RESYNC}.*", f"{META_MISSED_CHANGES}.*", META_RELOAD_APPROVED, META_ACCEPT_SHRINK)) as cur:
        rows = [(str(r[0]), str(r[1])) async for r in cur]
    for key, value in rows:
        if key == META_RELOAD_APPROVED:
            found = replace(found, reload_approved=value if value not in ("", "0") else None)
        elif key == META_ACCEPT_SHRINK:
            found = replace(found, accept_shrink=value if value.isdigit() and int(value) > 0 else None)
        elif key.startswith(f"{META_RESYNC}.") and value:
            found.resync[key[len(META_RESYNC) + 1:]] = value
        elif key.startswith(f"{META_MISSED_CHANGES}.") and value:
            try:
                found.missed[key[len(META_MISSED_CHANGES) + 1:]] = float(value)
            except ValueError:
                continue
    async with store.db.execute("SELECT target, granted FROM approval") as cur:
        async for row in cur:
            found.approved[str(row[0])] = float(row[1])
    return found
