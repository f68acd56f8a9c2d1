"""Configuration: one TOML file validated into frozen dataclasses.

`load_config` reads the file, resolves secrets (`k`, `k_file` or `k_env` for each secret key) and
refuses the whole file on the first problem with a `ConfigError` whose text is
"{file}: {key}: {problem}" (key dotted: `daemon.interval`, `target.zpa.concurrency`, or
`target[1].concurrency` — index from 0 — while the target has no valid name yet). Nothing else
escapes from a bad file: no traceback for any input.

Secrets are `Secret` values that print as `Secret('***')`; `Config.secrets()` lists the revealed
values for the log redactor. Durations are strings ("90s", "5m", "1h30m", see `daemon.durations`)
or plain numbers of seconds.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets as _random
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, replace
from typing import Any, Final
from urllib.parse import urlsplit

import jmespath
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from scim2_filter_parser.lexer import SCIMLexer
from scim2_filter_parser.parser import SCIMParser

from daemon.config_schema import (
    CHANGE_MODES,
    CLIENT_AUTHS,
    DAEMON_KEYS,
    GROUP_MEMBERSHIPS,
    GROUP_REF_KEYS,
    LOG_FORMATS,
    LOG_LEVELS,
    MEMBERSHIPS,
    PROFILE_NAMES,
    RANGES,
    REMOVE_ACTIONS,
    SOURCE_KEYS,
    TARGET_AUTHS,
    TARGET_KEYS,
    UPDATE_METHODS,
    ActionsFile,
    DaemonFile,
    MappingEntry,
    MaxDeletesFile,
    Range,
    ScopeFile,
    SourceFile,
    TargetFile,
)
from daemon.durations import format_duration, parse_duration

DEFAULT_CONFIG_PATH: Final = "/etc/provisiond/provisiond.toml"
CONFIG_PATH_ENV: Final = "PROVISIOND_CONFIG"
CREDENTIALS_ENV: Final = "CREDENTIALS_DIRECTORY"

DEFAULT_STATE_PATH: Final = "/var/lib/provisiond/state.db"
# The full cycle is the change feed's backstop (README "How changes flow"): changes arrive in
# seconds through the feed; at 100k users a full pass is ~2,269 PingOne requests, so once a day
# it costs under 2 requests a minute beside the feed's 12 polls.
DEFAULT_INTERVAL: Final = 86400.0
# With `[source] changes = "off"` the full cycle is the only way a change travels: the interval
# left unset is then 5 minutes, as before the feed.
DEFAULT_INTERVAL_WITHOUT_FEED: Final = 300.0
DEFAULT_FULL_SYNC_EVERY: Final = 86400.0
DEFAULT_LOG_FORMAT: Final = "json"
DEFAULT_LOG_LEVEL: Final = "info"
DEFAULT_GRACE_PERIOD: Final = 30.0
DEFAULT_JITTER: Final = 0.0
# The first wait before a quarantined or failed target, or PingOne after an incomplete snapshot,
# is tried again; it doubles each time (README "When cycles run").
DEFAULT_RETRY_BACKOFF: Final = 60.0
DEFAULT_MAX_SOURCE_SHRINK: Final = 0.10
DEFAULT_REGION: Final = "NA"
DEFAULT_CLIENT_AUTH: Final = "basic"
DEFAULT_SOURCE_PAGE_SIZE: Final = 500
# [source] changes: how changes between full snapshots are learnt (issue 15; daemon/source/changes.py).
DEFAULT_CHANGES: Final = "poll"
DEFAULT_CHANGE_POLL_INTERVAL: Final = 5.0
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_TARGET_AUTH: Final = "bearer"
DEFAULT_MATCH_FILTER: Final = 'userName eq "%s"'
DEFAULT_GROUP_MATCH_FILTER: Final = 'displayName eq "%s"'
DEFAULT_GROUP_MEMBERSHIP: Final = "overwrite"
DEFAULT_MEMBERSHIP: Final = "transitive"
DEFAULT_MAX_DELETES: Final = "10%"

MAX_CONFIG_BYTES: Final = 1024 * 1024
MAX_SECRET_BYTES: Final = 64 * 1024
MAX_TEXT: Final = 4096
MAX_DELETES_COUNT: Final = 10**9
ZIA_MAX_RPS: Final = 5.0  # ZIA's documented per-tenant SCIM rate limit (zscaler-scim.md §1)

ENTERPRISE_USER: Final = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

REGIONS: dict[str, tuple[str, str]] = {
    "NA": ("https://api.pingone.com/v1", "https://auth.pingone.com"),
    "CA": ("https://api.pingone.ca/v1", "https://auth.pingone.ca"),
    "EU": ("https://api.pingone.eu/v1", "https://auth.pingone.eu"),
    "AU": ("https://api.pingone.com.au/v1", "https://auth.pingone.com.au"),
    "SG": ("https://api.pingone.sg/v1", "https://auth.pingone.sg"),
    "AP": ("https://api.pingone.asia/v1", "https://auth.pingone.asia"),
}

SCOPE_ALL: Final = "all"

# Attributes the server or provisiond owns; a mapping may not set them.
UNMAPPABLE: Final = frozenset({"active", "id", "meta", "schemas", "groups"})

# Display name that never fails on missing name parts and is never empty.
DISPLAY_NAME_EXPR: Final = "name.formatted || join(' ', [name.given, name.family][?@]) || username"
WORK_EMAIL_PATH: Final = 'emails[type eq "work"].value'

# A PingOne user with every attribute a mapping usually reads: mapping expressions are run on it
# at load so that unknown functions and wrong arities fail now, not in the middle of a cycle.
_SAMPLE_USER: Final[dict[str, Any]] = {
    "id": "5a2b0c9e-0000-4000-8000-000000000001",
    "username": "ada@example.com",
    "email": "ada@example.com",
    "enabled": True,
    "name": {"given": "Ada", "family": "Lovelace", "formatted": "Ada Lovelace", "middle": "B"},
    "nickname": "ada",
    "title": "Engineer",
    "department": "R&D",
    "locale": "en",
    "preferredLanguage": "en",
    "timezone": "Europe/London",
    "type": "Employee",
    "accountId": "42",
    "externalId": "ext-1",
    "mobilePhone": "+441234567890",
    "primaryPhone": "+441234567891",
    "photo": {"href": "https://example.com/p.png"},
    "address": {
        "streetAddress": "1 St",
        "locality": "London",
        "region": "LDN",
        "postalCode": "N1",
        "countryCode": "GB",
    },
    "population": {"id": "5a2b0c9e-0000-4000-8000-000000000002"},
    "memberOfGroupNames": ["Staff"],
    "createdAt": "2024-01-01T00:00:00.000Z",
    "updatedAt": "2024-01-01T00:00:00.000Z",
}

_FINGERPRINT_KEY: Final = _random.token_bytes(32)


class ConfigError(Exception):
    """A configuration file that cannot be used: which file, which key, what is wrong."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


