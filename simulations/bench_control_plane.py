"""Control-plane benchmark: how long a budget change takes to reach and be acknowledged by N devices.

Set-up: a broker (a private Mosquitto by default, or ``--broker URL``), a registry (a temporary SQLite
file by default, or ``--db URL``), the real controller in its own process, and N simulated devices
(aiomqtt, one asyncio process, see ``sim_devices``). After the fleet has converged on its initial
policy, each round does what ``ldfleet budget set`` does (registry write + notice to the controller)
on a quiet, converged fleet and measures, per device, the time from just before the registry write
to the device's ack arriving at the controller (``policy_acks.received_at``, stamped in the
controller's MQTT thread on arrival, before any database work); also when the new desired policy
reached each device (fan-out, noted by the device) and when the registry held every ack.

Processes: this one (orchestration, registry writes and reads), the controller, the simulated
fleet, and Mosquitto, all on the same machine. Arrival times use the wall clock (controller) and
``time.perf_counter`` (devices, CLOCK_MONOTONIC on Linux), each compared with the same clock here.
A first version timed acks with an extra subscriber in the fleet's event loop and over-reported by
~1 s at N=1000; a later one in its own process cost ~15% more CPU for the same figure.
``LDFLEET_CONTROLLER_LOG=DEBUG`` shows the controller's batch timings.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select

from ldfleet.common import topics
from ldfleet.common.broker import EmbeddedBroker
from ldfleet.common.process import stop_process
from ldfleet.common.mqtt import new_id, parse_broker_url, publish_once
from ldfleet.server.operator import set_budget
from ldfleet.server.registry import PolicyAckRecord, Registry

GOAL_P99_MS = 1000.0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    idx = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[idx]


@dataclass
class RoundResult:
    round: int
    budget: str
    devices: int
    acked: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    fanout_p50_ms: float
    fanout_max_ms: float
    registry_converged_ms: float | None
    latencies_ms: list[float] = field(default_factory=list, repr=False)


@dataclass
class BenchResult:
    devices: int
    broker: str
    registry: str
    connect_s: float
    initial_converge_s: float
    rounds: list[RoundResult]
    p50_ms: float
    p99_ms: float
    max_ms: float
    all_acked: bool
    goal_p99_ms: float = GOAL_P99_MS
    #: 1-minute load average before the run and the CPUs this machine has: the benchmark shares them
    #: with the broker, controller and fleet, and with whatever else runs on the machine.
    load_before: float = math.nan
    cpus: int = 0

    @property
    def goal_met(self) -> bool:
        return self.all_acked and self.p99_ms < self.goal_p99_ms

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            for r in d["rounds"]:
                r.pop("latencies_ms", None)
        d["goal_met"] = self.goal_met
        return d


_CONTROLLER_CODE = (
    "import json, logging, os, sys\n"
    "logging.basicConfig(level=os.environ.get('LDFLEET_CONTROLLER_LOG', 'WARNING'),\n"
    "                    format='%(asctime)s controller %(levelname)s %(name)s: %(message)s')\n"
    "from ldfleet.server.controller import run_controller\n"
    "run_controller(**json.loads(sys.stdin.readline()))\n"
)


def start_controller_process(broker: str, db: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    """The real controller in its own Python process (arguments go over stdin, not argv, so a
    password in the broker URL does not show up in ``ps``). Stop it with ``stop_process``."""
    proc = subprocess.Popen([sys.executable, "-c", _CONTROLLER_CODE], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write((json.dumps({"broker": broker, "db": db, **kwargs}) + "\n").encode())
    proc.stdin.close()
    return proc


def _clear_retained(url: str, device_ids: list[str]) -> None:
    """Leave an external broker as we found it: delete the benchmark devices' retained messages."""
    u = parse_broker_url(url)
    msgs = []
    for did in device_ids:
        for ch in (topics.Channel.STATUS, topics.Channel.PROFILE, topics.Channel.POLICY_DESIRED, topics.Channel.POLICY_REPORTED):
            msgs.append((topics.device_topic(did, ch), b"", 1, True))
    for i in range(0, len(msgs), 2000):
        publish_once(u, msgs[i:i + 2000], timeout=30)


