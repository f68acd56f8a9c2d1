"""The PingOne emulator's change feeds over real HTTP on loopback (pingone.md §9)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from daemon.sandbox.activities import DEFAULT_ACTION_TYPES, FeedSettings, stamp
from daemon.sandbox.directory import Directory
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve

START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
TIMEOUT = aiohttp.ClientTimeout(total=10)


class ManualClock:
    """Stands still until a test moves it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, emulator: PingOneEmulator) -> None:
        self.session = session
        self.base = base
        self.emulator = emulator
        self.token = ""

    @property
    def env(self) -> str:
        return f"{self.base}/v1/environments/{self.emulator.directory.env_id}"

    async def login(self) -> None:
        async with self.session.post(
                f"{self.base}/{self.emulator.directory.env_id}/as/token", data={"grant_type": "client_credentials"},
                headers={"Authorization": aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)}) as r:
            self.token = (await r.json())["access_token"]

    async def call(self, method: str, url: str, *, params: dict[str, str] | None = None,
                   body: Any = None) -> tuple[int, Any, aiohttp.ClientResponse]:
        if not url.startswith("http"):
            url = self.env + url
        async with self.session.request(method, url, params=params, json=body,
                                        headers={"Authorization": f"Bearer {self.token}"}) as r:
            data = await r.json() if r.content_type == "application/json" else None
            return r.status, data, r

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.base}/_admin{path}", json=body) as r:
            assert r.status < 300, await r.text()
            return await r.json()

    async def activities(self, flt: str, **params: str) -> list[dict[str, Any]]:
        """Every page of a GET query."""
        status, body, _ = await self.call("GET", "/activities", params={"filter": flt, **params})
        assert status == 200, body
        items = list(body["_embedded"]["activities"])
        while "next" in body["_links"]:
            status, body, _ = await self.call("GET", body["_links"]["next"]["href"])
            assert status == 200, body
            items.extend(body["_embedded"]["activities"])
        return items


def window(since: float = START - 60, until: float = START + 3600) -> str:
    return f'recordedAt gt "{stamp(since)}" AND recordedAt lt "{stamp(until)}"'


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def api(clock: ManualClock) -> AsyncIterator[Api]:
    emulator = PingOneEmulator(Directory(clock=clock), feed_settings=FeedSettings(seed=7))
    async with serve(emulator.app()) as base, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = Api(session, base, emulator)
        await api.login()
        yield api


def every_mutation(d: Directory) -> dict[str, set[str]]:
    """One of each change; returns the event -> the ids of the resources it may be about."""
    alice = d.add_user("alice@example.com", email="alice@example.com")["id"]
    bob = d.add_user("bob@example.com")["id"]
    staff = d.add_group("Staff")["id"]
    zpa = d.add_group("ZPA")["id"]
    d.update_user(alice, title="Engineer")
    d.set_enabled(alice, False)
    d.set_enabled(alice, True)
    d.update_user(bob, population={"id": "00000000-0000-4000-8000-0000000000b1"})
    d.set_user_filter(staff, 'title eq "Engineer"')
    d.rename_group(staff, "All Staff")
    d.add_member(zpa, alice)
    d.remove_member(zpa, alice)
    d.nest(staff, zpa)
    d.unnest(staff, zpa)
    d.delete_user(bob)
    d.delete_group(staff)
    return {"user.created": {alice, bob}, "user.updated": {alice}, "user.enabled": {alice},
            "user.disabled": {alice}, "user.population_moved": {bob}, "user.deleted": {bob},
            "group.created": {staff, zpa}, "group.updated": {staff}, "group.renamed": {staff},
            "group.deleted": {staff}, "membership.added": {alice, zpa}, "membership.removed": {alice, zpa},
            "nesting.added": {staff, zpa}, "nesting.removed": {staff, zpa}}


