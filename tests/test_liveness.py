"""Liveness follows birth/death sequence numbers; every controller handler is idempotent under
redelivery; time decisions do not depend on the device's clock (issue 11, MQTT fleet).

The ordering rules on their own (``fold``), then real Mosquitto + a real controller on SQLite and
PostgreSQL: a retained death of an earlier boot arriving while the device is live does not flip it
offline; an ack, a birth and a profile delivered twice are stored once and change nothing; a device
whose clock runs two hours fast applies a policy that expires in one hour.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ldfleet.client.agent import evaluate_policy
from ldfleet.client.state import DeviceState
from ldfleet.client.profile import synthetic_profile
from ldfleet.common import topics
from ldfleet.common.mqtt import parse_broker_url
from ldfleet.common.schemas import BudgetPolicy, PolicyAck, Status, utcnow
from ldfleet.server.liveness import Liveness, fold

from control_fixtures import broker, db_url, fleet, pg_admin, pg_url, sqlite_fleet, wait_until  # noqa: F401

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _st(online: bool, boot: str, boot_seq: int, seq: int) -> Status:
    return Status(device_id="d1", online=online, boot_id=boot, boot_seq=boot_seq, seq=seq)


def _run(*msgs: Status, start: Liveness = Liveness(), step_s: float = 1.0) -> Liveness:
    cur = start
    for i, m in enumerate(msgs):
        cur, _ = fold(cur, m, T0 + timedelta(seconds=i * step_s))
    return cur


def test_a_death_of_an_earlier_boot_never_overrides_a_later_birth():
    cur = _run(_st(True, "old", 1, 1), _st(True, "new", 2, 1), _st(False, "old", 1, 1))
    assert cur.online and cur.boot_id == "new" and cur.boot_seq == 2
    # even from an agent that predates boot counters (boot_seq 0): a death only ends its own boot
    assert _run(_st(True, "a", 0, 1), _st(True, "b", 0, 1), _st(False, "a", 0, 0)).online


def test_deaths_and_births_within_one_boot_follow_the_connection_number():
    assert not _run(_st(True, "b", 3, 1), _st(False, "b", 3, 1)).online  # the current connection died
    assert _run(_st(True, "b", 3, 2), _st(False, "b", 3, 1)).online  # the will of an older connection: ignored
    assert not _run(_st(True, "b", 3, 2), _st(False, "b", 3, 0)).online  # legacy will (seq 0) of this boot
    assert _run(_st(True, "b", 3, 1), _st(False, "b", 3, 1), _st(True, "b", 3, 2)).online  # reconnected
    assert not _run(_st(True, "b", 3, 1), _st(False, "b", 3, 1), _st(True, "b", 3, 1)).online  # old birth again
    assert not _run(_st(False, "b", 3, 1), _st(True, "new", 4, 1), _st(False, "new", 4, 1)).online


def test_redelivery_changes_nothing():
    cur = _run(_st(True, "b", 2, 5))
    again, note = fold(cur, _st(True, "b", 2, 5), T0 + timedelta(hours=1))
    assert again is cur and note is None


def test_two_boots_taking_turns_are_a_duplicate_and_a_restart_is_not():
    restart = _run(_st(True, "a", 1, 1), _st(False, "a", 1, 1), _st(True, "b", 2, 1))
    assert restart.duplicate_at is None and restart.replaced_boot_id == "a"
    turns = _run(_st(True, "a", 1, 1), _st(False, "a", 1, 1), _st(True, "b", 1, 1), _st(False, "b", 1, 1), _st(True, "a", 1, 2))
    assert turns.duplicate_at is not None and turns.duplicate_boot_id == "b"
    # an earlier boot born again while the later one is fresh: duplicate, and it does not take over
    earlier = _run(_st(True, "a", 5, 1), _st(False, "a", 5, 1), _st(True, "b", 2, 1))
    assert earlier.duplicate_at is not None and earlier.boot_id == "a" and not earlier.online
    # ... but long after the later boot went quiet it is a device whose state folder was reset
    reset = _run(_st(True, "a", 5, 1), _st(False, "a", 5, 1), _st(True, "b", 1, 1), step_s=3600)
    assert reset.online and reset.boot_id == "b" and reset.duplicate_at is None


def _raw_client(url: str) -> paho.Client:
    u = parse_broker_url(url)
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(u.host, u.port)
    c.loop_start()
    return c


def _publish(c: paho.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def test_a_retained_death_of_an_earlier_boot_does_not_flip_a_live_device(sqlite_fleet):
    fleet = sqlite_fleet
    ctl = fleet.controller()
    first = fleet.agent("pi-1", "pi4")
    assert wait_until(lambda: (d := fleet.registry.device("pi-1")) is not None and d.online and d.boot_seq == 1)
    first.stop()
    assert wait_until(lambda: not fleet.registry.device("pi-1").online)
    del fleet.agents["pi-1"]
    second = fleet.agent("pi-1", "pi4")  # same state folder: boot 2
    assert second.boot_seq == 2 and second.previous_boot_id == first.boot_id
    assert wait_until(lambda: fleet.registry.device("pi-1").boot_id == second.boot_id and fleet.registry.device("pi-1").online)
    # the earlier boot's death arrives late, retained (e.g. a broker bridge replaying it)
    c = _raw_client(fleet.broker.url)
    try:
        old = Status(device_id="pi-1", online=False, boot_id=first.boot_id, boot_seq=1, seq=1, sent_at=utcnow())
        before = ctl.stats.received
        _publish(c, topics.status("pi-1"), old.to_json(), retain=True)
        assert wait_until(lambda: ctl.stats.received > before and ctl.wait_idle(5))
        dev = fleet.registry.device("pi-1")
        assert dev.online and dev.boot_id == second.boot_id and dev.boot_seq == 2
        # the same birth delivered again changes nothing (not even status_at)
        at = dev.status_at
        birth = Status(device_id="pi-1", online=True, boot_id=second.boot_id, boot_seq=2, seq=second.seq)
        before = ctl.stats.received
        _publish(c, topics.status("pi-1"), birth.to_json())
        assert wait_until(lambda: ctl.stats.received > before and ctl.wait_idle(5))
        assert fleet.registry.device("pi-1").status_at == at
    finally:
        c.disconnect()
        c.loop_stop()


def test_an_ack_and_a_profile_delivered_twice_are_stored_once(fleet):
    ctl = fleet.controller()
    ag = fleet.agent("pi-2", "pi4")
    assert wait_until(lambda: (d := fleet.registry.device("pi-2")) is not None and d.converged)
    dev = fleet.registry.device("pi-2")
    acks_before = len(fleet.registry.acks("pi-2"))
    profile_at, desired = dev.profile_at, dev.desired_version
    c = _raw_client(fleet.broker.url)
    try:
        ack = PolicyAck(device_id="pi-2", version=dev.desired_version, applied_version=dev.applied_version,
                        status="applied", effective_k=dev.effective_k, acked_at=utcnow())
        before = ctl.stats.received
        for _ in range(2):  # QoS 1 redelivery, and the agent's re-announcement after a reconnect
            _publish(c, topics.policy_reported("pi-2"), ack.to_json())
            _publish(c, topics.profile("pi-2"), ag.profile.to_json())
        assert wait_until(lambda: ctl.stats.received >= before + 4 and ctl.wait_idle(5))
    finally:
        c.disconnect()
        c.loop_stop()
    rows = fleet.registry.acks("pi-2")
    assert len(rows) == acks_before == 1, [(r.version, r.applied_version, r.status) for r in rows]
    dev = fleet.registry.device("pi-2")
    assert dev.profile_at == profile_at and dev.desired_version == desired  # no new resolution either
    # an agent restart re-announces its ack: still one row
    ag.stop()
    del fleet.agents["pi-2"]
    fleet.agent("pi-2", "pi4")
    assert wait_until(lambda: fleet.registry.device("pi-2").boot_seq == 2 and ctl.wait_idle(5))
    assert len(fleet.registry.acks("pi-2")) == 1


def test_the_unique_ack_key_holds_in_the_database_too(db_url):
    """Two controllers racing on one registry: the INSERT itself ignores a repeat (ON CONFLICT DO NOTHING)."""
    from ldfleet.server.acks import _ACKS, insert_or_ignore, store
    from ldfleet.server.registry import Registry
    from ldfleet.server.registry.models import Device

    reg = Registry(db_url)
    try:
        with reg.session() as s:
            s.add(Device(device_id="d9", first_seen=utcnow(), desired_version=1, applied_version=0, online=False, class_pinned=False))
        ack = PolicyAck(device_id="d9", version=1, applied_version=1, status="applied")
        with reg.session() as s:  # twice in one batch: one row, one device update
            assert len(store(s, [(ack, utcnow()), (ack, utcnow())], {"d9": 1})) == 1
        with reg.session() as s:  # again in a later batch: nothing
            assert store(s, [(ack, utcnow())], {"d9": 1}) == []
        row = {"device_id": "d9", "version": 1, "applied_version": 1, "status": "applied", "desired_version": 1,
               "converged": True, "received_at": utcnow()}
        with reg.session() as s:  # past the pre-check, as a racing controller would be
            insert_or_ignore(s, _ACKS, [row, row])
        assert len(reg.acks("d9")) == 1
    finally:
        reg.close()


def _policy(version: int, **kw) -> BudgetPolicy:
    base = dict(device_id="pi-01", version=version, source="class", device_class="pi4", keep=0.5,
                issued_at=T0, issued_by="alice")
    return BudgetPolicy(**{**base, **kw})


def test_expiry_is_counted_from_receipt_not_read_off_the_device_clock():
    prof = synthetic_profile("pi-01", "pi4", num_layers=12, layer_ms=1.0)
    state = DeviceState(device_id="pi-01", device_class="pi4")
    sent = T0
    policy = _policy(2, expires_at=sent + timedelta(hours=1)).stamped(sent)
    assert policy.ttl_s == 3600.0
    fast_clock = sent + timedelta(hours=2)  # this device's clock runs two hours fast
    d = evaluate_policy(policy, state, prof, now=fast_clock)
    assert d.ack.status == "applied"
    # a policy the controller says has run out is refused, whatever the device's clock says
    late = _policy(3, expires_at=sent + timedelta(hours=1)).stamped(sent + timedelta(hours=1, seconds=1))
    assert late.ttl_s == 0.0
    assert evaluate_policy(late, d.state, prof, now=sent).ack.status == "rejected"


def test_a_policy_refused_for_time_is_evaluated_again_after_the_clock_is_fixed():
    prof = synthetic_profile("pi-01", "pi4", num_layers=12, layer_ms=1.0)
    state = DeviceState(device_id="pi-01", device_class="pi4")
    legacy = _policy(2, expires_at=T0 + timedelta(hours=1))  # from a controller without ttl_s
    d = evaluate_policy(legacy, state, prof, now=T0 + timedelta(hours=2))
    assert d.ack.status == "rejected" and "this device's clock" in d.ack.reason and d.state.last_rejected_retryable
    fixed = evaluate_policy(legacy, d.state, prof, now=T0 + timedelta(minutes=1))
    assert fixed.ack is not None and fixed.ack.status == "applied" and fixed.state.version == 2
    # a refusal that is not about time stays answered once
    big = _policy(4, keep=None, latency_ms=1.0, k=20, num_layers=None)
    r = evaluate_policy(big, fixed.state, prof, now=T0)
    assert r.ack.status == "rejected" and not r.state.last_rejected_retryable
    assert evaluate_policy(big, r.state, prof, now=T0).ack is None


def test_a_device_with_a_clock_two_hours_fast_applies_a_policy_expiring_in_an_hour(sqlite_fleet):
    fleet = sqlite_fleet
    fleet.controller()
    ag = fleet.agent("pi-3", "pi4", clock=lambda: utcnow() + timedelta(hours=2))
    assert wait_until(lambda: (d := fleet.registry.device("pi-3")) is not None and d.converged)
    fleet.registry.set_policy("pi4", keep=0.5, expires_at=utcnow() + timedelta(hours=1))
    assert wait_until(lambda: ag.state.policy is not None and ag.state.policy.keep == 0.5, 30), ag.state.last_rejected_reason
    assert wait_until(lambda: fleet.registry.device("pi-3").ack_status == "applied" and fleet.registry.device("pi-3").converged)
    assert 3500 < ag.state.policy.ttl_s <= 3600
