"""End to end on a real Mosquitto: agents announce, the controller registers them and publishes
policies, `budget set` reaches every device of a class, offline devices catch up, broker restarts
heal by themselves, bad input is refused without harm."""

from __future__ import annotations

import json
import logging

import pytest

from control_fixtures import broker, db_url, fleet, pg_admin, pg_url, sqlite_fleet  # noqa: F401 - fixtures
from control_fixtures import Fleet, converged, read_retained, wait_until
from ldfleet.client.state import load_device_state
from ldfleet.common import topics
from ldfleet.common.budget import layers_for_latency
from ldfleet.common.mqtt import parse_broker_url, publish_once
from ldfleet.common.schemas import MAX_PAYLOAD_BYTES, BudgetPolicy, ControllerStatus, PolicyAck, utcnow
from ldfleet.server.operator import clear_budget, set_budget

EDGE_MS = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5]


def test_budget_set_reaches_every_connected_device_of_the_class(fleet: Fleet):
    reg = fleet.registry
    ctl = fleet.controller()
    edge = [fleet.agent(f"edge-{i}", "edge", layer_ms=EDGE_MS) for i in range(3)]
    hub = fleet.agent("hub-0", "hub")
    ids = [a.device_id for a in edge] + ["hub-0"]
    assert wait_until(lambda: converged(reg, ids, 1), 30), "devices were not registered with an initial policy"
    devs = {d.device_id: d for d in reg.devices()}
    assert devs["edge-0"].device_class == "edge" and devs["hub-0"].device_class == "hub"
    assert all(d.online and d.num_layers == 12 and d.cores == 1 and d.effective_k == 12 for d in devs.values())
    assert json.loads(read_retained(fleet.broker.url, topics.ctl_status(ctl.controller_id)))["online"] is True

    res = set_budget(reg, fleet.broker.url, "edge", keep=0.5, issued_by="alice")
    assert res.notified and res.policy.version == 1
    assert wait_until(lambda: converged(reg, ids) and all(reg.device(a.device_id).applied_version == 2 for a in edge), 20)
    for a in edge:
        st = load_device_state(a.state_dir)  # what the Flower client and on-device inference read
        assert st.version == 2 and st.effective_k == 6 and st.policy.keep == 0.5 and st.policy.source == "class"
        assert st.policy.issued_by == "alice"
    assert hub.state.version == 1 and hub.state.effective_k == 12  # other classes untouched

    # a per-device latency override: k from that device's own measured per-layer latency
    set_budget(reg, fleet.broker.url, "edge", latency_ms=20.0, device_id="edge-1", issued_by="bob")
    assert wait_until(lambda: reg.device("edge-1").applied_version == 3 and reg.device("edge-1").converged, 20)
    want = layers_for_latency(20.0, 5.0, EDGE_MS)
    assert edge[1].state.effective_k == want and edge[1].state.expected_latency_ms <= 20.0
    assert edge[0].state.version == 2 and edge[2].state.version == 2

    # clearing it falls back to the class policy, with a higher version (versions only go up)
    clear_budget(reg, fleet.broker.url, "edge", device_id="edge-1", issued_by="bob")
    assert wait_until(lambda: reg.device("edge-1").applied_version == 4 and reg.device("edge-1").converged, 20)
    assert edge[1].state.effective_k == 6 and edge[1].state.policy.source == "class"

    acks = reg.acks("edge-1")
    assert [a.applied_version for a in sorted(acks, key=lambda a: a.id) if a.version] == [1, 2, 3, 4]
    assert all(a.status == "applied" for a in acks) and acks[0].converged
    assert ctl.stats.dropped == 0
    assert [h.issued_by for h in reg.policy_history("edge")] == ["alice", "bob", "bob"]


