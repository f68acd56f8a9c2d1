"""Zscaler quirks end to end (zscaler-scim.md): the real daemon against the zpa/zia emulators,
outcomes read back from the targets over SCIM HTTP, and from `provisiond once` / `status`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.config import GroupRef
from daemon.explain import explain, render_explanation
from daemon.sandbox.runner import ZIA_TOKEN, ZPA_TOKEN
from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator
from tests.harness import Harness, harness
from tests.safety import cli

pytestmark = pytest.mark.timeout(120)


def scim_base(h: Harness, target: str) -> str:
    em = h.emulator(target)
    return em.base_url + em.prefix


async def scim_get(h: Harness, target: str, path: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET over SCIM HTTP with the target's own token: what the target really holds."""
    token = {"zpa": ZPA_TOKEN, "zia": ZIA_TOKEN}.get(target, DEFAULT_TOKEN)
    async with aiohttp.ClientSession() as session, session.get(
            scim_base(h, target) + path, params=params, headers={"Authorization": f"Bearer {token}"}) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if raw else None)


async def find_user(h: Harness, target: str, user_name: str) -> dict[str, Any] | None:
    status, body = await scim_get(h, target, "/Users", {"filter": f'userName eq "{user_name}"'})
    assert status == 200, body
    found = [r for r in body["Resources"] if r["userName"].lower() == user_name.lower()]
    assert len(found) <= 1, found
    return found[0] if found else None


def events(stdout: bytes, name: str, **match: Any) -> list[dict[str, Any]]:
    out = []
    for line in stdout.decode().splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
                out.append(e)
    return out


def deletes(em: ScimEmulator) -> list[dict[str, Any]]:
    return [r for r in em.request_log if r["method"] == "DELETE"]


def set_in_target_section(config: Path, target: str, key: str, value: str) -> None:
    """Rewrite `key = …` in one [[target]] section of the config file."""
    text = config.read_text(encoding="utf-8")
    head, sep, rest = text.partition(f'name = "{target}"\n')
    assert sep, target
    lines = rest.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("[[target]]"):
            lines.insert(i, f"{key} = {value}")
            break
        if line.startswith(f"{key} ="):
            lines[i] = f"{key} = {value}"
            break
    else:
        lines.append(f"{key} = {value}")
    config.write_text(head + sep + "\n".join(lines), encoding="utf-8")


def set_daemon_key(config: Path, key: str, value: str) -> None:
    text = config.read_text(encoding="utf-8")
    lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.split("\n")]
    config.write_text("\n".join(lines), encoding="utf-8")


# -- ZIA admin-linked users (item 11) -----------------------------------------------------------------


async def test_zia_admin_linked_user_delete_is_a_standing_refusal_counted_in_status(tmp_path: Path) -> None:
    async with harness(tmp_path, zia={"remove_action": "delete"}) as h:
        cfg = h.config_path
        set_in_target_section(cfg, "zia", "remove_action", '"delete"')
        assert not (await h.cycle()).failed
        zia = h.emulator("zia")
        scope = h.directory.group_by_name("ZIA Users")["id"]
        uid = sorted(h.directory.direct_member_ids(scope))[0]
        name = h.directory.users[uid]["username"]
        linked = await find_user(h, "zia", name)
        assert linked is not None
        async with aiohttp.ClientSession() as session, session.post(
                zia.base_url + "/_admin/admin_users", json={"userName": name}) as resp:
            assert resp.status == 200
        h.directory.delete_user(uid)

        # The DELETE is refused with 409: skipped (admin_linked), not failed; the user stays.
        zia.reset_counters()
        second = await cli("once", "-c", str(cfg))
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        (skipped,) = events(second.stdout, "user.skipped", target="zia", user=name)
        assert (skipped["reason"], skipped["http_status"], skipped["outcome"]) == ("admin_linked", 409, "skipped")
        assert not events(second.stdout, "user.delete_failed")
        assert len(deletes(zia)) == 1
        assert await find_user(h, "zia", name) is not None

        # Not asked again in an ordinary cycle; counted in status.
        zia.reset_counters()
        third = await cli("once", "-c", str(cfg))
        assert third.returncode == 0
        assert deletes(zia) == []
        status = await cli("status", "-c", str(cfg), "--json")
        targets = {t["target"]: t for t in json.loads(status.stdout)["targets"]}
        assert targets["zia"]["summary"]["refused"] == {"admin_linked": 1}
        assert targets["zia"]["outcome"] == "success"
        human = (await cli("status", "-c", str(cfg))).stdout.decode()
        assert "refused: 1 user delete(s) (admin_linked)" in human
        why = await cli("why", name, "-c", str(cfg), "--target", "zia")
        assert why.returncode == 0, why.stdout.decode() + why.stderr.decode()
        assert "refused: the target refuses to delete this user (admin_linked)" in why.stdout.decode()
        assert "user delete (deleted_in_source) [skipped: admin_linked]" in why.stdout.decode()

        # A full sync asks again: still refused, one DELETE, still counted. (In process from
        # here: a new runtime for the retargeted zia reads its links from the state file.)
        h.retarget("zia", full_sync_every=0.001)
        await h.cycle()
        assert h.target_report("zia").full_sync
        assert len(deletes(zia)) == 1
        assert h.events("user.skipped", target="zia", user=name, reason="admin_linked")
        assert h.target_report("zia").summary["refused"] == {"admin_linked": 1}

        # Unlinked from the admin: the next full sync deletes it and the refusal is gone.
        zia.mark_admin(str(linked["id"]), False)
        await h.cycle()
        assert h.events("user.deleted", target="zia", user=name)
        assert await find_user(h, "zia", name) is None
        assert h.target_report("zia").summary["refused"] == {}


