"""Contract tests for the PingOne emulator, over real HTTP on loopback (pingone.md §1-§5, §7)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from daemon.sandbox.directory import Directory, generate
from daemon.sandbox.pingone import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    TRANSACTION_HEADER,
    PingOneEmulator,
)
from daemon.sandbox.server import serve

STAFF = "11111111-1111-4111-8111-111111111111"
ZPA = "22222222-2222-4222-8222-222222222222"
CONTRACTORS = "33333333-3333-4333-8333-333333333333"
ENG = "44444444-4444-4444-8444-444444444444"
OTHER_POP = "55555555-5555-4555-8555-555555555555"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


class FakeClock:
    """Advances one second per reading, so every stamp is distinct and ordered."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def small_directory() -> Directory:
    d = Directory(clock=FakeClock())
    d.add_user("alice@example.com", email="alice@example.com", given="Alice", family="Smith",
               department="Engineering", title="Engineer", employeeNumber="E1")
    d.add_user("Bob@Example.com", email="bob@example.com", given="Bob", family="Jones",
               department="Sales", title="Manager")
    d.add_user("carol", email="carol@corp.example.org", given="Carol", family="Müller", enabled=False,
               department="Engineering")
    d.add_user("dave@example.com", email="dave@example.com", given="Dave", family="Smithers",
               population_id=OTHER_POP)
    d.add_group("All Staff", id=STAFF)
    d.add_group("ZPA Users", id=ZPA)
    d.add_group("ZPA Contractors", id=CONTRACTORS)
    d.add_group("Engineering", id=ENG, user_filter='department eq "Engineering"')
    for user_id in d.users:
        d.add_member(STAFF, user_id)
    d.add_member(ZPA, uid(d, "alice"))
    d.add_member(CONTRACTORS, uid(d, "dave"))
    d.nest(CONTRACTORS, ZPA)
    return d


def uid(d: Directory, who: str) -> str:
    names = {"alice": "alice@example.com", "bob": "bob@example.com", "carol": "carol",
             "dave": "dave@example.com"}
    return str(d.user_by_username(names.get(who, who))["id"])


@dataclass
class Api:
    session: aiohttp.ClientSession
    base: str
    emulator: PingOneEmulator
    token: str = ""

    @property
    def env(self) -> str:
        return f"{self.base}/v1/environments/{self.emulator.directory.env_id}"

    async def get_token(self) -> str:
        async with self.session.post(
            f"{self.base}/{self.emulator.directory.env_id}/as/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)},
        ) as response:
            assert response.status == 200, await response.text()
            self.token = (await response.json())["access_token"]
        return self.token

    async def get(self, url: str, **params: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        if not url.startswith("http"):
            url = self.env + url
        async with self.session.get(url, params=params or None,
                                    headers={"Authorization": f"Bearer {self.token}"}) as response:
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, body, response

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, f"{self.base}/_admin{path}", json=body) as response:
            data = await response.json() if response.content_type == "application/json" else None
            return response.status, data

    async def list_all(self, path: str, **params: str) -> list[dict[str, Any]]:
        status, body, _ = await self.get(path, **params)
        assert status == 200, body
        items = list(body["_embedded"][path.strip("/")])
        while "next" in body["_links"]:
            status, body, _ = await self.get(body["_links"]["next"]["href"])
            assert status == 200, body
            items.extend(body["_embedded"][path.strip("/")])
        return items


async def _api(emulator: PingOneEmulator) -> AsyncIterator[Api]:
    async with serve(emulator.app()) as base, aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        api = Api(session, base, emulator)
        await api.get_token()
        yield api


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async for item in _api(PingOneEmulator(small_directory())):
        yield item


# --- token -----------------------------------------------------------------------------------------

async def test_token_with_basic_auth_returns_a_bearer_jwt(api: Api) -> None:
    async with api.session.post(
        f"{api.base}/{api.emulator.directory.env_id}/as/token", data={"grant_type": "client_credentials"},
        headers={"Authorization": aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)},
    ) as response:
        body = await response.json()
    assert response.status == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    header = json.loads(base64.urlsafe_b64decode(body["access_token"].split(".")[0] + "=="))
    assert header["alg"] == "RS256" and len(body["access_token"].split(".")) == 3


