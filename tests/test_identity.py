"""Issue 13: one target account per person, whatever the order of events.

Each test drives the emulators (daemon/sandbox/) through the Engine or the real CLI and reads the
targets back over SCIM HTTP (paged GET /Users and /Groups with the target's bearer token), not
from provisiond's own state.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from daemon import approvals
from daemon.applier import Applier
from daemon.config import MaxDeletes
from daemon.links import PHASE_DISABLE, PHASE_USERS, Op, UserLink
from daemon.mapping import username_key
from daemon.sandbox.runner import Sandbox
from tests.harness import Harness, harness
from tests.safety import cli, cli_env

pytestmark = pytest.mark.timeout(90)

READ_PAGE = 50


# -- reading a target over SCIM HTTP -----------------------------------------------------------


async def scim_list(h: Harness, target: str, collection: str) -> list[dict[str, Any]]:
    """Every resource of /Users or /Groups, paged, as the target answers over HTTP."""
    cfg = h.config.target(target)
    assert cfg.token is not None
    headers = {"Authorization": f"Bearer {cfg.token.reveal()}"}
    out: list[dict[str, Any]] = []
    start = 1
    async with aiohttp.ClientSession() as session:
        while True:
            params = {"startIndex": str(start), "count": str(READ_PAGE)}
            async with session.get(f"{cfg.base_url.rstrip('/')}/{collection}", params=params,
                                   headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                body = json.loads(await resp.read())
            page = body.get("Resources") or []
            out.extend(page)
            if not page or start + len(page) - 1 >= int(body.get("totalResults", 0)):
                return out
            start += len(page)


async def scim_get(h: Harness, target: str, path: str) -> dict[str, Any]:
    cfg = h.config.target(target)
    assert cfg.token is not None
    async with aiohttp.ClientSession() as session, session.get(
            f"{cfg.base_url.rstrip('/')}{path}", headers={"Authorization": f"Bearer {cfg.token.reveal()}"}) as resp:
        assert resp.status == 200, await resp.text()
        loaded: dict[str, Any] = json.loads(await resp.read())
        return loaded


def active(res: dict[str, Any]) -> bool:
    return res.get("active", True) in (True, "true")


async def accounts(h: Harness, target: str, user_name: str) -> list[dict[str, Any]]:
    """The target's users whose userName is `user_name` as the target compares (lowercased)."""
    return [u for u in await scim_list(h, target, "Users") if str(u["userName"]).lower() == user_name.lower()]


def writes(h: Harness, target: str) -> list[dict[str, Any]]:
    return [r for r in h.emulator(target).request_log if r["method"] not in ("GET", "HEAD")]


# -- item 7: userName keys compare by lowercasing ------------------------------------------------

LOOKALIKES = (
    ("strasse@example.com", "straße@example.com"),        # casefold: "ß" -> "ss"
    ("sam@example.com", "\u017fam@example.com"),           # casefold: long s -> "s"
    ("ilker@example.com", "\u0130lker@example.com"),       # dotted capital I lowercases to "i̇"
)


def test_username_keys_lowercase_as_scim_servers_do() -> None:
    for a, b in LOOKALIKES:
        assert username_key(a) != username_key(b), (a, b)
        assert a.lower() != b.lower()            # the emulator's (and servers') uniqueness rule agrees
    assert username_key("Straße@Example.com") == username_key("straße@example.com")
    # The Kelvin sign is "K" after NFC (a canonical singleton): the same userName at any server.
    assert username_key("\u212aate@example.com") == username_key("kate@example.com") == "kate@example.com"
    assert username_key("\u0130lker@x.io") == "i\u0307lker@x.io"


def _lookalikes(sb: Sandbox) -> None:
    d = sb.directory
    gid = d.group_by_name("ZPA Users")["id"]
    for pair in LOOKALIKES:
        for name in pair:
            user = d.add_user(name, email=name, given="Look", family="Alike")
            d.add_member(gid, user["id"])


async def test_lookalike_usernames_stay_two_people(tmp_path: Path) -> None:
    """Item 7: "strasse" and "straße", "sam" and the long-s "sam", "ilker" and "İlker" are two people to the
    target (it lowercases): each gets its own account, neither is skipped as a conflict, and a
    full sync re-reading the target adopts nothing across them."""
    async with harness(tmp_path, prepare=_lookalikes, daemon={"full_sync_every": 1e-6}) as h:
        assert not (await h.cycle()).failed
        assert not [e for e in h.events("user.skipped") if e.get("reason") == "conflict"]
        users = await scim_list(h, "zpa", "Users")
        by_name = {u["userName"]: u for u in users}
        assert len(by_name) == len(users)
        for pair in LOOKALIKES:
            ids = {by_name[name]["id"] for name in pair}
            assert len(ids) == 2 and all(active(by_name[n]) for n in pair), pair
        # the next cycle is a full sync: nothing is adopted across a pair, nothing is written
        assert not (await h.cycle()).failed
        assert h.target_report("zpa").full_sync
        assert writes(h, "zpa") == []
        assert not h.events("user.adopted")