def test_offline_device_catches_up_and_stale_versions_are_never_applied(sqlite_fleet: Fleet):
    f = sqlite_fleet
    reg = f.registry
    f.controller()
    f.agent("pi-01", "pi4")
    b = f.agent("pi-02", "pi4")
    assert wait_until(lambda: converged(reg, ["pi-01", "pi-02"], 1), 30)

    f.agents["pi-01"].stop()
    assert wait_until(lambda: reg.device("pi-01").online is False, 20)
    set_budget(reg, f.broker.url, "pi4", keep=0.5, issued_by="alice")
    assert b.wait_for_version(2, 20)
    set_budget(reg, f.broker.url, "pi4", keep=0.25, issued_by="alice")
    assert b.wait_for_version(3, 20) and b.state.effective_k == 3
    dev = reg.device("pi-01")
    assert (dev.desired_version, dev.applied_version, dev.converged) == (3, 1, False)

    # back online with its state: it receives the latest desired document only
    a = f.agent("pi-01", "pi4")
    assert a.wait_for_version(3, 20)
    assert a.state.effective_k == 3
    assert wait_until(lambda: reg.device("pi-01").converged and reg.device("pi-01").online, 20)
    applied = [x.applied_version for x in reg.acks("pi-01")]
    assert 2 not in applied  # the intermediate version was never applied

    # a stale or repeated desired document (e.g. from an old controller) is ignored, not acked
    seen = len(reg.acks("pi-01"))
    for v in (2, 3):
        stale = BudgetPolicy(device_id="pi-01", version=v, source="class", keep=1.0, issued_at=utcnow(), issued_by="old-controller")
        publish_once(parse_broker_url(f.broker.url), [(topics.policy_desired("pi-01"), stale.to_json(), 1, False)])
    marker = BudgetPolicy(device_id="pi-02", version=99, source="class", keep=1.0, issued_at=utcnow(), issued_by="test")
    publish_once(parse_broker_url(f.broker.url), [(topics.policy_desired("pi-02"), marker.to_json(), 1, False)])
    assert b.wait_for_version(99, 20)  # the broker has delivered everything published before
    assert a.state.version == 3 and a.state.effective_k == 3 and a.state.policy.keep == 0.25
    assert load_device_state(a.state_dir).version == 3
    # the controller has seen pi-02's ack of 99 (and, finding the device ahead of the registry,
    # publishes the class policy again above it: 100); pi-01 sent no ack for the stale documents
    assert wait_until(lambda: reg.device("pi-02").applied_version >= 99, 20)
    assert wait_until(lambda: reg.device("pi-02").desired_version == 100 and reg.device("pi-02").converged, 20)
    assert b.state.policy.keep == 0.25
    assert len(reg.acks("pi-01")) == seen


def test_broker_restart_mid_run_heals_by_itself(sqlite_fleet: Fleet):
    f = sqlite_fleet
    reg = f.registry
    ctl = f.controller()
    agents = [f.agent(f"dev-{i}", "pi4") for i in range(3)]
    ids = [a.device_id for a in agents]
    assert wait_until(lambda: converged(reg, ids, 1), 30)

    f.broker.stop()
    assert wait_until(lambda: not ctl.session.connected and not any(a.session.connected for a in agents), 20)
    res = set_budget(reg, f.broker.url, "pi4", keep=0.5, issued_by="alice")  # written, but nobody to tell
    assert not res.notified
    f.broker.start()  # same port, same persistence directory
    assert wait_until(lambda: ctl.session.connect_count >= 2 and all(a.session.connect_count >= 2 for a in agents), 30)
    assert wait_until(lambda: converged(reg, ids, 2), 30), "the change made while the broker was down did not arrive"
    assert all(a.state.version == 2 and a.state.effective_k == 6 for a in agents)
    assert all(reg.device(d).online for d in ids)

    # what was acknowledged survives another restart: in the registry and retained on the broker
    f.broker.restart()
    assert wait_until(lambda: ctl.session.connect_count >= 3 and all(a.session.connect_count >= 3 for a in agents), 30)
    for d in ids:
        ack = PolicyAck.model_validate_json(read_retained(f.broker.url, topics.policy_reported(d)))
        desired = BudgetPolicy.model_validate_json(read_retained(f.broker.url, topics.policy_desired(d)))
        assert ack.applied_version == desired.version == 2
    assert converged(reg, ids, 2)
    set_budget(reg, f.broker.url, "pi4", keep=0.25, issued_by="alice")
    assert wait_until(lambda: converged(reg, ids, 3), 30)
    assert ControllerStatus.model_validate_json(read_retained(f.broker.url, topics.ctl_status(ctl.controller_id))).online


