"""`ldfleet simulate`: a whole heterogeneous fleet on one machine, end to end.

1. data: the scenario's corpus (cached), partitioned per device (voices or Dirichlet), local test splits;
2. warm model: central warm-up on the pooled device training clips (cached across runs);
3. control plane: the embedded Mosquitto (or ``--broker``), the registry (``RUN/registry.db`` or
   ``--db``), the controller, and one real ``DeviceAgent`` per simulated device advertising a profile
   of its class; the scenario's class budgets are set through the operator API and every agent
   stores the policy in its local device state;
4. learning plane: Flower's simulation engine (Ray, one actor per core) runs the project's ServerApp
   and ClientApp; each ClientApp reads its device's budget from that local state;
5. scheduled events between rounds (budget changes through the operator API, crashes), devices
   offline per round, stragglers; a progress line per round;
6. with the scenario's ``serve`` option (or ``--serve N``): after every round each device serves N
   requests on its held-out clips and publishes inference telemetry (``simulations/serving.py``);
7. the report (``RUN/report/``).

``--resume RUN`` continues a run that was killed: the same fleet, registry and device states; the
server restarts after the last finished round and discards the unfinished one. A run that failed or
was interrupted before any round finished has nothing to resume: a plain ``ldfleet simulate`` into
its folder starts it again (``simulations/run_folder.py``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from ldfleet.common.learning import MANIFEST_FILE, FleetManifest
from ldfleet.simulations.progress import Display, MemorySampler
from ldfleet.simulations.run_folder import (
    EVENTS_FILE, ROUNDS_LOG, RUN_FILE, SCENARIO_COPY, RunInfo, clear_run, mark_stopped, stopped_before_rounds,
)
from ldfleet.simulations.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from ldfleet.simulations.serving import FleetServing
from ldfleet.simulations.waits import wait_converged, wait_registered

log = logging.getLogger("ldfleet.sim")

DEFAULT_CACHE = Path("runs") / "cache"


class SimulationError(RuntimeError):
    pass


@dataclass
class SimulateOptions:
    config: Path | None = None
    out: Path | None = None
    rounds: int | None = None
    broker: str | None = None
    db: str | None = None
    resume: bool = False
    cache_dir: Path | None = None
    actors: int | None = None
    report: bool = True
    verbose: bool = False
    overwrite: bool = False
    serve: int | None = None  # requests per device and round; None: the scenario's serve option


# ---- the control plane of the simulated fleet -----------------------------------------------------


def busy_cores(window_s: float = 0.5) -> float:
    """How many cores other work keeps busy right now (from /proc/stat over ``window_s``). The load
    average would still count a ``pip install`` that ended a minute ago."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):  # not Linux
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    cores = os.cpu_count() or 1
    return cores * (1.0 - (idle1 - idle0) / max(1, total1 - total0))


