"""`provisiond why USER`: answers from the state file alone, after real cycles on loopback emulators.

The emulators and the Engine run in this process; `explain` then reads only SQLite (the
emulators are stopped before it runs where that matters, to show no request is needed).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from daemon import approvals
from daemon.config import Config, GroupRef, MaxDeletes, Scope, load_config
from daemon.engine import CycleReport, Engine
from daemon.explain import UnknownUser, explain, render_explanation
from daemon.sandbox.directory import Directory
from daemon.sandbox.runner import Sandbox, build_sandbox, running, write_config
from daemon.store import Store

pytestmark = pytest.mark.timeout(60)

FAST_RPS = 5000.0
USERS = 40
GROUPS = 8
SEED = 5

DIRECT = "in.direct@example.com"
NESTED = "via.contractors@example.com"
OUTSIDE = "outside@example.com"
PLAIN = "plainname"
REFUSED = "someone@unregistered.org"      # the ZIA emulator refuses this domain with 400
SALES = "sales.person@example.com"


def people(d: Directory) -> None:
    """The users these tests talk about, added to the generated directory."""
    zpa = d.group_by_name("ZPA Users")["id"]
    contractors = d.group_by_name("ZPA Contractors")["id"]
    zia = d.group_by_name("ZIA Users")["id"]
    for name, groups, extra in ((DIRECT, (zpa,), {}), (NESTED, (contractors,), {}), (OUTSIDE, (), {}),
                                (PLAIN, (zpa,), {}), (REFUSED, (zia,), {}),
                                (SALES, (zia,), {"department": "Sales"})):
        user = d.add_user(name, email=name if "@" in name else None, given="Test", family=name.split("@")[0],
                          **extra)
        for gid in groups:
            d.add_member(gid, user["id"])


@dataclass
class World:
    sb: Sandbox
    config: Config
    store: Store
    engine: Engine
    tmp: Path
    config_path: Path

    async def cycle(self) -> CycleReport:
        with capture_logs():
            return await self.engine.cycle()

    def retarget(self, target: str, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, targets=tuple(
            dataclasses.replace(t, **changes) if t.name == target else t for t in self.config.targets))
        self.engine.reconfigure(self.config)

    def uid(self, username: str) -> str:
        return str(self.sb.directory.user_by_username(username)["id"])


@asynccontextmanager
async def world(tmp_path: Path, *, prepare: Callable[[Directory], None] = people,
                interval: str = "30s", **overrides: dict[str, Any]) -> AsyncIterator[World]:
    """Emulators with a generated directory plus `people`, a config, a state file and an Engine."""
    sb = build_sandbox(users=USERS, groups=GROUPS, seed=SEED, zia_rps=FAST_RPS)
    sb.zpa.faults.rate_limit_rps = None
    prepare(sb.directory)
    state = tmp_path / "state.db"
    async with running(sb, port=0):
        path = write_config(sb, tmp_path / "provisiond.toml", state_path=str(state), zia_rps=FAST_RPS,
                            interval=interval)
        config = load_config(path)
        config = dataclasses.replace(config, targets=tuple(
            dataclasses.replace(t, **{"requests_per_second": FAST_RPS, "burst": FAST_RPS, **overrides.get(t.name, {})})
            for t in config.targets))
        store = await Store.open(state)
        try:
            async with aiohttp.ClientSession() as session:
                yield World(sb, config, store, Engine(config, store, session, log=structlog.get_logger()),
                            tmp_path, path)
        finally:
            await store.close()


def target(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in data["targets"] if t["target"] == name)


# -- acceptance ---------------------------------------------------------------------------------


async def test_a_user_in_scope_directly_shows_the_group_the_mapping_the_link_and_nothing_to_do(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        data = await explain(w.store, w.config, DIRECT, "zpa")
        t = target(data, "zpa")
        assert t["in_scope"] is True
        assert t["scope"]["groups"][0]["via"] == ["ZPA Users"]
        assert "member of ZPA Users (directly)" in t["scope"]["decided_by"]
        assert t["mapped"]["userName"] == DIRECT
        assert t["mapped"]["attributes"]["externalId"] == w.uid(DIRECT)
        assert t["link"]["target_id"] == w.sb.zpa.user_by_username(DIRECT)["id"]
        assert t["link"]["active"] is True
        assert [(o["op"], o["status"], o["reason"]) for o in t["last_operations"]] == [
            ("create", "applied", "new_in_scope")]
        assert {g["group"]: (g["should_be_member"], g["member_in_target"]) for g in t["groups"]} == {
            "ZPA Users": (True, True), "ZPA Contractors": (False, False)}
        assert t["next_cycle"]["operations"] == []
        assert t["next_cycle"]["summary"].startswith("nothing: the target already holds")
        assert [x["target"] for x in data["targets"]] == ["zpa"]


async def test_a_user_in_scope_through_a_nested_group_names_the_path(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        t = target(await explain(w.store, w.config, NESTED), "zpa")
        assert t["in_scope"] is True
        assert t["scope"]["groups"][0]["via"] == ["ZPA Contractors", "ZPA Users"]
        assert "via ZPA Contractors -> ZPA Users" in t["scope"]["decided_by"]


async def test_a_user_out_of_scope_says_which_groups_it_lacks_and_that_nothing_will_happen(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        data = await explain(w.store, w.config, w.uid(OUTSIDE))      # by PingOne id
        for name, group in (("zpa", "ZPA Users"), ("zia", "ZIA Users")):
            t = target(data, name)
            assert t["in_scope"] is False
            assert t["scope"]["decided_by"] == f"not a member of any scope group: {group}"
            assert t["mapped"] is None and t["link"] is None and t["last_operations"] == []
            assert t["next_cycle"]["summary"] == "nothing: not in scope and not in the target"


async def test_a_user_that_the_filter_refuses_names_the_filter(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.retarget("zia", scope=Scope(groups=(GroupRef(name="ZIA Users"),), filter='department eq "Sales"'))
        await w.cycle()
        yes = target(await explain(w.store, w.config, SALES, "zia"), "zia")
        assert yes["in_scope"] is True
        assert yes["scope"]["filter"] == {"expression": 'department eq "Sales"', "matches": True}
        no = target(await explain(w.store, w.config, REFUSED, "zia"), "zia")
        assert no["in_scope"] is False
        assert no["scope"]["groups"][0]["member"] is True
        assert "does not match the filter department eq \"Sales\"" in no["scope"]["decided_by"]


async def test_a_skipped_user_gives_the_reason_and_the_value(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        t = target(await explain(w.store, w.config, PLAIN, "zpa"), "zpa")
        assert t["in_scope"] is True
        assert t["skipped"]["reason"] == "invalid_username"
        assert PLAIN in t["skipped"]["detail"]
        assert t["mapped"] is None and t["link"] is None
        assert t["next_cycle"]["operations"] == []
        assert t["next_cycle"]["summary"].startswith("nothing is sent: skipped (invalid_username")
        assert w.sb.zpa.user_by_username(PLAIN) is None


async def test_a_failed_create_shows_the_http_status_and_detail_and_that_it_will_be_retried(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        t = target(await explain(w.store, w.config, REFUSED, "zia"), "zia")
        (last,) = t["last_operations"]
        assert (last["op"], last["status"], last["http_status"]) == ("create", "failed", 400)
        assert last["error"]
        assert t["link"] is None
        nxt, member = t["next_cycle"]["operations"]
        assert (nxt["kind"], nxt["op"], nxt["status"], nxt["retry"]) == ("user", "create", "pending", True)
        assert (member["op"], member["name"]) == ("add_members", "ZIA Users")
        text = render_explanation(await explain(w.store, w.config, REFUSED, "zia"))
        assert "HTTP 400" in text and "retries the failure" in text


def hold_three_zpa_removals(w: World) -> list[str]:
    """Three users linked in zpa taken out of its scope group (not the nested contractors): with
    `max_deletes` 1, the next cycle holds their removal. Their ids."""
    d = w.sb.directory
    zpa = d.group_by_name("ZPA Users")["id"]
    contractors = d.transitive_member_ids(d.group_by_name("ZPA Contractors")["id"])
    linked = [uid for uid in sorted(d.direct_member_ids(zpa) - contractors)
              if w.sb.zpa.user_by_username(d.users[uid]["username"]) is not None][:3]
    assert len(linked) == 3
    for uid in linked:
        d.remove_member(zpa, uid)
    return linked


async def test_a_removal_held_by_max_deletes_is_reported_held_until_approved(tmp_path: Path) -> None:
    async with world(tmp_path, zpa={"max_deletes": MaxDeletes(count=1)}) as w:
        await w.cycle()
        linked = hold_three_zpa_removals(w)
        report = await w.cycle()
        assert next(t for t in report.targets if t.target == "zpa").summary["held"] == 3
        left = linked[0]
        t = target(await explain(w.store, w.config, left, "zpa"), "zpa")
        assert t["held"] is True
        assert [(o["op"], o["reason"], o["status"]) for o in t["next_cycle"]["operations"]
                if o["kind"] == "user"] == [("disable", "left_scope", "held")]
        assert "HELD" in t["next_cycle"]["summary"]
        assert t["last_operations"][0]["status"] == "held"
        assert "provisiond approve --target zpa" in render_explanation(
            await explain(w.store, w.config, left, "zpa"))
        await approvals.approve(w.store, "zpa")
        t = target(await explain(w.store, w.config, left, "zpa"), "zpa")
        assert t["held"] is False and t["approval_pending"] is True
        assert [o["status"] for o in t["next_cycle"]["operations"] if o["kind"] == "user"] == ["pending"]


async def test_a_user_deleted_in_pingone_but_still_linked_will_be_deprovisioned(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        uid = w.uid(DIRECT)
        w.sb.directory.delete_user(uid)
        w.retarget("zpa", actions=dataclasses.replace(w.config.target("zpa").actions, deprovision=False))
        await w.cycle()                    # stored snapshot without the user; the link stays
        data = await explain(w.store, w.config, DIRECT, "zpa")
        t = target(data, "zpa")
        assert data["user"] == {"id": uid, "in_source": False}
        assert t["link"] is not None
        (op,) = [o for o in t["next_cycle"]["operations"] if o["kind"] == "user"]
        assert (op["op"], op["reason"], op["status"], op["skip_reason"]) == (
            "disable", "deleted_in_source", "skipped", "action_disabled")


async def test_an_unknown_user_raises_and_the_answer_needs_no_network_and_takes_milliseconds(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
    # the emulators are stopped now: everything below comes from SQLite
    store = await Store.open(tmp_path / "state.db")
    try:
        with pytest.raises(UnknownUser):
            await explain(store, w.config, "nobody@example.com")
        data = await explain(store, w.config, DIRECT.upper())        # usernames compare case-insensitively
        assert data["user"]["username"] == DIRECT
        assert data["took_ms"] < 250
        with pytest.raises(KeyError):
            await explain(store, w.config, DIRECT, "nosuchtarget")
    finally:
        await store.close()


async def test_the_why_command_prints_text_and_json_and_exits_1_for_an_unknown_user(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon", "why", "-c", str(w.config_path), *args],
                              capture_output=True, text=True, timeout=30, check=False)

    text, as_json, unknown = await anyio.to_thread.run_sync(
        lambda: (run(DIRECT), run(REFUSED, "--target", "zia", "--json"), run("nobody@example.com")))
    assert text.returncode == 0, text.stderr
    assert "target zpa (zpa): IN SCOPE: member of ZPA Users (directly)" in text.stdout
    assert "target zia (zia): NOT IN SCOPE" in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["targets"][0]["last_operations"][0]["http_status"] == 400
    assert unknown.returncode == 1
    assert "nobody@example.com" in unknown.stderr
