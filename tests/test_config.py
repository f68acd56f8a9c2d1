"""Configuration: TOML to frozen dataclasses, secrets, validation, warnings, diffs, fuzzing."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path

import jmespath
import pytest

from daemon import config as config_module
from daemon.config import (
    DEFAULT_CONFIG_PATH,
    PROFILES,
    REGIONS,
    Actions,
    Config,
    ConfigError,
    DaemonConfig,
    GroupRef,
    MaxDeletes,
    Secret,
    config_warnings,
    diff_configs,
    load_config,
    parse_config,
    resolve_config_path,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "provisiond.example.toml"

SOURCE_SECRET = "src-Secret-9f8e7d"
TOKEN_SECRET = "tok-Secret-1a2b3c"

MINIMAL = f"""
[source]
environment_id = "env-1"
client_id = "client-1"
client_secret = "{SOURCE_SECRET}"

[[target]]
name = "zpa"
profile = "zpa"
base_url = "http://127.0.0.1:8080/scim/v2/"
token = "{TOKEN_SECRET}"
scope = "all"
"""

# The configuration shape from DESIGN.md, verbatim but for the secret file path and the "…".
DESIGN_SHAPE = """
[daemon]
state_path = "/var/lib/provisiond/state.db"
interval = "5m"              # time between cycle starts
full_sync_every = "24h"      # re-read actual state from the targets
log_format = "json"          # json | console
log_level = "info"

[source]                     # PingOne
region = "NA"                # NA | CA | EU | AU | SG | AP, or both overrides below
environment_id = "env"
client_id = "client"
client_auth = "basic"        # basic | post: how the worker app authenticates at the token endpoint
client_secret_file = "${CREDENTIALS_DIRECTORY}/pingone-secret"
page_size = 500

[[target]]
name = "zpa"
profile = "zpa"              # zpa | zia | generic
base_url = "https://zpa.example.com/v2/"
auth = "bearer"              # bearer | basic | oauth_client_credentials (as PingOne offers)
token_file = "${CREDENTIALS_DIRECTORY}/zpa-token"   # the bearer token Zscaler issues
update_method = "patch"      # patch | put (profile default)
match_filter = 'userName eq "%s"'   # how an existing target user is found; %s = mapped userName
group_membership = "overwrite"      # overwrite | merge, for a same-named group already in the target
concurrency = 8
requests_per_second = 10
remove_action = "disable"    # or "delete"
max_deletes = "10%"          # safety: a plan that removes more is held, not applied
actions = { create = true, update = true, disable = true, deprovision = true }
groups = ["ZPA Users"]
membership = "transitive"    # or "direct"
scope = { groups = ["ZPA Users"] }
[target.mapping]
userName = "username"
"name.givenName" = "name.given"
"name.familyName" = "name.family"
displayName = "join(' ', [name.given, name.family])"
externalId = "id"
"""


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    """A $CREDENTIALS_DIRECTORY as systemd makes it: one file per secret, mode 0400."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    for name, value in {
        "pingone-secret": "pingone-secret-value\n",
        "zpa-token": "zpa-token-value\n",
        "zia-token": "zia-token-value",
    }.items():
        path = directory / name
        path.write_text(value)
        path.chmod(0o400)
    return directory


Writer = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    def writer(text: str, name: str = "provisiond.toml", mode: int = 0o600) -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(mode)
        return path

    return writer


def load_text(write: Writer, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(text), environ=environ or {})


