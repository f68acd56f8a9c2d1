"""The SCIM 2.0 client: users, groups and memberships over one request chokepoint.

`ScimClient.request` is the only place that touches the network. For every attempt it takes a
token from the target's rate governor, sets the Authorization header, and maps the outcome:
timeouts -> RequestTimeout, connection errors -> ConnectionFailed, non-2xx -> the typed error of
`error_for_status`, a 2xx body that is not a JSON object -> MalformedResponse. Transient errors
are retried by `backoff.retry`; a 401 drops the cached credential and is tried once more.
"""

from __future__ import annotations

import collections
import json as jsonlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from daemon.backoff import RetryPolicy, parse_retry_after, retry
from daemon.errors import (
    BadRequest,
    ConnectionFailed,
    Forbidden,
    MalformedResponse,
    NotFound,
    RateLimited,
    RemoteError,
    RequestTimeout,
    TransientError,
    Unauthorized,
    UnexpectedStatus,
    UnsafeRequest,
    error_for_status,
)
from daemon.mapping import username_key
from daemon.ratelimit import RateGovernor
from daemon.responses import read_body
from daemon.target.auth import TargetAuth
from daemon.target.profiles import TargetProfile
from daemon.target.resource import (
    build_group,
    build_user,
    member_remove_op,
    members_add_op,
    patch_body,
    quote_filter_value,
    read_active,
    user_patch,
)

DEFAULT_TIMEOUT = 30.0
DEFAULT_MATCH_FILTER = 'userName eq "%s"'
DEFAULT_GROUP_MATCH_FILTER = 'displayName eq "%s"'
MAX_BODY_BYTES = 64 << 20        # a response larger than this is refused (MalformedResponse)
MAX_PAGES = 100_000              # a server that never ends its listing is cut off here
SCIM_JSON = "application/scim+json"
ACCEPT = "application/scim+json, application/json;q=0.9"
UPDATE_METHODS = ("patch", "put")
DEFAULT_POLICY = RetryPolicy()


