"""The fleet registry: SQLAlchemy 2 models, Alembic-migrated schema, operator-side API."""

from ldfleet.server.registry.models import (
    Base,
    Device,
    DeviceClass,
    InferenceRollup,
    Policy,
    PolicyAckRecord,
    Round,
    RoundMetric,
)
from ldfleet.server.registry.desired import DesiredPolicyRecord
from ldfleet.server.registry.store import Registry, RegistryError, upgrade

__all__ = [
    "Base",
    "DesiredPolicyRecord",
    "Device",
    "DeviceClass",
    "InferenceRollup",
    "Policy",
    "PolicyAckRecord",
    "Registry",
    "RegistryError",
    "Round",
    "RoundMetric",
    "upgrade",
]
