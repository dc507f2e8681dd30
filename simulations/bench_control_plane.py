"""Control-plane benchmark: how long a budget change takes to reach and be acknowledged by N devices.

Set-up: a broker (a private Mosquitto by default, or ``--broker URL``), a registry (a temporary SQLite
file by default, or ``--db URL``), the real controller(s) in their own processes (several share the
fleet through an MQTT 5 shared subscription), and N simulated devices (paho MQTT 5 clients, spread over
``fleet_procs`` processes, see ``sim_devices``). After the fleet has converged on its initial policy,
each round does what ``ldfleet budget set`` does (registry write + notice to the controller) on a
quiet, converged fleet and measures, per device, the time from just before the registry write to the
device's ack of the new version arriving at a controller (``policy_acks.received_at``, stamped in the
controller's MQTT thread on arrival, before any database work); also when the new desired policy
reached each device (fan-out, noted by the device) and when the registry held every ack.

Honest figures: a device that never acknowledges within the round's timeout counts as a miss, at the
timeout, in p50/p99/max (so one missing device makes ``max_ms`` the timeout); ``converged_pct`` is
the share of devices that acknowledged. After the run the registry's ``desired_policies`` are audited:
per device, versions 1..n with no gap (``version_gaps``) and ``devices.desired_version`` equal to the
newest claimed version (``version_mismatches``); the unique constraint rules out duplicates. When
the benchmark runs the broker it also reports the broker's "Outgoing messages are being dropped"
notices, and with ``restart_broker`` it restarts that broker in the middle of round 1.

Processes: this one (orchestration, registry writes and reads), the controller(s), the simulated
fleet processes, and Mosquitto, all on the same machine. Arrival times use the wall clock
(controller) and ``time.perf_counter`` (devices, CLOCK_MONOTONIC on Linux), each compared with the
same clock here. ``LDFLEET_CONTROLLER_LOG=DEBUG`` shows the controllers' batch timings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ldfleet.common import topics
from ldfleet.common.broker import EmbeddedBroker
from ldfleet.common.mqtt import MqttSession, new_id, parse_broker_url, publish_once
from ldfleet.common.process import stop_process
from ldfleet.server.operator import set_budget
from ldfleet.server.registry import DesiredPolicyRecord, Device, PolicyAckRecord, Registry

log = logging.getLogger("ldfleet.bench")

#: p99 goals (ms) by fleet size, the issue's: (up to this many devices, goal); 3 s beyond the last.
GOAL_P99_MS = ((1000, 1000.0), (3000, 2000.0))
GOAL_P99_MS_LARGEST = 3000.0


def goal_p99_ms(devices: int) -> float:
    """The p99 goal (ms) for a fleet of ``devices`` (``GOAL_P99_MS``)."""
    return next((ms for upto, ms in GOAL_P99_MS if devices <= upto), GOAL_P99_MS_LARGEST)


#: Devices per simulated-fleet process when ``fleet_procs`` is left to the benchmark.
DEVICES_PER_FLEET_PROC = 2500


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


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
    #: share of the devices that acknowledged the new version within the timeout, in %
    converged_pct: float
    #: over all devices; a missing ack counts at the timeout
    p50_ms: float
    p99_ms: float
    max_ms: float
    fanout_p50_ms: float
    fanout_max_ms: float
    registry_converged_ms: float | None
    restarted_broker: bool = False
    #: with ``restarted_broker``: acks of this round in the registry when the broker went down
    acked_before_restart: int | None = None
    #: CPU seconds each part used during the round (where the time goes on a shared machine)
    cpu_s: dict[str, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)


@dataclass
class BenchResult:
    devices: int
    broker: str
    registry: str
    controllers: int
    fleet_procs: int
    connect_s: float
    initial_converge_s: float
    rounds: list[RoundResult]
    p50_ms: float
    p99_ms: float
    max_ms: float
    all_acked: bool
    #: "Outgoing messages are being dropped" lines in the log of the broker the benchmark ran (None: external)
    broker_drop_notices: int | None = None
    #: devices whose claimed versions (desired_policies) are not exactly 1..n
    version_gaps: int = 0
    #: devices whose desired_version is not their newest claimed version
    version_mismatches: int = 0
    #: summed over the controllers / the simulated devices
    controller_stats: dict[str, int] = field(default_factory=dict)
    device_stats: dict[str, int] = field(default_factory=dict)
    #: 1-minute load average before the run and the CPUs this machine has: the benchmark shares them
    #: with the broker, controller and fleet, and with whatever else runs on the machine.
    load_before: float = math.nan
    cpus: int = 0

    @property
    def goal_p99_ms(self) -> float:
        return goal_p99_ms(self.devices)

    @property
    def goal_met(self) -> bool:
        return self.all_acked and self.p99_ms < self.goal_p99_ms and self.version_gaps == 0 and self.version_mismatches == 0

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            for r in d["rounds"]:
                r.pop("latencies_ms", None)
        d["goal_p99_ms"] = self.goal_p99_ms
        d["goal_met"] = self.goal_met
        return d


_CONTROLLER_CODE = (
    "import dataclasses, json, logging, os, sys\n"
    "logging.basicConfig(level=os.environ.get('LDFLEET_CONTROLLER_LOG', 'WARNING'),\n"
    "                    format='%(asctime)s controller %(levelname)s %(name)s: %(message)s')\n"
    "from ldfleet.server.controller import Controller\n"
    "kw = json.loads(sys.stdin.readline())\n"
    "c = Controller(kw.pop('broker'), kw.pop('db'), **kw)\n"
    "c.run_forever()\n"
    "print('stats ' + json.dumps(dataclasses.asdict(c.stats)), flush=True)\n"
)


def start_controller_process(broker: str, db: str, *, capture: bool = False, **kwargs: Any) -> subprocess.Popen[bytes]:
    """The real controller in its own Python process (arguments go over stdin, not argv, so a
    password in the broker URL does not show up in ``ps``). Stop it with ``stop_process``; with
    ``capture`` its stdout ends with ``stats {...}`` (``controller_stats``)."""
    proc = subprocess.Popen([sys.executable, "-c", _CONTROLLER_CODE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE if capture else None)
    assert proc.stdin is not None
    proc.stdin.write((json.dumps({"broker": broker, "db": db, **kwargs}) + "\n").encode())
    proc.stdin.close()
    return proc


def controller_stats(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Stop a controller started with ``capture=True`` and return its final counters."""
    stop_process(proc)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    for line in out.splitlines():
        if line.startswith("stats "):
            return json.loads(line[len("stats "):])
    return {}


