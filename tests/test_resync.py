"""Full resync on demand: `once --full`, `provisiond resync` beside a running daemon, and
`provisiond sync-group GROUP`. Outcomes are read back from the SCIM target over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.test_backup import scim_users
from tests.test_service import daemon_running, ready, run_command, stop, until, world, write_config

DRIFTED = "Drifted-Behind-Our-Back"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode() + result.stderr.decode()


async def scim(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
            http.request(method, url, json=body) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


async def drift(base_url: str, token: str, user_name: str) -> str:
    """Change one user's givenName in the target directly (not through provisiond); its id."""
    users = await scim_users(base_url, token)
    rid = users[user_name]["id"]
    status, _ = await scim("PATCH", f"{base_url.rstrip('/')}/Users/{rid}", token, {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "name.givenName", "value": DRIFTED}]})
    assert status in (200, 204)
    return str(rid)


async def given_name(base_url: str, token: str, user_name: str) -> str:
    return str((await scim_users(base_url, token))[user_name]["name"]["givenName"])


async def test_once_full_repairs_drift_that_a_plain_once_does_not_see(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        url, token = w.sb.zpa_url, w.sb.zpa.token
        victim = sorted(await scim_users(url, token))[0]
        before = await given_name(url, token, victim)
        await drift(url, token, victim)

        result = await run_command("once", "-c", str(config))     # full_sync_every = 1h: the links are trusted
        assert result.returncode == 0, out(result)
        assert await given_name(url, token, victim) == DRIFTED

        w.sb.zpa.reset_counters()
        result = await run_command("once", "--full", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert await given_name(url, token, victim) == before
        assert w.sb.zpa.counters["PATCH /Users"] == 1, w.sb.zpa.counters   # that one user, nothing else
        assert '"full_sync": true' in result.stdout.decode()


async def test_resync_asks_the_running_daemon_for_a_full_sync_at_its_next_cycle(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1s")
        url, token = w.sb.zpa_url, w.sb.zpa.token
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.summary"), "first cycle", explain=d.describe)
            victim = sorted(await scim_users(url, token))[0]
            before = await given_name(url, token, victim)
            await drift(url, token, victim)
            mark = len(d.events)
            await until(lambda: len(d.named("cycle.summary", since=mark)) >= 2, "two cycles", explain=d.describe)
            assert await given_name(url, token, victim) == DRIFTED      # not a full sync: not seen
            assert all(e["full_sync"] is False for e in d.named("cycle.finished", since=mark))

            result = await run_command("resync", "-c", str(w.config), "--target", "zpa")
            assert result.returncode == 0, out(result)
            assert "next cycle of zpa reads the target whole" in result.stdout.decode()
            await until(lambda: d.named("target.resynced", since=mark), "target.resynced", explain=d.describe)
            await until(lambda: [e for e in d.named("cycle.finished", since=mark) if e["full_sync"]],
                        "the full sync's cycle.finished", explain=d.describe)
            assert await given_name(url, token, victim) == before
            # answered once: the cycles after are not full syncs again
            await until(lambda: len(d.named("cycle.summary", since=mark)) >= 1, "the cycle's summary",
                        explain=d.describe)
            assert len([e for e in d.named("cycle.finished", since=mark) if e["full_sync"]]) == 1
            mark = len(d.events)
            await until(lambda: len(d.named("cycle.finished", since=mark)) >= 2, "two more cycles",
                        explain=d.describe)
            assert all(e["full_sync"] is False for e in d.named("cycle.finished", since=mark))
            code = await stop(d)
        assert code == 0, d.describe()
        result = await run_command("resync", "-c", str(w.config), "--target", "nope")
        assert result.returncode == 1 and "no target named 'nope'" in out(result)


async def test_sync_group_pushes_one_group_and_its_in_scope_members_now(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        d = w.sb.directory
        url, token = w.sb.zpa_url, w.sb.zpa.token
        group = d.group_by_name("ZPA Contractors")
        expected = {d.users[u]["username"].lower() for u in d.transitive_member_ids(group["id"])
                    if d.users[u].get("enabled", True)}
        assert expected

        # dry run: the plan is printed, nothing is sent
        result = await run_command("sync-group", "ZPA Contractors", "-c", str(config), "--target", "zpa",
                                   "--dry-run")
        assert result.returncode == 0, out(result)
        assert "plan: group create ZPA Contractors" in result.stdout.decode()
        assert w.sb.zpa.writes() == 0 and not await scim_users(url, token)

        result = await run_command("sync-group", "ZPA Contractors", "-c", str(config), "--target", "zpa")
        assert result.returncode == 0, out(result)
        users = await scim_users(url, token)
        assert {name.lower() for name in users} == expected     # the members only, not all of ZPA Users
        status, body = await scim("GET", f"{url.rstrip('/')}/Groups", token)
        assert status == 200
        (pushed,) = [g for g in body["Resources"] if g["displayName"] == "ZPA Contractors"]
        status, full = await scim("GET", f"{url.rstrip('/')}/Groups/{pushed['id']}", token)
        member_ids = {m["value"] for m in full.get("members", [])}
        assert member_ids == {u["id"] for u in users.values()}

        # one member leaves the group in PingOne: sync-group removes it from the group, keeps the user
        leaver = sorted(d.static_member_ids(group["id"]))[0]
        d.remove_member(group["id"], leaver)
        result = await run_command("sync-group", group["id"], "-c", str(config), "--target", "zpa", "--json")
        assert result.returncode == 0, out(result)
        data = json.loads(result.stdout)
        ops = {(o["kind"], o["op"]) for o in data["targets"][0]["operations"]}
        assert ("group", "remove_members") in ops and not {("user", "delete"), ("user", "disable")} & ops
        status, full = await scim("GET", f"{url.rstrip('/')}/Groups/{pushed['id']}", token)
        leaver_name = d.users[leaver]["username"].lower()
        users = await scim_users(url, token)
        leaver_id = next(u["id"] for name, u in users.items() if name.lower() == leaver_name)
        assert leaver_id not in {m["value"] for m in full.get("members", [])}
        assert users[next(n for n in users if n.lower() == leaver_name)]["active"] is True

        # the next full cycle agrees with what sync-group did: no create of what it made
        w.sb.zpa.reset_counters()
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert w.sb.zpa.counters.get("POST /Groups", 0) == 1          # ZPA Users; ZPA Contractors exists
        status, body = await scim("GET", f"{url.rstrip('/')}/Groups", token)
        assert sorted(g["displayName"] for g in body["Resources"]) == ["ZPA Contractors", "ZPA Users"]
        assert len(await scim_users(url, token)) > len(expected)   # the rest of ZPA Users now

        result = await run_command("sync-group", "No Such Group", "-c", str(config))
        assert result.returncode == 1 and "no PingOne group 'No Such Group'" in out(result)
