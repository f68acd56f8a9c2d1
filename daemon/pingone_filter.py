"""PingOne list filters (SCIM-like, pingone.md §2.3) evaluated over user and group JSON.

Used by the PingOne emulator (what the API accepts) and by provisiond itself (a target's
`scope.filter`, evaluated over the snapshot).

Parsing is scim2-filter-parser's; this module turns its AST into a small predicate tree and checks
every attribute and operator against a `FilterDialect` (what the server accepts). Anything outside
it raises `UnsupportedFilter`, which the emulator answers with 400 INVALID_DATA / INVALID_FILTER.

The library gives `and` and `or` the same precedence (left to right); SCIM (RFC 7644 §3.4.2.2)
binds `and` tighter. Unparenthesised chains are therefore re-associated here before evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scim2_filter_parser import ast as scim_ast
from scim2_filter_parser.lexer import SCIMLexer
from scim2_filter_parser.parser import SCIMParser

MemberLookup = Callable[[str], Container[str]]

STRING_OPS = frozenset({"eq", "sw", "ew", "co"})
TIME_OPS = frozenset({"ge", "le", "gt", "lt"})
MEMBER_OF = "memberOfGroups"


class UnsupportedFilter(ValueError):
    """The filter does not parse, or uses an attribute or operator the server does not accept."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FilterDialect:
    """What one collection accepts: dotted attribute -> operators, and how values compare."""

    attributes: Mapping[str, frozenset[str]]
    # Top-level custom STRING attributes of the environment's schema (pingone.md §3.2).
    custom_attributes: frozenset[str] = frozenset()
    custom_ops: frozenset[str] = STRING_OPS
    case_insensitive: frozenset[str] = frozenset()
    time_attributes: frozenset[str] = frozenset()
    bool_attributes: frozenset[str] = frozenset()
    allow_member_of: bool = False
    # Any attribute not named above is treated as a custom STRING attribute (a target's scope
    # filter, evaluated by provisiond itself over whatever the environment's schema holds).
    any_custom: bool = False

    def with_custom(self, names: frozenset[str]) -> FilterDialect:
        """The same dialect with *names* as the custom STRING attributes."""
        return FilterDialect(self.attributes, names, self.custom_ops, self.case_insensitive,
                             self.time_attributes, self.bool_attributes, self.allow_member_of,
                             self.any_custom)


# Users (pingone.md §2.3). Which attributes accept `co` is UNCONFIRMED: every string attribute
# does here; narrow `attributes` to be stricter. gt/lt on updatedAt are UNCONFIRMED too (ge/le are
# documented). Case-insensitive username/email matching is UNCONFIRMED (a knob: case_insensitive).
_USER_STRINGS = (
    "accountId", "address.streetAddress", "address.locality", "address.region", "address.postalCode",
    "address.countryCode", "email", "endDate", "startDate", "externalId", "locale", "mobilePhone",
    "name.formatted", "name.given", "name.middle", "name.family", "name.honorificPrefix",
    "name.honorificSuffix", "nickname", "photo.href", "preferredLanguage", "primaryPhone", "timezone",
    "title", "type", "username",
)
DEFAULT_USER_DIALECT = FilterDialect(
    attributes={
        **{name: STRING_OPS for name in _USER_STRINGS},
        "population.id": frozenset({"eq"}),
        "enabled": frozenset({"eq"}),
        "updatedAt": TIME_OPS,
    },
    custom_attributes=frozenset({"department", "employeeNumber"}),
    case_insensitive=frozenset({"username", "email"}),
    time_attributes=frozenset({"updatedAt"}),
    bool_attributes=frozenset({"enabled"}),
    allow_member_of=True,
)
# A dynamic group's userFilter: the user dialect without memberOfGroups (no recursion between
# dynamic groups; whether PingOne allows it is UNCONFIRMED).
DEFAULT_USER_FILTER_DIALECT = FilterDialect(
    attributes=DEFAULT_USER_DIALECT.attributes,
    custom_attributes=DEFAULT_USER_DIALECT.custom_attributes,
    case_insensitive=DEFAULT_USER_DIALECT.case_insensitive,
    time_attributes=DEFAULT_USER_DIALECT.time_attributes,
    bool_attributes=DEFAULT_USER_DIALECT.bool_attributes,
    allow_member_of=False,
)
# A target's `scope.filter`, which provisiond evaluates itself over the snapshot: every user
# attribute the API can filter on, memberOfGroups, and any custom attribute of the environment.
SCOPE_DIALECT = FilterDialect(
    attributes=DEFAULT_USER_DIALECT.attributes,
    custom_attributes=DEFAULT_USER_DIALECT.custom_attributes,
    case_insensitive=DEFAULT_USER_DIALECT.case_insensitive,
    time_attributes=DEFAULT_USER_DIALECT.time_attributes,
    bool_attributes=DEFAULT_USER_DIALECT.bool_attributes,
    allow_member_of=True,
    any_custom=True,
)
# Groups (pingone.md §2.3). Case-sensitive name matching is UNCONFIRMED.
DEFAULT_GROUP_DIALECT = FilterDialect(
    attributes={
        "name": frozenset({"eq", "sw"}),
        "displayName": frozenset({"eq", "sw"}),
        "externalId": frozenset({"eq", "sw"}),
        "id": frozenset({"eq"}),
        "population.id": frozenset({"eq"}),
        "sourceId": frozenset({"eq"}),
    },
)

