"""SCIM filters and attribute paths (RFC 7644 §3.4.2.2, §3.5.2) evaluated over resources held as JSON dicts.

Parsing is scim2-filter-parser's. Its lexer keeps neither the type of a literal (`"5"` and `5`, `"true"`
and `true` come out alike) nor escaped quotes, and reads only one-digit numbers, so `compile_filter`
first swaps every literal for a placeholder string and keeps the typed value aside.

Attribute names are matched case-insensitively; strings compare case-insensitively except for the
attributes RFC 7643 marks caseExact (`id`, `externalId`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from scim2_filter_parser import ast
from scim2_filter_parser.lexer import SCIMLexer
from scim2_filter_parser.parser import SCIMParser

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
KNOWN_SCHEMAS = (CORE_USER, CORE_GROUP, ENTERPRISE_USER)
CORE_SCHEMAS_LOWER = frozenset({CORE_USER.lower(), CORE_GROUP.lower()})
CASE_EXACT_ATTRIBUTES = frozenset({"id", "externalid"})
DEFAULT_CACHE_SIZE = 2048

Predicate = Callable[[Mapping[str, Any]], bool]

_PLACEHOLDER = "\x01"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BARE = re.compile(
    r"(?i)(\s(?:eq|ne|co|sw|ew|gt|ge|lt|le)\s+)(true|false|null|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?=[\s)\]]|$)"
)
_ATTR_NAME = re.compile(r"^[A-Za-z$][\w$-]*$")
_ORDERING = frozenset({"gt", "ge", "lt", "le"})


class FilterError(ValueError):
    """A filter or path that cannot be parsed or evaluated; `scim_type` is the RFC 7644 error keyword."""

    def __init__(self, message: str, scim_type: str = "invalidFilter") -> None:
        super().__init__(message)
        self.scim_type = scim_type


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    """A parsed filter: a predicate, plus the `eq` clauses ANDed at its top (for index look-ups)."""

    text: str
    predicate: Predicate
    equalities: tuple[tuple[str, Any], ...]  # (lower-case dotted attribute, typed value)

    def matches(self, resource: Mapping[str, Any]) -> bool:
        return self.predicate(resource)


@dataclass(frozen=True, slots=True)
class ScimPath:
    """A PATCH path: `[uri:]attr[.sub]`, `attr[filter][.sub]`, or a bare schema URN (attr None)."""

    text: str
    uri: str | None
    attr: str | None
    value_filter: CompiledFilter | None
    sub_attr: str | None


def get_key(mapping: Mapping[str, Any], name: str) -> str | None:
    """The key of *mapping* equal to *name* ignoring case, or None."""
    if name in mapping:
        return name
    low = name.lower()
    for key in mapping:
        if key.lower() == low:
            return key
    return None


def get_value(mapping: Mapping[str, Any], name: str) -> Any:
    key = get_key(mapping, name)
    return None if key is None else mapping[key]


def values_at(resource: Mapping[str, Any], uri: str | None, attr: str, sub: str | None = None) -> list[Any]:
    """All values found at `[uri:]attr[.sub]` (multi-valued attributes flattened)."""
    container: Any = resource
    if uri is not None and uri.lower() not in CORE_SCHEMAS_LOWER:
        container = get_value(resource, uri)
        if not isinstance(container, Mapping):
            return []
    value = get_value(container, attr)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if sub is None:
        return [item for item in items if item is not None]
    out: list[Any] = []
    for item in items:
        if isinstance(item, Mapping):
            sub_value = get_value(item, sub)
            if isinstance(sub_value, list):
                out.extend(sub_value)
            elif sub_value is not None:
                out.append(sub_value)
    return out


def _substitute_literals(text: str) -> tuple[str, list[Any]]:
    literals: list[Any] = []

    def keep(value: Any) -> str:
        literals.append(value)
        return f'"{_PLACEHOLDER}{len(literals) - 1}"'

    def string(match: re.Match[str]) -> str:
        try:
            return keep(json.loads(match.group(0)))
        except ValueError as exc:
            raise FilterError(f"bad string literal {match.group(0)}") from exc

    swapped = _STRING.sub(string, text)
    if '"' in _STRING.sub("", swapped):
        raise FilterError("unbalanced quote in filter")

    def bare(match: re.Match[str]) -> str:
        return match.group(1) + keep(json.loads(match.group(2).lower()))

    return _BARE.sub(bare, swapped), literals


def _literal(comp: ast.CompValue | None, literals: list[Any]) -> Any:
    if comp is None:
        return None
    raw = comp.value
    if isinstance(raw, str) and raw.startswith(_PLACEHOLDER):
        return literals[int(raw[1:])]
    raise FilterError(f"unsupported comparison value {raw!r}")


def _as_datetime(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _compare(op: str, actual: Any, expected: Any, case_exact: bool) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):
        if op in _ORDERING or op in ("co", "sw", "ew"):
            raise FilterError(f"operator {op} is not defined for booleans")
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        a_num: float = actual
        e_num: float = expected
        return {
            "eq": a_num == e_num, "gt": a_num > e_num, "ge": a_num >= e_num,
            "lt": a_num < e_num, "le": a_num <= e_num,
        }.get(op, False)
    if not isinstance(actual, str) or not isinstance(expected, str):
        return False
    a, e = (actual, expected) if case_exact else (actual.casefold(), expected.casefold())
    if op == "eq":
        return a == e
    if op == "co":
        return e in a
    if op == "sw":
        return a.startswith(e)
    if op == "ew":
        return a.endswith(e)
    a_dt, e_dt = _as_datetime(actual), _as_datetime(expected)
    if a_dt is not None and e_dt is not None:
        try:
            left: Any = a_dt
            right: Any = e_dt
            return bool({"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[op])
        except TypeError:  # naive against aware: fall back to text
            pass
    return {"gt": a > e, "ge": a >= e, "lt": a < e, "le": a <= e}[op]


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


Getter = Callable[[Mapping[str, Any]], list[Any]]


def _getter(path: ast.AttrPath, literals: list[Any]) -> tuple[Getter, str, str | None]:
    """Build a value getter for *path*; also return its attribute (lower, dotted) and URI."""
    name = path.attr_name
    if isinstance(name, ast.Filter):  # emails[type eq "work"].value, rewritten by the parser
        namespace = name.namespace
        inner = _build(name, literals, namespace_consumed=True)
        outer, sub = str(namespace.attr_name), namespace.sub_attr.value if namespace.sub_attr else None
        uri = namespace.uri

        def filtered(resource: Mapping[str, Any]) -> list[Any]:
            out: list[Any] = []
            for element in values_at(resource, uri, outer):
                if isinstance(element, Mapping) and inner(element):
                    if sub is None:
                        out.append(element)
                    else:
                        out.extend(values_at(element, None, sub))
            return out

        return filtered, (outer + ("." + sub if sub else "")).lower(), uri
    attr = str(name)
    sub_name = path.sub_attr.value if path.sub_attr is not None else None
    uri = path.uri
    if not _ATTR_NAME.match(attr):
        raise FilterError(f"bad attribute name {attr!r}")

    def plain(resource: Mapping[str, Any]) -> list[Any]:
        return values_at(resource, uri, attr, sub_name)

    return plain, (attr + ("." + sub_name if sub_name else "")).lower(), uri


def _attr_expr(node: ast.AttrExpr, literals: list[Any]) -> Predicate:
    op = str(node.value).lower()
    getter, dotted, _uri = _getter(node.attr_path, literals)
    case_exact = dotted in CASE_EXACT_ATTRIBUTES
    if op == "pr":
        return lambda resource: any(_present(v) for v in getter(resource))
    expected = _literal(node.comp_value, literals)
    if expected is None:
        if op == "eq":
            return lambda resource: not any(_present(v) for v in getter(resource))
        if op == "ne":
            return lambda resource: any(_present(v) for v in getter(resource))
        raise FilterError(f"operator {op} cannot compare with null")
    if isinstance(expected, list | dict):
        raise FilterError("comparison value must be a string, number or boolean")
    if op == "ne":
        return lambda resource: not any(_compare("eq", v, expected, case_exact) for v in getter(resource))
    if op not in ("eq", "co", "sw", "ew", "gt", "ge", "lt", "le"):
        raise FilterError(f"unknown operator {op}")
    return lambda resource: any(_compare(op, v, expected, case_exact) for v in getter(resource))


def _build(node: Any, literals: list[Any], *, namespace_consumed: bool = False) -> Predicate:
    if isinstance(node, ast.Filter):
        inner = _build(node.expr, literals)
        namespace = None if namespace_consumed else node.namespace
        predicate = inner
        if namespace is not None:  # value filter: attr[expr]
            attr, uri = str(namespace.attr_name), namespace.uri
            if not _ATTR_NAME.match(attr):
                raise FilterError(f"bad attribute name {attr!r}")

            def predicate(resource: Mapping[str, Any]) -> bool:
                return any(isinstance(e, Mapping) and inner(e) for e in values_at(resource, uri, attr))

        if node.negated:
            positive = predicate
            return lambda resource: not positive(resource)
        return predicate
    if isinstance(node, ast.LogExpr):
        left, right = _build(node.expr1, literals), _build(node.expr2, literals)
        if str(node.op).lower() == "and":
            return lambda resource: left(resource) and right(resource)
        return lambda resource: left(resource) or right(resource)
    if isinstance(node, ast.AttrExpr):
        return _attr_expr(node, literals)
    raise FilterError(f"unsupported filter node {type(node).__name__}")


def _equalities(node: Any, literals: list[Any]) -> list[tuple[str, Any]]:
    if isinstance(node, ast.Filter):
        if node.negated or node.namespace is not None:
            return []
        return _equalities(node.expr, literals)
    if isinstance(node, ast.LogExpr):
        if str(node.op).lower() != "and":
            return []
        return _equalities(node.expr1, literals) + _equalities(node.expr2, literals)
    if isinstance(node, ast.AttrExpr) and str(node.value).lower() == "eq":
        path = node.attr_path
        if isinstance(path.attr_name, str) and (path.uri is None or path.uri.lower() in CORE_SCHEMAS_LOWER):
            value = _literal(node.comp_value, literals)
            if isinstance(value, str):
                dotted = path.attr_name + ("." + path.sub_attr.value if path.sub_attr is not None else "")
                return [(dotted.lower(), value)]
    return []


@lru_cache(maxsize=DEFAULT_CACHE_SIZE)
def compile_filter(text: str) -> CompiledFilter:
    """Parse *text* (a SCIM filter) once; raise FilterError when it is not one."""
    if not text or not text.strip():
        raise FilterError("empty filter")
    swapped, literals = _substitute_literals(text)
    try:
        tree = SCIMParser().parse(SCIMLexer().tokenize(swapped))
    except FilterError:
        raise
    except Exception as exc:  # sly and the lexer raise plain errors of several kinds
        raise FilterError(f"cannot parse filter {text!r}: {exc}") from exc
    if tree is None:
        raise FilterError(f"cannot parse filter {text!r}")
    predicate = _build(tree, literals)
    return CompiledFilter(text, predicate, tuple(_equalities(tree, literals)))


def matches(text: str, resource: Mapping[str, Any]) -> bool:
    """Whether *resource* satisfies the filter *text*."""
    return compile_filter(text).matches(resource)


@lru_cache(maxsize=DEFAULT_CACHE_SIZE)
def parse_path(text: str) -> ScimPath:
    """Parse a PATCH `path`; raise FilterError(scim_type="invalidPath") when it is not one."""
    t = text.strip()
    if not t:
        raise FilterError("empty path", "invalidPath")
    bracket = t.find("[")
    head = t if bracket < 0 else t[:bracket]
    uri: str | None = None
    if head.lower().startswith("urn:"):
        for schema in KNOWN_SCHEMAS:
            if head.lower() == schema.lower() and bracket < 0:
                return ScimPath(text, schema, None, None, None)
            if head.lower().startswith(schema.lower() + ":"):
                uri, head = schema, head[len(schema) + 1:]
                break
        else:
            if ":" not in head[4:]:
                raise FilterError(f"bad path {text!r}", "invalidPath")
            uri, head = head.rsplit(":", 1)
    value_filter: CompiledFilter | None = None
    sub: str | None = None
    if bracket >= 0:
        close = t.rfind("]")
        rest = t[close + 1:]
        if close < bracket or (rest and not rest.startswith(".")):
            raise FilterError(f"bad path {text!r}", "invalidPath")
        try:
            value_filter = compile_filter(t[bracket + 1:close])
        except FilterError as exc:
            raise FilterError(f"bad value filter in path {text!r}: {exc}", "invalidPath") from exc
        attr = head
        sub = rest[1:] or None if rest else None
    else:
        attr, _, sub_text = head.partition(".")
        sub = sub_text or None
    if not _ATTR_NAME.match(attr) or (sub is not None and not _ATTR_NAME.match(sub)):
        raise FilterError(f"bad path {text!r}", "invalidPath")
    return ScimPath(text, uri, attr, value_filter, sub)