def _clear_retained(url: str, device_ids: list[str]) -> None:
    """Leave an external broker as we found it: delete the benchmark devices' retained messages."""
    u = parse_broker_url(url)
    msgs = []
    for did in device_ids:
        for ch in (topics.Channel.STATUS, topics.Channel.PROFILE, topics.Channel.POLICY_DESIRED, topics.Channel.POLICY_REPORTED):
            msgs.append((topics.device_topic(did, ch), b"", 1, True))
    for i in range(0, len(msgs), 2000):
        publish_once(u, msgs[i:i + 2000], timeout=30)


class _Fleet:
    """Simulated devices spread over several processes (``sim_devices.fleet_process_main``)."""

    def __init__(self, procs: list[asyncio.subprocess.Process], reports: list[Path], tmp: tempfile.TemporaryDirectory[str]) -> None:
        self.procs = procs
        self.reports = reports  # each process writes its report (hundreds of KB at 10 000 devices) to a file
        self._tmp = tmp

    @classmethod
    async def start(cls, ids: list[str], nprocs: int, cfg: dict[str, Any]) -> _Fleet:
        procs, reports = [], []
        tmp = tempfile.TemporaryDirectory(prefix="ldfleet-fleet-")
        for k in range(nprocs):
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from ldfleet.simulations.sim_devices import fleet_process_main; fleet_process_main()",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert p.stdin is not None
            reports.append(Path(tmp.name) / f"fleet-{k}.json")
            p.stdin.write((json.dumps({**cfg, "device_ids": ids[k::nprocs], "report": str(reports[-1])}) + "\n").encode())
            await p.stdin.drain()
            procs.append(p)
        return cls(procs, reports, tmp)

    async def wait_connected(self, timeout_s: float) -> bool:
        async def one(p: asyncio.subprocess.Process) -> bool:
            assert p.stdout is not None
            return (await p.stdout.readline()).startswith(b"connected")
        try:
            return all(await asyncio.wait_for(asyncio.gather(*(one(p) for p in self.procs)), timeout_s))
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> dict[str, Any]:
        """Close each process's stdin (devices say goodbye); merge what they report."""
        merged: dict[str, Any] = {"received": {}, "applied": 0, "rebirths": 0, "reannounced": 0}
        for p, path in zip(self.procs, self.reports):
            rep = await _stop_fleet_proc(p, path)
            merged["received"].update(rep.get("received", {}))
            for k in ("applied", "rebirths", "reannounced"):
                merged[k] += int(rep.get(k, 0))
        self.procs = []
        self._tmp.cleanup()
        return merged


