"""The deletion threshold: a scope change that would remove 30% is held until approved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.config import MaxDeletes
from tests.safety import Harness, assert_converged, cli, harness, removal_requests

pytestmark = pytest.mark.timeout(90)


def remove_from_scope(h: Harness, fraction: float) -> list[str]:
    """Take `fraction` of the provisioned ZPA users out of the scope group; their ids."""
    d = h.directory
    em = h.emulator("zpa")
    gid = d.group_by_name("ZPA Users")["id"]
    provisioned = [u for u in sorted(d.direct_member_ids(gid))
                   if em.user_by_username(d.users[u]["username"]) is not None]
    leaving = provisioned[: max(3, round(len(provisioned) * fraction))]
    for uid in leaving:
        d.remove_member(gid, uid)
    return leaving


async def test_a_scope_change_removing_30_percent_is_held_shown_in_status_and_released_by_approve(
        tmp_path: Path) -> None:
    async with harness(tmp_path, users=80) as h:
        assert not (await h.cycle()).failed
        zpa_em = h.emulator("zpa")
        leaving = remove_from_scope(h, 0.3)
        users_before = {k: dict(v) for k, v in zpa_em.users.items()}

        await h.cycle()

        (held,) = h.events("plan.removals_held", target="zpa")
        assert held["held"] == len(leaving)
        assert held["limit"] < len(leaving)
        assert "provisiond approve --target zpa" in held["hint"]
        assert removal_requests(zpa_em, members=False) == [], "no user is disabled or deleted while held"
        assert zpa_em.users == users_before
        assert len(h.events("user.skipped", target="zpa", reason="removals_held")) == len(leaving)

        status = await cli("status", "-c", str(h.config_path))
        assert status.returncode == 0, status.stderr
        text = status.stdout.decode()
        held_ops = await h.store.held_count("zpa")        # the user removals and the member removal
        assert held_ops >= len(leaving)
        assert f"HELD: {held_ops} operation(s) (removals above max_deletes" in text
        assert "provisiond approve --target zpa" in text

        await h.cycle()                       # held again at the next cycle: not a one-off
        assert h.events("plan.removals_held", target="zpa")
        assert removal_requests(zpa_em, members=False) == []

        approve = await cli("approve", "--target", "zpa", "-c", str(h.config_path))
        assert approve.returncode == 0, approve.stderr
        await h.cycle()
        assert not h.events("plan.removals_held", target="zpa")
        assert len(removal_requests(zpa_em, members=False)) == len(leaving)
        assert_converged(h.directory, zpa_em, "zpa")

        remove_from_scope(h, 0.3)             # the approval is spent: the next large removal is held
        await h.cycle()
        assert h.events("plan.removals_held", target="zpa")
        assert removal_requests(zpa_em, members=False) == []


async def test_raising_max_deletes_releases_held_removals(tmp_path: Path) -> None:
    async with harness(tmp_path, users=80) as h:
        assert not (await h.cycle()).failed
        leaving = remove_from_scope(h, 0.3)
        await h.cycle()
        assert h.events("plan.removals_held", target="zpa")
        h.retarget("zpa", max_deletes=MaxDeletes(percent=50.0))
        await h.cycle()
        assert not h.events("plan.removals_held", target="zpa")
        assert len(removal_requests(h.emulator("zpa"), members=False)) == len(leaving)


async def test_while_removals_are_held_no_member_is_removed_from_a_pushed_group_either(tmp_path: Path) -> None:
    """For ZPA, group membership is access: taking 30% out of "ZPA Users" is the same outage as
    disabling them, so member removals are held with the user removals."""
    async with harness(tmp_path, users=80) as h:
        assert not (await h.cycle()).failed
        remove_from_scope(h, 0.3)
        await h.cycle()
        assert h.events("plan.removals_held", target="zpa")
        assert removal_requests(h.emulator("zpa")) == []


async def held_plan_id(h: Harness, target: str) -> int:
    status = await cli("status", "--json", "-c", str(h.config_path))
    assert status.returncode == 0, status.stderr
    row = next(t for t in json.loads(status.stdout)["targets"] if t["target"] == target)
    assert row["held_plan"] is not None, row
    return int(row["held_plan"]["plan"])


async def test_approve_with_nothing_held_says_so_changes_nothing_and_the_next_mass_removal_is_held(
        tmp_path: Path) -> None:
    async with harness(tmp_path, users=80) as h:
        assert not (await h.cycle()).failed
        zpa_em = h.emulator("zpa")
        blind = await cli("approve", "--target", "zpa", "-c", str(h.config_path))
        assert blind.returncode != 0, blind.stdout
        assert "nothing is held" in blind.stderr.decode()
        assert not await h.store.approved("zpa")
        status = await cli("status", "--json", "-c", str(h.config_path))
        assert all(t["approved_plan"] is None and not t["approval_pending"]
                   for t in json.loads(status.stdout)["targets"])

        leaving = remove_from_scope(h, 0.3)   # made after the blind approval: held all the same
        await h.cycle()
        (held,) = h.events("plan.removals_held", target="zpa")
        assert held["held"] == len(leaving)
        assert removal_requests(zpa_em, members=False) == []
        assert all(zpa_em.user_by_username(h.directory.users[u]["username"])["active"] for u in leaving)

        wrong = await cli("approve", "--target", "zpa", "--plan", "999999", "-c", str(h.config_path))
        assert wrong.returncode != 0 and "nothing is held in plan 999999" in wrong.stderr.decode()
        assert not await h.store.approved("zpa")
        other = await cli("approve", "--target", "zia", "-c", str(h.config_path))   # per target
        assert other.returncode != 0 and "target zia: nothing is held" in other.stderr.decode()


async def test_an_approval_releases_exactly_the_held_plan_and_a_different_removal_is_held_again(
        tmp_path: Path) -> None:
    async with harness(tmp_path, users=80) as h:
        assert not (await h.cycle()).failed
        zpa_em = h.emulator("zpa")
        first = remove_from_scope(h, 0.3)
        await h.cycle()
        assert h.events("plan.removals_held", target="zpa")
        plan_id = await held_plan_id(h, "zpa")
        text = (await cli("status", "-c", str(h.config_path))).stdout.decode()
        assert f"held plan {plan_id}: {len(first)} removal(s) (disable {len(first)})" in text

        approve = await cli("approve", "--target", "zpa", "--plan", str(plan_id), "-c", str(h.config_path))
        assert approve.returncode == 0, approve.stderr
        out = approve.stdout.decode()
        assert f"plan {plan_id}: {len(first)} removal(s) (disable {len(first)})" in out
        status = await cli("status", "--json", "-c", str(h.config_path))
        zpa = next(t for t in json.loads(status.stdout)["targets"] if t["target"] == "zpa")
        assert zpa["approved_plan"] == plan_id

        # after the approval, before the cycle: a different scope change takes more users out
        second = remove_from_scope(h, 0.3)
        assert not set(first) & set(second)
        ids = {uid: zpa_em.user_by_username(h.directory.users[uid]["username"])["id"] for uid in first + second}
        await h.cycle()
        # exactly the approved removals were sent; the new ones are held again
        (held,) = h.events("plan.removals_held", target="zpa")
        assert held["held"] == len(second)
        removed = {r["path"].rstrip("/").rsplit("/", 1)[1] for r in removal_requests(zpa_em, members=False)}
        assert removed == {ids[uid] for uid in first}
        for uid in second:      # read back over SCIM: still there and active
            assert zpa_em.user_by_username(h.directory.users[uid]["username"])["active"] is True
        for uid in first:       # disabled (ZPA may delete on active=false)
            found = zpa_em.user_by_username(h.directory.users[uid]["username"])
            assert found is None or found["active"] is False
        assert not await h.store.approved("zpa")   # spent

        await h.cycle()                            # and stays held: the approval does not carry over
        assert h.events("plan.removals_held", target="zpa")
        assert removal_requests(zpa_em, members=False) == []     # (the log is per cycle)
        for uid in second:
            assert zpa_em.user_by_username(h.directory.users[uid]["username"])["active"] is True
