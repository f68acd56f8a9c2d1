"""Issue 13: a randomized lifecycle test with an independent oracle.

Hypothesis (stateful) drives seeded random sequences of directory events between cycles: hires,
departures, rehires under a reused username, renames, email and userName changes, enable/disable,
population moves, group deletion and re-creation, nesting changes, membership churn, attribute
changes, restarts of provisiond, and drift made in the targets behind provisiond's back. The
PingOne emulator is changed through its `/_admin` wire routes, the targets' drift through their
SCIM API.

Each step is one interval: its events, then one cycle of the real Engine (daemon/engine.py, a real
SQLite file, real HTTP to the emulators on loopback) over three targets — the `zpa`, `zia` and
`generic` emulator profiles — then `tests/oracle.py` reads PingOne over its API and each target
over SCIM and checks every target against the rules (exact users, attributes, `active`,
memberships, no duplicates, target ids that do not change without cause). Then a quiet cycle (no
event since the last) must send zero writes to any target and leave everything as it was.

Drift is repaired by a full sync (README "How a cycle works"), so the cycle after a drift event
is a full one; other cycles are full when Hypothesis says so.

Hypothesis profiles (tests/conftest.py): `ci` (the default, and with CI=true) runs a bounded,
derandomized number of examples; `long` runs many more:

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_lifecycle.py -p no:cacheprovider

The regression tests at the end replay, as plain tests, sequences that Hypothesis found failing.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from daemon.config import load_config
from daemon.engine import CycleReport, Engine
from daemon.sandbox.directory import Directory
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator
from daemon.sandbox.server import serve
from daemon.store import Store
from tests.oracle import (
    Excuses,
    Http,
    Oracle,
    PingOneReader,
    ScimReader,
    Source,
    Strangers,
    TargetRule,
    TargetView,
)

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
pytestmark = pytest.mark.timeout(0 if LONG else 150)

SECOND_POPULATION = "00000000-0000-4000-8000-0000000000c1"
TARGETS = ("zpa", "zia", "generic")
TOKENS = {"zpa": DEFAULT_TOKEN + "-zpa", "zia": DEFAULT_TOKEN + "-zia", "generic": DEFAULT_TOKEN + "-generic"}
PREFIXES = {"zpa": "/scim/1/216196257331281920/v2", "zia": "/24326813/61233/scim", "generic": "/v2"}

# Pairs of events on one user in one interval that are not drawn until the named bug is fixed
# on main (the regression tests below replay them).
DISABLED_PAIRS: dict[frozenset[str], str] = {}

# The generic target takes duplicate userNames and group displayNames, as some SCIM servers do
# (scim2-server): there, only provisiond keeps an account or a group from being created twice.
OVERRIDES: dict[str, dict[str, Any]] = {"generic": {"group_name_unique": False, "user_name_unique": False}}

# Events that stay in the state machine's vocabulary but are not drawn, each until the named issue
# item is fixed on main (the regression tests below replay what they found). Empty when all pass.
DISABLED_EVENTS: dict[str, str] = {}

GIVEN = ("Ada", "Zoë", "José", "伟", "Grace", "Linus", "Sam", "Ann", "Bob", "Renée")
FAMILY = ("Lovelace", "Müller", "Núñez", "李", "Hopper", "Torvalds", "Smith", "Lee", "Brown", "Østergaard")
DEPARTMENTS = ("Engineering", "Sales", "Legal", "Support")
CONFIGURED_GROUPS = ("All Staff", "ZPA Users", "ZPA Contractors", "ZIA Users", "Sales", "Engineering")

# (username, given, family, department, email?, enabled, second population, groups)
INITIAL_USERS: tuple[tuple[str, int, int, int | None, bool, bool, bool, tuple[str, ...]], ...] = (
    ("ada.lovelace@example.com", 0, 0, 0, True, True, False, ("All Staff", "ZPA Users", "ZIA Users", "Sales")),
    ("zoe.mueller@example.com", 1, 1, 1, True, True, False, ("All Staff", "ZIA Users", "Sales")),
    ("jose.nunez@example.com", 2, 2, 0, True, True, False, ("ZPA Contractors", "Engineering")),
    ("wei.li@example.com", 3, 3, 0, True, True, False, ("ZPA Users", "ZIA Users", "Engineering")),
    ("plainuser", 5, 6, 3, True, True, False, ("All Staff", "ZPA Users", "ZIA Users")),
    ("grace.hopper@example.com", 4, 4, 0, True, False, False, ("All Staff", "ZPA Users", "ZIA Users")),
    ("linus.t@example.com", 5, 5, 0, True, True, True, ("All Staff", "ZPA Users", "Sales")),
    ("sam.smith@example.com", 6, 6, None, False, True, False, ("ZIA Users", "ZPA Contractors", "All Staff")),
    ("ann.lee@example.com", 7, 7, 1, True, True, False, ("Sales",)),
    ("bob.brown@example.com", 8, 8, 2, True, True, False, ("Engineering", "ZIA Users")),
)
NESTING = (("ZPA Contractors", "ZPA Users"), ("Engineering", "All Staff"))


def rules(default_population: str) -> tuple[TargetRule, ...]:
    return (
        TargetRule("zpa", "zpa", scope_groups=("ZPA Users",), groups=("ZPA Users", "ZPA Contractors"),
                   transitive=True),
        TargetRule("zia", "zia", scope_groups=("ZIA Users",), groups=("ZIA Users", "Sales"), transitive=False),
        TargetRule("generic", "generic", scope_groups=("All Staff",), groups=("All Staff", "Sales", "Engineering"),
                   transitive=True, population=default_population, remove_action="delete"),
    )


def config_text(state_path: Path, pingone_url: str, env_id: str, urls: dict[str, str], population: str) -> str:
    def names(items: Iterable[str]) -> str:
        return "[" + ", ".join(f'"{n}"' for n in items) + "]"

    text = f'''
[daemon]
state_path = "{state_path}"
interval = "30s"
full_sync_every = "1h"
log_format = "json"
max_source_shrink = 1.0

[source]
api_url = "{pingone_url}/v1"
auth_url = "{pingone_url}"
environment_id = "{env_id}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = "{DEFAULT_CLIENT_SECRET}"
page_size = 100
'''
    for r in rules(population):
        scope = f"{{ groups = {names(r.scope_groups)}"
        if r.population is not None:
            scope += f", filter = 'population.id eq \"{r.population}\"'"
        scope += " }"
        text += f'''
[[target]]
name = "{r.name}"
profile = "{r.profile}"
base_url = "{urls[r.name]}"
auth = "bearer"
token = "{TOKENS[r.name]}"
requests_per_second = 5000
burst = 5000
concurrency = 8
max_deletes = 1000
remove_action = "{r.remove_action}"
groups = {names(r.groups)}
membership = "{"transitive" if r.transitive else "direct"}"
scope = {scope}
'''
    return text


# -- the world: emulators, engine, oracle -------------------------------------------------------------

@dataclass
class Services:
    pingone_url: str
    urls: dict[str, str]
    emulators: dict[str, ScimEmulator]
    engine: Engine
    logs: list[dict[str, Any]]
    store: Store
    session: aiohttp.ClientSession
    state_path: Path

    async def restart(self) -> None:
        """The daemon stops and starts again: the state file closed and reopened, a new Engine
        (no cache, no links kept in memory)."""
        config = self.engine.config
        await self.store.close()
        self.store = await Store.open(self.state_path)
        self.engine = Engine(config, self.store, self.session, log=collector(self.logs))


def collector(logs: list[dict[str, Any]]) -> Any:
    def collect(_logger: Any, _method: str, event: Any) -> Any:
        logs.append(dict(event))
        raise structlog.DropEvent

    return structlog.wrap_logger(structlog.PrintLogger(), processors=[collect], wrapper_class=structlog.BoundLogger)


@asynccontextmanager
async def services(directory: Directory, state_dir: Path) -> AsyncIterator[Services]:
    pingone = PingOneEmulator(directory, prerender_users=False)
    emulators = {name: ScimEmulator(name, token=TOKENS[name], prefix=PREFIXES[name], **OVERRIDES.get(name, {}))
                 for name in TARGETS}
    for em in emulators.values():
        em.faults.rate_limit_rps = None
    async with serve(pingone.app()) as pingone_url, serve(emulators["zpa"].app()) as zpa, \
            serve(emulators["zia"].app()) as zia, serve(emulators["generic"].app()) as generic:
        urls = {"zpa": zpa + PREFIXES["zpa"], "zia": zia + PREFIXES["zia"], "generic": generic + PREFIXES["generic"]}
        path = state_dir / "provisiond.toml"
        path.write_text(config_text(state_dir / "state.db", pingone_url, directory.env_id, urls,
                                    directory.population_id), encoding="utf-8")
        path.chmod(0o600)
        config = load_config(path)
        logs: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as session:
            store = await Store.open(state_dir / "state.db")
            svc = Services(pingone_url, urls, emulators, Engine(config, store, session, log=collector(logs)), logs,
                           store, session, state_dir / "state.db")
            try:
                yield svc
            finally:
                await svc.store.close()


class World:
    """One run: the emulators and the Engine in a background event loop (a blocking portal), the
    oracle and the event helpers in the calling thread."""

    def __init__(self, *, guard: bool = True) -> None:
        # draw no DISABLED_PAIRS (the replays, and a hunt naming its LIFECYCLE_EVENTS, draw them)
        self.guard = guard and not os.environ.get("LIFECYCLE_EVENTS")
        self.stack = ExitStack()
        self.state_dir = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="lifecycle-")))
        self.portal: BlockingPortal = self.stack.enter_context(start_blocking_portal())
        self.directory = Directory()
        self.directory.populations[SECOND_POPULATION] = {
            "id": SECOND_POPULATION, "environment": {"id": self.directory.env_id}, "name": "Contractors",
            "default": False}
        self.svc: Services = self.stack.enter_context(
            self.portal.wrap_async_context_manager(services(self.directory, self.state_dir)))
        self.http = Http()
        self.pingone = PingOneReader(self.http, self.svc.pingone_url, self.directory.env_id, DEFAULT_CLIENT_ID,
                                     DEFAULT_CLIENT_SECRET)
        self.scim = {name: ScimReader(self.http, self.svc.urls[name], TOKENS[name]) for name in TARGETS}
        self.oracle = Oracle(rules(self.directory.population_id))
        self.strangers = {name: Strangers() for name in TARGETS}
        self.excuses = {name: Excuses() for name in TARGETS}
        self.counter = 0
        self.departed: list[str] = []          # usernames of deleted users, for later reuse
        self.full_pending = False
        self.freed: set[str] = set()           # group names deleted in this interval
        self.touched: dict[str, set[str]] = {}  # user id -> what was done to it in this interval
        self.history: list[str] = []           # what was done, for failure messages
        self.populate()

    def close(self) -> None:
        self.http.close()
        self.stack.close()

    def next(self) -> int:
        self.counter += 1
        return self.counter

    # -- PingOne, through its admin wire routes ------------------------------------------------------

    def admin(self, method: str, path: str, body: Any = None, *, tolerate: Sequence[int] = ()) -> Any:
        status, answer = self.http.call(method, f"{self.svc.pingone_url}/_admin{path}", body)
        if status >= 300 and status not in tolerate:
            raise AssertionError(f"PingOne admin {method} {path}: HTTP {status} {answer}")
        return answer if status < 300 else None

    def hire(self, username: str, given: int, family: int, *, department: int | None, email: str | None,
             enabled: bool = True, second_population: bool = False, groups: Iterable[str] = ()) -> str:
        body: dict[str, Any] = {"username": username, "given": GIVEN[given % len(GIVEN)],
                                "family": FAMILY[family % len(FAMILY)], "enabled": enabled,
                                "populationId": SECOND_POPULATION if second_population else self.directory.population_id}
        if email is not None:
            body["email"] = email
        if department is not None:
            body["department"] = DEPARTMENTS[department % len(DEPARTMENTS)]
        user = self.admin("POST", "/users", body)
        for gid in groups:
            self.admin("POST", f"/groups/{gid}/members", {"userId": user["id"]})
        return str(user["id"])

    def create_group(self, name: str) -> str:
        return str(self.admin("POST", "/groups", {"name": name})["id"])

    def populate(self) -> None:
        ids = {name: self.create_group(name) for name in CONFIGURED_GROUPS}
        for child, parent in NESTING:
            self.admin("POST", f"/groups/{ids[child]}/parents", {"id": ids[parent]})
        for username, given, family, dept, email, enabled, second, groups in INITIAL_USERS:
            self.hire(username, given, family, department=dept, email=username if email else None,
                      enabled=enabled, second_population=second, groups=[ids[g] for g in groups])

    # -- picks (read from the emulator's state; they choose, they never decide what is right) ---------

    def user_ids(self) -> list[str]:
        return list(self.directory.user_order.ids)

    def group_ids(self) -> list[str]:
        return list(self.directory.group_order.ids)

    def pick_user(self, index: int) -> str | None:
        ids = self.user_ids()
        return ids[index % len(ids)] if ids else None

    def pick_group(self, index: int) -> str | None:
        ids = self.group_ids()
        return ids[index % len(ids)] if ids else None

    def allowed(self, uid: str, what: str) -> bool:
        """Record `what` done to the user in this interval, unless it makes a disabled pair."""
        done = self.touched.setdefault(uid, set())
        if self.guard and any(frozenset({what, other}) in DISABLED_PAIRS for other in done):
            return False
        done.add(what)
        return True

    def username(self, uid: str) -> str:
        return str(self.directory.users[uid]["username"])

    def group_name(self, gid: str) -> str:
        return str(self.directory.groups[gid]["name"])

    # -- cycles and checks ----------------------------------------------------------------------------

    def cycle(self, *, full: bool) -> CycleReport:
        engine = self.svc.engine
        daemon = engine.config.daemon
        if full:
            engine.reconfigure(dataclasses.replace(engine.config,
                                                   daemon=dataclasses.replace(daemon, full_sync_every=1e-6)))
        self.svc.logs.clear()
        try:
            report = self.portal.call(engine.cycle)
        finally:
            if full:
                engine.reconfigure(dataclasses.replace(engine.config, daemon=daemon))
        assert report.source_error is None, report.source_error
        return report

    def writes(self) -> dict[str, int]:
        return {name: int(self.http.ok("GET", f"{self.svc.urls[name].split(PREFIXES[name])[0]}/_admin/counters")
                          ["writes"]) for name in TARGETS}

    def views(self) -> dict[str, TargetView]:
        return {name: self.scim[name].read() for name in TARGETS}

    def failures(self) -> list[str]:
        return [f"{e.get('target')}: {e.get('event')} {e.get('user') or e.get('group')} "
                f"{e.get('http_status')} {e.get('error') or e.get('reason')}"
                for e in self.svc.logs if e.get("outcome") == "failed" or e.get("level") == "error"
                or str(e.get("event", "")).endswith("_failed")]

    def check(self, label: str) -> tuple[Source, dict[str, TargetView]]:
        source = self.pingone.read()
        views = self.views()
        problems: list[str] = []
        for name in TARGETS:
            problems += self.oracle.check(name, source, views[name], strangers=self.strangers[name],
                                          excuses=self.excuses[name])
            self.excuses[name].clear()
        if problems:
            raise AssertionError(self.explain(label, problems))
        return source, views

    def explain(self, label: str, problems: list[str]) -> str:
        lines = [f"after {label}:", *(f"  {p}" for p in problems)]
        failures = self.failures()
        if failures:
            lines += ["operations that failed in that cycle:", *(f"  {f}" for f in failures[:20])]
        lines += ["events so far:", *(f"  {h}" for h in self.history[-30:])]
        return "\n".join(lines)

    def start(self) -> None:
        self.cycle(full=True)
        self.check("the first cycle")
        self.quiet()

    def quiet(self, *, full: bool = False) -> None:
        before = self.writes()
        self.cycle(full=full)
        after = self.writes()
        sent = {name: after[name] - before[name] for name in TARGETS if after[name] != before[name]}
        if sent:
            requests = {name: [f"{r['method']} {r['path']} {r['body']}" for r in self.svc.emulators[name].request_log
                               if r["method"] != "GET" and not r["path"].endswith(".search")][-10:]
                        for name in sent}
            problems = [f"writes sent with nothing changed: {sent}",
                        *(f"{n}: {r}" for n, rs in requests.items() for r in rs)]
            raise AssertionError(self.explain(f"a quiet cycle{' (full)' if full else ''}", problems))
        self.check("a quiet cycle")

    def interval(self, events: Sequence[Event], *, full: bool) -> None:
        """Apply the events, run one cycle (full when asked or after drift), check; then a quiet one
        (full when asked: a full sync of a target in step must find nothing to repair either)."""
        self.freed.clear()
        self.touched.clear()
        done = [event.apply(self) for event in events]
        self.history.append(f"interval(full={full or self.full_pending}): " + "; ".join(d for d in done if d))
        cycle_full = full or self.full_pending
        self.full_pending = False
        self.cycle(full=cycle_full)
        self.check("a cycle" + (" (full)" if cycle_full else ""))
        self.quiet(full=full)

    # -- target drift, through the SCIM API ------------------------------------------------------------

    def scim_call(self, target: str, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.http.call(method, f"{self.svc.urls[target]}{path}", body, {
            "Authorization": f"Bearer {TOKENS[target]}", "Content-Type": "application/scim+json"})
        assert status < 300, f"drift {method} {path} on {target}: HTTP {status} {answer}"
        return status, answer


# -- events -------------------------------------------------------------------------------------------

class Event:
    kind: ClassVar[str] = ""

    def apply(self, w: World) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Hire(Event):
    given: int
    family: int
    groups: tuple[int, ...]
    enabled: bool = True
    second_population: bool = False
    plain: bool = False
    department: int | None = None
    email: bool = True
    reuse: bool = False          # take the username of a departed user, if any
    stranger: bool = False       # take the userName of an account made behind provisiond's back, if any
    kind: ClassVar[str] = "hire"

    def apply(self, w: World) -> str:
        k = w.next()
        names = sorted({str(m["userName"]) for t in TARGETS for m in w.strangers[t].users.values()})
        names = [n for n in names if n.lower() not in {str(u["username"]).lower() for u in w.directory.users.values()}]
        if self.stranger and names:
            username = names[self.given % len(names)]
        elif self.reuse and w.departed:
            username = w.departed.pop(self.given % len(w.departed))
            try:
                w.directory.user_by_username(username)
                username = f"hire{k}@example.com"     # taken again meanwhile
            except KeyError:
                pass
        else:
            username = f"hire{k}" if self.plain else f"hire{k}@example.com"
        gids = sorted({g for g in (w.pick_group(i) for i in self.groups) if g is not None})
        email = (username if "@" in username else f"{username}@example.com") if self.email else None
        uid = w.hire(username, self.given, self.family, department=self.department, email=email,
                     enabled=self.enabled, second_population=self.second_population, groups=gids)
        if self.reuse:
            w.allowed(uid, "rehire")
        return (f"hire {username} into {[w.group_name(g) for g in gids]}" + ("" if self.enabled else " disabled")
                + (" (2nd population)" if self.second_population else ""))


@dataclass(frozen=True)
class Delete(Event):
    user: int
    kind: ClassVar[str] = "delete"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        name = w.username(uid)
        w.admin("DELETE", f"/users/{uid}")
        w.departed.append(name)
        return f"delete {name}"


@dataclass(frozen=True)
class Rehire(Event):
    """A user leaves and a new PingOne user gets the same username in the same interval."""

    user: int
    same_groups: bool = True
    groups: tuple[int, ...] = ()
    kind: ClassVar[str] = "rehire"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        old = w.directory.users[uid]
        name = str(old["username"])
        gids = sorted(w.directory.static_group_ids(uid)) if self.same_groups else \
            sorted({g for g in (w.pick_group(i) for i in self.groups) if g is not None})
        w.admin("DELETE", f"/users/{uid}")
        new = w.hire(name, self.user + 1, self.user + 2, department=self.user, email=name if "@" in name else None,
                     groups=gids)
        w.allowed(new, "rehire")
        return f"rehire {name} (new PingOne user) into {[w.group_name(g) for g in gids]}"


@dataclass(frozen=True)
class Rename(Event):
    user: int
    given: int
    family: int
    kind: ClassVar[str] = "rename"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        w.admin("PATCH", f"/users/{uid}", {"name": {"given": GIVEN[self.given % len(GIVEN)],
                                                     "family": FAMILY[self.family % len(FAMILY)]}})
        return f"rename {w.username(uid)} to {GIVEN[self.given % len(GIVEN)]} {FAMILY[self.family % len(FAMILY)]}"


@dataclass(frozen=True)
class ChangeEmail(Event):
    user: int
    remove: bool = False
    kind: ClassVar[str] = "email"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        email = None if self.remove else f"mail{w.next()}@example.com"
        w.admin("PATCH", f"/users/{uid}", {"email": email})
        return f"email of {w.username(uid)} -> {email}"


@dataclass(frozen=True)
class ChangeUsername(Event):
    user: int
    how: str = "new"             # new | case | plain
    kind: ClassVar[str] = "username"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        if not w.allowed(uid, "username_case" if self.how == "case" else "username"):
            return ""
        old = w.username(uid)
        if self.how == "case":
            new = old.upper() if old != old.upper() else old.lower()
        elif self.how == "plain":
            new = f"plain{w.next()}"
        else:
            new = f"renamed{w.next()}@example.com"
        w.admin("PATCH", f"/users/{uid}", {"username": new})
        for name in TARGETS:
            if name == "zpa":     # ZPA may apply a userName change as a new account (DESIGN.md)
                w.excuses[name].accounts.add(uid)
        return f"username {old} -> {new}"


@dataclass(frozen=True)
class SetEnabled(Event):
    user: int
    enabled: bool
    kind: ClassVar[str] = "enable"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None or not w.allowed(uid, "enable" if self.enabled else "disable"):
            return ""
        w.admin("PUT", f"/users/{uid}/enabled", {"enabled": self.enabled})
        return f"{'enable' if self.enabled else 'disable'} {w.username(uid)}"


@dataclass(frozen=True)
class MovePopulation(Event):
    user: int
    kind: ClassVar[str] = "population"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        current = w.directory.users[uid]["population"]["id"]
        new = w.directory.population_id if current == SECOND_POPULATION else SECOND_POPULATION
        w.admin("PATCH", f"/users/{uid}", {"population": {"id": new}})
        return f"move {w.username(uid)} to population {'2' if new == SECOND_POPULATION else 'default'}"


@dataclass(frozen=True)
class SetDepartment(Event):
    user: int
    department: int | None
    kind: ClassVar[str] = "department"

    def apply(self, w: World) -> str:
        uid = w.pick_user(self.user)
        if uid is None:
            return ""
        value = None if self.department is None else DEPARTMENTS[self.department % len(DEPARTMENTS)]
        w.admin("PATCH", f"/users/{uid}", {"department": value})
        return f"department of {w.username(uid)} -> {value}"


@dataclass(frozen=True)
class Join(Event):
    group: int
    user: int
    kind: ClassVar[str] = "join"

    def apply(self, w: World) -> str:
        gid, uid = w.pick_group(self.group), w.pick_user(self.user)
        if gid is None or uid is None:
            return ""
        w.admin("POST", f"/groups/{gid}/members", {"userId": uid})
        return f"{w.username(uid)} joins {w.group_name(gid)}"


@dataclass(frozen=True)
class Leave(Event):
    group: int
    member: int
    kind: ClassVar[str] = "leave"

    def apply(self, w: World) -> str:
        gid = w.pick_group(self.group)
        if gid is None:
            return ""
        members = [u for u in w.user_ids() if u in w.directory.static_member_ids(gid)]
        if not members:
            return ""
        uid = members[self.member % len(members)]
        w.admin("DELETE", f"/groups/{gid}/members/{uid}")
        return f"{w.username(uid)} leaves {w.group_name(gid)}"


@dataclass(frozen=True)
class Nest(Event):
    child: int
    parent: int
    kind: ClassVar[str] = "nest"

    def apply(self, w: World) -> str:
        child, parent = w.pick_group(self.child), w.pick_group(self.parent)
        if child is None or parent is None or child == parent:
            return ""
        if w.admin("POST", f"/groups/{child}/parents", {"id": parent}, tolerate=(400,)) is None and \
                parent not in w.directory.parents.get(child, set()):
            return ""        # it would make a cycle
        return f"nest {w.group_name(child)} in {w.group_name(parent)}"


@dataclass(frozen=True)
class Unnest(Event):
    edge: int
    kind: ClassVar[str] = "unnest"

    def apply(self, w: World) -> str:
        edges = [(c, p) for c in w.group_ids() for p in w.group_ids() if p in w.directory.parents.get(c, set())]
        if not edges:
            return ""
        child, parent = edges[self.edge % len(edges)]
        w.admin("DELETE", f"/groups/{child}/parents/{parent}")
        return f"unnest {w.group_name(child)} from {w.group_name(parent)}"


@dataclass(frozen=True)
class RenameGroup(Event):
    group: int
    kind: ClassVar[str] = "rename_group"

    def apply(self, w: World) -> str:
        gid = w.pick_group(self.group)
        if gid is None:
            return ""
        old = w.group_name(gid)
        new = f"Renamed {w.next()}"
        w.admin("PATCH", f"/groups/{gid}", {"name": new})
        return f"rename group {old} -> {new}"


@dataclass(frozen=True)
class DeleteGroup(Event):
    group: int
    kind: ClassVar[str] = "delete_group"

    def apply(self, w: World) -> str:
        gid = w.pick_group(self.group)
        if gid is None:
            return ""
        name = w.group_name(gid)
        w.admin("DELETE", f"/groups/{gid}")
        w.freed.add(name)
        return f"delete group {name}"


@dataclass(frozen=True)
class RecreateGroup(Event):
    """A group is deleted and a new one is created under its name in the same interval."""

    group: int
    same_members: bool = True
    members: tuple[int, ...] = ()
    kind: ClassVar[str] = "recreate_group"

    def apply(self, w: World) -> str:
        gid = w.pick_group(self.group)
        if gid is None:
            return ""
        name = w.group_name(gid)
        if self.same_members:
            members = sorted(w.directory.static_member_ids(gid))
        else:
            members = sorted({u for u in (w.pick_user(i) for i in self.members) if u is not None})
        parents = sorted(w.directory.parents.get(gid, set()))
        w.admin("DELETE", f"/groups/{gid}")
        new = w.create_group(name)
        for uid in members:
            w.admin("POST", f"/groups/{new}/members", {"userId": uid})
        for parent in parents:
            w.admin("POST", f"/groups/{new}/parents", {"id": parent})
        return f"re-create group {name} with {[w.username(u) for u in members]}"


@dataclass(frozen=True)
class CreateGroup(Event):
    """A configured group name that is free again gets a new group (else a new team)."""

    name: int
    members: tuple[int, ...] = ()
    kind: ClassVar[str] = "create_group"

    def apply(self, w: World) -> str:
        taken = {g["name"] for g in w.directory.groups.values()}
        # a name freed in this same interval is a re-creation: the recreate_group event's
        free = [n for n in CONFIGURED_GROUPS if n not in taken and n not in w.freed]
        name = free[self.name % len(free)] if free else f"Team {w.next()}"
        gid = w.create_group(name)
        members = sorted({u for u in (w.pick_user(i) for i in self.members) if u is not None})
        for uid in members:
            w.admin("POST", f"/groups/{gid}/members", {"userId": uid})
        return f"create group {name} with {[w.username(u) for u in members]}"


@dataclass(frozen=True)
class Restart(Event):
    """provisiond is restarted before the next cycle (state file reopened, nothing kept in memory)."""

    kind: ClassVar[str] = "restart"

    def apply(self, w: World) -> str:
        w.portal.call(w.svc.restart)
        return "restart provisiond"


DRIFTS = ("attribute", "deactivate", "delete", "rename_group", "delete_group", "drop_member", "stranger",
          "stranger_group")


@dataclass(frozen=True)
class Drift(Event):
    """A change made in a target behind provisiond's back (repaired by the next full sync)."""

    target: int
    how: str
    pick: int
    user_name: str = ""          # the account to pick (regression tests); else `pick` chooses
    kind: ClassVar[str] = "drift"

    def apply(self, w: World) -> str:
        target = TARGETS[self.target % len(TARGETS)]
        view = w.scim[target].read()
        strangers = w.strangers[target]
        accounts = [a for a in view.accounts if a.id not in strangers.users and a.external_id]
        groups = [g for g in view.groups if g.id not in strangers.groups]
        w.full_pending = True
        k = w.next()
        if self.how == "stranger":
            status, made = w.scim_call(target, "POST", "/Users", {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": f"stranger{k}@example.com",
                "displayName": f"Stranger {k}", "active": True})
            assert status == 201, made
            strangers.users[str(made["id"])] = made
            return f"{target}: unmanaged user stranger{k}@example.com made in the target"
        if self.how == "stranger_group":
            status, made = w.scim_call(target, "POST", "/Groups", {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": f"Stranger group {k}",
                "members": []})
            assert status == 201, made
            strangers.groups[str(made["id"])] = f"Stranger group {k}"
            return f"{target}: unmanaged group Stranger group {k} made in the target"
        if self.how in ("attribute", "deactivate", "delete"):
            if not accounts:
                return ""
            named = [a for a in accounts if a.user_name == self.user_name]
            account = named[0] if named else accounts[self.pick % len(accounts)]
            if self.how == "attribute":
                w.scim_call(target, "PATCH", f"/Users/{account.id}", {
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                    "Operations": [{"op": "replace", "path": "displayName", "value": f"Drifted {k}"}]})
            elif self.how == "deactivate":
                if not account.active:
                    return ""
                w.scim_call(target, "PATCH", f"/Users/{account.id}", {
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                    "Operations": [{"op": "replace", "path": "active", "value": False}]})
                if target == "zpa":   # active=false deletes there: a new account is the repair
                    w.excuses[target].accounts.add(str(account.external_id))
            else:
                w.scim_call(target, "DELETE", f"/Users/{account.id}")
                w.excuses[target].accounts.add(str(account.external_id))
            return f"{target}: {self.how} account {account.user_name}"
        if not groups:
            return ""
        group = groups[self.pick % len(groups)]
        if self.how == "rename_group":
            w.scim_call(target, "PATCH", f"/Groups/{group.id}", {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "path": "displayName", "value": f"Drifted group {k}"}]})
        elif self.how == "delete_group":
            w.scim_call(target, "DELETE", f"/Groups/{group.id}")
            pins = w.oracle.group_ids[target]
            w.excuses[target].groups.update(gid for gid, tid in pins.items() if tid == group.id)
        else:
            # ZPA's GET /Groups/{id} is not relied on for members (UNCONFIRMED there), so provisiond
            # cannot see a member dropped behind its back on ZPA: no member drift there.
            if target == "zpa" or not group.members:
                return ""
            member = sorted(group.members)[self.pick % len(group.members)]
            w.scim_call(target, "PATCH", f"/Groups/{group.id}", {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "remove", "path": f'members[value eq "{member}"]'}]})
        return f"{target}: {self.how} {group.name}"


