"""Fleet commands: `simulate`, `report`, `registry rounds|devices|usage`, `server`, `client`, `federate`.

Heavy modules (Flower, Ray, torch, SQLAlchemy) are imported inside the commands so that
`ldfleet --help` stays fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ldfleet.commands._shared import (FEDERATE_FILE, REPROFILE_EVERY, REPROFILE_TOLERANCE, console, err, fail, finite, open_registry,
                                      run_registry, watch_profile)
from ldfleet.common.metrics import metric_label


registry_app = typer.Typer(help="Read the registry of a run: rounds, devices, layer usage.", no_args_is_help=True)

DB_HELP = "Registry URL (default: the run's own, from RUN/run.json or RUN/federate.json; else $LDFLEET_DB or ~/.ldfleet/registry.db)."


# ---- simulate / report ----------------------------------------------------------------------------


def simulate(
    config: Path = typer.Option(Path("configs/fleet-small.yaml"), "--config", "-c", help="Scenario YAML (see configs/fleet-*.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder \\[default: runs/<scenario name>]."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Override the scenario's number of rounds."),
    broker: Optional[str] = typer.Option(None, "--broker", help="MQTT broker URL \\[default: a private Mosquitto for this run]."),
    db: Optional[str] = typer.Option(None, "--db", help="Registry URL \\[default: sqlite:///RUN/registry.db]."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder after its last finished round."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache of corpora and warm models \\[default: runs/cache or $LDFLEET_SIM_CACHE]."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="Ray actors running ClientApps \\[default: one per core]."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write RUN/report/ at the end."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs on the console."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous simulation in --out (keeps the cache)."),
    serve: Optional[int] = typer.Option(None, "--serve", min=0, help="After every round each device serves N inference requests "
                                        "on its held-out clips and publishes telemetry (also on --resume) \\[default: the scenario's serve.requests_per_device, 0]."),
) -> None:
    """Run a heterogeneous fleet on this machine: data, warm model, broker, controller, agents, Flower rounds, report.

    Change a class budget while it runs, from another terminal, with the `ldfleet budget set` line it
    prints (same broker and registry); the next round uses the new version.
    """
    from ldfleet.simulations.scenario import ScenarioError
    from ldfleet.simulations.simulate import SimulateOptions, SimulationError
    from ldfleet.simulations.simulate import simulate as run

    if resume is not None and out is not None and out != resume:
        fail("--resume RUN already names the run folder; drop --out")
    opts = SimulateOptions(config=config, out=resume or out, rounds=rounds, broker=broker, db=db, resume=resume is not None,
                           cache_dir=cache, actors=actors, report=report, verbose=verbose, overwrite=overwrite,
                           serve=serve)
    out_console = console if console.is_terminal else Console(width=160)  # logs and CI: no wrapping at 80
    try:
        summary = run(opts, out_console)
    except (ScenarioError, SimulationError, FileNotFoundError) as exc:
        fail(str(exc))
    if summary.get("status") != "finished":
        raise typer.Exit(1)


def report(
    run: Path = typer.Argument(..., help="A run folder made by `ldfleet simulate`."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary instead of a short text."),
) -> None:
    """(Re)write RUN/report/: Markdown + HTML with PNG plots, and summary.json."""
    from ldfleet.simulations.report import build_report
    from ldfleet.simulations.run_folder import RUN_FILE

    if (run / FEDERATE_FILE).is_file() and not (run / RUN_FILE).is_file():
        fail(f"{run} is a `ldfleet federate` run; `ldfleet report` reads simulation runs (it scores held-out "
             f"speakers of the scenario's corpus). Its rounds: `ldfleet registry rounds --run {run}`; layer usage: "
             f"`ldfleet registry usage --run {run}`")
    try:
        summary = build_report(run, db_url=db, console=None if as_json else console)
    except FileNotFoundError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
        return
    metric = summary.get("metric", "accuracy")
    sfx, name = ("", "acc") if metric == "accuracy" else (f"_{metric}", metric.upper())
    t = Table(title=f"{summary['scenario']}: classes at their budget (held-out speakers{', WER' if metric == 'wer' else ''})")
    for col in ("class", "budget", "k", "selector", "random", "early exit", f"fleet {name}", "layers"):
        t.add_column(col, justify="left" if col in ("class", "budget") else "right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for c in summary["classes"]:
        t.add_row(c["device_class"], str(c["budget"]), str(c["k"]), pct(c[f"heldout_selector{sfx}"]), pct(c[f"heldout_random{sfx}"]),
                  pct(c[f"heldout_early_exit{sfx}"]), pct(c[f"fleet_{metric}_last_round"]),
                  f"{c['fleet_mean_layers_last_round']:.2f}" if c["fleet_mean_layers_last_round"] is not None else "-")
    console.print(t)
    tr = summary["traffic"]
    console.print(f"traffic per client per round: {tr['received_bytes_per_client_round']:.0f} B up, "
                  f"{tr['sent_bytes_per_client_round']:.0f} B down; full-model FedAvg {tr['full_model_bytes_same_backbone']:.0f} B "
                  f"({tr['ratio_same_backbone'] or 0:.0f}x); base-size backbone {tr['ratio_base']:.0f}x")


# ---- registry ------------------------------------------------------------------------------------------


def _registry_target(run: Path | None, run_id: str | None, db: str | None) -> tuple[Any, str]:
    from ldfleet.server.rounds import run_ids

    if run is not None:
        run_db, run_run_id = run_registry(run)
        db, run_id = db or run_db, run_id or run_run_id
    reg = open_registry(db, must_exist=True)
    if run_id is None:
        runs = run_ids(reg)
        if not runs:
            reg.close()
            fail(f"no federated rounds in {reg.redacted_url()}")
        run_id = runs[0][0]
    return reg, run_id


_RUN_OPT = typer.Option(None, "--run", help="Run folder of `simulate` or `federate` (its registry and run id).")
_RUN_ID_OPT = typer.Option(None, "--run-id", help="Run id \\[default: the run of --run, else the newest in the registry].")
_DB_OPT = typer.Option(None, "--db", help=DB_HELP)
_JSON_OPT = typer.Option(False, "--json", help="Print JSON.")


@registry_app.command("rounds")
def registry_rounds(run: Optional[Path] = _RUN_OPT, run_id: Optional[str] = _RUN_ID_OPT, db: Optional[str] = _DB_OPT,
                    as_json: bool = _JSON_OPT) -> None:
    """One line per round: status, devices sampled/offline/failed, accuracy (WER for speech recognition) and
    mean layers; --json adds the per-class aggregates of every round."""
    from ldfleet.server.rounds import metric_rows, rounds

    reg, rid = _registry_target(run, run_id, db)
    try:
        rows = rounds(reg, rid)
        metrics = metric_rows(reg, rid)
    finally:
        reg.close()
    out = []
    for r in rows:
        s = r.summary or {}
        mine = [m for m in metrics if m.round == r.number]
        ev = (s.get("eval") or {}).get("(all)", {})
        out.append({
            "round": r.number, "status": r.status, "started_at": r.started_at.isoformat() if r.started_at else None,
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            # the summary is written when a round ends: a running round has no counts yet (None, not 0)
            "sampled": len(s.get("sampled") or []) if r.summary else None, "offline": len(s.get("offline") or []) if r.summary else None,
            "train_rows": sum(1 for m in mine if m.phase == "train"), "eval_rows": sum(1 for m in mine if m.phase == "eval"),
            "failed": s.get("failed") or [], "accuracy": ev.get("accuracy"), "mean_layers": ev.get("mean_layers"),
            **({"wer": ev.get("wer"), "cer": ev.get("cer")} if "wer" in ev else {}),
            "classes": {k: v for k, v in (s.get("eval") or {}).items() if k != "(all)"},
        })
    if as_json:
        print(json.dumps({"run_id": rid, "rounds": out}, indent=1, default=str))
        return
    metric = "wer" if any("wer" in o for o in out) else "accuracy"  # asr runs: WER (eval, all devices)
    t = Table(title=f"rounds of {rid}")
    for col in ("round", "status", "sampled", "offline", "train rows", "failed", metric_label(metric), "mean layers"):
        t.add_column(col, justify="right")
    for o in out:
        t.add_row(str(o["round"]), o["status"], *("-" if o[c] is None else str(o[c]) for c in ("sampled", "offline")), str(o["train_rows"]),
                  ", ".join(f["device_id"] for f in o["failed"]) or "-",
                  "-" if o.get(metric) is None else f"{100 * o[metric]:.1f}%",
                  "-" if o["mean_layers"] is None else f"{o['mean_layers']:.2f}")
    console.print(t)


@registry_app.command("devices")
def registry_devices(run: Optional[Path] = _RUN_OPT, run_id: Optional[str] = _RUN_ID_OPT, db: Optional[str] = _DB_OPT,
                     as_json: bool = _JSON_OPT) -> None:
    """Per device: class, policy versions used in rounds, k, last accuracy (WER for speech recognition), mean
    layers, latency, failures; --json adds every round's result with its k."""
    from ldfleet.server.rounds import device_status, metric_rows

    reg, rid = _registry_target(run, run_id, db)
    try:
        metrics = metric_rows(reg, rid)
        status = device_status(reg)
    finally:
        reg.close()
    by_dev: dict[str, list] = {}
    for m in metrics:
        by_dev.setdefault(m.device_id, []).append(m)
    out = []
    for dev, rows in sorted(by_dev.items()):
        ok = [m for m in rows if not m.phase.endswith("-failed")]
        last = max((m for m in ok if m.phase == "eval"), key=lambda m: m.round, default=None)
        st = status.get(dev, {})
        out.append({
            "device_id": dev, "device_class": rows[0].device_class, "online": st.get("online"),
            "applied_policy_version": st.get("applied_version"),
            "policy_versions_used": sorted({m.policy_version for m in ok if m.policy_version is not None}),
            "k": last.k if last else None, "accuracy": last.accuracy if last else None,
            **({"wer": last.wer, "cer": last.cer} if last is not None and last.wer is not None else {}),
            # every round's result, with the k it ran under: accuracy (kws) or WER and CER (asr)
            "rounds": [{"round": m.round, "phase": m.phase, "k": m.k, "mean_layers": m.mean_kept_layers,
                        **({"wer": m.wer, "cer": m.cer} if m.wer is not None else {"accuracy": m.accuracy})} for m in ok],
            "mean_layers": last.mean_kept_layers if last else None, "latency_ms": last.latency_ms if last else None,
            "rounds_trained": sum(1 for m in ok if m.phase == "train"),
            "failures": [{"round": m.round, "phase": m.phase} for m in rows if m.phase.endswith("-failed")],
        })
    if as_json:
        print(json.dumps({"run_id": rid, "devices": out}, indent=1, default=str))
        return
    metric = "wer" if any("wer" in o for o in out) else "accuracy"  # asr runs: the last round's WER
    t = Table(title=f"devices of {rid}")
    for col in ("device", "class", "policy now", "versions used", "k", metric_label(metric), "layers",
                "latency ms", "trained", "failures"):
        t.add_column(col, justify="left" if col in ("device", "class") else "right")
    for o in out:
        t.add_row(o["device_id"], str(o["device_class"]), f"v{o['applied_policy_version']}" if o["applied_policy_version"] is not None else "-",
                  ",".join(f"v{v}" for v in o["policy_versions_used"]), str(o["k"] or "-"),
                  "-" if o.get(metric) is None else f"{100 * o[metric]:.1f}%",
                  "-" if o["mean_layers"] is None else f"{o['mean_layers']:.2f}",
                  "-" if o["latency_ms"] is None else f"{o['latency_ms']:.1f}", str(o["rounds_trained"]),
                  ", ".join(f"r{f['round']} {f['phase']}" for f in o["failures"]) or "-")
    console.print(t)


