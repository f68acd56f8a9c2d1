"""Mapping entries marked create-only: sent in the POST, never in an update, never drift.
Through the real CLI against the emulators; the target is read back over SCIM HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_backup import scim_users
from tests.test_resync import scim
from tests.test_service import run_command, world, write_config

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
DEPARTMENT = f"{ENTERPRISE}:department"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode() + result.stderr.decode()


def department(resource: dict[str, Any]) -> Any:
    return resource.get(ENTERPRISE, {}).get("department")


def status_users(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    data = json.loads(result.stdout)
    (zpa,) = [t for t in data["targets"] if t["target"] == "zpa"]
    users: dict[str, Any] = zpa["summary"]["users"]
    return users


@pytest.mark.parametrize("update_method", ["patch", "put"])
async def test_a_create_only_attribute_is_sent_on_create_and_never_updated_nor_drift(
        tmp_path: Path, update_method: str) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        config.write_text(config.read_text() + f'update_method = "{update_method}"\n[target.mapping]\n'
                          f'"{DEPARTMENT}" = {{ expr = "department", create_only = true }}\n')
        checked = await run_command("check-config", "-c", str(config))
        assert checked.returncode == 0, out(checked)
        (zpa,) = [t for t in json.loads(checked.stdout)["target"] if t["name"] == "zpa"]
        assert zpa["mapping"][DEPARTMENT] == {"expr": "department", "create_only": True}

        result = await run_command("once", "-c", str(config))
        assert result.returncode == 0, out(result)
        url, token = w.sb.zpa_url, w.sb.zpa.token
        d = w.sb.directory
        users = await scim_users(url, token)
        assert users
        # sent in the POST: every created user carries PingOne's department
        for name, res in users.items():
            assert department(res) == d.user_by_username(name)["department"], name
        posted = [r["body"] for r in w.sb.zpa.request_log if r["method"] == "POST" and r["path"].endswith("/Users")]
        assert posted and all(ENTERPRISE in body for body in posted)

        # PingOne changes the department of one user, and its given name: only the name is sent
        name = sorted(users)[0]
        uid = str(d.user_by_username(name)["id"])
        original = department(users[name])
        d.update_user(uid, department="Moved In PingOne", name={"given": "Renamed", "family": "Person"})
        # the target changes another user's department on its own: the target owns it now
        other = sorted(users)[1]
        status, _ = await scim("PATCH", f"{url.rstrip('/')}/Users/{users[other]['id']}", token, {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": DEPARTMENT, "value": "Owned By The Target"}]})
        assert status in (200, 204)
        w.sb.zpa.reset_counters()
        result = await run_command("once", "--full", "-c", str(config))    # read the target whole: drift?
        assert result.returncode == 0, out(result)
        writes = [r for r in w.sb.zpa.request_log if r["method"] in ("PATCH", "PUT") and "/Users/" in r["path"]]
        assert len(writes) == 1, writes                                     # the renamed user only
        body = json.dumps(writes[0]["body"])
        assert "Renamed" in body and "Moved In PingOne" not in body
        after = await scim_users(url, token)
        assert after[name]["name"]["givenName"] == "Renamed"
        assert department(after[name]) == original                           # never updated
        assert department(after[other]) == "Owned By The Target"             # never counted as drift

        status = await run_command("status", "-c", str(config), "--json")
        assert status.returncode == 0, out(status)
        summary = status_users(status)
        assert summary["partial"] == 0 and summary["success"] == summary["impacted"], summary
        # and the next cycle has nothing to do
        w.sb.zpa.reset_counters()
        result = await run_command("once", "--full", "-c", str(config))
        assert result.returncode == 0, out(result)
        assert w.sb.zpa.writes() == 0, w.sb.zpa.counters


async def test_create_only_is_refused_on_username_and_must_be_a_boolean(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        base = config.read_text()
        config.write_text(base + '[target.mapping]\nuserName = { expr = "username", create_only = true }\n')
        result = await run_command("check-config", "-c", str(config))
        assert result.returncode == 78 and "userName cannot be create_only" in out(result)
        config.write_text(base + '[target.mapping]\ntitle = { expr = "title", create_only = "yes" }\n')
        result = await run_command("check-config", "-c", str(config))
        assert result.returncode == 78 and "create_only" in out(result) and "true or false" in out(result)
        config.write_text(base + '[target.mapping]\ntitle = { expr = "title", create_once = true }\n')
        result = await run_command("check-config", "-c", str(config))
        assert result.returncode == 78 and "create_once" in out(result)
