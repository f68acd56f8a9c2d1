"""provisiond provisions into scim2-server, an independent SCIM 2.0 server, and the result reads back exactly.

The PingOne emulator runs in the test process on loopback; provisiond runs as the real CLI
(`python -m daemon once`) in a subprocess; two scim2-server processes are the targets, one per
remove action (`keep`: disable, `purge`: delete), both with the `generic` profile and its default
mapping. After every cycle each server is read back through its own paged listing (plain GETs of
/Users and /Groups with startIndex/count) and compared with the desired state, which this file
derives on its own from the directory (`Oracle`), not with provisiond's code. The new user of
the last step already exists in `keep` under another case: scim2-server answers 409 and
provisiond adopts and corrects it. Then the next cycle plans and sends nothing, even on a full sync.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.sandbox.directory import Directory, generate
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve
from tests.interop.conftest import SCIM2_TOKEN

DIRECTORY_USERS = 300          # "ZPA Users" gets 90 of them, "ZPA Contractors" (nested in it) 6
DIRECTORY_GROUPS = 6
DIRECTORY_SEED = 7
SCOPE_GROUP = "ZPA Users"
PUSHED_GROUPS = ("ZPA Users", "ZPA Contractors", "All Staff")
TARGET_PAGE_SIZE = 10          # provisiond's page size against the targets: its full sync pages too
READ_PAGE_SIZE = 7             # the test's own read-back pages (not a divisor of anything above)
REMOVE_ACTIONS = {"keep": "disable", "purge": "delete"}
CLI_TIMEOUT = 40.0
WORK = "work"
NEW_HIRE = "new.hire@example.com"

pytestmark = pytest.mark.timeout(100)


# -- the desired state, derived independently ----------------------------------------------------


def transitive_members(directory: Directory, group_id: str) -> set[str]:
    """Users in the group directly or through nested groups, at any depth."""
    users: set[str] = set()
    seen: set[str] = set()
    todo = [group_id]
    while todo:
        gid = todo.pop()
        if gid in seen:
            continue
        seen.add(gid)
        users |= directory.direct_member_ids(gid)
        todo.extend(directory.child_group_ids(gid))
    return users


def expected_user(user: dict[str, Any]) -> dict[str, Any]:
    """The `generic` profile's default mapping of one PingOne user, as the SCIM resource reads back."""
    name = user.get("name") or {}
    given = name.get("given") or None
    family = name.get("family") or None
    display = name.get("formatted") or " ".join(p for p in (given, family) if p) or user["username"]
    email = user.get("email") or None
    return {
        "userName": user["username"],
        "name": {k: v for k, v in (("givenName", given), ("familyName", family)) if v},
        "displayName": display,
        "externalId": user["id"],
        "emails": [(email, WORK, True)] if email else [],
        "active": user.get("enabled", True) is not False,
    }


@dataclass
class Oracle:
    """What one target must hold, cycle after cycle, given its remove action."""

    remove_action: str
    users: dict[str, dict[str, Any]] = field(default_factory=dict)   # PingOne id -> expected user

    def advance(self, directory: Directory, scope_id: str,
                pushed_ids: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], dict[str, frozenset[str]]]:
        """The state after one more cycle: (users by userName, group displayName -> member userNames)."""
        in_scope = transitive_members(directory, scope_id) & directory.users.keys()
        after: dict[str, dict[str, Any]] = {}
        for sid in in_scope:
            user = directory.users[sid]
            if sid in self.users or user.get("enabled", True) is not False:
                after[sid] = expected_user(user)     # a disabled user is never created, only disabled
        if self.remove_action == "disable":
            for sid, before in self.users.items():
                if sid not in in_scope:
                    after[sid] = {**before, "active": False}   # left scope or deleted: kept, inactive
        self.users = after
        groups = {
            directory.groups[gid]["name"]: frozenset(
                after[sid]["userName"] for sid in transitive_members(directory, gid) & in_scope if sid in after)
            for gid in pushed_ids
        }
        return {u["userName"]: u for u in after.values()}, groups


# -- scim2-server read back through its own listing ---------------------------------------------


@dataclass(frozen=True)
class TargetState:
    users: dict[str, dict[str, Any]]           # userName -> normalised user
    groups: dict[str, frozenset[str]]          # displayName -> member userNames ("?id" if unknown)
    user_ids: dict[str, str]                   # userName -> SCIM id
    group_ids: dict[str, str]                  # displayName -> SCIM id
    versions: dict[str, Any]                   # SCIM id -> meta (version, lastModified)


