"""Policy acks into the registry, idempotent under redelivery.

MQTT QoS 1 delivers at least once, and an agent re-announces its last ack (retained) on every
reconnect. An ack is identified by ``(device_id, version, applied_version, status)``: the first
delivery is stored in ``policy_acks`` and updates the device row; a repeat changes nothing (it is
filtered against the stored keys, and the INSERT ignores a conflict on the unique constraint, so two
controllers racing on one registry cannot store it twice either).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select, tuple_
from sqlalchemy.orm import Session

from ldfleet.common.schemas import PolicyAck
from ldfleet.server.publisher import insert_ignoring
from ldfleet.server.registry.models import PolicyAckRecord

log = logging.getLogger("ldfleet.controller")

_ACKS = PolicyAckRecord.__table__
_KEY = ("device_id", "version", "applied_version", "status")


def _key(ack: PolicyAck) -> tuple[str, int, int, str]:
    return (ack.device_id, ack.version, ack.applied_version, ack.status)


def insert_or_ignore(s: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT rows, skipping any that violate a unique constraint (``ON CONFLICT DO NOTHING``)."""
    if rows:
        s.execute(insert_ignoring(s.get_bind().dialect.name)(table).on_conflict_do_nothing(), rows)


def first_deliveries(s: Session, acks: list[tuple[PolicyAck, datetime]]) -> list[tuple[PolicyAck, datetime]]:
    """The acks of a batch not stored before (nor earlier in the batch), in arrival order."""
    if not acks:
        return []
    keys = {_key(a) for a, _ in acks}
    stored: set[tuple[Any, ...]] = set()
    key_cols = tuple_(*(_ACKS.c[k] for k in _KEY))
    ordered = sorted(keys)
    for i in range(0, len(ordered), 200):
        stored.update(tuple(r) for r in s.execute(select(*(_ACKS.c[k] for k in _KEY)).where(key_cols.in_(ordered[i:i + 200]))))
    out = []
    for ack, now in acks:
        k = _key(ack)
        if k in stored:
            log.debug("device %s: ack of version %d delivered again: ignored", ack.device_id, ack.version)
            continue
        stored.add(k)
        out.append((ack, now))
    return out


def store(s: Session, acks: list[tuple[PolicyAck, datetime]], desired: dict[str, int]) -> list[dict[str, Any]]:
    """Store the first deliveries of ``acks`` (``desired``: device -> desired version now) and
    return the device-row updates they make (the last ack of each device wins)."""
    fresh = first_deliveries(s, acks)
    dev_upd: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for ack, now in fresh:
        did = ack.device_id
        dv = desired.get(did, 0)
        dev_upd[did] = {
            "device_id": did, "applied_version": ack.applied_version, "ack_status": ack.status, "ack_reason": ack.reason,
            "effective_k": ack.effective_k, "expected_latency_ms": ack.expected_latency_ms, "acked_at": now, "last_seen": now,
        }
        rows.append({
            "device_id": did, "version": ack.version, "applied_version": ack.applied_version, "status": ack.status,
            "reason": ack.reason, "effective_k": ack.effective_k, "expected_latency_ms": ack.expected_latency_ms,
            "desired_version": dv, "converged": bool(dv) and ack.applied_version == dv, "received_at": now,
        })
        if ack.status == "rejected":
            log.warning("device %s rejected policy version %d: %s", did, ack.version, ack.reason)
    insert_or_ignore(s, _ACKS, rows)
    return list(dev_upd.values())
