"""The change feed against the PingOne emulator over loopback, with a real SQLite state file."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.backoff import RetryPolicy
from daemon.errors import TransientError
from daemon.sandbox.activities import FeedSettings
from daemon.sandbox.directory import Directory
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve
from daemon.source.changes import (
    Activity,
    ChangeFeed,
    FeedGap,
    affected,
    parse_activity,
    read_affected,
)
from daemon.source.pingone import PingOneClient
from daemon.store import Store

pytestmark = pytest.mark.timeout(60)

START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_elapsed=5.0)
OTHER_POP = "00000000-0000-4000-8000-0000000000b1"


class ManualClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Env:
    def __init__(self, emulator: PingOneEmulator, base: str, session: aiohttp.ClientSession,
                 store: Store, clock: ManualClock, path: Path) -> None:
        self.emulator = emulator
        self.base = base
        self.session = session
        self.store = store
        self.clock = clock
        self.path = path

    @property
    def directory(self) -> Directory:
        return self.emulator.directory

    def client(self) -> PingOneClient:
        return PingOneClient(self.session, api_url=f"{self.base}/v1", auth_url=self.base,
                             environment_id=self.directory.env_id, client_id=DEFAULT_CLIENT_ID,
                             client_secret=DEFAULT_CLIENT_SECRET, policy=FAST)

    def feed(self, **options: Any) -> ChangeFeed:
        return ChangeFeed(self.client(), self.store, clock=self.clock, **options)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = ManualClock()
    emulator = PingOneEmulator(Directory(clock=clock), feed_settings=FeedSettings(seed=3))
    path = tmp_path / "state.db"
    async with serve(emulator.app()) as base, aiohttp.ClientSession() as session:
        env = Env(emulator, base, session, await Store.open(path), clock, path)
        try:
            yield env
        finally:
            await env.store.close()   # the one open now: tests reopen it


def every_mutation(d: Directory) -> dict[str, str]:
    ids = {
        "alice": d.add_user("alice@example.com")["id"],
        "bob": d.add_user("bob@example.com")["id"],
        "carol": d.add_user("carol@example.com")["id"],
        "staff": d.add_group("Staff")["id"],
        "zpa": d.add_group("ZPA")["id"],
        "old": d.add_group("Old")["id"],
    }
    d.update_user(ids["alice"], title="Engineer")
    d.set_enabled(ids["alice"], False)
    d.set_enabled(ids["alice"], True)
    d.update_user(ids["carol"], population={"id": OTHER_POP})
    d.set_user_filter(ids["staff"], 'title eq "Engineer"')
    d.rename_group(ids["staff"], "All Staff")
    d.add_member(ids["zpa"], ids["alice"])
    d.add_member(ids["zpa"], ids["bob"])
    d.remove_member(ids["zpa"], ids["bob"])
    d.nest(ids["staff"], ids["zpa"])
    d.unnest(ids["staff"], ids["zpa"])
    d.nest(ids["staff"], ids["zpa"])
    d.delete_user(ids["bob"])
    d.delete_group(ids["old"])
    return ids


# --- pure ------------------------------------------------------------------------------------------

def record(rid: str, at: str, *resources: dict[str, Any], status: str = "SUCCESS") -> dict[str, Any]:
    return {"id": rid, "recordedAt": at, "action": {"type": "X"}, "resources": list(resources),
            "result": {"status": status}}


@pytest.mark.parametrize(("raw", "users", "groups"), [
    (record("1", "t", {"type": "USER", "id": "u"}), ("u",), ()),
    (record("1", "t", {"type": "user", "id": "u"}, {"type": "GROUP", "id": "g"}), ("u",), ("g",)),
    (record("1", "t", {"user": {"id": "u"}}, {"group": {"id": "g"}}), ("u",), ("g",)),
    (record("1", "t", {"type": "POPULATION", "id": "p"}, {"type": "USER"}, "junk"), (), ()),
    (record("1", "t", {"type": "GROUP", "id": "c"}, {"type": "GROUP", "id": "p"}), (), ("c", "p")),
])
def test_parse_activity_names_the_users_and_groups(raw: dict[str, Any], users: tuple[str, ...],
                                                   groups: tuple[str, ...]) -> None:
    activity = parse_activity(raw)
    assert activity is not None
    assert activity.user_ids == users and activity.group_ids == groups


@pytest.mark.parametrize("raw", [None, [], {"id": "1"}, {"recordedAt": "t"}, {"id": "", "recordedAt": "t"},
                                 {"id": 5, "recordedAt": "t"}])
def test_unusable_records_parse_to_none(raw: Any) -> None:
    assert parse_activity(raw) is None


def test_affected_skips_failed_actions_and_keeps_the_first_time() -> None:
    acts = [Activity("1", "2026-01-01T00:00:02.000Z", "X", ("u",), ("g",)),
            Activity("2", "2026-01-01T00:00:01.000Z", "X", ("u",), ()),
            Activity("3", "2026-01-01T00:00:00.000Z", "X", ("v",), (), failed=True)]
    changes = affected(acts)
    assert changes.user_ids == {"u"} and changes.member_groups == {"g"} and not changes.group_ids
    assert changes.first_recorded["u"] == "2026-01-01T00:00:01.000Z"
    assert not affected(acts[2:])
    failed = parse_activity(record("9", "t", {"type": "USER", "id": "v"}, status="FAILED"))
    assert failed is not None and failed.failed


def test_a_group_named_beside_a_user_is_a_membership_unless_the_group_itself_changed() -> None:
    at = "2026-01-01T00:00:00.000Z"
    added = Activity("1", at, "GROUP_MEMBERSHIP.CREATED", ("u",), ("g",))
    renamed = Activity("2", at, "GROUP.UPDATED", ("v",), ("h",))
    nested = Activity("3", at, "GROUP_NESTING.CREATED", (), ("g2", "p"))
    changes = affected([added, renamed, nested])
    assert changes.user_ids == {"u", "v"}
    assert changes.member_groups == {"g"} and changes.group_ids == {"h", "g2", "p"}
    # The same group also named on its own: read as a group, not only as a membership.
    alone = Activity("4", at, "GROUP.UPDATED", (), ("g",))
    changes = affected([added, alone])
    assert changes.group_ids == {"g"} and not changes.member_groups


# --- over HTTP -------------------------------------------------------------------------------------

async def test_a_membership_change_reads_the_user_not_the_groups_member_list(env: Env) -> None:
    alice = env.directory.add_user("alice@example.com")["id"]
    bob = env.directory.add_user("bob@example.com")["id"]
    zpa = env.directory.add_group("ZPA")["id"]
    env.directory.add_member(zpa, bob)
    env.clock.advance(60)
    feed = env.feed()
    await feed.start_at(env.clock.now)
    env.directory.add_member(zpa, alice)
    env.directory.remove_member(zpa, bob)
    env.clock.advance(3)
    batch = await feed.poll()
    assert batch.changes.member_groups == {zpa} and not batch.changes.group_ids
    env.emulator.request_log.clear()
    reads = await read_affected(env.client(), batch.changes)
    assert not reads.groups
    read_alice, read_bob = reads.users[alice], reads.users[bob]
    assert read_alice is not None and read_alice["memberOfGroupIDs"] == [zpa]
    assert read_bob is not None and read_bob["memberOfGroupIDs"] == []
    reads_sent = [path for _, path in env.emulator.request_log if "/environments/" in path]
    assert sorted(path.split("?")[0].rsplit("/", 1)[-1] for path in reads_sent) == sorted([alice, bob])
    # A PingOne that answers the user without its groups: the group is read after all.
    env.emulator.user_read_includes_groups = False
    reads = await read_affected(env.client(), batch.changes)
    zpa_read = reads.groups[zpa]
    assert zpa_read is not None and zpa_read.member_ids == (alice,)


async def test_every_event_type_reaches_the_affected_ids_and_reads_them(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now - 1)
    ids = every_mutation(env.directory)
    env.clock.advance(3)
    batch = await feed.poll()
    assert len(batch.activities) == len(env.emulator.feed.records) == 20
    assert batch.changes.user_ids == {ids["alice"], ids["bob"], ids["carol"]}
    assert batch.changes.group_ids == {ids["staff"], ids["zpa"], ids["old"]}
    reads = await read_affected(env.client(), batch.changes)
    assert reads.deleted_users == {ids["bob"]} and reads.deleted_groups == {ids["old"]}
    alice = reads.users[ids["alice"]]
    assert alice is not None and ids["zpa"] in alice["memberOfGroupIDs"]
    carol = reads.users[ids["carol"]]
    assert carol is not None and carol["population"]["id"] == OTHER_POP
    zpa = reads.groups[ids["zpa"]]
    assert zpa is not None and zpa.member_ids == (ids["alice"],)
    staff = reads.groups[ids["staff"]]
    assert staff is not None and staff.parent_ids == (ids["zpa"],) and staff.group["name"] == "All Staff"
    await feed.commit(batch)
    assert await feed.watermark() == env.clock.now
    assert not await feed.poll()                       # nothing new, nothing twice


async def test_out_of_order_and_overlapping_polls_hand_each_record_on_once(env: Env) -> None:
    env.emulator.feed.settings.update({"delay_spread": 1.0, "indexing_delay": 2.0})
    feed = env.feed(overlap=5.0)
    await feed.start_at(env.clock.now)
    handed: list[str] = []
    user = env.directory.add_user("x@example.com")["id"]
    for step in range(60):
        env.directory.update_user(user, title=f"T{step}")
        env.clock.advance(0.25)
        if step % 3 == 0:
            batch = await feed.poll()
            handed.extend(a.id for a in batch.activities)
            await feed.commit(batch)
    env.clock.advance(3)
    batch = await feed.poll()
    handed.extend(a.id for a in batch.activities)
    await feed.commit(batch)
    everything = [a.body["id"] for a in env.emulator.feed.records]
    assert len(handed) == len(set(handed)) == len(everything) == 61
    assert set(handed) == set(everything)


async def test_a_user_that_no_longer_exists_reads_as_deleted(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    gone = env.directory.add_user("gone@example.com")["id"]
    env.directory.update_user(gone, title="x")
    env.directory.delete_user(gone)
    env.clock.advance(3)
    batch = await feed.poll()
    reads = await read_affected(env.client(), batch.changes)
    assert reads.users == {gone: None}


async def test_no_watermark_or_one_older_than_the_retention_is_a_gap(env: Env) -> None:
    feed = env.feed()
    with pytest.raises(FeedGap):
        await feed.poll()
    await feed.start_at(env.clock.now - 15 * 86400)
    with pytest.raises(FeedGap, match="retention"):
        await feed.poll()
    await feed.start_at(env.clock.now)   # a full snapshot starts now: the feed covers what follows
    env.directory.add_user("after@example.com")
    env.clock.advance(3)
    assert len((await feed.poll()).activities) == 1
    assert len((await feed.poll(audit=False)).activities) == 0   # the inbox alone: no gap check


async def test_a_feed_outage_raises_typed_keeps_the_watermark_and_recovers(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    env.emulator.feed.settings.update({"outage_status": 503})
    user = env.directory.add_user("during@example.com")["id"]
    env.clock.advance(3)
    with pytest.raises(TransientError):
        await feed.poll()
    assert await feed.watermark() == START
    env.clock.advance(60)
    env.emulator.feed.settings.update({"outage_status": None})
    batch = await feed.poll()
    assert batch.changes.user_ids == {user}


async def test_an_uncommitted_batch_comes_again_after_a_restart(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    first = env.directory.add_user("first@example.com")["id"]
    env.clock.advance(3)
    batch = await feed.poll()
    assert batch.changes.user_ids == {first}
    await env.store.close()                      # stopped before the batch was applied
    env.store = await Store.open(env.path)
    feed = env.feed()
    again = await feed.poll()
    assert [a.id for a in again.activities] == [a.id for a in batch.activities]
    await feed.commit(again)
    await env.store.close()
    env.store = await Store.open(env.path)
    feed = env.feed()
    assert await feed.watermark() == env.clock.now
    assert not await feed.poll()


async def test_sigkill_after_a_commit_keeps_it_and_before_the_next_loses_nothing(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    first = env.directory.add_user("first@example.com")["id"]
    env.clock.advance(3)
    # The child's feed reads its clock from stdin: the parent's manual clock, line by line.
    script = textwrap.dedent(f"""
        import asyncio, os, signal, sys, aiohttp
        from daemon.store import Store
        from daemon.source.changes import ChangeFeed
        from daemon.source.pingone import PingOneClient
        from daemon.backoff import RetryPolicy

        async def main():
            store = await Store.open({str(env.path)!r})
            async with aiohttp.ClientSession() as session:
                client = PingOneClient(session, api_url={env.base + '/v1'!r}, auth_url={env.base!r},
                                       environment_id={env.directory.env_id!r}, client_id={DEFAULT_CLIENT_ID!r},
                                       client_secret={DEFAULT_CLIENT_SECRET!r},
                                       policy=RetryPolicy(max_attempts=2, base_delay=0.01))
                feed = ChangeFeed(client, store, clock=lambda: float(sys.argv[1]))
                batch = await feed.poll()
                assert batch.changes.user_ids == {{{first!r}}}, batch
                await feed.commit(batch)
                print("committed", flush=True)
                now = float(await asyncio.to_thread(sys.stdin.readline))
                feed.clock = lambda: now
                batch = await feed.poll()      # the second batch: being applied, then killed
                print(len(batch.activities), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, repr(env.clock.now), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    line = await asyncio.wait_for(child.stdout.readline(), 30)
    assert line == b"committed\n", (line, await child.stderr.read() if child.stderr else b"")
    second = env.directory.add_user("second@example.com")["id"]
    env.clock.advance(3)
    child.stdin.write(f"{env.clock.now!r}\n".encode())
    await child.stdin.drain()
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"1\n"
    assert await asyncio.wait_for(child.wait(), 30) == -signal.SIGKILL
    await env.store.close()
    env.store = await Store.open(env.path)
    feed = env.feed()
    assert await feed.watermark() == START + 3    # the first commit's, not the killed poll's
    batch = await feed.poll()
    assert batch.changes.user_ids == {second}     # the first is not handed on again


async def test_the_audit_rate_bucket_is_waited_out_not_lost(env: Env) -> None:
    feed = env.feed()
    await feed.start_at(env.clock.now)
    user = env.directory.add_user("limited@example.com")["id"]
    env.clock.advance(3)
    env.emulator.feed.settings.update({"rate_rps": 1.0, "rate_burst": 1})
    client = feed.client
    first = await feed.poll()                       # takes the only token
    assert first.changes.user_ids == {user}
    second = await feed.poll()                      # 429 + Retry-After: 1, retried, answered
    assert second.changes.user_ids == {user}        # not committed: handed on again
    assert client.stats["429"] >= 1
    assert env.emulator.counters["activities.list"] >= 3
