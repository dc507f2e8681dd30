"""What every command module shares: the consoles, one way to fail, option checks, the registry, the `bench` group."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ldfleet.client.reprofile import DEFAULT_TOLERANCE, MAX_INTERVAL_S

def _console(stderr: bool = False) -> Console:
    """A console; written to a file or a pipe (no terminal, no COLUMNS), 200 columns wide rather than
    rich's 80, so that tables keep their figures whole ("3071…" ms) in logs."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not os.environ.get("COLUMNS") and not (hasattr(stream, "isatty") and stream.isatty())
    return Console(stderr=stderr, width=200 if wide else None)


console = _console()
err = _console(stderr=True)  # errors, warnings and progress notes: stdout stays clean for --json


def fail(message: object, code: int = 2) -> NoReturn:
    """Print a one-line error (no traceback) and exit with ``code`` (2: bad input, 1: the work failed)."""
    # soft_wrap: one line whatever the terminal width (logs and scripts grep it); escape: a path such as
    # "clips[1]" is text, not rich markup.
    err.print(f"[bold red]error:[/] {escape(str(message))}", soft_wrap=True)
    raise typer.Exit(code)


def finite(value: float | None) -> float | None:
    """Option callback: refuse NaN and infinities, which pass every min/max range check (NaN compares
    false with everything), e.g. ``--max-seconds nan`` would otherwise lift the cap it sets."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


#: What `ldfleet federate` leaves in its --out folder for the registry commands: the run id and registry URL.
FEDERATE_FILE = "federate.json"


def run_registry(run: Path) -> tuple[str, str]:
    """(registry URL, run id) of a run folder: ``RUN/run.json`` of `ldfleet simulate` or ``RUN/federate.json``
    of `ldfleet federate`. Exits 2 when RUN is neither, or its file is damaged."""
    from ldfleet.simulations.run_folder import RUN_FILE

    for name in (RUN_FILE, FEDERATE_FILE):
        path = run / name
        if path.is_file():
            try:
                info = json.loads(path.read_text())
                db_url, run_id = info["db_url"], info["run_id"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                fail(f"{path} is damaged ({type(exc).__name__}: {exc})")
            if not (isinstance(db_url, str) and db_url and isinstance(run_id, str) and run_id):
                fail(f"{path} is damaged: db_url and run_id must be non-empty strings")
            return db_url, run_id
    fail(f"{run} is not a run folder of `ldfleet simulate` or `ldfleet federate` (no run.json or {FEDERATE_FILE})")


def open_registry(db: str | None, *, must_exist: bool = False) -> Any:
    """The registry at ``db`` (default: LDFLEET_DB, else ~/.ldfleet/registry.db). ``must_exist``: for
    commands that only read it, a SQLite file that is not there is an error (a mistyped --db, or no
    controller has run yet), not a new empty registry that shows nothing."""
    from sqlalchemy.engine import make_url

    from ldfleet.common.runtime import default_registry_url
    from ldfleet.server.registry import Registry

    url = db or default_registry_url()
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a database URL; its text is not echoed, as it may hold a password
        fail("cannot open the registry: not a database URL (dialect://user:password@host/database or sqlite:///path)")
    shown = parsed.render_as_string(hide_password=True)
    if must_exist and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():
        fail(f"no registry at {parsed.database}: give the --db the controller uses (or LDFLEET_DB), or start "
             "`ldfleet controller` first")
    try:
        return Registry(url)
    except Exception as exc:  # noqa: BLE001 - unreachable database, bad URL
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"cannot open the registry {shown}: {reason.replace(url, shown)}")


def bench_group(app: typer.Typer) -> typer.Typer:
    """The `bench` group; whichever command module registers first creates it, the others add to it."""
    for info in app.registered_groups:
        if info.name == "bench" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="Benchmarks that print figures (speed, control plane).", no_args_is_help=True)
    app.add_typer(group, name="bench")
    return group


#: ``--reprofile-every`` and ``--reprofile-tolerance`` of `agent` and `client`.
REPROFILE_EVERY = typer.Option(
    0.0, "--reprofile-every", min=0.0, max=MAX_INTERVAL_S, callback=finite,
    help="Measure this device again every S seconds (0: never) and announce the new profile when the whole model's latency "
         "moved by more than --reprofile-tolerance (its compute changes over time; a profile measured under a burst of "
         "load would otherwise stay). Only when the device measures itself.")
REPROFILE_TOLERANCE = typer.Option(
    DEFAULT_TOLERANCE, "--reprofile-tolerance", min=0.0, max=10.0, callback=finite,
    help="Relative change of the whole model's latency that a new measurement must exceed to be announced.")


def watch_profile(agent: Any, measure: Any, every_s: float, tolerance: float) -> Any:
    """Warn when the agent's profile was measured under load; with ``every_s`` > 0, start and return a
    :class:`~ldfleet.client.reprofile.Reprofiler` (the caller stops it), else None."""
    from ldfleet.client.reprofile import Reprofiler, under_load

    prof = agent.profile
    if prof is not None and under_load(prof):
        hint = "" if every_s > 0 else "; --reprofile-every measures again later"
        err.print(f"[yellow]warning:[/] profile measured at load {prof.load:.2f} on {prof.cores} cores: the layer "
                  f"timings may be high and the controller may give this device fewer layers{hint}", soft_wrap=True)
    if every_s <= 0:
        return None
    return Reprofiler(agent.device_id, measure, lambda: agent.profile, agent.set_profile, every_s, tolerance).start()
