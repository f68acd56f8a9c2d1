"""The PingOne Platform API client: worker-app token, one GET chokepoint, HAL paging.

Layers, top to bottom:

    iter_users / list_groups / group_parents / group_member_ids / get_user / find_user
        -> pages(path, key)      follows `_links.next.href` exactly as the server gave it
        -> get(url_or_path)      THE chokepoint: token, timeout, retries, status -> typed error
        -> token()               cached client_credentials token, renewed at 80% of its lifetime

Every non-2xx answer becomes an exception through `daemon.errors.error_for_status` in `_send`;
aiohttp's own exceptions are mapped there too (timeouts -> RequestTimeout, connection trouble
-> ConnectionFailed). The client secret and tokens never appear in an exception or a repr.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import anyio
from yarl import URL

from daemon.backoff import RetryPolicy, parse_retry_after, retry
from daemon.errors import (
    ConnectionFailed,
    MalformedResponse,
    NotFound,
    ProvisiondError,
    RequestTimeout,
    TransientError,
    Unauthorized,
    error_for_status,
)
from daemon.responses import read_body

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000  # the spec's maximum `limit` for users and groups (pingone.md §2.2)
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 4
MAX_BODY_BYTES = 256 << 20   # a larger answer is refused (MalformedResponse)
DEFAULT_POLICY = RetryPolicy()
DEFAULT_CLIENT_AUTH = "basic"
CLIENT_AUTH_METHODS = ("basic", "post")
# Renew the token once this fraction of `expires_in` has passed (pingone.md §1.2).
DEFAULT_TOKEN_RENEW_FRACTION = 0.8
# PingOne documents a 1 h token lifetime; used only when `expires_in` is missing.
DEFAULT_TOKEN_LIFETIME = 3600.0
# The `_embedded` key of GET /groups/{id}/memberOfGroups is UNCONFIRMED (pingone.md §2.1): probably
# `groupMemberships` like the user endpoint. The keys are tried in order; change them here if needed.
DEFAULT_NESTING_KEYS: tuple[str, ...] = ("groupMemberships", "groups")
# The `_embedded` key of GET /activities is UNCONFIRMED (pingone.md §9.1): tried in order.
DEFAULT_ACTIVITY_KEYS: tuple[str, ...] = ("activities",)
# Token endpoint answers that mean "these credentials are refused" although the status is 400
# (RFC 6749 §5.2 lets a server answer invalid_client with 400 or 401).
_REFUSED_OAUTH_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

Page = list[dict[str, Any]]


class _Secret(str):
    """A str whose repr is masked: tracebacks rendered with locals show ``'***'``, not the value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class AmbiguousUser(ProvisiondError):
    """`find_user` found more than one PingOne user for a reference."""


class _RetryableMalformed(TransientError):
    """Carries a MalformedResponse through `retry` (a truncated page may be a network hiccup)."""

    def __init__(self, original: MalformedResponse) -> None:
        super().__init__(original.detail, method=original.method, path=original.path)
        self.original = original


