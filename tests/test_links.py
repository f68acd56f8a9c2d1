"""`daemon.links`: what counts as a removal (against `max_deletes`), and a plan's counts and
pending operations, as the engine logs and applies them."""

from __future__ import annotations

import pytest

from daemon.links import (
    ATTRIBUTES_CHANGED,
    DELETE_AFTER_GRACE,
    DELETED_IN_SOURCE,
    DISABLED_IN_SOURCE,
    GROUP_DELETED_IN_SOURCE,
    GROUP_UNSELECTED,
    HELD,
    LEFT_SCOPE,
    MEMBERSHIP_CHANGED,
    NEW_IN_SCOPE,
    PENDING,
    PHASE_DELETE,
    PHASE_DISABLE,
    PHASE_GROUPS,
    PHASE_MEMBER_REMOVE,
    PHASE_USERS,
    SKIPPED,
    Op,
    Plan,
)


def op(seq: int, phase: int, kind: str, name: str, reason: str, *, status: str = PENDING) -> Op:
    return Op(seq, phase, kind, name, f"s{seq}", f"t{seq}", f"name{seq}", reason, {}, status,
              None if status == PENDING else "why")


@pytest.mark.parametrize(("the_op", "removal"), [
    (op(1, PHASE_DISABLE, "user", "disable", LEFT_SCOPE), True),
    (op(1, PHASE_DISABLE, "user", "disable", DELETED_IN_SOURCE), True),
    (op(1, PHASE_DELETE, "user", "delete", LEFT_SCOPE), True),
    (op(1, PHASE_DELETE, "user", "delete", DELETE_AFTER_GRACE), True),
    (op(1, PHASE_DISABLE, "user", "disable", DISABLED_IN_SOURCE), False),    # mirrors PingOne
    (op(1, PHASE_USERS, "user", "create", NEW_IN_SCOPE), False),
    (op(1, PHASE_USERS, "user", "update", ATTRIBUTES_CHANGED), False),
    (op(1, PHASE_DELETE, "group", "delete", GROUP_DELETED_IN_SOURCE), True),
    (op(1, PHASE_DELETE, "group", "release", GROUP_UNSELECTED), False),      # adopted: let go, not deleted
    (op(1, PHASE_MEMBER_REMOVE, "group", "remove_members", MEMBERSHIP_CHANGED), False),
    (op(1, PHASE_GROUPS, "group", "rename", "group_renamed"), False),
], ids=lambda v: v.op + ":" + v.reason if isinstance(v, Op) else str(v))
def test_a_removal_is_a_user_deprovisioned_or_a_group_deleted(the_op: Op, removal: bool) -> None:
    assert the_op.is_removal is removal


def test_counts_name_kind_and_op_with_the_status_of_what_is_not_pending_and_pending_keeps_order() -> None:
    ops = [op(1, PHASE_USERS, "user", "create", NEW_IN_SCOPE),
           op(2, PHASE_USERS, "user", "create", NEW_IN_SCOPE, status=SKIPPED),
           op(3, PHASE_USERS, "user", "update", ATTRIBUTES_CHANGED),
           op(4, PHASE_MEMBER_REMOVE, "group", "remove_members", MEMBERSHIP_CHANGED, status=HELD),
           op(5, PHASE_DELETE, "user", "delete", LEFT_SCOPE, status=HELD),
           op(6, PHASE_DELETE, "user", "delete", LEFT_SCOPE)]
    p = Plan(ops, removals_held=1, removals_limit=0)
    assert p.counts() == {"user.create": 1, "user.create.skipped": 1, "user.update": 1,
                          "group.remove_members.held": 1, "user.delete.held": 1, "user.delete": 1}
    assert [o.seq for o in p.pending()] == [1, 3, 6]
    assert Plan([]).counts() == {} and Plan([]).pending() == []
