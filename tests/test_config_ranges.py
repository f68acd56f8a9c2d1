"""Every numeric config key has a documented range; anything outside it is refused, never a crash.

Hypothesis fuzzes each numeric key (integers of any size, floats including NaN and infinities,
duration strings) through `load_config`, through `provisiond check-config` in a subprocess (exit 0
or 78, never a traceback) and through SIGHUP reloads of a running `provisiond run` (the bad ones
log `config.reload_failed`, the daemon keeps running on its old config).
"""

from __future__ import annotations

import json
import math
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import RANGES, ConfigError, Range, diff_configs, load_config
from daemon.durations import DurationError, format_duration, parse_duration

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "config" / "provisiond.example.toml"

DURATION_KEYS = frozenset(key for key, limits in RANGES.items() if limits.unit == "s")

# Loopback ports nothing listens on: the daemon's cycles fail fast, its reloads are what is tested.
BASE = """
[daemon]
state_path = "{state}"
{daemon}
[source]
api_url = "http://127.0.0.1:9/v1"
auth_url = "http://127.0.0.1:9"
environment_id = "env-1"
client_id = "client-1"
client_secret = "src-Secret-9f8e7d"
{source}
[[target]]
name = "zpa"
profile = "zpa"
base_url = "http://127.0.0.1:9/scim/v2"
token = "tok-Secret-1a2b3c"
scope = "all"
{target}
"""


def config_text(state: str, daemon: str = "", source: str = "", target: str = "") -> str:
    """BASE with these lines added; the daemon runs hourly with a 1 s grace unless they say otherwise."""
    for key, value in (("interval", '"1h"'), ("grace_period", '"1s"')):
        if not re.search(rf"^{key} = ", daemon, re.MULTILINE):
            daemon = f"{key} = {value}\n{daemon}"
    return BASE.format(state=state, daemon=daemon, source=source, target=target)


@dataclass(frozen=True)
class Case:
    """One numeric key set to one value, as TOML text, and what the parser should say."""

    key: str              # "daemon.interval", "target.max_deletes.count"
    value: object         # the TOML value (int, float or str)

    @property
    def dotted(self) -> str:
        """The key as a ConfigError names it."""
        return self.key.replace("target.", "target.zpa.", 1) if self.key.startswith("target.") else self.key

    @property
    def error_key(self) -> str:
        """The key a refusal names: the whole max_deletes for a sub-key refused as a type."""
        return self.dotted

    def toml_value(self) -> str:
        value = self.value
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value)
        return str(value)

    def text(self, state: str) -> str:
        section, _, name = self.key.partition(".")
        parts = {"daemon": "", "source": "", "target": ""}
        if name.startswith("max_deletes."):
            line = f"max_deletes = {{ {name.split('.')[1]} = {self.toml_value()} }}"
        else:
            line = f"{name} = {self.toml_value()}"
        if name == "delete_after":
            line = 'remove_action = "disable_then_delete"\n' + line
        parts[section] = line
        return config_text(state, **parts)

    def expected_seconds_or_number(self) -> float | None:
        """The value the parser must take, or None when it must refuse it (per RANGES)."""
        limits = RANGES[self.key]
        value = self.value
        if isinstance(value, str):
            if self.key not in DURATION_KEYS:
                return None
            try:
                number = parse_duration(value)
            except DurationError:
                return None
        elif isinstance(value, bool):
            return None
        elif isinstance(value, int):
            try:
                number = float(value)
            except OverflowError:
                return None
        else:
            if limits.integer:
                return None
            number = value
        return number if limits.holds(number) else None


def durations() -> st.SearchStrategy[str]:
    number = st.one_of(st.integers(0, 10**12).map(str),
                       st.floats(0, 1e9, allow_nan=False).map(lambda f: f"{f:.3f}"))
    unit = st.sampled_from(["ms", "s", "m", "h", "d", "w"])
    return st.one_of(st.tuples(number, unit).map("".join), st.sampled_from(["0", "", "1e308s", "-5s", "5"]))


