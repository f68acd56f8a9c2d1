"""Hypothesis profiles for the whole suite, and fixtures several test files share.

`ci` (the default, and what CI=true selects) is bounded and reproducible: derandomized, no example
database, no deadline (the lifecycle test's examples run whole sync cycles). `long` is for local
runs: `HYPOTHESIS_PROFILE=long python -m pytest tests/test_lifecycle.py`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# No shrinking in CI: a failure is reported at once with its steps and a blob to replay locally
# (`@reproduce_failure`), rather than shrunk for minutes past the test's timeout.
settings.register_profile("ci", max_examples=10, stateful_step_count=6, derandomize=True, database=None,
                          deadline=None, suppress_health_check=_SLOW, print_blob=True,
                          phases=[Phase.explicit, Phase.generate])
settings.register_profile("long", max_examples=300, stateful_step_count=25, deadline=None,
                          suppress_health_check=_SLOW, print_blob=True)
# a local bug hunt: no shrinking, fresh random examples
settings.register_profile("explore", max_examples=10, stateful_step_count=4, database=None, deadline=None,
                          suppress_health_check=_SLOW, print_blob=True,
                          phases=[Phase.explicit, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not this one (`sleep`): the owner of a foreign claim in tests of the
    cross-process write claims (its liveness is the kernel's answer)."""
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
