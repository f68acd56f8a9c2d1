"""Groups chosen by rule (`{ prefix = "…" }`, `{ filter = '…' }`) in `groups` and `scope.groups`:
a new matching PingOne group is pushed without a config change; one that stops matching is
treated as removed from the list (deleted, under max_deletes). Through the real CLI against the
emulators; the target is read back over SCIM HTTP."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from daemon.sandbox.directory import Directory
from tests.test_backup import scim_users
from tests.test_resync import scim
from tests.test_service import run_command, world, write_config


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode() + result.stderr.decode()


def configure(path: Path, *, groups: str, scope: str | None = None, extra: str = "") -> None:
    text = re.sub(r"^groups = .*$", f"groups = {groups}", path.read_text(), flags=re.MULTILINE)
    if scope is not None:
        text = re.sub(r"^scope = .*$", f"scope = {scope}", text, flags=re.MULTILINE)
    path.write_text(text + extra)


async def target_groups(url: str, token: str) -> dict[str, set[str]]:
    """displayName -> the userNames of its members, read over SCIM HTTP."""
    users = {u["id"]: name for name, u in (await scim_users(url, token)).items()}
    status, body = await scim("GET", f"{url.rstrip('/')}/Groups", token)
    assert status == 200
    out: dict[str, set[str]] = {}
    for g in body["Resources"]:
        _, full = await scim("GET", f"{url.rstrip('/')}/Groups/{g['id']}", token)
        out[g["displayName"]] = {users[m["value"]].lower() for m in full.get("members", [])}
    return out


def new_group(d: Directory, name: str, members: list[str]) -> str:
    gid = str(d.add_group(name)["id"])
    for uid in members:
        d.add_member(gid, uid)
    return gid


def names(d: Directory, ids: list[str]) -> set[str]:
    return {d.users[u]["username"].lower() for u in ids}


async def test_groups_by_prefix_and_filter_follow_pingone_without_a_config_change(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        d = w.sb.directory
        scope = d.group_by_name("ZPA Users")
        members = sorted(u for u in d.transitive_member_ids(scope["id"]) if d.users[u].get("enabled", True))
        assert len(members) >= 8
        finance = new_group(d, "ZPA-Finance", members[:3])
        new_group(d, "Other-Team", members[3:5])
        config = write_config(w.sb, w.config)
        configure(config, groups="""["ZPA Users", { prefix = "ZPA-" }, { filter = 'name sw "Ops-" or description co "pushed"' }]""")
        config.write_text(re.sub(r"^max_deletes = .*$", "max_deletes = 1", config.read_text(), flags=re.MULTILINE))
        result = await run_command("check-config", "-c", str(config))
        assert result.returncode == 0, out(result)
        (zpa,) = [t for t in json.loads(result.stdout)["target"] if t["name"] == "zpa"]
        assert zpa["groups"][1:] == [{"prefix": "ZPA-"}, {"filter": """name sw "Ops-" or description co "pushed\""""}]

        url, token = w.sb.zpa_url, w.sb.zpa.token
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        groups = await target_groups(url, token)
        assert set(groups) == {"ZPA Users", "ZPA-Finance"}
        assert groups["ZPA-Finance"] == names(d, members[:3])

        # new PingOne groups that match a rule are pushed at the next cycle, no config change
        new_group(d, "ZPA-Sales", members[3:6])
        ops = new_group(d, "Ops-Oncall", members[6:8])
        d.add_group("Described", description="this one is pushed too")
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        groups = await target_groups(url, token)
        assert set(groups) == {"ZPA Users", "ZPA-Finance", "ZPA-Sales", "Ops-Oncall", "Described"}
        assert groups["ZPA-Sales"] == names(d, members[3:6])
        assert groups["Ops-Oncall"] == names(d, members[6:8])

        # a group that stops matching is treated as removed from the list: deleted in the target
        d.rename_group(finance, "Finance")
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert '"reason": "group_unselected"' in result.stdout.decode()
        assert "ZPA-Finance" not in await target_groups(url, token)
        assert "Finance" not in await target_groups(url, token)

        # two at once exceed max_deletes = 1: held until approved
        d.rename_group(ops, "Oncall")
        d.delete_group(d.group_by_name("ZPA-Sales")["id"])
        result = await run_command("once", "-c", str(config))
        assert "plan.removals_held" in result.stdout.decode(), out(result)
        assert {"Ops-Oncall", "ZPA-Sales"} <= set(await target_groups(url, token))
        result = await run_command("approve", "-c", str(config), "--target", "zpa")
        assert result.returncode == 0, out(result)
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert set(await target_groups(url, token)) == {"ZPA Users", "Described"}
        # the users themselves stay: they are still in scope (members of ZPA Users)
        assert names(d, members) <= {n.lower() for n in await scim_users(url, token)}


async def test_scope_by_rule_admits_the_members_of_every_matching_group(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        d = w.sb.directory
        everyone = sorted(u for u in d.users if d.users[u].get("enabled", True)
                          and "@" in str(d.users[u].get("username")))
        first = new_group(d, "VPN-Berlin", everyone[:4])
        config = write_config(w.sb, w.config)
        configure(config, groups='[{ prefix = "VPN-" }]', scope="""{ groups = [{ filter = 'name sw "VPN-"' }] }""")
        url, token = w.sb.zpa_url, w.sb.zpa.token
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert {n.lower() for n in await scim_users(url, token)} == names(d, everyone[:4])
        # a new matching group widens the scope without a config change
        new_group(d, "VPN-Paris", everyone[4:7])
        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert {n.lower() for n in await scim_users(url, token)} == names(d, everyone[:7])
        assert set(await target_groups(url, token)) == {"VPN-Berlin", "VPN-Paris"}
        del first


async def test_a_bad_group_rule_is_refused_with_file_key_and_problem(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        base = config.read_text()
        configure(config, groups="""[{ filter = 'name sw' }]""")
        result = await run_command("check-config", "-c", str(config))
        assert result.returncode == 78 and "target.zpa.groups[0].filter" in out(result), out(result)
        config.write_text(base)
        configure(config, groups="""[{ prefix = "ZPA-", name = "x" }]""")
        result = await run_command("check-config", "-c", str(config))
        assert result.returncode == 78 and "exactly one of" in out(result), out(result)
