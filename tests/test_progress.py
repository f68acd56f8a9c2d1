"""Progress on a terminal: `once`, `sync-user` and `sync-group` with stderr on a pseudo-terminal
draw a live display there (done/total, rate, ETA, failures); with stderr a pipe they print plain
lines; the JSON log on stdout is the same either way."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import anyio

from tests.test_service import child_env, world, write_config

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_with_pty_stderr(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run `provisiond ARGS` with stdout a pipe and stderr a pseudo-terminal: (code, stdout, tty text)."""
    master, slave = pty.openpty()
    env = child_env(None, TERM="xterm-256color", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:     # EIO once the child closed its side
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=5)
        os.close(master)
        if proc.stdout is not None:
            proc.stdout.close()
    return code, stdout, b"".join(chunks).decode(errors="replace")


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]      # every stdout line is a JSON event


async def test_once_on_a_terminal_shows_live_progress_on_stderr_and_keeps_stdout_json(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        code, stdout, tty = await anyio.to_thread.run_sync(run_with_pty_stderr, "once", "-c", str(config))
        assert code == 0, stdout[-2000:] + tty[-2000:]
        events = json_lines(stdout)
        (finished,) = [e for e in events if e["event"] == "cycle.finished"]
        applied = int(str(finished["applied"]))
        assert applied > 10
        assert ANSI.search(tty), "a live display redraws with terminal control sequences"
        plain = ANSI.sub("", tty)
        assert re.search(rf"zpa\s.*{applied}/{applied}", plain), plain[-1500:]   # done/total, completed
        assert "/s" in plain and "ETA" in plain and "0 failed" in plain
        assert "{" not in plain, "no JSON on the terminal: the log stays on stdout"

        # sync-user and sync-group draw on the terminal too; their step lines stay on stdout
        d = w.sb.directory
        group = d.group_by_name("ZPA Contractors")
        uid = sorted(d.static_member_ids(group["id"]))[0]
        d.update_user(uid, name={"given": "Progress", "family": "Shown"})
        code, stdout, tty = await anyio.to_thread.run_sync(
            run_with_pty_stderr, "sync-user", d.users[uid]["username"], "-c", str(config), "--target", "zpa")
        assert code == 0, stdout + tty
        assert "user.updated" in stdout and re.search(r"zpa\s.*1/1", ANSI.sub("", tty)), tty[-1500:]
        d.update_user(uid, name={"given": "Progress", "family": "Again"})
        code, stdout, tty = await anyio.to_thread.run_sync(
            run_with_pty_stderr, "sync-group", "ZPA Contractors", "-c", str(config), "--target", "zpa")
        assert code == 0, stdout + tty
        assert "user.updated" in stdout and re.search(r"zpa\s.*1/1", ANSI.sub("", tty)), tty[-1500:]


async def test_once_without_a_terminal_prints_plain_progress_lines_on_stderr(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        config = write_config(w.sb, w.config)
        result = await anyio.run_process([sys.executable, "-m", "daemon", "once", "-c", str(config)],
                                         check=False, env=child_env(None, TERM="xterm-256color"))
        assert result.returncode == 0, result.stderr.decode()
        events = json_lines(result.stdout.decode())
        (finished,) = [e for e in events if e["event"] == "cycle.finished"]
        applied = finished["applied"]
        stderr = result.stderr.decode()
        assert not ANSI.search(stderr)
        assert f"zpa: applying {applied} operation(s)" in stderr, stderr
        assert re.search(rf"zpa: {applied}/{applied} operations done in [0-9.]+s, [0-9.]+/s, 0 failed", stderr), stderr


def test_plain_lines_count_the_failures_reported_by_the_apply() -> None:
    import io

    from daemon.progress import ApplyProgress

    stream = io.StringIO()
    with ApplyProgress(stream, every=0.0) as progress:
        assert not progress.live
        for done in (1, 2, 3):
            progress.update("zia", done, 3)
            if done == 2:
                progress.observe("user.create_failed", {"target": "zia", "outcome": "failed"})
            progress.observe("user.created", {"target": "zia", "outcome": "applied"})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "zia: applying 3 operation(s)"
    assert re.fullmatch(r"zia: 2/3 operations, [0-9.]+/s, ETA \S+, 0 failed", lines[2]), lines
    assert re.fullmatch(r"zia: 3/3 operations done in [0-9.]+s, [0-9.]+/s, 1 failed", lines[-1]), lines


def test_demo_on_a_terminal_draws_the_live_display_on_stderr() -> None:
    code, stdout, tty = run_with_pty_stderr("demo", "--cycles", "1", "--users", "80", "--groups", "6",
                                            "--zia-rps", "500", timeout=90)
    assert code == 0, stdout[-2000:] + tty[-2000:]
    assert "cycle 1:" in stdout and "applying" not in stdout    # the plain lines are for a pipe only
    plain = ANSI.sub("", tty)
    assert ANSI.search(tty) and re.search(r"zpa\s.*(\d+)/\1", plain) and re.search(r"zia\s.*(\d+)/\1", plain), \
        plain[-1500:]
