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
from control_fixtures import Fleet, converged, read_retained, wait_until
from ldfleet.client.profile import synthetic_profile
from ldfleet.common import topics
from ldfleet.common.mqtt import parse_broker_url, publish_once
from ldfleet.common.reannounce import ReannounceBackoff
from ldfleet.common.schemas import ControllerStatus, PolicyAck, Status, utcnow
from ldfleet.server.group import Group
from ldfleet.server.intake import BatchWriter, Intake
from ldfleet.server.publisher import PolicyPublisher, ProfileCache, Work
from ldfleet.server.reconcile import Reconciler
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


def _two_controllers_after_the_fleet(f: Fleet, backoff: ReannounceBackoff, *, lose_births: bool) -> list[str]:
    """Four devices announce, then (``lose_births``: their retained birth and profile are lost) two
    controllers of one shared group start, a budget change follows; both versions reach every
    device, claimed once each."""
    agents = [f.agent(f"late-{i}", "pi4", start=False) for i in range(4)]
    ids = [ag.device_id for ag in agents]
    for ag in agents:
        ag.reannounce = backoff  # before start: the first wait already uses it
        ag.start()
    for ag in agents:
        assert ag.session.wait_connected(15)
    if lose_births:
        assert wait_until(lambda: all(read_retained(f.broker.url, topics.profile(d), 1) for d in ids), 15)
        publish_once(parse_broker_url(f.broker.url), [(getattr(topics, ch)(d), b"", 1, True) for d in ids for ch in ("status", "profile")])
    ctls = [f.controller(shared_group="ctl", controller_id=f"c{i}") for i in range(2)]
    assert wait_until(lambda: converged(f.registry, ids), 40)
    f.registry.set_policy("pi4", keep=0.5, issued_by="test")
    from ldfleet.server.operator import notify_controller
    notify_controller(f.broker.url, device_class="pi4")
    assert wait_until(lambda: converged(f.registry, ids) and all(f.registry.device(d).desired_version == 2 for d in ids), 30)
    with f.registry.session() as s:
        rows = s.execute(select(DesiredPolicyRecord.device_id, DesiredPolicyRecord.version)).all()
    assert sorted(rows) == sorted((d, v) for d in ids for v in (1, 2))
    assert sum(c.stats.received for c in ctls) > 0 and all(c.stats.dropped == 0 for c in ctls)
    return ids


def test_controllers_that_start_after_the_fleet_read_its_retained_state(sqlite_fleet: Fleet):
    """Shared subscriptions deliver no retained messages: the controllers read them once, so devices
    that announced before any controller listened converge without re-announcing (their backoff
    is an hour here)."""
    _two_controllers_after_the_fleet(sqlite_fleet, ReannounceBackoff(first_s=3600.0, max_s=3600.0), lose_births=False)


def test_devices_whose_birth_was_lost_re_announce_and_converge(sqlite_fleet: Fleet):
    """A birth and profile the broker lost (deleted here) reach no controller, retained or not: the
    devices re-announce by themselves (backoff) and converge."""
    _two_controllers_after_the_fleet(sqlite_fleet, ReannounceBackoff(first_s=1.0, max_s=2.0), lose_births=True)


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


def test_a_namesake_controller_is_warned_about_once_and_changes_no_share(caplog):
    """Two controllers started with one --controller-id overwrite each other's retained status: the
    one that hears the other's boot says so, once per boot, and does not count it as a peer."""
    g = Group("ctl", "boot-a")
    with caplog.at_level("WARNING", logger="ldfleet.controller"):
        g.note(ControllerStatus(controller_id="ctl", online=True, boot_id="boot-a"))  # its own: nothing to say
        assert not caplog.records
        for _ in range(2):
            g.note(ControllerStatus(controller_id="ctl", online=True, boot_id="boot-b"))
        g.note(ControllerStatus(controller_id="ctl", online=False, boot_id="boot-c"))  # gone: nothing to say
    assert [r.getMessage().count("boot-b") for r in caplog.records] == [1] and "--controller-id" in caplog.records[0].getMessage()
    assert g.online == {"ctl": True} and not g.take_changed() and g.share()("any-device")