# A target's group rule (`groups = [{ filter = 'name sw "ZPA-"' }]`), which provisiond evaluates
# itself over the PingOne groups it lists: the group's string attributes, with every string operator.
GROUP_RULE_DIALECT = FilterDialect(
    attributes={
        "name": STRING_OPS,
        "description": STRING_OPS,
        "externalId": STRING_OPS,
        "sourceId": STRING_OPS,
        "id": frozenset({"eq"}),
        "population.id": frozenset({"eq"}),
    },
    any_custom=True,
)


# --- the predicate tree --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Compare:
    path: tuple[str, ...]
    op: str
    value: Any
    fold: bool

    def test(self, obj: Mapping[str, Any], members: MemberLookup | None) -> bool:
        current: Any = obj
        for key in self.path:
            if not isinstance(current, Mapping):
                return False
            current = current.get(key)
            if current is None:
                return False
        if isinstance(self.value, bool):
            return current is self.value
        if not isinstance(current, str):
            current = str(current)
        if self.fold:
            current = current.casefold()
        value: str = self.value
        op = self.op
        if op == "eq":
            return bool(current == value)
        if op == "sw":
            return bool(current.startswith(value))
        if op == "ew":
            return bool(current.endswith(value))
        if op == "co":
            return value in current
        if op == "ge":
            return bool(current >= value)
        if op == "le":
            return bool(current <= value)
        if op == "gt":
            return bool(current > value)
        return bool(current < value)


@dataclass(frozen=True, slots=True)
class _MemberOf:
    group_id: str

    def test(self, obj: Mapping[str, Any], members: MemberLookup | None) -> bool:
        if members is None:
            raise UnsupportedFilter("memberOfGroups is not available here")
        return obj.get("id") in members(self.group_id)


@dataclass(frozen=True, slots=True)
class _And:
    parts: tuple[_Node, ...]

    def test(self, obj: Mapping[str, Any], members: MemberLookup | None) -> bool:
        return all(part.test(obj, members) for part in self.parts)


@dataclass(frozen=True, slots=True)
class _Or:
    parts: tuple[_Node, ...]

    def test(self, obj: Mapping[str, Any], members: MemberLookup | None) -> bool:
        return any(part.test(obj, members) for part in self.parts)


_Node = _Compare | _MemberOf | _And | _Or


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    """A parsed, validated filter; `matches` is pure and cheap enough for 100k objects."""

    text: str
    root: _Node
    group_ids: frozenset[str] = field(default_factory=frozenset)

    def matches(self, obj: Mapping[str, Any], members: MemberLookup | None = None) -> bool:
        """True when *obj* satisfies the filter; *members* maps a group id to its member ids."""
        return self.root.test(obj, members)

    @property
    def only_member_of(self) -> str | None:
        """The group id when the filter is `memberOfGroups[id eq "G"]` and nothing else."""
        return self.root.group_id if isinstance(self.root, _MemberOf) else None


def compile_filter(text: str, dialect: FilterDialect) -> CompiledFilter:
    """Parse *text* with scim2-filter-parser and check it against *dialect*."""
    try:
        tree = SCIMParser().parse(SCIMLexer().tokenize(text))
    except Exception as exc:  # the library raises ValueError, SCIMParserError, sly errors
        raise UnsupportedFilter(f"cannot parse filter: {exc}") from exc
    if tree is None:
        raise UnsupportedFilter("empty filter")
    groups: set[str] = set()
    root = _Builder(dialect, groups).node(tree)
    return CompiledFilter(text, root, frozenset(groups))


