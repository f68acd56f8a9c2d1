"""The state file on a real SQLite database: permissions, WAL, schema version, links, plans, approvals."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.links import HELD, PENDING, SKIPPED, GroupLink, Op, UserLink
from daemon.model import UNCHANGED, Snapshot
from daemon.store import SCHEMA_VERSION, Outcome, Store, StoreError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "state.db")
    try:
        yield s
    finally:
        await s.close()


def user_link(sid: str, **kw: object) -> UserLink:
    fields: dict[str, object] = {"attrs": {"userName": f"{sid}@example.com", "displayName": f"User {sid}",
                                           "title": None}, "active": True}
    fields.update(kw)
    return UserLink(sid, f"t-{sid}", f"{sid}@example.com", **fields)  # type: ignore[arg-type]


def op(seq: int, kind: str = "user", name: str = "create", source_id: str = "u1", *, status: str = PENDING,
       skip_reason: str | None = None) -> Op:
    return Op(seq=seq, phase=1, kind=kind, op=name, source_id=source_id, target_id=None,
              name=f"{source_id}@example.com", reason="new_in_scope",
              payload={"attrs": {"userName": f"{source_id}@example.com"}}, status=status, skip_reason=skip_reason)


async def test_the_file_is_created_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = await Store.open(path)
    try:
        await s.set_meta("k", "v")
    finally:
        await s.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for companion in (tmp_path / "state.db-wal", tmp_path / "state.db-shm"):
        if companion.exists():
            assert stat.S_IMODE(os.stat(companion).st_mode) & 0o077 == 0


async def test_the_journal_is_wal_and_the_schema_version_is_set(store: Store, tmp_path: Path) -> None:
    async with store.db.execute("PRAGMA journal_mode") as cur:
        row = await cur.fetchone()
    assert row is not None and str(row[0]).lower() == "wal"
    with sqlite3.connect(tmp_path / "state.db") as plain:
        assert plain.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in plain.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "source_user", "source_group", "target_object", "cycle", "operation", "approval"} <= tables


async def test_reopening_keeps_the_data_and_the_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = await Store.open(path)
    await s.write_links("zpa", users=[user_link("u1")])
    await s.close()
    s = await Store.open(path)
    try:
        assert set((await s.load_links("zpa")).users) == {"u1"}
    finally:
        await s.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as plain:
        plain.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        await Store.open(path)


async def test_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await Store.open(tmp_path / "nope" / "state.db")


async def test_links_round_trip_per_target(store: Store) -> None:
    disabled = user_link("u2", active=False, disabled_reason="left_scope", disabled_at=1234.5, origin="adopted")
    group = GroupLink("g1", "tg-1", "Équipe", frozenset({"u1", "u2"}), frozenset({"x9"}), "adopted")
    await store.write_links("zpa", users=[user_link("u1"), disabled], groups=[group])
    await store.write_links("zia", users=[user_link("u3")])
    zpa = await store.load_links("zpa")
    assert zpa.users == {"u1": user_link("u1"), "u2": disabled}
    assert zpa.groups == {"g1": group}
    assert set((await store.load_links("zia")).users) == {"u3"}
    assert await store.managed_count("zpa") == 2
    assert await store.managed_count("zpa", "group") == 1
    found = await store.link_for("zpa", "u2")
    assert found is not None
    assert (found["target_id"], found["active"], found["disabled_reason"]) == ("t-u2", False, "left_scope")


async def test_links_are_replaced_and_dropped(store: Store) -> None:
    await store.write_links("zpa", users=[user_link("u1"), user_link("u2")],
                            groups=[GroupLink("g1", "tg-1", "G", frozenset())])
    changed = user_link("u1", attrs={"userName": "u1@example.com", "displayName": "New"})
    await store.write_links("zpa", users=[changed], drop_users=["u2"], drop_groups=["g1"])
    links = await store.load_links("zpa")
    assert links.users == {"u1": changed}
    assert links.groups == {}


async def test_a_plan_and_its_outcomes_are_stored(store: Store) -> None:
    cycle = await store.start_cycle("zpa", full_sync=True)
    ops = [op(1, source_id="u1"), op(2, source_id="u2"), op(3, source_id="u3", status=SKIPPED,
                                                             skip_reason="action_disabled"),
           op(4, name="disable", source_id="u4", status=HELD, skip_reason="removals_held")]
    await store.save_plan(cycle, "zpa", ops)
    await store.mark_in_flight(cycle, [1, 2])
    await store.record_outcomes(cycle, [
        Outcome(1, "applied", attempts=1, target_id="t-u1", started=1.0, finished=2.0),
        Outcome(2, "failed", attempts=3, http_status=400, error="HTTP 400 invalidValue", scim_type="invalidValue",
                started=1.0, finished=2.5),
    ])
    await store.finish_cycle(cycle, "partial_failure", {"users": {"impacted": 4, "failed": 1}})
    assert await store.held_count("zpa") == 1
    failures = await store.recent_failures("zpa")
    assert len(failures) == 1
    assert failures[0]["source_id"] == "u2"
    assert (failures[0]["http_status"], failures[0]["scim_type"], failures[0]["attempts"]) == (400, "invalidValue", 3)
    (u1,) = await store.operations_for("zpa", "u1")
    (u3,) = await store.operations_for("zpa", "u3")
    assert (u1["cycle"], u1["op"], u1["status"], u1["attempts"]) == (cycle, "create", "applied", 1)
    assert (u3["status"], u3["skip_reason"]) == (SKIPPED, "action_disabled")
    latest = await store.latest_cycles()
    assert [(c["target"], c["outcome"], c["full_sync"]) for c in latest] == [("zpa", "partial_failure", True)]
    assert latest[0]["summary"] == {"users": {"impacted": 4, "failed": 1}}
    assert await store.unfinished_ops("zpa") == []


async def test_the_last_full_sync_counts_only_finished_cycles(store: Store) -> None:
    assert await store.last_full_sync("zpa") is None
    running = await store.start_cycle("zpa", full_sync=True)
    assert await store.last_full_sync("zpa") is None
    await store.finish_cycle(running, "success", {})
    assert await store.last_full_sync("zpa") is not None
    assert await store.last_full_sync("zia") is None


async def test_an_interrupted_cycle_leaves_unfinished_ops_that_supersede_closes(store: Store) -> None:
    first = await store.start_cycle("zpa", full_sync=True)
    await store.save_plan(first, "zpa", [op(1, source_id="u1"), op(2, source_id="u2"), op(3, source_id="u3")])
    await store.mark_in_flight(first, [1, 2])
    await store.record_outcomes(first, [Outcome(1, "applied", attempts=1, target_id="t-u1")])
    # the process dies here: op 2 in flight, op 3 pending, the cycle still 'running'
    unfinished = await store.unfinished_ops("zpa")
    assert [(u["seq"], u["status"]) for u in unfinished] == [(2, "in_flight"), (3, "pending")]
    assert unfinished[0]["payload"] == {"attrs": {"userName": "u2@example.com"}}
    await store.start_cycle("zpa", full_sync=False)
    assert await store.supersede("zpa") == 2
    assert await store.unfinished_ops("zpa") == []
    async with store.db.execute("SELECT outcome FROM cycle WHERE id=?", (first,)) as cur:
        row = await cur.fetchone()
    assert row is not None and row[0] == "interrupted"


async def test_an_approval_is_granted_once_and_consumed(store: Store) -> None:
    assert not await store.approved("zpa")
    await store.approve("zpa")
    await store.approve("zpa")
    assert await store.approved("zpa")
    assert not await store.approved("zia")
    await store.consume_approval("zpa")
    assert not await store.approved("zpa")


async def test_the_snapshot_is_stored_incrementally_and_gone_users_dropped_only_when_complete(store: Store) -> None:
    users = {f"u{i}": {"id": f"u{i}", "username": f"u{i}@example.com", "email": f"u{i}@example.com",
                       "updatedAt": "2024-01-01T00:00:00.000Z"} for i in range(3)}
    snap = Snapshot(users=dict(users), groups={"g1": {"id": "g1", "name": "G"}},
                    members={"g1": frozenset({"u0"})})
    hashes = {uid: f"h{uid}" for uid in users}
    assert await store.save_snapshot(snap, hashes) == 3
    assert await store.save_snapshot(snap, hashes) == 0          # nothing changed: nothing written
    hashes["u1"] = "changed"
    assert await store.save_snapshot(snap, hashes) == 1
    partial = Snapshot(users={"u0": users["u0"]}, complete=False)
    assert await store.save_snapshot(partial, {"u0": "hu0"}) == 0  # incomplete: u1, u2 kept
    assert await store.find_source_user("u2@EXAMPLE.com") == users["u2"]
    assert await store.save_snapshot(Snapshot(users={"u0": users["u0"]}), {"u0": "hu0"}) == 2
    assert await store.find_source_user("u2") is None
    assert (await store.find_source_user("u0"))["id"] == "u0"  # type: ignore[index]



async def test_a_user_whose_json_equals_the_placeholder_is_stored_not_skipped(store: Store) -> None:
    """`user is not UNCHANGED`, not `!=`: an empty JSON object equals the placeholder, and is still
    written, where `UNCHANGED` itself never is."""
    snap = Snapshot(users={"u1": {}, "u2": UNCHANGED})
    assert await store.save_snapshot(snap, {"u1": 7}) == 1
    assert await store.source_hashes() == {"u1": 7}
    async with store.db.execute("SELECT id, data FROM source_user") as cur:
        assert [(r[0], json.loads(r[1])) for r in await cur.fetchall()] == [("u1", {})]


async def test_a_version_1_state_file_is_migrated_forward_keeping_its_cycles(tmp_path: Path) -> None:
    import sqlite3

    from daemon.store import _SCHEMA

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA)
    db.execute("INSERT INTO cycle(target, started, outcome, summary) VALUES ('zpa', 1.0, 'success', '{}')")
    db.execute("INSERT INTO cycle(target, started, outcome, summary) "
               "VALUES ('zpa', 2.0, 'success', '{\"kind\": \"sync-user\"}')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = await Store.open(path)
    try:
        async with store.db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == SCHEMA_VERSION == 5
        async with store.db.execute("SELECT id, kind FROM cycle ORDER BY id") as cur:
            assert [tuple(r) async for r in cur] == [(1, "cycle"), (2, "sync-user")]
        assert await store.last_cycle_id("zpa") == 1          # sync-user runs are not "the last cycle"
        assert [c["cycle"] for c in await store.latest_cycles()] == [1]
    finally:
        await store.close()
