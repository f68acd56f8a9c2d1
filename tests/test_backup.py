"""Standby and backup: `provisiond backup PATH` beside a running daemon, a warm standby started
from the copy, and a cold standby (no state file) that rebuilds its links by adoption with zero
writes. The targets are read back over SCIM HTTP."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from tests.test_service import daemon_running, ready, run_command, stop, until, world, write_config


async def scim_users(base_url: str, token: str) -> dict[str, dict[str, Any]]:
    """Every user of a SCIM target, by userName, read over HTTP."""
    out: dict[str, dict[str, Any]] = {}
    start = 1
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            async with http.get(f"{base_url.rstrip('/')}/Users", params={"startIndex": str(start),
                                                                         "count": "100"}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            for res in body.get("Resources", []):
                out[res["userName"]] = res
            got = len(body.get("Resources", []))
            if got == 0 or start + got > int(body["totalResults"]):
                return out
            start += got


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode() + result.stderr.decode()


def events(result: subprocess.CompletedProcess[bytes], name: str) -> list[dict[str, Any]]:
    found = []
    for line in result.stdout.decode().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


def links(db: Path, kind: str = "user") -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT source_id, target_id FROM target_object WHERE target = 'zpa' AND kind = ?",
                                 (kind,)).fetchall())


async def test_backup_copies_the_state_consistently_while_the_daemon_runs_and_a_warm_standby_writes_nothing(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1s")
        backup = tmp_path / "backups" / "state-copy.db"
        backup.parent.mkdir()
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.summary"), "first cycle", explain=d.describe)
            d_ = w.sb.directory
            # the daemon writes while the copies are taken: users change in PingOne every cycle
            for round_no in range(4):
                for uid in sorted(d_.users)[round_no * 3:round_no * 3 + 3]:
                    d_.update_user(uid, title=f"Title {round_no}")
                result = await run_command("backup", "-c", str(w.config), str(backup))
                assert result.returncode == 0, out(result)
                assert f"to {backup}" in result.stdout.decode()
                assert stat.S_IMODE(backup.stat().st_mode) == 0o600
                with sqlite3.connect(backup) as conn:
                    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
                    assert conn.execute("SELECT count(*) FROM target_object").fetchone()[0] > 0
                await anyio.sleep(0.3)
            mark = len(d.events)
            await until(lambda: len(d.named("cycle.summary", since=mark)) >= 2, "the changes applied",
                        explain=d.describe)
            result = await run_command("backup", "-c", str(w.config), str(backup))
            assert result.returncode == 0, out(result)
            assert not list(backup.parent.glob(".*.tmp")), "no temporary file left behind"
            code = await stop(d)
        assert code == 0, d.describe()
        assert links(backup) == links(w.state)

        # a warm standby from the copy: same links, nothing to write
        standby = write_config(w.sb, tmp_path / "warm.toml", interval="1s")
        backup.rename(tmp_path / "warm.db")
        before = await scim_users(w.sb.zpa_url, w.sb.zpa.token)
        w.sb.zpa.reset_counters()
        result = await run_command("once", "-c", str(standby))
        assert result.returncode == 0, out(result)
        assert w.sb.zpa.writes() == 0, w.sb.zpa.counters
        assert await scim_users(w.sb.zpa_url, w.sb.zpa.token) == before

        # refusals: no state file, and the state file itself
        missing = write_config(w.sb, tmp_path / "nothing.toml")
        result = await run_command("backup", "-c", str(missing), str(tmp_path / "x.db"))
        assert result.returncode == 1 and "no state file" in out(result)
        assert not (tmp_path / "nothing.db").exists(), "backup never creates a state file"
        result = await run_command("backup", "-c", str(w.config), str(w.state))
        assert result.returncode == 1 and "is the state file itself" in out(result)


async def test_a_cold_standby_with_an_empty_state_file_adopts_every_managed_object_with_zero_writes(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        primary = write_config(w.sb, w.config, interval="1s")
        result = await run_command("once", "-c", str(primary))
        assert result.returncode == 0, out(result)
        managed = links(w.state)
        managed_groups = links(w.state, "group")
        assert len(managed) > 10 and len(managed_groups) == 2
        before = await scim_users(w.sb.zpa_url, w.sb.zpa.token)

        standby = write_config(w.sb, tmp_path / "standby.toml", interval="1s")
        assert not (tmp_path / "standby.db").exists()
        w.sb.zpa.reset_counters()
        result = await run_command("once", "-c", str(standby))
        assert result.returncode == 0, out(result)
        assert w.sb.zpa.writes() == 0, w.sb.zpa.counters
        assert await scim_users(w.sb.zpa_url, w.sb.zpa.token) == before
        adopted = events(result, "user.adopted")
        assert {e["source_id"] for e in adopted} == set(managed)
        assert {e["source_id"] for e in events(result, "group.adopted")} == set(managed_groups)
        # the same PingOne id -> target object pairs as the primary's
        assert links(tmp_path / "standby.db") == managed
        assert links(tmp_path / "standby.db", "group") == managed_groups
        (finished,) = events(result, "cycle.finished")
        assert finished["outcome"] == "success" and finished["full_sync"] is True
        # and its next cycle is a no-op too
        w.sb.zpa.reset_counters()
        result = await run_command("once", "-c", str(standby))
        assert result.returncode == 0, out(result)
        assert w.sb.zpa.writes() == 0, w.sb.zpa.counters