async def _bench(
    ids: list[str],
    url: str,
    db: str,
    *,
    rounds: int,
    device_class: str,
    num_layers: int,
    timeout_s: float,
    connect_concurrency: int,
    progress: Any,
) -> BenchResult:
    n = len(ids)
    load_before = os.getloadavg()[0]
    bu = parse_broker_url(url)
    registry = Registry(db)  # migrates before the controller opens it
    ctl = start_controller_process(url, db, poll_interval_s=2.0)
    fleet: asyncio.subprocess.Process | None = None

    def _converged() -> bool:
        c, total = registry.convergence(device_class)
        return total >= n and c >= n

    try:
        t_conn = time.perf_counter()
        progress(f"connecting {n} simulated devices (one asyncio process) to {bu}")
        fleet = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from ldfleet.simulations.sim_devices import fleet_process_main; fleet_process_main()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024,
        )
        cfg = {
            "broker": url, "device_ids": ids, "device_class": device_class, "num_layers": num_layers,
            "layer_ms": [1.0 + 0.1 * i for i in range(num_layers)], "front_end_ms": 4.0,
            "connect_concurrency": connect_concurrency,
        }
        assert fleet.stdin is not None and fleet.stdout is not None
        fleet.stdin.write((json.dumps(cfg) + "\n").encode())
        await fleet.stdin.drain()
        try:
            line = await asyncio.wait_for(fleet.stdout.readline(), timeout_s)
        except asyncio.TimeoutError:
            line = b""
        if not line.startswith(b"connected"):
            raise RuntimeError(f"the simulated fleet did not connect within {timeout_s:.0f} s")
        connect_s = time.perf_counter() - t_conn
        progress(f"{n} connected in {connect_s:.1f} s; waiting for the initial policy to converge")
        if not await _poll(_converged, timeout_s, 0.1):
            c, total = registry.convergence(device_class)
            raise RuntimeError(f"only {c}/{n} devices converged on their initial policy (is the controller running?)")
        initial_s = time.perf_counter() - t_conn
        keeps = [0.5, 0.75, 0.25, 1.0]
        measured: list[tuple[int, str, float, dict[str, int], list[float], float | None]] = []
        for r in range(rounds):
            keep = keeps[r % len(keeps)]
            # start from a quiet, converged fleet: the controller has written every ack
            await _poll(_converged, timeout_s, 0.05)
            await asyncio.sleep(0.5)
            prev = {d.device_id: d.applied_version for d in registry.devices(device_class)}
            last_ack = await asyncio.to_thread(_last_ack_id, registry)
            t0_wall, t0 = time.time(), time.perf_counter()
            change = await asyncio.to_thread(set_budget, registry, url, device_class, keep=keep, issued_by="bench", create_class=True)
            # a cheap COUNT every 50 ms (polling harder steals CPU from what is measured), then the times
            ok = await _poll(lambda: _count_applied_since(registry, last_ack) >= n, timeout_s, 0.05)
            reg_ms = (time.perf_counter() - t0) * 1000 if ok else None
            got = await asyncio.to_thread(_applied_acks_since, registry, last_ack)
            lat = [(ts - t0_wall) * 1000 for ts in got.values()]
            budget = f"keep {keep:g}" + ("" if change.notified else " (no notice: registry poll)")
            measured.append((r + 1, budget, t0, prev, lat, reg_ms))
            progress(
                f"round {r + 1}: {len(lat)}/{n} acked, p50 {percentile(lat, 50):.0f} ms, p99 {percentile(lat, 99):.0f} ms"
                + ("" if ok else f" (timed out after {timeout_s:.0f} s)")
            )
        received = await _stop_fleet(fleet)
        fleet = None
        results = []
        for rnd, budget, t0, prev, lat, reg_ms in measured:
            fan = []
            for d in ids:
                arrivals = [t for v, t in received.get(d, {}).items() if int(v) > prev.get(d, 0)]
                if arrivals:
                    fan.append((min(arrivals) - t0) * 1000)
            results.append(RoundResult(
                round=rnd, budget=budget, devices=n, acked=len(lat),
                p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), max_ms=max(lat) if lat else math.nan,
                fanout_p50_ms=percentile(fan, 50), fanout_max_ms=max(fan) if fan else math.nan,
                registry_converged_ms=reg_ms, latencies_ms=lat,
            ))
        allv = [x for res in results for x in res.latencies_ms]
        return BenchResult(
            devices=n, broker=str(bu), registry=registry.backend, connect_s=connect_s, initial_converge_s=initial_s,
            rounds=results, p50_ms=percentile(allv, 50), p99_ms=percentile(allv, 99), max_ms=max(allv) if allv else math.nan,
            all_acked=all(res.acked == n for res in results), load_before=load_before, cpus=os.cpu_count() or 0,
        )
    finally:
        if fleet is not None:
            await _stop_fleet(fleet)
        stop_process(ctl)
        registry.close()


