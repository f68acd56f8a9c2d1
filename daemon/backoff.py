"""Retry policy: exponential backoff with full jitter, bounded in attempts and in total time.

`retry` runs an async callable and retries it on `TransientError` only: a 400, 401, 403,
404, 409 or 422 is an answer, not a hiccup, and is raised at once. A 429's `Retry-After`
is honoured (it replaces the computed backoff when larger).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from daemon.errors import TransientError

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_BASE_DELAY = 0.5
DEFAULT_MAX_DELAY = 30.0
DEFAULT_MAX_ELAPSED = 120.0
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    max_elapsed: float = DEFAULT_MAX_ELAPSED

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform(0, min(max_delay, base * 2**(attempt-1)))."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return (rng or random).uniform(0.0, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date. None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


OnRetry = Callable[[int, TransientError, float], None]


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: OnRetry | None = None,
) -> T:
    """Await `call()`; on a TransientError wait and try again within the policy's bounds.

    The last TransientError is raised once attempts or the elapsed-time budget run out.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TransientError as exc:
            wait = policy.delay(attempt)
            if exc.retry_after is not None:
                wait = max(wait, exc.retry_after)
            elapsed = time.monotonic() - started
            if attempt >= policy.max_attempts or elapsed + wait > policy.max_elapsed:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            await anyio.sleep(wait)
