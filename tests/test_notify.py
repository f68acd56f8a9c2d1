"""The sd_notify protocol over a real AF_UNIX datagram socket owned by the test."""

from __future__ import annotations

import functools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from daemon.notify import (
    MAX_STATUS_CHARS,
    Heartbeat,
    Notifier,
    NotifyAddressError,
    monotonic_usec,
    socket_address,
    watchdog,
    watchdog_timeout,
)


class Receiver:
    """The test's end of $NOTIFY_SOCKET."""

    def __init__(self, env_value: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(env_value))
        self.sock.settimeout(2.0)

    def datagram(self) -> str:
        return self.sock.recv(65536).decode()

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        out: list[str] = []
        try:
            while True:
                out.append(self.sock.recv(65536).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    receiver = Receiver(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    receiver = Receiver(f"@provisiond-notify-test-{uuid.uuid4().hex}")
    yield receiver
    receiver.sock.close()


def test_ready_is_one_datagram_to_a_socket_path(path_receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value})
    assert notifier.enabled
    assert notifier.ready(status="ready; first cycle starting")
    assert path_receiver.datagram() == "READY=1\nSTATUS=ready; first cycle starting\n"
    notifier.close()


def test_an_abstract_namespace_socket_is_reached_through_its_at_name(abstract_receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": abstract_receiver.env_value})
    assert notifier.stopping()
    assert abstract_receiver.datagram() == "STOPPING=1\n"
    notifier.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(path_receiver: Receiver) -> None:
    notifier = Notifier(socket_address(path_receiver.env_value))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = monotonic_usec()
    fields = dict(line.split("=", 1) for line in path_receiver.datagram().splitlines())
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notifier.close()


def test_status_is_one_line_of_bounded_length(path_receiver: Receiver) -> None:
    notifier = Notifier(socket_address(path_receiver.env_value))
    notifier.status("zpa: applying 1200/5000,\nETA 2m")
    assert path_receiver.datagram() == "STATUS=zpa: applying 1200/5000, ETA 2m\n"
    notifier.status("x" * 5000)
    line = path_receiver.datagram().rstrip("\n")
    assert len(line) == len("STATUS=") + MAX_STATUS_CHARS
    notifier.close()


def test_without_notify_socket_every_send_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.failures == 0


def test_an_unreachable_socket_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert not notifier.ready()
    assert notifier.failures == 1
    notifier.close()


@pytest.mark.parametrize("value", ["relative/path.sock", "@", "vsock:2:1234"])
def test_a_notify_socket_that_is_neither_a_path_nor_an_abstract_name_is_refused(value: str) -> None:
    with pytest.raises(NotifyAddressError):
        Notifier.from_environ({"NOTIFY_SOCKET": value})


def test_watchdog_timeout_comes_from_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_timeout({}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "120000000"}) == 120.0
    assert watchdog_timeout({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_timeout({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=4242) is None


async def test_watchdog_pings_every_half_period_while_the_heartbeat_is_fresh(path_receiver: Receiver) -> None:
    notifier = Notifier(socket_address(path_receiver.env_value))
    heartbeat = Heartbeat()
    window = 0.2
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog, notifier, window, heartbeat)
        for _ in range(8):
            heartbeat.beat()
            await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    pings = path_receiver.pending()
    assert set(pings) == {"WATCHDOG=1\n"}
    assert 6 <= len(pings) <= 10           # 0.8 s at one ping per 0.1 s
    notifier.close()


async def test_watchdog_stops_pinging_when_the_main_loop_stops_beating(path_receiver: Receiver) -> None:
    notifier = Notifier(socket_address(path_receiver.env_value))
    now = [0.0]
    heartbeat = Heartbeat(clock=lambda: now[0])
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(watchdog, notifier, 0.1, heartbeat, log=structlog.get_logger()))
            await anyio.sleep(0.12)            # fresh: pings at 0 and 0.05 and 0.1
            fresh = len(path_receiver.pending())
            now[0] = 10.0                      # the main loop has not beaten for 10 s
            await anyio.sleep(0.1)
            path_receiver.pending()            # at most one ping raced the change
            await anyio.sleep(0.2)
            stalled = len(path_receiver.pending())
            heartbeat.beat()
            await anyio.sleep(0.1)
            recovered = len(path_receiver.pending())
            tg.cancel_scope.cancel()
    assert fresh >= 2
    assert stalled == 0
    assert recovered >= 1
    events = [e["event"] for e in logs]
    assert events.count("watchdog.stalled") == 1
    assert "watchdog.recovered" in events
    notifier.close()


async def test_a_loop_silent_on_purpose_is_excused_and_keeps_the_pings(path_receiver: Receiver) -> None:
    notifier = Notifier(socket_address(path_receiver.env_value))
    now = [0.0]
    heartbeat = Heartbeat(clock=lambda: now[0])
    now[0] = 10.0                              # silent for 10 s, but a server asked for it
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(watchdog, notifier, 0.1, heartbeat, excused=lambda: True))
        await anyio.sleep(0.22)
        tg.cancel_scope.cancel()
    assert len(path_receiver.pending()) >= 3
    notifier.close()
