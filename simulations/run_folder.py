"""A simulation's run folder: its files, its ``run.json`` (``RunInfo``), and clearing it.

``run.json`` says whether the run is ``running``, ``finished``, ``incomplete`` (fewer rounds than
planned), ``failed`` or ``interrupted``. A run that failed or was interrupted before any round left a
checkpoint has nothing to resume: a new ``ldfleet simulate`` into the same folder starts it again
(``stopped_before_rounds``) instead of asking for ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ldfleet.common.learning import MANIFEST_FILE
from ldfleet.server.checkpoints import checkpoint_rounds
from ldfleet.simulations.serving import SERVING_FILE

RUN_FILE = "run.json"
SCENARIO_COPY = "scenario.yaml"
EVENTS_FILE = "events.json"
ROUNDS_LOG = "rounds.jsonl"

#: Everything a simulation writes into its run folder (what ``clear_run`` removes, and nothing else).
RUN_ENTRIES = (RUN_FILE, SCENARIO_COPY, EVENTS_FILE, ROUNDS_LOG, MANIFEST_FILE, "device-classes.yaml", "registry.db",
               "registry.db-wal", "registry.db-shm", "devices", "checkpoints", "report", "broker", "flower.log", SERVING_FILE)


@dataclass
class RunInfo:
    """What ``run.json`` holds: the run's id, registry, cache, status, timings (s) and peak memory (MB)."""

    run_id: str
    run_dir: Path
    db_url: str
    cache_dir: Path
    created: float
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    broker_url: str = ""
    rounds: int = 0
    peak_rss_mb: float = 0.0
    torch_threads: int = 0

    def save(self) -> None:
        data = {
            "run_id": self.run_id, "db_url": self.db_url, "cache_dir": str(self.cache_dir), "created": self.created,
            "timings": self.timings, "status": self.status, "broker_url": self.broker_url, "rounds": self.rounds,
            "peak_rss_mb": self.peak_rss_mb, "torch_threads": self.torch_threads, "cores": os.cpu_count(),
        }
        tmp = self.run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.run_dir / RUN_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> RunInfo:
        data = json.loads((run_dir / RUN_FILE).read_text())
        return cls(
            run_id=data["run_id"], run_dir=run_dir, db_url=data["db_url"], cache_dir=Path(data["cache_dir"]),
            created=data["created"], timings=data.get("timings", {}), status=data.get("status", "running"),
            broker_url=data.get("broker_url", ""), rounds=int(data.get("rounds", 0)),
            peak_rss_mb=float(data.get("peak_rss_mb", 0.0)), torch_threads=int(data.get("torch_threads", 0)),
        )


def clear_run(run_dir: Path) -> None:
    """Remove what a previous simulation wrote into ``run_dir`` (and nothing else)."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def mark_stopped(run_dir: Path, run_id: str, status: str) -> None:
    """Record that run ``run_id`` in ``run_dir`` stopped (``failed`` or ``interrupted``) while ``running``;
    any other run there is left alone."""
    try:
        info = RunInfo.load(run_dir)
    except (OSError, ValueError, KeyError):
        return  # unreadable: nothing to mark
    if info.run_id == run_id and info.status == "running":
        info.status = status
        info.save()


def stopped_before_rounds(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` failed or was interrupted before any round left a checkpoint:
    nothing to resume, so it may be started again."""
    try:
        status = RunInfo.load(run_dir).status
    except (OSError, ValueError, KeyError):
        return False
    return status in ("failed", "interrupted") and not checkpoint_rounds(run_dir)
