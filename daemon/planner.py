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
    ADOPTED_FROM_DEPARTED,
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
    HELD_BY_ANOTHER_LINK,
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
from daemon.mapping import Desired, DesiredGroup, DesiredUser, username_key
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
    released: frozenset[str] = frozenset()  # removals an approval of a held plan releases (kind:source_id)


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
    """Compare and order. `complete` False: no removal of any kind is planned (and no handover:
    a user missing from an incomplete snapshot may not have departed)."""
    b = _Builder()
    deferred = 0
    departing = [sid for sid in actual.users if sid not in desired.users and sid not in desired.skipped]
    handover = _user_handovers(desired, actual, departing, policy) if complete else {}
    _plan_users(b, desired, actual, policy, handover, desired.create_only)
    if complete:
        _plan_user_removals(b, desired, actual, policy, now, departing, set(handover.values()))
    else:
        deferred += len(departing)
    # Members can only be users that exist in the target (or are created by this plan): a
    # disabled user that was never provisioned is not added, and is not retried every cycle.
    created = {op.source_id for op in b.ops if op.kind == "user" and op.op in ("create", "adopt")}
    handed = _members_handed_over(actual, handover)
    deferred += _plan_groups(b, desired, handed, policy, complete, Provisionable(actual.users.keys(), created))
    if policy.max_groups_per_user is not None:
        _cap_memberships(b, handed, policy.max_groups_per_user)
    ops = sorted(b.ops, key=lambda o: (o.phase, 0 if o.kind == "user" else 1, o.name, o.source_id))
    result = Plan(ops=[_with_seq(op, i + 1) for i, op in enumerate(ops)], removals_deferred=deferred)
    _hold_removals(result, policy)
    return result


def _user_handovers(desired: Desired, actual: Actual, departing: list[str], policy: Policy) -> dict[str, str]:
    """New user id -> departed user id, for each user without a link whose userName (as servers
    compare it) is that of a departing link: a rehire under a reused username. The new user takes
    over the departed user's target object (one account per username, linked to the new id), and
    the departed link is retired with no request of its own. Not when creating is switched off:
    then the new user is not provisioned and the departed one is deprovisioned as usual."""
    if not departing or not policy.create:
        return {}
    by_key: dict[str, str] = {}
    for sid in sorted(departing):
        by_key.setdefault(username_key(actual.users[sid].user_name), sid)
    out: dict[str, str] = {}
    for sid, want in desired.users.items():
        if sid in actual.users:
            continue
        old = by_key.pop(want.key if want.key is not None else username_key(want.user_name), None)
        if old is not None:
            out[sid] = old
        if not by_key:
            break
    return out


def _members_handed_over(actual: Actual, handover: Mapping[str, str]) -> Actual:
    """The group links as they are once the handovers are done: the target object a departed user
    held is a member under its new owner's id (so membership is planned for the new user from
    what the object really is in, and nothing is removed or added twice)."""
    if not handover:
        return actual
    olds = {old: new for new, old in handover.items()}
    groups = dict(actual.groups)
    for gid, link in actual.groups.items():
        if not olds.keys().isdisjoint(link.members):
            moved = {olds.get(m, m) for m in link.members}
            groups[gid] = replace(link, members=Members.of(moved))
    return Actual(actual.users, groups)


def _with_seq(op: Op, seq: int) -> Op:
    return Op(seq, op.phase, op.kind, op.op, op.source_id, op.target_id, op.name, op.reason,
              op.payload, op.status, op.skip_reason)