async def _stop_fleet_proc(p: asyncio.subprocess.Process, report: Path) -> dict[str, Any]:
    """Close the process's stdin (its devices say goodbye), wait for it, read its report (empty
    when it died or had to be killed: its devices then count as misses)."""
    assert p.stdin is not None and p.stdout is not None
    if p.returncode is None:
        p.stdin.close()
        try:
            await asyncio.wait_for(p.stdout.read(), 60)  # to EOF: its stdout never blocks it
            await asyncio.wait_for(p.wait(), 30)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()
    try:
        return json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        log.warning("simulated fleet process %s left no report: %s", p.pid, exc)
        return {}


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
    controllers: int,
    fleet_procs: int,
    broker: EmbeddedBroker | None,
    restart_broker: bool,
    progress: Any,
) -> BenchResult:
    n = len(ids)
    load_before = os.getloadavg()[0]
    bu = parse_broker_url(url)
    registry = Registry(db)  # migrates before the controllers open it
    group = {"shared_group": "ldfleet-bench"} if controllers > 1 else {}
    ctls = [start_controller_process(url, db, capture=True, poll_interval_s=2.0, controller_id=f"controller-{i}", **group)
            for i in range(controllers)]
    fleet: _Fleet | None = None

    def _converged() -> bool:
        c, total = registry.convergence(device_class)
        return total >= n and c >= n

    try:
        t_conn = time.perf_counter()
        progress(f"connecting {n} simulated devices ({fleet_procs} processes) to {bu}; {controllers} controller(s)")
        cfg = {
            "broker": url, "device_class": device_class, "num_layers": num_layers,
            "layer_ms": [1.0 + 0.1 * i for i in range(num_layers)], "front_end_ms": 4.0,
            "connect_concurrency": connect_concurrency,
        }
        fleet = await _Fleet.start(ids, fleet_procs, cfg)
        if not await fleet.wait_connected(max(timeout_s, n / 50)):
            raise RuntimeError(f"the simulated fleet did not connect within {max(timeout_s, n / 50):.0f} s")
        connect_s = time.perf_counter() - t_conn
        progress(f"{n} connected in {connect_s:.1f} s; waiting for the initial policy to converge")
        settle_s = max(timeout_s, n / 50)  # a connect burst of N births and profiles takes longer than a round
        if not await _poll(_converged, settle_s, 0.1):
            c, total = registry.convergence(device_class)
            raise RuntimeError(f"only {c}/{n} devices converged on their initial policy within {settle_s:.0f} s")
        initial_s = time.perf_counter() - t_conn
        keeps = [0.5, 0.75, 0.25, 1.0]
        measured = []
        for r in range(rounds):
            keep = keeps[r % len(keeps)]
            restart = restart_broker and r == 0
            # start from a quiet, converged fleet: the controller has written every ack
            await _poll(_converged, timeout_s, 0.05)
            await asyncio.sleep(0.5)
            prev = dict(await asyncio.to_thread(_applied_versions, registry, device_class))
            parts = {"controllers": [p.pid for p in ctls], "fleet": [p.pid for p in fleet.procs], "bench": [os.getpid()]}
            if broker is not None and broker.proc is not None:
                parts["broker"] = [broker.proc.pid]
            cpu0 = {k: sum(cpu_seconds(pid) for pid in pids) for k, pids in parts.items()}
            floor = min(prev.values()) if prev else 0
            last_ack = await asyncio.to_thread(_last_ack_id, registry)
            watch = await asyncio.to_thread(_FanOutWatch.start, url, n) if restart else None  # before the clock starts
            t0_wall, t0 = time.time(), time.perf_counter()
            change = await asyncio.to_thread(set_budget, registry, url, device_class, keep=keep, issued_by="bench", create_class=True)
            restarter = asyncio.ensure_future(_restart_midway(broker, watch, registry, last_ack, floor, n, progress)) if watch else None

            def _done() -> bool:
                return _count_acked_since(registry, last_ack, floor) >= n

            # a COUNT every 0.1 s ends the round (ack times are stamped on arrival: polling harder only steals CPU)
            ok = await _poll(_done, timeout_s, 0.1)
            reg_ms = (time.perf_counter() - t0) * 1000 if ok else None
            acked_before_restart = await restarter if restarter is not None else None
            cpu = {k: round(sum(cpu_seconds(pid) for pid in pids) - cpu0[k], 2) for k, pids in parts.items()}
            cpu = {k: v for k, v in cpu.items() if math.isfinite(v)}  # a restarted broker is a new process
            got = await asyncio.to_thread(_acks_since, registry, last_ack, prev)
            lat = [(got[d] - t0_wall) * 1000 if d in got else timeout_s * 1000 for d in ids]
            budget = f"keep {keep:g}" + ("" if change.notified else " (no notice: registry poll)")
            measured.append((r + 1, budget, t0, prev, lat, len(got), reg_ms, acked_before_restart, cpu))
            progress(
                f"round {r + 1}: {len(got)}/{n} acked, p50 {percentile(lat, 50):.0f} ms, p99 {percentile(lat, 99):.0f} ms"
                + (f" (broker restarted with {acked_before_restart} acks in)" if restart else "") + ("" if ok else f" (timed out after {timeout_s:.0f} s)")
                + f"; CPU s {cpu}"
            )
        dev_report = await fleet.stop()
        fleet = None
        results = []
        for rnd, budget, t0, prev, lat, acked, reg_ms, acked_before_restart, cpu in measured:
            fan = []
            for d in ids:
                arrivals = [t for v, t in dev_report["received"].get(d, {}).items() if int(v) > prev.get(d, 0)]
                if arrivals:
                    fan.append((min(arrivals) - t0) * 1000)
            results.append(RoundResult(
                round=rnd, budget=budget, devices=n, acked=acked, converged_pct=100.0 * acked / n,
                p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), max_ms=max(lat),
                fanout_p50_ms=percentile(fan, 50), fanout_max_ms=max(fan) if fan else math.nan,
                registry_converged_ms=reg_ms, restarted_broker=acked_before_restart is not None,
                acked_before_restart=acked_before_restart, cpu_s=cpu, latencies_ms=lat,
            ))
        allv = [x for res in results for x in res.latencies_ms]
        gaps, mismatches = await asyncio.to_thread(audit_versions, registry, device_class)
        cstats: dict[str, int] = {}
        for proc in ctls:
            for k, v in controller_stats(proc).items():
                if isinstance(v, int):
                    cstats[k] = cstats.get(k, 0) + v
        ctls = []
        return BenchResult(
            devices=n, broker=str(bu), registry=registry.backend, controllers=controllers, fleet_procs=fleet_procs,
            connect_s=connect_s, initial_converge_s=initial_s, rounds=results,
            p50_ms=percentile(allv, 50), p99_ms=percentile(allv, 99), max_ms=max(allv) if allv else math.nan,
            all_acked=all(res.acked == n for res in results),
            broker_drop_notices=broker_drop_notices(broker) if broker is not None else None,
            version_gaps=gaps, version_mismatches=mismatches, controller_stats=cstats,
            device_stats={k: int(dev_report[k]) for k in ("rebirths", "reannounced")},
            load_before=load_before, cpus=os.cpu_count() or 0,
        )
    finally:
        if fleet is not None:
            await fleet.stop()
        for proc in ctls:
            stop_process(proc)
        registry.close()