# -- strategies ---------------------------------------------------------------------------------------

PICK = st.integers(0, 40)
PICKS = st.lists(PICK, max_size=4).map(tuple)
EVENTS: dict[str, st.SearchStrategy[Event]] = {
    "hire": st.builds(Hire, given=PICK, family=PICK, groups=PICKS, enabled=st.booleans(),
                      second_population=st.booleans(), plain=st.booleans(),
                      department=st.none() | st.integers(0, 3), email=st.booleans()),
    # a new PingOne user takes the username of one deleted earlier (a rehire, intervals apart)
    "reuse_username": st.builds(Hire, given=PICK, family=PICK, groups=PICKS, enabled=st.booleans(),
                                department=st.none() | st.integers(0, 3), reuse=st.just(True)),
    # a new PingOne user takes the userName of an account made in a target behind provisiond's back
    "adopt": st.builds(Hire, given=PICK, family=PICK, groups=PICKS, enabled=st.booleans(),
                       department=st.none() | st.integers(0, 3), stranger=st.just(True)),
    "delete": st.builds(Delete, user=PICK),
    "rehire": st.builds(Rehire, user=PICK, same_groups=st.booleans(), groups=PICKS),
    "rename": st.builds(Rename, user=PICK, given=PICK, family=PICK),
    "email": st.builds(ChangeEmail, user=PICK, remove=st.booleans()),
    "username": st.builds(ChangeUsername, user=PICK, how=st.sampled_from(("new", "case", "plain"))),
    "enable": st.builds(SetEnabled, user=PICK, enabled=st.booleans()),
    "population": st.builds(MovePopulation, user=PICK),
    "department": st.builds(SetDepartment, user=PICK, department=st.none() | st.integers(0, 3)),
    "join": st.builds(Join, group=PICK, user=PICK),
    "leave": st.builds(Leave, group=PICK, member=PICK),
    "nest": st.builds(Nest, child=PICK, parent=PICK),
    "unnest": st.builds(Unnest, edge=PICK),
    "rename_group": st.builds(RenameGroup, group=PICK),
    "delete_group": st.builds(DeleteGroup, group=PICK),
    "recreate_group": st.builds(RecreateGroup, group=PICK, same_members=st.booleans(), members=PICKS),
    "create_group": st.builds(CreateGroup, name=PICK, members=PICKS),
    "restart": st.builds(Restart),
    "drift": st.builds(Drift, target=st.integers(0, 2), how=st.sampled_from(DRIFTS), pick=PICK),
}
# LIFECYCLE_EVENTS=kind,kind,... draws only those kinds, disabled kinds and pairs too (a local bug hunt).
KINDS = (tuple(k for k in os.environ["LIFECYCLE_EVENTS"].split(",") if k in EVENTS)
         if os.environ.get("LIFECYCLE_EVENTS") else tuple(k for k in EVENTS if k not in DISABLED_EVENTS))
