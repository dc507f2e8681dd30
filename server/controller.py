"""The fleet controller: registers devices, resolves and publishes their policies, tracks convergence.

Threads: paho's network thread only stamps and enqueues ``(topic, payload, received_at)``; one
worker thread takes whatever is queued (up to ``batch_max`` messages) and applies it to the
registry in one transaction (profiles through the ORM, statuses/acks/telemetry as executemany
statements). It then resolves the devices that need it in chunks of ``resolve_chunk``: each chunk
is committed, then its desired policies are published (retained, QoS 1, one topic per device), so
the first devices hear of a change while the rest are still being resolved. The controller is the
only writer of ``devices``; run one controller per registry.

What triggers a resolution: a device's (new) profile, an operator notice on
``ldfleet/v1/ctl/policy-changed`` (sent by ``ldfleet budget set``), a new row in ``policies`` seen
by the registry poll (every ``poll_interval_s``: the safety net when a notice was missed), a policy
expiring, a device reporting a version above what we think we published (registry reset), and
every (re)connect to the broker (which also re-publishes every device's current desired policy,
so a broker that lost its retained messages is healed; devices ignore versions they already have).

Every message is parsed with the common schemas; anything refused is logged with its reason and
dropped. A failing batch is retried, then processed one message at a time so that one bad message
never stops the controller.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from ldfleet.common import topics
from ldfleet.common.mqtt import BrokerURL, MqttSession, Will, new_id, paho_protocol, parse_broker_url
from ldfleet.common.schemas import (
    BudgetPolicy,
    ControllerStatus,
    DeviceProfile,
    PolicyAck,
    PolicyChanged,
    Status,
    Telemetry,
    decode,
    utcnow,
)
from ldfleet.server import liveness
from ldfleet.server.acks import store as acks_store
from ldfleet.server.policy import resolve, signature_of
from ldfleet.server.registry.models import Device, DeviceClass
from ldfleet.server.registry.store import Registry
from ldfleet.server.telemetry import InferenceRollups

log = logging.getLogger("ldfleet.controller")

_CONNECTED = "__connected__"


@dataclass
class ControllerStats:
    received: int = 0
    dropped: int = 0
    acks: int = 0
    published: int = 0
    batches: int = 0
    failed_batches: int = 0
    resolutions: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.time)


@dataclass
class _Work:
    """What one batch asks the resolver to do."""

    devices: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    all: bool = False
    republish: bool = False

    def any(self) -> bool:
        return bool(self.devices or self.classes or self.all or self.republish)


class Controller:
    def __init__(
        self,
        broker: str | BrokerURL,
        db: str | Registry | None = None,
        *,
        ca_file: str | None = None,
        default_keep: float = 1.0,
        strict_classes: bool = False,
        poll_interval_s: float = 2.0,
        batch_max: int = 2000,
        resolve_chunk: int = 200,
        reconnect_max_s: float = 30.0,
        controller_id: str = "controller",
        mqtt_version: int = 5,
    ) -> None:
        protocol = paho_protocol(mqtt_version)
        if not (0.0 < default_keep <= 1.0):
            raise ValueError(f"default keep fraction must be in (0, 1], got {default_keep}")
        self.url = broker if isinstance(broker, BrokerURL) else parse_broker_url(broker, ca_file=ca_file)
        self._own_registry = not isinstance(db, Registry)
        self.registry = db if isinstance(db, Registry) else Registry(db)
        self.default_keep = default_keep
        self.strict_classes = strict_classes
        self.poll_interval_s = poll_interval_s
        self.batch_max = batch_max
        self.resolve_chunk = resolve_chunk
        self.controller_id = controller_id
        self.boot_id = new_id()
        self.stats = ControllerStats()
        self._queue: queue.Queue[tuple[str, bytes | None, datetime]] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._policy_head = 0
        self._next_expiry: datetime | None = None
        self._last_poll = 0.0
        self._profiles: dict[str, tuple[Any, DeviceProfile]] = {}
        self.idle = threading.Event()
        will = Will(topics.CTL_STATUS, self._status(False).to_json())
        self.session = MqttSession(
            self.url,
            client_id=f"ldfleet-{controller_id}-{self.boot_id[:6]}",
            subscriptions=[
                (topics.all_devices(topics.Channel.STATUS), 1),
                (topics.all_devices(topics.Channel.PROFILE), 1),
                (topics.all_devices(topics.Channel.POLICY_REPORTED), 1),
                (topics.all_devices(topics.Channel.TELEMETRY), 0),
                (topics.CTL_POLICY_CHANGED, 1),
            ],
            on_message=self._enqueue,
            on_connected=self._on_connected,
            on_fatal=lambda why: self._stop.set(),  # bad credentials, not authorised: run_forever ends
            will=will,
            reconnect_max_s=reconnect_max_s,
            max_queued=100_000,
            max_inflight=1000,
            protocol=protocol,
        )

    def _status(self, online: bool) -> ControllerStatus:
        return ControllerStatus(controller_id=self.controller_id, online=online, boot_id=self.boot_id, sent_at=utcnow())

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Controller:
        self._stop.clear()
        self._worker = threading.Thread(target=self._work_loop, name="controller-worker", daemon=True)
        self._worker.start()
        self.session.start()
        log.info("controller %s: broker %s, registry %s", self.controller_id, self.url, self.registry.redacted_url())
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        self.session.stop(final=[(topics.CTL_STATUS, self._status(False).to_json(), 1, True)])
        if self._own_registry:
            self.registry.close()

    def run_forever(self) -> None:
        """Run until SIGINT/SIGTERM (main thread) or ``stop_event``."""
        self.start()
        stop = threading.Event()

        def _handler(signum: int, frame: Any) -> None:
            stop.set()

        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, _handler)
        try:
            while not stop.wait(0.5) and not self._stop.is_set():
                pass
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            self.stop()

    def wait_idle(self, timeout: float) -> bool:
        """Block until the queue is empty and the worker has nothing in hand (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self.idle.is_set():
                return True
            time.sleep(0.02)
        return False

    # -- network thread ----------------------------------------------------------------------
    def _enqueue(self, topic: str, payload: bytes, retained: bool) -> None:
        self._queue.put((topic, payload, utcnow()))

    def _on_connected(self) -> None:
        self.session.publish(topics.CTL_STATUS, self._status(True).to_json(), qos=1, retain=True)
        self._queue.put((_CONNECTED, None, utcnow()))

    # -- worker ------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=min(0.5, self.poll_interval_s))
            except queue.Empty:
                self.idle.set()
                self._maybe_poll()
                continue
            self.idle.clear()
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._run_batch(batch)
            self._maybe_poll()
            if self._queue.empty():
                self.idle.set()

    def _run_batch(self, batch: list[tuple[str, bytes | None, datetime]]) -> None:
        for attempt in range(3):
            try:
                self._process(batch)
                return
            except Exception as exc:  # noqa: BLE001 - database down, a bug: never stop
                self.stats.failed_batches += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("batch of %d messages failed (attempt %d)", len(batch), attempt + 1)
                if self._stop.wait(0.5 * (attempt + 1)):
                    return
        if len(batch) > 1:
            log.warning("processing %d messages one by one", len(batch))
            for item in batch:
                try:
                    self._process([item])
                except Exception:  # noqa: BLE001
                    self.stats.dropped += 1
                    log.exception("dropped message on %s: processing failed", item[0])

    def _maybe_poll(self) -> None:
        """The safety net behind operator notices: resolve what changed in ``policies`` since the
        last look (a notice lost while the broker was down), and everything when a policy expired."""
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return
        self._last_poll = now
        try:
            head, nxt = self.registry.policy_head()
            expired = self._next_expiry is not None and utcnow() >= self._next_expiry
            if expired:
                log.info("registry poll: a policy expired; re-resolving the fleet")
                self._process([], _Work(all=True))
            elif head != self._policy_head:
                work = _Work()
                for p in self.registry.policies_since(self._policy_head):
                    if p.device_id:
                        work.devices.add(p.device_id)
                    else:
                        work.classes.add(p.device_class)
                log.debug("registry poll: policy rows %d..%d changed %s", self._policy_head + 1, head, work)
                self._process([], work)
            self._policy_head = head
            self._next_expiry = nxt
        except Exception as exc:  # noqa: BLE001
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("registry poll failed")

    def _process(self, batch: list[tuple[str, bytes | None, datetime]], work: _Work | None = None) -> None:
        """Apply a batch of messages to the registry (one transaction), then resolve what it asks for."""
        work = work or _Work()
        self.stats.batches += 1
        t0 = time.perf_counter()
        if batch:
            with self.registry.session(write=True) as s:
                self._apply(s, batch, work)
        t1 = time.perf_counter()
        published = self._resolve_and_publish(work) if work.any() else 0
        log.debug(
            "batch: %d messages in %.1f ms; %d publishes after %.1f ms",
            len(batch), (t1 - t0) * 1000, published, (time.perf_counter() - t1) * 1000,
        )

    # -- message handlers (worker thread, inside the batch transaction) -----------------------
    def _decode(self, topic: str, payload: bytes, work: _Work) -> tuple[str, Any] | None:
        """Validate one message; control notices go straight into ``work``."""
        if topic == topics.CTL_POLICY_CHANGED:
            notice = decode(PolicyChanged, payload, topic=topic, logger=log)
            if notice is None:
                self.stats.dropped += 1
            elif notice.device_id:
                work.devices.add(notice.device_id)
            elif notice.device_class:
                work.classes.add(notice.device_class)
            else:
                work.all = True
            return None
        parsed = topics.parse_device_topic(topic)
        if parsed is None:
            self.stats.dropped += 1
            log.warning("dropped message on %s: not a device topic", topic)
            return None
        model = _MODELS.get(parsed.channel)
        if model is None:  # e.g. a device publishing on its own desired topic
            self.stats.dropped += 1
            log.warning("dropped message on %s: the controller does not read this channel", topic)
            return None
        obj = decode(model, payload, topic=topic, topic_device_id=parsed.device_id, logger=log)
        if obj is None:
            self.stats.dropped += 1
            return None
        return parsed.channel.value, obj

    def _apply(self, s: Session, batch: list[tuple[str, bytes | None, datetime]], work: _Work) -> None:
        items: list[tuple[str, Any, datetime]] = []
        for topic, payload, received in batch:
            if topic == _CONNECTED:
                work.all = work.republish = True
                continue
            self.stats.received += 1
            try:
                item = self._decode(topic, payload or b"", work)
            except Exception:  # noqa: BLE001 - a bug on one message must not spoil the batch
                self.stats.dropped += 1
                log.exception("dropped message on %s: handler failed", topic)
                continue
            if item is not None:
                items.append((item[0], item[1], received))
        if not items:
            return
        C = topics.Channel
        # Profiles first, through the ORM (class checks, device creation). A database error here
        # fails the batch, which is retried and then processed message by message.
        for kind, obj, now in items:
            if kind == C.PROFILE.value:
                self._apply_profile(s, obj, now, work)
        s.flush()
        # Everything else in bulk: one SELECT, one INSERT of new devices, executemany UPDATEs.
        ids = sorted({obj.device_id for _, obj, _ in items})
        desired: dict[str, int] = {}
        for part in _chunks(ids, 500):
            desired.update(s.execute(select(Device.device_id, Device.desired_version).where(Device.device_id.in_(part))).all())
        new_rows: dict[str, dict[str, Any]] = {}
        tel_upd: dict[str, dict[str, Any]] = {}
        statuses: list[tuple[Status, datetime]] = []
        acks: list[tuple[PolicyAck, datetime]] = []
        rollups = InferenceRollups()
        for kind, obj, now in items:
            did = obj.device_id
            if kind == C.TELEMETRY.value:
                if did in desired:
                    tel_upd[did] = {"device_id": did, "telemetry": obj.model_dump(mode="json", by_alias=True), "telemetry_at": now, "last_seen": now}
                rollups.add(obj, now, known_device=did in desired)
                continue
            if kind not in (C.STATUS.value, C.POLICY_REPORTED.value):
                continue
            if did not in desired and did not in new_rows:
                new_rows[did] = {"device_id": did, "first_seen": now, "online": False, "class_pinned": False, "desired_version": 0, "applied_version": 0}
            (statuses if kind == C.STATUS.value else acks).append((obj, now))
            if kind == C.POLICY_REPORTED.value and obj.applied_version > desired.get(did, 0):
                work.devices.add(did)  # the device is ahead of the registry: publish above it
        if new_rows:
            s.execute(insert(_DEVICES), list(new_rows.values()))
        ack_upd = acks_store(s, acks, desired)
        self.stats.acks += len(ack_upd)
        for upd in (liveness.updates(s, statuses), ack_upd, list(tel_upd.values())):
            if upd:
                _bulk_update_devices(s, upd)
        rollups.write(s)

    def _apply_profile(self, s: Session, prof: DeviceProfile, now: datetime, work: _Work) -> None:
        did = prof.device_id
        dev = s.get(Device, did)
        pinned = dev is not None and dev.class_pinned
        if not pinned and s.get(DeviceClass, prof.device_class) is None:
            if self.strict_classes:
                self.stats.dropped += 1
                log.warning("dropped profile of %s: unknown device class %r (controller runs with strict classes)", did, prof.device_class)
                return
            s.add(DeviceClass(name=prof.device_class, description="created from a device profile"))
            s.flush()  # the class row must exist before a device refers to it
        doc = prof.model_dump(mode="json", by_alias=True)
        if dev is not None and dev.profile == doc and (pinned or dev.device_class == prof.device_class):
            return  # delivered again: changes nothing
        if dev is None:
            dev = Device(device_id=did, first_seen=now, desired_version=0, applied_version=0, online=False, class_pinned=False)
            s.add(dev)
        if not pinned:
            dev.device_class = prof.device_class
        dev.profile = doc
        dev.profile_revision = prof.revision
        dev.profile_at = now
        dev.model_id = prof.model_id
        dev.num_layers = prof.num_layers
        dev.cores = prof.cores
        dev.memory_mb = prof.memory_mb
        dev.last_seen = now
        self._profiles[did] = (dev.profile, prof)
        work.devices.add(did)

    # -- resolution ----------------------------------------------------------------------------
    def _profile_of(self, device_id: str, stored: dict[str, Any]) -> DeviceProfile | None:
        cached = self._profiles.get(device_id)
        if cached is not None and cached[0] == stored:
            return cached[1]
        try:
            prof = DeviceProfile.model_validate(stored, strict=False)
        except Exception as exc:  # noqa: BLE001 - a stored profile from an older schema
            log.warning("device %s: stored profile unusable (%s); waiting for a new one", device_id, exc)
            return None
        self._profiles[device_id] = (stored, prof)
        return prof

    def _resolve_and_publish(self, work: _Work) -> int:
        """Resolve the devices ``work`` names, in chunks: each chunk is committed, then published,
        so the first devices hear of a change while the controller still resolves the rest."""
        with self.registry.session() as s:
            q = select(Device.device_id).where(Device.profile.is_not(None), Device.device_class.is_not(None))
            if not work.all:
                conds = []
                if work.devices:
                    conds.append(Device.device_id.in_(sorted(work.devices)))
                if work.classes:
                    conds.append(Device.device_class.in_(sorted(work.classes)))
                if not conds:
                    return 0
                q = q.where(or_(*conds))
            ids = list(s.scalars(q.order_by(Device.device_id)))
            active = self.registry.active_policies(s)
        now = utcnow()
        total = changed = 0
        cols = (Device.device_id, Device.device_class, Device.profile, Device.desired_version, Device.applied_version, Device.desired)
        for part in _chunks(ids, self.resolve_chunk):
            out: list[tuple[str, bytes]] = []
            updates: list[dict[str, Any]] = []
            with self.registry.session(write=True) as s:
                for did, dclass, stored, dver, aver, desired in s.execute(select(*cols).where(Device.device_id.in_(part))):
                    prof = self._profile_of(did, stored)
                    if prof is None:
                        continue
                    self.stats.resolutions += 1
                    res = resolve(did, dclass, prof, active, default_keep=self.default_keep, now=now)
                    if res.signature() != signature_of(desired) or aver > dver:
                        version = max(dver, aver) + 1
                        doc = res.to_policy(did, version).stamped(now)
                        updates.append({"device_id": did, "desired_version": version, "desired": doc.model_dump(mode="json", by_alias=True), "desired_at": now})
                        out.append((topics.policy_desired(did), doc.to_json()))
                        if res.note:
                            log.warning("device %s: %s (published without k; the device decides)", did, res.note)
                    elif work.republish and desired:
                        out.append((topics.policy_desired(did), BudgetPolicy.model_validate(desired, strict=False).stamped(utcnow()).to_json()))
                if updates:
                    _bulk_update_devices(s, updates)
            for topic, payload in out:
                self.session.publish(topic, payload, qos=1, retain=True)
            changed += len(updates)
            total += len(out)
        self.stats.published += total
        if changed:
            log.info("published %d new desired policies", changed)
        return total


_MODELS: dict[topics.Channel, type] = {
    topics.Channel.STATUS: Status,
    topics.Channel.PROFILE: DeviceProfile,
    topics.Channel.POLICY_REPORTED: PolicyAck,
    topics.Channel.TELEMETRY: Telemetry,
}


_DEVICES = Device.__table__


def _bulk_update_devices(s: Session, rows: list[dict[str, Any]]) -> None:
    """One executemany UPDATE ... WHERE device_id = ? (Core: no per-row ORM bookkeeping).
    Every row carries ``device_id`` and the same other keys."""
    keys = [k for k in rows[0] if k != "device_id"]
    stmt = update(_DEVICES).where(_DEVICES.c.device_id == bindparam("_id")).values({k: bindparam(k) for k in keys})
    s.execute(stmt, [{"_id": r["device_id"], **{k: r[k] for k in keys}} for r in rows])


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_controller(broker: str, db: str | None = None, **kwargs: Any) -> None:
    """Blocking entry point (CLI, benchmark subprocess): runs until SIGINT/SIGTERM."""
    Controller(broker, db, **kwargs).run_forever()


def converged_devices(registry: Registry, device_ids: Iterable[str] | None = None) -> dict[str, bool]:
    devs = registry.devices()
    wanted = set(device_ids) if device_ids is not None else None
    return {d.device_id: d.converged for d in devs if wanted is None or d.device_id in wanted}
