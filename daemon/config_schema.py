# mypy: disable-error-code="valid-type"
"""The configuration file's shape, declared once: keys, types, choices and numeric ranges.

Pydantic v2 models of the TOML file as written (before secrets are resolved and defaults
applied). Two things are derived from them:

- `json_schema()`: a JSON Schema (draft 2020-12) for editors (`provisiond config-schema`,
  `config/provisiond.schema.json`, referenced from the example configs with `#:schema`);
- in `daemon.config`: the validation itself. Each table of the file (`[daemon]`, `[source]`, each
  `[[target]]`, `actions`, `max_deletes = { … }`, `scope = { … }`, a mapping `{ expr = … }`) is
  validated by its model here (strict: TOML's own types, no coercion); `daemon.config` translates
  pydantic's errors into its messages (file, key, problem) and keeps what the models do not say:
  cross-key rules (auth methods, `delete_after` with `remove_action`), URLs (scheme, loopback,
  TLS), secrets, the percent forms, SCIM filters and JMESPath expressions. Durations are parsed by
  the models too (`_seconds`, validation only): the schema keeps the string form, so editors
  check a duration string's form and the loader also its range (tests/test_config_schema.py
  fuzzes the two against each other).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from daemon.durations import DurationError, format_duration, parse_duration

SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID: Final = "https://github.com/provisiond/provisiond/config/provisiond.schema.json"

# -- choices ------------------------------------------------------------------------------------

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
Region = Literal["NA", "CA", "EU", "AU", "SG", "AP"]
ClientAuth = Literal["basic", "post"]
ProfileName = Literal["zpa", "zia", "generic"]
TargetAuth = Literal["bearer", "basic", "oauth_client_credentials"]
UpdateMethod = Literal["patch", "put"]
GroupMembership = Literal["overwrite", "merge"]
RemoveAction = Literal["disable", "delete", "disable_then_delete"]
Membership = Literal["transitive", "direct"]
ChangeMode = Literal["poll", "webhook", "off"]

LOG_FORMATS: Final[tuple[str, ...]] = get_args(LogFormat)
LOG_LEVELS: Final[tuple[str, ...]] = get_args(LogLevel)
REGION_NAMES: Final[tuple[str, ...]] = get_args(Region)
CLIENT_AUTHS: Final[tuple[str, ...]] = get_args(ClientAuth)
PROFILE_NAMES: Final[tuple[str, ...]] = get_args(ProfileName)
TARGET_AUTHS: Final[tuple[str, ...]] = get_args(TargetAuth)
UPDATE_METHODS: Final[tuple[str, ...]] = get_args(UpdateMethod)
GROUP_MEMBERSHIPS: Final[tuple[str, ...]] = get_args(GroupMembership)
REMOVE_ACTIONS: Final[tuple[str, ...]] = get_args(RemoveAction)
MEMBERSHIPS: Final[tuple[str, ...]] = get_args(Membership)
CHANGE_MODES: Final[tuple[str, ...]] = get_args(ChangeMode)


# -- numeric ranges -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Range:
    """The documented range of one numeric key: `low..high`, both included unless `low_open`.

    `unit` is "s" for durations (shown as durations, e.g. "1s..7d") and "" for plain numbers.
    """

    low: float
    high: float
    unit: str = ""
    low_open: bool = False
    integer: bool = False

    def holds(self, value: float) -> bool:
        """Whether `value` is in range (a NaN or an infinity never is; an int of any size is exact)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if value > self.high:
            return False
        return value > self.low if self.low_open else value >= self.low

    def show(self, value: float) -> str:
        """`value` written like the range's bounds ("7d", "1024", "0.5")."""
        if self.unit == "s" and math.isfinite(value) and 0 <= value <= 1e12:
            return format_duration(value)
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:g}"

    def text(self) -> str:
        """ "1s..7d", "1..1024", "above 0, at most 100000": how README and errors write it."""
        if self.low_open:
            return f"above {self.show(self.low)}, at most {self.show(self.high)}"
        return f"{self.show(self.low)}..{self.show(self.high)}"


DAY: Final = 86400.0

