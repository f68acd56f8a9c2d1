"""Claims: at most one write in flight per entity across processes (`Store.mark_in_flight`).

Two `Store`s on one real SQLite file stand for two processes. The other process is a real one:
a `sleep` child whose identity (`pid:start time`) is written as the owner of its cycles, so
its liveness is the kernel's answer, not a flag of the test. The last test runs the engine's
incremental cycle against the emulators beside such a writer (the SCIM target read back).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.incremental import Increment
from daemon.links import PENDING, Op
from daemon.source.changes import ChangeFeed, read_affected
from daemon.store import Holder, Outcome, Store, owner_alive, process_identity
from tests.harness import Harness, follow_feed, harness

pytestmark = pytest.mark.timeout(60)


def op(seq: int, source_id: str, kind: str = "user", name: str = "update") -> Op:
    return Op(seq=seq, phase=1, kind=kind, op=name, source_id=source_id, target_id=f"t-{source_id}",
              name=f"{source_id}@example.com", reason="attributes_changed", payload={}, status=PENDING)


@pytest.fixture
async def stores(tmp_path: Path, child: subprocess.Popen[bytes]) -> AsyncIterator[tuple[Store, Store]]:
    """(ours, the other process's) on one state file."""
    ours = await Store.open(tmp_path / "state.db")
    theirs = await Store.open(tmp_path / "state.db")
    theirs.owner = process_identity(child.pid)
    try:
        yield ours, theirs
    finally:
        await theirs.close()
        await ours.close()


async def status(store: Store, cycle: int, seq: int) -> str:
    async with store.db.execute("SELECT status FROM operation WHERE cycle_id=? AND seq=?", (cycle, seq)) as cur:
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def their_write_in_flight(theirs: Store, source_id: str = "u1") -> int:
    cycle = await theirs.start_cycle("zpa", full_sync=False, kind="sync-user")
    await theirs.save_plan(cycle, "zpa", [op(1, source_id)])
    assert await theirs.mark_in_flight(cycle, [1]) == {}
    return cycle


async def our_plan(ours: Store, *source_ids: str) -> int:
    cycle = await ours.start_cycle("zpa", full_sync=False)
    await ours.save_plan(cycle, "zpa", [op(i + 1, sid) for i, sid in enumerate(source_ids)])
    return cycle


def test_an_owner_is_alive_only_while_that_very_process_runs(child: subprocess.Popen[bytes]) -> None:
    me = process_identity()
    assert me.startswith(f"{os.getpid()}:") and owner_alive(me)
    theirs = process_identity(child.pid)
    assert owner_alive(theirs)
    # the same pid started at another time is another process (the pid was reused)
    assert not owner_alive(f"{os.getpid()}:1")
    assert not owner_alive(None) and not owner_alive("garbage")
    child.kill()
    child.wait()
    assert not owner_alive(theirs)


async def test_a_live_holder_keeps_the_entity_and_the_other_entities_go_on(stores: tuple[Store, Store]) -> None:
    ours, theirs = stores
    held = await their_write_in_flight(theirs, "u1")
    mine = await our_plan(ours, "u1", "u2")
    busy = await ours.mark_in_flight(mine, [1, 2])
    assert busy == {1: Holder(theirs.owner, held, "sync-user", "in_flight")}
    assert "sync-user" in busy[1].text() and theirs.owner.split(":")[0] in busy[1].text()
    assert await status(ours, mine, 1) == PENDING            # not marked: it must not be sent
    assert await status(ours, mine, 2) == "in_flight"
    # groups are entities of their own: a group with the same source id is not the user
    cycle = await ours.start_cycle("zpa", full_sync=False)
    await ours.save_plan(cycle, "zpa", [op(1, "u1", kind="group", name="add_members")])
    assert await ours.mark_in_flight(cycle, [1]) == {}
    # another target is another entity too
    other = await ours.start_cycle("zia", full_sync=False)
    await ours.save_plan(other, "zia", [op(1, "u1")])
    assert await ours.mark_in_flight(other, [1]) == {}
    assert await ours.busy_entities("zpa", [("user", "u1"), ("user", "u2")]) == {
        ("user", "u1"): Holder(theirs.owner, held, "sync-user", "in_flight")}
    # and the other process, in its turn, finds our write in flight on u2
    late = await their_plan_for(theirs, "u2")
    assert list(await theirs.mark_in_flight(late, [1])) == [1]


async def their_plan_for(theirs: Store, source_id: str) -> int:
    cycle = await theirs.start_cycle("zpa", full_sync=False, kind="sync-user")
    await theirs.save_plan(cycle, "zpa", [op(1, source_id)])
    return cycle


async def test_a_dead_holder_never_blocks(stores: tuple[Store, Store], child: subprocess.Popen[bytes]) -> None:
    ours, theirs = stores
    await their_write_in_flight(theirs, "u1")
    child.kill()                     # a crash: its write stays in_flight in the state file
    child.wait()
    mine = await our_plan(ours, "u1")
    assert await ours.mark_in_flight(mine, [1]) == {}
    assert await status(ours, mine, 1) == "in_flight"
    assert await ours.busy_entities("zpa", [("user", "u1")]) == {}


async def test_a_claim_is_released_when_its_outcome_is_recorded_applied_or_failed(stores: tuple[Store, Store]) -> None:
    ours, theirs = stores
    for number, outcome in enumerate(("applied", "failed")):
        sid = f"u{number}"
        held = await their_write_in_flight(theirs, sid)
        before = await our_plan(ours, sid)
        assert list(await ours.mark_in_flight(before, [1])) == [1]
        planned_at = time.time()
        await theirs.record_outcomes(held, [Outcome(1, outcome, attempts=1, finished=time.time())])
        # free now; but a plan whose links were read before that write is stale for the entity
        stale = await our_plan(ours, sid)
        busy = await ours.mark_in_flight(stale, [1], since=planned_at)
        assert busy == {1: Holder(theirs.owner, held, "sync-user", "written")}
        fresh = await our_plan(ours, sid)
        assert await ours.mark_in_flight(fresh, [1], since=time.time()) == {}
        assert await status(ours, fresh, 1) == "in_flight"


async def test_our_own_cycles_never_block_each_other(stores: tuple[Store, Store]) -> None:
    ours, _ = stores
    first = await our_plan(ours, "u1")
    assert await ours.mark_in_flight(first, [1]) == {}
    second = await our_plan(ours, "u1")     # the process serialises its own cycles (one lock per target)
    assert await ours.mark_in_flight(second, [1]) == {}


async def test_recovery_leaves_a_live_process_s_cycle_alone(stores: tuple[Store, Store],
                                                             child: subprocess.Popen[bytes]) -> None:
    ours, theirs = stores
    held = await their_write_in_flight(theirs, "u1")
    assert await ours.live_cycles("zpa") == [held]
    assert await ours.unfinished_ops("zpa") == []
    assert await ours.supersede("zpa") == 0
    assert await status(ours, held, 1) == "in_flight"
    child.kill()
    child.wait()
    assert [u["seq"] for u in await ours.unfinished_ops("zpa")] == [1]
    assert await ours.supersede("zpa") == 1


# -- the incremental cycle beside another writer ----------------------------------------------------


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path, users=40, groups=4) as h:
        h.engine.busy_wait = 0.3
        await follow_feed(h)
        yield h


