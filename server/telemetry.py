"""Inference telemetry in the registry: per-device, per-minute roll-ups of ``Telemetry.inference``.

The controller validates every telemetry message (``common/schemas.py``: topic device id must
equal the payload's, counts must be consistent and bounded) and hands the accepted ones to
``InferenceRollups.add`` inside its batch; ``write`` then folds them into the ``inference_rollups``
row of their minute (one row per device and minute, counts summed). Messages from devices the
registry does not know, and summaries whose layer count disagrees with the minute's row, are
dropped with a logged reason. ``usage`` reads the roll-ups back for ``ldfleet registry usage
--source inference`` and the report.
"""

from __future__ import annotations

import logging
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


def _new_row(device_id: str, minute: datetime, layers: int) -> InferenceRollup:
    return InferenceRollup(device_id=device_id, minute=minute, messages=0, requests=0, errors=0, deadline_misses=0,
                           interventions=0, k_counts=[0] * layers, layer_counts=[0] * layers)


def _fold(row: InferenceRollup, s: InferenceSummary) -> None:
    """Add one summary to its minute's row: counts summed, p50 request-weighted, p99 the largest."""
    if s.p50_ms is not None and s.requests:
        row.p50_ms = ((row.p50_ms or 0.0) * row.requests + s.p50_ms * s.requests) / (row.requests + s.requests)
    if s.p99_ms is not None:
        row.p99_ms = max(row.p99_ms or 0.0, s.p99_ms)
    row.messages += 1
    row.requests += s.requests
    row.errors += s.errors
    row.deadline_misses += s.deadline_misses
    row.interventions += s.interventions
    row.k_counts = [a + b for a, b in zip(row.k_counts, s.k_counts)]
    row.layer_counts = [a + b for a, b in zip(row.layer_counts, s.layer_counts)]
    row.updated_at = datetime.now(timezone.utc)


class InferenceRollups:
    """Accepted inference summaries of one controller batch, written to their (device, minute) rows."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, datetime, InferenceSummary]] = []
        self.dropped = 0

    def add(self, message: Telemetry, received_at: datetime, known_device: bool) -> bool:
        """Take one validated telemetry message; False (and a logged reason) when it is dropped."""
        if message.inference is None:
            return False
        if not known_device:
            return self._drop(message.device_id, "device unknown to the registry (no status or profile yet)")
        self.pending.append((message.device_id, minute_of(received_at), message.inference))
        return True

    def _drop(self, device_id: str, reason: str) -> bool:
        self.dropped += 1
        log.warning("dropped inference telemetry of %s: %s", device_id, reason)
        return False

    def write(self, s: Session) -> int:
        """Fold the pending summaries into their rows (created when new); returns the rows touched."""
        rows: dict[tuple[str, datetime], InferenceRollup] = {}
        for device_id, minute, summary in self.pending:
            row = rows.get((device_id, minute))
            if row is None:
                row = s.execute(select(InferenceRollup).where(InferenceRollup.device_id == device_id,
                                                              InferenceRollup.minute == minute)).scalar_one_or_none()
                if row is None:
                    row = _new_row(device_id, minute, len(summary.k_counts))
                    s.add(row)
                rows[(device_id, minute)] = row
            if len(row.k_counts) != len(summary.k_counts):
                self._drop(device_id, f"{len(summary.k_counts)} layers, this minute's row has {len(row.k_counts)}")
                continue
            _fold(row, summary)
        self.pending.clear()
        return len(rows)


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