# Every numeric key and its range. Durations are float seconds. A key of every target is "target.KEY".
RANGES: Final[dict[str, Range]] = {
    "daemon.interval": Range(1.0, 7 * DAY, "s"),
    "daemon.full_sync_every": Range(1.0, 365 * DAY, "s"),
    "daemon.grace_period": Range(0.0, 3600.0, "s"),
    "daemon.jitter": Range(0.0, DAY, "s"),
    "daemon.retry_backoff": Range(1.0, 3600.0, "s"),
    "daemon.max_source_shrink": Range(0.0, 1.0),
    "source.page_size": Range(1, 1000, integer=True),
    "source.timeout": Range(0.1, 3600.0, "s"),
    "source.change_poll_interval": Range(1.0, 3600.0, "s"),
    "target.concurrency": Range(1, 1024, integer=True),
    "target.requests_per_second": Range(0.0, 100000.0, low_open=True),
    "target.burst": Range(1.0, 1000000.0),
    "target.page_size": Range(1, 1000, integer=True),
    "target.membership_batch": Range(1, 10000, integer=True),
    "target.delete_after": Range(1.0, 365 * DAY, "s"),
    "target.max_deletes.count": Range(0, 10**9, integer=True),
    "target.max_deletes.percent": Range(0.0, 100.0),
    "target.timeout": Range(0.1, 3600.0, "s"),
    "target.full_sync_every": Range(1.0, 365 * DAY, "s"),
    "target.max_groups_per_user": Range(1, 1_000_000, integer=True),
}

# Strings the parser reads (see daemon.durations and daemon.config): the schema says the same.
DURATION_PATTERN: Final = r"^\s*(0|(\d+(\.\d+)?\s*(ms|w|d|h|m|s)\s*)+)$"
PERCENT_PATTERN: Final = r"^\s*\d+(\.\d+)?\s*%\s*$"
TARGET_NAME_PATTERN: Final = r"^[a-z0-9_-]{1,64}$"
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENVIRONMENT_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,128}$"
URL_PATTERN: Final = r"^[hH][tT][tT][pP][sS]?://[^\s]+$"
LISTEN_PATTERN: Final = r"^(\[[0-9A-Fa-f:.]+\]|[^\s\[\]/:]+):[0-9]{1,5}$"
MAX_TEXT: Final = 4096


def _number(key: str, description: str) -> Any:
    """A plain number (integer keys: an integer) in the range RANGES[key]."""
    limits = RANGES[key]
    bounds: dict[str, float] = {"le": limits.high}
    bounds["gt" if limits.low_open else "ge"] = limits.low
    kind = int if limits.integer else float
    return Annotated[kind, Field(description=f"{description} ({limits.text()})", **bounds)]  # type: ignore[call-overload]


def _seconds(value: object) -> object:
    """A duration string read as float seconds (validation only: the schema keeps the string form).

    A string that is not a duration fails as `duration`, with daemon.durations' text in ctx["problem"].
    """
    if not isinstance(value, str):
        return value
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise PydanticCustomError("duration", "{problem}", {"problem": str(exc)}) from exc


def _duration(key: str, description: str) -> Any:
    """A duration string ("90s", "5m", "1h30m") or a number of seconds, in the range RANGES[key]."""
    limits = RANGES[key]
    bounds: dict[str, float] = {"le": limits.high}
    bounds["gt" if limits.low_open else "ge"] = limits.low
    seconds = Annotated[float, Field(**bounds)]
    text = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=64)]
    return Annotated[seconds | text, BeforeValidator(_seconds), Field(description=f"{description} ({limits.text()}): a duration "
                                                       "such as \"90s\", \"5m\", \"1h30m\", \"7d\", or seconds")]


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Url = Annotated[str, Field(pattern=URL_PATTERN, max_length=MAX_TEXT)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]
Percent = Annotated[str, Field(pattern=PERCENT_PATTERN)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)   # built when the schema is asked for