def error_for(write: Writer, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(write, text, environ)
    return info.value


def with_target(extra: str) -> str:
    """MINIMAL with `extra` lines added to its [[target]]."""
    return MINIMAL + extra + "\n"


# --------------------------------------------------------------------------------------------
# The example file and the DESIGN shape


def test_example_config_loads_with_secrets_from_credentials_directory(creds: Path) -> None:
    cfg = load_config(EXAMPLE, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert [t.name for t in cfg.targets] == ["zpa", "zia"]
    assert cfg.source.client_secret.reveal() == "pingone-secret-value"  # trailing newline stripped
    assert cfg.target("zpa").token == Secret("zpa-token-value")
    assert cfg.target("zia").token == Secret("zia-token-value")
    assert cfg.target("zpa").remove_action == "disable_then_delete"
    assert cfg.target("zpa").delete_after == 7 * 86400
    assert cfg.daemon.http_listen == "127.0.0.1:9477"
    assert cfg.warnings == ()


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = set(config_module._DAEMON_KEYS) | set(config_module._SOURCE_KEYS) | set(config_module._TARGET_KEYS)
    missing = [
        key
        for key in sorted(keys)
        if not re.search(rf"(^|[\s#{{,]){re.escape(key)}\s*=", text, re.M) and f"[target.{key}]" not in text
    ]
    assert missing == []
    for field in dataclasses.fields(DaemonConfig):
        assert re.search(rf"^{field.name} = ", text, re.M), field.name


def test_example_config_without_credentials_directory_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, environ={})
    assert info.value.key == "source.client_secret_file"
    assert "CREDENTIALS_DIRECTORY" in info.value.problem


def test_design_shape_loads_with_every_key(write: Writer, creds: Path) -> None:
    cfg = load_text(write, DESIGN_SHAPE, {"CREDENTIALS_DIRECTORY": str(creds)})
    target = cfg.target("zpa")
    assert cfg.daemon.interval == 300.0 and cfg.daemon.full_sync_every == 86400.0
    assert target.requests_per_second == 10.0 and target.burst == 10.0
    assert target.groups == (GroupRef(name="ZPA Users"),)
    assert target.scope.groups == (GroupRef(name="ZPA Users"),)
    assert target.base_url == "https://zpa.example.com/v2"
    mapping = dict(target.mapping)
    assert mapping["displayName"] == "join(' ', [name.given, name.family])"
    # the profile's defaults not overridden are kept
    assert mapping['emails[type eq "work"].value'] == "email"


# --------------------------------------------------------------------------------------------
# Defaults and profiles


def test_minimal_config_takes_daemon_defaults(write: Writer) -> None:
    cfg = load_text(write, MINIMAL)
    assert cfg.daemon == DaemonConfig()
    assert cfg.source.region == "NA"
    assert (cfg.source.api_url, cfg.source.auth_url) == REGIONS["NA"]
    assert cfg.source.client_auth == "basic" and cfg.source.page_size == 500
    assert cfg.path == str(write(MINIMAL))


def test_the_interval_left_unset_is_a_day_with_the_feed_and_5m_without(write: Writer) -> None:
    assert load_text(write, MINIMAL).daemon.interval == 86400.0
    off = MINIMAL.replace("[source]", '[source]\nchanges = "off"')
    assert load_text(write, off).daemon.interval == 300.0
    assert load_text(write, '[daemon]\ninterval = "2h"\n' + off).daemon.interval == 7200.0
    assert load_text(write, '[daemon]\nlog_level = "debug"\n' + off).daemon.interval == 300.0


@pytest.mark.parametrize(
    ("profile", "concurrency", "rps", "email", "deletes"),
    [("zpa", 8, 40.0, True, True), ("zia", 2, 5.0, True, False), ("generic", 8, 20.0, False, False)],
)
def test_profile_sets_its_defaults(
    write: Writer, profile: str, concurrency: int, rps: float, email: bool, deletes: bool
) -> None:
    cfg = load_text(write, MINIMAL.replace('profile = "zpa"', f'profile = "{profile}"'))
    target = cfg.target("zpa")
    assert target.profile == profile
    assert (target.concurrency, target.requests_per_second, target.burst) == (concurrency, rps, max(1.0, rps))
    assert target.require_email_username is email
    assert target.active_false_deletes is deletes
    assert (target.page_size, target.membership_batch) == (100, 100)
    assert target.remove_action == "disable" and target.update_method == "patch"
    assert target.mapping == PROFILES[profile].mapping
    assert target.max_deletes == MaxDeletes(percent=10.0)
    assert target.actions == Actions()
    assert (target.match_filter, target.group_match_filter) == ('userName eq "%s"', 'displayName eq "%s"')
    assert target.timeout == 30.0 and target.full_sync_every is None


def test_burst_defaults_to_at_least_one(write: Writer) -> None:
    cfg = load_text(write, with_target("requests_per_second = 0.5"))
    assert cfg.target("zpa").burst == 1.0


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_region_selects_api_and_auth_urls(write: Writer, region: str) -> None:
    cfg = load_text(write, MINIMAL.replace("[source]", f'[source]\nregion = "{region.lower()}"'))
    assert cfg.source.region == region
    assert (cfg.source.api_url, cfg.source.auth_url) == REGIONS[region]


def test_explicit_source_urls_override_the_region(write: Writer) -> None:
    text = MINIMAL.replace(
        "[source]", '[source]\napi_url = "http://127.0.0.1:9000/v1/"\nauth_url = "http://localhost:9000"'
    )
    cfg = load_text(write, text)
    assert (cfg.source.api_url, cfg.source.auth_url) == ("http://127.0.0.1:9000/v1", "http://localhost:9000")


def test_only_one_source_url_override_is_refused(write: Writer) -> None:
    error = error_for(write, MINIMAL.replace("[source]", '[source]\napi_url = "http://127.0.0.1:9000/v1"'))
    assert error.key == "source.auth_url"


def test_relative_state_path_resolves_next_to_the_config(write: Writer, tmp_path: Path) -> None:
    cfg = load_text(write, '[daemon]\nstate_path = "state/p.db"\n' + MINIMAL)
    assert cfg.daemon.state_path == str(tmp_path / "state" / "p.db")


def test_durations_and_fractions_in_daemon_section(write: Writer) -> None:
    text = (
        '[daemon]\ninterval = "90s"\nfull_sync_every = "1h30m"\ngrace_period = 5\njitter = "250ms"\n'
        'max_source_shrink = "25%"\nlog_format = "console"\nlog_level = "DEBUG"\n' + MINIMAL
    )
    daemon = load_text(write, text).daemon
    assert (daemon.interval, daemon.full_sync_every, daemon.grace_period, daemon.jitter) == (
        90.0,
        5400.0,
        5.0,
        0.25,
    )
    assert daemon.max_source_shrink == 0.25
    assert (daemon.log_format, daemon.log_level) == ("console", "debug")
    assert load_text(write, "[daemon]\nmax_source_shrink = 0.1\n" + MINIMAL).daemon.max_source_shrink == 0.1


# --------------------------------------------------------------------------------------------
# Secrets


def test_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2")
    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert "hunter2" not in repr([secret, {"k": secret}])
    assert secret.reveal() == "hunter2"


def test_secret_is_frozen_hashable_and_compared_by_value() -> None:
    secret = Secret("a", origin="literal")
    assert secret == Secret("a", origin="file:/x") and secret != Secret("b") and secret != "a"
    assert len({secret, Secret("a"), Secret("b")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        secret._value = "b"
    assert pickle.loads(pickle.dumps(secret)) == secret
    assert dataclasses.asdict(MaxDeletes(count=1)) == {"count": 1, "percent": None}


def test_secret_fingerprint_changes_with_the_value_only() -> None:
    assert Secret("a").fingerprint() == Secret("a").fingerprint()
    assert Secret("a").fingerprint() != Secret("b").fingerprint()
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", Secret("a").fingerprint())


def test_config_repr_masked_and_fingerprint_hold_no_secret(write: Writer) -> None:
    cfg = load_text(write, MINIMAL)
    assert set(cfg.secrets()) == {SOURCE_SECRET, TOKEN_SECRET}
    for text in (repr(cfg), str(cfg), json.dumps(cfg.masked()), json.dumps(cfg.fingerprint())):
        assert SOURCE_SECRET not in text and TOKEN_SECRET not in text
    assert cfg.masked()["source"]["client_secret"] == "***"
    assert cfg.masked()["target"][0]["token"] == "***"


def test_secret_file_relative_path_is_looked_up_in_credentials_directory(write: Writer, creds: Path) -> None:
    text = MINIMAL.replace(f'client_secret = "{SOURCE_SECRET}"', 'client_secret_file = "pingone-secret"')
    cfg = load_text(write, text, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.source.client_secret.reveal() == "pingone-secret-value"
    assert cfg.source.client_secret.origin == f"file:{creds / 'pingone-secret'}"


def test_secret_file_relative_path_without_credentials_directory_is_next_to_the_config(
    write: Writer, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text("from-beside\r\n")
    (tmp_path / "secret.txt").chmod(0o600)
    text = MINIMAL.replace(f'client_secret = "{SOURCE_SECRET}"', 'client_secret_file = "secret.txt"')
    assert load_text(write, text).source.client_secret.reveal() == "from-beside"


def test_secret_from_environment_variable(write: Writer) -> None:
    text = MINIMAL.replace(f'token = "{TOKEN_SECRET}"', 'token_env = "ZPA_TOKEN"')
    cfg = load_text(write, text, {"ZPA_TOKEN": "from-env"})
    assert cfg.target("zpa").token == Secret("from-env")
    error = error_for(write, text, {})
    assert (error.key, error.problem) == (
        "target.zpa.token_env",
        "environment variable ZPA_TOKEN is not set or empty",
    )


def test_two_forms_of_one_secret_are_refused(write: Writer) -> None:
    error = error_for(write, with_target('token_file = "/nonexistent"'))
    assert error.key == "target.zpa.token_file"
    assert "only one of token, token_file" in error.problem


def test_missing_secret_names_the_forms(write: Writer) -> None:
    error = error_for(write, MINIMAL.replace(f'token = "{TOKEN_SECRET}"', ""))
    assert error.key == "target.zpa.token_file"
    assert "token_env" in error.problem


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read secret file"), ("", "is empty"), ("\n\n", "is empty"), ("a\nb", "line break")],
)
def test_bad_secret_file_names_key_and_path_never_content(
    write: Writer, tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    text = MINIMAL.replace(f'token = "{TOKEN_SECRET}"', f'token_file = "{path}"')
    error = error_for(write, text)
    assert error.key == "target.zpa.token_file"
    assert str(path) in error.problem and problem in error.problem
    assert "a\nb" not in str(error)


def test_unset_variable_in_secret_file_path_is_refused(write: Writer) -> None:
    text = MINIMAL.replace(f'token = "{TOKEN_SECRET}"', 'token_file = "${NOPE}/zpa-token"')
    error = error_for(write, text)
    assert error.key == "target.zpa.token_file" and "NOPE" in error.problem


def test_variables_are_not_expanded_outside_file_paths(write: Writer) -> None:
    cfg = load_text(
        write, MINIMAL.replace('client_id = "client-1"', 'client_id = "${HOME}"'), {"HOME": "/root"}
    )
    assert cfg.source.client_id == "${HOME}"


def test_basic_and_oauth_auth_need_their_keys(write: Writer, tmp_path: Path) -> None:
    basic = MINIMAL.replace(
        f'token = "{TOKEN_SECRET}"', 'auth = "basic"\nusername = "scim"\npassword = "pw-1"'
    )
    target = load_text(write, basic).target("zpa")
    assert (target.auth, target.username, target.password, target.token) == (
        "basic",
        "scim",
        Secret("pw-1"),
        None,
    )
    oauth = MINIMAL.replace(
        f'token = "{TOKEN_SECRET}"',
        'auth = "oauth_client_credentials"\ntoken_url = "https://idp.example.com/token"\n'
        'client_id = "c"\nclient_secret = "cs-1"',
    )
    target = load_text(write, oauth).target("zpa")
    assert (target.token_url, target.client_id, target.client_secret) == (
        "https://idp.example.com/token",
        "c",
        Secret("cs-1"),
    )
    assert error_for(write, basic.replace('username = "scim"', "")).key == "target.zpa.username"
    wrong = error_for(write, basic + 'token_url = "https://idp.example.com/token"\n')
    assert wrong.key == "target.zpa.token_url" and "oauth_client_credentials" in wrong.problem


# --------------------------------------------------------------------------------------------
# Warnings


def test_group_readable_secret_file_is_warned_about(write: Writer, creds: Path) -> None:
    (creds / "zpa-token").chmod(0o644)
    text = MINIMAL.replace(f'token = "{TOKEN_SECRET}"', 'token_file = "${CREDENTIALS_DIRECTORY}/zpa-token"')
    cfg = load_text(write, text, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert len(cfg.warnings) == 1 and "target.zpa.token" in cfg.warnings[0] and "0644" in cfg.warnings[0]
    assert config_warnings(cfg) == list(cfg.warnings)


def test_readable_config_with_literal_secrets_is_warned_about(write: Writer) -> None:
    path = write(MINIMAL, mode=0o644)
    warnings = load_config(path, environ={}).warnings
    assert len(warnings) == 1 and "source.client_secret" in warnings[0] and "0644" in warnings[0]
    assert load_config(write(MINIMAL, mode=0o600), environ={}).warnings == ()


def test_empty_scope_means_everyone_and_is_warned_about(write: Writer) -> None:
    cfg = load_text(write, MINIMAL.replace('scope = "all"', ""))
    assert cfg.target("zpa").scope.groups == () and cfg.target("zpa").scope.filter is None
    assert any("target.zpa.scope" in w and "every PingOne user" in w for w in cfg.warnings)
    assert load_text(write, MINIMAL).warnings == ()


def test_zia_rate_above_its_limit_is_warned_about(write: Writer) -> None:
    text = MINIMAL.replace('profile = "zpa"', 'profile = "zia"') + "requests_per_second = 20\n"
    assert any("requests_per_second" in w for w in load_text(write, text).warnings)


# --------------------------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/v2", "http://127.9.8.7/v2", "http://[::1]:8080/v2", "http://localhost/v2"]
)
def test_plain_http_to_loopback_is_accepted(write: Writer, url: str) -> None:
    cfg = load_text(write, MINIMAL.replace("http://127.0.0.1:8080/scim/v2/", url))
    assert cfg.target("zpa").base_url == url


@pytest.mark.parametrize("url", ["http://10.0.0.1/v2", "http://zpa.example.com/v2", "http://[::2]/v2"])
def test_plain_http_off_loopback_is_refused_unless_allowed(write: Writer, url: str) -> None:
    text = MINIMAL.replace("http://127.0.0.1:8080/scim/v2/", url)
    error = error_for(write, text)
    assert error.key == "target.zpa.base_url" and "allow_insecure_http" in error.problem
    cfg = load_text(write, text + "allow_insecure_http = true\n")
    assert cfg.target("zpa").base_url == url
    assert any("clear text" in w for w in cfg.warnings)


def test_source_http_off_loopback_is_refused(write: Writer) -> None:
    text = MINIMAL.replace(
        "[source]", '[source]\napi_url = "http://pingone.example/v1"\nauth_url = "https://auth.example"'
    )
    assert error_for(write, text).key == "source.api_url"
    assert load_text(write, text.replace("[source]", "[source]\nallow_insecure_http = true")).source.api_url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://127.0.0.1/x", "https://"),
        ("https://", "no host"),
        ("https://user:pw@zpa.example.com/v2", "credentials in the URL"),
        ("https://zpa.example.com/v2?x=1", "query"),
        ("https://zpa.example.com:99999/v2", "not a valid URL"),
        ("not a url", "whitespace"),
    ],
)
def test_bad_urls_are_refused(write: Writer, url: str, problem: str) -> None:
    error = error_for(write, MINIMAL.replace("http://127.0.0.1:8080/scim/v2/", url))
    assert error.key == "target.zpa.base_url" and problem in error.problem
    assert "user:pw" not in str(error)


def test_url_credentials_are_masked_in_every_url_error(write: Writer) -> None:
    error = error_for(
        write, MINIMAL.replace("http://127.0.0.1:8080/scim/v2/", "https://u:pw-Secret@h:99999/v2")
    )
    assert "pw-Secret" not in str(error) and "***@h:99999" in str(error)


# --------------------------------------------------------------------------------------------
# Validation and error messages


def test_error_text_is_file_key_problem(write: Writer) -> None:
    path = write(with_target("concurrency = 0"))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    error = info.value
    assert (error.path, error.key) == (str(path), "target.zpa.concurrency")
    assert str(error) == f"{path}: target.zpa.concurrency: {error.problem}"
    assert "out of range" in error.problem


def test_target_without_a_valid_name_is_named_by_index(write: Writer) -> None:
    text = MINIMAL + '[[target]]\nname = "Bad Name"\nprofile = "zia"\n'
    error = error_for(write, text)
    assert error.key == "target[1].name" and "[a-z0-9_-]+" in error.problem


def test_unknown_keys_are_refused_with_a_suggestion(write: Writer) -> None:
    error = error_for(write, with_target("concurency = 4"))
    assert error.key == "target.zpa.concurency" and "did you mean 'concurrency'" in error.problem
    error = error_for(write, MINIMAL.replace("[[target]]", "[[targets]]"))
    assert error.key == "targets" and "did you mean 'target'" in error.problem
    error = error_for(write, "[daemon]\nintervall = '5m'\n" + MINIMAL)
    assert error.key == "daemon.intervall" and "'interval'" in error.problem
    error = error_for(write, with_target("actions = { create = true, delete = false }"))
    assert error.key == "target.zpa.actions.delete"


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("concurrency = true", "target.zpa.concurrency", "expected an integer, got boolean"),
        ("concurrency = 1.5", "target.zpa.concurrency", "expected an integer, got float"),
        ("concurrency = 5000", "target.zpa.concurrency", "out of range"),
        ("requests_per_second = 0", "target.zpa.requests_per_second", "out of range"),
        ("requests_per_second = nan", "target.zpa.requests_per_second", "finite"),
        ("requests_per_second = '5'", "target.zpa.requests_per_second", "expected a number, got string"),
        ("page_size = 0", "target.zpa.page_size", "out of range"),
        ("timeout = '5 minutes'", "target.zpa.timeout", "invalid duration"),
        ("timeout = '0s'", "target.zpa.timeout", "longer than zero"),
        ("timeout = 1979-05-27", "target.zpa.timeout", "got date"),
        ("profile2 = 1", "target.zpa.profile2", "unknown key"),
        ("update_method = 'post'", "target.zpa.update_method", "not one of patch, put"),
        ("remove_action = 'deleet'", "target.zpa.remove_action", "did you mean 'delete'"),
        ("membership = 'nested'", "target.zpa.membership", "transitive, direct"),
        ("group_membership = 'replace'", "target.zpa.group_membership", "overwrite, merge"),
        ("auth = 'token'", "target.zpa.auth", "not one of"),
        ("match_filter = 'userName eq \"x\"'", "target.zpa.match_filter", "exactly one %s"),
        ("match_filter = 'userName eq \"%s\" and %s'", "target.zpa.match_filter", "exactly one %s"),
        ("match_filter = 'userName zz \"%s\"'", "target.zpa.match_filter", "not a valid SCIM filter"),
        ("max_deletes = '110%'", "target.zpa.max_deletes", "above 100%"),
        ("max_deletes = 1.5", "target.zpa.max_deletes", "count (50) or a percent"),
        ("max_deletes = -1", "target.zpa.max_deletes", "out of range"),
        ("delete_after = '7d'", "target.zpa.delete_after", "only used with"),
        ("remove_action = 'disable_then_delete'", "target.zpa.delete_after", "required"),
        ("groups = 'ZPA Users'", "target.zpa.groups", "expected an array"),
        ("groups = ['A', 'A']", "target.zpa.groups[1]", "listed twice"),
        ("groups = [{ id = 'x', name = 'y' }]", "target.zpa.groups[0]", "exactly one"),
        ("groups = [{ uid = 'x' }]", "target.zpa.groups[0].uid", "unknown key"),
        ("groups = [3]", "target.zpa.groups[0]", "got integer"),
        ("full_sync_every = '-1h'", "target.zpa.full_sync_every", "invalid duration"),
    ],
)
def test_bad_values_are_refused_with_key_and_problem(
    write: Writer, line: str, key: str, problem: str
) -> None:
    error = error_for(write, with_target(line))
    assert error.key == key
    assert problem in error.problem


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ("[daemon]\ninterval = 0", "daemon.interval", "longer than zero"),
        ("[daemon]\nlog_format = 'xml'", "daemon.log_format", "json, console"),
        ("[daemon]\nlog_level = 'trace'", "daemon.log_level", "not one of"),
        ("[daemon]\nmax_source_shrink = 10", "daemon.max_source_shrink", "out of range"),
        ("[daemon]\nmax_source_shrink = 'ten'", "daemon.max_source_shrink", "percent"),
        ("[daemon]\nhttp_listen = '9477'", "daemon.http_listen", "host:port"),
        ("[daemon]\nhttp_listen = '127.0.0.1:0'", "daemon.http_listen", "host:port"),
        ("[daemon]\nhttp_listen = '::1:9477'", "daemon.http_listen", "IPv6"),
        ("daemon = 5", "daemon", "expected a table"),
    ],
)
def test_bad_daemon_values_are_refused(write: Writer, section: str, key: str, problem: str) -> None:
    error = error_for(write, section + "\n" + MINIMAL)
    assert error.key == key and problem in error.problem


