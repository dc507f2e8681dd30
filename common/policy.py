"""How a budget becomes k on one device: shared by the controller (which resolves it with the
profile the device advertised) and the device (which checks it against its own profile), so both
always agree. The arithmetic itself is ``ldfleet.common.budget``.

A latency target or a real-time factor comes with a percentile P: the target must hold for P% of
inputs. Per-layer latencies in a profile are medians; when the profile also carries the measured tail ratios
(end-to-end p90/median, p99/median), the target is divided by the ratio for P (linear between
p50 = 1, p90 and p99; capped at p99), otherwise by 1 (the median is all that is known).
"""

from __future__ import annotations

from ldfleet.common.budget import (
    budget_text,
    check_budget,
    expected_latency_ms,
    layers_for_keep,
    layers_for_latency,
    target_ms,
)
from ldfleet.common.schemas import DeviceProfile


def percentile_ratio(profile: DeviceProfile, percentile: float | None) -> float:
    """Tail latency / median latency of this device at ``percentile`` (1.0 when unknown or <= 50)."""
    if percentile is None or percentile <= 50.0:
        return 1.0
    r90 = profile.latency_ratio_p90
    r99 = profile.latency_ratio_p99
    if r90 is None and r99 is None:
        return 1.0
    if r90 is None:
        r90 = 1.0 + (r99 - 1.0) * (40.0 / 49.0)  # type: ignore[operator]
    if percentile <= 90.0:
        return 1.0 + (r90 - 1.0) * (percentile - 50.0) / 40.0
    if r99 is None:
        return r90
    return r90 + (r99 - r90) * min(1.0, (percentile - 90.0) / 9.0)


def allowed_ms(profile: DeviceProfile, latency_ms: float | None, rtf: float | None, percentile: float | None) -> float:
    """The median latency in ms a latency target or RTF leaves on this device: the target at the
    profile's reference length (an RTF: ``rtf * 1000 * reference_seconds``), divided by the device's
    tail ratio at ``percentile`` (``percentile_ratio``)."""
    return target_ms(latency_ms, rtf, profile.reference_seconds) / percentile_ratio(profile, percentile)  # type: ignore[operator]


def k_for_budget(
    profile: DeviceProfile,
    *,
    keep: float | None = None,
    latency_ms: float | None = None,
    rtf: float | None = None,
    percentile: float | None = None,
) -> tuple[int, float | None]:
    """(k, expected median latency in ms at the profile's reference length, or None) for one budget
    on one device.

    An RTF is resolved at the length the profile was measured at (``reference_seconds``): its target
    there is ``rtf * 1000 * reference_seconds`` ms. Per-layer cost grows about linearly with the
    input's length at these sizes, so the same k holds for other lengths to first order; the device's
    governor plans each input at its own length.

    Raises ValueError with a reason a person can act on (bad budget, no measured latency).
    """
    check_budget(keep, latency_ms, rtf, percentile)
    if keep is not None:
        k = layers_for_keep(keep, profile.num_layers)
    else:
        if not profile.layer_ms:
            raise ValueError(
                f"{budget_text(keep, latency_ms, rtf, percentile)} needs the device's measured per-layer latency, "
                "and its profile has none"
            )
        k = layers_for_latency(allowed_ms(profile, latency_ms, rtf, percentile), profile.front_end_ms, profile.layer_ms)
    expected = expected_latency_ms(k, profile.front_end_ms, profile.layer_ms) if profile.layer_ms else None
    return k, expected


def unmet_target(
    profile: DeviceProfile,
    k: int,
    *,
    latency_ms: float | None = None,
    rtf: float | None = None,
    percentile: float | None = None,
) -> str | None:
    """Why a latency target or RTF cannot be met on this device at k layers; None where it can, for a
    keep fraction, or without measured per-layer latency.

    ``k_for_budget`` never goes below one layer, so a target shorter than the front end plus the
    slowest layer is applied at k=1 and missed on most inputs: the device says so in its ack, and the
    operator sees it in ``budget set`` and ``devices list``.
    """
    if (latency_ms is None and rtf is None) or not profile.layer_ms:
        return None
    allowed = allowed_ms(profile, latency_ms, rtf, percentile)
    expected = expected_latency_ms(k, profile.front_end_ms, profile.layer_ms)
    if expected <= allowed:
        return None
    at = "" if latency_ms is not None else f" at {profile.reference_seconds:g} s of audio"
    return (f"{budget_text(None, latency_ms, rtf, percentile)} cannot be met on this device: k={k} is expected to take "
            f"{expected:.1f} ms{at}, the target allows {allowed:.1f} ms")
