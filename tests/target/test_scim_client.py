"""ScimClient over real HTTP on loopback: against scim2-server (independent) and our SCIM emulator.

Tests taking the `target` fixture run against both; the fault, quirk and auth tests use the
emulator, whose faults and profiles can be set per test.
"""

from __future__ import annotations

import base64
import math
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from daemon.backoff import RetryPolicy
from daemon.errors import (
    Conflict,
    ConnectionFailed,
    MalformedResponse,
    NotFound,
    RequestTimeout,
    ServerError,
    Unauthorized,
    UnsafeRequest,
)
from daemon.ratelimit import RateGovernor
from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator
from daemon.sandbox.server import serve
from daemon.target.auth import BasicAuth, BearerAuth, OAuthClientCredentials, TargetAuth
from daemon.target.profiles import profile_for
from daemon.target.resource import ENTERPRISE_USER, patch_body
from daemon.target.scim import ScimClient
from tests.interop.conftest import scim2_server_process

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, max_elapsed=10.0)
DEPT = f"{ENTERPRISE_USER}:department"
WORK_EMAIL = 'emails[type eq "work"].value'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def scim2_server() -> Iterator[tuple[int, str]]:
    """One scim2-server process for the module; each test gets its own dynamic tenant. Started
    through the interop launcher: it binds port 0 and reports the port (no free-port race), and
    a failure to start carries the server's stderr."""
    token = secrets.token_urlsafe(16)
    with scim2_server_process(token, "--dynamic-tenants") as url:
        port = urlsplit(url).port
        assert port is not None
        yield port, token


@dataclass
class Target:
    kind: str
    base_url: str
    token: str
    emulator: ScimEmulator | None