def values(key: str) -> st.SearchStrategy[object]:
    limits = RANGES[key]
    near = st.one_of(
        st.just(limits.low), st.just(limits.high),
        st.floats(limits.low - 1, limits.high + 1, allow_nan=False),
        st.integers(math.floor(limits.low) - 2, math.ceil(limits.high) + 2),
    )
    wild: st.SearchStrategy[object] = st.one_of(
        st.floats(),                                        # NaN, ±inf, 1e308, 5e-324, -0.0
        st.integers(-(2**64), 2**64),
        st.sampled_from([10**400, -(10**400), 2**1100, 1e308, -1e308, 5e-324, 1e-300]),
    )
    choices: list[st.SearchStrategy[object]] = [near, wild]
    if key in DURATION_KEYS:
        choices.append(durations())
    return st.one_of(choices)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    key = draw(st.sampled_from(sorted(RANGES)))
    return Case(key, draw(values(key)))


def _value_at(cfg: Any, case: Case) -> float:
    section, _, name = case.key.partition(".")
    if section == "target":
        holder = cfg.targets[0]
        if name.startswith("max_deletes."):
            return float(getattr(holder.max_deletes, name.split(".")[1]))
        return float(getattr(holder, name))
    return float(getattr(getattr(cfg, section), name))


# -- load_config ------------------------------------------------------------------------------


@settings(max_examples=60)       # in-process and cheap: more than the suite's profile gives
@given(case=cases())
def test_every_numeric_key_takes_exactly_its_range_in_load_config(tmp_path_factory: pytest.TempPathFactory,
                                                                  case: Case) -> None:
    directory = tmp_path_factory.mktemp("ranges")
    path = directory / "provisiond.toml"
    path.write_text(case.text(str(directory / "state.db")), encoding="utf-8")
    path.chmod(0o600)
    expected = case.expected_seconds_or_number()
    try:
        cfg = load_config(path, environ={})
    except ConfigError as error:
        assert expected is None, f"{case}: refused although in range: {error}"
        assert str(error).startswith(f"{path}: {error.key}: ")
        assert error.key == case.error_key, (case, str(error))
        assert error.problem and "Traceback" not in error.problem
        return
    assert expected is not None, f"{case}: accepted although out of range"
    assert math.isclose(_value_at(cfg, case), expected, rel_tol=1e-9), case
    json.dumps(cfg.masked())
    diff_configs(cfg, cfg)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_range_edge_is_taken_and_just_outside_is_refused(tmp_path: Path, key: str) -> None:
    limits = RANGES[key]
    state = str(tmp_path / "state.db")
    path = tmp_path / "provisiond.toml"
    for value, ok in ((limits.low, not limits.low_open), (limits.high, True),
                      (limits.high * 1.5 + 1, False), (limits.low - 1, False)):
        typed: object = int(value) if limits.integer else float(value)
        case = Case(key, typed)
        path.write_text(case.text(state), encoding="utf-8")
        if ok:
            assert math.isclose(_value_at(load_config(path, environ={}), case), value), case
        else:
            with pytest.raises(ConfigError) as info:
                load_config(path, environ={})
            assert info.value.key == case.error_key, str(info.value)
            assert "out of range" in info.value.problem or "longer than zero" in info.value.problem, \
                str(info.value)


def test_the_issue_value_is_refused_with_the_range() -> None:
    with pytest.raises(ConfigError) as info:
        _load_text("interval = 1e308\n")
    assert info.value.key == "daemon.interval"
    assert info.value.problem == "1e+308 is out of range (1s..7d)"


def _load_text(daemon: str) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "p.toml"
        path.write_text(config_text(f"{directory}/s.db", daemon=daemon))
        return load_config(path, environ={})


# -- documentation ----------------------------------------------------------------------------