async def list_all(session: aiohttp.ClientSession, base_url: str, resource: str) -> list[dict[str, Any]]:
    """Every resource of a collection, page by page with startIndex/count, checked for consistency."""
    found: list[dict[str, Any]] = []
    start = 1
    total: int | None = None
    while True:
        async with session.get(f"{base_url}/{resource}", params={"startIndex": str(start),
                                                                 "count": str(READ_PAGE_SIZE)},
                               headers={"Authorization": f"Bearer {SCIM2_TOKEN}"}) as resp:
            assert resp.status == 200, f"GET {resource}: {resp.status} {await resp.text()}"
            body = await resp.json(content_type=None)
        page = body.get("Resources") or []
        assert total is None or body["totalResults"] == total, "totalResults changed between pages"
        total = body["totalResults"]
        assert len(page) <= READ_PAGE_SIZE
        found.extend(page)
        if not page or len(found) >= total:
            break
        start += len(page)
    assert len(found) == total, f"{resource}: listed {len(found)} of totalResults {total}"
    assert len({r["id"] for r in found}) == len(found), f"{resource}: an id is listed twice"
    return found


def normalise_user(resource: dict[str, Any]) -> dict[str, Any]:
    emails = resource.get("emails") or []
    return {
        "userName": resource["userName"],
        "name": {k: v for k, v in (resource.get("name") or {}).items() if v is not None},
        "displayName": resource.get("displayName"),
        "externalId": resource.get("externalId"),
        "emails": sorted((e.get("value"), e.get("type"), e.get("primary", False)) for e in emails),
        "active": resource.get("active", True),
    }


async def read_target(session: aiohttp.ClientSession, base_url: str) -> TargetState:
    users = await list_all(session, base_url, "Users")
    groups = await list_all(session, base_url, "Groups")
    by_id = {u["id"]: u["userName"] for u in users}
    user_names = [u["userName"] for u in users]
    assert len(set(user_names)) == len(user_names), "a userName is held twice"
    group_names = [g["displayName"] for g in groups]
    assert len(set(group_names)) == len(group_names), "a group displayName is held twice"
    return TargetState(
        users={u["userName"]: normalise_user(u) for u in users},
        groups={g["displayName"]: frozenset(by_id.get(m["value"], f"?{m['value']}") for m in g.get("members") or [])
                for g in groups},
        user_ids={u["userName"]: u["id"] for u in users},
        group_ids={g["displayName"]: g["id"] for g in groups},
        versions={r["id"]: (r["meta"].get("version"), r["meta"].get("lastModified")) for r in (*users, *groups)},
    )


# -- provisiond, the real CLI --------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def explain(self) -> str:
        notable = [e for e in self.events() if e.get("outcome") == "failed" or e.get("level") in ("warning", "error")]
        return f"exit {self.code}\nnotable events: {json.dumps(notable, indent=1)[:6000]}\nstderr: {self.stderr[-3000:]}"


