"""The rate governor on a fake clock (deterministic), plus one short real-clock check."""

from __future__ import annotations

import time

import anyio
import pytest

from daemon.ratelimit import RateGovernor


class FakeClock:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


def governor(rate: float, burst: float | None = None, **kw: float) -> tuple[RateGovernor, FakeClock]:
    clock = FakeClock()
    return RateGovernor(rate, burst, clock=clock, sleep=clock.sleep, **kw), clock


async def test_acquire_honours_rate_after_burst() -> None:
    gov, clock = governor(10.0, burst=5)
    start = clock.now
    for _ in range(5 + 100):
        await gov.acquire()
    # 5 tokens free, then 100 at 10/s.
    assert clock.now - start == pytest.approx(10.0, rel=1e-6)


async def test_burst_is_available_at_once() -> None:
    gov, clock = governor(2.0, burst=4)
    for _ in range(4):
        await gov.acquire()
    assert clock.slept == []


async def test_concurrent_workers_share_one_bucket() -> None:
    gov, clock = governor(20.0, burst=1)
    start = clock.now

    async def worker() -> None:
        for _ in range(10):
            await gov.acquire()

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(worker)
    # 80 acquires, 1 from the burst, 79 at 20/s.
    assert clock.now - start == pytest.approx(79 / 20, rel=1e-6)


async def test_throttled_halves_rate_not_below_min() -> None:
    gov, _ = governor(8.0, min_rate=1.5)
    gov.throttled(None)
    assert gov.rate == 4.0
    gov.throttled(None)
    gov.throttled(None)
    assert gov.rate == 1.5
    assert gov.ceiling == 8.0


async def test_throttled_with_retry_after_pauses_every_acquirer() -> None:
    gov, clock = governor(100.0, burst=10)
    start = clock.now
    gov.throttled(3.0)
    await gov.acquire()
    assert clock.now - start >= 3.0
    assert clock.now - start == pytest.approx(3.0 + 1 / 50, rel=1e-6)  # then one token at the halved rate


async def test_succeeded_increases_additively_back_to_ceiling() -> None:
    gov, _ = governor(10.0)
    gov.throttled(None)
    assert gov.rate == 5.0
    gov.succeeded()
    assert gov.rate == pytest.approx(5.5)    # + ceiling / 20
    for _ in range(50):
        gov.succeeded()
    assert gov.rate == 10.0


async def test_explicit_increase() -> None:
    gov, _ = governor(10.0, increase=2.0)
    gov.throttled(None)
    gov.succeeded()
    assert gov.rate == 7.0


async def test_resize_changes_ceiling_and_pace() -> None:
    gov, clock = governor(10.0, burst=1)
    await gov.acquire()
    gov.resize(2.0, burst=1)
    assert (gov.rate, gov.ceiling) == (2.0, 2.0)
    start = clock.now
    for _ in range(4):
        await gov.acquire()
    assert clock.now - start == pytest.approx(2.0, rel=1e-6)


async def test_resize_keeps_a_throttled_rate_below_the_new_ceiling() -> None:
    gov, _ = governor(10.0)
    gov.throttled(None)
    gov.resize(20.0)
    assert (gov.rate, gov.ceiling) == (5.0, 20.0)
    gov.resize(3.0)
    assert gov.rate == 3.0


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateGovernor(0)
    with pytest.raises(ValueError):
        RateGovernor(5, burst=0.5)


async def test_real_clock_rate_within_tolerance() -> None:
    gov = RateGovernor(50.0, burst=1)
    start = time.monotonic()
    for _ in range(26):
        await gov.acquire()
    elapsed = time.monotonic() - start
    # 25 intervals of 20 ms: never sooner (the governor's promise); later only by the machine's load,
    # so the upper bound only catches a governor that waits whole seconds.
    assert 0.45 <= elapsed < 5.0
