"""The PingOne emulator's change feeds: the audit log (`/activities`) and subscriptions (webhooks).

pingone.md §9. Every mutation made through `Directory`'s public methods becomes one activity
record. A record is queryable only once it is "indexed": `indexing_delay` seconds after it was
recorded at the latest, and sooner by a random part of `delay_spread`, so that within the delay
records become visible out of order (as a poller must expect). Subscriptions receive the same
records (format `ACTIVITY`), in order, each retried until the endpoint answers 2xx.

What pingone.md marks UNCONFIRMED is a field of `FeedSettings` (settable at
`POST /_admin/activities/settings`) and says so below: the `action.type` names of each kind of
change, the `_embedded` key, the answer to a range older than the retention, the order of results,
whether a webhook POST carries one record or a list.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import aiohttp

from daemon.pingone_filter import (
    CompiledFilter,
    FilterDialect,
    UnsupportedFilter,
    _And,
    _Compare,
    compile_filter,
)
from daemon.sandbox.directory import Directory
from daemon.sandbox.faults import TokenBucket

DAY = 86_400.0
DEFAULT_INDEXING_DELAY = 2.0
DEFAULT_RETENTION = 14 * DAY          # pingone.md §9.1: the last 14 days without a restore
DEFAULT_RATE = 10.0                   # the Audit rate group: 10 requests/second (pingone.md §5.2)
DEFAULT_ACTIVITY_LIMIT = 100          # the documented default `limit` of POST /activities
MAX_ACTIVITY_LIMIT = 1000
DEFAULT_WEBHOOK_MAX_AGE = 7 * DAY     # events are dropped after ~7 days of failed delivery (§9.2)
MAX_SUBSCRIPTIONS = 50
WEBHOOK_FORMATS = ("ACTIVITY", "SPLUNK", "NEWRELIC")

# The `action.type` of each kind of change. USER.CREATED/UPDATED/DELETED and GROUP.CREATED/
# UPDATED/DELETED are documented (pingone.md §9.1); the rest are UNCONFIRMED: which type an
# enable/disable, a population move, a membership change or a nesting change is recorded under.
DEFAULT_ACTION_TYPES: dict[str, str] = {
    "user.created": "USER.CREATED",
    "user.updated": "USER.UPDATED",
    "user.deleted": "USER.DELETED",
    "user.enabled": "USER.UPDATED",            # UNCONFIRMED
    "user.disabled": "USER.UPDATED",           # UNCONFIRMED
    "user.population_moved": "USER.UPDATED",   # UNCONFIRMED
    "group.created": "GROUP.CREATED",
    "group.updated": "GROUP.UPDATED",
    "group.renamed": "GROUP.UPDATED",
    "group.deleted": "GROUP.DELETED",
    "membership.added": "GROUP_MEMBERSHIP.CREATED",    # UNCONFIRMED
    "membership.removed": "GROUP_MEMBERSHIP.DELETED",  # UNCONFIRMED
    "nesting.added": "GROUP_NESTING.CREATED",          # UNCONFIRMED
    "nesting.removed": "GROUP_NESTING.DELETED",        # UNCONFIRMED
}
_DESCRIPTIONS = {
    "user.created": "User Created", "user.updated": "User Updated", "user.deleted": "User Deleted",
    "user.enabled": "User Enabled", "user.disabled": "User Disabled",
    "user.population_moved": "User Population Changed", "group.created": "Group Created",
    "group.updated": "Group Updated", "group.renamed": "Group Renamed", "group.deleted": "Group Deleted",
    "membership.added": "User Added to Group", "membership.removed": "User Removed from Group",
    "nesting.added": "Group Nested", "nesting.removed": "Group Unnested",
}

# Filterable attributes (pingone.md §9.1; the docs list eq for the ids and types, gt/lt/ge/le
# for the dates). `resources.*` match when any one resource of the record matches.
ACTIVITY_DIALECT = FilterDialect(
    attributes={
        "recordedAt": frozenset({"gt", "lt", "ge", "le"}),
        "createdAt": frozenset({"gt", "lt", "ge", "le"}),
        "action.type": frozenset({"eq"}),
        "resources.id": frozenset({"eq"}),
        "resources.type": frozenset({"eq"}),
        "resourcesPopulationId": frozenset({"eq"}),
        "actorsUserId": frozenset({"eq"}),
        "actorsClientId": frozenset({"eq"}),
        "correlationId": frozenset({"eq"}),
    },
    time_attributes=frozenset({"recordedAt", "createdAt"}),
)
_RANGE_ATTRIBUTES = ("recordedAt", "createdAt")
# The filter parser knows `attr.sub` only: three-part names are matched under a flat alias.
_ALIASES = {"resources.population.id": "resourcesPopulationId", "actors.user.id": "actorsUserId",
            "actors.client.id": "actorsClientId"}


class FeedRequestError(ValueError):
    """A request the activities API refuses: (detail code, target, message) for INVALID_DATA."""

    def __init__(self, code: str, target: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.target = target
        self.message = message


@dataclass
class FeedSettings:
    """Knobs of the change feeds; mutable while the emulator runs."""

    indexing_delay: float = DEFAULT_INDEXING_DELAY
    # A record becomes visible between (1 - delay_spread) * indexing_delay and indexing_delay
    # after it was recorded (drawn per record): 0 keeps the order, > 0 shuffles within the delay.
    delay_spread: float = 0.5
    retention: float = DEFAULT_RETENTION
    # UNCONFIRMED: what a range starting before the retention answers. "error": 400
    # INVALID_DATA/INVALID_VALUE; "clip": the records still held, silently.
    old_range: str = "error"
    rate_rps: float = DEFAULT_RATE
    rate_burst: float = DEFAULT_RATE
    retry_after: float = 1.0
    # When set, every /activities request is answered with this HTTP status (a feed outage
    # while users and groups still read).
    outage_status: int | None = None
    page_cap: int = MAX_ACTIVITY_LIMIT
    embedded_key: str = "activities"   # UNCONFIRMED: the `_embedded` key of the collection
    order: str = "asc"                 # UNCONFIRMED: results by recordedAt ascending or "desc"
    action_types: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTION_TYPES))
    client_id: str = "00000000-0000-4000-8000-0000000c11e7"  # actors.client of recorded changes
    webhook_delay: float = 0.0         # seconds between a change and its delivery's first attempt
    webhook_retry: float = 0.5         # first back-off after a failed delivery, doubled per failure
    webhook_retry_max: float = 30.0
    webhook_max_age: float = DEFAULT_WEBHOOK_MAX_AGE
    webhook_timeout: float = 10.0
    # UNCONFIRMED: whether one POST carries one record (1) or a JSON list of up to this many.
    webhook_batch: int = 1
    seed: int | None = None            # of the per-record indexing lag (None: a random seed)

    def update(self, values: Mapping[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        for key, value in values.items():
            if key == "action_types":
                merged = dict(self.action_types)
                merged.update({str(k): str(v) for k, v in dict(value).items()})
                value = merged
            elif key == "old_range" and value not in ("error", "clip"):
                raise ValueError("old_range must be error or clip")
            elif key == "order" and value not in ("asc", "desc"):
                raise ValueError("order must be asc or desc")
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Activity:
    """One audit record and when it becomes visible (epoch seconds of the directory's clock)."""

    seq: int
    recorded: float
    visible: float
    event: str
    body: dict[str, Any]


@dataclass
class Subscription:
    """A registered webhook and its delivery queue."""

    id: str
    body: dict[str, Any]
    queue: collections.deque[Activity] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: int = 0
    attempts: int = 0
    dropped: int = 0
    last_status: int | None = None
    task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.body.get("enabled", True))

    def wants(self, activity: Activity) -> bool:
        options = self.body.get("filterOptions") or {}
        if activity.body["action"]["type"] not in (options.get("includedActionTypes") or ()):
            return False
        populations = options.get("includedPopulations") or ()
        if populations:
            ids = {(r.get("population") or {}).get("id") for r in activity.body["resources"]}
            wanted = {p.get("id") if isinstance(p, dict) else p for p in populations}
            if not ids & wanted:
                return False
        return True

    def public(self) -> dict[str, Any]:
        return {**self.body, "id": self.id}

    def stats(self) -> dict[str, Any]:
        return {"id": self.id, "delivered": self.delivered, "pending": len(self.queue),
                "attempts": self.attempts, "dropped": self.dropped, "lastStatus": self.last_status}


