"""`provisiond why USER` predicts exactly what `provisiond sync-user USER` then sends.

Both commands run as real processes against the loopback emulators and one SQLite file. Each
situation is set up by real cycles (in this process) whose snapshot is stored while the target
lags behind it (an action turned off for that cycle only, or a removal held by `max_deletes`);
the config file the commands read has every action on. What sync-user sent is read back from
the SCIM emulator's request log over HTTP (`/_admin/requests`); that `why` sent nothing (only
reads at most) is read there too, and that it left no cycle, plan row or claim is read from the
SQLite file itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from daemon import approvals
from daemon.config import GroupRef, MaxDeletes
from daemon.explain import explain
from daemon.ondemand import sync_user
from daemon.sandbox.directory import Directory
from tests.test_explain import DIRECT, SALES, World, hold_three_zpa_removals, world

pytestmark = pytest.mark.timeout(120)

NEW = "why.new.hire@example.com"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def origin(url: str) -> str:
    match = re.match(r"https?://[^/]+", url)
    assert match is not None
    return match.group(0)


async def requests(w: World, target: str) -> list[dict[str, Any]]:
    """The SCIM emulator's request log, over HTTP (its own /_admin reads left out)."""
    async with aiohttp.ClientSession() as session, session.get(
            origin(w.config.target(target).base_url) + "/_admin/requests") as response:
        assert response.status == 200
        log: list[dict[str, Any]] = (await response.json())["requests"]
    return [r for r in log if not str(r["path"]).startswith("/_admin")]


def is_write(r: dict[str, Any]) -> bool:
    return r["method"] in WRITES and not str(r["path"]).endswith("/.search")


async def cli(w: World, *args: str) -> dict[str, Any]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon", *args, "-c", str(w.config_path), "--json"],
                              capture_output=True, text=True, timeout=60, check=False)

    done = await anyio.to_thread.run_sync(run)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def state_rows(path: Path) -> dict[str, Any]:
    """What a plan-only step must not leave in SQLite: cycles, plan rows (and the claims they
    carry), meta keys, links; and the whole file's content."""
    db = sqlite3.connect(path)
    try:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("cycle", "operation", "meta", "target_object", "approval")}
        claims = db.execute("SELECT count(*) FROM operation WHERE status='in_flight'").fetchone()[0]
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    return {"counts": counts, "in_flight": claims, "dump": dump}


def predicted(why: dict[str, Any], target: str) -> list[dict[str, Any]]:
    t = next(t for t in why["targets"] if t["target"] == target)
    ops: list[dict[str, Any]] = t["next_cycle"]["operations"]
    return ops


def sent_ops(sync: dict[str, Any], target: str) -> list[dict[str, Any]]:
    t = next(t for t in sync["targets"] if t["target"] == target)
    ops: list[dict[str, Any]] = t["operations"]
    return ops


def shape(ops: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(o["kind"], o["op"], o["name"], o["reason"]) for o in ops]


