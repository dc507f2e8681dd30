"""Simulated devices for control-plane scale tests: many MQTT 5 connections in one asyncio process.

Each device is a paho MQTT 5 client (as ``ldfleet agent`` is), driven by the fleet's asyncio loop
through paho's external-loop API: the loop's epoll watches every socket and calls ``loop_read``;
writes go straight to the socket (``loop_write`` once a callback has queued them; a writer is
registered only while the socket is full); one task runs ``loop_misc`` (keepalive) for all of them.
(paho's own select() loop stalls past ~340 clients per process; aiomqtt's per-client tasks, queues,
events and timers cost about as much CPU per message as everything else in the device together.)

Each simulated device behaves like ``ldfleet agent`` on the wire: birth status and profile
(retained) with an offline Last Will, its last ack again on every connect, subscription to its own
desired policy and rebirth requests, every payload validated with the common schemas, the same
decision function (``ldfleet.client.agent.evaluate_policy``), a retained QoS 1 ack, and the same
jittered re-announcement while no desired policy arrives (``common/reannounce.py``). Its state
lives in memory (``persist_dir`` writes it atomically like the real agent, at a disk cost). Each
device notes when (``time.perf_counter()``, CLOCK_MONOTONIC: comparable across processes on Linux)
each desired version reached it; the benchmark reads when acks reached the controller from the
registry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ldfleet.client.agent import evaluate_policy
from ldfleet.client.state import DeviceState, save_device_state
from ldfleet.common import topics
from ldfleet.common.mqtt import BrokerURL, new_id, tls_context
from ldfleet.common.process import raise_fd_limit
from ldfleet.common.reannounce import ReannounceBackoff
from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, PolicyAck, RebirthRequest, Status, decode, utcnow

log = logging.getLogger("ldfleet.sim")
_REBIRTH_SUFFIX = "/" + topics.Channel.REBIRTH.value


@dataclass
class SimDevice:
    profile: DeviceProfile
    persist_dir: Path | None = None
    state: DeviceState = field(init=False)
    boot_id: str = field(default_factory=new_id)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    applied: int = 0
    #: desired version -> when it reached this device (perf_counter seconds)
    received: dict[int, float] = field(default_factory=dict)
    last_ack: PolicyAck | None = None
    #: re-announcements: asked by the controller (rebirth requests) and by itself (no policy arrived)
    rebirths: int = 0
    reannounced: int = 0
    reannounce: ReannounceBackoff = field(default_factory=ReannounceBackoff)
    _seq: int = field(init=False, default=0)  # connection number, in births
    _timer: asyncio.TimerHandle | None = field(init=False, default=None)  # next re-announcement
    _lost: asyncio.Future[None] | None = field(init=False, default=None)  # done when the connection ends

    def __post_init__(self) -> None:
        self.state = DeviceState(device_id=self.profile.device_id, device_class=self.profile.device_class, profile=self.profile)

    @property
    def device_id(self) -> str:
        return self.profile.device_id

    def decide(self, payload: bytes, topic: str) -> PolicyAck | None:
        now = time.perf_counter()
        policy = decode(BudgetPolicy, payload, topic=topic, topic_device_id=self.device_id, logger=log)
        if policy is None:
            return None
        self.received.setdefault(policy.version, now)
        d = evaluate_policy(policy, self.state, self.profile)
        if d.state is not None:
            if self.persist_dir is not None:
                save_device_state(self.persist_dir / self.device_id, d.state)
            self.state = d.state
        if d.ack is not None and d.ack.status == "applied":
            self.applied += 1
        if d.ack is not None:
            self.last_ack = d.ack
        return d.ack

    # -- MQTT (paho on the fleet's event loop; every callback runs on the loop thread) ------------
    def _client(self, url: BrokerURL, loop: asyncio.AbstractEventLoop) -> paho.Client:
        did = self.device_id
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ldfleet-sim-{did}", protocol=paho.MQTTv5)
        c.suppress_exceptions = True
        c.enable_logger(log)
        if url.username is not None:
            c.username_pw_set(url.username, url.password)
        if url.tls:
            c.tls_set_context(tls_context(url))
        c.will_set(topics.status(did), Status(device_id=did, online=False, boot_id=self.boot_id).to_json(), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = lambda *a: self._lost is not None and not self._lost.done() and self._lost.set_result(None)
        c.on_socket_close = lambda cl, ud, sock: (loop.remove_reader(sock.fileno()), loop.remove_writer(sock.fileno()))
        return c

    def _flush(self, c: paho.Client) -> None:
        """Send what paho queued (a publish inside a callback only queues); wait for the socket
        to take the rest when it is full."""
        if c.want_write():
            c.loop_write()
            if c.want_write() and c.socket() is not None:
                asyncio.get_running_loop().add_writer(c.socket().fileno(), self._writable, c)

    def _writable(self, c: paho.Client) -> None:
        c.loop_write()
        if not c.want_write() and c.socket() is not None:
            asyncio.get_running_loop().remove_writer(c.socket().fileno())

    def _readable(self, c: paho.Client) -> None:
        c.loop_read()  # packets -> callbacks; a lost connection closes the socket, calls on_disconnect
        self._flush(c)

    def _announce(self, c: paho.Client) -> None:
        did = self.device_id
        birth = Status(device_id=did, online=True, boot_id=self.boot_id, seq=self._seq, sent_at=utcnow())
        c.publish(topics.status(did), birth.to_json(), qos=1, retain=True)
        c.publish(topics.profile(did), self.profile.to_json(), qos=1, retain=True)
        if self.last_ack is not None:
            c.publish(topics.policy_reported(did), self.last_ack.to_json(), qos=1, retain=True)

    def _on_connect(self, c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.debug("%s: connection refused: %s", self.device_id, reason)
            return  # paho closes the socket: on_disconnect
        did = self.device_id
        c.subscribe([(topics.policy_desired(did), 1), (topics.rebirth(did), 1)])
        self._announce(c)
        self.connected.set()
        self.reannounce.reset()
        self._schedule_reannounce(c)

    def _schedule_reannounce(self, c: paho.Client) -> None:
        """Re-announce with jittered backoff until a desired policy arrives (``common/reannounce.py``)."""
        def fire() -> None:
            if self.connected.is_set():
                self.reannounced += 1
                self._announce(c)
                self._flush(c)
                self._schedule_reannounce(c)
        self._timer = asyncio.get_running_loop().call_later(self.reannounce.next_delay(), fire)

    def _on_message(self, c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        topic, payload, did = msg.topic, msg.payload, self.device_id
        try:
            if topic.endswith(_REBIRTH_SUFFIX):
                if decode(RebirthRequest, payload, topic=topic, topic_device_id=did, logger=log) is not None:
                    self.rebirths += 1
                    self._announce(c)
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            ack = self.decide(payload, topic)
            if ack is not None:
                c.publish(topics.policy_reported(did), ack.to_json(), qos=1, retain=True)
        except Exception:  # noqa: BLE001 - one bad message never stops a device
            log.exception("%s: message on %s failed", did, topic)

    async def _connect(self, url: BrokerURL, loop: asyncio.AbstractEventLoop) -> paho.Client | None:
        """Connect (TCP and TLS in a worker thread: they block) and wait for the CONNACK (10 s)."""
        self._lost = loop.create_future()
        c = self._client(url, loop)
        up = asyncio.ensure_future(self.connected.wait())
        try:
            await loop.run_in_executor(None, functools.partial(c.connect, url.host, url.port, keepalive=60, clean_start=True))
            loop.add_reader(c.socket().fileno(), self._readable, c)
            self._flush(c)
            await asyncio.wait({self._lost, up}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, ValueError) as exc:
            log.debug("%s: connect failed: %s", self.device_id, exc)
        finally:
            up.cancel()
        if self.connected.is_set():
            return c
        c.disconnect()
        return None

    async def run(self, url: BrokerURL, stop: asyncio.Event, connect_slots: asyncio.Semaphore, misc: set[paho.Client]) -> None:
        """Stay connected until ``stop`` is set (reconnecting with backoff), then say goodbye.
        ``misc``: the fleet's connected clients (keepalive pings, ``loop_misc``)."""
        loop = asyncio.get_running_loop()
        did = self.device_id
        backoff = 0.5
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                async with connect_slots:
                    self._seq += 1
                    c = await self._connect(url, loop)
                if c is not None:
                    backoff = 0.5
                    misc.add(c)
                    await asyncio.wait({self._lost, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    misc.discard(c)
                    self.connected.clear()
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                    if stop.is_set():
                        off = Status(device_id=did, online=False, boot_id=self.boot_id, seq=self._seq, sent_at=utcnow())
                        c.publish(topics.status(did), off.to_json(), qos=1, retain=True)
                        c.disconnect()  # sent after the goodbye on the same connection; no Last Will
                        break
                    log.debug("%s: connection lost; reconnecting", did)
                    continue
                log.debug("%s: not connected; retrying in %.1f s", did, backoff)
                try:
                    await asyncio.wait_for(asyncio.shield(stopper), backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, 10.0)
        finally:
            stopper.cancel()


async def run_fleet(
    url: BrokerURL,
    profiles: list[DeviceProfile],
    stop: asyncio.Event,
    *,
    connect_concurrency: int = 64,
    on_connected: Any = None,
) -> list[SimDevice]:
    """Run simulated devices until ``stop``; ``on_connected()`` is called once all are connected."""
    raise_fd_limit()
    devices = [SimDevice(p) for p in profiles]
    slots = asyncio.Semaphore(connect_concurrency)
    clients: set[paho.Client] = set()
    tasks = [asyncio.ensure_future(d.run(url, stop, slots, clients)) for d in devices]

    async def keepalive() -> None:  # paho's loop_misc for every connection: pings, ping timeouts
        while True:  # every 5 s is plenty for a 60 s keepalive; every 1 s cost 5 % of a core at 2 500 devices
            await asyncio.sleep(5.0)
            for c in list(clients):
                c.loop_misc()

    async def announce() -> None:
        while not all(d.connected.is_set() for d in devices):
            await asyncio.sleep(0.05)
        if on_connected is not None:
            on_connected()

    watcher, pinger = asyncio.ensure_future(announce()), asyncio.ensure_future(keepalive())
    await stop.wait()
    watcher.cancel()
    pinger.cancel()
    await asyncio.wait(tasks, timeout=60)
    for t in tasks:
        t.cancel()
    return devices


def fleet_process_main() -> None:
    """Entry point of a simulated-fleet child process (see ``start_fleet_process``).

    Reads one JSON line from stdin: ``{"broker", "device_ids", "device_class", "num_layers",
    "layer_ms", "front_end_ms", "connect_concurrency", "report"}``; prints ``connected <n>`` once every
    device is connected; stops (each device says goodbye) when stdin closes or SIGTERM arrives, then
    writes ``{"applied": n, "received": {device: {version: perf_counter seconds}}, "rebirths": n,
    "reannounced": n}`` to the file ``report`` and prints ``stopped``.
    """
    import json
    import signal
    import sys

    from ldfleet.client.profile import synthetic_profile
    from ldfleet.common.mqtt import parse_broker_url

    cfg = json.loads(sys.stdin.readline())
    url = parse_broker_url(cfg["broker"])
    profiles = [
        synthetic_profile(d, cfg["device_class"], num_layers=cfg["num_layers"], layer_ms=cfg["layer_ms"], front_end_ms=cfg["front_end_ms"])
        for d in cfg["device_ids"]
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.readline() or True) and stop.set())

        def connected() -> None:
            print(f"connected {len(profiles)}", flush=True)

        devices = await run_fleet(url, profiles, stop, connect_concurrency=cfg.get("connect_concurrency", 64), on_connected=connected)
        received = {d.device_id: {str(v): t for v, t in d.received.items()} for d in devices}
        Path(cfg["report"]).write_text(json.dumps({
            "applied": sum(d.applied for d in devices), "received": received,
            "rebirths": sum(d.rebirths for d in devices), "reannounced": sum(d.reannounced for d in devices),
        }))
        print("stopped", flush=True)

    asyncio.run(main())