class _FanOutWatch:
    """Counts the desired policies the controller publishes (a plain subscriber on every device's
    desired topic), so that ``--restart-broker`` hits a change that some devices have and most lack."""

    def __init__(self, url: str, n: int) -> None:
        self.seen = 0
        self.threshold = max(1, n // 10)
        self.enough = threading.Event()
        self.session = MqttSession(parse_broker_url(url), client_id=new_id("ldfleet-bench-watch-"),
                                   subscriptions=[(topics.all_devices(topics.Channel.POLICY_DESIRED), 0)], on_message=self._on_message)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if not retained:  # live: published for this change
            self.seen += 1
            if self.seen >= self.threshold:
                self.enough.set()

    @classmethod
    def start(cls, url: str, n: int) -> _FanOutWatch:
        """Connected and subscribed (RuntimeError when the broker cannot be reached)."""
        watch = cls(url, n)
        watch.session.start()
        if not watch.session.wait_connected(10):
            raise RuntimeError("the fan-out watcher could not connect to the broker")
        time.sleep(0.3)  # its subscription is in place before the change goes out
        return watch


async def _restart_midway(broker: EmbeddedBroker | None, watch: _FanOutWatch, registry: Registry, last_ack: int, floor: int,
                          n: int, progress: Any) -> int:
    """Restart the broker once a tenth of the new desired policies has gone out (or after 5 s): the
    change is then mid-flight, some devices have it and most have not. (Waiting for acks in the
    registry was too late: acks are written in batches, and by the time the first batch was in,
    every device had answered.) Returns the acks in the registry at the restart."""
    assert broker is not None
    await asyncio.to_thread(watch.enough.wait, 5.0)
    watch.session.stop()
    acked = await asyncio.to_thread(_count_acked_since, registry, last_ack, floor)
    progress(f"restarting the broker with {watch.seen} of {n} new desired policies out and {acked}/{n} acks in")
    await asyncio.to_thread(broker.restart)
    return acked


def broker_drop_notices(broker: EmbeddedBroker) -> int:
    try:
        return broker.log_path.read_text(errors="replace").count("being dropped")
    except OSError:
        return 0


def audit_versions(registry: Registry, device_class: str) -> tuple[int, int]:
    """(devices whose claimed versions are not exactly 1..n, devices whose desired_version is not the
    newest claimed one) over one class."""
    with registry.session() as s:
        rows = s.execute(
            select(DesiredPolicyRecord.device_id, func.count(), func.min(DesiredPolicyRecord.version), func.max(DesiredPolicyRecord.version))
            .join(Device, Device.device_id == DesiredPolicyRecord.device_id)
            .where(Device.device_class == device_class)
            .group_by(DesiredPolicyRecord.device_id)
        ).all()
        desired = dict(s.execute(select(Device.device_id, Device.desired_version).where(Device.device_class == device_class)).all())
    gaps = sum(1 for _, cnt, lo, hi in rows if lo != 1 or hi != cnt)
    newest = {d: hi for d, _, _, hi in rows}
    mismatches = sum(1 for d, v in desired.items() if v != newest.get(d, 0))
    return gaps, mismatches


def _applied_versions(registry: Registry, device_class: str) -> list[tuple[str, int]]:
    with registry.session() as s:
        return list(s.execute(select(Device.device_id, Device.applied_version).where(Device.device_class == device_class)).all())


def _last_ack_id(registry: Registry) -> int:
    with registry.session() as s:
        return int(s.scalar(select(func.max(PolicyAckRecord.id))) or 0)


def _count_acked_since(registry: Registry, after_id: int, floor: int) -> int:
    """Devices with an applied ack of a version above ``floor`` since ack ``after_id`` (one COUNT)."""
    with registry.session() as s:
        return int(s.scalar(
            select(func.count(func.distinct(PolicyAckRecord.device_id)))
            .where(PolicyAckRecord.id > after_id, PolicyAckRecord.status == "applied", PolicyAckRecord.applied_version > floor)
        ) or 0)


def _acks_since(registry: Registry, after_id: int, prev: dict[str, int]) -> dict[str, float]:
    """device -> when a controller received its first applied ack of a version above the one it had
    before the round (epoch s). A re-announced old ack (after a broker restart) does not count.

    ``received_at`` is stamped in the controller's MQTT thread as the message arrives, before any
    database work: the time the ack reached the controller."""
    with registry.session() as s:
        rows = s.execute(
            select(PolicyAckRecord.device_id, PolicyAckRecord.applied_version, PolicyAckRecord.received_at)
            .where(PolicyAckRecord.id > after_id, PolicyAckRecord.status == "applied")
        ).all()
    first: dict[str, float] = {}
    for d, applied, ts in rows:
        if applied > prev.get(d, 0):
            t = ts.timestamp()
            first[d] = min(first.get(d, t), t)
    return first


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
    device_class: str | None = None,
    num_layers: int = 12,
    timeout_s: float = 120.0,
    connect_concurrency: int = 64,
    controllers: int = 1,
    fleet_procs: int = 0,
    restart_broker: bool = False,
    progress: Any = None,
) -> BenchResult:
    """Run the benchmark for one fleet size (starts and stops everything it needs).

    ``fleet_procs`` 0: one simulated-fleet process per ``DEVICES_PER_FLEET_PROC`` devices.
    ``restart_broker`` needs the benchmark's own broker (``broker`` None). Raises ``ValueError`` for
    bad arguments, ``RuntimeError`` when the fleet does not connect or converge initially."""
    progress = progress or (lambda msg: None)
    if restart_broker and broker is not None:
        raise ValueError("--restart-broker restarts the broker the benchmark runs; leave out --broker")
    if controllers < 1:
        raise ValueError("need at least one controller")
    fleet_procs = fleet_procs or max(1, math.ceil(n_devices / DEVICES_PER_FLEET_PROC))
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
            _bench(ids, url, db_url, rounds=rounds, device_class=device_class or f"bench-{run}", num_layers=num_layers,
                   timeout_s=timeout_s, connect_concurrency=connect_concurrency, controllers=controllers,
                   fleet_procs=min(fleet_procs, n_devices), broker=own_broker, restart_broker=restart_broker, progress=progress)
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
