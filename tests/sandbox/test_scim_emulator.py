"""Contract tests for the SCIM target emulator, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from daemon.sandbox.faults import Faults
from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator, profile_settings
from daemon.sandbox.server import serve

pytestmark = pytest.mark.timeout(30)

AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
SCIM_JSON = "application/scim+json"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_URN = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_URN = "urn:ietf:params:scim:api:messages:2.0:Error"


class Client:
    """A thin SCIM client for the tests: JSON in, (status, body, headers) out."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None, auth: bool = True,
                   content_type: str = SCIM_JSON) -> tuple[int, Any, Any]:
        sent = {"Content-Type": content_type, **(AUTH if auth else {}), **(headers or {})}
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        async with self.session.request(method, self.base + path, data=data, headers=sent, params=params) as resp:
            raw = await resp.read()
            parsed = json.loads(raw) if raw else None
            return resp.status, parsed, resp.headers

    async def user(self, user_name: str, **attrs: Any) -> dict[str, Any]:
        status, body, _ = await self.call("POST", "/Users", {"userName": user_name, **attrs})
        assert status == 201, body
        return dict(body)

    async def group(self, name: str, members: list[str] | None = None, **attrs: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {"displayName": name, **attrs}
        if members is not None:
            payload["members"] = [{"value": m} for m in members]
        status, body, _ = await self.call("POST", "/Groups", payload)
        assert status == 201, body
        return dict(body)

    async def patch(self, path: str, *ops: dict[str, Any]) -> tuple[int, Any, Any]:
        return await self.call("PATCH", path, {"schemas": [PATCH_URN], "Operations": list(ops)})


@asynccontextmanager
async def running(profile: str = "generic", *, prefix: str = "/v2", client_timeout: float = 10.0,
                  **kwargs: Any) -> AsyncIterator[tuple[ScimEmulator, Client]]:
    emulator = ScimEmulator(profile, prefix=prefix, **kwargs)
    async with serve(emulator.app()) as base_url, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=client_timeout)) as session:
        yield emulator, Client(session, base_url + emulator.prefix)


def assert_error(status: int, body: Any, expected: int, scim_type: str | None = None) -> None:
    assert status == expected, body
    assert body["schemas"] == [ERROR_URN]
    assert body["status"] == str(expected)
    if scim_type is not None:
        assert body["scimType"] == scim_type


# --- discovery and auth ---------------------------------------------------------------------------


async def test_discovery_endpoints_describe_users_groups_and_enterprise_extension() -> None:
    async with running() as (_, c):
        status, spc, headers = await c.call("GET", "/ServiceProviderConfig")
        assert status == 200 and headers["Content-Type"].startswith(SCIM_JSON)
        assert spc["patch"]["supported"] is True and spc["etag"]["supported"] is False
        status, types, _ = await c.call("GET", "/ResourceTypes")
        assert types["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:ListResponse"]
        assert {t["id"] for t in types["Resources"]} == {"User", "Group"}
        status, schemas, _ = await c.call("GET", "/Schemas")
        assert ENTERPRISE in {s["id"] for s in schemas["Resources"]}
        status, one, _ = await c.call("GET", f"/Schemas/{ENTERPRISE}")
        assert status == 200 and one["id"] == ENTERPRISE
        status, body, _ = await c.call("GET", "/Schemas/urn:nope")
        assert_error(status, body, 404)
        status, body, _ = await c.call("POST", "/Schemas", {})
        assert_error(status, body, 405)


async def test_missing_or_wrong_bearer_token_is_401_with_scim_error() -> None:
    async with running() as (_, c):
        status, body, headers = await c.call("GET", "/Users", auth=False)
        assert_error(status, body, 401)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, body, _ = await c.call("GET", "/Users", auth=False, headers={"Authorization": "Bearer wrong"})
        assert_error(status, body, 401)
        status, body, _ = await c.call("GET", "/ServiceProviderConfig", auth=False)
        assert status == 401  # generic and zpa protect discovery too


async def test_zia_discovery_needs_no_token_but_users_do() -> None:
    async with running("zia") as (_, c):
        assert (await c.call("GET", "/Schemas", auth=False))[0] == 200
        assert (await c.call("GET", "/ServiceProviderConfig", auth=False))[0] == 200
        assert (await c.call("GET", "/Users", auth=False))[0] == 401


async def test_custom_token_and_zscaler_style_prefix() -> None:
    async with running("zpa", prefix="/scim/1/123456789/v2", token="zpa-secret") as (_, c):
        assert c.base.endswith("/scim/1/123456789/v2")
        status, _, _ = await c.call("GET", "/Users", headers={"Authorization": "Bearer zpa-secret"})
        assert status == 200
        assert (await c.call("GET", "/Users"))[0] == 401


