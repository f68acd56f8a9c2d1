"""Fault injection shared by the emulators: latency, errors, 429s, hangs, malformed bodies, drops.

A `Faults` object is mutable on purpose: tests change it while the emulator runs. The middleware
built by `fault_middleware` consults it on every request whose path does not start with an
excluded prefix (the admin and inspection routes are never faulted).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorFactory = Callable[[int, str], web.Response]
LimitFactory = Callable[[float | None], web.Response]


@dataclass
class TokenBucket:
    """A classic token bucket: `rate` tokens per second, at most `burst` stored."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """Take one token; return 0.0 when granted, else the seconds until one is available."""
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Faults:
    """What to break. All zero by default: a well-behaved server."""

    latency_ms: float = 0.0            # fixed delay added to every request
    jitter_ms: float = 0.0             # plus uniform(0, jitter_ms)
    # "before": the delay is slept before the request is handled, so the emulator's own work (and
    # its queue, when many requests arrive at once) comes on top of it. "deadline": the request is
    # handled at once and answered when the delay has passed since it arrived, i.e. the delay IS
    # the response time, as for a server farm whose processing is part of its latency (the
    # benchmarks' `L`). A request still being processed at the deadline is answered when done.
    latency_mode: str = "before"
    error_rate: float = 0.0            # fraction answered with a 5xx from `error_statuses`
    error_statuses: tuple[int, ...] = (500, 503)
    rate_limit_429: float = 0.0        # fraction answered 429 at random
    retry_after: float | None = 1.0    # Retry-After seconds sent with 429s; None = header absent
    rate_limit_rps: float | None = None  # token bucket: beyond this rate, answer 429
    rate_limit_burst: float | None = None
    hang_rate: float = 0.0             # fraction that never answer (until the client gives up)
    fail_nth: dict[int, str] = field(default_factory=dict)  # request number (1-based) -> kind
    # kinds for fail_nth: "429", "500", "503", "malformed", "truncated", "drop", "hang", and
    # "miscount" (a well-formed page whose top-level `count` says one item more than the listing
    # holds: a source that lost an item between pages)
    # With nth_only (a regex over the path and query), fail_nth counts only the requests it
    # matches (in `matched_count`): "the 3rd users page" stays the 3rd when other reads run
    # concurrently with the listing.
    nth_only: str | None = None
    matched_count: int = 0
    seed: int | None = None
    request_count: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _bucket: TokenBucket | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.seed is not None:
            self._rng.seed(self.seed)

    def reset(self) -> None:
        """Back to a well-behaved server (request count kept)."""
        keep = self.request_count
        self.__init__()  # type: ignore[misc]
        self.request_count = keep

    def bucket(self) -> TokenBucket | None:
        if self.rate_limit_rps is None:
            return None
        burst = self.rate_limit_burst if self.rate_limit_burst is not None else max(1.0, self.rate_limit_rps)
        if self._bucket is None or self._bucket.rate != self.rate_limit_rps or self._bucket.burst != burst:
            self._bucket = TokenBucket(self.rate_limit_rps, burst)
        return self._bucket


HANG_SECONDS = 3600.0


def fault_middleware(
    faults: Faults,
    *,
    error_response: ErrorFactory,
    limit_response: LimitFactory,
    exclude_prefixes: tuple[str, ...] = ("/_admin",),
) -> Middleware:
    """Build an aiohttp middleware that applies *faults*; bodies come from the emulator's factories."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(exclude_prefixes):
            return await handler(request)
        faults.request_count += 1
        n: int | None = faults.request_count
        if faults.nth_only is not None:
            if re.search(faults.nth_only, request.path_qs):
                faults.matched_count += 1
                n = faults.matched_count
            else:
                n = None
        rng = faults._rng
        delay = faults.latency_ms + (rng.uniform(0, faults.jitter_ms) if faults.jitter_ms else 0.0)
        if delay > 0 and faults.latency_mode == "deadline":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + delay / 1000.0
            response = await _answer(request, handler, faults, n, rng)
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
            return response
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        return await _answer(request, handler, faults, n, rng)

    async def _answer(request: web.Request, handler: Handler, faults: Faults, n: int | None,
                      rng: random.Random) -> web.StreamResponse:
        kind = faults.fail_nth.get(n) if n is not None else None
        if kind is None:
            if faults.hang_rate and rng.random() < faults.hang_rate:
                kind = "hang"
            elif faults.error_rate and rng.random() < faults.error_rate:
                kind = str(rng.choice(faults.error_statuses))
            elif faults.rate_limit_429 and rng.random() < faults.rate_limit_429:
                kind = "429"
            else:
                bucket = faults.bucket()
                if bucket is not None and bucket.take() > 0:
                    kind = "429"
        if kind is None:
            return await handler(request)
        if kind == "hang":
            await asyncio.sleep(HANG_SECONDS)
            return error_response(504, "hung")
        if kind == "429":
            return limit_response(faults.retry_after)
        if kind.isdigit():
            return error_response(int(kind), "injected fault")
        if kind == "drop":
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError
        response = await handler(request)
        body = getattr(response, "body", None)
        if kind == "malformed":
            return web.Response(status=200, body=b'{"_embedded": {"users": [ {"id": ', content_type="application/json")
        if kind == "miscount" and isinstance(body, bytes | bytearray):
            return _miscounted(response, bytes(body))
        if kind == "truncated" and isinstance(body, bytes | bytearray):
            return web.Response(status=response.status, body=bytes(body[: max(1, len(body) // 2)]),
                                content_type="application/json")
        return response

    return middleware


def _miscounted(response: web.StreamResponse, body: bytes) -> web.StreamResponse:
    """The same page with its top-level `count` one higher (unchanged when it has none)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return response
    if not isinstance(parsed, dict) or not isinstance(parsed.get("count"), int):
        return response
    parsed["count"] += 1
    return web.Response(status=response.status, body=json.dumps(parsed).encode(),
                        content_type="application/json")
