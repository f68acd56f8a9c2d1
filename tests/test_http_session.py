"""`daemon.http_session`: the one client session, against real servers on loopback: TLS is
verified (a self-signed certificate is refused), and proxy variables in the environment are
ignored (traffic goes only where the config says)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from daemon.http_session import http_session

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A server on 127.0.0.1 answering every path with *handler*; yields its port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make the test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=20)
    return key, cert


async def test_a_certificate_the_system_does_not_trust_is_refused(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async with serving(hello, server_ctx) as port, http_session() as session:
        url = f"https://127.0.0.1:{port}/scim/v2/Users"
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(url):
                pass
        # the same server, its certificate trusted explicitly: it was the verification that refused
        trusted = ssl.create_default_context(cafile=str(cert))
        async with session.get(url, ssl=trusted) as resp:
            assert resp.status == 200 and await resp.text() == "hello"


async def test_proxy_variables_in_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.Response(text="proxy")

    async def target(request: web.Request) -> web.Response:
        return web.Response(text="target")

    async with serving(proxy) as proxy_port, serving(target) as target_port:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        url = f"http://127.0.0.1:{target_port}/scim/v2/Users"
        async with http_session() as session, session.get(url) as resp:
            assert await resp.text() == "target"
        assert seen == []
        # a session that reads the environment goes through the proxy: the variables were live
        async with aiohttp.ClientSession(trust_env=True) as session, session.get(url) as resp:
            assert await resp.text() == "proxy"
        assert len(seen) == 1