# -- ZIA's groups-per-user cap (item 4) ---------------------------------------------------------------


async def member_group_ids(h: Harness, target: str, user_id: str) -> set[str]:
    """The target groups that list the user, read back over SCIM HTTP."""
    status, body = await scim_get(h, target, "/Groups", {"filter": f'members.value eq "{user_id}"',
                                                        "count": "1000"})
    assert status == 200, body
    return {g["id"] for g in body["Resources"]}


async def group_member_ids(h: Harness, target: str, name: str) -> set[str]:
    status, body = await scim_get(h, target, "/Groups", {"filter": f'displayName eq "{name}"'})
    assert status == 200 and len(body["Resources"]) == 1, body
    status, group = await scim_get(h, target, f"/Groups/{body['Resources'][0]['id']}")
    assert status == 200, group
    return {m["value"] for m in group.get("members", [])}


async def test_zia_memberships_beyond_127_groups_are_skipped_before_sending_and_the_rest_go_in(
        tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        d = h.directory
        scope = d.group_by_name("ZIA Users")["id"]
        heavy, light = sorted(d.direct_member_ids(scope))[:2]
        names = [f"Cap {i:03d}" for i in range(130)]
        for name in names:
            gid = d.add_group(name)["id"]
            d.add_member(gid, heavy)
            d.add_member(gid, light)
        h.retarget("zia", groups=(GroupRef(name="ZIA Users"), *(GroupRef(name=n) for n in names)))
        report = await h.cycle()
        zia = h.emulator("zia")
        assert not report.failed, [e for e in h.last_logs if e.get("outcome") == "failed"][:3]
        assert not [r for r in zia.request_log if r.get("status") == 400]    # nothing refused: checked first
        heavy_name = d.users[heavy]["username"]
        heavy_tid = (await find_user(h, "zia", heavy_name))["id"]            # type: ignore[index]
        light_tid = (await find_user(h, "zia", d.users[light]["username"]))["id"]   # type: ignore[index]
        # 131 groups wanted (130 + ZIA Users); the cap keeps 127, in name order: Cap 000-126
        assert len(await member_group_ids(h, "zia", heavy_tid)) == 127
        assert len(await member_group_ids(h, "zia", light_tid)) == 127
        # every other member of the groups beyond their cap went in
        scope_members = {(await find_user(h, "zia", d.users[u]["username"]) or {}).get("id")
                         for u in d.direct_member_ids(scope)}
        assert await group_member_ids(h, "zia", "ZIA Users") == scope_members - {heavy_tid, light_tid}
        assert await group_member_ids(h, "zia", "Cap 129") == set()
        assert await group_member_ids(h, "zia", "Cap 126") == {heavy_tid, light_tid}
        skipped = h.events("group.member_skipped", target="zia", reason="group_limit")
        assert sorted(e["group"] for e in skipped if e["user"] == heavy_name) == [
            "Cap 127", "Cap 128", "Cap 129", "ZIA Users"]
        assert len(skipped) == 8
        assert all(e["log_level"] == "info" and e["limit"] == 127 for e in skipped)
        assert h.target_report("zia").summary["group_limit"]["memberships"] == len(skipped)

        # The next cycle sends nothing and says it again only at debug (logged per transition).
        report = await h.cycle()
        assert zia.writes() == 0
        again = h.events("group.member_skipped", target="zia", user=heavy_name)
        assert len(again) == 4 and all(e["log_level"] == "debug" for e in again)
        assert h.target_report("zia").summary["group_limit"] == {"memberships": 8, "users": 2}
        human = (await cli("status", "-c", str(h.config_path))).stdout.decode()
        assert "group limit: 8 membership(s) of 2 user(s) not sent" in human

        # `why` says which memberships are not sent and why.
        text = render_explanation(await explain(h.store, h.config, heavy_name, "zia"))
        assert text.count("not sent: beyond the target's limit of 127 groups per user (group_limit)") == 4
        assert "[skipped: group_limit]" in text


async def test_a_member_chunk_refused_with_400_is_split_so_only_the_member_at_fault_stays_out(
        tmp_path: Path) -> None:
    async with harness(tmp_path, zia={"membership_batch": 5}) as h:
        d = h.directory
        zia = h.emulator("zia")
        scope = d.group_by_name("ZIA Users")["id"]
        members = sorted(d.direct_member_ids(scope))
        assert len(members) > 10            # several chunks of 5
        # Provision the users first (no group pushed yet), then give one of them a group that the
        # daemon does not know of, at a target-side cap of 1: ZIA refuses any chunk holding it.
        h.retarget("zia", groups=())
        assert not (await h.cycle()).failed
        at_fault = members[0]
        at_fault_tid = (await find_user(h, "zia", d.users[at_fault]["username"]))["id"]  # type: ignore[index]
        zia.put_group({"displayName": "Set by hand", "members": [{"value": at_fault_tid}]})
        zia.profile.max_groups_per_user = 1
        h.retarget("zia", groups=(GroupRef(name="ZIA Users"),))

        report = await h.cycle()
        (failed,) = h.events("group.add_members_failed", target="zia", group="ZIA Users")
        assert failed["http_status"] == 400
        assert f"1 of {len(members)} member(s) refused (target ids {at_fault_tid})" in failed["error"]
        expected = {(await find_user(h, "zia", d.users[u]["username"]) or {}).get("id") for u in members}
        assert await group_member_ids(h, "zia", "ZIA Users") == expected - {at_fault_tid}
        assert h.target_report("zia").failed == 1 and report.failed
        refused = [r for r in zia.request_log if r["method"] == "PATCH" and r.get("status") == 400]
        assert 1 <= len(refused) <= 4       # one chunk of 5 halved down to the one member: no more

        # Next cycle: only the member at fault is tried again (one request, refused again).
        await h.cycle()
        patches = [r for r in zia.request_log if r["method"] == "PATCH"]
        assert len(patches) == 1 and patches[0].get("status") == 400
        assert await group_member_ids(h, "zia", "ZIA Users") == expected - {at_fault_tid}


# -- userName changes where the target refuses them (item 10) ------------------------------------------


async def test_a_username_change_on_zpa_is_create_move_memberships_delete(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        d = h.directory
        zpa = h.emulator("zpa")
        contractors = d.group_by_name("ZPA Contractors")["id"]
        scope = d.group_by_name("ZPA Users")["id"]
        # a user in scope who is also in the second pushed group (so two memberships move)
        uid = sorted(d.direct_member_ids(scope))[0]
        if uid not in d.direct_member_ids(contractors):
            d.add_member(contractors, uid)
        assert not (await h.cycle()).failed
        old_name = d.users[uid]["username"]
        old = await find_user(h, "zpa", old_name)
        assert old is not None
        old_groups = await member_group_ids(h, "zpa", old["id"])
        assert len(old_groups) == 2
        d.update_user(uid, username="renamed.person@example.com")

        assert not (await h.cycle()).failed
        (event,) = h.events("user.recreated", target="zpa")
        assert (event["reason"], event["before"], event["user"]) == (
            "username_changed", old_name, "renamed.person@example.com")
        assert (event["old_target_id"], event["memberships_moved"]) == (old["id"], 2)
        new = await find_user(h, "zpa", "renamed.person@example.com")
        assert new is not None and new["id"] != old["id"]
        assert await find_user(h, "zpa", old_name) is None
        assert (await scim_get(h, "zpa", f"/Users/{old['id']}"))[0] == 404
        # the same groups hold the new account (ZPA lists members on a get by id)
        for gid in old_groups:
            status, group = await scim_get(h, "zpa", f"/Groups/{gid}")
            assert status == 200, group
            assert {m["value"] for m in group["members"]} >= {new["id"]}
        assert await member_group_ids(h, "zpa", new["id"]) == old_groups
        # the profile says ZPA refuses the change: it was never attempted (no refused request)
        assert not [r for r in zpa.request_log if r.get("status") == 400]
        # and the next cycle has nothing to do
        await h.cycle()
        assert zpa.writes() == 0


async def test_a_username_change_refused_with_400_mutability_is_applied_as_a_recreate(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        d = h.directory
        zia = h.emulator("zia")
        assert not (await h.cycle()).failed
        zia.profile.username_immutable = True    # this ZIA refuses (the zia profile expects it not to)
        scope = d.group_by_name("ZIA Users")["id"]
        uid = sorted(d.direct_member_ids(scope))[0]
        old_name = d.users[uid]["username"]
        old = await find_user(h, "zia", old_name)
        assert old is not None
        d.update_user(uid, username=old_name.upper().replace("@EXAMPLE.COM", "@example.com"))   # case only

        assert not (await h.cycle()).failed
        refused = [r for r in zia.request_log if r.get("status") == 400]
        assert len(refused) == 1 and refused[0]["method"] == "PATCH"
        (event,) = h.events("user.recreated", target="zia")
        assert event["reason"] == "username_changed"
        new = await find_user(h, "zia", d.users[uid]["username"])
        assert new is not None and new["id"] != old["id"]
        assert new["userName"] == d.users[uid]["username"]        # the new case, exactly
        assert (await scim_get(h, "zia", f"/Users/{old['id']}"))[0] == 404
        assert new["id"] in await group_member_ids(h, "zia", "ZIA Users")
        await h.cycle()
        assert zia.writes() == 0
