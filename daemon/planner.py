"""The plan: desired state against what provisiond knows of a target, as ordered operations.

Pure: `plan()` takes data and returns data. Every operation carries the reason it exists; an
operation whose action is switched off is still planned, as `skipped` with `action_disabled`,
so that drift stays visible. Removals (deprovisioning and group deletion, member removals) are
planned only from a complete snapshot; removals of users above the deletion threshold are
`held`.

Phases say what depends on what. The applier runs phases 1-3 as one stage (a member add waits
for its group, and each chunk of members for those members' user operations, see
`daemon.applier`), then 4, 5 and 6 each after the previous has finished: removals come last.

    1 users: create, enable, update      2 groups: create, rename
    3 members: add                       4 members: remove
    5 users: disable                     6 users: delete, then groups: delete (or release an
                                           adopted group: the link goes, the group stays)
"""

from __future__ import annotations

from collections.abc import KeysView, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any

from daemon.links import (
    ACTION_DISABLED,
    ATTRIBUTES_CHANGED,
    BACK_IN_SCOPE,
    DELETE_AFTER_GRACE,
    DELETED_IN_SOURCE,
    DISABLED_IN_SOURCE,
    ENABLED_IN_SOURCE,
    FOREIGN_MEMBERS,
    GROUP_DELETED_IN_SOURCE,
    GROUP_LIMIT,
    GROUP_RENAMED,
    GROUP_UNSELECTED,
    HELD,
    LEFT_SCOPE,
    MEMBERSHIP_CHANGED,
    NEW_GROUP,
    NEW_IN_SCOPE,
    PENDING,
    PHASE_DELETE,
    PHASE_DISABLE,
    PHASE_GROUPS,
    PHASE_MEMBER_ADD,
    PHASE_MEMBER_REMOVE,
    PHASE_USERS,
    REMOVALS_HELD,
    SKIPPED,
    Actual,
    GroupLink,
    Op,
    Plan,
    UserLink,
)
from daemon.mapping import Desired, DesiredGroup, DesiredUser
from daemon.model import Members


@dataclass(frozen=True, slots=True)
class Policy:
    create: bool = True
    update: bool = True
    disable: bool = True
    deprovision: bool = True
    remove_action: str = "disable"          # disable | delete | disable_then_delete
    delete_after: float | None = None       # seconds, with disable_then_delete
    group_membership: str = "overwrite"     # overwrite | merge
    max_deletes: int | None = None          # removals allowed this cycle (None = no limit)
    approved: bool = False                  # the operator released held removals once
    max_groups_per_user: int | None = None  # the target's cap (ZIA 127): memberships beyond it are skipped


class _Builder:
    def __init__(self) -> None:
        self.ops: list[Op] = []

    def add(self, phase: int, kind: str, op: str, source_id: str, target_id: str | None, name: str,
            reason: str, payload: Mapping[str, Any] | None = None, allowed: bool = True) -> None:
        self.ops.append(Op(
            seq=0, phase=phase, kind=kind, op=op, source_id=source_id, target_id=target_id, name=name,
            reason=reason, payload=payload or {},
            status=PENDING if allowed else SKIPPED, skip_reason=None if allowed else ACTION_DISABLED))


def changed_attributes(desired: Mapping[str, Any], applied: Mapping[str, Any]) -> dict[str, Any]:
    """The mapped paths whose value differs from what was last applied (None clears)."""
    return {path: value for path, value in desired.items() if applied.get(path) != value}


def in_sync(desired: Mapping[str, Any], applied: Mapping[str, Any], create_only: AbstractSet[str]) -> bool:
    """Do the applied attributes match the desired ones, create-only paths aside (the target
    owns those once the user exists)?"""
    if not create_only:
        return desired == applied
    return not any(applied.get(path) != value for path, value in desired.items() if path not in create_only)


def for_update(desired: Mapping[str, Any], applied: Mapping[str, Any], create_only: AbstractSet[str]) -> dict[str, Any]:
    """The attributes of an update, enable or disable (a PUT sends them whole): the desired ones,
    with create-only paths kept at the value the target holds as far as provisiond knows."""
    out = dict(desired)
    for path in create_only:
        if path in out:
            out[path] = applied.get(path)
    return out


def plan(desired: Desired, actual: Actual, policy: Policy, *, complete: bool, now: float) -> Plan:
    """Compare and order. `complete` False: no removal of any kind is planned."""
    b = _Builder()
    deferred = 0
    _plan_users(b, desired, actual, policy, desired.create_only)
    if complete:
        _plan_user_removals(b, desired, actual, policy, now)
    else:
        deferred += sum(1 for sid in actual.users if sid not in desired.users and sid not in desired.skipped)
    # Members can only be users that exist in the target (or are created by this plan): a
    # disabled user that was never provisioned is not added, and is not retried every cycle.
    created = {op.source_id for op in b.ops if op.kind == "user" and op.op == "create"}
    deferred += _plan_groups(b, desired, actual, policy, complete, Provisionable(actual.users.keys(), created))
    if policy.max_groups_per_user is not None:
        _cap_memberships(b, actual, policy.max_groups_per_user)
    ops = sorted(b.ops, key=lambda o: (o.phase, 0 if o.kind == "user" else 1, o.name, o.source_id))
    result = Plan(ops=[_with_seq(op, i + 1) for i, op in enumerate(ops)], removals_deferred=deferred)
    _hold_removals(result, policy)
    return result