class DaemonFile(_Table):
    """`[daemon]`: scheduling, state file, logging, stop and health settings."""

    state_path: Text | None = Field(None, description="SQLite state file; relative to the config file")
    interval: _duration("daemon.interval", "Time between the starts of two full cycles, the change feed's "
                                           "backstop (default 24h; 5m when [source] changes = \"off\")") = None
    full_sync_every: _duration("daemon.full_sync_every", "How often each target is re-read whole") = None
    log_format: LogFormat | None = Field(None, description="json (journald, jq) or console")
    log_level: LogLevel | None = None
    grace_period: _duration("daemon.grace_period", "On SIGTERM: how long in-flight requests may take") = None
    jitter: _duration("daemon.jitter", "Random delay added to each interval") = None
    retry_backoff: _duration(
        "daemon.retry_backoff", "First wait before a failed target or an incomplete snapshot is tried again "
                                "(doubling)") = None
    max_source_shrink: (
        Annotated[float, Field(ge=0.0, le=1.0)] | Percent | None
    ) = Field(None, description="A snapshot this much smaller than the last good one removes nothing: "
                                "a fraction (0..1) or a percent (\"10%\")")
    http_listen: Annotated[str, Field(pattern=LISTEN_PATTERN)] | None = Field(
        None, description="Serve /healthz and /metrics on host:port (no authentication: keep it on loopback)")


class SourceFile(_Table):
    """`[source]`: the PingOne environment and the worker app that reads it."""

    region: Region | None = Field(None, description="PingOne region; sets api_url and auth_url")
    api_url: Url | None = Field(None, description="API base including /v1 (set with auth_url, or neither)")
    auth_url: Url | None = Field(None, description="Auth base without the environment id")
    environment_id: Annotated[str, Field(pattern=ENVIRONMENT_ID_PATTERN)] = Field(
        description="The PingOne environment id")
    client_id: Text = Field(description="The worker app's client id")
    client_auth: ClientAuth | None = Field(None, description="How the worker app authenticates")
    client_secret: Text | None = Field(None, description="Literal secret: sandbox only")
    client_secret_file: Text | None = Field(None, description="File holding the secret (${VAR} expanded; "
                                                              "relative to $CREDENTIALS_DIRECTORY)")
    client_secret_env: EnvName | None = Field(None, description="Environment variable holding the secret")
    page_size: _number("source.page_size", "Users per page when listing PingOne") = None
    timeout: _duration("source.timeout", "Per-request timeout") = None
    allow_insecure_http: bool | None = Field(None, description="Allow http:// to a non-loopback host")
    changes: ChangeMode | None = Field(None, description="How changes between full snapshots are learnt: "
                                                         "poll (audit activities), webhook or off")
    change_poll_interval: _duration("source.change_poll_interval", "How often the audit activities are read") = None
    webhook_secret: Text | None = Field(None, description="With changes = \"webhook\": the shared secret, "
                                                          "literal: sandbox only")
    webhook_secret_file: Text | None = None
    webhook_secret_env: EnvName | None = None


class ActionsFile(_Table):
    """The four action switches of a target."""

    create: bool | None = None
    update: bool | None = None
    disable: bool | None = None
    deprovision: bool | None = None


class MaxDeletesFile(_Table):
    """Both limits; the lower wins."""

    count: _number("target.max_deletes.count", "Removals allowed per cycle") = None
    percent: _number("target.max_deletes.percent", "Percent of the managed users") = None


class GroupById(_Table):
    id: Text = Field(description="A PingOne group id")


class GroupByName(_Table):
    name: Text = Field(description="A PingOne group name")


class GroupByPrefix(_Table):
    prefix: Text = Field(description="Every PingOne group whose name starts with this")


class GroupByFilter(_Table):
    filter: Text = Field(description='Every PingOne group matching this SCIM filter, e.g. name sw "ZPA-"')


GroupRefFile = Text | GroupById | GroupByName | GroupByPrefix | GroupByFilter


class ScopeFile(_Table):
    """Members of `groups` and/or users matching `filter` (a SCIM filter over PingOne users)."""

    groups: list[GroupRefFile] | None = None
    filter: Text | None = None


class MappingEntry(_Table):
    """`{ expr = "…", create_only = true }`: sent in the POST only."""

    expr: Text
    create_only: bool | None = None


MappingValue = Text | Literal[False] | MappingEntry


