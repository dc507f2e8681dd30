"""The `ldfleet` command: one Typer app assembled from the command groups in ``ldfleet.commands``.

Each module in ``ldfleet.commands`` owns one area (data, model, control plane, ...) and exposes
``register(app)``; this file only wires them together so that areas can grow independently.
"""

from __future__ import annotations

import importlib
import logging
import os

import typer

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = typer.Typer(
    name="ldfleet",
    help=(
        "Input-conditioned layer dropping for speech encoders, fine-tuned across a fleet of "
        "heterogeneous devices.\n\nStart with `ldfleet data synth`, `ldfleet train`, `ldfleet eval`; "
        "see `ldfleet COMMAND --help`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Command groups, in the order they appear in --help. A module missing here simply is not wired.
COMMAND_MODULES = ("data", "model", "checkpoints", "control", "fleet", "edge")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"ldfleet.commands.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"ldfleet.commands.{_name}":
            raise
        continue
    _module.register(app)
