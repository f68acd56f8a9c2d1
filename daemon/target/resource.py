"""SCIM resources <-> flat ``{SCIM path: value}`` attributes, and PatchOp bodies. Pure: no I/O.

A flat path is one of (RFC 7644 §3.10, the subset provisiond maps to):

    userName                         a top-level attribute
    name.givenName                   a sub-attribute of a complex attribute
    emails[type eq "work"].value     a sub-attribute of the multi-valued item whose `type` is "work"
    urn:…:enterprise:2.0:User:department        any of the above inside a schema extension
    urn:…:enterprise:2.0:User:manager.value
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"

KNOWN_EXTENSIONS = (ENTERPRISE_USER,)
# Multi-valued attributes whose first built item is marked primary (RFC 7643 §2.4).
PRIMARY_FIRST = frozenset({"emails"})
# Enterprise attributes some targets also (or only) return at the top level: ZIA echoes
# `department` both places, ZPA accepts `costCenter`/`division`/`organization` at the top level.
TOP_LEVEL_TOLERATED = frozenset({"department", "costcenter", "division", "organization"})

_NAME = r"[A-Za-z_$][\w$-]*"
_ATTR_RE = re.compile(
    rf'^(?P<attr>{_NAME})'
    rf'(?:\[\s*(?P<key>{_NAME})\s+eq\s+"(?P<literal>(?:[^"\\]|\\.)*)"\s*\])?'
    rf'(?:\.(?P<sub>{_NAME}))?$',
    re.IGNORECASE,
)


class ResourceError(ValueError):
    """A flat path provisiond cannot express, or a resource value of the wrong type."""


@dataclass(frozen=True, slots=True)
class ScimPath:
    """One parsed flat path: ``[urn:]attr[[key eq "literal"]][.sub]``."""

    schema: str | None
    attr: str
    key: str | None = None
    literal: str | None = None
    sub: str | None = None

    @property
    def value_filtered(self) -> bool:
        return self.key is not None


@functools.lru_cache(maxsize=1024)
def parse_path(path: str) -> ScimPath:
    """Split a flat path into its parts; ResourceError when it is outside the supported subset."""
    schema: str | None = None
    rest = path
    if path.lower().startswith("urn:"):
        for urn in KNOWN_EXTENSIONS:
            if path.lower().startswith(urn.lower() + ":"):
                schema, rest = urn, path[len(urn) + 1:]
                break
        else:
            head = path.split("[", 1)[0]
            urn, sep, _ = head.rpartition(":")
            if not sep or urn.count(":") < 2:
                raise ResourceError(f"unsupported SCIM path {path!r}")
            schema, rest = urn, path[len(urn) + 1:]
    match = _ATTR_RE.match(rest)
    if match is None:
        raise ResourceError(f"unsupported SCIM path {path!r}")
    literal = match["literal"]
    if literal is not None:
        literal = re.sub(r"\\(.)", r"\1", literal)
    return ScimPath(schema, match["attr"], match["key"], literal, match["sub"])


def build_user(attrs: Mapping[str, Any], *, active: bool) -> dict[str, Any]:
    """A SCIM User resource from flat attributes; None values are left out."""
    body: dict[str, Any] = {"schemas": [CORE_USER]}
    for path, value in attrs.items():
        if value is None or path == "active":
            continue
        parsed = parse_path(path)
        if parsed.schema is not None and parsed.schema.lower() != CORE_USER.lower():
            if parsed.schema not in body["schemas"]:
                body["schemas"].append(parsed.schema)
            container = body.setdefault(parsed.schema, {})
        else:
            container = body
        _put(container, parsed, value)
    body["active"] = active
    return body


def build_group(display_name: str, *, external_id: str | None = None) -> dict[str, Any]:
    """A SCIM Group resource without members (groups are created empty, then filled by PATCH)."""
    body: dict[str, Any] = {"schemas": [CORE_GROUP], "displayName": display_name}
    if external_id is not None:
        body["externalId"] = external_id
    return body


def read_user(resource: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """Each path's value in a resource read back from a target (None when absent)."""
    return {path: read_path(resource, path) for path in paths}


def read_path(resource: Mapping[str, Any], path: str) -> Any:
    """One flat path's value in *resource*; None when absent."""
    parsed = parse_path(path)
    if parsed.schema is not None and parsed.schema.lower() != CORE_USER.lower():
        extension = _get(resource, parsed.schema)
        value = _take(extension, parsed) if isinstance(extension, Mapping) else None
        if value is None and parsed.attr.lower() in TOP_LEVEL_TOLERATED and parsed.sub is None:
            value = _take(resource, parsed)
        return value
    return _take(resource, parsed)


def read_active(resource: Mapping[str, Any]) -> bool:
    """`active` as a bool: accepts booleans and "true"/"false" strings; absent counts as active."""
    value = _get(resource, "active")
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ResourceError(f"'active' is {type(value).__name__} {str(value)[:40]!r}, not a boolean")


