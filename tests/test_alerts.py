"""The shipped alert rules (`contrib/prometheus/provisiond-alerts.yml`) and the gauges they read,
from a running `provisiond run` scraped over HTTP."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import anyio
import yaml

from tests.harness import daemon_serving, gauge, scrape, stop, until, world, write_zpa_config

RULES = Path(__file__).resolve().parent.parent / "contrib" / "prometheus" / "provisiond-alerts.yml"
_METRIC_RE = re.compile(r"\bprovisiond_[a-z0-9_]+\b")


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def metrics_named_by_rules() -> set[str]:
    return {name for rule in rules() for name in _METRIC_RE.findall(str(rule["expr"]))}


def test_the_rules_file_names_the_alerts_it_promises() -> None:
    names = {rule["alert"] for rule in rules()}
    assert {"ProvisiondRemovalsHeld", "ProvisiondTargetQuarantined", "ProvisiondNoSuccessfulCycle",
            "ProvisiondCyclesFailing", "ProvisiondSourceFailing", "ProvisiondChangeFeedLag"} <= names
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    assert "provisiond_change_feed_lag_seconds" in metrics_named_by_rules()


async def test_every_metric_a_rule_names_is_exported_and_the_gauges_follow_the_world(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        write_zpa_config(w.sb, w.config, interval="1s")
        async with daemon_serving(w, cycles=2) as (d, url):
            samples = await scrape(url)
            deadline = time.monotonic() + 20.0     # the feed is polled every 5 s (the default)
            while "provisiond_change_feed_lag_seconds" not in samples and time.monotonic() < deadline:
                await anyio.sleep(0.2)
                samples = await scrape(url)
            named = metrics_named_by_rules()
            missing = sorted(name for name in named if name not in samples)
            assert not missing, f"rules name metrics that /metrics does not export: {missing}"
            # The daemon polls the change feed (default "poll"): its lag is a few seconds at most.
            lag = gauge(samples, "provisiond_change_feed_lag_seconds")
            assert lag is not None and 0.0 <= lag < 60.0
            (info,) = samples["provisiond_build_info"]
            assert info[1] == 1.0 and info[0]["version"]
            assert gauge(samples, "provisiond_cycle_interval_seconds") == 1.0
            assert gauge(samples, "provisiond_source_up") == 1.0
            assert gauge(samples, "provisiond_removals_held", target="zpa") == 0.0
            assert gauge(samples, "provisiond_target_quarantined", target="zpa") == 0.0
            assert (gauge(samples, "provisiond_last_success_timestamp_seconds", target="zpa") or 0) > 0

            # a mass scope loss in PingOne: the removals are held above max_deletes (10%)
            d_ = w.sb.directory
            scope = d_.group_by_name("ZPA Users")
            members = sorted(d_.static_member_ids(scope["id"]))
            assert len(members) >= 10
            for uid in members[: len(members) // 2]:
                d_.remove_member(scope["id"], uid)
            mark = len(d.events)
            await until(lambda: d.named("plan.removals_held", since=mark), "plan.removals_held",
                        explain=d.describe)
            (held_event, *_) = d.named("plan.removals_held", since=mark)
            await until(lambda: len(d.named("cycle.summary", since=mark)) >= 1, "a cycle after", explain=d.describe)
            samples = await scrape(url)
            assert gauge(samples, "provisiond_removals_held", target="zpa") == held_event["held"] > 0

            # the target refuses our token: quarantined, and the gauge says so between retries
            w.sb.zpa.token = "rotated-behind-our-back"
            d_.update_user(members[-1], name={"given": "Changed", "family": "Behind"})   # something to send
            mark = len(d.events)
            await until(lambda: d.named("target.quarantined", since=mark), "target.quarantined",
                        explain=d.describe)
            samples = await scrape(url)
            assert gauge(samples, "provisiond_target_quarantined", target="zpa") == 1.0

            # PingOne refuses the worker app: the source is down
            w.sb.pingone.client_secret = "rotated-too"
            w.sb.pingone.revoke_tokens()
            mark = len(d.events)
            await until(lambda: d.named("snapshot.failed", since=mark), "snapshot.failed", explain=d.describe)
            await until(lambda: d.named("cycle.summary", since=mark), "cycle.summary", explain=d.describe)
            samples = await scrape(url)
            assert gauge(samples, "provisiond_source_up") == 0.0
            code = await stop(d)
    assert code == 0, d.describe()
