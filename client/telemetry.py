"""Inference telemetry of a device: counts kept per window, published every N seconds on MQTT.

``InferenceStats`` counts requests, k, layers run, latency, deadline misses and governor
interventions; ``summary()`` turns the current window into an ``InferenceSummary`` (the wire
payload, ``common/schemas.py``) and starts a new window. ``TelemetryPublisher`` sends it inside a
``Telemetry`` message on the device's telemetry topic (QoS 0, not retained) every ``interval_s``
seconds, from its own MQTT connection (client id ``ldfleet-inf-<device>``), next to the agent's.
"""

from __future__ import annotations

import logging
import threading
import time

from ldfleet.common import topics
from ldfleet.common.mqtt import MqttSession, parse_broker_url
from ldfleet.common.schemas import InferenceSummary, Telemetry, utcnow

log = logging.getLogger("ldfleet.telemetry")

#: Latencies kept per window for the percentiles (a reservoir beyond this would be needed at > 1 kHz).
MAX_SAMPLES = 20_000


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100] (of a non-empty list)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class InferenceStats:
    """Thread-safe counters of the current telemetry window."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.started = now
        self.requests = self.errors = self.misses = self.interventions = 0
        self.k_counts = [0] * self.num_layers
        self.layer_counts = [0] * self.num_layers
        self.latencies: list[float] = []

    def record(self, result, decision) -> None:
        """Count one finished request (a runtime ``Result`` and the governor's ``Decision``)."""
        with self._lock:
            self.requests += 1
            self.k_counts[len(result.layers) - 1] += 1
            for i in result.layers:
                self.layer_counts[i] += 1
            if len(self.latencies) < MAX_SAMPLES:
                self.latencies.append(result.ms)
            if decision.target_ms is not None and result.ms > decision.target_ms:
                self.misses += 1
            if decision.intervened:
                self.interventions += 1

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def summary(self) -> InferenceSummary:
        """The current window as a payload; the next window starts now."""
        with self._lock:
            now = time.monotonic()
            lat = self.latencies
            out = InferenceSummary(
                window_s=max(1e-3, now - self.started), requests=self.requests, errors=self.errors,
                k_counts=list(self.k_counts), layer_counts=list(self.layer_counts),
                p50_ms=percentile(lat, 50) if lat else None, p99_ms=percentile(lat, 99) if lat else None,
                deadline_misses=self.misses, interventions=self.interventions,
            )
            self._reset(now)
            return out


class TelemetryPublisher:
    """Publishes ``stats`` as ``Telemetry(inference=...)`` every ``interval_s`` seconds (QoS 0)."""

    def __init__(self, device_id: str, broker: str, stats: InferenceStats, interval_s: float = 10.0,
                 ca_file: str | None = None):
        if not topics.is_valid_device_id(device_id):
            raise ValueError(f"invalid device id {device_id!r}: must match {topics.DEVICE_ID_PATTERN}")
        self.device_id, self.stats, self.interval_s = device_id, stats, interval_s
        self.topic = topics.telemetry(device_id)
        self.session = MqttSession(parse_broker_url(broker, ca_file=ca_file), client_id=f"ldfleet-inf-{device_id}",
                                   subscriptions=[], max_queued=10, max_inflight=10)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self) -> TelemetryPublisher:
        self.session.start()
        self._thread = threading.Thread(target=self._loop, name=f"inference-telemetry-{self.device_id}", daemon=True)
        self._thread.start()
        return self

    def publish_now(self) -> Telemetry:
        """Send the current window now (also used at shutdown); returns what was sent."""
        message = Telemetry(device_id=self.device_id, sent_at=utcnow(), inference=self.stats.summary())
        self.session.publish(self.topic, message.to_json(), qos=0, retain=False)
        self.sent += 1
        return message

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.session.connected or not (self.stats.requests or self.stats.errors):
                continue  # an idle window is not sent: it would only add empty rows
            try:
                self.publish_now()
            except Exception:  # noqa: BLE001 - telemetry must never stop inference
                log.exception("%s: inference telemetry failed", self.device_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.session.connected and self.stats.requests:
            self.publish_now()
        self.session.stop()
