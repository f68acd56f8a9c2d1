"""The `provisiond` command line (also `python -m daemon`). Exit codes: 0 ok, 1 failure, 78 bad config."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from daemon import logs
from daemon.config import Config, ConfigError, load_config, resolve_config_path
from daemon.durations import local_time
from daemon.engine import (
    META_SOURCE_ERROR,
    META_SOURCE_FAILING_SINCE,
    META_SOURCE_LAST_COMPLETE,
    CycleReport,
    Engine,
)
from daemon.http_session import http_session
from daemon.links import PENDING, Op, Plan
from daemon.lock import StateLock, StateLocked
from daemon.progress import ApplyProgress, ProgressSink, is_terminal
from daemon.store import Store, StoreError

EX_OK = 0
EX_FAIL = 1
EX_CONFIG = 78
SUMMARY_ORDER = ("impacted", "success", "unsynced", "partial", "failed", "skipped")   # PingOne's order


def _load(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(getattr(args, "config", None)))


def _config_error(exc: ConfigError) -> int:
    print(f"provisiond: invalid config: {exc}", file=sys.stderr)
    return EX_CONFIG


def configured(command: Callable[[argparse.Namespace, Config], int]) -> Callable[[argparse.Namespace], int]:
    """A command that needs the config: 78 when it is invalid, 1 when the state file is unusable."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            cfg = _load(args)
        except ConfigError as exc:
            return _config_error(exc)
        try:
            return command(args, cfg)
        except StoreError as exc:
            print(f"provisiond: state: {exc}", file=sys.stderr)
            return EX_FAIL

    return run


def _setup_logging(cfg: Config, *, to_stderr: bool = False, level: str | None = None) -> None:
    logs.configure(fmt=cfg.daemon.log_format, level=level or cfg.daemon.log_level, secrets=cfg.secrets(),
                   stream=sys.stderr if to_stderr else sys.stdout)


# -- once -------------------------------------------------------------------------------------


@asynccontextmanager
async def opened_engine(cfg: Config) -> AsyncIterator[Engine]:
    """An Engine over the config's state file and one HTTP session, closed on the way out."""
    store = await Store.open(cfg.daemon.state_path)
    try:
        async with http_session() as session:
            yield Engine(cfg, store, session, log=logs.get_logger())
    finally:
        await store.close()


async def _once(cfg: Config, full: bool = False, progress: ProgressSink | None = None) -> CycleReport:
    async with opened_engine(cfg) as engine:
        if full:    # read every target now: drift repair and adoption, whatever full_sync_every says
            engine.full_sync_now = set(engine.runtimes)
        if progress is not None:
            engine.progress = progress.update
            engine.observers.append(progress.observe)
        return await engine.cycle()


@configured
def cmd_once(args: argparse.Namespace, cfg: Config) -> int:
    _setup_logging(cfg)
    lock = StateLock(cfg.daemon.state_path)
    try:
        lock.acquire()        # never apply beside a running daemon on the same state
    except (StateLocked, OSError) as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
        return EX_FAIL
    try:
        with ApplyProgress(sys.stderr) as progress:     # live on a terminal, plain lines otherwise
            report = anyio.run(_once, cfg, bool(getattr(args, "full", False)), progress)
    finally:
        lock.release()
    return EX_FAIL if report.failed else EX_OK


# -- plan -------------------------------------------------------------------------------------


async def _plan(cfg: Config) -> tuple[dict[str, Plan], bool]:
    async with opened_engine(cfg) as engine:
        return await engine.preview()