async def test_every_mutation_is_one_record_visible_only_after_the_indexing_delay(
        api: Api, clock: ManualClock) -> None:
    about = every_mutation(api.emulator.directory)
    assert await api.activities(window()) == []       # nothing indexed yet
    clock.advance(2.0)
    items = await api.activities(window())
    assert len(items) == 16 and len({i["id"] for i in items}) == 16
    events = [a["_event"] for a in (await api.admin("GET", "/activities"))["activities"]]
    assert set(events) == set(about)
    by_id = {a["id"]: a for a in items}
    for record in (await api.admin("GET", "/activities"))["activities"]:
        item = by_id[record["id"]]
        assert item["action"]["type"] == DEFAULT_ACTION_TYPES[record["_event"]]
        assert {r["id"] for r in item["resources"]} <= about[record["_event"]]
        assert item["result"]["status"] == "SUCCESS" and item["recordedAt"].endswith("Z")
        assert item["_links"]["self"]["href"].endswith(item["id"])
    membership = next(i for i in items if i["action"]["type"] == "GROUP_MEMBERSHIP.CREATED")
    assert sorted(r["type"] for r in membership["resources"]) == ["GROUP", "USER"]
    nesting = next(i for i in items if i["action"]["type"] == "GROUP_NESTING.CREATED")
    assert [r["type"] for r in nesting["resources"]] == ["GROUP", "GROUP"]


async def test_records_become_visible_out_of_order_within_the_delay(api: Api, clock: ManualClock) -> None:
    await api.admin("POST", "/activities/settings", {"delay_spread": 1.0})
    d = api.emulator.directory
    for n in range(20):
        d.add_user(f"u{n}@example.com")
        clock.advance(0.01)
    clock.advance(1.0)
    visible = {i["id"] for i in await api.activities(window())}
    held = [a["id"] for a in (await api.admin("GET", "/activities"))["activities"]]
    flags = [aid in visible for aid in held]
    assert any(flags) and not all(flags)
    # an earlier record still hidden while a later one shows: a poller must overlap its windows
    assert any(not flags[i] and flags[j] for i in range(20) for j in range(i + 1, 20))
    clock.advance(1.0)
    assert len(await api.activities(window())) == 20


async def test_a_date_range_is_required_and_filters_are_checked(api: Api) -> None:
    for params in ({}, {"filter": f'recordedAt gt "{stamp(START)}"'},
                   {"filter": 'action.type eq "USER.CREATED"'}, {"filter": window() + ' and username eq "x"'},
                   {"filter": window() + ' and action.type sw "USER"'}):
        status, body, _ = await api.call("GET", "/activities", params=params)
        assert status == 400, params
        assert body["code"] == "INVALID_DATA" and body["details"][0]["code"] == "INVALID_FILTER"


async def test_documented_filters_select_records(api: Api, clock: ManualClock) -> None:
    about = every_mutation(api.emulator.directory)
    clock.advance(5)
    alice = next(iter(about["user.updated"]))
    zpa = next(iter(about["membership.added"] - {alice}))
    created = await api.activities(window() + ' and action.type eq "USER.CREATED"')
    assert len(created) == 2
    on_alice = await api.activities(window() + f' and resources.id eq "{alice}"')
    assert {i["action"]["type"] for i in on_alice} == {"USER.CREATED", "USER.UPDATED", "GROUP_MEMBERSHIP.CREATED",
                                                     "GROUP_MEMBERSHIP.DELETED"}
    assert len(on_alice) == 6
    groups = await api.activities(window() + ' and resources.type eq "GROUP"')
    assert all(any(r["type"] == "GROUP" for r in i["resources"]) for i in groups) and len(groups) == 9
    assert any(r["id"] == zpa for i in groups for r in i["resources"])
    first = created[0]
    assert [i["id"] for i in await api.activities(window() + f' and correlationId eq "{first["correlationId"]}"')] \
        == [first["id"]]
    client = first["actors"]["client"]["id"]
    assert len(await api.activities(window() + f' and actors.client.id eq "{client}"')) == 16
    moved_to = "00000000-0000-4000-8000-0000000000b1"
    assert len(await api.activities(window() + f' and resources.population.id eq "{moved_to}"')) == 2
    # the range bounds are exclusive for gt/lt
    at = created[0]["recordedAt"]
    assert first["id"] not in {i["id"] for i in await api.activities(
        f'recordedAt gt "{at}" and recordedAt lt "{stamp(START + 3600)}"')}


