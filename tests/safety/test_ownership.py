"""provisiond changes or removes only what it created or adopted; the rest is counted as unmanaged."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from daemon import approvals
from daemon.sandbox.runner import Sandbox
from tests.safety import assert_converged, cli, harness

pytestmark = pytest.mark.timeout(60)

OUTSIDERS = ("outsider.one@example.com", "outsider.two@example.com")


def plant(sb: Sandbox) -> None:
    """Objects made in ZPA by someone else, and one with the userName of a PingOne user in scope."""
    for name in OUTSIDERS:
        sb.zpa.put_user({"userName": name, "displayName": "Not From PingOne", "active": True})
    sb.zpa.put_group({"displayName": "Made By Hand"})
    d = sb.directory
    member = sorted(d.direct_member_ids(d.group_by_name("ZPA Users")["id"]))[0]
    sb.zpa.put_user({"userName": d.users[member]["username"], "displayName": "Old Name", "active": True})


async def test_objects_provisiond_did_not_create_are_never_touched_and_counted_unmanaged(tmp_path: Path) -> None:
    async with harness(tmp_path, prepare=plant, zpa={"remove_action": "delete"}) as h:
        em = h.emulator("zpa")
        theirs = {rid: copy.deepcopy(r) for rid, r in em.users.items() if r["userName"] in OUTSIDERS}
        hand_group = copy.deepcopy(em.group_by_name("Made By Hand"))

        assert not (await h.cycle()).failed
        assert h.target_report("zpa").summary["unmanaged_users"] == len(OUTSIDERS)
        (adopted,) = h.events("user.adopted", target="zpa")
        assert adopted["reason"] == "same_username_in_target"
        assert_converged(h.directory, em, "zpa", extra_ok=OUTSIDERS)

        status = await cli("status", "--json", "-c", str(h.config_path))
        assert status.returncode == 0, status.stderr
        zpa = next(t for t in json.loads(status.stdout)["targets"] if t["target"] == "zpa")
        assert zpa["summary"]["unmanaged_users"] == len(OUTSIDERS)
        text = (await cli("status", "-c", str(h.config_path))).stdout.decode()
        assert f"unmanaged users in target: {len(OUTSIDERS)}" in text

        # every user in scope leaves it (held, then approved): only ours go
        gid = h.directory.group_by_name("ZPA Users")["id"]
        for uid in list(h.directory.direct_member_ids(gid)):
            h.directory.remove_member(gid, uid)
        await h.cycle()
        await approvals.approve(h.store, "zpa")
        await h.cycle()
        await h.cycle()
        for rid, before in theirs.items():
            assert em.users.get(rid) == before, "an unmanaged user was changed or removed"
            assert not any(r["path"].endswith(rid) for r in em.request_log if r["method"] != "GET")
        assert em.group_by_name("Made By Hand") == hand_group


async def test_a_create_meeting_an_existing_username_adopts_it_without_a_duplicate(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        assert not (await h.cycle()).failed
        d = h.directory
        em = h.emulator("zpa")
        em.put_user({"userName": "walk.in@example.com", "displayName": "Walk In", "active": True})
        user = d.add_user("walk.in@example.com", email="walk.in@example.com", given="Walk", family="In")
        d.add_member(d.group_by_name("ZPA Users")["id"], user["id"])
        await h.cycle()
        (adopted,) = h.events("user.adopted", target="zpa")
        assert adopted["reason"] == "existing_user_adopted"
        assert_converged(d, em, "zpa")
