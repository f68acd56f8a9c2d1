"""The change feed: what changed in PingOne since the last look, as the ids of users and groups.

Two ways in (pingone.md §9, README "How changes flow"):

    poll      `ChangeFeed.poll` reads the audit activities recorded in
              (watermark - overlap, now + slack) (GET /activities, the Audit rate group)
    webhook   `webhook_handler` stores each batch PingOne POSTs to /pingone/events in SQLite
              (`Inbox`, its own connection, synchronous=FULL) before it answers 2xx;
              `ChangeFeed.poll` drains those rows too, and still polls to catch gaps

Both go through one de-duplication by activity id (`change_seen`) and one watermark (meta
`change_watermark`, epoch seconds). `poll` hands on a `ChangeBatch` and changes nothing on
disk: the caller applies the batch and then `commit`s it, which in one transaction marks its
activities seen, consumes its inbox rows and moves the watermark. A crash (even SIGKILL) before
the commit hands the same changes on again; applying them twice changes nothing.

Records appear in the audit log after an indexing delay and out of order within it: each poll
reaches back `overlap` seconds before the watermark, so a record indexed up to `overlap` late is
still seen, once. The watermark is the local clock at the poll's start; `slack` on the upper bound
covers a PingOne clock ahead of ours.

The feed cannot cover a gap longer than the audit log's retention (14 days) nor a start with no
watermark: `poll` raises `FeedGap` and the caller runs a full snapshot first, then `start_at` its
start time. `affected` and `parse_activity` are pure.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiosqlite
import anyio
from aiohttp import web

from daemon import logs
from daemon.errors import NotFound, ProvisiondError
from daemon.source.pingone import PingOneClient
from daemon.store import SQL_IN_BATCH, Store

WATERMARK_KEY = "change_watermark"
DEFAULT_OVERLAP = 30.0               # seconds each poll reaches back: > the indexing delay (~2 s)
DEFAULT_SLACK = 60.0                 # seconds past the local clock each poll reaches forward
DEFAULT_RETENTION = 14 * 86_400.0    # the audit log's queryable window (pingone.md §9.1)
RETENTION_MARGIN = 3_600.0           # a watermark this close to the retention edge is a gap already
DEFAULT_READ_CONCURRENCY = 4
WEBHOOK_PATH = "/pingone/events"
SECRET_HEADER = "X-Provisiond-Webhook-Secret"
DEFAULT_MAX_BODY = 1 << 20           # bytes of one webhook POST
MAX_BATCH_ITEMS = 1000
FAILED = "FAILED"
USER = "USER"
GROUP = "GROUP"
# `action.type` of a change to a group itself (GROUP.CREATED, .UPDATED, .DELETED: pingone.md §9.1).
GROUP_ACTION_PREFIX = "GROUP."


class FeedGap(ProvisiondError):
    """The feed cannot say what changed since the watermark: a full snapshot must come first."""


# --- pure: activities -> affected ids ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Activity:
    """The parts of one audit record provisiond uses."""

    id: str
    recorded_at: str
    action: str
    user_ids: tuple[str, ...]
    group_ids: tuple[str, ...]
    failed: bool = False


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """The users and groups a set of activities names, and when each was first named."""

    user_ids: frozenset[str] = frozenset()
    group_ids: frozenset[str] = frozenset()
    first_recorded: Mapping[str, str] = field(default_factory=dict)   # entity id -> recordedAt
    # Groups named only beside a user (a membership added or removed) and never on their own: the
    # user's read says its direct groups, so `read_affected` reads these only when it does not.
    member_groups: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.user_ids or self.group_ids)


def parse_activity(raw: Any) -> Activity | None:
    """An `Activity` from one record, or None when it has no string `id` and `recordedAt`.

    A resource is `{"type": "USER"|"GROUP", "id": ...}` (pingone.md §9.1); the shape
    `{"user": {"id": ...}}` / `{"group": {...}}` is read too, since the exact form is UNCONFIRMED.
    Resources of other types (populations, applications, ...) are ignored.
    """
    if not isinstance(raw, Mapping):
        return None
    activity_id, recorded = raw.get("id"), raw.get("recordedAt")
    if not isinstance(activity_id, str) or not activity_id or not isinstance(recorded, str) or not recorded:
        return None
    action = raw.get("action")
    action_type = action.get("type") if isinstance(action, Mapping) else None
    result = raw.get("result")
    failed = isinstance(result, Mapping) and str(result.get("status", "")).upper() == FAILED
    users: list[str] = []
    groups: list[str] = []
    resources = raw.get("resources")
    for resource in resources if isinstance(resources, list) else ():
        if not isinstance(resource, Mapping):
            continue
        kind = str(resource.get("type", "")).upper()
        ident = resource.get("id")
        if not kind:
            for key, name in (("user", USER), ("group", GROUP)):
                nested = resource.get(key)
                if isinstance(nested, Mapping):
                    kind, ident = name, nested.get("id")
        if not isinstance(ident, str) or not ident:
            continue
        if kind == USER and ident not in users:
            users.append(ident)
        elif kind == GROUP and ident not in groups:
            groups.append(ident)
    return Activity(activity_id, recorded, str(action_type or ""), tuple(users), tuple(groups), failed)


def affected(activities: Iterable[Activity]) -> ChangeSet:
    """Every user and group the successful activities name; failed actions change nothing.

    A group named beside a user by an action that is not the group's own (`GROUP.*`: created,
    updated, deleted) is a membership of that user added or removed: it goes to `member_groups`
    unless another activity names the group itself. The user's read covers such a change, so the
    group's member list (one page of users per 1,000 members) is not read for it."""
    users: set[str] = set()
    groups: set[str] = set()
    beside: set[str] = set()
    first: dict[str, str] = {}
    for activity in activities:
        if activity.failed:
            continue
        for ident in (*activity.user_ids, *activity.group_ids):
            if ident not in first or activity.recorded_at < first[ident]:
                first[ident] = activity.recorded_at
        users.update(activity.user_ids)
        if activity.user_ids and not activity.action.upper().startswith(GROUP_ACTION_PREFIX):
            beside.update(activity.group_ids)
        else:
            groups.update(activity.group_ids)
    return ChangeSet(frozenset(users), frozenset(groups), first, frozenset(beside - groups))