# -- item 6: a lookup takes only the object named as asked -------------------------------------


def _straße_and_a_squatter(sb: Sandbox) -> None:
    # Someone else's account, whose displayName is the userName provisiond will look up.
    sb.zpa.put_user({"userName": "strasse@example.com", "displayName": "straße@example.com", "active": True})
    d = sb.directory
    user = d.add_user("straße@example.com", email="straße@example.com", given="Anna", family="Straße")
    d.add_member(d.group_by_name("ZPA Users")["id"], user["id"])


async def test_crash_recovery_never_takes_a_lone_result_that_names_someone_else(tmp_path: Path) -> None:
    """Item 6: a create of "straße" was in flight when the daemon died. Recovery looks it up with
    the target's custom match_filter (on displayName), which answers with one account: someone
    else's ("strasse", casefold's twin). It is not taken; the user is created, and "strasse" is
    never written to (nor adopted by the full sync that follows)."""
    async with harness(tmp_path, prepare=_straße_and_a_squatter,
                       zpa={"match_filter": 'displayName eq "%s"'}) as h:
        uid = h.directory.user_by_username("straße@example.com")["id"]
        other = next(u for u in await scim_list(h, "zpa", "Users") if u["userName"] == "strasse@example.com")
        cycle_id = await h.store.start_cycle("zpa", full_sync=False)
        await h.store.save_plan(cycle_id, "zpa", [Op(1, PHASE_USERS, "user", "create", uid, None,
                                                     "straße@example.com", "new_in_scope",
                                                     {"attrs": {"userName": "straße@example.com"}})])
        await h.store.mark_in_flight(cycle_id, [1])

        assert not (await h.cycle()).failed
        assert not h.events("user.recovered", target="zpa")
        assert not h.events("user.adopted", target="zpa")
        mine = await accounts(h, "zpa", "straße@example.com")
        assert len(mine) == 1 and mine[0]["id"] != other["id"] and active(mine[0])
        assert await scim_get(h, "zpa", f"/Users/{other['id']}") == other
        assert not [r for r in writes(h, "zpa") if other["id"] in r["path"]]
        (created,) = h.events("user.created", target="zpa", source_id=uid)
        assert created["target_id"] == mine[0]["id"]


# -- item 1: rehire under the same username ---------------------------------------------------

REHIRED = "rehire.me@example.com"


def _rehire_candidate(sb: Sandbox) -> None:
    """A user in both targets' scope, and in ZPA's pushed "ZPA Contractors" group."""
    d = sb.directory
    user = d.add_user(REHIRED, email=REHIRED, given="Re", family="Hire", department="Sales")
    for group in ("ZPA Contractors", "ZIA Users"):
        d.add_member(d.group_by_name(group)["id"], user["id"])


def rehire(h: Harness, user_name: str = REHIRED, **attrs: Any) -> tuple[str, str]:
    """Delete the PingOne user, create a new one with the same username in the same groups:
    (old id, new id)."""
    d = h.directory
    old = d.user_by_username(user_name)
    groups = [gid for gid, members in d.members.items() if old["id"] in members]
    d.delete_user(old["id"])
    new = d.add_user(user_name, email=user_name, given="Re", family="Hire", **attrs)
    for gid in groups:
        d.add_member(gid, new["id"])
    return old["id"], new["id"]


def disabling_or_deleting(h: Harness, target: str, target_id: str) -> list[dict[str, Any]]:
    out = []
    for r in writes(h, target):
        if not r["path"].endswith(f"/Users/{target_id}"):
            continue
        body = json.dumps(r.get("body"))
        if r["method"] == "DELETE" or '"active", "value": false' in body or '"active": false' in body:
            out.append(r)
    return out