async def test_unknown_route_is_404_scim_error() -> None:
    async with running() as (_, c):
        status, body, _ = await c.call("GET", "/NoSuchThing")
        assert_error(status, body, 404)


# --- users: create, read, uniqueness, delete ------------------------------------------------------


async def test_create_user_returns_201_location_and_second_precision_meta() -> None:
    async with running() as (em, c):
        status, body, headers = await c.call("POST", "/Users", {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "Ann@Example.com",
            "externalId": "p1-ann", "name": {"givenName": "Ann"}, "id": "client-chosen", "active": True})
        assert status == 201
        assert body["id"] != "client-chosen"
        assert headers["Location"] == body["meta"]["location"] == f"{c.base}/Users/{body['id']}"
        assert body["meta"]["resourceType"] == "User"
        assert len(body["meta"]["created"]) == 20 and body["meta"]["created"].endswith("Z")
        assert em.users[body["id"]]["userName"] == "Ann@Example.com"
        assert em.user_by_username("ann@EXAMPLE.com") is em.users[body["id"]]
        status, got, _ = await c.call("GET", f"/Users/{body['id']}")
        assert status == 200 and got["externalId"] == "p1-ann"


async def test_duplicate_username_in_any_case_is_409_uniqueness() -> None:
    async with running() as (_, c):
        await c.user("bob@example.com")
        status, body, _ = await c.call("POST", "/Users", {"userName": "BOB@example.COM"})
        assert_error(status, body, 409, "uniqueness")


async def test_unknown_user_id_is_404_and_delete_is_204_then_404() -> None:
    async with running() as (_, c):
        status, body, _ = await c.call("GET", "/Users/does-not-exist")
        assert_error(status, body, 404)
        user = await c.user("gone@example.com")
        assert (await c.call("DELETE", f"/Users/{user['id']}"))[0] == 204
        status, body, _ = await c.call("GET", f"/Users/{user['id']}")
        assert_error(status, body, 404)
        assert (await c.call("DELETE", f"/Users/{user['id']}"))[0] == 404


async def test_json_and_json_patch_content_types_are_accepted_others_refused() -> None:
    async with running() as (_, c):
        status, user, headers = await c.call("POST", "/Users", {"userName": "ct@example.com"},
                                             content_type="application/json")
        assert status == 201 and headers["Content-Type"].startswith(SCIM_JSON)
        status, _, _ = await c.call("PATCH", f"/Users/{user['id']}", {
            "schemas": [PATCH_URN], "Operations": [{"op": "replace", "path": "title", "value": "x"}]},
            content_type="application/json-patch+json")
        assert status == 200
        status, body, _ = await c.call("POST", "/Users", b"userName=x", content_type="text/plain")
        assert status == 415 and body["schemas"] == [ERROR_URN]
        status, body, _ = await c.call("POST", "/Users", b"{not json")
        assert_error(status, body, 400, "invalidSyntax")
        status, body, _ = await c.call("POST", "/Users", {"displayName": "no userName"})
        assert_error(status, body, 400, "invalidValue")


async def test_oversized_body_is_413_scim_error() -> None:
    async with running(max_request_bytes=1024) as (_, c):
        status, body, _ = await c.call("POST", "/Users", {"userName": "big@example.com", "title": "x" * 2000})
        assert_error(status, body, 413)


# --- listing, paging, filters, attributes ----------------------------------------------------------


async def test_list_pages_with_start_index_and_count() -> None:
    async with running() as (_, c):
        for i in range(25):
            await c.user(f"u{i:02d}@example.com")
        status, page, _ = await c.call("GET", "/Users", params={"startIndex": "11", "count": "10"})
        assert status == 200
        assert (page["totalResults"], page["startIndex"], page["itemsPerPage"]) == (25, 11, 10)
        assert page["Resources"][0]["userName"] == "u10@example.com"
        _, last, _ = await c.call("GET", "/Users", params={"startIndex": "21", "count": "10"})
        assert last["itemsPerPage"] == 5  # generic: the number returned
        _, clamped, _ = await c.call("GET", "/Users", params={"startIndex": "0", "count": "2"})
        assert clamped["startIndex"] == 1
        _, totals, _ = await c.call("GET", "/Users", params={"count": "0"})
        assert totals["totalResults"] == 25 and totals["Resources"] == []
        status, body, _ = await c.call("GET", "/Users", params={"count": "many"})
        assert_error(status, body, 400)