async def test_token_with_post_auth_when_configured_and_basic_refused() -> None:
    emulator = PingOneEmulator(small_directory(), auth_method="post")
    async with serve(emulator.app()) as base, aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        url = f"{base}/{emulator.directory.env_id}/as/token"
        form = {"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET}
        async with session.post(url, data=form) as response:
            assert response.status == 200
            assert (await response.json())["token_type"] == "Bearer"
        async with session.post(url, data={"grant_type": "client_credentials"}, headers={
                "Authorization": aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)}) as response:
            body = await response.json()
            assert response.status == 401 and body["error"] == "invalid_client"
            assert "unsupported authentication method" in body["error_description"]


@pytest.mark.parametrize(("client_id", "secret"), [(DEFAULT_CLIENT_ID, "wrong"), ("someone", DEFAULT_CLIENT_SECRET)])
async def test_token_with_wrong_credentials_is_401_invalid_client(api: Api, client_id: str, secret: str) -> None:
    async with api.session.post(
        f"{api.base}/{api.emulator.directory.env_id}/as/token", data={"grant_type": "client_credentials"},
        headers={"Authorization": aiohttp.encode_basic_auth(client_id, secret)},
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "invalid_client"


async def test_token_with_other_grant_type_is_400(api: Api) -> None:
    async with api.session.post(
        f"{api.base}/{api.emulator.directory.env_id}/as/token", data={"grant_type": "password"},
        headers={"Authorization": aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)},
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "unsupported_grant_type"


@pytest.mark.parametrize("token", ["", "not-a-token"])
async def test_api_without_a_valid_token_is_401_access_failed(api: Api, token: str) -> None:
    api.token = token
    status, body, _ = await api.get("/users")
    assert status == 401
    assert body["code"] == "ACCESS_FAILED" and body["details"][0]["code"] == "INVALID_TOKEN"
    assert "id" in body and "message" in body


async def test_expired_token_is_401() -> None:
    async for api in _api(PingOneEmulator(small_directory(), token_ttl=0.5)):
        status, _, _ = await api.get("/users")
        assert status == 200
        await asyncio.sleep(0.6)
        status, body, _ = await api.get("/users")
        assert status == 401 and body["details"][0]["code"] == "INVALID_TOKEN"


async def test_revoked_tokens_are_401_until_a_new_one_is_fetched(api: Api) -> None:
    api.emulator.revoke_tokens()
    assert (await api.get("/users"))[0] == 401
    await api.get_token()
    assert (await api.get("/users"))[0] == 200
    assert (await api.admin("POST", "/revoke-tokens"))[0] == 204
    assert (await api.get("/users"))[0] == 401


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/users/00000000-0000-4000-8000-000000000000",
                                  "/groups/00000000-0000-4000-8000-000000000000",
                                  "/users/00000000-0000-4000-8000-000000000000/memberOfGroups",
                                  "/groups/00000000-0000-4000-8000-000000000000/memberOfGroups",
                                  "/nothing-here"])
async def test_unknown_ids_and_paths_are_404_not_found(api: Api, path: str) -> None:
    status, body, _ = await api.get(path)
    assert status == 404 and body["code"] == "NOT_FOUND"


async def test_unknown_environment_is_404_not_found(api: Api) -> None:
    status, body, _ = await api.get(f"{api.base}/v1/environments/00000000-0000-4000-8000-00000000dead/users")
    assert status == 404 and body["code"] == "NOT_FOUND"


async def test_unsupported_method_is_405_envelope(api: Api) -> None:
    async with api.session.delete(f"{api.env}/users", headers={"Authorization": f"Bearer {api.token}"}) as r:
        assert r.status == 405
        assert (await r.json())["code"] == "METHOD_NOT_ALLOWED"


async def test_transaction_id_is_echoed_or_generated(api: Api) -> None:
    async with api.session.get(f"{api.env}/users", headers={
            "Authorization": f"Bearer {api.token}", TRANSACTION_HEADER: "txn-42"}) as response:
        assert response.headers[TRANSACTION_HEADER] == "txn-42"
    _, _, response = await api.get("/users/unknown")
    assert len(response.headers[TRANSACTION_HEADER]) == 36


# --- paging ----------------------------------------------------------------------------------------

