"""provisiond benchmarks: the real daemon code against emulators in separate processes (issue 6).

    python bench/run.py [--scenario NAME] [--json FILE] [--profile DIR]

Three kinds of process, all on 127.0.0.1: the emulators (`bench/emulators.py`), the daemon side
(this file with `--worker`: `daemon.engine.Engine` over `daemon.store.Store` and a config read by
`daemon.config.load_config`, driven cycle by cycle over stdin/stdout, logs rendered to a file), and
the fetch floor (this file with `--floor`: the same PingOne pages downloaded and JSON-parsed by a
bare aiohttp loop). This process only orchestrates; no CPU it spends is counted.

Scenarios: apply, zia, noop, incremental, membership (the last three share one seeded "world"),
all (the default: apply, zia, noop, incremental, membership), scale (1,000,000 users, minutes),
quick (the same keys at ~20,000 users, under a minute), smoke (a few hundred users, for the test).
See bench/README.md for what every key means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emulators

KEYS = ("apply_ratio", "zia_ratio", "noop_ratio", "noop_peak_rss_mb", "incremental_requests_per_change",
        "membership_requests", "membership_batch", "scale_noop_s", "scale_peak_rss_mb",
        "propagation_p50_s", "propagation_p95_s", "propagation_max_s", "propagation_lost",
        "pingone_requests_per_idle_minute", "pingone_requests_per_change", "pingone_requests_per_full_cycle",
        "scale_propagation_p95_s")
TARGETS = {"apply_ratio": ("<=", 1.10), "zia_ratio": ("<=", 1.05), "noop_ratio": ("<=", 1.5),
           "noop_peak_rss_mb": ("<=", 300.0), "incremental_requests_per_change": ("==", 1.0),
           "scale_noop_s": ("<=", 180.0), "scale_peak_rss_mb": ("<=", 1024.0),
           "propagation_p95_s": ("<=", 10.0), "propagation_lost": ("==", 0),
           "pingone_requests_per_idle_minute": ("<=", 15.0), "pingone_requests_per_change": ("<=", 3.0),
           "scale_propagation_p95_s": ("<=", 15.0)}
DEFAULT_LATENCY_MS = 20.0
DEFAULT_CONCURRENCY = 16
DEFAULT_APPLY_RPS = 1000.0        # above L/C's 800 req/s: the latency bound is the binding one
DEFAULT_SOURCE_PAGE_SIZE = 1000   # PingOne's maximum `limit`; the floor pages the same way
DEFAULT_TARGET_PAGE_SIZE = 1000   # the generic emulator's maximum `count`: a full sync of 1M users reads 1,000 pages
DEFAULT_MEMBERSHIP_BATCH = 100
DEFAULT_SEED_CONCURRENCY = 32
DEFAULT_SEED_RPS = 100_000.0
DEFAULT_FLOOR_CONCURRENCY = 4     # daemon.source.pingone.DEFAULT_CONCURRENCY
ZIA_RPS = 5.0
BIG_GROUP = "Bench Big Group"
BIG_GROUP_MEMBERS = 20_000
INCREMENTAL_SHARE = 0.01
SEED_CHUNK = 5000
WORKER_TIMEOUT = 3600.0
TARGET_NAME = "bench"
# propagation (issue 15): changes made in the PingOne emulator, watched for on the SCIM target
INDEXING_DELAY = 2.0            # seconds before an activity is queryable (the emulator's default)
LOST_AFTER = 120.0              # a change not on the target this long after it was made is lost
CHECK_EVERY = 0.1               # seconds between two looks at the target
SCHEDULE_SEED = 15
DRAIN_ALLOWANCE = 30.0          # seconds after the last change that the schedule keeps free of full cycles
FIRST_CYCLE_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Plan:
    """The sizes of one run; `quick` and `smoke` are reduced copies of the default."""

    apply_users: int = 2000
    apply_groups: int = 20
    zia_users: int = 200
    world_users: int = 100_000
    world_groups: int = 1000
    big_group: int = BIG_GROUP_MEMBERS
    scale_users: int = 1_000_000
    scale_groups: int = 1000
    latency_ms: float = DEFAULT_LATENCY_MS
    concurrency: int = DEFAULT_CONCURRENCY
    apply_rps: float = DEFAULT_APPLY_RPS
    membership_batch: int = DEFAULT_MEMBERSHIP_BATCH
    seed: str = "sync"            # how the world's target is first filled: sync | adopt
    scale_seed: str = "adopt"
    prop_users: int = 100_000
    prop_groups: int = 1000
    prop_changes: int = 300
    prop_window_s: float = 120.0
    prop_idle_s: float = 60.0
    scale_prop_changes: int = 60
    scale_prop_window_s: float = 60.0


# `quick` must finish in under a minute on 2 busy cores: the world is seeded by a real initial sync
# (about 300-400 creates/s here, see README), which bounds its size.
QUICK = Plan(apply_users=1000, apply_groups=10, zia_users=30, world_users=6000, world_groups=60, big_group=6000)
SMOKE = Plan(apply_users=200, apply_groups=5, zia_users=15, world_users=400, world_groups=12, big_group=300,
             latency_ms=5.0)
SCENARIOS = ("all", "apply", "zia", "noop", "incremental", "membership", "propagation", "scale", "quick", "smoke")


# ---------------------------------------------------------------------------------------------
# Config


def source_section(pingone: emulators.EmulatorProcess) -> str:
    """The `[source]` lines that reach the PingOne emulator (its own literal secrets); the rest of
    the table is the caller's."""
    from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

    return f'''[source]
api_url = "{pingone.url}/v1"
auth_url = "{pingone.url}"
environment_id = "{pingone.info["env_id"]}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = "{DEFAULT_CLIENT_SECRET}"
'''