def _fmt(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def describe_op(op: Op) -> str:
    sign = {"create": "+", "delete": "-", "add_members": "+", "remove_members": "-"}.get(op.op, "~")
    head = f"  {sign} {op.kind} {op.op:<14} {op.name}  ({op.reason})"
    if op.status != PENDING:
        head += f"  [{op.status}: {op.skip_reason}]"
    lines = [head]
    payload = op.payload
    if op.op == "update":
        for path, after in sorted(payload.get("changed", {}).items()):
            lines.append(f"      {path}: {_fmt(payload.get('before', {}).get(path))} -> {_fmt(after)}")
    elif op.op == "create" and op.kind == "user":
        for path, value in sorted(payload.get("attrs", {}).items()):
            if value is not None:
                lines.append(f"      {path}: {_fmt(value)}")
    elif op.op == "rename":
        lines.append(f"      displayName: {_fmt(payload.get('before'))} -> {_fmt(payload.get('display_name'))}")
    elif op.op in ("add_members", "remove_members"):
        count = len(payload.get("source_ids", ())) + len(payload.get("target_ids", ()))
        lines.append(f"      members: {count}")
    return "\n".join(lines)


@configured
def cmd_plan(args: argparse.Namespace, cfg: Config) -> int:
    _setup_logging(cfg, to_stderr=True, level="warning")
    plans, complete = anyio.run(_plan, cfg)
    if args.json:
        out = {name: {"counts": p.counts(), "held": p.removals_held, "deferred_removals": p.removals_deferred,
                      "snapshot_complete": complete,
                      "operations": [{"seq": o.seq, "kind": o.kind, "op": o.op, "name": o.name,
                                      "source_id": o.source_id, "target_id": o.target_id, "reason": o.reason,
                                      "status": o.status, "skip_reason": o.skip_reason,
                                      "payload": dict(o.payload)} for o in p.ops]}
               for name, p in plans.items()}
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return EX_OK
    for name, p in plans.items():
        pending = len(p.pending())
        print(f"target {name}: {pending} operation(s) to apply, {len(p.ops) - pending} skipped or held"
              + ("" if complete else " (snapshot incomplete: no removals planned)"))
        for op in p.ops:
            print(describe_op(op))
    return EX_OK


# -- status -----------------------------------------------------------------------------------


async def _status(cfg: Config) -> dict[str, Any]:
    from daemon import approvals

    store = await Store.open(cfg.daemon.state_path)
    try:
        cycles = await store.latest_cycles()
        out: dict[str, Any] = {"source": await _source_state(store), "targets": []}
        for c in cycles:
            c["held"] = await store.held_count(c["target"])
            c["managed_users"] = await store.managed_count(c["target"], "user")
            c["managed_groups"] = await store.managed_count(c["target"], "group")
            c["approval_pending"] = await store.approved(c["target"])
            held_plan = await approvals.held_plan(store, c["target"], c["cycle"])
            c["held_plan"] = held_plan.as_dict() if held_plan is not None else None
            c["approved_plan"] = await approvals.pending(store, c["target"])
            c["recent_failures"] = await store.recent_failures(c["target"], limit=10)
            c["kind"] = "cycle"
            c["last_incremental"] = await store.latest_cycle_of_kind(c["target"], "incremental")
            c["changes_missed"] = await _missed_at(store, c["target"])
            out["targets"].append(c)
        out["held_reload"] = await approvals.held_reload(store)
        out["source_shrunk"] = await approvals.shrunk(store)
        out["changes"] = await _changes_state(cfg, store)
        return out
    finally:
        await store.close()


async def _changes_state(cfg: Config, store: Store) -> dict[str, Any]:
    """The change feed (README "How changes flow"): its mode, watermark and lag."""
    from daemon.source.changes import WATERMARK_KEY

    text = await store.get_meta(WATERMARK_KEY)
    try:
        mark = float(text) if text is not None else None
    except ValueError:
        mark = None
    return {"mode": cfg.source.changes, "watermark": mark,
            "lag_s": round(max(0.0, time.time() - mark), 1) if mark is not None else None}


async def _source_state(store: Store) -> dict[str, Any]:
    """What the last cycles said about PingOne (`Engine.record_source`)."""
    def number(text: str | None) -> float | None:
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None

    since = number(await store.get_meta(META_SOURCE_FAILING_SINCE))
    return {"ok": since is None, "last_complete": number(await store.get_meta(META_SOURCE_LAST_COMPLETE)),
            "failing_since": since, "error": await store.get_meta(META_SOURCE_ERROR) if since is not None else None}


def source_line(source: dict[str, Any], now: float | None = None) -> str | None:
    """The first line of `status`: PingOne failing (since when, why), or read completely (when)."""
    last = source.get("last_complete")
    if source.get("failing_since") is not None:
        failing_for = max(0, round((time.time() if now is None else now) - source["failing_since"]))
        return (f"SOURCE FAILING: PingOne has not been read completely since {_when(source['failing_since'])} "
                f"({failing_for}s; last complete snapshot {_when(last)}): {source.get('error')}")
    if last is not None:
        return f"source PingOne: ok (last complete snapshot {_when(last)})"
    return None


def _when(ts: float | None) -> str:
    return local_time(ts)     # with its zone


@configured
def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    data = anyio.run(_status, cfg)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
        return EX_OK
    line = source_line(data["source"])
    if line is not None:
        print(line)
    if data.get("held_reload"):
        r = data["held_reload"]
        print(f"RELOAD HELD: {r.get('path')} (held at {_when(r.get('held_at'))}) would remove more than "
              f"max_deletes in {', '.join(sorted(r.get('targets') or {}))}; "
              "activate with `provisiond approve --reload`")
    if data.get("source_shrunk"):
        sh = data["source_shrunk"]
        print(f"SOURCE SHRUNK: the last snapshot had {sh['users']} users (last good {sh['last_good_users']}); "
              "removals are deferred; accept with `provisiond approve --source-shrink`")
    changes = data["changes"]
    if changes["mode"] != "off":
        print(f"change feed ({changes['mode']}): " + (
            f"watermark {_when(changes['watermark'])}, lag {changes['lag_s']}s" if changes["watermark"] is not None
            else "no watermark yet (a full snapshot comes first)"))
    if not data["targets"]:
        print("no cycle has run yet")
    for t in data["targets"]:
        s = t["summary"]
        print(f"target {t['target']}: last cycle {t['cycle']} {t['outcome']} "
              f"(started {_when(t['started'])}, finished {_when(t['finished'])}"
              f"{', full sync' if t['full_sync'] else ''})")
        for kind in ("users", "groups"):
            if kind in s:
                row = s[kind]
                print(f"  {kind:<7} " + "  ".join(f"{k} {row[k]}" for k in SUMMARY_ORDER if k in row))
        inc = t.get("last_incremental")
        if inc is not None:
            ops = sum(n for key, n in inc["summary"].get("operations", {}).items() if key.endswith(".applied"))
            print(f"  last incremental cycle {inc['cycle']} {inc['outcome']} (finished {_when(inc['finished'])}, "
                  f"{ops} applied)")
        if t.get("changes_missed") is not None:
            print(f"  CHANGES MISSED: an incremental cycle left this target without changes at "
                  f"{_when(t['changes_missed'])}; its full cycle runs as soon as it is healthy")
        if s.get("busy"):
            held = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(s["busy"].items()))
            print(f"  BUSY: {held} not written: another provisiond process held them past the wait; "
                  "the target's cycle is retried on its back-off")
        print(f"  managed: {t['managed_users']} users, {t['managed_groups']} groups; "
              f"unmanaged users in target: {s.get('unmanaged_users', '-')}")
        if t["held"]:
            print(f"  HELD: {t['held']} operation(s) (removals above max_deletes and the member removals "
                  f"they imply); release with `provisiond approve --target {t['target']}`")
        if t.get("held_plan"):
            hp = t["held_plan"]
            ops = ", ".join(f"{op} {n}" for op, n in sorted(hp["by_op"].items()))
            print(f"  held plan {hp['plan']}: {hp['removals']} removal(s) ({ops}), {hp['member_removals']} "
                  f"member removal(s); `provisiond approve --target {t['target']} --plan {hp['plan']}`")
        if t.get("approved_plan") is not None:
            print(f"  approved: plan {t['approved_plan']}, released at the next cycle")
        if s.get("deferred_removals"):
            print(f"  deferred: {s['deferred_removals']} removal(s) not planned (snapshot incomplete or shrunk)")
        if s.get("group_limit"):
            gl = s["group_limit"]
            print(f"  group limit: {gl['memberships']} membership(s) of {gl['users']} user(s) not sent: beyond the "
                  f"target's groups-per-user cap (group_limit)")
        if s.get("refused"):
            print("  refused: " + ", ".join(f"{n} user delete(s) ({reason})" for reason, n in sorted(s["refused"].items()))
                  + "; the target refuses them for good: asked again at the next full sync")
        for f in t["recent_failures"]:
            status = f" HTTP {f['http_status']}" if f["http_status"] else ""
            print(f"  failed: {f['kind']} {f['op']} {f['name']}{status}"
                  f"{' ' + f['scim_type'] if f['scim_type'] else ''}: {f['error']}")
    return EX_OK


