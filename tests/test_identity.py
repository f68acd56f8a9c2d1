"""Issue 13: one target account per person, whatever the order of events.

Each test drives the emulators (daemon/sandbox/) through the Engine or the real CLI and reads the
targets back over SCIM HTTP (paged GET /Users and /Groups with the target's bearer token), not
from provisiond's own state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.links import PHASE_USERS, Op
from daemon.mapping import username_key
from daemon.sandbox.runner import Sandbox
from tests.harness import Harness, harness

pytestmark = pytest.mark.timeout(90)

READ_PAGE = 50


# -- reading a target over SCIM HTTP -----------------------------------------------------------


async def scim_list(h: Harness, target: str, collection: str) -> list[dict[str, Any]]:
    """Every resource of /Users or /Groups, paged, as the target answers over HTTP."""
    cfg = h.config.target(target)
    assert cfg.token is not None
    headers = {"Authorization": f"Bearer {cfg.token.reveal()}"}
    out: list[dict[str, Any]] = []
    start = 1
    async with aiohttp.ClientSession() as session:
        while True:
            params = {"startIndex": str(start), "count": str(READ_PAGE)}
            async with session.get(f"{cfg.base_url.rstrip('/')}/{collection}", params=params,
                                   headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                body = json.loads(await resp.read())
            page = body.get("Resources") or []
            out.extend(page)
            if not page or start + len(page) - 1 >= int(body.get("totalResults", 0)):
                return out
            start += len(page)


async def scim_get(h: Harness, target: str, path: str) -> dict[str, Any]:
    cfg = h.config.target(target)
    assert cfg.token is not None
    async with aiohttp.ClientSession() as session, session.get(
            f"{cfg.base_url.rstrip('/')}{path}", headers={"Authorization": f"Bearer {cfg.token.reveal()}"}) as resp:
        assert resp.status == 200, await resp.text()
        loaded: dict[str, Any] = json.loads(await resp.read())
        return loaded


def active(res: dict[str, Any]) -> bool:
    return res.get("active", True) in (True, "true")


async def accounts(h: Harness, target: str, user_name: str) -> list[dict[str, Any]]:
    """The target's users whose userName is `user_name` as the target compares (lowercased)."""
    return [u for u in await scim_list(h, target, "Users") if str(u["userName"]).lower() == user_name.lower()]


def writes(h: Harness, target: str) -> list[dict[str, Any]]:
    return [r for r in h.emulator(target).request_log if r["method"] not in ("GET", "HEAD")]


# -- item 7: userName keys compare by lowercasing ------------------------------------------------

LOOKALIKES = (
    ("strasse@example.com", "straße@example.com"),        # casefold: "ß" -> "ss"
    ("sam@example.com", "\u017fam@example.com"),           # casefold: long s -> "s"
    ("ilker@example.com", "\u0130lker@example.com"),       # dotted capital I lowercases to "i̇"
)


def test_username_keys_lowercase_as_scim_servers_do() -> None:
    for a, b in LOOKALIKES:
        assert username_key(a) != username_key(b), (a, b)
        assert a.lower() != b.lower()            # the emulator's (and servers') uniqueness rule agrees
    assert username_key("Straße@Example.com") == username_key("straße@example.com")
    # The Kelvin sign is "K" after NFC (a canonical singleton): the same userName at any server.
    assert username_key("\u212aate@example.com") == username_key("kate@example.com") == "kate@example.com"
    assert username_key("\u0130lker@x.io") == "i\u0307lker@x.io"


def _lookalikes(sb: Sandbox) -> None:
    d = sb.directory
    gid = d.group_by_name("ZPA Users")["id"]
    for pair in LOOKALIKES:
        for name in pair:
            user = d.add_user(name, email=name, given="Look", family="Alike")
            d.add_member(gid, user["id"])


async def test_lookalike_usernames_stay_two_people(tmp_path: Path) -> None:
    """Item 7: "strasse" and "straße", "sam" and the long-s "sam", "ilker" and "İlker" are two people to the
    target (it lowercases): each gets its own account, neither is skipped as a conflict, and a
    full sync re-reading the target adopts nothing across them."""
    async with harness(tmp_path, prepare=_lookalikes, daemon={"full_sync_every": 1e-6}) as h:
        assert not (await h.cycle()).failed
        assert not [e for e in h.events("user.skipped") if e.get("reason") == "conflict"]
        users = await scim_list(h, "zpa", "Users")
        by_name = {u["userName"]: u for u in users}
        assert len(by_name) == len(users)
        for pair in LOOKALIKES:
            ids = {by_name[name]["id"] for name in pair}
            assert len(ids) == 2 and all(active(by_name[n]) for n in pair), pair
        # the next cycle is a full sync: nothing is adopted across a pair, nothing is written
        assert not (await h.cycle()).failed
        assert h.target_report("zpa").full_sync
        assert writes(h, "zpa") == []
        assert not h.events("user.adopted")


# -- item 6: a lookup takes only the object named as asked -------------------------------------


def _straße_and_a_squatter(sb: Sandbox) -> None:
    sb.zpa.put_user({"userName": "strasse@example.com", "displayName": "Someone Else", "active": True})
    d = sb.directory
    user = d.add_user("straße@example.com", email="straße@example.com", given="Anna", family="Straße")
    d.add_member(d.group_by_name("ZPA Users")["id"], user["id"])


async def test_crash_recovery_never_takes_a_lone_lookalike(tmp_path: Path) -> None:
    """Item 6: a create of "straße" was in flight when the daemon died. Recovery looks it up; the
    emulator's filter folds like casefold and answers with "strasse", someone else's account: it is
    not taken. The user is created, and "strasse" is never written to."""
    async with harness(tmp_path, prepare=_straße_and_a_squatter) as h:
        uid = h.directory.user_by_username("straße@example.com")["id"]
        other = next(u for u in await scim_list(h, "zpa", "Users") if u["userName"] == "strasse@example.com")
        cycle_id = await h.store.start_cycle("zpa", full_sync=False)
        await h.store.save_plan(cycle_id, "zpa", [Op(1, PHASE_USERS, "user", "create", uid, None,
                                                     "straße@example.com", "new_in_scope",
                                                     {"attrs": {"userName": "straße@example.com"}})])
        await h.store.mark_in_flight(cycle_id, [1])

        assert not (await h.cycle()).failed
        assert not h.events("user.recovered", target="zpa")
        mine = await accounts(h, "zpa", "straße@example.com")
        assert len(mine) == 1 and mine[0]["id"] != other["id"] and active(mine[0])
        assert await scim_get(h, "zpa", f"/Users/{other['id']}") == other
        assert not [r for r in writes(h, "zpa") if other["id"] in r["path"]]
        (created,) = h.events("user.created", target="zpa", source_id=uid)
        assert created["target_id"] == mine[0]["id"]