def stamp(seconds: float) -> str:
    """PingOne's timestamp form for epoch seconds (ms, 'Z')."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def epoch(text: str) -> float | None:
    """Epoch seconds of a PingOne timestamp; None when unparsable."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# --- reading the affected entities ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GroupRead:
    """A changed group as PingOne has it now: its JSON, direct member ids and parent group ids."""

    group: dict[str, Any]
    member_ids: tuple[str, ...]
    parent_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reads:
    """The affected entities read anew; None for one PingOne answered 404 (deleted)."""

    users: dict[str, dict[str, Any] | None]
    groups: dict[str, GroupRead | None]

    @property
    def deleted_users(self) -> frozenset[str]:
        return frozenset(uid for uid, user in self.users.items() if user is None)

    @property
    def deleted_groups(self) -> frozenset[str]:
        return frozenset(gid for gid, group in self.groups.items() if group is None)


async def read_affected(client: PingOneClient, changes: ChangeSet, *,
                        concurrency: int = DEFAULT_READ_CONCURRENCY) -> Reads:
    """GET each affected user (with `memberOfGroupIDs`) and group (with members and parents).

    Only those: a change to one user costs one request, not a snapshot. The groups named only
    beside a user (`ChangeSet.member_groups`) are read too when a user came back without
    `memberOfGroupIDs` (then its own read does not say which groups it is in). A 404 means
    deleted; any other failure propagates (the caller retries the whole batch: nothing was
    committed)."""
    users: dict[str, dict[str, Any] | None] = {}
    groups: dict[str, GroupRead | None] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def user(uid: str) -> None:
        async with limiter:
            try:
                users[uid] = await client.get_user(uid)
            except NotFound:
                users[uid] = None

    async def group(gid: str) -> None:
        async with limiter:
            try:
                found = await client.get_group(gid)
                members = await client.group_member_ids(gid)
                parents = await client.group_parents(gid)
            except NotFound:
                groups[gid] = None
                return
            groups[gid] = GroupRead(found, tuple(members), tuple(parents))

    async with anyio.create_task_group() as tg:
        for uid in sorted(changes.user_ids):
            tg.start_soon(user, uid)
        for gid in sorted(changes.group_ids):
            tg.start_soon(group, gid)
    if changes.member_groups and any(read is not None and not isinstance(read.get("memberOfGroupIDs"), list)
                                     for read in users.values()):
        async with anyio.create_task_group() as tg:
            for gid in sorted(changes.member_groups):
                tg.start_soon(group, gid)
    return Reads(users, groups)


def last_per_user(activities: Iterable[Activity]) -> dict[str, Activity]:
    """user id -> the latest activity (by recordedAt, then id) that names the user."""
    out: dict[str, Activity] = {}
    for activity in activities:
        for uid in activity.user_ids:
            held = out.get(uid)
            if held is None or (activity.recorded_at, activity.id) > (held.recorded_at, held.id):
                out[uid] = activity
    return out


