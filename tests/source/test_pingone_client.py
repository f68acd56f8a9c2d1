"""PingOneClient against the PingOne emulator over loopback: token, paging, retries, typed errors."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from structlog.tracebacks import ExceptionDictTransformer

from daemon.backoff import RetryPolicy
from daemon.errors import (
    ConnectionFailed,
    MalformedResponse,
    RequestTimeout,
    ServerError,
    Unauthorized,
)
from daemon.sandbox.directory import Directory, generate
from daemon.sandbox.faults import Faults
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve
from daemon.source.pingone import AmbiguousUser, PingOneClient

pytestmark = pytest.mark.timeout(30)

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, max_elapsed=10.0)


class Env:
    """A running emulator and a client session bound to it."""

    def __init__(self, emulator: PingOneEmulator, base: str, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.base = base
        self.session = session

    @property
    def directory(self) -> Directory:
        return self.emulator.directory

    @property
    def faults(self) -> Faults:
        return self.emulator.faults

    def client(self, **overrides: Any) -> PingOneClient:
        kwargs: dict[str, Any] = {
            "api_url": f"{self.base}/v1", "auth_url": self.base,
            "environment_id": self.directory.env_id, "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET, "policy": FAST,
        }
        kwargs.update(overrides)
        return PingOneClient(self.session, **kwargs)

    def fail_next(self, *kinds: str) -> None:
        """The next len(kinds) requests that reach the fault layer fail as given, in order."""
        start = self.faults.request_count
        self.faults.fail_nth = {start + i + 1: kind for i, kind in enumerate(kinds)}


@asynccontextmanager
async def running(directory: Directory | None = None, **emulator_kwargs: Any) -> AsyncIterator[Env]:
    emulator = PingOneEmulator(directory or generate(40, 8, seed=3), **emulator_kwargs)
    async with serve(emulator.app()) as base, aiohttp.ClientSession() as session:
        yield Env(emulator, base, session)


# --- token -----------------------------------------------------------------------------------------

async def test_basic_client_auth_gets_a_token_and_caches_it() -> None:
    async with running(auth_method="basic") as env:
        client = env.client(client_auth="basic")
        first = await client.token()
        await client.get("users", {"limit": "1"})
        await client.get("groups", {"limit": "1"})
        assert await client.token() == first
        assert client.stats["token"] == 1
        assert env.emulator.counters["token"] == 1


async def test_post_client_auth_gets_a_token() -> None:
    async with running(auth_method="post") as env:
        client = env.client(client_auth="post")
        body = await client.get("users", {"limit": "2"})
        assert len(body["_embedded"]["users"]) == 2
        assert env.emulator.counters["token"] == 1


async def test_token_is_renewed_before_it_expires() -> None:
    async with running(token_ttl=1.0) as env:
        client = env.client()
        first = await client.token()
        await anyio.sleep(0.85)  # past 80% of the 1 s lifetime, before expiry
        await client.get("users", {"limit": "1"})
        assert await client.token() != first
        assert client.stats["token"] == 2
        assert client.stats["401"] == 0


async def test_revoked_token_is_renewed_once_on_401_and_the_call_succeeds() -> None:
    async with running() as env:
        client = env.client()
        await client.get("users", {"limit": "1"})
        env.emulator.revoke_tokens()
        body = await client.get("users", {"limit": "1"})
        assert body["_embedded"]["users"]
        assert client.stats["401"] == 1
        assert client.stats["token"] == 2


async def test_wrong_secret_raises_unauthorized_and_never_shows_the_secret() -> None:
    secret = "wrong-s3cret-Zq81"
    async with running() as env:
        client = env.client(client_secret=secret)
        with pytest.raises(Unauthorized) as caught:
            await client.get("users")
        texts = [repr(client)]
        exc: BaseException | None = caught.value
        while exc is not None:
            texts += [str(exc), repr(exc)]
            exc = exc.__cause__ or exc.__context__
        assert all(secret not in text for text in texts)
        assert client.stats["token"] == 1  # a refusal is an answer: not retried


async def test_wrong_auth_method_is_refused_as_unauthorized() -> None:
    async with running(auth_method="post") as env:
        with pytest.raises(Unauthorized):
            await env.client(client_auth="basic").token()


async def test_concurrent_callers_share_one_token_fetch() -> None:
    async with running() as env:
        client = env.client()
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(client.get, "users", {"limit": "1"})
        assert env.emulator.counters["token"] == 1


def rendered_frames(exc: BaseException) -> str:
    """The traceback as structlog renders it with locals, minus the test's own frame."""
    render = ExceptionDictTransformer(show_locals=True, locals_max_string=100_000)
    stacks = render((type(exc), exc, exc.__traceback__))
    return json.dumps([stack["frames"][1:] for stack in stacks], default=repr)


