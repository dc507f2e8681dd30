"""The controller's intake: MQTT messages -> registry, in batches, without slowing the network thread.

paho's network thread does nothing but ``Intake.put``: stamp the arrival time and append to an
unbounded ``queue.SimpleQueue`` (a C deque; no lock held while the worker runs). It must stay that
cheap: while the network thread is busy it does not read the socket, and then the broker queues the
controller's messages -- and drops them past ``max_queued_messages`` (1000 by default). The worker
thread takes everything queued (up to ``batch_max``) and writes it with ``BatchWriter.apply`` in one
transaction: new devices and classes inserted with ON CONFLICT DO NOTHING, the batch's device rows
locked in id order (several controllers may write at once), then profiles, statuses, acks and
telemetry as executemany UPDATEs; acks stored once however often they are delivered. Under a burst batches grow, so the registry
cost per message falls as the load rises.

Every message is parsed with the common schemas; anything refused is logged with its reason and
dropped (counted in ``IntakeStats.dropped``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ldfleet.common import topics
from ldfleet.common.schemas import ControllerStatus, DeviceProfile, PolicyAck, PolicyChanged, Status, Telemetry, decode, utcnow
from ldfleet.server.publisher import ProfileCache, Work, chunks, insert_ignoring
from ldfleet.server import liveness
from ldfleet.server.acks import store as acks_store
from ldfleet.server.registry.models import Device, DeviceClass
from ldfleet.server.telemetry import InferenceRollups

log = logging.getLogger("ldfleet.controller")

#: Marker the controller queues after each (re)connect (not a topic: it has no slash).
CONNECTED = "__connected__"

Item = tuple[str, bytes | None, datetime]

_MODELS: dict[topics.Channel, type] = {
    topics.Channel.STATUS: Status,
    topics.Channel.PROFILE: DeviceProfile,
    topics.Channel.POLICY_REPORTED: PolicyAck,
    topics.Channel.TELEMETRY: Telemetry,
}
_DEVICES = Device.__table__
_CLASSES = DeviceClass.__table__
_TELEMETRY_SUFFIX = "/" + topics.Channel.TELEMETRY.value
#: How long the worker lets a batch of device messages fill before writing it, in seconds. A
#: batch's registry cost is mostly per statement (~10 per batch whatever its size), so under a burst
#: of acks (~1 000/s) a 0.1 s linger turns ~150 small transactions into ~10 and halves the
#: controller's CPU per ack. It delays registry writes only: arrival times are stamped on arrival.
LINGER_S = 0.1
LINGER_STEP_S = 0.02


def _urgent(topic: str) -> bool:
    return topic == CONNECTED or topic == topics.CTL_POLICY_CHANGED


class Intake:
    """Hand-off from the network thread to the worker: ``put`` (network thread), ``take`` (worker)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Item] = queue.SimpleQueue()
        #: ``time.monotonic()`` when a birth, profile, ack or notice last arrived (telemetry does not count)
        self.last_arrival = 0.0
        #: set by the worker when it has nothing in hand; cleared by ``take`` as soon as it holds a batch
        self.idle = threading.Event()

    def put(self, topic: str, payload: bytes | None, retained: bool = False) -> None:
        self._q.put((topic, payload, utcnow()))
        if not topic.endswith(_TELEMETRY_SUFFIX):
            self.last_arrival = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since the last birth, profile or ack arrived; 0 while any message waits in the queue
        (a worker busy resolving has not even read the acks that did arrive)."""
        return time.monotonic() - self.last_arrival if self._q.empty() else 0.0

    def take(self, max_items: int, timeout: float, linger_s: float = LINGER_S) -> list[Item]:
        """Wait up to ``timeout`` s for a first item, then let the batch fill for up to ``linger_s``
        (checking every ``LINGER_STEP_S``) and take what is queued (at most ``max_items``). A batch
        holding an operator notice or a reconnect marker is handed over at once: those start
        resolutions, whose latency counts."""
        try:
            batch = [self._q.get(timeout=timeout)]
        except queue.Empty:
            return []
        self.idle.clear()  # a batch is in hand
        deadline = time.monotonic() + linger_s
        urgent = _urgent(batch[0][0])
        while len(batch) < max_items:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if urgent or left <= 0:
                    break
                time.sleep(min(left, LINGER_STEP_S))
                continue
            batch.append(item)
            urgent = urgent or _urgent(item[0])
        return batch

    def empty(self) -> bool:
        return self._q.empty()

    def qsize(self) -> int:
        return self._q.qsize()


@dataclass
class IntakeStats:
    received: int = 0
    dropped: int = 0
    acks: int = 0
    last_error: str | None = None


class BatchWriter:
    """Applies one batch of messages to the registry (inside the caller's transaction) and notes in
    a ``Work`` which devices need resolving."""

    def __init__(self, profiles: ProfileCache, *, strict_classes: bool = False,
                 on_controller_status: Callable[[ControllerStatus], Any] | None = None) -> None:
        self.profiles = profiles
        self.on_controller_status = on_controller_status
        self.strict_classes = strict_classes
        self.stats = IntakeStats()
        self._uncommitted: list[tuple[str, datetime, DeviceProfile]] = []
        #: devices whose rows this controller has seen in a committed batch (they exist)
        self._known: set[str] = set()
        self._seen: set[str] = set()

    def apply(self, s: Session, batch: list[Item], work: Work) -> None:
        """Phases: decode; create missing device (and class) rows and lock the batch's device rows in
        id order; profiles, then statuses, acks and telemetry, each as one executemany UPDATE in id
        order. A database error fails the batch, which the controller retries and then applies
        message by message. Call ``committed()`` once the transaction is committed."""
        self._uncommitted, self._seen = [], set()
        items = self._decode_all(batch, work)
        if not items:
            return
        C = topics.Channel
        desired, pinned, known = self._ensure_and_lock(s, items)
        self._apply_profiles(s, [(obj, now) for kind, obj, now in items if kind is C.PROFILE], pinned, known, work)
        self._apply_rest(s, items, desired, work)

    def committed(self) -> None:
        """The batch's transaction is committed: remember its profiles (a rolled-back profile must
        not look known, or its re-announcement would be skipped)."""
        for did, stamp, prof in self._uncommitted:
            self.profiles.put(did, stamp, prof)
        self._uncommitted = []
        self._known |= self._seen
        self._seen = set()

    # -- phases ----------------------------------------------------------------------------
    def _decode_all(self, batch: list[Item], work: Work) -> list[tuple[topics.Channel, Any, datetime]]:
        items = []
        for topic, payload, received in batch:
            if topic == CONNECTED:
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
        return items

    def _decode(self, topic: str, payload: bytes, work: Work) -> tuple[topics.Channel, Any] | None:
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
        cid = topics.parse_ctl_status(topic)
        if cid is not None:  # a controller's liveness (every controller's, this one's too)
            st = decode(ControllerStatus, payload, topic=topic, logger=log)  # logs why it refused one
            if st is None or st.controller_id != cid:
                self.stats.dropped += 1
                if st is not None:
                    log.warning("dropped message on %s: the status says it is from %r", topic, st.controller_id)
            elif self.on_controller_status is not None:
                self.on_controller_status(st)
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
        return parsed.channel, obj

    def _ensure_and_lock(self, s: Session, items: list[tuple[topics.Channel, Any, datetime]]) -> tuple[dict[str, int], set[str], set[str] | None]:
        """Insert the batch's devices this controller has not seen committed yet (and, unless strict,
        unknown classes of profiles) with ON CONFLICT DO NOTHING, then lock its device rows in id order (PostgreSQL; SQLite has one
        writer anyway) and return their desired versions. Several controllers may write the same
        devices at once: creating rows this way cannot fail on a duplicate, and locking in one order
        cannot deadlock. Returns (desired version by device, pinned devices, known classes of the
        batch's profiles when strict, else None: every class is known)."""
        insert_ignore = insert_ignoring(s.get_bind().dialect.name)
        known: set[str] = set()
        if self.strict_classes:  # a refused profile must not create its device
            wanted = {obj.device_class for kind, obj, _ in items if kind is topics.Channel.PROFILE}
            known = set(s.scalars(select(DeviceClass.name).where(DeviceClass.name.in_(sorted(wanted))))) if wanted else set()
        first: dict[str, datetime] = {}
        for kind, obj, now in items:
            refused = kind is topics.Channel.PROFILE and self.strict_classes and obj.device_class not in known
            if kind is not topics.Channel.TELEMETRY and not refused:
                first.setdefault(obj.device_id, now)
        ids = sorted({obj.device_id for _, obj, _ in items})
        # rows this controller saw committed need no INSERT (it would be a no-op); a row deleted
        # since then is found missing by the SELECT and inserted in a second pass
        desired, pinned = self._lock(s, insert_ignore, ids, {d: t for d, t in first.items() if d not in self._known})
        missing = {d: t for d, t in first.items() if d not in desired}
        if missing:
            more, more_pinned = self._lock(s, insert_ignore, sorted(missing), missing)
            desired.update(more)
            pinned |= more_pinned
        self._seen = set(desired)
        classes = sorted({obj.device_class for kind, obj, _ in items if kind is topics.Channel.PROFILE and obj.device_id not in pinned})
        if classes and not self.strict_classes:
            s.execute(insert_ignore(_CLASSES).on_conflict_do_nothing(index_elements=["name"]),
                      [{"name": c, "description": "created from a device profile", "created_at": utcnow()} for c in classes])
        return desired, pinned, (known if self.strict_classes else None)

    @staticmethod
    def _lock(s: Session, insert_ignore: Any, ids: list[str], create: dict[str, datetime]) -> tuple[dict[str, int], set[str]]:
        """INSERT the ``create`` rows (device -> first seen) ignoring existing ones, then SELECT ...
        FOR UPDATE the ``ids`` rows in id order: (desired version by device, pinned devices)."""
        if create:
            rows = [{"device_id": did, "first_seen": now, "online": False, "class_pinned": False, "desired_version": 0, "applied_version": 0}
                    for did, now in sorted(create.items())]
            s.execute(insert_ignore(_DEVICES).on_conflict_do_nothing(index_elements=["device_id"]), rows)
        desired: dict[str, int] = {}
        pinned: set[str] = set()
        for part in chunks(ids, 500):
            q = select(Device.device_id, Device.desired_version, Device.class_pinned).where(Device.device_id.in_(part))
            for did, dver, pin in s.execute(q.order_by(Device.device_id).with_for_update()):
                desired[did] = dver
                if pin:
                    pinned.add(did)
        return desired, pinned

    def _apply_profiles(
        self, s: Session, profiles: list[tuple[DeviceProfile, datetime]], pinned: set[str], known: set[str] | None, work: Work
    ) -> None:
        """Store new profiles (a pinned device keeps its class; with strict classes a profile of an
        unknown class is refused); a re-announced, unchanged profile only re-sends the desired policy."""
        rows: dict[bool, dict[str, dict[str, Any]]] = {True: {}, False: {}}
        for prof, now in profiles:
            did = prof.device_id
            if self.profiles.latest(did) == prof:
                # a re-announcement (rebirth, reconnect): nothing to store; its desired policy goes out
                # again in case that is what the device missed
                work.devices.add(did)
                work.resend.add(did)
                continue
            keep_class = did in pinned
            if not keep_class and known is not None and prof.device_class not in known:
                self.stats.dropped += 1
                log.warning("dropped profile of %s: unknown device class %r (controller runs with strict classes)", did, prof.device_class)
                continue
            row = {
                "device_id": did, "profile": prof.model_dump(mode="json", by_alias=True), "profile_revision": prof.revision,
                "profile_at": now, "model_id": prof.model_id, "num_layers": prof.num_layers, "cores": prof.cores,
                "memory_mb": prof.memory_mb, "last_seen": now,
            }
            if not keep_class:
                row["device_class"] = prof.device_class
            rows[keep_class][did] = row  # the newest profile of a device in the batch wins
            self._uncommitted.append((did, now, prof))
            work.devices.add(did)
        for group in rows.values():
            if group:
                bulk_update_devices(s, [group[d] for d in sorted(group)])

    def _apply_rest(self, s: Session, items: list[tuple[topics.Channel, Any, datetime]], desired: dict[str, int], work: Work) -> None:
        """Statuses (ordered by boot and connection: :mod:`.liveness`), acks (stored once however often
        delivered: :mod:`.acks`), telemetry and inference roll-ups (:mod:`.telemetry`), each as one
        executemany UPDATE in device-id order."""
        C = topics.Channel
        tel_upd: dict[str, dict[str, Any]] = {}
        statuses: list[tuple[Status, datetime]] = []
        acks: list[tuple[PolicyAck, datetime]] = []
        rollups = InferenceRollups()
        for kind, obj, now in items:
            did = obj.device_id
            if kind is C.TELEMETRY:
                if did in desired:
                    tel_upd[did] = {"device_id": did, "telemetry": obj.model_dump(mode="json", by_alias=True), "telemetry_at": now, "last_seen": now}
                rollups.add(obj, now, known_device=did in desired)
            elif kind is C.STATUS:
                statuses.append((obj, now))
            elif kind is C.POLICY_REPORTED:
                acks.append((obj, now))
                if obj.applied_version > desired.get(did, 0):
                    work.devices.add(did)  # the device is ahead of the registry: publish above it
        ack_upd = acks_store(s, acks, desired)
        self.stats.acks += len(ack_upd)
        for upd in (liveness.updates(s, statuses), ack_upd, list(tel_upd.values())):
            if upd:
                bulk_update_devices(s, sorted(upd, key=lambda r: r["device_id"]))
        rollups.write(s)


def bulk_update_devices(s: Session, rows: list[dict[str, Any]]) -> None:
    """One executemany UPDATE ... WHERE device_id = ? (Core: no per-row ORM bookkeeping).
    Every row carries ``device_id`` and the same other keys."""
    keys = [k for k in rows[0] if k != "device_id"]
    stmt = update(_DEVICES).where(_DEVICES.c.device_id == bindparam("_id")).values({k: bindparam(k) for k in keys})
    s.execute(stmt, [{"_id": r["device_id"], **{k: r[k] for k in keys}} for r in rows])

