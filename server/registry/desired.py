"""``desired_policies``: every desired-policy version a controller published, one row per (device, version).

The unique constraint on ``(device_id, version)`` is what lets several controllers share one registry:
a controller claims the next version of a device by inserting its row (``INSERT ... ON CONFLICT DO
NOTHING RETURNING``, see ``server/publisher.py``); the one whose row went in publishes it, the other
learns that the version is taken and publishes nothing. The rows are also the audit trail the
benchmark checks: per device, versions 1..n with no gap and no duplicate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ldfleet.server.registry.models import Base, UTCDateTime, utcnow


class DesiredPolicyRecord(Base):
    __tablename__ = "desired_policies"
    __table_args__ = (UniqueConstraint("device_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    #: The BudgetPolicy document as published (JSON form).
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: ``controller_id`` of the controller that claimed the version.
    published_by: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