async def test_filters_on_username_externalid_id_and_and() -> None:
    async with running() as (_, c):
        ann = await c.user("ann@example.com", externalId="ext-1", title="Engineer")
        await c.user("annie@example.com", externalId="ext-2", title="Manager")

        async def names(expr: str) -> list[str]:
            status, body, _ = await c.call("GET", "/Users", params={"filter": expr})
            assert status == 200, body
            return sorted(u["userName"] for u in body["Resources"])

        assert await names('userName eq "ANN@example.com"') == ["ann@example.com"]
        assert await names('externalId eq "ext-2"') == ["annie@example.com"]
        assert await names('externalId eq "EXT-2"') == []  # caseExact
        assert await names(f'id eq "{ann["id"]}"') == ["ann@example.com"]
        assert await names('userName sw "ann" and title eq "manager"') == ["annie@example.com"]
        assert await names('userName co "nie" or not (title pr)') == ["annie@example.com"]
        assert await names('userName ew "@example.com" and (title eq "Engineer" or title eq "x")') == [
            "ann@example.com"]
        status, body, _ = await c.call("GET", "/Users", params={"filter": 'userName zz "x"'})
        assert_error(status, body, 400, "invalidFilter")


async def test_value_filters_and_enterprise_attribute_filters() -> None:
    async with running() as (_, c):
        await c.user("w@example.com", emails=[{"type": "work", "value": "w@corp.example"}],
                     **{ENTERPRISE: {"department": "Sales"}})
        await c.user("h@example.com", emails=[{"type": "home", "value": "h@home.example"}])
        _, body, _ = await c.call("GET", "/Users", params={"filter": 'emails[type eq "work"]'})
        assert [u["userName"] for u in body["Resources"]] == ["w@example.com"]
        _, body, _ = await c.call("GET", "/Users", params={
            "filter": 'emails[type eq "home" and value ew "home.example"]'})
        assert [u["userName"] for u in body["Resources"]] == ["h@example.com"]
        _, body, _ = await c.call("GET", "/Users", params={"filter": f'{ENTERPRISE}:department eq "sales"'})
        assert [u["userName"] for u in body["Resources"]] == ["w@example.com"]
        _, body, _ = await c.call("GET", "/Users", params={"filter": 'meta.lastModified gt "2000-01-01T00:00:00Z"'})
        assert body["totalResults"] == 2


async def test_group_filters_by_display_name_and_member_value() -> None:
    async with running() as (_, c):
        u = await c.user("m@example.com")
        await c.group("Engineering", [u["id"]])
        await c.group("Sales")
        _, body, _ = await c.call("GET", "/Groups", params={"filter": 'displayName eq "engineering"'})
        assert [g["displayName"] for g in body["Resources"]] == ["Engineering"]
        _, body, _ = await c.call("GET", "/Groups", params={
            "filter": f'displayName eq "Engineering" and members.value eq "{u["id"]}"'})
        assert body["totalResults"] == 1
        _, body, _ = await c.call("GET", "/Groups", params={"filter": f'members[value eq "{u["id"]}"]'})
        assert body["totalResults"] == 1
        _, body, _ = await c.call("GET", "/Groups", params={
            "filter": f'displayName eq "Sales" and members.value eq "{u["id"]}"'})
        assert body["totalResults"] == 0


async def test_attributes_and_excluded_attributes_both_spellings() -> None:
    async with running() as (_, c):
        u = await c.user("a@example.com", title="T", name={"givenName": "A", "familyName": "B"})
        g = await c.group("G", [u["id"]])
        _, body, _ = await c.call("GET", f"/Users/{u['id']}", params={"attributes": "title,name.givenName"})
        assert body["title"] == "T" and body["name"] == {"givenName": "A"} and "userName" not in body
        assert body["id"] == u["id"]
        _, body, _ = await c.call("GET", "/Groups", params={"excludedAttributes": "members"})
        assert "members" not in body["Resources"][0]
        _, body, _ = await c.call("GET", f"/Groups/{g['id']}", params={"excludeAttributes": "members"})
        assert "members" not in body and body["displayName"] == "G"
        _, body, _ = await c.call("GET", f"/Groups/{g['id']}")
        assert body["members"] == [{"value": u["id"]}]


async def test_sort_by_and_sort_order() -> None:
    async with running() as (_, c):
        for name in ("b", "C", "a"):
            await c.group(name)
        _, body, _ = await c.call("GET", "/Groups", params={"sortBy": "displayName", "sortOrder": "descending"})
        assert [g["displayName"] for g in body["Resources"]] == ["C", "b", "a"]


async def test_search_endpoints_take_a_search_request() -> None:
    async with running() as (_, c):
        await c.user("s1@example.com")
        await c.user("s2@example.com")
        await c.group("S")
        request = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                   "filter": 'userName eq "s2@example.com"', "startIndex": 1, "count": 10}
        status, body, _ = await c.call("POST", "/Users/.search", request)
        assert status == 200 and [u["userName"] for u in body["Resources"]] == ["s2@example.com"]
        status, body, _ = await c.call("POST", "/.search", {"count": 10})
        assert body["totalResults"] == 3
        status, body, _ = await c.call("POST", "/Groups/.search", {"attributes": ["displayName"]})
        assert body["Resources"][0]["displayName"] == "S"


# --- PUT and PATCH -------------------------------------------------------------------------------