async def provisiond(*args: str, config: Path) -> CliRun:
    env = {k: v for k, v in os.environ.items() if k != "PROVISIOND_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env=env, cwd=config.parent)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode())


def config_text(*, state: Path, pingone_url: str, env_id: str, targets: dict[str, str],
                full_sync_every: str) -> str:
    """A provisiond config: one `generic` target per scim2-server, default mapping, literal token."""
    groups = ", ".join(json.dumps(g) for g in PUSHED_GROUPS)
    text = f'''[daemon]
state_path = "{state}"
interval = "30s"
full_sync_every = "{full_sync_every}"
log_format = "json"
log_level = "info"
max_source_shrink = "50%"

[source]
api_url = "{pingone_url}/v1"
auth_url = "{pingone_url}"
environment_id = "{env_id}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = "{DEFAULT_CLIENT_SECRET}"
client_auth = "basic"
page_size = 100
'''
    for name, url in targets.items():
        text += f'''
[[target]]
name = "{name}"
profile = "generic"
base_url = "{url}"
auth = "bearer"
token = "{SCIM2_TOKEN}"
page_size = {TARGET_PAGE_SIZE}
concurrency = 8
requests_per_second = 200
remove_action = "{REMOVE_ACTIONS[name]}"
max_deletes = 1000
groups = [{groups}]
membership = "transitive"
scope = {{ groups = ["{SCOPE_GROUP}"] }}
'''
    return text


# -- the scenario --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cast:
    """The users each step acts on, picked from the generated directory (all in scope, enabled)."""

    renamed: str        # family name and email change
    unmailed: str       # email removed in PingOne
    disabled: str       # enabled -> disabled
    late: str           # disabled before the first cycle, enabled later: created then
    leaver: str         # removed from the scope group (also in "All Staff")
    deleted: str        # deleted in PingOne
    unlisted: str       # removed from "All Staff", stays in scope

    @classmethod
    def pick(cls, directory: Directory) -> Cast:
        zpa = directory.group_by_name(SCOPE_GROUP)["id"]
        contractors = transitive_members(directory, directory.group_by_name("ZPA Contractors")["id"])
        staff = directory.direct_member_ids(directory.group_by_name("All Staff")["id"])
        plain = sorted((uid for uid in directory.direct_member_ids(zpa)
                        if uid not in contractors and directory.users[uid].get("enabled", True)
                        and directory.users[uid].get("email")),
                       key=lambda uid: directory.users[uid]["username"])
        in_staff = [uid for uid in plain if uid in staff]
        others = [uid for uid in plain if uid not in in_staff[:2]]
        assert len(in_staff) >= 2 and len(others) >= 5, "the generated directory is too small for the cast"
        return cls(renamed=others[0], unmailed=others[1], disabled=others[2], late=others[3], deleted=others[4],
                   leaver=in_staff[0], unlisted=in_staff[1])


Step = Callable[[], Awaitable[None]]


def steps(d: Directory, cast: Cast, new_hire: list[str], squat: Step) -> Iterator[tuple[str, Step]]:
    """The directory changes, in order, each followed by one cycle."""
    zpa = d.group_by_name(SCOPE_GROUP)["id"]
    contractors = d.group_by_name("ZPA Contractors")["id"]
    staff = d.group_by_name("All Staff")["id"]

    async def attribute_change() -> None:
        user = d.users[cast.renamed]
        d.update_user(cast.renamed, name={"family": "Interop-Renamed"}, email=f"renamed.{user['email']}")
        d.update_user(cast.unmailed, email=None)

    async def disable() -> None:
        d.set_enabled(cast.disabled, False)
        d.set_enabled(cast.late, True)

    async def leave_scope() -> None:
        d.remove_member(zpa, cast.leaver)

    async def delete() -> None:
        d.delete_user(cast.deleted)

    async def rename() -> None:
        d.rename_group(contractors, "ZPA External Contractors")

    async def remove_member() -> None:
        d.remove_member(staff, cast.unlisted)

    async def hire() -> None:
        await squat()    # the same userName, other case, already in one target: 409, then adoption
        user = d.add_user(NEW_HIRE, email=NEW_HIRE, given="New", family="Hire")
        d.add_member(contractors, user["id"])      # in scope through the nested group only
        new_hire.append(user["id"])

    yield "attribute change", attribute_change
    yield "disable (and a late enable)", disable
    yield "leaving scope", leave_scope
    yield "deletion in PingOne", delete
    yield "group rename", rename
    yield "member removal", remove_member
    yield "new user", hire


async def create_squatter(session: aiohttp.ClientSession, base_url: str) -> str:
    """POST a stale, inactive user whose userName differs from NEW_HIRE only in case; its id."""
    body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": NEW_HIRE.upper(),
            "displayName": "Stale Copy", "active": False,
            "emails": [{"value": "stale@example.org", "type": "home"}]}
    async with session.post(f"{base_url}/Users", json=body,
                            headers={"Authorization": f"Bearer {SCIM2_TOKEN}"}) as resp:
        assert resp.status == 201, await resp.text()
        created = await resp.json(content_type=None)
    return str(created["id"])


