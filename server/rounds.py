"""Round and metric queries on the registry that the learning plane needs (on top of its store).

The registry's ``rounds`` table is unique per ``(run_id, number)``, so a round can never be written
twice; resuming a run first discards the rounds that never finished (and their metrics), then
re-runs them. Reads here serve ``ldfleet registry rounds|devices|usage`` and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select

from ldfleet.server.registry.models import Device, Round, RoundMetric
from ldfleet.server.registry.store import Registry

FINISHED = "finished"
TRAIN = "train"
EVAL = "eval"
FAILED_SUFFIX = "-failed"


def failed_phase(phase: str) -> str:
    """Phase name of a failure row (no metrics, never counted as a result)."""
    return f"{phase}{FAILED_SUFFIX}"


def finished_rounds(registry: Registry, run_id: str) -> list[int]:
    with registry.session() as s:
        return list(s.scalars(
            select(Round.number).where(Round.run_id == run_id, Round.status == FINISHED).order_by(Round.number)
        ))


def discard_unfinished(registry: Registry, run_id: str, keep_up_to: int) -> list[int]:
    """Delete every round of ``run_id`` numbered above ``keep_up_to`` or not finished, with its metrics."""
    with registry.session() as s:
        doomed = list(s.scalars(
            select(Round.id).where(Round.run_id == run_id, (Round.number > keep_up_to) | (Round.status != FINISHED))
        ))
        numbers = list(s.scalars(select(Round.number).where(Round.id.in_(doomed)))) if doomed else []
        if doomed:
            s.execute(delete(RoundMetric).where(RoundMetric.round_id.in_(doomed)))
            s.execute(delete(Round).where(Round.id.in_(doomed)))
        return sorted(numbers)


def run_ids(registry: Registry) -> list[tuple[str, int, Any]]:
    """(run id, rounds, last start) of every run in the registry, newest first."""
    with registry.session() as s:
        rows = s.execute(
            select(Round.run_id, func.count(Round.id), func.max(Round.started_at)).group_by(Round.run_id)
        ).all()
    return sorted(((r, int(n), t) for r, n, t in rows), key=lambda x: x[2] or 0, reverse=True)


def rounds(registry: Registry, run_id: str) -> list[Round]:
    with registry.session() as s:
        return list(s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number)))


@dataclass
class MetricRow:
    round: int
    device_id: str
    device_class: str | None
    phase: str
    policy_version: int | None
    k: int | None
    accuracy: float | None
    loss: float | None
    num_examples: int | None
    mean_kept_layers: float | None
    latency_ms: float | None
    layer_usage: list[float] | None
    #: Why a ``*-failed`` row failed.
    reason: str | None = None
    #: Word / character error rates (asr fleets; None for kws, whose score is ``accuracy``).
    wer: float | None = None
    cer: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def metric_rows(registry: Registry, run_id: str, phase: str | None = None) -> list[MetricRow]:
    with registry.session() as s:
        q = (
            select(Round.number, RoundMetric)
            .join(RoundMetric, RoundMetric.round_id == Round.id)
            .where(Round.run_id == run_id)
            .order_by(Round.number, RoundMetric.device_id, RoundMetric.phase)
        )
        if phase is not None:
            q = q.where(RoundMetric.phase == phase)
        out = []
        for number, m in s.execute(q).all():
            out.append(MetricRow(
                round=number, device_id=m.device_id, device_class=m.device_class, phase=m.phase,
                policy_version=m.policy_version, k=m.k, accuracy=m.accuracy, loss=m.loss,
                num_examples=m.num_examples, mean_kept_layers=m.mean_kept_layers, latency_ms=m.latency_ms,
                layer_usage=list(m.layer_usage) if m.layer_usage is not None else None, reason=m.reason,
                wer=m.wer, cer=m.cer,
            ))
        return out


def unsettled_devices(registry: Registry, device_ids: set[str]) -> set[str]:
    """Online devices (of ``device_ids``) whose budget is still changing: the controller has not yet
    resolved the newest policy of their scope, or they have not applied (nor refused) what it published."""
    status = device_status(registry)
    active = registry.active_policies()
    out = set()
    for device_id in device_ids:
        st = status.get(device_id)
        if st is None or not st["online"]:
            continue
        desired = st["desired"] or {}
        override = active.get(f"device:{device_id}")
        want = override or active.get(f"class:{st['device_class']}")
        if want is not None and (desired.get("source") != ("device" if override else "class")
                                 or int(desired.get("policy_version") or 0) < want.version):
            out.add(device_id)
        elif st["desired_version"] > st["applied_version"] and st["ack_status"] != "rejected":
            out.add(device_id)
    return out


def device_status(registry: Registry) -> dict[str, dict[str, Any]]:
    """What the control plane knows of each device: online, class, desired/applied versions, k."""
    with registry.session() as s:
        return {
            d.device_id: {
                "device_class": d.device_class, "online": bool(d.online), "desired_version": d.desired_version,
                "applied_version": d.applied_version, "effective_k": d.effective_k,
                "expected_latency_ms": d.expected_latency_ms, "desired": d.desired, "ack_status": d.ack_status,
            }
            for d in s.scalars(select(Device))
        }