async def test_put_replaces_the_user_and_keeps_id_and_created() -> None:
    async with running() as (_, c):
        u = await c.user("p@example.com", title="Old", nickName="nick")
        status, body, _ = await c.call("PUT", f"/Users/{u['id']}", {"userName": "p@example.com", "title": "New"})
        assert status == 200 and body["title"] == "New" and "nickName" not in body
        assert body["id"] == u["id"] and body["meta"]["created"] == u["meta"]["created"]
        await c.user("q@example.com")
        status, body, _ = await c.call("PUT", f"/Users/{u['id']}", {"userName": "Q@example.com"})
        assert_error(status, body, 409, "uniqueness")
        assert (await c.call("PUT", "/Users/nope", {"userName": "z@example.com"}))[0] == 404


async def test_patch_user_entra_style_replace_without_path_and_capitalised_ops() -> None:
    async with running() as (em, c):
        u = await c.user("e@example.com", active=True, name={"givenName": "Old", "familyName": "Keep"})
        status, body, _ = await c.patch(f"/Users/{u['id']}", {"op": "Replace", "value": {
            "name.givenName": "New", f"{ENTERPRISE}:department": "Ops", "active": "False", "displayName": "E"}})
        assert status == 200, body
        assert body["name"] == {"givenName": "New", "familyName": "Keep"}
        assert body[ENTERPRISE] == {"department": "Ops"} and ENTERPRISE in body["schemas"]
        assert body["active"] is False and body["displayName"] == "E"
        assert em.users[u["id"]]["active"] is False


async def test_patch_user_value_filter_paths_and_extension_urn_paths() -> None:
    async with running() as (_, c):
        u = await c.user("v@example.com", emails=[{"value": "plain@example.com"}])
        uid = u["id"]
        status, body, _ = await c.patch(f"/Users/{uid}", {"op": "add", "path": 'emails[type eq "work"].value',
                                                         "value": "work@example.com"})
        assert status == 200
        assert {"type": "work", "value": "work@example.com"} in body["emails"] and len(body["emails"]) == 2
        _, body, _ = await c.patch(f"/Users/{uid}", {"op": "replace", "path": 'emails[type eq "work"].value',
                                                    "value": "new@example.com"})
        assert {"type": "work", "value": "new@example.com"} in body["emails"]
        _, body, _ = await c.patch(f"/Users/{uid}", {"op": "add", "path": f"{ENTERPRISE}:department",
                                                    "value": "R&D"})
        assert body[ENTERPRISE]["department"] == "R&D"
        _, body, _ = await c.patch(f"/Users/{uid}", {"op": "remove", "path": 'emails[type eq "work"]'},
                                   {"op": "remove", "path": f"{ENTERPRISE}:department"})
        assert body["emails"] == [{"value": "plain@example.com"}] and ENTERPRISE not in body


async def test_patch_ops_are_atomic_a_failing_op_changes_nothing() -> None:
    async with running() as (em, c):
        u = await c.user("atomic@example.com", title="Before")
        status, body, _ = await c.patch(f"/Users/{u['id']}", {"op": "replace", "path": "title", "value": "After"},
                                        {"op": "remove"})
        assert_error(status, body, 400, "noTarget")
        assert em.users[u["id"]]["title"] == "Before"
        status, body, _ = await c.patch(f"/Users/{u['id']}", {"op": "frobnicate", "path": "title"})
        assert_error(status, body, 400, "invalidSyntax")
        status, body, _ = await c.patch(f"/Users/{u['id']}", {"op": "add", "path": "bad[[path", "value": 1})
        assert status == 400


async def test_patch_group_members_add_remove_forms_return_204() -> None:
    async with running() as (em, c):
        a, b, d = [await c.user(f"{n}@example.com") for n in "abd"]
        g = await c.group("Team")
        gid = g["id"]
        status, body, _ = await c.patch(f"/Groups/{gid}", {"op": "add", "path": "members",
                                                          "value": [{"value": a["id"]}, {"value": b["id"]}]})
        assert status == 204 and body is None
        await c.patch(f"/Groups/{gid}", {"op": "add", "value": {"members": [{"value": d["id"], "display": "d"}]}})
        assert {m["value"] for m in em.groups[gid]["members"]} == {a["id"], b["id"], d["id"]}
        await c.patch(f"/Groups/{gid}", {"op": "remove", "path": f'members[value eq "{a["id"]}"]'})
        await c.patch(f"/Groups/{gid}", {"op": "Remove", "path": "members", "value": [{"value": b["id"]}]})
        assert [m["value"] for m in em.groups[gid]["members"]] == [d["id"]]
        _, user, _ = await c.call("GET", f"/Users/{d['id']}")
        assert user["groups"][0]["value"] == gid and user["groups"][0]["display"] == "Team"
        await c.patch(f"/Groups/{gid}", {"op": "remove", "path": "members"})
        assert em.groups[gid]["members"] == []
        status, body, _ = await c.patch(f"/Groups/{gid}", {"op": "add", "path": "members",
                                                          "value": [{"value": "pingone-id-not-here"}]})
        assert_error(status, body, 400, "invalidValue")
        await c.patch(f"/Groups/{gid}", {"op": "replace", "path": "displayName", "value": "Renamed"})
        assert em.group_by_name("renamed")["id"] == gid


