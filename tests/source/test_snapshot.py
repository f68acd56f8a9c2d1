"""take_snapshot against the PingOne emulator: equality with the Directory, completeness, refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from daemon.backoff import RetryPolicy
from daemon.errors import Forbidden, Unauthorized
from daemon.mapping import content_hash
from daemon.model import UNCHANGED, Snapshot
from daemon.sandbox.directory import Directory, generate
from daemon.sandbox.faults import Faults
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve
from daemon.source.pingone import PingOneClient
from daemon.source.snapshot import take_snapshot

pytestmark = pytest.mark.timeout(30)

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_elapsed=10.0)

# Requests to fail, by kind (Faults.nth_only): the users listing and the group reads run side by side.
USERS_LISTING = r"/users(\?(?!.*filter=)[^/]*)?$"
MEMBER_LISTING = r"/users\?.*filter="
NESTING_READ = r"/groups/[^/?]+/memberOfGroups"


@asynccontextmanager
async def running(directory: Directory, **emulator_kwargs: Any,
                  ) -> AsyncIterator[tuple[PingOneEmulator, PingOneClient]]:
    emulator = PingOneEmulator(directory, **emulator_kwargs)
    async with serve(emulator.app()) as base, aiohttp.ClientSession() as session:
        client = PingOneClient(session, api_url=f"{base}/v1", auth_url=base,
                               environment_id=directory.env_id, client_id=DEFAULT_CLIENT_ID,
                               client_secret=DEFAULT_CLIENT_SECRET, policy=FAST, page_size=100)
        yield emulator, client


def wanted_closure(directory: Directory, roots: set[str]) -> set[str]:
    """The roots and every group nested in them, from the emulator's own state."""
    out = set(roots)
    todo = list(roots)
    while todo:
        parent = todo.pop()
        for child, parents in directory.parents.items():
            if parent in parents and child not in out:
                out.add(child)
                todo.append(child)
    return out


def assert_matches(snap: Snapshot, directory: Directory, wanted: set[str]) -> None:
    assert snap.complete, snap.problems
    assert snap.problems == []
    assert snap.users == directory.users  # as returned, minus `_links`
    assert set(snap.groups) == set(directory.groups)
    for gid, group in snap.groups.items():
        assert group["name"] == directory.groups[gid]["name"]
        assert "_links" not in group
    assert set(snap.members) == wanted
    for gid in wanted:
        assert snap.members[gid] == frozenset(directory.direct_member_ids(gid))
    assert snap.finished_at >= snap.started_at > 0


async def test_snapshot_of_a_generated_directory_equals_the_directory() -> None:
    directory = generate(300, 12, seed=7)
    zpa = directory.group_by_name("ZPA Users")["id"]
    zia = directory.group_by_name("ZIA Users")["id"]
    grandchild = directory.add_group("ZPA Contractors EU")["id"]
    directory.nest(grandchild, directory.group_by_name("ZPA Contractors")["id"])
    async with running(directory, users_page_cap=40) as (_emulator, client):
        snap = await take_snapshot(client, group_names=["ZPA Users"], group_ids=[zia])
    wanted = wanted_closure(directory, {zpa, zia})
    assert grandchild in wanted  # nested two levels down
    assert_matches(snap, directory, wanted)
    expected_parents = {gid: frozenset(directory.parents.get(gid, ())) for gid in directory.groups}
    assert snap.parents == expected_parents
    assert snap.member_ids(zpa, transitive=True) == directory.transitive_member_ids(zpa)


async def test_direct_snapshot_reads_no_nesting_and_only_the_named_groups() -> None:
    directory = generate(120, 10, seed=8)
    zpa = directory.group_by_name("ZPA Users")["id"]
    async with running(directory) as (emulator, client):
        snap = await take_snapshot(client, group_names=["ZPA Users"], transitive=False)
        assert emulator.counters["groups.memberOfGroups"] == 0
    assert snap.parents == {}
    assert_matches(snap, directory, {zpa})