class Secret:
    """A secret string that never prints: repr and str are "Secret('***')".

    Immutable, compared by value (in constant time) and hashable. `origin` says where it came
    from ("literal", "env:NAME" or "file:/path"); it is not secret and not part of equality.
    """

    __slots__ = ("_value", "origin")
    _value: str
    origin: str

    def __init__(self, value: str, origin: str = "literal") -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret wraps a str")
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "origin", origin)

    def reveal(self) -> str:
        """The secret value itself: only for the code that sends it."""
        return self._value

    def fingerprint(self) -> str:
        """A short keyed SHA-256 digest: equal within this process iff the values are equal.

        The key is random per process, so a fingerprint tells a reload "this secret changed"
        without giving anyone a hash to guess the secret from.
        """
        digest = hmac.new(_FINGERPRINT_KEY, self._value.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return "sha256:" + digest.hexdigest()[:12]

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogatepass"), other._value.encode("utf-8", "surrogatepass")
        )

    def __hash__(self) -> int:
        return hash(self._value)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce__(self) -> tuple[type[Secret], tuple[str, str]]:
        return (Secret, (self._value, self.origin))


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The `[daemon]` section: scheduling, state file, logging, stop and health settings."""

    state_path: str = DEFAULT_STATE_PATH
    interval: float = DEFAULT_INTERVAL
    full_sync_every: float = DEFAULT_FULL_SYNC_EVERY
    log_format: str = DEFAULT_LOG_FORMAT
    log_level: str = DEFAULT_LOG_LEVEL
    grace_period: float = DEFAULT_GRACE_PERIOD
    jitter: float = DEFAULT_JITTER
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    max_source_shrink: float = DEFAULT_MAX_SOURCE_SHRINK
    http_listen: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """The `[source]` section: the PingOne environment and the worker app that reads it."""

    environment_id: str
    client_id: str
    client_secret: Secret
    region: str = DEFAULT_REGION
    api_url: str = REGIONS[DEFAULT_REGION][0]
    auth_url: str = REGIONS[DEFAULT_REGION][1]
    client_auth: str = DEFAULT_CLIENT_AUTH
    page_size: int = DEFAULT_SOURCE_PAGE_SIZE
    timeout: float = DEFAULT_TIMEOUT
    allow_insecure_http: bool = False
    changes: str = DEFAULT_CHANGES
    change_poll_interval: float = DEFAULT_CHANGE_POLL_INTERVAL
    webhook_secret: Secret | None = None   # required with changes = "webhook"


@dataclass(frozen=True, slots=True)
class Actions:
    """The four action switches of a target."""

    create: bool = True
    update: bool = True
    disable: bool = True
    deprovision: bool = True


@dataclass(frozen=True, slots=True)
class GroupRef:
    """PingOne groups chosen by name or by id, or by a rule: a name prefix or a SCIM filter over
    the group's attributes (exactly one of the four)."""

    name: str | None = None
    id: str | None = None
    prefix: str | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.name, self.id, self.prefix, self.filter)) != 1:
            raise ValueError("GroupRef needs exactly one of name, id, prefix and filter")


@dataclass(frozen=True, slots=True)
class Scope:
    """Which users a target receives: members of `groups` and/or matches of `filter`.

    With neither, every PingOne user is in scope; `everyone` records that the file said so
    explicitly (`scope = "all"`), which silences the warning.
    """

    groups: tuple[GroupRef, ...] = ()
    filter: str | None = None
    everyone: bool = False


@dataclass(frozen=True, slots=True)
class MaxDeletes:
    """The deletion threshold: a count, a percent of the managed objects, or both (the lower wins)."""

    count: int | None = None
    percent: float | None = None

    def limit(self, managed: int) -> int:
        """How many removals are allowed in one cycle when `managed` objects are managed.

        A percent rounds down: 10% of 15 allows 1. With neither set, everything is allowed.
        """
        managed = max(0, managed)
        limits: list[int] = []
        if self.count is not None:
            limits.append(self.count)
        if self.percent is not None:
            limits.append(math.floor(managed * self.percent / 100.0 + 1e-9))
        return min(limits) if limits else managed


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    """One `[[target]]`: a SCIM service provider with its profile, auth, rules and limits."""

    name: str
    profile: str
    base_url: str
    auth: str = DEFAULT_TARGET_AUTH
    token: Secret | None = None
    username: str | None = None
    password: Secret | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    update_method: str = "patch"
    match_filter: str = DEFAULT_MATCH_FILTER
    group_match_filter: str = DEFAULT_GROUP_MATCH_FILTER
    group_membership: str = DEFAULT_GROUP_MEMBERSHIP
    concurrency: int = 8
    requests_per_second: float = 20.0
    burst: float = 20.0
    page_size: int = 100
    membership_batch: int = 100
    remove_action: str = "disable"
    delete_after: float | None = None
    max_deletes: MaxDeletes = field(default_factory=lambda: MaxDeletes(percent=10.0))
    actions: Actions = field(default_factory=Actions)
    groups: tuple[GroupRef, ...] = ()
    membership: str = DEFAULT_MEMBERSHIP
    scope: Scope = field(default_factory=Scope)
    mapping: tuple[tuple[str, str], ...] = ()
    # mapped paths written on create only (`{ expr = "…", create_only = true }`): never updated
    create_only: frozenset[str] = frozenset()
    require_email_username: bool = False
    timeout: float = DEFAULT_TIMEOUT
    full_sync_every: float | None = None
    allow_insecure_http: bool = False
    active_false_deletes: bool = False
    # The target's profile knobs (daemon.target.profiles) where the file overrides them: both
    # are UNCONFIRMED facts about Zscaler (zscaler-scim.md §6, §8). None: the profile's.
    username_mutable: bool | None = None
    max_groups_per_user: int | None = None


@dataclass(frozen=True, slots=True)
class ProfileDefaults:
    """What a profile (`zpa`, `zia`, `generic`) sets when the file does not."""

    concurrency: int
    requests_per_second: float
    page_size: int
    membership_batch: int
    update_method: str
    remove_action: str
    require_email_username: bool
    active_false_deletes: bool
    mapping: tuple[tuple[str, str], ...]


PROFILES: dict[str, ProfileDefaults] = {
    "zpa": ProfileDefaults(
        concurrency=8,
        requests_per_second=40.0,
        page_size=100,
        membership_batch=100,
        update_method="patch",
        remove_action="disable",
        require_email_username=True,
        # UNCONFIRMED: ZPA's "About SCIM" says active=false deletes the user, other sources say
        # it disables; a knob (`active_false_deletes`) so an operator can correct it.
        active_false_deletes=True,
        mapping=(
            ("userName", "username"),
            ("name.givenName", "name.given"),
            ("name.familyName", "name.family"),
            ("displayName", DISPLAY_NAME_EXPR),
            ("externalId", "id"),
            (WORK_EMAIL_PATH, "email"),
            (f"{ENTERPRISE_USER}:department", "department"),
        ),
    ),
    "zia": ProfileDefaults(
        concurrency=2,
        requests_per_second=5.0,
        page_size=100,
        membership_batch=100,
        update_method="patch",
        remove_action="disable",
        require_email_username=True,
        active_false_deletes=False,
        mapping=(
            ("userName", "username"),
            ("displayName", DISPLAY_NAME_EXPR),
            ("externalId", "id"),
            (f"{ENTERPRISE_USER}:department", "department"),
            ("name.givenName", "name.given"),
            ("name.familyName", "name.family"),
        ),
    ),
    "generic": ProfileDefaults(
        concurrency=8,
        requests_per_second=20.0,
        page_size=100,
        membership_batch=100,
        update_method="patch",
        remove_action="disable",
        require_email_username=False,
        active_false_deletes=False,
        mapping=(
            ("userName", "username"),
            ("name.givenName", "name.given"),
            ("name.familyName", "name.family"),
            ("displayName", DISPLAY_NAME_EXPR),
            ("externalId", "id"),
            (WORK_EMAIL_PATH, "email"),
        ),
    ),
}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration, with the warnings found while loading it."""

    path: str
    daemon: DaemonConfig
    source: SourceConfig
    targets: tuple[TargetConfig, ...]
    warnings: tuple[str, ...] = ()

    def target(self, name: str) -> TargetConfig:
        """The target called `name`; KeyError when there is none."""
        for target in self.targets:
            if target.name == name:
                return target
        raise KeyError(name)

    def secrets(self) -> tuple[str, ...]:
        """Every revealed secret value, once each (for the log redactor)."""
        seen: dict[str, None] = {}
        for _key, secret in _secret_items(self):
            seen.setdefault(secret.reveal(), None)
        return tuple(seen)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, keys as in the TOML, secrets as "***"."""
        return _plain(self, lambda _secret: "***")

    def fingerprint(self) -> dict[str, Any]:
        """Like `masked()`, but each secret is a short keyed digest, so a change is visible."""
        return _plain(self, Secret.fingerprint)


