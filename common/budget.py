"""Turning a budget into a number of encoder layers to keep.

A budget is either a keep fraction (share of the L encoder layers) or a latency target in ms
that a device's measured per-layer latency turns into k. Both the controller (which publishes
policies) and the model (which runs them) use these two functions, so a device and the fleet
always agree on what a budget means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def layers_for_keep(keep: float, num_layers: int) -> int:
    """k for a keep fraction: round(keep * L), at least one layer, at most L."""
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep fraction must be in (0, 1], got {keep!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return min(num_layers, max(1, round(keep * num_layers)))


def layers_for_latency(
    target_ms: float,
    front_end_ms: float,
    layer_ms: Sequence[float],
    overhead_ms: float = 0.0,
) -> int:
    """Largest k whose expected latency fits the target, at least one layer.

    The selector may pick any k layers, so the estimate is pessimistic: the front end, the fixed
    overhead (selector, head) and the k *slowest* layers must fit in ``target_ms``.
    """
    if not (math.isfinite(target_ms) and target_ms > 0):
        raise ValueError(f"latency target must be a positive number of ms, got {target_ms!r}")
    if not layer_ms:
        raise ValueError("a latency target needs the device's measured per-layer latency")
    slowest_first = sorted(layer_ms, reverse=True)
    budget = target_ms - front_end_ms - overhead_ms
    k = 0
    for ms in slowest_first:
        if budget - ms < 0:
            break
        budget -= ms
        k += 1
    return max(1, k)


def expected_latency_ms(k: int, front_end_ms: float, layer_ms: Sequence[float], overhead_ms: float = 0.0) -> float:
    """Pessimistic latency of running k layers: front end + overhead + the k slowest layers."""
    return front_end_ms + overhead_ms + sum(sorted(layer_ms, reverse=True)[:k])
