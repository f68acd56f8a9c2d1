"""From a PingOne snapshot to one target's desired state: scope, attribute mapping, groups.

Pure: data in, data out. No I/O, no clock, no logging. The rules of a target are compiled once
(`Rules.compile`), then `desired_state` is called per cycle.

Scope: a user is in scope when it is a member of one of `scope.groups` (directly, or through
nested groups when `membership = "transitive"`) AND matches `scope.filter`; an absent part does
not narrow. Each mapped value is NFC-normalised, so that a composed and a decomposed "é" compare
equal. A user is *skipped* (never sent, never removed because of it) when its userName is missing,
not an email address where the target requires one, shared with another in-scope user
(`conflict`: neither overwrites the other), or when a mapping expression fails.
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import jmespath
import jmespath.exceptions
import jmespath.visitor

from daemon.model import JSON, UNCHANGED, Members, Snapshot, shared
from daemon.pingone_filter import SCOPE_DIALECT, CompiledFilter, compile_filter

USERNAME_PATH = "userName"
# Mapped string values up to this length are interned: names, departments and titles repeat across
# 100,000s of users, and each parsed copy costs ~60 bytes. Longer ones, userNames and email
# addresses are mostly unique and are left alone.
SHARED_VALUE_CHARS = 32
MAX_VALUE_CHARS = 65536
EMAIL_RE = re.compile(r"^[^@\s\"<>(),;:\\\[\]]+@[^@\s\"<>(),;:\\\[\]]+\.[^@\s\"<>(),;:\\\[\]]{2,}$")

# Skip reasons (stable: they appear in logs, SQLite and `status`).
INVALID_USERNAME = "invalid_username"
MISSING_USERNAME = "missing_username"
CONFLICT = "conflict"
MAPPING_ERROR = "mapping_error"
VALUE_TOO_LONG = "value_too_long"
MALFORMED_SOURCE = "malformed_source"


class Attrs(tuple[Any, ...], Mapping[str, Any]):
    """A user's mapped attributes: flat SCIM path -> value (None = absent), read-only.

    One tuple: the keys (a tuple shared by every user of a rule, `Rules.keys`) then the values,
    in that order. About a third of the memory of a dict, and one object fewer per user than a
    keys/values pair, which matters at 1,000,000 users. Equal to any mapping with the same items;
    `dict(attrs)` for JSON (`json.dumps` would see a tuple).
    """

    __slots__ = ()

    def __new__(cls, keys: tuple[str, ...], values: tuple[Any, ...]) -> Attrs:
        return tuple.__new__(cls, (keys, *values))

    @property
    def _keys(self) -> tuple[str, ...]:
        keys: tuple[str, ...] = tuple.__getitem__(self, 0)
        return keys

    def __getitem__(self, key: str) -> Any:  # type: ignore[override]
        try:
            return tuple.__getitem__(self, self._keys.index(key) + 1)
        except ValueError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return tuple.__getitem__(self, self._keys.index(key) + 1)
        except ValueError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return tuple.__len__(self) - 1

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attrs):
            return tuple.__eq__(self, other)     # the keys first (the same tuple), then the values
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Attrs({dict(self.items())!r})"


@dataclass(frozen=True, slots=True)
class DesiredUser:
    source_id: str
    user_name: str
    attrs: Mapping[str, Any]     # flat SCIM path -> value (None = absent)
    active: bool
    # As a `MappingCache` entry (not compared): the content hash of the JSON it was mapped from,
    # the userName key (`username_key`), and whether the user passes a JSON-only scope filter.
    # Held here rather than in a tuple around it: ~56 bytes a user at 1,000,000 users.
    digest: int = field(default=0, compare=False, repr=False)
    key: str | None = field(default=None, compare=False, repr=False)
    passes: bool = field(default=True, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Skipped:
    source_id: str
    user_name: str | None
    reason: str
    detail: str
    digest: int = field(default=0, compare=False, repr=False)      # as in `DesiredUser`
    passes: bool = field(default=True, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DesiredGroup:
    source_id: str
    display_name: str
    members: AbstractSet[str]    # source user ids (in scope, not skipped): `Members` or a frozenset


@dataclass(slots=True)
class Desired:
    users: dict[str, DesiredUser] = field(default_factory=dict)
    skipped: dict[str, Skipped] = field(default_factory=dict)
    groups: dict[str, DesiredGroup] = field(default_factory=dict)
    missing_groups: list[str] = field(default_factory=list)   # configured, absent from PingOne
    present_users: Collection[str] = ()    # every user id in the snapshot (deleted vs left scope)
    present_groups: Collection[str] = ()
    in_scope: int = 0
    create_only: frozenset[str] = frozenset()    # mapped paths written on create only (`Rules.create_only`)


@dataclass(frozen=True, slots=True)
class GroupSelector:
    """One entry of `groups` or `scope.groups`: a group by name or id, or a rule (a name prefix or a
    filter over the group's attributes) that selects every PingOne group matching it now."""

    name: str | None = None
    id: str | None = None
    prefix: str | None = None
    rule: CompiledFilter | None = None

    @property
    def is_rule(self) -> bool:
        return self.prefix is not None or self.rule is not None

    def matches(self, group: JSON) -> bool:
        """Does this rule select `group`? (False for a name or id selector.)"""
        if self.prefix is not None:
            name = group.get("name")
            return isinstance(name, str) and name.startswith(self.prefix)
        return self.rule is not None and self.rule.matches(group)

    def select(self, snapshot: Snapshot, pins: Mapping[str, str] | None = None) -> list[JSON]:
        """Every group this selects: the one named or ided (if it exists), or all that match the rule."""
        if self.is_rule:
            return [g for _, g in sorted(snapshot.groups.items()) if self.matches(g)]
        found = self.find(snapshot, pins)
        return [found] if found is not None else []

    def find(self, snapshot: Snapshot, pins: Mapping[str, str] | None = None) -> JSON | None:
        """The group this selects. A name once resolved is pinned to its id (`pins`), so that a
        group renamed in PingOne is still the same group (and its rename is pushed)."""
        if self.id is not None:
            return snapshot.groups.get(self.id)
        if self.name is None:
            return None
        pinned = (pins or {}).get(self.name)
        if pinned is not None and pinned in snapshot.groups:
            return snapshot.groups[pinned]
        return snapshot.group_by_name(self.name)

    def label(self) -> str:
        if self.prefix is not None:
            return f"prefix:{self.prefix}"
        if self.rule is not None:
            return f"filter:{self.rule.text}"
        return self.name if self.name is not None else f"id:{self.id}"


@dataclass(frozen=True, slots=True)
class Rules:
    """A target's rule, compiled."""

    mapping: tuple[tuple[str, jmespath.parser.ParsedResult], ...]
    scope_groups: tuple[GroupSelector, ...] = ()
    scope_filter: CompiledFilter | None = None
    groups: tuple[GroupSelector, ...] = ()
    transitive: bool = True
    require_email_username: bool = False
    # mapped paths sent in the POST only: never updated, never drift (the target owns them after)
    create_only: frozenset[str] = frozenset()
    # the mapped paths, in order: one tuple shared by every `Attrs` of this rule
    keys: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(path for path, _ in self.mapping))

    @classmethod
    def compile(
        cls,
        mapping: Mapping[str, str] | tuple[tuple[str, str], ...],
        *,
        scope_groups: tuple[GroupSelector, ...] = (),
        scope_filter: str | None = None,
        groups: tuple[GroupSelector, ...] = (),
        transitive: bool = True,
        require_email_username: bool = False,
        create_only: frozenset[str] = frozenset(),
    ) -> Rules:
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        compiled = tuple((path, jmespath.compile(expr)) for path, expr in items)
        if USERNAME_PATH not in {p for p, _ in compiled}:
            raise ValueError("the mapping has no userName")
        return cls(
            mapping=compiled,
            scope_groups=scope_groups,
            scope_filter=compile_filter(scope_filter, SCOPE_DIALECT) if scope_filter else None,
            groups=groups,
            transitive=transitive,
            require_email_username=require_email_username,
            create_only=create_only,
        )

    @property
    def paths(self) -> tuple[str, ...]:
        return self.keys

    def source_keys(self) -> frozenset[str] | None:
        """The top-level PingOne user keys this rule reads, or None when it may read any.

        An over-approximation: every field name anywhere in the mapping expressions, the roots
        of the scope filter's attributes, and the keys provisiond itself reads. The snapshot
        keeps only these, which halves its memory at 100,000 users.
        """
        keys = set(ALWAYS_KEPT)
        for _, expr in self.mapping:
            found = _fields(expr.parsed)
            if found is None:
                return None
            keys |= found
        if self.scope_filter is not None:
            keys |= {m.group(1) for m in _FILTER_ATTR_RE.finditer(self.scope_filter.text)}
        return frozenset(keys)


