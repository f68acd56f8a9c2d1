"""Whole cycles against the emulators on loopback, with a real SQLite file (issue 3 acceptance).

Every test runs the PingOne, ZPA and ZIA emulators in this process, the Engine in-process against
them, and compares what each target holds with what the PingOne directory says it should hold,
computed here independently of provisiond's own mapping code.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon import approvals
from daemon.applier import ApplyResult
from daemon.config import Actions, GroupRef, Scope
from daemon.engine import Engine, share_member_sets, share_with_desired
from daemon.links import Actual
from daemon.model import UNCHANGED
from daemon.planner import Policy, plan
from daemon.sandbox.directory import Directory
from daemon.sandbox.pingone import DEFAULT_CLIENT_SECRET
from daemon.sandbox.runner import ZIA_TOKEN, ZPA_TOKEN
from daemon.sandbox.scim import ScimEmulator
from tests.harness import TARGETS, Harness
from tests.harness import harness as shared_harness
from tests.twins import scenario

pytestmark = pytest.mark.timeout(60)

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
USERS = 200
GROUPS = 10
SEED = 11
# The keys every per-entity event carries (DESIGN.md "Logs").
ENTITY_KEYS = frozenset({"event", "target", "cycle", "source_id", "target_id", "op", "outcome", "reason",
                         "attempts", "duration_ms"})


# -- the harness -----------------------------------------------------------------------------------

@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    users: int = USERS,
    groups: int = GROUPS,
    prepare: Callable[[Directory], None] | None = None,
    **overrides: dict[str, Any],
) -> AsyncIterator[Harness]:
    """The shared harness (tests/harness.py) over this file's directory, with every cycle
    required to read PingOne. `prepare` edits the directory before the first cycle; `overrides`
    maps a target name to the TargetConfig fields to replace."""
    edit = (lambda sb: prepare(sb.directory)) if prepare is not None else None
    async with shared_harness(tmp_path, users=users, groups=groups, seed=SEED, prepare=edit, **overrides) as h:
        h.strict = True
        yield h


@asynccontextmanager
async def synced(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Harness]:
    """A harness after one successful initial cycle."""
    async with harness(tmp_path, **kwargs) as h:
        report = await h.cycle()
        assert not report.failed, report
        for target in TARGETS:
            assert_in_sync(h, target)
        yield h


# -- what the targets should hold, from the directory alone -------------------------------------

def scope_and_groups(h: Harness, target: str) -> tuple[set[str], dict[str, set[str]]]:
    """(user ids in scope, pushed group name -> member user ids) by the directory's own graph."""
    cfg = h.config.target(target)
    transitive = cfg.membership == "transitive"

    def members(ref: GroupRef) -> tuple[str, set[str]] | None:
        groups = h.directory.groups
        if ref.id is not None:
            group = groups.get(ref.id)
        else:
            group = next((g for g in groups.values() if g["name"] == ref.name), None)
            if group is None:   # followed by id after a rename: the pin the engine keeps
                group = next((g for g in groups.values() if g.get("_test_alias") == ref.name), None)
        if group is None:
            return None
        gid = group["id"]
        ids = h.directory.transitive_member_ids(gid) if transitive else h.directory.direct_member_ids(gid)
        return group["name"], set(ids)

    scope: set[str] = set()
    for ref in cfg.scope.groups:
        found = members(ref)
        if found is not None:
            scope |= found[1]
    pushed: dict[str, set[str]] = {}
    for ref in cfg.groups:
        found = members(ref)
        if found is not None:
            pushed[found[0]] = found[1]
    return scope, pushed


def valid_username(name: str) -> bool:
    local, at, domain = name.partition("@")
    return bool(local and at and "." in domain)


def expected_view(user: dict[str, Any], target: str) -> dict[str, Any]:
    """The target-side view of a PingOne user under the profile's default mapping."""
    name = user.get("name") or {}
    view = {
        "active": user.get("enabled", True) is not False,
        "displayName": name.get("formatted") or " ".join(p for p in (name.get("given"), name.get("family")) if p)
        or user["username"],
        "externalId": user["id"],
        "givenName": name.get("given") or None,
        "familyName": name.get("family") or None,
        "department": user.get("department"),
    }
    if target == "zpa":
        view["email"] = user.get("email")
    return view


def target_view(resource: dict[str, Any], target: str) -> dict[str, Any]:
    name = resource.get("name") or {}
    extension = resource.get(ENTERPRISE) or {}
    view = {
        "active": resource.get("active", True),
        "displayName": resource.get("displayName"),
        "externalId": resource.get("externalId"),
        "givenName": name.get("givenName"),
        "familyName": name.get("familyName"),
        "department": extension.get("department", resource.get("department")),
    }
    if target == "zpa":
        emails = [e.get("value") for e in resource.get("emails", []) if e.get("type") == "work"]
        view["email"] = emails[0] if emails else None
    return view


def target_state(em: ScimEmulator, target: str) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]]]:
    """userName -> view, displayName -> member userNames; duplicates fail here."""
    users: dict[str, dict[str, Any]] = {}
    by_id: dict[str, str] = {}
    for res in em.users.values():
        key = res["userName"].lower()
        assert key not in users, f"duplicate userName {res['userName']} in {target}"
        users[key] = target_view(res, target)
        by_id[res["id"]] = key
    groups: dict[str, set[str]] = {}
    for g in em.groups.values():
        assert g["displayName"] not in groups, f"duplicate group {g['displayName']} in {target}"
        values = [m["value"] for m in g.get("members", [])]
        assert len(values) == len(set(values)), f"duplicate members in {g['displayName']}"
        groups[g["displayName"]] = {by_id[v] for v in values}
    return users, groups