class ScimClient:
    """A client for one SCIM target: base URL (opaque, e.g. ZPA's ``/scim/1/{idp}/v2``), auth, profile."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        auth: TargetAuth,
        *,
        profile: TargetProfile,
        governor: RateGovernor | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        timeout: float = DEFAULT_TIMEOUT,
        match_filter: str = DEFAULT_MATCH_FILTER,
        group_match_filter: str = DEFAULT_GROUP_MATCH_FILTER,
        page_size: int | None = None,
        membership_batch: int | None = None,
        update_method: str = "patch",
    ) -> None:
        if update_method not in UPDATE_METHODS:
            raise ValueError(f"update_method must be 'patch' or 'put', not {update_method!r}")
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._base_path = URL(self.base_url).path.rstrip("/")
        self._auth = auth
        self.profile = profile
        self.governor = governor
        self.policy = policy
        self.timeout = timeout
        self.match_filter = match_filter
        self.group_match_filter = group_match_filter
        self.page_size = page_size or profile.page_size
        self.membership_batch = membership_batch or profile.membership_batch
        self.update_method = update_method
        self.stats: collections.Counter[str] = collections.Counter()
        # Called after every HTTP attempt with (method, status or None, seconds): metrics.
        self.on_request: Callable[[str, int | None, float], None] | None = None

    def __repr__(self) -> str:
        return f"ScimClient({self.base_url!r}, profile={self.profile.name!r})"

    # -- the chokepoint -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        attempts: list[int] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        """Send one request (with retries); (status, parsed JSON object or None for an empty body)."""
        method = method.upper()
        refuse_unsafe(method, path, json)
        used = 0

        async def once() -> tuple[int, dict[str, Any] | None]:
            nonlocal used
            used += 1
            if self.on_request is None:
                return await self._attempt(method, path, json, params)
            started = time.perf_counter()
            status: int | None = None
            try:
                result = await self._attempt(method, path, json, params)
                status = result[0]
                return result
            except RemoteError as exc:
                status = exc.status
                raise
            finally:
                self.on_request(method, status, time.perf_counter() - started)

        def on_retry(attempt: int, exc: TransientError, wait: float) -> None:
            self.stats["retries"] += 1

        try:
            try:
                return await retry(once, self.policy, on_retry=on_retry)
            except Unauthorized:
                # A cached OAuth token may have been revoked: drop it and try exactly once more.
                self._auth.invalidate()
                self.stats["retries"] += 1
                return await retry(once, self.policy, on_retry=on_retry)
        finally:
            if attempts is not None:
                attempts.append(used)

    async def _attempt(
        self, method: str, path: str, payload: Any, params: Mapping[str, str] | None
    ) -> tuple[int, dict[str, Any] | None]:
        if self.governor is not None:
            await self.governor.acquire()
        url_path = self._base_path + path
        text = self.base_url + path
        if params:
            text += "?" + urlencode(params, quote_via=quote)
        headers = {"Accept": ACCEPT, "Authorization": await self._auth.authorization(self._session)}
        data: bytes | None = None
        if payload is not None:
            data = jsonlib.dumps(payload, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = SCIM_JSON
        self._count(method, path)
        try:
            async with self._session.request(
                method, URL(text, encoded=True), data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout), allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raw = await read_body(resp, MAX_BODY_BYTES)
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer within {self.timeout:g}s", method=method, path=url_path) from exc
        except aiohttp.InvalidURL as exc:
            raise RemoteError("invalid URL", method=method, path=url_path) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ConnectionFailed(_describe_exc(exc), method=method, path=url_path) from exc
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(type(exc).__name__, method=method, path=url_path) from exc
        if len(raw) > MAX_BODY_BYTES:
            raise MalformedResponse(f"response larger than {MAX_BODY_BYTES} bytes", status=status,
                                    method=method, path=url_path)
        if not 200 <= status < 300:
            body: Any
            try:
                body = jsonlib.loads(raw) if raw else ""
            except ValueError:
                body = raw.decode("utf-8", "replace")
            error = error_for_status(status, body, method=method, path=url_path, retry_after=retry_after)
            if isinstance(error, RateLimited):
                self.stats["429"] += 1
                if self.governor is not None:
                    self.governor.throttled(retry_after)
            raise error
        if self.governor is not None:
            self.governor.succeeded()
        if status == 204 or not raw.strip():
            return status, None
        try:
            parsed = jsonlib.loads(raw)
        except ValueError as exc:
            raise MalformedResponse("response body is not JSON", status=status, method=method,
                                    path=url_path) from exc
        if not isinstance(parsed, dict):
            raise MalformedResponse(f"response body is a JSON {type(parsed).__name__}, not an object",
                                    status=status, method=method, path=url_path)
        return status, parsed

    def _count(self, method: str, path: str) -> None:
        resource = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        self.stats["requests"] += 1
        self.stats[f"{method} /{resource}"] += 1
        if method not in ("GET", "HEAD"):
            self.stats["writes"] += 1

    # -- users ----------------------------------------------------------------------------------

    async def create_user(
        self, attrs: Mapping[str, Any], *, active: bool = True, attempts: list[int] | None = None
    ) -> dict[str, Any]:
        """POST /Users; the created resource (with the target's `id`)."""
        _, body = await self.request("POST", "/Users", json=build_user(attrs, active=active), attempts=attempts)
        return _with_id(body, "POST", self._base_path + "/Users")

    async def get_user(self, user_id: str) -> dict[str, Any]:
        """GET /Users/{id}; NotFound when it is gone."""
        path = _item("/Users", user_id)
        _, body = await self.request("GET", path)
        return _normalise_user(_with_id(body, "GET", self._base_path + path))

    async def update_user(
        self,
        user_id: str,
        changed: Mapping[str, Any],
        *,
        full: Mapping[str, Any],
        active: bool | None = None,
        attempts: list[int] | None = None,
    ) -> None:
        """PATCH the changed paths, or PUT the whole user when update_method is "put"."""
        path = _item("/Users", user_id)
        if self.update_method == "put":
            await self.request("PUT", path, json=_put_body(full, active), attempts=attempts)
            return
        ops = user_patch(changed, active=active, full=full)
        if ops:
            await self.request("PATCH", path, json=patch_body(ops), attempts=attempts)

    async def set_active(
        self,
        user_id: str,
        active: bool,
        *,
        full: Mapping[str, Any] | None = None,
        attempts: list[int] | None = None,
    ) -> None:
        """Enable or disable: PATCH replace active (PUT with *full* when update_method is "put")."""
        path = _item("/Users", user_id)
        if self.update_method == "put" and full is not None:
            await self.request("PUT", path, json=build_user(full, active=active), attempts=attempts)
            return
        ops = [{"op": "replace", "path": "active", "value": active}]
        await self.request("PATCH", path, json=patch_body(ops), attempts=attempts)

    async def delete_user(self, user_id: str, *, attempts: list[int] | None = None) -> None:
        await self.request("DELETE", _item("/Users", user_id), attempts=attempts)

    async def find_user(self, user_name: str, *, taken: Callable[[str], bool] | None = None
                        ) -> dict[str, Any] | None:
        """The target user whose userName equals *user_name* (case-insensitively, `username_key`),
        by filter or by a paged scan; one whose id is `taken` (another link holds it) is passed over."""
        found = await self._find("/Users", self.match_filter, "userName", user_name, self.iter_users(),
                                 taken=taken)
        return None if found is None else _normalise_user(found)

    async def iter_users(self) -> AsyncIterator[dict[str, Any]]:
        """Every user in the target, page by page."""
        async for resource in self._pages("/Users", {}):
            yield _normalise_user(resource)

    # -- groups ---------------------------------------------------------------------------------

    async def create_group(
        self, display_name: str, *, external_id: str | None = None, attempts: list[int] | None = None
    ) -> dict[str, Any]:
        """POST /Groups, created empty (members are added afterwards by PATCH)."""
        _, body = await self.request(
            "POST", "/Groups", json=build_group(display_name, external_id=external_id), attempts=attempts
        )
        return _with_id(body, "POST", self._base_path + "/Groups")

    async def get_group(self, group_id: str) -> dict[str, Any]:
        path = _item("/Groups", group_id)
        _, body = await self.request("GET", path)
        return _with_id(body, "GET", self._base_path + path)

    async def rename_group(self, group_id: str, display_name: str, *, attempts: list[int] | None = None) -> None:
        """PATCH replace displayName (never PUT: on RFC-replace servers a PUT without members empties the group)."""
        ops = [{"op": "replace", "path": "displayName", "value": display_name}]
        await self.request("PATCH", _item("/Groups", group_id), json=patch_body(ops), attempts=attempts)

    async def delete_group(self, group_id: str, *, attempts: list[int] | None = None) -> None:
        await self.request("DELETE", _item("/Groups", group_id), attempts=attempts)

    async def find_group(self, display_name: str, *, taken: Callable[[str], bool] | None = None
                         ) -> dict[str, Any] | None:
        """The target group with this displayName (case-insensitively), by filter or by a paged scan;
        one whose id is `taken` (another link holds it) is passed over."""
        return await self._find("/Groups", self.group_match_filter, "displayName", display_name,
                                self.iter_groups(), extra={"excludedAttributes": "members"}, taken=taken)

    async def iter_groups(self) -> AsyncIterator[dict[str, Any]]:
        """Every group in the target, without members."""
        async for resource in self._pages("/Groups", {"excludedAttributes": "members"}):
            yield resource

    async def group_member_ids(self, group_id: str) -> set[str] | None:
        """Member ids of the group; None when the target does not return `members` at all."""
        group = await self.get_group(group_id)
        members = group.get("members")
        if members is None:
            return None
        if not isinstance(members, list):
            raise MalformedResponse("group 'members' is not a list", method="GET",
                                    path=self._base_path + _item("/Groups", group_id))
        return {m["value"] for m in members if isinstance(m, dict) and isinstance(m.get("value"), str)}

    async def add_members(
        self, group_id: str, user_ids: Sequence[str], *, attempts: list[int] | None = None
    ) -> int:
        """PATCH add members in chunks of at most `membership_batch`; the number of requests sent."""
        path = _item("/Groups", group_id)
        sent = 0
        for chunk in _chunks(_member_ids(user_ids), self.membership_batch):
            await self.request("PATCH", path, json=patch_body([members_add_op(chunk)]), attempts=attempts)
            sent += 1
        return sent

    async def remove_members(
        self, group_id: str, user_ids: Sequence[str], *, attempts: list[int] | None = None
    ) -> int:
        """PATCH remove ``members[value eq "ID"]``, up to `membership_batch` ops per request."""
        path = _item("/Groups", group_id)
        sent = 0
        for chunk in _chunks(_member_ids(user_ids), self.membership_batch):
            ops = [member_remove_op(uid) for uid in chunk]
            await self.request("PATCH", path, json=patch_body(ops), attempts=attempts)
            sent += 1
        return sent

    # -- discovery ------------------------------------------------------------------------------

    async def service_provider_config(self) -> dict[str, Any] | None:
        """GET /ServiceProviderConfig; None when the target has none or refuses it."""
        try:
            _, body = await self.request("GET", "/ServiceProviderConfig")
        except (NotFound, Unauthorized, Forbidden, BadRequest, UnexpectedStatus, MalformedResponse):
            return None
        return body

    # -- internals ------------------------------------------------------------------------------

    async def _pages(self, path: str, extra: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Page by startIndex/count. Stops on an empty page or when totalResults is reached;
        `itemsPerPage` is never trusted (ZPA echoes the requested page size)."""
        start = 1
        for _ in range(MAX_PAGES):
            params = {**extra, "startIndex": str(start), "count": str(self.page_size)}
            _, body = await self.request("GET", path, params=params)
            resources, total = _list_response(body, self._base_path + path)
            for resource in resources:
                yield resource
            if not resources:
                return
            if total is not None and start + len(resources) - 1 >= total:
                return
            start += len(resources)
        raise MalformedResponse(f"listing did not end within {MAX_PAGES} pages", method="GET",
                                path=self._base_path + path)

    async def _find(
        self,
        path: str,
        template: str,
        attr: str,
        value: str,
        scan: AsyncIterator[dict[str, Any]],
        *,
        extra: Mapping[str, str] | None = None,
        taken: Callable[[str], bool] | None = None,
    ) -> dict[str, Any] | None:
        """The first resource whose `attr` equals *value* as SCIM servers compare (`username_key`)
        and whose id is not `taken` (held by another link). Nothing else is ever returned: not a
        lone result of the filter that names someone else (a server whose `eq` folds "ß" to "ss",
        a custom match_filter), not the first of several. When the filter is refused (400), or its
        answer cannot be the whole story (several results, none matching; fewer than
        totalResults), the collection is scanned."""
        wanted = username_key(value)

        def fits(resource: dict[str, Any]) -> bool:
            if username_key(_text(resource.get(attr))) != wanted:
                return False
            return taken is None or not taken(str(resource.get("id")))

        params = {**(extra or {}), "filter": template.replace("%s", quote_filter_value(value))}
        try:
            _, body = await self.request("GET", path, params=params)
            resources, total = _list_response(body, self._base_path + path)
        except BadRequest:
            resources, total = None, None   # filter unsupported: scan instead
        if resources is not None:
            found = next((r for r in resources if fits(r)), None)
            if found is not None:
                return found
            whole = total is None or total <= len(resources)
            if whole and len(resources) <= 1:
                return None      # none, or one that is not the one asked for: never taken
            # Several results and none fits, or only part of them: the filter was ignored or
            # paged. Scan.
        async for resource in scan:
            if fits(resource):
                return resource
        return None


def refuse_unsafe(method: str, path: str, payload: Any) -> None:
    """Raise UnsafeRequest, before anything is sent, for a group PATCH that would remove members
    without saying which: a `remove` of `members` with no (or an empty, or a null-holding) value
    list, or a `remove` without any path. ZPA empties the whole group for a bare member remove
    (zscaler-scim.md §9). The one place every request passes (`ScimClient.request`, and the dry
    run's), whoever built the body."""
    if method.upper() != "PATCH" or not path.startswith("/Groups") or not isinstance(payload, dict):
        return
    for op in payload.get("Operations") or ():
        if not isinstance(op, dict) or str(op.get("op", "")).strip().lower() != "remove":
            continue
        target = op.get("path")
        text = target.strip() if isinstance(target, str) else ""
        if not text:
            raise UnsafeRequest("a group PATCH remove without a path would remove everything",
                                method="PATCH", path=path)
        if text.lower().startswith("members["):
            inner = text[len("members["):].rstrip("]")
            if '""' in inner.replace(" ", "") or "value" not in inner.lower():
                raise UnsafeRequest(f"member remove with an empty value filter: {text!r}", method="PATCH",
                                    path=path)
            continue
        if text.lower() != "members":
            continue
        value = op.get("value")
        if not (isinstance(value, list) and value and all(
                isinstance(v, dict) and isinstance(v.get("value"), str) and v["value"] for v in value)):
            raise UnsafeRequest("a member remove without a value list would empty the group",
                                method="PATCH", path=path)


def _item(collection: str, object_id: str) -> str:
    if not isinstance(object_id, str) or not object_id:
        raise ValueError(f"invalid SCIM id {object_id!r}")
    return f"{collection}/{quote(object_id, safe='')}"


def _with_id(body: dict[str, Any] | None, method: str, path: str) -> dict[str, Any]:
    if body is None or not isinstance(body.get("id"), str | int) or body.get("id") in ("", None):
        raise MalformedResponse("response carries no resource id", method=method, path=path)
    if not isinstance(body["id"], str):
        body["id"] = str(body["id"])   # legacy numeric ids are text to provisiond
    return body


def _list_response(body: dict[str, Any] | None, path: str) -> tuple[list[dict[str, Any]], int | None]:
    """(Resources, totalResults) of a ListResponse; tolerant of string numbers and a missing Resources."""
    if body is None:
        raise MalformedResponse("empty list response", method="GET", path=path)
    resources = body.get("Resources", body.get("resources", []))
    if resources is None:
        resources = []
    if not isinstance(resources, list) or not all(isinstance(r, dict) for r in resources):
        raise MalformedResponse("'Resources' is not a list of objects", method="GET", path=path)
    total_raw = body.get("totalResults")
    total: int | None
    try:
        total = None if total_raw is None or isinstance(total_raw, bool) else int(total_raw)
    except (TypeError, ValueError):
        raise MalformedResponse("'totalResults' is not a number", method="GET", path=path) from None
    for resource in resources:
        if isinstance(resource.get("id"), int):
            resource["id"] = str(resource["id"])
    return resources, total


def _normalise_user(resource: dict[str, Any]) -> dict[str, Any]:
    """`"active": "true"` (ZPA) becomes a boolean; everything else is left as the target sent it."""
    if isinstance(resource.get("active"), str):
        try:
            resource["active"] = read_active(resource)
        except ValueError:
            pass
    return resource


def _put_body(full: Mapping[str, Any], active: bool | None) -> dict[str, Any]:
    body = build_user(full, active=True if active is None else active)
    if active is None:
        del body["active"]
    return body


def _member_ids(user_ids: Iterable[str]) -> list[str]:
    """De-duplicated ids in order; an empty or non-text id is a caller bug (never send null members)."""
    out: dict[str, None] = {}
    for uid in user_ids:
        if not isinstance(uid, str) or not uid:
            raise ValueError(f"invalid member id {uid!r}")
        out.setdefault(uid, None)
    return list(out)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _describe_exc(exc: BaseException) -> str:
    """A credential-free description of a low-level error: its class and OS reason only."""
    reason = getattr(exc, "strerror", None) or getattr(exc, "os_error", None)
    if isinstance(reason, OSError):
        reason = reason.strerror
    return f"{type(exc).__name__}: {reason}" if isinstance(reason, str) and reason else type(exc).__name__