def _last_ack_id(registry: Registry) -> int:
    with registry.session() as s:
        return int(s.scalar(select(func.max(PolicyAckRecord.id))) or 0)


def _count_applied_since(registry: Registry, after_id: int) -> int:
    with registry.session() as s:
        return int(s.scalar(
            select(func.count(func.distinct(PolicyAckRecord.device_id)))
            .where(PolicyAckRecord.id > after_id, PolicyAckRecord.status == "applied", PolicyAckRecord.version > 0)
        ) or 0)


def _applied_acks_since(registry: Registry, after_id: int) -> dict[str, float]:
    """device -> when the controller received its first applied ack after ``after_id`` (epoch s).

    ``received_at`` is stamped in the controller's MQTT thread as the message arrives, before any
    database work: the time the ack reached the controller."""
    with registry.session() as s:
        rows = s.execute(
            select(PolicyAckRecord.device_id, func.min(PolicyAckRecord.received_at))
            .where(PolicyAckRecord.id > after_id, PolicyAckRecord.status == "applied", PolicyAckRecord.version > 0)
            .group_by(PolicyAckRecord.device_id)
        ).all()
    return {d: ts.timestamp() for d, ts in rows}


async def _stop_fleet(fleet: asyncio.subprocess.Process) -> dict[str, dict[str, float]]:
    """Close the fleet's stdin (devices say goodbye), collect when each desired version reached them."""
    assert fleet.stdin is not None and fleet.stdout is not None
    received: dict[str, dict[str, float]] = {}
    if fleet.returncode is None:
        fleet.stdin.close()
        try:
            while True:
                line = await asyncio.wait_for(fleet.stdout.readline(), 60)
                if not line:
                    break
                if line.startswith(b"stopped "):
                    received = json.loads(line[len(b"stopped "):]).get("received", {})
            await asyncio.wait_for(fleet.wait(), 30)
        except asyncio.TimeoutError:
            fleet.kill()
            await fleet.wait()
    return received


async def _poll(pred: Any, timeout_s: float, step: float) -> bool:
    """Run the (blocking, database) predicate in a thread every ``step`` s until true or timeout."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(step)
    return False


def run_bench(
    n_devices: int,
    *,
    broker: str | None = None,
    db: str | None = None,
    rounds: int = 3,
    device_class: str = "bench",
    num_layers: int = 12,
    timeout_s: float = 120.0,
    connect_concurrency: int = 64,
    progress: Any = None,
) -> BenchResult:
    """Run the benchmark for one fleet size (starts and stops everything it needs)."""
    progress = progress or (lambda msg: None)
    tmp = tempfile.mkdtemp(prefix="ldfleet-bench-")
    own_broker = None
    run = new_id()[:6]
    ids = [f"bench-{run}-{i:05d}" for i in range(n_devices)]
    try:
        if broker is None:
            own_broker = EmbeddedBroker(data_dir=os.path.join(tmp, "broker")).start()
            url = own_broker.url
        else:
            url = broker
        db_url = db or f"sqlite:///{tmp}/registry.db"
        return asyncio.run(
            _bench(ids, url, db_url, rounds=rounds, device_class=device_class, num_layers=num_layers,
                   timeout_s=timeout_s, connect_concurrency=connect_concurrency, progress=progress)
        )
    finally:
        if own_broker is not None:
            own_broker.close()
        elif broker is not None:
            try:
                _clear_retained(broker, ids)
            except Exception as exc:  # noqa: BLE001
                progress(f"could not clear the benchmark's retained messages on {broker}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)
