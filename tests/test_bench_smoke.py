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


PROPAGATION_KEYS = ("propagation_p50_s", "propagation_p95_s", "propagation_max_s", "propagation_lost",
                    "pingone_requests_per_idle_minute", "pingone_requests_per_change",
                    "pingone_requests_per_full_cycle")
SMOKE_CHANGES = 12   # two of each kind


@pytest.fixture(scope="module")
def propagation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """`--scenario propagation` at 300 users: the real `provisiond run` with its defaults, 12 changes
    made in the PingOne emulator over 6 s, each watched for on the SCIM target."""
    work = tmp_path_factory.mktemp("bench-propagation")
    out = work / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--scenario", "propagation", "--users", "300", "--groups", "12",
         "--changes", str(SMOKE_CHANGES), "--window", "6", "--idle", "5", "--json", str(out),
         "--work", str(work / "state")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "propagation_p95_s" in done.stdout   # the table
    loaded: dict[str, object] = json.loads(out.read_text())
    return loaded


def test_propagation_reports_its_keys_and_every_change_reaches_the_target(propagation: dict[str, object]) -> None:
    assert set(PROPAGATION_KEYS) <= propagation.keys()
    assert propagation["propagation_changes"] == SMOKE_CHANGES
    assert propagation["propagation_lost"] == 0
    for key in ("propagation_p50_s", "propagation_p95_s", "propagation_max_s"):
        value = propagation[key]
        assert isinstance(value, int | float) and value > 0, (key, value)
    by_kind = propagation["propagation_by_kind"]
    assert isinstance(by_kind, dict)
    assert sorted(by_kind) == sorted(("disable", "attribute", "group_add", "group_remove", "delete", "new_hire"))
    assert all(k["n"] == 2 and k["max_s"] is not None for k in by_kind.values()), by_kind


def test_propagation_runs_the_daemon_with_its_defaults_and_no_full_cycle_in_the_windows(
        propagation: dict[str, object]) -> None:
    from daemon.config import DEFAULT_CHANGE_POLL_INTERVAL, DEFAULT_CHANGES, DEFAULT_INTERVAL

    assert propagation["propagation_interval_s"] == DEFAULT_INTERVAL
    assert propagation["propagation_change_poll_interval_s"] == DEFAULT_CHANGE_POLL_INTERVAL
    assert propagation["propagation_changes_mode"] == DEFAULT_CHANGES
    assert propagation["propagation_full_cycles_in_window"] == 0
    assert propagation["propagation_idle_full_cycles"] == 0
    assert propagation["propagation_feed_trouble"] == 0
    assert propagation["propagation_incremental_cycles"] >= 1
    assert propagation["propagation_daemon_exit"] == 0


def test_propagation_request_counts_add_up(propagation: dict[str, object]) -> None:
    full = propagation["pingone_requests_per_full_cycle"]
    polls = propagation["pingone_polls_per_idle_minute"]
    backstop = propagation["pingone_backstop_requests_per_minute"]
    idle = propagation["pingone_requests_per_idle_minute"]
    assert isinstance(full, int) and full > 0
    assert isinstance(polls, float) and polls > 0
    assert backstop == pytest.approx(full * 60 / propagation["propagation_interval_s"], abs=0.001)  # type: ignore[operator]
    assert idle == pytest.approx(polls + backstop, abs=0.011)  # type: ignore[operator]
    assert propagation["pingone_requests_in_change_window"] > 0  # type: ignore[operator]
    assert propagation["propagation_daemon_observations"] > 0  # type: ignore[operator]


def test_smoke_leaves_the_propagation_keys_null(results: dict[str, object]) -> None:
    assert set(PROPAGATION_KEYS) <= results.keys()
    assert all(results[key] is None for key in PROPAGATION_KEYS)