@pytest.fixture(params=["scim2-server", "emulator"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    if request.param == "scim2-server":
        port, token = request.getfixturevalue("scim2_server")
        yield Target("scim2-server", f"http://127.0.0.1:{port}/{uuid.uuid4().hex}/v2", token, None)
        return
    emulator = ScimEmulator("generic")
    async with serve(emulator.app()) as base:
        yield Target("emulator", base + "/v2", DEFAULT_TOKEN, emulator)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


MakeClient = Callable[..., ScimClient]


@pytest.fixture
def make_client(session: aiohttp.ClientSession) -> MakeClient:
    def make(base_url: str, auth: TargetAuth | str, *, profile: str = "generic", **kw: Any) -> ScimClient:
        kw.setdefault("policy", FAST)
        kw.setdefault("timeout", 10.0)
        if isinstance(auth, str):
            auth = BearerAuth(auth)
        return ScimClient(session, base_url, auth, profile=profile_for(profile), **kw)
    return make


@pytest.fixture
def client(target: Target, make_client: MakeClient) -> ScimClient:
    return make_client(target.base_url, target.token)


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[ScimEmulator, str]]:
    emu = ScimEmulator("generic")
    async with serve(emu.app()) as base:
        yield emu, base + "/v2"


def user_attrs(n: int | str, **extra: Any) -> dict[str, Any]:
    return {"userName": f"user{n}@example.com", "name.givenName": f"Given{n}", "name.familyName": "Family",
            "displayName": f"User {n}", "externalId": f"ping-{n}", **extra}


async def create_users(client: ScimClient, count: int) -> list[str]:
    return [(await client.create_user(user_attrs(i)))["id"] for i in range(count)]


# -- users -------------------------------------------------------------------------------------


async def test_user_create_get_patch_put_disable_delete(client: ScimClient) -> None:
    attrs = user_attrs(1, **{WORK_EMAIL: "user1@example.com", DEPT: "Eng"})
    created = await client.create_user(attrs)
    uid = created["id"]
    got = await client.get_user(uid)
    assert got["userName"] == "user1@example.com"
    assert got["emails"][0]["value"] == "user1@example.com"
    assert got[ENTERPRISE_USER]["department"] == "Eng"
    assert got["active"] is True

    changed = {"displayName": "Renamed", DEPT: "Ops", WORK_EMAIL: "u1@example.com", "name.givenName": None}
    full = {**attrs, **changed}
    attempts: list[int] = []
    await client.update_user(uid, changed, full=full, attempts=attempts)
    assert attempts == [1]
    got = await client.get_user(uid)
    assert (got["displayName"], got[ENTERPRISE_USER]["department"]) == ("Renamed", "Ops")
    assert [e["value"] for e in got["emails"]] == ["u1@example.com"]
    assert "givenName" not in got.get("name", {})

    client.update_method = "put"
    await client.update_user(uid, {"displayName": "Put"}, full={**full, "displayName": "Put"}, active=True)
    assert (await client.get_user(uid))["displayName"] == "Put"
    client.update_method = "patch"

    await client.set_active(uid, False)
    assert (await client.get_user(uid))["active"] is False
    await client.set_active(uid, True)
    assert (await client.get_user(uid))["active"] is True

    await client.delete_user(uid)
    with pytest.raises(NotFound):
        await client.get_user(uid)


async def test_update_with_nothing_changed_sends_nothing(client: ScimClient) -> None:
    uid = (await client.create_user(user_attrs(1)))["id"]
    before = client.stats["requests"]
    await client.update_user(uid, {}, full=user_attrs(1))
    assert client.stats["requests"] == before


async def test_duplicate_create_is_conflict(client: ScimClient) -> None:
    await client.create_user(user_attrs(1))
    with pytest.raises(Conflict) as info:
        await client.create_user({**user_attrs(1), "userName": "USER1@example.com"})
    assert info.value.status == 409


async def test_unknown_ids_are_not_found(client: ScimClient) -> None:
    with pytest.raises(NotFound):
        await client.get_user("no-such-id")
    with pytest.raises(NotFound):
        await client.delete_user("no-such-id")
    with pytest.raises(NotFound):
        await client.get_group("no-such-id")


async def test_find_user_by_filter_is_case_insensitive(client: ScimClient) -> None:
    uid = (await client.create_user(user_attrs(7)))["id"]
    await client.create_user(user_attrs(8))
    found = await client.find_user("USER7@Example.com")
    assert found is not None and found["id"] == uid
    assert await client.find_user("nobody@example.com") is None
    assert client.stats["GET /Users"] == 2   # one filtered GET each, no scan


async def test_find_user_escapes_quotes_in_the_value(client: ScimClient) -> None:
    odd = 'o"brien\\x@example.com'
    uid = (await client.create_user({"userName": odd}))["id"]
    found = await client.find_user(odd)
    assert found is not None and found["id"] == uid


async def test_find_user_falls_back_to_a_paged_scan_when_the_filter_is_refused(
    target: Target, make_client: MakeClient
) -> None:
    client = make_client(target.base_url, target.token, match_filter='userName zz "%s"', page_size=2)
    ids = await create_users(client, 5)
    found = await client.find_user("user3@EXAMPLE.com")
    assert found is not None and found["id"] == ids[3]
    assert client.stats["GET /Users"] >= 2   # the refused filter, then page(s)


async def test_find_user_never_takes_a_lone_result_that_names_someone_else(
    target: Target, make_client: MakeClient
) -> None:
    """Issue 13 item 6: a lookup (crash recovery, 409 adoption) takes only a resource whose
    userName is the one asked for. A custom match_filter on another attribute answers with one
    user named otherwise: that one is not taken, and nothing else is scanned for it."""
    client = make_client(target.base_url, target.token, match_filter='displayName eq "%s"')
    await client.create_user({"userName": "other@example.com", "displayName": "wanted@example.com"})
    assert await client.find_user("wanted@example.com") is None
    assert client.stats["GET /Users"] == 1
    named = (await client.create_user({"userName": "Wanted@Example.com", "displayName": "wanted@example.com"}))["id"]
    found = await client.find_user("wanted@example.com")
    assert found is not None and found["id"] == named


async def test_find_user_matches_by_lowercasing_not_casefold(emulator: tuple[ScimEmulator, str],
                                                             make_client: MakeClient) -> None:
    """Issue 13 items 6 and 7: the emulator's `eq` folds like `str.casefold` (some servers' collations
    do: "ß" = "ss"), so its filter answers "strasse" for "straße": that lone result is not taken."""
    emu, base = emulator
    client = make_client(base, DEFAULT_TOKEN)
    other = (await client.create_user({"userName": "strasse@example.com"}))["id"]
    assert await client.find_user("straße@example.com") is None
    found = await client.find_user("STRASSE@example.com")
    assert found is not None and found["id"] == other
    assert emu.users[other]["userName"] == "strasse@example.com"


async def test_find_group_passes_over_an_object_another_link_holds(
    scim2_server: tuple[int, str], make_client: MakeClient
) -> None:
    """scim2-server accepts two groups with one displayName: a lookup on behalf of one link never
    answers with the object another link holds, only with a free one (or none)."""
    port, token = scim2_server
    client = make_client(f"http://127.0.0.1:{port}/{uuid.uuid4().hex}/v2", token)
    first = (await client.create_group("Dup"))["id"]
    second = (await client.create_group("Dup"))["id"]
    found = await client.find_group("dup", taken=lambda tid: tid == first)
    assert found is not None and found["id"] == second
    assert await client.find_group("DUP", taken=lambda tid: tid in (first, second)) is None
    found = await client.find_user("nobody@example.com", taken=lambda tid: True)
    assert found is None


async def test_a_member_remove_without_a_value_list_is_never_sent(target: Target, client: ScimClient) -> None:
    """Issue 13 item 12: ZPA empties a group for a bare `remove members`; the client's request
    chokepoint refuses it (and its lookalikes) before anything is sent, whoever built the body."""
    ids = await create_users(client, 3)
    gid = (await client.create_group("Keep Me"))["id"]
    await client.add_members(gid, ids)
    bare = [
        {"op": "remove", "path": "members"},
        {"op": "Remove", "path": " members "},
        {"op": "remove", "path": "members", "value": []},
        {"op": "remove", "path": "members", "value": [{"value": ""}]},
        {"op": "remove", "path": "members", "value": [{"value": None}]},
        {"op": "remove", "path": "members", "value": {"value": ids[0]}},
        {"op": "remove"},
        {"op": "remove", "path": 'members[value eq ""]'},
    ]
    client.stats.clear()
    for op in bare:
        with pytest.raises(UnsafeRequest):
            await client.request("PATCH", f"/Groups/{gid}", json=patch_body([op]))
    assert client.stats["requests"] == 0
    assert await client.remove_members(gid, []) == 0
    assert client.stats["requests"] == 0
    assert await client.group_member_ids(gid) == set(ids)
    # the forms that name members go through (scim2-server refuses the value-list one: RFC 7644
    # wants the filter in the path)
    assert await client.remove_members(gid, [ids[1]]) == 1
    if target.kind == "emulator":
        await client.request("PATCH", f"/Groups/{gid}", json=patch_body(
            [{"op": "remove", "path": "members", "value": [{"value": ids[0]}]}]))
        assert await client.group_member_ids(gid) == {ids[2]}
    else:
        assert await client.group_member_ids(gid) == {ids[0], ids[2]}


async def test_iter_users_pages_through_everything(target: Target, make_client: MakeClient) -> None:
    client = make_client(target.base_url, target.token, page_size=3)
    ids = await create_users(client, 10)
    client.stats.clear()
    seen = [u["id"] async for u in client.iter_users()]
    assert sorted(seen) == sorted(ids)
    assert client.stats["GET /Users"] == math.ceil(10 / 3)


async def test_iter_users_on_an_empty_target(client: ScimClient) -> None:
    assert [u async for u in client.iter_users()] == []


# -- groups ------------------------------------------------------------------------------------


async def test_group_create_find_rename_delete(client: ScimClient) -> None:
    group = await client.create_group("Engineering", external_id="pg-1")
    gid = group["id"]
    assert "members" not in group or group["members"] in ([], None)
    found = await client.find_group("engineering")
    assert found is not None and found["id"] == gid
    await client.rename_group(gid, "Engineering EU")
    assert (await client.get_group(gid))["displayName"] == "Engineering EU"
    assert await client.find_group("Engineering") is None
    assert [g["displayName"] async for g in client.iter_groups()] == ["Engineering EU"]
    await client.delete_group(gid)
    with pytest.raises(NotFound):
        await client.get_group(gid)


async def test_members_added_and_removed_in_chunks(target: Target, make_client: MakeClient) -> None:
    client = make_client(target.base_url, target.token, membership_batch=3)
    ids = await create_users(client, 10)
    gid = (await client.create_group("Big"))["id"]
    client.stats.clear()
    assert await client.add_members(gid, ids) == math.ceil(10 / 3)
    assert client.stats["PATCH /Groups"] == 4
    assert await client.group_member_ids(gid) == set(ids)

    assert await client.remove_members(gid, ids[:7]) == math.ceil(7 / 3)
    assert client.stats["PATCH /Groups"] == 4 + 3
    assert await client.group_member_ids(gid) == set(ids[7:])
    assert await client.add_members(gid, []) == 0
    if target.emulator is not None:
        assert target.emulator.counters["PATCH /Groups"] == 7


async def test_service_provider_config_is_read(client: ScimClient) -> None:
    config = await client.service_provider_config()
    assert config is not None and config["patch"]["supported"] is True


# -- auth and errors ---------------------------------------------------------------------------


async def test_bad_token_is_unauthorized_without_leaking_the_token(
    target: Target, make_client: MakeClient
) -> None:
    secret = "wrong-" + secrets.token_hex(12)
    auth = BearerAuth(secret)
    client = make_client(target.base_url, auth)
    attempts: list[int] = []
    with pytest.raises(Unauthorized) as info:
        await client.request("GET", "/Users", attempts=attempts)
    assert attempts == [2]   # invalidated and tried once more
    for text in (str(info.value), repr(info.value), repr(auth), repr(client), info.value.reason):
        assert secret not in text


async def test_429_with_retry_after_is_retried_and_slows_the_governor(
    emulator: tuple[ScimEmulator, str], make_client: MakeClient
) -> None:
    emu, base = emulator
    emu.faults.fail_nth = {emu.faults.request_count + 1: "429"}
    emu.faults.retry_after = 0.3
    governor = RateGovernor(100.0)
    client = make_client(base, DEFAULT_TOKEN, governor=governor)
    attempts: list[int] = []
    started = time.monotonic()
    created = await client.create_user(user_attrs(1), attempts=attempts)
    assert created["userName"] == "user1@example.com"
    assert time.monotonic() - started >= 0.3
    assert attempts == [2]
    assert (client.stats["429"], client.stats["retries"]) == (1, 1)
    assert governor.rate == pytest.approx(50.0 + 100.0 / 20)   # halved, then one success
    assert len(emu.users) == 1


async def test_429_without_retry_after_backs_off_and_succeeds(
    emulator: tuple[ScimEmulator, str], make_client: MakeClient
) -> None:
    emu, base = emulator
    emu.faults.retry_after = None
    n = emu.faults.request_count
    emu.faults.fail_nth = {n + 1: "429", n + 2: "429"}
    attempts: list[int] = []
    await make_client(base, DEFAULT_TOKEN).create_user(user_attrs(1), attempts=attempts)
    assert attempts == [3]


async def test_5xx_is_retried_then_server_error(
    emulator: tuple[ScimEmulator, str], make_client: MakeClient
) -> None:
    emu, base = emulator
    client = make_client(base, DEFAULT_TOKEN, policy=RetryPolicy(max_attempts=3, base_delay=0.01))
    n = emu.faults.request_count
    emu.faults.fail_nth = {n + 1: "503"}
    attempts: list[int] = []
    await client.create_user(user_attrs(1), attempts=attempts)
    assert attempts == [2]

    emu.faults.error_rate = 1.0
    attempts = []
    with pytest.raises(ServerError) as info:
        await client.request("GET", "/Users", attempts=attempts)
    assert attempts == [3] and info.value.status in (500, 503)


async def test_hang_is_a_request_timeout(emulator: tuple[ScimEmulator, str], make_client: MakeClient) -> None:
    emu, base = emulator
    emu.faults.hang_rate = 1.0
    client = make_client(base, DEFAULT_TOKEN, timeout=0.3, policy=RetryPolicy(max_attempts=2, base_delay=0.01))
    attempts: list[int] = []
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        await client.request("GET", "/Users", attempts=attempts)
    assert attempts == [2]
    assert time.monotonic() - started < 3.0


async def test_malformed_body_is_malformed_response(
    emulator: tuple[ScimEmulator, str], make_client: MakeClient
) -> None:
    emu, base = emulator
    emu.faults.fail_nth = {emu.faults.request_count + 1: "malformed"}
    with pytest.raises(MalformedResponse):
        await make_client(base, DEFAULT_TOKEN).request("GET", "/Users")


async def test_refused_connection_is_connection_failed(make_client: MakeClient) -> None:
    client = make_client(f"http://127.0.0.1:{_free_port()}/v2", "t",
                         policy=RetryPolicy(max_attempts=2, base_delay=0.01))
    attempts: list[int] = []
    with pytest.raises(ConnectionFailed):
        await client.request("GET", "/Users", attempts=attempts)
    assert attempts == [2]


async def test_governor_paces_concurrent_creates_under_zia_limit(make_client: MakeClient) -> None:
    import anyio

    emu = ScimEmulator("zia")   # the emulator answers 429 beyond 5 requests per second
    async with serve(emu.app()) as base:
        client = make_client(base + "/v2", DEFAULT_TOKEN, profile="zia",
                             governor=RateGovernor(5.0, burst=5))
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(client.create_user, user_attrs(i))
        elapsed = time.monotonic() - started
    assert len(emu.users) == 10
    assert elapsed >= (10 - 5) / 5 * 0.9
    assert client.stats["POST /Users"] - client.stats["429"] == 10
    assert client.stats["429"] <= 2   # at most a boundary race between the two buckets


# -- target quirks (emulator profiles) -----------------------------------------------------------


async def test_zpa_paging_ignores_items_per_page_echo_and_string_active(make_client: MakeClient) -> None:
    emu = ScimEmulator("zpa", active_as_string=True)
    async with serve(emu.app()) as base:
        client = make_client(base + "/v2", DEFAULT_TOKEN, profile="zpa", page_size=4)
        ids = await create_users(client, 10)
        client.stats.clear()
        users = [u async for u in client.iter_users()]
        assert sorted(u["id"] for u in users) == sorted(ids)
        assert client.stats["GET /Users"] == 3
        assert all(u["active"] is True for u in users)
        assert (await client.get_user(ids[0]))["active"] is True
        emu.reset_counters()
        gid = (await client.create_group("ZPA Users"))["id"]
        assert await client.add_members(gid, ids) == 1
        assert emu.counters["PATCH /Groups"] == 1


async def test_base_url_is_opaque_with_or_without_trailing_slash(make_client: MakeClient) -> None:
    emu = ScimEmulator("zpa", prefix="/scim/1/217024658163253248/v2")
    async with serve(emu.app()) as base:
        for suffix in ("", "/"):
            client = make_client(base + "/scim/1/217024658163253248/v2" + suffix, DEFAULT_TOKEN, profile="zpa")
            await client.create_user(user_attrs(suffix or "plain"))
    assert len(emu.users) == 2


# -- auth kinds ------------------------------------------------------------------------------------


def _basic_to_bearer(username: str, password: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Test middleware: accept HTTP basic, hand the emulator the bearer token it expects."""
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        bearer = f"Bearer {DEFAULT_TOKEN}" if header == expected else "Bearer wrong"
        return await handler(request.clone(headers={**request.headers, "Authorization": bearer}))
    return middleware


async def test_basic_auth(make_client: MakeClient) -> None:
    emu = ScimEmulator("generic")
    app = emu.app()
    app.middlewares.insert(0, _basic_to_bearer("svc", "pa:ss"))
    async with serve(app) as base:
        await make_client(base + "/v2", BasicAuth("svc", "pa:ss")).create_user(user_attrs(1))
        with pytest.raises(Unauthorized):
            await make_client(base + "/v2", BasicAuth("svc", "nope")).request("GET", "/Users")
    assert len(emu.users) == 1
    assert "pa:ss" not in repr(BasicAuth("svc", "pa:ss"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_oauth_client_credentials_fetches_caches_renews_and_invalidates(
    session: aiohttp.ClientSession, make_client: MakeClient
) -> None:
    secret = "s3cr3t-" + secrets.token_hex(8)
    issued: list[str] = []
    tokens = iter(["stale-token", DEFAULT_TOKEN, DEFAULT_TOKEN, DEFAULT_TOKEN])

    async def token_endpoint(request: web.Request) -> web.Response:
        form = await request.post()
        expected = "Basic " + base64.b64encode(f"cid:{secret}".encode()).decode()
        if form.get("grant_type") != "client_credentials" or request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        issued.append(next(tokens))
        return web.json_response({"access_token": issued[-1], "token_type": "Bearer", "expires_in": 600})

    token_app = web.Application()
    token_app.router.add_post("/as/token", token_endpoint)
    emu = ScimEmulator("generic")
    clock = FakeClock()
    async with serve(token_app) as token_base, serve(emu.app()) as base:
        auth = OAuthClientCredentials(f"{token_base}/as/token", "cid", secret, clock=clock)
        client = make_client(base + "/v2", auth)
        attempts: list[int] = []
        await client.create_user(user_attrs(1), attempts=attempts)
        assert attempts == [2] and issued == ["stale-token", DEFAULT_TOKEN]   # 401 -> invalidate -> refetch
        await client.create_user(user_attrs(2))
        await client.request("GET", "/Users")
        assert len(issued) == 2   # cached
        clock.now += 600
        await client.request("GET", "/Users")
        assert len(issued) == 3   # renewed before expiry
        assert secret not in repr(auth)

        bad = OAuthClientCredentials(f"{token_base}/as/token", "cid", "wrong-secret", clock=clock)
        with pytest.raises(Unauthorized) as info:
            await make_client(base + "/v2", bad).request("GET", "/Users")
        assert "wrong-secret" not in str(info.value) and "wrong-secret" not in repr(bad)
    assert len(emu.users) == 2


async def test_a_page_larger_than_one_network_chunk_is_read_whole(
        emulator: tuple[ScimEmulator, str], make_client: MakeClient) -> None:
    emu, base = emulator
    big = "x" * 20_000
    for i in range(60):   # one page of ~1.2 MB: many chunks on the wire
        emu.put_user({"userName": f"wide{i}@example.com", "displayName": f"{big}{i}"})
    client = make_client(base, "sandbox-scim-token", page_size=100)
    seen = [u async for u in client.iter_users()]
    assert len(seen) == 60
    assert {u["displayName"] for u in seen} == {f"{big}{i}" for i in range(60)}