# --- what became of each user's last event (`provisiond why`) --------------------------------------

EVENT_PENDING = "pending"      # handed on, not committed yet (being applied, or left for the next poll)
EVENT_APPLIED = "applied"      # its batch was applied and committed
EVENT_COVERED = "covered"      # still pending when a full snapshot began after it: the full cycle has it
EVENT_SKIPPED = "skipped"      # nothing to apply (the action failed in PingOne)
FAILED_DETAIL = "the action failed in PingOne (result FAILED): it changed nothing"


@dataclass(frozen=True, slots=True)
class Carried:
    """What one target's incremental cycle did with a batch: its cycle id (None: it did not run)."""

    cycle: int | None
    outcome: str

    def as_json(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "outcome": self.outcome}


# A newer event (by recordedAt, then id) replaces the stored one; the same event moves on from
# pending (or covered, when the feed hands it on again after a full snapshot) but never back.
_EVENT_UPSERT = """
INSERT INTO change_event(user_id, activity_id, action, recorded_at, seen, status, detail, applied, cycles)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(user_id) DO UPDATE SET
    seen = CASE WHEN excluded.activity_id = change_event.activity_id THEN change_event.seen ELSE excluded.seen END,
    activity_id = excluded.activity_id, action = excluded.action, recorded_at = excluded.recorded_at,
    status = excluded.status, detail = excluded.detail, applied = excluded.applied, cycles = excluded.cycles
WHERE (excluded.recorded_at, excluded.activity_id) > (change_event.recorded_at, change_event.activity_id)
   OR (excluded.activity_id = change_event.activity_id
       AND (change_event.status = 'pending' OR (change_event.status = 'covered' AND excluded.status != 'pending')))
"""