def _with_seq(op: Op, seq: int) -> Op:
    return Op(seq, op.phase, op.kind, op.op, op.source_id, op.target_id, op.name, op.reason,
              op.payload, op.status, op.skip_reason)


def _plan_users(b: _Builder, desired: Desired, actual: Actual, policy: Policy,
                create_only: AbstractSet[str] = frozenset()) -> None:
    for sid, want in desired.users.items():
        link = actual.users.get(sid)
        if link is None:
            if want.active:
                payload: dict[str, Any] = {"attrs": dict(want.attrs), "active": True}
                if create_only:     # an adoption on 409 updates the rest, not these
                    payload["create_only"] = sorted(create_only)
                b.add(PHASE_USERS, "user", "create", sid, None, want.user_name, NEW_IN_SCOPE, payload, policy.create)
            continue
        if create_only and want.attrs is not link.attrs:
            want = replace(want, attrs=for_update(want.attrs, link.attrs, create_only))
        _plan_linked_user(b, want, link, policy)


def _plan_linked_user(b: _Builder, want: DesiredUser, link: UserLink, policy: Policy) -> None:
    # The engine makes a link share the mapped attributes when they are equal: then nothing changed.
    # Create-only paths hold the link's own values here (`for_update`): they never differ.
    changed = {} if want.attrs is link.attrs else changed_attributes(want.attrs, link.attrs)
    if want.active and not link.active:
        back = link.disabled_reason in (LEFT_SCOPE, DELETED_IN_SOURCE)
        # Re-enabling a user that provisiond disabled on deprovisioning is the deprovision
        # action undone; otherwise it mirrors PingOne's `enabled` (the disable action).
        allowed = policy.deprovision if back else policy.disable
        b.add(PHASE_USERS, "user", "enable", want.source_id, link.target_id, want.user_name,
              BACK_IN_SCOPE if back else ENABLED_IN_SOURCE, {"attrs": dict(want.attrs)}, allowed)
    if changed:
        b.add(PHASE_USERS, "user", "update", want.source_id, link.target_id, want.user_name,
              ATTRIBUTES_CHANGED,
              {"changed": changed, "attrs": dict(want.attrs),
               "before": {p: link.attrs.get(p) for p in changed}}, policy.update)
    if not want.active and link.active:
        b.add(PHASE_DISABLE, "user", "disable", want.source_id, link.target_id, want.user_name,
              DISABLED_IN_SOURCE, {"attrs": dict(want.attrs)}, policy.disable)


def _plan_user_removals(b: _Builder, desired: Desired, actual: Actual, policy: Policy, now: float) -> None:
    for sid, link in actual.users.items():
        if sid in desired.users or sid in desired.skipped:
            continue
        reason = LEFT_SCOPE if sid in desired.present_users else DELETED_IN_SOURCE
        allowed = policy.deprovision
        action = policy.remove_action
        if action == "delete":
            b.add(PHASE_DELETE, "user", "delete", sid, link.target_id, link.user_name, reason, {}, allowed)
        elif link.active or (action == "disable_then_delete"
                             and link.disabled_reason not in (LEFT_SCOPE, DELETED_IN_SOURCE)):
            # Inactive already, but because PingOne disabled it: the grace period starts now,
            # with a (harmless) disable that records why, not from the earlier disable.
            b.add(PHASE_DISABLE, "user", "disable", sid, link.target_id, link.user_name, reason,
                  {"attrs": dict(link.attrs)}, allowed)
        elif (action == "disable_then_delete" and policy.delete_after is not None
              and link.disabled_at is not None and now - link.disabled_at >= policy.delete_after):
            b.add(PHASE_DELETE, "user", "delete", sid, link.target_id, link.user_name, DELETE_AFTER_GRACE,
                  {}, allowed)


class Provisionable:
    """Users that exist in the target or are created by this plan, without copying the 100,000s
    of linked ids into a new set every cycle."""

    def __init__(self, linked: KeysView[str], created: set[str]) -> None:
        self.linked = linked
        self.created = created

    def restrict(self, members: AbstractSet[str]) -> AbstractSet[str]:
        """*members* itself when every one is provisionable, else those that are."""
        if members <= self.linked:
            return members
        kept = Members.of(m for m in members if m in self.linked or m in self.created)
        return members if len(kept) == len(members) else kept


