"""`remove_action = "disable_then_delete"`: disable first, delete after `delete_after`, and a user
who comes back within the grace period is re-enabled, not re-created (POSTs counted on the emulator)."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from daemon.config import MaxDeletes
from daemon.explain import explain
from daemon.sandbox.directory import Directory
from tests.test_explain import World, world

pytestmark = pytest.mark.timeout(60)

GRACE = 2.0
STAGED = {"remove_action": "disable_then_delete", "delete_after": GRACE, "max_deletes": MaxDeletes(count=10)}


def nobody(_d: Directory) -> None:
    """The generated directory as it is."""


def provisioned_members(w: World, group: str, count: int) -> list[str]:
    """`count` enabled users directly in `group` (and in no other scope path) that zia holds."""
    d = w.sb.directory
    found = [u for u in sorted(d.direct_member_ids(d.group_by_name(group)["id"]))
             if d.users[u].get("enabled", True) and w.sb.zia.user_by_username(d.users[u]["username"]) is not None]
    assert len(found) >= count
    return found[:count]


def zia_user(w: World, uid: str) -> dict[str, object]:
    found = w.sb.zia.user_by_username(w.sb.directory.users[uid]["username"]) if uid in w.sb.directory.users \
        else None
    assert found is not None
    return found


async def test_disable_first_then_delete_after_the_grace_and_a_returning_user_is_re_enabled(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody, zia=STAGED) as w:
        await w.cycle()
        d = w.sb.directory
        zia_group = d.group_by_name("ZIA Users")["id"]
        back, gone, deleted = provisioned_members(w, "ZIA Users", 3)
        ids = {uid: zia_user(w, uid)["id"] for uid in (back, gone, deleted)}
        deleted_name = d.users[deleted]["username"]
        d.remove_member(zia_group, back)
        d.remove_member(zia_group, gone)
        d.delete_user(deleted)

        # 1: all three are disabled (and leave the pushed group), none is deleted
        w.sb.zia.reset_counters()
        await w.cycle()
        disabled_at = time.time()
        zia = w.sb.zia
        assert zia.counters["DELETE /Users"] == 0 and zia.counters["POST /Users"] == 0
        for uid in ids:
            assert zia.users[ids[uid]]["active"] is False
            link = await w.store.link_for("zia", uid)
            assert link is not None and link["active"] is False
        reasons = {uid: (await w.store.link_for("zia", uid) or {})["disabled_reason"] for uid in ids}
        assert reasons == {back: "left_scope", gone: "left_scope", deleted: "deleted_in_source"}
        members = {m["value"] for m in zia.group_by_name("ZIA Users")["members"]}
        assert not members & set(ids.values())

        # 2: within the grace period one comes back: re-enabled in place, not re-created
        d.add_member(zia_group, back)
        zia.reset_counters()
        await w.cycle()
        assert time.time() - disabled_at < GRACE, "the machine is too slow for this grace period"
        assert zia.counters["POST /Users"] == 0 and zia.counters["DELETE /Users"] == 0
        assert zia.users[ids[back]]["active"] is True
        assert ids[back] in {m["value"] for m in zia.group_by_name("ZIA Users")["members"]}
        link = await w.store.link_for("zia", back)
        assert link is not None and (link["active"], link["target_id"], link["disabled_reason"]) == (
            True, ids[back], None)
        ops = await w.store.operations_for("zia", back, limit=1)
        assert [(o["op"], o["reason"], o["status"]) for o in ops] == [("enable", "back_in_scope", "applied")]
        # still within the grace period, `why` says the others wait
        t = (await explain(w.store, w.config, gone, "zia"))["targets"][0]
        assert t["next_cycle"]["operations"] == [] and t["link"]["disabled_reason"] == "left_scope"

        # 3: after the grace period the two still out are deleted; nothing is created
        await anyio.sleep(max(0.0, disabled_at + GRACE + 0.05 - time.time()))
        t = (await explain(w.store, w.config, gone, "zia"))["targets"][0]
        assert [(o["op"], o["reason"]) for o in t["next_cycle"]["operations"]] == [
            ("delete", "disabled_grace_elapsed")]
        zia.reset_counters()
        await w.cycle()
        assert zia.counters["DELETE /Users"] == 2 and zia.counters["POST /Users"] == 0
        assert set(zia.users) >= {ids[back]} and ids[gone] not in zia.users and ids[deleted] not in zia.users
        assert zia.user_by_username(deleted_name) is None
        assert await w.store.link_for("zia", gone) is None and await w.store.link_for("zia", deleted) is None
        for uid in (gone, deleted):
            (op,) = await w.store.operations_for("zia", uid, limit=1)
            assert (op["op"], op["reason"], op["status"]) == ("delete", "disabled_grace_elapsed", "applied")

        # 4: the cycle after deletes nothing more and leaves the returned user alone
        zia.reset_counters()
        await w.cycle()
        assert zia.writes() == 0


async def test_a_user_returning_after_the_grace_period_is_created_again(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody, zia={**STAGED, "delete_after": 0.2}) as w:
        await w.cycle()
        d = w.sb.directory
        zia_group = d.group_by_name("ZIA Users")["id"]
        (uid,) = provisioned_members(w, "ZIA Users", 1)
        first_id = zia_user(w, uid)["id"]
        d.remove_member(zia_group, uid)
        await w.cycle()                               # disabled
        await anyio.sleep(0.25)
        await w.cycle()                               # deleted
        assert first_id not in w.sb.zia.users
        d.add_member(zia_group, uid)
        w.sb.zia.reset_counters()
        await w.cycle()
        assert w.sb.zia.counters["POST /Users"] == 1
        again = zia_user(w, uid)
        assert again["id"] != first_id and again["active"] is True


async def test_the_grace_period_starts_when_the_user_leaves_scope_not_when_pingone_disabled_it(
        tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody, zia={**STAGED, "delete_after": 0.5}) as w:
        await w.cycle()
        d = w.sb.directory
        (uid,) = provisioned_members(w, "ZIA Users", 1)
        target_id = zia_user(w, uid)["id"]
        d.set_enabled(uid, False)
        await w.cycle()                               # disabled: disabled_in_source
        assert w.sb.zia.users[target_id]["active"] is False
        await anyio.sleep(0.6)                        # longer ago than delete_after
        d.remove_member(d.group_by_name("ZIA Users")["id"], uid)
        w.sb.zia.reset_counters()
        await w.cycle()                               # left scope now: the grace should start now
        assert w.sb.zia.counters["DELETE /Users"] == 0