class PingOneClient:
    """Reads users, groups and memberships from one PingOne environment.

    *api_url* is the API base including ``/v1`` (``https://api.pingone.com/v1``); *auth_url* the
    auth base without the environment id (``https://auth.pingone.com``). The session is the
    caller's: `close` does not close it.
    """

    __slots__ = (
        "_api_root",
        "_client_id",
        "_client_secret",
        "_env_root",
        "_limiter",
        "_log",
        "_nesting_keys",
        "_page_size",
        "_policy",
        "_renew_at",
        "_retry_malformed",
        "_session",
        "_timeout",
        "_token",
        "_token_lock",
        "_token_url",
        "client_auth",
        "environment_id",
        "stats",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_url: str,
        auth_url: str,
        environment_id: str,
        client_id: str,
        client_secret: str,
        client_auth: str = DEFAULT_CLIENT_AUTH,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        policy: RetryPolicy = DEFAULT_POLICY,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry_malformed: bool = True,
        nesting_keys: tuple[str, ...] = DEFAULT_NESTING_KEYS,
        log: Any = None,
    ) -> None:
        if ":" in client_id:
            raise ValueError("client_id must not contain ':'")
        if client_auth not in CLIENT_AUTH_METHODS:
            raise ValueError(f"client_auth must be one of {CLIENT_AUTH_METHODS}, not {client_auth!r}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be within 1..{MAX_PAGE_SIZE}")
        if timeout <= 0 or concurrency < 1:
            raise ValueError("timeout must be > 0 and concurrency >= 1")
        self._session = session
        self._api_root = URL(api_url.rstrip("/"))
        self.environment_id = environment_id
        self._env_root = self._api_root / "environments" / environment_id
        self._token_url = URL(auth_url.rstrip("/")) / environment_id / "as" / "token"
        self._client_id = client_id
        self._client_secret = _Secret(client_secret)
        self.client_auth = client_auth
        self._page_size = page_size
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._policy = policy
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._token_lock = anyio.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self._retry_malformed = retry_malformed
        self._nesting_keys = nesting_keys
        self._log = log
        self.stats: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return (f"PingOneClient(api={str(self._api_root)!r}, environment_id={self.environment_id!r}, "
                f"client_id={self._client_id!r}, client_auth={self.client_auth!r}, secret=***)")

    # -- token ---------------------------------------------------------------------------------

    async def token(self) -> str:
        """The current access token; fetched when missing or past 80% of its lifetime."""
        if self._token is not None and time.monotonic() < self._renew_at:
            return self._token
        async with self._token_lock:
            if self._token is not None and time.monotonic() < self._renew_at:
                return self._token
            return await self._fetch_token()

    async def _renew(self, stale: str) -> str:
        """Replace *stale* (refused with a 401) unless another task already did."""
        async with self._token_lock:
            if self._token is not None and self._token != stale and time.monotonic() < self._renew_at:
                return self._token
            self._token = None
            return await self._fetch_token()

    async def _fetch_token(self) -> str:
        """POST client_credentials to the token endpoint (caller holds the lock)."""
        self.stats["token"] += 1
        form = {"grant_type": "client_credentials"}
        basic: str | None = None
        if self.client_auth == "basic":
            # Sent as given, like Ping's `curl -u` examples; RFC 6749 §2.3.1's form-encoding of
            # the two parts changes nothing for PingOne's UUID ids and [A-Za-z0-9~._-] secrets.
            basic = _Secret("Basic " + base64.b64encode(
                f"{self._client_id}:{self._client_secret}".encode()).decode("ascii"))
        else:
            form["client_id"] = self._client_id
            form["client_secret"] = self._client_secret

        async def attempt() -> dict[str, Any]:
            return await self._send("POST", self._token_url, data=form, authorization=basic,
                                    token_endpoint=True)

        started = time.monotonic()
        body = await self._retrying(attempt)
        access = body.pop("access_token", None)
        if not isinstance(access, str) or not access:
            raise MalformedResponse("token response has no access_token", method="POST",
                                    path=self._token_url.path)
        expires_in = body.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        if isinstance(expires_in, str):
            try:
                expires_in = float(expires_in)
            except ValueError:
                expires_in = DEFAULT_TOKEN_LIFETIME
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = DEFAULT_TOKEN_LIFETIME
        token = self._token = _Secret(access)
        self._renew_at = started + float(expires_in) * DEFAULT_TOKEN_RENEW_FRACTION
        return token

    # -- the chokepoint ------------------------------------------------------------------------

    async def get(self, url_or_path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET a JSON object. A path is relative to ``{api_url}/environments/{env}``; an absolute
        URL (a `_links` href) is used exactly as given. Transient failures are retried; a 401
        renews the token once; the answer must be a JSON object."""
        url = self._resolve(url_or_path)
        await self.token()
        used: list[str] = []

        async def attempt() -> dict[str, Any]:
            # The freshest cached token, without fetching: a concurrent renewal is picked up.
            bearer = self._token or ""
            used.append(bearer)
            return await self._send("GET", url, params=params, bearer=bearer)

        try:
            return await self._retrying(attempt)
        except Unauthorized:
            self.stats["401"] += 1
            await self._renew(stale=used[-1] if used else "")
            return await self._retrying(attempt)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await retry(call, self._policy, on_retry=self._on_retry)
        except _RetryableMalformed as exc:
            raise exc.original from exc.__cause__

    def _on_retry(self, attempt: int, exc: TransientError, wait: float) -> None:
        """Every retry is logged (`source.retry`): a hanging PingOne shows once per request
        timeout, not only when the snapshot gives up."""
        self.stats["retries"] += 1
        if self._log is not None:
            self._log.warning("source.retry", attempt=attempt, wait_s=round(wait, 2), reason=exc.reason,
                              http_status=exc.status, error=str(exc))

    def _resolve(self, url_or_path: str) -> URL:
        if url_or_path.startswith(("http://", "https://")):
            url = URL(url_or_path, encoded=True)
        elif url_or_path.startswith("/"):
            url = self._api_root.join(URL(url_or_path, encoded=True))
        else:
            return URL(f"{self._env_root}/{url_or_path.lstrip('/')}", encoded=True)
        if url.origin() != self._api_root.origin():
            # A link to another host would receive our bearer token: refuse it.
            raise MalformedResponse(f"link to a foreign origin {url.origin()}", method="GET",
                                    path=url.path)
        return url

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        params: Mapping[str, str] | None = None,
        bearer: str | None = None,
        data: Mapping[str, str] | None = None,
        authorization: str | None = None,
        token_endpoint: bool = False,
    ) -> dict[str, Any]:
        """One HTTP exchange. Every outcome that is not a JSON object in a 2xx raises here."""
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = _Secret(f"Bearer {bearer}")
        elif authorization is not None:
            headers["Authorization"] = authorization
        path = url.path
        self.stats["requests"] += 1
        try:
            async with self._limiter, self._session.request(
                method, url, params=params, headers=headers, data=data,
                timeout=self._timeout, allow_redirects=False,
            ) as resp:
                # Not resp.read(): it keeps the body on the response object, which reference
                # cycles can hold well after the page is parsed (~100 KB per page).
                raw = await read_body(resp, MAX_BODY_BYTES)
                status = resp.status
                retry_after_header = resp.headers.get("Retry-After")
        except TimeoutError as exc:
            self.stats["timeouts"] += 1
            raise RequestTimeout(f"no answer within {self._timeout.total} s", method=method,
                                 path=path) from exc
        except aiohttp.InvalidURL as exc:
            raise MalformedResponse("invalid URL", method=method, path=path) from exc
        except aiohttp.ClientError as exc:
            # Connection refused/reset/dropped, payload cut short, unparsable HTTP.
            self.stats["connection_errors"] += 1
            raise ConnectionFailed(type(exc).__name__, method=method, path=path) from exc
        if len(raw) > MAX_BODY_BYTES:
            self.stats["malformed"] += 1
            raise MalformedResponse(f"response larger than {MAX_BODY_BYTES} bytes", status=status,
                                    method=method, path=path)
        if status >= 300:
            body: Any = _loads(raw)
            if body is None:
                body = raw.decode("utf-8", "replace")
            retry_after = parse_retry_after(retry_after_header)
            if status == 429:
                self.stats["429"] += 1
            elif status >= 500:
                self.stats["5xx"] += 1
            error = error_for_status(status, body, method=method, path=path, retry_after=retry_after)
            if (token_endpoint and status == 400 and isinstance(body, dict)
                    and body.get("error") in _REFUSED_OAUTH_ERRORS):
                error = Unauthorized(error.detail, method=method, path=path, code=error.code)
            raise error
        parsed = _loads(raw)
        if not isinstance(parsed, dict):
            self.stats["malformed"] += 1
            what = "not JSON" if parsed is None else f"JSON {type(parsed).__name__}, not an object"
            malformed = MalformedResponse(f"HTTP {status} body is {what}", method=method, path=path)
            if self._retry_malformed:
                raise _RetryableMalformed(malformed)
            raise malformed
        return parsed

    # -- collections ---------------------------------------------------------------------------

    async def pages(self, path: str, key: str, params: Mapping[str, str] | None = None, *,
                    rejected: list[str] | None = None) -> AsyncIterator[Page]:
        """Yield `_embedded[key]` of each page, following `_links.next.href` as given.

        An item that is not an object with a non-empty string `id` fails the page, unless a
        `rejected` list is given: then the item is dropped and described there, and after the
        last page so is a listing whose items do not add up to the `count` it reported."""
        async for page in self._pages(path, (key,), params, rejected):
            yield page

    async def _pages(self, path: str, keys: tuple[str, ...], params: Mapping[str, str] | None,
                     rejected: list[str] | None = None) -> AsyncIterator[Page]:
        query = {"limit": str(self._page_size), **(params or {})}
        target: str | None = path
        first = True
        seen: set[str] = set()
        counts: list[int] = []     # the `count` each page reported (where it reported one)
        arrived = 0                # items that arrived, dropped ones included
        while target is not None:
            body = await self.get(target, query if first else None)
            where = target if first else URL(target, encoded=True).path
            dropped = len(rejected) if rejected is not None else 0
            items = _embedded(body, keys, where, rejected)
            arrived += len(items) + (len(rejected) - dropped if rejected is not None else 0)
            reported = body.get("count")
            if isinstance(reported, int) and not isinstance(reported, bool):
                counts.append(reported)
            target = _next_href(body, where)
            del body  # only the items live on
            if target is not None:
                if target in seen:
                    raise MalformedResponse("next link repeats an earlier page", method="GET",
                                            path=URL(target, encoded=True).path)
                seen.add(target)
            first = False
            self.stats["pages"] += 1
            yield items
        if rejected is not None:
            mismatch = _count_mismatch(counts, arrived)
            if mismatch:
                rejected.append(mismatch)

    async def iter_users(self, filter: str | None = None, *, rejected: list[str] | None = None,
                         ) -> AsyncIterator[Page]:
        """All users (optionally filtered), page by page; `rejected` as for `pages`."""
        async for page in self.pages("users", "users", {"filter": filter} if filter else None,
                                     rejected=rejected):
            yield page

    async def list_groups(self, filter: str | None = None) -> list[dict[str, Any]]:
        """All groups (optionally filtered)."""
        out: list[dict[str, Any]] = []
        async for page in self.pages("groups", "groups", {"filter": filter} if filter else None):
            out.extend(page)
        return out

    async def group_parents(self, group_id: str) -> list[str]:
        """Ids of the groups *group_id* is nested in (GET /groups/{id}/memberOfGroups)."""
        out: list[str] = []
        async for page in self._pages(f"groups/{_segment(group_id)}/memberOfGroups",
                                      self._nesting_keys, None):
            out.extend(item["id"] for item in page)
        return out

    async def group_member_ids(self, group_id: str, *, rejected: list[str] | None = None) -> list[str]:
        """Ids of the users in the group, by ``memberOfGroups[id eq "G"]``; `rejected` as for `pages`.

        Taken as the DIRECT members. Whether PingOne also returns nested or dynamic members
        here is UNCONFIRMED (pingone.md §4.3); the snapshot flattens nesting itself either way.
        """
        out: list[str] = []
        flt = f"memberOfGroups[id eq {_quoted(group_id)}]"
        async for page in self.pages("users", "users", {"filter": flt}, rejected=rejected):
            out.extend(item["id"] for item in page)
        return out

    async def get_user(self, user_id: str) -> dict[str, Any]:
        """One user, with `memberOfGroupIDs`."""
        user = await self.get(f"users/{_segment(user_id)}", {"include": "memberOfGroupIDs"})
        if not isinstance(user.get("id"), str):
            raise MalformedResponse("user without an id", method="GET", path=f"users/{user_id}")
        return user

    async def find_user(self, ref: str) -> dict[str, Any] | None:
        """A user by id, else by username, else by email; None when nothing matches.

        Raises `AmbiguousUser` when several users share the username or email.
        """
        if _UUID.match(ref):
            try:
                return await self.get_user(ref)
            except NotFound:
                pass
        for attribute in ("username", "email"):
            matches: list[dict[str, Any]] = []
            async for page in self.iter_users(f"{attribute} eq {_quoted(ref)}"):
                matches.extend(page)
            if len(matches) > 1:
                raise AmbiguousUser(f"{len(matches)} PingOne users have {attribute} {ref!r}")
            if matches:
                return await self.get_user(matches[0]["id"])
        return None

    # -- the change feed (pingone.md §9; daemon/source/changes.py) ------------------------------

    async def activities(self, since: str, until: str) -> list[dict[str, Any]]:
        """The audit activities recorded strictly between *since* and *until* (PingOne timestamps),
        every page. GET, not POST: the filter holds two timestamps and nothing personal. The
        `_embedded` key is UNCONFIRMED (`DEFAULT_ACTIVITY_KEYS`)."""
        flt = f"recordedAt gt {_quoted(since)} and recordedAt lt {_quoted(until)}"
        out: list[dict[str, Any]] = []
        async for page in self._pages("activities", DEFAULT_ACTIVITY_KEYS, {"filter": flt}):
            out.extend(page)
        return out

    async def get_group(self, group_id: str) -> dict[str, Any]:
        """One group; `NotFound` when it no longer exists."""
        group = await self.get(f"groups/{_segment(group_id)}")
        if not isinstance(group.get("id"), str):
            raise MalformedResponse("group without an id", method="GET", path=f"groups/{group_id}")
        return group

    async def close(self) -> None:
        """Nothing to release: the session belongs to the caller."""


def _loads(raw: bytes) -> Any:
    """Parsed JSON, or None when *raw* is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _embedded(body: dict[str, Any], keys: tuple[str, ...], where: str,
              rejected: list[str] | None = None) -> Page:
    """`_embedded[key]` checked: a list of objects each with a non-empty string `id`.

    A bad item raises, or with `rejected` is dropped and described there (never its content:
    it may be huge or carry anything)."""
    embedded = body.get("_embedded")
    if embedded is None and body.get("count") == 0:
        return []  # an explicit empty result that leaves the envelope out
    if not isinstance(embedded, dict):
        raise MalformedResponse("page has no _embedded object", method="GET", path=where)
    items: Any = None
    for key in keys:
        if key in embedded:
            items = embedded[key]
            break
    if not isinstance(items, list):
        raise MalformedResponse(f"page has no _embedded.{keys[0]} list", method="GET", path=where)
    bad = [i for i, item in enumerate(items)
           if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]]
    if not bad:
        return items
    if rejected is None:
        raise MalformedResponse("page item without a string id", method="GET", path=where)
    for i in bad:
        rejected.append(f"item {i + 1} of {len(items)} dropped: {_item_problem(items[i])}")
    skip = set(bad)
    return [item for i, item in enumerate(items) if i not in skip]