@registry_app.command("usage")
def registry_usage(run: Optional[Path] = _RUN_OPT, run_id: Optional[str] = _RUN_ID_OPT, db: Optional[str] = _DB_OPT,
                   round_number: Optional[int] = typer.Option(None, "--round", help="Round \\[default: the last with results]."),
                   phase: str = typer.Option("eval", "--phase", help="eval | train"),
                   per_device: bool = typer.Option(False, "--devices", help="One row per device instead of per class."),
                   source: str = typer.Option("rounds", "--source", help="rounds (federated rounds) | inference (devices' served requests, per device)."),
                   as_json: bool = _JSON_OPT) -> None:
    """Share of inputs that ran each encoder layer, per device class (or device), in one round
    (--source inference: per device, over the inference telemetry roll-ups)."""
    from ldfleet.server.rounds import metric_rows

    if source not in ("rounds", "inference"):
        fail(f"--source must be rounds or inference, got {source!r}")
    if source == "inference":
        from ldfleet.commands.edge import inference_usage

        return inference_usage(run, db, as_json)

    reg, rid = _registry_target(run, run_id, db)
    try:
        rows = [m for m in metric_rows(reg, rid, phase) if m.layer_usage]
    finally:
        reg.close()
    if not rows:
        fail(f"no {phase} layer usage recorded for {rid}")
    rnd = round_number or max(m.round for m in rows)
    rows = [m for m in rows if m.round == rnd]
    groups: dict[str, list] = {}
    for m in rows:
        groups.setdefault(m.device_id if per_device else str(m.device_class), []).append(m)
    out = {}
    for key, ms in sorted(groups.items()):
        n = sum(m.num_examples or 0 for m in ms) or 1
        L = len(ms[0].layer_usage)
        out[key] = {"examples": n, "mean_layers": sum((m.mean_kept_layers or 0) * (m.num_examples or 0) for m in ms) / n,
                    "usage": [sum(m.layer_usage[i] * (m.num_examples or 0) for m in ms) / n for i in range(L)]}
    if as_json:
        print(json.dumps({"run_id": rid, "round": rnd, "phase": phase, "by": "device" if per_device else "class", "usage": out}, indent=1))
        return
    L = len(next(iter(out.values()))["usage"])
    t = Table(title=f"layer usage of {rid}, round {rnd} ({phase})")
    t.add_column("device" if per_device else "class")
    t.add_column("layers", justify="right")
    for i in range(L):
        t.add_column(f"L{i}", justify="right")
    for key, v in out.items():
        t.add_row(key, f"{v['mean_layers']:.2f}", *[f"{u:.2f}" for u in v["usage"]])
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("report")(report)
    app.add_typer(registry_app, name="registry")
    register_deploy(app)


