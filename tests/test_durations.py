"""Durations: the strings operators write, parsed to seconds and written back."""

from __future__ import annotations

import random

import pytest

from daemon.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("2m500ms", 120.5),
        ("0", 0.0),
        ("0s", 0.0),
        (" 5m ", 300.0),
    ],
)
def test_parse_duration_reads_each_unit_and_combination(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "5",
        "5 minutes",
        "m",
        "-5m",
        "5x",
        "30m1h",
        "1m1m",
        "1h 1h",
        "1e3s",
        "5m!",
        "ms",
        "1.s",
        "99999999d",
    ],
)
def test_parse_duration_refuses_malformed_text(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_parse_duration_refuses_non_strings() -> None:
    with pytest.raises(DurationError):
        parse_duration(300)  # type: ignore[arg-type]


def test_duration_error_is_a_value_error() -> None:
    assert issubclass(DurationError, ValueError)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (90.0, "1m30s"),
        (300.0, "5m"),
        (5400.0, "1h30m"),
        (86400.0, "1d"),
        (604800.0, "7d"),
        (90061.001, "1d1h1m1s1ms"),
    ],
)
def test_format_duration_writes_the_shortest_readable_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_then_parse_round_trips_whole_milliseconds() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        millis = rng.randrange(0, 40 * 86400 * 1000)
        assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000, abs=1e-9)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_format_duration_refuses_negative_and_non_finite(bad: float) -> None:
    with pytest.raises(DurationError):
        format_duration(bad)
