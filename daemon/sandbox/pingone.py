"""The PingOne emulator: token endpoint, Users/Groups read API, admin routes, fault injection.

Wire formats follow ../shared/reference/pingone.md (§1.2 token, §2 collections, §3 users, §4 groups,
§5.1 errors, §7 checklist). Routes:

- `POST /{envId}/as/token` (auth base = the server's base URL);
- `GET /v1/environments/{envId}/users|groups[/{id}[/memberOfGroups]]` (API base = base URL + "/v1");
- `GET|POST /v1/environments/{envId}/activities` (the audit log) and
  `POST|GET /v1/environments/{envId}/subscriptions[/{id}]` (webhooks): `daemon/sandbox/activities.py`;
- `/_admin/...`: mutations and inspection for tests, never faulted, no auth.

Paging is keyset paging over the directory's insertion order: the opaque cursor holds the last
sequence number served, so users added or deleted between pages never make an unchanged user be
skipped or served twice. Knobs mark what the reference leaves UNCONFIRMED.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import math
import secrets
import time
import uuid
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from daemon.pingone_filter import (
    DEFAULT_GROUP_DIALECT,
    DEFAULT_USER_DIALECT,
    CompiledFilter,
    FilterDialect,
    UnsupportedFilter,
    compile_filter,
)
from daemon.sandbox.activities import (
    DEFAULT_ACTIVITY_LIMIT,
    ActivityFeed,
    FeedRequestError,
    FeedSettings,
)
from daemon.sandbox.directory import Directory, DirectoryConflict, Ordering, UnknownObject
from daemon.sandbox.faults import Faults, fault_middleware

DEFAULT_CLIENT_ID = "provisiond-sandbox"
DEFAULT_CLIENT_SECRET = "sandbox-secret-not-for-production"
DEFAULT_TOKEN_TTL = 3600.0
DEFAULT_PAGE_CAP = 1000
MAX_LIMIT = 1000
DEFAULT_REQUEST_LOG_SIZE = 10_000
TRANSACTION_HEADER = "X-Ping-External-Transaction-ID"
ADMIN_PREFIX = "/_admin"
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- error bodies (P1Error, pingone.md §5.1) -----------------------------------------------------

def _dumps(body: Any) -> bytes:
    # ASCII escapes: valid UTF-8 JSON and faster to encode than ensure_ascii=False.
    return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_dumps(body), content_type=_JSON, charset="utf-8",
                        headers=headers)


def p1_error(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
             headers: dict[str, str] | None = None) -> web.Response:
    """A PingOne error envelope: {id, code, message, details?}."""
    body: dict[str, Any] = {"id": str(uuid.uuid4()), "code": code, "message": message}
    if details:
        body["details"] = details
    return json_response(body, status, headers)


def invalid_data(detail_code: str, target: str, message: str, **inner: Any) -> web.Response:
    detail: dict[str, Any] = {"code": detail_code, "target": target, "message": message}
    if inner:
        detail["innerError"] = inner
    return p1_error(400, "INVALID_DATA", "The request could not be completed. One or more validation "
                    "errors were in the request.", [detail])


def not_found(message: str = "The requested resource was not found.") -> web.Response:
    return p1_error(404, "NOT_FOUND", message)


def fault_error_response(status: int, message: str) -> web.Response:
    """Injected 5xx (and the 504 after a hang): `UNEXPECTED_ERROR`."""
    return p1_error(status, "UNEXPECTED_ERROR", f"An unexpected error occurred ({message}).")


def fault_limit_response(retry_after: float | None) -> web.Response:
    """Injected 429 `REQUEST_LIMITED`; Retry-After in seconds when given.

    Real PingOne sends whole seconds; a fractional value is sent only when a test asks for one.
    """
    headers: dict[str, str] = {}
    inner: dict[str, Any] = {}
    if retry_after is not None:
        text = str(int(retry_after)) if float(retry_after).is_integer() else repr(float(retry_after))
        headers["Retry-After"] = text
        inner["retryAfter"] = retry_after
    detail: dict[str, Any] = {"code": "LIMIT_EXCEEDED", "message": "The request rate limit was exceeded."}
    if inner:
        detail["innerError"] = inner
    return p1_error(429, "REQUEST_LIMITED", "The request could not be completed. "
                    "You have exceeded your request limit.", [detail], headers)


class _BadRequest(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# --- cursor --------------------------------------------------------------------------------------

def encode_cursor(kind: str, key: int) -> str:
    """Opaque, URL-safe: base64url of `kind:key`, unpadded."""
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        found, _, key = text.partition(":")
        if found != kind:
            raise ValueError(found)
        return int(key)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise _BadRequest(invalid_data("INVALID_VALUE", "cursor", "The cursor is not valid.")) from exc


class PingOneEmulator:
    """One PingOne environment served over HTTP; tests read and change its state directly."""

    def __init__(self, directory: Directory, *, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, auth_method: str = "basic",
                 token_ttl: float = DEFAULT_TOKEN_TTL, users_page_cap: int = DEFAULT_PAGE_CAP,
                 groups_page_cap: int = DEFAULT_PAGE_CAP, faults: Faults | None = None,
                 member_filter_transitive: bool = False, dynamic_membership_type: str = "INDIRECT",
                 member_of_ids_transitive: bool = True, prerender_users: bool = True,
                 request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
                 feed_settings: FeedSettings | None = None) -> None:
        if auth_method not in ("basic", "post"):
            raise ValueError(f"auth_method must be basic or post, not {auth_method!r}")
        if dynamic_membership_type not in ("DIRECT", "INDIRECT"):
            raise ValueError("dynamic_membership_type must be DIRECT or INDIRECT")
        self.directory = directory
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth_method = auth_method
        self.token_ttl = token_ttl
        self.users_page_cap = users_page_cap
        self.groups_page_cap = groups_page_cap
        self.faults = faults if faults is not None else Faults()
        # UNCONFIRMED (pingone.md §4.3, §8): whether memberOfGroups[id eq G] also matches members of
        # groups nested in G. Dynamic (userFilter) members always match.
        self.member_filter_transitive = member_filter_transitive
        # UNCONFIRMED: the `type` of a dynamic membership in users/{id}/memberOfGroups.
        self.dynamic_membership_type = dynamic_membership_type
        # UNCONFIRMED: whether include=memberOfGroupIDs|Names lists nested (indirect) groups too.
        self.member_of_ids_transitive = member_of_ids_transitive
        # UNCONFIRMED (pingone.md §9.4): whether GET users/{id} honours include=memberOfGroupIDs.
        # False answers the user without it (the daemon then reads the groups a change names).
        self.user_read_includes_groups = True
        self.counters: collections.Counter[str] = collections.Counter()
        self.request_log: list[tuple[str, str]] = []
        self.request_log_size = request_log_size
        self.prerender_users = prerender_users
        self._tokens: dict[str, float] = {}
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._filters: dict[tuple[str, str], CompiledFilter] = {}
        self._matches: dict[tuple[str, str], tuple[int, Ordering]] = {}
        self._user_json: dict[str, tuple[int, bytes]] = {}
        # The audit log and webhooks (pingone.md §9): every mutation of `directory` is recorded.
        self.feed = ActivityFeed(directory, feed_settings)

    # --- the app -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """A fresh aiohttp application serving this emulator."""
        app = web.Application(middlewares=[
            self._outer_middleware,
            fault_middleware(self.faults, error_response=fault_error_response,
                             limit_response=fault_limit_response, exclude_prefixes=(ADMIN_PREFIX,)),
        ])
        app.on_shutdown.append(self._cancel_in_flight)
        app.on_startup.append(self._feed_start)
        app.on_cleanup.append(self._feed_stop)
        if self.prerender_users:
            app.on_startup.append(self._prerender)
        api = "/v1/environments/{env}"
        routes = [
            ("POST", "/{env}/as/token", self._token, "token"),
            ("GET", f"{api}/users", self._users_list, "users.list"),
            ("GET", f"{api}/users/{{id}}", self._users_get, "users.get"),
            ("GET", f"{api}/users/{{id}}/memberOfGroups", self._users_member_of, "users.memberOfGroups"),
            ("GET", f"{api}/groups", self._groups_list, "groups.list"),
            ("GET", f"{api}/groups/{{id}}", self._groups_get, "groups.get"),
            ("GET", f"{api}/groups/{{id}}/memberOfGroups", self._groups_member_of, "groups.memberOfGroups"),
            ("GET", f"{api}/activities", self._activities, "activities.list"),
            ("POST", f"{api}/activities", self._activities, "activities.search"),
            ("POST", f"{api}/subscriptions", self._subscription_create, "subscriptions.create"),
            ("GET", f"{api}/subscriptions", self._subscription_list, "subscriptions.list"),
            ("GET", f"{api}/subscriptions/{{id}}", self._subscription_get, "subscriptions.get"),
            ("DELETE", f"{api}/subscriptions/{{id}}", self._subscription_delete, "subscriptions.delete"),
            ("GET", "/_admin/activities", self._admin_activities, "admin.activities"),
            ("GET", "/_admin/activities/settings", self._admin_feed_settings, "admin.activities.settings"),
            ("POST", "/_admin/activities/settings", self._admin_feed_settings, "admin.activities.set"),
            ("GET", "/_admin/subscriptions", self._admin_subscriptions, "admin.subscriptions"),
            ("POST", "/_admin/users", self._admin_user_create, "admin.users.create"),
            ("PATCH", "/_admin/users/{id}", self._admin_user_update, "admin.users.update"),
            ("DELETE", "/_admin/users/{id}", self._admin_user_delete, "admin.users.delete"),
            ("PUT", "/_admin/users/{id}/enabled", self._admin_user_enabled, "admin.users.enabled"),
            ("POST", "/_admin/groups", self._admin_group_create, "admin.groups.create"),
            ("PATCH", "/_admin/groups/{id}", self._admin_group_update, "admin.groups.update"),
            ("DELETE", "/_admin/groups/{id}", self._admin_group_delete, "admin.groups.delete"),
            ("POST", "/_admin/groups/{id}/members", self._admin_member_add, "admin.members.add"),
            ("DELETE", "/_admin/groups/{id}/members/{user}", self._admin_member_remove,
             "admin.members.remove"),
            ("POST", "/_admin/groups/{id}/parents", self._admin_nest, "admin.parents.add"),
            ("DELETE", "/_admin/groups/{id}/parents/{parent}", self._admin_unnest, "admin.parents.remove"),
            ("GET", "/_admin/state", self._admin_state, "admin.state"),
            ("GET", "/_admin/counters", self._admin_counters, "admin.counters"),
            ("POST", "/_admin/faults", self._admin_faults, "admin.faults"),
            ("POST", "/_admin/revoke-tokens", self._admin_revoke, "admin.revoke"),
        ]
        for method, path, handler, name in routes:
            app.router.add_route(method, path, handler, name=name)
        return app

    def revoke_tokens(self) -> None:
        """Forget every issued token: the next API call with one gets 401."""
        self._tokens.clear()

    async def _cancel_in_flight(self, _app: web.Application) -> None:
        # Hung requests would otherwise hold the runner's cleanup for its whole shutdown timeout.
        for task in list(self._in_flight):
            task.cancel()

    @web.middleware
    async def _outer_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count and log, echo the transaction id, turn router errors into P1Error envelopes."""
        route = request.match_info.route.name or "unknown"
        self.counters[route] += 1
        log = self.request_log
        log.append((request.method, request.raw_path))
        if len(log) > self.request_log_size + self.request_log_size // 10:
            del log[: len(log) - self.request_log_size]
        txn = request.headers.get(TRANSACTION_HEADER) or str(uuid.uuid4())
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            response = await handler(request)
        except _BadRequest as exc:
            response = exc.response
        except web.HTTPException as exc:
            if exc.status == 404:
                response = not_found()
            elif exc.status == 405:
                response = p1_error(405, "METHOD_NOT_ALLOWED", "The request method is not allowed.")
            else:
                response = p1_error(exc.status, "REQUEST_FAILED", exc.reason)
        finally:
            if task is not None:
                self._in_flight.discard(task)
        response.headers[TRANSACTION_HEADER] = txn[:100]
        return response

    # --- token ---------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        if request.match_info["env"] != self.directory.env_id:
            return not_found("The environment was not found.")
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return self._oauth_error(400, "unsupported_grant_type", "Only client_credentials is supported.")
        header = request.headers.get("Authorization", "")
        basic = header[6:].strip() if header[:6].lower() == "basic " else None
        posted = form.get("client_id")
        # The token error body shape ({error, error_description}) is UNCONFIRMED for PingOne.
        if self.auth_method == "basic":
            if basic is None:
                return self._oauth_error(401, "invalid_client", "unsupported authentication method: "
                                         "this application uses CLIENT_SECRET_BASIC")
            try:
                client_id, _, secret = base64.b64decode(basic, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._oauth_error(401, "invalid_client", "Malformed Basic credentials.")
        else:
            if posted is None:
                return self._oauth_error(401, "invalid_client", "unsupported authentication method: "
                                         "this application uses CLIENT_SECRET_POST")
            client_id, secret = str(posted), str(form.get("client_secret", ""))
        if not (secrets.compare_digest(client_id, self.client_id)
                and secrets.compare_digest(secret, self.client_secret)):
            return self._oauth_error(401, "invalid_client", "Invalid client credentials.")
        token = self._issue_token()
        ttl = self.token_ttl
        return json_response({
            "access_token": token,
            "token_type": "Bearer",
            # whole seconds as PingOne sends; a fractional TTL only when a test configures one
            "expires_in": int(ttl) if float(ttl).is_integer() else ttl,
        }, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _oauth_error(self, status: int, error: str, description: str) -> web.Response:
        headers = {"WWW-Authenticate": 'Basic realm="PingOne"'} if status == 401 else None
        return json_response({"error": error, "error_description": description}, status, headers)

    def _issue_token(self) -> str:
        now = time.time()

        def part(value: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(_dumps(value)).decode().rstrip("=")

        header = part({"alg": "RS256", "typ": "JWT", "kid": "sandbox"})
        payload = part({"client_id": self.client_id, "iss": f"sandbox/{self.directory.env_id}/as",
                        "aud": ["https://api.pingone.com"], "env": self.directory.env_id,
                        "iat": int(now), "exp": int(now + self.token_ttl), "jti": str(uuid.uuid4())})
        signature = base64.urlsafe_b64encode(secrets.token_bytes(64)).decode().rstrip("=")
        token = f"{header}.{payload}.{signature}"
        self._tokens[token] = time.monotonic() + self.token_ttl
        return token

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        expires = self._tokens.get(token)
        if expires is None or expires <= time.monotonic():
            self._tokens.pop(token, None)
            raise _BadRequest(p1_error(401, "ACCESS_FAILED", "The request could not be completed. "
                                       "The access token is missing, invalid or expired.",
                                       [{"code": "INVALID_TOKEN", "message": "Access token is not valid."}]))
        if request.match_info["env"] != self.directory.env_id:
            raise _BadRequest(not_found("The environment was not found."))

    # --- shared helpers ------------------------------------------------------------------------

    def _api_base(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}/v1/environments/{self.directory.env_id}"

    def _self_href(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{request.raw_path}"

    def _limit(self, request: web.Request, cap: int) -> tuple[int | None, int]:
        """(limit as asked or None, page size = min(limit, cap))."""
        raw = request.query.get("limit")
        if raw is None:
            return None, cap
        try:
            limit = int(raw)
        except ValueError:
            raise _BadRequest(invalid_data("INVALID_VALUE", "limit", "limit must be an integer.")) from None
        if not 1 <= limit <= MAX_LIMIT:
            raise _BadRequest(invalid_data("OUT_OF_RANGE", "limit", f"limit must be between 1 and {MAX_LIMIT}.",
                                           rangeMinimumValue=1, rangeMaximumValue=MAX_LIMIT))
        return limit, min(limit, cap)

    def _compiled(self, kind: str, text: str) -> CompiledFilter:
        key = (kind, text)
        compiled = self._filters.get(key)
        if compiled is None:
            dialect: FilterDialect = DEFAULT_GROUP_DIALECT
            if kind == "users":
                dialect = DEFAULT_USER_DIALECT.with_custom(frozenset(self.directory.custom_attributes))
            try:
                compiled = compile_filter(text, dialect)
            except UnsupportedFilter as exc:
                raise _BadRequest(invalid_data("INVALID_FILTER", "filter", exc.detail)) from exc
            if len(self._filters) > 256:
                self._filters.clear()
            self._filters[key] = compiled
        return compiled

    def member_lookup(self) -> Callable[[str], set[str]]:
        """Group id -> member ids as `memberOfGroups[id eq G]` sees them, memoised for one use."""
        cache: dict[str, set[str]] = {}
        directory = self.directory

        def members(group_id: str) -> set[str]:
            found = cache.get(group_id)
            if found is None:
                if group_id not in directory.groups:
                    found = set()
                elif self.member_filter_transitive:
                    found = directory.transitive_member_ids(group_id)
                else:
                    found = directory.direct_member_ids(group_id)
                cache[group_id] = found
            return found

        return members

    def _ordering(self, kind: str, text: str | None) -> Ordering:
        """The collection's insertion order, restricted to the filter's matches (cached per version)."""
        directory = self.directory
        source = directory.users if kind == "users" else directory.groups
        order = directory.user_order if kind == "users" else directory.group_order
        if not text:
            return order
        compiled = self._compiled(kind, text)
        key = (kind, text)
        cached = self._matches.get(key)
        if cached is not None and cached[0] == directory.version:
            return cached[1]
        members = self.member_lookup() if compiled.group_ids else None
        seqs: list[int] = []
        ids: list[str] = []
        group_id = compiled.only_member_of
        if kind == "users" and members is not None and group_id is not None:
            # `memberOfGroups[id eq G]` alone: read the membership index, do not scan every user
            # (1,000 groups x 100,000 users made the emulator the bottleneck of a snapshot).
            for seq, item_id in sorted((directory.user_seq(uid), uid) for uid in members(group_id)
                                       if uid in source):
                seqs.append(seq)
                ids.append(item_id)
        else:
            for seq, item_id in zip(order.seqs, order.ids, strict=True):
                if compiled.matches(source[item_id], members):
                    seqs.append(seq)
                    ids.append(item_id)
        result = Ordering(seqs, ids)
        if len(self._matches) > 64:
            self._matches.clear()
        self._matches[key] = (directory.version, result)
        return result

    def _collection(self, request: web.Request, kind: str, cap: int,
                    render: Callable[[str, str], bytes]) -> web.Response:
        self._authorize(request)
        limit, size = self._limit(request, cap)
        text = request.query.get("filter")
        order = self._ordering(kind, text)
        start = 0
        cursor = request.query.get("cursor")
        if cursor:
            start = bisect_right(order.seqs, decode_cursor(kind, cursor))
        page_ids = order.ids[start:start + size]
        base = self._api_base(request)
        links: dict[str, Any] = {"self": {"href": self._self_href(request)}}
        if start + size < len(order.ids):
            query: dict[str, str] = {"limit": str(limit if limit is not None else size)}
            if text:
                query["filter"] = text
            query["cursor"] = encode_cursor(kind, order.seqs[start + size - 1])
            links["next"] = {"href": f"{base}/{kind}?{urlencode(query, quote_via=quote)}"}
        # Serialised by hand around cached item fragments: the fast path for 100k-user listings.
        items = b",".join(render(base, item_id) for item_id in page_ids)
        body = b"".join((b'{"_links":', _dumps(links), b',"_embedded":{"', kind.encode(), b'":[', items,
                         b']},"count":', str(len(order.ids)).encode(), b',"size":',
                         str(len(page_ids)).encode(), b"}"))
        return web.Response(body=body, content_type=_JSON, charset="utf-8")

    def _render_user(self, base: str, user_id: str, expand_population: bool = False) -> dict[str, Any]:
        item: dict[str, Any] = {"_links": {"self": {"href": f"{base}/users/{user_id}"}}}
        user = self.directory.users[user_id]
        item.update(user)
        if expand_population:
            # The shape of expand=population is UNCONFIRMED (pingone.md §2.4).
            population = self.directory.populations.get(user["population"]["id"], user["population"])
            item["_embedded"] = {"population": population}
        return item

    def _render_group(self, base: str, group_id: str) -> dict[str, Any]:
        item: dict[str, Any] = {"_links": {"self": {"href": f"{base}/groups/{group_id}"}}}
        item.update(self.directory.groups[group_id])
        # directMemberCounts counts users added explicitly (pingone.md §4.2).
        item["directMemberCounts"] = {"users": len(self.directory.members.get(group_id, ()))}
        return item

    def _small_page(self, request: web.Request, kind: str, items: list[dict[str, Any]],
                    embedded: str) -> web.Response:
        """Offset-cursor paging for the short per-object lists (memberOfGroups)."""
        limit, size = self._limit(request, MAX_LIMIT)
        cursor = request.query.get("cursor")
        start = decode_cursor(kind, cursor) if cursor else 0
        page = items[start:start + size]
        links: dict[str, Any] = {"self": {"href": self._self_href(request)}}
        if start + size < len(items):
            query = {key: value for key, value in request.query.items() if key not in ("cursor", "limit")}
            query["limit"] = str(limit if limit is not None else size)
            query["cursor"] = encode_cursor(kind, start + size)
            links["next"] = {"href": f"{request.scheme}://{request.host}{request.path}?"
                                     f"{urlencode(query, quote_via=quote)}"}
        return json_response({"_links": links, "_embedded": {embedded: page},
                              "count": len(items), "size": len(page)})

    @staticmethod
    def _includes(request: web.Request) -> set[str]:
        return {part.strip() for value in request.query.getall("include", []) for part in value.split(",")}

    @staticmethod
    def _expands(request: web.Request) -> set[str]:
        return {part.strip() for value in request.query.getall("expand", []) for part in value.split(",")}

    def _known_user(self, request: web.Request) -> str:
        user_id = request.match_info["id"]
        if user_id not in self.directory.users:
            raise _BadRequest(not_found(f"User {user_id} was not found."))
        return user_id

    def _known_group(self, request: web.Request) -> str:
        group_id = request.match_info["id"]
        if group_id not in self.directory.groups:
            raise _BadRequest(not_found(f"Group {group_id} was not found."))
        return group_id

    # --- API handlers --------------------------------------------------------------------------

    async def _users_list(self, request: web.Request) -> web.Response:
        if "population" in self._expands(request):
            return self._collection(request, "users", self.users_page_cap,
                                    lambda base, uid: _dumps(self._render_user(base, uid, True)))
        return self._collection(request, "users", self.users_page_cap, self._user_bytes)

    async def _groups_list(self, request: web.Request) -> web.Response:
        return self._collection(request, "groups", self.groups_page_cap,
                                lambda base, gid: _dumps(self._render_group(base, gid)))

    def _user_fragment(self, user_id: str) -> bytes:
        """The user's JSON without `_links`, cached until the user changes."""
        revision = self.directory.user_revision(user_id)
        cached = self._user_json.get(user_id)
        if cached is not None and cached[0] == revision:
            return cached[1]
        fragment = _dumps(self.directory.users[user_id])
        self._user_json[user_id] = (revision, fragment)
        return fragment

    def _user_bytes(self, base: str, user_id: str) -> bytes:
        fragment = self._user_fragment(user_id)
        return b"".join((b'{"_links":{"self":{"href":', _dumps(f"{base}/users/{user_id}"), b"}},",
                         fragment[1:]))

    def prerender(self) -> None:
        """Serialise every user now, so that the first full listing is as fast as later ones."""
        for user_id in self.directory.users:
            self._user_fragment(user_id)
        live = self.directory.users
        for user_id in [uid for uid in self._user_json if uid not in live]:
            del self._user_json[user_id]

    async def _prerender(self, _app: web.Application) -> None:
        self.prerender()

    async def _users_get(self, request: web.Request) -> web.Response:
        self._authorize(request)
        user_id = self._known_user(request)
        item = self._render_user(self._api_base(request), user_id, "population" in self._expands(request))
        includes = self._includes(request) if self.user_read_includes_groups else set()
        if includes & {"memberOfGroupIDs", "memberOfGroupNames"}:
            group_ids = sorted(self.directory.user_group_ids(user_id, transitive=self.member_of_ids_transitive))
            if "memberOfGroupIDs" in includes:
                item["memberOfGroupIDs"] = group_ids
            if "memberOfGroupNames" in includes:
                item["memberOfGroupNames"] = [self.directory.groups[gid]["name"] for gid in group_ids]
        return json_response(item)

    async def _users_member_of(self, request: web.Request) -> web.Response:
        self._authorize(request)
        user_id = self._known_user(request)
        directory = self.directory
        static = directory.static_group_ids(user_id)
        direct = directory.user_group_ids(user_id)
        every = directory.user_group_ids(user_id, transitive=True)
        base = self._api_base(request)
        expand = "group" in self._expands(request)
        items = []
        for group_id in sorted(every, key=lambda gid: (directory.groups[gid]["name"], gid)):
            if group_id in static:
                kind = "DIRECT"
            elif group_id in direct:
                kind = self.dynamic_membership_type
            else:
                kind = "INDIRECT"  # through nesting
            items.append(self._membership(base, f"users/{user_id}", group_id, kind, expand))
        return self._small_page(request, "userMemberOf", items, "groupMemberships")

    def _membership(self, base: str, owner: str, group_id: str, kind: str, expand: bool) -> dict[str, Any]:
        group = self.directory.groups[group_id]
        item: dict[str, Any] = {
            "_links": {"self": {"href": f"{base}/{owner}/memberOfGroups/{group_id}"}},
            "id": group_id, "name": group["name"], "type": kind,
            "environment": {"id": self.directory.env_id},
        }
        if expand:
            item["_embedded"] = {"group": self._render_group(base, group_id)}
        return item

    async def _groups_get(self, request: web.Request) -> web.Response:
        self._authorize(request)
        group_id = self._known_group(request)
        item = self._render_group(self._api_base(request), group_id)
        if "totalMemberCounts" in self._includes(request):
            item["totalMemberCounts"] = {"users": len(self.directory.transitive_member_ids(group_id))}
        return json_response(item)

    async def _groups_member_of(self, request: web.Request) -> web.Response:
        """The groups that contain the URL group (its parents). The embedded key is UNCONFIRMED."""
        self._authorize(request)
        group_id = self._known_group(request)
        directory = self.directory
        base = self._api_base(request)
        expand = "group" in self._expands(request)
        parents = sorted(directory.parents.get(group_id, set()),
                         key=lambda gid: (directory.groups[gid]["name"], gid))
        items = [self._membership(base, f"groups/{group_id}", gid, "DIRECT", expand) for gid in parents]
        return self._small_page(request, "groupMemberOf", items, "groupMemberships")

    # --- admin handlers ------------------------------------------------------------------------

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _BadRequest(invalid_data("INVALID_VALUE", "body", "The body is not JSON.")) from None
        if not isinstance(body, dict):
            raise _BadRequest(invalid_data("INVALID_VALUE", "body", "The body must be a JSON object."))
        return body

    @staticmethod
    def _admin_call(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except UnknownObject as exc:
            raise _BadRequest(not_found(str(exc.args[0]) + " was not found.")) from exc
        except DirectoryConflict as exc:
            raise _BadRequest(invalid_data("UNIQUENESS_VIOLATION", "body", str(exc))) from exc
        except (ValueError, TypeError) as exc:
            raise _BadRequest(invalid_data("INVALID_VALUE", "body", str(exc))) from exc

    async def _admin_user_create(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        username = body.pop("username", None)
        if not isinstance(username, str) or not username:
            return invalid_data("REQUIRED_VALUE", "username", "username is required.")
        name = body.pop("name", None) or {}
        population = body.pop("population", None) or {}
        kwargs: dict[str, Any] = {
            "email": body.pop("email", None),
            "given": body.pop("given", name.get("given", "")),
            "family": body.pop("family", name.get("family", "")),
            "enabled": bool(body.pop("enabled", True)),
            "population_id": body.pop("populationId", population.get("id")),
            "id": body.pop("id", None),
        }
        user = self._admin_call(lambda: self.directory.add_user(username, **kwargs, **body))
        return json_response(user, 201)

    async def _admin_user_update(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        user_id = request.match_info["id"]
        return json_response(self._admin_call(lambda: self.directory.update_user(user_id, **body)))

    async def _admin_user_delete(self, request: web.Request) -> web.Response:
        self._admin_call(lambda: self.directory.delete_user(request.match_info["id"]))
        return web.Response(status=204)

    async def _admin_user_enabled(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            return invalid_data("INVALID_VALUE", "enabled", "enabled must be true or false.")
        self._admin_call(lambda: self.directory.set_enabled(request.match_info["id"], enabled))
        return json_response({"enabled": enabled})

    async def _admin_group_create(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        name = body.pop("name", None)
        if not isinstance(name, str) or not name:
            return invalid_data("REQUIRED_VALUE", "name", "name is required.")
        body.pop("displayName", None)
        group_id = body.pop("id", None)
        user_filter = body.pop("userFilter", None)
        group = self._admin_call(lambda: self.directory.add_group(name, id=group_id, user_filter=user_filter,
                                                                  **body))
        return json_response(group, 201)

    async def _admin_group_update(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        group_id = request.match_info["id"]
        if "name" in body:
            self._admin_call(lambda: self.directory.rename_group(group_id, str(body["name"])))
        if "userFilter" in body:
            self._admin_call(lambda: self.directory.set_user_filter(group_id, body["userFilter"]))
        return json_response(self._admin_call(lambda: self.directory.group(group_id)))

    async def _admin_group_delete(self, request: web.Request) -> web.Response:
        self._admin_call(lambda: self.directory.delete_group(request.match_info["id"]))
        return web.Response(status=204)

    async def _admin_member_add(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        user_id = str(body.get("userId", ""))
        self._admin_call(lambda: self.directory.add_member(request.match_info["id"], user_id))
        return web.Response(status=204)

    async def _admin_member_remove(self, request: web.Request) -> web.Response:
        self._admin_call(lambda: self.directory.remove_member(request.match_info["id"],
                                                              request.match_info["user"]))
        return web.Response(status=204)

    async def _admin_nest(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        parent_id = str(body.get("id", ""))
        try:
            self._admin_call(lambda: self.directory.nest(request.match_info["id"], parent_id))
        except _BadRequest as exc:
            if exc.response.status == 400:  # a cycle: CONSTRAINT_VIOLATION rather than uniqueness
                return invalid_data("CONSTRAINT_VIOLATION", "id", "The nesting would create a cycle.")
            raise
        return web.Response(status=204)

    async def _admin_unnest(self, request: web.Request) -> web.Response:
        self._admin_call(lambda: self.directory.unnest(request.match_info["id"], request.match_info["parent"]))
        return web.Response(status=204)

    async def _admin_state(self, _request: web.Request) -> web.Response:
        directory = self.directory
        return json_response({
            "environment": directory.env_id,
            "population": directory.population_id,
            "users": len(directory.users),
            "groups": len(directory.groups),
            "memberships": sum(len(ids) for ids in directory.members.values()),
            "nestings": sum(len(ids) for ids in directory.parents.values()),
            "version": directory.version,
            "tokens": len(self._tokens),
            "faultedRequests": self.faults.request_count,
        })

    async def _admin_counters(self, _request: web.Request) -> web.Response:
        return json_response(dict(self.counters))

    async def _admin_faults(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        if body.pop("reset", False):
            self.faults.reset()
        settable = {f.name for f in fields(Faults) if not f.name.startswith("_")}
        unknown = set(body) - settable
        if unknown:
            return invalid_data("INVALID_VALUE", "body", f"unknown fault fields: {sorted(unknown)}")
        for key, value in body.items():
            if key == "fail_nth":
                value = {int(n): str(kind) for n, kind in (value or {}).items()}
            elif key == "error_statuses":
                value = tuple(int(status) for status in value)
            setattr(self.faults, key, value)
        return json_response({f: getattr(self.faults, f) if f != "fail_nth" else
                              {str(k): v for k, v in self.faults.fail_nth.items()} for f in sorted(settable)})

    # --- change feeds (pingone.md §9) -----------------------------------------------------------

    async def _feed_start(self, _app: web.Application) -> None:
        await self.feed.start()

    async def _feed_stop(self, _app: web.Application) -> None:
        await self.feed.stop()

    async def _activities(self, request: web.Request) -> web.Response:
        """GET with `filter`, `limit`, `cursor` in the query; POST with them in a JSON body (a
        `cursor` in the query, as in a next link, wins). Next links carry only `limit` and
        `cursor` for POST, so a filter never lands in a URL: POST the same body to them."""
        self._authorize(request)
        feed = self.feed
        settings = feed.settings
        wait = feed.take()
        if wait > 0:
            return fault_limit_response(float(max(1, math.ceil(wait))))
        if settings.outage_status is not None:
            if settings.outage_status == 429:
                return fault_limit_response(settings.retry_after)
            return fault_error_response(settings.outage_status, "activities unavailable")
        if request.method == "POST":
            body = await self._admin_body(request)
            text, limit_raw, cursor = body.get("filter"), body.get("limit"), body.get("cursor")
        else:
            text, limit_raw, cursor = request.query.get("filter"), request.query.get("limit"), None
        cursor = request.query.get("cursor") or cursor
        if limit_raw is None:
            limit = DEFAULT_ACTIVITY_LIMIT
        else:
            try:
                limit = int(limit_raw)
            except (TypeError, ValueError):
                return invalid_data("INVALID_VALUE", "limit", "limit must be an integer.")
            if not 1 <= limit <= MAX_LIMIT:
                return invalid_data("OUT_OF_RANGE", "limit", f"limit must be between 1 and {MAX_LIMIT}.",
                                    rangeMinimumValue=1, rangeMaximumValue=MAX_LIMIT)
        try:
            compiled = feed.compile(str(text) if text is not None else None)
            page, count, following = feed.query(compiled, str(cursor) if cursor else None,
                                                min(limit, settings.page_cap))
        except FeedRequestError as exc:
            return invalid_data(exc.code, exc.target, exc.message)
        base = self._api_base(request)
        links: dict[str, Any] = {"self": {"href": self._self_href(request)}}
        if following is not None:
            query = {"limit": str(limit)}
            if request.method == "GET":
                query["filter"] = str(text)
            query["cursor"] = following
            links["next"] = {"href": f"{base}/activities?{urlencode(query, quote_via=quote)}"}
        items = [{"_links": {"self": {"href": f"{base}/activities/{a.body['id']}"}}, **a.body} for a in page]
        return json_response({"_links": links, "_embedded": {settings.embedded_key: items},
                              "count": count, "size": len(items)})

    async def _subscription_create(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await self._admin_body(request)
        try:
            subscription = self.feed.subscribe(body)
        except FeedRequestError as exc:
            return invalid_data(exc.code, exc.target, exc.message)
        return json_response(self._render_subscription(request, subscription.public()), 201)

    def _render_subscription(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        return {"_links": {"self": {"href": f"{self._api_base(request)}/subscriptions/{body['id']}"}},
                **body, "environment": {"id": self.directory.env_id}}

    async def _subscription_list(self, request: web.Request) -> web.Response:
        self._authorize(request)
        items = [self._render_subscription(request, s.public()) for s in self.feed.subscriptions.values()]
        return json_response({"_links": {"self": {"href": self._self_href(request)}},
                              "_embedded": {"subscriptions": items}, "count": len(items), "size": len(items)})

    async def _subscription_get(self, request: web.Request) -> web.Response:
        self._authorize(request)
        subscription = self.feed.subscriptions.get(request.match_info["id"])
        if subscription is None:
            return not_found(f"Subscription {request.match_info['id']} was not found.")
        return json_response(self._render_subscription(request, subscription.public()))

    async def _subscription_delete(self, request: web.Request) -> web.Response:
        self._authorize(request)
        if not self.feed.unsubscribe(request.match_info["id"]):
            return not_found(f"Subscription {request.match_info['id']} was not found.")
        return web.Response(status=204)

    async def _admin_activities(self, _request: web.Request) -> web.Response:
        return json_response({"activities": self.feed.dump()})

    async def _admin_feed_settings(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await self._admin_body(request)
            try:
                self.feed.settings.update(body)
            except (ValueError, TypeError) as exc:
                return invalid_data("INVALID_VALUE", "body", str(exc))
        return json_response(self.feed.settings.as_dict())

    async def _admin_subscriptions(self, _request: web.Request) -> web.Response:
        return json_response({"subscriptions": [s.stats() for s in self.feed.subscriptions.values()]})

    async def _admin_revoke(self, _request: web.Request) -> web.Response:
        self.revoke_tokens()
        return web.Response(status=204)