def stamp(seconds: float) -> str:
    """PingOne's timestamp form for epoch seconds (ms, 'Z')."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def encode_cursor(position: tuple[float, int]) -> str:
    return base64.urlsafe_b64encode(f"act:{position[0]!r}:{position[1]}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, recorded, seq = text.split(":")
        if kind != "act":
            raise ValueError(kind)
        return float(recorded), int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise FeedRequestError("INVALID_VALUE", "cursor", "The cursor is not valid.") from exc


class ActivityFeed:
    """The audit log of one environment, its query semantics and its subscriptions."""

    def __init__(self, directory: Directory, settings: FeedSettings | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.directory = directory
        self.settings = settings if settings is not None else FeedSettings()
        self.records: list[Activity] = []
        self.subscriptions: dict[str, Subscription] = {}
        self._rng = rng if rng is not None else random.Random(self.settings.seed)
        self._seq = 0
        self._bucket: TokenBucket | None = None
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        directory.activity_listeners.append(self.record)

    # --- recording -----------------------------------------------------------------------------

    def record(self, event: str, resources: tuple[dict[str, Any], ...]) -> Activity:
        """The listener `Directory` calls after each change."""
        settings = self.settings
        now = self.directory.clock()
        delay = max(0.0, settings.indexing_delay)
        lag = delay * (1.0 - min(1.0, max(0.0, settings.delay_spread)) * self._rng.random())
        self._seq += 1
        activity_id = str(uuid.uuid4())
        body: dict[str, Any] = {
            "id": activity_id,
            "recordedAt": stamp(now),
            "createdAt": stamp(now + lag),
            "correlationId": str(uuid.uuid4()),
            "actors": {"client": {"id": settings.client_id, "name": "provisiond sandbox admin",
                                  "type": "CLIENT", "environment": {"id": self.directory.env_id}}},
            "action": {"type": settings.action_types.get(event, event.upper()),
                       "description": _DESCRIPTIONS.get(event, event)},
            "resources": [dict(r) for r in resources],
            "result": {"status": "SUCCESS", "description": _DESCRIPTIONS.get(event, event)},
        }
        activity = Activity(self._seq, now, now + lag, event, body)
        self.records.append(activity)
        self._prune(now)
        for subscription in self.subscriptions.values():
            if subscription.enabled and subscription.wants(activity):
                subscription.queue.append(activity)
                subscription.wake.set()
        return activity

    def _prune(self, now: float) -> None:
        horizon = now - self.settings.retention
        drop = 0
        for activity in self.records:
            if activity.recorded >= horizon:
                break
            drop += 1
        if drop:
            del self.records[:drop]

    # --- the rate bucket -----------------------------------------------------------------------

    def take(self) -> float:
        """0.0 when this request may go on; else the seconds until the Audit bucket has a token."""
        settings = self.settings
        if settings.rate_rps <= 0:
            return 0.0
        bucket = self._bucket
        if bucket is None or bucket.rate != settings.rate_rps or bucket.burst != settings.rate_burst:
            bucket = self._bucket = TokenBucket(settings.rate_rps, max(1.0, settings.rate_burst))
        return bucket.take()

    # --- queries -------------------------------------------------------------------------------

    def compile(self, text: str | None) -> CompiledFilter:
        """The filter checked: it parses, uses only filterable attributes, and holds a date range."""
        if not text:
            raise FeedRequestError("INVALID_FILTER", "filter",
                                   "A filter with a recordedAt (or createdAt) range is required.")
        try:
            compiled = compile_filter(_aliased(text), ACTIVITY_DIALECT)
        except UnsupportedFilter as exc:
            detail = exc.detail
            for name, alias in _ALIASES.items():
                detail = detail.replace(alias, name)
            raise FeedRequestError("INVALID_FILTER", "filter", detail) from exc
        lower, _upper = _range(compiled)
        if lower is None or _upper is None:
            raise FeedRequestError("INVALID_FILTER", "filter",
                                   "The filter must hold a date range: recordedAt gt ... and recordedAt lt ...")
        horizon = self.directory.clock() - self.settings.retention
        if self.settings.old_range == "error" and _epoch(lower) < horizon:
            raise FeedRequestError("INVALID_VALUE", "filter",
                                   "The range starts before the retention period; restore the activities first.")
        return compiled

    def query(self, compiled: CompiledFilter, cursor: str | None, size: int) -> tuple[list[Activity], int, str | None]:
        """(this page, how many match in all, the next cursor or None)."""
        now = self.directory.clock()
        self._prune(now)
        matching = [a for a in self.records if a.visible <= now and _matches(compiled, a.body)]
        descending = self.settings.order == "desc"
        matching.sort(key=lambda a: (a.recorded, a.seq), reverse=descending)
        start = 0
        if cursor:
            position = decode_cursor(cursor)
            if descending:
                start = next((i for i, a in enumerate(matching) if (a.recorded, a.seq) < position), len(matching))
            else:
                start = next((i for i, a in enumerate(matching) if (a.recorded, a.seq) > position), len(matching))
        page = matching[start:start + size]
        following = None
        if start + size < len(matching) and page:
            following = encode_cursor((page[-1].recorded, page[-1].seq))
        return page, len(matching), following

    # --- subscriptions -------------------------------------------------------------------------

    def subscribe(self, body: dict[str, Any]) -> Subscription:
        """Register a webhook (pingone.md §9.2); ValueError names what is wrong with *body*."""
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise FeedRequestError("SIZE_LIMIT_EXCEEDED", "subscriptions",
                                   f"At most {MAX_SUBSCRIPTIONS} subscriptions per environment.")
        if not isinstance(body.get("name"), str) or not body["name"]:
            raise FeedRequestError("REQUIRED_VALUE", "name", "name is required.")
        if not isinstance(body.get("enabled"), bool):
            raise FeedRequestError("REQUIRED_VALUE", "enabled", "enabled is required.")
        if body.get("format") not in WEBHOOK_FORMATS:
            raise FeedRequestError("INVALID_VALUE", "format", f"format must be one of {list(WEBHOOK_FORMATS)}.")
        endpoint = body.get("httpEndpoint")
        if not isinstance(endpoint, dict) or not isinstance(endpoint.get("url"), str):
            raise FeedRequestError("REQUIRED_VALUE", "httpEndpoint.url", "httpEndpoint.url is required.")
        headers = endpoint.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise FeedRequestError("INVALID_VALUE", "httpEndpoint.headers", "headers must map names to strings.")
        options = body.get("filterOptions")
        if not isinstance(options, dict) or not isinstance(options.get("includedActionTypes"), list) \
                or not options["includedActionTypes"]:
            raise FeedRequestError("REQUIRED_VALUE", "filterOptions.includedActionTypes",
                                   "filterOptions.includedActionTypes is required.")
        for key in ("includedPopulations", "includedApplications"):
            if len(options.get(key) or ()) > 10:
                raise FeedRequestError("SIZE_LIMIT_EXCEEDED", f"filterOptions.{key}", "At most 10.")
        subscription = Subscription(str(uuid.uuid4()), dict(body))
        self.subscriptions[subscription.id] = subscription
        if self._running:
            self._start(subscription)
        return subscription

    def unsubscribe(self, subscription_id: str) -> bool:
        subscription = self.subscriptions.pop(subscription_id, None)
        if subscription is None:
            return False
        if subscription.task is not None:
            subscription.task.cancel()
        return True

    async def start(self) -> None:
        """Begin delivering (the app's startup): one task per subscription."""
        self._running = True
        for subscription in self.subscriptions.values():
            self._start(subscription)

    async def stop(self) -> None:
        self._running = False
        tasks = [s.task for s in self.subscriptions.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        for subscription in self.subscriptions.values():
            subscription.task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start(self, subscription: Subscription) -> None:
        if subscription.task is None or subscription.task.done():
            subscription.task = asyncio.get_running_loop().create_task(self._deliver(subscription))

    async def _deliver(self, subscription: Subscription) -> None:
        """Deliver the queue in order; a failing head blocks the rest until it succeeds or expires."""
        backoff = self.settings.webhook_retry
        while True:
            if not subscription.queue:
                subscription.wake.clear()
                await subscription.wake.wait()
                continue
            head = subscription.queue[0]
            wait = head.recorded + self.settings.webhook_delay - self.directory.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.directory.clock() - head.recorded > self.settings.webhook_max_age:
                subscription.queue.popleft()
                subscription.dropped += 1
                continue
            batch = [subscription.queue[i] for i in range(min(max(1, self.settings.webhook_batch),
                                                                 len(subscription.queue)))]
            if await self._post(subscription, batch):
                for _ in batch:
                    subscription.queue.popleft()
                subscription.delivered += len(batch)
                backoff = self.settings.webhook_retry
            else:
                await asyncio.sleep(backoff)
                backoff = min(self.settings.webhook_retry_max, backoff * 2)

    async def _post(self, subscription: Subscription, batch: list[Activity]) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout))
        endpoint = subscription.body["httpEndpoint"]
        headers = {"Content-Type": "application/json", **endpoint.get("headers", {})}
        payload: Any = batch[0].body if self.settings.webhook_batch <= 1 else [a.body for a in batch]
        subscription.attempts += 1
        try:
            async with self._session.post(endpoint["url"], json=payload, headers=headers) as response:
                await response.read()
                subscription.last_status = response.status
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            subscription.last_status = None
            return False

    # --- inspection ----------------------------------------------------------------------------

    def dump(self) -> list[dict[str, Any]]:
        """Every record held, visible or not, oldest first (for tests and `/_admin/activities`)."""
        now = self.directory.clock()
        return [{**a.body, "_visible": a.visible <= now, "_visibleAt": stamp(a.visible), "_event": a.event}
                for a in self.records]