async def test_paging_with_a_server_cap_below_limit_follows_next_links_without_dup_or_miss() -> None:
    directory = generate(250, 10, seed=3)
    async for api in _api(PingOneEmulator(directory, users_page_cap=40)):
        status, body, _ = await api.get("/users", limit="100", filter='username co "@"')
        expected = sum(1 for u in directory.users.values() if "@" in u["username"])
        assert status == 200 and body["size"] == 40 and body["count"] == expected
        assert body["_links"]["self"]["href"].startswith(api.base)
        query = parse_qs(urlsplit(body["_links"]["next"]["href"]).query)
        assert query["limit"] == ["100"] and query["filter"] == ['username co "@"'] and query["cursor"]
        items = await api.list_all("/users", limit="100", filter='username co "@"')
        ids = [item["id"] for item in items]
        assert len(ids) == len(set(ids)) == expected
        assert all(item["_links"]["self"]["href"].endswith(item["id"]) for item in items)
        all_users = await api.list_all("/users", limit="1000")
        assert sorted(u["id"] for u in all_users) == sorted(directory.users)


async def test_last_page_has_no_next_and_size_counts_items(api: Api) -> None:
    status, body, _ = await api.get("/users", limit="3")
    assert body["size"] == 3 and body["count"] == 4 and "next" in body["_links"]
    status, body, _ = await api.get(body["_links"]["next"]["href"])
    assert status == 200 and body["size"] == 1 and "next" not in body["_links"]


async def test_paging_stays_consistent_when_users_change_between_pages() -> None:
    directory = generate(100, 5, seed=5)
    async for api in _api(PingOneEmulator(directory)):
        order = list(directory.user_order.ids)
        _status, body, _ = await api.get("/users", limit="10")
        seen = [u["id"] for u in body["_embedded"]["users"]]
        directory.delete_user(order[3])          # already served
        directory.delete_user(order[50])         # not yet served
        new = directory.add_user("late@example.com", email="late@example.com")["id"]
        directory.update_user(order[60], title="Changed")
        while "next" in body["_links"]:
            _status, body, _ = await api.get(body["_links"]["next"]["href"])
            seen.extend(u["id"] for u in body["_embedded"]["users"])
        assert len(seen) == len(set(seen))
        unchanged = [i for i in order if i not in (order[3], order[50])]
        assert set(unchanged) <= set(seen)
        assert order[50] not in seen and new in seen


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten"])
async def test_limit_outside_1_to_1000_is_400_invalid_data(api: Api, limit: str) -> None:
    status, body, _ = await api.get("/users", limit=limit)
    assert status == 400 and body["code"] == "INVALID_DATA"
    assert body["details"][0]["target"] == "limit"


async def test_bad_cursor_is_400(api: Api) -> None:
    status, body, _ = await api.get("/users", cursor="!!garbage!!")
    assert status == 400 and body["details"][0]["target"] == "cursor"


async def test_20k_listing_at_limit_1000_pages_every_user() -> None:
    """Its time is printed, not asserted (the 100k / 3 s target is bench/pingone_paging.py's)."""
    directory = generate(20_000, 50, seed=1)
    async for api in _api(PingOneEmulator(directory)):
        started = time.perf_counter()
        items = await api.list_all("/users", limit="1000")
        elapsed = time.perf_counter() - started
        print(f"\npaged {len(items)} users in-process: {elapsed:.2f} s")
        assert len(items) == 20_000
        assert len({item["id"] for item in items}) == 20_000


# --- filters ---------------------------------------------------------------------------------------