# ---- a real fleet: server, client, federate ---------------------------------------------------------


def _stop_on_signals() -> Any:
    """SIGINT/SIGTERM set an event instead of killing the process, so children are always stopped."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_forever(stop: Any, *procs: Any) -> Any | None:
    """Until a stop signal (returns None) or one of ``procs`` exits (returns it, its log's tail printed)."""
    while not stop.wait(1.0):
        for p in procs:
            if not p.running:
                err.print(f"[red]{Path(p.cmd[0]).name} exited[/red]\n{p.log_tail()}", markup=True, highlight=False)
                return p
    return None


def _supervise(stop: Any, node: Any, device_id: str, max_delay_s: float = 60.0) -> None:
    """Keep a device's SuperNode running until a stop signal: one that exits (a restarted SuperLink
    no longer knows it, the network went away) is started again after 2, 4, ... ``max_delay_s`` s, as
    a service manager would; the delay starts again at 2 s once a start has lasted a minute."""
    from ldfleet.client.node import NodeError

    delay = 2.0
    while True:
        started = time.monotonic()
        if _wait_forever(stop, node) is None:
            return
        if time.monotonic() - started > 60:
            delay = 2.0
        node.stop()
        err.print(f"[yellow]SuperNode of {device_id} exited: starting it again in {delay:.0f} s[/] (log {node.log_path})")
        if stop.wait(delay):
            return
        try:
            node.start()
        except NodeError as exc:
            err.print(f"[yellow]SuperNode of {device_id} did not start:[/] {exc}", highlight=False)
        delay = min(max_delay_s, 2 * delay)


def server(
    db: Optional[str] = typer.Option(None, "--db", help="Registry URL \\[default: $LDFLEET_DB or ~/.ldfleet/registry.db]."),
    broker: Optional[str] = typer.Option(None, "--broker", help="MQTT broker URL \\[default: $LDFLEET_BROKER / running `ldfleet broker`]."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the SuperLink listens on (Fleet, Control and Runtime APIs)."),
    port: int = typer.Option(9093, "--port", help="SuperLink port."),
    home: Path = typer.Option(Path("runs/superlink"), "--home", help="Folder for the SuperLink's FLWR_HOME and log."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS (only allowed on a loopback --host)."),
    ssl_ca_certfile: Optional[Path] = typer.Option(None, "--ssl-ca-certfile"),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile"),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile"),
    enable_supernode_auth: bool = typer.Option(False, "--enable-supernode-auth", help="Only SuperNodes registered with `flwr supernode register`."),
    controller: bool = typer.Option(True, "--controller/--no-controller", help="Run the policy controller in this process."),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
    default_keep: float = typer.Option(1.0, "--default-keep", min=0.01, max=1.0, help="Keep fraction of devices without any policy "
                                       "(the controller's default).", callback=finite),
    state_db: Optional[str] = typer.Option(None, "--state-db", help="The SuperLink's state (nodes, runs): an SQLite file, "
                                           "so a restarted server still knows the SuperNodes, or :memory: \\[default: HOME/superlink-state.db]."),
) -> None:
    """Start the fleet side: the policy controller and a Flower SuperLink (runs until Ctrl-C).

    Then start a federated run with `ldfleet federate --superlink HOST:PORT ...`. Exits 1 when the
    SuperLink stops by itself.
    """
    from ldfleet.common.mqtt import parse_broker_url
    from ldfleet.common.process import port_open
    from ldfleet.common.runtime import default_broker_url
    from ldfleet.server.deploy import TLS, DeployError, SuperLink

    if port_open(host, port):  # a second server would fail inside flower-superlink, after its controller started
        fail(f"{host}:{port} is already taken (another `ldfleet server`?): stop it, or give --port")
    stop = _stop_on_signals()
    ctl = None
    try:
        url = parse_broker_url(broker or default_broker_url(), ca_file=str(ca_file) if ca_file else None) if controller else None
        link = SuperLink(host, port, home=home, insecure=insecure, enable_supernode_auth=enable_supernode_auth,
                         tls=TLS(*(str(p) if p else None for p in (ssl_ca_certfile, ssl_certfile, ssl_keyfile))),
                         database=state_db or str(home / "superlink-state.db"))
    except (DeployError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    try:
        link.start()
        console.print(f"SuperLink on {link.address} ({'insecure, loopback' if insecure else 'TLS'}); log {link.log_path}")
        if url is not None:
            from ldfleet.server.controller import Controller

            ctl = Controller(url, db, default_keep=default_keep).start()
            console.print(f"controller: broker {ctl.url}, registry {ctl.registry.redacted_url()}")
        if _wait_forever(stop, link) is not None:
            fail("the SuperLink stopped (its log's end is above)", 1)
    except (DeployError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    finally:
        link.stop()
        if ctl is not None:
            ctl.stop()


def client(
    device_id: str = typer.Option(..., "--device-id", help="This device's id (also its MQTT user name)."),
    device_class: str = typer.Option(..., "--device-class", help="Its class (e.g. rpi4, jetson, phone)."),
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
    model: Path = typer.Option(..., "--model", help="The model folder (model.json + model.safetensors) this device runs."),
    data: Path = typer.Option(..., "--data", help="Local clips in Speech Commands layout (word/<speaker>_nohash_<n>.wav)."),
    broker: Optional[str] = typer.Option(None, "--broker", help="MQTT broker URL \\[default: $LDFLEET_BROKER / running `ldfleet broker`]."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Device state \\[default: $LDFLEET_HOME/devices/ID]."),
    home: Optional[Path] = typer.Option(None, "--home", help="FLWR_HOME of the SuperNode \\[default: STATE_DIR/flwr]."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS (only with a loopback SuperLink)."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="CA certificate of the SuperLink."),
    auth_supernode_private_key: Optional[Path] = typer.Option(None, "--auth-supernode-private-key"),
    profile_json: Optional[Path] = typer.Option(None, "--profile-json", help="Advertise this profile instead of measuring."),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
    agent: bool = typer.Option(True, "--agent/--no-agent", help="Run the budget agent in this process (else run `ldfleet agent`)."),
    strict: bool = typer.Option(False, "--strict", help="Check every clip of --data before the device starts and refuse "
                                "to start at the first bad one (naming it and why); without it bad clips are skipped and logged."),
    reprofile_every: float = REPROFILE_EVERY,
    reprofile_tolerance: float = REPROFILE_TOLERANCE,
) -> None:
    """Start a device: its budget agent (MQTT) and its Flower SuperNode (runs until Ctrl-C)."""
    from ldfleet.client.node import NodeError, SuperNode, device_node_config, model_profile
    from ldfleet.common.runtime import default_broker_url, default_device_state_dir

    if strict:
        _check_every_clip(data)
    stop = _stop_on_signals()
    state = state_dir or default_device_state_dir(device_id)
    if reprofile_every > 0 and (profile_json is not None or not agent):
        fail("--reprofile-every re-measures this device in its agent: it cannot go with --profile-json or --no-agent")
    ag = reprofiler = None
    if agent:
        from ldfleet.client.agent import DeviceAgent
        from ldfleet.client.profile import profile_from_json
        from ldfleet.common.mqtt import parse_broker_url

        def measured():
            return model_profile(device_id, device_class, model)

        try:  # the URL is checked before the model is timed
            url = parse_broker_url(broker or default_broker_url(), ca_file=str(ca_file) if ca_file else None)
            prof = profile_from_json(profile_json, device_id, device_class) if profile_json else measured()
            ag = DeviceAgent(device_id, device_class, url, prof, state_dir=state).start()
        except (ValueError, OSError) as exc:
            fail(str(exc))
        console.print(f"agent {device_id} ({device_class}): broker {ag.url}, state {state}")
        if profile_json is None:
            reprofiler = watch_profile(ag, measured, reprofile_every, reprofile_tolerance)
    try:
        node = SuperNode(superlink, device_node_config(device_id, device_class, model, data, state),
                         home=home or Path(state) / "flwr", insecure=insecure,
                         root_certificates=str(root_certificates) if root_certificates else None,
                         auth_private_key=str(auth_supernode_private_key) if auth_supernode_private_key else None).start()
        console.print(f"SuperNode for {device_id} started: it connects to {superlink} and keeps trying (log {node.log_path})")
        if not _superlink_answers(superlink):
            err.print(f"[yellow]warning:[/] nothing answers at {superlink} yet (is `ldfleet server` running there?)")
        _supervise(stop, node, device_id)
        node.stop()
    except (NodeError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        if reprofiler is not None:
            reprofiler.stop()
        if ag is not None:
            ag.stop()


def _superlink_answers(address: str) -> bool:
    from ldfleet.common.process import port_open

    host, _, port = address.rpartition(":")
    return port.isdigit() and port_open(host.strip("[]"), int(port), timeout=2.0)


def _check_every_clip(data: Path) -> None:
    """Decode and check every clip of a device's folder; exit (code 2) naming the first bad file."""
    from ldfleet.commands.data import file_progress
    from ldfleet.common.data.folder import describe

    try:
        with file_progress("checking audio files") as progress:
            describe(data, strict=True, progress=progress)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:  # BadClip is a ValueError
        fail(f"--strict: {exc}")


def federate(
    superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help="HOST:PORT of the SuperLink."),
    model: Path = typer.Option(..., "--model", help="The model folder the devices run (initial selector + head)."),
    out: Path = typer.Option(..., "--out", help="Run folder on the server: checkpoints, the Flower app, FLWR_HOME."),
    db: Optional[str] = typer.Option(None, "--db", help="Registry URL the ServerApp writes rounds and metrics to."),
    rounds: int = typer.Option(3, "--rounds", min=1),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Registry run id \\[default: the --out folder name]; reuse to resume."),
    fraction_train: float = typer.Option(1.0, "--fraction-train", callback=finite),
    min_nodes: int = typer.Option(1, "--min-nodes", min=1, help="Wait for this many SuperNodes before the first round."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1),
    round_timeout: float = typer.Option(600.0, "--round-timeout", help="Seconds a round waits for replies.", callback=finite),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS (only with a loopback SuperLink)."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="CA certificate of the SuperLink."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up waiting for the run after this many seconds.", callback=finite),
) -> None:
    """Run federated rounds on a real fleet through a SuperLink; fails unless the run completes."""
    from ldfleet.common.runtime import default_registry_url
    from ldfleet.server.app import ServerSettings
    from ldfleet.server.deploy import DeployError, submit_run, wait_run, write_cli_config, write_flower_app

    out = out.resolve()
    if db is None:
        err.print(f"note: no --db: rounds go to {default_registry_url()}; give the registry `ldfleet server` uses "
                  "(its --db) to see them beside the devices and their budgets", soft_wrap=True)
    settings = ServerSettings(
        run_id=run_id or out.name, run_dir=str(out), model_dir=str(model.resolve()), db_url=db or default_registry_url(),
        num_rounds=rounds, fraction_train=fraction_train, min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes, local_epochs=local_epochs, round_timeout_s=round_timeout,
    )
    try:
        app_dir = write_flower_app(out / "flower-app")
        flwr_home = out / "flwr-cli"
        write_cli_config(flwr_home, superlink, insecure=insecure, root_certificates=str(root_certificates) if root_certificates else None)
        _write_federate_record(out, settings, superlink)  # before submitting: a folder that cannot take it stops nothing
        rid = submit_run(app_dir, flwr_home, settings)
        console.print(f"run {rid} submitted to {superlink} (registry run id {settings.run_id}); waiting for it to finish")
    except (DeployError, OSError) as exc:
        fail(str(exc), code=1)
    try:
        _write_federate_record(out, settings, superlink, rid)
    except OSError as exc:  # the run is submitted: carry on without the Flower run id on record
        err.print(f"[yellow]warning[/]: cannot record Flower run {rid} in {out / FEDERATE_FILE}: {exc}")
    try:
        status = wait_run(flwr_home, rid, timeout, on_status=_round_progress(settings))
    except (DeployError, KeyboardInterrupt) as exc:
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        _stop_left_run(flwr_home, rid, superlink, why)
    console.print(f"[green]{status['status']}[/green] in {status.get('elapsed', 0):.0f} s; "
                  f"`ldfleet registry rounds --run {out}`", soft_wrap=True)


def _write_federate_record(out: Path, settings: Any, superlink: str, flower_run_id: str | None = None) -> None:
    """OUT/federate.json: what `ldfleet registry ... --run OUT` reads (registry URL, run id), with the
    Flower run id (once submitted) and SuperLink for `flwr` itself. Written atomically and owner-only from
    its first byte, as the URL may hold a password. Raises OSError when OUT cannot take it."""
    path = out / FEDERATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump({"run_id": settings.run_id, "db_url": settings.db_url, "flower_run_id": flower_run_id,
                   "superlink": superlink, "rounds": settings.num_rounds}, f, indent=1)
    tmp.replace(path)


def _stop_left_run(flwr_home: Path, rid: str, superlink: str, why: str) -> None:
    """A run that will not be waited for is stopped on the SuperLink (else it trains whenever nodes
    connect); exits 1, or 130 when interrupted."""
    from ldfleet.server.deploy import DeployError, run_status, stop_run

    try:
        if not str(run_status(flwr_home, rid).get("status", "")).startswith("finished"):
            stop_run(flwr_home, rid)
            why += f"; run {rid} stopped on the SuperLink"
    except (DeployError, OSError) as exc:
        why += f"; run {rid} may still be running: `flwr stop {rid}` against {superlink} ({exc})"
    fail(why, code=130 if why.startswith("interrupted") else 1)


def _round_progress(settings: Any) -> Any:
    """A callback for each poll of the run: says when the run's status changes, and each round the
    registry (``settings.db_url``, where the ServerApp writes) has recorded as finished."""
    seen: dict[str, Any] = {"status": None, "rounds": set(), "registry": None}

    def on_status(status: dict) -> None:
        now = status.get("status")
        if now != seen["status"]:
            seen["status"] = now
            waiting = str(now).startswith(("pending", "starting"))
            hint = f" (it starts once {settings.min_available_nodes} SuperNode(s) are connected)" if waiting else ""
            console.print(f"run status: {now}{hint}")
        try:
            if seen["registry"] is None:
                from ldfleet.server.registry import Registry

                seen["registry"] = Registry(settings.db_url)
            done = {r.number for r, _ in seen["registry"].round_metrics(settings.run_id) if r.finished_at is not None}
        except Exception:  # noqa: BLE001 - progress is best effort; the run's outcome comes from the SuperLink
            return
        for number in sorted(done - seen["rounds"]):
            console.print(f"round {number} of {settings.num_rounds} finished")
        seen["rounds"] |= done

    return on_status


def register_deploy(app: typer.Typer) -> None:
    app.command("server")(server)
    app.command("client")(client)
    app.command("federate")(federate)
