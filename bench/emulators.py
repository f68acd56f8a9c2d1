"""The emulators in child processes, for the benchmarks: their CPU is not counted as provisiond's.

    python bench/emulators.py pingone --users 100000 --groups 1000 [--seed 1] [--latency-ms 0]
    python bench/emulators.py scim --profile generic [--latency-ms 20] [--latency-mode deadline] [--rps 5] [--burst 5]

Each prints ONE JSON line on stdout once it listens on 127.0.0.1 (`url`, plus for PingOne the
`env_id`, the ids of named groups and the generation time), then serves until SIGTERM/SIGINT.
From Python, `start_pingone(...)` / `start_scim(...)` return an `EmulatorProcess` (a context
manager: leaving it terminates the child).

Besides the emulators' own `/_admin` routes, the launcher adds two bench-only routes (no auth,
never faulted, not counted):

- PingOne `POST /_admin/bench/group` `{"name": N, "members": K}`: a new group holding the first K
  enabled users in insertion order (one call instead of K member additions);
- PingOne `POST /_admin/bench/mutate` `{"count": K}`: K enabled users spread evenly over the
  directory are changed: every 5th disabled, the others get a new family name (one mapped
  attribute change). Disabled users are never created in a target, hence "enabled";
- PingOne `POST /_admin/bench/change` `{"kind": K}`: one change of kind K (`CHANGE_KINDS`: disable,
  attribute, group_add, group_remove, delete, new_hire) made through `Directory`'s public methods
  (so it is recorded in the audit log like any change), on a user no earlier change touched, chosen
  by a seeded generator; answers when it was made (`at`, the emulator's clock) and what the target
  must show once it has arrived (`expect`, for the SCIM route below);
- SCIM `POST /_admin/bench/check` `{"checks": [{"id": I, "userName": U, ...}]}`: which of the
  expectations the target's state meets now (`holding`, the ids) and when it looked (`now`):
  `active` (true: exists and active; false: gone or inactive), `familyName`, `group` + `member`;
- SCIM `POST /_admin/bench/seed` `{"users": [resource...], "groups": [{"displayName": D,
  "members": [userName...], "final": true}]}`: objects put straight into the emulator (ids assigned
  by it), so a large target can be pre-seeded quickly and then adopted by provisiond's full sync. A
  group sent with `"final": false` is buffered and completed by later calls (large member lists).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

DEFAULT_READY_TIMEOUT = 900.0   # generating 1,000,000 users takes a few minutes
DEFAULT_STOP_TIMEOUT = 10.0
BENCH_GROUP_ROUTE = "/_admin/bench/group"
BENCH_SEED_ROUTE = "/_admin/bench/seed"
BENCH_MUTATE_ROUTE = "/_admin/bench/mutate"
BENCH_CHANGE_ROUTE = "/_admin/bench/change"
BENCH_CHECK_ROUTE = "/_admin/bench/check"
CHANGE_KINDS = ("disable", "attribute", "group_add", "group_remove", "delete", "new_hire")
CHANGE_SEED = 15                # the generator that picks which users and groups the changes touch
DISABLE_EVERY = 5               # bench mutate: every 5th changed user is disabled, the others renamed
HOST = "127.0.0.1"
NAMED_GROUPS = ("All Staff", "ZPA Users", "ZIA Users", "ZPA Contractors")


class EmulatorError(RuntimeError):
    """A child emulator did not start (or answered something unexpected)."""


@dataclass
class EmulatorProcess:
    """One emulator running in a child process; `info` is the JSON line it printed when ready."""

    kind: str
    info: dict[str, Any]
    process: subprocess.Popen[str]
    log_path: Path | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the child has used so far (Linux /proc)."""
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DEFAULT_STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* from /proc/<pid>/stat, in seconds (NaN when unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _launch(kind: str, args: list[str], *, timeout: float, log_path: Path | None) -> EmulatorProcess:
    stderr = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), kind, *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        if log_path is not None:
            stderr.close()  # type: ignore[union-attr]
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    # readline blocks; the child prints its line or dies (EOF), so the deadline is a backstop.
    while not line and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
    try:
        info = json.loads(line)
    except ValueError:
        process.kill()
        process.wait()
        raise EmulatorError(f"{kind} emulator did not start (first line {line!r}; log {log_path})") from None
    return EmulatorProcess(kind, info, process, log_path)


def start_pingone(users: int, groups: int, *, seed: int = 1, latency_ms: float = 0.0,
                  timeout: float = DEFAULT_READY_TIMEOUT, log_path: Path | None = None) -> EmulatorProcess:
    """A PingOne emulator over `generate(users, groups, seed=seed)` in a child process."""
    return _launch("pingone", ["--users", str(users), "--groups", str(groups), "--seed", str(seed),
                               "--latency-ms", str(latency_ms)], timeout=timeout, log_path=log_path)


