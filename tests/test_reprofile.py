"""A device measures its profile again while its agent runs: a change beyond the tolerance is
announced and the controller resolves the device's budget on it (real Mosquitto, real controller);
timing noise within the tolerance and failed measurements change nothing."""

from __future__ import annotations

import logging

import pytest

from control_fixtures import broker, sqlite_fleet  # noqa: F401 - fixtures
from control_fixtures import Fleet, wait_until
from ldfleet.client.profile import synthetic_profile
from ldfleet.client.reprofile import Reprofiler, latency_change, under_load
from ldfleet.common.budget import layers_for_latency
from ldfleet.server.operator import set_budget


def _profile(layer_ms: float, **kw):
    return synthetic_profile("pi-1", "pi", num_layers=12, layer_ms=layer_ms, front_end_ms=5.0, **kw)


def test_latency_change_is_relative_and_none_for_another_model():
    slow, fast = _profile(10.0), _profile(2.0)
    assert latency_change(slow, fast) == pytest.approx((5 + 24) / (5 + 120) - 1)
    assert latency_change(fast, fast) == 0.0
    assert latency_change(slow, _profile(10.0, model_id="other")) is None
    assert latency_change(slow, _profile(10.0, reference_seconds=2.0)) is None
    assert under_load(_profile(2.0).model_copy(update={"load": 1.5, "cores": 1}))
    assert not under_load(_profile(2.0).model_copy(update={"load": 1.5, "cores": 4}))
    assert not under_load(_profile(2.0))  # load unknown


def test_reprofiler_announces_only_beyond_the_tolerance_and_survives_failed_measurements(caplog):
    current = {"profile": _profile(2.0)}
    readings = iter([_profile(2.2), RuntimeError("out of memory"), _profile(3.0), _profile(3.0, model_id="other")])

    def measure():
        value = next(readings)
        if isinstance(value, Exception):
            raise value
        return value

    announced = []

    def announce(profile):
        announced.append(profile)
        current["profile"] = profile

    rp = Reprofiler("pi-1", measure, lambda: current["profile"], announce, every_s=60, tolerance=0.2)
    with caplog.at_level(logging.INFO, logger="ldfleet.agent"):
        assert rp.check_once() is False  # +9%: noise, kept
        assert rp.check_once() is False  # failed: logged, nothing announced
        assert rp.check_once() is True   # +41%
        assert rp.check_once() is True   # another model: always announced
    assert [p.model_id for p in announced] == ["synthetic", "other"]
    assert rp.measured == 3 and rp.announced == 2
    assert "re-measuring the profile failed (out of memory)" in caplog.text
    for bad in (0, 1e10):  # threading's timeouts overflow near 1e10 s
        with pytest.raises(ValueError):
            Reprofiler("pi-1", measure, lambda: None, announce, every_s=bad)


def test_a_profile_measured_under_load_is_replaced_and_the_device_gets_its_layers_back(sqlite_fleet: Fleet):
    fleet = sqlite_fleet
    reg = fleet.registry
    fleet.controller()
    agent = fleet.agent("pi-1", "pi", layer_ms=10.0, num_layers=12, front_end_ms=5.0)  # measured during a burst of load
    assert wait_until(lambda: reg.device("pi-1") is not None and reg.device("pi-1").converged, 30)
    set_budget(reg, fleet.broker.url, "pi", latency_ms=50.0, issued_by="ops")
    slow_k = layers_for_latency(50.0, 5.0, [10.0] * 12)
    assert wait_until(lambda: agent.state.effective_k == slow_k and reg.device("pi-1").converged, 20)
    revision = agent.profile.revision

    readings = iter([_profile(2.0)] + [_profile(2.1)] * 1000)  # the real speed, then timing noise
    rp = Reprofiler("pi-1", lambda: next(readings), lambda: agent.profile, agent.set_profile, every_s=0.2).start()
    try:
        fast_k = layers_for_latency(50.0, 5.0, [2.0] * 12)
        assert fast_k > slow_k
        assert wait_until(lambda: agent.state.effective_k == fast_k and reg.device("pi-1").converged, 20), \
            "the controller did not resolve the device on its new profile"
        assert wait_until(lambda: rp.measured >= 5, 10)
    finally:
        rp.stop()
    assert rp.announced == 1 and agent.profile.revision == revision + 1  # noise after that was not announced
    assert reg.device("pi-1").profile_revision == revision + 1
    assert agent.state.expected_latency_ms <= 50.0