# Read by provisiond itself (enabled -> active, updatedAt -> propagation latency, the rest for
# `why` and the logs) whatever the mapping says.
ALWAYS_KEPT = frozenset({"id", "username", "email", "enabled", "updatedAt", "population", "name"})
_FILTER_ATTR_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z0-9_]+)*\s+(?:eq|ne|co|sw|ew|gt|ge|lt|le|pr)\b",
                             re.IGNORECASE)
# JMESPath nodes whose children are all evaluated against the same node as they are, and those
# whose first child only is (the rest run against that child's result or its elements).
_SAME_CONTEXT = frozenset({"or_expression", "and_expression", "not_expression", "comparator",
                           "function_expression", "multi_select_list", "multi_select_dict", "key_val_pair"})
_FIRST_CHILD_CONTEXT = frozenset({"subexpression", "index_expression", "projection", "filter_projection",
                                  "value_projection", "object_projection", "flatten", "pipe"})


def _fields(node: Any, *, root: bool = True) -> set[str] | None:
    """Every `field` name in a JMESPath AST; None when the expression may read the whole object
    (`@` evaluated against the user itself, e.g. `values(@)` or `*`)."""
    kind = node.get("type")
    if root and kind in ("current", "identity"):
        return None
    out: set[str] = set()
    if kind == "field":
        out.add(str(node.get("value")))
    for index, child in enumerate(node.get("children", ())):
        child_root = root and (kind in _SAME_CONTEXT or (kind in _FIRST_CHILD_CONTEXT and index == 0))
        found = _fields(child, root=child_root)
        if found is None:
            return None
        out |= found
    return out


