"""The lifecycle test's oracle: what each SCIM target should hold, computed from PingOne alone.

It knows nothing of provisiond's code (it imports nothing from `daemon`). It reads PingOne through
the PingOne emulator's wire API (token endpoint, paged `users` and `groups` listings, each user's
`memberOfGroups` for its DIRECT memberships, each group's `memberOfGroups` for nesting), evaluates
each target's rule itself (scope groups with its own membership closure, the population filter,
the `require_email_username` check), maps the attributes with its own reading of the profile
defaults the test config uses, and compares the result with what each target answers over SCIM
(paged `/Users`, `/Groups`, each group by id for its members).

The rules it encodes are the documented ones (README, DESIGN.md):

- a user is in scope when it is a member of a (pinned) scope group — through nested groups when
  the target's membership is transitive — and matches the scope filter;
- an in-scope user whose userName is valid for the target is held by exactly one account, with
  `externalId` = its PingOne id, the mapped attributes, `active` = PingOne `enabled`; a disabled
  user is not created, and keeps an inactive account where it had one (ZPA deletes on
  `active=false`);
- a user deleted in PingOne or out of scope has no active account (`remove_action = "delete"`:
  no account at all);
- a configured group name, once resolved, is pinned to that PingOne id while it exists (a
  rename is pushed as a rename of the same target group); each pushed group exists once under
  its PingOne name, with exactly the accounts of its in-scope members;
- provisiond leaves objects it does not manage alone (the test's "strangers").

This file is test code: it raises nothing; `Oracle.check` returns the violations found.
"""

from __future__ import annotations

import base64
import http.client
import json
import unicodedata
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
EMAIL_WORK = 'emails[type eq "work"].value'
DEPARTMENT = f"{ENTERPRISE}:department"

# The default mapping of each profile (README "Mapping"; config/provisiond.example.toml), as the
# oracle reads it: SCIM path -> how the value comes out of the PingOne user.
PROFILE_PATHS: dict[str, tuple[str, ...]] = {
    "zpa": ("userName", "name.givenName", "name.familyName", "displayName", "externalId", EMAIL_WORK,
            DEPARTMENT),
    "zia": ("userName", "displayName", "externalId", DEPARTMENT, "name.givenName", "name.familyName"),
    "generic": ("userName", "name.givenName", "name.familyName", "displayName", "externalId", EMAIL_WORK),
}
REQUIRE_EMAIL_USERNAME = {"zpa": True, "zia": True, "generic": False}
INACTIVE_IS_DELETED = {"zpa": True, "zia": False, "generic": False}   # ZPA: active=false deletes


# -- HTTP ------------------------------------------------------------------------------------------

class Http:
    """A small blocking JSON client (http.client, one kept-alive connection per host), loopback only."""

    def __init__(self) -> None:
        self.connections: dict[str, http.client.HTTPConnection] = {}

    def call(self, method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None,
             *, form: Mapping[str, str] | None = None) -> tuple[int, Any]:
        data: bytes | None = None
        sent = dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in (1, 2):
            connection = self.connections.get(parts.netloc)
            if connection is None:
                connection = self.connections[parts.netloc] = http.client.HTTPConnection(parts.netloc, timeout=30)
            try:
                connection.request(method, target, body=data, headers=sent)
                response = connection.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, OSError):
                connection.close()
                del self.connections[parts.netloc]
                if attempt == 2:
                    raise
        return response.status, (json.loads(raw) if raw else None)

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()
        self.connections.clear()

    def ok(self, method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None,
           **kwargs: Any) -> Any:
        status, answer = self.call(method, url, body, headers, **kwargs)
        if status >= 300:
            raise AssertionError(f"{method} {url}: HTTP {status} {answer}")
        return answer


# -- PingOne, read over its wire API ----------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    users: dict[str, dict[str, Any]]          # id -> user JSON
    groups: dict[str, dict[str, Any]]         # id -> group JSON
    direct: dict[str, set[str]]               # group id -> user ids added to it directly
    parents: dict[str, set[str]]              # group id -> the groups it is nested in

    def group_named(self, name: str) -> str | None:
        found = [gid for gid, g in self.groups.items() if g.get("name") == name]
        return found[0] if len(found) == 1 else None

    def members(self, group_id: str, *, transitive: bool) -> set[str]:
        """Users of the group: its direct members, plus (transitive) those of every group nested
        in it at any depth (the oracle's own closure over the `parents` edges)."""
        out = set(self.direct.get(group_id, ()))
        if not transitive:
            return out
        children: dict[str, set[str]] = {}
        for child, parents in self.parents.items():
            for parent in parents:
                children.setdefault(parent, set()).add(child)
        seen = {group_id}
        todo = [group_id]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
                    out |= self.direct.get(child, set())
        return out


