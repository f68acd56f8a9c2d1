"""Run scim2-server's own CLI with a deeper listen backlog, and report the port it bound.

Usage: ``python launch_scim2_server.py --hostname 127.0.0.1 --port 0 --bearer-token T``
(any `scim2-server` option). scim2-server serves with the stdlib wsgiref threading server,
HTTP/1.0 without keep-alive and a listen backlog of 5: under a few concurrent clients its
connections stall (reference/scim-servers.md). This launcher raises the backlog to
`DEFAULT_BACKLOG`, prints ``READY_PREFIX <port>`` once the socket listens (so ``--port 0``
works and the caller never races for a free port), then runs `scim2_server.testserver.cli.main`.
"""

from __future__ import annotations

from scim2_server.testserver import cli

DEFAULT_BACKLOG = 128
READY_PREFIX = "scim2-server listening on port"


class ReportingServer(cli.ThreadingWSGIServer):
    """scim2-server's threading WSGI server that announces its bound port on stdout."""

    def server_activate(self) -> None:
        super().server_activate()
        print(f"{READY_PREFIX} {self.server_address[1]}", flush=True)


def main() -> None:
    cli.ThreadingWSGIServer.request_queue_size = DEFAULT_BACKLOG
    cli.ThreadingWSGIServer = ReportingServer  # type: ignore[misc]  # main() reads this name at call time
    cli.main()


if __name__ == "__main__":
    main()
