"""The log redactor: known secrets and Authorization values never reach a rendered line."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from daemon import logs
from daemon.logs import REDACTED, SecretRedactor


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def render(secrets: tuple[str, ...], **event: object) -> str:
    stream = io.StringIO()
    logs.configure(fmt="json", level="debug", secrets=secrets, stream=stream)
    logs.get_logger().info("test.event", **event)
    return stream.getvalue()


def test_a_known_secret_is_redacted_anywhere_in_an_event() -> None:
    secret = "s3cr3t-value-123"
    line = render((secret,), error=f"POST /token failed with client_secret={secret}",
                  nested={"deep": [f"x{secret}y"]}, detail=secret)
    assert secret not in line
    event = json.loads(line)
    assert event["detail"] == REDACTED
    assert event["nested"]["deep"] == [f"x{REDACTED}y"]


def test_authorization_values_and_secret_keys_are_redacted_even_when_unknown() -> None:
    line = render((), headers={"Authorization": "Bearer abc.def.ghi"}, text="Authorization: Basic dXNlcjpwYXNz",
                  token="opaque-token-1")
    assert "abc.def.ghi" not in line and "dXNlcjpwYXNz" not in line and "opaque-token-1" not in line


def test_an_exception_text_and_traceback_are_scrubbed() -> None:
    secret = "hunter2-hunter2"
    stream = io.StringIO()
    logs.configure(fmt="json", level="debug", secrets=(secret,), stream=stream)
    try:
        raise RuntimeError(f"bad credentials {secret}")
    except RuntimeError:
        logs.get_logger().error("test.failed", exc_info=True)
    assert secret not in stream.getvalue()
    assert "RuntimeError" in stream.getvalue()


def test_short_values_are_not_treated_as_secrets() -> None:
    redactor = SecretRedactor(("ab", "", "long-enough"))
    assert redactor.scrub("ab ab long-enough") == f"ab ab {REDACTED}"
