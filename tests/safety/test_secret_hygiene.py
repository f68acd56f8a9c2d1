"""Debug-level runs with failing auth: no secret in any log line, the state file or a command's output."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from daemon.sandbox.runner import ZIA_TOKEN, ZPA_TOKEN, Sandbox, build_sandbox, running
from tests.safety import cli

pytestmark = pytest.mark.timeout(120)

WRONG_SECRET = "pingone-Secret-9f8e7d6c5b4a"
WRONG_ZPA = "zpa-Token-1a2b3c4d5e6f"
WRONG_ZIA = "zia-Token-a1b2c3d4e5f6"   # given through token_file


def write(sb: Sandbox, tmp: Path, *, client_secret: str) -> Path:
    text = sb.config_text(str(tmp / "state.db"))
    text = text.replace('log_level = "info"', 'log_level = "debug"')
    text = text.replace(f'client_secret = "{DEFAULT_CLIENT_SECRET}"', f'client_secret = "{client_secret}"')
    text = text.replace(f'token = "{ZPA_TOKEN}"', f'token = "{WRONG_ZPA}"')
    token_file = tmp / "zia-token"
    token_file.write_text(WRONG_ZIA + "\n")
    token_file.chmod(0o600)
    text = text.replace(f'token = "{ZIA_TOKEN}"', f'token_file = "{token_file}"')
    path = tmp / "provisiond.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def forms(secret: str) -> list[str]:
    """The secret, and the Basic header forms it would travel in."""
    return [secret, base64.b64encode(f"{DEFAULT_CLIENT_ID}:{secret}".encode()).decode()]


async def run_everything(config: Path) -> dict[str, str]:
    outputs: dict[str, str] = {}
    for command in (("once",), ("check-config",), ("plan",), ("status",),
                    ("status", "--json"), ("test-connection",)):
        done = await cli(*command, "-c", str(config))
        outputs[" ".join(command)] = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
    return outputs


def assert_clean(secrets: list[str], outputs: dict[str, str], state_dir: Path) -> None:
    raw = b"".join(p.read_bytes() for p in sorted(state_dir.glob("state.db*")))
    for secret in secrets:
        for shown in forms(secret):
            for name, text in outputs.items():
                assert shown not in text, f"{secret!r} in the output of `{name}`"
            assert shown.encode() not in raw, f"{secret!r} in the state file"


@pytest.mark.parametrize("pingone_works", [False, True], ids=["auth-fails-everywhere", "only-targets-401"])
async def test_no_secret_in_debug_logs_state_or_command_output_when_auth_fails(
        tmp_path: Path, pingone_works: bool) -> None:
    sb = build_sandbox(users=20, groups=4, seed=3)
    async with running(sb, port=0):
        config = write(sb, tmp_path, client_secret=DEFAULT_CLIENT_SECRET if pingone_works else WRONG_SECRET)
        outputs = await run_everything(config)
        issued = list(sb.pingone._tokens)                    # access tokens the emulator handed out

    once = outputs["once"]
    if pingone_works:
        assert '"level": "debug"' in once, "the run logged at debug level"
        assert issued, "PingOne handed out a token"
        assert re.search(r"target\.quarantined.*auth_failed|auth_failed.*target\.quarantined", once)
    else:
        assert "snapshot.failed" in once
    assert "401" in outputs["test-connection"] or "refused" in outputs["test-connection"].lower()
    secrets = [WRONG_ZPA, WRONG_ZIA, *issued]
    secrets.append(DEFAULT_CLIENT_SECRET if pingone_works else WRONG_SECRET)
    assert_clean(secrets, outputs, tmp_path)