@pytest.mark.parametrize("method", ["basic", "post"])
async def test_tracebacks_rendered_with_locals_show_no_secret_and_no_token(method: str) -> None:
    secret = "right-s3cret-Kx02"
    async with running(auth_method=method, client_secret=secret) as env:
        client = env.client(client_auth=method, client_secret=secret)
        token = await client.token()
        env.fail_next(*["503"] * FAST.max_attempts)
        with pytest.raises(ServerError) as failed:
            await client.get("users")
        wrong = env.client(client_auth=method, client_secret="wrong-s3cret-Kx03")
        with pytest.raises(Unauthorized) as refused:
            await wrong.get("users")
    basic = base64.b64encode(f"{DEFAULT_CLIENT_ID}:{secret}".encode()).decode()
    for caught in (failed.value, refused.value):
        text = rendered_frames(caught)
        for needle in (secret, "wrong-s3cret-Kx03", str(token), basic):
            assert needle not in text


# --- paging ----------------------------------------------------------------------------------------

async def test_paging_with_a_page_cap_below_the_limit_follows_next_links_to_the_end() -> None:
    directory = generate(103, 4, seed=5)
    async with running(directory, users_page_cap=10) as env:
        client = env.client(page_size=50)
        seen: list[str] = []
        sizes: list[int] = []
        async for page in client.iter_users():
            sizes.append(len(page))
            seen += [user["id"] for user in page]
        assert sizes == [10] * 10 + [3]
        assert seen == list(directory.users)
        # every request after the first used the server's next href, cursor and all
        listed = [path for method, path in env.emulator.request_log if "/users" in path]
        assert listed[0].endswith("/users?limit=50")
        assert all("cursor=" in path for path in listed[1:])


async def test_filtered_paging_keeps_the_filter_from_the_next_links() -> None:
    directory = generate(200, 6, seed=9)
    group = directory.group_by_name("All Staff")
    async with running(directory, users_page_cap=7) as env:
        ids = await env.client().group_member_ids(group["id"])
        assert sorted(ids) == sorted(directory.direct_member_ids(group["id"]))
        assert len(ids) > 7


async def test_group_parents_lists_the_groups_a_group_is_nested_in() -> None:
    directory = generate(50, 8, seed=2)
    parent = directory.group_by_name("ZPA Users")
    child = directory.group_by_name("ZPA Contractors")
    other = directory.group_by_name("ZIA Users")
    directory.nest(child["id"], other["id"])
    async with running(directory) as env:
        client = env.client()
        assert sorted(await client.group_parents(child["id"])) == sorted([parent["id"], other["id"]])
        assert await client.group_parents(parent["id"]) == []


async def test_get_user_includes_member_of_group_ids() -> None:
    directory = generate(30, 6, seed=4)
    group = directory.group_by_name("All Staff")
    member = sorted(directory.direct_member_ids(group["id"]))[0]
    async with running(directory) as env:
        user = await env.client().get_user(member)
        assert user["id"] == member
        assert group["id"] in user["memberOfGroupIDs"]


async def test_find_user_by_id_username_and_email() -> None:
    directory = generate(30, 4, seed=4)
    user = directory.add_user("plainname", email="plain@example.com", given="P", family="N")
    async with running(directory) as env:
        client = env.client()
        assert (await client.find_user(user["id"]) or {}).get("id") == user["id"]
        assert (await client.find_user("plainname") or {}).get("id") == user["id"]
        assert (await client.find_user("plain@example.com") or {}).get("id") == user["id"]
        assert await client.find_user("nobody@example.com") is None
        assert await client.find_user("00000000-0000-4000-8000-000000000000") is None