def config_text(*, pingone: emulators.EmulatorProcess, scim: emulators.EmulatorProcess, state_path: Path,
                profile: str, concurrency: int, rps: float, groups: list[str], membership_batch: int,
                scope_groups: list[str] | None = None) -> str:
    """A provisiond config with one target `bench` (literal secrets: the emulators' own)."""
    scope = f"scope = {{ groups = {json.dumps(scope_groups)} }}\n" if scope_groups else ""
    return f'''[daemon]
state_path = "{state_path}"
interval = "5m"
full_sync_every = "24h"
log_format = "json"
log_level = "info"

{source_section(pingone)}client_auth = "basic"
page_size = {DEFAULT_SOURCE_PAGE_SIZE}

[[target]]
name = "{TARGET_NAME}"
profile = "{profile}"
base_url = "{scim.url}"
auth = "bearer"
token = "{scim.info["token"]}"
requests_per_second = {rps:g}
burst = {max(1.0, rps):g}
concurrency = {concurrency}
page_size = {DEFAULT_TARGET_PAGE_SIZE}
membership_batch = {membership_batch}
remove_action = "disable"
max_deletes = "10%"
membership = "transitive"
groups = {json.dumps(groups)}
{scope}'''


# ---------------------------------------------------------------------------------------------
# The daemon side: `--worker CONFIG LOG`, one JSON command per stdin line, one JSON reply per line.


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so a peak can be read per cycle."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _worker(config_path: str, log_stream: io.TextIOWrapper) -> None:
    import anyio

    from daemon import logs
    from daemon.config import load_config
    from daemon.engine import Engine
    from daemon.http_session import http_session
    from daemon.store import Store

    config = load_config(config_path)
    logs.configure(fmt="json", level=config.daemon.log_level, secrets=config.secrets(), stream=log_stream)
    store = await Store.open(config.daemon.state_path)
    try:
        async with http_session() as session:
            engine = Engine(config, store, session, log=logs.get_logger())
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    break
                command = json.loads(line)
                if command["cmd"] == "exit":
                    break
                if command["cmd"] == "cycle":
                    reply = await _worker_cycle(engine, store, command)
                elif command["cmd"] == "seed_adopt":
                    reply = await _seed_adopt(engine, session, command["scim_base"])
                else:
                    reply = {"error": f"unknown command {command['cmd']!r}"}
                log_stream.flush()
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
    finally:
        await store.close()


async def _worker_cycle(engine: Any, store: Any, command: dict[str, Any]) -> dict[str, Any]:
    import tracemalloc

    runtime = engine.runtimes[TARGET_NAME]
    scim_before = dict(runtime.client.stats)
    source_before = dict(engine.source.stats)
    reset = _reset_peak() if command.get("reset_peak") else False
    trace = bool(command.get("tracemalloc"))
    if trace:
        tracemalloc.start(8)
    profiler = cProfile.Profile() if command.get("profile") else None
    cpu0 = _cpu_self()
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    report = await engine.cycle()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(command["profile"])
    wall = time.perf_counter() - started
    cpu = _cpu_self() - cpu0
    reply: dict[str, Any] = {
        "wall_s": wall, "cpu_s": cpu,
        "peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_mb": _status_kb("VmRSS") / 1024,
        "peak_reset": reset, "snapshot_users": report.snapshot_users, "source_error": report.source_error,
        "targets": [{"name": t.target, "outcome": t.outcome, "full_sync": t.full_sync, "plan_counts": t.plan_counts,
                     "results": t.results, "failed": t.failed, "cycle_id": t.cycle_id} for t in report.targets],
        "scim": _delta(scim_before, dict(runtime.client.stats)),
        "pingone": _delta(source_before, dict(engine.source.stats)),
    }
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        top = tracemalloc.take_snapshot().statistics("lineno")[:25]
        tracemalloc.stop()
        reply["tracemalloc"] = {"current_mb": current / 2**20, "peak_mb": peak / 2**20,
                                "top": [f"{s.size / 2**20:8.1f} MB {s.count:9d} {s.traceback[0]}" for s in top]}
    cycle_id = report.targets[0].cycle_id if report.targets else None
    if cycle_id is not None:
        async with store.db.execute(
            "SELECT count(*), min(started), max(finished) FROM operation WHERE cycle_id=? AND started IS NOT NULL",
            (cycle_id,)) as cur:
            row = await cur.fetchone()
        ops, first, last = row if row else (0, None, None)
        reply["apply"] = {"ops": ops, "wall_s": (last - first) if ops and first and last else 0.0}
    return reply


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def _seed_adopt(engine: Any, session: Any, scim_base: str) -> dict[str, Any]:
    """Fill the target with exactly what the daemon's own mapping wants, straight into the emulator,
    so that the next (full-sync) cycle adopts every object by userName / displayName."""
    from daemon.mapping import desired_state, resolve_pins
    from daemon.target.resource import build_user

    started = time.perf_counter()
    snapshot = await engine.snapshot()
    rules = engine.runtimes[TARGET_NAME].rules
    desired = desired_state(snapshot, rules, resolve_pins(snapshot, rules, {}))
    url = scim_base + emulators.BENCH_SEED_ROUTE
    batch: list[dict[str, Any]] = []
    for want in desired.users.values():
        batch.append(build_user(want.attrs, active=want.active))
        if len(batch) >= SEED_CHUNK:
            await _post(session, url, {"users": batch})
            batch = []
    if batch:
        await _post(session, url, {"users": batch})
    for group in desired.groups.values():
        names = sorted(desired.users[m].user_name for m in group.members)
        chunks = [names[i:i + SEED_CHUNK * 4] for i in range(0, len(names), SEED_CHUNK * 4)] or [[]]
        for index, chunk in enumerate(chunks):
            await _post(session, url, {"groups": [{"displayName": group.display_name, "members": chunk,
                                                   "final": index == len(chunks) - 1}]})
    return {"users": len(desired.users), "groups": len(desired.groups), "seconds": time.perf_counter() - started}


async def _post(session: Any, url: str, body: Any) -> Any:
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        return await response.json()