class _Builder:
    def __init__(self, dialect: FilterDialect, groups: set[str]) -> None:
        self.dialect = dialect
        self.groups = groups

    def node(self, item: Any) -> _Node:
        if isinstance(item, scim_ast.Filter):
            if item.negated:
                raise UnsupportedFilter("operator 'not' is not supported")
            if item.namespace is not None:
                return self.member_of(item)
            if isinstance(item.expr, scim_ast.LogExpr):
                return self.chain(item.expr)
            return self.node(item.expr)
        if isinstance(item, scim_ast.LogExpr):
            return self.chain(item)
        if isinstance(item, scim_ast.AttrExpr):
            return self.compare(item)
        raise UnsupportedFilter(f"unsupported filter element {type(item).__name__}")

    def chain(self, expr: Any) -> _Node:
        """Re-associate an unparenthesised and/or chain so that `and` binds tighter than `or`."""
        operands: list[Any] = []
        ops: list[str] = []
        self._flatten(expr, operands, ops)
        groups: list[list[_Node]] = [[self.node(operands[0])]]
        for op, operand in zip(ops, operands[1:], strict=True):
            if op == "or":
                groups.append([])
            groups[-1].append(self.node(operand))
        alternatives = [parts[0] if len(parts) == 1 else _And(tuple(parts)) for parts in groups]
        return alternatives[0] if len(alternatives) == 1 else _Or(tuple(alternatives))

    def _flatten(self, item: Any, operands: list[Any], ops: list[str]) -> None:
        # A Filter whose expr is a LogExpr and that is neither negated nor a value path was not
        # parenthesised (parentheses add a Filter around a Filter), so it belongs to this chain.
        if isinstance(item, scim_ast.Filter) and not item.negated and item.namespace is None \
                and isinstance(item.expr, scim_ast.LogExpr):
            item = item.expr
        if isinstance(item, scim_ast.LogExpr):
            self._flatten(item.expr1, operands, ops)
            ops.append(str(item.op).lower())
            self._flatten(item.expr2, operands, ops)
        else:
            operands.append(item)

    def member_of(self, item: Any) -> _Node:
        namespace = item.namespace
        if not self.dialect.allow_member_of or namespace.attr_name != MEMBER_OF or namespace.sub_attr:
            raise UnsupportedFilter(f"attribute '{_path_text(namespace)}' is not filterable")
        inner = item.expr
        while isinstance(inner, scim_ast.Filter) and not inner.negated and inner.namespace is None:
            inner = inner.expr
        if not (isinstance(inner, scim_ast.AttrExpr) and inner.attr_path.attr_name == "id"
                and inner.attr_path.sub_attr is None and str(inner.value).lower() == "eq"
                and inner.comp_value is not None):
            raise UnsupportedFilter('only memberOfGroups[id eq "<groupId>"] is supported')
        group_id = str(inner.comp_value.value)
        self.groups.add(group_id)
        return _MemberOf(group_id)

    def compare(self, expr: Any) -> _Node:
        path = expr.attr_path
        if path.uri:
            raise UnsupportedFilter(f"schema URI '{path.uri}' is not supported")
        if isinstance(path.attr_name, scim_ast.Filter):
            raise UnsupportedFilter("value paths with a sub-attribute are not supported")
        name = _path_text(path)
        op = str(expr.value).lower()
        dialect = self.dialect
        allowed = dialect.attributes.get(name)
        if allowed is None and (name in dialect.custom_attributes or dialect.any_custom):
            allowed = dialect.custom_ops
        if allowed is None:
            raise UnsupportedFilter(f"attribute '{name}' is not filterable")
        if op not in allowed:
            raise UnsupportedFilter(f"operator '{op}' is not supported for attribute '{name}'")
        if expr.comp_value is None:
            raise UnsupportedFilter(f"operator '{op}' needs a value")
        raw = str(expr.comp_value.value)
        keys = tuple(name.split("."))
        if name in dialect.bool_attributes:
            if raw.lower() not in ("true", "false"):
                raise UnsupportedFilter(f"attribute '{name}' takes true or false")
            return _Compare(keys, op, raw.lower() == "true", False)
        if name in dialect.time_attributes:
            return _Compare(keys, op, _timestamp(raw, name), False)
        fold = name in dialect.case_insensitive
        return _Compare(keys, op, raw.casefold() if fold else raw, fold)


def _path_text(path: Any) -> str:
    sub = path.sub_attr
    return f"{path.attr_name}.{sub.value}" if sub is not None else str(path.attr_name)


def _timestamp(raw: str, name: str) -> str:
    """Normalise a filter timestamp to the stored form (ms, 'Z'), so string order is time order."""
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise UnsupportedFilter(f"'{raw}' is not a timestamp for '{name}'") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_timestamp(moment)


def format_timestamp(moment: datetime) -> str:
    """PingOne's timestamp form: `2022-09-15T15:48:51.428Z`."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
