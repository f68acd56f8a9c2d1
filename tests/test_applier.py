"""The applier's first stage against the SCIM emulator on loopback: user and group creates run
together, and each group's member add is pipelined into them chunk by chunk.

Every request is observed by an outermost middleware (start, end, method, path), so the tests
check orderings and overlaps as the target saw them, never a speed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

from daemon import applier as applier_module
from daemon.applier import APPLIED, FAILED, SKIPPED, Applier, ApplyResult
from daemon.backoff import RetryPolicy
from daemon.links import PHASE_GROUPS, PHASE_MEMBER_ADD, PHASE_USERS, GroupLink, Op, UserLink
from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator
from daemon.sandbox.server import serve
from daemon.store import Store
from daemon.target.auth import BearerAuth
from daemon.target.profiles import profile_for
from daemon.target.scim import ScimClient

pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_elapsed=5.0)
LATENCY_MS = 20.0
TARGET = "t"
USERS_PATH = r"/Users$"       # POST /Users only (the lookups carry a query)
GROUPS_PATH = r"/Groups$"     # POST /Groups only


@dataclass
class Seen:
    """One request as the target saw it (monotonic seconds)."""

    method: str
    path: str
    start: float
    end: float = 0.0


@dataclass
class Observed:
    requests: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    on_end: Callable[[], None] | None = None     # called as each request ends

    def of(self, method: str, path_end: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_end)]


@dataclass
class Rig:
    emulator: ScimEmulator
    observed: Observed
    store: Store
    make_client: Callable[[int], ScimClient]


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    em = ScimEmulator("generic")
    em.faults.latency_ms = LATENCY_MS
    observed = Observed()

    @web.middleware
    async def observe(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        seen = Seen(request.method, request.path, time.monotonic())
        observed.requests.append(seen)
        observed.in_flight += 1
        observed.max_in_flight = max(observed.max_in_flight, observed.in_flight)
        try:
            return await handler(request)
        finally:
            observed.in_flight -= 1
            seen.end = time.monotonic()
            if observed.on_end is not None:
                observed.on_end()

    app = em.app()
    app.middlewares.insert(0, observe)   # outermost: the emulator's latency is inside it
    store = await Store.open(tmp_path / "state.db")
    try:
        async with serve(app) as url, aiohttp.ClientSession() as session:
            def make_client(batch: int) -> ScimClient:
                return ScimClient(session, url + em.prefix, BearerAuth(DEFAULT_TOKEN), profile=profile_for("generic"),
                                  policy=FAST, membership_batch=batch)

            yield Rig(em, observed, store, make_client)
    finally:
        await store.close()


def user_name(i: int) -> str:
    return f"user{i:03d}@example.com"


def build_ops(users: int, groups: dict[str, list[int]]) -> list[Op]:
    """A plan as the planner orders it: user creates, group creates, member adds (by name)."""
    ops: list[Op] = []
    for i in range(users):
        ops.append(Op(0, PHASE_USERS, "user", "create", f"u{i:03d}", None, user_name(i), "new_in_scope",
                      {"attrs": {"userName": user_name(i), "displayName": f"User {i}"}, "active": True}))
    for name in sorted(groups):
        ops.append(Op(0, PHASE_GROUPS, "group", "create", f"g-{name}", None, name, "new_group",
                      {"display_name": name}))
    for name in sorted(groups):
        ops.append(Op(0, PHASE_MEMBER_ADD, "group", "add_members", f"g-{name}", None, name, "membership_changed",
                      {"source_ids": sorted(f"u{i:03d}" for i in groups[name])}))
    return [Op(n + 1, op.phase, op.kind, op.op, op.source_id, op.target_id, op.name, op.reason, op.payload)
            for n, op in enumerate(ops)]


@dataclass
class Run:
    applier: Applier
    result: ApplyResult
    ops: list[Op]
    logs: list[dict[str, Any]]
    cycle_id: int

    def outcome(self, kind: str, op: str, source_id: str) -> Any:
        found = next(o for o in self.ops if (o.kind, o.op, o.source_id) == (kind, op, source_id))
        return self.result.outcomes[found.seq]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e["event"] == name]


async def apply(r: Rig, ops: list[Op], *, concurrency: int, batch: int,
                users: dict[str, UserLink] | None = None, groups: dict[str, GroupLink] | None = None,
                cancel_when: Callable[[], bool] | None = None) -> Run:
    cycle_id = await r.store.start_cycle(TARGET, full_sync=False)
    await r.store.save_plan(cycle_id, TARGET, ops)
    applier = Applier(
        target=TARGET, cycle_id=cycle_id, client=r.make_client(batch), store=r.store, log=structlog.get_logger(),
        limiter=anyio.CapacityLimiter(concurrency), users=dict(users or {}), groups=dict(groups or {}),
        paths=("userName", "displayName"), can_create=True, active_false_deletes=False)
    with capture_logs() as logs:
        if cancel_when is None:
            result = await applier.apply(ops)
        else:
            reached = anyio.Event()
            r.observed.on_end = lambda: reached.set() if cancel_when() else None
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await reached.wait()
                    tg.cancel_scope.cancel()   # as SIGTERM does: the apply is cancelled midway

                tg.start_soon(watch)
                await applier.apply(ops)
                tg.cancel_scope.cancel()
            result = applier.result
    return Run(applier, result, ops, logs, cycle_id)


def target_members(em: ScimEmulator, group_name: str) -> set[str]:
    group = em.group_by_name(group_name)
    assert group is not None
    return {m["value"] for m in group.get("members", [])}


def target_ids(em: ScimEmulator, indexes: list[int] | range) -> set[str]:
    out = set()
    for i in indexes:
        user = em.user_by_username(user_name(i))
        assert user is not None, user_name(i)
        out.add(str(user["id"]))
    return out


def assert_chunks_sequential(observed: Observed, group_id: str) -> None:
    patches = sorted(observed.of("PATCH", f"/Groups/{group_id}"), key=lambda s: s.start)
    for before, after in itertools.pairwise(patches):
        assert after.start >= before.end, f"two PATCHes on group {group_id} overlapped"


async def stored_statuses(store: Store, cycle_id: int) -> dict[int, str]:
    async with store.db.execute("SELECT seq, status FROM operation WHERE cycle_id=?", (cycle_id,)) as cur:
        return {int(seq): str(status) async for seq, status in cur}


# ---------------------------------------------------------------------------------------------


async def test_member_chunks_are_sent_while_users_are_still_being_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(applier_module, "FLUSH_EVERY", 7)   # flushes beside the workers, many times
    everyone = list(range(60))
    odd = everyone[1::2]
    async with rig(tmp_path) as r:
        run = await apply(r, build_ops(60, {"Everyone": everyone, "Odd": odd}), concurrency=4, batch=10)
        em, seen = r.emulator, r.observed

        assert run.result.stopped is None
        assert {o.status for o in run.result.outcomes.values()} == {APPLIED}
        creates = seen.of("POST", "/Users")
        assert len(creates) == 60
        last_create_done = max(s.end for s in creates)
        for name, members in (("Everyone", everyone), ("Odd", odd)):
            group = em.group_by_name(name)
            assert group is not None
            gid = str(group["id"])
            patches = seen.of("PATCH", f"/Groups/{gid}")
            assert len(patches) == math.ceil(len(members) / 10)
            # pipelined: the first chunk went out while later users were still being created
            assert min(p.start for p in patches) < last_create_done
            assert_chunks_sequential(seen, gid)
            assert target_members(em, name) == target_ids(em, members)
            link = run.applier.groups[f"g-{name}"]
            assert link.members == {f"u{i:03d}" for i in members}
            added = [e for e in run.events("group.members_added") if e["group"] == name]
            assert len(added) == 1
            assert (added[0]["members"], added[0]["requests"], added[0]["unresolved"]) == (
                len(members), math.ceil(len(members) / 10), 0)
        assert seen.max_in_flight <= 4

        # everything finished is in the store: outcomes and links
        statuses = await stored_statuses(r.store, run.cycle_id)
        assert set(statuses.values()) == {APPLIED}
        links = await r.store.load_links(TARGET)
        assert len(links.users) == 60
        assert links.groups["g-Everyone"].members == {f"u{i:03d}" for i in everyone}
        assert links.groups["g-Odd"].members == {f"u{i:03d}" for i in odd}


async def test_a_failed_user_create_leaves_that_member_unresolved_and_the_others_added(tmp_path: Path) -> None:
    async with r_failing_create(tmp_path, nth=13) as (r, run):
        failed = [o for o in run.ops if o.kind == "user" and run.result.outcomes[o.seq].status == FAILED]
        assert len(failed) == 1
        lost = failed[0].source_id
        assert run.result.outcomes[failed[0].seq].http_status == 400
        kept = [i for i in range(40) if f"u{i:03d}" != lost]

        add = run.outcome("group", "add_members", "g-Everyone")
        assert add.status == APPLIED
        event = next(e for e in run.events("group.members_added") if e["group"] == "Everyone")
        assert (event["members"], event["unresolved"], event["requests"]) == (39, 1, math.ceil(39 / 8))
        assert target_members(r.emulator, "Everyone") == target_ids(r.emulator, kept)
        assert run.applier.groups["g-Everyone"].members == {f"u{i:03d}" for i in kept}
        group = r.emulator.group_by_name("Everyone")
        assert group is not None
        assert_chunks_sequential(r.observed, str(group["id"]))


@asynccontextmanager
async def r_failing_create(tmp_path: Path, *, nth: int) -> AsyncIterator[tuple[Rig, Run]]:
    async with rig(tmp_path) as r:
        r.emulator.faults.nth_only = USERS_PATH
        r.emulator.faults.fail_nth = {nth: "400"}
        yield r, await apply(r, build_ops(40, {"Everyone": list(range(40))}), concurrency=4, batch=8)


async def test_in_flight_requests_never_exceed_the_concurrency(tmp_path: Path) -> None:
    """Eight groups whose chunks all become ready together: without the one limiter, their
    PATCHes and the creates would be far more than three in flight."""
    groups = {f"Group {g}": list(range(30)) for g in range(8)}
    async with rig(tmp_path) as r:
        run = await apply(r, build_ops(30, groups), concurrency=3, batch=5)
        assert {o.status for o in run.result.outcomes.values()} == {APPLIED}
        assert len(r.observed.of("PATCH", "")) == 8 * 6
        assert r.observed.max_in_flight == 3
        for name in groups:
            group = r.emulator.group_by_name(name)
            assert group is not None
            assert_chunks_sequential(r.observed, str(group["id"]))
            assert target_members(r.emulator, name) == target_ids(r.emulator, range(30))


async def test_a_failed_group_create_skips_its_member_add_with_dependency_failed(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.emulator.faults.nth_only = GROUPS_PATH
        r.emulator.faults.fail_nth = {1: "400"}
        run = await apply(r, build_ops(20, {"Broken": list(range(20))}), concurrency=4, batch=5)

        assert run.outcome("group", "create", "g-Broken").status == FAILED
        add = run.outcome("group", "add_members", "g-Broken")
        assert (add.status, add.skip_reason) == (SKIPPED, "dependency_failed")
        skipped = [e for e in run.events("group.skipped") if e["op"] == "add_members"]
        assert len(skipped) == 1 and skipped[0]["reason"] == "group_not_created"
        assert not r.observed.of("PATCH", "")
        assert all(run.outcome("user", "create", f"u{i:03d}").status == APPLIED for i in range(20))
        assert "g-Broken" not in run.applier.groups


async def test_members_of_a_linked_group_and_linked_users_are_added_at_once(tmp_path: Path) -> None:
    """A group already linked: its add does not wait for anything but its own members' creates."""
    async with rig(tmp_path) as r:
        existing = r.emulator.put_group({"displayName": "Old"})
        old_users = {}
        for i in range(100, 105):
            u = r.emulator.put_user({"userName": user_name(i)})
            old_users[f"u{i:03d}"] = UserLink(f"u{i:03d}", str(u["id"]), user_name(i), {}, True)
        ops = build_ops(12, {})
        ops.append(Op(len(ops) + 1, PHASE_MEMBER_ADD, "group", "add_members", "g-Old", str(existing["id"]), "Old",
                      "membership_changed", {"source_ids": sorted([*old_users, "u000", "u011"])}))
        link = GroupLink("g-Old", str(existing["id"]), "Old", frozenset())
        run = await apply(r, ops, concurrency=2, batch=5, users=old_users, groups={"g-Old": link})

        assert run.outcome("group", "add_members", "g-Old").status == APPLIED
        patches = sorted(r.observed.of("PATCH", f"/Groups/{existing['id']}"), key=lambda s: s.start)
        assert len(patches) == 2
        # the already linked users (5 = one chunk) went first, before the last create finished
        assert patches[0].start < max(s.end for s in r.observed.of("POST", "/Users"))
        want = {link.target_id for link in old_users.values()} | target_ids(r.emulator, [0, 11])
        assert target_members(r.emulator, "Old") == want
        assert run.applier.groups["g-Old"].members == {*old_users, "u000", "u011"}