# -- check-config / test-connection / approve -------------------------------------------------


@configured
def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    print(json.dumps(cfg.masked(), ensure_ascii=False, indent=2, default=str))
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{cfg.path}: OK ({len(cfg.targets)} target(s))", file=sys.stderr)
    return EX_OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    from daemon.config_schema import json_schema_text

    sys.stdout.write(json_schema_text())
    return EX_OK


async def _test_connection(cfg: Config) -> bool:
    from daemon.engine import build_runtime, source_client

    ok = True
    async with http_session() as session:
        src = source_client(cfg, session)
        try:
            await src.token()
            async for page in src.iter_users():
                print(f"source PingOne {cfg.source.api_url}: OK (token issued, users readable: {len(page)} on page 1)")
                break
            else:
                print(f"source PingOne {cfg.source.api_url}: OK (token issued, no users)")
        except Exception as exc:
            ok = False
            print(f"source PingOne {cfg.source.api_url}: FAILED: {logs.REDACTOR.scrub(str(exc))}")
        for target in cfg.targets:
            rt = build_runtime(target, session)
            try:
                async for _ in rt.client.iter_users():
                    break
                print(f"target {target.name} ({target.profile}) {target.base_url}: OK")
            except Exception as exc:
                ok = False
                print(f"target {target.name} ({target.profile}) {target.base_url}: FAILED: "
                      f"{logs.REDACTOR.scrub(str(exc))}")
    return ok