def content_hash(obj: Any) -> int:
    """A cheap 64-bit digest of a parsed JSON value, for change detection between snapshots.

    `repr` keeps the server's key order, so the same document read twice hashes the same; a
    reordering only costs a cache miss, never a missed change. About 5x cheaper than a
    sorted-keys JSON dump on a PingOne user, which matters at 100,000 users per cycle; an int (32 bytes)
    rather than a hex string (81) because one is held per user.
    """
    return int.from_bytes(hashlib.blake2b(repr(obj).encode("utf-8", "surrogatepass"), digest_size=8).digest())


MappedUser = DesiredUser | Skipped
# source id -> the user as this rule maps it, with the content hash of its JSON (`digest`) and
# whether it passes the scope filter (`passes`): everything derived from the user's JSON alone, so
# reusable while the JSON (hash) is the same. The filter result is cached only for a filter that
# reads no group membership (`filter_reads_json_only`); otherwise it is True and the filter runs
# on the JSON every cycle.
MappingCache = dict[str, MappedUser]


def filter_reads_json_only(rules: Rules) -> bool:
    """Can this rule decide a user from the user's JSON alone (no memberOfGroups in its filter)?"""
    return rules.scope_filter is None or not rules.scope_filter.group_ids


def cache_user(cache: MappingCache, rules: Rules, user_id: str, user: JSON, digest: int) -> bool:
    """Map one user into *cache* (unless it is there for this *digest*) as its page arrives.

    True when this rule will not need the user's JSON again this cycle: the snapshot may then
    hold a placeholder instead (`model.UNCHANGED`), which is what bounds memory at 1,000,000 users.
    """
    hit = cache.get(user_id)
    json_only = filter_reads_json_only(rules)
    if hit is None or hit.digest != digest:
        passes = rules.scope_filter.matches(user) if json_only and rules.scope_filter is not None else True
        cache[user_id] = _map(user_id, user, rules, digest, passes)
    return json_only