async def test_paging_over_get_and_post_without_dup_or_miss(api: Api, clock: ManualClock) -> None:
    d = api.emulator.directory
    for n in range(7):
        d.add_user(f"u{n}@example.com")
        clock.advance(0.5)
    clock.advance(3)
    status, body, _ = await api.call("GET", "/activities", params={"filter": window(), "limit": "3"})
    assert status == 200 and body["size"] == 3 and body["count"] == 7
    query = parse_qs(urlsplit(body["_links"]["next"]["href"]).query)
    assert query["filter"] == [window()] and query["limit"] == ["3"]
    items = await api.activities(window(), limit="3")
    assert len(items) == len({i["id"] for i in items}) == 7
    assert [i["recordedAt"] for i in items] == sorted(i["recordedAt"] for i in items)
    # POST keeps the filter in the body; its next links carry no filter
    status, body, _ = await api.call("POST", "/activities", body={"filter": window(), "limit": 4})
    assert status == 200 and body["size"] == 4
    href = body["_links"]["next"]["href"]
    assert "filter" not in parse_qs(urlsplit(href).query)
    posted = list(body["_embedded"]["activities"])
    status, body, _ = await api.call("POST", href, body={"filter": window(), "limit": 4})
    posted.extend(body["_embedded"]["activities"])
    assert status == 200 and "next" not in body["_links"]
    assert [i["id"] for i in posted] == [i["id"] for i in items]
    # without a limit, the documented default of 100 applies
    status, body, _ = await api.call("POST", "/activities", body={"filter": window()})
    assert body["size"] == 7


async def test_the_window_is_fourteen_days(api: Api, clock: ManualClock) -> None:
    d = api.emulator.directory
    d.add_user("old@example.com")
    clock.advance(10 * 86400)
    d.add_user("new@example.com")
    clock.advance(5 * 86400)
    old = window(START - 1, clock.now)
    status, body, _ = await api.call("GET", "/activities", params={"filter": old})
    assert status == 400 and body["details"][0]["code"] == "INVALID_VALUE"
    recent = window(clock.now - 13 * 86400, clock.now)
    assert [i["resources"][0]["name"] for i in await api.activities(recent)] == ["new@example.com"]
    await api.admin("POST", "/activities/settings", {"old_range": "clip"})
    assert [i["resources"][0]["name"] for i in await api.activities(old)] == ["new@example.com"]
    assert len((await api.admin("GET", "/activities"))["activities"]) == 1   # the old one is gone


async def test_the_audit_rate_bucket_is_its_own(api: Api) -> None:
    await api.admin("POST", "/activities/settings", {"rate_rps": 0.2, "rate_burst": 2})
    statuses = []
    for _ in range(4):
        status, body, response = await api.call("GET", "/activities", params={"filter": window()})
        statuses.append(status)
        if status == 429:
            assert body["code"] == "REQUEST_LIMITED" and int(response.headers["Retry-After"]) >= 1
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    status, _, _ = await api.call("GET", "/users")
    assert status == 200                     # the users API is not in the Audit bucket


async def test_an_outage_of_the_feed_alone_and_injected_faults(api: Api) -> None:
    await api.admin("POST", "/activities/settings", {"outage_status": 503})
    status, body, _ = await api.call("GET", "/activities", params={"filter": window()})
    assert status == 503 and body["code"] == "UNEXPECTED_ERROR"
    assert (await api.call("GET", "/users"))[0] == 200
    await api.admin("POST", "/activities/settings", {"outage_status": None})
    await api.admin("POST", "/faults", {"fail_nth": {"1": "500"}, "nth_only": "/activities"})
    assert (await api.call("GET", "/activities", params={"filter": window()}))[0] == 500
    assert (await api.call("GET", "/activities", params={"filter": window()}))[0] == 200