@configured
def cmd_test_connection(args: argparse.Namespace, cfg: Config) -> int:
    _setup_logging(cfg, to_stderr=True, level="warning")
    return EX_OK if anyio.run(_test_connection, cfg) else EX_FAIL


async def _missed_at(store: Store, target: str) -> float | None:
    """When an incremental cycle last left `target` without changes its full cycle still owes; None."""
    from daemon import approvals

    try:
        return float(await store.get_meta(f"{approvals.META_MISSED_CHANGES}.{target}") or "")
    except ValueError:
        return None


async def _approve(cfg: Config, target: str | None, plan_id: int | None, reload: bool,
                   source_shrink: bool) -> list[str]:
    """Record each approval asked for, or none: a part with nothing to release refuses them all."""
    from daemon import approvals

    store = await Store.open(cfg.daemon.state_path)
    try:
        lines: list[str] = []
        # Check every part first, so that a refused part leaves the others unwritten too.
        if target is not None and await approvals.held_plan(store, target, plan_id) is None:
            which = f"plan {plan_id}" if plan_id is not None else "its latest cycle"
            raise approvals.NothingHeld(f"target {target}: nothing is held in {which}; nothing approved")
        if reload and await approvals.held_reload(store) is None:
            raise approvals.NothingHeld("no reload is staged by a running daemon; nothing approved")
        if source_shrink and await approvals.shrunk(store) is None:
            raise approvals.NothingHeld("no shrunk source snapshot is waiting; nothing approved")
        if target is not None:
            held = await approvals.approve(store, target, plan_id)
            lines.append(f"approved: target {target}, {held.text()}; its next cycle applies these once "
                         "(any other removal is held again above max_deletes)")
        if reload:
            staged = await approvals.approve_reload(store)
            lines.append(f"approved: the reload of {staged.get('path')} held at {_when(staged.get('held_at'))} "
                         f"(targets {', '.join(sorted(staged.get('targets') or {}))}); the running daemon "
                         "activates it before its next cycle")
        if source_shrink:
            found = await approvals.accept_shrink(store)
            lines.append(f"approved: a source snapshot of at least {found['users']} users (last good "
                         f"{found['last_good_users']}) is used for removals from the next cycle; each "
                         "target's max_deletes still applies")
        return lines
    finally:
        await store.close()


def cmd_approve(args: argparse.Namespace) -> int:
    from daemon.approvals import NothingHeld

    if args.target is None and not args.reload and not args.source_shrink:
        print("provisiond: approve needs --target NAME, --reload and/or --source-shrink", file=sys.stderr)
        return EX_FAIL
    if args.plan is not None and args.target is None:
        print("provisiond: --plan needs --target", file=sys.stderr)
        return EX_FAIL
    try:
        cfg = _load(args)
        if args.target is not None:
            cfg.target(args.target)
    except ConfigError as exc:
        return _config_error(exc)
    except KeyError:
        print(f"provisiond: no target named {args.target!r} in {cfg.path}", file=sys.stderr)
        return EX_FAIL
    try:
        lines = anyio.run(_approve, cfg, args.target, args.plan, args.reload, args.source_shrink)
    except NothingHeld as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
        return EX_FAIL
    for line in lines:
        print(line)
    return EX_OK


# -- resync / sync-group ----------------------------------------------------------------------


