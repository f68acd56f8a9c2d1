"""The one HTTP client session of a process, used by the CLI and the daemon alike.

TLS verification stays on (aiohttp's default); connections are pooled; the environment's
proxy variables are not read (`trust_env=False`), so that traffic goes only where the config says.
"""

from __future__ import annotations

import aiohttp

DEFAULT_HTTP_CONNECTIONS = 100


def http_session(*, limit: int = DEFAULT_HTTP_CONNECTIONS,
                 trace_configs: list[aiohttp.TraceConfig] | None = None) -> aiohttp.ClientSession:
    """A pooled session with TLS verification on; requests never raise for their status."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300),
                                 trust_env=False, raise_for_status=False, trace_configs=trace_configs)
