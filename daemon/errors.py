"""The exception tree of provisiond's remote calls, and the one place statuses become exceptions.

    ProvisiondError
    └── RemoteError                  a request to PingOne or a SCIM target did not succeed
        ├── TransientError           worth retrying: the same request may work later
        │   ├── RequestTimeout       no answer within the request's deadline
        │   ├── ConnectionFailed     refused, reset, dropped, DNS
        │   ├── RateLimited          429; `retry_after` holds what the server asked for
        │   └── ServerError          5xx
        ├── BadRequest               400 (`scim_type` says why: invalidValue, uniqueness, ...)
        ├── Unauthorized             401
        ├── Forbidden                403
        ├── NotFound                 404
        ├── Conflict                 409
        ├── PreconditionFailed       412
        ├── Unprocessable            422
        ├── UnexpectedStatus         any other non-2xx
        ├── MalformedResponse        a 2xx whose body is not the JSON promised
        └── UnsafeRequest            refused before sending: it would do more than asked (a
                                     member remove without a value list empties a ZPA group)

Messages carry the method, the URL path (never the query, never headers) and the server's
detail, truncated; never a credential.
"""

from __future__ import annotations

from typing import Any

MAX_DETAIL = 500


class ProvisiondError(Exception):
    """Base of every error provisiond raises on purpose."""


class RemoteError(ProvisiondError):
    """A request did not succeed. `status` is None when no HTTP answer arrived."""

    status: int | None = None

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        method: str = "",
        path: str = "",
        scim_type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.detail = detail[:MAX_DETAIL]
        if status is not None:
            self.status = status
        self.method = method
        self.path = path
        self.scim_type = scim_type
        self.code = code
        self.retry_after = retry_after
        where = f"{method} {path}: " if method else ""
        status_text = f"HTTP {self.status}: " if self.status is not None else ""
        super().__init__(f"{where}{status_text}{self.detail}")

    @property
    def reason(self) -> str:
        """A short machine-friendly reason for logs and SQLite, e.g. ``http_409_uniqueness``."""
        if self.status is None:
            return type(self).__name__.lower()
        suffix = f"_{self.scim_type}" if self.scim_type else (f"_{self.code.lower()}" if self.code else "")
        return f"http_{self.status}{suffix}"


class TransientError(RemoteError):
    """Worth retrying later."""


class RequestTimeout(TransientError):
    pass


class ConnectionFailed(TransientError):
    pass


class RateLimited(TransientError):
    status = 429


class ServerError(TransientError):
    pass


class BadRequest(RemoteError):
    status = 400


class Unauthorized(RemoteError):
    status = 401


class Forbidden(RemoteError):
    status = 403


class NotFound(RemoteError):
    status = 404


class Conflict(RemoteError):
    status = 409


class PreconditionFailed(RemoteError):
    status = 412


class Unprocessable(RemoteError):
    status = 422


class UnexpectedStatus(RemoteError):
    pass


class MalformedResponse(RemoteError):
    @property
    def reason(self) -> str:
        return "malformed_response"    # whatever the status: the body is the problem


_BY_STATUS: dict[int, type[RemoteError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    422: Unprocessable,
    429: RateLimited,
}


class UnsafeRequest(RemoteError):
    """A request provisiond refuses to send (a caller bug): never retried, nothing went out."""

    @property
    def reason(self) -> str:
        return "unsafe_request"


def error_for_status(
    status: int,
    body: Any,
    *,
    method: str,
    path: str,
    retry_after: float | None = None,
) -> RemoteError:
    """Map a non-2xx answer to the most specific error. *body* is the parsed JSON or raw text."""
    detail, scim_type, code = _describe(body)
    cls: type[RemoteError]
    if status >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status, UnexpectedStatus)
    return cls(
        detail or f"HTTP {status}",
        status=status,
        method=method,
        path=path,
        scim_type=scim_type,
        code=code,
        retry_after=retry_after,
    )


def _describe(body: Any) -> tuple[str, str | None, str | None]:
    """Pull (detail, scimType, code) out of a SCIM Error, a PingOne error or an OAuth error body."""
    if isinstance(body, dict):
        scim_type = body.get("scimType")
        code = body.get("code") or body.get("error")
        detail = body.get("detail") or body.get("message") or body.get("error_description") or ""
        details = body.get("details")
        if isinstance(details, list) and details and isinstance(details[0], dict):
            inner = details[0]
            extra = inner.get("message") or inner.get("code")
            if extra:
                detail = f"{detail} ({extra})" if detail else str(extra)
        return (
            str(detail),
            str(scim_type) if isinstance(scim_type, str) else None,
            str(code) if isinstance(code, str) else None,
        )
    if isinstance(body, str | bytes):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return text.strip()[:MAX_DETAIL], None, None
    return "", None, None
