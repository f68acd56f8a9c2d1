"""The config schema: one declaration (daemon/config_schema.py), printed by `provisiond config-schema`,
committed as config/provisiond.schema.json, referenced from the example configs, and in agreement
with the loader on every key's type, choices and range."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from jsonschema import Draft202012Validator

from daemon.config import REGIONS, ConfigError, load_config
from daemon.config_schema import (
    DAEMON_KEYS,
    RANGES,
    REGION_NAMES,
    SCHEMA_DIALECT,
    SOURCE_KEYS,
    TARGET_KEYS,
    json_schema,
    json_schema_text,
)
from daemon.sandbox.runner import build_sandbox
from tests.test_config import _mutate
from tests.test_config_ranges import Case, cases, config_text

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
SCHEMA_FILE = CONFIG_DIR / "provisiond.schema.json"
EXAMPLES = sorted(CONFIG_DIR.glob("*.toml"))
VALIDATOR = Draft202012Validator(json_schema())


def schema_errors(data: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(data)]


def test_the_committed_schema_is_the_declarations_and_a_valid_2020_12_schema() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text(), (
        "config/provisiond.schema.json is stale: python -m daemon config-schema > config/provisiond.schema.json")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"] == SCHEMA_DIALECT == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_config_schema_command_prints_it() -> None:
    done = subprocess.run([sys.executable, "-m", "daemon", "config-schema"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == SCHEMA_FILE.read_text(encoding="utf-8")


def test_the_schema_declares_exactly_the_keys_the_loader_reads() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    assert set(defs["DaemonFile"]["properties"]) == set(DAEMON_KEYS)
    assert set(defs["SourceFile"]["properties"]) == set(SOURCE_KEYS)
    assert set(defs["TargetFile"]["properties"]) == set(TARGET_KEYS)
    assert set(schema["properties"]) == {"daemon", "source", "target"}
    assert schema["required"] == ["source", "target"]
    assert all(d.get("additionalProperties") is False for d in defs.values() if d.get("type") == "object")
    assert set(REGION_NAMES) == set(REGIONS)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_names_the_schema_and_validates_against_it(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "#:schema ./provisiond.schema.json", "taplo / Even Better TOML directive"
    assert schema_errors(tomllib.loads(text)) == []


def test_the_sandbox_config_validates_against_the_schema(tmp_path: Path) -> None:
    sb = build_sandbox(users=2, groups=1, seed=1)
    sb.pingone_url, sb.zpa_url, sb.zia_url = "http://127.0.0.1:8900", "http://127.0.0.1:8901", "http://127.0.0.1:8902"
    assert schema_errors(tomllib.loads(sb.config_text(str(tmp_path / "state.db")))) == []


@given(case=cases())
def test_schema_and_loader_agree_on_every_numeric_key(tmp_path_factory: pytest.TempPathFactory, case: Case) -> None:
    directory = tmp_path_factory.mktemp("agree")
    path = directory / "provisiond.toml"
    path.write_text(case.text(str(directory / "state.db")), encoding="utf-8")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    errors = schema_errors(data)
    try:
        load_config(path, environ={})
        loaded = True
    except ConfigError:
        loaded = False
    if isinstance(case.value, str):
        # a duration string's range is the loader's to check (the schema checks its form)
        assert not loaded or not errors, (case, errors)
    else:
        assert loaded == (not errors), (case, errors)


def test_a_config_the_loader_takes_is_valid_against_the_schema(tmp_path: Path) -> None:
    """Mutated example files: whatever the loader accepts, editors must not flag."""
    rng = random.Random(20261129)
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name in ("pingone-secret", "zpa-token", "zia-token"):
        (creds / name).write_text("secret-value")
        (creds / name).chmod(0o400)
    original = (CONFIG_DIR / "provisiond.example.toml").read_text(encoding="utf-8").split("\n")
    path = tmp_path / "fuzz.toml"
    taken = 0
    for _ in range(150):
        lines = original
        for _ in range(rng.randint(1, 2)):
            lines = _mutate(lines, rng)
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        path.chmod(0o600)
        try:
            load_config(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
        except ConfigError:
            continue
        taken += 1
        assert schema_errors(tomllib.loads(path.read_text(encoding="utf-8"))) == [], "\n".join(lines)
    assert taken > 10


@pytest.mark.parametrize(("line", "where"), [
    ("log_format = 'xml'", "daemon.log_format"),
    ("interval = 1e308", "daemon.interval"),
    ("intervall = '5m'", "daemon"),
])
def test_the_schema_flags_what_the_loader_refuses(tmp_path: Path, line: str, where: str) -> None:
    text = config_text(str(tmp_path / "s.db"), daemon=line)
    data = tomllib.loads(text)
    assert any(e.startswith(where) for e in schema_errors(data)), schema_errors(data)
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key.startswith(where)


def test_every_range_is_in_the_schema() -> None:
    text = json.dumps(json_schema())
    for limits in RANGES.values():
        assert f"({limits.text()})" in text
