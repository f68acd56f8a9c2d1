"""`provisiond once` SIGKILLed at random points, 20 times: never a duplicate; then it converges."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from daemon.sandbox.runner import build_sandbox, running, write_config
from tests.safety import TARGETS, assert_converged, assert_no_duplicates, cli, crash_loop

pytestmark = pytest.mark.timeout(120)

KILLS = 20
LATENCY_MS = 150.0       # each SCIM request: a run lasts long enough to be killed mid-apply
SEED = 20250505


async def test_once_killed_at_random_points_never_duplicates_and_a_final_run_converges(tmp_path: Path) -> None:
    sb = build_sandbox(users=40, groups=4, seed=9)
    sb.zpa.faults.rate_limit_rps = None
    sb.zia.faults.rate_limit_rps = None
    for em in (sb.zpa, sb.zia):
        em.faults.latency_ms = LATENCY_MS
    async with running(sb, port=0):
        config = write_config(sb, tmp_path / "provisiond.toml", state_path=str(tmp_path / "state.db"),
                              zia_rps=200.0)
        stats = await crash_loop(sb, config, kills=KILLS, rng=random.Random(SEED), earliest=0.25, latest=1.0)
        assert stats.kills == KILLS, stats

        done = await cli("once", "-c", str(config))
        if done.returncode != 0:                          # a leftover failure is retried once
            done = await cli("once", "-c", str(config))
        assert done.returncode == 0, done.stdout.decode()[-3000:]
        assert_no_duplicates(sb)
        for target in TARGETS:
            assert_converged(sb.directory, sb.zpa if target == "zpa" else sb.zia, target)