EVENT = st.one_of(*(EVENTS[kind] for kind in KINDS))


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.world.start()

    @rule(events=st.lists(EVENT, min_size=1, max_size=4), full=st.booleans())
    def interval(self, events: list[Event], full: bool) -> None:
        self.world.interval(events, full=full)

    def teardown(self) -> None:
        self.world.close()


def test_lifecycle_against_the_oracle() -> None:
    run_state_machine_as_test(Lifecycle, settings=settings())


# -- regression tests: sequences Hypothesis found ---------------------------------------------------------

def replay(*intervals: Sequence[Event] | tuple[Sequence[Event], bool]) -> None:
    """Run these intervals (events, or (events, full)) through the same world and checks."""
    world = World(guard=False)
    try:
        world.start()
        for interval in intervals:
            events, full = interval if isinstance(interval, tuple) else (interval, False)
            world.interval(events, full=full)
    finally:
        world.close()


def test_a_quiet_run_converges_and_stays_quiet() -> None:
    replay([], ([], True))


# Bugs of issue 13 that Hypothesis found on main (2026-11-29), fixed since (items 1, 2, 3). Each is
# the minimal sequence.


def test_rehire_in_one_interval() -> None:
    """Ada leaves and a new PingOne user gets her username before the next cycle: every target
    must hold one active account for it, linked to the new user (found: ZPA and generic delete
    it, ZIA disables it, in the same cycle that adopted it)."""
    replay([Rehire(user=0)])


