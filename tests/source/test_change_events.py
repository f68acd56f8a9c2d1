"""What `why USER` says about the last change-feed event of a user: the `change_event` rows the
feed writes when it hands a batch on (pending), commits it (applied, with each target's cycle),
or a full snapshot begins after it (covered); against the PingOne emulator and a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from daemon.explain import render_event
from daemon.source.changes import (
    EVENT_APPLIED,
    EVENT_COVERED,
    EVENT_PENDING,
    EVENT_SKIPPED,
    Carried,
    last_event,
)
from daemon.store import _CHANGES_SCHEMA, _SCHEMA, SCHEMA_VERSION, Store
from tests.source import test_changes
from tests.source.test_changes import Env

env = test_changes.env          # the fixture: the emulator, a state file and a manual clock

pytestmark = pytest.mark.timeout(60)


async def test_pending_then_applied_with_the_cycles_then_a_newer_event_covered_by_a_snapshot(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    uid = env.directory.add_user("ev@example.com")["id"]
    env.clock.advance(0.5)                     # one ms apart at least: recordedAt orders them
    env.directory.update_user(uid, title="First")
    env.clock.advance(2.5)
    batch = await feed.poll()
    newest = max((a for a in batch.activities if uid in a.user_ids), key=lambda a: (a.recorded_at, a.id))
    await feed.note(batch)
    seen = await last_event(env.store, uid)
    assert seen is not None and seen["status"] == EVENT_PENDING and seen["activity_id"] == newest.id
    assert seen["action"] == "USER.UPDATED" and seen["applied"] is None
    assert "PENDING: being applied" in "\n".join(render_event(seen))
    env.clock.advance(1)
    await feed.commit(batch, {"zpa": Carried(7, "success"), "zia": Carried(None, "quarantined")})
    done = await last_event(env.store, uid)
    assert done is not None and done["status"] == EVENT_APPLIED and done["applied"] == env.clock.now
    assert done["seen"] == seen["seen"], "first seen is kept"
    assert done["targets"] == {"zpa": {"cycle": 7, "outcome": "success"},
                               "zia": {"cycle": None, "outcome": "quarantined"}}
    text = "\n".join(render_event(done))
    assert newest.id in text and "USER.UPDATED" in text and "zpa incremental cycle 7 (success)" in text
    assert "3.5s after it was recorded" in text and "zia not run (quarantined)" in text

    # A newer event, not committed (a target busy), then a full snapshot that began after it.
    env.directory.set_enabled(uid, False)
    env.clock.advance(3)
    later = await feed.poll()
    await feed.note(later, detail="not committed: the next poll hands it on again",
                    carried={"zpa": Carried(None, "busy with its full cycle")})
    pending = await last_event(env.store, uid)
    assert pending is not None and pending["status"] == EVENT_PENDING and pending["activity_id"] != newest.id
    assert "zpa busy with its full cycle" in "\n".join(render_event(pending))
    await feed.start_at(env.clock.now + 1)
    covered = await last_event(env.store, uid)
    assert covered is not None and covered["status"] == EVENT_COVERED
    assert covered["activity_id"] == pending["activity_id"]
    # Handed on again after the snapshot and committed: applied, never back to pending.
    again = await feed.poll()
    assert pending["activity_id"] in {a.id for a in again.activities}
    await feed.note(again)
    assert (await last_event(env.store, uid) or {})["status"] == EVENT_COVERED
    await feed.commit(again, {"zpa": Carried(9, "success")})
    assert (await last_event(env.store, uid) or {})["status"] == EVENT_APPLIED


async def test_an_older_event_handed_on_later_does_not_replace_the_newer_one(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    uid = env.directory.add_user("order@example.com")["id"]
    env.clock.advance(3)
    first = await feed.poll()
    await feed.commit(first)
    newest = (await last_event(env.store, uid) or {})["activity_id"]
    stale = {"id": "0-stale", "recordedAt": "2026-02-28T00:00:00.000Z", "action": {"type": "USER.UPDATED"},
             "resources": [{"type": "USER", "id": uid}], "result": {"status": "SUCCESS"}}
    failed = {**stale, "id": "z-failed", "recordedAt": "2026-03-02T00:00:00.000Z",
              "result": {"status": "FAILED"}}
    with sqlite3.connect(env.path) as db:
        db.execute("INSERT INTO change_inbox(received, body) VALUES (0, ?)", (json.dumps([stale]),))
    await feed.commit(await feed.poll())
    assert (await last_event(env.store, uid) or {})["activity_id"] == newest
    with sqlite3.connect(env.path) as db:
        db.execute("INSERT INTO change_inbox(received, body) VALUES (0, ?)", (json.dumps([failed]),))
    await feed.commit(await feed.poll())
    skipped = await last_event(env.store, uid)
    assert skipped is not None and skipped["status"] == EVENT_SKIPPED and skipped["activity_id"] == "z-failed"
    assert "skipped: the action failed in PingOne" in "\n".join(render_event(skipped))
    assert await last_event(env.store, "nobody") is None
    assert "none kept" in render_event(None)[0]


async def test_a_version_3_state_file_gains_change_event_and_keeps_the_feed(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA)
    db.execute("ALTER TABLE cycle ADD COLUMN kind TEXT NOT NULL DEFAULT 'cycle'")
    db.executescript(_CHANGES_SCHEMA)
    db.execute("INSERT INTO meta(key, value) VALUES ('change_watermark', '1772323200.0')")
    db.execute("INSERT INTO change_seen(id, recorded_at) VALUES ('a1', '2026-03-01T00:00:00.000Z')")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    store = await Store.open(path)
    try:
        async with store.db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == SCHEMA_VERSION == 5
        assert await store.get_meta("change_watermark") == "1772323200.0"
        async with store.db.execute("SELECT id FROM change_seen") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["a1"]
        assert await last_event(store, "u1") is None
    finally:
        await store.close()
