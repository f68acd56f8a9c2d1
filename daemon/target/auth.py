"""How provisiond authenticates to a SCIM target: bearer token, HTTP basic, or OAuth 2 client credentials.

Secrets arrive as plain strings (the config layer reveals them) and stay in private attributes:
reprs show ``***``; error messages carry the token URL's path and the server's detail, never a
credential.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import anyio
from yarl import URL

from daemon.backoff import parse_retry_after
from daemon.errors import (
    ConnectionFailed,
    MalformedResponse,
    RequestTimeout,
    error_for_status,
)
from daemon.responses import read_body

DEFAULT_TOKEN_TIMEOUT = 30.0
DEFAULT_RENEW_BEFORE = 60.0     # renew a cached OAuth token this many seconds before it expires
DEFAULT_TOKEN_LIFETIME = 3600.0  # when the token endpoint omits expires_in
MAX_TOKEN_BODY = 1 << 20
MASK = "***"
AUTH_KINDS = ("bearer", "basic", "oauth_client_credentials")


class AuthConfigError(ValueError):
    """An auth kind is unknown or lacks a setting it needs (the message names the setting, not its value)."""


class TargetAuth(Protocol):
    async def authorization(self, session: aiohttp.ClientSession) -> str:
        """The Authorization header value for the next request."""
        ...

    def invalidate(self) -> None:
        """A 401 arrived: drop any cached credential so the next call fetches a fresh one."""
        ...


class BearerAuth:
    """A static bearer token (what Zscaler issues per IdP)."""

    __slots__ = ("_header",)

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token:
            raise AuthConfigError("bearer auth needs a non-empty token")
        self._header = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"BearerAuth(token='{MASK}')"

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        return self._header

    def invalidate(self) -> None:
        """A static token cannot be renewed."""


class BasicAuth:
    """HTTP basic authentication (RFC 7617)."""

    __slots__ = ("_header", "username")

    def __init__(self, username: str, password: str) -> None:
        if not username:
            raise AuthConfigError("basic auth needs a username")
        self.username = username
        raw = f"{username}:{password}".encode()
        self._header = "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password='{MASK}')"

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        return self._header

    def invalidate(self) -> None:
        """Static credentials cannot be renewed."""


class OAuthClientCredentials:
    """OAuth 2 client credentials grant (RFC 6749 §4.4): token fetched, cached, renewed before expiry."""

    __slots__ = (
        "_clock", "_expires_at", "_lock", "_secret", "_token", "client_auth", "client_id", "renew_before",
        "scope", "timeout", "token_url",
    )

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        client_auth: str = "basic",
        timeout: float = DEFAULT_TOKEN_TIMEOUT,
        renew_before: float = DEFAULT_RENEW_BEFORE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not token_url or not client_id or not client_secret:
            raise AuthConfigError("oauth_client_credentials needs token_url, client_id and client_secret")
        if client_auth not in ("basic", "post"):
            raise AuthConfigError(f"client_auth must be 'basic' or 'post', not {client_auth!r}")
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.client_auth = client_auth
        self.timeout = timeout
        self.renew_before = renew_before
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return (f"OAuthClientCredentials(token_url={self.token_url!r}, client_id={self.client_id!r}, "
                f"client_secret='{MASK}')")

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        async with self._lock:
            if self._token is None or self._clock() >= self._expires_at:
                self._token, lifetime = await self._fetch(session)
                self._expires_at = self._clock() + max(0.0, lifetime - min(self.renew_before, lifetime / 2))
            return f"Bearer {self._token}"

    def invalidate(self) -> None:
        self._token = None
        self._expires_at = 0.0

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Accept": "application/json"}
        if self.client_auth == "basic":
            # RFC 6749 §2.3.1: form-urlencode id and secret before base64.
            pair = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form["client_id"] = self.client_id
            form["client_secret"] = self._secret
        path = URL(self.token_url).path
        try:
            async with session.post(
                self.token_url, data=form, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                raw = await read_body(resp, MAX_TOKEN_BODY)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise RequestTimeout("token request timed out", method="POST", path=path) from exc
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(f"token request failed: {type(exc).__name__}", method="POST",
                                   path=path) from exc
        body: Any
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if status >= 300:
            # Body descriptions of OAuth errors name the problem, never the secret sent.
            raise error_for_status(status, body if body is not None else "", method="POST", path=path,
                                   retry_after=retry_after)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise MalformedResponse("token response has no access_token", status=status, method="POST",
                                    path=path)
        lifetime = body.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        try:
            seconds = float(lifetime)
        except (TypeError, ValueError):
            seconds = DEFAULT_TOKEN_LIFETIME
        return body["access_token"], max(0.0, seconds)


def auth_from(
    kind: str,
    *,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    token_url: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
) -> TargetAuth:
    """Build the target auth named by *kind* (bearer | basic | oauth_client_credentials)."""
    if kind == "bearer":
        if not token:
            raise AuthConfigError("auth 'bearer' needs token")
        return BearerAuth(token)
    if kind == "basic":
        if not username or password is None:
            raise AuthConfigError("auth 'basic' needs username and password")
        return BasicAuth(username, password)
    if kind in ("oauth_client_credentials", "oauth"):
        missing = [name for name, value in
                   (("token_url", token_url), ("client_id", client_id), ("client_secret", client_secret))
                   if not value]
        if missing:
            raise AuthConfigError(f"auth 'oauth_client_credentials' needs {', '.join(missing)}")
        assert token_url and client_id and client_secret
        return OAuthClientCredentials(token_url, client_id, client_secret)
    raise AuthConfigError(f"unknown auth {kind!r}; expected one of {', '.join(AUTH_KINDS)}")