class Daemon:
    """The parent's handle on one worker process."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(config_path), str(log_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the daemon worker died (exit {self.process.wait()}); see {self.log_path}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def cycle(self, **options: Any) -> dict[str, Any]:
        reply = self.call(cmd="cycle", **options)
        for target in reply["targets"]:
            if target["failed"] or target["outcome"] not in ("success",):
                raise RuntimeError(f"cycle did not succeed: {target}; see {self.log_path}")
        return reply

    def stop(self) -> int:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        # The worker has exited: its peak RSS is now in this process's RUSAGE_CHILDREN too.
        return self.process.returncode


# ---------------------------------------------------------------------------------------------
# The fetch floor: `--floor SPEC`, a bare aiohttp loop over the same PingOne pages.


async def fetch_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Download and JSON-parse what a snapshot reads: users, groups, every group's parents (when
    transitive), and the members of the wanted groups and their nested groups."""
    import aiohttp

    from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

    url, env, limit = spec["url"], spec["env_id"], str(spec["page_size"])
    cpu0 = _cpu_self()
    started = time.perf_counter()
    counts = {"requests": 0, "bytes": 0, "users": 0, "member_rows": 0}
    semaphore = asyncio.Semaphore(spec.get("concurrency", DEFAULT_FLOOR_CONCURRENCY))
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": aiohttp.BasicAuth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET).encode()}
        async with session.post(f"{url}/{env}/as/token", data={"grant_type": "client_credentials"},
                                headers=auth) as response:
            token = json.loads(await response.read())["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        api = f"{url}/v1/environments/{env}"

        async def items(first: str, params: dict[str, str] | None) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            target: str | None = first
            while target is not None:
                async with semaphore, session.get(target, params=params, headers=headers) as response:
                    raw = await response.read()
                counts["requests"] += 1
                counts["bytes"] += len(raw)
                body = json.loads(raw)
                embedded = body.get("_embedded") or {}
                out.extend(next(iter(embedded.values()), []))
                target = (body.get("_links") or {}).get("next", {}).get("href")
                params = None
            return out

        users = await items(f"{api}/users", {"limit": limit})
        counts["users"] = len(users)
        del users
        groups = await items(f"{api}/groups", {"limit": limit})
        ids = {g["name"]: g["id"] for g in groups}
        wanted = {ids[name] for name in spec["groups"] if name in ids}
        if spec.get("transitive", True):
            parents: dict[str, list[dict[str, Any]]] = {}

            async def read_parents(gid: str) -> None:
                parents[gid] = await items(f"{api}/groups/{gid}/memberOfGroups", {"limit": limit})

            await asyncio.gather(*(read_parents(g["id"]) for g in groups))
            children: dict[str, set[str]] = {}
            for child, found in parents.items():
                for parent in found:
                    children.setdefault(parent["id"], set()).add(child)
            stack = list(wanted)
            while stack:
                for child in children.get(stack.pop(), ()):
                    if child not in wanted:
                        wanted.add(child)
                        stack.append(child)

        async def read_members(gid: str) -> None:
            found = await items(f"{api}/users", {"limit": limit, "filter": f'memberOfGroups[id eq "{gid}"]'})
            counts["member_rows"] += len(found)

        await asyncio.gather(*(read_members(gid) for gid in sorted(wanted)))
    return {**counts, "wall_s": time.perf_counter() - started, "cpu_s": _cpu_self() - cpu0,
            "peak_rss_mb": _status_kb("VmHWM") / 1024}


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--floor", json.dumps(spec)],
                         capture_output=True, text=True, check=True, timeout=WORKER_TIMEOUT)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# ---------------------------------------------------------------------------------------------
# Orchestration helpers (this process)


