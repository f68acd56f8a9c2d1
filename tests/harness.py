"""The in-process harness shared by the engine and safety tests.

The emulators run in the test process on loopback and the Engine in-process against them, with a
real SQLite file and a config written by `daemon.sandbox.runner` (fast limits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from structlog.testing import capture_logs
from structlog.typing import EventDict

from daemon.config import Config, load_config
from daemon.engine import CycleReport, Engine, TargetReport
from daemon.sandbox.directory import Directory
from daemon.sandbox.runner import Sandbox, build_sandbox, running, write_config
from daemon.sandbox.scim import ScimEmulator
from daemon.store import Store

FAST_RPS = 5000.0          # tests are bounded by the loopback, not by a rate
TARGETS = ("zpa", "zia")


@dataclass
class Harness:
    sb: Sandbox
    config: Config
    config_path: Path
    store: Store
    engine: Engine
    state_path: Path
    logs: list[EventDict] = field(default_factory=list)
    last_logs: list[EventDict] = field(default_factory=list)
    report: CycleReport | None = None
    strict: bool = False          # every cycle must read PingOne (tests that never break the source)

    @property
    def directory(self) -> Directory:
        return self.sb.directory

    def emulator(self, target: str) -> ScimEmulator:
        return self.sb.zpa if target == "zpa" else self.sb.zia

    async def cycle(self) -> CycleReport:
        for em in (self.sb.zpa, self.sb.zia):
            em.reset_counters()
        with capture_logs() as captured:
            report = await self.engine.cycle()
        self.last_logs = captured
        self.logs.extend(captured)
        self.report = report
        if self.strict:
            assert report.source_error is None, report.source_error
        return report

    def target_report(self, target: str) -> TargetReport:
        assert self.report is not None
        return next(t for t in self.report.targets if t.target == target)

    def retarget(self, target: str, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, targets=tuple(
            dataclasses.replace(t, **changes) if t.name == target else t for t in self.config.targets))
        self.engine.reconfigure(self.config)

    def events(self, name: str, **match: Any) -> list[EventDict]:
        return [e for e in self.last_logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]

    def all_events(self, name: str, **match: Any) -> list[EventDict]:
        return [e for e in self.logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    users: int = 60,
    groups: int = 6,
    seed: int = 5,
    prepare: Callable[[Sandbox], None] | None = None,
    daemon: dict[str, Any] | None = None,
    **overrides: dict[str, Any],
) -> AsyncIterator[Harness]:
    """Emulators, a config for them (fast limits), a state file and an Engine.

    `prepare` edits the sandbox before anything runs; `daemon` replaces DaemonConfig fields;
    `overrides` maps a target name to the TargetConfig fields to replace."""
    sb = build_sandbox(users=users, groups=groups, seed=seed, zia_rps=FAST_RPS)
    sb.zpa.faults.rate_limit_rps = None
    if prepare is not None:
        prepare(sb)
    state_path = tmp_path / "state.db"
    async with running(sb, port=0):
        config_path = write_config(sb, tmp_path / "provisiond.toml", state_path=str(state_path), zia_rps=FAST_RPS)
        config = load_config(config_path)
        config = dataclasses.replace(config, targets=tuple(
            dataclasses.replace(t, **{"requests_per_second": FAST_RPS, "burst": FAST_RPS, "concurrency": 8,
                                      **overrides.get(t.name, {})})
            for t in config.targets))
        if daemon:
            config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, **daemon))
        store = await Store.open(state_path)
        try:
            async with aiohttp.ClientSession() as session:
                engine = Engine(config, store, session, log=structlog.get_logger())
                yield Harness(sb, config, config_path, store, engine, state_path)
        finally:
            await store.close()


