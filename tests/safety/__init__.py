"""Issue 5 acceptance: the harness shared by the safety tests.

The emulators run in the test process on loopback; the Engine runs in-process against them (or
`python -m daemon` as a subprocess), with a real SQLite file. What a target should hold is computed
here from the emulator's Directory, independently of provisiond's mapping code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from daemon.backoff import RetryPolicy
from daemon.sandbox.directory import Directory
from daemon.sandbox.runner import Sandbox
from daemon.sandbox.scim import ScimEmulator
from daemon.source.pingone import PingOneClient

# re-exported for the safety tests
from tests.harness import FAST_RPS as FAST_RPS
from tests.harness import TARGETS as TARGETS
from tests.harness import Harness as Harness
from tests.harness import harness as harness

REPO = Path(__file__).resolve().parents[2]


# -- what a target should hold -------------------------------------------------------------------

def valid_username(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    local, at, domain = name.partition("@")
    return bool(local and at and "." in domain)


def expected_users(d: Directory, scope_group: str) -> dict[str, bool]:
    """lower userName -> active, for every in-scope user with an email userName (transitive)."""
    gid = d.group_by_name(scope_group)["id"]
    out: dict[str, bool] = {}
    for uid in d.transitive_member_ids(gid):
        user = d.users[uid]
        if valid_username(user.get("username")):
            out[user["username"].lower()] = user.get("enabled", True) is not False
    return out


def target_users(em: ScimEmulator) -> dict[str, dict[str, Any]]:
    """lower userName -> resource; a userName held twice fails here."""
    out: dict[str, dict[str, Any]] = {}
    for res in em.users.values():
        key = str(res["userName"]).lower()
        assert key not in out, f"duplicate userName {res['userName']} in {em.profile.name}"
        out[key] = res
    return out


def scope_group_of(target: str) -> str:
    return "ZPA Users" if target == "zpa" else "ZIA Users"


def pushed_groups_of(target: str) -> tuple[str, ...]:
    return ("ZPA Users", "ZPA Contractors") if target == "zpa" else ("ZIA Users",)


def assert_converged(d: Directory, em: ScimEmulator, target: str, *, extra_ok: Iterable[str] = ()) -> None:
    """Every desired user present with the right `active` (ZPA: a disabled user is absent), no
    duplicates, every pushed group present once with exactly its in-scope provisioned members."""
    want = expected_users(d, scope_group_of(target))
    have = target_users(em)
    for name, active in want.items():
        if active:
            assert name in have, f"{target}: {name} missing"
            assert _is_active(have[name]), f"{target}: {name} inactive"
        elif name in have:
            assert not _is_active(have[name]), f"{target}: {name} should be inactive"
    extra = set(have) - set(want) - {n.lower() for n in extra_ok}
    for name in extra:
        assert not _is_active(have[name]), f"{target}: {name} is not in scope yet active"
    by_id = {res["id"]: key for key, res in have.items()}
    names = [g["displayName"] for g in em.groups.values()]
    assert len(names) == len(set(names)), f"{target}: duplicate groups {names}"
    for gname in pushed_groups_of(target):
        group = em.group_by_name(gname)
        assert group is not None, f"{target}: group {gname} missing"
        gid = d.group_by_name(gname)["id"]
        members = {d.users[u]["username"].lower() for u in d.transitive_member_ids(gid)}
        expected = {n for n in members if want.get(n) and n in have}
        got = [by_id.get(m["value"]) for m in group.get("members", [])]
        assert len(got) == len(set(got)), f"{target}: duplicate members in {gname}"
        assert set(got) == expected, f"{target}: members of {gname}: {set(got) ^ expected}"


def _is_active(res: dict[str, Any]) -> bool:
    value = res.get("active", True)
    return value is True or value == "true"


# -- removal requests, from the emulator's request log --------------------------------------------

def _sets_inactive(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if body.get("active") in (False, "false"):
        return True
    for op in body.get("Operations") or ():
        if not isinstance(op, dict):
            continue
        path = str(op.get("path") or "").lower()
        value = op.get("value")
        if path == "active" and value in (False, "false"):
            return True
        if not path and isinstance(value, dict) and value.get("active") in (False, "false"):
            return True
    return False


def removal_requests(em: ScimEmulator, *, members: bool = True) -> list[dict[str, Any]]:
    """DELETEs, user writes that set active=false, and (`members`) group PATCHes removing members."""
    out: list[dict[str, Any]] = []
    for req in em.request_log:
        method, path, body = req["method"], req["path"], req.get("body")
        if method == "DELETE":
            out.append(req)
        elif "/Users/" in path and method in ("PATCH", "PUT") and _sets_inactive(body):
            out.append(req)
        elif members and "/Groups/" in path and method == "PATCH" and isinstance(body, dict) and any(
                isinstance(op, dict) and str(op.get("op", "")).lower() == "remove"
                for op in body.get("Operations") or ()):
            out.append(req)
    return out


# -- the command line as a subprocess --------------------------------------------------------------

def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND")}
    env["PYTHONPATH"] = str(REPO)
    env["NO_PROXY"] = "*"
    return env


async def cli(*args: str, limit: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """`python -m daemon ARGS`, bounded by `limit` seconds; stdout and stderr captured."""
    with anyio.fail_after(limit):
        return await anyio.run_process([sys.executable, "-m", "daemon", *args], check=False, env=cli_env())


# -- faster retries (the defaults back off for seconds) ---------------------------------------------

FAST_POLICY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05, max_elapsed=5.0)


def fast_source(h: Harness, *, page_size: int | None = None, policy: RetryPolicy = FAST_POLICY) -> None:
    """Replace the engine's PingOne client by one that retries quickly (and pages as asked)."""
    src = h.config.source
    h.engine.source = PingOneClient(
        h.engine.session, api_url=src.api_url, auth_url=src.auth_url, environment_id=src.environment_id,
        client_id=src.client_id, client_secret=src.client_secret.reveal(), client_auth=src.client_auth,
        page_size=page_size or src.page_size, timeout=src.timeout, policy=policy)


