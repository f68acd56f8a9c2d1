"""Standing refusals: requests a target refuses for good, so that they are not re-sent every cycle.

ZIA refuses to delete a user linked to an admin account: DELETE answers 409 "Admin user cannot
be deleted" (zscaler-scim.md §9). Sending it again every cycle changes nothing and fills the
logs, so the applier records the refusal as `skipped` (reason: the profile's
`delete_refused_reason`, `admin_linked` on ZIA), the engine keeps it here (per target, in the
state file's meta table), and later cycles plan the delete as `skipped` with that reason without
sending it — until a full sync, which asks once more (an operator may have unlinked the admin).
A refusal ends when the user is deleted, comes back in scope, or its link goes.

Pure functions over plans and outcomes, and two small store calls.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

from daemon.links import PENDING, SKIPPED, Op, Plan
from daemon.store import Outcome, Store

META_REFUSALS = "refusals"     # "refusals.<target>": JSON {source id: reason}


def _refusable(op: Op) -> bool:
    return op.kind == "user" and op.op == "delete"


async def load(store: Store, target: str) -> dict[str, str]:
    raw = await store.get_meta(f"{META_REFUSALS}.{target}")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}      # unreadable: every delete is simply asked again
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


async def save(store: Store, target: str, refused: Mapping[str, str]) -> None:
    await store.set_meta(f"{META_REFUSALS}.{target}", json.dumps(dict(sorted(refused.items()))))


def hold(plan: Plan, refused: Mapping[str, str], *, full_sync: bool) -> int:
    """Pending deletes of users whose delete the target refused become `skipped` with the
    refusal's reason; at a full sync they are sent again. The number held back."""
    if full_sync or not refused:
        return 0
    held = 0
    ops: list[Op] = []
    for op in plan.ops:
        reason = refused.get(op.source_id) if _refusable(op) and op.status == PENDING else None
        if reason is None:
            ops.append(op)
            continue
        ops.append(Op(op.seq, op.phase, op.kind, op.op, op.source_id, op.target_id, op.name, op.reason,
                      op.payload, SKIPPED, reason))
        held += 1
    plan.ops = ops
    return held


def after_apply(refused: Mapping[str, str], plan: Plan, outcomes: Mapping[int, Outcome],
                linked: Collection[str], desired: Collection[str], *, reason: str) -> dict[str, str]:
    """The refusals that stand after this cycle: the old ones whose user is still linked and
    still not wanted, less those whose delete went through now, plus the new ones (a delete
    `skipped` by the applier with *reason*, the profile's `delete_refused_reason`)."""
    out = {sid: reason for sid, reason in refused.items() if sid in linked and sid not in desired}
    for op in plan.ops:
        if not _refusable(op):
            continue
        outcome = outcomes.get(op.seq)
        if outcome is None:
            continue
        if outcome.status == SKIPPED and outcome.skip_reason == reason and op.source_id in linked:
            out[op.source_id] = reason
        elif op.source_id not in linked:
            out.pop(op.source_id, None)
    return out


def counts(refused: Mapping[str, str]) -> dict[str, int]:
    """Standing refusals by reason, for `status`."""
    out: dict[str, int] = {}
    for reason in refused.values():
        out[reason] = out.get(reason, 0) + 1
    return out
