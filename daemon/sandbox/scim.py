"""SCIM 2.0 target emulator (RFC 7643/7644) with `generic`, `zpa` and `zia` profiles.

The profiles follow shared/reference/zscaler-scim.md §6-§7. Facts that no source confirms are knobs
on `ScimProfile`, each marked UNCONFIRMED where it is defined. Faults (latency, 5xx, 429 with or
without Retry-After, the profile's token bucket, hangs) come from `daemon.sandbox.faults`.

Routes, under `prefix` (default `/v2`): `/Users`, `/Users/{id}`, `/Users/.search`, the same for
`/Groups`, `/.search`, `/ServiceProviderConfig`, `/ResourceTypes[/{id}]`, `/Schemas[/{id}]`.
Inspection, never faulted nor authenticated, under `/_admin`: `GET state`, `GET counters`,
`GET requests` (each with `started` and `finished`: arrival and answer, epoch seconds, latency
included), `POST faults`, `POST reset`, `POST admin_users` (mark a user admin-linked:
`{"userName": "…"}` or `{"id": "…"}`, `"linked": false` to unmark; zia refuses its DELETE with 409).

Run one on its own: `python -m daemon.sandbox.scim --profile zpa --port 8443`; the first line printed
on stdout is its base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import dataclasses
import json
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from daemon.sandbox.faults import Faults, fault_middleware
from daemon.sandbox.scim_filter import (
    CORE_GROUP,
    CORE_SCHEMAS_LOWER,
    CORE_USER,
    ENTERPRISE_USER,
    KNOWN_SCHEMAS,
    FilterError,
    ScimPath,
    compile_filter,
    get_key,
    get_value,
    parse_path,
    values_at,
)
from daemon.sandbox.server import DEFAULT_HOST, serve

DEFAULT_TOKEN = "sandbox-scim-token"
DEFAULT_PREFIX = "/v2"
DEFAULT_REQUEST_LOG_SIZE = 10_000
DEFAULT_FIRST_NUMERIC_ID = 290_000
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024  # larger bodies get 413; Zscaler's own limit is UNCONFIRMED
ADMIN_PREFIX = "/_admin"
SCIM_CONTENT_TYPE = "application/scim+json"
ACCEPTED_CONTENT_TYPES = frozenset({
    SCIM_CONTENT_TYPE, "application/json", "application/json-patch+json", "application/octet-stream",
})
ERROR_URN = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST_URN = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_URN = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH_URN = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
SPC_URN = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
RESOURCE_TYPE_URN = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"
SCHEMA_URN = "urn:ietf:params:scim:schemas:core:2.0:Schema"
ENTERPRISE_ATTRIBUTES = ("employeeNumber", "costCenter", "organization", "division", "department")
MULTI_VALUED = frozenset({"emails", "phonenumbers", "ims", "photos", "addresses", "groups", "entitlements",
                          "roles", "x509certificates", "members"})
MEMBER_KEYS = {"value": "value", "display": "display", "$ref": "$ref", "type": "type"}
ALWAYS_RETURNED = ("id", "schemas")
BODY_KEY = web.RequestKey("scim_body", object)  # the parsed request body, for the request log


@dataclass(slots=True)
class ScimProfile:
    """The behaviour of one kind of SCIM service provider; build with `profile_settings(name)`.

    Mutable on purpose, like `Faults`: a test may flip a knob while the emulator runs. The rate limit
    is copied into the emulator's `Faults` at construction; change it live through `emulator.faults`.
    """

    name: str                          # "generic" | "zpa" | "zia"
    default_page_size: int             # GET list without `count`
    max_page_size: int                 # cap on `count` for GET lists
    items_per_page_echo: bool          # zpa: itemsPerPage echoes the page size, not the number returned
    group_list_members: bool           # zpa False: group lists omit members
    group_put_merges: bool             # zpa True: PUT /Groups keeps attributes the body omits
    active_as_string: bool             # zpa legacy mode: "active": "true"
    ignore_user_groups: bool           # True: `groups` on user writes silently dropped; False: 400 mutability
    active_false_deletes: bool         # zpa: a write leaving active=false deletes the user (docs conflict)
    rate_limit_rps: float | None       # token bucket fed to Faults.rate_limit_rps
    registered_domains: tuple[str, ...] | None  # zia: userName domains accepted; None = any
    max_groups_per_user: int | None    # zia 127 (400 beyond), zpa 1000 (extra silently not stored)
    reject_empty_members: bool         # zia: null / empty member objects refused with 400
    department_top_level: bool         # zia: department output top-level and in the extension
    remove_members_value_list_clears_all: bool  # failure mode: remove path=members + value list clears all
    discovery_requires_auth: bool      # zia False: discovery endpoints unauthenticated
    consistency_delay_ms: float        # a created object is invisible to reads for this long
    group_patch_returns_body: bool = False  # PATCH /Groups: 204 (False) or 200 + resource (True)
    search_max_page_size: int | None = None  # cap on `count` for POST .search (zia 100); None = max_page_size
    numeric_ids: bool = False          # zpa legacy: numeric string ids instead of UUIDs
    validate_member_ids: bool = True   # UNCONFIRMED for Zscaler: unknown member id -> 400 invalidValue
    nested_groups: bool = True         # a group may be a member of a group (generic only; UNCONFIRMED)
    member_cap_silently_drops: bool = False  # zpa: memberships beyond the cap are not stored, no error
    hoist_enterprise_attributes: bool = False  # zpa/zia: top-level department etc. stored in the extension
    group_name_unique: bool = True     # 409 on duplicate group displayName (UNCONFIRMED for Zscaler)
    user_name_unique: bool = True      # False: a second user with a taken userName is accepted
                                       # (a lenient server; provisiond must not rely on a 409)
    member_output_value_only: bool = False  # zpa: group members echoed as [{value}] only
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # request bodies beyond this: 413 (UNCONFIRMED)
    # zia (zscaler-scim.md §9): a user linked to a ZIA admin account is not deleted by SCIM; DELETE
    # answers 409 "Admin user cannot be deleted". Mark one with `mark_admin` or POST /_admin/admin_users.
    admin_delete_refused: bool = False
    # zpa: a PUT/PATCH that changes userName answers 400 scimType `mutability`. UNCONFIRMED: IBM's
    # connector lists ZPA's userName as not modifiable (§2.4, §8.9); whether ZPA really refuses
    # the change, and with which status, is not documented. Default for zpa: refuse.
    username_immutable: bool = False


_BASE = ScimProfile(
    name="generic", default_page_size=100, max_page_size=1000, items_per_page_echo=False,
    group_list_members=True, group_put_merges=False, active_as_string=False, ignore_user_groups=True,
    active_false_deletes=False, rate_limit_rps=None, registered_domains=None, max_groups_per_user=None,
    reject_empty_members=False, department_top_level=False, remove_members_value_list_clears_all=False,
    discovery_requires_auth=True, consistency_delay_ms=0.0,
)
PROFILES: dict[str, ScimProfile] = {
    "generic": _BASE,
    # zscaler-scim.md §2, §6, §7. POST status 201, 409 on duplicates, 429 on excess: UNCONFIRMED.
    "zpa": dataclasses.replace(
        _BASE, name="zpa", default_page_size=10, max_page_size=100, items_per_page_echo=True,
        group_list_members=False, group_put_merges=True, active_false_deletes=True, rate_limit_rps=50.0,
        max_groups_per_user=1000, member_cap_silently_drops=True, nested_groups=False,
        hoist_enterprise_attributes=True, member_output_value_only=True,
        username_immutable=True,              # UNCONFIRMED (see the knob)
        # UNCONFIRMED whether ZPA has discovery endpoints at all or whether they need auth (§2.1).
        discovery_requires_auth=True,
    ),
    # zscaler-scim.md §3, §6, §7.
    "zia": dataclasses.replace(
        _BASE, name="zia", default_page_size=1000, max_page_size=1000, search_max_page_size=100,
        rate_limit_rps=5.0, registered_domains=("example.com",), max_groups_per_user=127,
        reject_empty_members=True, department_top_level=True, discovery_requires_auth=False,
        nested_groups=False, hoist_enterprise_attributes=True, admin_delete_refused=True,
    ),
}


def profile_settings(name: str, **overrides: Any) -> ScimProfile:
    """The settings of profile *name* with *overrides* applied (unknown names raise)."""
    try:
        base = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown SCIM profile {name!r}; expected one of {sorted(PROFILES)}") from None
    if overrides.get("registered_domains") is not None:
        overrides["registered_domains"] = tuple(overrides["registered_domains"])
    return dataclasses.replace(base, **overrides)


class ScimError(Exception):
    """An error answered with a SCIM Error body."""

    def __init__(self, status: int, detail: str, scim_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type
        self.headers = dict(headers or {})


def _json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type=SCIM_CONTENT_TYPE, headers=headers)


def error_response(status: int, detail: str, scim_type: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """A response carrying the RFC 7644 §3.12 Error body (status as a string)."""
    body: dict[str, Any] = {"schemas": [ERROR_URN], "status": str(status), "detail": detail}
    if scim_type:
        body["scimType"] = scim_type
    return _json_response(body, status, headers)


def _limit_response(retry_after: float | None) -> web.Response:
    headers = {}
    if retry_after is not None:
        # Integral seconds per RFC 9110; a fractional value is kept as is (tests use sub-second waits).
        headers["Retry-After"] = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
    return error_response(429, "too many requests", None, headers)


async def _admin_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The JSON object an /_admin POST carries (no body: `{}`), or the 400 that says why not."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return web.json_response({"error": "body is not JSON"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be an object"}, status=400)
    return body


_clock: list[Any] = [-1, ""]


def _timestamp() -> str:
    """UTC now, second precision with a `Z` (as Zscaler's meta shows), cached within the second."""
    now = int(time.time())
    if now != _clock[0]:
        _clock[0], _clock[1] = now, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return str(_clock[1])


# ---------------------------------------------------------------------------------------------
# Discovery documents


def _attr(name: str, type_: str = "string", *, multi: bool = False, required: bool = False,
          case_exact: bool = False, mutability: str = "readWrite", returned: str = "default",
          uniqueness: str = "none", subs: Iterable[dict[str, Any]] = (), canonical: Iterable[str] = (),
          refs: Iterable[str] = (), description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name, "type": type_, "multiValued": multi, "description": description or name,
        "required": required, "caseExact": case_exact, "mutability": mutability, "returned": returned,
        "uniqueness": uniqueness,
    }
    subs = list(subs)
    if subs:
        out["subAttributes"] = subs
    if canonical:
        out["canonicalValues"] = list(canonical)
    if refs:
        out["referenceTypes"] = list(refs)
    return out


def _schema(schema_id: str, name: str, description: str, attributes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schemas": [SCHEMA_URN], "id": schema_id, "name": name, "description": description,
            "attributes": attributes}


# Only what Zscaler documents (zscaler-scim.md §2.4, §3.3): the checker then tests what we serve.
USER_SCHEMA = _schema(CORE_USER, "User", "User Account", [
    _attr("userName", required=True, uniqueness="server"),
    _attr("name", "complex", subs=[_attr("formatted"), _attr("familyName"), _attr("givenName")]),
    _attr("displayName"),
    _attr("nickName"),
    _attr("title"),
    _attr("userType"),
    _attr("active", "boolean"),
    _attr("emails", "complex", multi=True, subs=[
        _attr("value"), _attr("type", canonical=("work", "home", "other")), _attr("primary", "boolean"),
    ]),
    _attr("groups", "complex", multi=True, mutability="readOnly", subs=[
        _attr("value", mutability="readOnly"),
        _attr("$ref", "reference", mutability="readOnly", refs=("User", "Group")),
        _attr("display", mutability="readOnly"),
        _attr("type", mutability="readOnly", canonical=("direct", "indirect")),
    ]),
])
GROUP_SCHEMA = _schema(CORE_GROUP, "Group", "Group", [
    _attr("displayName", required=True),
    _attr("members", "complex", multi=True, subs=[
        _attr("value", mutability="immutable"),
        _attr("$ref", "reference", mutability="immutable", refs=("User", "Group")),
        _attr("display", mutability="immutable"),
        _attr("type", mutability="immutable", canonical=("User", "Group")),
    ]),
])
ENTERPRISE_SCHEMA = _schema(ENTERPRISE_USER, "EnterpriseUser", "Enterprise User", [
    _attr("employeeNumber"), _attr("costCenter"), _attr("organization"), _attr("division"), _attr("department"),
])
SCHEMAS = (USER_SCHEMA, GROUP_SCHEMA, ENTERPRISE_SCHEMA)
RESOURCE_TYPES = (
    {"schemas": [RESOURCE_TYPE_URN], "id": "User", "name": "User", "endpoint": "/Users",
     "description": "User Account", "schema": CORE_USER,
     "schemaExtensions": [{"schema": ENTERPRISE_USER, "required": False}]},
    {"schemas": [RESOURCE_TYPE_URN], "id": "Group", "name": "Group", "endpoint": "/Groups",
     "description": "Group", "schema": CORE_GROUP},
)
_USER_NAMES = {a["name"].lower(): a["name"] for a in USER_SCHEMA["attributes"]} | {"externalid": "externalId"}
_GROUP_NAMES = {a["name"].lower(): a["name"] for a in GROUP_SCHEMA["attributes"]} | {"externalid": "externalId"}


# ---------------------------------------------------------------------------------------------
# PATCH (RFC 7644 §3.5.2), applied to a private copy of the resource so a failing op changes nothing


_CANONICAL = _GROUP_NAMES | _USER_NAMES | {schema.lower(): schema for schema in KNOWN_SCHEMAS}


def _canonical_key(container: Mapping[str, Any], name: str) -> str:
    """The key *name* already has in *container* (any case), else its schema spelling, else itself."""
    if name in container:
        return name
    key = get_key(container, name) if container else None
    return key if key is not None else _CANONICAL.get(name.lower(), name)


def _container(resource: dict[str, Any], uri: str | None, *, create: bool) -> dict[str, Any] | None:
    if uri is None or uri.lower() in CORE_SCHEMAS_LOWER:
        return resource
    key = _canonical_key(resource, uri)
    if key not in resource:
        if not create:
            return None
        resource[key] = {}
    value = resource[key]
    if not isinstance(value, dict):
        raise ScimError(400, f"{uri} is not an object", "invalidValue")
    return value


def _same_item(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "value" in a and "value" in b:
        return bool(a["value"] == b["value"])
    return bool(a == b)


# `members[value eq "ID"]`, the single-member removal provisiond sends (no escapes inside the id).
_MEMBER_EQ = re.compile(r'\s*members\s*\[\s*value\s+eq\s+"([^"\\]*)"\s*\]\s*', re.IGNORECASE)


def member_changes(operations: Any) -> list[tuple[str, list[Any]]] | None:
    """PATCH *operations* that only add members (path `members`, objects with a string `value`)
    or remove one (`members[value eq "ID"]`), as ("add", members) / ("remove", ids) runs with
    consecutive removals joined; None for anything else (the general path applies it)."""
    if not isinstance(operations, list) or not operations:
        return None
    out: list[tuple[str, list[Any]]] = []
    for operation in operations:
        if not isinstance(operation, dict):
            return None
        op = str(get_value(operation, "op") or "").lower()
        raw = get_value(operation, "path")
        value = get_value(operation, "value")
        if not isinstance(raw, str):
            return None
        if op == "add" and raw.strip().lower() == "members" and isinstance(value, list) and all(
                isinstance(m, dict) and isinstance(m.get("value"), str) and m["value"] for m in value):
            out.append(("add", value))
        elif op == "remove" and value is None and (match := _MEMBER_EQ.fullmatch(raw)) is not None:
            if out and out[-1][0] == "remove":
                out[-1][1].append(match.group(1))
            else:
                out.append(("remove", [match.group(1)]))
        else:
            return None
    return out


def _copy_two_levels(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy that a PATCH may change without touching the original: attributes, their lists and
    the flat objects in them (a group's members). Far cheaper than a deep copy of 20,000 members."""
    out: dict[str, Any] = {}
    for key, value in resource.items():
        if isinstance(value, list):
            out[key] = [dict(item) if isinstance(item, dict) else item for item in value]
        elif isinstance(value, dict):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = value
    return out


def _add_attr(container: dict[str, Any], name: str, value: Any) -> None:
    if value is None:
        return
    key = _canonical_key(container, name)
    existing = container.get(key)
    if isinstance(value, list) or isinstance(existing, list) or name.lower() in MULTI_VALUED:
        items = list(existing) if isinstance(existing, list) else ([] if existing is None else [existing])
        # Items with a `value` are compared through a set: adding 5,000 members stays linear.
        seen = {i["value"] for i in items if isinstance(i, dict) and isinstance(i.get("value"), str)}
        for item in value if isinstance(value, list) else [value]:
            v = item.get("value") if isinstance(item, dict) else None
            if isinstance(v, str):
                if v in seen:
                    continue
                seen.add(v)
            elif any(_same_item(item, have) for have in items):
                continue
            items.append(item)
        container[key] = items
    elif isinstance(value, dict) and isinstance(existing, dict):
        container[key] = {**existing, **value}
    else:
        container[key] = value


def _replace_attr(container: dict[str, Any], name: str, value: Any) -> None:
    key = _canonical_key(container, name)
    existing = container.get(key)
    if value is None:
        container.pop(key, None)
    elif isinstance(value, dict) and isinstance(existing, dict):
        container[key] = {**existing, **value}  # sub-attributes not given are left unchanged (§3.5.2.3)
    elif name.lower() in MULTI_VALUED and not isinstance(value, list):
        container[key] = [value]
    else:
        container[key] = value


def _complex(container: dict[str, Any], name: str) -> dict[str, Any]:
    key = _canonical_key(container, name)
    value = container.setdefault(key, {})
    if not isinstance(value, dict):
        raise ScimError(400, f"{name} is not a complex attribute", "invalidPath")
    return value


def _items(container: dict[str, Any], name: str) -> list[Any]:
    key = _canonical_key(container, name)
    value = container.get(key)
    if value is None:
        value = container[key] = []
    if not isinstance(value, list):
        raise ScimError(400, f"{name} is not multi-valued", "invalidPath")
    return value


def _seed(path: ScimPath, value: Any) -> dict[str, Any]:
    """A new element for `attr[filter].sub` when no element matches: the filter's eq terms plus the value."""
    assert path.value_filter is not None
    seed = {k: v for k, v in path.value_filter.equalities if "." not in k}
    if not seed:
        raise ScimError(400, f"no value matches {path.text}", "noTarget")
    if path.sub_attr is not None:
        seed[path.sub_attr] = value
    elif isinstance(value, dict):
        seed.update(value)
    else:
        raise ScimError(400, f"value for {path.text} must be an object", "invalidValue")
    return seed


def _apply_keyed(resource: dict[str, Any], op: str, key: str, value: Any) -> None:
    """One entry of a path-less add/replace value: a plain, dotted, or URN-qualified name, or a schema URN."""
    for schema in KNOWN_SCHEMAS:
        if key.lower() == schema.lower():
            if not isinstance(value, dict):
                raise ScimError(400, f"value for {schema} must be an object", "invalidValue")
            if schema.lower() in CORE_SCHEMAS_LOWER:
                for sub_key, sub_value in value.items():
                    _apply_keyed(resource, op, sub_key, sub_value)
            else:
                container = _container(resource, schema, create=True)
                assert container is not None
                for sub_key, sub_value in value.items():
                    (_add_attr if op == "add" else _replace_attr)(container, sub_key, sub_value)
            return
    path = parse_path(key)
    if op == "add":
        _patch_add(resource, path, value)
    else:
        _patch_replace(resource, path, value)


def _patch_add(resource: dict[str, Any], path: ScimPath | None, value: Any) -> None:
    if path is None:
        if not isinstance(value, dict):
            raise ScimError(400, "add without path needs an object value", "invalidValue")
        for key, item in value.items():
            _apply_keyed(resource, "add", key, item)
        return
    container = _container(resource, path.uri, create=True)
    assert container is not None
    if path.attr is None:
        if not isinstance(value, dict):
            raise ScimError(400, f"value for {path.uri} must be an object", "invalidValue")
        for key, item in value.items():
            _add_attr(container, key, item)
        return
    if path.value_filter is None:
        if path.sub_attr is None:
            _add_attr(container, path.attr, value)
        else:
            _add_attr(_complex(container, path.attr), path.sub_attr, value)
        return
    items = _items(container, path.attr)
    matched = [item for item in items if isinstance(item, dict) and path.value_filter.matches(item)]
    if not matched:
        # Entra/Zscaler: `add emails[type eq "work"].value` with no work email appends one (§2.4).
        items.append(_seed(path, value))
        return
    for item in matched:
        if path.sub_attr is not None:
            item[_canonical_key(item, path.sub_attr)] = value
        elif isinstance(value, dict):
            item.update(value)
        else:
            raise ScimError(400, f"value for {path.text} must be an object", "invalidValue")


def _patch_replace(resource: dict[str, Any], path: ScimPath | None, value: Any) -> None:
    if path is None:
        if not isinstance(value, dict):
            raise ScimError(400, "replace without path needs an object value", "invalidValue")
        for key, item in value.items():
            _apply_keyed(resource, "replace", key, item)
        return
    if path.attr is None:
        _replace_attr(resource, path.uri or "", value)
        return
    container = _container(resource, path.uri, create=True)
    assert container is not None
    if path.value_filter is None:
        if path.sub_attr is None:
            _replace_attr(container, path.attr, value)
        else:
            _replace_attr(_complex(container, path.attr), path.sub_attr, value)
        return
    items = _items(container, path.attr)
    matched = [item for item in items if isinstance(item, dict) and path.value_filter.matches(item)]
    if not matched:
        if path.sub_attr is None:
            raise ScimError(400, f"no value matches {path.text}", "noTarget")
        items.append(_seed(path, value))  # lenient, as Entra expects for emails[type eq "work"].value
        return
    for item in matched:
        if path.sub_attr is not None:
            _replace_attr(item, path.sub_attr, value)
        elif isinstance(value, dict):
            item.clear()
            item.update(value)
        else:
            raise ScimError(400, f"value for {path.text} must be an object", "invalidValue")


def _patch_remove(resource: dict[str, Any], path: ScimPath | None, value: Any, *, clears_all: bool) -> None:
    if path is None:
        raise ScimError(400, "remove requires a path", "noTarget")
    if path.attr is None:
        key = get_key(resource, path.uri or "")
        if key is not None:
            del resource[key]
        return
    container = _container(resource, path.uri, create=False)
    if container is None:
        return
    key = get_key(container, path.attr)
    if key is None:
        return
    is_members = path.attr.lower() == "members"
    current = container[key]
    if path.value_filter is None:
        if path.sub_attr is not None:
            for item in current if isinstance(current, list) else [current]:
                if isinstance(item, dict):
                    sub_key = get_key(item, path.sub_attr)
                    if sub_key is not None:
                        del item[sub_key]
        elif value is not None and isinstance(current, list):
            if is_members and clears_all:
                container[key] = []  # failure mode knob: the value list is ignored
            else:
                targets = value if isinstance(value, list) else [value]
                container[key] = [item for item in current if not any(_same_item(t, item) for t in targets)]
        else:
            del container[key]
            if is_members:
                container[key] = []
    elif isinstance(current, list):
        if path.sub_attr is None:
            container[key] = [i for i in current if not (isinstance(i, dict) and path.value_filter.matches(i))]
        else:
            for item in current:
                if isinstance(item, dict) and path.value_filter.matches(item):
                    sub_key = get_key(item, path.sub_attr)
                    if sub_key is not None:
                        del item[sub_key]
    if key in container and container[key] in ([], {}) and not is_members:
        del container[key]


def apply_patch(resource: dict[str, Any], operations: Any, *, clears_all: bool = False) -> None:
    """Apply PatchOp *operations* to *resource* in place (callers pass a copy; any error aborts)."""
    if not isinstance(operations, list) or not operations:
        raise ScimError(400, "PatchOp needs a non-empty Operations list", "invalidSyntax")
    for operation in operations:
        if not isinstance(operation, dict):
            raise ScimError(400, "each operation must be an object", "invalidSyntax")
        op = str(get_value(operation, "op") or "").lower()
        raw_path = get_value(operation, "path")
        path = parse_path(raw_path) if isinstance(raw_path, str) and raw_path.strip() else None
        value = get_value(operation, "value")
        if op == "add":
            _patch_add(resource, path, value)
        elif op == "replace":
            _patch_replace(resource, path, value)
        elif op == "remove":
            _patch_remove(resource, path, value, clears_all=clears_all)
        else:
            raise ScimError(400, f"unknown PATCH op {op!r}", "invalidSyntax")
    for key in [k for k, v in resource.items() if k.lower().startswith("urn:") and v == {}]:
        del resource[key]


# ---------------------------------------------------------------------------------------------
# The emulator


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _int_param(raw: Any, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ScimError(400, f"{name} must be an integer", "invalidValue") from None


def _names(raw: Any) -> list[str]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ScimError(400, f"active must be a boolean, not {value!r}", "invalidValue")


class ScimEmulator:
    """One SCIM service provider held in memory; `app()` serves it, the attributes expose it to tests."""

    def __init__(self, profile: str | ScimProfile = "generic", *, token: str = DEFAULT_TOKEN,
                 prefix: str = DEFAULT_PREFIX, faults: Faults | None = None, **profile_overrides: Any) -> None:
        if isinstance(profile, str):
            self.profile = profile_settings(profile, **profile_overrides)
        else:
            self.profile = dataclasses.replace(profile, **profile_overrides)
        self.token = token
        stripped = prefix.strip("/")
        self.prefix = f"/{stripped}" if stripped else ""
        self.faults = faults if faults is not None else Faults()
        if self.faults.rate_limit_rps is None:
            self.faults.rate_limit_rps = self.profile.rate_limit_rps
        self.users: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.request_log: list[dict[str, Any]] = []
        self.base_url = ""  # scheme://host:port, learned from the first request
        self._user_index: dict[str, str] = {}   # lower-case userName -> id
        self._group_index: dict[str, str] = {}  # lower-case displayName -> id
        self._member_of: dict[str, set[str]] = {}  # member id -> ids of the groups holding it
        self._hidden_until: dict[str, float] = {}  # id -> monotonic time it becomes visible
        self._order: dict[str, list[str]] = {}   # "Users"/"Groups" -> ids in creation order (cache)
        self._next_numeric = DEFAULT_FIRST_NUMERIC_ID
        self.admin_linked: set[str] = set()   # user ids linked to an admin account (zia)
        # A PATCH that only adds or removes members is applied at the cost of the change, not by
        # copying and re-validating every member (`member_changes`): the same result (checked by
        # tests/sandbox/test_scim_member_patch.py), so that a 500,000-member group's PATCH costs the
        # benchmarks milliseconds of emulator, not seconds. False: always the general path.
        self.fast_member_patch = True
        self._inflight: set[asyncio.Task[Any]] = set()  # cancelled on shutdown, so hung requests end

    # -- Python API for tests ------------------------------------------------------------------

    def user_by_username(self, user_name: str) -> dict[str, Any] | None:
        uid = self._user_index.get(user_name.lower())
        return self.users.get(uid) if uid is not None else None

    def group_by_name(self, display_name: str) -> dict[str, Any] | None:
        gid = self._group_index.get(display_name.lower())
        return self.groups.get(gid) if gid is not None else None

    def writes(self) -> int:
        """POST/PUT/PATCH/DELETE requests that reached a handler (POST .search is a read, not counted)."""
        return sum(n for key, n in self.counters.items()
                   if key.split(" ", 1)[0] in ("POST", "PUT", "PATCH", "DELETE") and not key.endswith(".search"))

    def reset_counters(self) -> None:
        self.counters.clear()
        self.request_log.clear()

    def put_user(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Insert or replace a user directly (no HTTP, no faults); `id` kept when given."""
        attrs = self._clean_user(copy.deepcopy(resource))
        existing = self.users.get(str(resource["id"])) if resource.get("id") else None
        return self._commit_user(attrs, existing, new_id=str(resource["id"]) if resource.get("id") else None)

    def put_group(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Insert or replace a group directly (no HTTP, no faults); `id` kept when given."""
        gid = str(resource["id"]) if resource.get("id") else None
        attrs = self._clean_group(copy.deepcopy(resource), gid)
        return self._commit_group(attrs, self.groups.get(gid) if gid else None, new_id=gid)

    def delete_user(self, user_id: str) -> bool:
        return self._delete_user(user_id)

    def mark_admin(self, user_id: str, linked: bool = True) -> None:
        """Link (or unlink) the user to an admin account: with `admin_delete_refused`, its DELETE
        answers 409. The mark goes with the user."""
        if linked:
            self.admin_linked.add(user_id)
        else:
            self.admin_linked.discard(user_id)

    def delete_group(self, group_id: str) -> bool:
        return self._delete_group(group_id)

    # -- the app ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.profile.max_request_bytes, middlewares=[
            self._observe,
            fault_middleware(
                self.faults, error_response=lambda status, detail: error_response(status, detail),
                limit_response=_limit_response, exclude_prefixes=(ADMIN_PREFIX,)),
        ])
        p = self.prefix
        routes: list[tuple[str, str, str, Handler, bool]] = [
            ("GET", "/Users", "/Users", self._list_users, False),
            ("POST", "/Users", "/Users", self._create_user, False),
            ("POST", "/Users/.search", "/Users/.search", self._search_users, False),
            ("GET", "/Users/{id}", "/Users", self._get_user, False),
            ("PUT", "/Users/{id}", "/Users", self._replace_user, False),
            ("PATCH", "/Users/{id}", "/Users", self._patch_user, False),
            ("DELETE", "/Users/{id}", "/Users", self._delete_user_route, False),
            ("GET", "/Groups", "/Groups", self._list_groups, False),
            ("POST", "/Groups", "/Groups", self._create_group, False),
            ("POST", "/Groups/.search", "/Groups/.search", self._search_groups, False),
            ("GET", "/Groups/{id}", "/Groups", self._get_group, False),
            ("PUT", "/Groups/{id}", "/Groups", self._replace_group, False),
            ("PATCH", "/Groups/{id}", "/Groups", self._patch_group, False),
            ("DELETE", "/Groups/{id}", "/Groups", self._delete_group_route, False),
            ("POST", "/.search", "/.search", self._search_all, False),
            ("GET", "/ServiceProviderConfig", "/ServiceProviderConfig", self._service_provider_config, True),
            ("GET", "/ResourceTypes", "/ResourceTypes", self._resource_types, True),
            ("GET", "/ResourceTypes/{id}", "/ResourceTypes", self._resource_type, True),
            ("GET", "/Schemas", "/Schemas", self._schemas, True),
            ("GET", "/Schemas/{id}", "/Schemas", self._schema, True),
        ]
        for method, path, name, handler, discovery in routes:
            app.router.add_route(method, p + path, self._wrap(f"{method} {name}", handler, discovery))
        app.on_shutdown.append(self._cancel_inflight)
        app.router.add_get(ADMIN_PREFIX + "/state", self._admin_state)
        app.router.add_get(ADMIN_PREFIX + "/counters", self._admin_counters)
        app.router.add_get(ADMIN_PREFIX + "/requests", self._admin_requests)
        app.router.add_post(ADMIN_PREFIX + "/faults", self._admin_faults)
        app.router.add_post(ADMIN_PREFIX + "/reset", self._admin_reset)
        app.router.add_post(ADMIN_PREFIX + "/admin_users", self._admin_admin_users)
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.base_url:
            self.base_url = f"{request.scheme}://{request.host}"
        if request.path.startswith(ADMIN_PREFIX):
            return await handler(request)
        started = time.time()
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # unknown route (404), wrong method (405), ...
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error_response(exc.status, exc.reason, None, headers)
        finally:
            if task is not None:
                self._inflight.discard(task)
        log = self.request_log
        log.append({"method": request.method, "path": request.path, "query": request.query_string,
                    "status": response.status, "body": request.get(BODY_KEY),
                    "started": started, "finished": time.time()})      # arrival and answer (epoch s)
        if len(log) > DEFAULT_REQUEST_LOG_SIZE + DEFAULT_REQUEST_LOG_SIZE // 10:
            del log[: len(log) - DEFAULT_REQUEST_LOG_SIZE]
        return response

    async def _cancel_inflight(self, app: web.Application) -> None:
        for task in list(self._inflight):
            task.cancel()

    def _wrap(self, counter: str, handler: Handler, discovery: bool) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.counters[counter] += 1
            try:
                if self.profile.discovery_requires_auth or not discovery:
                    self._authorize(request)
                return await handler(request)
            except ScimError as exc:
                return error_response(exc.status, exc.detail, exc.scim_type, exc.headers or None)
            except FilterError as exc:
                return error_response(400, str(exc), exc.scim_type)
        return wrapped

    def _authorize(self, request: web.Request) -> None:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or credentials.strip() != self.token:
            raise ScimError(401, "missing or invalid bearer token", None, {"WWW-Authenticate": 'Bearer realm="scim"'})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type not in ACCEPTED_CONTENT_TYPES:
            raise ScimError(415, f"unsupported content type {request.content_type}", "invalidSyntax")
        raw = await request.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise ScimError(400, "body is not valid JSON", "invalidSyntax") from None
        if not isinstance(data, dict):
            raise ScimError(400, "body must be a JSON object", "invalidSyntax")
        request[BODY_KEY] = data
        return data

    def _origin(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    def _new_id(self) -> str:
        if self.profile.numeric_ids:
            self._next_numeric += 1
            return str(self._next_numeric)
        return str(uuid.uuid4())

    def _visible(self, resource_id: str) -> bool:
        until = self._hidden_until.get(resource_id)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._hidden_until[resource_id]
            return True
        return False

    def _hide_if_delayed(self, resource_id: str) -> None:
        if self.profile.consistency_delay_ms > 0:
            self._hidden_until[resource_id] = time.monotonic() + self.profile.consistency_delay_ms / 1000.0

    # -- validation and commit -------------------------------------------------------------------

    def _clean_user(self, data: dict[str, Any]) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        for key, value in data.items():
            low = key.lower()
            if low in ("id", "meta", "schemas") or value is None:
                continue
            if low == "groups":
                if self.profile.ignore_user_groups:
                    continue  # memberships change only through /Groups (zscaler-scim.md §2.4)
                raise ScimError(400, "groups is readOnly; change memberships through /Groups", "mutability")
            attrs[_canonical_key({}, key)] = value
        if self.profile.hoist_enterprise_attributes:
            for name in ENTERPRISE_ATTRIBUTES:
                found = get_key(attrs, name)
                if found is not None:
                    extension = attrs.setdefault(ENTERPRISE_USER, {})
                    if isinstance(extension, dict):
                        extension.setdefault(name, attrs.pop(found))
        user_name = attrs.get("userName")
        if not isinstance(user_name, str) or not user_name.strip():
            raise ScimError(400, "userName is required", "invalidValue")
        if "active" in attrs:
            attrs["active"] = _coerce_bool(attrs["active"])
        for key in [k for k, v in attrs.items() if k.startswith("urn:") and v == {}]:
            del attrs[key]
        domains = self.profile.registered_domains
        if domains is not None:
            domain = user_name.rpartition("@")[2].lower()
            if "@" not in user_name or domain not in {d.lower() for d in domains}:
                # Exact status and scimType UNCONFIRMED (zscaler-scim.md §3.6): 400 invalidValue.
                raise ScimError(400, f"userName domain {domain!r} is not registered", "invalidValue")
        return attrs

    def _clean_members(self, members: Any, group_id: str | None) -> list[dict[str, Any]]:
        if members is None:
            if self.profile.reject_empty_members:
                raise ScimError(400, "members must not be null", "invalidValue")
            return []
        items = members if isinstance(members, list) else [members]
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for member in items:
            if member is None and not self.profile.reject_empty_members:
                continue
            value = get_value(member, "value") if isinstance(member, dict) else None
            if not isinstance(value, str | int) or value == "":
                raise ScimError(400, "null or empty member object", "invalidValue")
            value = str(value)
            if self.profile.validate_member_ids and value not in self.users and not (
                    self.profile.nested_groups and value in self.groups and value != group_id):
                raise ScimError(400, f"member {value} does not exist", "invalidValue")
            if value in seen:
                continue
            seen.add(value)
            kept = {"value": value}
            for key, item in member.items():
                canonical = MEMBER_KEYS.get(key.lower())
                if canonical and canonical != "value" and item is not None:
                    kept[canonical] = item
            out.append(kept)
        return out

    def _clean_group(self, data: dict[str, Any], group_id: str | None) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        for key, value in data.items():
            low = key.lower()
            if low in ("id", "meta", "schemas") or (value is None and low != "members"):
                continue
            attrs[_canonical_key({}, key)] = value
        name = attrs.get("displayName")
        if not isinstance(name, str) or not name.strip():
            raise ScimError(400, "displayName is required", "invalidValue")
        if "members" in attrs or self.profile.reject_empty_members:
            attrs["members"] = self._clean_members(attrs.get("members", []), group_id)
        return attrs

    def _schemas_of(self, attrs: Mapping[str, Any], core: str) -> list[str]:
        return [core] + [k for k in attrs if k.lower().startswith("urn:") and k.lower() not in CORE_SCHEMAS_LOWER]

    def _meta(self, resource_type: str, endpoint: str, rid: str, existing: Mapping[str, Any] | None) -> dict[str, Any]:
        now = _timestamp()
        created = existing["meta"]["created"] if existing and "meta" in existing else now
        return {"resourceType": resource_type, "created": created, "lastModified": now,
                "location": f"{self.base_url}{self.prefix}/{endpoint}/{rid}"}

    def _commit_user(self, attrs: dict[str, Any], existing: dict[str, Any] | None,
                     new_id: str | None = None) -> dict[str, Any]:
        uid = existing["id"] if existing else (new_id or self._new_id())
        low = attrs["userName"].lower()
        holder = self._user_index.get(low)
        if self.profile.user_name_unique and holder is not None and holder != uid and holder in self.users:
            raise ScimError(409, f"userName {attrs['userName']!r} is already taken", "uniqueness")
        resource = {"schemas": self._schemas_of(attrs, CORE_USER), "id": uid, **attrs,
                    "meta": self._meta("User", "Users", uid, existing)}
        if existing is not None:
            old = existing["userName"].lower()
            if old != low and self._user_index.get(old) == uid:
                del self._user_index[old]
        else:
            self._order.pop("Users", None)
            self._hide_if_delayed(uid)
        self.users[uid] = resource
        self._user_index[low] = uid
        return resource

    def _commit_group(self, attrs: dict[str, Any], existing: dict[str, Any] | None,
                      new_id: str | None = None) -> dict[str, Any]:
        gid = existing["id"] if existing else (new_id or self._new_id())
        low = attrs["displayName"].lower()
        holder = self._group_index.get(low)
        if self.profile.group_name_unique and holder is not None and holder != gid and holder in self.groups:
            raise ScimError(409, f"group {attrs['displayName']!r} already exists", "uniqueness")
        members: list[dict[str, Any]] = attrs.get("members", [])
        before = {m["value"] for m in existing.get("members", [])} if existing else set()
        cap = self.profile.max_groups_per_user
        if cap is not None:
            kept = []
            for member in members:
                value = member["value"]
                if value not in before and value in self.users and len(self._member_of.get(value, ())) >= cap:
                    if self.profile.member_cap_silently_drops:
                        continue  # zpa: memberships beyond the cap are not synced (§2.5)
                    raise ScimError(400, f"user {value} would exceed {cap} groups", "invalidValue")
                kept.append(member)
            members = kept
        after = {m["value"] for m in members}
        for value in before - after:
            self._member_of.get(value, set()).discard(gid)
        for value in after - before:
            self._member_of.setdefault(value, set()).add(gid)
        resource = {"schemas": [CORE_GROUP], "id": gid, **attrs, "members": members,
                    "meta": self._meta("Group", "Groups", gid, existing)}
        if existing is not None:
            old = existing["displayName"].lower()
            if old != low and self._group_index.get(old) == gid:
                del self._group_index[old]
        else:
            self._order.pop("Groups", None)
            self._hide_if_delayed(gid)
        self.groups[gid] = resource
        self._group_index[low] = gid
        return resource

    def _drop_memberships(self, member_id: str) -> None:
        for gid in self._member_of.pop(member_id, set()):
            group = self.groups.get(gid)
            if group is not None:
                group["members"] = [m for m in group.get("members", []) if m.get("value") != member_id]

    def _delete_user(self, uid: str) -> bool:
        user = self.users.pop(uid, None)
        if user is None:
            return False
        low = str(user.get("userName", "")).lower()
        if self._user_index.get(low) == uid:
            del self._user_index[low]
        self._drop_memberships(uid)
        self._hidden_until.pop(uid, None)
        self._order.pop("Users", None)
        self.admin_linked.discard(uid)
        return True

    def _delete_group(self, gid: str) -> bool:
        group = self.groups.pop(gid, None)
        if group is None:
            return False
        low = str(group.get("displayName", "")).lower()
        if self._group_index.get(low) == gid:
            del self._group_index[low]
        for member in group.get("members", []):
            self._member_of.get(member.get("value", ""), set()).discard(gid)
        self._drop_memberships(gid)
        self._hidden_until.pop(gid, None)
        self._order.pop("Groups", None)
        return True

    # -- rendering -------------------------------------------------------------------------------

    def _render_user(self, user: Mapping[str, Any], origin: str) -> dict[str, Any]:
        out = dict(user)
        uid = user["id"]
        meta = dict(user.get("meta") or {})
        meta["location"] = f"{origin}{self.prefix}/Users/{uid}"
        out["meta"] = meta
        gids = self._member_of.get(uid)
        if gids:
            out["groups"] = [
                {"value": gid, "display": self.groups[gid].get("displayName"),
                 "$ref": f"{origin}{self.prefix}/Groups/{gid}", "type": "direct"}
                for gid in sorted(gids) if gid in self.groups
            ]
        if self.profile.active_as_string and isinstance(out.get("active"), bool):
            out["active"] = "true" if out["active"] else "false"
        if self.profile.department_top_level:
            extension = out.get(ENTERPRISE_USER)
            if isinstance(extension, dict) and "department" in extension:
                out["department"] = extension["department"]
        return out

    def _render_group(self, group: Mapping[str, Any], origin: str, *, listing: bool) -> dict[str, Any]:
        out = dict(group)
        meta = dict(group.get("meta") or {})
        meta["location"] = f"{origin}{self.prefix}/Groups/{group['id']}"
        out["meta"] = meta
        if listing and not self.profile.group_list_members:
            out.pop("members", None)
        elif self.profile.member_output_value_only:
            out["members"] = [{"value": m["value"]} for m in group.get("members", [])]
        return out

    @staticmethod
    def _project(resource: dict[str, Any], attributes: list[str], excluded: list[str]) -> dict[str, Any]:
        if not attributes and not excluded:
            return resource
        if attributes:
            out = {k: resource[k] for k in ALWAYS_RETURNED if k in resource}
            for name in attributes:
                path = parse_path(name)
                source: Any = resource
                target = out
                if path.uri is not None and path.uri.lower() not in CORE_SCHEMAS_LOWER:
                    ext_key = get_key(resource, path.uri)
                    if ext_key is None:
                        continue
                    if path.attr is None:
                        out[ext_key] = resource[ext_key]
                        continue
                    source = resource[ext_key]
                    target = out.setdefault(ext_key, {})
                if path.attr is None or not isinstance(source, dict):
                    continue
                key = get_key(source, path.attr)
                if key is None:
                    continue
                if path.sub_attr is None:
                    target[key] = source[key]
                elif isinstance(source[key], dict):
                    sub_key = get_key(source[key], path.sub_attr)
                    if sub_key is not None:
                        target.setdefault(key, {})[sub_key] = source[key][sub_key]
                elif isinstance(source[key], list):
                    target[key] = [{k: v for k, v in i.items() if k.lower() == path.sub_attr.lower()}
                                   for i in source[key] if isinstance(i, dict)]
            return out
        out = dict(resource)
        for name in excluded:
            path = parse_path(name)
            holder: Any = out
            if path.uri is not None and path.uri.lower() not in CORE_SCHEMAS_LOWER:
                ext_key = get_key(out, path.uri)
                if ext_key is None:
                    continue
                if path.attr is None:
                    del out[ext_key]
                    continue
                holder = out[ext_key] = dict(out[ext_key])
            if path.attr is None or path.attr.lower() in ALWAYS_RETURNED:
                continue
            key = get_key(holder, path.attr)
            if key is None:
                continue
            if path.sub_attr is None:
                del holder[key]
            elif isinstance(holder[key], dict):
                holder[key] = {k: v for k, v in holder[key].items() if k.lower() != path.sub_attr.lower()}
        return out

    # -- listing ---------------------------------------------------------------------------------

    def _ordered(self, kind: str) -> list[str]:
        store = self.users if kind == "Users" else self.groups
        ids = self._order.get(kind)
        if ids is None or len(ids) != len(store):
            ids = self._order[kind] = list(store)
        return ids

    def _select(self, kind: str, text: str | None) -> list[dict[str, Any]]:
        store = self.users if kind == "Users" else self.groups
        if not text:
            candidates: Iterable[dict[str, Any]] = store.values()
            compiled = None
        else:
            compiled = compile_filter(text)
            candidates = store.values()
            index = self._user_index if kind == "Users" else self._group_index
            indexed = "username" if kind == "Users" else "displayname"
            for attr, value in compiled.equalities:
                if attr == indexed:
                    rid = index.get(value.lower())
                    candidates = [store[rid]] if rid in store else []
                    break
                if attr == "id":
                    candidates = [store[value]] if value in store else []
                    break
                if attr == "members.value" and kind == "Groups":
                    candidates = [store[g] for g in self._member_of.get(value, ()) if g in store]
                    break
        hidden = bool(self._hidden_until)
        return [r for r in candidates
                if (compiled is None or compiled.matches(r)) and (not hidden or self._visible(r["id"]))]

    @staticmethod
    def _sort(items: list[dict[str, Any]], sort_by: str | None, order: str | None) -> list[dict[str, Any]]:
        if not sort_by:
            return items
        path = parse_path(sort_by)

        def key(resource: dict[str, Any]) -> tuple[int, Any]:
            found = values_at(resource, path.uri, path.attr or "", path.sub_attr)
            if not found:
                return (1, "")
            first = found[0]
            return (0, first.casefold() if isinstance(first, str) else str(first))

        ordered = sorted(items, key=key)
        if (order or "ascending").lower() == "descending":
            present = [r for r in ordered if key(r)[0] == 0]
            ordered = present[::-1] + [r for r in ordered if key(r)[0] == 1]
        return ordered

    def _list_response(self, request: web.Request, kinds: tuple[str, ...], params: Mapping[str, Any],
                       *, search: bool) -> web.Response:
        profile = self.profile
        cap = (profile.search_max_page_size or profile.max_page_size) if search else profile.max_page_size
        start = max(1, _int_param(params.get("startIndex"), 1, "startIndex"))
        count = min(max(0, _int_param(params.get("count"), profile.default_page_size, "count")), cap)
        text = params.get("filter")
        sort_by = params.get("sortBy")
        attributes = _names(params.get("attributes"))
        excluded = _names(params.get("excludedAttributes")) + _names(params.get("excludeAttributes"))
        origin = self._origin(request)
        if not text and not sort_by and len(kinds) == 1 and not self._hidden_until:
            store = self.users if kinds[0] == "Users" else self.groups
            ids = self._ordered(kinds[0])
            total = len(ids)
            page = [(kinds[0], store[i]) for i in ids[start - 1:start - 1 + count] if i in store]
        else:
            matched: list[tuple[str, dict[str, Any]]] = []
            for kind in kinds:
                items = self._sort(self._select(kind, text), sort_by, params.get("sortOrder"))
                matched.extend((kind, r) for r in items)
            total = len(matched)
            page = matched[start - 1:start - 1 + count]
        resources = []
        for kind, resource in page:
            rendered = (self._render_user(resource, origin) if kind == "Users"
                        else self._render_group(resource, origin, listing=True))
            resources.append(self._project(rendered, attributes, excluded))
        body = {"schemas": [LIST_URN], "totalResults": total, "startIndex": start,
                "itemsPerPage": count if profile.items_per_page_echo else len(resources), "Resources": resources}
        return _json_response(body)

    async def _search_params(self, request: web.Request) -> dict[str, Any]:
        body = await self._body(request)
        return {key: get_value(body, key) for key in (
            "filter", "startIndex", "count", "sortBy", "sortOrder", "attributes", "excludedAttributes")}

    # -- handlers: users -------------------------------------------------------------------------

    async def _list_users(self, request: web.Request) -> web.StreamResponse:
        return self._list_response(request, ("Users",), request.query, search=False)

    async def _search_users(self, request: web.Request) -> web.StreamResponse:
        return self._list_response(request, ("Users",), await self._search_params(request), search=True)

    async def _search_all(self, request: web.Request) -> web.StreamResponse:
        return self._list_response(request, ("Users", "Groups"), await self._search_params(request), search=True)

    def _found_user(self, request: web.Request) -> dict[str, Any]:
        uid = request.match_info["id"]
        user = self.users.get(uid)
        if user is None or (self._hidden_until and not self._visible(uid)):
            raise ScimError(404, f"User {uid} not found")
        return user

    def _user_reply(self, request: web.Request, user: dict[str, Any], status: int = 200) -> web.Response:
        rendered = self._render_user(user, self._origin(request))
        q = request.query
        body = self._project(rendered, _names(q.get("attributes")),
                             _names(q.get("excludedAttributes")) + _names(q.get("excludeAttributes")))
        headers = {"Location": rendered["meta"]["location"]} if status == 201 else None
        return _json_response(body, status, headers)

    def _after_user_write(self, user: dict[str, Any]) -> None:
        if self.profile.active_false_deletes and user.get("active") is False:
            # zpa "About SCIM": active=false deletes the user; the reply to that write is UNCONFIRMED
            # (we answer as if it succeeded, showing active false; a later GET gives 404).
            self._delete_user(user["id"])

    async def _create_user(self, request: web.Request) -> web.StreamResponse:
        attrs = self._clean_user(await self._body(request))
        user = self._commit_user(attrs, None)
        reply = self._user_reply(request, user, 201)
        self._after_user_write(user)
        return reply

    async def _get_user(self, request: web.Request) -> web.StreamResponse:
        return self._user_reply(request, self._found_user(request))

    def _check_username_change(self, existing: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
        """zpa (UNCONFIRMED, see `username_immutable`): a write may not change userName, not even its case."""
        if self.profile.username_immutable and attrs.get("userName") != existing.get("userName"):
            raise ScimError(400, "userName cannot be modified", "mutability")

    async def _replace_user(self, request: web.Request) -> web.StreamResponse:
        existing = self._found_user(request)
        attrs = self._clean_user(await self._body(request))
        self._check_username_change(existing, attrs)
        user = self._commit_user(attrs, existing)
        reply = self._user_reply(request, user)
        self._after_user_write(user)
        return reply

    async def _patch_user(self, request: web.Request) -> web.StreamResponse:
        existing = self._found_user(request)
        body = await self._body(request)
        candidate = copy.deepcopy({k: v for k, v in existing.items() if k not in ("id", "meta", "schemas")})
        apply_patch(candidate, get_value(body, "Operations"))
        attrs = self._clean_user(candidate)
        self._check_username_change(existing, attrs)
        user = self._commit_user(attrs, existing)
        reply = self._user_reply(request, user)
        self._after_user_write(user)
        return reply

    async def _delete_user_route(self, request: web.Request) -> web.StreamResponse:
        self._found_user(request)
        if self.profile.admin_delete_refused and request.match_info["id"] in self.admin_linked:
            # zia, zscaler-scim.md §9: the body beyond status and detail is UNCONFIRMED.
            raise ScimError(409, "Admin user cannot be deleted")
        self._delete_user(request.match_info["id"])
        return web.Response(status=204)

    # -- handlers: groups ------------------------------------------------------------------------

    async def _list_groups(self, request: web.Request) -> web.StreamResponse:
        return self._list_response(request, ("Groups",), request.query, search=False)

    async def _search_groups(self, request: web.Request) -> web.StreamResponse:
        return self._list_response(request, ("Groups",), await self._search_params(request), search=True)

    def _found_group(self, request: web.Request) -> dict[str, Any]:
        gid = request.match_info["id"]
        group = self.groups.get(gid)
        if group is None or (self._hidden_until and not self._visible(gid)):
            raise ScimError(404, f"Group {gid} not found")
        return group

    def _group_reply(self, request: web.Request, group: dict[str, Any], status: int = 200) -> web.Response:
        rendered = self._render_group(group, self._origin(request), listing=False)
        q = request.query
        body = self._project(rendered, _names(q.get("attributes")),
                             _names(q.get("excludedAttributes")) + _names(q.get("excludeAttributes")))
        headers = {"Location": rendered["meta"]["location"]} if status == 201 else None
        return _json_response(body, status, headers)

    async def _create_group(self, request: web.Request) -> web.StreamResponse:
        group = self._commit_group(self._clean_group(await self._body(request), None), None)
        return self._group_reply(request, group, 201)

    async def _get_group(self, request: web.Request) -> web.StreamResponse:
        return self._group_reply(request, self._found_group(request))

    async def _replace_group(self, request: web.Request) -> web.StreamResponse:
        existing = self._found_group(request)
        body = await self._body(request)
        if self.profile.group_put_merges:
            # zpa: a PUT keeps what it omits (zscaler-scim.md §2.5); given attributes replace whole.
            merged = {k: v for k, v in existing.items() if k not in ("id", "meta", "schemas")}
            for key, value in body.items():
                merged[_canonical_key(merged, key)] = value
            body = merged
        group = self._commit_group(self._clean_group(body, existing["id"]), existing)
        return self._group_reply(request, group)

    def _check_member_values(self, operations: Any) -> None:
        """zia: refuse PATCH ops that carry null or empty member objects (zscaler-scim.md §3.4)."""
        for operation in operations if isinstance(operations, list) else []:
            if not isinstance(operation, dict):
                continue
            op = str(get_value(operation, "op") or "").lower()
            path = str(get_value(operation, "path") or "").strip().lower()
            value = get_value(operation, "value")
            if op == "remove":
                continue
            if path == "members":
                members = value
            elif not path and isinstance(value, dict) and get_key(value, "members") is not None:
                members = get_value(value, "members")
            else:
                continue
            items = members if isinstance(members, list) else [members]
            if (op == "add" and not items) or any(
                    not isinstance(m, dict) or not get_value(m, "value") for m in items):
                raise ScimError(400, "null or empty member object", "invalidValue")

    async def _patch_group(self, request: web.Request) -> web.StreamResponse:
        existing = self._found_group(request)
        body = await self._body(request)
        operations = get_value(body, "Operations")
        if self.profile.reject_empty_members:
            self._check_member_values(operations)
        group = self._commit_group(self.patched_group(existing, operations), existing)
        if self.profile.group_patch_returns_body:
            return self._group_reply(request, group)
        return web.Response(status=204)

    def patched_group(self, existing: dict[str, Any], operations: Any) -> dict[str, Any]:
        """The attributes of *existing* with the PATCH *operations* applied and cleaned, not
        committed; raises ScimError as the PATCH would answer."""
        changes = member_changes(operations) if self.fast_member_patch else None
        if changes is not None:
            return self._members_changed(existing, changes)
        candidate = _copy_two_levels({k: v for k, v in existing.items() if k not in ("id", "meta", "schemas")})
        apply_patch(candidate, operations, clears_all=self.profile.remove_members_value_list_clears_all)
        return self._clean_group(candidate, existing["id"])

    def _members_changed(self, existing: dict[str, Any], changes: list[tuple[str, list[Any]]]) -> dict[str, Any]:
        """`patched_group` for `member_changes`: the stored members (clean already) kept as they
        are, the removed ones matched as the filter would (`value` compares case-insensitively),
        the added ones cleaned and checked once all operations ran, as the general path does."""
        members: list[dict[str, Any]] = existing.get("members", [])
        added: list[dict[str, Any]] = []
        for kind, items in changes:
            if kind == "add":
                present = {m["value"] for m in members} | {m["value"] for m in added}
                for member in items:
                    if member["value"] not in present:
                        present.add(member["value"])
                        added.append(member)
            else:
                gone = {value.casefold() for value in items}
                members = [m for m in members if str(m["value"]).casefold() not in gone]
                added = [m for m in added if m["value"].casefold() not in gone]
        attrs = {k: v for k, v in existing.items() if k not in ("id", "meta", "schemas")}
        attrs["members"] = [*members, *self._clean_members(added, existing["id"])] if added else members
        return attrs

    async def _delete_group_route(self, request: web.Request) -> web.StreamResponse:
        self._found_group(request)
        self._delete_group(request.match_info["id"])
        return web.Response(status=204)

    # -- handlers: discovery ---------------------------------------------------------------------

    def _with_meta(self, document: Mapping[str, Any], resource_type: str, location: str) -> dict[str, Any]:
        return {**document, "meta": {"resourceType": resource_type, "location": location}}

    async def _service_provider_config(self, request: web.Request) -> web.StreamResponse:
        base = self._origin(request) + self.prefix
        return _json_response(self._with_meta({
            "schemas": [SPC_URN],
            "patch": {"supported": True},
            "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": True, "maxResults": self.profile.max_page_size},
            "changePassword": {"supported": False},
            "sort": {"supported": True},
            "etag": {"supported": False},
            "authenticationSchemes": [{
                "type": "oauthbearertoken", "name": "OAuth Bearer Token", "primary": True,
                "description": "Authentication with a bearer token issued by the service provider",
            }],
        }, "ServiceProviderConfig", f"{base}/ServiceProviderConfig"), 200)

    def _resource_type_doc(self, request: web.Request, document: Mapping[str, Any]) -> dict[str, Any]:
        return self._with_meta(document, "ResourceType",
                               f"{self._origin(request)}{self.prefix}/ResourceTypes/{document['id']}")

    def _schema_doc(self, request: web.Request, document: Mapping[str, Any]) -> dict[str, Any]:
        return self._with_meta(document, "Schema", f"{self._origin(request)}{self.prefix}/Schemas/{document['id']}")

    @staticmethod
    def _wrapped(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"schemas": [LIST_URN], "totalResults": len(resources), "startIndex": 1,
                "itemsPerPage": len(resources), "Resources": resources}

    async def _resource_types(self, request: web.Request) -> web.StreamResponse:
        return _json_response(self._wrapped([self._resource_type_doc(request, d) for d in RESOURCE_TYPES]))

    async def _resource_type(self, request: web.Request) -> web.StreamResponse:
        for document in RESOURCE_TYPES:
            if document["id"] == request.match_info["id"]:
                return _json_response(self._resource_type_doc(request, document))
        raise ScimError(404, f"ResourceType {request.match_info['id']} not found")

    async def _schemas(self, request: web.Request) -> web.StreamResponse:
        return _json_response(self._wrapped([self._schema_doc(request, d) for d in SCHEMAS]))

    async def _schema(self, request: web.Request) -> web.StreamResponse:
        for document in SCHEMAS:
            if document["id"].lower() == request.match_info["id"].lower():
                return _json_response(self._schema_doc(request, document))
        raise ScimError(404, f"Schema {request.match_info['id']} not found")

    # -- inspection (no auth, no faults) ---------------------------------------------------------

    async def _admin_state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"profile": dataclasses.asdict(self.profile),
                                  "users": list(self.users.values()), "groups": list(self.groups.values())})

    async def _admin_counters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"counters": dict(self.counters), "writes": self.writes()})

    async def _admin_requests(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"requests": self.request_log})

    def _faults_doc(self) -> dict[str, Any]:
        return {f.name: getattr(self.faults, f.name) for f in dataclasses.fields(Faults)
                if not f.name.startswith("_")} | {"consistency_delay_ms": self.profile.consistency_delay_ms}

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        body = await _admin_body(request)
        if isinstance(body, web.Response):
            return body
        if body.pop("reset", False):
            self.faults.reset()
            self.faults.rate_limit_rps = self.profile.rate_limit_rps
            self.profile = dataclasses.replace(self.profile, consistency_delay_ms=PROFILES.get(
                self.profile.name, _BASE).consistency_delay_ms)
        names = {f.name for f in dataclasses.fields(Faults) if not f.name.startswith("_")}
        for key, value in body.items():
            if key == "consistency_delay_ms":
                self.profile = dataclasses.replace(self.profile, consistency_delay_ms=float(value))
            elif key == "error_statuses":
                self.faults.error_statuses = tuple(int(v) for v in value)
            elif key == "fail_nth":
                self.faults.fail_nth = {int(k): str(v) for k, v in dict(value).items()}
            elif key in names:
                setattr(self.faults, key, value)
            else:
                return web.json_response({"error": f"unknown fault {key!r}"}, status=400)
        return web.json_response(self._faults_doc())

    async def _admin_admin_users(self, request: web.Request) -> web.StreamResponse:
        """Mark users admin-linked: `{"userName": "…"}` or `{"id": "…"}`, `"linked": false` unmarks."""
        body = await _admin_body(request)
        if isinstance(body, web.Response):
            return body
        user = (self.users.get(str(body["id"])) if body.get("id") is not None
                else self.user_by_username(str(body.get("userName", ""))))
        if user is None:
            return web.json_response({"error": "no such user"}, status=404)
        self.mark_admin(user["id"], bool(body.get("linked", True)))
        return web.json_response({"admin_linked": sorted(self.admin_linked)})

    async def _admin_reset(self, request: web.Request) -> web.StreamResponse:
        self.admin_linked.clear()
        self.users.clear()
        self.groups.clear()
        self._user_index.clear()
        self._group_index.clear()
        self._member_of.clear()
        self._hidden_until.clear()
        self._order.clear()
        self.reset_counters()
        return web.json_response({"reset": True})


# ---------------------------------------------------------------------------------------------
# Command line: serve one emulator until SIGINT/SIGTERM


async def _serve_forever(emulator: ScimEmulator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(emulator.app(), host=host, port=port) as base_url:
        print(f"{base_url}{emulator.prefix}", flush=True)
        print(f"SCIM emulator ({emulator.profile.name}) at {base_url}{emulator.prefix}, "
              f"bearer token {emulator.token!r}", file=sys.stderr, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """`python -m daemon.sandbox.scim`: print the base URL on the first stdout line, serve until a signal."""
    parser = argparse.ArgumentParser(prog="python -m daemon.sandbox.scim", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="generic")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    emulator = ScimEmulator(args.profile, token=args.token, prefix=args.prefix,
                            faults=Faults(latency_ms=args.latency_ms))
    asyncio.run(_serve_forever(emulator, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