# --------------------------------------------------------------------------------------------
# Public functions


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The config path: `-c` when given, else `$PROVISIOND_CONFIG`, else `DEFAULT_CONFIG_PATH`."""
    env = os.environ if environ is None else environ
    if cli_value:
        return cli_value
    return env.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve the config file at `path`; raise `ConfigError` on any problem."""
    spath = os.fspath(path)
    env = os.environ if environ is None else environ
    try:
        info = os.stat(spath)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(spath, "(file)", "not a regular file")
        with open(spath, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(spath, "(file)", f"cannot read: {exc.strerror or type(exc).__name__}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(spath, "(file)", f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(spath, f"line {line}", "not UTF-8 text") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"at line (\d+)", message)
        key = f"line {found.group(1)}" if found else "(toml)"
        raise ConfigError(spath, key, f"TOML syntax error: {message}") from exc
    except RecursionError as exc:
        raise ConfigError(spath, "(toml)", "TOML nested too deeply") from exc
    base_dir = os.path.dirname(os.path.abspath(spath))
    return parse_config(raw, path=spath, environ=env, base_dir=base_dir)


def parse_config(
    data: Mapping[str, Any],
    *,
    path: str = "<config>",
    environ: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> Config:
    """Validate already-parsed TOML data (a dict) into a `Config`; `load_config` without the file.

    Relative paths (state file, secret files) resolve against `base_dir` (default: the cwd).
    """
    ctx = _Ctx(
        path=path,
        environ=os.environ if environ is None else environ,
        base_dir=base_dir if base_dir is not None else os.getcwd(),
    )
    top = _Table(ctx, "", data, ("daemon", "source", "target"))
    daemon = _parse_daemon(_Table(ctx, "daemon", top.get("daemon", {}), DaemonFile, "daemon"))
    if "source" not in top.raw:
        raise ctx.error("source", "missing: a [source] section (PingOne) is required")
    source = _parse_source(_Table(ctx, "source", top.raw["source"], SourceFile, "source"))
    if source.changes == "off" and "interval" not in top.get("daemon", {}):
        daemon = replace(daemon, interval=DEFAULT_INTERVAL_WITHOUT_FEED)
    targets = _parse_targets(ctx, top.raw.get("target"))
    cfg = Config(path=path, daemon=daemon, source=source, targets=targets)
    return Config(
        path=path, daemon=daemon, source=source, targets=targets, warnings=tuple(config_warnings(cfg))
    )


def config_warnings(cfg: Config) -> list[str]:
    """Problems worth a warning but not a refusal: readable secrets, everyone in scope, and so on."""
    found: list[str] = []
    literal_keys: list[str] = []
    for key, secret in _secret_items(cfg):
        if secret.origin == "literal":
            literal_keys.append(key)
        elif secret.origin.startswith("file:"):
            mode = _mode(secret.origin[len("file:") :])
            if mode is not None and mode & 0o077:
                found.append(
                    f"{key}: secret file {secret.origin[5:]} is readable by group or others "
                    f"(mode {mode:04o}); chmod 600 it or use systemd LoadCredential="
                )
    if literal_keys:
        mode = _mode(cfg.path)
        if mode is not None and mode & 0o077:
            found.append(
                f"{cfg.path} holds secrets ({', '.join(literal_keys)}) and is readable by group or "
                f"others (mode {mode:04o}); use *_file with LoadCredential= or chmod 600 it"
            )
    if cfg.daemon.http_listen is not None and not _is_loopback(_listen_host(cfg.daemon.http_listen)):
        found.append(
            f"daemon.http_listen: {cfg.daemon.http_listen} is not a loopback address: /metrics and "
            "/healthz are served without authentication"
        )
    if cfg.source.allow_insecure_http:
        for key, url in (("source.api_url", cfg.source.api_url), ("source.auth_url", cfg.source.auth_url)):
            if _insecure(url):
                found.append(
                    f"{key}: {url} is plain http to a non-loopback host: secrets travel in clear text"
                )
    for target in cfg.targets:
        where = f"target.{target.name}"
        if target.allow_insecure_http:
            for key, value in (("base_url", target.base_url), ("token_url", target.token_url)):
                if value is not None and _insecure(value):
                    found.append(
                        f"{where}.{key}: {value} is plain http to a non-loopback host: "
                        "secrets travel in clear text"
                    )
        if not target.scope.groups and target.scope.filter is None and not target.scope.everyone:
            found.append(
                f"{where}.scope: no groups and no filter: every PingOne user is in scope "
                f'(write scope = "all" to say so)'
            )
        if target.profile == "zia" and target.requests_per_second > ZIA_MAX_RPS:
            found.append(
                f"{where}.requests_per_second: {target.requests_per_second:g} is above ZIA's limit of "
                f"{ZIA_MAX_RPS:g} requests per second per tenant"
            )
    return found


def diff_configs(old: Config, new: Config) -> dict[str, Any]:
    """What a reload changes: targets added and removed, and the dotted keys whose values changed.

    Secret keys are listed by name only (their fingerprints differ); values never appear.
    """
    before, after = old.fingerprint(), new.fingerprint()
    old_targets = {t["name"]: t for t in before.pop("target")}
    new_targets = {t["name"]: t for t in after.pop("target")}
    changed: list[str] = []
    for section in ("daemon", "source"):
        _diff_into(before[section], after[section], section, changed)
    for name, target in new_targets.items():
        if name in old_targets:
            _diff_into(old_targets[name], target, f"target.{_key_text(name)}", changed)
    return {
        "targets_added": [name for name in new_targets if name not in old_targets],
        "targets_removed": [name for name in old_targets if name not in new_targets],
        "changed": changed,
    }


# --------------------------------------------------------------------------------------------
# Reading tables


# The keys each table accepts: from the one declaration in daemon.config_schema.
_DAEMON_KEYS: Final = DAEMON_KEYS
_SOURCE_KEYS: Final = SOURCE_KEYS
_TARGET_KEYS: Final = TARGET_KEYS
# Keys that belong to one auth method only.
_AUTH_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "bearer": ("token",),
    "basic": ("username", "password"),
    "oauth_client_credentials": ("token_url", "client_id", "client_secret"),
}
_SECRET_KEYS: Final = frozenset({"token", "password", "client_secret"})

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TARGET_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_ATTR = r"[A-Za-z][A-Za-z0-9_$-]*"
_SCIM_PATH = re.compile(
    rf"^(?:(?P<urn>urn:[A-Za-z0-9._:-]+):)?(?P<attr>{_ATTR})(?:\[(?P<filter>[^\[\]]+)\])?(?:\.(?P<sub>{_ATTR}))?$"
)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True, slots=True)
class _Ctx:
    path: str
    environ: Mapping[str, str]
    base_dir: str

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key or "(top)", problem)


