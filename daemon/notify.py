"""The systemd notify protocol (sd_notify(3)), written by hand: one datagram per message.

A message is newline-separated `KEY=value` assignments sent to the AF_UNIX datagram socket named
by `$NOTIFY_SOCKET`: a filesystem path, or `@name` for the abstract namespace. With the
variable unset (not under systemd, or `Type=simple`) every send is a no-op.

The watchdog (`WatchdogSec=` in the unit, `$WATCHDOG_USEC` here) is kept alive by `watchdog()`,
a task that sends `WATCHDOG=1` every half period as long as the main loop keeps beating a
`Heartbeat`; when the main loop stops beating for longer than the period, the pings stop and
systemd restarts the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio

NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV: Final = "WATCHDOG_USEC"
WATCHDOG_PID_ENV: Final = "WATCHDOG_PID"
MAX_STATUS_CHARS: Final = 500          # STATUS= is one short line in `systemctl status`
DEFAULT_PING_FRACTION: Final = 0.5     # ping every half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises

Clock = Callable[[], float]


class NotifyAddressError(ValueError):
    """$NOTIFY_SOCKET names something that is not an AF_UNIX path or abstract name."""


def socket_address(value: str) -> str:
    """The AF_UNIX address for a `$NOTIFY_SOCKET` value: `@name` is the abstract `\\0name`."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyAddressError(f"unsupported NOTIFY_SOCKET {value!r}: expected an absolute path or @name")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def status_line(text: str) -> str:
    """`text` made fit for one STATUS= line: no line breaks, at most MAX_STATUS_CHARS."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_STATUS_CHARS else flat[: MAX_STATUS_CHARS - 1] + "…"


class Notifier:
    """Sends notify messages to one socket; `enabled` is False (and sends do nothing) without one."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.failures = 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier `$NOTIFY_SOCKET` asks for (disabled when unset or empty)."""
        env = os.environ if environ is None else environ
        value = env.get(NOTIFY_SOCKET_ENV, "")
        return cls(socket_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments as one datagram; False when not sent (never raises)."""
        if self.address is None or not assignments:
            return False
        data = ("\n".join(assignments) + "\n").encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError:
            # systemd gone or its queue full: the daemon carries on; the caller may log it.
            self.failures += 1
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={status_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={status_line(text)}",)


def watchdog_timeout(environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> float | None:
    """Seconds of `$WATCHDOG_USEC` when the watchdog is on for this process, else None.

    Like sd_watchdog_enabled(3): `$WATCHDOG_PID`, when set, must name this process.
    """
    env = os.environ if environ is None else environ
    raw = env.get(WATCHDOG_USEC_ENV, "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV, "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(raw) / 1_000_000


class Heartbeat:
    """Proof that the main loop is alive: it calls `beat()`, the watchdog reads `age()`."""

    __slots__ = ("_clock", "_last")

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last


async def watchdog(notifier: Notifier, window: float, heartbeat: Heartbeat, *, log: Any = None,
                   excused: Callable[[], bool] | None = None, fraction: float = DEFAULT_PING_FRACTION) -> None:
    """Send WATCHDOG=1 every `fraction * window` while `heartbeat` is younger than `window`.

    `window` is the watchdog timeout in seconds (`watchdog_timeout()`). `excused`, when it returns
    True, vouches for a main loop that is silent on purpose (a server asked it to wait). Runs until
    cancelled. A stale heartbeat (the main loop wedged) stops the pings, logged once as
    `watchdog.stalled`; they resume, logged as `watchdog.recovered`, if the loop beats again.
    """
    period = max(0.001, window * fraction)
    stalled = False
    while True:
        age = heartbeat.age()
        if age <= window or (excused is not None and excused()):
            notifier.watchdog()
            if stalled and log is not None:
                log.info("watchdog.recovered")
            stalled = False
        elif not stalled:
            stalled = True
            if log is not None:
                log.error("watchdog.stalled", heartbeat_age_s=round(age, 1), timeout_s=window)
        await anyio.sleep(period)