def start_scim(profile: str = "generic", *, latency_ms: float = 0.0, rps: float | None = None,
               burst: float | None = None, latency_mode: str = "deadline", timeout: float = DEFAULT_READY_TIMEOUT,
               log_path: Path | None = None) -> EmulatorProcess:
    """A SCIM emulator of *profile* with a fixed *latency_ms* per request and, with *rps*, the
    profile's 429 token bucket set to that rate (None keeps the profile's own: zia 5/s, zpa 50/s).

    `latency_mode` "deadline" (the default here): each answer leaves *latency_ms* after its request
    arrived, the emulator's own processing included, so that L is the target's response time and
    the emulator's single-threaded work does not queue on top of it (`daemon.sandbox.faults`)."""
    args = ["--profile", profile, "--latency-ms", str(latency_ms), "--latency-mode", latency_mode]
    if rps is not None:
        args += ["--rps", str(rps)]
    if burst is not None:
        args += ["--burst", str(burst)]
    return _launch("scim", args, timeout=timeout, log_path=log_path)


# -- the child side --------------------------------------------------------------------------


async def _serve_until_signal(app: web.Application, announce: dict[str, Any], path_suffix: str = "") -> None:
    from daemon.sandbox.server import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(app, host=HOST, port=0) as base_url:
        print(json.dumps({"url": base_url + path_suffix, "base_url": base_url, "pid": os.getpid(),
                          **announce}), flush=True)
        await stop.wait()


class ChangeMaker:
    """The propagation scenario's changes, made in the emulator's directory (each is audited).

    Every change touches a user no earlier change touched, so that each expectation stays true
    once met. Groups are the static ones (not the dynamic `userFilter` group); a membership is
    removed only from a group with no nested groups, where direct membership is the target's."""

    def __init__(self, directory: Any, rng: random.Random) -> None:
        self.directory = directory
        self.rng = rng
        self.touched: set[str] = set()
        self.hired = 0

    def _user(self, accept: Any = None) -> str:
        d = self.directory
        ids = d.user_order.ids
        for _ in range(100_000):
            uid = ids[self.rng.randrange(len(ids))]
            if uid not in self.touched and d.users[uid].get("enabled", True) and (accept is None or accept(uid)):
                self.touched.add(uid)
                return str(uid)
        raise RuntimeError("no user left to change")

    def _static_groups(self, *, leaf: bool = False, members: bool = False) -> list[str]:
        d = self.directory
        return [gid for gid in d.group_order.ids if "userFilter" not in d.groups[gid]
                and (not leaf or not d.child_group_ids(gid)) and (not members or d.members.get(gid))]

    def make(self, kind: str) -> dict[str, Any]:
        d = self.directory
        at = d.clock()
        if kind == "disable":
            uid = self._user()
            d.set_enabled(uid, False)
            expect: dict[str, Any] = {"active": False}
        elif kind == "attribute":
            uid = self._user()
            family = f"{(d.users[uid].get('name') or {}).get('family', '')} Changed{len(self.touched)}"
            d.update_user(uid, name={"family": family})
            expect = {"familyName": family}
        elif kind == "group_add":
            gid = self.rng.choice(self._static_groups())
            uid = self._user(lambda u: gid not in d.user_group_ids(u, transitive=True))
            d.add_member(gid, uid)
            expect = {"group": d.groups[gid]["name"], "member": True}
        elif kind == "group_remove":
            gid = self.rng.choice(self._static_groups(leaf=True, members=True))
            members = sorted(u for u in d.members[gid] if u not in self.touched and d.users[u].get("enabled", True))
            if not members:
                raise RuntimeError(f"group {gid} has no member left to remove")
            uid = self.rng.choice(members)
            self.touched.add(uid)
            d.remove_member(gid, uid)
            expect = {"group": d.groups[gid]["name"], "member": False}
        elif kind == "delete":
            uid = self._user()
            expect = {"active": False, "userName": d.users[uid]["username"]}
            d.delete_user(uid)
        elif kind == "new_hire":
            gid = self.rng.choice(self._static_groups())
            self.hired += 1
            name = f"new.hire{self.hired}@example.com"
            uid = str(d.add_user(name, email=name, given="New", family=f"Hire {self.hired}", title="Engineer",
                                 department="Engineering", employeeNumber=f"N{self.hired}")["id"])
            self.touched.add(uid)
            d.add_member(gid, uid)
            expect = {"active": True, "group": d.groups[gid]["name"], "member": True}
        else:
            raise ValueError(f"unknown change kind {kind!r}")
        user = d.users.get(uid)
        expect.setdefault("userName", user["username"] if user else "")
        return {"kind": kind, "at": at, "done": d.clock(), "user_id": uid, "expect": expect}