async def test_a_wanted_group_that_does_not_exist_is_simply_absent() -> None:
    directory = generate(50, 6, seed=1)
    async with running(directory) as (_emulator, client):
        snap = await take_snapshot(client, group_names=["No Such Group"],
                                   group_ids=["00000000-0000-4000-8000-00000000dead"])
    assert snap.complete
    assert snap.problems == []
    assert snap.members == {}
    assert snap.users == directory.users


async def test_snapshot_sees_renames_by_id_and_dynamic_members() -> None:
    directory = generate(200, 10, seed=4)
    dynamic = directory.group_by_name("Engineering (dynamic)")
    directory.rename_group(dynamic["id"], "Engineers")
    async with running(directory) as (_emulator, client):
        snap = await take_snapshot(client, group_ids=[dynamic["id"]])
    assert snap.groups[dynamic["id"]]["name"] == "Engineers"
    assert snap.members[dynamic["id"]] == frozenset(directory.direct_member_ids(dynamic["id"]))
    assert snap.members[dynamic["id"]]


async def test_a_users_page_that_stays_malformed_leaves_an_incomplete_snapshot_with_earlier_users() -> None:
    directory = generate(200, 6, seed=2)
    faults = Faults()
    async with running(directory, users_page_cap=30, faults=faults) as (_emulator, client):
        await client.token()
        # users pages 1 and 2 pass; page 3 fails on every attempt (the group reads run beside them)
        faults.nth_only = USERS_LISTING
        faults.fail_nth = {3 + i: "truncated" for i in range(FAST.max_attempts)}
        snap = await take_snapshot(client, group_names=["All Staff"])
    assert not snap.complete
    assert len(snap.users) == 60
    assert list(snap.users) == list(directory.users)[:60]
    assert snap.problems[0].startswith("users page 3: ")
    assert len(snap.problems) == 1
    # the rest of the snapshot went on
    assert set(snap.groups) == set(directory.groups)
    assert snap.members


async def test_a_member_listing_that_fails_is_a_problem_and_that_group_is_left_out() -> None:
    directory = generate(80, 6, seed=3)
    zpa = directory.group_by_name("ZPA Users")["id"]
    zia = directory.group_by_name("ZIA Users")["id"]
    faults = Faults()
    async with running(directory, faults=faults) as (_emulator, client):
        await client.token()
        first, second = sorted([zpa, zia])
        # members of `first` fail on every attempt (its member listings), `second` then succeeds
        faults.nth_only = MEMBER_LISTING
        faults.fail_nth = {1 + i: "503" for i in range(FAST.max_attempts)}
        snap = await take_snapshot(client, group_ids=[zpa, zia], transitive=False, concurrency=1)
    assert not snap.complete
    assert snap.problems == [snap.problems[0]]
    assert snap.problems[0].startswith(f"group {first} members: ")
    assert "HTTP 503" in snap.problems[0]
    assert first not in snap.members
    assert snap.members[second] == frozenset(directory.direct_member_ids(second))
    assert snap.users == directory.users


async def test_a_refusal_during_the_fan_out_is_raised_as_itself() -> None:
    directory = generate(60, 8, seed=5)
    faults = Faults()
    async with running(directory, faults=faults) as (_emulator, client):
        await client.token()
        faults.nth_only = NESTING_READ
        faults.fail_nth = {2: "403"}  # one of the nesting reads
        with pytest.raises(Forbidden):
            await take_snapshot(client, group_names=["ZPA Users"])


async def test_wrong_credentials_make_the_snapshot_raise_unauthorized() -> None:
    directory = generate(10, 4, seed=5)
    async with running(directory, client_secret="another-secret") as (_emulator, client):
        with pytest.raises(Unauthorized):
            await take_snapshot(client, group_names=["ZPA Users"])


