"""What every command module shares: the consoles, one way to fail, the `bench` group."""

from __future__ import annotations

import math
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)  # errors, warnings and progress notes: stdout stays clean for --json


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


def bench_group(app: typer.Typer) -> typer.Typer:
    """The `bench` group; whichever command module registers first creates it, the others add to it."""
    for info in app.registered_groups:
        if info.name == "bench" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="Benchmarks that print figures (speed, control plane).", no_args_is_help=True)
    app.add_typer(group, name="bench")
    return group