def test_http_listen_accepts_ipv4_ipv6_and_names(write: Writer) -> None:
    for listen in ("127.0.0.1:9477", "[::1]:9477", "localhost:1"):
        assert (
            load_text(write, f"[daemon]\nhttp_listen = '{listen}'\n" + MINIMAL).daemon.http_listen == listen
        )
    cfg = load_text(write, "[daemon]\nhttp_listen = '0.0.0.0:9477'\n" + MINIMAL)
    assert any("http_listen" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace('environment_id = "env-1"', ""), "source.environment_id"),
        (lambda t: t.replace('environment_id = "env-1"', 'environment_id = "a/b"'), "source.environment_id"),
        (lambda t: t.replace('client_id = "client-1"', 'client_id = ""'), "source.client_id"),
        (lambda t: t.replace("[source]", '[source]\nregion = "US"'), "source.region"),
        (lambda t: t.replace("[source]", '[source]\nclient_auth = "jwt"'), "source.client_auth"),
        (lambda t: t.replace("[source]", "[source]\npage_size = 1001"), "source.page_size"),
        (lambda t: t.split("[[target]]")[0], "target"),
        (lambda t: t.replace("[source]", "[sauce]"), "sauce"),
        (lambda t: t.replace('profile = "zpa"', ""), "target.zpa.profile"),
        (lambda t: t.replace('base_url = "http://127.0.0.1:8080/scim/v2/"', ""), "target.zpa.base_url"),
    ],
)
def test_missing_or_bad_source_and_target_essentials(
    write: Writer, edit: Callable[[str], str], key: str
) -> None:
    assert error_for(write, edit(MINIMAL)).key == key


