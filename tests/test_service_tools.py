"""The operator tools inside `provisiond run`: reload impact preview, /metrics and /healthz."""

from __future__ import annotations

from pathlib import Path

from tests.harness import (
    cycled,
    daemon_running,
    daemon_serving,
    get,
    parse_metrics,
    run_command,
    stop,
    total,
    until,
    world,
    write_zpa_config,
)
from tests.harness import free_port as free_port  # tests/test_changes_daemon.py imports it from here
from tests.test_faults_daemon import assert_log_schema


async def test_a_reload_that_would_remove_too_much_is_held_until_approved(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_zpa_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await cycled(w, d)
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
        write_zpa_config(w.sb, w.config, interval="1s")
        async with daemon_running(w.config, w.notify, w.tg) as d:
            await cycled(w, d)
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
    async with world(tmp_path) as w:
        write_zpa_config(w.sb, w.config, interval="1s")
        async with daemon_serving(w, cycles=2) as (d, url):
            status, health = await get(url + "/healthz")
            assert status == 200, health
            status, text = await get(url + "/metrics")
            assert status == 200, text
            code = await stop(d)
    assert code == 0, d.describe()
    assert health["status"] == "ok", health
    samples = parse_metrics(text)
    created = total(samples, "provisiond_operations_total", op="user.create", outcome="applied", target="zpa")
    assert created == w.sb.zpa.counters["POST /Users"] > 0
    posts = total(samples, "provisiond_http_request_duration_seconds_count", method="POST", status="201",
                  target="zpa")
    assert posts == w.sb.zpa.counters["POST /Users"] + w.sb.zpa.counters["POST /Groups"]