def _plan_users(b: _Builder, desired: Desired, actual: Actual, policy: Policy,
                handover: Mapping[str, str], create_only: AbstractSet[str] = frozenset()) -> None:
    for sid, want in desired.users.items():
        link = actual.users.get(sid)
        if link is None:
            old = handover.get(sid)
            if old is not None:
                prior = actual.users[old]
                # create-only paths keep what the departed user's object holds (not sent)
                _plan_user_adopt(b, replace(want, attrs=for_update(want.attrs, prior.attrs, create_only))
                                 if create_only else want, prior)
            elif want.active:
                payload: dict[str, Any] = {"attrs": dict(want.attrs), "active": True}
                if create_only:     # an adoption on 409 updates the rest, not these
                    payload["create_only"] = sorted(create_only)
                b.add(PHASE_USERS, "user", "create", sid, None, want.user_name, NEW_IN_SCOPE, payload, policy.create)
            continue
        if create_only and want.attrs is not link.attrs:
            want = replace(want, attrs=for_update(want.attrs, link.attrs, create_only))
        _plan_linked_user(b, want, link, policy)


def _plan_user_adopt(b: _Builder, want: DesiredUser, old: UserLink) -> None:
    """One write at most: the changed attributes and `active` where it differs, in one request
    (none when the departed user's object already is what the new user should be)."""
    changed = changed_attributes(want.attrs, old.attrs)
    b.add(PHASE_USERS, "user", "adopt", want.source_id, old.target_id, want.user_name, ADOPTED_FROM_DEPARTED,
          {"from_source_id": old.source_id, "from_user": old.user_name, "attrs": dict(want.attrs),
           "changed": changed, "before": {p: old.attrs.get(p) for p in changed}, "active": want.active})


def _plan_linked_user(b: _Builder, want: DesiredUser, link: UserLink, policy: Policy) -> None:
    # The engine makes a link share the mapped attributes when they are equal: then nothing changed.
    # Create-only paths hold the link's own values here (`for_update`): they never differ.
    changed = {} if want.attrs is link.attrs else changed_attributes(want.attrs, link.attrs)
    if want.active and not link.active:
        back = link.disabled_reason in (LEFT_SCOPE, DELETED_IN_SOURCE)
        # Re-enabling a user that provisiond disabled on deprovisioning is the deprovision
        # action undone; otherwise it mirrors PingOne's `enabled` (the disable action).
        allowed = policy.deprovision if back else policy.disable
        payload: dict[str, Any] = {"attrs": dict(want.attrs)}
        if changed and allowed and policy.update:
            # A re-enable with changed attributes is one request (active and the changes), never
            # an enable and an update side by side (the update would carry a stale `active`).
            payload.update(changed=changed, before={p: link.attrs.get(p) for p in changed})
            changed = {}
        b.add(PHASE_USERS, "user", "enable", want.source_id, link.target_id, want.user_name,
              BACK_IN_SCOPE if back else ENABLED_IN_SOURCE, payload, allowed)
    if changed:
        b.add(PHASE_USERS, "user", "update", want.source_id, link.target_id, want.user_name,
              ATTRIBUTES_CHANGED,
              {"changed": changed, "attrs": dict(want.attrs),
               "before": {p: link.attrs.get(p) for p in changed}}, policy.update)
    if not want.active and link.active:
        b.add(PHASE_DISABLE, "user", "disable", want.source_id, link.target_id, want.user_name,
              DISABLED_IN_SOURCE, {"attrs": dict(want.attrs)}, policy.disable)


def _plan_user_removals(b: _Builder, desired: Desired, actual: Actual, policy: Policy, now: float,
                        departing: list[str], handed_over: AbstractSet[str]) -> None:
    candidates = [sid for sid in departing if sid not in handed_over]
    if not candidates:
        return
    shared_with = _shared_objects(actual, candidates)
    for sid in candidates:
        link = actual.users[sid]
        if sid in shared_with:
            # Its target object is another link's now: never a request to it, the link just goes.
            b.add(PHASE_DELETE, "user", "retire", sid, link.target_id, link.user_name, HELD_BY_ANOTHER_LINK,
                  {"holder": shared_with[sid]})
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


