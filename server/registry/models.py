"""The fleet registry's tables (SQLAlchemy 2 ORM). The schema itself is created by the Alembic
migrations in ``ldfleet.server.migrations``; a test checks that they produce exactly these models.

* ``device_classes``: names of device classes (created from profiles or by the operator).
* ``devices``: last profile, liveness, the desired policy the controller published and the device's
  last ack (``converged`` = applied_version == desired_version).
* ``policies``: append-only audit trail of budget policies, versioned per scope (a class, or one
  device's override); the newest row of a scope is in force unless it clears the scope or expired.
* ``policy_acks``: every ack a device sent, as received (a redelivered ack once).
* ``rounds`` / ``round_metrics``: federated rounds and per-device-per-round metrics.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldfleet.common.budget import budget_text

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DeviceClass(Base):
    __tablename__ = "device_classes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: None until the device's first profile arrives.
    device_class: Mapped[str | None] = mapped_column(ForeignKey("device_classes.name"), index=True)
    #: The operator pinned the class: profiles no longer change it.
    class_pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    boot_id: Mapped[str | None] = mapped_column(String(64))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Birth/death ordering of the status in force (``ldfleet.server.liveness``): the agent's boot
    #: counter and the connection number within that boot.
    boot_seq: Mapped[int | None] = mapped_column(Integer)
    status_seq: Mapped[int | None] = mapped_column(Integer)
    #: The boot the current one replaced, and when (two boots taking turns: a duplicated device id).
    replaced_boot_id: Mapped[str | None] = mapped_column(String(64))
    replaced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Last evidence that two agents share this device id, and the other boot.
    duplicate_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duplicate_boot_id: Mapped[str | None] = mapped_column(String(64))

    profile: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    profile_revision: Mapped[int | None] = mapped_column(Integer)
    profile_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    model_id: Mapped[str | None] = mapped_column(String(200))
    num_layers: Mapped[int | None] = mapped_column(Integer)
    cores: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(Integer)

    #: Per-device desired version (only goes up) and the document last published.
    desired_version: Mapped[int] = mapped_column(Integer, default=0)
    desired: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    desired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    applied_version: Mapped[int] = mapped_column(Integer, default=0)
    ack_status: Mapped[str | None] = mapped_column(String(16))
    ack_reason: Mapped[str | None] = mapped_column(Text)
    effective_k: Mapped[int | None] = mapped_column(Integer)
    expected_latency_ms: Mapped[float | None] = mapped_column(Float)
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    telemetry: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    telemetry_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def converged(self) -> bool:
        return self.desired_version > 0 and self.applied_version == self.desired_version


class Policy(Base):
    """One operator decision. ``scope_key`` is ``class:<name>`` or ``device:<id>``."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("scope_key", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope_key: Mapped[str] = mapped_column(String(80), index=True)
    device_class: Mapped[str] = mapped_column(ForeignKey("device_classes.name"), index=True)
    device_id: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    keep: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    #: Real-time factor: ms of compute per ms of audio (``ldfleet.common.budget``).
    rtf: Mapped[float | None] = mapped_column(Float)
    percentile: Mapped[float | None] = mapped_column(Float)
    #: This row removes the scope's policy (a device falls back to its class, a class to the default).
    cleared: Mapped[bool] = mapped_column(Boolean, default=False)
    issued_by: Mapped[str] = mapped_column(String(128))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The row this one replaced (None for a scope's first policy): old -> new in the audit trail.
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"))
    comment: Mapped[str | None] = mapped_column(Text)

    @property
    def scope(self) -> str:
        return "device" if self.device_id else "class"

    def budget_text(self) -> str:
        if self.cleared:
            return "(cleared)"
        return budget_text(self.keep, self.latency_ms, self.rtf, self.percentile)


class PolicyAckRecord(Base):
    """One ack as received; a redelivered ack (same device, version, applied version, status) is
    stored once (unique constraint + insert-or-ignore, ``ldfleet.server.acks``)."""

    __tablename__ = "policy_acks"
    __table_args__ = (
        Index("ix_policy_acks_device_id_received_at", "device_id", "received_at"),
        UniqueConstraint("device_id", "version", "applied_version", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    applied_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    effective_k: Mapped[int | None] = mapped_column(Integer)
    expected_latency_ms: Mapped[float | None] = mapped_column(Float)
    #: desired_version of the device when the ack arrived, and whether it matched.
    desired_version: Mapped[int] = mapped_column(Integer, default=0)
    converged: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Aggregated metrics of the round (e.g. weighted accuracy), when known.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RoundMetric(Base):
    """One device's result in one round (devices of a simulation need not be in ``devices``)."""

    __tablename__ = "round_metrics"
    __table_args__ = (UniqueConstraint("round_id", "device_id", "phase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    device_class: Mapped[str | None] = mapped_column(String(64))
    phase: Mapped[str] = mapped_column(String(16), default="train")
    policy_version: Mapped[int | None] = mapped_column(Integer)
    k: Mapped[int | None] = mapped_column(Integer)
    #: Share of correct labels (kws); NULL for speech recognition, which reports ``wer``/``cer``.
    accuracy: Mapped[float | None] = mapped_column(Float)
    #: Word and character error rates on the device's clips (asr; NULL for kws): edits / reference
    #: words (characters), so they may exceed 1.
    wer: Mapped[float | None] = mapped_column(Float)
    cer: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    num_examples: Mapped[int | None] = mapped_column(Integer)
    #: Share of examples that ran each layer (length L).
    layer_usage: Mapped[list[float] | None] = mapped_column(JSON)
    mean_kept_layers: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    #: Why a failure row (phase ``*-failed``) failed: an error reply, a refused reply, no reply.
    reason: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class InferenceRollup(Base):
    """Per-device, per-minute roll-up of on-device inference telemetry (``ldfleet serve``; issue 10).

    Counts add up over the telemetry messages of the minute; ``p50_ms`` is their request-weighted
    mean of window medians, ``p99_ms`` the largest window p99 (a cautious bound, not a true p99).
    """

    __tablename__ = "inference_rollups"
    __table_args__ = (UniqueConstraint("device_id", "minute"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    minute: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    deadline_misses: Mapped[int] = mapped_column(Integer, default=0)
    interventions: Mapped[int] = mapped_column(Integer, default=0)
    #: Requests per k (index k - 1) and per encoder layer run (index = layer), each of length L.
    k_counts: Mapped[list[int]] = mapped_column(JSON)
    layer_counts: Mapped[list[int]] = mapped_column(JSON)
    p50_ms: Mapped[float | None] = mapped_column(Float)
    p99_ms: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