async def test_a_rehire_keeps_one_active_account_linked_to_the_new_user(tmp_path: Path) -> None:
    """Item 1: the old user is deleted and a new one gets the username in the same interval. After
    one cycle each target holds exactly one active account for it, the departed user's, now
    linked to the new PingOne id (externalId), with one request at most and no removal; it stays
    so through later full syncs (no flapping), and `why` tells the story."""
    async with harness(tmp_path, prepare=_rehire_candidate, daemon={"full_sync_every": 1e-6}) as h:
        assert not (await h.cycle()).failed
        before = {t: (await accounts(h, t, REHIRED))[0]["id"] for t in ("zpa", "zia")}
        old_id, new_id = rehire(h, department="Marketing")

        for cycle in range(3):
            report = await h.cycle()
            assert not report.failed
            for target in ("zpa", "zia"):
                assert h.target_report(target).full_sync
                (account,) = await accounts(h, target, REHIRED)
                assert account["id"] == before[target], "the departed user's account is taken over"
                assert active(account), f"{target} cycle {cycle}: the rehire's account is inactive"
                assert account["externalId"] == new_id
                assert disabling_or_deleting(h, target, account["id"]) == []
                if cycle == 0:
                    (adopted,) = h.events("user.adopted", target=target)
                    assert adopted["source_id"] == new_id and adopted["from_source_id"] == old_id
                    assert adopted["reason"] == "adopted_from_departed"
                    assert len([r for r in writes(h, target) if account["id"] in r["path"]]) == 1
                else:
                    assert writes(h, target) == [], f"{target}: a quiet cycle wrote"
        # the object's memberships follow it: still in ZIA Users (read back over HTTP)
        zia_group = next(g for g in await scim_list(h, "zia", "Groups") if g["displayName"] == "ZIA Users")
        members = {m["value"] for m in (await scim_get(h, "zia", f"/Groups/{zia_group['id']}"))["members"]}
        assert before["zia"] in members

        why = await cli("why", REHIRED, "-c", str(h.config_path))
        assert why.returncode == 0, why.stderr
        text = why.stdout.decode()
        assert "took over the account of departed user" in text and old_id in text, text


async def test_a_removal_held_by_max_deletes_never_reaches_the_rehires_account(tmp_path: Path) -> None:
    """Item 1: the departed user's removal is held by max_deletes (with others); the rehire comes a
    cycle later and takes the account over; the approval then releases the other removals, and
    nothing is ever sent to disable the rehire's account."""
    async with harness(tmp_path, prepare=_rehire_candidate,
                       zia={"max_deletes": MaxDeletes(count=1)}) as h:
        assert not (await h.cycle()).failed
        (account,) = await accounts(h, "zia", REHIRED)
        d = h.directory
        others = sorted(u for u in d.direct_member_ids(d.group_by_name("ZIA Users")["id"])
                        if d.users[u]["username"] != REHIRED)[:2]
        old = d.user_by_username(REHIRED)["id"]
        d.delete_user(old)
        for uid in others:
            d.delete_user(uid)
        await h.cycle()
        assert h.target_report("zia").summary["held"] == 3
        new = d.add_user(REHIRED, email=REHIRED, given="Re", family="Hire")
        d.add_member(d.group_by_name("ZIA Users")["id"], new["id"])
        await h.cycle()
        assert disabling_or_deleting(h, "zia", account["id"]) == []
        assert h.target_report("zia").summary["held"] == 2      # the rehire's is no removal any more
        await approvals.approve(h.store, "zia")
        await h.cycle()
        assert disabling_or_deleting(h, "zia", account["id"]) == []
        assert len(h.events("user.disabled", target="zia")) == 2
        (now,) = await accounts(h, "zia", REHIRED)
        assert now["id"] == account["id"] and active(now) and now["externalId"] == new["id"]


async def test_links_left_sharing_an_account_never_remove_it(tmp_path: Path) -> None:
    """Item 1, state left by an older provisiond: the rehire adopted the account on a 409 while
    the departed user's removal was held. Both links hold the account: the departed one is
    retired without any request, the account stays active."""
    async with harness(tmp_path, prepare=_rehire_candidate) as h:
        assert not (await h.cycle()).failed
        (account,) = await accounts(h, "zia", REHIRED)
        old_id, new_id = rehire(h)
        links = await h.store.load_links("zia")
        old_link = links.users[old_id]
        await h.store.write_links("zia", users=[UserLink(new_id, old_link.target_id, REHIRED, old_link.attrs,
                                                         True, origin="adopted")])
        h.engine.runtimes["zia"].links = None
        assert not (await h.cycle()).failed
        assert disabling_or_deleting(h, "zia", account["id"]) == []
        (retired,) = h.events("user.retired", target="zia")
        assert retired["source_id"] == old_id and retired["reason"] == "held_by_another_link"
        (now,) = await accounts(h, "zia", REHIRED)
        assert active(now) and now["externalId"] == new_id
        assert old_id not in (await h.store.load_links("zia")).users