USER_FILTERS = [
    ('username eq "bob@example.com"', {"bob"}),            # case-insensitive username (unconfirmed)
    ('email sw "ALICE"', {"alice"}),
    ('email ew "example.org"', {"carol"}),
    ('name.family co "Smith"', {"alice", "dave"}),
    ('name.given eq "alice"', set()),                        # other strings are case-sensitive
    ('name.family ew "ller"', {"carol"}),
    ("enabled eq false", {"carol"}),
    ("enabled eq true", {"alice", "bob", "dave"}),
    (f'population.id eq "{OTHER_POP}"', {"dave"}),
    ('department eq "Engineering"', {"alice", "carol"}),
    ('employeeNumber sw "E"', {"alice"}),
    ('title eq "Manager" or title eq "Engineer"', {"alice", "bob"}),
    ('name.family sw "Smith" AND enabled eq true', {"alice", "dave"}),
    ('username eq "carol" or name.family eq "Jones" and enabled eq true', {"carol", "bob"}),
    ('(username eq "carol" or name.family eq "Jones") and enabled eq true', {"bob"}),
    ('(name.family eq "Smith") and (name.given sw "A")', {"alice"}),
    (f'memberOfGroups[id eq "{ZPA}"]', {"alice"}),
    (f'memberOfGroups[id eq "{ENG}"]', {"alice", "carol"}),
    (f'memberOfGroups[id eq "{ZPA}"] or memberOfGroups[id eq "{CONTRACTORS}"]', {"alice", "dave"}),
    (f'memberOfGroups[id eq "{STAFF}"] and name.family eq "Jones"', {"bob"}),
    (f'memberOfGroups[id eq "{STAFF}"] AND memberOfGroups[id eq "{ENG}"] AND enabled eq false', {"carol"}),
    ('memberOfGroups[id eq "00000000-0000-4000-8000-000000000000"]', set()),
]


@pytest.mark.parametrize(("text", "expected"), USER_FILTERS)
async def test_user_filter_forms_select_the_right_users(api: Api, text: str, expected: set[str]) -> None:
    d = api.emulator.directory
    items = await api.list_all("/users", filter=text)
    assert {item["id"] for item in items} == {uid(d, who) for who in expected}


async def test_updated_at_range_filters_compare_chronologically(api: Api) -> None:
    d = api.emulator.directory
    stamps = {who: d.users[uid(d, who)]["updatedAt"] for who in ("alice", "bob", "carol", "dave")}
    cases = [(f'updatedAt ge "{stamps["bob"]}"', {"bob", "carol", "dave"}),
             (f'updatedAt gt "{stamps["bob"]}"', {"carol", "dave"}),
             (f'updatedAt le "{stamps["bob"]}"', {"alice", "bob"}),
             (f'updatedAt lt "{stamps["bob"]}"', {"alice"}),
             (f'updatedAt ge "{stamps["bob"]}" and updatedAt le "{stamps["carol"]}"', {"bob", "carol"}),
             ('updatedAt ge "2024-01-01T00:00:00+00:00"', {"alice", "bob", "carol", "dave"})]
    for text, expected in cases:
        items = await api.list_all("/users", filter=text)
        assert {item["id"] for item in items} == {uid(d, who) for who in expected}, text


@pytest.mark.parametrize("text", [
    'foo eq "x"', 'username ne "x"', "username pr", 'not (username eq "x")',
    'memberOfGroups[name eq "x"]', 'updatedAt ge "yesterday"', "username eq", 'enabled eq "maybe"',
    'updatedAt sw "2024"', 'name.family gt "A"', 'identityProvider.type eq "PING_ONE"', 'username eq "x" and',
])
async def test_unsupported_user_filter_is_400_invalid_filter(api: Api, text: str) -> None:
    status, body, _ = await api.get("/users", filter=text)
    assert status == 400 and body["code"] == "INVALID_DATA"
    assert body["details"][0]["code"] == "INVALID_FILTER" and body["details"][0]["target"] == "filter"


@pytest.mark.parametrize(("text", "expected"), [
    ('name eq "ZPA Users"', {ZPA}),
    ('name sw "ZPA"', {ZPA, CONTRACTORS}),
    ('displayName eq "Engineering"', {ENG}),
    (f'id eq "{STAFF}"', {STAFF}),
    (f'population.id eq "{Directory().population_id}"', {STAFF, ZPA, CONTRACTORS, ENG}),
    ('name eq "ZPA Users" or name eq "All Staff"', {ZPA, STAFF}),
])
async def test_group_filters_select_the_right_groups(api: Api, text: str, expected: set[str]) -> None:
    assert {g["id"] for g in await api.list_all("/groups", filter=text)} == expected


@pytest.mark.parametrize("text", ['name co "Users"', 'description eq "x"', f'memberOfGroups[id eq "{ZPA}"]'])
async def test_unsupported_group_filter_is_400_invalid_filter(api: Api, text: str) -> None:
    status, body, _ = await api.get("/groups", filter=text)
    assert status == 400 and body["details"][0]["code"] == "INVALID_FILTER"