def _shared_objects(actual: Actual, candidates: list[str]) -> dict[str, str]:
    """Departing user id -> the id of another link that holds the same target object (state left
    by an older provisiond, or by a lookup elsewhere): a removal would hit that link's account.
    When only departing links share an object, the first of them removes it, the others let go.
    One pass over the links, only when there is something to remove."""
    objects = {actual.users[sid].target_id for sid in candidates}
    holders: dict[str, list[str]] = {}
    for sid, link in actual.users.items():
        if link.target_id in objects:
            holders.setdefault(link.target_id, []).append(sid)
    leaving = set(candidates)
    out: dict[str, str] = {}
    for sids in holders.values():
        if len(sids) < 2:
            continue
        staying = sorted(s for s in sids if s not in leaving)
        keeper = staying[0] if staying else min(sids)
        for sid in sids:
            if sid in leaving and sid != keeper:
                out[sid] = keeper
    return out


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
    departing = [gid for gid in actual.groups if gid not in desired.groups]
    handover = _group_handovers(desired, actual, departing, policy) if complete else {}
    for gid, wanted in desired.groups.items():
        members = provisionable.restrict(wanted.members)
        want = wanted if members is wanted.members else replace(wanted, members=members)
        link = actual.groups.get(gid)
        if link is None and gid in handover:
            # A group re-created under its name takes the departed group's target object over
            # (renamed in the same request where only the case differs); members from there.
            old = actual.groups[handover[gid]]
            b.add(PHASE_GROUPS, "group", "adopt", gid, old.target_id, want.display_name, ADOPTED_FROM_DEPARTED,
                  {"from_source_id": old.source_id, "from_group": old.display_name,
                   "display_name": want.display_name}, policy.create)
            link = replace(old, source_id=gid, display_name=want.display_name)
        if link is None:
            b.add(PHASE_GROUPS, "group", "create", gid, None, want.display_name, NEW_GROUP,
                  {"display_name": want.display_name}, policy.create)
            if want.members:
                b.add(PHASE_MEMBER_ADD, "group", "add_members", gid, None, want.display_name,
                      MEMBERSHIP_CHANGED, {"source_ids": sorted(want.members)}, policy.create)
            continue
        deferred += _plan_linked_group(b, want, link, policy, complete)
    handed_over = set(handover.values())
    for gid in departing:
        link = actual.groups[gid]
        if not complete:
            deferred += 1
            continue
        if gid in handed_over:
            continue          # the re-created group holds its object now: nothing to delete
        reason = GROUP_UNSELECTED if gid in desired.present_groups else GROUP_DELETED_IN_SOURCE
        if link.origin == "adopted":
            # Not provisiond's to delete: it existed before; provisiond only lets go of it.
            b.add(PHASE_DELETE, "group", "release", gid, link.target_id, link.display_name, reason, {})
            continue
        if any(other.target_id == link.target_id for o, other in actual.groups.items() if o != gid):
            b.add(PHASE_DELETE, "group", "release", gid, link.target_id, link.display_name,
                  HELD_BY_ANOTHER_LINK, {})
            continue
        b.add(PHASE_DELETE, "group", "delete", gid, link.target_id, link.display_name, reason, {},
              policy.deprovision)
    return deferred


def _group_handovers(desired: Desired, actual: Actual, departing: list[str], policy: Policy) -> dict[str, str]:
    """New group id -> departed group id, for a desired group without a link whose displayName is
    that of a departing group link (deleted in PingOne and re-created under its name)."""
    if not departing or not policy.create:
        return {}
    by_key: dict[str, str] = {}
    for gid in sorted(departing):
        by_key.setdefault(username_key(actual.groups[gid].display_name), gid)
    out: dict[str, str] = {}
    for gid, want in desired.groups.items():
        if gid in actual.groups:
            continue
        old = by_key.pop(username_key(want.display_name), None)
        if old is not None:
            out[gid] = old
    return out


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
    # Removals an approval released are not counted; the others are judged by max_deletes again.
    removals = [op for op in result.ops if op.is_removal and op.status == PENDING
                and f"{op.kind}:{op.source_id}" not in policy.released]
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