async def test_find_user_refuses_an_ambiguous_email() -> None:
    directory = generate(5, 4, seed=4)
    directory.add_user("one", email="shared@example.com")
    directory.add_user("two", email="shared@example.com")
    async with running(directory) as env:
        with pytest.raises(AmbiguousUser):
            await env.client().find_user("shared@example.com")


# --- retries and typed errors ----------------------------------------------------------------------

async def test_429_with_retry_after_is_retried_after_the_wait_the_server_asked_for() -> None:
    async with running(faults=Faults(retry_after=0.4)) as env:
        client = env.client()
        await client.token()
        env.fail_next("429")
        started = time.monotonic()
        body = await client.get("users", {"limit": "1"})
        assert time.monotonic() - started >= 0.4
        assert body["_embedded"]["users"]
        assert client.stats["429"] == 1
        assert client.stats["retries"] == 1


async def test_5xx_answers_are_retried() -> None:
    async with running() as env:
        client = env.client()
        await client.token()
        env.fail_next("503", "500")
        assert (await client.get("users", {"limit": "1"}))["_embedded"]["users"]
        assert client.stats["5xx"] == 2
        assert client.stats["retries"] == 2


async def test_5xx_that_persists_raises_server_error_after_the_attempts() -> None:
    async with running() as env:
        client = env.client()
        await client.token()
        env.fail_next(*["500"] * FAST.max_attempts)
        with pytest.raises(ServerError):
            await client.get("users")
        assert client.stats["requests"] == 1 + FAST.max_attempts


async def test_a_truncated_page_once_is_retried() -> None:
    async with running() as env:
        client = env.client()
        await client.token()
        env.fail_next("truncated")
        assert (await client.get("users", {"limit": "3"}))["size"] == 3
        assert client.stats["malformed"] == 1


@pytest.mark.parametrize("kind", ["malformed", "truncated"])
async def test_a_page_that_stays_malformed_raises_malformed_response_after_retries(kind: str) -> None:
    async with running() as env:
        client = env.client()
        await client.token()
        env.fail_next(*[kind] * FAST.max_attempts)
        with pytest.raises(MalformedResponse):
            await client.get("users")
        assert client.stats["malformed"] == FAST.max_attempts


async def test_a_dropped_connection_is_retried() -> None:
    async with running() as env:
        client = env.client()
        await client.token()
        env.fail_next("drop", "drop")
        assert (await client.get("users", {"limit": "1"}))["_embedded"]["users"]
        assert client.stats["connection_errors"] >= 1


async def test_a_connection_that_keeps_dropping_raises_connection_failed() -> None:
    async with running() as env:
        client = env.client()
        await client.token()
        env.fail_next(*["drop"] * (2 * FAST.max_attempts))  # aiohttp may resend once by itself
        with pytest.raises(ConnectionFailed):
            await client.get("users")


async def test_a_refused_connection_raises_connection_failed() -> None:
    async with running() as env:
        base = env.base
    async with aiohttp.ClientSession() as session:
        client = PingOneClient(session, api_url=f"{base}/v1", auth_url=base, environment_id="e",
                               client_id="c", client_secret="s", policy=FAST)
        with pytest.raises(ConnectionFailed):
            await client.token()


async def test_a_hanging_server_raises_request_timeout() -> None:
    async with running() as env:
        client = env.client(timeout=0.2, policy=RetryPolicy(max_attempts=2, base_delay=0.01))
        await client.token()
        env.fail_next("hang", "hang")
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.get("users")
        assert time.monotonic() - started < 2.0
        assert client.stats["timeouts"] == 2


async def test_a_hang_once_is_retried() -> None:
    async with running() as env:
        client = env.client(timeout=0.2)
        await client.token()
        env.fail_next("hang")
        assert (await client.get("users", {"limit": "1"}))["_embedded"]["users"]
        assert client.stats["timeouts"] == 1


# --- hostile pages (a small app that says what the emulator never would) ---------------------------

