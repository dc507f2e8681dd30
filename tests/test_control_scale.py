"""Issue 12: nothing lost under bursts, several controllers. Real Mosquitto, real registries, small fleets
(the big numbers are in `ldfleet bench control-plane`)."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select, update

from control_fixtures import broker, db_url, fleet, pg_admin, pg_url, sqlite_fleet  # noqa: F401 - fixtures
from control_fixtures import Fleet, converged, wait_until
from ldfleet.client.profile import synthetic_profile
from ldfleet.common import topics
from ldfleet.common.reannounce import ReannounceBackoff
from ldfleet.common.schemas import PolicyAck, Status, utcnow
from ldfleet.server.intake import BatchWriter, Intake
from ldfleet.server.publisher import PolicyPublisher, ProfileCache, Work
from ldfleet.server.registry import DesiredPolicyRecord, Device, Registry
from ldfleet.server.registry.models import PolicyAckRecord


def test_reannounce_backoff_doubles_with_bounded_jitter_up_to_the_cap():
    b = ReannounceBackoff(first_s=1.0, max_s=8.0, jitter=0.5, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    for d, base in zip(delays, [1, 2, 4, 8, 8, 8]):
        assert 0.5 * base <= d <= 1.5 * base
    b.reset()
    assert b.next_delay() <= 1.5
    with pytest.raises(ValueError):
        ReannounceBackoff(first_s=0)


def _registry_with_devices(url: str, n: int) -> Registry:
    reg = Registry(url)
    with reg.session() as s:
        for i in range(n):
            p = synthetic_profile(f"d{i:03d}", "pi4", num_layers=12, layer_ms=2.0, front_end_ms=5.0)
            s.merge(Device(device_id=p.device_id, device_class="pi4", profile=p.model_dump(mode="json", by_alias=True),
                           desired_version=0, applied_version=0, online=True, class_pinned=False))
    return reg


def test_two_publishers_resolving_the_same_devices_claim_each_version_once(db_url):
    """Two controllers' publishers race on the same 150 devices: every device gets version 1 exactly
    once, published by exactly one of them; the loser counts lost claims and publishes nothing."""
    reg = Registry(db_url)
    reg.add_class("pi4")
    reg.close()
    reg = _registry_with_devices(db_url, 150)
    published: list[list[str]] = [[], []]
    pubs = [
        PolicyPublisher(Registry(db_url), lambda t, p, k=k: published[k].append(t), controller_id=f"c{k}", resolve_chunk=50)
        for k in range(2)
    ]
    start = threading.Barrier(2)

    def go(p: PolicyPublisher) -> None:
        start.wait()
        p.resolve_and_publish(Work(all=True))

    threads = [threading.Thread(target=go, args=(p,)) for p in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    topics_out = published[0] + published[1]
    assert len(topics_out) == 150 and len(set(topics_out)) == 150  # each device published once in all
    with reg.session() as s:
        assert s.scalar(select(func.count()).select_from(DesiredPolicyRecord)) == 150
        assert s.scalar(select(func.max(DesiredPolicyRecord.version))) == 1
        assert set(s.scalars(select(Device.desired_version))) == {1}
    # a second pass changes nothing (same policy): no new version anywhere
    assert pubs[0].resolve_and_publish(Work(all=True)) == 0
    for p in pubs:
        p.registry.close()
    reg.close()


def test_a_lost_ack_is_recovered_by_reconciliation(sqlite_fleet: Fleet):
    """The registry lacks a device's ack of its desired version (as if the broker dropped it): the
    controller republishes and asks for a rebirth; the device re-announces its ack; converged again."""
    f = sqlite_fleet
    ctl = f.controller(ack_bound_s=0.5, reconcile_interval_s=0.2)
    ag = f.agent("lost-1", "pi4")
    assert wait_until(lambda: converged(f.registry, ["lost-1"]), 30)
    with f.registry.session() as s:  # the ack "never arrived" (neither its row nor its effect), a while ago
        s.execute(update(Device).where(Device.device_id == "lost-1").values(applied_version=0, desired_at=utcnow() - timedelta(seconds=5)))
        s.execute(delete(PolicyAckRecord).where(PolicyAckRecord.device_id == "lost-1"))
    assert not converged(f.registry, ["lost-1"])
    assert wait_until(lambda: converged(f.registry, ["lost-1"]), 30)
    assert ctl.stats.rebirth_requests >= 1
    assert ag.state.version == f.registry.device("lost-1").desired_version  # nothing new was applied


def test_second_controller_shares_the_fleet_and_a_missed_birth_is_re_announced(sqlite_fleet: Fleet):
    """Controllers in a shared group get no retained messages (MQTT 5), so devices that announced
    before any controller listened are unknown to it: they re-announce by themselves (backoff) and
    converge; the two controllers never publish the same version twice."""
    f = sqlite_fleet
    agents = [f.agent(f"late-{i}", "pi4") for i in range(4)]
    for ag in agents:
        ag.reannounce = ReannounceBackoff(first_s=1.0, max_s=2.0)
        assert ag.session.wait_connected(15)
    ctls = [f.controller(shared_group="ctl", controller_id=f"c{i}") for i in range(2)]
    ids = [ag.device_id for ag in agents]
    assert wait_until(lambda: converged(f.registry, ids), 40)
    f.registry.set_policy("pi4", keep=0.5, issued_by="test")
    from ldfleet.server.operator import notify_controller
    notify_controller(f.broker.url, device_class="pi4")
    assert wait_until(lambda: converged(f.registry, ids) and all(f.registry.device(d).desired_version == 2 for d in ids), 30)
    with f.registry.session() as s:
        rows = s.execute(select(DesiredPolicyRecord.device_id, DesiredPolicyRecord.version)).all()
    assert sorted(rows) == sorted((d, v) for d in ids for v in (1, 2))
    assert sum(c.stats.received for c in ctls) > 0 and all(c.stats.dropped == 0 for c in ctls)


def test_intake_lets_a_batch_of_acks_fill_but_hands_over_an_operator_notice_at_once():
    intake = Intake()
    ack = topics.policy_reported("dev-1")

    def then_put(*topics_: str) -> threading.Thread:
        def run() -> None:  # once the worker holds the first message, more arrive
            while intake.idle.is_set() or not intake.empty():
                time.sleep(0.001)
            for t in topics_:
                intake.put(t, b"{}")
        th = threading.Thread(target=run)
        th.start()
        return th

    intake.idle.set()
    intake.put(ack, b"{}")
    th = then_put(ack, ack)
    batch = intake.take(3, timeout=5, linger_s=60)  # returns once 3 are in: the later two joined
    th.join()
    assert [t for t, _, _ in batch] == [ack, ack, ack]

    intake.idle.set()
    intake.put(ack, b"{}")
    th = then_put(topics.CTL_POLICY_CHANGED)
    t0 = time.monotonic()
    batch = intake.take(100, timeout=5, linger_s=60)
    th.join()
    assert [t for t, _, _ in batch] == [ack, topics.CTL_POLICY_CHANGED]
    assert time.monotonic() - t0 < 60  # did not sit out the linger: a notice starts a resolution


def test_a_device_row_deleted_after_the_intake_saw_it_is_created_again(db_url):
    """The intake skips the INSERT of devices it has seen committed; a row gone since is re-created."""
    reg = Registry(db_url)
    writer = BatchWriter(ProfileCache())

    def apply(*msgs) -> None:
        with reg.session(write=True) as s:
            writer.apply(s, [(t, m.to_json(), utcnow()) for t, m in msgs], Work())
        writer.committed()

    try:
        apply((topics.status("d1"), Status(device_id="d1", online=True, boot_id="b1", seq=1, sent_at=utcnow())))
        assert reg.device("d1").online
        with reg.session() as s:
            s.execute(delete(Device).where(Device.device_id == "d1"))
        assert reg.device("d1") is None
        apply((topics.policy_reported("d1"), PolicyAck(device_id="d1", version=1, applied_version=1, status="applied")))
        assert reg.device("d1").applied_version == 1
        assert [a.version for a in reg.acks("d1")] == [1]
    finally:
        reg.close()