def test_rehire_a_cycle_later_survives_the_full_sync() -> None:
    """Ada leaves (ZIA disables her account); a cycle later a new user gets her username and
    adopts the account; the next full sync must not disable it again for the departed link."""
    replay([Delete(user=0)], [Hire(0, 0, groups=(3,), reuse=True)], ([], True))


def test_pushed_group_recreated_under_its_name() -> None:
    """Sales (pushed to ZIA and generic) is deleted and re-created with the same members."""
    replay([RecreateGroup(group=4)])


def test_scope_group_recreated_empty_under_its_name() -> None:
    """All Staff (generic's scope group) is deleted and re-created empty: everyone leaves
    generic's scope, and the new, empty All Staff must exist there once (found missing while
    generic refused duplicate group names; it now takes them, as scim2-server does)."""
    replay([RecreateGroup(group=0, same_members=False)])


def test_reenable_with_a_changed_department() -> None:
    """Ada is disabled; in the next interval she is re-enabled with a new department: one cycle
    later her ZIA and generic accounts must be active with the new department (found: the update
    PATCH carried the stale `active: false` and she stayed disabled)."""
    replay([SetEnabled(user=0, enabled=False)], [SetEnabled(user=0, enabled=True), SetDepartment(user=0, department=None)])


def test_full_sync_reactivates_a_drifted_account_with_a_changed_email() -> None:
    """Ada's generic account is deactivated behind provisiond's back while her email is removed in
    PingOne: the full sync must leave it active without the email (found: inactive, the repair's
    enable and update raced as in item 3)."""
    replay(([Drift(target=2, how="deactivate", pick=0, user_name="ada.lovelace@example.com"),
             ChangeEmail(user=0, remove=True)], True))


# Found by this test: on ZPA a userName change (applied as a recreate, item 10) in the same interval
# as a disable created the new account active (the disable went to the old account's id). The
# disable now goes to the object the user's link holds when it is sent.


@pytest.mark.parametrize("how", ["new", "case"])
def test_zpa_username_change_of_a_user_disabled_in_the_same_interval(how: str) -> None:
    """Ada is disabled and her userName changes before the next cycle: ZPA (where inactive means
    deleted) must hold no active account for her (found: an active account under the new name)."""
    replay([SetEnabled(user=0, enabled=False), ChangeUsername(user=0, how=how)])


# Found by this test: on ZPA (userName immutable) a rehire whose new username differed in case
# only adopted the departed user's account, could not rename it, and left it active for the
# departed. The takeover now goes through the recreate path of a refused userName change.


def test_zpa_rehire_under_the_username_in_another_case() -> None:
    """Ada leaves; a new PingOne user gets her username in capitals in the same interval: ZPA must
    hold one active account, `ADA.LOVELACE@EXAMPLE.COM`, linked to the new user (found: the 409
    adoption's userName PATCH is refused, the new user has no account and the departed user's
    account stays active)."""
    replay([Rehire(user=0), ChangeUsername(user=9, how="case")])