async def test_the_applier_never_sends_a_removal_to_an_account_another_link_took(tmp_path: Path) -> None:
    """The rule in the applier, whatever the plan's order: an adoption by the rehire and the
    departed user's disable in one plan (the planner never makes that plan): the disable is not
    sent, the departed link is let go."""
    async with harness(tmp_path, prepare=_rehire_candidate) as h:
        assert not (await h.cycle()).failed
        (account,) = await accounts(h, "zia", REHIRED)
        old_id, new_id = rehire(h)
        rt = h.engine.runtimes["zia"]
        links = await h.store.load_links("zia")
        old = links.users[old_id]
        attrs = {**old.attrs, "externalId": new_id}
        ops = [
            Op(1, PHASE_USERS, "user", "adopt", new_id, old.target_id, REHIRED, "adopted_from_departed",
               {"from_source_id": old_id, "attrs": attrs, "active": True}),
            Op(2, PHASE_DISABLE, "user", "disable", old_id, old.target_id, REHIRED, "deleted_in_source",
               {"attrs": dict(old.attrs)}),
        ]
        cycle_id = await h.store.start_cycle("zia", full_sync=False)
        await h.store.save_plan(cycle_id, "zia", ops)
        h.sb.zia.reset_counters()
        with capture_logs() as logs:
            applier = Applier(target="zia", cycle_id=cycle_id, client=rt.client, store=h.store,
                              log=structlog.get_logger(), limiter=rt.limiter, users=dict(links.users),
                              groups=dict(links.groups), paths=rt.rules.paths, can_create=True,
                              active_false_deletes=False)
            result = await applier.apply(ops)
        assert result.outcomes[1].status == "applied"
        assert result.outcomes[2].status == "skipped" and result.outcomes[2].skip_reason == "held_by_another_link"
        assert disabling_or_deleting(h, "zia", account["id"]) == []
        assert [e["event"] for e in logs if e.get("source_id") == old_id] == ["user.skipped"]
        (now,) = await accounts(h, "zia", REHIRED)
        assert active(now) and now["externalId"] == new_id


# -- item 2: a group deleted and re-created under its name --------------------------------------


@pytest.mark.parametrize("unique_names", [True, False], ids=["409-on-duplicate", "duplicates-accepted"])
async def test_a_recreated_group_takes_the_old_group_over_and_is_never_deleted(
        tmp_path: Path, unique_names: bool) -> None:
    """Item 2: "ZIA Users" (pushed and the scope) is deleted in PingOne and re-created under its
    name with the same people. After one cycle the target has that one group, with the new
    group's members, and the old link deletes nothing; the same on a target that accepts two
    groups with one displayName (no 409 to lean on)."""
    def prepare(sb: Sandbox) -> None:
        sb.zia.profile = dataclasses.replace(sb.zia.profile, group_name_unique=unique_names)

    async with harness(tmp_path, prepare=prepare, daemon={"full_sync_every": 1e-6}) as h:
        assert not (await h.cycle()).failed
        d = h.directory
        old = d.group_by_name("ZIA Users")
        (before,) = [g for g in await scim_list(h, "zia", "Groups") if g["displayName"] == "ZIA Users"]
        members = sorted(d.direct_member_ids(old["id"]))
        d.delete_group(old["id"])
        new = d.add_group("ZIA Users")
        for uid in members[1:]:          # one fewer: the new group's members are what counts
            d.add_member(new["id"], uid)
        expected = {u["id"] for u in await scim_list(h, "zia", "Users")
                    if u["externalId"] in members[1:]}

        for cycle in range(2):
            assert not (await h.cycle()).failed
            groups = [g for g in await scim_list(h, "zia", "Groups") if g["displayName"] == "ZIA Users"]
            assert [g["id"] for g in groups] == [before["id"]]
            got = {m["value"] for m in (await scim_get(h, "zia", f"/Groups/{before['id']}")).get("members", [])}
            assert got == expected
            assert not [r for r in writes(h, "zia") if r["method"] == "DELETE" and "/Groups/" in r["path"]]
            if cycle == 0:
                (adopted,) = h.events("group.adopted", target="zia")
                assert adopted["source_id"] == new["id"] and adopted["from_source_id"] == old["id"]
            else:
                assert writes(h, "zia") == []


# -- item 3: re-enable plus an attribute change --------------------------------------------------

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


def department(res: dict[str, Any]) -> Any:
    return (res.get(ENTERPRISE) or {}).get("department", res.get("department"))


async def test_a_reenable_with_a_change_is_one_patch(tmp_path: Path) -> None:
    """Item 3: a returning employee with a new department: one PATCH with `active: true` and the
    department, the account ends active and changed, and the next cycle (a full sync) is quiet."""
    async with harness(tmp_path, prepare=_rehire_candidate) as h:
        assert not (await h.cycle()).failed
        d = h.directory
        uid = d.user_by_username(REHIRED)["id"]
        d.set_enabled(uid, False)
        assert not (await h.cycle()).failed
        (account,) = await accounts(h, "zia", REHIRED)
        assert not active(account)

        d.set_enabled(uid, True)
        d.update_user(uid, department="Returning")
        assert not (await h.cycle()).failed
        sent = [r for r in writes(h, "zia") if account["id"] in r["path"]]
        assert [r["method"] for r in sent] == ["PATCH"]
        operations = {(o["path"], json.dumps(o.get("value"))) for o in sent[0]["body"]["Operations"]}
        assert ("active", "true") in operations
        assert any("department" in path and "Returning" in value for path, value in operations)
        (enabled,) = h.events("user.enabled", target="zia")
        assert enabled["changed"] == [f"{ENTERPRISE}:department"]
        assert not h.events("user.updated", target="zia")
        (now,) = await accounts(h, "zia", REHIRED)
        assert active(now) and department(now) == "Returning"

        h.retarget("zia", full_sync_every=1e-6)
        assert not (await h.cycle()).failed
        assert h.target_report("zia").full_sync and writes(h, "zia") == []


