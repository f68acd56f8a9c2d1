"""The PingOne emulator's state: users, groups, memberships, nesting; and a seeded generator.

`Directory` is mutable on purpose (tests change it while the emulator serves it). Mutate it through
its methods: they keep the indexes, the insertion order used for keyset paging and `version`
current, and bump `updatedAt` on what they touch. User and group dicts hold the JSON exactly as
PingOne returns it, without `_links` (pingone.md §3.2, §4.2).
"""

from __future__ import annotations

import random
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from daemon.pingone_filter import (
    DEFAULT_USER_FILTER_DIALECT,
    CompiledFilter,
    compile_filter,
)

DEFAULT_ENV_ID = "00000000-0000-4000-8000-00000000e0e0"
DEFAULT_POPULATION_ID = "00000000-0000-4000-8000-0000000000b0"
DEFAULT_POPULATION_NAME = "Default"
DEFAULT_CUSTOM_ATTRIBUTES = frozenset({"department", "employeeNumber"})

# Keys of the standard user schema; any other top-level string key passed to `add_user` is
# registered as a custom STRING attribute (filterable).
STANDARD_USER_KEYS = frozenset({
    "id", "environment", "population", "username", "email", "emailVerified", "name", "nickname",
    "title", "type", "mobilePhone", "primaryPhone", "locale", "preferredLanguage", "timezone",
    "address", "photo", "externalId", "accountId", "enabled", "account", "lifecycle",
    "identityProvider", "mfaEnabled", "verifyStatus", "lastSignOn", "createdAt", "updatedAt",
})


# Listeners of the directory's changes (the emulator's audit log): (event, resources). Events are
# the emulator's own names, one per kind of mutation (`ACTIVITY_EVENTS`); the emulator maps them to
# PingOne `action.type` values. Resources are `{"type", "id", "name", "population": {"id"}}`.
ActivityListener = Callable[[str, tuple[dict[str, Any], ...]], object]
ACTIVITY_EVENTS = (
    "user.created", "user.updated", "user.deleted", "user.enabled", "user.disabled",
    "user.population_moved", "group.created", "group.updated", "group.renamed", "group.deleted",
    "membership.added", "membership.removed", "nesting.added", "nesting.removed",
)


class UnknownObject(KeyError):
    """No user or group with that id (or name)."""


class DirectoryConflict(ValueError):
    """The change would break a rule: duplicate username or group name, a nesting cycle."""


def _stamp_of(seconds: float) -> str:
    """`format_timestamp` for epoch seconds, without building a datetime (the generator's hot path)."""
    total_ms = round(seconds * 1_000_000) // 1000
    t = time.gmtime(total_ms // 1000)
    ms = total_ms % 1000
    return f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}T{t[3]:02d}:{t[4]:02d}:{t[5]:02d}.{ms:03d}Z"


@dataclass(frozen=True, slots=True)
class Ordering:
    """Insertion order of one collection: parallel sorted sequence numbers and ids (keyset paging)."""

    seqs: list[int]
    ids: list[str]


