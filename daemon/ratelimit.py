"""The per-target rate governor: one token bucket shared by every worker, AIMD on 429s.

Every request to a target first takes a token. A 429 halves the rate (never below `min_rate`)
and, when the server said how long to wait (`Retry-After`), closes the gate for everyone until
then; each success adds `increase` back, up to the configured ceiling. Waiters are served in
arrival order (one lock), so a busy worker cannot starve the others.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

DEFAULT_MIN_RATE = 0.2          # requests per second; the floor multiplicative decrease stops at
DEFAULT_DECREASE = 0.5          # rate *= this on a 429
DEFAULT_INCREASE_FRACTION = 1 / 20  # additive increase per success, as a fraction of the ceiling
DEFAULT_BURST_SECONDS = 1.0     # default burst = this many seconds of the rate (at least 1 token)

_EPSILON = 1e-9                 # float slack: a token 1e-9 short is a token (no zero-length sleeps)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateGovernor:
    """A token bucket of `rate` tokens per second holding at most `burst`, adapted by AIMD."""

    __slots__ = (
        "_burst", "_clock", "_explicit_increase", "_increase", "_lock", "_min_rate", "_paused_until",
        "_sleep", "_stamp", "_tokens", "ceiling", "rate",
    )

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        min_rate: float = DEFAULT_MIN_RATE,
        increase: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if rate <= 0 or min_rate <= 0:
            raise ValueError("rate and min_rate must be positive")
        self._clock = clock
        self._sleep = sleep
        self._min_rate = min(min_rate, rate)
        self._explicit_increase = increase
        self.ceiling = float(rate)
        self.rate = float(rate)
        self._burst = _burst_for(rate, burst)
        self._increase = increase if increase is not None else rate * DEFAULT_INCREASE_FRACTION
        self._tokens = self._burst
        self._stamp = clock()
        self._paused_until = 0.0
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"RateGovernor(rate={self.rate:.3g}, ceiling={self.ceiling:.3g}, burst={self._burst:.3g})"

    @property
    def burst(self) -> float:
        """Tokens the bucket holds at most; scaled down with the rate while throttled."""
        return max(1.0, self._burst * self.rate / self.ceiling)

    @property
    def paused_for(self) -> float:
        """Seconds left of a Retry-After pause (0 when none is in force)."""
        return max(0.0, self._paused_until - self._clock())

    async def acquire(self) -> None:
        """Wait for a token, and for any Retry-After pause in force."""
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                self._refill(now)
                if self._tokens >= 1.0 - _EPSILON:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)

    def throttled(self, retry_after: float | None) -> None:
        """A 429 arrived: halve the rate (not below `min_rate`); pause everyone for `retry_after`."""
        now = self._clock()
        self._refill(now)
        self.rate = max(self._min_rate, self.rate * DEFAULT_DECREASE)
        self._tokens = min(self._tokens, 0.0)
        if retry_after is not None and retry_after > 0:
            self._paused_until = max(self._paused_until, now + retry_after)

    def succeeded(self) -> None:
        """A request succeeded: additive increase toward the ceiling."""
        if self.rate < self.ceiling:
            self._refill(self._clock())
            self.rate = min(self.ceiling, self.rate + self._increase)

    def resize(self, rate: float, burst: float | None = None) -> None:
        """Live reload: a new ceiling (and burst). An unthrottled governor runs at the new ceiling."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._refill(self._clock())
        unthrottled = self.rate >= self.ceiling
        self.ceiling = float(rate)
        self.rate = self.ceiling if unthrottled else min(self.rate, self.ceiling)
        self._min_rate = min(self._min_rate, self.ceiling)
        self._burst = _burst_for(rate, burst)
        self._increase = (
            self._explicit_increase if self._explicit_increase is not None
            else rate * DEFAULT_INCREASE_FRACTION
        )
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        # No tokens accrue during a Retry-After pause: the server asked for silence, not a burst after.
        since = max(self._stamp, self._paused_until)
        elapsed = max(0.0, now - since)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = now


def _burst_for(rate: float, burst: float | None) -> float:
    if burst is not None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        return float(burst)
    return max(1.0, rate * DEFAULT_BURST_SECONDS)
