"""planner.plan, one scenario per test: desired state against links in, ordered operations out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

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
from daemon.mapping import Desired, DesiredGroup, DesiredUser, Skipped
from daemon.planner import Policy, Provisionable, changed_attributes, plan
from tests.twins import scenario

NOW = 1_700_000_000.0
DAY = 86400.0


def attrs_of(sid: str, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"userName": f"{sid}@example.com", "displayName": f"User {sid}", "externalId": sid,
                           "title": None}
    out.update(over)
    return out


def want(sid: str, *, active: bool = True, **over: Any) -> DesiredUser:
    attrs = attrs_of(sid, **over)
    return DesiredUser(sid, attrs["userName"], attrs, active)


def link(sid: str, *, active: bool = True, disabled_reason: str | None = None, disabled_at: float | None = None,
         origin: str = "created", **over: Any) -> UserLink:
    attrs = attrs_of(sid, **over)
    return UserLink(sid, f"t-{sid}", attrs["userName"], attrs, active, origin, disabled_reason, disabled_at)


def wgroup(gid: str, name: str, members: Iterable[str] = ()) -> DesiredGroup:
    m = frozenset(members)
    return DesiredGroup(gid, name, m)


def glink(gid: str, name: str, members: Iterable[str] = (), foreign: Iterable[str] = (),
          origin: str = "created") -> GroupLink:
    return GroupLink(gid, f"tg-{gid}", name, frozenset(members), frozenset(foreign), origin)


def desired(users: Iterable[DesiredUser] = (), groups: Iterable[DesiredGroup] = (), *,
            present: Iterable[str] | None = None, present_groups: Iterable[str] | None = None,
            skipped: Iterable[Skipped] = ()) -> Desired:
    u = {x.source_id: x for x in users}
    g = {x.source_id: x for x in groups}
    sk = {x.source_id: x for x in skipped}
    return Desired(users=u, groups=g, skipped=sk,
                   present_users=set(present) if present is not None else set(u) | set(sk),
                   present_groups=set(present_groups) if present_groups is not None else set(g),
                   in_scope=len(u) + len(sk))


def actual(users: Iterable[UserLink] = (), groups: Iterable[GroupLink] = ()) -> Actual:
    return Actual(users={x.source_id: x for x in users}, groups={x.source_id: x for x in groups})


def run(d: Desired, a: Actual, policy: Policy | None = None, *, complete: bool = True,
        now: float = NOW) -> Plan:
    return plan(d, a, policy or Policy(), complete=complete, now=now)


def ops(p: Plan) -> list[tuple[str, str, str, str]]:
    """(kind, op, source id, reason) of every operation, in plan order."""
    return [(o.kind, o.op, o.source_id, o.reason) for o in p.ops]


def only(p: Plan) -> Op:
    assert len(p.ops) == 1, ops(p)
    return p.ops[0]


# -- users ----------------------------------------------------------------------------------------

def test_nothing_to_do_when_desired_equals_applied() -> None:
    p = run(desired([want("u1")], [wgroup("g1", "G", ["u1"])]),
            actual([link("u1")], [glink("g1", "G", ["u1"])]))
    assert p.ops == []
    assert p.counts() == {}


def test_a_new_user_in_scope_is_created_with_all_its_attributes() -> None:
    op = only(run(desired([want("u1")]), actual()))
    assert (op.kind, op.op, op.phase, op.reason, op.status) == ("user", "create", PHASE_USERS, NEW_IN_SCOPE, PENDING)
    assert op.target_id is None
    assert op.name == "u1@example.com"
    assert op.payload == {"attrs": attrs_of("u1"), "active": True}
    assert op.seq == 1


def test_a_disabled_user_never_provisioned_is_not_created() -> None:
    assert run(desired([want("u1", active=False)]), actual()).ops == []


def test_an_update_carries_only_the_changed_attributes_and_their_previous_values() -> None:
    op = only(run(desired([want("u1", displayName="Ada L.", title="Engineer")]), actual([link("u1")])))
    assert (op.op, op.reason, op.target_id) == ("update", ATTRIBUTES_CHANGED, "t-u1")
    assert op.payload["changed"] == {"displayName": "Ada L.", "title": "Engineer"}
    assert op.payload["before"] == {"displayName": "User u1", "title": None}
    assert op.payload["attrs"] == attrs_of("u1", displayName="Ada L.", title="Engineer")


def test_an_attribute_cleared_in_the_source_is_an_update_to_none() -> None:
    op = only(run(desired([want("u1", title=None)]), actual([link("u1", title="Engineer")])))
    assert op.payload["changed"] == {"title": None}


def test_changed_attributes_compares_by_path() -> None:
    assert changed_attributes({"a": 1, "b": None, "c": "x"}, {"a": 1, "c": "y"}) == {"c": "x"}
    assert changed_attributes({"a": None}, {}) == {}


def test_a_user_disabled_in_pingone_is_disabled_after_the_deletes_phase_order() -> None:
    op = only(run(desired([want("u1", active=False)]), actual([link("u1")])))
    assert (op.op, op.phase, op.reason) == ("disable", PHASE_DISABLE, DISABLED_IN_SOURCE)


def test_a_user_enabled_again_in_pingone_is_enabled() -> None:
    a = actual([link("u1", active=False, disabled_reason=DISABLED_IN_SOURCE, disabled_at=NOW - 10)])
    op = only(run(desired([want("u1")]), a))
    assert (op.op, op.phase, op.reason, op.status) == ("enable", PHASE_USERS, ENABLED_IN_SOURCE, PENDING)


def test_a_user_back_in_scope_after_a_deprovision_disable_is_enabled_as_back_in_scope() -> None:
    a = actual([link("u1", active=False, disabled_reason=LEFT_SCOPE, disabled_at=NOW - 10)])
    op = only(run(desired([want("u1")]), a))
    assert (op.op, op.reason) == ("enable", BACK_IN_SCOPE)


def test_a_disabled_user_that_also_changed_is_disabled_and_updated() -> None:
    p = run(desired([want("u1", active=False, title="Gone")]), actual([link("u1")]))
    assert [(o.op, o.phase) for o in p.ops] == [("update", PHASE_USERS), ("disable", PHASE_DISABLE)]


# -- deprovisioning ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("present", "reason"),
    [({"u2"}, LEFT_SCOPE), (set(), DELETED_IN_SOURCE)],
    ids=["left_scope", "deleted_in_pingone"],
)
def test_remove_action_disable_sets_active_false(present: set[str], reason: str) -> None:
    op = only(run(desired(present=present), actual([link("u2")]), Policy(remove_action="disable")))
    assert (op.kind, op.op, op.phase, op.reason, op.status) == ("user", "disable", PHASE_DISABLE, reason, PENDING)
    assert op.target_id == "t-u2"
    assert op.is_removal


@pytest.mark.parametrize(
    ("present", "reason"),
    [({"u2"}, LEFT_SCOPE), (set(), DELETED_IN_SOURCE)],
    ids=["left_scope", "deleted_in_pingone"],
)
def test_remove_action_delete_sends_delete(present: set[str], reason: str) -> None:
    op = only(run(desired(present=present), actual([link("u2")]), Policy(remove_action="delete")))
    assert (op.op, op.phase, op.reason) == ("delete", PHASE_DELETE, reason)
    assert op.is_removal


def test_remove_action_delete_deletes_a_user_that_was_already_disabled() -> None:
    a = actual([link("u2", active=False, disabled_reason=DISABLED_IN_SOURCE, disabled_at=NOW - 5)])
    op = only(run(desired(present=set()), a, Policy(remove_action="delete")))
    assert (op.op, op.reason) == ("delete", DELETED_IN_SOURCE)


def test_remove_action_disable_does_nothing_more_for_a_user_already_disabled() -> None:
    a = actual([link("u2", active=False, disabled_reason=LEFT_SCOPE, disabled_at=NOW - 5)])
    assert run(desired(present={"u2"}), a, Policy(remove_action="disable")).ops == []


def test_disable_then_delete_disables_first() -> None:
    policy = Policy(remove_action="disable_then_delete", delete_after=7 * DAY)
    op = only(run(desired(present=set()), actual([link("u2")]), policy))
    assert (op.op, op.reason) == ("disable", DELETED_IN_SOURCE)


def test_disable_then_delete_waits_out_the_grace_period() -> None:
    policy = Policy(remove_action="disable_then_delete", delete_after=7 * DAY)
    a = actual([link("u2", active=False, disabled_reason=LEFT_SCOPE, disabled_at=NOW - 6 * DAY)])
    assert run(desired(present=set()), a, policy, now=NOW).ops == []


def test_disable_then_delete_deletes_once_the_grace_period_is_over() -> None:
    policy = Policy(remove_action="disable_then_delete", delete_after=7 * DAY)
    a = actual([link("u2", active=False, disabled_reason=LEFT_SCOPE, disabled_at=NOW - 7 * DAY)])
    op = only(run(desired(present=set()), a, policy, now=NOW))
    assert (op.op, op.phase, op.reason) == ("delete", PHASE_DELETE, DELETE_AFTER_GRACE)
    assert op.is_removal


def test_a_skipped_user_is_never_deprovisioned_because_of_the_skip() -> None:
    skip = Skipped("u2", "u2@example.com", "conflict", "also mapped from u3")
    p = run(desired(skipped=[skip]), actual([link("u2")]), Policy(remove_action="delete"))
    assert p.ops == []


# -- action switches ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("switch", "d", "a", "expected"),
    [
        ("create", desired([want("u1")]), actual(), ("user", "create")),
        ("create", desired(groups=[wgroup("g1", "G")]), actual(), ("group", "create")),
        ("update", desired([want("u1", title="CTO")]), actual([link("u1")]), ("user", "update")),
        ("update", desired(groups=[wgroup("g1", "New")]), actual(groups=[glink("g1", "Old")]),
         ("group", "rename")),
        ("disable", desired([want("u1", active=False)]), actual([link("u1")]), ("user", "disable")),
        ("disable", desired([want("u1")]),
         actual([link("u1", active=False, disabled_reason=DISABLED_IN_SOURCE, disabled_at=NOW)]),
         ("user", "enable")),
        ("deprovision", desired(present={"u1"}), actual([link("u1")]), ("user", "disable")),
        ("deprovision", desired(present=set()), actual([link("u1")]), ("user", "disable")),
        ("deprovision", desired(present_groups=set()), actual(groups=[glink("g1", "G")]), ("group", "delete")),
        ("deprovision", desired([want("u1")]),
         actual([link("u1", active=False, disabled_reason=LEFT_SCOPE, disabled_at=NOW)]), ("user", "enable")),
    ],
    ids=["create-user", "create-group", "update-user", "update-group-rename", "disable", "disable-enable",
         "deprovision-left-scope", "deprovision-deleted", "deprovision-group", "deprovision-back-in-scope"],
)
def test_a_switched_off_action_is_planned_as_skipped_action_disabled_and_nothing_is_pending(
        switch: str, d: Desired, a: Actual, expected: tuple[str, str]) -> None:
    p = run(d, a, Policy(**{switch: False}))  # type: ignore[arg-type]
    assert [(o.kind, o.op) for o in p.ops][:1] == [expected]
    assert all(o.status == SKIPPED and o.skip_reason == ACTION_DISABLED for o in p.ops), p.ops
    assert p.pending() == []
    assert p.counts()[f"{expected[0]}.{expected[1]}.skipped"] == 1


def test_deprovision_off_with_remove_action_delete_sends_nothing() -> None:
    p = run(desired(present=set()), actual([link("u1")]), Policy(deprovision=False, remove_action="delete"))
    op = only(p)
    assert (op.op, op.status, op.skip_reason) == ("delete", SKIPPED, ACTION_DISABLED)


def test_create_off_also_skips_the_member_adds_of_a_group_it_would_create() -> None:
    p = run(desired([want("u1")], [wgroup("g1", "G", ["u1"])]), actual(), Policy(create=False))
    assert [(o.kind, o.op, o.status) for o in p.ops] == [
        ("user", "create", SKIPPED), ("group", "create", SKIPPED), ("group", "add_members", SKIPPED)]
    assert p.pending() == []


# -- incomplete snapshot -------------------------------------------------------------------------------

def test_an_incomplete_snapshot_plans_no_removal_of_any_kind() -> None:
    d = desired(
        [want("u1")],
        [wgroup("g1", "G", ["u1"])],
        present=set(),  # the user listing broke off: u2 and u3 look gone
        present_groups={"g1"},
    )
    a = actual(
        [link("u1"), link("u2"), link("u3")],
        [glink("g1", "G", ["u1", "u2"], foreign=["x9"]), glink("g2", "Dropped")],
    )
    for action in ("disable", "delete", "disable_then_delete"):
        p = run(d, a, Policy(remove_action=action, delete_after=DAY), complete=False)
        assert p.ops == [], (action, ops(p))
        # u2 and u3 (users), g1's members (one remove), g2 (group delete)
        assert p.removals_deferred == 4
    # the same plan from a complete snapshot removes all of it
    p = run(d, a, Policy(remove_action="delete", max_deletes=None), complete=True)
    assert sorted((o.kind, o.op, o.source_id) for o in p.ops) == [
        ("group", "delete", "g2"), ("group", "remove_members", "g1"),
        ("user", "delete", "u2"), ("user", "delete", "u3")]


def test_an_incomplete_snapshot_still_creates_updates_and_adds() -> None:
    d = desired([want("u1", title="New"), want("u4")], [wgroup("g1", "G", ["u1", "u4"])], present=set())
    a = actual([link("u1"), link("u2")], [glink("g1", "G", ["u1"])])
    p = run(d, a, complete=False)
    assert sorted((o.kind, o.op, o.source_id) for o in p.ops) == [
        ("group", "add_members", "g1"), ("user", "create", "u4"), ("user", "update", "u1")]
    assert p.ops[-1].payload == {"source_ids": ["u4"]}


# -- deletion threshold ---------------------------------------------------------------------------------

def removal_case() -> tuple[Desired, Actual]:
    d = desired([want("u1", title="Changed"), want("u5")], present={"u1", "u2", "u5"})
    a = actual([link("u1"), link("u2"), link("u3"), link("u4")])
    return d, a


def test_removals_above_max_deletes_are_held_and_the_rest_goes_ahead() -> None:
    d, a = removal_case()
    p = run(d, a, Policy(max_deletes=2))
    held = [o for o in p.ops if o.status == HELD]
    assert sorted(o.source_id for o in held) == ["u2", "u3", "u4"]
    assert all(o.skip_reason == REMOVALS_HELD and o.op == "disable" for o in held)
    assert p.removals_held == 3
    assert p.removals_limit == 2
    assert sorted((o.op, o.source_id) for o in p.pending()) == [("create", "u5"), ("update", "u1")]


def test_removals_up_to_max_deletes_are_not_held() -> None:
    d, a = removal_case()
    p = run(d, a, Policy(max_deletes=3))
    assert p.removals_held == 0
    assert len(p.pending()) == 5


def test_an_approval_releases_held_removals() -> None:
    d, a = removal_case()
    p = run(d, a, Policy(max_deletes=2, approved=True))
    assert p.removals_held == 0
    assert all(o.status == PENDING for o in p.ops)
    assert sorted(o.source_id for o in p.ops if o.is_removal) == ["u2", "u3", "u4"]


def test_disables_mirroring_pingone_are_not_removals_and_never_held() -> None:
    d = desired([want("u1", active=False), want("u2", active=False)])
    p = run(d, actual([link("u1"), link("u2")]), Policy(max_deletes=0))
    assert [o.status for o in p.ops] == [PENDING, PENDING]
    assert not any(o.is_removal for o in p.ops)


# -- groups ---------------------------------------------------------------------------------------

def test_a_new_group_is_created_empty_then_filled_with_its_provisioned_members() -> None:
    d = desired([want("u1"), want("u2")], [wgroup("g1", "G", ["u1", "u2", "u9"])])
    p = run(d, actual([link("u2")]))
    assert ops(p) == [
        ("user", "create", "u1", NEW_IN_SCOPE),
        ("group", "create", "g1", NEW_GROUP),
        ("group", "add_members", "g1", MEMBERSHIP_CHANGED),
    ]
    create, add = p.ops[1], p.ops[2]
    assert (create.phase, create.payload) == (PHASE_GROUPS, {"display_name": "G"})
    # u9 is neither linked nor being created: it cannot be a member
    assert (add.phase, add.payload) == (PHASE_MEMBER_ADD, {"source_ids": ["u1", "u2"]})


def test_a_group_renamed_in_pingone_is_renamed_in_the_target() -> None:
    op = only(run(desired(groups=[wgroup("g1", "New name")]), actual(groups=[glink("g1", "Old name")])))
    assert (op.kind, op.op, op.phase, op.reason) == ("group", "rename", PHASE_GROUPS, GROUP_RENAMED)
    assert op.target_id == "tg-g1"
    assert op.payload == {"display_name": "New name", "before": "Old name"}


@pytest.mark.parametrize(
    ("present_groups", "reason"),
    [({"g1"}, GROUP_UNSELECTED), (set(), GROUP_DELETED_IN_SOURCE)],
    ids=["unselected", "deleted_in_pingone"],
)
def test_a_pushed_group_no_longer_wanted_is_deleted(present_groups: set[str], reason: str) -> None:
    op = only(run(desired(present_groups=present_groups), actual(groups=[glink("g1", "G", ["u1"])])))
    assert (op.kind, op.op, op.phase, op.reason, op.target_id) == ("group", "delete", PHASE_DELETE, reason, "tg-g1")


def test_an_adopted_group_no_longer_wanted_is_not_deleted() -> None:
    """DESIGN.md: a pushed group gone from PingOne is deleted in the target *if provisiond created it*."""
    p = run(desired(present_groups=set()), actual(groups=[glink("g1", "G", origin="adopted")]))
    assert not [o for o in p.ops if o.op == "delete"], ops(p)
    # provisiond lets go of it: the link goes, the group stays
    op = only(p)
    assert (op.op, op.phase, op.reason, op.status) == ("release", PHASE_DELETE, GROUP_DELETED_IN_SOURCE, PENDING)


def test_members_are_added_and_removed_as_minimal_set_differences() -> None:
    d = desired([want(s) for s in ("u1", "u2", "u3", "u4")], [wgroup("g1", "G", ["u1", "u2", "u4"])])
    a = actual([link(s) for s in ("u1", "u2", "u3", "u4")], [glink("g1", "G", ["u1", "u3"])])
    p = run(d, a)
    assert ops(p) == [("group", "add_members", "g1", MEMBERSHIP_CHANGED),
                      ("group", "remove_members", "g1", MEMBERSHIP_CHANGED)]
    add, remove = p.ops
    assert (add.phase, add.payload) == (PHASE_MEMBER_ADD, {"source_ids": ["u2", "u4"]})
    assert (remove.phase, remove.payload) == (PHASE_MEMBER_REMOVE, {"source_ids": ["u3"], "target_ids": []})


def test_foreign_members_of_an_adopted_group_are_removed_with_overwrite_and_kept_with_merge() -> None:
    d = desired([want("u1")], [wgroup("g1", "G", ["u1"])])
    a = actual([link("u1")], [glink("g1", "G", ["u1"], foreign=["x2", "x1"], origin="adopted")])
    op = only(run(d, a, Policy(group_membership="overwrite")))
    assert (op.op, op.reason, op.payload) == ("remove_members", FOREIGN_MEMBERS,
                                              {"source_ids": [], "target_ids": ["x1", "x2"]})
    assert run(d, a, Policy(group_membership="merge")).ops == []


def test_a_user_leaving_scope_leaves_every_pushed_group() -> None:
    d = desired([want("u1")], [wgroup("g1", "G", ["u1"])], present={"u1", "u2"})
    a = actual([link("u1"), link("u2")], [glink("g1", "G", ["u1", "u2"])])
    p = run(d, a, Policy(remove_action="disable"))
    assert [(o.kind, o.op, o.source_id) for o in p.ops] == [
        ("group", "remove_members", "g1"), ("user", "disable", "u2")]
    assert p.ops[0].payload["source_ids"] == ["u2"]


# -- order --------------------------------------------------------------------------------------------

def test_phases_run_create_groups_adds_removes_disables_deletes_in_that_order() -> None:
    d = desired(
        [want("new"), want("chg", title="x"), want("ena"), want("dis", active=False), want("keep")],
        [wgroup("g-new", "New", ["new"]), wgroup("g-ren", "Renamed", ["keep", "new"])],
        present={"new", "chg", "ena", "dis", "keep", "left"},
        present_groups={"g-new", "g-ren"},
    )
    a = actual(
        [link("chg"), link("ena", active=False, disabled_reason=DISABLED_IN_SOURCE, disabled_at=NOW), link("dis"),
         link("keep"), link("left"), link("gone")],
        [glink("g-ren", "Old", ["keep", "left"]), glink("g-old", "Gone")],
    )
    p = run(d, a, Policy(remove_action="delete"))
    # within a phase operations run concurrently: their order there is not part of the contract
    by_phase = [sorted((o.kind, o.op) for o in p.ops if o.phase == phase)
                for phase in (PHASE_USERS, PHASE_GROUPS, PHASE_MEMBER_ADD, PHASE_MEMBER_REMOVE, PHASE_DISABLE,
                              PHASE_DELETE)]
    assert by_phase == [
        [("user", "create"), ("user", "enable"), ("user", "update")],
        [("group", "create"), ("group", "rename")],
        [("group", "add_members"), ("group", "add_members")],
        [("group", "remove_members")],
        [("user", "disable")],
        [("group", "delete"), ("user", "delete"), ("user", "delete")],
    ]
    phases = [o.phase for o in p.ops]
    assert phases == sorted(phases)
    # user deletes go before group deletes
    assert [(o.kind, o.op) for o in p.ops[-3:]] == [("user", "delete"), ("user", "delete"), ("group", "delete")]
    assert [o.seq for o in p.ops] == list(range(1, len(p.ops) + 1))
    assert p.counts() == {"user.create": 1, "user.update": 1, "user.enable": 1, "group.create": 1,
                          "group.rename": 1, "group.add_members": 2, "group.remove_members": 1,
                          "user.disable": 1, "user.delete": 2, "group.delete": 1}


# -- the target's groups-per-user cap ---------------------------------------------------------------


def test_memberships_beyond_the_groups_per_user_cap_are_capped_in_name_order_keeping_those_held() -> None:
    users = [want("u1"), want("u2")]
    # u1 already holds "Z held" (a link); it wants A, B and C besides: with a cap of 3, A and B go
    # in and C is capped; u2 holds nothing and fits everywhere.
    groups = [wgroup("gz", "Z held", ["u1"]), wgroup("ga", "A", ["u1", "u2"]), wgroup("gb", "B", ["u1"]),
              wgroup("gc", "C", ["u1", "u2"])]
    a = actual([link("u1"), link("u2")], [glink("gz", "Z held", ["u1"]), glink("ga", "A"), glink("gb", "B"),
                                          glink("gc", "C")])
    p = run(desired(users, groups), a, Policy(max_groups_per_user=3))
    adds = {o.name: o for o in p.ops if o.op == "add_members"}
    assert adds["A"].payload["source_ids"] == ["u1", "u2"] and "capped" not in adds["A"].payload
    assert adds["B"].payload["source_ids"] == ["u1"]
    assert adds["C"].payload["source_ids"] == ["u2"] and adds["C"].payload["capped"] == ["u1"]
    assert adds["C"].payload["limit"] == 3 and adds["C"].status == PENDING
    # without a cap nothing is capped
    p = run(desired(users, groups), a)
    assert all("capped" not in o.payload for o in p.ops)


def test_an_add_whose_every_member_is_over_the_cap_is_skipped_with_group_limit() -> None:
    users = [want("u1")]
    groups = [wgroup("ga", "A", ["u1"]), wgroup("gb", "B", ["u1"])]
    a = actual([link("u1")], [glink("ga", "A", ["u1"]), glink("gb", "B")])
    p = run(desired(users, groups), a, Policy(max_groups_per_user=1))
    add = only(p)
    assert (add.op, add.status, add.skip_reason) == ("add_members", SKIPPED, "group_limit")
    assert add.payload["capped"] == ["u1"] and add.payload["source_ids"] == []


# -- create-only mapping entries -----------------------------------------------------------------

CREATE_ONLY = frozenset({"title"})


def with_create_only(d: Desired) -> Desired:
    d.create_only = CREATE_ONLY
    return d


def test_a_create_only_attribute_is_in_the_create_payload() -> None:
    p = run(with_create_only(desired([want("u1", title="Intern")])), actual())
    (op,) = p.ops
    assert (op.op, op.payload["attrs"]["title"], op.payload["create_only"]) == ("create", "Intern", ["title"])


@pytest.mark.parametrize(
    ("case", "wanted", "applied", "expected"),
    [
        ("only the create-only value differs: nothing to do", {"title": "Engineer"}, {"title": "Intern"}, None),
        ("the target changed it on its own: nothing to do", {"title": "Intern"}, {"title": "Set by target"}, None),
        ("another attribute changed: updated without the create-only one",
         {"title": "Engineer", "displayName": "New"}, {"title": "Intern"}, {"displayName": "New"}),
    ],
)
def test_a_create_only_attribute_is_never_updated_nor_drift(case: str, wanted: dict[str, Any],
                                                           applied: dict[str, Any],
                                                           expected: dict[str, Any] | None) -> None:
    p = run(with_create_only(desired([want("u1", **wanted)])), actual([link("u1", **applied)]))
    if expected is None:
        assert p.ops == [], case
        return
    (op,) = p.ops
    assert op.op == "update" and op.payload["changed"] == expected, case
    # the whole attributes (a PUT body) keep the value the target holds
    assert op.payload["attrs"]["title"] == applied["title"], case


def test_a_re_enable_keeps_the_targets_create_only_value() -> None:
    p = run(with_create_only(desired([want("u1", title="Engineer")])),
            actual([link("u1", active=False, disabled_reason=LEFT_SCOPE, title="Intern")]))
    (op,) = p.ops
    assert op.op == "enable" and op.payload["attrs"]["title"] == "Intern"


# -- identity: every `is` shortcut has an equal-but-not-identical path (daemon/model.py) -------------

POLICIES = [Policy(), Policy(remove_action="delete", max_deletes=1), Policy(group_membership="overwrite")]


@pytest.mark.parametrize("create_only", [frozenset(), frozenset({"displayName"})], ids=["all", "create_only"])
@pytest.mark.parametrize("complete", [True, False])
@pytest.mark.parametrize("policy", POLICIES, ids=["default", "held", "overwrite"])
def test_a_plan_over_equal_copies_is_the_plan_over_shared_objects(policy: Policy, complete: bool,
                                                                  create_only: frozenset[str]) -> None:
    """`want.attrs is link.attrs` (and `is not` before create-only paths are masked) and
    `want.members is link.members` only skip a comparison, and ids need not be canonical: equal
    copies of everything (other id strings, other attribute dicts, a frozenset against a
    `Members`) plan exactly what shared objects plan."""
    shared_d, shared_a = scenario(shared=True, create_only=create_only)
    copied_d, copied_a = scenario(shared=False, create_only=create_only)
    # the shortcuts are taken on one side and not on the other
    unchanged = [sid for sid in shared_d.users if sid in ("u01", "u02", "u03", "u04")]
    assert all(shared_d.users[s].attrs is shared_a.users[s].attrs for s in unchanged)
    assert shared_d.groups["g1"].members is shared_a.groups["g1"].members
    for sid, want_ in copied_d.users.items():
        if sid in copied_a.users:
            assert want_.attrs is not copied_a.users[sid].attrs
            assert next(k for k in copied_a.users if k == sid) is not sid
    assert copied_d.groups["g1"].members is not copied_a.groups["g1"].members
    expected = run(shared_d, shared_a, policy, complete=complete)
    assert run(copied_d, copied_a, policy, complete=complete) == expected
    planned = {(o.kind, o.op) for o in expected.ops}
    assert {("user", "update"), ("user", "create"), ("user", "disable"), ("user", "enable"),
            ("group", "add_members"), ("group", "rename"), ("group", "create")} <= planned
    assert not any(o.source_id in ("u01", "u02", "u03", "u04") for o in expected.ops if o.kind == "user")
    assert not any(o.source_id == "g1" for o in expected.ops)
    (update,) = [o for o in expected.ops if o.op == "update"]
    assert sorted(update.payload["changed"]) == sorted({"title", "displayName"} - create_only)


def test_a_restricted_member_set_equal_to_the_desired_one_plans_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_plan_groups` keeps the desired group as it is when `Provisionable.restrict` hands back the
    same set (`is`); an equal copy in its place plans the same."""
    d, a = scenario(shared=True)
    expected = run(d, a)
    restrict = Provisionable.restrict
    copies: list[bool] = []

    def restrict_to_a_copy(self: Provisionable, members: Any) -> Any:
        kept = restrict(self, members)
        copy = frozenset(kept)
        copies.append(kept is members)
        return copy

    monkeypatch.setattr(Provisionable, "restrict", restrict_to_a_copy)
    assert run(d, a) == expected
    assert copies and all(copies)       # every group took the copy where it had taken its own set