async def _resync(cfg: Config, targets: list[str]) -> None:
    import uuid

    from daemon.engine import META_RESYNC

    store = await Store.open(cfg.daemon.state_path)
    try:
        for name in targets:
            await store.set_meta(f"{META_RESYNC}.{name}", uuid.uuid4().hex)
    finally:
        await store.close()


@configured
def cmd_resync(args: argparse.Namespace, cfg: Config) -> int:
    try:
        targets = [cfg.target(args.target).name] if args.target is not None else [t.name for t in cfg.targets]
    except KeyError:
        print(f"provisiond: no target named {args.target!r} in {cfg.path}", file=sys.stderr)
        return EX_FAIL
    anyio.run(_resync, cfg, targets)
    for name in targets:
        print(f"requested: the next cycle of {name} reads the target whole (drift repair, adoption)")
    return EX_OK


async def _sync_group(cfg: Config, args: argparse.Namespace) -> Any:
    from daemon.ondemand import sync_group

    store = await Store.open(cfg.daemon.state_path)
    try:
        async with http_session() as session:
            emit = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
            with ApplyProgress(sys.stderr) as progress:
                return await sync_group(cfg, store, session, args.group, target=args.target,
                                        dry_run=args.dry_run, log=logs.get_logger(command="sync-group"), emit=emit,
                                        progress=progress)
    finally:
        await store.close()


