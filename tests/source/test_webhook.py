"""`POST /pingone/events` over loopback: the shared secret, limits, durable storage, and the
PingOne emulator's subscription delivering into it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from daemon.metrics import Health, Metrics, serve_http
from daemon.sandbox.activities import DEFAULT_ACTION_TYPES, FeedSettings
from daemon.sandbox.directory import Directory
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve
from daemon.source.changes import SECRET_HEADER, WEBHOOK_PATH, ChangeFeed, Inbox, mount_webhook
from daemon.source.pingone import PingOneClient
from daemon.store import Store

pytestmark = pytest.mark.timeout(60)

SECRET = "webhook-shared-secret-0123456789"
MAX_BODY = 4096


def activity(n: int, user: str = "u1") -> dict[str, Any]:
    return {"id": f"a{n}", "recordedAt": f"2026-03-01T00:00:0{n % 10}.000Z",
            "action": {"type": "USER.UPDATED"}, "resources": [{"type": "USER", "id": user}],
            "result": {"status": "SUCCESS"}}


class Receiver:
    def __init__(self, url: str, session: aiohttp.ClientSession, path: Path) -> None:
        self.url = url
        self.session = session
        self.path = path

    async def post(self, body: Any = None, *, secret: str | None = SECRET, raw: bytes | None = None,
                   content_type: str = "application/json") -> int:
        headers = {"Content-Type": content_type}
        if secret is not None:
            headers[SECRET_HEADER] = secret
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(self.url + WEBHOOK_PATH, data=data, headers=headers) as response:
            return response.status

    def stored(self) -> list[Any]:
        """The inbox as another process would read it: a plain sqlite3 connection."""
        with sqlite3.connect(self.path) as db:
            return [json.loads(body) for (body,) in db.execute("SELECT body FROM change_inbox ORDER BY seq")]


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    path = tmp_path / "state.db"
    store = await Store.open(path)
    inbox = await Inbox.open(path)
    app = web.Application()
    mount_webhook(app, inbox, SECRET, max_body=MAX_BODY)
    try:
        async with serve(app) as url, aiohttp.ClientSession() as session:
            yield Receiver(url, session, path)
    finally:
        await inbox.close()
        await store.close()


async def test_a_batch_with_the_secret_is_stored_before_the_2xx(receiver: Receiver) -> None:
    assert await receiver.post(activity(1)) == 204
    assert await receiver.post([activity(2), activity(3)]) == 204
    assert receiver.stored() == [[activity(1)], [activity(2), activity(3)]]


async def test_on_stored_is_called_for_each_stored_batch_only(tmp_path: Path) -> None:
    """The daemon's wake-up (poll the inbox at once): after a batch is stored, never for a refusal."""
    path = tmp_path / "state.db"
    store = await Store.open(path)
    inbox = await Inbox.open(path)
    calls: list[int] = []
    app = web.Application()

    def stored() -> None:
        with sqlite3.connect(path) as db:
            calls.append(db.execute("SELECT count(*) FROM change_inbox").fetchone()[0])

    mount_webhook(app, inbox, SECRET, on_stored=stored)
    try:
        async with serve(app) as url, aiohttp.ClientSession() as session:
            receiver = Receiver(url, session, path)
            assert await receiver.post(activity(1), secret="wrong") == 401
            assert await receiver.post(raw=b"{not json") == 400
            assert calls == []
            assert await receiver.post(activity(1)) == 204
            assert await receiver.post([activity(2), activity(3)]) == 204
            assert calls == [1, 2]       # each call came after its batch was in the inbox
    finally:
        await inbox.close()
        await store.close()


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET[:-1], SECRET + "x"])
async def test_a_missing_or_wrong_secret_is_refused_and_nothing_stored(receiver: Receiver,
                                                                       secret: str | None) -> None:
    with capture_logs() as events:
        assert await receiver.post(activity(1), secret=secret) == 401
    assert receiver.stored() == []
    assert events and all(SECRET not in repr(event) for event in events)


