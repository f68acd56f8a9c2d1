"""Structured logging: JSON lines on stdout (journald keeps them), console on a TTY.

One event per entity and operation, with stable keys (see README "Reading the logs").
`SecretRedactor` runs last before rendering and replaces every known secret value, and any
Authorization header value, wherever it appears in an event, exception texts included.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "***"
MIN_SECRET_LEN = 4
_AUTH_RE = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(bearer|basic)?\s*[^\s'\",}]+")
_SECRET_KEYS = frozenset({"authorization", "token", "client_secret", "password", "access_token", "secret"})

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class SecretRedactor:
    """A structlog processor that removes known secret values from every event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = tuple(sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "uthorization" in text or "UTHORIZATION" in text:   # cheap test before the regex
            text = _AUTH_RE.sub(lambda m: m.group(1) + REDACTED, text)
        return text

    def _clean(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if depth > 6:
            return value
        if isinstance(value, dict):
            return {k: (REDACTED if str(k).lower() in _SECRET_KEYS and v else self._clean(v, depth + 1))
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v, depth + 1) for v in value]
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        for key, value in list(event.items()):
            if key.lower() in _SECRET_KEYS and isinstance(value, str) and value:
                event[key] = REDACTED
            else:
                event[key] = self._clean(value)
        return event


REDACTOR = SecretRedactor()


def _stringify_exception(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Render exc_info to text *before* redaction, so that tracebacks are scrubbed too."""
    return structlog.processors.format_exc_info(logger, method, event)


def configure(
    *,
    fmt: str = "json",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Set up structlog for the process. Safe to call again (on reload)."""
    REDACTOR.update(secrets)
    out = stream if stream is not None else sys.stdout
    renderer: Any
    if fmt == "console" or (fmt == "auto" and out.isatty()):
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False, sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _stringify_exception,
            REDACTOR,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("provisiond").bind(**context)


def drop_none(event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {k: v for k, v in event.items() if v is not None}