async def test_unconfirmed_details_are_knobs(api: Api, clock: ManualClock) -> None:
    await api.admin("POST", "/activities/settings", {
        "embedded_key": "auditActivities", "order": "desc",
        "action_types": {"membership.added": "USER.UPDATED"}})
    d = api.emulator.directory
    user = d.add_user("a@example.com")["id"]
    clock.advance(0.1)
    group = d.add_group("G")["id"]
    clock.advance(0.1)
    d.add_member(group, user)
    clock.advance(3)
    status, body, _ = await api.call("GET", "/activities", params={"filter": window()})
    items = body["_embedded"]["auditActivities"]
    assert [i["action"]["type"] for i in items] == ["USER.UPDATED", "GROUP.CREATED", "USER.CREATED"]
    status, body, _ = await api.call("GET", "/activities", params={"filter": window(), "limit": "1"})
    assert status == 200
    seen = [body["_embedded"]["auditActivities"][0]["id"]]
    while "next" in body["_links"]:
        _, body, _ = await api.call("GET", body["_links"]["next"]["href"])
        seen.append(body["_embedded"]["auditActivities"][0]["id"])
    assert seen == [i["id"] for i in items]


# --- subscriptions -------------------------------------------------------------------------------

class Receiver:
    """A webhook endpoint that fails its first `failures` deliveries."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], Any]] = []
        self.attempts = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=503)
        self.received.append((dict(request.headers), await request.json()))
        return web.Response(status=204)


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def subscription(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "provisiond", "enabled": True, "format": "ACTIVITY",
            "httpEndpoint": {"url": url, "headers": {"X-Provisiond-Secret": "s3cret"}},
            "filterOptions": {"includedActionTypes": sorted(set(DEFAULT_ACTION_TYPES.values()))},
            "verifyTlsCertificates": False, **extra}


async def test_subscriptions_deliver_in_order_retrying_until_2xx_with_the_headers() -> None:
    receiver = Receiver(failures=3)
    emulator = PingOneEmulator(Directory(), feed_settings=FeedSettings(webhook_retry=0.02))
    async with serve(receiver.app()) as hook, serve(emulator.app()) as base, \
            aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = Api(session, base, emulator)
        await api.login()
        status, created, _ = await api.call("POST", "/subscriptions", body=subscription(f"{hook}/hook"))
        assert status == 201 and created["id"]
        d = emulator.directory
        users = [d.add_user(f"u{n}@example.com")["id"] for n in range(5)]
        group = d.add_group("G")["id"]
        d.add_member(group, users[0])
        await wait_for(lambda: len(receiver.received) == 7)
        assert receiver.attempts == 10
        bodies = [body for _, body in receiver.received]
        assert [b["resources"][0]["id"] for b in bodies[:5]] == users
        assert [b["action"]["type"] for b in bodies[5:]] == ["GROUP.CREATED", "GROUP_MEMBERSHIP.CREATED"]
        assert all(h["X-Provisiond-Secret"] == "s3cret" for h, _ in receiver.received)
        stats = await api.admin("GET", "/subscriptions")
        assert stats["subscriptions"][0]["delivered"] == 7 and stats["subscriptions"][0]["pending"] == 0
        status, listed, _ = await api.call("GET", "/subscriptions")
        assert listed["count"] == 1
        assert (await api.call("DELETE", f"/subscriptions/{created['id']}"))[0] == 204
        d.add_user("after@example.com")
        await asyncio.sleep(0.1)
        assert len(receiver.received) == 7


async def test_subscriptions_filter_action_types_and_refuse_bad_bodies() -> None:
    receiver = Receiver()
    emulator = PingOneEmulator(Directory())
    async with serve(receiver.app()) as hook, serve(emulator.app()) as base, \
            aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = Api(session, base, emulator)
        await api.login()
        body = subscription(f"{hook}/hook", filterOptions={"includedActionTypes": ["USER.DELETED"]})
        assert (await api.call("POST", "/subscriptions", body=body))[0] == 201
        d = emulator.directory
        uid = d.add_user("a@example.com")["id"]
        d.delete_user(uid)
        await wait_for(lambda: len(receiver.received) == 1)
        assert receiver.received[0][1]["action"]["type"] == "USER.DELETED"
        for bad in ({**subscription(hook), "filterOptions": {}}, {**subscription(hook), "format": "XML"},
                    {**subscription(hook), "httpEndpoint": {}}, {"name": "x"}):
            status, error, _ = await api.call("POST", "/subscriptions", body=bad)
            assert status == 400 and error["code"] == "INVALID_DATA"
