"""`provisiond sandbox` and `provisiond demo`: the emulators on loopback, and a config for them.

Port layout with `--port P`: the PingOne emulator listens on P, the `zpa` SCIM emulator on
P+1 and the `zia` SCIM emulator on P+2 (all on 127.0.0.1). `--port 0` picks free ports.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon.sandbox.directory import Directory, generate
from daemon.sandbox.faults import Faults
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.scim import DEFAULT_TOKEN, ScimEmulator
from daemon.sandbox.server import serve

DEFAULT_PORT = 8900
DEFAULT_USERS = 2000
DEFAULT_GROUPS = 40
ZPA_PREFIX = "/scim/1/216196257331281920/v2"
ZIA_PREFIX = "/24326813/61233/scim"
ZPA_TOKEN = DEFAULT_TOKEN + "-zpa"
ZIA_TOKEN = DEFAULT_TOKEN + "-zia"


@dataclass
class Sandbox:
    directory: Directory
    pingone: PingOneEmulator
    zpa: ScimEmulator
    zia: ScimEmulator
    pingone_url: str = ""
    zpa_url: str = ""
    zia_url: str = ""

    def describe(self) -> str:
        env = self.directory.env_id
        return "\n".join([
            f"PingOne emulator   {self.pingone_url}  (API {self.pingone_url}/v1, token {self.pingone_url}/{env}/as/token)",
            f"  environment_id   {env}",
            f"  client_id        {DEFAULT_CLIENT_ID}",
            f"  client_secret    {DEFAULT_CLIENT_SECRET}   (sandbox only)",
            f"  directory        {len(self.directory.users)} users, {len(self.directory.groups)} groups",
            f"ZPA SCIM emulator  {self.zpa_url}   bearer token {ZPA_TOKEN}",
            f"ZIA SCIM emulator  {self.zia_url}   bearer token {ZIA_TOKEN}",
            "Admin (no auth):   POST/PATCH/DELETE under /_admin/ on each; GET /_admin/state",
        ])

    def config_text(self, state_path: str, *, interval: str = "30s", log_format: str = "json",
                    zia_rps: float = 5.0) -> str:
        """A ready-to-run provisiond config targeting these emulators (literal secrets: sandbox only)."""
        return f'''# provisiond config for the sandbox emulators (written by `provisiond sandbox --write-config`).
# Literal secrets are fine here: they are the emulators' own. In production use *_file.
[daemon]
state_path = "{state_path}"
interval = "{interval}"
full_sync_every = "1h"
log_format = "{log_format}"
log_level = "info"

[source]
api_url = "{self.pingone_url}/v1"
auth_url = "{self.pingone_url}"
environment_id = "{self.directory.env_id}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = "{DEFAULT_CLIENT_SECRET}"
client_auth = "basic"
page_size = 500

[[target]]
name = "zpa"
profile = "zpa"
base_url = "{self.zpa_url}"
auth = "bearer"
token = "{ZPA_TOKEN}"
requests_per_second = 40
concurrency = 8
remove_action = "disable"
max_deletes = "10%"
groups = ["ZPA Users", "ZPA Contractors"]
membership = "transitive"
scope = {{ groups = ["ZPA Users"] }}

[[target]]
name = "zia"
profile = "zia"
base_url = "{self.zia_url}"
auth = "bearer"
token = "{ZIA_TOKEN}"
requests_per_second = {zia_rps:g}
concurrency = 2
remove_action = "disable"
max_deletes = "10%"
groups = ["ZIA Users"]
scope = {{ groups = ["ZIA Users"] }}
'''


def build_sandbox(*, users: int = DEFAULT_USERS, groups: int = DEFAULT_GROUPS, seed: int = 1,
                  latency_ms: float = 0.0, error_rate: float = 0.0,
                  zia_rps: float | None = None) -> Sandbox:
    directory = generate(users, groups, seed=seed)
    pingone = PingOneEmulator(directory, faults=Faults(latency_ms=latency_ms, error_rate=error_rate, seed=seed))
    zpa = ScimEmulator("zpa", token=ZPA_TOKEN, prefix=ZPA_PREFIX,
                       faults=Faults(latency_ms=latency_ms, error_rate=error_rate, seed=seed + 1))
    overrides = {} if zia_rps is None else {"rate_limit_rps": zia_rps}
    zia = ScimEmulator("zia", token=ZIA_TOKEN, prefix=ZIA_PREFIX,
                       faults=Faults(latency_ms=latency_ms, error_rate=error_rate, seed=seed + 2), **overrides)
    return Sandbox(directory, pingone, zpa, zia)


@asynccontextmanager
async def running(sandbox: Sandbox, *, port: int = DEFAULT_PORT) -> AsyncIterator[Sandbox]:
    """Serve the three emulators; ports P, P+1, P+2 (or free ones with port 0)."""
    async with AsyncExitStack() as stack:
        sandbox.pingone_url = await stack.enter_async_context(serve(sandbox.pingone.app(), port=port))
        base_zpa = await stack.enter_async_context(serve(sandbox.zpa.app(), port=port + 1 if port else 0))
        base_zia = await stack.enter_async_context(serve(sandbox.zia.app(), port=port + 2 if port else 0))
        sandbox.zpa_url = base_zpa + ZPA_PREFIX
        sandbox.zia_url = base_zia + ZIA_PREFIX
        yield sandbox


def write_config(sandbox: Sandbox, path: str | Path, *, state_path: str | None = None,
                 interval: str = "30s", log_format: str = "json", zia_rps: float = 5.0) -> Path:
    target = Path(path)
    state = state_path or str(target.with_suffix(".db").resolve())
    target.write_text(sandbox.config_text(state, interval=interval, log_format=log_format, zia_rps=zia_rps),
                      encoding="utf-8")
    target.chmod(0o600)
    return target


def mutate(directory: Directory, rng: random.Random, step: int) -> list[str]:
    """A few realistic directory changes between demo cycles; returns what was done, in words."""
    done: list[str] = []
    zpa = directory.group_by_name("ZPA Users")
    members = sorted(directory.direct_member_ids(zpa["id"]))
    if members:
        uid = rng.choice(members)
        user = directory.users[uid]
        directory.update_user(uid, department=f"Department {step}")
        done.append(f"moved {user['username']} to Department {step}")
        uid2 = rng.choice(members)
        enabled = directory.users[uid2].get("enabled", True)
        directory.set_enabled(uid2, not enabled)
        done.append(f"{'disabled' if enabled else 're-enabled'} {directory.users[uid2]['username']}")
    new = directory.add_user(f"new.hire{step}@example.com", given="New", family=f"Hire {step}")
    directory.add_member(zpa["id"], new["id"])
    done.append(f"hired {new['username']} into ZPA Users")
    if step % 2 == 0 and len(members) > 3:
        gone = members[-1 - step % len(members)]
        name = directory.users[gone]["username"]
        directory.delete_user(gone)
        done.append(f"deleted {name}")
    if step == 3:
        contractors = directory.group_by_name("ZPA Contractors")
        directory.rename_group(contractors["id"], "ZPA External Contractors")
        done.append("renamed group ZPA Contractors to ZPA External Contractors")
    return done