def _count_mismatch(counts: list[int], arrived: int) -> str | None:
    """Why a listing is short or long against the `count` PingOne reported for it, or None.

    `count` is optional (pingone.md §1: it may be missing for very large sets): a listing
    without one is taken as it is. Every page reports the count of the whole result set, so
    pages that disagree mean the set changed (or was lost) while it was read."""
    if not counts:
        return None
    if len(set(counts)) > 1:
        seen = ", ".join(str(c) for c in dict.fromkeys(counts))
        return f"listing count changed while it was read ({seen}); {arrived} item(s) arrived"
    if counts[0] != arrived:
        return f"listing reported count {counts[0]} but {arrived} item(s) arrived"
    return None


def _item_problem(item: Any) -> str:
    """Why a page item is unusable, in words that never quote its content."""
    if not isinstance(item, dict):
        return f"JSON {type(item).__name__}, not an object"
    if "id" not in item:
        return "no id"
    ident = item["id"]
    if isinstance(ident, str):
        return "empty id"
    return f"id is JSON {type(ident).__name__}, not a string"


def _next_href(body: dict[str, Any], where: str) -> str | None:
    links = body.get("_links")
    if links is None:
        return None
    if not isinstance(links, dict):
        raise MalformedResponse("_links is not an object", method="GET", path=where)
    nxt = links.get("next")
    if nxt is None:
        return None
    href = nxt.get("href") if isinstance(nxt, dict) else None
    if not isinstance(href, str) or not href:
        raise MalformedResponse("_links.next has no href", method="GET", path=where)
    return href


def _segment(value: str) -> str:
    """*value* as one URL path segment."""
    return quote(value, safe="")


def _quoted(value: str) -> str:
    """*value* as a filter string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
