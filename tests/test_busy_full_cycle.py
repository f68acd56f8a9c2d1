"""The full cycle beside another writer: an entity another provisiond process holds (`busy`).

Two `Store`s on one real SQLite file stand for two processes; the other one's cycles are owned
by a real `sleep` child (its liveness is the kernel's answer). The full cycle runs against the
emulators on loopback and the ZPA target is read back over SCIM; `status` runs as a subprocess;
the metrics are the daemon's Prometheus text.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.links import PENDING, Op
from daemon.metrics import Metrics
from daemon.service import RETRIED_OUTCOMES
from daemon.store import Outcome, Store, process_identity
from tests.harness import Harness, harness, run_command

pytestmark = pytest.mark.timeout(90)

NEW_GIVEN = "Held"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path, users=30, groups=4) as h:
        report = await h.cycle()          # everything provisioned: the next cycle has one update to send
        assert report.outcome == "success", report
        yield h


@pytest.fixture
async def other(h: Harness, child: subprocess.Popen[bytes]) -> AsyncIterator[Store]:
    """The other process (an operator's `sync-user`) on the daemon's state file."""
    store = await Store.open(h.state_path)
    store.owner = process_identity(child.pid)
    try:
        yield store
    finally:
        await store.close()


def changed_user(h: Harness) -> tuple[str, str]:
    """A ZPA user whose given name PingOne now says differently: (id, userName)."""
    d = h.directory
    uid = sorted(d.direct_member_ids(d.group_by_name("ZPA Users")["id"]))[0]
    d.update_user(uid, name={"given": NEW_GIVEN, "family": "Busy"})
    return uid, str(d.users[uid]["username"])


async def claim(other: Store, uid: str) -> int:
    """The other process's write to *uid* in flight on ZPA (its claim)."""
    cycle = await other.start_cycle("zpa", full_sync=False, kind="sync-user")
    await other.save_plan(cycle, "zpa", [Op(seq=1, phase=1, kind="user", op="update", source_id=uid,
                                            target_id=None, name=uid, reason="attributes_changed",
                                            payload={}, status=PENDING)])
    assert await other.mark_in_flight(cycle, [1]) == {}
    return cycle


async def release(other: Store, cycle: int) -> None:
    """The other process records its write's outcome (the claim is released) and, as a writer
    beside the daemon, says it wrote the target's links."""
    await other.record_outcomes(cycle, [Outcome(1, "applied", attempts=1, finished=time.time())])
    await other.set_meta("links.generation.zpa", f"other-{cycle}")


async def given_name_over_scim(h: Harness, user_name: str) -> str:
    """The user's givenName as the ZPA target answers GET /Users?filter=userName eq ..."""
    base = next(t for t in h.config.targets if t.name == "zpa").base_url.rstrip("/")
    async with aiohttp.ClientSession() as session, session.get(
            f"{base}/Users", params={"filter": f'userName eq "{user_name}"'},
            headers={"Authorization": f"Bearer {h.sb.zpa.token}"}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json(content_type=None)
    assert body["totalResults"] == 1, body
    return str(body["Resources"][0]["name"]["givenName"])


async def skipped_busy(h: Harness, uid: str) -> bool:
    async with h.store.db.execute(
            "SELECT count(*) FROM operation WHERE kind='user' AND source_id=? AND status='skipped'", (uid,)) as cur:
        row = await cur.fetchone()
    return row is not None and row[0] > 0


def left_busy(metrics: Metrics, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == "provisiond_entities_left_busy_total" and all(
                    sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_a_full_cycle_waits_for_a_user_another_process_holds_and_writes_it_once_free(
        h: Harness, other: Store) -> None:
    uid, user_name = changed_user(h)
    held = await claim(other, uid)
    h.engine.busy_wait = 30.0         # a bound, never reached: the claim goes as soon as it was met

    async def release_once_met() -> None:
        for _ in range(3000):         # until the full cycle met the claim and skipped the user
            if await skipped_busy(h, uid):
                break
            await anyio.sleep(0.01)
        await release(other, held)

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_once_met)
        report = await h.cycle()
    zpa = h.target_report("zpa")
    assert (zpa.outcome, zpa.busy, report.outcome) == ("success", 0, "success"), zpa
    # skipped busy once, then planned again from the current state and written
    assert [e["source_id"] for e in h.events("user.skipped", target="zpa", reason="busy")] == [uid]
    assert h.events("reconcile.replanned", target="zpa", reason="busy", entities=1)
    assert h.sb.zpa.counters["PATCH /Users"] + h.sb.zpa.counters.get("PUT /Users", 0) == 1
    finished = h.events("cycle.finished", target="zpa")
    assert len(finished) == 1 and "busy" not in finished[0] and finished[0]["outcome"] == "success"
    assert await given_name_over_scim(h, user_name) == NEW_GIVEN


async def test_a_user_held_past_the_wait_is_reported_busy_and_the_next_cycle_writes_it(
        h: Harness, other: Store) -> None:
    metrics = Metrics()
    h.engine.observers.append(metrics.observe)
    uid, user_name = changed_user(h)
    held = await claim(other, uid)
    h.engine.busy_wait = 0.3
    report = await h.cycle()
    zpa = h.target_report("zpa")
    # not written: not a success; partial_failure is retried on the target's back-off, /healthz degraded
    assert (zpa.outcome, zpa.busy, zpa.failed) == ("partial_failure", 1, 0), (
        zpa.results, h.events("user.skipped"), h.events("reconcile.replanned"), [e for e in h.last_logs if e.get("source_id") == uid])
    assert zpa.outcome in RETRIED_OUTCOMES
    assert report.outcome == "partial_failure"
    finished = h.events("cycle.finished", target="zpa")
    assert len(finished) == 1 and finished[0]["busy"] == 1 and finished[0]["outcome"] == "partial_failure"
    assert await given_name_over_scim(h, user_name) != NEW_GIVEN
    assert h.sb.zpa.writes() == 0
    assert left_busy(metrics, target="zpa", kind="user") == 1
    # ZIA was not held: its cycle is untouched by ZPA's busy user
    assert h.target_report("zia").outcome == "success" and h.target_report("zia").busy == 0
    # the summary in the state file, as `status` reads it
    shown = await run_command("status", "-c", str(h.config_path), "--json")
    assert shown.returncode == 0, shown.stderr.decode()
    last = next(t for t in json.loads(shown.stdout)["targets"] if t["target"] == "zpa")
    assert (last["outcome"], last["summary"]["busy"]) == ("partial_failure", {"user": 1})
    human = await run_command("status", "-c", str(h.config_path))
    assert "BUSY: 1 user(s) not written" in human.stdout.decode(), human.stdout.decode()

    await release(other, held)
    report = await h.cycle()
    zpa = h.target_report("zpa")
    assert (zpa.outcome, zpa.busy, report.outcome) == ("success", 0, "success"), zpa
    assert "busy" not in h.events("cycle.finished", target="zpa")[0]
    assert await given_name_over_scim(h, user_name) == NEW_GIVEN
    assert left_busy(metrics, target="zpa", kind="user") == 1       # a counter: not counted again
    shown = await run_command("status", "-c", str(h.config_path), "--json")
    last = next(t for t in json.loads(shown.stdout)["targets"] if t["target"] == "zpa")
    assert last["outcome"] == "success" and "busy" not in last["summary"], last