def user_patch(
    changed: Mapping[str, Any],
    *,
    active: bool | None = None,
    full: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """PatchOp operations for only the changed paths (and `active` when given).

    A plain path becomes ``replace`` (or ``remove`` when its new value is None). A value-filter
    path (``emails[type eq "work"].value``) becomes one ``replace`` of the whole multi-valued
    attribute, rebuilt from *full* (all mapped paths) when given, else from *changed*: RFC 7644
    §3.5.2.3 answers 400 ``noTarget`` to a filtered replace that matches no item yet, which is
    exactly the case of a user gaining their first work email.
    """
    ops: list[dict[str, Any]] = []
    multi: dict[tuple[str | None, str], None] = {}
    for path, value in changed.items():
        if path == "active":
            continue
        parsed = parse_path(path)
        if parsed.value_filtered:
            multi.setdefault((parsed.schema, parsed.attr), None)
        elif value is None:
            ops.append({"op": "remove", "path": path})
        else:
            ops.append({"op": "replace", "path": path, "value": value})
    source = full if full is not None else changed
    for schema, attr in multi:
        items = _rebuild_multi(source, schema, attr, changed)
        target = f"{schema}:{attr}" if schema else attr
        if items:
            ops.append({"op": "replace", "path": target, "value": items})
        else:
            ops.append({"op": "remove", "path": target})
    if active is not None:
        ops.append({"op": "replace", "path": "active", "value": active})
    return ops


def members_add_op(user_ids: Iterable[str]) -> dict[str, Any]:
    """One ``add`` of *user_ids* to `members`."""
    return {"op": "add", "path": "members", "value": [{"value": uid} for uid in user_ids]}


def member_remove_op(user_id: str) -> dict[str, Any]:
    """The canonical single-member removal: ``members[value eq "ID"]``."""
    return {"op": "remove", "path": f'members[value eq "{quote_filter_value(user_id)}"]'}


def patch_body(operations: list[dict[str, Any]]) -> dict[str, Any]:
    """Wrap operations in a PatchOp message."""
    return {"schemas": [PATCH_OP], "Operations": operations}


def quote_filter_value(value: str) -> str:
    """Escape a string for use inside a double-quoted SCIM filter literal."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _get(mapping: Mapping[str, Any], key: str) -> Any:
    """Attribute names are case-insensitive in SCIM: exact key first, then any casing."""
    if key in mapping:
        return mapping[key]
    lowered = key.lower()
    for name, value in mapping.items():
        if isinstance(name, str) and name.lower() == lowered:
            return value
    return None


def _put(container: dict[str, Any], parsed: ScimPath, value: Any) -> None:
    if parsed.value_filtered:
        assert parsed.key is not None
        items = container.setdefault(parsed.attr, [])
        item = next((i for i in items if i.get(parsed.key) == parsed.literal), None)
        if item is None:
            item = {parsed.key: parsed.literal}
            if parsed.attr in PRIMARY_FIRST and not items:
                item["primary"] = True
            items.append(item)
        item[parsed.sub or "value"] = value
    elif parsed.sub is not None:
        complex_value = container.setdefault(parsed.attr, {})
        if not isinstance(complex_value, dict):
            raise ResourceError(f"{parsed.attr!r} is both a simple and a complex attribute")
        complex_value[parsed.sub] = value
    else:
        container[parsed.attr] = value


def _take(container: Mapping[str, Any], parsed: ScimPath) -> Any:
    value = _get(container, parsed.attr)
    if value is None:
        return None
    if parsed.value_filtered:
        if not isinstance(value, list):
            return None
        item = _select(value, parsed)
        return None if item is None else _get(item, parsed.sub or "value")
    if parsed.sub is not None:
        return _get(value, parsed.sub) if isinstance(value, Mapping) else None
    return value


def _select(items: list[Any], parsed: ScimPath) -> Mapping[str, Any] | None:
    """The item the value filter picks. Tolerant: when no item carries the filter's key at all
    (ZPA returns `emails` without `type`), the primary untyped item, else the first, stands in."""
    assert parsed.key is not None and parsed.literal is not None
    dicts = [i for i in items if isinstance(i, Mapping)]
    wanted = parsed.literal.lower()
    for item in dicts:
        got = _get(item, parsed.key)
        if isinstance(got, str) and got.lower() == wanted:
            return item
    untyped = [i for i in dicts if _get(i, parsed.key) is None]
    if not untyped or len(untyped) != len(dicts):
        return None
    primary = [i for i in untyped if _get(i, "primary") in (True, "true")]
    return (primary or untyped)[0]


def _rebuild_multi(
    source: Mapping[str, Any], schema: str | None, attr: str, changed: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The whole multi-valued attribute `attr` from every value-filter path into it."""
    container: dict[str, Any] = {}
    merged = dict(source)
    merged.update(changed)
    for path, value in merged.items():
        if value is None or path == "active":
            continue
        parsed = parse_path(path)
        if parsed.value_filtered and parsed.schema == schema and parsed.attr == attr:
            _put(container, parsed, value)
    items: list[dict[str, Any]] = container.get(attr, [])
    return items