def fast_targets(h: Harness, policy: RetryPolicy = FAST_POLICY) -> None:
    for rt in h.engine.runtimes.values():
        rt.client.policy = policy


# -- the crash loop (tests/safety/test_crash.py, bench/soak_crash.py) --------------------------------

@dataclass
class CrashStats:
    kills: int = 0
    finished_before_kill: int = 0
    run_seconds: list[float] = field(default_factory=list)
    kill_points: list[float] = field(default_factory=list)
    max_users: dict[str, int] = field(default_factory=dict)


def change_directory(d: Directory, step: int) -> None:
    """Give the next run something to do: a new hire in each scope group, an edit, a departure."""
    for group in ("ZPA Users", "ZIA Users"):
        user = d.add_user(f"hire{step}.{group.split()[0].lower()}@example.com",
                          email=f"hire{step}.{group.split()[0].lower()}@example.com", given="Hire", family=str(step))
        d.add_member(d.group_by_name(group)["id"], user["id"])
    members = sorted(d.direct_member_ids(d.group_by_name("ZPA Users")["id"]))
    if members:
        d.update_user(members[step % len(members)], department=f"Dept {step}")


def assert_no_duplicates(sb: Sandbox) -> None:
    for em in (sb.zpa, sb.zia):
        target_users(em)
        names = [str(g["displayName"]).lower() for g in em.groups.values()]
        assert len(names) == len(set(names)), f"duplicate group in {em.profile.name}: {sorted(names)}"


async def crash_loop(sb: Sandbox, config_path: Path, *, kills: int, rng: Any, earliest: float,
                     latest: float, on_kill: Callable[[int], None] | None = None) -> CrashStats:
    """Start `python -m daemon once` and SIGKILL it at a random point until it was killed `kills`
    times (a run that finishes first does not count; at most 2 x kills runs); after each run no
    userName (or group) may exist twice in either target."""
    stats = CrashStats()
    for step in range(2 * kills):
        if stats.kills >= kills:
            break
        change_directory(sb.directory, step)
        point = rng.uniform(earliest, latest)
        started = time.monotonic()
        process = await anyio.open_process(
            [sys.executable, "-m", "daemon", "once", "-c", str(config_path)], env=cli_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        async with process:
            with anyio.move_on_after(point):
                await process.wait()
            if process.returncode is None:
                process.kill()
                stats.kills += 1
                stats.kill_points.append(point)
            else:
                stats.finished_before_kill += 1
            with anyio.fail_after(10):
                await process.wait()
        stats.run_seconds.append(time.monotonic() - started)
        assert_no_duplicates(sb)
        for em in (sb.zpa, sb.zia):
            stats.max_users[em.profile.name] = max(stats.max_users.get(em.profile.name, 0), len(em.users))
        if on_kill is not None:
            on_kill(step)
    return stats