def _key_text(key: str) -> str:
    return key if _BARE_KEY.match(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join(where: str, key: str) -> str:
    return f"{where}.{_key_text(key)}" if where else _key_text(key)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _as_float(value: int | float) -> float:
    """`float(value)`, with an integer too large for a float read as an infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _shown_int(value: object) -> str:
    """A number for an error message; an integer too long to print whole is cut."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 200:
        return ("-" if value < 0 else "") + f"an integer of {abs(value).bit_length()} bits"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown_url(value: str) -> str:
    """A URL for an error message, with any user:password@ part masked."""
    return _shown(re.sub(r"(?<=//)[^/@]*@", "***@", value))


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# What each model field is, for the messages (see `_problem`); a field of none of these kinds is
# checked by the code below with its own messages (URLs, secrets, filters, mappings, percents).
_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "daemon.log_format": LOG_FORMATS, "daemon.log_level": LOG_LEVELS, "source.region": tuple(REGIONS),
    "source.client_auth": CLIENT_AUTHS, "source.changes": CHANGE_MODES, "target.profile": PROFILE_NAMES,
    "target.auth": TARGET_AUTHS, "target.update_method": UPDATE_METHODS,
    "target.group_membership": GROUP_MEMBERSHIPS, "target.remove_action": REMOVE_ACTIONS,
    "target.membership": MEMBERSHIPS,
}
_MISSING: Final[dict[str, str]] = {
    "source.environment_id": "missing: the PingOne environment id",
    "source.client_id": "missing: the worker app's client id",
    "target.profile": f"missing: one of {', '.join(PROFILE_NAMES)}",
    "target.base_url": "missing: the SCIM base URL of the target",
}
# Keys read by code with messages of its own: secrets (`k`, `k_file`, `k_env`), the forms
# "10%" / count / table, scope = "all", group lists and mappings, mapping expressions; and the
# sub-tables, which are validated as tables of their own (`actions`, `max_deletes = { … }`).
_OWN_MESSAGES: Final = frozenset({
    "source.client_secret", "source.client_secret_file", "source.client_secret_env",
    "source.webhook_secret", "source.webhook_secret_file", "source.webhook_secret_env",
    "target.token", "target.token_file", "target.token_env", "target.password", "target.password_file",
    "target.password_env", "target.client_secret", "target.client_secret_file", "target.client_secret_env",
    "daemon.max_source_shrink", "target.max_deletes", "target.actions", "target.scope", "target.groups", "target.mapping",
    "target.scope.groups", "mapping.expr",
})


def _problem(kind: str, field: str, value: object, errors: Sequence[ErrorDetails]) -> str | None:
    """Today's message for the pydantic errors of one field (`kind` is e.g. "daemon"), or None when
    the field's own check below says it (a pattern: URL, host:port, environment id, target name)."""
    types = {error["type"] for error in errors}
    dotted = f"{kind}.{field}"
    if dotted in _OWN_MESSAGES:
        return None
    if "missing" in types:
        return _MISSING.get(dotted)
    limits = RANGES.get(dotted)
    if limits is not None and limits.unit == "s":
        return _duration_problem(value, limits, errors)
    if limits is not None:
        wanted = "an integer" if limits.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                limits.integer and not isinstance(value, int)):
            return f"expected {wanted}, got {_type_name(value)}"
        if isinstance(value, float) and math.isnan(value):
            return "must be a finite number"
        return f"{_shown_int(value)} is out of range ({limits.text()})"
    if "bool_type" in types:
        return f"expected true or false, got {_type_name(value)}"
    if not isinstance(value, str):
        return f"expected a string, got {_type_name(value)}"
    if not value.strip():
        return "must not be empty"
    if len(value) > MAX_TEXT:
        return f"longer than {MAX_TEXT} characters"
    choices = _CHOICES.get(dotted)
    if choices is not None:
        folded = value.strip().upper() if dotted == "source.region" else value.strip().lower()
        if folded in choices:   # choices are read in any case, around spaces
            return None
        shown = folded if dotted == "source.region" else value
        return f"{_shown(shown)} is not one of {', '.join(choices)}" + _suggest(folded, choices)
    return None


def _duration_problem(value: object, limits: Range, errors: Sequence[ErrorDetails]) -> str:
    for error in errors:
        if error["type"] == "duration":
            return str(error.get("ctx", {}).get("problem", "not a duration"))
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return f"expected a duration such as '5m' or seconds, got {_type_name(value)}"
    seconds = parse_duration(value) if isinstance(value, str) else _as_float(value)
    if math.isnan(seconds):
        return f"{_shown_int(value)} is not a valid number of seconds"
    if seconds == 0 and limits.low > 0:
        return "must be longer than zero"
    return f"{_shown(value) if isinstance(value, str) else _shown_int(value)} is out of range ({limits.text()})"


def _validate(ctx: _Ctx, where: str, kind: str, model: type[BaseModel], raw: dict[str, Any]) -> None:
    """Validate one table with its model from daemon.config_schema; raise the first problem as a
    ConfigError with today's text: unknown keys first, then the fields in the model's order."""
    try:
        model.model_validate(raw, strict=True)
    except ValidationError as exc:
        by_field: dict[str, list[ErrorDetails]] = {}
        for error in exc.errors():
            if error["loc"] and isinstance(error["loc"][0], str):
                by_field.setdefault(error["loc"][0], []).append(error)
        known = tuple(model.model_fields)
        for field in by_field:
            if field not in known:
                raise ctx.error(_join(where, field), "unknown key" + _suggest(field, known)) from None
        for field in known:
            if field in by_field:
                problem = _problem(kind, field, raw.get(field), by_field[field])
                if problem is not None:
                    raise ctx.error(_join(where, field), problem) from None


