"""The loader's checks are the models' (daemon/config_schema.py): every boolean and every choice key
declared there is refused with today's message (file, key, problem) when the file gets it wrong,
and a choice is still read in any case, as before the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, load_config
from daemon.config_schema import ActionsFile, DaemonFile, SourceFile, TargetFile
from tests.test_config_ranges import config_text

TABLES: dict[str, Any] = {"daemon": DaemonFile, "source": SourceFile, "target": TargetFile}
BOOL_KEYS = sorted(f"{section}.{key}" for section, model in TABLES.items()
                   for key, info in model.model_fields.items() if info.annotation == bool | None)
ACTION_KEYS = sorted(ActionsFile.model_fields)
# Each choice key, a value in another case (read as the choice), and the choices as the error lists them.
CHOICES: dict[str, tuple[str, str, str]] = {
    "daemon.log_format": ("JSON", "json", "json, console"),
    "daemon.log_level": (" Debug ", "debug", "debug, info, warning, error"),
    "source.region": ("eu", "EU", "NA, CA, EU, AU, SG, AP"),
    "source.client_auth": ("POST", "post", "basic, post"),
    "source.changes": ("Off", "off", "poll, webhook, off"),
    "target.auth": ("Bearer", "bearer", "bearer, basic, oauth_client_credentials"),
    "target.update_method": ("PUT", "put", "patch, put"),
    "target.group_membership": ("Merge", "merge", "overwrite, merge"),
    "target.remove_action": ("DELETE", "delete", "disable, delete, disable_then_delete"),
    "target.membership": ("Direct", "direct", "transitive, direct"),
}


def load(tmp_path: Path, key: str, toml_value: str) -> Any:
    section, _, name = key.partition(".")
    path = tmp_path / "provisiond.toml"
    path.write_text(config_text(str(tmp_path / "state.db"), **{section: f"{name} = {toml_value}"}), encoding="utf-8")
    path.chmod(0o600)
    return load_config(path, environ={})


def refusal(tmp_path: Path, key: str, toml_value: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, key, toml_value)
    return info.value


def shown(key: str) -> str:
    return key.replace("target.", "target.zpa.", 1)


def test_the_models_declare_the_keys_these_tests_walk() -> None:
    assert "target.allow_insecure_http" in BOOL_KEYS and "source.allow_insecure_http" in BOOL_KEYS
    assert all(key.partition(".")[2] in TABLES[key.partition(".")[0]].model_fields for key in CHOICES)


@pytest.mark.parametrize("key", BOOL_KEYS)
def test_every_boolean_key_refuses_anything_else(tmp_path: Path, key: str) -> None:
    for value, kind in (("1", "integer"), ('"true"', "string"), ("[true]", "array")):
        error = refusal(tmp_path, key, value)
        assert (error.key, error.problem) == (shown(key), f"expected true or false, got {kind}")


@pytest.mark.parametrize("name", ACTION_KEYS)
def test_every_action_switch_refuses_anything_else(tmp_path: Path, name: str) -> None:
    error = refusal(tmp_path, "target.actions", f"{{ {name} = 0 }}")
    assert (error.key, error.problem) == (f"target.zpa.actions.{name}", "expected true or false, got integer")
    cfg = load(tmp_path, "target.actions", f"{{ {name} = false }}")
    assert getattr(cfg.targets[0].actions, name) is False


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_key_names_its_choices_and_reads_any_case(tmp_path: Path, key: str) -> None:
    other_case, read_as, choices = CHOICES[key]
    cfg = load(tmp_path, key, f'"{other_case}"')
    section, _, name = key.partition(".")
    holder = cfg.targets[0] if section == "target" else getattr(cfg, section)
    assert getattr(holder, name) == read_as
    error = refusal(tmp_path, key, '"xyzzy"')
    expected = "'XYZZY'" if key == "source.region" else "'xyzzy'"
    assert (error.key, error.problem) == (shown(key), f"{expected} is not one of {choices}")
    for value, problem in (("7", "expected a string, got integer"), ('""', "must not be empty"),
                           ('"  "', "must not be empty")):
        error = refusal(tmp_path, key, value)
        assert (error.key, error.problem) == (shown(key), problem)