async def test_cli_provisions_into_scim2_server_and_reads_back_exactly_cycle_by_cycle(
        tmp_path: Path, scim2_servers: Callable[[], str]) -> None:
    directory = generate(DIRECTORY_USERS, DIRECTORY_GROUPS, seed=DIRECTORY_SEED)
    cast = Cast.pick(directory)
    directory.set_enabled(cast.late, False)
    scope_id = directory.group_by_name(SCOPE_GROUP)["id"]
    pushed_ids = tuple(directory.group_by_name(g)["id"] for g in PUSHED_GROUPS)
    targets = {name: scim2_servers() for name in REMOVE_ACTIONS}
    oracles = {name: Oracle(action) for name, action in REMOVE_ACTIONS.items()}
    group_ids: dict[str, dict[str, str]] = {name: {} for name in targets}    # PingOne group id -> SCIM id
    config = tmp_path / "provisiond.toml"
    state = tmp_path / "state.db"
    new_hire: list[str] = []
    timings: list[tuple[str, float]] = []

    async with serve(PingOneEmulator(directory).app()) as pingone_url, aiohttp.ClientSession() as session:
        def write_config(full_sync_every: str) -> None:
            config.write_text(config_text(state=state, pingone_url=pingone_url, env_id=directory.env_id,
                                          targets=targets, full_sync_every=full_sync_every), encoding="utf-8")
            config.chmod(0o600)

        async def cycle_and_compare(label: str) -> dict[str, TargetState]:
            began = time.monotonic()
            run = await provisiond("once", config=config)
            timings.append((label, time.monotonic() - began))
            assert run.code == 0, f"{label}: provisiond once failed\n{run.explain()}"
            seen: dict[str, TargetState] = {}
            for name, url in targets.items():
                want_users, want_groups = oracles[name].advance(directory, scope_id, pushed_ids)
                got = await read_target(session, url)
                assert got.users == want_users, f"{label}: users of {name} differ\n{run.explain()}"
                assert got.groups == want_groups, f"{label}: groups of {name} differ\n{run.explain()}"
                for gid in pushed_ids:   # a group is followed by id: a rename keeps the SCIM group
                    scim_id = got.group_ids[directory.groups[gid]["name"]]
                    assert group_ids[name].setdefault(gid, scim_id) == scim_id, f"{label}: group re-created"
                seen[name] = got
            return seen

        write_config(full_sync_every="1h")
        first = await cycle_and_compare("initial provisioning")
        assert len(first["keep"].users) > 80 and len(first["keep"].groups) == len(PUSHED_GROUPS)
        assert cast.late not in oracles["keep"].users, "a disabled user was created"

        squatter: list[str] = []

        async def squat() -> None:
            squatter.append(await create_squatter(session, targets["keep"]))

        for label, change in steps(directory, cast, new_hire, squat):
            await change()
            seen = await cycle_and_compare(label)
        assert seen["keep"].user_ids[NEW_HIRE] == squatter[0], "the existing user was not adopted"

        keep, purge = oracles["keep"].users, oracles["purge"].users
        assert keep[cast.leaver]["active"] is False and cast.leaver not in purge
        assert keep[cast.deleted]["active"] is False and cast.deleted not in purge
        assert keep[cast.disabled]["active"] is False and purge[cast.disabled]["active"] is False
        assert new_hire and new_hire[0] in keep and new_hire[0] in purge and cast.late in purge

        # The cycle after the last plans nothing ...
        plan = await provisiond("plan", "--json", config=config)
        assert plan.code == 0, plan.explain()
        planned = json.loads(plan.stdout)
        pending = {name: [op for op in p["operations"] if op["status"] == "pending"] for name, p in planned.items()}
        assert pending == {"keep": [], "purge": []}

        # ... and sends nothing, even when it re-reads both targets whole (full sync).
        before = {name: await read_target(session, url) for name, url in targets.items()}
        write_config(full_sync_every="1s")
        await asyncio.sleep(1.1)
        last = await provisiond("once", config=config)
        assert last.code == 0, last.explain()
        after = {name: await read_target(session, url) for name, url in targets.items()}
        assert after == before, "the last cycle changed a target"
        finished = {e["target"]: e for e in last.events() if e.get("event") == "cycle.finished"}
        assert {name: (e["applied"], e["failed"], e["full_sync"]) for name, e in finished.items()} == {
            "keep": (0, 0, True), "purge": (0, 0, True)}, last.explain()
        status = await provisiond("status", "--json", config=config)
        assert status.code == 0, status.explain()
        in_scope = transitive_members(directory, scope_id) & directory.users.keys()
        for target in json.loads(status.stdout)["targets"]:
            never_created = in_scope - oracles[target["target"]].users.keys()   # disabled before provisioning
            assert target["outcome"] == "success"
            assert target["summary"]["operations"] == {}, target["summary"]["operations"]
            assert target["summary"]["users"] == {
                "impacted": len(in_scope), "success": len(in_scope) - len(never_created),
                "unsynced": len(never_created), "partial": 0, "failed": 0, "skipped": 0}
            assert target["summary"]["groups"]["success"] == len(PUSHED_GROUPS)

    print("cycle timings: " + ", ".join(f"{label} {s:.2f}s" for label, s in timings))


async def test_fixture_server_requires_the_bearer_token_and_takes_concurrent_connections(
        scim2_server: str) -> None:
    auth = {"Authorization": f"Bearer {SCIM2_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{scim2_server}/ServiceProviderConfig", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json(content_type=None))["patch"]["supported"] is True
        async with session.get(f"{scim2_server}/Users") as resp:
            assert resp.status == 401

        async def get() -> int:
            async with session.get(f"{scim2_server}/Users", headers=auth) as resp:
                return resp.status

        began = time.monotonic()
        statuses = await asyncio.wait_for(asyncio.gather(*(get() for _ in range(64))), timeout=10)
        took = time.monotonic() - began
    assert statuses == [200] * 64
    print(f"64 concurrent GET /Users: {took * 1000:.0f} ms")