class PingOneReader:
    def __init__(self, http: Http, base_url: str, env_id: str, client_id: str, client_secret: str) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.api = f"{self.base}/v1/environments/{env_id}"
        self.env_id = env_id
        self.basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self.token: str | None = None

    def _token(self) -> str:
        if self.token is None:
            answer = self.http.ok("POST", f"{self.base}/{self.env_id}/as/token",
                                  headers={"Authorization": f"Basic {self.basic}"},
                                  form={"grant_type": "client_credentials"})
            self.token = str(answer["access_token"])
        return self.token

    def _get(self, url: str) -> Any:
        status, answer = self.http.call("GET", url, headers={"Authorization": f"Bearer {self._token()}"})
        if status == 401:
            self.token = None
            status, answer = self.http.call("GET", url, headers={"Authorization": f"Bearer {self._token()}"})
        if status != 200:
            raise AssertionError(f"PingOne GET {url}: HTTP {status} {answer}")
        return answer

    def _pages(self, url: str, key: str) -> Iterator[dict[str, Any]]:
        next_url: str | None = url
        while next_url:
            page = self._get(next_url)
            yield from page.get("_embedded", {}).get(key, [])
            next_url = page.get("_links", {}).get("next", {}).get("href")

    def read(self) -> Source:
        users = {u["id"]: u for u in self._pages(f"{self.api}/users?limit=100", "users")}
        groups = {g["id"]: g for g in self._pages(f"{self.api}/groups?limit=100", "groups")}
        direct: dict[str, set[str]] = {gid: set() for gid in groups}
        for uid in users:
            for item in self._pages(f"{self.api}/users/{uid}/memberOfGroups?limit=100", "groupMemberships"):
                if item.get("type") == "DIRECT" and item["id"] in direct:
                    direct[item["id"]].add(uid)
        parents = {gid: {item["id"] for item in self._pages(
            f"{self.api}/groups/{gid}/memberOfGroups?limit=100", "groupMemberships")} for gid in groups}
        return Source(users, groups, direct, parents)


# -- a SCIM target, read over SCIM ------------------------------------------------------------------

def get_ci(obj: Any, key: str) -> Any:
    """A SCIM attribute, its name compared case-insensitively (RFC 7643 §2.1)."""
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return obj[key]
    low = key.lower()
    for k, v in obj.items():
        if k.lower() == low:
            return v
    return None


def is_active(resource: Mapping[str, Any]) -> bool:
    value = get_ci(resource, "active")
    return value is None or value is True or (isinstance(value, str) and value.lower() == "true")


def read_path(resource: Mapping[str, Any], path: str) -> Any:
    """The value of one mapped SCIM path in a resource (None when absent)."""
    if path == EMAIL_WORK:
        emails = get_ci(resource, "emails") or []
        emails = [e for e in emails if isinstance(e, dict)]
        typed = [e.get("value") for e in emails if str(e.get("type", "")).lower() == "work"]
        if not typed and emails and not any("type" in e for e in emails):
            primary = [e for e in emails if e.get("primary") in (True, "true")]
            typed = [(primary or emails)[0].get("value")]
        return typed[0] if len(typed) == 1 else (typed or None)
    if path.startswith("urn:"):
        uri, _, attr = path.rpartition(":")
        return get_ci(get_ci(resource, uri), attr)
    node: Any = resource
    for part in path.split("."):
        node = get_ci(node, part)
    return node


@dataclass
class Account:
    id: str
    user_name: str
    external_id: str | None
    active: bool
    resource: dict[str, Any]


@dataclass
class TargetGroup:
    id: str
    name: str
    members: list[str]


@dataclass
class TargetView:
    accounts: list[Account]
    groups: list[TargetGroup]

    def by_external_id(self) -> dict[str, list[Account]]:
        out: dict[str, list[Account]] = {}
        for account in self.accounts:
            if account.external_id:
                out.setdefault(account.external_id, []).append(account)
        return out


