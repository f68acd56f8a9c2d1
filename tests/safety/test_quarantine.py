"""A target answering 503 to everything is quarantined once, recovers once, and the other goes on."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from tests.safety import assert_converged, fast_targets, harness

pytestmark = pytest.mark.timeout(60)


async def test_a_target_answering_503_is_quarantined_then_recovers_while_the_other_is_provisioned(
        tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # back-offs of 2 s, then 4 s: the next cycle surely starts within the first (a loaded
        # machine's cycle of 60 users takes well under 2 s); the test sleeps past it
        h.engine.quarantine_base = 2.0
        fast_targets(h)
        zia = h.emulator("zia")
        zia.faults.error_rate = 1.0
        zia.faults.error_statuses = (503,)

        report = await h.cycle()
        assert h.target_report("zia").outcome == "quarantined"
        assert h.target_report("zpa").outcome == "success"
        assert_converged(h.directory, h.emulator("zpa"), "zpa")
        (q,) = h.events("target.quarantined", target="zia")
        assert q["reason"] in ("unreachable", "mostly_failing")
        assert q["retry_in_s"] == 2.0
        assert report.failed

        await h.cycle()                                   # within the back-off: not even tried
        assert h.events("target.skipped", target="zia", reason="quarantined")
        assert zia.request_log == []

        await anyio.sleep(2.1)
        new_hire = h.directory.add_user("late.joiner@example.com", email="late.joiner@example.com",
                                        given="Late", family="Joiner")
        h.directory.add_member(h.directory.group_by_name("ZPA Users")["id"], new_hire["id"])
        await h.cycle()                                   # tried, still failing: back-off doubles
        (still,) = h.events("target.still_quarantined", target="zia")
        assert still["retry_in_s"] == 4.0
        assert h.emulator("zpa").user_by_username("late.joiner@example.com") is not None

        zia.faults.error_rate = 0.0
        deadline = time.monotonic() + 20
        while not h.all_events("target.recovered", target="zia"):
            assert time.monotonic() < deadline, "zia never recovered"
            await anyio.sleep(0.3)
            await h.cycle()
        assert len(h.all_events("target.quarantined", target="zia")) == 1
        assert len(h.all_events("target.recovered", target="zia")) == 1
        if h.target_report("zia").outcome != "success":
            await h.cycle()
        assert h.target_report("zia").outcome == "success"
        assert_converged(h.directory, zia, "zia")
        assert_converged(h.directory, h.emulator("zpa"), "zpa")


async def test_a_target_refusing_the_token_is_quarantined_for_auth(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.engine.quarantine_base = 0.5
        h.emulator("zia").token = "rotated-elsewhere"
        await h.cycle()
        (q,) = h.events("target.quarantined", target="zia")
        assert q["reason"] == "auth_failed"
        assert h.target_report("zpa").outcome == "success"