def assert_in_sync(h: Harness, target: str, *, lingering: Collection[str] = ()) -> None:
    """The target holds exactly the desired state: every in-scope user with a valid userName, its
    attributes and `active`; the pushed groups with their in-scope members; nothing more.

    A user disabled in PingOne may be absent (never created, or deleted by ZPA's active=false);
    when present it is inactive. `lingering` names userNames deprovisioned by `disable` that may
    stay in the target, inactive and in no group."""
    scope, pushed = scope_and_groups(h, target)
    have_users, have_groups = target_state(h.emulator(target), target)
    want: dict[str, dict[str, Any]] = {}
    for uid in scope:
        user = h.directory.users[uid]
        if valid_username(user["username"]):
            want[user["username"].lower()] = expected_view(user, target)
    for key, view in want.items():
        if view["active"]:
            assert have_users.get(key) == view, f"{target}: {key}"
        elif key in have_users:
            assert target == "zia", f"{target}: {key} disabled yet present (active=false deletes here)"
            assert have_users[key] == view, f"{target}: {key}"
    extra = set(have_users) - set(want)
    assert extra <= {n.lower() for n in lingering}, f"{target}: unexpected users {sorted(extra)[:5]}"
    for key in extra:
        assert have_users[key]["active"] is False, f"{target}: {key} left scope yet active"
    assert set(have_groups) == set(pushed), target
    for name, member_ids in pushed.items():
        names = {h.directory.users[u]["username"].lower() for u in member_ids}
        expected = {n for n in names if n in want and n in have_users}
        assert have_groups[name] == expected, f"{target}: members of {name}"


# -- picking users -----------------------------------------------------------------------------------

def group_id(h: Harness, name: str) -> str:
    return str(h.directory.group_by_name(name)["id"])


def pick(h: Harness, *, in_groups: Iterable[str] = (), not_in: Iterable[str] = (), n: int = 1,
         direct: bool = True) -> list[str]:
    """Enabled users with an email userName, members of every `in_groups`, of none of `not_in`."""
    d = h.directory
    out: list[str] = []
    for uid in sorted(d.users):
        user = d.users[uid]
        if not user.get("enabled", True) or not valid_username(user["username"]):
            continue
        mine = d.user_group_ids(uid, transitive=not direct)
        trans = d.user_group_ids(uid, transitive=True)
        if all(group_id(h, g) in mine for g in in_groups) and not any(group_id(h, g) in trans for g in not_in):
            out.append(uid)
        if len(out) == n:
            return out
    raise AssertionError(f"no {n} users in {list(in_groups)} outside {list(not_in)}")


def username(h: Harness, uid: str) -> str:
    return str(h.directory.users[uid]["username"])


def add_person(d: Directory, local: str, *groups: str, **extra: Any) -> str:
    user = d.add_user(f"{local}@example.com", email=f"{local}@example.com", given=local.title(),
                      family="Tester", department="Testing", **extra)
    for name in groups:
        d.add_member(d.group_by_name(name)["id"], user["id"])
    return str(user["id"])


def tuser(em: ScimEmulator, name: str) -> dict[str, Any]:
    found = em.user_by_username(name)
    assert found is not None, f"{name} is not in the target"
    return found


def tgroup(em: ScimEmulator, name: str) -> dict[str, Any]:
    found = em.group_by_name(name)
    assert found is not None, f"group {name} is not in the target"
    return found


def writes(em: ScimEmulator, *keys: str) -> int:
    return sum(em.counters[k] for k in keys)


# -- initial sync, steady state -----------------------------------------------------------------------