async def last_event(store: Store, user_id: str) -> dict[str, Any] | None:
    """The last change-feed event seen for a user and what became of it; None when none is kept."""
    async with store.db.execute(
        "SELECT activity_id, action, recorded_at, seen, status, detail, applied, cycles FROM change_event "
        "WHERE user_id=?", (user_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    activity_id, action, recorded_at, seen, status, detail, applied, cycles = row
    try:
        carried = json.loads(cycles)
    except ValueError:
        carried = {}
    return {"activity_id": activity_id, "action": action, "recorded_at": recorded_at, "seen": seen,
            "status": status, "detail": detail, "applied": applied,
            "targets": carried if isinstance(carried, dict) else {}}


# --- the feed: watermark, de-duplication, inbox ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """New activities (not seen before), what they affect, and what committing them records."""

    activities: tuple[Activity, ...]
    changes: ChangeSet
    watermark: float | None        # where the watermark moves on commit (None: it stays)
    inbox_seqs: tuple[int, ...] = ()
    polled: int = 0                # records the poll returned, duplicates included
    refused: int = 0               # records without an id or recordedAt, dropped

    def __bool__(self) -> bool:
        return bool(self.activities or self.inbox_seqs)


class ChangeFeed:
    """Polls the audit log (and drains the webhook inbox) into `ChangeBatch`es."""

    def __init__(self, client: PingOneClient, store: Store, *, poll: bool = True,
                 overlap: float = DEFAULT_OVERLAP, slack: float = DEFAULT_SLACK,
                 retention: float = DEFAULT_RETENTION, clock: Any = time.time) -> None:
        if overlap <= 0 or retention <= overlap:
            raise ValueError("overlap must be > 0 and below the retention")
        self.client = client
        self.store = store
        self.poll_enabled = poll
        self.overlap = overlap
        self.slack = slack
        self.retention = retention
        self.clock = clock

    async def watermark(self) -> float | None:
        """Epoch seconds up to which every change is known to be handed on; None: never set."""
        text = await self.store.get_meta(WATERMARK_KEY)
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None

    async def lag(self) -> float | None:
        """Seconds between now and the watermark (the feed's lag); None without a watermark."""
        mark = await self.watermark()
        return None if mark is None else max(0.0, self.clock() - mark)

    async def start_at(self, moment: float) -> None:
        """A full snapshot that began at *moment* covers every change before it; the changes
        recorded since (from `overlap` before it) are handed on again, although seen: the full
        cycle applies the snapshot's older view of them, and the incremental cycle after it must
        bring them back."""
        async with self.store.transaction() as db:
            await db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                             (WATERMARK_KEY, repr(float(moment))))
            await db.execute("DELETE FROM change_seen WHERE recorded_at >= ?", (stamp(moment - self.overlap),))
            await db.execute("UPDATE change_event SET status=?, detail=? WHERE status=? AND recorded_at < ?",
                             (EVENT_COVERED, f"a full snapshot began after it, at {stamp(moment)}",
                              EVENT_PENDING, stamp(moment)))

    async def poll(self, *, audit: bool | None = None) -> ChangeBatch:
        """What is new: the inbox's pending batches and, with *audit* (default: the feed's `poll`
        setting), the audit log since the watermark. With *audit*, raises `FeedGap` when the
        watermark is missing or older than the retention; PingOne's errors propagate typed
        (`daemon.errors`). Without, only the inbox is read and the watermark stays."""
        audit = self.poll_enabled if audit is None else audit
        mark = await self.watermark()
        now = self.clock()
        if audit:
            if mark is None:
                raise FeedGap("no change watermark yet: a full snapshot comes first")
            if now - mark > self.retention - RETENTION_MARGIN:
                raise FeedGap(f"the change watermark is {round((now - mark) / 86400, 1)} days old, "
                              "beyond the audit log's retention")
        raw: list[Any] = []
        seqs, inbox = await self._inbox()
        raw.extend(inbox)
        polled = 0
        moved: float | None = None
        if audit and mark is not None:
            since = max(mark - self.overlap, now - self.retention + RETENTION_MARGIN)
            found = await self.client.activities(stamp(since), stamp(now + self.slack))
            polled = len(found)
            raw.extend(found)
            moved = max(mark, now)
        parsed: dict[str, Activity] = {}
        refused = 0
        for item in raw:
            activity = parse_activity(item)
            if activity is None:
                refused += 1
            elif activity.id not in parsed:
                parsed[activity.id] = activity
        seen = await self._seen(list(parsed))
        fresh = tuple(sorted((a for a in parsed.values() if a.id not in seen),
                             key=lambda a: (a.recorded_at, a.id)))
        return ChangeBatch(fresh, affected(fresh), moved, seqs, polled, refused)

    async def note(self, batch: ChangeBatch, *, detail: str = "being applied",
                   carried: Mapping[str, Carried] | None = None) -> None:
        """Record the batch's last event per user as pending (`why`), with *detail* saying why
        (and what each target's cycle did, when one ran). The feed's own state is untouched."""
        rows = self._event_rows(batch, EVENT_PENDING, detail, None, carried)
        if rows:
            async with self.store.transaction() as db:
                await db.executemany(_EVENT_UPSERT, rows)

    async def commit(self, batch: ChangeBatch, carried: Mapping[str, Carried] | None = None) -> None:
        """The batch is applied: mark its activities seen, consume its inbox rows, move the
        watermark (never backwards), forget seen ids the next poll can no longer return. Each
        user's last event is recorded applied, with *carried* (target -> its incremental cycle)."""
        now = self.clock()
        async with self.store.transaction() as db:
            await db.executemany("INSERT OR IGNORE INTO change_seen(id, recorded_at) VALUES (?, ?)",
                                 [(a.id, a.recorded_at) for a in batch.activities])
            for i in range(0, len(batch.inbox_seqs), SQL_IN_BATCH):
                chunk = batch.inbox_seqs[i:i + SQL_IN_BATCH]
                await db.execute(f"DELETE FROM change_inbox WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
            if batch.watermark is not None:
                async with db.execute("SELECT value FROM meta WHERE key=?", (WATERMARK_KEY,)) as cur:
                    row = await cur.fetchone()
                old = _float(row[0]) if row else None
                mark = batch.watermark if old is None else max(old, batch.watermark)
                await db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                 (WATERMARK_KEY, repr(mark)))
                # A record older than this is outside every later poll's window: its id may go.
                await db.execute("DELETE FROM change_seen WHERE recorded_at < ?",
                                 (stamp(mark - self.overlap - self.slack - 60.0),))
            rows = self._event_rows(batch, EVENT_APPLIED, None, now, carried)
            if rows:
                await db.executemany(_EVENT_UPSERT, rows)
                await db.execute("DELETE FROM change_event WHERE seen < ?", (now - self.retention,))

    def _event_rows(self, batch: ChangeBatch, status: str, detail: str | None, applied: float | None,
                    carried: Mapping[str, Carried] | None) -> list[tuple[Any, ...]]:
        """`change_event` rows for the last event of each user the batch names."""
        now = self.clock()
        cycles = json.dumps({name: c.as_json() for name, c in sorted((carried or {}).items())})
        rows: list[tuple[Any, ...]] = []
        for uid, activity in sorted(last_per_user(batch.activities).items()):
            if activity.failed:
                rows.append((uid, activity.id, activity.action, activity.recorded_at, now, EVENT_SKIPPED,
                             FAILED_DETAIL, None, "{}"))
            else:
                rows.append((uid, activity.id, activity.action, activity.recorded_at, now, status, detail,
                             applied, cycles))
        return rows

    async def _inbox(self) -> tuple[tuple[int, ...], list[Any]]:
        seqs: list[int] = []
        items: list[Any] = []
        async with self.store.db.execute("SELECT seq, body FROM change_inbox ORDER BY seq") as cur:
            for seq, body in await cur.fetchall():
                seqs.append(int(seq))
                try:
                    parsed = json.loads(body)
                except ValueError:
                    continue
                items.extend(parsed if isinstance(parsed, list) else [parsed])
        return tuple(seqs), items

    async def _seen(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(ids), SQL_IN_BATCH):
            chunk = list(ids[i:i + SQL_IN_BATCH])
            sql = f"SELECT id FROM change_seen WHERE id IN ({','.join('?' * len(chunk))})"
            async with self.store.db.execute(sql, chunk) as cur:
                out.update(str(row[0]) for row in await cur.fetchall())
        return out


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# --- the webhook receiver ---------------------------------------------------------------------------

class Inbox:
    """Webhook batches, written through a connection of their own with synchronous=FULL: a batch
    is on disk before PingOne hears 2xx. The tables are the store's (schema v3): open the `Store`
    first so that they exist."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Inbox:
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
        except Exception:
            await db.close()
            raise
        return cls(db)

    async def put(self, body: str) -> int:
        """Store one batch (JSON text); its row number."""
        async with self._lock:
            cursor = await self.db.execute("INSERT INTO change_inbox(received, body) VALUES (?, ?)",
                                           (time.time(), body))
            return int(cursor.lastrowid or 0)

    async def close(self) -> None:
        await self.db.close()


def _valid_batch(parsed: Any) -> list[dict[str, Any]] | None:
    """The records of a webhook body (one record, or a list of them), or None when malformed."""
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or len(items) > MAX_BATCH_ITEMS:
        return None
    if not all(isinstance(item, dict) and parse_activity(item) is not None for item in items):
        return None
    return items


def webhook_handler(inbox: Inbox, secret: str, *, max_body: int = DEFAULT_MAX_BODY,
                    header: str = SECRET_HEADER, on_stored: Callable[[], None] | None = None) -> Any:
    """The aiohttp handler of `POST /pingone/events` (mount it with `mount_webhook`).

    401 without the shared secret in *header* (compared in constant time, before the body is
    read), 413 beyond *max_body* bytes, 415 unless JSON, 400 for a body that is not ACTIVITY
    records, 503 when the batch cannot be stored; 204 once it is stored durably, after which
    *on_stored* is called (the daemon polls at once instead of at its next poll)."""
    expected = secret.encode()
    log = logs.get_logger()

    def refuse(status: int, reason: str) -> web.Response:
        log.warning("webhook.refused", status=status, reason=reason)
        return web.Response(status=status, text=reason + "\n")

    async def handle(request: web.Request) -> web.StreamResponse:
        given = request.headers.get(header, "").encode()
        if not hmac.compare_digest(given, expected):
            return refuse(401, "missing or wrong shared secret")
        length = request.content_length
        if length is not None and length > max_body:
            return refuse(413, "body too large")
        if request.content_type != "application/json":
            return refuse(415, "expected application/json")
        parts: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65_536):   # a chunked body has no length
            size += len(chunk)
            if size > max_body:
                return refuse(413, "body too large")
            parts.append(chunk)
        raw = b"".join(parts)
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return refuse(400, "body is not JSON")
        items = _valid_batch(parsed)
        if items is None:
            return refuse(400, "body is not a batch of activity records")
        try:
            await inbox.put(json.dumps(items, separators=(",", ":")))
        except (aiosqlite.Error, OSError) as exc:
            log.error("webhook.store_failed", error=type(exc).__name__)
            return web.Response(status=503, text="cannot store the batch now\n")
        log.info("webhook.received", activities=len(items))
        if on_stored is not None:
            on_stored()
        return web.Response(status=204)

    return handle


def mount_webhook(app: web.Application, inbox: Inbox, secret: str, **options: Any) -> None:
    """Serve `POST /pingone/events` on *app* (e.g. the `http_listen` server of daemon/metrics.py);
    any other method on that path is answered 405 by the router."""
    app.router.add_post(WEBHOOK_PATH, webhook_handler(inbox, secret, **options))