def normalise(value: Any) -> Any:
    """NFC for strings, recursively; other scalars as they are."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def username_key(user_name: str) -> str:
    """How userNames (and group displayNames) are compared for uniqueness and matching, the way
    SCIM servers compare them (caseExact=false): NFC, then lowercased. Not `str.casefold`, which
    also folds "ß" to "ss", the long s (U+017F) to "s", the "ffi" ligature to "ffi" and final sigma to sigma: two people the
    target keeps apart would be merged here (one skipped as a conflict, or adopted as the other).
    The Kelvin sign is NFC's "K" (a canonical singleton) and dotted "İ" lowercases to "i̇", as
    on the servers, so those compare as a server compares them."""
    return unicodedata.normalize("NFC", user_name).lower()


def is_email(value: str) -> bool:
    return bool(EMAIL_RE.match(value))


class _MappingFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# One interpreter for every expression: `ParsedResult.search` builds a new one per call, and
# each is a reference cycle (its method cache holds bound methods of itself) that only the cyclic
# collector frees. With the collector paused while a cycle maps 100,000 users, that was ~3 KB of
# garbage per user and expression, and most of the mapping's CPU. The interpreter keeps no state
# between visits.
_INTERPRETER = jmespath.visitor.TreeInterpreter()


def map_user(user: JSON, rules: Rules) -> tuple[str, Attrs]:
    """Map one PingOne user to (userName, flat SCIM attributes). Raises _MappingFailure."""
    values: list[Any] = []
    seen: dict[str, str] = {}
    visit = _INTERPRETER.visit
    for path, expr in rules.mapping:
        try:
            value = visit(expr.parsed, user)
        except (jmespath.exceptions.JMESPathError, TypeError, ValueError) as exc:
            raise _MappingFailure(MAPPING_ERROR, f"{path}: {exc}") from exc
        if isinstance(value, dict | list):
            raise _MappingFailure(MAPPING_ERROR, f"{path}: expression gave a {type(value).__name__}")
        if isinstance(value, str):
            if len(value) > MAX_VALUE_CHARS:
                raise _MappingFailure(VALUE_TOO_LONG, f"{path}: {len(value)} characters")
            value = unicodedata.normalize("NFC", value)
            if value == "":
                value = None
            elif len(value) <= SHARED_VALUE_CHARS and path != USERNAME_PATH and "@" not in value:
                # given and family names, departments: one string each. Not userNames and email
                # addresses: one per user, they would only add an entry to the interned table.
                value = sys.intern(value)
            else:
                value = seen.setdefault(value, value)   # userName and email are often one string
        values.append(value)
    attrs = Attrs(rules.paths, tuple(values))
    user_name = attrs.get(USERNAME_PATH)
    if not isinstance(user_name, str) or not user_name:
        raise _MappingFailure(MISSING_USERNAME, "the mapped userName is empty")
    if rules.require_email_username and not is_email(user_name):
        raise _MappingFailure(INVALID_USERNAME, f"userName {user_name!r} is not an email address")
    return user_name, attrs


def scope_members(snapshot: Snapshot, rules: Rules, children: dict[str, set[str]],
                  pins: Mapping[str, str] | None = None) -> set[str] | None:
    """User ids that the scope's groups admit; None when the scope names no group."""
    if not rules.scope_groups:
        return None
    out: set[str] = set()
    for selector in rules.scope_groups:
        for group in selector.select(snapshot, pins):
            out |= snapshot.member_ids(group["id"], transitive=rules.transitive, children=children)
    return out


def resolve_pins(snapshot: Snapshot, rules: Rules, pins: Mapping[str, str]) -> dict[str, str]:
    """Group name -> id for every name selector that resolves now (old pins kept when valid)."""
    out: dict[str, str] = {}
    for selector in (*rules.scope_groups, *rules.groups):
        if selector.name is None:
            continue
        group = selector.find(snapshot, pins)
        if group is not None:
            out[selector.name] = group["id"]
        elif selector.name in pins:
            out[selector.name] = pins[selector.name]
    return out


def _map(user_id: str, user: JSON, rules: Rules, digest: int = 0, passes: bool = True) -> MappedUser:
    """One user as this rule maps it (or why it is skipped), with its userName key."""
    try:
        user_name, attrs = map_user(user, rules)
    except _MappingFailure as failure:
        name = user.get("username")
        return Skipped(user_id, name if isinstance(name, str) else None, failure.reason, failure.detail,
                       digest, passes)
    active = user.get("enabled", True) is not False
    key = username_key(user_name)
    return DesiredUser(user_id, user_name, attrs, active, digest, user_name if key == user_name else key, passes)


