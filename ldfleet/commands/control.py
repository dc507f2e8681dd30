"""Control-plane commands: `profile`, `agent`, `controller`, `broker`, `budget ...`, `devices ...`,
`bench control-plane`.

Heavy modules (paho, SQLAlchemy, the model) are imported inside the commands, so `ldfleet --help`
stays fast.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ldfleet.commands._shared import (REPROFILE_EVERY, REPROFILE_TOLERANCE, bench_group, console, err, fail, finite,
                                      open_registry, watch_profile)
from ldfleet.common.runtime import default_broker_url


budget_app = typer.Typer(help="Budget policies: set, show, history, clear.", no_args_is_help=True)
devices_app = typer.Typer(help="The fleet as the registry sees it.", no_args_is_help=True)

BROKER_HELP = "MQTT broker URL: mqtt://host:port, mqtt://user:password@host:port, or mqtts://... for TLS (default: $LDFLEET_BROKER, a running `ldfleet broker`, else mqtt://127.0.0.1:1883)."
DB_HELP = "Registry URL: sqlite:///path.db or postgresql+psycopg2://user@host/db (default: $LDFLEET_DB or sqlite:///~/.ldfleet/registry.db)."


def _broker(url: str | None) -> str:
    return url or default_broker_url()


def _broker_url(url: str | None, ca_file: Path | None) -> Any:
    """Parsed broker URL (exit 2 with the reason when it is malformed)."""
    from ldfleet.common.mqtt import parse_broker_url

    try:
        return parse_broker_url(_broker(url), ca_file=str(ca_file) if ca_file else None)
    except ValueError as exc:
        fail(str(exc))


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# ---------------------------------------------------------------------------------------------
# device side
# ---------------------------------------------------------------------------------------------
def profile(
    device_id: str = typer.Option(None, "--device-id", help="Device id (default: this host's name)."),
    device_class: str = typer.Option("default", "--device-class", help="Device class to advertise."),
    family: str = typer.Option("wavlm", help="Model family: wavlm | hubert | wav2vec2."),
    size: str = typer.Option("tiny", help="Model: a size built in code (tiny, base), a hub id or a local folder."),
    seconds: float = typer.Option(1.0, min=0.1, help="Reference input length in seconds.", callback=finite),
    repeats: int = typer.Option(5, min=1, help="Timed repeats per part (median is kept)."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON (what the agent publishes)."),
    out: Path = typer.Option(None, "--out", help="Also write the JSON profile to this file (for `agent --profile-json`)."),
) -> None:
    """Measure this machine's compute profile: cores, memory, front-end and per-layer latency."""
    from ldfleet.client.profile import default_device_id, measure_profile

    prof = measure_profile(device_id or default_device_id(), device_class, family=family, size=size, seconds=seconds, repeats=repeats)
    text = prof.model_dump_json(by_alias=True, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        print(text)
        return
    t = Table(title=f"{prof.device_id} ({prof.device_class}): {prof.model_id}, input {prof.reference_seconds:g} s")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("cores", str(prof.cores))
    t.add_row("memory", f"{prof.memory_mb} MiB")
    t.add_row("accelerator", prof.accelerator or "-")
    t.add_row("front end", f"{prof.front_end_ms:.2f} ms")
    for i, ms in enumerate(prof.layer_ms):
        t.add_row(f"layer {i}", f"{ms:.2f} ms")
    t.add_row("all layers", f"{prof.front_end_ms + sum(prof.layer_ms):.2f} ms")
    console.print(t)
    if out is not None:
        console.print(f"written to {out}")


def _given_profile(device_id: str, device_class: str, layer_ms: str, front_end_ms: float, reference_seconds: float):
    """The profile an agent is given as numbers (--layer-ms, --front-end-ms, --reference-seconds);
    a bad value ends the command naming the option."""
    from pydantic import ValidationError

    from ldfleet.client.profile import synthetic_profile

    try:
        values = [float(x) for x in layer_ms.split(",")]
    except ValueError:
        fail(f"--layer-ms must be comma-separated numbers of ms, one per layer (e.g. 1.5,1.5,2), got {layer_ms!r}")
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        fail(f"--layer-ms must be comma-separated non-negative numbers, got {layer_ms!r}")
    try:
        return synthetic_profile(device_id, device_class, num_layers=len(values), layer_ms=values, front_end_ms=front_end_ms,
                                 model_id="given", reference_seconds=reference_seconds)
    except ValidationError as exc:
        option = {"layer_ms": "--layer-ms", "front_end_ms": "--front-end-ms", "num_layers": "--layer-ms (number of layers)",
                  "reference_seconds": "--reference-seconds"}
        first = exc.errors(include_url=False)[0]
        fail(f"{option.get(str(first['loc'][0]), first['loc'][0])}: {first['msg']}")


def agent(
    device_id: str = typer.Option(..., "--device-id", help="This device's id (also its MQTT user name under the production ACL)."),
    device_class: str = typer.Option(..., "--device-class", help="Device class it belongs to."),
    broker: str = typer.Option(None, "--broker", help=BROKER_HELP),
    state_dir: Path = typer.Option(None, "--state-dir", help="Local device state folder (default ~/.ldfleet/devices/<device-id>)."),
    profile_json: Path = typer.Option(None, "--profile-json", help="Use this profile (from `ldfleet profile --out`) instead of measuring."),
    layer_ms: str = typer.Option(None, "--layer-ms", help="Give the per-layer latency directly, comma-separated ms (no model needed)."),
    front_end_ms: float = typer.Option(0.0, "--front-end-ms", min=0.0, help="Front-end latency with --layer-ms.", callback=finite),
    reference_seconds: float = typer.Option(1.0, "--reference-seconds", min=0.01, max=600.0,
                                            help="Input length in seconds that --layer-ms was timed on, or that the profile is "
                                                 "measured at (a real-time factor resolves to k at this length).", callback=finite),
    family: str = typer.Option("wavlm", help="Model family to measure when no profile is given."),
    size: str = typer.Option("tiny", help="Model to measure when no profile is given."),
    ca_file: Path = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
    telemetry_interval: float = typer.Option(60.0, "--telemetry-interval", min=0.0, help="Seconds between telemetry messages (0: none).", callback=finite),
    mqtt_version: int = typer.Option(5, "--mqtt-version", help="5 (default) or 311 for brokers that only speak MQTT 3.1.1."),
    reprofile_every: float = REPROFILE_EVERY,
    reprofile_tolerance: float = REPROFILE_TOLERANCE,
) -> None:
    """Announce this device and keep its budget policy in step with the controller (runs until Ctrl-C)."""
    from ldfleet.client.agent import DeviceAgent
    from ldfleet.client.profile import measure_profile, profile_from_json
    from ldfleet.common.topics import is_valid_device_id

    if not is_valid_device_id(device_id):
        fail(f"invalid device id {device_id!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    measure = profile_json is None and layer_ms is None
    if reprofile_every > 0 and not measure:
        fail("--reprofile-every re-measures this device: it cannot go with --profile-json or --layer-ms")
    try:
        if profile_json is not None:
            prof = profile_from_json(profile_json, device_id, device_class)
        elif layer_ms is not None:
            prof = _given_profile(device_id, device_class, layer_ms, front_end_ms, reference_seconds)
        else:
            prof = None  # connect first (birth, duplicate-id checks), measure while connected
        ag = DeviceAgent(device_id, device_class, _broker(broker), prof, state_dir=state_dir,
                         ca_file=str(ca_file) if ca_file else None, telemetry_interval_s=telemetry_interval,
                         mqtt_version=mqtt_version)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: ag.request_stop())
    err.print(f"agent {device_id} ({device_class}) -> {ag.url}; state in {ag.state_dir}")
    def measured():
        return measure_profile(device_id, device_class, family=family, size=size, seconds=reference_seconds)

    reprofiler = None
    try:
        if measure:
            ag.start()
            err.print(f"measuring {family}-{size} on this machine (pass --profile-json to skip)...")
            try:
                ag.set_profile(measured())
            except (ValueError, OSError) as exc:
                ag.stop()
                fail(f"cannot measure this device's profile: {exc}")
            reprofiler = watch_profile(ag, measured, reprofile_every, reprofile_tolerance)
        ag.run_forever()
    except KeyboardInterrupt:
        ag.stop()
    finally:
        if reprofiler is not None:
            reprofiler.stop()
    if ag.fatal:
        fail(f"agent {device_id} stopped: {ag.fatal}")


# ---------------------------------------------------------------------------------------------
# fleet side
# ---------------------------------------------------------------------------------------------
def controller(
    broker: str = typer.Option(None, "--broker", help=BROKER_HELP),
    db: str = typer.Option(None, "--db", help=DB_HELP),
    ca_file: Path = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
    default_keep: float = typer.Option(1.0, "--default-keep", help="Keep fraction of devices without any policy.", callback=finite),
    strict_classes: bool = typer.Option(False, "--strict-classes", help="Refuse profiles of classes the registry does not know."),
    poll_interval: float = typer.Option(2.0, "--poll-interval", min=0.1, help="Seconds between registry polls (missed notices, expiries).", callback=finite),
    mqtt_version: int = typer.Option(5, "--mqtt-version", help="5 (default) or 311 for brokers that only speak MQTT 3.1.1."),
    shared_group: str = typer.Option(None, "--shared-group", help="Share the fleet with the other controllers of this group (MQTT 5 shared subscription; one PostgreSQL registry for all)."),
    controller_id: str = typer.Option("controller", "--controller-id", help="Name of this controller, unique in its group: its status topic ldfleet/v1/ctl/status/ID, logs, desired_policies.published_by (letters, digits, . _ -)."),
) -> None:
    """Register devices, resolve and publish their policies, track convergence (runs until Ctrl-C)."""
    from ldfleet.server.controller import Controller

    if not (math.isfinite(default_keep) and 0 < default_keep <= 1):
        fail("--default-keep must be in (0, 1]")
    reg = open_registry(db)
    try:
        ctl = Controller(_broker(broker), reg, ca_file=str(ca_file) if ca_file else None, default_keep=default_keep,
                         strict_classes=strict_classes, poll_interval_s=poll_interval, mqtt_version=mqtt_version,
                         shared_group=shared_group, controller_id=controller_id)
    except ValueError as exc:
        fail(str(exc))
    err.print(f"controller -> {ctl.url}; registry {reg.redacted_url()}")
    ctl.run_forever()
    reg.close()
    if ctl.session.fatal:
        fail(f"controller stopped: {ctl.session.fatal}")


def broker(
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Loopback port (0: a free one)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Keep the broker's config and retained messages here (default: a temp dir)."),
) -> None:
    """Run the embedded broker (a private Mosquitto on 127.0.0.1) in the foreground.

    Zero set-up for local use: anonymous clients, loopback only, NOT a security boundary. For a real
    fleet use Mosquitto with configs/mosquitto/ (passwords, per-device ACL, TLS) and --broker URL.
    """
    import os

    from ldfleet.common.broker import BrokerNotInstalled, BrokerStartError, EmbeddedBroker
    from ldfleet.common.runtime import remove_broker_file, write_broker_file

    try:
        b = EmbeddedBroker(port, data_dir=data_dir).start()
    except (BrokerNotInstalled, BrokerStartError) as exc:
        fail(str(exc), code=1)
    path = write_broker_file(b.url, os.getpid())
    console.print(f"broker listening on [bold]{b.url}[/bold] (log: {b.log_path}); other ldfleet commands use it by default")
    console.print("local use only: anonymous, loopback, not a security boundary. Ctrl-C stops it.")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        code = b.wait()
        if code:
            fail(f"mosquitto exited with code {code}\n{b.log_tail()}", code=1)
    except KeyboardInterrupt:
        pass
    finally:
        b.close()
        remove_broker_file(os.getpid())
        del path


# ---------------------------------------------------------------------------------------------
# operator
# ---------------------------------------------------------------------------------------------
@budget_app.command("set")
def budget_set(
    device_class: str = typer.Argument(..., metavar="CLASS", help="Device class."),
    keep: float = typer.Option(None, "--keep", help="Keep fraction of the encoder layers, in (0, 1]."),
    latency_ms: float = typer.Option(None, "--latency-ms", help="Latency target in ms per input (turned into k per device)."),
    rtf: float = typer.Option(None, "--rtf", help="Real-time factor: ms of compute per ms of audio, e.g. 0.05 = 50 ms per second "
                              "(speech recognition, whose inputs differ in length; turned into k per device)."),
    percentile: float = typer.Option(None, "--percentile", help="Percentile the latency target or RTF must hold for (default: median)."),
    device: str = typer.Option(None, "--device", help="Override for one device of the class instead of the whole class."),
    by: str = typer.Option(None, "--by", help="Who is making the change (default: your user name)."),
    expires_in: float = typer.Option(None, "--expires-in", help="Seconds until the policy lapses (default: never); then "
                                     "the class falls back to the controller's default, not to its earlier policy."),
    create_class: bool = typer.Option(False, "--create-class", help="Define the class if no device of it has connected yet."),
    comment: str = typer.Option(None, "--comment", help="Free text kept in the audit trail."),
    db: str = typer.Option(None, "--db", help=DB_HELP),
    broker: str = typer.Option(None, "--broker", help=BROKER_HELP),
    ca_file: Path = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
) -> None:
    """Set the budget of a class (or one device): written to the registry, then pushed to devices.

    Give exactly one of --keep, --latency-ms and --rtf."""
    from ldfleet.server.operator import preview_budget, set_budget
    from ldfleet.server.registry import RegistryError

    if sum(v is not None for v in (keep, latency_ms, rtf)) != 1:
        fail("give exactly one of --keep, --latency-ms and --rtf")
    if expires_in is not None and not (math.isfinite(expires_in) and 0 < expires_in <= MAX_EXPIRES_IN_S):
        fail(f"--expires-in must be a positive number of seconds, at most {MAX_EXPIRES_IN_S:.0e} (about 100 years)")
    reg = open_registry(db)
    try:
        res = set_budget(reg, _broker_url(broker, ca_file), device_class, keep=keep, latency_ms=latency_ms, rtf=rtf,
                         percentile=percentile, device_id=device, issued_by=by, expires_in_s=expires_in,
                         create_class=create_class, comment=comment, look_for_controllers=True)
        preview = preview_budget(reg, device_class, device)
    except RegistryError as exc:
        fail(str(exc))
    finally:
        reg.close()
    p = res.policy
    scope = f"device {p.device_id}" if p.device_id else f"class {p.device_class}"
    console.print(f"{scope}: policy v{p.version} ({p.budget_text()}) by {p.issued_by}")
    _print_preview(preview)
    if res.notified and res.controllers:
        console.print(f"notice sent; online controller(s): {', '.join(res.controllers)}; devices follow once it re-resolves "
                      "(`budget show` counts those still pending)", soft_wrap=True)
    elif res.notified:
        err.print("[yellow]warning:[/yellow] notice sent, but no controller is online (none has an online status on the "
                  "broker): the change waits in the registry until `ldfleet controller` runs", soft_wrap=True)
    else:
        err.print(f"[yellow]warning:[/yellow] controller not notified ({res.notify_error}); "
                  "a running controller picks the change up at its next registry poll")


#: Longest --expires-in: about a century (a date beyond the year 9999 cannot be stored).
MAX_EXPIRES_IN_S = 3.2e9


def _print_preview(preview: dict[str, Any]) -> None:
    """The k each covered device will run, and where the target cannot be met (``preview_budget``:
    the controller's resolution on the profiles in the registry)."""
    from collections import Counter

    from rich.markup import escape

    if not preview:
        console.print("no device with a profile is covered yet: each resolves it when it connects")
        return
    ks = Counter(r.k for r, _ in preview.values())
    console.print(f"k on the {len(preview)} covered device(s) with a profile: "
                  + ", ".join(f"k={k}: {n}" if k is not None else f"unresolved: {n}" for k, n in sorted(ks.items(), key=lambda kv: -(kv[0] or 0))),
                  soft_wrap=True)
    median_only = [did for did, (r, prof) in preview.items()
                   if r.percentile is not None and r.percentile > 50 and prof.latency_ratio_p90 is None and prof.latency_ratio_p99 is None]
    if median_only:
        err.print(f"note: {len(median_only)} device(s) measured no tail latency (p90/p99 ratios), so the percentile is "
                  f"resolved at their median: {', '.join(sorted(median_only)[:5])}" + (" ..." if len(median_only) > 5 else ""),
                  soft_wrap=True)
    unmet = {did: r.unmet for did, (r, _) in preview.items() if r.unmet}
    if unmet:
        shown = "; ".join(f"{did}: {why}" for did, why in sorted(unmet.items())[:5])
        more = f" (and {len(unmet) - 5} more)" if len(unmet) > 5 else ""
        err.print(f"[yellow]warning:[/yellow] the target cannot be met on {len(unmet)} device(s), which run one layer: "
                  f"{escape(shown)}{more}", soft_wrap=True)


@budget_app.command("clear")
def budget_clear(
    device_class: str = typer.Argument(..., metavar="CLASS"),
    device: str = typer.Option(None, "--device", help="Remove this device's override (else: the class policy)."),
    by: str = typer.Option(None, "--by"),
    db: str = typer.Option(None, "--db", help=DB_HELP),
    broker: str = typer.Option(None, "--broker", help=BROKER_HELP),
    ca_file: Path = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
) -> None:
    """Remove a class policy (devices fall back to the default) or a device override (back to the class)."""
    from ldfleet.server.operator import clear_budget
    from ldfleet.server.registry import RegistryError

    reg = open_registry(db)
    try:
        res = clear_budget(reg, _broker_url(broker, ca_file), device_class, device_id=device, issued_by=by)
    except RegistryError as exc:
        fail(str(exc))
    finally:
        reg.close()
    console.print(f"cleared ({res.policy.scope_key} v{res.policy.version})" + ("" if res.notified else f"; controller not notified: {res.notify_error}"))


def _policy_dict(p: Any) -> dict[str, Any]:
    return {
        "id": p.id, "scope": p.scope, "device_class": p.device_class, "device_id": p.device_id, "version": p.version,
        "keep": p.keep, "latency_ms": p.latency_ms, "rtf": p.rtf, "percentile": p.percentile, "cleared": p.cleared,
        "issued_by": p.issued_by, "issued_at": p.issued_at, "expires_at": p.expires_at, "previous_id": p.previous_id,
        "comment": p.comment,
    }


@budget_app.command("show")
def budget_show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    db: str = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """The policies in force (class policies and device overrides) and how far each class converged.

    'pending': devices whose desired policy still comes from an older operator policy, because no
    controller has resolved the change yet (is `ldfleet controller` running?); not counted converged."""
    from collections import Counter

    from ldfleet.server.operator import pending_policies

    reg = open_registry(db, must_exist=True)
    try:
        by_scope = reg.active_policies()
        active = sorted(by_scope.values(), key=lambda p: (p.device_class, p.device_id or ""))
        classes = [c.name for c in reg.classes()]
        devices = reg.devices()
    finally:
        reg.close()
    stale = pending_policies(devices, by_scope)
    pending = Counter(d.device_class for d in devices if d.device_id in stale)
    published = [d for d in devices if d.desired_version > 0]  # as Registry.convergence counts them
    totals = Counter(d.device_class for d in published)
    done = Counter(d.device_class for d in published if d.converged and d.device_id not in stale)
    conv = {c: (done[c], totals[c]) for c in classes}
    if as_json:
        out = {
            "policies": [_policy_dict(p) for p in active],
            "classes": {c: {"converged": conv[c][0], "devices": conv[c][1], "pending": pending[c]} for c in classes},
            "default": "keep = controller --default-keep (1.0 unless set)",
        }
        print(json.dumps(out, indent=2, default=_json_default))
        return
    t = Table(title="budget policies in force (others: the controller's default, keep 1.0 unless the controller's "
                    "or server's --default-keep says otherwise)")
    for col in ("class", "device", "version", "budget", "by", "at", "expires"):
        t.add_column(col)
    class_now = {d.device_id: d.device_class for d in devices}
    for p in active:
        moved = p.device_id is not None and class_now.get(p.device_id) not in (None, p.device_class)
        cls = f"{p.device_class} (device now in {class_now[p.device_id]})" if moved else p.device_class
        t.add_row(cls, p.device_id or "(class)", str(p.version), p.budget_text(), p.issued_by, _ts(p.issued_at), _ts(p.expires_at))
    console.print(t)
    c = Table(title="convergence per class")
    for col in ("class", "converged", "pending", "devices"):
        c.add_column(col)
    for name in classes:
        c.add_row(name, str(conv[name][0]), f"[yellow]{pending[name]}[/yellow]" if pending[name] else "0", str(conv[name][1]))
    console.print(c)
    if stale:
        err.print(f"[yellow]warning:[/yellow] {len(stale)} device(s) still hold a policy older than the one in force: no "
                  "controller has resolved the change yet (is `ldfleet controller` running?)", soft_wrap=True)


@budget_app.command("history")
def budget_history(
    device_class: str = typer.Argument(..., metavar="CLASS"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    db: str = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Audit trail of a class: every policy change (class and device overrides), who, when, old -> new."""
    reg = open_registry(db, must_exist=True)
    try:
        rows = reg.policy_history(device_class)
    finally:
        reg.close()
    by_id = {p.id: p for p in rows}
    if as_json:
        print(json.dumps([
            {**_policy_dict(p), "old": by_id[p.previous_id].budget_text() if p.previous_id in by_id else None, "new": p.budget_text()}
            for p in rows
        ], indent=2, default=_json_default))
        return
    if not rows:
        console.print(f"no policy was ever set for class {device_class!r}")
        return
    t = Table(title=f"policy history of {device_class}")
    extra = [c for c in ("expires", "comment") if any((p.expires_at if c == "expires" else p.comment) for p in rows)]
    t.add_column("when", no_wrap=True)
    for col in ("scope", "version", "old", "new", "by", *extra):
        t.add_column(col)
    for p in rows:
        old = by_id[p.previous_id].budget_text() if p.previous_id in by_id else "(default)"
        cells = [_ts(p.issued_at), p.device_id or "(class)", f"v{p.version}", old, p.budget_text(), p.issued_by]
        if "expires" in extra:
            cells.append(_ts(p.expires_at))
        if "comment" in extra:
            cells.append(p.comment or "")
        t.add_row(*cells)
    console.print(t)


def _duplicate(d: Any) -> bool:
    from ldfleet.server.liveness import is_duplicate

    return is_duplicate(d.duplicate_at, datetime.now(timezone.utc))


def _desired_budget(desired: dict[str, Any] | None) -> str | None:
    """The budget of a stored desired document as people read it (``keep 0.5``, ``RTF 0.05 @p90``)."""
    from ldfleet.common.budget import budget_text

    if not desired:
        return None
    return budget_text(*(desired.get(f) for f in ("keep", "latency_ms", "rtf", "percentile")))


def _device_dict(d: Any, pending: int | None = None) -> dict[str, Any]:
    """One device as `devices list --json` gives it; ``pending``: the operator policy version its
    desired document lags behind (``pending_policies``), which makes it not converged."""
    prof = d.profile or {}
    return {
        "device_id": d.device_id, "device_class": d.device_class, "class_pinned": d.class_pinned, "online": d.online,
        "boot_id": d.boot_id, "boot_seq": d.boot_seq, "duplicate": _duplicate(d), "duplicate_boot_id": d.duplicate_boot_id,
        "duplicate_at": d.duplicate_at, "last_seen": d.last_seen, "cores": d.cores, "memory_mb": d.memory_mb, "model_id": d.model_id,
        "num_layers": d.num_layers, "front_end_ms": prof.get("front_end_ms"), "layer_ms": prof.get("layer_ms"),
        "profile_revision": d.profile_revision, "desired_version": d.desired_version,
        "desired_k": (d.desired or {}).get("k"), "desired_source": (d.desired or {}).get("source"),
        "desired_budget": _desired_budget(d.desired),
        "applied_version": d.applied_version, "ack_status": d.ack_status, "ack_reason": d.ack_reason,
        "effective_k": d.effective_k, "expected_latency_ms": d.expected_latency_ms,
        "converged": d.converged and pending is None, "pending_policy_version": pending,
    }


@devices_app.command("list")
def devices_list(
    device_class: str = typer.Option(None, "--class", help="Only this class."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    db: str = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Devices with liveness, profile, applied policy version and convergence.

    'duplicate' flags a device id that two agents use at once (two boots taking turns within
    minutes; seen in the last hour): give each device its own --device-id."""
    from rich.markup import escape

    from ldfleet.server.operator import pending_policies

    reg = open_registry(db, must_exist=True)
    try:
        devs = reg.devices(device_class)
        stale = pending_policies(devs, reg.active_policies())
    finally:
        reg.close()
    if as_json:
        print(json.dumps([_device_dict(d, stale.get(d.device_id)) for d in devs], indent=2, default=_json_default))
        return
    t = Table(title=f"{len(devs)} device(s)" + (f" of class {device_class}" if device_class else ""))
    t.add_column("device", no_wrap=True)
    t.add_column("class", no_wrap=True)
    t.add_column("online")
    t.add_column("duplicate")
    t.add_column("last seen")
    t.add_column("cores/MiB")
    t.add_column("L x ms")
    t.add_column("policy")
    t.add_column("k")
    t.add_column("converged")
    for d in devs:
        lm = (d.profile or {}).get("layer_ms") or []
        layers = f"{d.num_layers or '-'} x {sum(lm) / len(lm):.2f}" if lm else str(d.num_layers or "-")
        policy = f"v{d.applied_version}/v{d.desired_version}"
        if d.desired:
            policy += f" ({_desired_budget(d.desired)})"
        if d.ack_status == "rejected":
            policy += f" rejected: {escape(d.ack_reason or '')}"  # the device's words: no markup
        elif d.ack_reason:
            policy += f" [yellow]{escape(d.ack_reason)}[/yellow]"
        t.add_row(
            d.device_id, (d.device_class or "-") + (" (pinned)" if d.class_pinned else ""), "yes" if d.online else "no",
            f"[red]yes[/red] (boot {d.duplicate_boot_id})" if _duplicate(d) else "no", _ts(d.last_seen), f"{d.cores or '-'}/{d.memory_mb or '-'}", layers, policy, str(d.effective_k or "-"),
            f"[yellow]no[/yellow] (policy v{stale[d.device_id]} pending)" if d.device_id in stale
            else "[green]yes[/green]" if d.converged else "[yellow]no[/yellow]",
        )
    console.print(t)
    console.print("policy: applied version / desired version (its budget); k: layers kept under the applied policy")
    dups = [d for d in devs if _duplicate(d)]
    if dups:
        from datetime import timedelta

        from ldfleet.server.liveness import DUPLICATE_SHOWN_S

        console.print("[red]duplicate device id[/red] (two agents use it at once; give each device its own --device-id; "
                      f"the flag stays {DUPLICATE_SHOWN_S / 60:.0f} min after the last sign of the second agent): "
                      + ", ".join(f"{d.device_id} (boots {d.boot_id}, {d.duplicate_boot_id}; last seen {_ts(d.duplicate_at)}, "
                                  f"flagged until {_ts(d.duplicate_at + timedelta(seconds=DUPLICATE_SHOWN_S))})" for d in dups))


@devices_app.command("set-class")
def devices_set_class(
    device_id: str = typer.Argument(..., metavar="DEVICE"),
    device_class: str = typer.Argument(..., metavar="CLASS"),
    create_class: bool = typer.Option(False, "--create-class", help="Define the class if it does not exist."),
    db: str = typer.Option(None, "--db", help=DB_HELP),
    broker: str = typer.Option(None, "--broker", help=BROKER_HELP),
    ca_file: Path = typer.Option(None, "--ca-file", help="CA bundle for an mqtts:// broker."),
) -> None:
    """Pin a device to a class (its profile no longer decides), and re-resolve its policy."""
    from ldfleet.server.operator import notify_controller
    from ldfleet.server.registry import RegistryError

    reg = open_registry(db)
    try:
        reg.pin_class(device_id, device_class, create_class=create_class)
    except RegistryError as exc:
        fail(str(exc))
    finally:
        reg.close()
    try:
        notify_controller(_broker_url(broker, ca_file), device_id=device_id)
        console.print(f"{device_id} pinned to class {device_class}; controller notified")
    except (ConnectionError, OSError, ValueError) as exc:
        console.print(f"{device_id} pinned to class {device_class}; controller not notified ({exc}), it re-resolves on restart")


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------
def bench_control_plane(
    devices: str = typer.Option("100,1000", "--devices", help="Fleet sizes to run, comma-separated."),
    broker: str = typer.Option(None, "--broker", help="Broker URL (default: a private Mosquitto started for the run)."),
    db: str = typer.Option(None, "--db", help="Registry URL (default: a temporary SQLite file; use PostgreSQL with --controllers 2+)."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Budget changes per fleet size."),
    timeout: float = typer.Option(120.0, "--timeout", min=1.0, help="Seconds to wait for a phase before giving up; a device that has not acked by then is a miss.", callback=finite),
    controllers: int = typer.Option(1, "--controllers", min=1, help="Controller processes sharing the fleet (MQTT 5 shared subscription)."),
    restart_broker: bool = typer.Option(False, "--restart-broker", help="Restart the benchmark's own broker once, in the middle of round 1 only (later rounds run on the restarted broker; the JSON marks the round: restarted_broker). Not with --broker."),
    fleet_procs: int = typer.Option(0, "--fleet-procs", min=0, help="Processes the simulated devices are spread over (0: one per 2 500 devices)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Time from `budget set` to every simulated device's ack at the controller (real controllers and
    Mosquitto, N simulated MQTT 5 devices). Exits 1 when any device misses a round or the registry's version
    audit finds a gap."""
    from ldfleet.simulations.bench_control_plane import run_bench

    try:
        sizes = [int(x) for x in devices.split(",") if x.strip()]
    except ValueError:
        fail(f"--devices must be comma-separated integers, got {devices!r}")
    if not sizes or any(n < 1 for n in sizes):
        fail("--devices must name fleet sizes >= 1")
    if restart_broker and broker:
        fail("--restart-broker restarts the broker the benchmark runs itself: leave out --broker")
    results = []
    for n in sizes:
        try:
            results.append(run_bench(n, broker=broker, db=db, rounds=rounds, timeout_s=timeout, controllers=controllers,
                                     fleet_procs=fleet_procs, restart_broker=restart_broker,
                                     progress=lambda m: err.print(f"[dim]{m}[/dim]")))
        except (RuntimeError, ValueError) as exc:
            if as_json and results:
                print(json.dumps([r.as_dict() for r in results], indent=2))
            fail(f"benchmark with {n} devices failed: {exc}", code=1)
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        _print_bench(results)
    missed = [r for r in results if not r.all_acked or r.version_gaps or r.version_mismatches]
    if missed:
        err.print("[red]" + "; ".join(
            f"{r.devices} devices: acked per round {[rr.acked for rr in r.rounds]}, version gaps {r.version_gaps}, "
            f"mismatches {r.version_mismatches}" for r in missed) + "[/red]")
        raise typer.Exit(1)


def _print_bench(results: list[Any]) -> None:
    t = Table(title="control plane: ms from `budget set` to each device's ack at a controller")
    for col in ("N", "round", "budget", "acked", "fan-out p50", "p50", "p99", "max", "registry"):
        t.add_column(col, justify="right", no_wrap=col in ("N", "budget", "acked"))
    for r in results:
        for rr in r.rounds:
            t.add_row(str(r.devices), str(rr.round) + (" (broker restart)" if rr.restarted_broker else ""), rr.budget,
                      f"{rr.acked} ({rr.converged_pct:.1f}%)", f"{rr.fanout_p50_ms:.0f}",
                      f"{rr.p50_ms:.0f}", f"{rr.p99_ms:.0f}", f"{rr.max_ms:.0f}",
                      f"{rr.registry_converged_ms:.0f}" if rr.registry_converged_ms is not None else "timeout")
        t.add_row(str(r.devices), "all", "", "", "", f"[bold]{r.p50_ms:.0f}[/bold]", f"[bold]{r.p99_ms:.0f}[/bold]", f"{r.max_ms:.0f}", "",
                  end_section=True)
    console.print(t)
    console.print("fan-out: the new desired policy reached the device; p50/p99/max over all devices: its ack reached a "
                  "controller (a device that never acked counts at the timeout); registry: every ack was in the registry")
    for r in results:
        verdict = "[green]met[/green]" if r.goal_met else "[red]missed[/red]"
        drops = "" if r.broker_drop_notices is None else f"; broker drop notices {r.broker_drop_notices}"
        console.print(f"{r.devices} devices ({r.broker}, {r.registry}, {r.controllers} controller(s)): connected in {r.connect_s:.1f} s; "
                      f"p99 {r.p99_ms:.0f} ms, goal p99 < {r.goal_p99_ms:.0f} ms {verdict}; version gaps {r.version_gaps}{drops}; "
                      f"rebirth requests {r.controller_stats.get('rebirth_requests', 0)} "
                      f"(load average {r.load_before:.1f} on {r.cpus} CPUs before the run)")


# ---------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
    app.command("agent")(agent)
    app.command("controller")(controller)
    app.command("broker")(broker)
    app.add_typer(budget_app, name="budget")
    app.add_typer(devices_app, name="devices")
    bench_group(app).command("control-plane")(bench_control_plane)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through `ldfleet`")
