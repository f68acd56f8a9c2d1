"""systemd/provisiond.service: what the unit promises, checked by systemd-analyze where it is installed."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import DEFAULT_GRACE_PERIOD, load_config
from daemon.durations import parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "provisiond.service"
EXAMPLE_CONFIG = ROOT / "config" / "provisiond.example.toml"
SHIPPED_EXEC = "/usr/local/bin/provisiond"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, values in file order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def one(key: str) -> str:
    values = directives()[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists (verify checks that)."""
    stand_in = tmp_path / "provisiond"
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert SHIPPED_EXEC in text
    copy = tmp_path / "provisiond.service"
    copy.write_text(text.replace(SHIPPED_EXEC, str(stand_in)), encoding="utf-8")
    return copy


def test_the_unit_parses_as_an_ini_file_with_its_three_sections() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert parser.sections() == ["Unit", "Service", "Install"]


def test_the_daemon_speaks_notify_and_reloads_with_sighup() -> None:
    assert one("Type") == "notify"
    assert one("ExecStart") == f"{SHIPPED_EXEC} run -c /etc/provisiond/provisiond.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "78"


def test_the_stop_timeout_is_above_the_default_grace_period() -> None:
    assert parse_duration(one("TimeoutStopSec")) > DEFAULT_GRACE_PERIOD


def test_the_watchdog_is_on() -> None:
    assert parse_duration(one("WatchdogSec")) >= 30.0


def test_it_runs_as_a_dynamic_user_with_its_own_state_and_config_directories() -> None:
    assert one("DynamicUser") == "yes"
    assert one("StateDirectory") == "provisiond"
    assert one("ConfigurationDirectory") == "provisiond"


def test_every_credential_the_example_config_reads_is_loaded() -> None:
    loaded = {value.split(":", 1)[0] for value in directives()["LoadCredential"]}
    wanted = set(re.findall(r'^\w+_file = "\$\{CREDENTIALS_DIRECTORY\}/([^"]+)"', EXAMPLE_CONFIG.read_text(),
                            flags=re.MULTILINE))
    assert {"pingone-secret", "zpa-token", "zia-token"} <= wanted
    assert wanted == loaded


def test_the_example_config_loads_from_the_credentials_directory(tmp_path: Path) -> None:
    for name in ("pingone-secret", "zpa-token", "zia-token"):
        secret = tmp_path / name
        secret.write_text(f"value-of-{name}\n", encoding="utf-8")
        secret.chmod(0o400)
    config = load_config(EXAMPLE_CONFIG, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.source.client_secret.reveal() == "value-of-pingone-secret"
    assert config.target("zpa").token is not None
    assert config.target("zpa").token.reveal() == "value-of-zpa-token"


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "verify", str(runnable_copy(tmp_path))], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert "provisiond.service" not in done.stderr, done.stderr


@needs_analyze
def test_systemd_analyze_security_rates_the_exposure_at_most_2_0(tmp_path: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", "--no-pager",
         str(runnable_copy(tmp_path))],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    found = re.search(r"Overall exposure level for provisiond\.service: (\d+\.\d+)", done.stdout)
    assert found is not None, done.stdout[-2000:] + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout
    assert done.returncode == 0, done.stderr