def test_duplicate_target_names_are_refused(write: Writer) -> None:
    second = MINIMAL.split("[[target]]")[1]
    error = error_for(write, MINIMAL + "[[target]]" + second)
    assert error.key == "target[1].name" and "duplicate" in error.problem


def test_target_must_be_an_array_of_tables(write: Writer) -> None:
    error = error_for(write, MINIMAL.replace("[[target]]", "[target]"))
    assert error.key == "target" and "[[target]]" in error.problem


def test_toml_syntax_error_is_reported_with_file_and_line(write: Writer) -> None:
    path = write(MINIMAL + "concurrency = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    line = (MINIMAL + "concurrency = = 3\n").count("\n")
    assert info.value.key == f"line {line}"
    assert str(info.value).startswith(f"{path}: line {line}: TOML syntax error")


def test_missing_unreadable_and_non_utf8_files_are_config_errors(write: Writer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path, environ={})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[daemon]\nstate_path = "\xff"\n')
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        load_config(binary, environ={})


# --------------------------------------------------------------------------------------------
# Scope, groups, mapping, max_deletes


def test_scope_groups_and_filter_are_read_and_validated(write: Writer) -> None:
    text = MINIMAL.replace(
        'scope = "all"',
        "scope = { groups = ['ZPA Users', { id = 'g-1' }, { name = 'Ops' }], "
        "filter = 'population.id eq \"p-1\" and enabled eq true' }",
    )
    scope = load_text(write, text).target("zpa").scope
    assert scope.groups == (GroupRef(name="ZPA Users"), GroupRef(id="g-1"), GroupRef(name="Ops"))
    assert scope.filter == 'population.id eq "p-1" and enabled eq true'
    assert not scope.everyone
    error = error_for(write, MINIMAL.replace('scope = "all"', "scope = { filter = 'enabled eq' }"))
    assert error.key == "target.zpa.scope.filter" and "not a valid SCIM filter" in error.problem
    error = error_for(write, MINIMAL.replace('scope = "all"', "scope = { filter = 'x eq 1.5' }"))
    assert error.key == "target.zpa.scope.filter"
    assert error_for(write, MINIMAL.replace('scope = "all"', 'scope = "some"')).key == "target.zpa.scope"


def test_group_ref_needs_exactly_one_of_name_and_id() -> None:
    with pytest.raises(ValueError):
        GroupRef()
    with pytest.raises(ValueError):
        GroupRef(name="a", id="b")


def test_mapping_overrides_profile_defaults_case_insensitively_and_adds_keys(write: Writer) -> None:
    text = with_target(
        "[target.mapping]\nusername = 'email || username'\ntitle = 'title'\n"
        "name.givenName = 'nickname'\n'name.familyName' = false\n"
    )
    mapping = load_text(write, text).target("zpa").mapping
    paths = [path for path, _ in mapping]
    assert paths[0] == "userName" and dict(mapping)["userName"] == "email || username"
    assert dict(mapping)["name.givenName"] == "nickname"  # unquoted dotted key accepted
    assert "name.familyName" not in paths
    assert paths[-1] == "title"


@pytest.mark.parametrize(
    ("entry", "key", "problem"),
    [
        ("active = 'enabled'", "mapping.active", "cannot be mapped"),
        ("id = 'id'", "mapping.id", "cannot be mapped"),
        ("userName = false", "mapping.userName", "must be mapped"),
        ("displayName = 'join('", "mapping.displayName", "not a valid JMESPath"),
        ("displayName = 'nofunc(name)'", "mapping.displayName", "fails on a sample user"),
        ("displayName = 'join(name)'", "mapping.displayName", "fails on a sample user"),
        ("displayName = 3", "mapping.displayName", "got integer"),
        ("'bad path!' = 'x'", 'mapping."bad path!"', "not a SCIM attribute path"),
        ("'emails[type zz].value' = 'email'", 'mapping."emails[type zz].value"', "value filter"),
        ("userName = 'a'\nUSERNAME = 'b'", "mapping.USERNAME", "mapped twice"),
    ],
)
def test_bad_mapping_entries_are_refused(write: Writer, entry: str, key: str, problem: str) -> None:
    error = error_for(write, with_target(f"[target.mapping]\n{entry}"))
    assert error.key == f"target.zpa.{key}"
    assert problem in error.problem


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"username": "a@x", "name": {"given": "Ada", "family": "Lovelace"}}, "Ada Lovelace"),
        ({"username": "a@x", "name": {"given": "Ada"}}, "Ada"),
        ({"username": "a@x", "name": {"family": "Lovelace"}}, "Lovelace"),
        ({"username": "a@x", "name": {"formatted": "Lady Ada"}}, "Lady Ada"),
        ({"username": "a@x"}, "a@x"),
        ({"username": "a@x", "name": None}, "a@x"),
    ],
)
def test_default_display_name_survives_missing_name_parts(user: dict[str, object], expected: str) -> None:
    for profile in PROFILES.values():
        expression = dict(profile.mapping)["displayName"]
        assert jmespath.search(expression, user) == expected