def desired_state(snapshot: Snapshot, rules: Rules, pins: Mapping[str, str] | None = None, *,
                  hashes: Mapping[str, int] | None = None, cache: MappingCache | None = None) -> Desired:
    """The users and groups one target should hold, given the snapshot.

    `pins` maps configured group names to the PingOne ids they resolved to before
    (`resolve_pins`), so that a renamed group keeps being followed. With `hashes` (source id ->
    `content_hash` of the user) and a `cache` kept by the caller for these same rules, a user
    whose JSON did not change is not mapped again; a user the snapshot holds as `UNCHANGED` must
    be in the cache (put there by `cache_user` while the snapshot was taken)."""
    desired = Desired(present_users=snapshot.users.keys(), present_groups=snapshot.groups.keys(),
                      create_only=rules.create_only)
    children = snapshot.children()
    admitted = scope_members(snapshot, rules, children, pins)
    member_cache: dict[str, AbstractSet[str]] = {}

    def members_of(group_id: str) -> AbstractSet[str]:
        found = member_cache.get(group_id)
        if found is None:
            found = member_cache[group_id] = snapshot.member_ids(
                group_id, transitive=rules.transitive, children=children)
        return found

    # userName key -> the first user id mapped to it; a second one is a conflict (rare: a list
    # per key would be ~70 MB at 1,000,000 users)
    by_name: dict[str, str] = {}
    clashes: dict[str, list[str]] = {}
    mapped: dict[str, DesiredUser] = {}
    candidates = snapshot.users.keys() if admitted is None else admitted
    for user_id in candidates:
        user = snapshot.users.get(user_id)
        if user is None:
            continue
        if user is UNCHANGED:
            # Its JSON was dropped as the page arrived, once mapped into the cache (`cache_user`).
            hit = cache.get(user_id) if cache is not None else None
            if hit is None:
                raise RuntimeError(f"user {user_id}: the snapshot dropped its JSON but the mapping cache "
                                   "does not hold it")
            if not hit.passes:
                continue
            desired.in_scope += 1
            result = hit
        else:
            if not isinstance(user, dict):
                desired.skipped[user_id] = Skipped(user_id, None, MALFORMED_SOURCE, "user is not an object")
                continue
            if rules.scope_filter is not None and not rules.scope_filter.matches(user, members_of):
                continue
            desired.in_scope += 1
            digest = hashes.get(user_id) if hashes is not None else None
            hit = cache.get(user_id) if cache is not None and digest is not None else None
            if hit is not None and hit.digest == digest:
                result = hit
            else:
                result = _map(user_id, user, rules, digest or 0)
                if cache is not None and digest is not None:
                    cache[user_id] = result
        if isinstance(result, Skipped):
            desired.skipped[user_id] = result
            continue
        mapped[user_id] = result
        name_key = result.key or username_key(result.user_name)
        first = by_name.setdefault(name_key, user_id)
        if first != user_id:
            clashes.setdefault(name_key, [first]).append(user_id)

    del by_name
    for ids in clashes.values():
        for user_id in ids:
            user_name = mapped[user_id].user_name
            others = ", ".join(sorted(i for i in ids if i != user_id))
            desired.skipped[user_id] = Skipped(
                user_id, user_name, CONFLICT, f"userName {user_name!r} is also mapped from {others}")
            del mapped[user_id]
    desired.users = mapped

    provisioned = desired.users.keys()
    selected: list[JSON] = []
    for selector in rules.groups:
        found = selector.select(snapshot, pins)
        if not found and not selector.is_rule:    # a rule that matches nothing is not missing
            desired.missing_groups.append(selector.label())
        selected.extend(found)
    for group in selected:
        group_id = group["id"]
        if group_id in desired.groups:
            continue          # selected twice (by name and by a rule)
        name = group.get("name")
        if not isinstance(name, str) or not name:
            continue
        member_ids = members_of(group_id)
        # Without a copy when every member is provisioned: then it is the snapshot's own set (for a
        # group with no nested groups), one set for the snapshot, the desired state and the links.
        members = (member_ids if provisioned >= member_ids
                   else Members.of(m for m in member_ids if m in provisioned))
        direct = snapshot.members.get(group_id)
        if direct is not None:
            members = shared(members, direct)
        desired.groups[group_id] = DesiredGroup(group_id, unicodedata.normalize("NFC", name), members)
    return desired