def test_a_group_resolves_a_class_in_shares_and_covers_a_member_that_left(db_url):
    """Two members of a group resolve a fleet-wide change: each publishes only its share, together
    every device once. When one goes, the other hears the change and its next fleet-wide pass covers
    the devices the gone member never published."""
    reg = Registry(db_url)
    reg.add_class("pi4")
    reg.close()
    reg = _registry_with_devices(db_url, 120)
    groups = [Group(f"c{k}") for k in range(2)]
    for g in groups:
        for k in range(2):
            g.note(ControllerStatus(controller_id=f"c{k}", online=True, boot_id="b"))
        assert g.take_changed() and not g.take_changed()  # the peer coming online, reported once
    published: list[list[str]] = [[], []]
    pubs = [PolicyPublisher(Registry(db_url), lambda t, p, k=k: published[k].append(t), controller_id=f"c{k}") for k in range(2)]
    try:
        assert pubs[0].resolve_and_publish(Work(all=True, share=groups[0].share())) == len(published[0]) > 0
        assert 0 < len(published[0]) < 120  # only its share
        assert pubs[1].resolve_and_publish(Work(all=True, share=groups[1].share())) == len(published[1]) > 0
        assert sorted(published[0] + published[1]) == sorted(set(published[0] + published[1]))  # none twice
        assert len(published[0]) + len(published[1]) == 120
        # a device named explicitly is resolved whatever its share (its profile came to this member)
        reg.set_policy("pi4", keep=0.5, issued_by="test")
        other = topics.parse_device_topic(published[1][0]).device_id
        n = pubs[0].resolve_and_publish(Work(devices={other}, share=groups[0].share()))
        assert n == 1 and published[0][-1] == topics.policy_desired(other)
        # c1 publishes nothing for the class change and leaves; c0 hears it and takes the whole fleet
        groups[0].note(ControllerStatus(controller_id="c1", online=False, boot_id="b"))
        assert groups[0].take_changed()
        before = len(published[0])
        pubs[0].resolve_and_publish(Work(all=True, share=groups[0].share()))
        with reg.session() as s:
            assert set(s.scalars(select(Device.desired_version))) == {2}
        assert len(published[0]) - before == 119  # every device but the one already at version 2
    finally:
        for p in pubs:
            p.registry.close()
        reg.close()


def test_reconciliation_is_split_between_the_live_controllers(db_url):
    """Two controllers on one registry ask each lagging device once between them; alone, one asks all."""
    reg = Registry(db_url)
    old = utcnow() - timedelta(minutes=5)
    ids = [f"lag-{i:03d}" for i in range(60)]
    with reg.session() as s:
        s.add_all(Device(device_id=d, first_seen=old, online=True, class_pinned=False, desired_version=1, applied_version=0, desired_at=old)
                  for d in ids)
    sent: dict[str, list[str]] = {"c0": [], "c1": []}
    recs = [Reconciler(reg, lambda t, p, c=c: sent[c].append(topics.parse_device_topic(t).device_id), controller_id=c, rate_per_s=1000)
            for c in sent]
    try:
        for r in recs:
            for c in sent:
                r.note_controller(ControllerStatus(controller_id=c, online=True, boot_id="b"))
            r.maybe_run()  # the first run: 2 s of tokens at 1000/s, lag bound 10 s
        assert sorted(sent["c0"] + sent["c1"]) == ids  # every lagging device asked, none twice
        assert sent["c0"] and sent["c1"]
        recs[0].note_controller(ControllerStatus(controller_id="c1", online=False, boot_id="b"))  # c1's Last Will
        assert all(recs[0].partition()(d) for d in ids)
    finally:
        reg.close()


def test_a_device_that_never_answers_is_asked_ever_more_rarely(db_url):
    """Its re-announcement has the desired policy sent again, which takes it out of the lagging set
    for a while; that must not reset its backoff (an agent too old to read a policy drops it, and was
    asked to re-announce every few seconds). Its backoff goes once it answers. It has never acked at
    all (no ack status), which used to hide it from reconciliation altogether (NOT over a NULL)."""
    reg = Registry(db_url)
    old = utcnow() - timedelta(minutes=5)
    with reg.session() as s:
        s.add(Device(device_id="mute-1", first_seen=old, online=True, class_pinned=False, desired_version=1,
                     applied_version=0, desired_at=old, profile={"num_layers": 8}))
    sent: list[str] = []
    rec = Reconciler(reg, lambda t, p: sent.append(topics.parse_device_topic(t).device_id), controller_id="c0")
    rec._tokens = 1e6

    def desired_sent(at):
        with reg.session(write=True) as s:
            s.get(Device, "mute-1").desired_at = at

    try:
        assert rec.run(1000.0, 10.0) == 1  # asked; next in 20 s (x0.75-1.25)
        desired_sent(utcnow())  # its re-announcement: the controller sent the desired policy again
        assert rec.run(1001.0, 10.0) == 0 and rec._retry["mute-1"].attempts == 1  # not lagging, backoff kept
        desired_sent(old)  # ... and again no ack
        assert rec.run(1002.0, 10.0) == 0  # lagging, but its backoff has not passed
        assert rec.run(1100.0, 10.0) == 1 and rec._retry["mute-1"].attempts == 2  # next in 40 s
        with reg.session(write=True) as s:
            s.get(Device, "mute-1").applied_version = 1  # it answers at last
        assert rec.run(1101.0, 10.0) == 0 and "mute-1" not in rec._retry
        assert sent == ["mute-1", "mute-1"]
    finally:
        reg.close()


def test_each_controller_has_its_own_status_topic_and_hears_the_others(sqlite_fleet: Fleet):
    f = sqlite_fleet
    ctls = [f.controller(shared_group="ctl", controller_id=f"c{i}") for i in range(2)]
    assert wait_until(lambda: all(c.reconciler.peers == {"c0": True, "c1": True} for c in ctls), 15)
    ctls[1].stop()
    f.controllers.remove(ctls[1])
    assert wait_until(lambda: ctls[0].reconciler.peers == {"c0": True, "c1": False}, 15)
    # c1's goodbye went to its own topic: c0's retained status still says online
    assert ControllerStatus.model_validate_json(read_retained(f.broker.url, topics.ctl_status("c0"))).online
    assert not ControllerStatus.model_validate_json(read_retained(f.broker.url, topics.ctl_status("c1"))).online