async def test_remove_members_value_list_clears_all_failure_knob() -> None:
    async with running(remove_members_value_list_clears_all=True) as (em, c):
        a, b = await c.user("a@example.com"), await c.user("b@example.com")
        g = await c.group("G", [a["id"], b["id"]])
        await c.patch(f"/Groups/{g['id']}", {"op": "remove", "path": "members", "value": [{"value": a["id"]}]})
        assert em.groups[g["id"]]["members"] == []


async def test_group_patch_returns_body_knob() -> None:
    async with running(group_patch_returns_body=True) as (_, c):
        g = await c.group("G")
        status, body, _ = await c.patch(f"/Groups/{g['id']}", {"op": "replace", "path": "externalId",
                                                              "value": "x"})
        assert status == 200 and body["externalId"] == "x"


async def test_generic_group_put_replaces_and_duplicate_group_name_is_409() -> None:
    async with running() as (em, c):
        a = await c.user("a@example.com")
        g = await c.group("G", [a["id"]], externalId="e")
        status, body, _ = await c.call("PUT", f"/Groups/{g['id']}", {"displayName": "G2"})
        assert status == 200 and "externalId" not in body and em.groups[g["id"]]["members"] == []
        status, body, _ = await c.call("POST", "/Groups", {"displayName": "g2"})
        assert_error(status, body, 409, "uniqueness")


async def test_deleting_a_user_removes_it_from_groups() -> None:
    async with running() as (em, c):
        a = await c.user("a@example.com")
        g = await c.group("G", [a["id"]])
        await c.call("DELETE", f"/Users/{a['id']}")
        assert em.groups[g["id"]]["members"] == []
        assert (await c.call("DELETE", f"/Groups/{g['id']}"))[0] == 204
        assert (await c.call("GET", f"/Groups/{g['id']}"))[0] == 404


# --- ZPA quirks -------------------------------------------------------------------------------------


async def test_zpa_pages_default_10_max_100_and_items_per_page_echoes() -> None:
    async with running("zpa", faults=Faults()) as (em, c):
        for i in range(120):
            em.put_user({"userName": f"z{i}@example.com"})
        _, body, _ = await c.call("GET", "/Users")
        assert len(body["Resources"]) == 10 and body["itemsPerPage"] == 10 and body["totalResults"] == 120
        _, body, _ = await c.call("GET", "/Users", params={"count": "500"})
        assert len(body["Resources"]) == 100
        _, body, _ = await c.call("GET", "/Users", params={"filter": 'userName eq "z1@example.com"'})
        assert body["totalResults"] == 1 and body["itemsPerPage"] == 10  # echo, not the number returned


async def test_zpa_group_list_omits_members_and_put_merges() -> None:
    async with running("zpa", rate_limit_rps=None) as (em, c):
        a = await c.user("a@example.com")
        g = await c.group("G", [a["id"]], externalId="old")
        _, body, _ = await c.call("GET", "/Groups")
        assert "members" not in body["Resources"][0]
        status, body, _ = await c.call("PUT", f"/Groups/{g['id']}", {"externalId": "new"})
        assert status == 200 and body["displayName"] == "G" and body["externalId"] == "new"
        assert em.groups[g["id"]]["members"] == [{"value": a["id"]}]
        status, _, _ = await c.patch(f"/Groups/{g['id']}", {"op": "remove", "path": "members"})
        assert status == 204 and em.groups[g["id"]]["members"] == []


async def test_zpa_ignores_groups_on_user_writes_and_active_false_deletes() -> None:
    async with running("zpa", rate_limit_rps=None) as (em, c):
        g = await c.group("G")
        u = await c.user("a@example.com", groups=[{"value": g["id"]}], active=True)
        assert em.groups[g["id"]]["members"] == []
        status, body, _ = await c.patch(f"/Users/{u['id']}", {"op": "replace", "path": "active", "value": False})
        assert status == 200 and body["active"] is False
        assert (await c.call("GET", f"/Users/{u['id']}"))[0] == 404
        assert em.user_by_username("a@example.com") is None


async def test_zpa_active_false_delete_knob_off_keeps_the_user() -> None:
    async with running("zpa", rate_limit_rps=None, active_false_deletes=False) as (em, c):
        u = await c.user("a@example.com")
        await c.patch(f"/Users/{u['id']}", {"op": "replace", "path": "active", "value": False})
        assert em.users[u["id"]]["active"] is False


