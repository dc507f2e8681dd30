"""The fleet controller: registers devices, resolves and publishes their policies, tracks convergence.

Threads: paho's network thread only hands each message to the intake queue (``server/intake.py``);
one worker thread takes whatever is queued (up to ``batch_max`` messages), applies it to the registry
in one transaction, then resolves and publishes the devices that need it (``server/publisher.py``),
and every ``reconcile_interval_s`` recovers devices a burst left behind (``server/reconcile.py``).

What triggers a resolution: a device's (new) profile, an operator notice on
``ldfleet/v1/ctl/policy-changed`` (sent by ``ldfleet budget set``), a new row in ``policies`` seen
by the registry poll (every ``poll_interval_s``: the safety net when a notice was missed), a policy
expiring, a device reporting a version above what we think we published (registry reset), and
every (re)connect to the broker (which also re-publishes every device's current desired policy,
so a broker that lost its retained messages is healed; devices ignore versions they already have).

Several controllers can share one fleet and one (PostgreSQL) registry: give them the same
``shared_group`` and the broker hands each device message to one of them (MQTT 5 shared
subscriptions); versions are claimed through a unique constraint, so no version is published twice.
Every member hears operator notices and resolves only its share of the devices they name
(``server/group.py``), so a budget change on a large class is resolved and published in parallel.
Shared subscriptions deliver no retained messages: after each connect such a controller reads the
devices' retained state once through a second, short session (``server/snapshot.py``).

MQTT session choices (the burst is what they are chosen for):

* ``ReceiveMaximum`` 65535: the broker may have that many QoS 1 messages in flight to the controller.
  Mosquitto's ``max_queued_messages`` (default 1000) only counts messages *beyond* the in-flight
  window, so with Mosquitto's default window (20) a burst of births or acks overflows the queue and is
  dropped; with a wide window the messages wait in the socket instead, and the intake drains them.
* clean start, no session expiry: recovery does not rely on the broker queueing for an absent
  controller (reconnect re-reads retained state, reconciliation asks devices again); a persistent
  session would make the broker queue for a dead controller, with shared subscriptions part of the
  fleet's messages. QoS 1 for births, profiles, acks and notices (each must arrive at least once;
  all are idempotent), QoS 0 for telemetry (a lost sample does not matter).
* desired policies go out retained at **QoS 0**. What confirms a policy is the device's reported
  ack, end to end; the broker's PUBACK would only say the broker stored it. A lost desired document
  is recovered without it: reconciliation re-sends to devices that have not acked within
  ``ack_bound_s`` and every (re)connect re-publishes every document (Sparkplug B sends its commands
  at QoS 0 for the same reason and recovers state by rebirth). QoS 1 would put a fan-out of N
  documents under the broker's Receive Maximum (Mosquitto advertises 20, MQTT 5 forbids more in
  flight): measured at 3 000 devices on 2 cores, p99 2.3 s with a window of 20 against 1.2-1.4 s at
  QoS 0, and paho's own window re-scans every in-flight message on each PUBACK. At QoS 0 the device
  sends no PUBACK either.

A failing batch is retried, then processed one message at a time: one bad message never stops it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ldfleet.common import topics
from ldfleet.common.mqtt import BrokerURL, MqttSession, Will, new_id, paho_protocol, parse_broker_url
from ldfleet.common.schemas import ControllerStatus, utcnow
from ldfleet.server.intake import CONNECTED, BatchWriter, Intake, Item
from ldfleet.server.publisher import PolicyPublisher, Work
from ldfleet.server.reconcile import Reconciler
from ldfleet.server.snapshot import start_reader
from ldfleet.server.registry.store import Registry

log = logging.getLogger("ldfleet.controller")

#: The MQTT 5 receive maximum the controller asks for (the protocol's largest; see the module docstring).
RECEIVE_MAXIMUM = 65535
#: QoS 1 publishes the controller keeps in flight (paho's window): the Receive Maximum Mosquitto
#: advertises by default. Only rebirth requests and status go out at QoS 1 (desired policies at QoS 0).
MAX_INFLIGHT = 20


@dataclass
class ControllerStats:
    received: int = 0
    dropped: int = 0
    acks: int = 0
    published: int = 0
    batches: int = 0
    failed_batches: int = 0
    resolutions: int = 0
    lost_claims: int = 0
    rebirth_requests: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.time)


class Controller:
    """One controller process (see the module docstring). ``shared_group``: share the fleet with the
    other controllers of that group (MQTT 5 only; use one PostgreSQL registry for all of them).
    ``ack_bound_s``, ``reconcile_interval_s``, ``reconcile_rate`` (requests/s): reconciliation, see
    ``server/reconcile.py``. Raises ValueError for bad settings."""

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
        shared_group: str | None = None,
        ack_bound_s: float = 10.0,
        reconcile_interval_s: float = 2.0,
        reconcile_rate: float = 200.0,
    ) -> None:
        protocol = paho_protocol(mqtt_version)
        if not (0.0 < default_keep <= 1.0):
            raise ValueError(f"default keep fraction must be in (0, 1], got {default_keep}")
        if shared_group is not None and mqtt_version != 5:
            raise ValueError("shared subscriptions (several controllers) need MQTT 5")
        self.status_topic = topics.ctl_status(controller_id)  # its own (ValueError for a bad id); all hear all
        self.shared_group = shared_group
        self.url = broker if isinstance(broker, BrokerURL) else parse_broker_url(broker, ca_file=ca_file)
        self._own_registry = not isinstance(db, Registry)
        self.registry = db if isinstance(db, Registry) else Registry(db)
        self.poll_interval_s = poll_interval_s
        self.batch_max = batch_max
        self.controller_id = controller_id
        self.boot_id = new_id()
        self._started_at = time.time()
        self._failed_batches = 0
        self._batches = 0
        self._last_error: str | None = None
        self.intake = Intake()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._policy_head = 0
        self._pending_poll: list[Any] = []  # policy rows seen by the last poll
        self._covered: dict[str, int] = {}  # class or device id -> newest policy id its last resolution saw
        self._covered_all = 0
        self._next_expiry: Any = None
        self._last_poll = 0.0
        self.idle = self.intake.idle  # cleared by take() as soon as a batch is in hand
        self.publisher = PolicyPublisher(
            self.registry, self._publish_retained, controller_id=controller_id, default_keep=default_keep, resolve_chunk=resolve_chunk,
        )
        self.reconciler = Reconciler(
            self.registry, self._send, controller_id=controller_id,
            ack_bound_s=ack_bound_s, interval_s=reconcile_interval_s, rate_per_s=reconcile_rate, boot_id=self.boot_id,
        )
        self.writer = BatchWriter(self.publisher.profiles, strict_classes=strict_classes, on_controller_status=self.reconciler.note_controller)
        self.reconciler.group.on_overwritten = self._restate_online  # a namesake's goodbye must not hide this one
        device_filters = [
            (topics.all_devices(topics.Channel.STATUS), 1),
            (topics.all_devices(topics.Channel.PROFILE), 1),
            (topics.all_devices(topics.Channel.POLICY_REPORTED), 1),
            (topics.all_devices(topics.Channel.TELEMETRY), 0),
        ]
        if shared_group is not None:  # one member of the group gets each device message
            device_filters = [(topics.shared(shared_group, f), q) for f, q in device_filters]
        # every member hears operator notices and resolves its own share of what they name
        device_filters.append((topics.CTL_POLICY_CHANGED, 1))
        will = Will(self.status_topic, self._status(False).to_json())
        self.session = MqttSession(
            self.url,
            client_id=f"ldfleet-{controller_id}-{self.boot_id[:6]}",
            subscriptions=device_filters + [(topics.ALL_CONTROLLERS, 1)],
            on_message=self.intake.put,
            on_connected=self._on_connected,
            on_fatal=lambda why: self._stop.set(),  # bad credentials, not authorised: run_forever ends
            will=will,
            reconnect_max_s=reconnect_max_s,
            max_queued=1_000_000,  # paho's own outgoing queue: a desired policy per device, plus headroom
            max_inflight=MAX_INFLIGHT,
            protocol=protocol,
            connect_properties={"ReceiveMaximum": RECEIVE_MAXIMUM, "SessionExpiryInterval": 0},
        )

    @property
    def stats(self) -> ControllerStats:
        """A snapshot of the counters of the intake, the publisher and reconciliation."""
        w, p, r = self.writer.stats, self.publisher.stats, self.reconciler.stats
        return ControllerStats(
            received=w.received, dropped=w.dropped, acks=w.acks, published=p.published, batches=self._batches,
            failed_batches=self._failed_batches, resolutions=p.resolutions, lost_claims=p.lost_claims,
            rebirth_requests=r.rebirth_requests, last_error=self._last_error, started_at=self._started_at,
        )

    def _status(self, online: bool) -> ControllerStatus:
        return ControllerStatus(controller_id=self.controller_id, online=online, boot_id=self.boot_id, sent_at=utcnow())

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """A desired policy: retained, QoS 0 (see the module docstring)."""
        self.session.publish(topic, payload, qos=0, retain=True)

    def _send(self, topic: str, payload: bytes) -> None:
        self.session.publish(topic, payload, qos=1, retain=False)

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
        said = self.session.stop(final=[(self.status_topic, self._status(False).to_json(), 1, True)])
        if self._own_registry:
            self.registry.close()
        log.info("controller %s: stopped (%s)", self.controller_id, said)

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
            if self.intake.empty() and self.idle.is_set():
                return True
            time.sleep(0.02)
        return False

    def _restate_online(self) -> None:
        if not self._stop.is_set() and self.session.connected:
            log.warning("%s: a namesake's offline status replaced this controller's: saying online again", self.controller_id)
            self._say_online()

    def _say_online(self) -> None:
        self.session.publish(self.status_topic, self._status(True).to_json(), qos=1, retain=True)

    # -- network thread ----------------------------------------------------------------------
    def _on_connected(self) -> None:
        self._say_online()
        self.intake.put(CONNECTED, None)
        if self.shared_group is not None:  # the shared subscriptions delivered no retained state
            start_reader(self.url, f"ldfleet-{self.controller_id}-{self.boot_id[:6]}-retained", self.intake.put, self._stop)

    # -- worker ------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.intake.take(self.batch_max, timeout=min(0.5, self.poll_interval_s))
            if batch:
                self.idle.clear()
                self._run_batch(batch)
            self._maybe_poll()
            self._guarded(lambda: self.reconciler.maybe_run(self.intake.quiet_for()), "reconciliation")
            if self.intake.empty():
                self.idle.set()

    def _guarded(self, fn: Any, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - database down, a bug: never stop the worker
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s failed", what)

    def _run_batch(self, batch: list[Item]) -> None:
        for attempt in range(3):
            try:
                self._process(batch)
                return
            except Exception as exc:  # noqa: BLE001 - database down, a bug, a race with another controller
                self._failed_batches += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("batch of %d messages failed (attempt %d)", len(batch), attempt + 1)
                if self._stop.wait(0.5 * (attempt + 1)):
                    return
        if len(batch) > 1:
            log.warning("processing %d messages one by one", len(batch))
            for item in batch:
                try:
                    self._process([item])
                except Exception:  # noqa: BLE001
                    self.writer.stats.dropped += 1
                    log.exception("dropped message on %s: processing failed", item[0])

    def _maybe_poll(self) -> None:
        """The safety net behind operator notices: resolve what changed in ``policies`` since the
        last look (a notice lost while the broker was down, or delivered to another controller), and
        everything when a policy expired. New rows wait one poll and are skipped when a resolution
        (normally the notice's) has taken them into account in the meantime."""
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return
        self._last_poll = now
        self._guarded(self._poll, "registry poll")

    def _poll(self) -> None:
        head, nxt = self.registry.policy_head()
        pending, self._pending_poll = self._pending_poll, []
        if self._next_expiry is not None and utcnow() >= self._next_expiry:
            log.info("registry poll: a policy expired; re-resolving the fleet")
            self._process([], Work(all=True))
        else:
            work = Work()
            for p in pending:
                seen = max(self._covered.get(f"class:{p.device_class}", 0), self._covered.get(f"device:{p.device_id}", 0), self._covered_all)
                if p.id <= seen:
                    continue
                if p.device_id:
                    work.devices.add(p.device_id)
                else:
                    work.classes.add(p.device_class)
            if work.any():
                log.debug("registry poll: resolving policy changes no notice brought: %s", work)
                self._process([], work)
        if head != self._policy_head:
            self._pending_poll = self.registry.policies_since(self._policy_head)
        self._policy_head = head
        self._next_expiry = nxt

    def _process(self, batch: list[Item], work: Work | None = None) -> None:
        """Apply a batch of messages to the registry (one transaction), then resolve what it asks for."""
        work = work or Work()
        self._batches += 1
        t0 = time.perf_counter()
        if batch:
            with self.registry.session(write=True) as s:
                self.writer.apply(s, batch, work)
            self.writer.committed()
        if self.shared_group is not None:
            if self.reconciler.group.take_changed():  # shares moved: cover what may have fallen between
                work.all = True
            work.share = self.reconciler.group.share()
        t1 = time.perf_counter()
        published = self.publisher.resolve_and_publish(work) if work.any() else 0
        upto = self.publisher.covered_policy_id
        if work.all:
            self._covered_all = max(self._covered_all, upto)
        for key in [f"class:{c}" for c in work.classes] + [f"device:{d}" for d in work.devices]:
            self._covered[key] = max(self._covered.get(key, 0), upto)
        log.debug(
            "batch: %d messages in %.1f ms; %d publishes after %.1f ms",
            len(batch), (t1 - t0) * 1000, published, (time.perf_counter() - t1) * 1000,
        )