def _comment_above(text: str, name: str) -> str:
    """The comment lines right above the first `name = ` line of `text` (a section)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(rf"^{name} = ", line))
    block: list[str] = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(reversed(block))


def test_readme_and_example_config_document_every_range() -> None:
    readme = README.read_text(encoding="utf-8")
    example = EXAMPLE.read_text(encoding="utf-8")
    sections = {
        "daemon": example.split("\n[daemon]\n", 1)[1].split("\n[source]\n", 1)[0],
        "source": example.split("\n[source]\n", 1)[1].split("\n[[target]]\n", 1)[0],
        "target": example.split("\n[[target]]\n", 2)[1],
    }
    for key, limits in RANGES.items():
        section, name = key.split(".", 1)
        assert f"| `{key}` | {limits.text()} |" in readme, f"README's range table lacks {key}: {limits.text()}"
        comment = _comment_above(sections[section], name.split(".")[0])
        assert f"({limits.text()})" in comment, f"example config: no ({limits.text()}) above {key}: {comment!r}"


def test_range_text_reads_as_operators_write_it() -> None:
    assert Range(1.0, 604800.0, "s").text() == "1s..7d"
    assert Range(1, 1024, integer=True).text() == "1..1024"
    assert Range(0.0, 100000.0, low_open=True).text() == "above 0, at most 100000"
    assert format_duration(RANGES["daemon.grace_period"].high) == "1h"


# -- check-config in a subprocess ---------------------------------------------------------------


@settings(max_examples=8)
@given(case=cases())
def test_check_config_exits_0_or_78_never_a_traceback(tmp_path_factory: pytest.TempPathFactory,
                                                      case: Case) -> None:
    directory = tmp_path_factory.mktemp("check")
    path = directory / "provisiond.toml"
    path.write_text(case.text(str(directory / "state.db")), encoding="utf-8")
    path.chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "daemon", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    if case.expected_seconds_or_number() is None:
        assert done.returncode == 78, (case, done.returncode, done.stderr)
        assert f"{path}: {case.error_key}: " in done.stderr, done.stderr
    else:
        assert done.returncode == 0, (case, done.returncode, done.stderr)


@pytest.mark.parametrize("value", ["1e308", str(10**400)])
def test_check_config_refuses_the_issue_values_with_exit_78(tmp_path: Path, value: str) -> None:
    path = tmp_path / "provisiond.toml"
    path.write_text(config_text(str(tmp_path / "s.db"), daemon=f"jitter = {value}"), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "daemon", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    assert f"{path}: daemon.jitter: " in done.stderr and "Traceback" not in done.stderr


# -- SIGHUP reloads of a running daemon ---------------------------------------------------------


class RunningDaemon:
    """`provisiond run` in a subprocess; its JSON log lines arrive on a queue."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(config)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.pumps = [threading.Thread(target=self._pump, daemon=True),
                      threading.Thread(target=self._pump_stderr, daemon=True)]
        for pump in self.pumps:
            pump.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"event": "(not json)", "text": line})

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def wait_for(self, *events: str, within: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {events} within {within}s; exit {self.process.poll()}; "
                            f"stderr {''.join(self.stderr)[-2000:]}; last {self.seen[-5:]}")
            try:
                event = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.seen.append(event)
            if event.get("event") in events:
                return event

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for pump in self.pumps:
                pump.join(timeout=5)
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def daemon_with(tmp_path: Path) -> Iterator[tuple[RunningDaemon, Path]]:
    config = tmp_path / "provisiond.toml"
    config.write_text(config_text(str(tmp_path / "state.db")), encoding="utf-8")
    config.chmod(0o600)
    daemon = RunningDaemon(config)
    try:
        daemon.wait_for("daemon.ready")
        yield daemon, config
    finally:
        daemon.stop()


def test_sighup_with_out_of_range_numbers_fails_the_reload_and_the_daemon_runs_on(
        daemon_with: tuple[RunningDaemon, Path]) -> None:
    daemon, config = daemon_with
    state = str(config.with_name("state.db"))

    @settings(max_examples=15)
    @given(case=cases())
    def reload_with(case: Case) -> None:
        config.write_text(case.text(state), encoding="utf-8")
        daemon.process.send_signal(signal.SIGHUP)
        event = daemon.wait_for("config.reload_failed", "config.reloaded", "config.reload_held")
        assert daemon.process.poll() is None, f"the daemon died on {case}: {''.join(daemon.stderr)[-2000:]}"
        if case.expected_seconds_or_number() is None:
            assert event["event"] == "config.reload_failed", (case, event)
            assert f"{config}: {case.error_key}: " in event["error"], event
            assert event["kept"] == "the running configuration"
        else:
            assert event["event"] == "config.reloaded", (case, event)

    reload_with()
    # the issue's own value, then a good config: the daemon still takes it and stops cleanly
    config.write_text(Case("daemon.interval", 1e308).text(state), encoding="utf-8")
    daemon.process.send_signal(signal.SIGHUP)
    failed = daemon.wait_for("config.reload_failed", "config.reloaded")
    assert failed["event"] == "config.reload_failed" and "daemon.interval" in failed["error"], failed
    config.write_text(Case("daemon.interval", 120).text(state), encoding="utf-8")
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.wait_for("config.reload_failed", "config.reloaded")["event"] == "config.reloaded"
    assert daemon.stop() == 0, "".join(daemon.stderr)[-2000:]
    assert "Traceback" not in "".join(daemon.stderr)
