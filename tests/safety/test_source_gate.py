"""A bad snapshot never removes anything: a page failing, malformed JSON, 0 users, half the users."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.sandbox.directory import Directory
from tests.safety import TARGETS, Harness, assert_converged, cli, fast_source, harness, removal_requests

pytestmark = pytest.mark.timeout(60)

PAGE_SIZE = 10     # 60 users: 6 pages


USERS_LISTING = r"/users(\?(?!.*filter=)[^/]*)?$"    # the users listing, not a member listing


def fail_users_page(kind: str) -> Callable[[Harness], None]:
    """The 3rd users page fails on every attempt (the 3rd and 4th users-listing requests)."""
    def go(h: Harness) -> None:
        faults = h.sb.pingone.faults
        faults.nth_only = USERS_LISTING
        faults.matched_count = 0
        faults.fail_nth = {3: kind, 4: kind}
    return go


def delete_users(fraction: float) -> Callable[[Harness], None]:
    def go(h: Harness) -> None:
        d: Directory = h.directory
        ids = sorted(d.users)
        for uid in ids[: round(len(ids) * fraction)]:
            d.delete_user(uid)
    return go


@pytest.mark.parametrize(("break_source", "event"), [
    pytest.param(fail_users_page("503"), "snapshot.incomplete", id="page-3-answers-503"),
    pytest.param(fail_users_page("malformed"), "snapshot.incomplete", id="page-3-malformed-json"),
    pytest.param(fail_users_page("truncated"), "snapshot.incomplete", id="page-3-truncated-json"),
    pytest.param(delete_users(1.0), "snapshot.shrunk", id="zero-users"),
    pytest.param(delete_users(0.5), "snapshot.shrunk", id="half-the-users"),
])
async def test_a_bad_source_snapshot_sends_zero_removal_requests_and_logs_why(
        tmp_path: Path, break_source: Callable[[Harness], None], event: str) -> None:
    async with harness(tmp_path) as h:
        fast_source(h, page_size=PAGE_SIZE)
        report = await h.cycle()
        assert not report.failed, report
        for target in TARGETS:
            assert_converged(h.directory, h.emulator(target), target)
        before = {t: len(h.emulator(t).users) for t in TARGETS}

        break_source(h)
        report = await h.cycle()

        for target in TARGETS:
            assert removal_requests(h.emulator(target)) == [], target
            assert len(h.emulator(target).users) == before[target]
        assert report.snapshot_complete is False
        (logged,) = h.events(event)
        if event == "snapshot.incomplete":
            # not a success: the cycle, each target's outcome and its cycle.finished say so
            assert report.failed and report.outcome == "source_incomplete", report
            assert {h.target_report(t).outcome for t in TARGETS} <= {"source_incomplete", "partial_failure"}
            assert {e["outcome"] for e in h.events("cycle.finished")} <= {"source_incomplete", "partial_failure"}
            assert logged["problem_count"] >= 1
            assert "users page 3" in logged["problems"][0]
            assert logged["user_count"] == 20     # pages 1 and 2 arrived
        else:
            assert logged["last_good_users"] == 60
            assert logged["user_count"] < 60 * 0.9
            assert logged["shrink_pct"] > 10
        assert h.events("plan.removals_deferred"), "the removals it did not plan are reported"


async def test_one_unusable_user_in_a_page_is_dropped_as_a_problem_and_the_rest_is_provisioned(
        tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        fast_source(h, page_size=PAGE_SIZE)
        assert not (await h.cycle()).failed
        d = h.directory
        zpa = d.group_by_name("ZPA Users")["id"]
        newcomer = d.add_user("new.person@example.com", email="new.person@example.com", given="New",
                              family="Person")
        d.add_member(zpa, newcomer["id"])
        odd = d.add_user("no.id@example.com", given="No", family="Id")
        odd_id = odd["id"]
        d.add_member(zpa, odd_id)
        odd["id"] = 12345                         # served as a number: not a usable id
        d._changed(odd_id)                        # the emulator re-renders it

        await h.cycle()

        (logged,) = h.events("snapshot.incomplete")
        assert any("id is JSON int, not a string" in p for p in logged["problems"])
        assert h.emulator("zpa").user_by_username("new.person@example.com") is not None
        for target in TARGETS:
            assert removal_requests(h.emulator(target)) == [], target


async def test_a_users_listing_that_does_not_add_up_to_its_count_removes_nothing_until_one_does(
        tmp_path: Path) -> None:
    """PingOne reports `count` for a listing: fewer users than it says is an incomplete snapshot."""
    async with harness(tmp_path) as h:
        fast_source(h, page_size=PAGE_SIZE)
        assert not (await h.cycle()).failed
        gone = next(uid for uid in sorted(h.directory.users)
                    if all(h.emulator(t).user_by_username(h.directory.users[uid]["username"]) for t in TARGETS))
        gone_name = h.directory.users[gone]["username"]
        h.directory.delete_user(gone)              # a real deletion, due to be deprovisioned
        faults = h.sb.pingone.faults
        faults.nth_only = USERS_LISTING
        faults.matched_count = 0
        faults.fail_nth = {2: "miscount"}          # page 2 says one user more than there are

        report = await h.cycle()
        assert report.snapshot_complete is False
        for target in TARGETS:
            assert removal_requests(h.emulator(target)) == [], target
        (logged,) = h.events("snapshot.incomplete")
        assert logged["problems"] == ["users listing: listing count changed while it was read (59, 60); "
                                      "59 item(s) arrived"]

        faults.fail_nth = {}
        report = await h.cycle()
        assert report.snapshot_complete is True
        for target in TARGETS:
            assert removal_requests(h.emulator(target)), target
            assert_converged(h.directory, h.emulator(target), target)
            found = h.emulator(target).user_by_username(gone_name)
            assert found is None or found.get("active") is False


async def test_a_shrunk_snapshot_is_accepted_only_by_name_and_each_target_then_approves_its_own_plan(
        tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        fast_source(h, page_size=PAGE_SIZE)
        assert not (await h.cycle()).failed
        config = str(h.config_path)
        nothing = await cli("approve", "--source-shrink", "-c", config)
        assert nothing.returncode != 0 and "no shrunk source snapshot" in nothing.stderr.decode()

        delete_users(0.5)(h)
        await h.cycle()
        assert h.events("snapshot.shrunk")
        # a target approval is not a shrink acceptance: nothing is held, so it is refused
        blind = await cli("approve", "--target", "zpa", "-c", config)
        assert blind.returncode != 0 and "nothing is held" in blind.stderr.decode()
        await h.cycle()
        assert h.events("snapshot.shrunk"), "still refused: nothing accepted it"
        status = (await cli("status", "-c", config)).stdout.decode()
        assert "SOURCE SHRUNK: the last snapshot had 30 users (last good 60)" in status

        accepted = await cli("approve", "--source-shrink", "-c", config)
        assert accepted.returncode == 0, accepted.stderr
        assert "at least 30 users (last good 60)" in accepted.stdout.decode()
        await h.cycle()
        assert not h.events("snapshot.shrunk")
        # the removals are now planned, and each target's max_deletes holds them
        for target in TARGETS:
            assert h.events("plan.removals_held", target=target), target
            assert removal_requests(h.emulator(target), members=False) == [], target
        approve = await cli("approve", "--target", "zpa", "-c", config)
        assert approve.returncode == 0, approve.stderr
        await h.cycle()
        assert removal_requests(h.emulator("zpa"), members=False), "zpa's approved plan is applied"
        assert h.events("plan.removals_held", target="zia"), "zia's is still held: approvals are per target"
        assert removal_requests(h.emulator("zia"), members=False) == []
        assert_converged(h.directory, h.emulator("zpa"), "zpa")