async def test_two_writes_for_one_user_are_never_in_flight_together(tmp_path: Path) -> None:
    """Item 3, in the applier whatever the plan: an enable and an update of one user (the plan an
    older planner made) run one after the other, never side by side, however many workers; the
    later one is built from the link as the earlier one left it (no stale `active: false`)."""
    async with harness(tmp_path, prepare=_rehire_candidate) as h:
        assert not (await h.cycle()).failed
        d = h.directory
        uid = d.user_by_username(REHIRED)["id"]
        d.set_enabled(uid, False)
        await h.cycle()
        rt = h.engine.runtimes["zia"]
        links = await h.store.load_links("zia")
        link = links.users[uid]
        attrs = {**link.attrs, f"{ENTERPRISE}:department": "Returning"}
        ops = [Op(1, PHASE_USERS, "user", "enable", uid, link.target_id, REHIRED, "enabled_in_source",
                  {"attrs": dict(link.attrs)}),
               Op(2, PHASE_USERS, "user", "update", uid, link.target_id, REHIRED, "attributes_changed",
                  {"attrs": attrs, "changed": {f"{ENTERPRISE}:department": "Returning"}})]
        h.sb.zia.faults.latency_ms = 30.0
        in_flight: dict[str, int] = {}
        most: dict[str, int] = {}
        send = rt.client.request

        async def watched(method: str, path: str, **kw: Any) -> Any:
            in_flight[path] = in_flight.get(path, 0) + 1
            most[path] = max(most.get(path, 0), in_flight[path])
            try:
                return await send(method, path, **kw)
            finally:
                in_flight[path] -= 1

        rt.client.request = watched  # type: ignore[method-assign]
        cycle_id = await h.store.start_cycle("zia", full_sync=False)
        await h.store.save_plan(cycle_id, "zia", ops)
        applier = Applier(target="zia", cycle_id=cycle_id, client=rt.client, store=h.store,
                          log=structlog.get_logger(), limiter=rt.limiter, users=dict(links.users),
                          groups=dict(links.groups), paths=rt.rules.paths, can_create=True,
                          active_false_deletes=False)
        with capture_logs():
            result = await applier.apply(ops)
        assert {o.status for o in result.outcomes.values()} == {"applied"}
        assert most == {f"/Users/{link.target_id}": 1}
        (now,) = await accounts(h, "zia", REHIRED)
        assert active(now) and department(now) == "Returning"


# -- item 13: times with their zone ---------------------------------------------------------------


async def test_status_and_why_print_times_with_their_zone(tmp_path: Path) -> None:
    """Item 13: `status` and `why` say which zone their times are in (the host's, from TZ)."""
    async with harness(tmp_path, prepare=_rehire_candidate) as h:
        assert not (await h.cycle()).failed
        env = {**cli_env(), "TZ": "Asia/Kolkata"}
        for args in (("status",), ("why", REHIRED)):
            with anyio.fail_after(60):
                done = await anyio.run_process([sys.executable, "-m", "daemon", *args, "-c", str(h.config_path)],
                                               check=False, env=env)
            assert done.returncode == 0, done.stderr
            times = re.findall(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}( \S+)?", done.stdout.decode())
            assert times, done.stdout
            assert all(zone == " +05:30" for zone in times), (args, times)
            assert "+05:30 (IST)" in done.stdout.decode()


# -- item 9: approvals ----------------------------------------------------------------------------


def zia_members(h: Harness, count: int, *, skip: tuple[str, ...] = (REHIRED,)) -> list[str]:
    d = h.directory
    return sorted(u for u in d.direct_member_ids(d.group_by_name("ZIA Users")["id"])
                  if d.users[u]["username"] not in skip and "@" in str(d.users[u]["username"]))[:count]


