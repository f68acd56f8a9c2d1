"""Durations as operators write them ("90s", "5m", "1h30m", "7d", "250ms") and back.

A duration is one or more `<number><unit>` parts, largest unit first, each unit at most once,
optionally separated by spaces. Units: `ms`, `s`, `m`, `h`, `d`, `w`. Numbers may carry a decimal
fraction ("1.5h"). A bare `"0"` is zero. Values are float seconds.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

UNIT_SECONDS: dict[str, float] = {
    "w": 604800.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
UNIT_ORDER: tuple[str, ...] = ("w", "d", "h", "m", "s", "ms")
DEFAULT_MAX_SECONDS = 10 * 365 * 86400.0  # ten years: anything longer is a typo
MAX_DURATION_TEXT = 64

_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|w|d|h|m|s)")


class DurationError(ValueError):
    """A duration string that cannot be read."""


def parse_duration(text: str, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> float:
    """Parse a duration string into float seconds; raise `DurationError` when it is malformed."""
    if not isinstance(text, str):
        raise DurationError(f"expected a duration string such as '5m', got {type(text).__name__}")
    if len(text) > MAX_DURATION_TEXT:
        raise DurationError("duration string too long")
    stripped = text.strip()
    if stripped == "0":
        return 0.0
    if not stripped:
        raise DurationError("empty duration; write e.g. '90s', '5m', '1h30m', '7d'")
    total = 0.0
    pos = 0
    last_rank = -1
    while pos < len(stripped):
        match = _PART.match(stripped, pos)
        if match is None:
            raise DurationError(f"invalid duration {text!r}; write e.g. '250ms', '90s', '5m', '1h30m', '7d'")
        number, unit = match.group(1), match.group(2)
        rank = UNIT_ORDER.index(unit)
        if rank <= last_rank:
            raise DurationError(
                f"invalid duration {text!r}: units must go from largest to smallest, once each"
            )
        last_rank = rank
        total += float(number) * UNIT_SECONDS[unit]
        pos = match.end()
    if not math.isfinite(total) or total > max_seconds:
        raise DurationError(f"duration {text!r} is too long (at most {format_duration(max_seconds)})")
    return total


def format_duration(seconds: float) -> str:
    """Format float seconds the way `parse_duration` reads them, e.g. 5400.0 -> "1h30m".

    Whole milliseconds are exact; anything finer is rounded to the nearest millisecond.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"cannot format {seconds!r} as a duration")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit in UNIT_ORDER[1:]:  # weeks are read but written as days: "7d" reads better than "1w"
        size = round(UNIT_SECONDS[unit] * 1000)
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def local_time(ts: float | None) -> str:
    """A timestamp as an operator reads it, with its zone: "2026-11-29 13:04:05 +01:00 (CET)";
    "-" for none. Local time (the host's zone, `TZ`), never a bare wall-clock time that could
    be UTC or local."""
    if not ts:
        return "-"
    moment = datetime.fromtimestamp(ts).astimezone()
    offset = moment.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if len(offset) == 5 else offset
    name = moment.tzname() or ""
    return f"{moment:%Y-%m-%d %H:%M:%S} {offset}" + (f" ({name})" if name and name != offset else "")
