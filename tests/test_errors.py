"""Status codes become the most specific error, with the server's detail and never a credential."""

from __future__ import annotations

import pytest

from daemon import errors
from daemon.errors import error_for_status


@pytest.mark.parametrize(("status", "cls", "transient"), [
    (400, errors.BadRequest, False), (401, errors.Unauthorized, False), (403, errors.Forbidden, False),
    (404, errors.NotFound, False), (409, errors.Conflict, False), (412, errors.PreconditionFailed, False),
    (422, errors.Unprocessable, False), (429, errors.RateLimited, True), (500, errors.ServerError, True),
    (503, errors.ServerError, True), (418, errors.UnexpectedStatus, False),
])
def test_each_status_maps_to_its_own_error(status: int, cls: type, transient: bool) -> None:
    exc = error_for_status(status, {}, method="POST", path="/Users")
    assert type(exc) is cls
    assert isinstance(exc, errors.TransientError) is transient
    assert exc.status == status


def test_a_scim_error_body_gives_detail_and_scim_type() -> None:
    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "409",
            "scimType": "uniqueness", "detail": "userName jdoe@example.com exists"}
    exc = error_for_status(409, body, method="POST", path="/Users")
    assert exc.scim_type == "uniqueness"
    assert exc.reason == "http_409_uniqueness"
    assert str(exc) == "POST /Users: HTTP 409: userName jdoe@example.com exists"


def test_a_pingone_error_body_gives_code_and_the_first_detail() -> None:
    body = {"id": "x", "code": "INVALID_DATA", "message": "The request could not be completed.",
            "details": [{"code": "INVALID_FILTER", "target": "filter", "message": "bad filter"}]}
    exc = error_for_status(400, body, method="GET", path="/environments/e/users")
    assert exc.code == "INVALID_DATA"
    assert "bad filter" in exc.detail
    assert exc.reason == "http_400_invalid_data"


def test_a_text_body_is_kept_short() -> None:
    exc = error_for_status(502, "<html>" + "x" * 5000, method="GET", path="/Users")
    assert len(exc.detail) <= errors.MAX_DETAIL
    assert isinstance(exc, errors.ServerError)


def test_an_error_without_an_answer_has_a_reason_from_its_kind() -> None:
    exc = errors.RequestTimeout("no answer within 30s", method="GET", path="/Users")
    assert exc.status is None
    assert exc.reason == "requesttimeout"
