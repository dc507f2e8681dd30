"""Simulated devices for control-plane scale tests: many MQTT connections in one asyncio process.

paho's select() loop stalls past ~340 clients per process, so a simulated fleet uses aiomqtt (one
asyncio task per device). Each simulated device behaves like ``ldfleet agent`` on the wire: birth
status and profile (retained) with an offline Last Will, its last ack again on every connect,
subscription to its own desired policy and rebirth requests, the same decision function
(``ldfleet.client.agent.evaluate_policy``), a retained ack, and the same jittered re-announcement
while no desired policy arrives (``common/reannounce.py``). Its state
lives in memory (``persist_dir`` writes it atomically like the real agent, at a disk cost).
Each device notes when (``time.perf_counter()``, CLOCK_MONOTONIC: comparable across processes on
Linux) each desired version reached it; the benchmark reads when acks reached the controller from
the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import aiomqtt

from ldfleet.client.agent import evaluate_policy
from ldfleet.client.state import DeviceState, save_device_state
from ldfleet.common import topics
from ldfleet.common.mqtt import BrokerURL, aiomqtt_kwargs, new_id
from ldfleet.common.process import raise_fd_limit
from ldfleet.common.reannounce import ReannounceBackoff
from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, PolicyAck, RebirthRequest, Status, decode, utcnow

log = logging.getLogger("ldfleet.sim")


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

    async def _announce(self, client: aiomqtt.Client, seq: int) -> None:
        did = self.device_id
        birth = Status(device_id=did, online=True, boot_id=self.boot_id, seq=seq, sent_at=utcnow())
        await client.publish(topics.status(did), birth.to_json(), qos=1, retain=True)
        await client.publish(topics.profile(did), self.profile.to_json(), qos=1, retain=True)
        if self.last_ack is not None:
            await client.publish(topics.policy_reported(did), self.last_ack.to_json(), qos=1, retain=True)

    async def _reannounce_loop(self, client: aiomqtt.Client, seq: int, policy_seen: asyncio.Event) -> None:
        self.reannounce.reset()
        while True:
            try:
                await asyncio.wait_for(policy_seen.wait(), self.reannounce.next_delay())
                return
            except asyncio.TimeoutError:
                self.reannounced += 1
                await self._announce(client, seq)

    async def _serve(self, client: aiomqtt.Client, seq: int) -> None:
        did = self.device_id
        await client.subscribe([(topics.policy_desired(did), 1), (topics.rebirth(did), 1)])
        await self._announce(client, seq)
        self.connected.set()
        reported = topics.policy_reported(did)
        policy_seen = asyncio.Event()
        waiter = asyncio.ensure_future(self._reannounce_loop(client, seq, policy_seen))
        try:
            async for msg in client.messages:
                topic, payload = str(msg.topic), bytes(msg.payload)  # type: ignore[arg-type]
                if topic.endswith("/" + topics.Channel.REBIRTH.value):
                    if decode(RebirthRequest, payload, topic=topic, topic_device_id=did, logger=log) is not None:
                        self.rebirths += 1
                        await self._announce(client, seq)
                    continue
                policy_seen.set()
                ack = self.decide(payload, topic)
                if ack is not None:
                    await client.publish(reported, ack.to_json(), qos=1, retain=True)
        finally:
            waiter.cancel()

    async def run(
        self,
        url: BrokerURL,
        stop: asyncio.Event,
        connect_slots: asyncio.Semaphore,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V311,
    ) -> None:
        """Stay connected until ``stop`` is set (reconnecting with backoff), then say goodbye."""
        did = self.device_id
        will = aiomqtt.Will(topics.status(did), Status(device_id=did, online=False, boot_id=self.boot_id).to_json(), qos=1, retain=True)
        seq = 0
        backoff = 0.5
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    async with connect_slots:
                        client = aiomqtt.Client(
                            **aiomqtt_kwargs(url), identifier=f"ldfleet-sim-{did}", protocol=protocol,
                            will=will, keepalive=60, timeout=10,  # a connect accepted by a broker that is shutting down gets no CONNACK: give up soon
                        )
                        await client.__aenter__()
                    try:
                        seq += 1
                        serving = asyncio.ensure_future(self._serve(client, seq))
                        await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
                        if serving.done():
                            serving.result()  # raises the MqttError that ended the connection
                            continue
                        serving.cancel()
                        off = Status(device_id=did, online=False, boot_id=self.boot_id, seq=seq, sent_at=utcnow())
                        await client.publish(topics.status(did), off.to_json(), qos=1, retain=True, timeout=5)
                    finally:
                        self.connected.clear()
                        try:
                            await client.__aexit__(None, None, None)
                        except Exception:  # noqa: BLE001
                            pass
                    backoff = 0.5
                except (aiomqtt.MqttError, OSError) as exc:
                    if stop.is_set():
                        break
                    log.debug("%s: connection lost (%s); retrying in %.1f s", did, exc, backoff)
                    try:
                        await asyncio.wait_for(asyncio.shield(stopper), backoff)
                    except asyncio.TimeoutError:
                        pass
                    backoff = min(backoff * 2, 10.0)
        finally:
            stopper.cancel()


async def wait_until(predicate, timeout: float, event: asyncio.Event | None = None, step: float = 0.05) -> bool:
    """Poll ``predicate`` (or wake on ``event``) until true or ``timeout`` seconds pass."""
    deadline = time.perf_counter() + timeout
    while True:
        if predicate():
            return True
        left = deadline - time.perf_counter()
        if left <= 0:
            return False
        if event is not None:
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), min(step, left))
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(min(step, left))


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
    tasks = [asyncio.ensure_future(d.run(url, stop, slots)) for d in devices]

    async def announce() -> None:
        while not all(d.connected.is_set() for d in devices):
            await asyncio.sleep(0.05)
        if on_connected is not None:
            on_connected()

    watcher = asyncio.ensure_future(announce())
    await stop.wait()
    watcher.cancel()
    await asyncio.wait(tasks, timeout=60)
    for t in tasks:
        t.cancel()
    return devices


def fleet_process_main() -> None:
    """Entry point of a simulated-fleet child process (see ``start_fleet_process``).

    Reads one JSON line from stdin: ``{"broker", "device_ids", "device_class", "num_layers",
    "layer_ms", "front_end_ms", "connect_concurrency"}``; prints ``connected <n>`` once every device
    is connected; stops (each device says goodbye) when stdin closes or SIGTERM arrives, and then
    prints ``stopped {"applied": n, "received": {device: {version: perf_counter seconds}},
    "rebirths": n, "reannounced": n}``.
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
        print("stopped " + json.dumps({
            "applied": sum(d.applied for d in devices), "received": received,
            "rebirths": sum(d.rebirths for d in devices), "reannounced": sum(d.reannounced for d in devices),
        }), flush=True)

    asyncio.run(main())