class TargetFile(_Table):
    """One `[[target]]`: a SCIM service provider with its profile, auth, rules and limits."""

    name: Annotated[str, Field(pattern=TARGET_NAME_PATTERN)] = Field(
        description="Unique name: logs, status, --target, metrics")
    profile: ProfileName = Field(description="Defaults and quirks for that kind of server")
    base_url: Url = Field(description="The SCIM base URL")
    auth: TargetAuth | None = None
    token: Text | None = Field(None, description="Bearer token, literal: sandbox only")
    token_file: Text | None = None
    token_env: EnvName | None = None
    username: Text | None = Field(None, description="For auth = \"basic\"")
    password: Text | None = None
    password_file: Text | None = None
    password_env: EnvName | None = None
    token_url: Url | None = Field(None, description="For auth = \"oauth_client_credentials\"")
    client_id: Text | None = None
    client_secret: Text | None = None
    client_secret_file: Text | None = None
    client_secret_env: EnvName | None = None
    update_method: UpdateMethod | None = None
    match_filter: Text | None = Field(None, description="SCIM filter finding an existing user; %s = userName")
    group_match_filter: Text | None = Field(None, description="SCIM filter finding an existing group")
    group_membership: GroupMembership | None = None
    concurrency: _number("target.concurrency", "Requests in flight at once") = None
    requests_per_second: _number("target.requests_per_second", "Request rate limit") = None
    burst: _number("target.burst", "Requests the rate limit allows at once") = None
    page_size: _number("target.page_size", "Objects per page when reading the target") = None
    membership_batch: _number("target.membership_batch", "Members per group PATCH operation") = None
    remove_action: RemoveAction | None = None
    delete_after: _duration("target.delete_after", "With disable_then_delete: wait before DELETE") = None
    max_deletes: (
        _number("target.max_deletes.count", "A count") | Percent | MaxDeletesFile | None
    ) = Field(None, description="Removals above this per cycle are held: a count (50), a percent "
                                "(\"10%\") or { count = 50, percent = 10 }")
    actions: ActionsFile | None = None
    groups: list[GroupRefFile] | None = Field(None, description="PingOne groups pushed to the target")
    membership: Membership | None = None
    scope: Literal["all"] | ScopeFile | None = None
    mapping: dict[str, MappingValue | dict[str, MappingValue]] | None = Field(
        None, description="SCIM attribute path = JMESPath expression over the PingOne user (or false)")
    require_email_username: bool | None = None
    timeout: _duration("target.timeout", "Per-request timeout") = None
    full_sync_every: _duration("target.full_sync_every", "Overrides daemon.full_sync_every") = None
    allow_insecure_http: bool | None = None
    active_false_deletes: bool | None = None
    username_mutable: bool | None = Field(None, description="Whether the target accepts a userName change "
                                                            "(profile default; ZPA: false)")
    max_groups_per_user: _number("target.max_groups_per_user", "The target's groups-per-user cap "
                                 "(profile default; ZIA: 127)") = None


class ConfigFile(_Table):
    """provisiond's configuration file."""

    daemon: DaemonFile | None = None
    source: SourceFile
    target: Annotated[list[TargetFile], Field(min_length=1)]


DAEMON_KEYS: Final[tuple[str, ...]] = tuple(DaemonFile.model_fields)
SOURCE_KEYS: Final[tuple[str, ...]] = tuple(SourceFile.model_fields)
TARGET_KEYS: Final[tuple[str, ...]] = tuple(TargetFile.model_fields)
ACTION_KEYS: Final[tuple[str, ...]] = tuple(ActionsFile.model_fields)
MAX_DELETES_KEYS: Final[tuple[str, ...]] = tuple(MaxDeletesFile.model_fields)
SCOPE_KEYS: Final[tuple[str, ...]] = tuple(ScopeFile.model_fields)
MAPPING_ENTRY_KEYS: Final[tuple[str, ...]] = tuple(MappingEntry.model_fields)
GROUP_REF_KEYS: Final[tuple[str, ...]] = tuple(
    key for model in (GroupById, GroupByName, GroupByPrefix, GroupByFilter) for key in model.model_fields)


def _drop_nulls(node: Any) -> Any:
    """Optional keys are optional, not nullable: TOML has no null. Drop `{"type": "null"}` branches."""
    if isinstance(node, dict):
        out = {k: _drop_nulls(v) for k, v in node.items()}
        for key in ("anyOf", "oneOf"):
            if key in out:
                branches = [b for b in out[key] if b != {"type": "null"}]
                if len(branches) == 1:
                    del out[key]
                    out = {**branches[0], **out}
                else:
                    out[key] = branches
        if out.get("default", 0) is None:
            del out["default"]
        return out
    if isinstance(node, list):
        return [_drop_nulls(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration file."""
    schema = _drop_nulls(ConfigFile.model_json_schema())
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, **schema}


def json_schema_text() -> str:
    """The schema as committed in config/provisiond.schema.json."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