async def test_member_filter_includes_nested_members_with_the_transitive_knob() -> None:
    emulator = PingOneEmulator(small_directory(), member_filter_transitive=True)
    async for api in _api(emulator):
        items = await api.list_all("/users", filter=f'memberOfGroups[id eq "{ZPA}"]')
        assert {i["id"] for i in items} == {uid(emulator.directory, "alice"), uid(emulator.directory, "dave")}


# --- single objects, includes, expands, nesting, dynamic groups -------------------------------------

async def test_user_get_has_links_and_no_membership_unless_included(api: Api) -> None:
    d = api.emulator.directory
    alice = uid(d, "alice")
    status, body, _ = await api.get(f"/users/{alice}")
    assert status == 200 and body["username"] == "alice@example.com"
    assert body["_links"]["self"]["href"] == f"{api.env}/users/{alice}"
    assert body["name"] == {"given": "Alice", "family": "Smith", "formatted": "Alice Smith"}
    assert body["department"] == "Engineering" and "memberOfGroupIDs" not in body
    status, body, _ = await api.get(f"/users/{alice}", include="memberOfGroupIDs,memberOfGroupNames")
    assert set(body["memberOfGroupIDs"]) == {STAFF, ZPA, ENG}
    assert set(body["memberOfGroupNames"]) == {"All Staff", "ZPA Users", "Engineering"}
    status, body, _ = await api.get(f"/users/{uid(d, 'dave')}", include="memberOfGroupIDs")
    assert set(body["memberOfGroupIDs"]) == {STAFF, CONTRACTORS, ZPA}  # nested parent included
    status, body, _ = await api.get(f"/users/{uid(d, 'dave')}", expand="population")
    assert body["_embedded"]["population"]["id"] == OTHER_POP


async def test_user_member_of_groups_types_and_expand(api: Api) -> None:
    d = api.emulator.directory
    _status, body, _ = await api.get(f"/users/{uid(d, 'dave')}/memberOfGroups", expand="group")
    memberships = {m["id"]: m for m in body["_embedded"]["groupMemberships"]}
    assert {k: m["type"] for k, m in memberships.items()} == {
        STAFF: "DIRECT", CONTRACTORS: "DIRECT", ZPA: "INDIRECT"}
    assert memberships[ZPA]["name"] == "ZPA Users"
    assert memberships[ZPA]["_embedded"]["group"]["id"] == ZPA and body["count"] == 3
    _status, body, _ = await api.get(f"/users/{uid(d, 'carol')}/memberOfGroups", limit="1")
    assert body["size"] == 1 and "_embedded" not in body["_embedded"]["groupMemberships"][0]
    types = {body["_embedded"]["groupMemberships"][0]["id"]: body["_embedded"]["groupMemberships"][0]["type"]}
    while "next" in body["_links"]:
        _status, body, _ = await api.get(body["_links"]["next"]["href"])
        types.update({m["id"]: m["type"] for m in body["_embedded"]["groupMemberships"]})
    assert types == {STAFF: "DIRECT", ENG: "INDIRECT"}  # dynamic membership (type unconfirmed)


async def test_group_get_counts_and_total_with_include(api: Api) -> None:
    _status, body, _ = await api.get(f"/groups/{ZPA}")
    assert body["directMemberCounts"] == {"users": 1} and "totalMemberCounts" not in body
    assert body["name"] == body["displayName"] == "ZPA Users"
    _status, body, _ = await api.get(f"/groups/{ZPA}", include="totalMemberCounts")
    assert body["totalMemberCounts"] == {"users": 2}
    _status, body, _ = await api.get(f"/groups/{ENG}", include="totalMemberCounts")
    assert body["directMemberCounts"] == {"users": 0} and body["totalMemberCounts"] == {"users": 2}
    assert body["userFilter"] == 'department eq "Engineering"'
    groups = await api.list_all("/groups")
    assert all("directMemberCounts" in g and "totalMemberCounts" not in g for g in groups)


