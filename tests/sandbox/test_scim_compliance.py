"""The scim2-cli compliance checker (scim2-tester) passes against the emulator's `generic` profile.

No check is waived: the run must exit 0 (every check SUCCESS; scim2-cli counts a SKIPPED as a failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.sandbox.scim import DEFAULT_TOKEN

SCIM2 = Path(sys.executable).parent / "scim2"
CHECK_TIMEOUT_S = 90


@pytest.fixture
def emulator_url() -> Iterator[str]:
    with subprocess.Popen(
        [sys.executable, "-m", "daemon.sandbox.scim", "--profile", "generic", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:"), url
            yield url
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0  # SIGTERM stops it cleanly


@pytest.mark.timeout(CHECK_TIMEOUT_S + 20)
def test_scim2_checker_passes_against_generic_profile(emulator_url: str) -> None:
    assert SCIM2.exists(), f"scim2-cli not installed next to {sys.executable}"
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    result = subprocess.run(
        [str(SCIM2), "--url", emulator_url, "-h", f"Authorization: Bearer {DEFAULT_TOKEN}", "test"],
        capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env,
    )
    failures = [line for line in result.stdout.splitlines() if line.startswith(("ERROR", "SKIPPED"))]
    assert result.returncode == 0, f"checker failed: {failures}\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.count("SUCCESS") >= 90  # the whole suite ran, not just discovery