async def test_an_auth_failure_stops_the_stage_and_member_adds_do_not_go_on(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.emulator.faults.nth_only = USERS_PATH
        r.emulator.faults.fail_nth = {20: "403"}
        run = await apply(r, build_ops(60, {"Everyone": list(range(60))}), concurrency=4, batch=5)

        assert run.result.stopped is not None and run.result.stopped.reason == "auth_failed"
        assert len(run.result.outcomes) == len(run.ops)          # every op has an outcome
        add = run.outcome("group", "add_members", "g-Everyone")
        assert add.status in (SKIPPED, FAILED)
        assert add.skip_reason == "target_auth_failed" or "stopped" in (add.error or "")
        skipped_users = [o for o in run.ops if o.kind == "user"
                         and run.result.outcomes[o.seq].skip_reason == "target_auth_failed"]
        assert skipped_users
        # what was linked is exactly what the target holds: no member recorded that is not there
        link = run.applier.groups["g-Everyone"]
        linked_ids = {run.applier.users[s].target_id for s in link.members}
        assert linked_ids == target_members(r.emulator, "Everyone")
        # no member PATCH was sent once the stop was known (a buggy pipeline would send the
        # remaining chunks one after another, a latency apart, after it)
        refused = r.observed.of("POST", "/Users")[19]
        assert refused.end > 0
        assert all(p.start <= refused.end + 2 * LATENCY_MS / 1000 for p in r.observed.of("PATCH", ""))
        statuses = await stored_statuses(r.store, run.cycle_id)
        assert "in_flight" not in statuses.values() and "pending" not in statuses.values()


async def test_a_cancelled_apply_keeps_every_finished_outcome_and_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(applier_module, "FLUSH_EVERY", 5)
    async with rig(tmp_path) as r:
        def two_chunks_added() -> bool:
            return sum(1 for p in r.observed.of("PATCH", "") if p.end) >= 2

        run = await apply(r, build_ops(80, {"Everyone": list(range(80))}), concurrency=4, batch=10,
                          cancel_when=two_chunks_added)

        finished = run.result.outcomes
        assert 0 < len(finished) < len(run.ops)                  # cancelled midway
        statuses = await stored_statuses(r.store, run.cycle_id)
        unsent = 0
        for op in run.ops:
            if op.seq in finished:
                assert statuses[op.seq] == finished[op.seq].status
            else:     # in flight only when sent: the operations the cancel kept from starting stay pending
                assert statuses[op.seq] in ("in_flight", "pending")
                unsent += statuses[op.seq] == "pending"
        assert unsent > 0
        links = await r.store.load_links(TARGET)
        created = {o.source_id for o in run.ops if o.kind == "user" and o.seq in finished}
        assert created and created <= set(links.users)
        assert {link.target_id for link in links.users.values()} <= set(r.emulator.users)
        group = links.groups.get("g-Everyone")
        assert group is not None
        held = target_members(r.emulator, "Everyone")
        assert group.members, "chunks sent before the cancel are linked"
        assert {links.users[s].target_id for s in group.members} <= held