class Directory:
    """One PingOne environment's identity data."""

    def __init__(self, env_id: str = DEFAULT_ENV_ID, population_id: str = DEFAULT_POPULATION_ID, *,
                 clock: Callable[[], float] = time.time, bump_user_on_membership: bool = False) -> None:
        self.env_id = env_id
        self.population_id = population_id
        self.populations: dict[str, dict[str, Any]] = {
            population_id: {"id": population_id, "environment": {"id": env_id},
                            "name": DEFAULT_POPULATION_NAME, "default": True},
        }
        self.users: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.members: dict[str, set[str]] = {}
        self.parents: dict[str, set[str]] = {}
        self.custom_attributes: set[str] = set(DEFAULT_CUSTOM_ATTRIBUTES)
        self.clock = clock
        # Whether PingOne bumps a user's updatedAt when its group memberships change is
        # UNCONFIRMED (pingone.md §3.2); off by default, so clients must diff memberships.
        self.bump_user_on_membership = bump_user_on_membership
        self.version = 0  # bumped by every mutation; caches key on it
        self.user_revisions: dict[str, int] = {}
        self._children: dict[str, set[str]] = {}
        self._user_groups: dict[str, set[str]] = {}  # user id -> static group ids
        self._by_username: dict[str, str] = {}       # lowercased username -> id (UNCONFIRMED: PingOne's own rule)
        self._by_group_name: dict[str, str] = {}
        self._dynamic: dict[str, CompiledFilter] = {}
        self._dynamic_cache: dict[str, tuple[int, frozenset[str]]] = {}
        self._seq = 0
        self._user_seq: dict[str, int] = {}
        self._group_seq: dict[str, int] = {}
        self.user_order = Ordering([], [])
        self.group_order = Ordering([], [])
        self._last_stamp = ""
        # Called after every mutation made through the public methods (the generator's bulk
        # seeding is not an audited action and calls none).
        self.activity_listeners: list[ActivityListener] = []

    # --- time and bookkeeping ------------------------------------------------------------------

    def now(self) -> str:
        """The current timestamp (ms, 'Z'), never earlier than the last one handed out."""
        stamp = _stamp_of(self.clock())
        if stamp < self._last_stamp:
            stamp = self._last_stamp
        self._last_stamp = stamp
        return stamp

    def _changed(self, *user_ids: str) -> None:
        self.version += 1
        for user_id in user_ids:
            self.user_revisions[user_id] = self.version

    def user_revision(self, user_id: str) -> int:
        """The `version` at which this user's JSON last changed (for caches of its serialisation)."""
        return self.user_revisions.get(user_id, 0)

    def _emit(self, event: str, *resources: dict[str, Any]) -> None:
        for listener in list(self.activity_listeners):
            listener(event, resources)

    def _user_ref(self, user: dict[str, Any]) -> dict[str, Any]:
        population = user.get("population") or {}
        return {"type": "USER", "id": user["id"], "name": user.get("username", ""),
                "population": {"id": population.get("id", self.population_id)}}

    def _group_ref(self, group: dict[str, Any]) -> dict[str, Any]:
        ref: dict[str, Any] = {"type": "GROUP", "id": group["id"], "name": group.get("name", "")}
        population = group.get("population")
        if isinstance(population, dict) and "id" in population:
            ref["population"] = {"id": population["id"]}
        return ref

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _touch_group(self, group_id: str, stamp: str) -> None:
        self.groups[group_id]["updatedAt"] = stamp

    def _touch_user_membership(self, user_id: str, stamp: str) -> None:
        if self.bump_user_on_membership and user_id in self.users:
            self.users[user_id]["updatedAt"] = stamp
            self.user_revisions[user_id] = self.version + 1  # any new value invalidates caches

    def user(self, user_id: str) -> dict[str, Any]:
        try:
            return self.users[user_id]
        except KeyError:
            raise UnknownObject(f"user {user_id}") from None

    def group(self, group_id: str) -> dict[str, Any]:
        try:
            return self.groups[group_id]
        except KeyError:
            raise UnknownObject(f"group {group_id}") from None

    def user_seq(self, user_id: str) -> int:
        return self._user_seq[user_id]

    def group_seq(self, group_id: str) -> int:
        return self._group_seq[group_id]

    # --- users ---------------------------------------------------------------------------------

    def add_user(self, username: str, *, email: str | None = None, given: str = "", family: str = "",
                 enabled: bool = True, population_id: str | None = None, id: str | None = None,
                 **extra: Any) -> dict[str, Any]:
        """Create a user the way `POST /users` would; extra keys become top-level attributes."""
        stamp = self.now()
        user: dict[str, Any] = {
            "id": id or str(uuid.uuid4()),
            "environment": {"id": self.env_id},
            "population": {"id": population_id or self.population_id},
            "username": username,
        }
        if email is not None:
            user["email"] = email
        name = _name(given, family)
        if name:
            user["name"] = name
        user.update({
            "enabled": enabled,
            "account": {"canAuthenticate": True, "status": "OK"},
            "lifecycle": {"status": "ACCOUNT_OK"},
            "identityProvider": {"type": "PING_ONE"},
            "mfaEnabled": False,
            "createdAt": stamp,
            "updatedAt": stamp,
        })
        for key, value in extra.items():
            if value is None:
                continue
            user[key] = value
            if key not in STANDARD_USER_KEYS and isinstance(value, str):
                self.custom_attributes.add(key)
        self._insert_user(user)
        self._emit("user.created", self._user_ref(user))
        return user

    def _insert_user(self, user: dict[str, Any]) -> None:
        user_id = user["id"]
        folded = str(user["username"]).lower()
        if user_id in self.users:
            raise DirectoryConflict(f"user id {user_id} exists")
        if folded in self._by_username:
            raise DirectoryConflict(f"username {user['username']!r} exists")
        self.users[user_id] = user
        self._by_username[folded] = user_id
        seq = self._next_seq()
        self._user_seq[user_id] = seq
        self.user_order.seqs.append(seq)
        self.user_order.ids.append(user_id)
        self._changed(user_id)

    def update_user(self, user_id: str, **changes: Any) -> dict[str, Any]:
        """Partial update: nested dicts merge, None removes a key. Bumps updatedAt."""
        user = self.user(user_id)
        if "username" in changes and changes["username"] is not None:
            new = str(changes["username"]).lower()
            old = str(user["username"]).lower()
            if new != old:
                if new in self._by_username:
                    raise DirectoryConflict(f"username {changes['username']!r} exists")
                del self._by_username[old]
                self._by_username[new] = user_id
        for key in ("id", "createdAt", "updatedAt", "environment"):
            changes.pop(key, None)
        old_population = (user.get("population") or {}).get("id")
        _merge(user, changes)
        moved = (user.get("population") or {}).get("id") != old_population
        for key, value in changes.items():
            if key not in STANDARD_USER_KEYS and isinstance(value, str):
                self.custom_attributes.add(key)
        if "name" in changes and isinstance(user.get("name"), dict) \
                and "formatted" not in (changes["name"] or {}):
            formatted = " ".join(p for p in (user["name"].get("given"), user["name"].get("family")) if p)
            if formatted:
                user["name"]["formatted"] = formatted
        user["updatedAt"] = self.now()
        self._changed(user_id)
        if moved:
            self._emit("user.population_moved", self._user_ref(user))
        if set(changes) - {"population"} or not moved:
            self._emit("user.updated", self._user_ref(user))
        return user

    def set_enabled(self, user_id: str, enabled: bool) -> None:
        user = self.user(user_id)
        user["enabled"] = enabled
        user["updatedAt"] = self.now()
        self._changed(user_id)
        self._emit("user.enabled" if enabled else "user.disabled", self._user_ref(user))

    def delete_user(self, user_id: str) -> None:
        """Delete a user; it leaves all its groups (which are bumped)."""
        user = self.user(user_id)
        stamp = self.now()
        for group_id in self._user_groups.pop(user_id, set()):
            self.members[group_id].discard(user_id)
            self._touch_group(group_id, stamp)
        del self.users[user_id]
        self._by_username.pop(str(user["username"]).lower(), None)
        _remove_ordered(self.user_order, self._user_seq.pop(user_id))
        self.user_revisions.pop(user_id, None)
        self._changed()
        self._emit("user.deleted", self._user_ref(user))

    def user_by_username(self, username: str) -> dict[str, Any]:
        user_id = self._by_username.get(username.lower())
        if user_id is None:
            raise UnknownObject(f"username {username}")
        return self.users[user_id]

    # --- groups --------------------------------------------------------------------------------

    def add_group(self, name: str, *, id: str | None = None, user_filter: str | None = None,
                  **extra: Any) -> dict[str, Any]:
        """Create a group in the default population (pass population=None for an environment group)."""
        if name in self._by_group_name:
            raise DirectoryConflict(f"group name {name!r} exists")
        stamp = self.now()
        group: dict[str, Any] = {
            "id": id or str(uuid.uuid4()),
            "environment": {"id": self.env_id},
            "name": name,
            "displayName": name,
            "population": {"id": self.population_id},
        }
        for key, value in extra.items():
            if value is None:
                group.pop(key, None)
            else:
                group[key] = value
        if user_filter is not None:
            group["userFilter"] = user_filter
        group["createdAt"] = stamp
        group["updatedAt"] = stamp
        self._insert_group(group)
        self._emit("group.created", self._group_ref(group))
        return group

    def _insert_group(self, group: dict[str, Any]) -> None:
        group_id = group["id"]
        if group_id in self.groups:
            raise DirectoryConflict(f"group id {group_id} exists")
        user_filter = group.get("userFilter")
        if user_filter is not None:
            self._dynamic[group_id] = self._compile_user_filter(user_filter)
        self.groups[group_id] = group
        self._by_group_name[group["name"]] = group_id
        self.members.setdefault(group_id, set())
        seq = self._next_seq()
        self._group_seq[group_id] = seq
        self.group_order.seqs.append(seq)
        self.group_order.ids.append(group_id)
        self._changed()

    def _compile_user_filter(self, text: str) -> CompiledFilter:
        # A bad userFilter is refused as a conflict (UnsupportedFilter is a ValueError too).
        return compile_filter(text, DEFAULT_USER_FILTER_DIALECT.with_custom(frozenset(self.custom_attributes)))

    def rename_group(self, group_id: str, name: str) -> None:
        group = self.group(group_id)
        if name == group["name"]:
            return
        if name in self._by_group_name:
            raise DirectoryConflict(f"group name {name!r} exists")
        del self._by_group_name[group["name"]]
        self._by_group_name[name] = group_id
        group["name"] = name
        group["displayName"] = name
        group["updatedAt"] = self.now()
        self._changed()
        self._emit("group.renamed", self._group_ref(group))

    def set_user_filter(self, group_id: str, user_filter: str | None) -> None:
        """Make a group dynamic (or static again with None)."""
        group = self.group(group_id)
        if user_filter is None:
            group.pop("userFilter", None)
            self._dynamic.pop(group_id, None)
        else:
            self._dynamic[group_id] = self._compile_user_filter(user_filter)
            group["userFilter"] = user_filter
        self._dynamic_cache.pop(group_id, None)
        group["updatedAt"] = self.now()
        self._changed()
        self._emit("group.updated", self._group_ref(group))

    def delete_group(self, group_id: str) -> None:
        group = self.group(group_id)
        stamp = self.now()
        for user_id in self.members.pop(group_id, set()):
            self._user_groups[user_id].discard(group_id)
            self._touch_user_membership(user_id, stamp)
        for parent_id in self.parents.pop(group_id, set()):
            self._children[parent_id].discard(group_id)
            self._touch_group(parent_id, stamp)
        for child_id in self._children.pop(group_id, set()):
            self.parents[child_id].discard(group_id)
            self._touch_group(child_id, stamp)
        self._dynamic.pop(group_id, None)
        self._dynamic_cache.pop(group_id, None)
        del self.groups[group_id]
        self._by_group_name.pop(group["name"], None)
        _remove_ordered(self.group_order, self._group_seq.pop(group_id))
        self._changed()
        self._emit("group.deleted", self._group_ref(group))

    def group_by_name(self, name: str) -> dict[str, Any]:
        group_id = self._by_group_name.get(name)
        if group_id is None:
            raise UnknownObject(f"group name {name}")
        return self.groups[group_id]

    # --- membership and nesting ----------------------------------------------------------------

    def add_member(self, group_id: str, user_id: str) -> None:
        """Add a static (direct) member; bumps the group's updatedAt."""
        self.group(group_id)
        self.user(user_id)
        if user_id in self.members[group_id]:
            return
        stamp = self.now()
        self.members[group_id].add(user_id)
        self._user_groups.setdefault(user_id, set()).add(group_id)
        self._touch_group(group_id, stamp)
        self._touch_user_membership(user_id, stamp)
        self._changed()
        self._emit("membership.added", self._user_ref(self.users[user_id]), self._group_ref(self.groups[group_id]))

    def remove_member(self, group_id: str, user_id: str) -> None:
        self.group(group_id)
        if user_id not in self.members[group_id]:
            raise UnknownObject(f"user {user_id} is not a direct member of group {group_id}")
        stamp = self.now()
        self.members[group_id].discard(user_id)
        self._user_groups[user_id].discard(group_id)
        self._touch_group(group_id, stamp)
        self._touch_user_membership(user_id, stamp)
        self._changed()
        self._emit("membership.removed", self._user_ref(self.users[user_id]), self._group_ref(self.groups[group_id]))

    def nest(self, child_id: str, parent_id: str) -> None:
        """Make *child_id*'s members members of *parent_id*; a cycle raises DirectoryConflict."""
        self.group(child_id)
        self.group(parent_id)
        if child_id == parent_id or child_id in self._ancestors([parent_id]):
            raise DirectoryConflict(f"nesting {child_id} into {parent_id} would make a cycle")
        if parent_id in self.parents.get(child_id, set()):
            return
        stamp = self.now()
        self._link(child_id, parent_id)
        self._touch_group(child_id, stamp)
        self._touch_group(parent_id, stamp)
        self._emit("nesting.added", self._group_ref(self.groups[child_id]), self._group_ref(self.groups[parent_id]))

    def _link(self, child_id: str, parent_id: str) -> None:
        self.parents.setdefault(child_id, set()).add(parent_id)
        self._children.setdefault(parent_id, set()).add(child_id)
        self._changed()

    def unnest(self, child_id: str, parent_id: str) -> None:
        if parent_id not in self.parents.get(child_id, set()):
            raise UnknownObject(f"group {child_id} is not nested in {parent_id}")
        stamp = self.now()
        self.parents[child_id].discard(parent_id)
        self._children[parent_id].discard(child_id)
        self._touch_group(child_id, stamp)
        self._touch_group(parent_id, stamp)
        self._changed()
        self._emit("nesting.removed", self._group_ref(self.groups[child_id]), self._group_ref(self.groups[parent_id]))

    def child_group_ids(self, group_id: str) -> set[str]:
        return set(self._children.get(group_id, set()))

    def _ancestors(self, start: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(start)
        while todo:
            for parent in self.parents.get(todo.pop(), ()):
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    def dynamic_member_ids(self, group_id: str) -> frozenset[str]:
        """Users matching the group's userFilter (empty for a static group); cached per version."""
        compiled = self._dynamic.get(group_id)
        if compiled is None:
            return frozenset()
        cached = self._dynamic_cache.get(group_id)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        matched = frozenset(uid for uid, user in self.users.items() if compiled.matches(user))
        self._dynamic_cache[group_id] = (self.version, matched)
        return matched

    def static_group_ids(self, user_id: str) -> set[str]:
        """Groups the user was added to explicitly."""
        self.user(user_id)
        return set(self._user_groups.get(user_id, set()))

    def static_member_ids(self, group_id: str) -> set[str]:
        self.group(group_id)
        return self.members[group_id]

    def direct_member_ids(self, group_id: str) -> set[str]:
        """Static members plus the users the group's userFilter matches."""
        return self.static_member_ids(group_id) | self.dynamic_member_ids(group_id)

    def transitive_member_ids(self, group_id: str) -> set[str]:
        """Direct members of the group and of every group nested in it, at any depth."""
        result = set(self.direct_member_ids(group_id))
        seen = {group_id}
        todo = [group_id]
        while todo:
            for child in self._children.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
                    result |= self.direct_member_ids(child)
        return result

    def is_dynamic_member(self, group_id: str, user_id: str) -> bool:
        compiled = self._dynamic.get(group_id)
        return compiled is not None and compiled.matches(self.user(user_id))

    def user_group_ids(self, user_id: str, *, transitive: bool = False) -> set[str]:
        """Groups the user is in: static and dynamic; with *transitive*, their ancestors too."""
        user = self.user(user_id)
        direct = set(self._user_groups.get(user_id, set()))
        direct.update(gid for gid, compiled in self._dynamic.items() if compiled.matches(user))
        if transitive:
            direct |= self._ancestors(direct)
        return direct


def _name(given: str, family: str) -> dict[str, str]:
    name: dict[str, str] = {}
    if given:
        name["given"] = given
    if family:
        name["family"] = family
    formatted = " ".join(p for p in (given, family) if p)
    if formatted:
        name["formatted"] = formatted
    return name


def _merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _remove_ordered(order: Ordering, seq: int) -> None:
    index = bisect_left(order.seqs, seq)
    del order.seqs[index]
    del order.ids[index]


# --- the generator -------------------------------------------------------------------------------

# (display, ascii slug) pairs; unicode on purpose.
_GIVEN = (
    ("James", "james"), ("Mary", "mary"), ("Robert", "robert"), ("Patricia", "patricia"),
    ("John", "john"), ("Jennifer", "jennifer"), ("Michael", "michael"), ("Linda", "linda"),
    ("David", "david"), ("Elizabeth", "elizabeth"), ("William", "william"), ("Barbara", "barbara"),
    ("Richard", "richard"), ("Susan", "susan"), ("Joseph", "joseph"), ("Jessica", "jessica"),
    ("Thomas", "thomas"), ("Sarah", "sarah"), ("Chris", "chris"), ("Karen", "karen"),
    ("José", "jose"), ("Zoë", "zoe"), ("Renée", "renee"), ("Jürgen", "juergen"), ("Søren", "soren"),
    ("François", "francois"), ("Björn", "bjorn"), ("Ana", "ana"), ("Łukasz", "lukasz"),
    ("Chloé", "chloe"), ("Wei", "wei"), ("伟", "wei"), ("芳", "fang"), ("Hiroshi", "hiroshi"),
    ("Priya", "priya"), ("Olúwaseun", "oluwaseun"), ("Siobhán", "siobhan"), ("Dmitrí", "dmitri"),
    ("Ingrid", "ingrid"), ("Mateo", "mateo"), ("Aisha", "aisha"), ("Noah", "noah"),
)
_FAMILY = (
    ("Smith", "smith"), ("Johnson", "johnson"), ("Williams", "williams"), ("Brown", "brown"),
    ("Jones", "jones"), ("Garcia", "garcia"), ("Miller", "miller"), ("Davis", "davis"),
    ("Rodriguez", "rodriguez"), ("Martinez", "martinez"), ("Wilson", "wilson"), ("Anderson", "anderson"),
    ("Taylor", "taylor"), ("Thomas", "thomas"), ("Moore", "moore"), ("Jackson", "jackson"),
    ("Müller", "mueller"), ("Schröder", "schroeder"), ("Østergaard", "ostergaard"), ("Núñez", "nunez"),
    ("Dubois", "dubois"), ("Lefèvre", "lefevre"), ("Nakamura", "nakamura"), ("李", "li"), ("王", "wang"),
    ("Kowalczyk", "kowalczyk"), ("Ó Briain", "obriain"), ("Håkansson", "hakansson"),
    ("Papadopoulos", "papadopoulos"), ("Çelik", "celik"), ("Nguyễn", "nguyen"), ("Patel", "patel"),
    ("Okafor", "okafor"), ("Ivanova", "ivanova"), ("Rossi", "rossi"), ("Fernández", "fernandez"),
)
_DEPARTMENTS = ("Engineering", "Sales", "Marketing", "Finance", "Support", "Operations", "Legal",
                "Human Resources", "IT", "Research", "Facilities", "Security", "Product", "Design")
_TITLES = ("Engineer", "Senior Engineer", "Manager", "Director", "Analyst", "Specialist", "Consultant",
           "Account Executive", "Technician", "Coordinator", "Administrator", "Architect")
_SPECIAL_GROUPS = ("All Staff", "ZPA Users", "ZIA Users", "ZPA Contractors")
_SPECIAL_SHARE = (0.5, 0.3, 0.4, 0.02)
_EPOCH_START = datetime(2019, 1, 1, tzinfo=UTC).timestamp()
_EPOCH_END = datetime(2025, 1, 1, tzinfo=UTC).timestamp()
DYNAMIC_GROUP_NAME = "Engineering (dynamic)"
DISABLED_SHARE = 0.02
PLAIN_USERNAME_SHARE = 0.01
SECOND_POPULATION_SHARE = 0.1


def _uuid(rng: random.Random) -> str:
    """A version-4-shaped UUID from *rng* (same as uuid.UUID(int=..., version=4), faster)."""
    bits = (rng.getrandbits(128) & ~(0xC000 << 48) | (0x8000 << 48)) & ~(0xF000 << 64) | (4 << 76)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def generate(users: int, groups: int, *, seed: int = 1, env_id: str = DEFAULT_ENV_ID,
             domain: str = "example.com") -> Directory:
    """A deterministic directory of *users* users and *groups* groups for *seed*.

    Group 0 is "All Staff" (about half the users), 1 "ZPA Users", 2 "ZIA Users", 3 "ZPA Contractors"
    (nested in "ZPA Users"); the rest are department-like with a long tail of sizes, a few empty, a
    few nested, and one dynamic (`department eq "Engineering"`) when there are at least 8.
    About 2% of users are disabled, 1% have a username that is not an email address.
    """
    rng = random.Random(seed)
    directory = Directory(env_id, _uuid(rng))
    contractors_pop = _uuid(rng)
    directory.populations[contractors_pop] = {"id": contractors_pop, "environment": {"id": env_id},
                                              "name": "Contractors", "default": False}
    env = {"id": env_id}
    span = _EPOCH_END - _EPOCH_START
    taken: dict[str, int] = {}
    random_ = rng.random
    n_given, n_family, n_titles, n_depts = len(_GIVEN), len(_FAMILY), len(_TITLES), len(_DEPARTMENTS)
    for index in range(users):
        given, gslug = _GIVEN[int(random_() * n_given)]
        family, fslug = _FAMILY[int(random_() * n_family)]
        plain = random_() < PLAIN_USERNAME_SHARE
        base = f"{gslug[0]}{fslug}" if plain else f"{gslug}.{fslug}"
        count = taken.get(base, 0)
        taken[base] = count + 1
        local = base if count == 0 else f"{base}{count + 1}"
        email = f"{local}@{domain}"
        created = _EPOCH_START + random_() * span
        updated = created + random_() * (_EPOCH_END - created)
        population = contractors_pop if random_() < SECOND_POPULATION_SHARE else directory.population_id
        user: dict[str, Any] = {
            "id": _uuid(rng),
            "environment": env,
            "population": {"id": population},
            "username": local if plain else email,
            "email": email,
            "emailVerified": True,
            "name": {"given": given, "family": family, "formatted": f"{given} {family}"},
            "title": _TITLES[int(random_() * n_titles)],
            "enabled": random_() >= DISABLED_SHARE,
            "account": {"canAuthenticate": True, "status": "OK"},
            "lifecycle": {"status": "ACCOUNT_OK"},
            "identityProvider": {"type": "PING_ONE"},
            "mfaEnabled": False,
            "department": _DEPARTMENTS[int(random_() * n_depts)],
            "employeeNumber": f"E{100000 + index}",
            "createdAt": _stamp_of(created),
            "updatedAt": _stamp_of(updated),
        }
        directory._insert_user(user)
    user_ids = directory.user_order.ids
    stamp = _stamp_of(_EPOCH_END)
    tail = groups - len(_SPECIAL_GROUPS)
    empty_every = 25
    for index in range(groups):
        if index < len(_SPECIAL_GROUPS):
            name = _SPECIAL_GROUPS[index]
            size = int(users * _SPECIAL_SHARE[index])
        else:
            rank = index - len(_SPECIAL_GROUPS) + 1
            name = f"{_DEPARTMENTS[rank % len(_DEPARTMENTS)]} {rank:04d}"
            empty = rank % empty_every == 3 or (tail >= 2 and rank == tail)
            size = 0 if empty else max(1, int(users * 0.15 / rank * (0.5 + random_())))
        group: dict[str, Any] = {
            "id": _uuid(rng), "environment": env, "name": name, "displayName": name,
            "population": {"id": directory.population_id},
            "description": f"{name} (generated)",
            "createdAt": stamp, "updatedAt": stamp,
        }
        directory._insert_group(group)
        chosen = rng.sample(user_ids, min(size, len(user_ids)))
        directory.members[group["id"]].update(chosen)
        for user_id in chosen:
            directory._user_groups.setdefault(user_id, set()).add(group["id"])
    group_ids = directory.group_order.ids
    if groups > 3:
        directory._link(group_ids[3], group_ids[1])
    for index in range(len(_SPECIAL_GROUPS) + 1, groups):
        if random_() < 0.03:  # child index > parent index: never a cycle
            directory._link(group_ids[index], group_ids[rng.randrange(len(_SPECIAL_GROUPS), index)])
    if groups >= 8:
        dynamic = directory.groups[group_ids[groups - 2]]
        directory._by_group_name.pop(dynamic["name"])
        dynamic["name"] = dynamic["displayName"] = DYNAMIC_GROUP_NAME
        dynamic["description"] = "Users whose department is Engineering (generated)"
        directory._by_group_name[DYNAMIC_GROUP_NAME] = dynamic["id"]
        directory.set_user_filter(dynamic["id"], 'department eq "Engineering"')
        dynamic["updatedAt"] = stamp
    return directory
