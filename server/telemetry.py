"""Inference telemetry in the registry: per-device, per-minute roll-ups of ``Telemetry.inference``.

The controller validates every telemetry message (``common/schemas.py``: topic device id must
equal the payload's, counts must be consistent and bounded) and hands the accepted ones to
``InferenceRollups.add`` inside its batch; ``write`` then adds them to the ``inference_rollups``
rows of their minute (one row per device and minute, counts summed). Messages from devices the
registry does not know, and summaries whose layer count disagrees with the minute's row, are
dropped with a logged reason. ``usage`` reads the roll-ups back for ``ldfleet registry usage
--source inference`` and the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from ldfleet.common.schemas import InferenceSummary, Telemetry
from ldfleet.server.registry.models import InferenceRollup
from ldfleet.server.registry.store import Registry

log = logging.getLogger("ldfleet.server.telemetry")


def minute_of(when: datetime) -> datetime:
    """The UTC minute a message belongs to (seconds and below cut off)."""
    return when.astimezone(timezone.utc).replace(second=0, microsecond=0)


@dataclass
class _Sum:
    messages: int = 0
    requests: int = 0
    errors: int = 0
    misses: int = 0
    interventions: int = 0
    k_counts: list[int] = field(default_factory=list)
    layer_counts: list[int] = field(default_factory=list)
    p50_weighted: float = 0.0  # sum of p50 x requests
    p99: float | None = None

    def add(self, s: InferenceSummary) -> None:
        if not self.k_counts:
            self.k_counts, self.layer_counts = [0] * len(s.k_counts), [0] * len(s.layer_counts)
        self.messages += 1
        self.requests += s.requests
        self.errors += s.errors
        self.misses += s.deadline_misses
        self.interventions += s.interventions
        self.k_counts = [a + b for a, b in zip(self.k_counts, s.k_counts)]
        self.layer_counts = [a + b for a, b in zip(self.layer_counts, s.layer_counts)]
        if s.p50_ms is not None:
            self.p50_weighted += s.p50_ms * s.requests
        if s.p99_ms is not None:
            self.p99 = max(self.p99 or 0.0, s.p99_ms)


class InferenceRollups:
    """Accepted inference summaries of one controller batch, summed per (device, minute)."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, datetime], _Sum] = {}
        self.dropped = 0

    def add(self, message: Telemetry, received_at: datetime, known_device: bool) -> bool:
        """Take one validated telemetry message; False (and a logged reason) when it is dropped."""
        summary = message.inference
        if summary is None:
            return False
        if not known_device:
            return self._drop(message.device_id, "device unknown to the registry (no status or profile yet)")
        key = (message.device_id, minute_of(received_at))
        agg = self.pending.setdefault(key, _Sum())
        if agg.k_counts and len(agg.k_counts) != len(summary.k_counts):
            return self._drop(message.device_id, f"{len(summary.k_counts)} layers, earlier this minute {len(agg.k_counts)}")
        agg.add(summary)
        return True

    def _drop(self, device_id: str, reason: str) -> bool:
        self.dropped += 1
        log.warning("dropped inference telemetry of %s: %s", device_id, reason)
        return False

    def write(self, s: Session) -> int:
        """Add the pending sums to their rows (insert or update); returns the rows touched."""
        touched = 0
        for (device_id, minute), agg in self.pending.items():
            row = s.execute(select(InferenceRollup).where(InferenceRollup.device_id == device_id,
                                                          InferenceRollup.minute == minute)).scalar_one_or_none()
            if row is not None and len(row.k_counts) != len(agg.k_counts):
                self._drop(device_id, f"{len(agg.k_counts)} layers, the stored minute has {len(row.k_counts)}")
                continue
            if row is None:
                row = InferenceRollup(device_id=device_id, minute=minute, messages=0, requests=0, errors=0,
                                      deadline_misses=0, interventions=0, k_counts=[0] * len(agg.k_counts),
                                      layer_counts=[0] * len(agg.layer_counts))
                s.add(row)
            weighted = (row.p50_ms or 0.0) * row.requests + agg.p50_weighted
            row.messages += agg.messages
            row.requests += agg.requests
            row.errors += agg.errors
            row.deadline_misses += agg.misses
            row.interventions += agg.interventions
            row.k_counts = [a + b for a, b in zip(row.k_counts, agg.k_counts)]
            row.layer_counts = [a + b for a, b in zip(row.layer_counts, agg.layer_counts)]
            row.p50_ms = weighted / row.requests if row.requests else None
            if agg.p99 is not None:
                row.p99_ms = max(row.p99_ms or 0.0, agg.p99)
            row.updated_at = datetime.now(timezone.utc)
            touched += 1
        self.pending.clear()
        return touched


def rollups(registry: Registry, device_id: str | None = None) -> list[InferenceRollup]:
    """Stored roll-ups (one device, or all), oldest minute first."""
    with registry.session() as s:
        q = select(InferenceRollup).order_by(InferenceRollup.minute, InferenceRollup.device_id)
        if device_id is not None:
            q = q.where(InferenceRollup.device_id == device_id)
        rows = list(s.execute(q).scalars())
        s.expunge_all()
        return rows


def usage(registry: Registry) -> dict[str, dict]:
    """Per device over all stored minutes: requests, mean layers, share of requests running each
    layer, deadline misses, interventions, worst p99."""
    out: dict[str, dict] = {}
    for r in rollups(registry):
        d = out.setdefault(r.device_id, {"minutes": 0, "requests": 0, "deadline_misses": 0, "interventions": 0,
                                         "errors": 0, "k_counts": [0] * len(r.k_counts),
                                         "layer_counts": [0] * len(r.layer_counts), "p99_ms": None})
        if len(d["k_counts"]) != len(r.k_counts):
            continue
        d["minutes"] += 1
        for key in ("requests", "deadline_misses", "interventions", "errors"):
            d[key] += getattr(r, key)
        d["k_counts"] = [a + b for a, b in zip(d["k_counts"], r.k_counts)]
        d["layer_counts"] = [a + b for a, b in zip(d["layer_counts"], r.layer_counts)]
        if r.p99_ms is not None:
            d["p99_ms"] = max(d["p99_ms"] or 0.0, r.p99_ms)
    for d in out.values():
        n = d["requests"]
        d["mean_layers"] = sum((j + 1) * c for j, c in enumerate(d["k_counts"])) / n if n else 0.0
        d["usage"] = [c / n if n else 0.0 for c in d["layer_counts"]]
    return out