def expected_writes(ops: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The requests an applied operation sends: (resource, verb class), sorted."""
    out = []
    for o in ops:
        resource = "Users" if o["kind"] == "user" else "Groups"
        verb = "POST" if o["op"] == "create" else "DELETE" if o["op"] == "delete" else "MODIFY"
        out.append((resource, verb))
    return sorted(out)


def actual_writes(log: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for r in log:
        if not is_write(r):
            continue
        resource = "Users" if "/Users" in str(r["path"]) else "Groups"
        verb = r["method"] if r["method"] in ("POST", "DELETE") else "MODIFY"
        out.append((resource, verb))
    return sorted(out)


async def why_then_sync(w: World, ref: str, target: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run `why` (checking it sent nothing and left SQLite as it was), then `sync-user`; the
    operations why predicted must be exactly those sync-user planned and sent."""
    state = Path(w.config.daemon.state_path)
    before_log = len(await requests(w, target))
    before = state_rows(state)
    why = await cli(w, "why", ref, "--target", target)
    after_why = await requests(w, target)
    assert [r for r in after_why[before_log:] if r["method"] not in ("GET", "HEAD")] == []
    assert state_rows(state) == before, "why changed the state file"
    ops = predicted(why, target)
    # sync-user now, against the same PingOne and target
    sync = await cli(w, "sync-user", ref, "--target", target)
    log = (await requests(w, target))[len(after_why):]
    sent = sent_ops(sync, target)
    assert shape(sent) == shape(ops), (ops, sent)
    pending = [o for o in ops if o["status"] == "pending"]
    assert [o["status"] for o in sent] == ["applied" if o["status"] == "pending" else o["status"] for o in ops]
    assert actual_writes(log) == expected_writes(pending), log
    return ops, log


def retargeted(w: World, target: str, **actions: bool) -> None:
    cfg = w.config.target(target)
    w.retarget(target, actions=dataclasses.replace(cfg.actions, **actions))


def hire(d: Directory, group: str) -> str:
    user = d.add_user(NEW, email=NEW, given="Why", family="Hire")
    d.add_member(d.group_by_name(group)["id"], user["id"])
    return str(user["id"])


# -- situations -------------------------------------------------------------------------------


async def test_new_in_scope_why_predicts_the_create_and_membership_sync_user_sends(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        hire(w.sb.directory, "ZPA Users")
        retargeted(w, "zpa", create=False)
        await w.cycle()                         # stored snapshot holds the hire; zpa does not
        assert w.sb.zpa.user_by_username(NEW) is None
        ops, _ = await why_then_sync(w, NEW, "zpa")
        assert [(o["kind"], o["op"], o["status"]) for o in ops] == [
            ("user", "create", "pending"), ("group", "add_members", "pending")]
        assert w.sb.zpa.user_by_username(NEW) is not None


async def test_attribute_change_why_predicts_the_update_sync_user_sends(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        uid = w.uid(DIRECT)
        w.sb.directory.update_user(uid, name={"given": "Renamed", "family": "Person"})
        retargeted(w, "zpa", update=False)
        await w.cycle()
        ops, log = await why_then_sync(w, DIRECT, "zpa")
        assert [(o["kind"], o["op"], o["status"]) for o in ops] == [("user", "update", "pending")]
        assert ops[0]["changed"]
        tid = w.sb.zpa.user_by_username(DIRECT)["id"]
        assert any(is_write(r) and str(r["path"]).endswith(f"/Users/{tid}") for r in log)


async def test_drift_on_the_target_alone_why_and_sync_user_agree(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        account = dict(w.sb.zpa.user_by_username(DIRECT) or {})
        account["name"] = {"givenName": "Drifted", "familyName": "Elsewhere"}
        w.sb.zpa.put_user(account)              # changed on the target, not in PingOne
        await why_then_sync(w, DIRECT, "zpa")


async def test_disabled_in_pingone_why_predicts_the_disable_sync_user_sends(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        w.sb.directory.set_enabled(w.uid(DIRECT), False)
        retargeted(w, "zpa", disable=False)
        await w.cycle()
        ops, _ = await why_then_sync(w, DIRECT, "zpa")
        assert [(o["kind"], o["reason"], o["status"]) for o in ops if o["kind"] == "user"] == [
            ("user", "disabled_in_source", "pending")]
        account = w.sb.zpa.user_by_username(DIRECT)     # disabled, or deleted where the profile deletes
        assert account is None or account.get("active") is False


async def test_left_scope_why_predicts_the_removal_sync_user_sends(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        d = w.sb.directory
        d.remove_member(d.group_by_name("ZPA Users")["id"], w.uid(DIRECT))
        retargeted(w, "zpa", deprovision=False, disable=False)
        await w.cycle()                         # out of scope in the snapshot, still linked and active
        ops, _ = await why_then_sync(w, DIRECT, "zpa")
        user_ops = [(o["op"], o["reason"], o["status"]) for o in ops if o["kind"] == "user"]
        assert len(user_ops) == 1 and user_ops[0][1] == "left_scope" and user_ops[0][2] == "pending"


async def test_a_removal_held_by_max_deletes_is_predicted_held_then_sent_once_approved(tmp_path: Path) -> None:
    async with world(tmp_path, zpa={"max_deletes": MaxDeletes(count=1)}) as w:
        await w.cycle()
        linked = hold_three_zpa_removals(w)
        await w.cycle()                         # three removals above max_deletes: held
        ops, log = await why_then_sync(w, linked[0], "zpa")
        assert [(o["kind"], o["status"]) for o in ops if o["kind"] == "user"] == [("user", "held")]
        assert not [r for r in log if is_write(r)]
        await approvals.approve(w.store, "zpa")
        ops, log = await why_then_sync(w, linked[0], "zpa")
        assert [(o["kind"], o["reason"], o["status"]) for o in ops if o["kind"] == "user"] == [
            ("user", "left_scope", "pending")]
        assert [r for r in log if is_write(r)]


async def test_why_sends_nothing_and_leaves_no_cycle_plan_or_claim(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.cycle()
        hire(w.sb.directory, "ZPA Users")
        retargeted(w, "zpa", create=False)
        await w.cycle()
        state = Path(w.config.daemon.state_path)
        before = state_rows(state)
        marks = {name: len(await requests(w, name)) for name in ("zpa", "zia")}
        why = await cli(w, "why", NEW)          # every target
        assert predicted(why, "zpa")             # it does predict writes ...
        for name, mark in marks.items():         # ... and sends none of them
            assert [r for r in (await requests(w, name))[mark:] if r["method"] not in ("GET", "HEAD")] == []
        after = state_rows(state)
        assert after["counts"] == before["counts"] and after["in_flight"] == 0
        assert after["dump"] == before["dump"]
        assert w.sb.zpa.user_by_username(NEW) is None


async def test_at_zias_groups_per_user_cap_why_and_sync_user_both_send_no_membership_beyond_it(
        tmp_path: Path) -> None:
    """The cap counts the memberships a user holds outside the slice: sync-user (and the
    incremental cycle, the same step) sends no add beyond 127, and `why` says so."""
    async with world(tmp_path) as w:
        d = w.sb.directory
        uid = w.uid(SALES)
        names = [f"Cap {i:03d}" for i in range(130)]
        for name in names:
            d.add_member(d.add_group(name)["id"], uid)
        w.retarget("zia", groups=(GroupRef(name="ZIA Users"), *(GroupRef(name=n) for n in names)))
        await w.cycle()                           # 127 memberships sent, 4 capped
        data = await explain(w.store, w.config, SALES, "zia")
        ops = predicted(data, "zia")
        assert ops and all(o["op"] == "add_members" and o["status"] == "skipped" for o in ops), ops
        mark = len(await requests(w, "zia"))
        with capture_logs():
            async with aiohttp.ClientSession() as session:
                result = await sync_user(w.config, w.store, session, SALES, target="zia",
                                         log=structlog.get_logger(), emit=lambda _: None)
        (t,) = result.targets
        assert [(op.kind, op.op, op.name, op.status) for op in t.ops] == [
            (o["kind"], o["op"], o["name"], o["status"]) for o in ops]
        assert [r for r in (await requests(w, "zia"))[mark:] if is_write(r)] == []
