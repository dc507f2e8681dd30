"""Policy acks into the registry, idempotent under redelivery.

MQTT QoS 1 delivers at least once, and an agent re-announces its last ack (retained) on every
reconnect. An ack is identified by ``(device_id, version, applied_version, status)``: the first
delivery is stored in ``policy_acks`` and updates the device row; a repeat changes nothing: the
INSERT ignores a conflict on the unique constraint and returns only the rows that went in, so two
controllers racing on one registry cannot store it twice either.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Table
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


def store(s: Session, acks: list[tuple[PolicyAck, datetime]], desired: dict[str, int]) -> list[dict[str, Any]]:
    """Store the first deliveries of ``acks`` (``desired``: device -> desired version now) and
    return the device-row updates they make (the last ack of each device wins).

    One statement: ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` the key, executemany (batched
    multi-row INSERTs). A row goes in only for an ack not stored before, so the keys returned are
    exactly the first deliveries, also when another controller stores the same ack at once."""
    if not acks:
        return []
    firsts: dict[tuple[str, int, int, str], tuple[PolicyAck, datetime]] = {}
    for ack, now in acks:  # the first of the batch's copies, in arrival order
        firsts.setdefault(_key(ack), (ack, now))
    rows = []
    for ack, now in firsts.values():
        dv = desired.get(ack.device_id, 0)
        rows.append({
            "device_id": ack.device_id, "version": ack.version, "applied_version": ack.applied_version, "status": ack.status,
            "reason": ack.reason, "effective_k": ack.effective_k, "expected_latency_ms": ack.expected_latency_ms,
            "desired_version": dv, "converged": bool(dv) and ack.applied_version == dv, "received_at": now,
        })
    stmt = insert_ignoring(s.get_bind().dialect.name)(_ACKS).on_conflict_do_nothing().returning(*(_ACKS.c[k] for k in _KEY))
    stored = {tuple(r) for r in s.execute(stmt, rows)}
    if len(stored) < len(acks):
        log.debug("%d of %d acks were delivered again: ignored", len(acks) - len(stored), len(acks))
    dev_upd: dict[str, dict[str, Any]] = {}
    for key, (ack, now) in firsts.items():
        if key not in stored:
            continue
        did = ack.device_id
        dev_upd[did] = {
            "device_id": did, "applied_version": ack.applied_version, "ack_status": ack.status, "ack_reason": ack.reason,
            "effective_k": ack.effective_k, "expected_latency_ms": ack.expected_latency_ms, "acked_at": now, "last_seen": now,
        }
        if ack.status == "rejected":
            log.warning("device %s rejected policy version %d: %s", did, ack.version, ack.reason)
        elif ack.reason:
            log.warning("device %s applied policy version %d: %s", did, ack.version, ack.reason)
    return list(dev_upd.values())
