"""The change-feed keys of `[source]` (issue 15): `changes`, `change_poll_interval`, `webhook_secret`."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, load_config

BASE = """
[source]
environment_id = "env-1"
client_id = "client-1"
client_secret = "src-Secret-9f8e7d"
{extra}

[[target]]
name = "zpa"
profile = "zpa"
base_url = "http://127.0.0.1:8080/scim/v2/"
token = "tok-Secret-1a2b3c"
scope = "all"
"""


def load(tmp_path: Path, extra: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "provisiond.toml"
    path.write_text(BASE.format(extra=extra), encoding="utf-8")
    path.chmod(0o600)
    return load_config(path, environ=environ or {})


def test_defaults_poll_every_five_seconds_without_a_webhook_secret(tmp_path: Path) -> None:
    source = load(tmp_path, "").source
    assert source.changes == "poll" and source.change_poll_interval == 5.0
    assert source.webhook_secret is None


def test_webhook_mode_takes_its_secret_from_env_or_file_and_masks_it(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'changes = "webhook"\nchange_poll_interval = "30s"\nwebhook_secret_env = "HOOK"',
               {"HOOK": "hook-Secret-77aa"})
    assert cfg.source.changes == "webhook" and cfg.source.change_poll_interval == 30.0
    assert cfg.source.webhook_secret is not None and cfg.source.webhook_secret.reveal() == "hook-Secret-77aa"
    assert "hook-Secret-77aa" in cfg.secrets()
    assert "hook-Secret-77aa" not in repr(cfg) and cfg.masked()["source"]["webhook_secret"] == "***"
    secret_file = tmp_path / "hook"
    secret_file.write_text("file-Secret-88bb\n", encoding="utf-8")
    secret_file.chmod(0o600)
    cfg = load(tmp_path, f'changes = "webhook"\nwebhook_secret_file = "{secret_file}"')
    assert cfg.source.webhook_secret is not None and cfg.source.webhook_secret.reveal() == "file-Secret-88bb"


@pytest.mark.parametrize(("extra", "message"), [
    ('changes = "webhook"', "webhook_secret"),
    ('changes = "push"', "changes"),
    ('change_poll_interval = "0s"', "change_poll_interval"),
    ('webhook_secret = "a"\nwebhook_secret_env = "B"', "set only one"),
])
def test_bad_change_keys_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, extra)


def test_off_needs_nothing_else(tmp_path: Path) -> None:
    assert load(tmp_path, 'changes = "off"').source.changes == "off"
