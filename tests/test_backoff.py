"""Retry policy: full jitter, bounds, Retry-After (seconds and HTTP date), transient only."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from daemon.backoff import MAX_RETRY_AFTER, RetryPolicy, parse_retry_after, retry
from daemon.errors import BadRequest, Conflict, RateLimited, ServerError, Unauthorized


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 2.5 ") == 2.5
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1.0)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("86400") == MAX_RETRY_AFTER      # a server cannot park us for a day


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8          # jitter spans the range


async def test_transient_errors_are_retried_until_success() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ServerError("boom", status=503)
        return "ok"

    seen: list[int] = []
    policy = RetryPolicy(max_attempts=5, base_delay=0.001, max_delay=0.002)
    assert await retry(flaky, policy, on_retry=lambda n, exc, wait: seen.append(n)) == "ok"
    assert calls == 3 and seen == [1, 2]


@pytest.mark.parametrize("error", [BadRequest("no"), Unauthorized("no"), Conflict("no")])
async def test_answers_that_are_not_transient_are_raised_at_once(error: Exception) -> None:
    calls = 0

    async def refuse() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(type(error)):
        await retry(refuse, RetryPolicy(max_attempts=5, base_delay=0.001))
    assert calls == 1


async def test_attempts_and_elapsed_time_are_bounded() -> None:
    calls = 0

    async def always() -> None:
        nonlocal calls
        calls += 1
        raise ServerError("down", status=500)

    with pytest.raises(ServerError):
        await retry(always, RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.001))
    assert calls == 4
    calls = 0
    with pytest.raises(RateLimited):
        async def limited() -> None:
            nonlocal calls
            calls += 1
            raise RateLimited("slow down", retry_after=5.0)
        # Retry-After 5 s would overrun a 1 s budget: give up rather than wait past it
        await retry(limited, RetryPolicy(max_attempts=10, max_elapsed=1.0))
    assert calls == 1


async def test_retry_after_replaces_a_shorter_backoff() -> None:
    calls = 0

    async def limited_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RateLimited("slow down", retry_after=0.2)
        return "ok"

    started = time.monotonic()
    assert await retry(limited_once, RetryPolicy(base_delay=0.001, max_delay=0.001)) == "ok"
    assert time.monotonic() - started >= 0.19