def _range(compiled: CompiledFilter) -> tuple[str | None, str | None]:
    """The lower and upper bound of the top-level date range (recordedAt or createdAt), if any."""
    root = compiled.root
    parts: Iterable[Any] = root.parts if isinstance(root, _And) else (root,)
    lower: dict[str, str] = {}
    upper: dict[str, str] = {}
    for part in parts:
        if isinstance(part, _Compare) and ".".join(part.path) in _RANGE_ATTRIBUTES:
            name = ".".join(part.path)
            if part.op in ("gt", "ge"):
                lower[name] = part.value
            elif part.op in ("lt", "le"):
                upper[name] = part.value
    for name in _RANGE_ATTRIBUTES:
        if name in lower and name in upper:
            return lower[name], upper[name]
    return None, None


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _aliased(text: str) -> str:
    """*text* with the three-part attribute names replaced by their aliases (outside strings)."""
    parts = text.split('"')
    for index in range(0, len(parts), 2):
        for name, alias in _ALIASES.items():
            parts[index] = parts[index].replace(name, alias)
    return '"'.join(parts)


def _matches(compiled: CompiledFilter, body: dict[str, Any]) -> bool:
    """`resources.*` conditions hold when one resource satisfies them: try each as the only one."""
    actors = body.get("actors") or {}
    view = {**body, "actorsUserId": (actors.get("user") or {}).get("id"),
            "actorsClientId": (actors.get("client") or {}).get("id")}
    for resource in body.get("resources") or [{}]:
        view["resources"] = resource
        view["resourcesPopulationId"] = (resource.get("population") or {}).get("id")
        if compiled.matches(view):
            return True
    return False

