"""Inference telemetry: counted on the device, validated, rolled up per device and minute by the
controller (real Mosquitto + SQLite/PostgreSQL), shown by `ldfleet registry usage --source inference`."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from control_fixtures import broker, db_url, fleet, pg_admin, pg_url  # noqa: F401 - fixtures
from control_fixtures import Fleet, wait_until
from ldfleet.cli import app
from ldfleet.client.governor import Decision
from ldfleet.client.telemetry import InferenceStats, TelemetryPublisher
from ldfleet.common import topics
from ldfleet.common.edge_runtime import Result
from ldfleet.common.mqtt import parse_broker_url, publish_once
from ldfleet.common.schemas import PayloadError, Telemetry, parse_payload
from ldfleet.server.telemetry import rollups


def _served(stats: InferenceStats, k: int, ms: float, target: float | None = None, policy_k: int = 4) -> None:
    stats.record(Result("yes", k, list(range(k)), ms), Decision(k, policy_k, target, None, 0.0))


def test_stats_summarise_a_window_and_start_the_next():
    stats = InferenceStats(4)
    _served(stats, 4, 10.0)
    _served(stats, 2, 30.0, target=20.0)
    s = stats.summary()
    assert (s.requests, s.k_counts, s.layer_counts) == (2, [0, 1, 0, 1], [2, 2, 1, 1])
    assert (s.deadline_misses, s.interventions, s.p50_ms, s.p99_ms) == (1, 1, 10.0, 30.0)
    assert stats.summary().requests == 0


@pytest.mark.parametrize("change, why", [
    ({"k_counts": [0, 0, 0, 3]}, "add up"),
    ({"layer_counts": [9, 2, 1, 1]}, "more often"),
    ({"p50_ms": 50.0}, "p50_ms"),
    ({"deadline_misses": 7}, "more deadline misses"),
    ({"requests": 10**9}, "less than or equal"),
])
def test_absurd_summaries_are_refused(change, why):
    stats = InferenceStats(4)
    _served(stats, 4, 10.0)
    _served(stats, 2, 30.0)
    good = json.loads(Telemetry(device_id="d1", inference=stats.summary()).to_json())
    good["inference"].update(change)
    with pytest.raises(PayloadError, match=why):
        parse_payload(Telemetry, json.dumps(good), topic_device_id="d1")


def test_controller_rolls_up_served_requests_per_device_and_minute(fleet: Fleet, caplog):
    ctl = fleet.controller()
    fleet.agent("edge-1", "edge", num_layers=4)
    assert wait_until(lambda: fleet.registry.device("edge-1") is not None, 20)
    stats = InferenceStats(4)
    pub = TelemetryPublisher("edge-1", fleet.broker.url, stats, interval_s=3600).start()
    try:
        assert pub.session.wait_connected(10)
        for ms in (10.0, 12.0, 14.0):
            _served(stats, 4, ms)
        pub.publish_now()
        _served(stats, 2, 40.0, target=30.0)
        pub.publish_now()
        assert wait_until(lambda: sum(r.requests for r in rollups(fleet.registry)) == 4, 20)
    finally:
        pub.stop()
    rows = rollups(fleet.registry, "edge-1")
    assert sum(r.messages for r in rows) == 2 and sum(r.deadline_misses for r in rows) == 1
    assert [sum(c) for c in zip(*(r.layer_counts for r in rows))] == [4, 4, 3, 3]
    # spoofed (another device's id on edge-1's topic), absurd, and unknown-device telemetry: dropped
    url = parse_broker_url(fleet.broker.url)
    spoof = Telemetry(device_id="edge-2", inference=InferenceStats(4).summary())
    bad = json.loads(Telemetry(device_id="edge-1", inference=InferenceStats(4).summary()).to_json())
    bad["inference"]["requests"] = 5
    ghost = InferenceStats(4)
    _served(ghost, 4, 1.0)
    with caplog.at_level(logging.WARNING):
        publish_once(url, [(topics.telemetry("edge-1"), spoof.to_json(), 1, False),
                           (topics.telemetry("edge-1"), json.dumps(bad).encode(), 1, False),
                           (topics.telemetry("ghost"), Telemetry(device_id="ghost", inference=ghost.summary()).to_json(), 1, False)])
        assert wait_until(lambda: "dropped inference telemetry of ghost" in caplog.text, 20)
    assert "does not match topic device" in caplog.text and "k_counts add up" in caplog.text
    assert sum(r.requests for r in rollups(fleet.registry)) == 4
    out = CliRunner().invoke(app, ["registry", "usage", "--source", "inference", "--db", fleet.db_url, "--json"])
    assert out.exit_code == 0, out.output
    usage = json.loads(out.stdout)["usage"]["edge-1"]
    assert usage["requests"] == 4 and usage["usage"] == [1.0, 1.0, 0.75, 0.75] and usage["mean_layers"] == 3.5
    assert ctl.stats.dropped >= 2
