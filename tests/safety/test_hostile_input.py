"""Hostile input from either side fails or skips that entity with a clear reason; the cycle goes on."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.sandbox.runner import Sandbox
from tests.safety import TARGETS, Harness, assert_converged, fast_targets, harness, removal_requests

pytestmark = pytest.mark.timeout(60)

HUGE = "x" * (64 * 1024 + 1)


def person(h: Harness | Sandbox, local: str, **extra: Any) -> str:
    d = h.directory
    user = d.add_user(f"{local}@example.com", email=f"{local}@example.com", given=local.title(),
                      family="Tester", **extra)
    d.add_member(d.group_by_name("ZPA Users")["id"], user["id"])
    return str(user["id"])


def skipped(h: Harness, reason: str) -> dict[str, str]:
    return {e["source_id"]: e.get("detail", "") for e in h.events("user.skipped", target="zpa", reason=reason)}


async def test_odd_users_from_pingone_are_skipped_or_dropped_with_a_reason_and_the_others_provisioned(
        tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        assert not (await h.cycle()).failed
        d = h.directory
        fine = person(h, "fine.person")
        wrong_type = person(h, "wrong.type")
        d.users[wrong_type]["username"] = 12345                  # a number where a string belongs
        huge = person(h, "huge.name")
        d.users[huge]["name"] = {"given": HUGE, "family": "Tester"}
        odd_name = person(h, "odd.name")
        d.users[odd_name]["name"] = "a string, not an object"    # mapped paths just come out empty
        no_id = person(h, "no.id")
        del d.users[no_id]["id"]
        not_object = person(h, "not.object")
        for uid in (wrong_type, huge, odd_name, no_id):
            d._changed(uid)
        render = h.sb.pingone._user_bytes

        def hostile_render(base: str, user_id: str) -> bytes:
            return b'"not an object"' if user_id == not_object else render(base, user_id)

        h.sb.pingone._user_bytes = hostile_render  # type: ignore[method-assign]

        report = await h.cycle()

        zpa = h.emulator("zpa")
        assert zpa.user_by_username("fine.person@example.com") is not None
        assert zpa.user_by_username("odd.name@example.com") is not None
        assert zpa.user_by_username("huge.name@example.com") is None
        assert wrong_type in skipped(h, "missing_username")
        assert "65537 characters" in skipped(h, "value_too_long")[huge]
        (incomplete,) = h.events("snapshot.incomplete")
        problems = " | ".join(incomplete["problems"])
        assert "no id" in problems and "JSON str, not an object" in problems
        assert report.snapshot_complete is False
        for target in TARGETS:
            assert removal_requests(h.emulator(target)) == [], target
        assert fine not in skipped(h, "missing_username")


async def test_two_pingone_users_mapping_to_one_username_are_both_conflict_and_neither_is_written(
        tmp_path: Path) -> None:
    composed = unicodedata.normalize("NFC", "rené.dupont")
    decomposed = unicodedata.normalize("NFD", "rené.dupont")
    assert composed != decomposed

    def prepare(sb: Sandbox) -> None:
        person(sb, composed)
        person(sb, decomposed)

    async with harness(tmp_path, prepare=prepare) as h:
        await h.cycle()
        conflicts = h.events("user.skipped", target="zpa", reason="conflict")
        assert len(conflicts) == 2
        assert all("is also mapped from" in e["detail"] for e in conflicts)
        zpa = h.emulator("zpa")
        assert zpa.user_by_username(f"{composed}@example.com") is None
        assert not any("dupont" in str(r.get("body")) for r in zpa.request_log if r["method"] != "GET")


async def test_a_decomposed_accent_is_the_same_user_as_a_composed_one_and_causes_no_update_loop(
        tmp_path: Path) -> None:
    def prepare(sb: Sandbox) -> None:
        person(sb, "jose.garcia")
        uid = sb.directory.user_by_username("jose.garcia@example.com")["id"]
        sb.directory.users[uid]["name"] = {"given": unicodedata.normalize("NFD", "José"), "family": "García"}

    async with harness(tmp_path, prepare=prepare) as h:
        assert not (await h.cycle()).failed
        res = h.emulator("zpa").user_by_username("jose.garcia@example.com")
        assert res is not None and res["name"]["givenName"] == unicodedata.normalize("NFC", "José")
        # the target now holds the composed form; PingOne keeps the decomposed one
        for _ in range(2):
            await h.cycle()
            assert h.emulator("zpa").writes() == 0
            assert not h.events("user.updated")


def target_side(kind: str) -> Callable[[Harness], None]:
    def go(h: Harness) -> None:
        em = h.emulator("zpa")
        victim = next(r for r in em.users.values() if r["userName"] != "")
        if kind == "odd_shapes":
            victim["name"] = "not an object"
            victim["emails"] = "not a list"
            victim["displayName"] = HUGE
        elif kind == "numeric_username":
            victim["userName"] = 4242
            em._user_index = {str(r["userName"]).lower(): rid for rid, r in em.users.items()}
        elif kind == "numeric_id":
            stray = dict(victim, id=777, userName="stray@example.com")
            em.users["stray"] = stray
            em._order.clear()
    return go


@pytest.mark.parametrize("kind", ["odd_shapes", "numeric_username", "numeric_id"])
async def test_odd_resources_in_the_target_do_not_stop_a_full_sync(tmp_path: Path, kind: str) -> None:
    async with harness(tmp_path) as h:
        assert not (await h.cycle()).failed
        target_side(kind)(h)
        h.retarget("zpa", full_sync_every=0.001)
        fast_targets(h)
        person(h, "after.oddity")
        await h.cycle()
        assert h.target_report("zpa").outcome in ("success", "partial_failure"), h.target_report("zpa")
        assert h.emulator("zpa").user_by_username("after.oddity@example.com") is not None
        assert removal_requests(h.emulator("zpa"), members=False) == []


@pytest.mark.parametrize("kind", ["malformed", "truncated"])
async def test_a_malformed_answer_to_a_create_fails_that_user_only_and_the_next_cycle_adopts_no_duplicate(
        tmp_path: Path, kind: str) -> None:
    async with harness(tmp_path) as h:
        assert not (await h.cycle()).failed
        fast_targets(h)
        for i in range(5):
            person(h, f"batch.{i}")
        zpa = h.emulator("zpa")
        zpa.faults.request_count = 0
        zpa.faults.fail_nth = {1: kind, 2: kind, 3: kind}      # the first creates get a broken body
        await h.cycle()
        failed = h.events("user.create_failed", target="zpa")
        assert failed, "the broken answer is a failure of that user"
        assert all(e["reason"] and e.get("error") for e in failed)
        assert h.events("cycle.finished", target="zpa")
        zpa.faults.fail_nth = {}
        await h.cycle()
        await h.cycle()
        assert_converged(h.directory, zpa, "zpa")
