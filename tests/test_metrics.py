"""`/metrics` and `/healthz` over real cycles, and the apply's ETA (`cycle.apply_started`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon.metrics import Health, Metrics, parse_timestamp, serve_http, split_listen
from daemon.sandbox.directory import Directory
from tests.test_explain import World, world

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def nobody(_d: Directory) -> None:
    """No extra users: every target's cycle succeeds."""


def change_one(w: World, group: str) -> None:
    """Rename one enabled, provisioned member of `group` in PingOne: one update in the next cycle."""
    d = w.sb.directory
    em = w.sb.zpa if group.startswith("ZPA") else w.sb.zia
    uid = next(u for u in sorted(d.direct_member_ids(d.group_by_name(group)["id"]))
               if em.user_by_username(d.users[u]["username"]) is not None and d.users[u].get("enabled", True))
    d.update_user(uid, name={"given": "Changed", "family": f"Name {time.monotonic()}"})


async def scrape(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@asynccontextmanager
async def monitored(w: World) -> AsyncIterator[tuple[Metrics, Health, str]]:
    metrics, health = Metrics(), Health()
    metrics.attach(w.engine)
    health.attach(w.engine)
    w.engine.observers += [metrics.observe, health.observe]
    w.engine.progress = metrics.progress
    async with serve_http(metrics, health, "127.0.0.1:0") as url:
        yield metrics, health, url


async def test_metrics_parse_and_the_counters_move_with_a_cycle(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody) as w, monitored(w) as (_m, _h, url):
        status, text = await scrape(url + "/metrics")
        assert status == 200
        before = parse(text)
        assert value(before, "provisiond_operations_total", target="zpa", op="user.create", outcome="applied") == 0
        report = await w.cycle()
        assert not report.failed
        after = parse((await scrape(url + "/metrics"))[1])
        for name, em in (("zpa", w.sb.zpa), ("zia", w.sb.zia)):
            created = value(after, "provisiond_operations_total", target=name, op="user.create", outcome="applied")
            assert created == em.counters["POST /Users"] > 0
            assert value(after, "provisiond_operation_duration_seconds_count", target=name,
                         op="user.create") == created
            assert value(after, "provisiond_cycles_total", target=name, outcome="success") == 1
            assert value(after, "provisiond_cycle_duration_seconds_count", target=name) == 1
            assert value(after, "provisiond_last_success_timestamp_seconds", target=name) == pytest.approx(
                time.time(), abs=30)
            assert value(after, "provisiond_queue_depth", target=name) == 0
            assert value(after, "provisiond_http_requests_total", target=name) >= em.counters["POST /Users"]
        assert value(after, "provisiond_http_requests_total", target="pingone") > 0
        # a second cycle with one change: the counters move by exactly that
        change_one(w, "ZIA Users")
        await w.cycle()
        again = parse((await scrape(url + "/metrics"))[1])
        assert value(again, "provisiond_operations_total", target="zia", op="user.update", outcome="applied") == 1
        assert value(again, "provisiond_cycles_total", target="zia", outcome="success") == 2
        # the change was made after metrics began: its propagation latency is measured, and small
        assert value(again, "provisiond_propagation_latency_seconds_count", target="zia") == 1
        assert value(again, "provisiond_propagation_latency_seconds_sum", target="zia") < 10


async def test_the_429_counter_counts_the_targets_rate_limit_answers(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody) as w, monitored(w) as (_m, _h, url):
        faults = w.sb.zia.faults
        faults.retry_after = 0.01
        faults.fail_nth = {faults.request_count + n: "429" for n in (3, 5)}
        await w.cycle()
        samples = parse((await scrape(url + "/metrics"))[1])
        assert value(samples, "provisiond_http_429_total", target="zia") == 2
        assert value(samples, "provisiond_http_retries_total", target="zia") >= 2
        assert value(samples, "provisiond_http_429_total", target="zpa") == 0


async def test_client_counters_survive_a_reload_that_rebuilds_the_clients(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody) as w, monitored(w) as (_m, _h, url):
        await w.cycle()
        first = value(parse((await scrape(url + "/metrics"))[1]), "provisiond_http_requests_total", target="zia")
        w.retarget("zia", concurrency=3)            # a changed target config builds a new client
        change_one(w, "ZIA Users")
        await w.cycle()
        second = value(parse((await scrape(url + "/metrics"))[1]), "provisiond_http_requests_total", target="zia")
        assert second > first > 0                   # not restarted from the new client's zero


async def test_healthz_is_503_with_the_reason_while_a_target_is_quarantined_and_200_after(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody) as w, monitored(w) as (_m, health, url):
        status, body = await scrape(url + "/healthz")
        assert (status, '"starting"' in body) == (200, True)
        w.engine.quarantine_base = 0.3
        await w.cycle()
        status, body = await scrape(url + "/healthz")
        assert status == 200 and '"status": "ok"' in body
        token = w.sb.zia.token
        w.sb.zia.token = "rotated-behind-our-back"
        change_one(w, "ZIA Users")                  # something to send, refused with 401
        await w.cycle()
        async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as resp:
            assert resp.status == 503
            data: dict[str, Any] = await resp.json()
        assert data["status"] == "failing"
        assert data["reason"] == "zia: quarantined (auth_failed)"
        assert data["targets"]["zia"]["quarantined"]["reason"] == "auth_failed"
        assert data["targets"]["zpa"]["last_outcome"] == "success"
        w.sb.zia.token = token
        await anyio.sleep(0.35)                       # the quarantine ends
        await w.cycle()
        status, body = await scrape(url + "/healthz")
        assert status == 200 and '"status": "ok"' in body
        health.record_source("PingOne unreachable")
        assert (await scrape(url + "/healthz"))[0] == 503


async def test_a_partial_failure_is_degraded_not_unhealthy(tmp_path: Path) -> None:
    async with world(tmp_path) as w, monitored(w) as (_m, _h, url):   # `people`: one user zia refuses
        await w.cycle()
        async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as resp:
            assert resp.status == 200
            data = await resp.json()
        assert data["status"] == "degraded"
        assert data["targets"]["zia"]["last_outcome"] == "partial_failure"


async def test_queue_depth_follows_the_apply_and_ends_at_zero(tmp_path: Path) -> None:
    async with world(tmp_path, prepare=nobody) as w, monitored(w) as (metrics, _h, _url):
        depths: list[float] = []

        def hook(target: str, done: int, total: int) -> None:
            metrics.progress(target, done, total)
            if target == "zpa":
                depths.append(metrics.queue.labels("zpa")._value.get())

        w.engine.progress = hook
        await w.cycle()
        assert depths and max(depths) == len(depths) - 1 and depths[-1] == 0
        assert metrics.queue.labels("zpa")._value.get() == 0


async def test_the_eta_of_an_apply_is_its_size_over_the_targets_rate_and_holds(tmp_path: Path) -> None:
    rate = 20.0
    async with world(tmp_path, prepare=nobody, zpa={"requests_per_second": rate, "burst": 1.0}) as w:
        started = time.perf_counter()
        with capture_logs() as logs:
            await w.engine.cycle()
        finished = {e["target"]: e for e in logs if e["event"] == "cycle.finished"}
        (event,) = [e for e in logs if e["event"] == "cycle.apply_started" and e["target"] == "zpa"]
        ops = event["operations"]
        assert ops >= 10
        assert event["eta_s"] == round(ops / rate, 1)
        took = time.perf_counter() - started
        print(f"zpa: {ops} operations, ETA {event['eta_s']}s, whole cycle {took:.2f}s")
        assert finished["zpa"]["outcome"] == "success"
        # membership PATCHes and the full-sync reads share the budget: the ETA is a lower bound
        assert event["eta_s"] * 0.5 <= took <= event["eta_s"] * 3 + 2


def test_listen_addresses_and_pingone_timestamps_parse() -> None:
    assert split_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert split_listen("[::1]:9477") == ("::1", 9477)
    with pytest.raises(ValueError):
        split_listen("9477")
    assert parse_timestamp("1970-01-01T00:01:00.000Z") == 60.0
    assert parse_timestamp("yesterday") is None