def test_max_deletes_forms_and_limit(write: Writer) -> None:
    assert load_text(write, with_target("max_deletes = '25%'")).target("zpa").max_deletes == MaxDeletes(
        percent=25.0
    )
    assert load_text(write, with_target("max_deletes = 50")).target("zpa").max_deletes == MaxDeletes(count=50)
    both = (
        load_text(write, with_target("max_deletes = { count = 5, percent = 10 }")).target("zpa").max_deletes
    )
    assert both == MaxDeletes(count=5, percent=10.0)
    assert MaxDeletes(percent=10.0).limit(1000) == 100
    assert MaxDeletes(percent=10.0).limit(15) == 1
    assert MaxDeletes(percent=10.0).limit(30) == 3  # no float rounding down to 2
    assert MaxDeletes(count=50).limit(10) == 50
    assert both.limit(1000) == 5 and both.limit(20) == 2
    assert MaxDeletes().limit(7) == 7 and MaxDeletes(percent=10.0).limit(-3) == 0


def test_staged_deprovisioning_reads_delete_after(write: Writer) -> None:
    target = load_text(
        write, with_target("remove_action = 'disable_then_delete'\ndelete_after = '7d'")
    ).target("zpa")
    assert (target.remove_action, target.delete_after) == ("disable_then_delete", 604800.0)


