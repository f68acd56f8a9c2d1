"""One write in flight per entity across processes: `provisiond run` (a subprocess) applies a
change to a slow target while `provisiond sync-user` (another subprocess) reconciles the same
user. The SCIM emulator's request log, read over HTTP, must show no two overlapping writes to
that user, and the user read back over SCIM must be as PingOne says."""

from __future__ import annotations

import itertools
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from yarl import URL

from tests.test_changes_daemon import World, feed_world, first_cycle, wait_for
from tests.test_faults_daemon import assert_log_schema
from tests.test_service import child_env, until

pytestmark = pytest.mark.timeout(120)

LATENCY_MS = 5000.0      # each zpa request: the daemon's write to the user is in flight this long


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with feed_world(tmp_path) as w:
        yield w


async def admin(session: aiohttp.ClientSession, base: str, route: str, body: Any = None) -> Any:
    root = str(URL(base).origin())
    if body is None:
        async with session.get(f"{root}/_admin/{route}") as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()
    async with session.post(f"{root}/_admin/{route}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def in_flight(state: Path, target: str, source_id: str) -> bool:
    """Is a write to this user journaled in flight (the daemon's claim)? Read-only, for timing."""
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT count(*) FROM operation WHERE target=? AND source_id=? AND kind='user' "
                         "AND status='in_flight'", (target, source_id)).fetchone()
    return bool(row and row[0])


def writes_to(requests: list[dict[str, Any]], target_id: str, user_name: str) -> list[dict[str, Any]]:
    """The requests that write this user: POST /Users naming it, PUT/PATCH/DELETE /Users/{id}."""
    out = []
    for r in requests:
        path, method = str(r["path"]), r["method"]
        body = r.get("body") or {}
        if method == "POST" and path.endswith("/Users") and str(body.get("userName", "")).lower() == user_name.lower():
            out.append(r)
        elif method in ("PUT", "PATCH", "DELETE") and path.endswith(f"/Users/{target_id}"):
            out.append(r)
    return sorted(out, key=lambda r: float(r["started"]))


async def test_sync_user_beside_the_daemon_never_overlaps_its_write_to_the_same_user(world: World) -> None:
    w, t, d_ = world, world.targets, world.sb.directory
    session = t.session
    state = w.tmp_path / "state.db"
    async with w.daemon() as d:
        await first_cycle(d)
        uid = w.members("ZPA Users")[0]
        name = w.name(uid)
        before = await t.user("zpa", name)
        assert before is not None
        target_id = str(before["id"])
        await admin(session, w.sb.zpa_url, "faults", {"latency_ms": LATENCY_MS})   # a slow target
        mark = time.time()
        d_.update_user(uid, name={"given": "Changed", "family": "Meanwhile"})      # -> the change feed

        async def daemon_writing() -> bool:                 # the daemon's incremental PATCH is under way
            return in_flight(state, "zpa", uid)
        await wait_for(daemon_writing, "the daemon's write to the user in flight", d, within=30)
        done = await anyio.run_process(
            [sys.executable, "-m", "daemon", "sync-user", uid, "-c", str(w.config), "--target", "zpa", "--json"],
            env=child_env(None), check=False)
        assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
        out = json.loads(done.stdout)
        (zpa,) = out["targets"]
        busy = [e for e in zpa["events"] if e.get("reason") == "busy"]
        # sync-user planned the same PATCH from the links it read, found the daemon's claim, sent
        # nothing beside it, then planned again from the state the daemon left: nothing to do
        assert busy and busy[0]["holder_kind"] == "incremental" and busy[0]["holder_pid"] == d.pid, zpa
        assert not [o for o in zpa["operations"] if o["status"] == "applied"], zpa
        await admin(session, w.sb.zpa_url, "faults", {"latency_ms": 0})

        async def changed() -> bool:
            user = await t.user("zpa", name)
            return user is not None and user["name"]["givenName"] == "Changed"
        await wait_for(changed, "the change read back from zpa", d)
        log = (await admin(session, w.sb.zpa_url, "requests"))["requests"]
        writes = writes_to([r for r in log if float(r["started"]) >= mark], target_id, name)
        assert writes, "no write to the user reached the target"
        for first, second in itertools.pairwise(writes):
            assert float(second["started"]) >= float(first["finished"]), f"overlapping writes: {first} {second}"
        assert len(writes) == 1, writes          # one PATCH: the daemon's; sync-user had nothing left to send
        assert d.named("user.updated") and not d.named("cycle.crashed")
        assert_log_schema(d.events)
        await until(lambda: d.named("cycle.finished"), "cycle.finished", explain=d.describe)