async def test_zpa_legacy_active_string_numeric_ids_and_enterprise_hoisting() -> None:
    async with running("zpa", rate_limit_rps=None, active_as_string=True, numeric_ids=True) as (em, c):
        u = await c.user("a@example.com", active=True, department="Eng", costCenter="42")
        assert u["active"] == "true" and u["id"].isdigit()
        assert u[ENTERPRISE] == {"department": "Eng", "costCenter": "42"} and "department" not in u
        assert em.users[u["id"]]["active"] is True


async def test_zpa_memberships_beyond_the_cap_are_silently_not_stored() -> None:
    async with running("zpa", rate_limit_rps=None, max_groups_per_user=2) as (em, c):
        a = await c.user("a@example.com")
        for name in ("g1", "g2", "g3"):
            await c.group(name, [a["id"]])
        assert len(em._member_of[a["id"]]) == 2
        assert em.group_by_name("g3")["members"] == []


async def test_zpa_refuses_a_username_change_by_patch_or_put_unless_the_knob_is_off() -> None:
    async with running("zpa", rate_limit_rps=None) as (em, c):
        u = await c.user("a@example.com", displayName="A")
        status, body, _ = await c.patch(f"/Users/{u['id']}",
                                        {"op": "replace", "path": "userName", "value": "b@example.com"})
        assert_error(status, body, 400, "mutability")
        status, body, _ = await c.call("PUT", f"/Users/{u['id']}", {"userName": "A@example.com"})
        assert_error(status, body, 400, "mutability")      # a change of case too
        assert em.users[u["id"]]["userName"] == "a@example.com"
        status, body, _ = await c.patch(f"/Users/{u['id']}",
                                        {"op": "replace", "path": "displayName", "value": "B"})
        assert status == 200 and body["displayName"] == "B"   # other attributes still change
    assert profile_settings("zpa").username_immutable is True
    async with running("zpa", rate_limit_rps=None, username_immutable=False) as (em, c):
        u = await c.user("a@example.com")
        status, body, _ = await c.patch(f"/Users/{u['id']}",
                                        {"op": "replace", "path": "userName", "value": "b@example.com"})
        assert status == 200 and body["userName"] == "b@example.com"


# --- ZIA quirks -------------------------------------------------------------------------------------