# --------------------------------------------------------------------------------------------
# Plain data, diffs, paths


def test_masked_config_round_trips_through_the_parser(write: Writer, creds: Path) -> None:
    cfg = load_config(EXAMPLE, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    again = parse_config(cfg.masked(), path="masked", environ={})
    assert again.masked() == cfg.masked()
    assert again.targets[0].mapping == cfg.targets[0].mapping
    dropped = load_text(write, with_target("[target.mapping]\nexternalId = false"))
    assert dropped.masked()["target"][0]["mapping"]["externalId"] is False
    assert parse_config(dropped.masked(), environ={}).target("zpa").mapping == dropped.target("zpa").mapping


def test_diff_configs_names_changed_keys_and_targets_never_values(write: Writer) -> None:
    old = load_text(write, MINIMAL)
    changed = (
        MINIMAL.replace(SOURCE_SECRET, "rotated-secret")
        .replace("[source]", '[daemon]\ninterval = "1m"\n[source]')
        .replace('scope = "all"', 'scope = "all"\nconcurrency = 3\n[target.mapping]\ntitle = "title"')
        + '[[target]]\nname = "zia"\nprofile = "zia"\nbase_url = "http://127.0.0.1:1/scim"\ntoken = "t"\n'
    )
    new = load_text(write, changed)
    diff = diff_configs(old, new)
    assert diff["targets_added"] == ["zia"] and diff["targets_removed"] == []
    assert diff["changed"] == [
        "daemon.interval",
        "source.client_secret",
        "target.zpa.concurrency",
        "target.zpa.mapping.title",
    ]
    assert "rotated-secret" not in json.dumps(diff) and SOURCE_SECRET not in json.dumps(diff)
    assert diff_configs(new, old)["targets_removed"] == ["zia"]
    assert diff_configs(old, old) == {"targets_added": [], "targets_removed": [], "changed": []}


def test_resolve_config_path_prefers_cli_then_environment_then_default() -> None:
    assert resolve_config_path("/a.toml", {"PROVISIOND_CONFIG": "/b.toml"}) == "/a.toml"
    assert resolve_config_path(None, {"PROVISIOND_CONFIG": "/b.toml"}) == "/b.toml"
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH == "/etc/provisiond/provisiond.toml"


def test_config_target_lookup(write: Writer) -> None:
    cfg = load_text(write, MINIMAL)
    assert cfg.target("zpa").name == "zpa"
    with pytest.raises(KeyError):
        cfg.target("nope")


def test_load_config_uses_process_environment_by_default(
    write: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROVISIOND_TEST_TOKEN", "env-token")
    text = MINIMAL.replace(f'token = "{TOKEN_SECRET}"', 'token_env = "PROVISIOND_TEST_TOKEN"')
    assert load_config(write(text)).target("zpa").token == Secret("env-token")


# --------------------------------------------------------------------------------------------
# Fuzzing

_FUZZ_VALUES = [
    '"x"',
    "0",
    "-1",
    "true",
    "1.5",
    "[]",
    "{}",
    '"5m"',
    '"10%"',
    "1979-05-27",
    "07:32:00",
    '"http://example.com"',
    '"https://"',
    "nan",
    "inf",
    '"${NOPE}/x"',
    '[1, "a"]',
    "{ id = 1 }",
    '"' + "a" * 5000 + '"',
    "99999999999999999999999",
    '"%s"',
    "'[?'",
    '"userName eq"',
    '"all"',
    "{ groups = 1 }",
    '["a", { name = 1 }]',
    '"7d"',
    '"delete"',
    '"disable_then_delete"',
    '""',
    "false",
    "{ a = { b = { c = 1 } } }",
]


def _mutate(lines: list[str], rng: random.Random) -> list[str]:
    lines = list(lines)
    choice = rng.randrange(8)
    index = rng.randrange(len(lines)) if lines else 0
    assignments = [i for i, line in enumerate(lines) if re.match(r"^\s*[\"'\w.\[\]-]+\s*=", line)]
    if choice == 0 and lines:
        del lines[index]
    elif choice == 1 and len(assignments) >= 2:
        a, b = rng.sample(assignments, 2)
        key_a, _, value_a = lines[a].partition("=")
        key_b, _, value_b = lines[b].partition("=")
        lines[a], lines[b] = f"{key_a}={value_b}", f"{key_b}={value_a}"
    elif choice == 2 and assignments:
        at = rng.choice(assignments)
        key, _, _value = lines[at].partition("=")
        lines[at] = f"{key}= {rng.choice(_FUZZ_VALUES)}"
    elif choice == 3:
        text = "\n".join(lines)
        return text[: rng.randrange(len(text) + 1)].split("\n")
    elif choice == 4 and lines:
        lines.insert(index, lines[index])
    elif choice == 5 and assignments:
        at = rng.choice(assignments)
        key, _, value = lines[at].partition("=")
        cut = rng.randrange(max(1, len(key.strip())))
        lines[at] = key.strip()[:cut] + key.strip()[cut + 1 :] + " =" + value
    elif choice == 6 and lines:
        line = lines[index]
        pos = rng.randrange(len(line) + 1)
        lines[index] = (
            line[:pos] + rng.choice(["[", "]", '"', "'", "=", "\\", "\x00", "é", "{", "#", "\t"]) + line[pos:]
        )
    else:
        lines.insert(index, rng.choice(["[[target]]", "[daemon]", "[target.mapping]", "[source]", "x = 1"]))
    return lines


def test_fuzzed_example_files_give_a_config_or_a_config_error_never_a_traceback(
    tmp_path: Path, creds: Path
) -> None:
    rng = random.Random(20240611)
    original = EXAMPLE.read_text().split("\n")
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    outcomes = {"config": 0, "error": 0}
    path = tmp_path / "fuzz.toml"
    for _ in range(300):
        lines = original
        for _ in range(rng.randint(1, 3)):
            lines = _mutate(lines, rng)
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        path.chmod(0o600)
        try:
            cfg = load_config(path, environ=environ)
        except ConfigError as error:
            assert str(error).startswith(f"{path}: ")
            assert error.key and error.problem
            outcomes["error"] += 1
        else:
            assert isinstance(cfg, Config)
            json.dumps(cfg.masked())
            diff_configs(cfg, cfg)
            outcomes["config"] += 1
    assert outcomes["config"] > 20 and outcomes["error"] > 100, outcomes


def test_fuzzed_parse_config_data_gives_config_error_for_any_shape() -> None:
    rng = random.Random(7)
    shapes: list[object] = [None, 1, "x", [], [1], {}, {"a": 1}, 1.5, True, {"id": None}]
    for _ in range(200):
        data: dict[str, object] = {
            "source": rng.choice([*shapes, {"environment_id": "e", "client_id": "c", "client_secret": "s"}]),
            "target": rng.choice(
                [*shapes, [{"name": "a", "profile": "generic", "base_url": "http://127.0.0.1/"}]]
            ),
        }
        if rng.random() < 0.5:
            data["daemon"] = rng.choice(shapes)
        try:
            parse_config(data, environ={})
        except ConfigError:
            pass


def test_deeply_nested_toml_is_a_config_error(write: Writer) -> None:
    error = error_for(write, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert isinstance(error, ConfigError)


def test_config_file_is_not_touched_by_loading(write: Writer) -> None:
    path = write(MINIMAL)
    before = (path.read_bytes(), os.stat(path).st_mode)
    load_config(path, environ={})
    assert (path.read_bytes(), os.stat(path).st_mode) == before


def test_username_mutable_and_max_groups_per_user_override_the_profile_only_when_set(write: Writer) -> None:
    from daemon.engine import profile_overrides
    from daemon.target.profiles import profile_for

    plain = load_text(write, MINIMAL).targets[0]
    assert (plain.username_mutable, plain.max_groups_per_user) == (None, None)
    zpa = profile_for("zpa", **profile_overrides(plain))
    assert (zpa.username_mutable, zpa.max_groups_per_user) == (False, 1000)
    cfg = load_text(write, MINIMAL + "username_mutable = true\nmax_groups_per_user = 50\n").targets[0]
    assert (cfg.username_mutable, cfg.max_groups_per_user) == (True, 50)
    zpa = profile_for("zpa", **profile_overrides(cfg))
    assert (zpa.username_mutable, zpa.max_groups_per_user) == (True, 50)
    assert "max_groups_per_user" in str(error_for(write, MINIMAL + "max_groups_per_user = 0\n"))