async def test_initial_sync_makes_each_target_equal_its_desired_state(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        report = await h.cycle()
        assert not report.failed
        assert report.snapshot_complete
        for target in TARGETS:
            assert_in_sync(h, target)
            tr = h.target_report(target)
            assert (tr.outcome, tr.failed, tr.full_sync) == ("success", 0, True)
            em = h.emulator(target)
            created = h.events("user.created", target=target)
            assert len(created) == len(em.users) == em.counters["POST /Users"] > 0
            assert tr.results == {"applied": tr.plan_counts["user.create"] + tr.plan_counts["group.create"]
                                  + tr.plan_counts["group.add_members"]}
            users = tr.summary["users"]
            assert users["failed"] == users["partial"] == 0
            assert users["success"] == len(em.users)
            assert users["impacted"] == users["success"] + users["unsynced"]
            assert tr.summary["groups"] == {"impacted": len(em.groups), "success": len(em.groups),
                                            "unsynced": 0, "partial": 0, "failed": 0}
        assert {g["displayName"] for g in h.sb.zpa.groups.values()} == {"ZPA Users", "ZPA Contractors"}
        assert {g["displayName"] for g in h.sb.zia.groups.values()} == {"ZIA Users"}
        # ZPA Contractors is nested in ZPA Users: its members count in ZPA Users (transitive)
        contractors = h.directory.direct_member_ids(group_id(h, "ZPA Contractors"))
        assert contractors - h.directory.direct_member_ids(group_id(h, "ZPA Users"))


async def test_a_warm_daemon_never_reads_the_stored_hashes_and_still_stores_changes_and_deletions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After one saved snapshot, the mapping caches say what the state file holds: no map of
    1,000,000 stored hashes is read or kept, and what changed or went is still written."""
    async with synced(tmp_path) as h:
        async def refuse() -> dict[str, Any]:
            raise AssertionError("a warm daemon read every stored hash")

        monkeypatch.setattr(h.store, "source_hashes", refuse)
        await h.cycle()
        (changed,) = pick(h, in_groups=["ZPA Users"])
        h.directory.update_user(changed, name={"given": "Yvonne"})
        (gone,) = pick(h, not_in=["ZPA Users", "ZIA Users"])
        h.directory.delete_user(gone)
        await h.cycle()
        stored = await h.store.load_snapshot()
        assert stored.users[changed]["name"]["given"] == "Yvonne"
        assert gone not in stored.users
        assert stored.users.keys() == h.directory.users.keys()
        for target in TARGETS:
            assert_in_sync(h, target)


async def test_every_structure_holds_one_string_object_per_user_id(tmp_path: Path) -> None:
    """The caches, the links of every target and the member sets share each user's id string
    (taken from the first cache, not from the interpreter's intern table)."""
    async with synced(tmp_path) as h:
        h.directory.update_user(pick(h, in_groups=["ZPA Users"])[0], name={"given": "Yvonne"})
        await h.cycle()
        await h.cycle()
        first = next(iter(h.engine.runtimes.values())).mapped
        canon = {uid: uid for uid in first}
        assert canon and all(entry.source_id is canon[uid] for uid, entry in first.items())
        for rt in h.engine.runtimes.values():
            assert rt.links is not None and rt.links.users
            assert all(canon[sid] is sid and link.source_id is sid for sid, link in rt.links.users.items())
            assert all(canon[uid] is uid for uid in rt.mapped)
            for glink in rt.links.groups.values():
                assert all(canon[m] is m for m in glink.members)
        for members in h.engine._last_members.values():
            assert all(canon[m] is m for m in members)


async def test_the_cycle_after_a_successful_one_plans_nothing_and_sends_nothing(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        report = await h.cycle()
        for target in TARGETS:
            tr = h.target_report(target)
            assert tr.plan_counts == {}
            assert tr.results == {}
            assert tr.outcome == "success"
            assert not tr.full_sync
            assert h.emulator(target).writes() == 0
            # not a full sync: the links are trusted and nothing is read either
            assert sum(h.emulator(target).counters.values()) == 0
            (finished,) = h.events("cycle.finished", target=target)
            assert (finished["applied"], finished["failed"]) == (0, 0)
        assert not report.failed


async def test_a_no_op_cycle_holds_no_user_json_and_a_changed_user_is_mapped_again(tmp_path: Path) -> None:
    """The snapshot drops the JSON of every user the state file holds as it is and every target has
    mapped (memory at 1,000,000 users); a user changed in PingOne keeps its JSON, is written to the
    state file and reaches the targets."""
    async with synced(tmp_path) as h:
        snap = await h.engine.snapshot(await h.engine._streaming_hook())
        assert snap.users and all(user is UNCHANGED for user in snap.users.values())
        assert snap.hashes == {}         # a user held as UNCHANGED has the stored hash
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        h.directory.update_user(uid, name={"given": "Yvonne"})
        snap = await h.engine.snapshot(await h.engine._streaming_hook())
        assert [u for u, user in snap.users.items() if user is not UNCHANGED] == [uid]
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target)
            assert tuser(h.emulator(target), username(h, uid))["name"]["givenName"] == "Yvonne"
        stored = await h.store.load_snapshot()
        assert stored.users[uid]["name"]["given"] == "Yvonne"
        snap = await h.engine.snapshot(await h.engine._streaming_hook())
        assert all(user is UNCHANGED for user in snap.users.values())


async def test_unchanged_member_sets_are_one_object_across_cycles_snapshot_and_links(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        await h.cycle()
        before = dict(h.engine._last_members)
        await h.cycle()
        after = h.engine._last_members
        assert after and all(after[gid] is members for gid, members in before.items() if gid in after)
        for target in TARGETS:
            links = h.engine.runtimes[target].links
            assert links is not None and links.groups
            kept = {gid: link.members for gid, link in links.groups.items()}
            await h.cycle()
            links = h.engine.runtimes[target].links
            assert links is not None
            assert all(links.groups[gid].members is members for gid, members in kept.items())


async def test_an_equal_copy_of_the_mapping_cache_is_not_trusted_for_what_the_state_file_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook trusts the cache the last saved snapshot filled only while a target still holds that
    very object (`known is cache`): after a reconfiguration, even an equal copy of it makes the
    hook read the stored hashes instead, and the snapshot and the plans come out the same."""
    async with synced(tmp_path) as h:
        first = next(iter(h.engine.runtimes))
        old = h.engine.runtimes[first]
        h.retarget(first, requests_per_second=old.config.requests_per_second + 1)
        new = h.engine.runtimes[first]
        assert new is not old and not new.mapped
        new.mapped.update(old.mapped)
        assert new.mapped == old.mapped and new.mapped is not old.mapped
        reads: list[int] = []
        source_hashes = h.store.source_hashes

        async def counted() -> dict[str, Any]:
            found = await source_hashes()
            reads.append(len(found))
            return found

        monkeypatch.setattr(h.store, "source_hashes", counted)
        snap = await h.engine.snapshot(await h.engine._streaming_hook())
        assert reads == [len(h.directory.users)]
        assert snap.users and all(user is UNCHANGED for user in snap.users.values())
        report = await h.cycle()
        assert not report.failed
        for target in TARGETS:
            assert h.target_report(target).plan_counts == {}
            assert h.emulator(target).writes() == 0
            assert_in_sync(h, target)


@pytest.mark.parametrize("create_only", [frozenset(), frozenset({"displayName"})], ids=["all", "create_only"])
def test_the_summary_of_equal_copies_is_the_summary_of_shared_objects(create_only: frozenset[str]) -> None:
    """`Engine.summarize` counts a user or group in sync by `is` first, then by value: equal copies
    (other ids, other dicts, a frozenset against a `Members`) summarise as shared objects do."""
    summaries = []
    for shared in (True, False):
        desired, after = scenario(shared=shared, create_only=create_only)
        the_plan = plan(desired, after, Policy(), complete=True, now=0.0)
        summaries.append(Engine.summarize(desired, after, the_plan, ApplyResult(), snapshot_complete=True))
    assert summaries[1] == summaries[0]
    assert summaries[0]["users"]["success"] >= 4 and summaries[0]["groups"]["success"] >= 1


def test_sharing_makes_equal_values_one_object_and_changes_no_plan() -> None:
    """`share_member_sets` (before planning) and `share_with_desired` (links kept after the apply)
    replace a value by the other side's only when the two are equal: the plan stays the same."""
    desired, actual = scenario(shared=False)
    before = plan(desired, actual, Policy(), complete=True, now=0.0)
    share_member_sets(desired, actual)
    assert desired.groups["g1"].members is actual.groups["g1"].members            # equal: shared
    assert desired.groups["g2"].members is not actual.groups["g2"].members        # changed: kept
    assert plan(desired, actual, Policy(), complete=True, now=0.0) == before

    desired, actual = scenario(shared=False)
    users, groups = dict(actual.users), dict(actual.groups)
    share_with_desired(users, groups, desired)
    assert users["u01"].attrs is desired.users["u01"].attrs
    assert users["u05"].attrs is not desired.users["u05"].attrs
    assert groups["g3"].members is desired.groups["g3"].members
    assert groups["g2"].members is not desired.groups["g2"].members
    assert plan(desired, Actual(users, groups), Policy(), complete=True, now=0.0) == before


async def test_a_user_deleted_in_pingone_leaves_the_mapping_caches(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        assert all(uid in rt.mapped for rt in h.engine.runtimes.values())
        h.directory.delete_user(uid)
        await h.cycle()
        assert all(uid not in rt.mapped for rt in h.engine.runtimes.values())
        assert all(len(rt.mapped) == len(h.directory.users) for rt in h.engine.runtimes.values())


async def test_a_scope_filter_on_group_membership_keeps_the_json_it_needs(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        staff = group_id(h, "All Staff")
        h.retarget("zia", scope=Scope(groups=(), filter=f'memberOfGroups[id eq "{staff}"] and enabled eq true'))
        assert not (await h.cycle()).failed
        snap = await h.engine.snapshot(await h.engine._streaming_hook())
        assert UNCHANGED not in snap.users.values()        # zia's filter reads membership every cycle
        report = await h.cycle()
        assert not report.failed and h.target_report("zia").plan_counts == {}
        h.retarget("zia", scope=Scope(groups=(), filter="enabled eq true"))
        await h.cycle()
        await h.cycle()
        snap = await h.engine.snapshot(await h.engine._streaming_hook())
        assert all(user is UNCHANGED for user in snap.users.values())


# -- each change reaches the target in the next cycle -------------------------------------------------

async def test_an_attribute_change_is_patched_in_the_next_cycle(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        h.directory.update_user(uid, department="Research Lab", name={"given": "Zed"})
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target)
            em = h.emulator(target)
            assert tuser(em, username(h, uid))["name"]["givenName"] == "Zed"
            assert em.counters["PATCH /Users"] == 1
            assert em.writes() == 1
            (event,) = h.events("user.updated", target=target)
            assert (event["source_id"], event["user"], event["outcome"]) == (uid, username(h, uid), "applied")
            assert event["reason"] == "attributes_changed"
            assert set(event["changed"]) == {"name.givenName", "displayName", f"{ENTERPRISE}:department"}


async def test_a_user_disabled_then_enabled_again_in_pingone_follows_in_the_target(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        name = username(h, uid)
        h.directory.set_enabled(uid, False)
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target)
            (event,) = h.events("user.disabled", target=target)
            assert (event["source_id"], event["reason"], event["outcome"]) == (uid, "disabled_in_source", "applied")
        zia_user = tuser(h.sb.zia, name)
        assert zia_user is not None and zia_user["active"] is False
        # a disabled user stays a member of its groups
        assert zia_user["id"] in {m["value"] for m in tgroup(h.sb.zia, "ZIA Users")["members"]}
        assert h.sb.zpa.user_by_username(name) is None        # ZPA: active=false deletes (UNCONFIRMED knob)

        h.directory.set_enabled(uid, True)
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target)
        (enabled,) = h.events("user.enabled", target="zia")
        assert (enabled["source_id"], enabled["reason"]) == (uid, "enabled_in_source")
        assert h.sb.zia.counters["PATCH /Users"] == 1
        (created,) = h.events("user.created", target="zpa")   # ZPA had deleted it: created again
        assert created["source_id"] == uid
        assert tuser(h.sb.zpa, name)["active"] is True


@pytest.mark.parametrize("remove_action", ["disable", "delete"])
async def test_a_user_leaving_scope_is_deprovisioned_with_the_remove_action(tmp_path: Path,
                                                                         remove_action: str) -> None:
    async with synced(tmp_path) as h:
        for target in TARGETS:
            h.retarget(target, remove_action=remove_action)
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"], not_in=["ZPA Contractors"])
        name = username(h, uid)
        zia_id = tuser(h.sb.zia, name)["id"]
        h.directory.remove_member(group_id(h, "ZPA Users"), uid)
        h.directory.remove_member(group_id(h, "ZIA Users"), uid)
        await h.cycle()
        lingering = [name] if remove_action == "disable" else []
        for target in TARGETS:
            assert_in_sync(h, target, lingering=lingering)
            em = h.emulator(target)
            (event,) = h.events(f"user.{remove_action}d", target=target)
            assert (event["source_id"], event["reason"], event["outcome"]) == (uid, "left_scope", "applied")
            (left,) = h.events("group.members_removed", target=target)
            assert left["group"] == ("ZPA Users" if target == "zpa" else "ZIA Users")
            if remove_action == "delete":
                assert em.counters["DELETE /Users"] == 1
                assert em.user_by_username(name) is None
            else:
                assert em.counters["DELETE /Users"] == 0
        if remove_action == "disable":
            assert h.sb.zia.users[zia_id]["active"] is False
            assert zia_id not in {m["value"] for m in tgroup(h.sb.zia, "ZIA Users")["members"]}


@pytest.mark.parametrize("remove_action", ["disable", "delete"])
async def test_a_user_deleted_in_pingone_is_deprovisioned(tmp_path: Path, remove_action: str) -> None:
    async with synced(tmp_path) as h:
        for target in TARGETS:
            h.retarget(target, remove_action=remove_action)
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        name = username(h, uid)
        h.directory.delete_user(uid)
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target, lingering=[name] if remove_action == "disable" else [])
            (event,) = h.events(f"user.{remove_action}d", target=target)
            assert (event["source_id"], event["reason"]) == (uid, "deleted_in_source")
        if remove_action == "delete":
            assert h.sb.zia.user_by_username(name) is None
        else:
            assert tuser(h.sb.zia, name)["active"] is False


async def test_a_new_user_in_scope_is_created_and_added_to_its_groups(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        uid = add_person(h.directory, "new.hire", "ZPA Contractors", "ZIA Users")
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target)
            em = h.emulator(target)
            assert em.counters["POST /Users"] == 1
            (created,) = h.events("user.created", target=target)
            assert (created["source_id"], created["user"], created["reason"]) == (uid, "new.hire@example.com",
                                                                                  "new_in_scope")
            assert created["target_id"] == tuser(em, "new.hire@example.com")["id"]
        # transitive: through ZPA Contractors it is in ZPA Users as well, one PATCH per group
        added = {e["group"] for e in h.events("group.members_added", target="zpa")}
        assert added == {"ZPA Users", "ZPA Contractors"}
        assert h.sb.zpa.counters["PATCH /Groups"] == 2


async def test_a_group_renamed_in_pingone_is_renamed_in_the_target(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        gid = group_id(h, "ZPA Contractors")
        target_gid = tgroup(h.sb.zpa, "ZPA Contractors")["id"]
        h.directory.rename_group(gid, "ZPA External Contractors")
        h.directory.groups[gid]["_test_alias"] = "ZPA Contractors"   # the config still says the old name
        await h.cycle()
        assert_in_sync(h, "zpa")
        group = h.sb.zpa.groups[target_gid]
        assert group["displayName"] == "ZPA External Contractors"
        assert len(h.sb.zpa.groups) == 2
        assert (h.sb.zpa.counters["PATCH /Groups"], h.sb.zpa.writes()) == (1, 1)
        (event,) = h.events("group.renamed", target="zpa")
        assert (event["source_id"], event["target_id"], event["group"]) == (gid, target_gid, "ZPA External Contractors")
        assert event["before"] == "ZPA Contractors"
        assert h.sb.zia.writes() == 0


async def test_a_scope_group_renamed_in_pingone_keeps_its_users_and_members(tmp_path: Path) -> None:
    """ZIA Users is both the scope and the pushed group: after a rename it is still followed by id."""
    async with synced(tmp_path) as h:
        gid = group_id(h, "ZIA Users")
        target_gid = tgroup(h.sb.zia, "ZIA Users")["id"]
        members_before = {m["value"] for m in h.sb.zia.groups[target_gid]["members"]}
        h.directory.rename_group(gid, "ZIA Everyone")
        h.directory.groups[gid]["_test_alias"] = "ZIA Users"
        await h.cycle()
        assert_in_sync(h, "zia")
        assert h.sb.zia.groups[target_gid]["displayName"] == "ZIA Everyone"
        assert {m["value"] for m in h.sb.zia.groups[target_gid]["members"]} == members_before
        assert h.target_report("zia").plan_counts == {"group.rename": 1}
        assert (h.sb.zia.counters["PATCH /Groups"], h.sb.zia.writes()) == (1, 1)


async def test_a_pushed_group_deleted_in_pingone_is_deleted_in_the_target(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        gid = group_id(h, "ZPA Contractors")
        target_gid = tgroup(h.sb.zpa, "ZPA Contractors")["id"]
        only_contractors = {username(h, u) for u in h.directory.direct_member_ids(gid)
                            if u not in h.directory.direct_member_ids(group_id(h, "ZPA Users"))}
        h.directory.delete_group(gid)
        await h.cycle()
        assert_in_sync(h, "zpa", lingering=only_contractors)
        assert target_gid not in h.sb.zpa.groups
        assert h.sb.zpa.counters["DELETE /Groups"] == 1
        (event,) = h.events("group.deleted", target="zpa")
        assert (event["source_id"], event["reason"], event["outcome"]) == (gid, "group_deleted_in_source", "applied")
        assert h.events("group.not_found_in_source", target="zpa")


async def test_a_group_no_longer_selected_is_deleted_in_the_target_and_its_users_stay(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        h.retarget("zpa", groups=(GroupRef(name="ZPA Users"),))
        users_before = dict(h.sb.zpa.users)
        await h.cycle()
        assert_in_sync(h, "zpa")
        assert [g["displayName"] for g in h.sb.zpa.groups.values()] == ["ZPA Users"]
        assert (h.sb.zpa.counters["DELETE /Groups"], h.sb.zpa.writes()) == (1, 1)
        assert h.sb.zpa.users.keys() == users_before.keys()
        (event,) = h.events("group.deleted", target="zpa")
        assert event["reason"] == "group_unselected"


def _both_zpa_groups(d: Directory) -> None:
    """Make one contractor a direct member of ZPA Users as well (stays in scope when leaving Contractors)."""
    contractors = d.group_by_name("ZPA Contractors")["id"]
    zpa = d.group_by_name("ZPA Users")["id"]
    uid = sorted(u for u in d.direct_member_ids(contractors)
                 if d.users[u].get("enabled", True) and "@" in d.users[u]["username"])[0]
    d.add_member(zpa, uid)


async def test_a_member_added_and_a_member_removed_reach_the_target_group(tmp_path: Path) -> None:
    async with synced(tmp_path, prepare=_both_zpa_groups) as h:
        contractors = group_id(h, "ZPA Contractors")
        (joiner,) = pick(h, in_groups=["ZPA Users"], not_in=["ZPA Contractors"])
        (leaver,) = pick(h, in_groups=["ZPA Users", "ZPA Contractors"])
        h.directory.add_member(contractors, joiner)
        h.directory.remove_member(contractors, leaver)
        await h.cycle()
        assert_in_sync(h, "zpa")
        members = {m["value"] for m in tgroup(h.sb.zpa, "ZPA Contractors")["members"]}
        assert tuser(h.sb.zpa, username(h, joiner))["id"] in members
        assert tuser(h.sb.zpa, username(h, leaver))["id"] not in members
        assert tuser(h.sb.zpa, username(h, leaver))["active"] is True
        assert (h.sb.zpa.counters["PATCH /Groups"], h.sb.zpa.writes()) == (2, 2)
        (added,) = h.events("group.members_added", target="zpa")
        (removed,) = h.events("group.members_removed", target="zpa")
        assert (added["group"], added["members"]) == ("ZPA Contractors", 1)
        assert (removed["group"], removed["members"]) == ("ZPA Contractors", 1)


async def test_a_nested_membership_change_reaches_the_target(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        d = h.directory
        eu = d.add_group("ZPA Contractors EU")["id"]
        newcomers = [add_person(d, f"eu.contractor{i}") for i in range(3)]
        for uid in newcomers:
            d.add_member(eu, uid)
        d.nest(eu, group_id(h, "ZPA Contractors"))
        await h.cycle()
        assert_in_sync(h, "zpa")
        assert h.sb.zpa.counters["POST /Users"] == 3
        for uid in newcomers:
            target_id = tuser(h.sb.zpa, username(h, uid))["id"]
            for name in ("ZPA Users", "ZPA Contractors"):
                assert target_id in {m["value"] for m in tgroup(h.sb.zpa, name)["members"]}

        d.unnest(eu, group_id(h, "ZPA Contractors"))
        await h.cycle()
        assert_in_sync(h, "zpa", lingering=[username(h, u) for u in newcomers])
        assert {e["source_id"] for e in h.events("user.disabled", target="zpa", reason="left_scope")} == set(newcomers)
        assert {e["group"] for e in h.events("group.members_removed", target="zpa")} == {"ZPA Users",
                                                                                        "ZPA Contractors"}


# -- action switches ------------------------------------------------------------------------------

async def test_create_switched_off_sends_no_create_and_reports_every_user_unsynced(tmp_path: Path) -> None:
    no_create = {"actions": Actions(create=False)}
    async with harness(tmp_path, zpa=no_create, zia=no_create) as h:
        report = await h.cycle()
        assert not report.failed
        for target in TARGETS:
            em = h.emulator(target)
            assert writes(em, "POST /Users", "POST /Groups", "PATCH /Groups") == 0
            assert em.users == {} and em.groups == {}
            tr = h.target_report(target)
            users = tr.summary["users"]
            # PingOne's example: creation off -> Impacted N / Success 0 / Partial 0 / Unsynced N / Failed 0
            assert users["impacted"] > 0
            assert (users["success"], users["partial"], users["unsynced"], users["failed"]) == (
                0, 0, users["impacted"], 0)
            assert tr.summary["groups"]["unsynced"] == tr.summary["groups"]["impacted"] > 0
            assert tr.summary["operations"]["user.create.skipped"] == tr.plan_counts["user.create.skipped"] > 0
            skipped = h.events("user.skipped", target=target, reason="action_disabled")
            assert len(skipped) == tr.plan_counts["user.create.skipped"]
            assert all(e["op"] == "create" and e["outcome"] == "skipped" for e in skipped)
            assert h.events("group.skipped", target=target, reason="action_disabled", op="create")


async def test_update_switched_off_sends_no_update_and_reports_the_user_partial(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        before = {t: dict(h.target_report(t).summary["users"]) for t in TARGETS}
        for target in TARGETS:
            h.retarget(target, actions=Actions(update=False))
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        h.directory.update_user(uid, department="Nowhere")
        await h.cycle()
        for target in TARGETS:
            em = h.emulator(target)
            assert em.writes() == 0
            assert target_view(tuser(em, username(h, uid)), target)["department"] != "Nowhere"
            users = h.target_report(target).summary["users"]
            assert users["partial"] == 1
            assert users["success"] == before[target]["success"] - 1
            assert users["failed"] == 0
            (event,) = h.events("user.skipped", target=target, reason="action_disabled")
            assert (event["op"], event["planned_reason"], event["source_id"]) == ("update", "attributes_changed", uid)


async def test_disable_switched_off_leaves_the_user_active_and_partial(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        for target in TARGETS:
            h.retarget(target, actions=Actions(disable=False))
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"])
        h.directory.set_enabled(uid, False)
        await h.cycle()
        for target in TARGETS:
            em = h.emulator(target)
            assert em.writes() == 0
            assert tuser(em, username(h, uid))["active"] is True
            tr = h.target_report(target)
            assert tr.summary["users"]["partial"] == 1
            assert tr.summary["operations"] == {"user.disable.skipped": 1}
            (event,) = h.events("user.skipped", target=target, reason="action_disabled")
            assert (event["op"], event["planned_reason"]) == ("disable", "disabled_in_source")


@pytest.mark.parametrize("remove_action", ["disable", "delete"])
async def test_deprovision_switched_off_keeps_a_user_that_left_scope(tmp_path: Path, remove_action: str) -> None:
    async with synced(tmp_path) as h:
        before = {t: dict(h.target_report(t).summary["users"]) for t in TARGETS}
        for target in TARGETS:
            h.retarget(target, actions=Actions(deprovision=False), remove_action=remove_action)
        (uid,) = pick(h, in_groups=["ZPA Users", "ZIA Users"], not_in=["ZPA Contractors"])
        name = username(h, uid)
        h.directory.delete_user(uid)
        await h.cycle()
        for target in TARGETS:
            em = h.emulator(target)
            assert writes(em, "DELETE /Users", "PATCH /Users", "PUT /Users") == 0
            assert tuser(em, name)["active"] is True
            tr = h.target_report(target)
            assert tr.summary["users"]["impacted"] == before[target]["impacted"] - 1
            assert tr.summary["users"]["failed"] == 0
            op = "delete" if remove_action == "delete" else "disable"
            assert tr.summary["operations"][f"user.{op}.skipped"] == 1
            (event,) = h.events("user.skipped", target=target, reason="action_disabled")
            assert (event["op"], event["planned_reason"], event["source_id"]) == (op, "deleted_in_source", uid)


# -- usernames, failures ------------------------------------------------------------------------------

def _plain_usernames(d: Directory) -> None:
    for name in ("ZPA Users", "ZIA Users"):
        gid = d.group_by_name(name)["id"]
        user = d.add_user(f"plain{name[:3].lower()}", email=f"plain{name[:3].lower()}@example.com",
                          given="Plain", family="User")
        d.add_member(gid, user["id"])


async def test_a_username_that_is_not_an_email_is_skipped_and_logged_and_the_others_provisioned(
        tmp_path: Path) -> None:
    async with harness(tmp_path, prepare=_plain_usernames) as h:
        report = await h.cycle()
        assert not report.failed
        for target in TARGETS:
            assert_in_sync(h, target)
            scope, _ = scope_and_groups(h, target)
            plain = {uid for uid in scope if not valid_username(username(h, uid))}
            assert f"plain{target[:3]}" in {username(h, u) for u in plain}
            skipped = h.events("user.skipped", target=target, reason="invalid_username")
            assert {e["source_id"] for e in skipped} == plain
            for e in skipped:
                assert e["user"] == username(h, e["source_id"])
                assert e["user"] in e["detail"]
                assert e["outcome"] == "skipped"
            assert all(h.emulator(target).user_by_username(username(h, u)) is None for u in plain)
            assert h.target_report(target).summary["users"]["skipped"] == len(plain)
            assert h.target_report(target).outcome == "success"


def _foreign_domain(d: Directory) -> None:
    zia = d.group_by_name("ZIA Users")["id"]
    user = d.add_user("someone@unregistered.org", email="someone@unregistered.org", given="Some", family="One")
    d.add_member(zia, user["id"])


async def test_a_failed_create_is_contained_recorded_logged_and_counted(tmp_path: Path) -> None:
    async with harness(tmp_path, prepare=_foreign_domain) as h:
        report = await h.cycle()
        assert report.failed
        tr = h.target_report("zia")
        assert (tr.outcome, tr.failed) == ("partial_failure", 1)
        assert tr.summary["users"]["failed"] == 1
        (event,) = h.events("user.create_failed", target="zia")
        assert (event["user"], event["outcome"], event["http_status"]) == ("someone@unregistered.org", "failed", 400)
        assert event["log_level"] == "warning"
        assert h.sb.zia.user_by_username("someone@unregistered.org") is None
        # everyone else went in: the failure is contained to its entity
        zia_users = {u["userName"].lower() for u in h.sb.zia.users.values()}
        scope, _ = scope_and_groups(h, "zia")
        want = {username(h, u).lower() for u in scope if valid_username(username(h, u))
                and h.directory.users[u].get("enabled", True)} - {"someone@unregistered.org"}
        assert zia_users == want
        failures = await h.store.recent_failures("zia")
        assert [(f["name"], f["http_status"], f["op"]) for f in failures] == [("someone@unregistered.org", 400,
                                                                                "create")]
        assert h.target_report("zpa").outcome == "success"


# -- drift ------------------------------------------------------------------------------------------

async def test_drift_made_in_the_target_is_repaired_at_the_next_full_sync(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        victims: dict[str, list[str]] = {}
        for target in TARGETS:
            em = h.emulator(target)
            group = "ZPA Users" if target == "zpa" else "ZIA Users"
            deleted, changed, unlinked = pick(h, in_groups=[group], not_in=["ZPA Contractors"], n=3)
            victims[target] = [deleted, changed, unlinked]
            em.delete_user(tuser(em, username(h, deleted))["id"])
            resource = dict(tuser(em, username(h, changed)))
            resource["displayName"] = "Changed Behind Our Back"
            em.put_user(resource)
            target_group = dict(tgroup(em, group))
            unlinked_id = tuser(em, username(h, unlinked))["id"]
            target_group["members"] = [m for m in target_group["members"] if m["value"] != unlinked_id]
            em.put_group(target_group)

        # not a full sync: the links are trusted, the drift stays
        await h.cycle()
        for target in TARGETS:
            assert h.emulator(target).writes() == 0
            assert h.target_report(target).plan_counts == {}

        for target in TARGETS:
            h.retarget(target, full_sync_every=0.001)
        await h.cycle()
        for target in TARGETS:
            tr = h.target_report(target)
            assert tr.full_sync
            assert_in_sync(h, target)
            deleted, changed, unlinked = victims[target]
            (missing,) = h.events("user.missing_in_target", target=target)
            assert missing["source_id"] == deleted
            (created,) = h.events("user.created", target=target)
            assert created["source_id"] == deleted
            (updated,) = h.events("user.updated", target=target)
            assert (updated["source_id"], updated["changed"]) == (changed, ["displayName"])
            added = h.events("group.members_added", target=target)
            assert sum(e["members"] for e in added) == 2       # the re-created user and the unlinked one
            assert tr.outcome == "success"


async def test_a_user_already_in_the_target_is_adopted_not_duplicated(tmp_path: Path) -> None:
    def seed_target(h: Harness) -> str:
        (uid,) = pick(h, in_groups=["ZIA Users"], not_in=["ZPA Users"])
        user = h.directory.users[uid]
        h.sb.zia.put_user({"userName": user["username"].upper(), "displayName": "Old Name", "active": True})
        return uid

    async with harness(tmp_path) as h:
        uid = seed_target(h)
        await h.cycle()
        assert_in_sync(h, "zia")
        (adopted,) = h.events("user.adopted", target="zia")
        assert adopted["source_id"] == uid
        assert h.sb.zia.counters["POST /Users"] == len(h.sb.zia.users) - 1


@pytest.mark.parametrize("membership", ["overwrite", "merge"])
async def test_a_same_named_group_in_the_target_is_adopted_with_group_membership(tmp_path: Path,
                                                                                membership: str) -> None:
    async with harness(tmp_path, zia={"group_membership": membership}) as h:
        outsider = h.sb.zia.put_user({"userName": "outsider@example.com", "displayName": "Not Ours"})
        existing = h.sb.zia.put_group({"displayName": "ZIA Users", "members": [{"value": outsider["id"]}]})
        await h.cycle()
        assert len(h.sb.zia.groups) == 1
        group = h.sb.zia.groups[existing["id"]]
        members = {m["value"] for m in group["members"]}
        assert (outsider["id"] in members) is (membership == "merge")
        assert outsider["id"] in h.sb.zia.users            # never touched: provisiond does not manage it
        (adopted,) = h.events("group.adopted", target="zia")
        assert adopted["target_id"] == existing["id"]
        assert h.sb.zia.counters["POST /Groups"] == 0
        h.retarget("zia", groups=())
        await h.cycle()
        # DESIGN.md: a group no longer pushed is deleted only if provisiond created it
        assert existing["id"] in h.sb.zia.groups
        assert h.sb.zia.counters["DELETE /Groups"] == 0
        (released,) = h.events("group.released", target="zia")
        assert (released["target_id"], released["reason"]) == (existing["id"], "group_unselected")
        await h.cycle()
        assert h.target_report("zia").plan_counts == {}


async def test_removals_above_max_deletes_are_held_until_approved(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        d = h.directory
        zia = group_id(h, "ZIA Users")
        leavers = pick(h, in_groups=["ZIA Users"], n=12)
        for uid in leavers:
            d.remove_member(zia, uid)
        await h.cycle()
        tr = h.target_report("zia")
        assert tr.plan_counts["user.disable.held"] == len(leavers)
        assert writes(h.sb.zia, "PATCH /Users", "DELETE /Users") == 0
        assert all(tuser(h.sb.zia, username(h, u))["active"] for u in leavers)
        (held,) = h.events("plan.removals_held", target="zia")
        assert held["held"] == len(leavers)
        # the member removal from the pushed group is held with them
        assert tr.plan_counts["group.remove_members.held"] == 1
        assert writes(h.sb.zia, "PATCH /Groups") == 0
        assert await h.store.held_count("zia") == len(leavers) + 1

        released = await approvals.approve(h.store, "zia")
        assert released.removals == {"disable": len(leavers)} and released.member_removals == 1
        await h.cycle()
        assert h.sb.zia.counters["PATCH /Users"] == len(leavers)
        assert_in_sync(h, "zia", lingering=[username(h, u) for u in leavers])
        assert not await h.store.approved("zia")     # an approval is used once


# -- batching -----------------------------------------------------------------------------------------

BIG = 5000


def _big_group(d: Directory) -> None:
    big = d.add_group("Big Group")["id"]
    for i in range(BIG):
        user = d.add_user(f"big{i:04d}@example.com", email=f"big{i:04d}@example.com", given="Big",
                          family=f"User {i}")
        d.add_member(big, user["id"])


@pytest.mark.timeout(180)   # 5,000 creates in process: about 30 s of CPU alone, more beside other workers
async def test_a_5000_member_group_costs_ceil_members_over_batch_patches(tmp_path: Path) -> None:
    big = {"groups": (GroupRef(name="Big Group"),), "scope": Scope(groups=(GroupRef(name="Big Group"),)),
           "concurrency": 16}
    async with harness(tmp_path, users=20, groups=6, prepare=_big_group, zpa=big,
                       zia={"scope": Scope(groups=(GroupRef(name="ZIA Users"),))}) as h:
        await h.cycle()
        batch = h.config.target("zpa").membership_batch
        group = tgroup(h.sb.zpa, "Big Group")
        assert len(group["members"]) == BIG
        assert h.sb.zpa.counters["PATCH /Groups"] == math.ceil(BIG / batch) == 50
        assert h.sb.zpa.counters["POST /Users"] == BIG
        (event,) = h.events("group.members_added", target="zpa")
        assert (event["members"], event["requests"]) == (BIG, math.ceil(BIG / batch))
        assert_in_sync(h, "zpa")


# -- logs and secrets -----------------------------------------------------------------------------

async def test_each_outcome_is_one_log_event_with_the_stable_keys(tmp_path: Path) -> None:
    async with synced(tmp_path, prepare=_plain_usernames) as h:
        for target in TARGETS:
            h.retarget(target, remove_action="delete")
        d = h.directory
        changed, disabled, deleted = pick(h, in_groups=["ZIA Users"], not_in=["ZPA Users"], n=3)
        names = {uid: username(h, uid) for uid in (changed, disabled, deleted)}
        d.update_user(changed, title="Chief", department="Board")
        d.set_enabled(disabled, False)
        d.delete_user(deleted)
        new = add_person(d, "log.newcomer", "ZIA Users")
        contractors = group_id(h, "ZPA Contractors")
        d.rename_group(contractors, "ZPA Partners")
        d.groups[contractors]["_test_alias"] = "ZPA Contractors"
        await h.cycle()
        for target in TARGETS:
            assert_in_sync(h, target)

        names[new] = "log.newcomer@example.com"
        expected = {
            "user.updated": (changed, "update"), "user.disabled": (disabled, "disable"),
            "user.deleted": (deleted, "delete"), "user.created": (new, "create"),
        }
        for name, (uid, op) in expected.items():
            (event,) = h.events(name, target="zia")
            assert ENTITY_KEYS <= event.keys(), (name, ENTITY_KEYS - event.keys())
            assert (event["source_id"], event["outcome"], event["op"], event["user"]) == (
                uid, "applied", op, names[uid])
            assert isinstance(event["cycle"], int) and event["attempts"] >= 1 and event["duration_ms"] >= 0
            assert event["log_level"] == "info"
        for target, name, group in (("zpa", "group.renamed", "ZPA Partners"),
                                    ("zia", "group.members_added", "ZIA Users"),
                                    ("zia", "group.members_removed", "ZIA Users")):
            (event,) = h.events(name, target=target)
            assert ENTITY_KEYS <= event.keys(), (name, ENTITY_KEYS - event.keys())
            assert (event["group"], event["outcome"]) == (group, "applied")
        (skip,) = h.events("user.skipped", target="zia", reason="invalid_username")
        assert {"target", "cycle", "source_id", "user", "op", "outcome", "reason"} <= skip.keys()
        (finished,) = h.events("cycle.finished", target="zia")
        assert finished["outcome"] == "success"
        assert finished["applied"] == sum(h.target_report("zia").results.values())
        assert {"users", "groups", "failed", "skipped", "held", "full_sync"} <= finished.keys()
        assert finished["users"] == h.target_report("zia").summary["users"]
        # one event per entity and operation: no entity is logged twice for one op
        entity = [(e["event"], e.get("source_id")) for e in h.last_logs
                  if e.get("target") == "zia" and e.get("source_id") and e["event"].startswith(("user.", "group."))]
        assert len(entity) == len(set(entity))

        # the group created and deleted events, on a config change
        h.retarget("zia", groups=(GroupRef(name="ZIA Users"), GroupRef(name="All Staff")))
        await h.cycle()
        (created,) = h.events("group.created", target="zia")
        assert (created["group"], created["outcome"], created["reason"]) == ("All Staff", "applied", "new_group")
        h.retarget("zia", groups=(GroupRef(name="ZIA Users"),))
        await h.cycle()
        (removed,) = h.events("group.deleted", target="zia")
        assert (removed["group"], removed["reason"]) == ("All Staff", "group_unselected")


async def test_no_secret_reaches_the_logs_or_the_state_file(tmp_path: Path) -> None:
    async with synced(tmp_path) as h:
        await h.store.db.execute("PRAGMA wal_checkpoint(FULL)")
        text = repr(h.logs)
        raw = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("state.db*")))  # noqa: ASYNC240
        for secret in (ZPA_TOKEN, ZIA_TOKEN, DEFAULT_CLIENT_SECRET):
            assert secret not in text
            assert secret.encode() not in raw


async def test_a_malformed_answer_while_reading_one_target_fails_that_target_only(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.sb.zpa.faults.request_count = 0
        h.sb.zpa.faults.fail_nth = {1: "malformed"}      # the full sync's first GET /Users
        report = await h.cycle()
        zpa, zia = h.target_report("zpa"), h.target_report("zia")
        assert zpa.outcome == "failed" and report.failed
        (finished,) = h.events("cycle.finished", target="zpa")
        assert finished["reason"] == "malformed_response" and "not JSON" in finished["error"]
        assert zia.outcome == "success"
        assert_in_sync(h, "zia")
        h.sb.zpa.faults.fail_nth = {}
        await h.cycle()
        assert h.target_report("zpa").outcome == "success"
        assert_in_sync(h, "zpa")


async def test_the_snapshot_holds_only_the_user_keys_the_rules_read(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.cycle()
        (uid,) = pick(h, in_groups=["ZPA Users"], n=1)
        stored = await h.store.find_source_user(uid)
        assert stored is not None
        assert "username" in stored and "enabled" in stored and "name" in stored
        assert "mobilePhone" not in stored and "lifecycle" not in stored     # read by no rule
        assert set(stored) < set(h.directory.users[uid])
