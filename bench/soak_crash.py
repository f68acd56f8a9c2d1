"""Crash soak: `provisiond once` SIGKILLed at random points 50 times against slow emulators.

After every kill no userName (or group) may exist twice in either target; after a final
uninterrupted `once` both targets must equal the desired state. Not part of the test suite.

    python bench/soak_crash.py [--kills 50] [--seed N] [--latency-ms 40] [--users 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.sandbox.runner import build_sandbox, running, write_config
from tests.safety import TARGETS, assert_converged, assert_no_duplicates, cli, crash_loop

DEFAULT_KILLS = 50
DEFAULT_LATENCY_MS = 40.0
DEFAULT_USERS = 60


async def soak(kills: int, seed: int, latency_ms: float, users: int) -> int:
    sb = build_sandbox(users=users, groups=4, seed=seed)
    sb.zpa.faults.rate_limit_rps = None
    sb.zia.faults.rate_limit_rps = None
    for em in (sb.zpa, sb.zia):
        em.faults.latency_ms = latency_ms
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        async with running(sb, port=0):
            config = write_config(sb, Path(tmp) / "provisiond.toml", state_path=str(Path(tmp) / "state.db"),
                                  zia_rps=200.0)
            stats = await crash_loop(sb, config, kills=kills, rng=random.Random(seed), earliest=0.3, latest=1.4,
                                     on_kill=lambda step: print(f"  run {step + 1}: no duplicates", flush=True))
            final = await cli("once", "-c", str(config), limit=120)
            if final.returncode != 0:
                final = await cli("once", "-c", str(config), limit=120)
            assert_no_duplicates(sb)
            converged = True
            for target in TARGETS:
                try:
                    assert_converged(sb.directory, sb.zpa if target == "zpa" else sb.zia, target)
                except AssertionError as exc:
                    converged = False
                    print(f"  {target}: NOT converged: {exc}")
    points = stats.kill_points
    print(f"kills {stats.kills} (runs that finished first: {stats.finished_before_kill}); "
          f"kill point median {statistics.median(points):.2f} s, min {min(points):.2f}, max {max(points):.2f}")
    print(f"run length median {statistics.median(stats.run_seconds):.2f} s; "
          f"target users at most {stats.max_users}; duplicates after any kill: 0")
    print(f"final once exit {final.returncode}; converged: {converged}; "
          f"total {time.monotonic() - started:.1f} s")
    return 0 if converged and final.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=DEFAULT_KILLS)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS)
    parser.add_argument("--users", type=int, default=DEFAULT_USERS)
    args = parser.parse_args()
    print(f"crash soak: {args.kills} kills, seed {args.seed}, SCIM latency {args.latency_ms} ms")
    code: int = anyio.run(soak, args.kills, args.seed, args.latency_ms, args.users)
    return code


if __name__ == "__main__":
    sys.exit(main())