def admin(url: str, body: Any | None = None, *, method: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def scim_counters(scim: emulators.EmulatorProcess) -> dict[str, int]:
    counters: dict[str, int] = admin(scim.info["base_url"] + "/_admin/counters")["counters"]
    return counters


def writes(counters: dict[str, int]) -> int:
    return sum(n for key, n in counters.items()
               if key.split(" ", 1)[0] in ("POST", "PUT", "PATCH", "DELETE") and not key.endswith(".search"))


@contextlib.contextmanager
def daemon_for(work: Path, name: str, text: str, *, fresh: bool = True) -> Iterator[Daemon]:
    config = work / f"{name}.toml"
    config.write_text(text)
    for stale in (work / f"{name}.db", work / f"{name}.db-wal", work / f"{name}.db-shm", work / f"{name}.log"):
        if fresh:
            stale.unlink(missing_ok=True)   # a fresh state for fresh emulators
    daemon = Daemon(config, work / f"{name}.log")
    try:
        yield daemon
    finally:
        daemon.stop()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Scenarios


def scenario_apply(plan: Plan, work: Path, profile_dir: Path | None) -> dict[str, Any]:
    """N users + M groups + memberships created at latency L and concurrency C."""
    say(f"apply: {plan.apply_users} users, {plan.apply_groups} groups, L={plan.latency_ms:g} ms, "
        f"C={plan.concurrency}, rps={plan.apply_rps:g}")
    with emulators.start_pingone(plan.apply_users, plan.apply_groups) as pingone, \
            emulators.start_scim("generic", latency_ms=plan.latency_ms) as scim:
        text = config_text(pingone=pingone, scim=scim, state_path=work / "apply.db", profile="generic",
                           concurrency=plan.concurrency, rps=plan.apply_rps, groups=pingone.info["group_names"],
                           membership_batch=plan.membership_batch)
        with daemon_for(work, "apply", text) as daemon:
            cycle = daemon.cycle(profile=str(profile_dir / "apply.prof") if profile_dir else None)
        counters = scim_counters(scim)
    requests = cycle["scim"].get("writes", 0)
    bound = max(requests * plan.latency_ms / 1000 / plan.concurrency, requests / plan.apply_rps)
    apply_wall = cycle["apply"]["wall_s"]
    # The same number of POSTs by a bare aiohttp loop (C workers, nothing else), against a fresh
    # emulator with the same latency: what any Python client gets on this machine.
    with emulators.start_scim("generic", latency_ms=plan.latency_ms) as bare_scim:
        bare = asyncio.run(bare_posts(bare_scim, requests, plan.concurrency))
    bare_ratio = bare / bound if bound else None
    return {
        "apply_ratio": round(apply_wall / bound, 3) if bound else None,
        "apply_bare_wall_s": round(bare, 3),
        "apply_bare_ratio": round(bare_ratio, 3) if bare_ratio else None,
        "apply_overhead_vs_bare": round(apply_wall / bare, 3) if bare else None,
        "apply_users": plan.apply_users, "apply_groups": plan.apply_groups,
        "apply_latency_ms": plan.latency_ms, "apply_concurrency": plan.concurrency, "apply_rps": plan.apply_rps,
        "apply_requests": requests, "apply_requests_seen_by_target": writes(counters),
        "apply_operations": cycle["apply"]["ops"], "apply_bound_s": round(bound, 3),
        "apply_wall_s": round(apply_wall, 3), "apply_cycle_wall_s": round(cycle["wall_s"], 3),
        "apply_cycle_ratio": round(cycle["wall_s"] / bound, 3) if bound else None,
        "apply_cpu_s": round(cycle["cpu_s"], 3), "apply_plan": cycle["targets"][0]["plan_counts"],
    }


async def bare_posts(scim: emulators.EmulatorProcess, requests: int, concurrency: int) -> float:
    """Seconds for *requests* POST /Users by *concurrency* workers of a bare aiohttp loop."""
    import aiohttp

    headers = {"Authorization": f"Bearer {scim.info['token']}", "Content-Type": "application/scim+json"}
    numbers = iter(range(requests))
    async with aiohttp.ClientSession(headers=headers) as session:
        async def worker() -> None:
            for n in numbers:
                body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": f"bare{n}@example.com",
                        "active": True, "name": {"givenName": "Bare", "familyName": f"User {n}"}}
                async with session.post(scim.url + "/Users", data=json.dumps(body)) as response:
                    await response.read()
                    if response.status != 201:
                        raise RuntimeError(f"bare POST: HTTP {response.status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def scenario_zia(plan: Plan, work: Path) -> dict[str, Any]:
    """The zia profile (5 requests/s at the emulator and in the daemon): ratio to requests / 5."""
    say(f"zia: {plan.zia_users} users at {ZIA_RPS:g} req/s")
    with emulators.start_pingone(plan.zia_users, 8) as pingone, \
            emulators.start_scim("zia", latency_ms=plan.latency_ms, rps=ZIA_RPS) as scim:
        text = config_text(pingone=pingone, scim=scim, state_path=work / "zia.db", profile="zia",
                           concurrency=2, rps=ZIA_RPS, groups=["ZIA Users"],
                           membership_batch=plan.membership_batch)
        with daemon_for(work, "zia", text) as daemon:
            cycle = daemon.cycle()
        counters = scim_counters(scim)
    requests = cycle["scim"].get("writes", 0)
    bound = requests / ZIA_RPS
    return {
        "zia_ratio": round(cycle["apply"]["wall_s"] / bound, 3) if bound else None,
        "zia_requests": requests, "zia_429": cycle["scim"].get("429", 0),
        "zia_requests_seen_by_target": writes(counters), "zia_bound_s": round(bound, 3),
        "zia_wall_s": round(cycle["apply"]["wall_s"], 3), "zia_cycle_wall_s": round(cycle["wall_s"], 3),
    }


def scenario_world(plan: Plan, work: Path, *, users: int, groups: int, seed: str, which: set[str],
                   profile_dir: Path | None, prefix: str = "noop",
                   then: Callable[[emulators.EmulatorProcess, emulators.EmulatorProcess, list[str]],
                                  dict[str, Any]] | None = None) -> dict[str, Any]:
    """Seed a target from `users` x `groups`, then: no-op cycles (and the floor), 1% changed, a big group."""
    out: dict[str, Any] = {}
    say(f"{prefix}: world of {users} users, {groups} groups; seeding by {seed}")
    with emulators.start_pingone(users, groups) as pingone, emulators.start_scim("generic") as scim:
        out[f"{prefix}_generate_s"] = pingone.info["generated_s"]
        pushed = [*pingone.info["group_names"], BIG_GROUP]
        text = config_text(pingone=pingone, scim=scim, state_path=work / f"{prefix}.db", profile="generic",
                           concurrency=DEFAULT_SEED_CONCURRENCY, rps=DEFAULT_SEED_RPS, groups=pushed,
                           membership_batch=plan.membership_batch)
        with daemon_for(work, prefix, text) as daemon:
            started = time.perf_counter()
            if seed == "adopt":
                seeded = daemon.call(cmd="seed_adopt", scim_base=scim.info["base_url"])
                say(f"{prefix}: seeded the target directly: {seeded}")
            seed_cpu = (pingone.cpu_seconds(), scim.cpu_seconds())
            first = daemon.cycle(profile=str(profile_dir / f"{prefix}_seed.prof") if profile_dir else None)
            out[f"{prefix}_seed_cycle_s"] = round(first["wall_s"], 2)
            out[f"{prefix}_seed_cycle_cpu_s"] = round(first["cpu_s"], 2)
            out[f"{prefix}_seed_pingone_emulator_cpu_s"] = round(pingone.cpu_seconds() - seed_cpu[0], 2)
            out[f"{prefix}_seed_scim_emulator_cpu_s"] = round(scim.cpu_seconds() - seed_cpu[1], 2)
            out[f"{prefix}_seed"] = seed
            out[f"{prefix}_seed_s"] = round(time.perf_counter() - started, 1)
            out[f"{prefix}_seed_plan"] = first["targets"][0]["plan_counts"]
            out[f"{prefix}_seed_scim_writes"] = first["scim"].get("writes", 0)
            say(f"{prefix}: initial cycle {first['wall_s']:.1f} s, plan {first['targets'][0]['plan_counts']}")
        # The no-op cycles run in a new daemon process over the same state, as after a restart, so
        # that the memory the seed's initial apply took is not counted as the no-op cycle's.
        with daemon_for(work, prefix, text, fresh=False) as daemon:
            second = daemon.cycle()
            spec = {"url": pingone.url, "env_id": pingone.info["env_id"], "page_size": DEFAULT_SOURCE_PAGE_SIZE,
                    "groups": pushed, "transitive": True}
            floors = [run_floor(spec)]
            cpu = (pingone.cpu_seconds(), scim.cpu_seconds())
            third = daemon.cycle(reset_peak=True,
                                 profile=str(profile_dir / f"{prefix}.prof") if profile_dir else None)
            cpu = (pingone.cpu_seconds() - cpu[0], scim.cpu_seconds() - cpu[1])
            floors.append(run_floor(spec))
            floor = min(floors, key=lambda f: f["wall_s"])
            say(f"{prefix}: no-op cycles {second['wall_s']:.2f} s, {third['wall_s']:.2f} s; "
                f"floor {[round(f['wall_s'], 2) for f in floors]} s")
            noop_writes = second["scim"].get("writes", 0) + third["scim"].get("writes", 0)
            out.update({
                f"{prefix}_ratio": round(third["wall_s"] / floor["wall_s"], 3),
                f"{prefix}_peak_rss_mb": round(third["peak_rss_mb"], 1),
                f"{prefix}_peak_is_cycle_only": third["peak_reset"],
                f"{prefix}_wall_s": round(third["wall_s"], 3), f"{prefix}_cpu_s": round(third["cpu_s"], 3),
                f"{prefix}_first_wall_s": round(second["wall_s"], 3),
                # the restarted daemon's first cycle maps every user: its peak since the start
                f"{prefix}_first_peak_rss_mb": round(second["peak_rss_mb"], 1),
                f"{prefix}_first_cpu_s": round(second["cpu_s"], 3),
                f"{prefix}_floor_s": round(floor["wall_s"], 3), f"{prefix}_floor_cpu_s": round(floor["cpu_s"], 3),
                f"{prefix}_floor_runs_s": [round(f["wall_s"], 3) for f in floors],
                f"{prefix}_cpu_ratio": round(third["cpu_s"] / floor["cpu_s"], 3) if floor["cpu_s"] else None,
                f"{prefix}_floor_requests": floor["requests"], f"{prefix}_floor_mb": round(floor["bytes"] / 2**20, 1),
                f"{prefix}_source_requests": third["pingone"].get("requests", 0),
                f"{prefix}_rss_after_mb": round(third["rss_mb"], 1),
                f"{prefix}_scim_writes": noop_writes,
                f"{prefix}_pingone_emulator_cpu_s": round(cpu[0], 3),
                f"{prefix}_scim_emulator_cpu_s": round(cpu[1], 3),
                f"{prefix}_users": third["snapshot_users"], f"{prefix}_groups": groups,
            })
            if "incremental" in which:
                before = scim_counters(scim)
                changed = admin(pingone.url + emulators.BENCH_MUTATE_ROUTE,
                                {"count": max(1, round(users * INCREMENTAL_SHARE))})
                cycle = daemon.cycle()
                sent = writes(scim_counters(scim)) - writes(before)
                out.update({
                    "incremental_requests_per_change": round(sent / changed["changed"], 4),
                    "incremental_changes": changed["changed"], "incremental_renamed": changed["renamed"],
                    "incremental_disabled": changed["disabled"], "incremental_requests": sent,
                    "incremental_operations": cycle["apply"]["ops"],
                    "incremental_plan": cycle["targets"][0]["plan_counts"],
                    "incremental_wall_s": round(cycle["wall_s"], 3),
                })
                say(f"incremental: {changed} -> {sent} requests, plan {cycle['targets'][0]['plan_counts']}")
            if "membership" in which:
                made = admin(pingone.url + emulators.BENCH_GROUP_ROUTE, {"name": BIG_GROUP, "members": plan.big_group})
                size = made["members"]
                before = scim_counters(scim)
                scim_cpu = scim.cpu_seconds()
                cycle = daemon.cycle(profile=str(profile_dir / "membership.prof") if profile_dir else None)
                scim_cpu = scim.cpu_seconds() - scim_cpu
                after = scim_counters(scim)
                patches = after.get("PATCH /Groups", 0) - before.get("PATCH /Groups", 0)
                out.update({
                    "membership_requests": patches, "membership_batch": plan.membership_batch,
                    "membership_members": size, "membership_expected": math.ceil(size / plan.membership_batch),
                    "membership_group_creates": after.get("POST /Groups", 0) - before.get("POST /Groups", 0),
                    "membership_apply_s": round(cycle["apply"]["wall_s"], 3),
                    "membership_cycle_cpu_s": round(cycle["cpu_s"], 3),
                    "membership_scim_emulator_cpu_s": round(scim_cpu, 3),
                    "membership_plan": cycle["targets"][0]["plan_counts"],
                })
                say(f"membership: {size} members -> {patches} PATCH requests")
        if then is not None:     # the worker has stopped: the same emulators and state, another daemon
            out.update(then(pingone, scim, pushed))
    return out

# ---------------------------------------------------------------------------------------------
# Propagation (issue 15): the real `provisiond run` with its defaults; changes made in the PingOne
# emulator at random times; each one watched for on the SCIM target from this process.


def run_config_text(*, pingone: emulators.EmulatorProcess, scim: emulators.EmulatorProcess, state_path: Path,
                    groups: list[str], http_port: int) -> str:
    """Only what a config must say: every knob of [daemon], [source] and the target (interval,
    changes, change_poll_interval, page sizes, concurrency, rate limits, max_deletes) is left at
    its default. `http_listen` serves /metrics, read for the daemon's own latency histogram."""
    return f'''[daemon]
state_path = "{state_path}"
http_listen = "127.0.0.1:{http_port}"

{source_section(pingone)}
[[target]]
name = "{TARGET_NAME}"
profile = "generic"
base_url = "{scim.url}"
token = "{scim.info["token"]}"
groups = {json.dumps(groups)}
'''


class RunDaemon:
    """`python -m daemon run -c CONFIG` in a child process; its JSON log lines read back from a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        self.log_path = log_path
        self._out = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(config)],
                                        stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=root)
        self._reader = open(log_path)
        self._partial = ""
        self.events: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        self._partial += self._reader.read()
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "(not json)", "text": line}
            self.events.append(event if isinstance(event, dict) else {"event": "(not an object)"})
        return self.events

    def wait_for(self, what: str, match: Any, *, since: int = 0, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.read()[since:]:
                if match(event):
                    return event
            if self.process.poll() is not None:
                raise RuntimeError(f"provisiond run exited ({self.process.returncode}) before {what}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout:g} s; see {self.log_path}")
            time.sleep(0.1)

    def named(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.read()[since:] if e.get("event") == name]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        self._reader.close()
        return self.process.returncode


def full_cycle_started(number: int | None = None) -> Any:
    """A tick's `cycle.started` (the service logs `cycle_number`; an incremental cycle has `kind`)."""
    return lambda e: (e.get("event") == "cycle.started" and "cycle_number" in e
                      and (number is None or e["cycle_number"] == number))


def summary_of(number: int) -> Any:
    return lambda e: e.get("event") == "cycle.summary" and e.get("cycle_number") == number


def event_time(event: dict[str, Any]) -> float:
    from datetime import datetime

    stamp = str(event.get("timestamp", ""))
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def pingone_counters(pingone: emulators.EmulatorProcess) -> dict[str, int]:
    counters: dict[str, int] = admin(pingone.url + "/_admin/counters")
    return counters


def pingone_requests(counters: dict[str, int], *, feed: bool | None = None) -> int:
    """PingOne API requests the emulator counted (its /_admin and the bench routes excluded);
    `feed` True: only /activities, False: all but /activities."""
    total = 0
    for route, n in counters.items():
        if route.startswith("admin") or route == "unknown":
            continue
        if feed is not None and route.startswith("activities") != feed:
            continue
        total += n
    return total


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((emulators.HOST, 0))
        return int(sock.getsockname()[1])


class Watcher(threading.Thread):
    """Looks at the SCIM target every CHECK_EVERY seconds (`POST /_admin/bench/check`) for every
    change not yet seen; a change is seen at the emulator's clock of the first look that finds it."""

    def __init__(self, scim: emulators.EmulatorProcess) -> None:
        super().__init__(daemon=True)
        self.url = scim.info["base_url"] + emulators.BENCH_CHECK_ROUTE
        self.lock = threading.Lock()
        self.made: list[dict[str, Any]] = []
        self.pending: dict[int, dict[str, Any]] = {}
        self.seen: dict[int, float] = {}
        self.looks = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def add(self, made: dict[str, Any]) -> None:
        with self.lock:
            index = len(self.made)
            self.made.append(made)
            self.pending[index] = made

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                with self.lock:
                    checks = [{"id": i, **m["expect"]} for i, m in self.pending.items()]
                if checks:
                    reply = admin(self.url, {"checks": checks})
                    self.looks += 1
                    with self.lock:
                        for i in reply["holding"]:
                            self.seen[i] = float(reply["now"])
                            self.pending.pop(i, None)
                self._halt.wait(CHECK_EVERY)
        except BaseException as exc:   # reported by wait()
            self.error = exc

    def wait(self, bound: float) -> None:
        """Until every change is seen, or each one still pending was made `bound` seconds ago."""
        while True:
            if self.error is not None:
                raise RuntimeError(f"the target watcher failed: {self.error!r}")
            with self.lock:
                newest = max((m["at"] for m in self.pending.values()), default=None)
            if newest is None or time.time() - newest > bound:
                return
            time.sleep(CHECK_EVERY)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_figures(latencies: list[float]) -> dict[str, float | None]:
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 3)
    return {"p50_s": r(nearest_rank(latencies, 0.50)), "p95_s": r(nearest_rank(latencies, 0.95)),
            "max_s": r(max(latencies, default=None)), "min_s": r(min(latencies, default=None))}


