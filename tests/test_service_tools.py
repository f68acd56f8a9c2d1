"""The operator tools inside `provisiond run`: reload impact preview, /metrics and /healthz."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.test_faults_daemon import assert_log_schema
from tests.test_service import daemon_running, ready, run_command, stop, until, world, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_reload_that_would_remove_too_much_is_held_until_approved(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.summary"), "first cycle", explain=d.describe)
            provisioned = {u["userName"] for u in w.sb.zpa.users.values()}
            assert len(provisioned) > 10
            # narrowing the scope to the nested contractors group would deprovision most users
            text = w.config.read_text()
            w.config.write_text(text.replace('scope = { groups = ["ZPA Users"] }',
                                             'scope = { groups = ["ZPA Contractors"] }'))
            w.sb.zpa.reset_counters()
            d.signal(1)   # SIGHUP
            (held,) = await until(lambda: d.named("config.reload_held"), "config.reload_held",
                                  explain=d.describe)
            assert held["impact"]["zpa"]["held"] is True
            assert "config.reload_held" in assert_log_schema(d.events)
            assert held["impact"]["zpa"]["removals"] > held["impact"]["zpa"]["limit"]
            mark = len(d.named("cycle.summary"))
            await until(lambda: len(d.named("cycle.summary")) >= mark + 2, "two cycles on the old config",
                        explain=d.describe)
            # nothing changed in the target: the old config is still the one running
            assert {u["userName"] for u in w.sb.zpa.users.values()} == provisioned
            assert w.sb.zpa.writes() == 0
            assert not d.named("config.reloaded")

            status = await run_command("status", "-c", str(w.config))
            assert "RELOAD HELD: " in status.stdout.decode() and "approve --reload" in status.stdout.decode()
            result = await run_command("approve", "-c", str(w.config), "--reload")
            assert result.returncode == 0, result.stderr
            assert "approved: the reload of " in result.stdout.decode()
            await until(lambda: d.named("config.reload_approved"), "config.reload_approved",
                        explain=d.describe)
            (reloaded,) = await until(lambda: d.named("config.reloaded"), "config.reloaded", explain=d.describe)
            assert any(key.startswith("target.zpa.scope") for key in reloaded["changed"]), reloaded
            # the removals themselves still meet max_deletes in the cycle, as any other plan
            await until(lambda: d.named("plan.removals_held"), "plan.removals_held", explain=d.describe)
            # the staged reload is spent: a second approval has nothing to activate, and says so
            again = await run_command("approve", "-c", str(w.config), "--reload")
            assert again.returncode != 0 and "no reload is staged" in again.stderr.decode()
            assert "RELOAD HELD" not in (await run_command("status", "-c", str(w.config))).stdout.decode()
            code = await stop(d)
    assert code == 0, d.describe()


async def test_approve_reload_with_nothing_staged_says_so_and_a_later_heavy_reload_is_held(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: d.named("cycle.summary"), "first cycle", explain=d.describe)
            blind = await run_command("approve", "-c", str(w.config), "--reload")
            assert blind.returncode != 0, blind.stdout
            assert "no reload is staged" in blind.stderr.decode()
            provisioned = {u["userName"] for u in w.sb.zpa.users.values()}
            w.config.write_text(w.config.read_text().replace('scope = { groups = ["ZPA Users"] }',
                                                             'scope = { groups = ["ZPA Contractors"] }'))
            d.signal(1)   # SIGHUP: the blind approval before it does not activate it
            await until(lambda: d.named("config.reload_held"), "config.reload_held", explain=d.describe)
            mark = len(d.named("cycle.summary"))
            await until(lambda: len(d.named("cycle.summary")) >= mark + 2, "two cycles on the old config",
                        explain=d.describe)
            assert not d.named("config.reloaded") and not d.named("config.reload_approved")
            assert {u["userName"] for u in w.sb.zpa.users.values()} == provisioned
            code = await stop(d)
    assert code == 0, d.describe()


async def test_metrics_and_healthz_are_served_on_http_listen(tmp_path: Path) -> None:
    port = free_port()
    async with world(tmp_path) as w:
        write_config(w.sb, w.config, interval="1s", daemon_extra=f'http_listen = "127.0.0.1:{port}"\n')
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await ready(w, d)
            await until(lambda: len(d.named("cycle.summary")) >= 2, "two cycles", explain=d.describe)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status == 200, await resp.text()
                    health = await resp.json()
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
            code = await stop(d)
    assert code == 0, d.describe()
    assert health["status"] == "ok", health
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    created = sum(s.value for s in samples
                  if s.name == "provisiond_operations_total" and s.labels.get("op") == "user.create"
                  and s.labels.get("outcome") == "applied" and s.labels.get("target") == "zpa")
    assert created == w.sb.zpa.counters["POST /Users"] > 0
    posts = sum(s.value for s in samples
                if s.name == "provisiond_http_request_duration_seconds_count" and s.labels.get("method") == "POST"
                and s.labels.get("status") == "201" and s.labels.get("target") == "zpa")
    assert posts == w.sb.zpa.counters["POST /Users"] + w.sb.zpa.counters["POST /Groups"]