@asynccontextmanager
async def odd_server(pages: dict[str, Any]) -> AsyncIterator[tuple[str, list[str]]]:
    """Serves a token and fixed bodies by raw path+query; records what was asked."""
    asked: list[str] = []
    base_box: list[str] = []

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t", "token_type": "Bearer", "expires_in": 3600})

    async def page(request: web.Request) -> web.Response:
        asked.append(request.raw_path)
        body = pages.get(request.raw_path)
        if body is None:
            return web.json_response({"code": "NOT_FOUND", "message": request.raw_path}, status=404)
        if isinstance(body, str):
            body = body.replace("{base}", base_box[0])
            return web.Response(text=body, content_type="application/json")
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/env/as/token", token)
    app.router.add_get("/v1/environments/env/{tail:.*}", page)
    async with serve(app) as base:
        base_box.append(base)
        yield base, asked


async def odd_client(session: aiohttp.ClientSession, base: str) -> PingOneClient:
    return PingOneClient(session, api_url=f"{base}/v1", auth_url=base, environment_id="env",
                         client_id="c", client_secret="s", policy=FAST, page_size=2)


async def test_next_href_is_followed_byte_for_byte() -> None:
    odd = "/v1/environments/env/users?cursor=a%2Fb%3D%3D&limit=2&x=%5B%22q%22%5D"
    pages = {
        "/v1/environments/env/users?limit=2":
            '{"_embedded": {"users": [{"id": "u1"}]}, "_links": {"next": {"href": "{base}' + odd + '"}}}',
        odd: {"_embedded": {"users": [{"id": "u2"}]}, "_links": {}},
    }
    async with odd_server(pages) as (base, asked), aiohttp.ClientSession() as session:
        client = await odd_client(session, base)
        ids = [user["id"] async for page in client.iter_users() for user in page]
        assert ids == ["u1", "u2"]
        assert asked == ["/v1/environments/env/users?limit=2", odd]


async def test_a_next_link_to_another_host_is_refused() -> None:
    pages = {"/v1/environments/env/users?limit=2": {
        "_embedded": {"users": [{"id": "u1"}]},
        "_links": {"next": {"href": "http://192.0.2.1:9/v1/environments/env/users?cursor=x"}}}}
    async with odd_server(pages) as (base, asked), aiohttp.ClientSession() as session:
        client = await odd_client(session, base)
        with pytest.raises(MalformedResponse):
            async for _page in client.iter_users():
                pass
        assert len(asked) == 1


@pytest.mark.parametrize("body", [
    {"_embedded": {"users": [{"id": "u1"}, {"name": "no id"}]}},
    {"_embedded": {"users": [{"id": 7}]}},
    {"_embedded": {"users": {"id": "u1"}}},
    {"_embedded": {}},
    {"size": 3},
    '["a", "list"]',
    '{"_embedded": {"users": [{"id": "u1"}]}, "_links": {"next": {}}}',
])
async def test_a_page_of_the_wrong_shape_raises_malformed_response(body: Any) -> None:
    pages = {"/v1/environments/env/users?limit=2": body}
    async with odd_server(pages) as (base, _asked), aiohttp.ClientSession() as session:
        client = await odd_client(session, base)
        with pytest.raises(MalformedResponse):
            async for _page in client.iter_users():
                pass


async def test_a_next_link_that_loops_is_refused() -> None:
    loop = "/v1/environments/env/users?cursor=same"
    pages = {
        "/v1/environments/env/users?limit=2":
            '{"_embedded": {"users": [{"id": "u1"}]}, "_links": {"next": {"href": "{base}' + loop + '"}}}',
        loop: '{"_embedded": {"users": [{"id": "u2"}]}, "_links": {"next": {"href": "{base}' + loop + '"}}}',
    }
    async with odd_server(pages) as (base, asked), aiohttp.ClientSession() as session:
        client = await odd_client(session, base)
        with pytest.raises(MalformedResponse):
            async for _page in client.iter_users():
                pass
        assert len(asked) == 2  # the repeat is caught before it is requested


async def test_an_explicit_empty_result_without_embedded_is_an_empty_page() -> None:
    pages = {"/v1/environments/env/users?limit=2": {"count": 0, "size": 0, "_links": {}}}
    async with odd_server(pages) as (base, _asked), aiohttp.ClientSession() as session:
        client = await odd_client(session, base)
        assert [page async for page in client.iter_users()] == [[]]
