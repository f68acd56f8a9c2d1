"""The command line as operators use it: subprocesses, exit codes, outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TIMEOUT = 60


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("PROVISIOND_CONFIG", "NOTIFY_SOCKET")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def provisiond(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    """`provisiond sandbox --port 0 --write-config PATH` running; yields the written config."""
    config = tmp_path / "sandbox.toml"
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "sandbox", "--port", "0", "--users", "120",
                             "--groups", "8", "--write-config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving"):
            break
    assert any(line.startswith("serving") for line in lines), "".join(lines) + proc.stderr.read()
    text = "".join(lines)
    assert "PingOne emulator" in text and "ZPA SCIM emulator" in text and "ZIA SCIM emulator" in text
    assert f"config written to {config}" in text
    try:
        yield config
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            assert proc.stderr is not None
            proc.stderr.close()


def test_sandbox_config_drives_check_config_test_connection_plan_once_and_status(sandbox: Path) -> None:
    checked = provisiond("check-config", "-c", str(sandbox))
    assert checked.returncode == 0, checked.stderr
    effective = json.loads(checked.stdout)
    assert [t["name"] for t in effective["target"]] == ["zpa", "zia"]
    assert "sandbox-secret-not-for-production" not in checked.stdout      # secrets masked

    connected = provisiond("test-connection", "-c", str(sandbox))
    assert connected.returncode == 0, connected.stdout + connected.stderr
    assert connected.stdout.count(": OK") == 3

    planned = provisiond("plan", "-c", str(sandbox), "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    creates = plan["zpa"]["counts"].get("user.create", 0)
    assert creates > 0
    text_plan = provisiond("plan", "-c", str(sandbox))
    assert "+ user create" in text_plan.stdout and "userName:" in text_plan.stdout

    once = provisiond("once", "-c", str(sandbox), timeout=120)
    assert once.returncode == 0, once.stdout[-3000:] + once.stderr
    events = [json.loads(line) for line in once.stdout.splitlines() if line.startswith("{")]
    finished = {e["target"]: e for e in events if e["event"] == "cycle.finished"}
    assert finished["zpa"]["outcome"] == "success" and finished["zia"]["outcome"] == "success"
    assert sum(1 for e in events if e["event"] == "user.created" and e["target"] == "zpa") == creates

    status = provisiond("status", "-c", str(sandbox), "--json")
    assert status.returncode == 0, status.stderr
    targets = {t["target"]: t for t in json.loads(status.stdout)["targets"]}
    assert targets["zpa"]["outcome"] == "success"
    assert targets["zpa"]["managed_users"] == creates
    human = provisiond("status", "-c", str(sandbox))
    assert "target zpa: last cycle" in human.stdout and "users   impacted" in human.stdout

    again = provisiond("plan", "-c", str(sandbox), "--json")
    assert all(not [o for o in p["operations"] if o["status"] == "pending"] for p in json.loads(again.stdout).values())


def test_a_bad_config_exits_78_naming_file_key_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\ninterval = "often"\n', encoding="utf-8")
    for command in ("once", "check-config", "plan", "run"):
        result = provisiond(command, "-c", str(bad))
        assert result.returncode == 78, (command, result.stderr)
        assert str(bad) in result.stderr and "daemon.interval" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_test_connection_fails_with_exit_1_when_a_side_is_unreachable(tmp_path: Path) -> None:
    config = tmp_path / "dead.toml"
    config.write_text(f'''
[daemon]
state_path = "{tmp_path / 'state.db'}"
[source]
api_url = "http://127.0.0.1:9/v1"
auth_url = "http://127.0.0.1:9"
environment_id = "00000000-0000-4000-8000-00000000e0e0"
client_id = "c"
client_secret = "not-a-real-secret"
[[target]]
name = "g"
profile = "generic"
base_url = "http://127.0.0.1:9/v2"
token = "not-a-real-token"
scope = "all"
''', encoding="utf-8")
    result = provisiond("test-connection", "-c", str(config))
    assert result.returncode == 1
    assert "source PingOne" in result.stdout and "FAILED" in result.stdout
    assert "not-a-real-secret" not in result.stdout + result.stderr


def test_demo_runs_real_cycles_against_the_emulators() -> None:
    result = provisiond("demo", "--users", "200", "--groups", "8", "--cycles", "3", "--interval", "0.1",
                        timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert out.count("cycle ") >= 3 and "cycle 3:" in out
    assert "zpa  success" in out and "zia  success" in out
    assert "PingOne: " in out                 # directory changes between cycles
    assert "demo stopped" in out