async def test_group_member_of_groups_lists_parents(api: Api) -> None:
    _status, body, _ = await api.get(f"/groups/{CONTRACTORS}/memberOfGroups", expand="group")
    assert [m["id"] for m in body["_embedded"]["groupMemberships"]] == [ZPA]
    assert body["_embedded"]["groupMemberships"][0]["_embedded"]["group"]["name"] == "ZPA Users"
    _status, body, _ = await api.get(f"/groups/{ZPA}/memberOfGroups")
    assert body["count"] == 0 and body["_embedded"]["groupMemberships"] == []


async def test_dynamic_group_membership_follows_user_changes(api: Api) -> None:
    d = api.emulator.directory
    filter_text = f'memberOfGroups[id eq "{ENG}"]'
    assert len(await api.list_all("/users", filter=filter_text)) == 2
    d.update_user(uid(d, "bob"), department="Engineering")
    assert len(await api.list_all("/users", filter=filter_text)) == 3
    _status, body, _ = await api.get(f"/groups/{ENG}", include="totalMemberCounts")
    assert body["totalMemberCounts"] == {"users": 3}


# --- admin routes ----------------------------------------------------------------------------------

async def test_admin_routes_change_what_the_api_serves(api: Api) -> None:
    status, user = await api.admin("POST", "/users", {
        "username": "erin@example.com", "email": "erin@example.com", "name": {"given": "Erin", "family": "Ng"},
        "department": "Legal"})
    assert status == 201 and user["name"]["formatted"] == "Erin Ng" and user["department"] == "Legal"
    erin = user["id"]
    status, body, _ = await api.get(f"/users/{erin}")
    assert status == 200 and body["email"] == "erin@example.com"
    assert (await api.admin("POST", "/users", {"username": "ERIN@example.com"}))[0] == 400
    status, user = await api.admin("PATCH", f"/users/{erin}", {"name": {"family": "Ngo"}, "title": "Counsel"})
    assert status == 200 and user["name"]["given"] == "Erin" and user["name"]["family"] == "Ngo"
    assert (await api.admin("PUT", f"/users/{erin}/enabled", {"enabled": False}))[0] == 200
    assert (await api.get(f"/users/{erin}"))[1]["enabled"] is False
    status, group = await api.admin("POST", "/groups", {"name": "Legal Team", "description": "lawyers"})
    assert status == 201
    gid = group["id"]
    assert (await api.admin("POST", "/groups", {"name": "Legal Team"}))[0] == 400
    assert (await api.admin("POST", f"/groups/{gid}/members", {"userId": erin}))[0] == 204
    status, body, _ = await api.get(f"/groups/{gid}")
    assert body["directMemberCounts"] == {"users": 1}
    assert (await api.admin("PATCH", f"/groups/{gid}", {"name": "Legal"}))[1]["name"] == "Legal"
    assert (await api.admin("POST", f"/groups/{gid}/parents", {"id": STAFF}))[0] == 204
    status, body = await api.admin("POST", f"/groups/{STAFF}/parents", {"id": gid})
    assert status == 400 and body["details"][0]["code"] == "CONSTRAINT_VIOLATION"
    status, body, _ = await api.get(f"/groups/{gid}/memberOfGroups")
    assert [m["id"] for m in body["_embedded"]["groupMemberships"]] == [STAFF]
    assert (await api.admin("DELETE", f"/groups/{gid}/parents/{STAFF}"))[0] == 204
    assert (await api.admin("DELETE", f"/groups/{gid}/members/{erin}"))[0] == 204
    assert (await api.admin("DELETE", f"/groups/{gid}/members/{erin}"))[0] == 404
    assert (await api.admin("DELETE", f"/groups/{gid}"))[0] == 204
    assert (await api.get(f"/groups/{gid}"))[0] == 404
    assert (await api.admin("DELETE", f"/users/{erin}"))[0] == 204
    assert (await api.get(f"/users/{erin}"))[0] == 404
    assert (await api.admin("DELETE", f"/users/{erin}"))[0] == 404
    status, state = await api.admin("GET", "/state")
    assert state["users"] == 4 and state["groups"] == 4 and state["nestings"] == 1
    status, counters = await api.admin("GET", "/counters")
    assert counters["users.get"] >= 3 and counters["admin.users.create"] == 2
    assert api.emulator.request_log[-1] == ("GET", "/_admin/counters")