def test_bad_input_is_refused_with_a_reason_and_changes_nothing(sqlite_fleet: Fleet, caplog):
    f = sqlite_fleet
    reg = f.registry
    reg.add_class("pi4")
    ctl = f.controller(strict_classes=True)
    good = f.agent("pi-01", "pi4")
    assert wait_until(lambda: converged(reg, ["pi-01"], 1), 30)
    assert ctl.wait_idle(10)

    def snapshot():
        devs = [(d.device_id, d.device_class, d.online, d.desired_version, d.applied_version, d.ack_status, d.profile) for d in reg.devices()]
        return devs, [c.name for c in reg.classes()], len(reg.acks()), [p.id for p in reg.policy_history()]

    before = snapshot()
    dropped_before = ctl.stats.dropped
    profile = good.profile
    pol_ok = BudgetPolicy(device_id="pi-01", version=50, source="class", keep=0.5, issued_at=utcnow(), issued_by="mallory")
    forged = [
        (topics.profile("pi-02"), b'{"schema": "ldfleet.profile/1", "device_id": ', "Invalid JSON"),
        (topics.status("pi-02"), b'{"schema": "ldfleet.status/9", "device_id": "pi-02", "online": true, "boot_id": "x"}', "schema"),
        (topics.profile("pi-02"), b"{" + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}", "oversized"),
        (topics.profile("pi-03"), profile.to_json(), "does not match topic device 'pi-03'"),
        (topics.policy_reported("pi-03"), PolicyAck(device_id="pi-01", applied_version=7, status="applied").to_json(), "does not match topic"),
        (topics.profile("pi-04"), profile.model_copy(update={"device_id": "pi-04", "device_class": "ghost"}).to_json(), "unknown device class 'ghost'"),
        (topics.policy_reported("pi-01"), b'{"schema": "ldfleet.ack/1", "device_id": "pi-01", "applied_version": 5, "status": "applied", "expected_latency_ms": NaN}', "finite"),
        (topics.policy_reported("pi-01"), b'{"schema": "ldfleet.ack/1", "device_id": "pi-01", "applied_version": -5, "status": "applied"}', "applied_version"),
        (topics.profile("pi-01"), profile.model_copy(update={"layer_ms": []}).to_json().replace(b'"layer_ms":[]', b'"layer_ms":[-1,2,3,4,5,6,7,8,9,10,11,12]'), "layer_ms"),
        (topics.CTL_POLICY_CHANGED, b"rm -rf /", "Invalid JSON"),
        (topics.telemetry("pi-01"), b'{"schema": "ldfleet.telemetry/1", "device_id": "pi-01", "load": -1}', "load"),
        ("ldfleet/v1/dev/pi-01/policy/desired", pol_ok.to_json().replace(b'"keep":0.5', b'"keep":-1.0'), "keep"),
        ("ldfleet/v1/dev/pi-01/policy/desired", pol_ok.to_json().replace(b'"keep":0.5', b'"keep":NaN'), "keep"),
    ]
    with caplog.at_level(logging.WARNING):
        publish_once(parse_broker_url(f.broker.url), [(t, p, 1, False) for t, p, _ in forged])
        # the controller refuses everything but the two forged desired documents (it does not read
        # desired topics); the agent refuses those two
        assert wait_until(lambda: ctl.stats.dropped - dropped_before >= len(forged) - 2, 20)
        assert ctl.wait_idle(10)
        assert wait_until(lambda: caplog.text.count("pi-01/policy/desired") >= 2, 10)
    for _, _, why in forged:
        assert why.lower() in caplog.text.lower(), f"no logged reason containing {why!r}"
    assert snapshot() == before, "bad input changed the registry"
    assert good.state.version == 1 and good.state.effective_k == 12
    assert ctl._worker is not None and ctl._worker.is_alive()

    # and everything still works
    set_budget(reg, f.broker.url, "pi4", keep=0.5, issued_by="alice")
    assert wait_until(lambda: converged(reg, ["pi-01"], 2), 20)
    assert good.state.effective_k == 6


