"""The device agent: announces this device and keeps its budget policy in step with the controller.

On every (re)connect it publishes its birth status and its profile (both retained; the Last Will
publishes ``online: false`` if the connection dies), re-publishes its last ack, and subscribes to its
own desired policy and its own status. A desired policy is validated (schema, topic, version
strictly above the stored one, not expired, k resolvable on this device), stored atomically in the
local device state, then acknowledged on ``policy/reported`` (retained). Versions at or below the
stored one are ignored, so retained re-deliveries after a reconnect are harmless and a stale policy
is never applied. Expiry is counted from receipt (``ttl_s``), not read off this device's clock; a
policy refused for being expired is evaluated again when it comes back (or every minute).

Births and deaths are ordered as Sparkplug B does: a boot counter kept in the state folder
(``boot_seq``) and a connection number (``seq``) shared by a connection's birth and its Last Will.
A status on its own topic from a boot id that is neither this one nor its predecessor means a
second agent runs with this device id: the agent says so, and a connection the broker then closes
counts as a session takeover (hard backoff, then it gives up: ``ldfleet.common.mqtt_reasons``).

Re-announcing: the agent publishes birth, profile and last ack again when the controller asks
(``ldfleet/v1/dev/{id}/rebirth``, a ``RebirthRequest``: the controller's reconciliation lacks this
device's state or ack), and by itself, with jittered exponential backoff (``common/reannounce.py``),
while no desired policy has arrived since the last connect (its birth or profile may have been lost).
A re-announcement is the same connection's birth again: it does not change ``seq``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ldfleet.client.state import DeviceState, load_device_state, save_device_state
from ldfleet.common import topics
from ldfleet.common.budget import expected_latency_ms
from ldfleet.common.mqtt import BrokerURL, MqttSession, Will, new_id, paho_protocol, parse_broker_url
from ldfleet.common.mqtt_reasons import ReconnectPolicy
from ldfleet.common.policy import k_for_budget, unmet_target
from ldfleet.common.reannounce import ReannounceBackoff
from ldfleet.common.schemas import (BudgetPolicy, DeviceProfile, PayloadError, PolicyAck, RebirthRequest, Status, Telemetry,
                                    decode, parse_payload, utcnow, without_unknown_fields)

log = logging.getLogger("ldfleet.agent")


@dataclass(frozen=True)
class Decision:
    """What to do with one desired policy: the state to store (None: keep) and the ack to publish."""

    state: DeviceState | None
    ack: PolicyAck | None
    note: str = ""


def rejection(state: DeviceState, version: int, reason: str, now: datetime, retryable: bool = False) -> Decision:
    """Refuse desired version ``version``: the rejected ack (the policy in force stays) and the state
    that remembers it (a retryable refusal is evaluated again later)."""
    ack = PolicyAck(
        device_id=state.device_id,
        version=version,
        applied_version=state.version,
        status="rejected",
        reason=reason[:500],
        effective_k=state.effective_k,
        expected_latency_ms=state.expected_latency_ms,
        acked_at=now,
    )
    new = state.model_copy(update={"last_rejected_version": version, "last_rejected_reason": reason[:500],
                                   "last_rejected_retryable": retryable, "updated_at": now})
    return Decision(new, ack, f"rejected version {version}: {reason}")


def evaluate_policy(policy: BudgetPolicy, state: DeviceState, profile: DeviceProfile, now: datetime | None = None) -> Decision:
    """Pure decision for one desired policy (used by the agent and the simulated devices)."""
    now = now or utcnow()
    if policy.device_id != state.device_id:
        return Decision(None, None, f"policy for {policy.device_id!r}, this is {state.device_id!r}")
    if policy.version <= state.version:
        return Decision(None, None, f"version {policy.version} <= stored {state.version}: ignored")
    if policy.version == state.last_rejected_version and not state.last_rejected_retryable:
        return Decision(None, None, f"version {policy.version} already rejected")

    def reject(reason: str, retryable: bool = False) -> Decision:
        return rejection(state, policy.version, reason, now, retryable)

    if policy.expired(now):
        if policy.ttl_s is not None:
            return reject(f"policy expired before it arrived (controller says {policy.ttl_s:g} s left)", retryable=True)
        return reject(f"policy expired at {policy.expires_at.isoformat()} by this device's clock "  # type: ignore[union-attr]
                      f"({now.isoformat(timespec='seconds')})", retryable=True)
    try:
        if policy.k is not None and policy.num_layers in (None, profile.num_layers):
            k = policy.k
            if k > profile.num_layers:
                raise ValueError(f"k={k} exceeds this device's {profile.num_layers} layers")
            expected = expected_latency_ms(k, profile.front_end_ms, profile.layer_ms) if profile.layer_ms else None
        else:  # the controller could not resolve it, or resolved it for another model: resolve here
            k, expected = k_for_budget(
                profile, keep=policy.keep, latency_ms=policy.latency_ms, rtf=policy.rtf, percentile=policy.percentile
            )
    except ValueError as exc:
        return reject(str(exc))
    unmet = unmet_target(profile, k, latency_ms=policy.latency_ms, rtf=policy.rtf, percentile=policy.percentile)
    new = state.model_copy(
        update={
            "version": policy.version,
            "policy": policy,
            "effective_k": k,
            "expected_latency_ms": expected,
            "updated_at": now,
            "last_rejected_version": None,
            "last_rejected_reason": None,
            "last_rejected_retryable": False,
        }
    )
    ack = PolicyAck(
        device_id=state.device_id,
        version=policy.version,
        applied_version=policy.version,
        status="applied",
        reason=unmet[:500] if unmet else None,  # applied, but the target will be missed
        effective_k=k,
        expected_latency_ms=expected,
        acked_at=now,
    )
    return Decision(new, ack, f"applied version {policy.version}: k={k}" + (f" ({unmet})" if unmet else ""))


def _same_measurement(a: DeviceProfile, b: DeviceProfile) -> bool:
    keys = ("device_class", "model_id", "num_layers", "front_end_ms", "layer_ms", "cores", "memory_mb", "accelerator")
    return all(getattr(a, key) == getattr(b, key) for key in keys)


class DeviceAgent:
    """One device's MQTT agent (paho; one connection; runs in paho's network thread)."""

    def __init__(
        self,
        device_id: str,
        device_class: str,
        broker: str | BrokerURL,
        profile: DeviceProfile | None,
        *,
        state_dir: str | Path | None = None,
        ca_file: str | None = None,
        telemetry_interval_s: float = 0.0,
        reconnect_max_s: float = 30.0,
        mqtt_version: int = 5,
        policy: ReconnectPolicy | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not topics.is_valid_device_id(device_id):
            raise ValueError(f"invalid device id {device_id!r}: must match {topics.DEVICE_ID_PATTERN}")
        from ldfleet.common.runtime import default_device_state_dir

        self.device_id = device_id
        self.device_class = device_class
        self.url = broker if isinstance(broker, BrokerURL) else parse_broker_url(broker, ca_file=ca_file)
        self.state_dir = Path(state_dir) if state_dir is not None else default_device_state_dir(device_id)
        self.telemetry_interval_s = telemetry_interval_s
        self.clock = clock
        #: Why the agent stopped for good (bad credentials, not authorised, duplicate device id), else None.
        self.fatal: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = False
        self.applied = threading.Condition(self._lock)

        state = load_device_state(self.state_dir)
        if state is not None and state.device_id != device_id:
            raise ValueError(f"state dir {self.state_dir} belongs to device {state.device_id!r}, not {device_id!r}")
        if state is None:
            state = DeviceState(device_id=device_id, device_class=device_class)
        self.boot_id = new_id()
        self.previous_boot_id = state.boot_id
        self.boot_seq = state.boot_seq + 1
        state = state.model_copy(update={"device_class": device_class, "updated_at": utcnow(),
                                         "boot_seq": self.boot_seq, "boot_id": self.boot_id})
        save_device_state(self.state_dir, state)
        self.state = state
        #: This device's profile; None while it is being measured (policies wait for it).
        self.profile: DeviceProfile | None = None
        self._waiting: BudgetPolicy | None = None
        if profile is not None:
            self._adopt_profile(profile)
        self.last_ack: PolicyAck | None = None
        if state.version > 0:  # re-announce what is in force after a restart
            self.last_ack = PolicyAck(
                device_id=device_id,
                version=state.version,
                applied_version=state.version,
                status="applied",
                effective_k=state.effective_k,
                expected_latency_ms=state.expected_latency_ms,
                acked_at=state.updated_at,
            )

        #: Number of the connection whose Last Will is registered (its birth carries the same number).
        self.seq = 1
        self._foreign_boots: set[str] = set()
        self._time_rejected: BudgetPolicy | None = None
        self.session = MqttSession(
            self.url,
            client_id=f"ldfleet-dev-{device_id}",
            subscriptions=[(topics.policy_desired(device_id), 1), (topics.status(device_id), 1), (topics.rebirth(device_id), 1)],
            on_message=self._on_message,
            on_connected=self._on_connected,
            on_disconnected=self._next_connection,
            on_fatal=self._give_up,
            will=self._death(),
            policy=policy,
            reconnect_max_s=reconnect_max_s,
            max_queued=1000,
            max_inflight=20,
            protocol=paho_protocol(mqtt_version),
        )
        self._telemetry_thread: threading.Thread | None = None
        self.reannounce = ReannounceBackoff()
        self._policy_seen = threading.Event()  # a desired policy arrived since the last connect
        self._reannounce_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> DeviceAgent:
        """Connect (idempotent: a second call while running changes nothing, a stop request stays)."""
        if self._running:
            return self
        self._running = True
        self._stop.clear()
        self.session.start()
        if self.telemetry_interval_s > 0 and self._telemetry_thread is None:
            self._telemetry_thread = threading.Thread(target=self._telemetry_loop, name=f"telemetry-{self.device_id}", daemon=True)
            self._telemetry_thread.start()
        if self._reannounce_thread is None:
            self._reannounce_thread = threading.Thread(target=self._reannounce_loop, name=f"reannounce-{self.device_id}", daemon=True)
            self._reannounce_thread.start()
        return self

    def stop(self) -> None:
        """Say goodbye (retained offline status), disconnect cleanly (no Last Will)."""
        self._stop.set()
        self._running = False
        offline = self._status(online=False)
        said = self.session.stop(final=[(topics.status(self.device_id), offline.to_json(), 1, True)])
        for t in (self._telemetry_thread, self._reannounce_thread):
            if t is not None:
                t.join(timeout=2)
        self._telemetry_thread = self._reannounce_thread = None
        log.info("%s: stopped (%s)", self.device_id, said)

    def run_forever(self, retry_every_s: float = 60.0) -> None:
        """Run until ``request_stop`` or a fatal refusal (then ``self.fatal`` says why)."""
        self.start()
        last_retry = time.monotonic()
        try:
            while not self._stop.wait(1.0):
                if self._time_rejected is not None and time.monotonic() - last_retry >= retry_every_s:
                    last_retry = time.monotonic()
                    self.handle_policy(self._time_rejected)  # e.g. the clock was corrected since
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until a policy of at least ``version`` is in force (tests, scripts)."""
        with self.applied:
            return self.applied.wait_for(lambda: self.state.version >= version, timeout)

    def _adopt_profile(self, profile: DeviceProfile) -> None:
        """Take ``profile`` as this device's (revision bumped when the measurement changed), stored."""
        if profile.device_id != self.device_id or profile.device_class != self.device_class:
            profile = profile.model_copy(update={"device_id": self.device_id, "device_class": self.device_class})
        old = self.state.profile
        if old is not None:
            bump = 0 if _same_measurement(old, profile) else 1
            profile = profile.model_copy(update={"revision": max(profile.revision, old.revision + bump)})
        if self.state.profile != profile:
            self.state = self.state.model_copy(update={"profile": profile, "updated_at": utcnow()})
            save_device_state(self.state_dir, self.state)
        self.profile = profile

    def set_profile(self, profile: DeviceProfile) -> None:
        """Give the profile after start (the CLI connects first, then measures): it is stored and
        announced, and a policy that arrived meanwhile is evaluated now."""
        with self._lock:
            self._adopt_profile(profile)
            if self.session.connected:
                self.session.publish(topics.profile(self.device_id), self.profile.to_json(), qos=1, retain=True)  # type: ignore[union-attr]
            waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.handle_policy(waiting)

    # -- MQTT handlers (paho network thread) ----------------------------------------------
    def _on_connected(self) -> None:
        self._policy_seen.clear()
        self.reannounce.reset()
        self._announce()

    def _status(self, online: bool) -> Status:
        return Status(device_id=self.device_id, online=online, boot_id=self.boot_id, boot_seq=self.boot_seq,
                      seq=self.seq, sent_at=self.clock())

    def _death(self) -> Will:
        return Will(topics.status(self.device_id), self._status(online=False).to_json())

    def _next_connection(self) -> None:
        """After a connection ended: the next one gets the next number, in its Last Will too."""
        with self._lock:
            self.seq += 1
            self.session.set_will(self._death())

    def _give_up(self, why: str) -> None:
        self.fatal = why
        self._stop.set()

    def _check_status(self, status: Status) -> None:
        """A status from a boot id that is neither this boot nor its predecessor: a second agent."""
        boot = status.boot_id
        if boot in (self.boot_id, self.previous_boot_id) or boot in self._foreign_boots:
            return
        self._foreign_boots.add(boot)
        hint = (f"another agent (boot {boot}, boot #{status.boot_seq}) announced itself with the same device id "
                f"{self.device_id!r}: duplicate device id? Give each device its own --device-id")
        self.session.policy.duplicate_hint = hint
        log.warning("%s: %s", self.device_id, hint)

    def _announce(self) -> None:
        with self._lock:
            birth = self._status(online=True)
            self.session.publish(topics.status(self.device_id), birth.to_json(), qos=1, retain=True)
            if self.profile is not None:
                self.session.publish(topics.profile(self.device_id), self.profile.to_json(), qos=1, retain=True)
            if self.last_ack is not None:
                self.session.publish(topics.policy_reported(self.device_id), self.last_ack.to_json(), qos=1, retain=True)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_device_topic(topic)
        if parsed is not None and parsed.device_id == self.device_id and parsed.channel is topics.Channel.STATUS:
            status = decode(Status, payload, topic=topic, topic_device_id=self.device_id, logger=log)
            if status is not None:
                self._check_status(status)
            return
        if parsed is not None and parsed.device_id == self.device_id and parsed.channel is topics.Channel.REBIRTH:
            request = decode(RebirthRequest, payload, topic=topic, topic_device_id=self.device_id, logger=log)
            if request is not None:
                log.info("%s: controller %s asks for a rebirth (%s)", self.device_id, request.controller_id, request.reason)
                self._announce()
            return
        if parsed is None or parsed.device_id != self.device_id or parsed.channel is not topics.Channel.POLICY_DESIRED:
            log.warning("%s: dropped message on unexpected topic %s", self.device_id, topic)
            return
        try:
            policy = parse_payload(BudgetPolicy, payload, topic_device_id=self.device_id)
        except PayloadError as exc:
            log.warning("dropped message on %s: %s", topic, exc)
            self._refuse_unreadable(payload)
            return
        self._policy_seen.set()
        self.handle_policy(policy)

    def _refuse_unreadable(self, payload: bytes) -> None:
        """A desired policy refused only for fields this agent does not know (a newer controller added
        them): acknowledge that version as rejected, once, naming the fields, so the registry shows why
        the device does not converge. The policy in force stays: the unknown fields may change what
        the policy means."""
        parsed = without_unknown_fields(BudgetPolicy, payload, topic_device_id=self.device_id)
        if parsed is None:
            return
        policy, unknown = parsed
        self._policy_seen.set()  # the controller did send one: no need to announce again
        names = ", ".join(repr(name[:40]) for name in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        why = (f"this agent does not know the field(s) {names} of policy version {policy.version} "
               "(is it older than the controller?); the policy in force stays")
        with self._lock:
            if policy.version <= self.state.version or (policy.version, why[:500]) == (self.state.last_rejected_version,
                                                                                       self.state.last_rejected_reason):
                return  # the same message delivered again
            # retryable: a readable policy of this version (from the controller, after a forged or
            # newer-format one) is still evaluated and applied
            decision = rejection(self.state, policy.version, why, self.clock(), retryable=True)
            log.warning("%s: %s", self.device_id, decision.note)
            self._store_and_ack(decision, policy.version)
            self.applied.notify_all()

    def _reannounce_loop(self) -> None:
        """Re-announce, with jittered exponential backoff, while no desired policy arrives."""
        while not self._stop.wait(self.reannounce.next_delay()):
            if self._policy_seen.is_set() or not self.session.connected:
                self.reannounce.reset()
                continue
            log.info("%s: no desired policy since connecting; announcing again", self.device_id)
            self._announce()

    def handle_policy(self, policy: BudgetPolicy) -> PolicyAck | None:
        with self._lock:
            if self.profile is None:
                log.info("%s: policy version %d waits for this device's profile (being measured)", self.device_id, policy.version)
                self._waiting = policy
                return None
            decision = evaluate_policy(policy, self.state, self.profile, self.clock())
            warn = decision.ack is not None and decision.ack.reason  # rejected, or applied with a target it will miss
            (log.warning if warn else log.info)("%s: %s", self.device_id, decision.note)
            if decision.state is not None:
                self._time_rejected = policy if decision.state.last_rejected_retryable else None
            elif policy is self._time_rejected:  # overtaken by a newer version
                self._time_rejected = None
            ack = self._store_and_ack(decision, policy.version)
            self.applied.notify_all()
            return ack

    def _store_and_ack(self, decision: Decision, version: int) -> PolicyAck | None:
        """Store ``decision``'s state (when it has one), then publish its ack (retained). A state that
        cannot be stored turns the ack into a rejection of ``version``. Called with the lock held."""
        ack = decision.ack
        if decision.state is not None:
            try:
                save_device_state(self.state_dir, decision.state)
                self.state = decision.state
            except OSError as exc:
                log.error("%s: cannot store device state in %s: %s", self.device_id, self.state_dir, exc)
                ack = rejection(self.state, version, f"cannot store device state: {exc}", self.clock()).ack
        if ack is not None:
            self.last_ack = ack
            self.session.publish(topics.policy_reported(self.device_id), ack.to_json(), qos=1, retain=True)
        return ack

    def _telemetry_loop(self) -> None:
        from ldfleet.client.profile import battery_fraction, load_average

        while not self._stop.wait(self.telemetry_interval_s):
            if not self.session.connected:
                continue
            try:
                t = Telemetry(device_id=self.device_id, sent_at=utcnow(), load=load_average(), battery=battery_fraction(),
                              mean_kept_layers=float(self.state.effective_k) if self.state.effective_k else None)
                self.session.publish(topics.telemetry(self.device_id), t.to_json(), qos=0, retain=False)
            except Exception:  # noqa: BLE001
                log.exception("%s: telemetry failed", self.device_id)