async def test_admin_dynamic_group_via_user_filter(api: Api) -> None:
    status, group = await api.admin("POST", "/groups", {"name": "Sales", "userFilter": 'department eq "Sales"'})
    assert status == 201
    items = await api.list_all("/users", filter=f'memberOfGroups[id eq "{group["id"]}"]')
    assert [i["username"] for i in items] == ["Bob@Example.com"]
    status, _body = await api.admin("POST", "/groups", {"name": "Bad", "userFilter": 'nope eq "x"'})
    assert status == 400


# --- faults ----------------------------------------------------------------------------------------

async def set_faults(api: Api, **values: Any) -> None:
    status, _ = await api.admin("POST", "/faults", {"reset": True, "request_count": 0, **values})
    assert status == 200


async def test_fault_latency_delays_api_but_not_admin(api: Api) -> None:
    await set_faults(api, latency_ms=300)
    started = time.perf_counter()
    assert (await api.get("/users"))[0] == 200
    assert time.perf_counter() - started >= 0.3
    started = time.perf_counter()
    await api.admin("GET", "/state")
    assert time.perf_counter() - started < 0.3


async def test_fault_429_on_nth_request_has_retry_after_and_p1_body(api: Api) -> None:
    await set_faults(api, fail_nth={"2": "429"}, retry_after=2)
    assert (await api.get("/users"))[0] == 200
    status, body, response = await api.get("/users")
    assert status == 429 and response.headers["Retry-After"] == "2"
    assert body["code"] == "REQUEST_LIMITED" and body["details"][0]["code"] == "LIMIT_EXCEEDED"
    assert TRANSACTION_HEADER in response.headers
    assert (await api.get("/users"))[0] == 200


async def test_fault_rate_limit_bucket_answers_429(api: Api) -> None:
    await set_faults(api, rate_limit_rps=1, rate_limit_burst=2)
    statuses = [(await api.get("/users"))[0] for _ in range(4)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]


@pytest.mark.parametrize("kind", ["500", "503"])
async def test_fault_5xx_on_nth_request_is_unexpected_error(api: Api, kind: str) -> None:
    await set_faults(api, fail_nth={"1": kind})
    status, body, _ = await api.get("/users")
    assert status == int(kind) and body["code"] == "UNEXPECTED_ERROR"


async def test_fault_error_rate_one_fails_every_request(api: Api) -> None:
    await set_faults(api, error_rate=1.0, error_statuses=[503])
    assert [(await api.get("/groups"))[0] for _ in range(3)] == [503, 503, 503]
    await set_faults(api)
    assert (await api.get("/groups"))[0] == 200


@pytest.mark.parametrize("kind", ["malformed", "truncated"])
async def test_fault_malformed_or_truncated_json(api: Api, kind: str) -> None:
    await set_faults(api, fail_nth={"1": kind})
    async with api.session.get(f"{api.env}/users", headers={"Authorization": f"Bearer {api.token}"}) as r:
        text = await r.text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_fault_drop_closes_the_connection(api: Api) -> None:
    # aiohttp's client retries an idempotent request once after a disconnect, so drop twice.
    await set_faults(api, fail_nth={"1": "drop", "2": "drop"})
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.get("/users")
    assert api.emulator.faults.request_count == 2
    assert (await api.get("/users"))[0] == 200


async def test_fault_hang_until_the_client_gives_up(api: Api) -> None:
    await set_faults(api, fail_nth={"1": "hang"})
    started = time.perf_counter()
    with pytest.raises(asyncio.TimeoutError):
        async with api.session.get(f"{api.env}/users", headers={"Authorization": f"Bearer {api.token}"},
                                   timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    assert time.perf_counter() - started < 2


async def test_fault_fields_set_over_admin_and_reset(api: Api) -> None:
    status, body = await api.admin("POST", "/faults", {"latency_ms": 5, "fail_nth": {"7": "500"}})
    assert status == 200 and body["latency_ms"] == 5 and body["fail_nth"] == {"7": "500"}
    assert api.emulator.faults.fail_nth == {7: "500"}
    status, body = await api.admin("POST", "/faults", {"reset": True})
    assert body["latency_ms"] == 0 and body["fail_nth"] == {}
    assert (await api.admin("POST", "/faults", {"bogus": 1}))[0] == 400
