"""Serve an emulator's aiohttp app on a loopback port, for tests, the demo and the benchmarks."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

DEFAULT_HOST = "127.0.0.1"


@asynccontextmanager
async def serve(app: web.Application, host: str = DEFAULT_HOST, port: int = 0) -> AsyncIterator[str]:
    """Run *app* on host:port (0 = a free port) and yield its base URL ``http://host:port``."""
    # A hung handler (the "hang" fault) must not hold shutdown for aiohttp's default 60 s.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5,
                           handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    bound = sock.getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()