class ScimReader:
    def __init__(self, http: Http, base_url: str, token: str) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/scim+json"}

    def _list(self, endpoint: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = 1
        while True:
            page = self.http.ok("GET", f"{self.base}/{endpoint}?startIndex={start}&count=100", headers=self.headers)
            items = page.get("Resources") or []
            out.extend(items)
            total = int(page.get("totalResults", 0))
            if not items or start - 1 + len(items) >= total:
                return out
            start += len(items)

    def read(self) -> TargetView:
        accounts = [Account(str(u["id"]), str(get_ci(u, "userName")), get_ci(u, "externalId"), is_active(u), u)
                    for u in self._list("Users")]
        groups = []
        for listed in self._list("Groups"):
            full = self.http.ok("GET", f"{self.base}/Groups/{listed['id']}", headers=self.headers)
            members = [str(m.get("value")) for m in (get_ci(full, "members") or []) if isinstance(m, dict)]
            groups.append(TargetGroup(str(full["id"]), str(get_ci(full, "displayName")), members))
        return TargetView(accounts, groups)


# -- the rule and the mapping ----------------------------------------------------------------------

@dataclass(frozen=True)
class TargetRule:
    """One target of the test config, as the oracle understands it."""

    name: str
    profile: str                       # zpa | zia | generic (default mapping, username rule)
    scope_groups: tuple[str, ...]
    groups: tuple[str, ...]            # pushed, by name
    transitive: bool
    population: str | None = None      # scope.filter: population.id eq "<this>"
    remove_action: str = "disable"     # disable | delete


def nfc(value: Any) -> Any:
    return unicodedata.normalize("NFC", value) if isinstance(value, str) else value


def display_name(user: Mapping[str, Any]) -> str:
    """`name.formatted`, else given and family joined by a space, else the username."""
    raw = user.get("name")
    name: dict[str, Any] = raw if isinstance(raw, dict) else {}
    formatted = name.get("formatted")
    if isinstance(formatted, str) and formatted:
        return formatted
    joined = " ".join(p for p in (name.get("given"), name.get("family")) if isinstance(p, str) and p)
    return joined or str(user.get("username"))


def map_user(profile: str, user: Mapping[str, Any]) -> dict[str, Any]:
    raw = user.get("name")
    name: dict[str, Any] = raw if isinstance(raw, dict) else {}
    values = {
        "userName": user.get("username"),
        "name.givenName": name.get("given") or None,
        "name.familyName": name.get("family") or None,
        "displayName": display_name(user),
        "externalId": user.get("id"),
        EMAIL_WORK: user.get("email") or None,
        DEPARTMENT: user.get("department") or None,
    }
    return {path: nfc(values[path]) for path in PROFILE_PATHS[profile]}


def is_email(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    local, at, domain = name.partition("@")
    return bool(local and at and "." in domain and "@" not in domain and " " not in name)


@dataclass
class Desired:
    active: dict[str, dict[str, Any]] = field(default_factory=dict)   # user id -> mapped attrs
    inactive: set[str] = field(default_factory=set)                   # in scope, valid, disabled
    # in scope with a userName the target cannot take: "skipped: never sent, never removed because
    # of it" (mapping.py's contract), so an account it may still have is left as it is
    skipped: set[str] = field(default_factory=set)
    groups: dict[str, tuple[str, set[str]]] = field(default_factory=dict)  # group id -> (name, members)

    @property
    def valid(self) -> set[str]:
        return set(self.active) | self.inactive


@dataclass
class Strangers:
    """Objects made in the target behind provisiond's back that it does not manage."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)     # target id -> resource made
    groups: dict[str, str] = field(default_factory=dict)               # target id -> displayName


@dataclass
class Excuses:
    """What the test did between two checks that lets an account or a group get a new target id."""

    accounts: set[str] = field(default_factory=set)     # PingOne user ids
    groups: set[str] = field(default_factory=set)       # PingOne group ids

    def clear(self) -> None:
        self.accounts.clear()
        self.groups.clear()


class Oracle:
    """The desired state per target, and the comparison with a target's contents, with memory of
    the previous check (group pins, target ids) to tell a rename from a re-creation."""

    def __init__(self, rules: Iterable[TargetRule]) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self.pins: dict[str, dict[str, str]] = {name: {} for name in self.rules}
        self.accounts: dict[str, dict[str, str]] = {name: {} for name in self.rules}   # user id -> target id
        self.group_ids: dict[str, dict[str, str]] = {name: {} for name in self.rules}  # group id -> target id

    def resolve(self, rule: TargetRule, source: Source) -> dict[str, str]:
        """Configured group name -> PingOne group id (pinned once resolved, while it exists)."""
        pins = self.pins[rule.name]
        out: dict[str, str] = {}
        for name in (*rule.scope_groups, *rule.groups):
            pinned = pins.get(name)
            if pinned is not None and pinned in source.groups:
                out[name] = pinned
                continue
            found = source.group_named(name)
            if found is not None:
                out[name] = found
            elif pinned is not None:
                out[name] = pinned   # gone: kept, resolves to nothing
        return out

    def desired(self, rule: TargetRule, source: Source, pins: Mapping[str, str]) -> Desired:
        admitted: set[str] | None = None
        if rule.scope_groups:
            admitted = set()
            for name in rule.scope_groups:
                gid = pins.get(name)
                if gid in source.groups:
                    admitted |= source.members(gid, transitive=rule.transitive)
        out = Desired()
        for uid, user in source.users.items():
            if admitted is not None and uid not in admitted:
                continue
            if rule.population is not None and (user.get("population") or {}).get("id") != rule.population:
                continue
            mapped = map_user(rule.profile, user)
            if not mapped["userName"] or (REQUIRE_EMAIL_USERNAME[rule.profile] and not is_email(mapped["userName"])):
                out.skipped.add(uid)
                continue
            if user.get("enabled", True) is False:
                out.inactive.add(uid)
            else:
                out.active[uid] = mapped
        valid = out.valid
        for name in rule.groups:
            gid = pins.get(name)
            if gid not in source.groups or gid in out.groups:
                continue
            members = source.members(gid, transitive=rule.transitive) & valid
            out.groups[gid] = (nfc(source.groups[gid]["name"]), members)
        return out

    def check(self, target: str, source: Source, view: TargetView, *, strangers: Strangers,
              excuses: Excuses, commit: bool = True) -> list[str]:
        """Violations of the documented rules by this target's contents (empty when it is right)."""
        rule = self.rules[target]
        pins = self.resolve(rule, source)
        want = self.desired(rule, source, pins)
        bad: list[str] = []
        t = target
        names: dict[str, Account] = {}
        for account in view.accounts:
            key = account.user_name.lower()
            if key in names:
                bad.append(f"{t}: userName {account.user_name!r} held twice ({names[key].id}, {account.id})")
            names[key] = account
        by_ext = view.by_external_id()
        for ext, held in by_ext.items():
            if len(held) > 1:
                bad.append(f"{t}: PingOne user {ext} has {len(held)} accounts: "
                           f"{[(a.id, a.user_name, a.active) for a in held]}")
        account_of: dict[str, Account] = {ext: held[0] for ext, held in by_ext.items()}
        by_id = {a.id: a for a in view.accounts}
        # every active account is wanted, or a stranger left alone
        # A PingOne user given a stranger's userName: provisiond adopts that account (README, full
        # sync and 409 on create). Wanted active, it is managed from now on; wanted inactive, what
        # happens to it is left open.
        active_names = {str(attrs["userName"]).lower() for attrs in want.active.values()}
        inactive_names = {str(source.users[uid].get("username")).lower() for uid in want.inactive}
        open_ids = set()
        for stranger_id, made in list(strangers.users.items()):
            key = str(made["userName"]).lower()
            if key in active_names and commit:
                del strangers.users[stranger_id]
            elif key in inactive_names:
                open_ids.add(stranger_id)
        for account in view.accounts:
            if account.id in open_ids:
                continue
            if account.id in strangers.users:
                made = strangers.users[account.id]
                if not account.active or account.user_name != made["userName"] or \
                        read_path(account.resource, "displayName") != made.get("displayName"):
                    bad.append(f"{t}: unmanaged account {account.user_name!r} was changed: {account.resource}")
                continue
            if account.external_id in want.skipped:
                continue
            if account.active and account.external_id not in want.active:
                user = source.users.get(account.external_id or "")
                why = "deleted in PingOne" if user is None else "not wanted active (scope, enabled or userName)"
                bad.append(f"{t}: account {account.user_name!r} (externalId {account.external_id}) is active "
                           f"but its user is {why}")
            if not account.active and INACTIVE_IS_DELETED[rule.profile]:
                bad.append(f"{t}: inactive account {account.user_name!r} on a target where inactive deletes")
            if not account.active and rule.remove_action == "delete" and \
                    account.external_id not in want.inactive and account.external_id not in want.active:
                bad.append(f"{t}: account {account.user_name!r} (externalId {account.external_id}) should have "
                           "been deleted (remove_action delete)")
        for stranger_id, made in strangers.users.items():
            if stranger_id not in by_id and stranger_id not in open_ids:
                bad.append(f"{t}: unmanaged account {made['userName']!r} was deleted")
        # every wanted user: one account, exact attributes, active
        for uid, attrs in want.active.items():
            mine = account_of.get(uid)
            if mine is None:
                bad.append(f"{t}: no account for {attrs['userName']!r} ({uid})")
                continue
            if not mine.active:
                bad.append(f"{t}: account of {attrs['userName']!r} ({uid}) is inactive")
            for path, value in attrs.items():
                got = read_path(mine.resource, path)
                if got != value:
                    bad.append(f"{t}: {attrs['userName']!r} {path} is {got!r}, want {value!r}")
            previous = self.accounts[t].get(uid)
            if previous is not None and previous != mine.id and uid not in excuses.accounts:
                bad.append(f"{t}: account of {attrs['userName']!r} changed id {previous} -> {mine.id} "
                           "(re-created without cause)")
        # a disabled user keeps its inactive account where the target keeps inactive accounts
        for uid in want.inactive:
            previous = self.accounts[t].get(uid)
            if INACTIVE_IS_DELETED[rule.profile] or previous is None or uid in excuses.accounts:
                continue
            kept = by_id.get(previous)
            if kept is None or kept.external_id != uid or kept.active:
                bad.append(f"{t}: disabled user {source.users[uid]['username']!r} should keep its account "
                           f"{previous} inactive, found {kept.resource if kept else 'none'}")
        # groups: each pushed group once, by its PingOne name, with exactly its in-scope members
        by_name: dict[str, list[TargetGroup]] = {}
        for group in view.groups:
            by_name.setdefault(group.name, []).append(group)
        wanted_names = {name for name, _ in want.groups.values()}
        for name, same in by_name.items():
            if len(same) > 1:
                bad.append(f"{t}: group {name!r} held {len(same)} times")
        for group in view.groups:
            if group.id in strangers.groups:
                if group.name != strangers.groups[group.id]:
                    bad.append(f"{t}: unmanaged group {strangers.groups[group.id]!r} was renamed {group.name!r}")
                continue
            if group.name not in wanted_names:
                bad.append(f"{t}: group {group.name!r} ({group.id}) is not a pushed group of PingOne")
        for stranger_id, name in strangers.groups.items():
            if not any(g.id == stranger_id for g in view.groups):
                bad.append(f"{t}: unmanaged group {name!r} was deleted")
        group_ids: dict[str, str] = {}
        for gid, (name, members) in want.groups.items():
            candidates = [g for g in by_name.get(name, []) if g.id not in strangers.groups]
            if not candidates:
                bad.append(f"{t}: pushed group {name!r} ({gid}) missing")
                continue
            group = candidates[0]
            group_ids[gid] = group.id
            expected = {account_of[uid].id for uid in members if uid in account_of}
            left_alone = {account_of[uid].id for uid in want.skipped if uid in account_of}
            got = [m for m in group.members if m not in left_alone]
            if len(got) != len(set(got)):
                bad.append(f"{t}: group {name!r} lists a member twice: {sorted(got)}")
            if set(got) != expected:
                def label(ids: set[str]) -> list[str]:
                    return sorted(by_id[i].user_name if i in by_id else f"<gone {i}>" for i in ids)
                bad.append(f"{t}: group {name!r} members: missing {label(expected - set(got))}, "
                           f"extra {label(set(got) - expected)}")
            previous = self.group_ids[t].get(gid)
            if previous is not None and previous != group.id and gid not in excuses.groups:
                bad.append(f"{t}: group {name!r} changed id {previous} -> {group.id} (re-created without cause)")
        if commit:
            self.pins[t] = dict(pins)
            self.accounts[t] = {uid: account_of[uid].id for uid in want.valid if uid in account_of}
            self.group_ids[t] = group_ids
        return bad