async def test_an_approval_given_while_a_cycle_applies_is_kept_for_the_next(tmp_path: Path) -> None:
    """Item 9: the approval a cycle planned with is consumed by it; one given again while it was
    applying stays, and releases the next cycle's held removals."""
    async with harness(tmp_path, zia={"max_deletes": MaxDeletes(count=1)}) as h:
        assert not (await h.cycle()).failed
        first, second = zia_members(h, 6)[:3], zia_members(h, 6)[3:]
        for uid in first:
            h.directory.delete_user(uid)
        await h.cycle()
        assert h.target_report("zia").summary["held"] == 3
        plan_id = (await approvals.approve(h.store, "zia")).plan_id

        h.sb.zia.faults.latency_ms = 40.0
        disabled = anyio.Event()

        def observe(event: str, fields: dict[str, Any]) -> None:
            if event == "user.disabled" and fields.get("target") == "zia":
                disabled.set()

        async def approve_midway() -> None:
            await disabled.wait()
            await approvals.approve(h.store, "zia", plan_id)   # the same plan, approved again

        h.engine.observers.append(observe)
        async with anyio.create_task_group() as tg:
            tg.start_soon(approve_midway)
            await h.cycle()
        h.engine.observers.remove(observe)
        h.sb.zia.faults.latency_ms = 0.0
        assert len(h.events("user.disabled", target="zia")) == 3
        assert await h.store.approved("zia"), "the approval given during the apply was consumed unused"

        # the kept approval names the plan already applied: a different removal is held again
        for uid in second:
            h.directory.delete_user(uid)
        await h.cycle()
        assert h.target_report("zia").summary["held"] == 3
        assert len(h.events("user.disabled", target="zia")) == 0
        assert not await h.store.approved("zia")
        gone = {h.sb.zia.users[t]["userName"] for t in h.sb.zia.users}   # still there, inactive
        for res in await scim_list(h, "zia", "Users"):
            if res["userName"] in gone and res.get("externalId") in first:
                assert not active(res)
            if res.get("externalId") in second:        # held: read back active
                assert active(res)


async def test_sync_user_honours_and_consumes_an_approval(tmp_path: Path) -> None:
    """Item 9: `sync-user` of a deleted user holds its removal above max_deletes, sends it once
    approved, and consumes the approval as a cycle would."""
    async with harness(tmp_path, prepare=_rehire_candidate, zia={"max_deletes": MaxDeletes(count=0)}) as h:
        assert not (await h.cycle()).failed
        uid = h.directory.user_by_username(REHIRED)["id"]
        h.directory.delete_user(uid)
        config = str(h.config_path)
        text = h.config_path.read_text()
        head, sep, tail = text.partition('name = "zia"')
        tail = re.sub(r"(?m)^max_deletes = .*$", "max_deletes = 0", tail, count=1)
        if "max_deletes = 0" not in tail:
            tail = "\nmax_deletes = 0" + tail
        h.config_path.write_text(head + sep + tail)

        held = await cli("sync-user", REHIRED, "--target", "zia", "-c", config)
        assert held.returncode == 0, held.stderr
        assert b"held" in held.stdout.lower(), held.stdout
        (account,) = await accounts(h, "zia", REHIRED)
        assert active(account)

        await h.cycle()                                   # the daemon's cycle holds it too: a held plan
        await approvals.approve(h.store, "zia")
        done = await cli("sync-user", REHIRED, "--target", "zia", "-c", config)
        assert done.returncode == 0, done.stderr
        (account,) = await accounts(h, "zia", REHIRED)
        assert not active(account)
        assert not await h.store.approved("zia"), "sync-user left the approval it used"


def zia_max_deletes(h: Harness, count: int) -> str:
    """Write `max_deletes = count` for zia into the config file the CLI reads; its path."""
    text = h.config_path.read_text()
    head, sep, tail = text.partition('name = "zia"')
    tail, n = re.subn(r"(?m)^max_deletes = .*$", f"max_deletes = {count}", tail, count=1)
    if not n:
        tail = f"\nmax_deletes = {count}" + tail
    h.config_path.write_text(head + sep + tail)
    return str(h.config_path)


async def by_external_id(h: Harness, target: str) -> dict[str, dict[str, Any]]:
    return {str(u.get("externalId")): u for u in await scim_list(h, target, "Users")}