def scrape_propagation(port: int) -> dict[str, Any]:
    """The daemon's `provisiond_propagation_latency_seconds` histogram (all targets summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "provisiond_propagation_latency_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return {"buckets": buckets, "count": count, "sum": total}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' estimate: linear within the bucket that holds the q-quantile."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, buckets[bound]
    return None


def propagation(work: Path, pingone: emulators.EmulatorProcess, scim: emulators.EmulatorProcess, *,
                state: Path, groups: list[str], prefix: str, changes: int, window: float,
                idle: float) -> dict[str, Any]:
    """`provisiond run` over an already seeded state; an idle stretch, then `changes` changes at
    random times over `window` seconds; latency from each change to its sight on the target."""
    from daemon.config import load_config

    req = "pingone" if prefix == "propagation" else prefix.replace("propagation", "pingone")
    out: dict[str, Any] = {}
    admin(pingone.url + "/_admin/activities/settings", {"indexing_delay": INDEXING_DELAY})
    port = free_port()
    config = work / f"{prefix}-run.toml"
    config.write_text(run_config_text(pingone=pingone, scim=scim, state_path=state, groups=groups, http_port=port))
    config.chmod(0o600)
    loaded = load_config(str(config))      # the defaults the daemon runs with
    interval, poll = loaded.daemon.interval, loaded.source.change_poll_interval
    out.update({f"{prefix}_interval_s": interval, f"{prefix}_change_poll_interval_s": poll,
                f"{prefix}_changes_mode": loaded.source.changes, f"{prefix}_indexing_delay_s": INDEXING_DELAY})
    say(f"{prefix}: provisiond run with its defaults (changes={loaded.source.changes}, poll every {poll:g} s, "
        f"interval {interval:g} s)")
    before = pingone_counters(pingone)
    daemon = RunDaemon(config, work / f"{prefix}-run.log")
    try:
        tick = daemon.wait_for("the first cycle", full_cycle_started(1), timeout=FIRST_CYCLE_TIMEOUT)
        first = daemon.wait_for("the first cycle's summary", summary_of(1), timeout=FIRST_CYCLE_TIMEOUT)
        full = pingone_requests(pingone_counters(pingone), feed=False) - pingone_requests(before, feed=False)
        out[f"{req}_requests_per_full_cycle"] = full
        out[f"{prefix}_full_cycle_s"] = first.get("took_s")
        if first.get("outcome") != "success":
            raise RuntimeError(f"the first cycle of provisiond run did not succeed: {first}")
        say(f"{prefix}: first full cycle {first.get('took_s')} s, {full} PingOne requests")
        # Neither the idle stretch nor the changes may meet a full cycle: start right after one
        # when the next tick would come too soon.
        number = 1
        need = idle + window + DRAIN_ALLOWANCE + 2 * poll
        while event_time(tick) + interval - time.time() < need:
            number += 1
            say(f"{prefix}: the next full cycle is due in {event_time(tick) + interval - time.time():.0f} s; "
                f"waiting for it to pass")
            tick = daemon.wait_for(f"cycle {number}", full_cycle_started(number), timeout=interval + FIRST_CYCLE_TIMEOUT)
            daemon.wait_for(f"cycle {number}'s summary", summary_of(number), timeout=FIRST_CYCLE_TIMEOUT)
            if number > 3:   # full cycles back to back (each longer than `interval`): measure between them
                say(f"{prefix}: full cycles leave no {need:g} s free; the windows will meet one")
                break
        mark = len(daemon.read())
        polls_per_minute = 60.0 / poll    # nominal, replaced by the measured rate when idle > 0
        if idle > 0:
            c0, t0 = pingone_counters(pingone), time.time()
            time.sleep(idle)
            c1, t1 = pingone_counters(pingone), time.time()
            polls_per_minute = (pingone_requests(c1) - pingone_requests(c0)) * 60.0 / (t1 - t0)
            backstop = full * 60.0 / interval
            out.update({
                f"{req}_polls_per_idle_minute": round(polls_per_minute, 2),
                f"{req}_backstop_requests_per_minute": round(backstop, 3),
                f"{req}_requests_per_idle_minute": round(polls_per_minute + backstop, 2),
                f"{prefix}_idle_s": round(t1 - t0, 1),
                f"{prefix}_idle_full_cycles": len([e for e in daemon.read()[mark:] if full_cycle_started()(e)]),
            })
            say(f"{prefix}: idle: {polls_per_minute:.1f} requests a minute; the backstop adds {backstop:.2f}")
        # The changes.
        rng = random.Random(SCHEDULE_SEED)
        offsets = sorted(rng.uniform(0.0, window) for _ in range(changes))
        kinds = [emulators.CHANGE_KINDS[i % len(emulators.CHANGE_KINDS)] for i in range(changes)]
        rng.shuffle(kinds)
        histogram_before = scrape_propagation(port)
        mark = len(daemon.read())
        load_before = os.getloadavg()
        watcher = Watcher(scim)
        c0, t0 = pingone_counters(pingone), time.time()
        watcher.start()
        say(f"{prefix}: {changes} changes over {window:g} s")
        try:
            for offset, kind in zip(offsets, kinds, strict=True):
                delay = t0 + offset - time.time()
                if delay > 0:
                    time.sleep(delay)
                watcher.add(admin(pingone.url + emulators.BENCH_CHANGE_ROUTE, {"kind": kind}))
            watcher.wait(LOST_AFTER)
            c1, t1 = pingone_counters(pingone), time.time()
        finally:
            watcher.stop()
        load_after = os.getloadavg()
        histogram_after = scrape_propagation(port)
        events = daemon.read()[mark:]
    finally:
        code = daemon.stop()
    made, seen = watcher.made, watcher.seen
    latencies = [seen[i] - m["at"] for i, m in enumerate(made) if i in seen]
    figures = latency_figures(latencies)
    spent = pingone_requests(c1) - pingone_requests(c0)
    per_change = (spent - polls_per_minute * (t1 - t0) / 60.0) / len(made) if made else None
    by_kind = {}
    for kind in emulators.CHANGE_KINDS:
        own = [seen[i] - m["at"] for i, m in enumerate(made) if i in seen and m["kind"] == kind]
        by_kind[kind] = {"n": sum(1 for m in made if m["kind"] == kind), **latency_figures(own)}
    delta = {b: histogram_after["buckets"].get(b, 0.0) - histogram_before["buckets"].get(b, 0.0)
             for b in histogram_after["buckets"]}
    observed = histogram_after["count"] - histogram_before["count"]
    out.update({
        f"{prefix}_p50_s": figures["p50_s"], f"{prefix}_p95_s": figures["p95_s"],
        f"{prefix}_max_s": figures["max_s"], f"{prefix}_min_s": figures["min_s"],
        f"{prefix}_lost": len(made) - len(latencies), f"{prefix}_lost_after_s": LOST_AFTER,
        f"{prefix}_changes": len(made), f"{prefix}_window_s": window,
        f"{prefix}_by_kind": by_kind,
        f"{req}_requests_per_change": round(per_change, 3) if per_change is not None else None,
        f"{req}_requests_in_change_window": spent, f"{prefix}_change_window_s": round(t1 - t0, 1),
        f"{prefix}_target_looks": watcher.looks,
        f"{prefix}_daemon_observations": int(observed),
        f"{prefix}_daemon_p50_s": _rounded(histogram_quantile(0.50, delta)),
        f"{prefix}_daemon_p95_s": _rounded(histogram_quantile(0.95, delta)),
        f"{prefix}_daemon_mean_s": round((histogram_after["sum"] - histogram_before["sum"]) / observed, 3)
        if observed else None,
        f"{prefix}_incremental_cycles": len([e for e in events if e.get("event") == "cycle.finished"
                                             and e.get("kind") == "incremental"]),
        f"{prefix}_full_cycles_in_window": len([e for e in events if full_cycle_started()(e)]),
        f"{prefix}_feed_trouble": len([e for e in events if e.get("event") in
                                       ("changes.gap", "changes.failing", "changes.fallback", "changes.crashed")]),
        f"{prefix}_removals_held": len([e for e in events if e.get("event") == "plan.removals_held"]),
        f"{prefix}_load_avg": [round(x, 2) for x in (*load_before, *load_after)],
        f"{prefix}_daemon_exit": code,
    })
    say(f"{prefix}: p50 {figures['p50_s']} s, p95 {figures['p95_s']} s, max {figures['max_s']} s, "
        f"lost {len(made) - len(latencies)}; {spent} PingOne requests in {t1 - t0:.0f} s "
        f"({out[f'{req}_requests_per_change']} a change); load {os.getloadavg()}")
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def scenario_propagation(plan: Plan, work: Path) -> dict[str, Any]:
    """Issue 15's propagation benchmark at `prop_users` x `prop_groups`, the target seeded by adopt."""
    users, groups = plan.prop_users, plan.prop_groups
    say(f"propagation: {users} users, {groups} groups; seeding by adopt")
    with emulators.start_pingone(users, groups) as pingone, emulators.start_scim("generic") as scim:
        names = list(pingone.info["group_names"])
        state = work / "propagation.db"
        text = config_text(pingone=pingone, scim=scim, state_path=state, profile="generic",
                           concurrency=DEFAULT_SEED_CONCURRENCY, rps=DEFAULT_SEED_RPS, groups=names,
                           membership_batch=plan.membership_batch)
        started = time.perf_counter()
        with daemon_for(work, "propagation", text) as daemon:
            seeded = daemon.call(cmd="seed_adopt", scim_base=scim.info["base_url"])
            adopted = daemon.cycle()
        say(f"propagation: seeded {seeded['users']} users and adopted them in {time.perf_counter() - started:.0f} s "
            f"(plan {adopted['targets'][0]['plan_counts']})")
        out = propagation(work, pingone, scim, state=state, groups=names, prefix="propagation",
                          changes=plan.prop_changes, window=plan.prop_window_s, idle=plan.prop_idle_s)
    out.update({"propagation_users": users, "propagation_groups": groups})
    return out