async def test_zia_refuses_to_delete_an_admin_linked_user_with_409_marked_over_admin() -> None:
    async with running("zia", rate_limit_rps=None) as (em, c):
        a = await c.user("admin@example.com")
        b = await c.user("b@example.com")
        async with c.session.post(c.base.rsplit("/v2", 1)[0] + "/_admin/admin_users",
                                  json={"userName": "ADMIN@example.com"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["admin_linked"] == [a["id"]]
        status, body, _ = await c.call("DELETE", f"/Users/{a['id']}")
        assert_error(status, body, 409)
        assert body["detail"] == "Admin user cannot be deleted"
        assert a["id"] in em.users
        # a disable still goes through (it disables the linked admin too, §9)
        status, body, _ = await c.patch(f"/Users/{a['id']}", {"op": "replace", "path": "active", "value": False})
        assert status == 200 and body["active"] is False
        assert (await c.call("DELETE", f"/Users/{b['id']}"))[0] == 204
        async with c.session.post(c.base.rsplit("/v2", 1)[0] + "/_admin/admin_users",
                                  json={"id": a["id"], "linked": False}) as resp:
            assert (await resp.json())["admin_linked"] == []
        assert (await c.call("DELETE", f"/Users/{a['id']}"))[0] == 204
    async with running("generic") as (em, c):
        a = await c.user("admin@example.com")
        em.mark_admin(a["id"])
        assert (await c.call("DELETE", f"/Users/{a['id']}"))[0] == 204   # only zia refuses


async def test_zia_refuses_unregistered_domains() -> None:
    async with running("zia", rate_limit_rps=None) as (_, c):
        status, body, _ = await c.call("POST", "/Users", {"userName": "a@elsewhere.org"})
        assert_error(status, body, 400, "invalidValue")
        status, body, _ = await c.call("POST", "/Users", {"userName": "no-at-sign"})
        assert status == 400
        assert (await c.call("POST", "/Users", {"userName": "a@EXAMPLE.com"}))[0] == 201
    async with running("zia", rate_limit_rps=None, registered_domains=("corp.test",)) as (_, c):
        assert (await c.call("POST", "/Users", {"userName": "a@corp.test"}))[0] == 201


async def test_zia_caps_groups_per_user_with_400() -> None:
    async with running("zia", rate_limit_rps=None, max_groups_per_user=2) as (em, c):
        a = await c.user("a@example.com")
        await c.group("g1", [a["id"]])
        await c.group("g2", [a["id"]])
        g3 = await c.group("g3")
        status, body, _ = await c.patch(f"/Groups/{g3['id']}", {"op": "add", "path": "members",
                                                               "value": [{"value": a["id"]}]})
        assert_error(status, body, 400, "invalidValue")
        assert em.groups[g3["id"]]["members"] == []
    assert profile_settings("zia").max_groups_per_user == 127


async def test_zia_refuses_null_or_empty_member_objects() -> None:
    async with running("zia", rate_limit_rps=None) as (_, c):
        a = await c.user("a@example.com")
        g = await c.group("G")
        for value in ([None], [{}], [], None, [{"value": ""}]):
            status, body, _ = await c.patch(f"/Groups/{g['id']}", {"op": "add", "path": "members",
                                                                  "value": value})
            assert_error(status, body, 400, "invalidValue")
        status, body, _ = await c.call("POST", "/Groups", {"displayName": "H", "members": [None]})
        assert status == 400
        status, _, _ = await c.patch(f"/Groups/{g['id']}", {"op": "add", "value": {
            "members": [{"display": "a", "value": a["id"]}]}})
        assert status == 204


async def test_zia_department_top_level_and_in_extension_and_active_false_disables() -> None:
    async with running("zia", rate_limit_rps=None) as (_, c):
        u = await c.user("a@example.com", **{ENTERPRISE: {"department": "Finance"}})
        assert u["department"] == "Finance" and u[ENTERPRISE]["department"] == "Finance"
        await c.patch(f"/Users/{u['id']}", {"op": "replace", "value": {"active": False}})
        status, body, _ = await c.call("GET", f"/Users/{u['id']}")
        assert status == 200 and body["active"] is False


async def test_zia_get_pages_up_to_1000_but_search_caps_at_100() -> None:
    async with running("zia", rate_limit_rps=None) as (em, c):
        for i in range(150):
            em.put_user({"userName": f"u{i}@example.com"})
        _, body, _ = await c.call("GET", "/Users", params={"count": "150"})
        assert len(body["Resources"]) == 150 and body["itemsPerPage"] == 150
        _, body, _ = await c.call("POST", "/Users/.search", {"startIndex": 1, "count": 150})
        assert len(body["Resources"]) == 100 and body["totalResults"] == 150


# --- faults ---------------------------------------------------------------------------------------


async def test_latency_fault_delays_every_request() -> None:
    async with running(faults=Faults(latency_ms=150, jitter_ms=20)) as (_, c):
        started = time.monotonic()
        assert (await c.call("GET", "/Users"))[0] == 200
        assert time.monotonic() - started >= 0.15


async def test_deadline_latency_is_the_response_time_and_the_work_is_done_before_it() -> None:
    """latency_mode "deadline": handled at once, answered when the latency has passed since the
    request arrived; the emulator's own processing does not add to it."""
    async with running(faults=Faults(latency_ms=300, latency_mode="deadline")) as (em, c):
        started = time.monotonic()
        call = asyncio.ensure_future(c.call("POST", "/Users", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                                          "userName": "dl@example.com"}))
        await asyncio.sleep(0.15)
        assert not call.done() and em.user_by_username("dl@example.com") is not None   # created, not answered
        status, _, _ = await call
        assert status == 201 and time.monotonic() - started >= 0.3


async def test_error_rate_fault_answers_5xx_with_scim_error_and_spares_admin() -> None:
    async with running(faults=Faults(error_rate=1.0, seed=1)) as (em, c):
        status, body, _ = await c.call("GET", "/Users")
        assert status in (500, 503) and body["schemas"] == [ERROR_URN] and body["status"] == str(status)
        async with c.session.get(c.base.rsplit("/v2", 1)[0] + "/_admin/state") as resp:
            assert resp.status == 200
        assert em.counters["GET /Users"] == 0  # faulted before any handler
        assert em.request_log[-1]["status"] == status


async def test_429_with_and_without_retry_after() -> None:
    async with running(faults=Faults(rate_limit_429=1.0, retry_after=2)) as (em, c):
        status, body, headers = await c.call("GET", "/Users")
        assert_error(status, body, 429)
        assert headers["Retry-After"] == "2"
        em.faults.retry_after = None
        status, _, headers = await c.call("GET", "/Users")
        assert status == 429 and "Retry-After" not in headers


async def test_profile_token_bucket_limits_zia_to_5_per_second() -> None:
    async with running("zia") as (em, c):
        assert em.faults.rate_limit_rps == 5.0
        statuses = [(await c.call("GET", "/Users"))[0] for _ in range(12)]
        assert statuses.count(200) in range(5, 8) and 429 in statuses
        await asyncio.sleep(0.45)  # about two tokens back
        assert (await c.call("GET", "/Users"))[0] == 200


async def test_hang_fault_never_answers_until_the_client_gives_up() -> None:
    async with running(faults=Faults(hang_rate=1.0), client_timeout=0.3) as (_, c):
        with pytest.raises(asyncio.TimeoutError):
            await c.call("GET", "/Users")


async def test_consistency_delay_hides_new_objects_from_reads_for_a_while() -> None:
    async with running(consistency_delay_ms=300) as (_, c):
        u = await c.user("late@example.com")
        assert (await c.call("GET", f"/Users/{u['id']}"))[0] == 404
        _, body, _ = await c.call("GET", "/Users", params={"filter": 'userName eq "late@example.com"'})
        assert body["totalResults"] == 0
        status, _, _ = await c.call("POST", "/Users", {"userName": "late@example.com"})
        assert status == 409  # uniqueness still sees it
        await asyncio.sleep(0.35)
        assert (await c.call("GET", f"/Users/{u['id']}"))[0] == 200


async def test_admin_routes_set_faults_and_reset_state() -> None:
    async with running() as (em, c):
        admin = c.base.rsplit("/v2", 1)[0] + "/_admin"
        await c.user("a@example.com")
        async with c.session.post(f"{admin}/faults", json={"error_rate": 1.0, "error_statuses": [503],
                                                           "consistency_delay_ms": 5}) as resp:
            assert resp.status == 200 and (await resp.json())["error_statuses"] == [503]
        assert (await c.call("GET", "/Users"))[0] == 503
        async with c.session.post(f"{admin}/faults", json={"reset": True}) as resp:
            assert resp.status == 200
        assert em.profile.consistency_delay_ms == 0
        assert (await c.call("GET", "/Users"))[0] == 200
        async with c.session.post(f"{admin}/faults", json={"nonsense": 1}) as resp:
            assert resp.status == 400
        async with c.session.get(f"{admin}/counters") as resp:
            counters = await resp.json()
            assert counters["counters"]["POST /Users"] == 1 and counters["writes"] == 1
        async with c.session.get(f"{admin}/requests") as resp:
            assert (await resp.json())["requests"][0]["body"] == {"userName": "a@example.com"}
        async with c.session.post(f"{admin}/reset") as resp:
            assert resp.status == 200
        async with c.session.get(f"{admin}/state") as resp:
            state = await resp.json()
            assert state["users"] == [] and state["profile"]["name"] == "generic"
        assert em.user_by_username("a@example.com") is None


# --- inspection and the Python API ----------------------------------------------------------------


async def test_counters_count_handled_requests_including_failures_and_writes() -> None:
    async with running() as (em, c):
        u = await c.user("a@example.com")
        await c.call("POST", "/Users", {"userName": "a@example.com"})  # 409
        await c.call("GET", f"/Users/{u['id']}")
        await c.call("GET", "/Users", auth=False)  # 401, still reached the handler
        await c.patch(f"/Users/{u['id']}", {"op": "replace", "path": "title", "value": "t"})
        await c.call("POST", "/Users/.search", {})
        assert em.counters["POST /Users"] == 2 and em.counters["GET /Users"] == 2
        assert em.counters["PATCH /Users"] == 1 and em.writes() == 3
        assert [e["status"] for e in em.request_log] == [201, 409, 200, 401, 200, 200]
        em.reset_counters()
        assert em.writes() == 0 and em.request_log == []


async def test_put_user_and_put_group_change_state_without_http() -> None:
    async with running() as (em, c):
        user = em.put_user({"userName": "drift@example.com", "title": "x"})
        group = em.put_group({"displayName": "Drift", "members": [{"value": user["id"]}]})
        _, body, _ = await c.call("GET", "/Groups", params={"filter": 'displayName eq "drift"'})
        assert body["Resources"][0]["members"] == [{"value": user["id"]}]
        em.put_user({"id": user["id"], "userName": "drift@example.com", "title": "changed behind its back"})
        _, body, _ = await c.call("GET", f"/Users/{user['id']}")
        assert body["title"] == "changed behind its back" and body["groups"][0]["value"] == group["id"]
        assert em.writes() == 0


async def test_admin_posts_refuse_a_body_that_is_not_a_json_object_and_read_no_body_as_empty() -> None:
    async with running("zia", rate_limit_rps=None) as (em, c):
        admin = c.base.rsplit("/v2", 1)[0] + "/_admin"
        for route in ("/faults", "/admin_users"):
            async with c.session.post(admin + route, data=b"{not json",
                                      headers={"Content-Type": "application/json"}) as resp:
                assert (resp.status, await resp.json()) == (400, {"error": "body is not JSON"}), route
            async with c.session.post(admin + route, json=["a list"]) as resp:
                assert (resp.status, await resp.json()) == (400, {"error": "body must be an object"}), route
        async with c.session.post(admin + "/faults") as resp:       # no body: nothing changes
            assert resp.status == 200 and (await resp.json())["latency_ms"] == em.faults.latency_ms
        async with c.session.post(admin + "/admin_users") as resp:  # no body: no userName, no such user
            assert resp.status == 404