async def test_sync_user_sends_a_removal_only_the_approved_plan_held(tmp_path: Path) -> None:
    """Items 13.9 / 14.3: a cycle holds 3 removals (plan P). Before any approval, `sync-user` of
    one of them holds it too (the plan's hold is not bypassed one user at a time). Once
    `approve --plan P` is given, `sync-user` of a user P held sends the removal (read back
    inactive); the approval is kept, since P released two more removals, and the next cycle
    sends those and consumes it."""
    async with harness(tmp_path, zia={"max_deletes": MaxDeletes(count=1)}) as h:
        assert not (await h.cycle()).failed
        config = zia_max_deletes(h, 1)
        gone = zia_members(h, 3)
        for uid in gone:
            h.directory.delete_user(uid)
        await h.cycle()
        plan_id = h.target_report("zia").cycle_id
        assert h.target_report("zia").summary["held"] == 3
        first = gone[0]

        held = await cli("sync-user", first, "--target", "zia", "-c", config)
        assert held.returncode == 0, held.stderr
        assert b"held" in held.stdout.lower(), held.stdout
        assert active((await by_external_id(h, "zia"))[first]), "a held plan's removal was sent unapproved"

        ok = await cli("approve", "--target", "zia", "--plan", str(plan_id), "-c", config)
        assert ok.returncode == 0, ok.stderr
        why = await cli("why", first, "--target", "zia", "--json", "-c", config)
        assert why.returncode == 0, why.stderr
        (told,) = json.loads(why.stdout)["targets"]
        assert told["removal_approved"] is True and told["held"] is False and told["approved_plan"] == plan_id

        done = await cli("sync-user", first, "--target", "zia", "-c", config)
        assert done.returncode == 0, done.stderr
        after = await by_external_id(h, "zia")
        assert not active(after[first])
        assert all(active(after[uid]) for uid in gone[1:])
        assert await approvals.pending(h.store, "zia") == plan_id, "sync-user consumed an approval it half used"

        await h.cycle()
        assert h.target_report("zia").summary["held"] == 0
        after = await by_external_id(h, "zia")
        assert not any(active(after[uid]) for uid in gone)
        assert len(h.events("user.disabled", target="zia")) == 2      # the first one was not sent again
        assert not await h.store.approved("zia")


async def test_sync_user_holds_a_removal_the_approved_plan_did_not_hold(tmp_path: Path) -> None:
    """Items 13.9 / 14.3: plan P held 3 removals and is approved; a user leaves scope afterwards.
    `sync-user` of that user holds its removal (exit 0, `held`, read back active) and leaves the
    approval pending; `why` says the pending approval does not release it."""
    async with harness(tmp_path, zia={"max_deletes": MaxDeletes(count=0)}) as h:
        assert not (await h.cycle()).failed
        config = zia_max_deletes(h, 0)
        members = zia_members(h, 4)
        gone, later = members[:3], members[3]
        for uid in gone:
            h.directory.delete_user(uid)
        await h.cycle()
        plan_id = h.target_report("zia").cycle_id
        assert h.target_report("zia").summary["held"] == 3
        ok = await cli("approve", "--target", "zia", "--plan", str(plan_id), "-c", config)
        assert ok.returncode == 0, ok.stderr

        d = h.directory
        d.remove_member(d.group_by_name("ZIA Users")["id"], later)      # a scope change after the hold
        held = await cli("sync-user", later, "--target", "zia", "-c", config)
        assert held.returncode == 0, held.stderr
        assert b"held" in held.stdout.lower(), held.stdout
        after = await by_external_id(h, "zia")
        assert active(after[later]), "sync-user sent a removal the approved plan did not hold"
        assert all(active(after[uid]) for uid in gone)
        assert await approvals.pending(h.store, "zia") == plan_id

        # the next cycle sends exactly what P held; the later removal is held again
        await h.cycle()
        assert h.target_report("zia").summary["held"] == 1
        after = await by_external_id(h, "zia")
        assert not any(active(after[uid]) for uid in gone) and active(after[later])

        # approved again (plan P), `why` still says the later removal is held, not approved
        ok = await cli("approve", "--target", "zia", "--plan", str(plan_id), "-c", config)
        assert ok.returncode == 0, ok.stderr
        why = await cli("why", later, "--target", "zia", "-c", config)
        assert why.returncode == 0, why.stderr
        assert f"pending approval of plan {plan_id} does not release it".encode() in why.stdout, why.stdout
        held = await cli("sync-user", later, "--target", "zia", "-c", config)
        assert held.returncode == 0 and b"held" in held.stdout.lower(), held.stdout
        assert active((await by_external_id(h, "zia"))[later])


# -- item 8: a malformed state-file row ------------------------------------------------------------