@configured
def cmd_sync_group(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.ondemand import UnknownGroup

    return _run_on_demand(args, cfg, _sync_group, UnknownGroup)


# -- backup -----------------------------------------------------------------------------------


@configured
def cmd_backup(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.backup import BackupError, backup_state

    try:
        result = backup_state(cfg.daemon.state_path, args.path)
    except BackupError as exc:
        print(f"provisiond: backup: {exc}", file=sys.stderr)
        return EX_FAIL
    print(f"backed up {result.source} to {result.path} ({result.bytes} bytes, {result.pages} pages, "
          f"schema {result.schema_version})")
    return EX_OK


# -- why / sync-user --------------------------------------------------------------------------


async def _why(cfg: Config, ref: str, target: str | None) -> dict[str, Any]:
    from daemon.explain import explain

    store = await Store.open(cfg.daemon.state_path)
    try:
        return await explain(store, cfg, ref, target)
    finally:
        await store.close()


@configured
def cmd_why(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.explain import UnknownUser, render_explanation

    try:
        data = anyio.run(_why, cfg, args.user, args.target)
    except UnknownUser as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyError:
        print(f"provisiond: no target named {args.target!r} in {cfg.path}", file=sys.stderr)
        return EX_FAIL
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    else:
        print(render_explanation(data))
    return EX_OK


async def _sync_user(cfg: Config, args: argparse.Namespace) -> Any:
    from daemon.ondemand import sync_user

    store = await Store.open(cfg.daemon.state_path)
    try:
        async with http_session() as session:
            emit = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
            with ApplyProgress(sys.stderr) as progress:
                return await sync_user(cfg, store, session, args.user, target=args.target, dry_run=args.dry_run,
                                       log=logs.get_logger(command="sync-user"), emit=emit, progress=progress)
    finally:
        await store.close()


@configured
def cmd_sync_user(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.explain import UnknownUser

    return _run_on_demand(args, cfg, _sync_user, UnknownUser)


def _run_on_demand(args: argparse.Namespace, cfg: Config,
                   run: Callable[[Config, argparse.Namespace], Awaitable[Any]],
                   unknown: type[Exception]) -> int:
    """`sync-user` and `sync-group`: run one on-demand sync, print its result, exit 0 or 1."""
    from daemon.errors import ProvisiondError

    _setup_logging(cfg, to_stderr=True, level="warning")
    try:
        result = anyio.run(run, cfg, args)
    except unknown as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyError:
        print(f"provisiond: no target named {args.target!r} in {cfg.path}", file=sys.stderr)
        return EX_FAIL
    except ProvisiondError as exc:
        print(f"provisiond: PingOne: {logs.REDACTOR.scrub(str(exc))}", file=sys.stderr)
        return EX_FAIL
    if args.json:
        print(json.dumps(result.as_json(), ensure_ascii=False, indent=2, default=str))
    else:
        print(f"{'dry run ' if result.dry_run else ''}done in {result.took_s:.3f}s"
              + (": some operations FAILED" if result.failed else ""))
    return EX_FAIL if result.failed else EX_OK


# -- run --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import run_service

    return run_service(resolve_config_path(args.config))


# -- sandbox / demo ---------------------------------------------------------------------------


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _sandbox(args: argparse.Namespace) -> None:
    from daemon.sandbox.runner import build_sandbox, running, write_config

    sandbox = build_sandbox(users=args.users, groups=args.groups, seed=args.seed, latency_ms=args.latency_ms,
                            error_rate=args.error_rate)
    async with running(sandbox, port=args.port):
        print(sandbox.describe(), flush=True)
        if args.write_config:
            path = write_config(sandbox, args.write_config)
            print(f"config written to {path}", flush=True)
        print("serving; Ctrl-C stops", flush=True)
        await _stop_event().wait()
    print("sandbox stopped", flush=True)


def cmd_sandbox(args: argparse.Namespace) -> int:
    asyncio.run(_sandbox(args))
    return EX_OK


async def _demo(args: argparse.Namespace) -> int:
    from daemon.sandbox.runner import build_sandbox, mutate, running, write_config

    sandbox = build_sandbox(users=args.users, groups=args.groups, seed=args.seed, zia_rps=args.zia_rps)
    stop = _stop_event()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="provisiond-demo-") as tmp:
        async with running(sandbox, port=args.port):
            path = write_config(sandbox, Path(tmp) / "demo.toml", log_format=args.log_format,
                                zia_rps=args.zia_rps)
            cfg = load_config(path)
            logs.configure(fmt=cfg.daemon.log_format, level="info" if args.verbose else "warning",
                           secrets=cfg.secrets())
            print(sandbox.describe(), flush=True)
            print(f"\nconfig: {path} (state {cfg.daemon.state_path})\n", flush=True)
            store = await Store.open(cfg.daemon.state_path)
            try:
                async with http_session() as session:
                    engine = Engine(cfg, store, session, log=logs.get_logger())
                    live = is_terminal(sys.stderr)    # a live display on stderr; else plain lines here
                    if not live:
                        engine.progress = _progress_printer()
                    step = 0
                    while not stop.is_set() and (args.cycles == 0 or step < args.cycles):
                        step += 1
                        if step > 1:
                            for line in mutate(sandbox.directory, rng, step):
                                print(f"  PingOne: {line}", flush=True)
                        if live:
                            with ApplyProgress(sys.stderr, live=True) as progress:
                                engine.progress = progress.update
                                engine.observers[:] = [progress.observe]
                                report = await engine.cycle()
                        else:
                            report = await engine.cycle()
                        print_cycle(step, report, sandbox)
                        if args.cycles and step >= args.cycles:
                            break
                        try:
                            await asyncio.wait_for(stop.wait(), timeout=args.interval)
                        except TimeoutError:
                            pass
            finally:
                await store.close()
    print("demo stopped", flush=True)
    return EX_OK


def _progress_printer(every: float = 3.0) -> Any:
    """An engine progress hook printing "zpa: applying 300/609" at most every few seconds per target."""
    last: dict[str, float] = {}

    def hook(target: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last.setdefault(target, now) >= every:
            last[target] = now
            if done < total:
                print(f"  {target}: applying {done}/{total}", flush=True)

    return hook


def print_cycle(step: int, report: CycleReport, sandbox: Any) -> None:
    took = report.finished - report.started
    print(f"cycle {step}: {report.snapshot_users} PingOne users read, {took:.1f}s", flush=True)
    if report.source_error:
        print(f"  source failed: {report.source_error}", flush=True)
    for t in report.targets:
        u = t.summary.get("users", {})
        g = t.summary.get("groups", {})
        ops = ", ".join(f"{k} {v}" for k, v in sorted(t.plan_counts.items())) or "nothing to do"
        emulator = getattr(sandbox, t.target, None)
        in_target = f"; target holds {len(emulator.users)} users" if emulator is not None else ""
        print(f"  {t.target:<4} {t.outcome:<15} ops: {ops}", flush=True)
        print(f"       users impacted {u.get('impacted', 0)} success {u.get('success', 0)} "
              f"unsynced {u.get('unsynced', 0)} skipped {u.get('skipped', 0)} failed {u.get('failed', 0)}; "
              f"groups {g.get('success', 0)}/{g.get('impacted', 0)} in sync{in_target}", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))


# -- parser -----------------------------------------------------------------------------------


def _version() -> str:
    """The installed distribution's version ("unknown" when run from a bare source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("provisiond")
    except PackageNotFoundError:
        return "unknown"



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="provisiond", description=__doc__)
    parser.add_argument("--version", action="version", version=f"provisiond {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", help="config file (default $PROVISIOND_CONFIG, then "
                       "/etc/provisiond/provisiond.toml)")
        return p

    with_config(sub.add_parser("run", help="the daemon: cycles forever")).set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("once", help="one full cycle, then exit"))
    p.add_argument("--full", action="store_true",
                   help="read every target now (drift repair, adoption) instead of at full_sync_every")
    p.set_defaults(func=cmd_once)
    p = with_config(sub.add_parser("plan", help="snapshot and plan, apply nothing"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = with_config(sub.add_parser("status", help="last cycle per target and recent failures"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    with_config(sub.add_parser("check-config", help="validate and print the config, secrets masked")
                ).set_defaults(func=cmd_check_config)
    sub.add_parser("config-schema", help="print the config file's JSON Schema (draft 2020-12), for editors"
                   ).set_defaults(func=cmd_config_schema)
    with_config(sub.add_parser("test-connection", help="authenticate and read once from each side")
                ).set_defaults(func=cmd_test_connection)
    p = with_config(sub.add_parser("approve", help="release removals held by max_deletes, once"))
    p.add_argument("--target", help="release this target's held plan (once): exactly the removals it held")
    p.add_argument("--plan", type=int, metavar="ID",
                   help="the held plan to release, as `status` shows it (default: the target's latest)")
    p.add_argument("--source-shrink", action="store_true",
                   help="accept the shrunk PingOne snapshot the daemon refused (removals deferred)")
    p.add_argument("--reload", action="store_true",
                   help="activate a reload the running daemon held because it would remove too much")
    p.set_defaults(func=cmd_approve)
    p = with_config(sub.add_parser("resync", help="ask the running daemon for a full sync (the targets read "
                                   "whole) at its next cycle"))
    p.add_argument("--target", help="only this target")
    p.set_defaults(func=cmd_resync)
    p = with_config(sub.add_parser("sync-group", help="push one group and its in-scope members now"))
    p.add_argument("group", metavar="GROUP", help="PingOne group name or id")
    p.add_argument("--target", help="only this target")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send and record nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sync_group)
    p = with_config(sub.add_parser("backup", help="copy the state file consistently, also while the daemon "
                                   "runs (SQLite online backup; the copy is 0600)"))
    p.add_argument("path", metavar="PATH", help="where to write the copy (replaced atomically)")
    p.set_defaults(func=cmd_backup)
    p = with_config(sub.add_parser("why", help="explain, from the state file, what provisiond did and will "
                                   "do for one user"))
    p.add_argument("user", metavar="USER", help="PingOne user id, username or email")
    p.add_argument("--target", help="only this target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_why)
    p = with_config(sub.add_parser("sync-user", help="provision one user now (fetched from PingOne)"))
    p.add_argument("user", metavar="USER", help="PingOne user id, username or email")
    p.add_argument("--target", help="only this target")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send and record nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sync_user)

    def emulator_options(p: argparse.ArgumentParser, users: int, groups: int, port: int) -> None:
        p.add_argument("--users", type=int, default=users)
        p.add_argument("--groups", type=int, default=groups)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--port", type=int, default=port,
                       help=f"PingOne on PORT, zpa SCIM on PORT+1, zia SCIM on PORT+2; 0 = free ports "
                            f"(default {port})")

    p = sub.add_parser("sandbox", help="run the emulators alone")
    emulator_options(p, 2000, 40, 8900)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--write-config", metavar="PATH", help="write a provisiond config targeting the emulators")
    p.set_defaults(func=cmd_sandbox)
    p = sub.add_parser("demo", help="the emulators and real cycles against them")
    emulator_options(p, 2000, 40, 0)
    p.add_argument("--cycles", type=int, default=0, help="stop after N cycles (0 = until Ctrl-C)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between cycles")
    p.add_argument("--zia-rps", type=float, default=25.0,
                   help="the zia emulator's rate limit and the zia target's requests_per_second "
                        "(real ZIA: 5/s; the demo default is faster so that cycles are short)")
    p.add_argument("--log-format", default="console", choices=["console", "json"])
    p.add_argument("--verbose", action="store_true", help="log every entity event")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(os.umask(0o077) | 0o077)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