async def test_snapshot_logs_pages_at_debug_and_nothing_per_user() -> None:
    directory = generate(90, 5, seed=6)
    async with running(directory, users_page_cap=30) as (_emulator, client):
        with capture_logs() as logs:
            await take_snapshot(client, group_names=["ZPA Users"], log=structlog.get_logger())
    pages = [entry for entry in logs if entry["event"] == "snapshot.page"]
    # users pages and group pages interleave (the two reads run side by side); each kind in order
    assert [p["page"] for p in pages if p["kind"] == "users"] == [1, 2, 3]
    assert [p["page"] for p in pages if p["kind"] == "groups"] == [1]
    assert len(pages) == 4
    assert all(entry["log_level"] == "debug" for entry in logs)
    assert len(logs) == len(pages) + 1  # plus one snapshot.taken


async def test_every_user_is_hashed_and_the_hook_lets_the_snapshot_drop_its_json() -> None:
    directory = generate(120, 4, seed=9)
    seen: dict[str, int] = {}

    def on_user(user_id: str, user: dict[str, Any], digest: int) -> bool:
        assert user == directory.users[user_id] and digest == content_hash(user)
        seen[user_id] = digest
        return user_id.endswith(("0", "2", "4", "6", "8", "a", "c", "e"))   # about half

    async with running(directory) as (_emulator, client):
        snap = await take_snapshot(client, group_names=["All Staff"], on_user=on_user)
        plain = await take_snapshot(client, group_names=["All Staff"])
    assert snap.complete and set(snap.users) == set(directory.users)
    dropped = [uid for uid, user in snap.users.items() if user is UNCHANGED]
    assert dropped and len(dropped) < len(snap.users)
    assert all(snap.users[uid] == directory.users[uid] for uid in snap.users if uid not in dropped)
    assert snap.hashes == {uid: seen[uid] for uid in snap.users if uid not in dropped}   # held JSON only
    assert plain.hashes == seen and UNCHANGED not in plain.users.values()
    # one string per id: the member sets reuse the users' keys
    keys = {uid: uid for uid in snap.users}
    for members in snap.members.values():
        assert all(keys[m] is m for m in members)


async def test_a_projection_hashes_the_same_whatever_order_the_keys_come_in() -> None:
    directory = generate(30, 2, seed=4)
    async with running(directory) as (_emulator, client):
        first = await take_snapshot(client, keep={"id", "username", "name", "enabled"})
        second = await take_snapshot(client, keep=["enabled", "name", "username", "id"])
    assert first.hashes == second.hashes
    assert all(list(user) == sorted(user) for user in first.users.values())


def test_the_placeholder_cannot_be_filled() -> None:
    with pytest.raises(TypeError):
        UNCHANGED["id"] = "x"
    assert not UNCHANGED and repr(UNCHANGED) == "UNCHANGED"


async def test_a_users_listing_short_of_its_reported_count_leaves_an_incomplete_snapshot() -> None:
    directory = generate(120, 6, seed=4)
    faults = Faults()
    async with running(directory, users_page_cap=50, faults=faults) as (_emulator, client):
        await client.token()
        # users page 2 of 3 says the set holds one user more than the three pages deliver
        faults.nth_only = USERS_LISTING
        faults.fail_nth = {2: "miscount"}
        snap = await take_snapshot(client, group_names=["All Staff"])
    assert not snap.complete
    assert len(snap.users) == 120       # every user arrived; the count disagreed
    assert snap.problems == ["users listing: listing count changed while it was read (120, 121); "
                             "120 item(s) arrived"]


async def test_a_member_listing_whose_count_disagrees_is_a_problem_and_a_matching_one_is_not() -> None:
    directory = generate(80, 6, seed=3)
    zpa = directory.group_by_name("ZPA Users")["id"]
    faults = Faults()
    async with running(directory, faults=faults) as (_emulator, client):
        await client.token()
        snap = await take_snapshot(client, group_ids=[zpa], transitive=False)
        assert snap.complete, snap.problems          # every count PingOne reports adds up
        faults.nth_only = MEMBER_LISTING
        faults.matched_count = 0
        faults.fail_nth = {1: "miscount"}
        snap = await take_snapshot(client, group_ids=[zpa], transitive=False)
    assert not snap.complete
    members = len(directory.direct_member_ids(zpa))
    assert snap.problems == [f"group {zpa} members: listing reported count {members + 1} but {members} item(s) arrived"]