class _Table:
    """A TOML table being read: checked whole by its model (or, for a group reference, its keys),
    then read with getters that apply the defaults."""

    def __init__(self, ctx: _Ctx, where: str, raw: object, known: type[BaseModel] | Sequence[str],
                 kind: str = "") -> None:
        if not isinstance(raw, dict):
            raise ctx.error(where, f"expected a table, got {_type_name(raw)}")
        self.ctx = ctx
        self.where = where
        self.raw: dict[str, Any] = raw
        if isinstance(known, type):
            _validate(ctx, where, kind, known, raw)
            return
        for key in raw:
            if key not in known:
                raise ctx.error(_join(where, key), "unknown key" + _suggest(key, known))

    def key(self, key: str) -> str:
        return _join(self.where, key)

    def error(self, key: str, problem: str) -> ConfigError:
        return self.ctx.error(self.key(key), problem)

    def get(self, key: str, default: object = None) -> Any:
        return self.raw.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.raw

    def opt_string(self, key: str, *, choices: Sequence[str] = ()) -> str | None:
        if key not in self.raw:
            return None
        value = self.raw[key]
        # checked by the model, except in a group reference ({ id = "…" }) and for blank text
        problem = _problem("", key, value, [])
        if problem is not None:
            raise self.error(key, problem)
        text: str = value
        return text.strip().lower() if choices else text

    def string(self, key: str, default: str, *, choices: Sequence[str] = ()) -> str:
        value = self.opt_string(key, choices=choices)
        return default if value is None else value

    def required_string(self, key: str, what: str) -> str:
        value = self.opt_string(key)
        if value is None:
            raise self.error(key, f"missing: {what}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value: bool = self.raw.get(key, default)   # the model checked it
        return value

    def integer(self, key: str, default: int) -> int:
        value: int = self.raw.get(key, default)   # the model checked type and range
        return value

    def number(self, key: str, default: float) -> float:
        value: int | float = self.raw.get(key, default)   # the model checked type and range
        return float(value)

    def opt_duration(self, key: str) -> float | None:
        value = self.raw.get(key)   # the model checked form and range
        if value is None:
            return None
        return parse_duration(value) if isinstance(value, str) else float(value)

    def duration(self, key: str, default: float) -> float:
        value = self.opt_duration(key)
        return default if value is None else value

    def url(self, key: str, *, allow_insecure: bool, section: str) -> str | None:
        value = self.opt_string(key)
        if value is None:
            return None
        return _check_url(self, key, value, allow_insecure=allow_insecure, section=section)

    def secret(self, key: str, *, required: bool, why: str = "") -> Secret | None:
        forms = [form for form in (key, f"{key}_file", f"{key}_env") if form in self.raw]
        if len(forms) > 1:
            raise self.error(forms[1], f"set only one of {', '.join(forms)}")
        if not forms:
            if required:
                raise self.error(
                    f"{key}_file", f"missing{why}: set {key}_file (recommended), {key}_env or {key}"
                )
            return None
        form = forms[0]
        value = self.raw[form]
        if not isinstance(value, str):
            raise self.error(form, f"expected a string, got {_type_name(value)}")
        if form == key:
            return _checked_secret(self, form, value, "literal", "the value")
        if form.endswith("_env"):
            if not _ENV_NAME.match(value):
                raise self.error(form, f"{_shown(value)} is not an environment variable name")
            content = self.ctx.environ.get(value)
            if not content:
                raise self.error(form, f"environment variable {value} is not set or empty")
            return _checked_secret(self, form, content, f"env:{value}", f"${value}")
        return _read_secret_file(self, form, value)


def _checked_secret(table: _Table, key: str, value: str, origin: str, what: str) -> Secret:
    if not value:
        raise table.error(key, f"{what} is empty")
    if len(value) > MAX_SECRET_BYTES:
        raise table.error(key, f"{what} is longer than {MAX_SECRET_BYTES} characters")
    if any(ch in value for ch in "\r\n\x00"):
        raise table.error(key, f"{what} contains a line break or NUL")
    return Secret(value, origin)


def _expand(table: _Table, key: str, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _ENV_NAME.match(name):
            raise table.error(key, f"${{{name}}} is not a valid variable reference")
        value = table.ctx.environ.get(name)
        if not value:
            raise table.error(key, f"environment variable {name} is not set (used in {_shown(text)})")
        return value

    return _ENV_REF.sub(replace, text)


def _read_secret_file(table: _Table, key: str, text: str) -> Secret:
    path = _expand(table, key, text)
    if "\x00" in path:
        raise table.error(key, "path contains NUL")
    if not os.path.isabs(path):
        base = table.ctx.environ.get(CREDENTIALS_ENV) or table.ctx.base_dir
        path = os.path.join(base, path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise table.error(key, f"secret file {path} is not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise table.error(
            key, f"cannot read secret file {path}: {exc.strerror or type(exc).__name__}"
        ) from exc
    if len(data) > MAX_SECRET_BYTES:
        raise table.error(key, f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise table.error(key, f"secret file {path} is not UTF-8 text") from exc
    value = value.rstrip("\r\n")
    return _checked_secret(table, key, value, f"file:{path}", f"secret file {path}")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _insecure(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and not _is_loopback(parts.hostname or "")


def _check_url(table: _Table, key: str, value: str, *, allow_insecure: bool, section: str) -> str:
    if any(ch.isspace() for ch in value):
        raise table.error(key, f"{_shown_url(value)} contains whitespace")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise table.error(key, f"{_shown_url(value)} is not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise table.error(key, f"{_shown_url(value)}: the URL must start with https://")
    if not parts.hostname:
        raise table.error(key, f"{_shown_url(value)}: the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise table.error(key, "credentials in the URL are refused; use the auth keys")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise table.error(key, f"{_shown_url(value)}: the URL may not have a query or fragment")
    if port == 0:
        raise table.error(key, f"{_shown_url(value)}: port 0 is not valid")
    if scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise table.error(
            key,
            f"{_shown_url(value)}: http:// is allowed only to loopback hosts (127.0.0.0/8, ::1, localhost); "
            f"use https:// or set allow_insecure_http = true in {section}",
        )
    return value.rstrip("/")


def _listen_host(listen: str) -> str:
    host, _, _port = listen.rpartition(":")
    return host


def _mode(path: str) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Sections


def _parse_daemon(table: _Table) -> DaemonConfig:
    state_path = table.string("state_path", DEFAULT_STATE_PATH)
    if "\x00" in state_path:
        raise table.error("state_path", "path contains NUL")
    if state_path != ":memory:" and not os.path.isabs(state_path):
        state_path = os.path.join(table.ctx.base_dir, state_path)
    return DaemonConfig(
        state_path=state_path,
        interval=table.duration("interval", DEFAULT_INTERVAL),
        full_sync_every=table.duration("full_sync_every", DEFAULT_FULL_SYNC_EVERY),
        log_format=table.string("log_format", DEFAULT_LOG_FORMAT, choices=LOG_FORMATS),
        log_level=table.string("log_level", DEFAULT_LOG_LEVEL, choices=LOG_LEVELS),
        grace_period=table.duration("grace_period", DEFAULT_GRACE_PERIOD),
        jitter=table.duration("jitter", DEFAULT_JITTER),
        retry_backoff=table.duration("retry_backoff", DEFAULT_RETRY_BACKOFF),
        max_source_shrink=_fraction(table, "max_source_shrink", DEFAULT_MAX_SOURCE_SHRINK),
        http_listen=_listen(table, "http_listen"),
    )


def _fraction(table: _Table, key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match is None:
            raise table.error(key, f"{_shown(value)} is not a percent such as '10%'")
        number = float(match.group(1)) / 100.0
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = _as_float(value)
    else:
        raise table.error(key, f"expected a percent such as '10%' or a fraction, got {_type_name(value)}")
    if not RANGES["daemon.max_source_shrink"].holds(number):
        raise table.error(
            key,
            f"{_shown(value) if isinstance(value, str) else _shown_int(value)} is out of range: "
            "write '10%' or a fraction between 0 and 1",
        )
    return number


def _listen(table: _Table, key: str) -> str | None:
    value = table.opt_string(key)
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise table.error(key, f"{_shown(value)} is not host:port, e.g. '127.0.0.1:9477'")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if any(ch.isspace() or ch in "[]/" for ch in bare) or (":" in bare and not host.startswith("[")):
        raise table.error(key, f"{_shown(value)} is not host:port (IPv6 as '[::1]:9477')")
    if ":" in bare:
        try:
            ipaddress.IPv6Address(bare)
        except ValueError as exc:
            raise table.error(key, f"{_shown(value)}: {bare!r} is not an IPv6 address") from exc
    return value


def _parse_source(table: _Table) -> SourceConfig:
    insecure = table.boolean("allow_insecure_http", False)
    region = table.string("region", DEFAULT_REGION).strip().upper()   # the model checked it
    api_url = table.url("api_url", allow_insecure=insecure, section="[source]")
    auth_url = table.url("auth_url", allow_insecure=insecure, section="[source]")
    if (api_url is None) != (auth_url is None):
        missing = "auth_url" if auth_url is None else "api_url"
        raise table.error(missing, "api_url and auth_url are set together, or neither (the region decides)")
    if api_url is None or auth_url is None:
        api_url, auth_url = REGIONS[region]
    environment_id = table.required_string("environment_id", "the PingOne environment id")
    if not _ENV_ID.match(environment_id):
        raise table.error("environment_id", f"{_shown(environment_id)} is not an environment id")
    client_id = table.required_string("client_id", "the worker app's client id")
    secret = table.secret("client_secret", required=True)
    assert secret is not None
    return SourceConfig(
        environment_id=environment_id,
        client_id=client_id,
        client_secret=secret,
        region=region,
        api_url=api_url,
        auth_url=auth_url,
        client_auth=table.string("client_auth", DEFAULT_CLIENT_AUTH, choices=CLIENT_AUTHS),
        page_size=table.integer("page_size", DEFAULT_SOURCE_PAGE_SIZE),
        timeout=table.duration("timeout", DEFAULT_TIMEOUT),
        allow_insecure_http=insecure,
        **_parse_changes(table),
    )


def _parse_changes(table: _Table) -> dict[str, Any]:
    """`changes`, `change_poll_interval` and the webhook's shared secret (`webhook_secret[_file|_env]`)."""
    changes = table.string("changes", DEFAULT_CHANGES, choices=CHANGE_MODES)
    webhook = changes == "webhook"
    return {
        "changes": changes,
        "change_poll_interval": table.duration("change_poll_interval", DEFAULT_CHANGE_POLL_INTERVAL),
        "webhook_secret": table.secret("webhook_secret", required=webhook,
                                       why=" (changes = \"webhook\" needs the shared secret)"),
    }


def _parse_targets(ctx: _Ctx, raw: object) -> tuple[TargetConfig, ...]:
    if raw is None:
        raise ctx.error("target", "missing: at least one [[target]] is required")
    if not isinstance(raw, list):
        raise ctx.error("target", f"expected an array of tables ([[target]]), got {_type_name(raw)}")
    if not raw:
        raise ctx.error("target", "at least one [[target]] is required")
    targets: list[TargetConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        target = _parse_target(ctx, index, entry)
        if target.name in seen:
            raise ctx.error(
                f"target[{index}].name",
                f"duplicate target name {target.name!r} (also target[{seen[target.name]}])",
            )
        seen[target.name] = index
        targets.append(target)
    return tuple(targets)


def _parse_target(ctx: _Ctx, index: int, raw: object) -> TargetConfig:
    if not isinstance(raw, dict):
        raise ctx.error(f"target[{index}]", f"expected a table, got {_type_name(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _TARGET_NAME.match(name):
        key = f"target[{index}].name"
        if name is None:
            raise ctx.error(key, "missing: every target needs a name ([a-z0-9_-]+)")
        if not isinstance(name, str):
            raise ctx.error(key, f"expected a string, got {_type_name(name)}")
        raise ctx.error(key, f"{_shown(name)} must match [a-z0-9_-]+ (at most 64 characters)")
    table = _Table(ctx, f"target.{name}", raw, TargetFile, "target")

    profile_name = table.opt_string("profile", choices=PROFILE_NAMES)
    if profile_name is None:
        raise table.error("profile", f"missing: one of {', '.join(PROFILE_NAMES)}")
    profile = PROFILES[profile_name]
    insecure = table.boolean("allow_insecure_http", False)
    section = f"this [[target]] ({name})"
    base_url = table.url("base_url", allow_insecure=insecure, section=section)
    if base_url is None:
        raise table.error("base_url", "missing: the SCIM base URL of the target")

    auth = table.string("auth", DEFAULT_TARGET_AUTH, choices=TARGET_AUTHS)
    for other, keys in _AUTH_KEYS.items():
        if other == auth:
            continue
        for key in keys:
            variants = (key, f"{key}_file", f"{key}_env") if key in _SECRET_KEYS else (key,)
            for variant in variants:
                if table.has(variant):
                    raise table.error(
                        variant, f'only used with auth = "{other}" (this target has auth = "{auth}")'
                    )
    why = f' (auth = "{auth}")'
    token = password = client_secret = None
    username = token_url = client_id = None
    if auth == "bearer":
        token = table.secret("token", required=True, why=why)
    elif auth == "basic":
        username = table.required_string("username", f"the user name{why}")
        password = table.secret("password", required=True, why=why)
    else:
        token_url = table.url("token_url", allow_insecure=insecure, section=section)
        if token_url is None:
            raise table.error("token_url", f"missing: the OAuth token endpoint{why}")
        client_id = table.required_string("client_id", f"the OAuth client id{why}")
        client_secret = table.secret("client_secret", required=True, why=why)

    requests_per_second = table.number("requests_per_second", profile.requests_per_second)
    remove_action = table.string("remove_action", profile.remove_action, choices=REMOVE_ACTIONS)
    delete_after = table.opt_duration("delete_after")
    if remove_action == "disable_then_delete" and delete_after is None:
        raise table.error(
            "delete_after", 'missing: required with remove_action = "disable_then_delete", e.g. "7d"'
        )
    if remove_action != "disable_then_delete" and delete_after is not None:
        raise table.error("delete_after", 'only used with remove_action = "disable_then_delete"')

    return TargetConfig(
        name=name,
        profile=profile_name,
        base_url=base_url,
        auth=auth,
        token=token,
        username=username,
        password=password,
        token_url=token_url,
        client_id=client_id,
        client_secret=client_secret,
        update_method=table.string("update_method", profile.update_method, choices=UPDATE_METHODS),
        match_filter=_match_filter(table, "match_filter", DEFAULT_MATCH_FILTER),
        group_match_filter=_match_filter(table, "group_match_filter", DEFAULT_GROUP_MATCH_FILTER),
        group_membership=table.string(
            "group_membership", DEFAULT_GROUP_MEMBERSHIP, choices=GROUP_MEMBERSHIPS
        ),
        concurrency=table.integer("concurrency", profile.concurrency),
        requests_per_second=requests_per_second,
        burst=table.number("burst", max(1.0, requests_per_second)),
        page_size=table.integer("page_size", profile.page_size),
        membership_batch=table.integer("membership_batch", profile.membership_batch),
        remove_action=remove_action,
        delete_after=delete_after,
        max_deletes=_max_deletes(table, "max_deletes"),
        actions=_actions(table, "actions"),
        groups=_group_refs(table, table.key("groups"), table.get("groups", [])),
        membership=table.string("membership", DEFAULT_MEMBERSHIP, choices=MEMBERSHIPS),
        scope=_scope(table, "scope"),
        mapping=_mapping(table, "mapping", profile),
        create_only=_create_only(table, "mapping"),
        require_email_username=table.boolean("require_email_username", profile.require_email_username),
        timeout=table.duration("timeout", DEFAULT_TIMEOUT),
        full_sync_every=table.opt_duration("full_sync_every"),
        allow_insecure_http=insecure,
        active_false_deletes=table.boolean("active_false_deletes", profile.active_false_deletes),
        username_mutable=(table.boolean("username_mutable", True) if table.has("username_mutable") else None),
        max_groups_per_user=(table.integer("max_groups_per_user", 1)
                             if table.has("max_groups_per_user") else None),
    )


def _parse_filter(text: str) -> str | None:
    """Parse a SCIM filter; return the parser's complaint, or None when it parses."""
    try:
        SCIMParser().parse(SCIMLexer().tokenize(text))
    except Exception as exc:  # third-party parser: any failure means "not a valid filter"
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _match_filter(table: _Table, key: str, default: str) -> str:
    value = table.string(key, default)
    if value.count("%s") != 1 or value.count("%") != 1:
        raise table.error(
            key, f"{_shown(value)} must contain exactly one %s (the value looked up) and no other %"
        )
    problem = _parse_filter(value.replace("%s", "ada@example.com"))
    if problem is not None:
        raise table.error(key, f"{_shown(value)} is not a valid SCIM filter: {problem}")
    return value


def _max_deletes(table: _Table, key: str) -> MaxDeletes:
    value = table.get(key, DEFAULT_MAX_DELETES)
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match is None:
            raise table.error(key, f"{_shown(value)} is not a percent such as '10%' (or write a count: 50)")
        percent = float(match.group(1))
        if not RANGES["target.max_deletes.percent"].holds(percent):
            raise table.error(key, f"{_shown(value)} is above 100%")
        return MaxDeletes(percent=percent)
    if isinstance(value, int) and not isinstance(value, bool):
        limits = RANGES["target.max_deletes.count"]
        if not limits.holds(value):
            raise table.error(key, f"{_shown_int(value)} is out of range ({limits.text()})")
        return MaxDeletes(count=value)
    if isinstance(value, dict):  # both limits: the lower one wins
        sub = _Table(table.ctx, table.key(key), value, MaxDeletesFile, "target.max_deletes")
        both_count = (
            sub.integer("count", MAX_DELETES_COUNT)
            if sub.has("count")
            else None
        )
        both_percent = (
            sub.number("percent", 100.0) if sub.has("percent") else None
        )
        if both_count is None and both_percent is None:
            raise table.error(key, "set count, percent or both")
        return MaxDeletes(count=both_count, percent=both_percent)
    raise table.error(key, f"expected a count (50) or a percent ('10%'), got {_type_name(value)}")


def _actions(table: _Table, key: str) -> Actions:
    sub = _Table(table.ctx, table.key(key), table.get(key, {}), ActionsFile, "actions")
    return Actions(
        create=sub.boolean("create", True),
        update=sub.boolean("update", True),
        disable=sub.boolean("disable", True),
        deprovision=sub.boolean("deprovision", True),
    )


def _group_refs(table: _Table, where: str, raw: object) -> tuple[GroupRef, ...]:
    if not isinstance(raw, list):
        raise table.ctx.error(
            where, f'expected an array of group names or {{ id = "…" }}, got {_type_name(raw)}'
        )
    refs: list[GroupRef] = []
    for index, entry in enumerate(raw):
        at = f"{where}[{index}]"
        if isinstance(entry, str):
            if not entry.strip() or len(entry) > MAX_TEXT:
                raise table.ctx.error(at, "a group name must be a non-empty string")
            ref = GroupRef(name=entry)
        elif isinstance(entry, dict):
            sub = _Table(table.ctx, at, entry, GROUP_REF_KEYS)
            if sum(sub.has(key) for key in GROUP_REF_KEYS) != 1:
                raise table.ctx.error(at, 'write exactly one of { id = "…" }, { name = "…" }, { prefix = "…" } '
                                          'or { filter = "…" }')
            ref = GroupRef(name=sub.opt_string("name"), id=sub.opt_string("id"), prefix=sub.opt_string("prefix"),
                           filter=sub.opt_string("filter"))
            if ref.filter is not None:
                _check_group_rule(sub, ref.filter)
        else:
            raise table.ctx.error(at, f'expected a group name or {{ id = "…" }}, got {_type_name(entry)}')
        if ref in refs:
            raise table.ctx.error(at, "listed twice")
        refs.append(ref)
    return tuple(refs)




def _check_group_rule(sub: _Table, text: str) -> None:
    """A group rule's filter must parse and use what provisiond evaluates over a PingOne group."""
    from daemon.pingone_filter import GROUP_RULE_DIALECT, UnsupportedFilter, compile_filter

    try:
        compile_filter(text, GROUP_RULE_DIALECT)
    except UnsupportedFilter as exc:
        raise sub.error("filter", f"{_shown(text)} is not a valid group filter: {exc.detail}") from exc


def _scope(table: _Table, key: str) -> Scope:
    raw = table.get(key, {})
    if isinstance(raw, str):
        if raw.strip().lower() != SCOPE_ALL:
            raise table.error(
                key, f'{_shown(raw)}: write scope = "all" or a table {{ groups = [...], filter = "..." }}'
            )
        return Scope(everyone=True)
    sub = _Table(table.ctx, table.key(key), raw, ScopeFile, "target.scope")
    groups = _group_refs(table, sub.key("groups"), sub.get("groups", []))
    text = sub.opt_string("filter")
    if text is not None:
        problem = _parse_filter(text)
        if problem is not None:
            raise sub.error("filter", f"{_shown(text)} is not a valid SCIM filter: {problem}")
    return Scope(groups=groups, filter=text)


def _flatten(
    ctx: _Ctx, where: str, raw: Mapping[str, Any], prefix: str, out: list[tuple[str, object]]
) -> None:
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and MAPPING_EXPR in value:   # { expr = "…", create_only = true }
            out.append((path, value))
        elif isinstance(value, dict):  # name.givenName = "…" written without quotes is a nested table
            if prefix:
                raise ctx.error(_join(where, path), "too deeply nested; quote the attribute path")
            _flatten(ctx, where, value, path, out)
        else:
            out.append((path, value))


def _mapping(table: _Table, key: str, profile: ProfileDefaults) -> tuple[tuple[str, str], ...]:
    raw = table.get(key, {})
    where = table.key(key)
    if not isinstance(raw, dict):
        raise table.ctx.error(
            where, f"expected a table of SCIM attribute = JMESPath expression, got {_type_name(raw)}"
        )
    entries: list[tuple[str, object]] = []
    _flatten(table.ctx, where, raw, "", entries)
    merged: dict[str, tuple[str, str]] = {path.lower(): (path, expr) for path, expr in profile.mapping}
    seen: set[str] = set()
    for path, value in entries:
        at = _join(where, path)
        folded = path.lower()
        if folded in seen:
            raise table.ctx.error(at, "mapped twice (attribute names are case-insensitive)")
        seen.add(folded)
        _check_scim_path(table.ctx, at, path)
        if value is False:
            merged.pop(folded, None)
            continue
        if isinstance(value, dict):
            value = _mapping_entry(table.ctx, at, value)
        if not isinstance(value, str):
            raise table.ctx.error(
                at, f"expected a JMESPath expression (string) or false, got {_type_name(value)}"
            )
        _check_expression(table.ctx, at, value)
        spelled = merged[folded][0] if folded in merged else path
        merged[folded] = (spelled, value)
    if "username" not in merged:
        raise table.ctx.error(_join(where, "userName"), "userName must be mapped")
    return tuple(merged.values())


MAPPING_EXPR = "expr"
MAPPING_CREATE_ONLY = "create_only"


def _mapping_entry(ctx: _Ctx, at: str, raw: dict[str, Any]) -> object:
    """`{ expr = "…", create_only = true }`: the expression (checked by the caller)."""
    sub = _Table(ctx, at, raw, MappingEntry, "mapping")
    sub.boolean(MAPPING_CREATE_ONLY, False)
    return raw[MAPPING_EXPR]


def _create_only(table: _Table, key: str) -> frozenset[str]:
    """The mapped paths marked `create_only = true` (spelled as the mapping keeps them);
    `_mapping` has validated the table already."""
    raw = table.get(key, {})
    if not isinstance(raw, dict):
        return frozenset()
    entries: list[tuple[str, object]] = []
    _flatten(table.ctx, table.key(key), raw, "", entries)
    marked = {path.lower() for path, value in entries
              if isinstance(value, dict) and value.get(MAPPING_CREATE_ONLY) is True}
    if not marked:
        return frozenset()
    if "username" in marked:
        raise table.ctx.error(_join(table.key(key), "userName"), "userName cannot be create_only: it identifies "
                              "the user in the target")
    return frozenset(marked)


def _check_scim_path(ctx: _Ctx, at: str, path: str) -> None:
    match = _SCIM_PATH.match(path)
    if match is None:
        raise ctx.error(
            at, 'not a SCIM attribute path (e.g. userName, name.givenName, emails[type eq "work"].value)'
        )
    if match.group("urn") is None and match.group("attr").lower() in UNMAPPABLE:
        raise ctx.error(at, f"{match.group('attr')} cannot be mapped: provisiond or the server owns it")
    value_filter = match.group("filter")
    if value_filter is not None:
        problem = _parse_filter(value_filter)
        if problem is not None:
            raise ctx.error(at, f"the value filter [{value_filter}] is not a valid SCIM filter: {problem}")


def _check_expression(ctx: _Ctx, at: str, expr: str) -> None:
    if not expr.strip() or len(expr) > MAX_TEXT:
        raise ctx.error(at, "the expression must be a non-empty string")
    try:
        compiled = jmespath.compile(expr)
    except Exception as exc:  # jmespath raises several error types, some not JMESPathError
        raise ctx.error(at, f"{_shown(expr)} is not a valid JMESPath expression: {_first_line(exc)}") from exc
    try:
        compiled.search(_SAMPLE_USER)
    except Exception as exc:  # unknown function, wrong arity or types on a complete user
        raise ctx.error(at, f"{_shown(expr)} fails on a sample user: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Plain data (masked, fingerprint) and diffs


def _secret_items(cfg: Config) -> Iterator[tuple[str, Secret]]:
    yield "source.client_secret", cfg.source.client_secret
    if cfg.source.webhook_secret is not None:
        yield "source.webhook_secret", cfg.source.webhook_secret
    for target in cfg.targets:
        for key in ("token", "password", "client_secret"):
            secret = getattr(target, key)
            if isinstance(secret, Secret):
                yield f"target.{target.name}.{key}", secret


def _refs_plain(refs: Sequence[GroupRef]) -> list[Any]:
    def plain(ref: GroupRef) -> Any:
        if ref.name is not None:
            return ref.name
        if ref.prefix is not None:
            return {"prefix": ref.prefix}
        if ref.filter is not None:
            return {"filter": ref.filter}
        return {"id": ref.id}

    return [plain(ref) for ref in refs]


def _plain(cfg: Config, show: Callable[[Secret], str]) -> dict[str, Any]:
    daemon = cfg.daemon
    daemon_plain: dict[str, Any] = {
        "state_path": daemon.state_path,
        "interval": format_duration(daemon.interval),
        "full_sync_every": format_duration(daemon.full_sync_every),
        "log_format": daemon.log_format,
        "log_level": daemon.log_level,
        "grace_period": format_duration(daemon.grace_period),
        "jitter": format_duration(daemon.jitter),
        "retry_backoff": format_duration(daemon.retry_backoff),
        "max_source_shrink": daemon.max_source_shrink,
    }
    if daemon.http_listen is not None:
        daemon_plain["http_listen"] = daemon.http_listen
    source = cfg.source
    source_plain: dict[str, Any] = {
        "region": source.region,
        "api_url": source.api_url,
        "auth_url": source.auth_url,
        "environment_id": source.environment_id,
        "client_id": source.client_id,
        "client_auth": source.client_auth,
        "client_secret": show(source.client_secret),
        "page_size": source.page_size,
        "timeout": format_duration(source.timeout),
        "allow_insecure_http": source.allow_insecure_http,
        "changes": source.changes,
        "change_poll_interval": format_duration(source.change_poll_interval),
    }
    if source.webhook_secret is not None:
        source_plain["webhook_secret"] = show(source.webhook_secret)
    return {
        "daemon": daemon_plain,
        "source": source_plain,
        "target": [_target_plain(t, show) for t in cfg.targets],
    }


def _target_plain(target: TargetConfig, show: Callable[[Secret], str]) -> dict[str, Any]:
    plain: dict[str, Any] = {
        "name": target.name,
        "profile": target.profile,
        "base_url": target.base_url,
        "auth": target.auth,
    }
    optional: dict[str, Any] = {
        "token": target.token,
        "username": target.username,
        "password": target.password,
        "token_url": target.token_url,
        "client_id": target.client_id,
        "client_secret": target.client_secret,
    }
    for key, value in optional.items():
        if value is not None:
            plain[key] = show(value) if isinstance(value, Secret) else value
    limits = target.max_deletes
    max_deletes: Any
    if limits.count is not None and limits.percent is None:
        max_deletes = limits.count
    elif limits.percent is not None and limits.count is None:
        max_deletes = f"{limits.percent:g}%"
    elif limits.count is not None and limits.percent is not None:
        max_deletes = {"count": limits.count, "percent": limits.percent}
    else:
        max_deletes = "100%"
    scope: Any
    if target.scope.everyone:
        scope = SCOPE_ALL
    else:
        scope = {"groups": _refs_plain(target.scope.groups)}
        if target.scope.filter is not None:
            scope["filter"] = target.scope.filter
    mapping: dict[str, Any] = {path: ({MAPPING_EXPR: expr, MAPPING_CREATE_ONLY: True}
                                      if path.lower() in target.create_only else expr)
                               for path, expr in target.mapping}
    present = {path.lower() for path, _ in target.mapping}
    profile = PROFILES.get(target.profile)
    for path, _expr in profile.mapping if profile else ():
        if path.lower() not in present:
            mapping[path] = False  # a profile default the file switched off
    plain.update(
        {
            "update_method": target.update_method,
            "match_filter": target.match_filter,
            "group_match_filter": target.group_match_filter,
            "group_membership": target.group_membership,
            "concurrency": target.concurrency,
            "requests_per_second": target.requests_per_second,
            "burst": target.burst,
            "page_size": target.page_size,
            "membership_batch": target.membership_batch,
            "remove_action": target.remove_action,
        }
    )
    if target.delete_after is not None:
        plain["delete_after"] = format_duration(target.delete_after)
    plain.update(
        {
            "max_deletes": max_deletes,
            "actions": {
                "create": target.actions.create,
                "update": target.actions.update,
                "disable": target.actions.disable,
                "deprovision": target.actions.deprovision,
            },
            "groups": _refs_plain(target.groups),
            "membership": target.membership,
            "scope": scope,
            "mapping": mapping,
            "require_email_username": target.require_email_username,
            "timeout": format_duration(target.timeout),
        }
    )
    if target.full_sync_every is not None:
        plain["full_sync_every"] = format_duration(target.full_sync_every)
    plain["allow_insecure_http"] = target.allow_insecure_http
    plain["active_false_deletes"] = target.active_false_deletes
    if target.username_mutable is not None:
        plain["username_mutable"] = target.username_mutable
    if target.max_groups_per_user is not None:
        plain["max_groups_per_user"] = target.max_groups_per_user
    return plain


def _diff_into(before: Mapping[str, Any], after: Mapping[str, Any], where: str, out: list[str]) -> None:
    keys = list(before) + [key for key in after if key not in before]
    for key in keys:
        old, new = before.get(key), after.get(key)
        at = f"{where}.{_key_text(key)}"
        if isinstance(old, dict) and isinstance(new, dict):
            _diff_into(old, new, at, out)
        elif old != new:
            out.append(at)