def _run_pingone(args: argparse.Namespace) -> None:
    from daemon.sandbox.directory import generate
    from daemon.sandbox.faults import Faults
    from daemon.sandbox.pingone import PingOneEmulator

    started = time.perf_counter()
    directory = generate(args.users, args.groups, seed=args.seed)
    generated = time.perf_counter() - started
    emulator = PingOneEmulator(directory, faults=Faults(latency_ms=args.latency_ms))
    app = emulator.app()

    async def bench_group(request: web.Request) -> web.Response:
        body = await request.json()
        count = int(body.get("members", 0))
        group = directory.add_group(str(body["name"]))
        chosen = [uid for uid in directory.user_order.ids if directory.users[uid].get("enabled", True)][:count]
        for user_id in chosen:
            directory.add_member(group["id"], user_id)
        return web.json_response({"id": group["id"], "members": len(chosen)})

    async def bench_mutate(request: web.Request) -> web.Response:
        body = await request.json()
        count = int(body.get("count", 0))
        enabled = [uid for uid in directory.user_order.ids if directory.users[uid].get("enabled", True)]
        chosen = enabled[::max(1, len(enabled) // max(1, count))][:count]
        disabled = renamed = 0
        for index, user_id in enumerate(chosen):
            user = directory.users[user_id]
            if index % DISABLE_EVERY == DISABLE_EVERY - 1:
                directory.set_enabled(user_id, False)
                disabled += 1
            else:
                family = str((user.get("name") or {}).get("family", ""))
                directory.update_user(user_id, name={"family": family + " Jr"})
                renamed += 1
        return web.json_response({"changed": len(chosen), "renamed": renamed, "disabled": disabled})

    changes = ChangeMaker(directory, random.Random(CHANGE_SEED))

    async def bench_change(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(changes.make(str(body["kind"])))

    app.router.add_post(BENCH_GROUP_ROUTE, bench_group)
    app.router.add_post(BENCH_MUTATE_ROUTE, bench_mutate)
    app.router.add_post(BENCH_CHANGE_ROUTE, bench_change)
    named = {}
    for name in NAMED_GROUPS:
        try:
            named[name] = directory.group_by_name(name)["id"]
        except KeyError:
            continue
    announce = {"env_id": directory.env_id, "users": len(directory.users), "groups": len(directory.groups),
                "generated_s": round(generated, 3), "named_groups": named,
                "group_names": [directory.groups[gid]["name"] for gid in directory.group_order.ids]}
    asyncio.run(_serve_until_signal(app, announce))


def _run_scim(args: argparse.Namespace) -> None:
    from daemon.sandbox.faults import Faults
    from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator

    faults = Faults(latency_ms=args.latency_ms, latency_mode=args.latency_mode, rate_limit_rps=args.rps,
                    rate_limit_burst=args.burst)
    emulator = ScimEmulator(args.profile, token=DEFAULT_TOKEN, prefix="/v2", faults=faults)
    app = emulator.app()
    pending: dict[str, list[dict[str, str]]] = {}

    async def seed(request: web.Request) -> web.Response:
        body = await request.json()
        users = 0
        for resource in body.get("users", ()):
            emulator.put_user(resource)
            users += 1
        groups = 0
        for group in body.get("groups", ()):
            members = pending.setdefault(group["displayName"], [])
            for user_name in group.get("members", ()):
                found = emulator.user_by_username(user_name)
                if found is not None:
                    members.append({"value": found["id"]})
            if group.get("final", True):
                emulator.put_group({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                    "displayName": group["displayName"],
                                    "members": pending.pop(group["displayName"])})
                groups += 1
        return web.json_response({"users": users, "groups": groups, "total_users": len(emulator.users)})

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        holding = [c["id"] for c in body.get("checks", ()) if _holds(emulator, c)]
        return web.json_response({"now": time.time(), "holding": holding})

    app.router.add_post(BENCH_SEED_ROUTE, seed)
    app.router.add_post(BENCH_CHECK_ROUTE, check)
    announce = {"profile": args.profile, "token": DEFAULT_TOKEN, "latency_ms": args.latency_ms,
                "rate_limit_rps": faults.rate_limit_rps}
    asyncio.run(_serve_until_signal(app, announce, "/v2"))


def _holds(emulator: Any, check: dict[str, Any]) -> bool:
    """Whether the SCIM emulator's state meets one expectation of `ChangeMaker.make`."""
    user = emulator.user_by_username(check["userName"])
    active = None if user is None else user.get("active") is not False
    if "active" in check and bool(active) != check["active"]:
        return False
    if "familyName" in check and (user is None or (user.get("name") or {}).get("familyName") != check["familyName"]):
        return False
    if "group" in check:
        group = emulator.group_by_name(check["group"])
        if group is None:
            return False
        member = False
        if user is not None:
            index = getattr(emulator, "_member_of", None)   # member id -> group ids, the emulator's own index
            if isinstance(index, dict):
                member = group["id"] in index.get(user["id"], ())
            else:
                member = any(m.get("value") == user["id"] for m in group.get("members") or ())
        if member != check["member"]:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p1 = sub.add_parser("pingone")
    p1.add_argument("--users", type=int, required=True)
    p1.add_argument("--groups", type=int, required=True)
    p1.add_argument("--seed", type=int, default=1)
    p1.add_argument("--latency-ms", type=float, default=0.0)
    scim = sub.add_parser("scim")
    scim.add_argument("--profile", default="generic")
    scim.add_argument("--latency-ms", type=float, default=0.0)
    scim.add_argument("--latency-mode", choices=("before", "deadline"), default="deadline")
    scim.add_argument("--rps", type=float, default=None)
    scim.add_argument("--burst", type=float, default=None)
    args = parser.parse_args(argv)
    if args.kind == "pingone":
        _run_pingone(args)
    else:
        _run_scim(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
