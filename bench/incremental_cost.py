"""What one incremental cycle costs the daemon, by directory size (issue 15: a poll's CPU must
follow the change, not the directory).

In one process: a generated directory (`daemon.sandbox.directory.generate`) is turned into the
snapshot a warm daemon holds (every user mapped into the target's cache and held as `UNCHANGED`,
every group pushed, all users in scope), the state file is filled as after a full sync (snapshot
rows and links, real SQLite), and the links are kept in memory as the last full cycle leaves them.
Then, ROUNDS times: one user changes in PingOne (a new family name and a new department), the
change is merged (`Engine.merge_changes`) and one incremental cycle runs (`Engine.incremental_cycle`)
against a SCIM emulator on loopback that holds the changed users. Last, a pushed group of about
5% of the users is renamed (every member is touched: the cost of a big group's change), after
one user joined and then left the biggest pushed group (the cost of a membership change). Wall
time and process CPU (`time.process_time`) are measured around those two calls only.

    /tmp/venv/bin/python bench/incremental_cost.py --users 100000 1000000 [--rounds 7] [--json out.json]

Uses only the engine's public calls, so the same script measures the code before and after a
change (run it with PYTHONPATH pointing at either tree).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from daemon.config import load_config
from daemon.engine import Engine
from daemon.links import Actual, GroupLink, UserLink
from daemon.mapping import content_hash, desired_state
from daemon.model import UNCHANGED, Members, Snapshot
from daemon.sandbox.directory import generate
from daemon.sandbox.scim import ScimEmulator
from daemon.sandbox.server import serve
from daemon.source.changes import GroupRead, Reads
from daemon.store import Store

GROUPS = 1000
ROUNDS = 7
TARGET = "bench"
TOKEN = "bench-token"


def config_text(state: Path, scim_url: str, groups: list[str]) -> str:
    return f'''[daemon]
state_path = "{state}"
interval = "5m"
full_sync_every = "24h"
log_format = "json"
log_level = "warning"

[source]
api_url = "http://127.0.0.1:9/v1"
auth_url = "http://127.0.0.1:9"
environment_id = "00000000-0000-0000-0000-000000000000"
client_id = "bench"
client_secret = "bench"

[[target]]
name = "{TARGET}"
profile = "generic"
base_url = "{scim_url}"
auth = "bearer"
token = "{TOKEN}"
requests_per_second = 1000
concurrency = 4
remove_action = "disable"
max_deletes = "10%"
membership = "transitive"
groups = {json.dumps(groups)}
'''


async def measure(users: int, rounds: int, work: Path, profile: Path | None = None) -> dict[str, Any]:
    began = time.perf_counter()
    directory = generate(users, GROUPS, seed=7)
    say(f"{users}: directory generated in {time.perf_counter() - began:.1f} s")
    changed_ids = list(directory.user_order.ids[:: max(1, users // (rounds + 1))][:rounds])
    group_of: dict[str, list[str]] = {uid: [] for uid in changed_ids}
    snapshot = Snapshot(complete=True, started_at=time.time(), finished_at=time.time())
    for uid in directory.user_order.ids:
        snapshot.users[uid] = directory.users[uid]
        snapshot.hashes[uid] = content_hash(directory.users[uid])
    for gid in directory.group_order.ids:
        group = directory.groups[gid]
        snapshot.groups[gid] = {"id": gid, "name": group["name"]}
        found = directory.direct_member_ids(gid)
        snapshot.members[gid] = Members.of(found)
        for uid in changed_ids:
            if uid in snapshot.members[gid]:
                group_of[uid].append(gid)
        snapshot.parents[gid] = frozenset(directory.parents.get(gid, ()))
    originals = {uid: dict(directory.users[uid]) for uid in changed_ids}
    names = [directory.groups[g]["name"] for g in directory.group_order.ids]
    del directory
    gc.collect()

    scim = ScimEmulator("generic", token=TOKEN, prefix="/scim/v2")
    scim.faults.rate_limit_rps = None
    async with serve(scim.app(), port=0) as base:
        state = work / f"incremental-{users}.db"
        state.unlink(missing_ok=True)
        path = work / f"incremental-{users}.toml"
        path.write_text(config_text(state, base + "/scim/v2", names), encoding="utf-8")
        path.chmod(0o600)
        config = load_config(path)
        store = await Store.open(state)
        try:
            async with aiohttp.ClientSession() as session:
                engine = Engine(config, store, session, log=structlog.get_logger())
                rt = engine.runtimes[TARGET]
                began = time.perf_counter()
                await store.save_snapshot(snapshot, snapshot.hashes)
                desired = desired_state(snapshot, rt.rules, hashes=snapshot.hashes, cache=rt.mapped)
                say(f"{users}: mapped and stored in {time.perf_counter() - began:.1f} s "
                    f"({len(desired.users)} desired, {len(desired.groups)} groups)")
                links: dict[str, UserLink] = {}
                for n, (sid, want) in enumerate(desired.users.items()):
                    tid = f"t{n}"
                    if sid in group_of:
                        made = scim.put_user({"userName": want.user_name, "active": want.active,
                                              "externalId": sid, "name": {"familyName": "x"}})
                        tid = str(made["id"])
                    links[sid] = UserLink(sid, tid, want.user_name, want.attrs, want.active)
                glinks: dict[str, GroupLink] = {}
                for gid, wantg in desired.groups.items():
                    made = scim.put_group({"displayName": wantg.display_name, "members": []})
                    glinks[gid] = GroupLink(gid, str(made["id"]), wantg.display_name, wantg.members, frozenset())
                await store.write_links(TARGET, users=links.values(), groups=glinks.values())
                rt.links = Actual(links, glinks)
                rt.links_generation = await store.get_meta(f"links.generation.{TARGET}")
                await store.set_meta(f"last_full_sync.{TARGET}", str(time.time()))
                for uid in snapshot.users:
                    snapshot.users[uid] = UNCHANGED
                snapshot.hashes.clear()
                del desired, links, glinks
                engine.keep_snapshot = True
                engine.last_snapshot, engine.last_complete = snapshot, True
                engine._stored_cache = rt.mapped
                gc.collect()
                say(f"{users}: state ready in {time.perf_counter() - began:.1f} s")
                walls: list[float] = []
                cpus: list[float] = []
                for n, uid in enumerate(changed_ids):
                    user = dict(originals[uid])
                    user["name"] = {**user["name"], "family": f"Changed{n}"}
                    user["department"] = f"Changed {n}"
                    user["memberOfGroupIDs"] = list(group_of[uid])
                    reads = Reads({uid: user}, {})
                    profiler = cProfile.Profile() if profile is not None and n == rounds - 1 else None
                    if profiler is not None:
                        profiler.enable()
                    wall, cpu = time.perf_counter(), time.process_time()
                    inc = await engine.merge_changes(reads)
                    assert inc is not None
                    report = await engine.incremental_cycle(rt, inc)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if profiler is not None and profile is not None:
                        profiler.disable()
                        profiler.dump_stats(str(profile.with_suffix(f".{users}.prof")))
                    assert report.outcome == "success", report
                    walls.append(wall * 1000)
                    cpus.append(cpu * 1000)
                    say(f"{users}: round {n}: {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms CPU, "
                        f"plan {report.plan_counts}")
                # One user joins the biggest pushed group, then leaves it: one user planned, one
                # member added or removed, whatever the group's size.
                biggest = max(snapshot.groups, key=lambda g: len(snapshot.members[g]))
                joiner = next(u for u in changed_ids if biggest not in group_of[u])
                member_walls: list[float] = []
                member_cpus: list[float] = []
                for step, groups_now in enumerate(([*group_of[joiner], biggest], list(group_of[joiner]))):
                    user = dict(originals[joiner])
                    user["memberOfGroupIDs"] = groups_now
                    profiler = cProfile.Profile() if profile is not None and step == 0 else None
                    if profiler is not None:
                        profiler.enable()
                    wall, cpu = time.perf_counter(), time.process_time()
                    inc = await engine.merge_changes(Reads({joiner: user}, {}))
                    assert inc is not None
                    report = await engine.incremental_cycle(rt, inc)
                    member_walls.append((time.perf_counter() - wall) * 1000)
                    member_cpus.append((time.process_time() - cpu) * 1000)
                    if profiler is not None and profile is not None:
                        profiler.disable()
                        profiler.dump_stats(str(profile.with_suffix(f".member.{users}.prof")))
                    assert report.outcome == "success", report
                    say(f"{users}: a user {'joins' if step == 0 else 'leaves'} a group of "
                        f"{len(snapshot.members[biggest])} members: {member_walls[-1]:.1f} ms wall, "
                        f"{member_cpus[-1]:.1f} ms CPU, plan {report.plan_counts}")
                # One group of about 5% of the users renamed: every member is touched.
                big = min(snapshot.groups, key=lambda g: abs(len(snapshot.members[g]) - users // 20))
                size = len(snapshot.members[big])
                read = GroupRead({"id": big, "name": "Renamed big group"}, tuple(snapshot.members[big]),
                                 tuple(snapshot.parents.get(big, ())))
                profiler = cProfile.Profile() if profile is not None else None
                if profiler is not None:
                    profiler.enable()
                wall, cpu = time.perf_counter(), time.process_time()
                inc = await engine.merge_changes(Reads({}, {big: read}))
                assert inc is not None
                report = await engine.incremental_cycle(rt, inc)
                group_wall, group_cpu = (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000
                if profiler is not None and profile is not None:
                    profiler.disable()
                    profiler.dump_stats(str(profile.with_suffix(f".group.{users}.prof")))
                assert report.outcome == "success", report
                say(f"{users}: a group of {size} members renamed: {group_wall:.1f} ms wall, {group_cpu:.1f} ms CPU, "
                    f"plan {report.plan_counts}")
                writes = scim.writes()
        finally:
            await store.close()
    return {"users": users, "rounds": rounds, "wall_ms": [round(w, 1) for w in walls],
            "cpu_ms": [round(c, 1) for c in cpus], "wall_ms_median": round(statistics.median(walls), 1),
            "cpu_ms_median": round(statistics.median(cpus), 1), "wall_ms_max": round(max(walls), 1),
            "scim_writes": writes, "group_members": size, "group_wall_ms": round(group_wall, 1),
            "group_cpu_ms": round(group_cpu, 1), "member_group_members": len(snapshot.members[biggest]),
            "member_wall_ms": [round(w, 1) for w in member_walls], "member_cpu_ms": [round(c, 1) for c in member_cpus]}


def say(message: str) -> None:
    print(f"[incremental_cost] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--profile", type=Path, help="cProfile the last round into PROFILE.<users>.prof")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n in args.users:
            found = asyncio.run(measure(n, args.rounds, work, args.profile))
            results.append(found)
            print(json.dumps(found), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