def test_a_policy_with_fields_the_agent_does_not_know_is_rejected_with_their_names(sqlite_fleet: Fleet, caplog):
    """A newer controller's policy (a field this agent's schema lacks) is not dropped in silence: the
    agent rejects that version once, naming the field, and keeps the policy in force; a message
    with a bad value is still only dropped, and the next readable version applies."""
    f = sqlite_fleet
    reg = f.registry
    f.controller()
    a = f.agent("pi-01", "pi4")
    assert wait_until(lambda: converged(reg, ["pi-01"], 1), 30)
    future = BudgetPolicy(device_id="pi-01", version=7, source="class", keep=0.5, issued_at=utcnow(), issued_by="ops")
    newer = future.to_json()[:-1] + b',"max_temperature_c":70}'
    broken = future.model_copy(update={"version": 8}).to_json().replace(b'"keep":0.5', b'"keep":-1.0')[:-1] + b',"x":1}'
    url = parse_broker_url(f.broker.url)
    with caplog.at_level(logging.WARNING):
        publish_once(url, [(topics.policy_desired("pi-01"), newer, 1, False)] * 2 + [(topics.policy_desired("pi-01"), broken, 1, False)])
        assert wait_until(lambda: reg.device("pi-01").ack_status == "rejected", 20)
        assert wait_until(lambda: caplog.text.count("pi-01/policy/desired") >= 3, 10)
    dev = reg.device("pi-01")
    assert "'max_temperature_c'" in dev.ack_reason and "policy version 7" in dev.ack_reason
    assert dev.applied_version == 1 and a.state.version == 1 and a.state.effective_k == 12
    assert a.state.last_rejected_version == 7  # version 8 (a bad value as well) was only dropped
    assert [(x.version, x.status) for x in reg.acks("pi-01") if x.status == "rejected"] == [(7, "rejected")]  # once
    set_budget(reg, f.broker.url, "pi4", keep=0.25, issued_by="alice")
    assert wait_until(lambda: converged(reg, ["pi-01"], 2), 20) and a.state.effective_k == 3
    # a readable policy of a version refused for unknown fields (a forged one came first) still applies
    readable = future.model_copy(update={"version": 9})
    publish_once(url, [(topics.policy_desired("pi-01"), readable.to_json()[:-1] + b',"zz":1}', 1, False)])
    assert wait_until(lambda: a.state.last_rejected_version == 9, 10)
    publish_once(url, [(topics.policy_desired("pi-01"), readable.to_json(), 1, False)])
    assert a.wait_for_version(9, 10) and a.state.effective_k == 6


def test_an_expiring_policy_lapses_back_to_the_default(sqlite_fleet: Fleet):
    f = sqlite_fleet
    reg = f.registry
    f.controller(poll_interval_s=0.3)
    a = f.agent("pi-01", "pi4")
    assert wait_until(lambda: converged(reg, ["pi-01"], 1), 30)
    set_budget(reg, f.broker.url, "pi4", keep=0.5, issued_by="alice", expires_in_s=2.0)
    assert a.wait_for_version(2, 20) and a.state.effective_k == 6 and a.state.policy.expires_at is not None
    # no operator action: the controller's poll notices the expiry and publishes the default
    assert a.wait_for_version(3, 30), "the expired policy was not replaced"
    assert a.state.effective_k == 12 and a.state.policy.source == "default"
    assert wait_until(lambda: converged(reg, ["pi-01"], 3), 20)


def test_mqtt_311_agents_and_controller_work_too(sqlite_fleet: Fleet):
    """For brokers that speak only MQTT 3.1.1 (e.g. amqtt): same flow, no reason codes."""
    f = sqlite_fleet
    reg = f.registry
    f.controller(mqtt_version=311)
    a = f.agent("old-01", "legacy", mqtt_version=311)
    assert wait_until(lambda: converged(reg, ["old-01"], 1), 30)
    set_budget(reg, f.broker.url, "legacy", keep=0.25, issued_by="alice")
    assert a.wait_for_version(2, 20) and a.state.effective_k == 3
    with pytest.raises(ValueError, match="5 or 311"):
        f.controller(mqtt_version=4)


def test_a_namesake_controller_stopping_does_not_hide_the_one_still_running(sqlite_fleet: Fleet):
    """Two controllers with one id: when one stops, its retained "offline" replaces the other's
    status; the running one says online again, so `budget set` still finds it."""
    from ldfleet.server.operator import controllers_online

    f = sqlite_fleet
    live = f.controller()
    second = f.controller()
    assert live.controller_id == second.controller_id
    second.stop()
    f.controllers.remove(second)
    assert wait_until(lambda: controllers_online(f.broker.url) == [live.controller_id], 20)
    assert json.loads(read_retained(f.broker.url, topics.ctl_status(live.controller_id)))["boot_id"] == live.boot_id