def scenario_scale(plan: Plan, work: Path, profile_dir: Path | None) -> dict[str, Any]:
    """The no-op world at 1,000,000 users; then, over the same emulators and state file, the real
    `provisiond run` with its defaults and `scale_prop_changes` changes over `scale_prop_window_s`
    (no idle stretch: its cost at 1M is the full cycle's, reported as scale_pingone_requests_per_full_cycle)."""
    def then(pingone: emulators.EmulatorProcess, scim: emulators.EmulatorProcess, pushed: list[str]) -> dict[str, Any]:
        if not plan.scale_prop_changes:
            return {}
        return propagation(work, pingone, scim, state=work / "scale.db", groups=pushed, prefix="scale_propagation",
                           changes=plan.scale_prop_changes, window=plan.scale_prop_window_s, idle=0.0)

    found = scenario_world(plan, work, users=plan.scale_users, groups=plan.scale_groups, seed=plan.scale_seed,
                           which=set(), profile_dir=profile_dir, prefix="scale", then=then)
    found["scale_noop_s"] = found.get("scale_wall_s")
    return found


def run(scenario: str, plan: Plan, work: Path, profile_dir: Path | None, *, scale: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = dict.fromkeys(KEYS)
    if scenario in ("quick", "smoke"):
        plan = QUICK if scenario == "quick" else SMOKE
        plan = replace(plan, seed="sync")
    if scenario in ("all", "apply", "quick", "smoke"):
        results.update(scenario_apply(plan, work, profile_dir))
    if scenario in ("all", "zia", "quick", "smoke"):
        results.update(scenario_zia(plan, work))
    world = {"noop": {"noop"}, "incremental": {"incremental"}, "membership": {"membership"}}.get(
        scenario, {"noop", "incremental", "membership"})
    if scenario in ("all", "noop", "incremental", "membership", "quick", "smoke"):
        results.update(scenario_world(plan, work, users=plan.world_users, groups=plan.world_groups,
                                      seed=plan.seed, which=world, profile_dir=profile_dir))
    if scenario in ("all", "propagation"):
        results.update(scenario_propagation(plan, work))
    if scenario == "scale" or scale:
        results.update(scenario_scale(plan, work, profile_dir))
    results["scenario"] = scenario
    results["machine"] = machine()
    return results


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "python": sys.version.split()[0], "cpu": model,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def table(results: dict[str, Any]) -> str:
    lines = [f"{'key':34s} {'value':>12s}  target"]
    for key in KEYS:
        value = results.get(key)
        shown = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        goal = TARGETS.get(key)
        if key == "membership_requests" and results.get("membership_expected") is not None:
            goal = ("==", results["membership_expected"])
        verdict = ""
        if goal is not None and value is not None:
            op, limit = goal
            ok = value <= limit if op == "<=" else value == limit
            verdict = f"{op} {limit:g}  {'ok' if ok else 'MISSED'}"
        lines.append(f"{key:34s} {shown:>12s}  {verdict}")
    extras = sorted(k for k in results if k not in KEYS and not isinstance(results[k], dict | list))
    lines.append("")
    lines.extend(f"{key:34s} {results[key]!s:>12s}" for key in extras)
    return "\n".join(lines)


def summarise_profile(path: Path, limit: int = 35) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        import anyio

        with open(argv[2], "a", buffering=1 << 16) as log_stream:
            anyio.run(_worker, argv[1], log_stream)
        return 0
    if argv[:1] == ["--floor"]:
        print(json.dumps(asyncio.run(fetch_floor(json.loads(argv[1])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", choices=SCENARIOS, default="all")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path, help="cProfile the apply and no-op cycles into this directory")
    parser.add_argument("--scale", action="store_true", help="also run the 1,000,000-user no-op")
    parser.add_argument("--seed", choices=("sync", "adopt"), default="sync",
                        help="fill the no-op world by a real initial sync (default) or by direct seeding + adoption")
    parser.add_argument("--users", type=int, help="users in the no-op and propagation worlds (default 100000)")
    parser.add_argument("--groups", type=int, help="groups in the no-op and propagation worlds (default 1000)")
    parser.add_argument("--changes", type=int, help="propagation: changes made (default 300)")
    parser.add_argument("--window", type=float, help="propagation: seconds over which they are made (default 120)")
    parser.add_argument("--idle", type=float, help="propagation: seconds of the idle stretch (default 60)")
    parser.add_argument("--scale-users", type=int, help="users in the scale world (default 1000000)")
    parser.add_argument("--scale-changes", type=int,
                        help="scale: propagation changes (default 60; 0 skips the propagation part)")
    parser.add_argument("--scale-window", type=float, help="scale: seconds over which they are made (default 60)")
    parser.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--work", type=Path, help="keep configs, state and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    plan = replace(Plan(), seed=args.seed, latency_ms=args.latency_ms, concurrency=args.concurrency)
    # option -> the Plan fields it sets; a size of 0 (users, groups) keeps the default
    overrides = {"users": ("world_users", "prop_users"), "groups": ("world_groups", "prop_groups"),
                 "changes": ("prop_changes",), "window": ("prop_window_s",), "idle": ("prop_idle_s",),
                 "scale_users": ("scale_users",), "scale_changes": ("scale_prop_changes",),
                 "scale_window": ("scale_prop_window_s",)}
    sizes = {"users", "groups", "scale_users"}
    for option, fields in overrides.items():
        value = getattr(args, option)
        if value is None or (option in sizes and not value):
            continue
        plan = replace(plan, **dict.fromkeys(fields, value))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            work = args.work
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="provisiond-bench-")))
        started = time.perf_counter()
        results = run(args.scenario, plan, work, args.profile, scale=args.scale)
        results["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.profile:
        for prof in sorted(args.profile.glob("*.prof")):
            (args.profile / (prof.stem + ".txt")).write_text(summarise_profile(prof))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