@pytest.mark.parametrize(("raw", "content_type", "status"), [
    (b"x" * (MAX_BODY + 1), "application/json", 413),
    (b"{not json", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b"[]", "application/json", 400),
    (b'{"id": "a1"}', "application/json", 400),
    (b'[{"id": "a1", "recordedAt": "t"}, 5]', "application/json", 400),
    (b'"text"', "application/json", 400),
    (json.dumps(activity(1)).encode(), "text/plain", 415),
])
async def test_oversized_malformed_or_not_json_bodies_are_refused(receiver: Receiver, raw: bytes,
                                                                  content_type: str, status: int) -> None:
    assert await receiver.post(raw=raw, content_type=content_type) == status
    assert receiver.stored() == []
    assert await receiver.post(activity(1)) == 204     # and the receiver still takes good ones
    assert len(receiver.stored()) == 1


async def test_a_chunked_body_over_the_limit_is_refused(receiver: Receiver) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    headers = {"Content-Type": "application/json", SECRET_HEADER: SECRET}
    async with receiver.session.post(receiver.url + WEBHOOK_PATH, data=chunks(), headers=headers) as response:
        assert response.status == 413
    assert receiver.stored() == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_and_paths_are_refused(receiver: Receiver, method: str) -> None:
    headers = {SECRET_HEADER: SECRET}
    async with receiver.session.request(method, receiver.url + WEBHOOK_PATH, headers=headers) as response:
        assert response.status == 405
    async with receiver.session.post(receiver.url + "/pingone/other", json=activity(1), headers=headers) as r:
        assert r.status == 404
    assert receiver.stored() == []


async def test_emulator_subscription_delivers_through_the_receiver_into_the_feed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await Store.open(path)
    inbox = await Inbox.open(path)
    app = web.Application()
    mount_webhook(app, inbox, SECRET)
    emulator = PingOneEmulator(Directory(), feed_settings=FeedSettings(webhook_retry=0.02))
    try:
        async with serve(app) as hook, serve(emulator.app()) as base, aiohttp.ClientSession() as session:
            client = PingOneClient(session, api_url=f"{base}/v1", auth_url=base,
                                   environment_id=emulator.directory.env_id, client_id=DEFAULT_CLIENT_ID,
                                   client_secret=DEFAULT_CLIENT_SECRET)
            token = await client.token()
            body = {"name": "provisiond", "enabled": True, "format": "ACTIVITY",
                    "httpEndpoint": {"url": hook + WEBHOOK_PATH, "headers": {SECRET_HEADER: SECRET}},
                    "filterOptions": {"includedActionTypes": sorted(set(DEFAULT_ACTION_TYPES.values()))}}
            async with session.post(f"{base}/v1/environments/{emulator.directory.env_id}/subscriptions",
                                    json=body, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 201
            d = emulator.directory
            user = d.add_user("hook@example.com")["id"]
            group = d.add_group("Hooked")["id"]
            d.add_member(group, user)
            deadline = time.monotonic() + 10
            while emulator.feed.subscriptions and next(iter(emulator.feed.subscriptions.values())).delivered < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            feed = ChangeFeed(client, store)
            batch = await feed.poll(audit=False)
            assert batch.changes.user_ids == {user} and batch.changes.group_ids == {group}
            assert len(batch.inbox_seqs) == 3 and batch.watermark is None
            await feed.commit(batch)
            assert not await feed.poll(audit=False)
            with sqlite3.connect(path) as db:
                assert db.execute("SELECT COUNT(*) FROM change_inbox").fetchone()[0] == 0
                assert db.execute("SELECT COUNT(*) FROM change_seen").fetchone()[0] == 3
    finally:
        await inbox.close()
        await store.close()


async def test_the_http_listen_server_mounts_the_receiver_beside_metrics_and_health(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await Store.open(path)
    inbox = await Inbox.open(path)
    try:
        async with serve_http(Metrics(), Health(), "127.0.0.1:0",
                              mount=lambda app: mount_webhook(app, inbox, SECRET)) as url, \
                aiohttp.ClientSession() as session:
            receiver = Receiver(url, session, path)
            assert await receiver.post(activity(1), secret="nope") == 401
            assert await receiver.post(activity(1)) == 204
            assert receiver.stored() == [[activity(1)]]
            async with session.get(url + "/metrics") as response:
                assert response.status == 200
    finally:
        await inbox.close()
        await store.close()
