"""scim2-server (an independent SCIM 2.0 implementation) as a separate process on loopback.

`scim2_server` yields the base URL ``http://127.0.0.1:P/v2`` of a fresh, empty server that
accepts only the bearer token `SCIM2_TOKEN`; `scim2_servers` is a factory for tests that need
more than one. Each server runs through `launch_scim2_server.py` (listen backlog raised) and is
stopped with SIGINT, then killed if it lingers.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.interop.launch_scim2_server import READY_PREFIX

SCIM2_TOKEN = "interop-scim2-server-token"
LAUNCHER = Path(__file__).with_name("launch_scim2_server.py")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT = 20.0   # python start + pydantic imports; about 1 s on a 2-core machine
DEFAULT_STOP_TIMEOUT = 5.0


class Scim2ServerFailed(RuntimeError):
    """scim2-server did not come up (its stderr is in the message)."""


def _read_ready_line(proc: subprocess.Popen[str], deadline: float) -> int:
    """The port from the launcher's ready line; Scim2ServerFailed when the process ends first."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(READY_PREFIX):
            return int(line.split()[-1])
    raise Scim2ServerFailed(f"no ready line from scim2-server (exit code {proc.poll()})")


def _wait_for_port(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((DEFAULT_HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@contextmanager
def scim2_server_process(token: str = SCIM2_TOKEN, *options: str) -> Iterator[str]:
    """Start scim2-server on a free loopback port (with any further scim2-server *options*);
    yield ``http://127.0.0.1:P/v2``; stop it."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--hostname", DEFAULT_HOST, "--port", "0",
             f"--bearer-token={token}",   # one argument: a token that starts with "-" is no option
             *options],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
        )
        try:
            deadline = time.monotonic() + DEFAULT_START_TIMEOUT
            try:
                port = _read_ready_line(proc, deadline)
                _wait_for_port(port, deadline)
            except (Scim2ServerFailed, OSError) as exc:
                stderr.seek(0)
                raise Scim2ServerFailed(f"{exc}\n{stderr.read()[-2000:]}") from exc
            yield f"http://{DEFAULT_HOST}:{port}/v2"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)   # the CLI stops serve_forever on KeyboardInterrupt
                try:
                    proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def scim2_server() -> Iterator[str]:
    """A fresh scim2-server; its base URL."""
    with scim2_server_process() as url:
        yield url


@pytest.fixture
def scim2_servers() -> Iterator[Callable[[], str]]:
    """A factory: each call starts another fresh scim2-server and returns its base URL."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(scim2_server_process())
