"""Policy resolution: which budget a device runs under, and what k that means on it.

Per-device override > class policy > default (keep fraction ``default_keep``, 1.0 = all layers).
A keep fraction becomes k = round(keep * L); a latency target (or a real-time factor, a target per
second of audio) becomes the largest k whose pessimistic latency on this device's measured per-layer
timings fits (``ldfleet.common.policy.k_for_budget``).
When a latency target cannot be resolved (the profile has no per-layer timings) the desired policy
goes out without k, and the device resolves or rejects it itself, with a reason the registry records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ldfleet.common.policy import k_for_budget, unmet_target
from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, ttl_left, utcnow
from ldfleet.server.registry.models import Policy
from ldfleet.server.registry.store import class_scope, device_scope

#: The fields of a desired policy that make it a different policy (a change bumps the version).
SIGNATURE_FIELDS = (
    "source",
    "device_class",
    "policy_version",
    "keep",
    "latency_ms",
    "rtf",
    "percentile",
    "k",
    "num_layers",
    "expires_at",
)


@dataclass(frozen=True)
class Resolution:
    source: str
    device_class: str | None
    policy_version: int
    keep: float | None
    latency_ms: float | None
    rtf: float | None
    percentile: float | None
    issued_by: str
    issued_at: datetime
    expires_at: datetime | None
    k: int | None
    num_layers: int | None
    expected_latency_ms: float | None
    #: Why k could not be resolved (the desired policy goes out without k; the device decides).
    note: str | None = None
    #: Why the target cannot be met even at k (``ldfleet.common.policy.unmet_target``).
    unmet: str | None = None

    def to_policy(self, device_id: str, version: int, sent_at: datetime | None = None) -> BudgetPolicy:
        """The desired document; with ``sent_at`` stamped as sent then (``BudgetPolicy.stamped``)."""
        return BudgetPolicy(
            device_id=device_id,
            version=version,
            source=self.source,  # type: ignore[arg-type]
            device_class=self.device_class,
            policy_version=self.policy_version,
            keep=self.keep,
            latency_ms=self.latency_ms,
            rtf=self.rtf,
            percentile=self.percentile,
            k=self.k,
            num_layers=self.num_layers,
            expected_latency_ms=self.expected_latency_ms,
            issued_at=self.issued_at,
            issued_by=self.issued_by,
            expires_at=self.expires_at,
            sent_at=sent_at,
            ttl_s=None if sent_at is None else ttl_left(self.expires_at, sent_at),
        )

    def signature(self) -> tuple[Any, ...]:
        return tuple(_norm(f, getattr(self, f)) for f in SIGNATURE_FIELDS)


def _norm(name: str, value: Any) -> Any:
    if name == "expires_at" and value is not None:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return round(value.timestamp(), 6)
    return value


def signature_of(desired: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """The policy-defining part of a desired document (as stored in the registry, JSON mode)."""
    if not desired:
        return None
    return tuple(_norm(f, desired.get(f)) for f in SIGNATURE_FIELDS)


def pick_policy(device_id: str, device_class: str | None, active: dict[str, Policy]) -> Policy | None:
    """The operator policy that applies: the device's override, else its class policy, else None."""
    override = active.get(device_scope(device_id))
    if override is not None:
        return override
    if device_class is not None:
        return active.get(class_scope(device_class))
    return None


def resolve(
    device_id: str,
    device_class: str | None,
    profile: DeviceProfile,
    active: dict[str, Policy],
    *,
    default_keep: float = 1.0,
    now: datetime | None = None,
) -> Resolution:
    policy = pick_policy(device_id, device_class, active)
    if policy is None:
        source, version, keep, latency, rtf, pct = "default", 0, default_keep, None, None, None
        issued_by, issued_at, expires = "controller", now or utcnow(), None
    else:
        source = "device" if policy.device_id else "class"
        version, keep, latency, rtf, pct = policy.version, policy.keep, policy.latency_ms, policy.rtf, policy.percentile
        issued_by, issued_at, expires = policy.issued_by[:128], policy.issued_at, policy.expires_at
    note = unmet = None
    try:
        k, expected = k_for_budget(profile, keep=keep, latency_ms=latency, rtf=rtf, percentile=pct)
        unmet = unmet_target(profile, k, latency_ms=latency, rtf=rtf, percentile=pct)
    except ValueError as exc:
        k, expected, note = None, None, str(exc)
    return Resolution(
        source=source,
        device_class=device_class,
        policy_version=version,
        keep=keep,
        latency_ms=latency,
        rtf=rtf,
        percentile=pct,
        issued_by=issued_by,
        issued_at=issued_at,
        expires_at=expires,
        k=k,
        num_layers=profile.num_layers,
        expected_latency_ms=expected,
        note=note,
        unmet=unmet,
    )