def _plan_groups(b: _Builder, desired: Desired, actual: Actual, policy: Policy, complete: bool,
                 provisionable: Provisionable) -> int:
    deferred = 0
    for gid, wanted in desired.groups.items():
        members = provisionable.restrict(wanted.members)
        want = wanted if members is wanted.members else replace(wanted, members=members)
        link = actual.groups.get(gid)
        if link is None:
            b.add(PHASE_GROUPS, "group", "create", gid, None, want.display_name, NEW_GROUP,
                  {"display_name": want.display_name}, policy.create)
            if want.members:
                b.add(PHASE_MEMBER_ADD, "group", "add_members", gid, None, want.display_name,
                      MEMBERSHIP_CHANGED, {"source_ids": sorted(want.members)}, policy.create)
            continue
        deferred += _plan_linked_group(b, want, link, policy, complete)
    for gid, link in actual.groups.items():
        if gid in desired.groups:
            continue
        if not complete:
            deferred += 1
            continue
        reason = GROUP_UNSELECTED if gid in desired.present_groups else GROUP_DELETED_IN_SOURCE
        if link.origin == "adopted":
            # Not provisiond's to delete: it existed before; provisiond only lets go of it.
            b.add(PHASE_DELETE, "group", "release", gid, link.target_id, link.display_name, reason, {})
            continue
        b.add(PHASE_DELETE, "group", "delete", gid, link.target_id, link.display_name, reason, {},
              policy.deprovision)
    return deferred


def _plan_linked_group(b: _Builder, want: DesiredGroup, link: GroupLink, policy: Policy,
                       complete: bool) -> int:
    if want.display_name != link.display_name:
        b.add(PHASE_GROUPS, "group", "rename", want.source_id, link.target_id, want.display_name,
              GROUP_RENAMED, {"display_name": want.display_name, "before": link.display_name}, policy.update)
    # An unchanged group holds its link's own set (`engine.share_member_sets`): nothing to compare.
    same = want.members is link.members
    to_add = [] if same else sorted(want.members - link.members)
    if to_add:
        b.add(PHASE_MEMBER_ADD, "group", "add_members", want.source_id, link.target_id, want.display_name,
              MEMBERSHIP_CHANGED, {"source_ids": to_add}, policy.update)
    to_remove = [] if same else sorted(link.members - want.members)
    foreign = sorted(link.foreign) if policy.group_membership == "overwrite" else []
    if not (to_remove or foreign):
        return 0
    if not complete:
        return 1
    b.add(PHASE_MEMBER_REMOVE, "group", "remove_members", want.source_id, link.target_id, want.display_name,
          MEMBERSHIP_CHANGED if to_remove else FOREIGN_MEMBERS,
          {"source_ids": to_remove, "target_ids": foreign}, policy.update)
    return 0


def _cap_memberships(b: _Builder, actual: Actual, cap: int) -> None:
    """Keep every user within the target's groups-per-user cap (ZIA: 127, beyond it ZIA refuses
    the whole member PATCH). A user's memberships are those provisiond holds (its group links)
    plus the adds planned, group by group in name order; the adds beyond the cap move from the
    op's `source_ids` to its `capped` list (`group_limit`), and an add left with no member is
    `skipped`. Memberships already held are never given up for new ones, so nothing flaps;
    member removals run after the adds, so a swap at the cap completes a cycle later."""
    adds = [i for i, op in enumerate(b.ops) if op.op == "add_members" and op.status == PENDING]
    if not adds:
        return
    wanted: set[str] = set()
    for i in adds:
        wanted.update(str(s) for s in b.ops[i].payload["source_ids"])
    held = dict.fromkeys(wanted, 0)
    for link in actual.groups.values():
        members = link.members
        for sid in (members if len(members) < len(wanted) else wanted):
            if sid in held and sid in members:
                held[sid] += 1
    for i in sorted(adds, key=lambda i: (b.ops[i].name, b.ops[i].source_id)):
        op = b.ops[i]
        kept: list[str] = []
        capped: list[str] = []
        for sid in (str(s) for s in op.payload["source_ids"]):
            if held[sid] < cap:
                held[sid] += 1
                kept.append(sid)
            else:
                capped.append(sid)
        if capped:
            payload = {**op.payload, "source_ids": kept, "capped": capped, "limit": cap}
            b.ops[i] = replace(op, payload=payload) if kept else replace(
                op, payload=payload, status=SKIPPED, skip_reason=GROUP_LIMIT)


def _hold_removals(result: Plan, policy: Policy) -> None:
    removals = [op for op in result.ops if op.is_removal and op.status == PENDING]
    result.removals_limit = policy.max_deletes
    if policy.max_deletes is None or policy.approved or len(removals) <= policy.max_deletes:
        return
    held = {op.seq for op in removals}
    result.removals_held = len(held)
    # While removals are held, so are member removals: a mass scope loss must not empty the
    # pushed groups either (the members would be removed from groups, the users kept).
    held |= {op.seq for op in result.ops if op.op == "remove_members" and op.status == PENDING}
    result.ops = [
        Op(op.seq, op.phase, op.kind, op.op, op.source_id, op.target_id, op.name, op.reason, op.payload,
           HELD, REMOVALS_HELD) if op.seq in held else op
        for op in result.ops
    ]
