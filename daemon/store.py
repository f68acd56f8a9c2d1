"""The state file: one SQLite database (WAL), opened through aiosqlite.

Tables (schema version in `PRAGMA user_version`, migrated forward on open):

    meta            key/value: last good snapshot size, ...
    source_user     latest snapshot of PingOne users: id, username, hash, updated_at, data (JSON)
    source_group    latest snapshot of groups: id, name, hash, members (JSON list of direct user ids)
    target_object   per target: the link from a source id to the target object provisiond created or
                    adopted, and what it last applied (attributes, active, members)
    cycle           per target: one row per cycle with its outcome and summary
    operation       the plan of each cycle, one row per operation, with its outcome
    approval        operator approvals of held removals, consumed by the next cycle
    change_seen     the change feed's activity ids handed on; change_inbox: webhook batches (v3)
    change_event    the last change-feed event seen per user and what became of it (v5, `why`)

Writes to one entity are serialised across processes (the daemon, `sync-user`, `sync-group`):
an operation's `in_flight` mark is its claim on the entity (`mark_in_flight`), taken in the same
single statement only when no other live process has an operation on that entity in flight (nor,
with `since`, recorded one after the plan's links were read); `cycle.owner` names the process
(`pid:start time`), so a crashed one's claims never block (`owner_alive`).

The file is created 0600 and its WAL companions inherit a 077 umask. Writes go in batches
inside one transaction each. Secrets are never written here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from daemon.links import Actual, GroupLink, Op, UserLink
from daemon.lock import lock_holder
from daemon.mapping import Desired, DesiredGroup, DesiredUser, content_hash
from daemon.model import UNCHANGED, Members, Snapshot, shared

SCHEMA_VERSION = 5
CYCLE_KIND = "cycle"          # cycle.kind of the daemon's own cycles (sync-user writes its own)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS source_user (
    id TEXT PRIMARY KEY, username TEXT, hash TEXT NOT NULL, updated_at TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS source_user_username ON source_user(username COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS source_group (
    id TEXT PRIMARY KEY, name TEXT, hash TEXT NOT NULL, members TEXT NOT NULL, parents TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS target_object (
    target TEXT NOT NULL, kind TEXT NOT NULL, source_id TEXT NOT NULL, target_id TEXT NOT NULL,
    name TEXT NOT NULL, attrs TEXT NOT NULL DEFAULT '{}', active INTEGER NOT NULL DEFAULT 1,
    members TEXT NOT NULL DEFAULT '[]', foreign_members TEXT NOT NULL DEFAULT '[]',
    origin TEXT NOT NULL DEFAULT 'created', disabled_reason TEXT, disabled_at REAL,
    last_synced REAL NOT NULL,
    PRIMARY KEY (target, kind, source_id));
CREATE INDEX IF NOT EXISTS target_object_name ON target_object(target, kind, name COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS cycle (
    id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, started REAL NOT NULL, finished REAL,
    full_sync INTEGER NOT NULL DEFAULT 0, outcome TEXT NOT NULL DEFAULT 'running',
    summary TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS cycle_target ON cycle(target, id);
CREATE TABLE IF NOT EXISTS operation (
    cycle_id INTEGER NOT NULL, seq INTEGER NOT NULL, target TEXT NOT NULL, kind TEXT NOT NULL,
    op TEXT NOT NULL, source_id TEXT NOT NULL, target_id TEXT, name TEXT NOT NULL,
    payload TEXT NOT NULL, reason TEXT NOT NULL, status TEXT NOT NULL, skip_reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, http_status INTEGER, error TEXT, scim_type TEXT,
    started REAL, finished REAL,
    PRIMARY KEY (cycle_id, seq));
CREATE INDEX IF NOT EXISTS operation_status ON operation(target, status);
CREATE INDEX IF NOT EXISTS operation_source ON operation(target, source_id);
CREATE TABLE IF NOT EXISTS approval (target TEXT PRIMARY KEY, granted REAL NOT NULL);
"""
# v3: the change feed (daemon/source/changes.py). `change_seen` holds the activity ids already
# handed on (de-duplication across overlapping polls and webhook deliveries), `change_inbox` the
# webhook batches stored before their 2xx and not yet consumed; the watermark is meta
# `change_watermark`.
_CHANGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS change_seen (id TEXT PRIMARY KEY, recorded_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS change_seen_recorded ON change_seen(recorded_at);
CREATE TABLE IF NOT EXISTS change_inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, received REAL NOT NULL, body TEXT NOT NULL);
"""

# v4: claims across processes. `cycle.owner` is the process that runs the cycle (`pid:start`,
# `process_identity`); `operation.recorded` is when its outcome was written (after its links).
_CLAIMS_MIGRATION = (
    "ALTER TABLE cycle ADD COLUMN owner TEXT",
    "ALTER TABLE operation ADD COLUMN recorded REAL",
)
# v5: the last change-feed event seen per user, for `provisiond why` (daemon/source/changes.py
# writes it: `pending` when polled, `applied` with the incremental cycle of each target that
# carried it when the batch is committed, `covered` when a full snapshot began after it, or
# `skipped` with the reason).
_CHANGE_EVENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS change_event (
    user_id TEXT PRIMARY KEY, activity_id TEXT NOT NULL, action TEXT NOT NULL,
    recorded_at TEXT NOT NULL, seen REAL NOT NULL, status TEXT NOT NULL, detail TEXT,
    applied REAL, cycles TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS change_event_seen ON change_event(seen);
"""