async def changes(h: Harness) -> Increment:
    batch = await ChangeFeed(h.engine.source, h.store).poll()
    inc = await h.engine.merge_changes(await read_affected(h.engine.source, batch.changes))
    assert inc is not None
    return inc


async def test_an_incremental_cycle_leaves_a_user_another_process_writes_busy_then_sends_it_once_free(
        h: Harness, child: subprocess.Popen[bytes]) -> None:
    d = h.directory
    uid = sorted(d.direct_member_ids(d.group_by_name("ZPA Users")["id"]))[0]
    d.update_user(uid, name={"given": "Fed", "family": "Through"})
    other = await Store.open(h.state_path)
    other.owner = process_identity(child.pid)
    try:
        cycle = await other.start_cycle("zpa", full_sync=False, kind="sync-user")
        await other.save_plan(cycle, "zpa", [op(1, uid)])
        assert await other.mark_in_flight(cycle, [1]) == {}
        inc = await changes(h)
        h.sb.zpa.reset_counters()
        report = await h.engine.incremental_cycle(h.engine.runtimes["zpa"], inc)
        assert (report.outcome, report.busy) == ("success", 1)     # the service keeps the batch uncommitted
        assert h.sb.zpa.writes() == 0
        name = str(d.users[uid]["username"])
        assert h.sb.zpa.user_by_username(name)["name"]["givenName"] != "Fed"
        # the other process records its write (and, as a writer beside the daemon, says so)
        await other.record_outcomes(cycle, [Outcome(1, "applied", attempts=1, finished=time.time())])
        await other.set_meta("links.generation.zpa", "bumped")
        report = await h.engine.incremental_cycle(h.engine.runtimes["zpa"], inc)
        assert (report.outcome, report.busy, report.results.get("applied")) == ("success", 0, 1)
        assert h.sb.zpa.counters["PATCH /Users"] == 1
        assert h.sb.zpa.user_by_username(name)["name"]["givenName"] == "Fed"
    finally:
        await other.close()
