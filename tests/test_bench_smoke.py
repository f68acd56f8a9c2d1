"""bench/run.py end to end at a few hundred users: every key is reported and its value is sane.

The emulators, the daemon side and the fetch floor run as child processes on 127.0.0.1, as in a
real benchmark run. No wall-clock assertion: only counts and the presence and range of figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
KEYS = ("apply_ratio", "zia_ratio", "noop_ratio", "noop_peak_rss_mb", "incremental_requests_per_change",
        "membership_requests", "membership_batch", "scale_noop_s", "scale_peak_rss_mb")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--scenario", "smoke", "--json", str(out), "--work", str(work / "state")],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "apply_ratio" in done.stdout   # the table
    loaded: dict[str, object] = json.loads(out.read_text())
    return loaded


def test_smoke_run_reports_every_key_with_scale_null(results: dict[str, object]) -> None:
    assert set(KEYS) <= results.keys()
    assert results["scale_noop_s"] is None
    assert results["scale_peak_rss_mb"] is None


def test_ratios_and_memory_are_positive_numbers(results: dict[str, object]) -> None:
    for key in ("apply_ratio", "zia_ratio", "noop_ratio", "noop_peak_rss_mb"):
        value = results[key]
        assert isinstance(value, int | float) and value > 0, (key, value)


def test_apply_sends_one_request_per_operation_and_the_target_sees_them_all(results: dict[str, object]) -> None:
    assert results["apply_requests"] == results["apply_requests_seen_by_target"]
    assert results["apply_requests"] == results["apply_operations"]


def test_no_op_cycles_send_no_writes_to_the_target(results: dict[str, object]) -> None:
    assert results["noop_scim_writes"] == 0
    assert results["noop_seed_scim_writes"] > 0


def test_incremental_change_costs_one_request_each(results: dict[str, object]) -> None:
    assert results["incremental_changes"] > 0
    assert results["incremental_requests_per_change"] == 1.0


def test_membership_patches_are_batched(results: dict[str, object]) -> None:
    batch = results["membership_batch"]
    members = results["membership_members"]
    assert isinstance(batch, int) and isinstance(members, int) and members > batch
    assert results["membership_requests"] == math.ceil(members / batch)
    assert results["membership_group_creates"] == 1