def torch_threads(requested: int = 0) -> int:
    """Threads for torch in this process: ``requested``, else one per core that is idle now (at least
    one). More threads than free cores is much slower, not faster: on 2 cores with one busy, 2 threads
    made a training step 8x slower than 1."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


class ScenarioHooks:
    """Round hooks for the strategy: scheduled events, offline devices, stragglers, crashes, display."""

    def __init__(self, scn: Scenario, info: RunInfo, registry, broker_url: str, display: Display, serving=None) -> None:
        self.scn = scn
        self.info = info
        self.registry = registry
        self.broker_url = broker_url
        self.display = display
        self.serving = serving
        self.devices = [d for d, _ in scn.device_ids()]
        path = info.run_dir / EVENTS_FILE
        self.applied: list[dict] = json.loads(path.read_text()) if path.exists() else []

    def _mark(self, index: int, detail: dict) -> None:
        self.applied.append({"event": index, **detail})
        path = self.info.run_dir / EVENTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.applied, indent=1))
        tmp.replace(path)

    def before_round(self, rnd: int):
        from ldfleet.server.operator import set_budget
        from ldfleet.server.strategy import RoundPlan

        done = {a["event"] for a in self.applied}
        plan = RoundPlan()
        for i, ev in enumerate(self.scn.events):
            if ev.round != rnd:
                continue
            if ev.set_budget is not None and i not in done:
                b = ev.set_budget
                res = set_budget(self.registry, self.broker_url, b.device_class, **b.fields(), device_id=b.device,
                                 issued_by="scenario", comment=f"{self.scn.name}: event at round {rnd}")
                members = {d for d, c in self.scn.device_ids() if c.name == b.device_class}
                if b.device:
                    members = {b.device}
                late = wait_converged(self.registry, members, 30.0, b.device_class,
                                      None if b.device else res.policy.version)
                self._mark(i, {"round": rnd, "set_budget": b.model_dump(exclude_none=True), "policy_version": res.policy.version,
                               "not_converged": sorted(late)})
                target = b.device or f"class {b.device_class}"
                self.display.say(f"[cyan]round {rnd}: operator sets {target} to {b.text()} "
                                 f"(policy v{res.policy.version}){'; not yet applied by ' + ', '.join(sorted(late)) if late else ''}[/cyan]")
            if ev.crash is not None:
                plan.crash += ev.crash.count
                plan.crash_devices |= set(ev.crash.devices)
        rng = random.Random(f"{self.scn.seed}/{rnd}")
        av = self.scn.availability
        plan.offline = {d for d in self.devices if rng.random() < av.offline_probability}
        if av.straggler_probability > 0:
            plan.delays = {d: av.straggler_delay_s for d in self.devices
                           if d not in plan.offline and rng.random() < av.straggler_probability}
        return plan

    def after_round(self, rnd: int, summary: dict[str, Any]) -> None:
        self.display.round_done(rnd, summary)
        served = self.serving.serve_round(self.info.run_dir, rnd) if self.serving is not None else {}
        if served:
            self.display.say(f"  served {served['requests']} requests (mean k {served['mean_k']:.2f}, "
                             f"{served['interventions']} governor interventions) in {served['seconds']:.1f} s")
        with open(self.info.run_dir / ROUNDS_LOG, "a") as f:
            f.write(json.dumps({"round": rnd, "time": time.time(), **{k: summary.get(k) for k in (
                "sampled", "offline", "failed", "crash_injected", "seconds", "policy_versions", "k")}}, default=str) + "\n")


def _quiet_flower(run_dir: Path, verbose: bool) -> None:
    """Flower logs to RUN/flower.log; the console keeps only our progress (unless --verbose)."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False  # Flower has its own console handler; never twice through the root logger
    if not verbose:
        for h in flwr_log.handlers:
            h.setLevel(logging.CRITICAL)
    fh = logging.FileHandler(run_dir / "flower.log")
    fh.setLevel(logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    flwr_log.addHandler(fh)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


class _Logs:
    """While a simulation runs: every ldfleet log line goes to RUN/simulate.log; the console gets the
    progress display and warnings only (everything with --verbose)."""

    def __init__(self, run_dir: Path, verbose: bool) -> None:
        self.logger = logging.getLogger("ldfleet")
        self.saved = (self.logger.propagate, self.logger.level)
        self.file = logging.FileHandler(run_dir / "simulate.log")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.console = logging.StreamHandler()
        self.console.setLevel(logging.DEBUG if verbose else logging.WARNING)
        self.console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def __enter__(self) -> _Logs:
        self.logger.addHandler(self.file)
        self.logger.addHandler(self.console)
        self.logger.propagate = False
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.file)
        self.logger.removeHandler(self.console)
        self.file.close()
        self.logger.propagate, level = self.saved
        self.logger.setLevel(level)