BATCH = 1000
SQL_IN_BATCH = 500           # ids per `IN (...)`: under SQLite's 999 host parameters of old builds


class StoreError(Exception):
    """The state file cannot be opened or used."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one operation, as the applier reports it."""

    seq: int
    status: str                      # applied | failed | skipped
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None
    scim_type: str | None = None
    target_id: str | None = None
    started: float | None = None
    finished: float | None = None
    skip_reason: str | None = None


@dataclass(frozen=True, slots=True)
class MalformedRow:
    """A `target_object` row `load_links` could not read: what is known of it, and why."""

    kind: str
    source_id: str | None
    target_id: str | None
    name: str | None
    error: str
    origin: str | None = None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _loads_object(text: Any) -> dict[str, Any]:
    """A stored JSON object; {} for a malformed one (its operation is superseded and re-planned)."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


# A content hash: `mapping.content_hash` gives 64-bit ints (held in memory per user, written as 16
# hex digits); any other string written before is kept as it is (and simply never matches again).
Digest = int | str


def _hash_text(digest: Digest) -> str:
    return format(digest, "016x") if isinstance(digest, int) else digest


def _hash_value(text: str) -> Digest:
    if len(text) == 16:
        try:
            return int(text, 16)
        except ValueError:
            pass
    return text


def _refuse_beside_daemon(path: str) -> None:
    """A missing state file whose lock a daemon holds was deleted or moved under that daemon: a
    second, empty state file there would hide it and split the state. StoreError instead."""
    if path == ":memory:" or Path(path).exists():
        return
    holder = lock_holder(path)
    if holder is not None and holder != os.getpid():
        raise StoreError(f"{path} does not exist, but provisiond (pid {holder or 'unknown'}) holds its lock: "
                         "the state file was deleted or moved under the running daemon; restart that daemon "
                         "rather than create an empty one")


def _create_private(path: str) -> None:
    """Create a missing state file 0600 (the umask is the caller's). An existing one is not
    opened: closing any descriptor of the file drops every POSIX lock this process holds on it,
    SQLite's included; another Store on it in this process would then look closed to the other
    processes, and the last of those to close would checkpoint and remove the WAL under it."""
    if path == ":memory:" or path.startswith("file:") or Path(path).exists():
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a state file; None for an in-memory database or a missing file."""
    if path == ":memory:" or path.startswith("file:"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot, /proc/PID/stat field 22): with
    the pid, it names the process even after the pid is reused. None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()     # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def process_identity(pid: int | None = None) -> str:
    """`pid:start` of this (or that) process: the owner written on its cycles (`cycle.owner`)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or '?'}"


def owner_alive(owner: str | None) -> bool:
    """Is the process that wrote this `cycle.owner` still running? A pid that is gone, or that now
    names a process started at another time (reused), is not; nor is an unreadable owner."""
    if not owner:
        return False
    pid_text, _, start = owner.partition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                    # alive, another user's
    now = _start_time(pid)
    return start in ("?", "") or now is None or now == start


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a claim on an entity that this apply wanted to write (`mark_in_flight`)."""

    owner: str
    cycle_id: int
    kind: str                  # the holder's cycle kind: cycle | incremental | sync-user | sync-group
    state: str                 # in_flight: its write is under way; written: it wrote since this plan

    def text(self) -> str:
        pid = self.owner.partition(":")[0]
        return f"pid {pid} ({self.kind} {self.cycle_id}, {self.state.replace('_', ' ')})"


_UPSERT_LINK = (
    "INSERT OR REPLACE INTO target_object(target, kind, source_id, target_id, name, attrs, active, members, "
    "foreign_members, origin, disabled_reason, disabled_at, last_synced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _group_source_row(snapshot: Snapshot, gid: str, group: Mapping[str, Any]) -> tuple[Digest, tuple[Any, ...]]:
    """A group's `source_group` row and its hash (name, direct members, parents)."""
    members = _dumps(sorted(snapshot.members.get(gid, ())))
    parents = _dumps(sorted(snapshot.parents.get(gid, ())))
    digest = content_hash((group.get("name"), members, parents))
    return digest, (gid, group.get("name"), _hash_text(digest), members, parents)


def _user_row(target: str, u: UserLink, now: float) -> tuple[Any, ...]:
    return (target, "user", u.source_id, u.target_id, u.user_name, _dumps(dict(u.attrs)), int(u.active),
            "[]", "[]", u.origin, u.disabled_reason, u.disabled_at, now)


def _group_row(target: str, g: GroupLink, now: float) -> tuple[Any, ...]:
    return (target, "group", g.source_id, g.target_id, g.display_name, "{}", 1, _dumps(sorted(g.members)),
            _dumps(sorted(g.foreign)), g.origin, None, None, now)


class Store:
    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        # One connection serves every target's tasks: writes take turns, so that one
        # target's transaction never swallows (or rolls back) another's statements.
        self._write_lock = anyio.Lock()
        self._identity = _file_identity(path)     # (device, inode) of the file opened
        self.owner = process_identity()           # written on the cycles this process runs
        self._dead_owners: set[str] = set()       # owners found gone: their claims never block
        # source_group hashes as written (a few thousand at most). The users' are not kept: at
        # 1,000,000 users that map would be ~80 MB, for what the engine's mapping caches already know.
        self._group_hashes: dict[str, Digest] | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Store:
        path = str(path)
        parent = Path(path).parent
        if not parent.is_dir():
            raise StoreError(f"{path}: the directory {parent} does not exist")
        _refuse_beside_daemon(path)
        old_umask = os.umask(0o077)
        try:
            _create_private(path)
            db = await aiosqlite.connect(path, isolation_level=None)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA foreign_keys=ON")
            store = cls(db, path)
            await store._migrate()
        except Exception as exc:
            await db.close()
            raise StoreError(f"{path}: {exc}") from exc
        return store

    async def close(self) -> None:
        await self.db.close()

    def file_problem(self) -> str | None:
        """None while `path` is still the file this store opened; else what happened to it
        (deleted, or replaced by another file): what is written now would be lost at restart."""
        if self._identity is None:
            return None
        now = _file_identity(self.path)
        if now is None:
            return f"{self.path} was deleted under the running daemon"
        if now != self._identity:
            return f"{self.path} was replaced by another file under the running daemon"
        return None

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"schema version {version} is newer than this provisiond ({SCHEMA_VERSION})")
        if version < 1:
            await self.db.executescript(_SCHEMA)
        if version < 2:
            # v2: cycles say who ran them, so that `status` and the gates read the daemon's own.
            async with self.db.execute("PRAGMA table_info(cycle)") as cur:
                columns = {str(r[1]) async for r in cur}
            if "kind" not in columns:
                await self.db.execute(f"ALTER TABLE cycle ADD COLUMN kind TEXT NOT NULL DEFAULT '{CYCLE_KIND}'")
            await self.db.execute(
                "UPDATE cycle SET kind=json_extract(summary, '$.kind') WHERE json_extract(summary, '$.kind') "
                "IS NOT NULL")
            await self.db.execute("CREATE INDEX IF NOT EXISTS cycle_kind ON cycle(target, kind, id)")
        if version < 3:
            await self.db.executescript(_CHANGES_SCHEMA)
        if version < 4:
            for table, column, statement in zip(("cycle", "operation"), ("owner", "recorded"), _CLAIMS_MIGRATION,
                                                strict=True):
                async with self.db.execute(f"PRAGMA table_info({table})") as cur:
                    columns = {str(r[1]) async for r in cur}
                if column not in columns:
                    await self.db.execute(statement)
        if version < 5:
            await self.db.executescript(_CHANGE_EVENT_SCHEMA)
        await self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.db.execute("ROLLBACK")
                raise
            with anyio.CancelScope(shield=True):
                await self.db.execute("COMMIT")

    async def _write(self, sql: str, args: tuple[Any, ...] = ()) -> aiosqlite.Cursor:
        async with self._write_lock:
            return await self.db.execute(sql, args)

    # -- meta ---------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        async with self.db.execute("SELECT value FROM meta WHERE key=?", (key,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._write("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    async def delete_meta(self, *keys: str) -> None:
        async with self.transaction() as db:
            await db.executemany("DELETE FROM meta WHERE key=?", [(k,) for k in keys])

    # -- source snapshot ----------------------------------------------------------------------

    async def source_hashes(self) -> dict[str, Digest]:
        """The content hash of every user as last written to `source_user`, read anew (the engine
        asks once, on its first cycle, before its mapping caches know what is stored)."""
        return await self._read_hashes("source_user")

    async def _stored_user_hashes(self, ids: list[str]) -> dict[str, Digest]:
        out: dict[str, Digest] = {}
        for i in range(0, len(ids), SQL_IN_BATCH):
            chunk = ids[i:i + SQL_IN_BATCH]
            sql = f"SELECT id, hash FROM source_user WHERE id IN ({','.join('?' * len(chunk))})"
            async with self.db.execute(sql, chunk) as cur:
                for row in await cur.fetchall():
                    out[str(row[0])] = _hash_value(str(row[1]))
        return out

    async def save_snapshot(self, snapshot: Snapshot, hashes: Mapping[str, Digest]) -> int:
        """Write the users and groups whose hash changed (and, when complete, drop those gone).

        A user held as `UNCHANGED` has, by construction, the hash last written (and none in
        *hashes*): a cycle with nothing new compares nothing, writes nothing, and finds that
        nobody is gone from one `COUNT(*)`. Returns the number of user rows written or deleted.
        """
        held = [uid for uid, user in snapshot.users.items() if user is not UNCHANGED]
        rows = await self._changed_user_rows(snapshot, hashes, held)
        del held
        if self._group_hashes is None:
            self._group_hashes = await self._read_hashes("source_group")
        old_groups = self._group_hashes
        groups = []
        group_hashes: dict[str, Digest] = {}
        for gid, g in snapshot.groups.items():
            digest, row = _group_source_row(snapshot, gid, g)
            group_hashes[gid] = digest
            if old_groups.get(gid) != digest:
                groups.append(row)
        groups_gone = [gid for gid in old_groups if gid not in snapshot.groups] if snapshot.complete else []
        gone = 0
        async with self.transaction() as db:
            for i in range(0, len(rows), BATCH):
                await db.executemany(
                    "INSERT OR REPLACE INTO source_user(id, username, hash, updated_at, data) "
                    "VALUES (?, ?, ?, ?, ?)", rows[i:i + BATCH])
            if snapshot.complete:
                gone = await self._drop_gone_users(db, snapshot.users)
            await db.executemany(
                "INSERT OR REPLACE INTO source_group(id, name, hash, members, parents) VALUES (?, ?, ?, ?, ?)",
                groups)
            await db.executemany("DELETE FROM source_group WHERE id=?", [(g,) for g in groups_gone])
        if snapshot.complete:
            self._group_hashes = group_hashes
        else:
            old_groups.update(group_hashes)
        return len(rows) + gone

    async def _changed_user_rows(self, snapshot: Snapshot, hashes: Mapping[str, Digest],
                                 held: list[str]) -> list[tuple[Any, ...]]:
        """`source_user` rows of the users of *held* whose hash is not the stored one."""
        old = await self._stored_user_hashes(held) if held else {}
        rows = []
        for uid in held:
            if old.get(uid) != hashes[uid]:
                user = snapshot.users[uid]
                rows.append((uid, user.get("username"), _hash_text(hashes[uid]), user.get("updatedAt"), _dumps(user)))
        return rows

    async def save_snapshot_rows(self, snapshot: Snapshot, *, users: Iterable[str], groups: Iterable[str]) -> int:
        """Write the rows of *users* and *groups* (the ones a change merged into *snapshot*
        touched) as `save_snapshot` of the incomplete *snapshot* would: those whose hash changed,
        nothing dropped (a user or group gone stays until a complete snapshot drops it). The cost
        is the changes', not the snapshot's. Returns the number of user rows written."""
        held = [uid for uid in users if (user := snapshot.users.get(uid)) is not None and user is not UNCHANGED]
        rows = await self._changed_user_rows(snapshot, snapshot.hashes, held)
        if self._group_hashes is None:
            self._group_hashes = await self._read_hashes("source_group")
        old_groups = self._group_hashes
        changed: list[tuple[Any, ...]] = []
        for gid in groups:
            g = snapshot.groups.get(gid)
            if g is None:
                continue
            digest, row = _group_source_row(snapshot, gid, g)
            if old_groups.get(gid) != digest:
                changed.append(row)
                old_groups[gid] = digest
        if rows or changed:
            async with self.transaction() as db:
                for i in range(0, len(rows), BATCH):
                    await db.executemany(
                        "INSERT OR REPLACE INTO source_user(id, username, hash, updated_at, data) "
                        "VALUES (?, ?, ?, ?, ?)", rows[i:i + BATCH])
                await db.executemany(
                    "INSERT OR REPLACE INTO source_group(id, name, hash, members, parents) VALUES (?, ?, ?, ?, ?)",
                    changed)
        return len(rows)

    @staticmethod
    async def _drop_gone_users(db: aiosqlite.Connection, present: Mapping[str, Any]) -> int:
        """Delete the users a complete snapshot no longer has. Every present user is stored by now,
        so there are some only when the table holds more rows than the snapshot has users."""
        async with db.execute("SELECT COUNT(*) FROM source_user") as cur:
            row = await cur.fetchone()
        if row is None or int(row[0]) <= len(present):
            return 0
        gone: list[tuple[str]] = []
        async with db.execute("SELECT id FROM source_user") as cur:
            while batch := await cur.fetchmany(BATCH):
                gone.extend((str(r[0]),) for r in batch if r[0] not in present)
        await db.executemany("DELETE FROM source_user WHERE id=?", gone)
        return len(gone)

    async def _read_hashes(self, table: str) -> dict[str, Digest]:
        async with self.db.execute(f"SELECT id, hash FROM {table}") as cur:
            return {str(r[0]): _hash_value(str(r[1])) async for r in cur}

    async def load_snapshot(self) -> Snapshot:
        """The last snapshot as stored (for a reload's impact preview): users, groups, membership."""
        snap = Snapshot()
        async with self.db.execute("SELECT id, data FROM source_user") as cur:
            async for r in cur:
                snap.users[str(r[0])] = json.loads(r[1])
        async with self.db.execute("SELECT id, name, members, parents FROM source_group") as cur:
            async for r in cur:
                gid = str(r[0])
                snap.groups[gid] = {"id": gid, "name": r[1]}
                snap.members[gid] = Members.of(json.loads(r[2]))
                snap.parents[gid] = frozenset(json.loads(r[3]))
        return snap

    async def find_source_user(self, ref: str) -> dict[str, Any] | None:
        """A stored PingOne user by id, username or email (case-insensitive)."""
        async with self.db.execute(
            "SELECT data FROM source_user WHERE id=? OR username=? COLLATE NOCASE "
            "OR json_extract(data, '$.email')=? COLLATE NOCASE LIMIT 1", (ref, ref, ref)) as cur:
            row = await cur.fetchone()
        return json.loads(row[0]) if row else None

    # -- links --------------------------------------------------------------------------------

    async def load_links(self, target: str, share: Desired | None = None,
                         malformed: list[MalformedRow] | None = None) -> Actual:
        """Every link of *target*. With *share* (the desired state of this cycle), a link whose
        applied attributes, userName or members equal the desired ones holds the desired objects
        instead of parsed copies: at 100,000 users a second copy of everyone's attributes is ~70 MB.

        A row that cannot be read (not JSON where JSON belongs, a missing id) is left out and, with
        *malformed*, reported there: it costs its own entity a re-read, never the target's cycle."""
        users: dict[str, UserLink] = {}
        groups: dict[str, GroupLink] = {}
        intern = sys.intern    # for the few words of origin and disabled_reason
        wanted: Mapping[str, DesiredUser] = share.users if share is not None else {}
        wanted_groups: Mapping[str, DesiredGroup] = share.groups if share is not None else {}

        def canonical(uid: str) -> str:
            """The id object the desired state holds (one string per user), else this one."""
            want = wanted.get(uid)
            return want.source_id if want is not None else uid

        async with self.db.execute(
            "SELECT kind, source_id, target_id, name, attrs, active, members, foreign_members, origin, "
            "disabled_reason, disabled_at FROM target_object WHERE target=?", (target,)) as cur:
            async for r in cur:
                try:
                    if not isinstance(r[1], str) or not r[1]:
                        raise ValueError("no source id")
                    if not isinstance(r[2], str) or not r[2]:
                        raise ValueError("no target id")
                    sid = canonical(r[1])
                    if r[0] == "user":
                        attrs = json.loads(r[4])
                        if not isinstance(attrs, dict) or not isinstance(r[3], str):
                            raise ValueError("attrs is not an object" if isinstance(r[3], str) else "no name")
                        name = r[3]
                        want = wanted.get(sid)
                        if want is not None:
                            attrs = shared(attrs, want.attrs)
                            name = shared(name, want.user_name)
                        # origin and disabled_reason are one of a few words: one string each, not one
                        # per row (~56 bytes a user at 1,000,000)
                        users[sid] = UserLink(sid, r[2], name, attrs, bool(r[5]), intern(str(r[8])),
                                              None if r[9] is None else intern(str(r[9])),
                                              None if r[10] is None else float(r[10]))
                    elif r[0] == "group":
                        listed, foreign = json.loads(r[6]), json.loads(r[7])
                        if not (isinstance(listed, list) and isinstance(foreign, list)
                                and all(isinstance(m, str) for m in listed)
                                and all(isinstance(m, str) for m in foreign)):
                            raise ValueError("members are not lists of ids")
                        members: AbstractSet[str] = Members.of(map(canonical, listed))
                        group = wanted_groups.get(sid)
                        if group is not None:
                            members = shared(members, group.members)
                        groups[sid] = GroupLink(sid, r[2], str(r[3]), members, frozenset(foreign), intern(str(r[8])))
                    else:
                        raise ValueError(f"unknown kind {r[0]!r}")
                except (ValueError, TypeError) as exc:     # json.JSONDecodeError is a ValueError
                    if malformed is not None:
                        malformed.append(MalformedRow(
                            str(r[0]), r[1] if isinstance(r[1], str) else None,
                            r[2] if isinstance(r[2], str) and r[2] else None,
                            r[3] if isinstance(r[3], str) else None, f"{type(exc).__name__}: {exc}"[:200],
                            r[8] if isinstance(r[8], str) else None))
        return Actual(users=users, groups=groups)

    async def write_links(
        self,
        target: str,
        *,
        users: Iterable[UserLink] = (),
        groups: Iterable[GroupLink] = (),
        drop_users: Iterable[str] = (),
        drop_groups: Iterable[str] = (),
    ) -> None:
        now = time.time()
        user_rows = [_user_row(target, u, now) for u in users]
        group_rows = [_group_row(target, g, now) for g in groups]
        drops = [(target, "user", s) for s in drop_users] + [(target, "group", s) for s in drop_groups]
        if not (user_rows or group_rows or drops):
            return
        async with self.transaction() as db:
            rows = user_rows + group_rows
            for i in range(0, len(rows), BATCH):
                await db.executemany(_UPSERT_LINK, rows[i:i + BATCH])
            if drops:
                await db.executemany(
                    "DELETE FROM target_object WHERE target=? AND kind=? AND source_id=?", drops)

    async def link_for(self, target: str, source_id: str) -> dict[str, Any] | None:
        async with self.db.execute(
            "SELECT target_id, name, attrs, active, origin, disabled_reason, disabled_at, last_synced "
            "FROM target_object WHERE target=? AND kind='user' AND source_id=?", (target, source_id)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return {"target_id": r[0], "user_name": r[1], "attrs": _loads_object(r[2]), "active": bool(r[3]),
                "origin": r[4], "disabled_reason": r[5], "disabled_at": r[6], "last_synced": r[7]}

    async def linked_namesakes(self, target: str, user_name: str, user_id: str) -> list[str]:
        """Source ids of the other user links of a target named `user_name` (indexed; NOCASE folds
        ASCII only: the caller compares as servers do)."""
        async with self.db.execute(
            "SELECT source_id FROM target_object WHERE target=? AND kind='user' AND name=? COLLATE NOCASE "
            "AND source_id != ? LIMIT 20", (target, user_name, user_id)) as cur:
            return [str(r[0]) async for r in cur]

    async def managed_count(self, target: str, kind: str = "user") -> int:
        async with self.db.execute(
            "SELECT count(*) FROM target_object WHERE target=? AND kind=?", (target, kind)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- cycles -------------------------------------------------------------------------------

    async def start_cycle(self, target: str, *, full_sync: bool, kind: str = CYCLE_KIND) -> int:
        cur = await self._write(
            "INSERT INTO cycle(target, started, full_sync, kind, owner) VALUES (?, ?, ?, ?, ?)",
            (target, time.time(), int(full_sync), kind, self.owner))
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    async def finish_cycle(self, cycle_id: int, outcome: str, summary: dict[str, Any]) -> None:
        await self._write(
            "UPDATE cycle SET finished=?, outcome=?, summary=? WHERE id=?",
            (time.time(), outcome, _dumps(summary), cycle_id))

    async def last_cycle_id(self, target: str) -> int | None:
        """The newest cycle the daemon (not sync-user) ran for a target."""
        async with self.db.execute(
            "SELECT max(id) FROM cycle WHERE target=? AND kind='cycle'", (target,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def last_full_sync(self, target: str) -> float | None:
        async with self.db.execute(
            "SELECT max(started) FROM cycle WHERE target=? AND full_sync=1 AND kind='cycle' AND outcome NOT IN "
            "('running', 'aborted', 'quarantined', 'failed', 'interrupted')", (target,)) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    async def latest_cycle_of_kind(self, target: str, kind: str) -> dict[str, Any] | None:
        """The newest cycle of *kind* (e.g. "incremental") for a target, as `latest_cycles` shows one."""
        async with self.db.execute(
            "SELECT id, started, finished, outcome, summary FROM cycle WHERE target=? AND kind=? "
            "ORDER BY id DESC LIMIT 1", (target, kind)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return {"cycle": r[0], "kind": kind, "started": r[1], "finished": r[2], "outcome": r[3],
                "summary": json.loads(r[4]) if r[4] else {}}

    async def latest_cycles(self) -> list[dict[str, Any]]:
        async with self.db.execute(
            "SELECT c.id, c.target, c.started, c.finished, c.full_sync, c.outcome, c.summary FROM cycle c "
            "JOIN (SELECT target, max(id) AS id FROM cycle WHERE kind='cycle' GROUP BY target) m ON m.id = c.id "
            "ORDER BY c.target") as cur:
            return [
                {"cycle": r[0], "target": r[1], "started": r[2], "finished": r[3], "full_sync": bool(r[4]),
                 "outcome": r[5], "summary": json.loads(r[6])}
                async for r in cur
            ]

    # -- operations ---------------------------------------------------------------------------

    async def save_plan(self, cycle_id: int, target: str, ops: Sequence[Op]) -> None:
        rows = [
            (cycle_id, op.seq, target, op.kind, op.op, op.source_id, op.target_id, op.name,
             _dumps(dict(op.payload)), op.reason, op.status, op.skip_reason)
            for op in ops
        ]
        async with self.transaction() as db:
            for i in range(0, len(rows), BATCH):
                await db.executemany(
                    "INSERT INTO operation(cycle_id, seq, target, kind, op, source_id, target_id, name, "
                    "payload, reason, status, skip_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows[i:i + BATCH])

    async def mark_in_flight(self, cycle_id: int, seqs: Sequence[int], *,
                             since: float | None = None) -> dict[int, Holder]:
        """Journal these operations in flight, each only if its entity is free: the claim, taken
        in the statement that marks it. An entity is busy while another live process has an
        operation on it in flight, and (with *since*, when this plan's links were read) when
        another process recorded a write to it after that: this plan is then stale for it.
        Returns the operations not marked, with who holds their entity; they must not be sent.

        One statement per call, not BEGIN/UPDATE.../COMMIT: this runs before every request the
        applier sends, and each round trip to SQLite's thread costs CPU on the event loop. A
        single UPDATE in autocommit mode is atomic on its own (SQLite serialises writers across
        processes), so two processes never both claim one entity. Only when fewer rows than asked
        were marked are the holders read (and a crashed holder's claim set aside)."""
        now = time.time()
        busy: dict[int, Holder] = {}
        for i in range(0, len(seqs), 500):
            chunk = list(seqs[i:i + 500])
            for _ in range(3):      # again only after finding a holder dead
                marked = await self._claim(cycle_id, chunk, now, since)
                if marked == len(chunk):
                    break
                holders = await self._holders(cycle_id, chunk, since)
                dead = {h.owner for hs in holders.values() for h in hs
                        if h.state == "in_flight" and not owner_alive(h.owner)}
                if not dead:
                    busy.update({seq: hs[0] for seq, hs in holders.items()})
                    break
                self._dead_owners |= dead
                chunk = list(holders)
            else:
                busy.update({seq: hs[0] for seq, hs in (await self._holders(cycle_id, chunk, since)).items()})
        return busy

    def _conflict(self, since: float | None, mine: str = "mine") -> tuple[str, tuple[Any, ...]]:
        """SQL (over `o`, `c`: another operation on the same entity and its cycle; *mine*: the
        operation to send) that makes an entity busy, and its arguments."""
        dead = sorted(self._dead_owners)
        sql = (f"o.cycle_id != {mine}.cycle_id AND c.owner != ? AND ((o.status = 'in_flight'"
               + (f" AND c.owner NOT IN ({','.join('?' * len(dead))})" if dead else "") + ")")
        args: tuple[Any, ...] = (self.owner, *dead)
        if since is not None:
            sql += " OR (o.status IN ('applied', 'failed') AND o.recorded > ?)"
            args = (*args, since)
        return sql + ")", args

    async def _claim(self, cycle_id: int, chunk: list[int], now: float, since: float | None) -> int:
        # No alias on the updated table (older SQLite builds refuse one): inside the subquery,
        # `operation.` is the row being marked, `o` the other operation.
        conflict, args = self._conflict(since, "operation")
        cur = await self._write(
            "UPDATE operation SET status='in_flight', started=? WHERE cycle_id=? AND seq IN ("
            + ",".join("?" * len(chunk)) + ") AND NOT EXISTS (SELECT 1 FROM operation o JOIN cycle c ON "
            "c.id = o.cycle_id WHERE o.target = operation.target AND o.source_id = operation.source_id "
            f"AND o.kind = operation.kind AND {conflict})", (now, cycle_id, *chunk, *args))
        return int(cur.rowcount)

    async def _holders(self, cycle_id: int, chunk: list[int], since: float | None) -> dict[int, list[Holder]]:
        """Of these operations, those not marked in flight, with who holds their entity."""
        conflict, args = self._conflict(since)
        out: dict[int, list[Holder]] = {}
        async with self.db.execute(
            "SELECT mine.seq, c.owner, o.cycle_id, c.kind, o.status FROM operation mine JOIN operation o "
            "ON o.target = mine.target AND o.source_id = mine.source_id AND o.kind = mine.kind "
            "JOIN cycle c ON c.id = o.cycle_id WHERE mine.cycle_id=? AND mine.status != 'in_flight' AND mine.seq IN ("
            + ",".join("?" * len(chunk)) + f") AND {conflict} ORDER BY o.cycle_id DESC",
            (cycle_id, *chunk, *args)) as cur:
            async for seq, owner, holder_cycle, kind, status in cur:
                state = "in_flight" if status == "in_flight" else "written"
                out.setdefault(int(seq), []).append(Holder(str(owner), int(holder_cycle), str(kind), state))
        return out

    async def busy_entities(self, target: str, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Holder]:
        """Of these (kind, source id), those another live process has an operation in flight on."""
        out: dict[tuple[str, str], Holder] = {}
        for kind, source_id in keys:
            async with self.db.execute(
                "SELECT c.owner, o.cycle_id, c.kind FROM operation o JOIN cycle c ON c.id = o.cycle_id "
                "WHERE o.target=? AND o.source_id=? AND o.kind=? AND o.status='in_flight' AND c.owner != ?",
                (target, source_id, kind, self.owner)) as cur:
                rows = list(await cur.fetchall())
            for owner, holder_cycle, holder_kind in rows:
                if str(owner) in self._dead_owners:
                    continue
                if not owner_alive(str(owner)):
                    self._dead_owners.add(str(owner))
                    continue
                out[(kind, source_id)] = Holder(str(owner), int(holder_cycle), str(holder_kind), "in_flight")
                break
        return out

    async def record_outcomes(self, cycle_id: int, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE operation SET status=?, attempts=?, http_status=?, error=?, scim_type=?, "
                "target_id=coalesce(?, target_id), started=coalesce(?, started), finished=?, "
                "skip_reason=coalesce(?, skip_reason), recorded=? WHERE cycle_id=? AND seq=?",
                [(o.status, o.attempts, o.http_status, o.error, o.scim_type, o.target_id, o.started,
                  o.finished, o.skip_reason, now, cycle_id, o.seq) for o in outcomes])

    async def live_cycles(self, target: str) -> list[int]:
        """Cycles of this target with operations still open that another process still running
        is applying: theirs, not an interrupted cycle's (recovery leaves them alone). Only the
        cycles with open operations are looked at (indexed), not the whole history."""
        async with self.db.execute(
            "SELECT DISTINCT cycle_id FROM operation WHERE target=? AND status IN ('pending', 'in_flight')",
            (target,)) as cur:
            open_cycles = [int(r[0]) async for r in cur]
        return await self._live_among(open_cycles)

    async def _live_among(self, cycle_ids: Sequence[int]) -> list[int]:
        live: list[int] = []
        for i in range(0, len(cycle_ids), SQL_IN_BATCH):
            chunk = list(cycle_ids[i:i + SQL_IN_BATCH])
            async with self.db.execute(
                f"SELECT id, owner FROM cycle WHERE id IN ({','.join('?' * len(chunk))}) AND owner IS NOT NULL "
                "AND owner != ?", (*chunk, self.owner)) as cur:
                rows = [(int(r[0]), str(r[1])) async for r in cur]
            for cid, owner in rows:
                if owner in self._dead_owners:
                    continue
                if owner_alive(owner):
                    live.append(cid)
                else:
                    self._dead_owners.add(owner)
        return live

    async def unfinished_ops(self, target: str) -> list[dict[str, Any]]:
        """Operations left pending or in flight by an interrupted cycle (not those of a cycle
        another live process is running: `live_cycles`)."""
        async with self.db.execute(
            "SELECT cycle_id, seq, kind, op, source_id, target_id, name, payload, status FROM operation "
            "WHERE target=? AND status IN ('pending', 'in_flight') ORDER BY cycle_id, seq", (target,)) as cur:
            rows = [
                {"cycle": r[0], "seq": r[1], "kind": r[2], "op": r[3], "source_id": r[4], "target_id": r[5],
                 "name": r[6], "payload": _loads_object(r[7]), "status": r[8]}
                async for r in cur
            ]
        if not rows:
            return rows
        live = set(await self._live_among(sorted({int(r["cycle"]) for r in rows})))
        return [r for r in rows if r["cycle"] not in live]

    async def recovered(self, target: str, cycle_id: int, seq: int, *, user: UserLink | None = None,
                        group: GroupLink | None = None) -> None:
        """One in-flight create looked up after an interruption: its link (when found) and the
        operation's closing, in one transaction."""
        now = time.time()
        async with self.transaction() as db:
            if user is not None:
                await db.execute(_UPSERT_LINK, _user_row(target, user, now))
            if group is not None:
                await db.execute(_UPSERT_LINK, _group_row(target, group, now))
            await db.execute("UPDATE operation SET status='superseded', finished=? WHERE cycle_id=? AND seq=? "
                             "AND status='in_flight'", (now, cycle_id, seq))

    async def supersede(self, target: str) -> int:
        """Close what an interrupted cycle left open: the next plan covers it again. The cycles
        another live process is running are left alone (`live_cycles`)."""
        live = await self.live_cycles(target)
        keep = f" AND cycle_id NOT IN ({','.join('?' * len(live))})" if live else ""
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE operation SET status='superseded' WHERE target=? AND status IN ('pending', 'in_flight')"
                + keep, (target, *live))
            await db.execute(
                "UPDATE cycle SET outcome='interrupted', finished=coalesce(finished, ?) "
                "WHERE target=? AND outcome='running' AND kind='cycle' "
                "AND id < (SELECT max(id) FROM cycle WHERE target=? AND kind='cycle')",
                (time.time(), target, target))
            return cur.rowcount

    async def recent_failures(self, target: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        sql = ("SELECT cycle_id, target, kind, op, source_id, target_id, name, reason, attempts, http_status, "
               "scim_type, error, finished FROM operation WHERE status='failed'")
        args: tuple[Any, ...] = ()
        if target is not None:
            sql += " AND target=?"
            args = (target,)
        sql += " ORDER BY cycle_id DESC, seq DESC LIMIT ?"
        async with self.db.execute(sql, (*args, limit)) as cur:
            cols = ["cycle", "target", "kind", "op", "source_id", "target_id", "name", "reason", "attempts",
                    "http_status", "scim_type", "error", "finished"]
            return [dict(zip(cols, r, strict=True)) async for r in cur]

    async def operations_for(self, target: str | None, source_id: str, limit: int = 10) -> list[dict[str, Any]]:
        # an adoption says whose object it took over (a rehire, a re-created group)
        sql = ("SELECT cycle_id, target, kind, op, name, reason, status, skip_reason, attempts, http_status, "
               "scim_type, error, started, finished, "
               "CASE WHEN json_valid(payload) THEN json_extract(payload, '$.from_source_id') END, "
               "CASE WHEN json_valid(payload) THEN coalesce(json_extract(payload, '$.from_user'), "
               "json_extract(payload, '$.from_group')) END FROM operation WHERE source_id=?")
        args: tuple[Any, ...] = (source_id,)
        if target is not None:
            sql += " AND target=?"
            args = (*args, target)
        sql += " ORDER BY cycle_id DESC, seq DESC LIMIT ?"
        async with self.db.execute(sql, (*args, limit)) as cur:
            cols = ["cycle", "target", "kind", "op", "name", "reason", "status", "skip_reason", "attempts",
                    "http_status", "scim_type", "error", "started", "finished", "from_source_id", "from_name"]
            return [dict(zip(cols, r, strict=True)) async for r in cur]

    async def held_count(self, target: str) -> int:
        async with self.db.execute(
            "SELECT count(*) FROM operation WHERE target=? AND status='held' AND cycle_id="
            "(SELECT max(id) FROM cycle WHERE target=? AND kind='cycle')", (target, target)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- approvals ----------------------------------------------------------------------------

    async def approve(self, target: str) -> None:
        # Strictly later than any approval before it, even within the clock's resolution: a cycle
        # that read the older one must not consume this one.
        now = time.time()
        previous = await self.approval_granted(target)
        granted = now if previous is None or now > previous else math.nextafter(previous, math.inf)
        await self._write("INSERT OR REPLACE INTO approval(target, granted) VALUES (?, ?)", (target, granted))

    async def approved(self, target: str) -> bool:
        return await self.approval_granted(target) is not None

    async def approval_granted(self, target: str) -> float | None:
        """When the pending approval of *target* was granted (None: there is none). A plan that
        honours it keeps this value, and consumes exactly that approval."""
        async with self.db.execute("SELECT granted FROM approval WHERE target=?", (target,)) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row is not None else None

    async def consume_approval(self, target: str, granted: float | None = None) -> bool:
        """Delete the approval; with *granted*, only that one: an approval given again while a
        cycle was applying (a newer `granted`) is kept for the next cycle. True if one went."""
        if granted is None:
            cur = await self._write("DELETE FROM approval WHERE target=?", (target,))
        else:
            cur = await self._write("DELETE FROM approval WHERE target=? AND granted=?", (target, granted))
        return cur.rowcount > 0


class ScratchWrites(Store):
    """A dry run's store: reads the real state file, writes into a scratch one.

    Every write of `Store` goes through `_write` or `transaction`, both turned to *scratch*: the
    dry run plans against the real links, approvals and history, and records its cycle, plan and
    outcomes where nothing of the real state changes (a reread sees the real state, not them)."""

    def __init__(self, base: Store, scratch: Store) -> None:
        super().__init__(base.db, base.path)
        self.scratch = scratch
        self._write_lock = scratch._write_lock

    async def _write(self, sql: str, args: tuple[Any, ...] = ()) -> aiosqlite.Cursor:
        return await self.scratch._write(sql, args)

    def transaction(self) -> Any:
        return self.scratch.transaction()

    async def close(self) -> None:
        await self.scratch.close()
