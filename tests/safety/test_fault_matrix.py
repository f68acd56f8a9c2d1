"""Faulty targets (5xx, 429 with and without Retry-After, hangs, latency jitter) converge in 3 cycles."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.backoff import RetryPolicy
from daemon.sandbox.runner import Sandbox
from tests.safety import TARGETS, assert_converged, fast_source, harness

pytestmark = pytest.mark.timeout(90)

TIMEOUT_S = 0.5     # the targets' request timeout: a hang costs this much per attempt


def faulty(sb: Sandbox) -> None:
    for em, retry_after in ((sb.zpa, None), (sb.zia, 1.0)):   # 429 without and with Retry-After
        f = em.faults
        f.error_rate = 0.10
        f.error_statuses = (500, 502, 503)
        f.rate_limit_429 = 0.10
        f.retry_after = retry_after
        f.hang_rate = 0.02
        f.jitter_ms = 15.0
    sb.pingone.faults.jitter_ms = 5.0
    sb.pingone.faults.error_rate = 0.05


async def test_under_the_fault_matrix_every_target_equals_desired_within_3_cycles_and_failures_are_logged(
        tmp_path: Path) -> None:
    started = time.monotonic()
    async with harness(tmp_path, users=80, prepare=faulty, zpa={"timeout": TIMEOUT_S},
                       zia={"timeout": TIMEOUT_S}) as h:
        fast_source(h, policy=RetryPolicy(max_attempts=4, base_delay=0.02, max_delay=0.1))
        cycles = 0
        injected = {429: 0, 500: 0}
        converged = False
        while cycles < 3 and not converged:
            cycles += 1
            await h.cycle()
            for em in (h.sb.zpa, h.sb.zia):
                for req in em.request_log:
                    if req["status"] == 429 or req["status"] >= 500:
                        injected[min(req["status"], 500)] += 1
            try:
                for target in TARGETS:
                    assert_converged(h.directory, h.emulator(target), target)
                converged = True
            except AssertionError:
                if cycles == 3:
                    raise
        assert converged
        assert injected[429] > 0 and injected[500] > 0, injected

        # every failed operation in SQLite has its own failure event, with who and why
        async with h.store.db.execute(
                "SELECT cycle_id, target, kind, op, source_id FROM operation WHERE status = 'failed'") as cur:
            failed = {tuple(row) for row in await cur.fetchall()}
        logged = {(e["cycle"], e["target"], e["event"].split(".")[0], e["op"], e["source_id"])
                  for e in h.logs if str(e["event"]).endswith("_failed") and e.get("outcome") == "failed"}
        assert failed == logged
        for e in h.logs:
            if str(e["event"]).endswith("_failed"):
                assert e.get("reason") and e.get("error"), e
    assert time.monotonic() - started < 80