def _start_agents(scn: Scenario, manifest: FleetManifest, profiles: dict, broker_url: str) -> list:
    from ldfleet.client.agent import DeviceAgent

    agents = []
    for dev in manifest.devices:
        agent = DeviceAgent(dev.device_id, dev.device_class, broker_url, profiles[dev.device_id], state_dir=dev.state_dir,
                            reconnect_max_s=5.0)
        agents.append(agent.start())
    return agents


def simulate(opts: SimulateOptions, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) a simulated fleet; returns the report summary (or run info without a report)."""
    run_dir = Path(opts.out) if opts.out is not None else None
    if run_dir is None and not opts.resume:
        run_dir = Path("runs") / load_scenario(Path(opts.config or Path("configs") / "fleet-small.yaml")).name
    if run_dir is None:
        raise SimulationError("--resume needs the run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    with _Logs(run_dir, opts.verbose):
        started: list[str] = []  # the run id, once this call has taken the run (not one refused for another's)
        try:
            return _simulate(opts, run_dir, console or Console(), started)
        except BaseException as exc:  # a plain retry restarts a run stopped before any round (run_folder)
            if started:
                mark_stopped(run_dir, started[0], "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise


def _simulate(opts: SimulateOptions, run_dir: Path, console: Console, started: list[str]) -> dict[str, Any]:
    t_start = time.perf_counter()
    if opts.resume:
        if not (run_dir / RUN_FILE).is_file():
            raise SimulationError(f"{run_dir} is not a simulation run (no {RUN_FILE}); start one with `ldfleet simulate --out {run_dir}`")
        info = RunInfo.load(run_dir)
        scn = parse_scenario(yaml.safe_load((run_dir / SCENARIO_COPY).read_text()), str(run_dir / SCENARIO_COPY), base_dir=run_dir)
        if opts.rounds is not None:
            scn = scn.model_copy(update={"rounds": opts.rounds})
        if opts.db and opts.db != info.db_url:
            raise SimulationError(f"{run_dir} uses the registry {info.db_url}; resume it with the same --db")
    else:
        config = Path(opts.config or Path("configs") / "fleet-small.yaml")
        scn = load_scenario(config, rounds=opts.rounds)
        if (run_dir / RUN_FILE).exists() and (opts.overwrite or stopped_before_rounds(run_dir)):
            clear_run(run_dir)  # asked for, or nothing to resume: it stopped before any round
        if (run_dir / RUN_FILE).exists():
            raise SimulationError(f"{run_dir} already holds a run ({RunInfo.load(run_dir).status}): continue it with `ldfleet "
                                  f"simulate --resume {run_dir}`, start it again with --overwrite, or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        dump = scn.model_dump(mode="json", exclude={"profiles"})
        dump["profiles_file"] = "device-classes.yaml"
        (run_dir / SCENARIO_COPY).write_text(yaml.safe_dump(dump, sort_keys=False))
        (run_dir / "device-classes.yaml").write_text(yaml.safe_dump({"profiles": {k: v.model_dump() for k, v in scn.profiles.items()}}, sort_keys=False))
        cache_dir = Path(opts.cache_dir or os.environ.get("LDFLEET_SIM_CACHE") or DEFAULT_CACHE).resolve()
        db_url = opts.db or f"sqlite:///{(run_dir / 'registry.db').resolve()}"
        info = RunInfo(run_id=f"{scn.name}-{uuid.uuid4().hex[:8]}", run_dir=run_dir, db_url=db_url, cache_dir=cache_dir,
                       created=time.time())
    if opts.serve is not None:
        scn = scn.model_copy(update={"serve": scn.serve.model_copy(update={"requests_per_device": opts.serve})})
    info.rounds = scn.rounds
    info.status = "running"
    info.save()
    started.append(info.run_id)
    display = Display(console, scn)
    classes_txt = escape(", ".join(f"{c.count} {c.name} [{c.budget.text()}]" for c in scn.classes))
    display.say(f"[bold]{scn.name}[/bold]: {scn.num_devices} devices in {len(scn.classes)} classes "
                f"({classes_txt}), {scn.rounds} rounds; run {run_dir} ({info.run_id}){' (resuming)' if opts.resume else ''}")
    sampler = MemorySampler()
    sampler.start()
    timings = info.timings if opts.resume else {}
    phase_t = {}

    # 1-2. data, partitions, warm model, manifest
    import torch

    from ldfleet.simulations.fleet import build_fleet, device_profiles, reference_latency, warm_device_caches

    threads = torch_threads(scn.simulation.torch_threads)
    torch.set_num_threads(threads)
    info.torch_threads = threads

    info.cache_dir.mkdir(parents=True, exist_ok=True)
    fleet = build_fleet(scn, run_dir, info.cache_dir, info.run_id, phase_t, say=display.say)
    manifest_path = run_dir / MANIFEST_FILE
    if opts.resume and manifest_path.exists():
        old = FleetManifest.load(manifest_path)
        if [d.device_id for d in old.devices] != [d.device_id for d in fleet.manifest.devices] or old.model_dir != fleet.manifest.model_dir:
            raise SimulationError(f"{run_dir}: the fleet (devices or warm model) changed since the run started; cannot resume")
    fleet.manifest.save(manifest_path)
    warm_device_caches(fleet.manifest, phase_t)
    display.say(f"devices: front ends cached in {phase_t['device_caches']:.0f} s")
    profiles = device_profiles(scn, reference_latency(fleet.warm_dir))

    # 3. control plane
    from ldfleet.common.broker import EmbeddedBroker
    from ldfleet.server.controller import Controller
    from ldfleet.server.operator import set_budget
    from ldfleet.server.registry.store import Registry

    t = time.perf_counter()
    broker = None
    controller = None
    agents: list = []
    serving = None
    registry = Registry(info.db_url)
    try:
        if opts.broker:
            broker_url = opts.broker
        else:
            broker = EmbeddedBroker(data_dir=run_dir / "broker").start()
            broker_url = broker.url
        info.broker_url = broker_url
        info.save()
        controller = Controller(broker_url, registry).start()
        agents = _start_agents(scn, fleet.manifest, profiles, broker_url)
        ids = {d.device_id for d in fleet.manifest.devices}
        missing = wait_registered(registry, ids, 60.0)
        if missing:
            raise SimulationError(f"{len(missing)} device(s) never registered with the controller: {sorted(missing)[:5]}")
        active = registry.active_policies()
        for c in scn.classes:
            key = f"class:{c.name}"
            if opts.resume and key in active:
                continue  # the run's policies (scenario + events + operator changes) are in the registry
            set_budget(registry, broker_url, c.name, **c.budget.fields(), issued_by="scenario", create_class=True,
                       comment=f"{scn.name}: initial class budget")
        late = wait_converged(registry, ids, 60.0)
        if late:
            display.say(f"[yellow]{len(late)} device(s) have not applied their policy yet: {sorted(late)[:5]}[/yellow]")
        phase_t["control_plane"] = time.perf_counter() - t
        db_hint = info.db_url
        display.say(f"control plane: broker {broker_url}, registry {registry.redacted_url()}, controller + "
                    f"{len(agents)} agents up, class budgets applied in {phase_t['control_plane']:.1f} s")
        display.say(f"  change a budget while it runs: [bold]ldfleet budget set CLASS --keep 0.5 --broker {broker_url} "
                    f"--db {db_hint}[/bold]")

        # 4. learning plane (5. events and served traffic from the round hooks)
        serving = FleetServing(fleet.manifest, broker_url, run_dir, scn.serve.requests_per_device, scn.serve.deadline_ms)
        phase_t["rounds"] = _run_rounds(scn, info, fleet.manifest, registry, broker_url, display, opts, serving)
    finally:
        t = time.perf_counter()
        if serving is not None:
            serving.close(registry)
        for a in agents:
            try:
                a.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping agent failed")
        if controller is not None:
            controller.stop()
        if broker is not None:
            broker.stop()
        registry.close()
        phase_t["shutdown"] = time.perf_counter() - t
        info.peak_rss_mb = max(info.peak_rss_mb, sampler.stop())
        for k, v in phase_t.items():
            timings[k] = timings.get(k, 0.0) + v if opts.resume and k == "rounds" else v
        info.timings = timings
        info.save()

    from ldfleet.server.rounds import finished_rounds
    from ldfleet.server.registry.store import Registry as _R

    with _R(info.db_url) as reg:
        done = finished_rounds(reg, info.run_id)
    info.status = "finished" if len(done) >= scn.rounds else "incomplete"
    info.timings["simulate_total"] = time.perf_counter() - t_start
    info.save()
    summary: dict[str, Any] = {"run_id": info.run_id, "run_dir": str(run_dir), "status": info.status, "timings": info.timings,
                               "peak_rss_mb": info.peak_rss_mb}
    if opts.report:
        from ldfleet.simulations.report import build_report

        t = time.perf_counter()
        summary = build_report(run_dir, console=console)
        info.timings["report"] = time.perf_counter() - t
        info.timings["total"] = time.perf_counter() - t_start
        info.save()
        summary["timings"] = info.timings
        (run_dir / "report" / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    display.say(f"[green]done[/green]: {info.status}, {len(done)}/{scn.rounds} rounds, total "
                f"{time.perf_counter() - t_start:.0f} s, peak memory {info.peak_rss_mb:.0f} MB"
                + (f"; report {run_dir / 'report' / 'report.html'}" if opts.report else ""))
    return summary


def _run_rounds(scn: Scenario, info: RunInfo, manifest: FleetManifest, registry, broker_url: str, display: Display,
                opts: SimulateOptions, serving: FleetServing | None = None) -> float:
    from flwr.simulation import run_simulation

    from ldfleet.client.app import make_client_app
    from ldfleet.server.app import ServerSettings, make_server_app

    _quiet_flower(info.run_dir, opts.verbose)
    cores = os.cpu_count() or 1
    actors = opts.actors or scn.simulation.actors or cores
    settings = ServerSettings(
        run_id=info.run_id, run_dir=str(info.run_dir.resolve()), model_dir=manifest.model_dir, db_url=info.db_url,
        num_rounds=scn.rounds, fraction_train=scn.fraction_sampled, fraction_evaluate=scn.fraction_evaluate,
        min_train_nodes=scn.min_devices, min_evaluate_nodes=min(scn.min_devices, scn.num_devices),
        min_available_nodes=scn.num_devices, local_epochs=scn.training.local_epochs, batch_size=scn.training.batch_size,
        selector_lr=scn.training.selector_lr, head_lr=scn.training.head_lr, seed=scn.seed,
        round_timeout_s=scn.simulation.round_timeout_s, settle_timeout_s=scn.simulation.settle_timeout_s,
        wait_nodes_s=60.0, resume=True,
    )
    hooks = ScenarioHooks(scn, info, registry, broker_url, display, serving)
    outcome: list = []
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": actors, "num_gpus": 0, "logging_level": "error", "log_to_driver": False,
                      "include_dashboard": False},
    }
    display.say(f"learning plane: Flower simulation engine (Ray), {actors} actor(s) for {scn.num_devices} supernodes")
    display.header()
    t = time.perf_counter()
    run_simulation(
        server_app=make_server_app(settings, hooks, outcome),
        client_app=make_client_app(str((info.run_dir / MANIFEST_FILE).resolve())),
        num_supernodes=scn.num_devices,
        backend_config=backend,  # type: ignore[arg-type]
        verbose_logging=opts.verbose,
    )
    if not outcome:
        raise SimulationError(f"the ServerApp did not finish; see {info.run_dir / 'flower.log'}")
    return time.perf_counter() - t


__all__ = ["SimulateOptions", "SimulationError", "ScenarioError", "simulate"]