async def test_a_malformed_state_row_is_contained_to_its_entity(tmp_path: Path) -> None:
    """Item 8, with the real CLI (`provisiond once`): three rows of the state file are broken (a
    user's attributes are not JSON, another user's row names no target id, a pushed group's
    members are not JSON). Each is logged, re-read from the target (or re-planned), and the rest
    of the cycle runs: every change made in PingOne meanwhile reaches the target, exit code 0,
    no duplicate, and the next run finds nothing broken and sends nothing."""
    async with harness(tmp_path) as h:
        assert not (await h.cycle()).failed
        broken_attrs, no_target, other = zia_members(h, 3)
        d = h.directory
        for uid in (broken_attrs, no_target, other):
            d.update_user(uid, department="Moved")
        group = d.group_by_name("ZIA Users")["id"]
        joiner = d.add_user("joiner@example.com", email="joiner@example.com", given="Jo", family="Iner")
        d.add_member(group, joiner["id"])
        db = h.store.db
        await db.execute("UPDATE target_object SET attrs='{not json' WHERE target='zia' AND source_id=?",
                         (broken_attrs,))
        await db.execute("UPDATE target_object SET target_id='' WHERE target='zia' AND source_id=?", (no_target,))
        await db.execute("UPDATE target_object SET members='[broken' WHERE target='zia' AND source_id=?", (group,))
        before = {u["userName"]: u["id"] for u in await scim_list(h, "zia", "Users")}

        done = await cli("once", "-c", str(h.config_path))
        assert done.returncode == 0, done.stderr + done.stdout
        events = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
        bad = {(e["kind"], e["source_id"]): e["action"] for e in events if e["event"] == "state.row_malformed"
               and e.get("target") in (None, "zia")}
        assert bad == {("user", broken_attrs): "re_read", ("user", no_target): "re_planned",
                       ("group", group): "re_read"}
        finished = [e for e in events if e["event"] == "cycle.finished" and e.get("target") == "zia"]
        assert finished and finished[-1]["outcome"] == "success"

        users = await scim_list(h, "zia", "Users")
        by_external = {u["externalId"]: u for u in users}
        assert len({u["userName"].lower() for u in users}) == len(users)
        for uid in (broken_attrs, no_target, other):
            assert department(by_external[uid]) == "Moved" and active(by_external[uid])
            assert by_external[uid]["id"] == before[by_external[uid]["userName"]]
        (zia_group,) = [g for g in await scim_list(h, "zia", "Groups") if g["displayName"] == "ZIA Users"]
        members = {m["value"] for m in (await scim_get(h, "zia", f"/Groups/{zia_group['id']}"))["members"]}
        assert by_external[joiner["id"]]["id"] in members

        again = await cli("once", "-c", str(h.config_path))
        assert again.returncode == 0
        assert b"state.row_malformed" not in again.stdout


async def test_sync_user_of_a_rehire_takes_the_account_over_as_a_cycle_would(tmp_path: Path) -> None:
    """Item 1 through `provisiond sync-user`: the departed namesake (gone from PingOne) hands its
    account over, as in a cycle: one account, linked to the new id; `why` tells it; the next cycle
    has nothing to send to it."""
    async with harness(tmp_path, prepare=_rehire_candidate) as h:
        assert not (await h.cycle()).failed
        (before,) = await accounts(h, "zia", REHIRED)
        d = h.directory
        old_id = d.user_by_username(REHIRED)["id"]
        d.delete_user(old_id)
        new = d.add_user(REHIRED, email=REHIRED, given="Re", family="Hire", department="Returned")
        d.add_member(d.group_by_name("ZIA Users")["id"], new["id"])
        config = str(h.config_path)
        done = await cli("sync-user", REHIRED, "--target", "zia", "-c", config)
        assert done.returncode == 0, done.stderr
        assert b"user adopt" in done.stdout, done.stdout
        (account,) = await accounts(h, "zia", REHIRED)
        assert account["id"] == before["id"] and active(account) and account["externalId"] == new["id"]
        assert department(account) == "Returned"
        assert disabling_or_deleting(h, "zia", account["id"]) == []
        why = await cli("why", new["id"], "--target", "zia", "-c", config)
        assert b"took over the account of departed user" in why.stdout, why.stdout
        assert not (await h.cycle()).failed
        assert [r for r in writes(h, "zia") if account["id"] in r["path"]] == []
        (account,) = await accounts(h, "zia", REHIRED)
        assert active(account) and account["externalId"] == new["id"]


async def test_a_rehire_on_a_target_that_accepts_duplicate_usernames_keeps_one_account(tmp_path: Path) -> None:
    """Item 1 on a lenient target (no 409 for a taken userName): the rehire still takes the
    departed user's account over instead of creating a second one, and nothing is removed."""
    def prepare(sb: Sandbox) -> None:
        _rehire_candidate(sb)
        sb.zia.profile = dataclasses.replace(sb.zia.profile, user_name_unique=False)

    async with harness(tmp_path, prepare=prepare, daemon={"full_sync_every": 1e-6}) as h:
        assert not (await h.cycle()).failed
        (before,) = await accounts(h, "zia", REHIRED)
        _, new_id = rehire(h)
        for _ in range(2):
            assert not (await h.cycle()).failed
            (account,) = await accounts(h, "zia", REHIRED)
            assert account["id"] == before["id"] and active(account) and account["externalId"] == new_id
            assert not [r for r in writes(h, "zia") if r["method"] == "POST" and r["path"].endswith("/Users")]
            assert disabling_or_deleting(h, "zia", account["id"]) == []
