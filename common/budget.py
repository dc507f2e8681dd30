"""What a budget is, and turning one into a number of encoder layers to keep.

A budget is exactly one of
* a keep fraction ``keep``: the share of the L encoder layers to run;
* a latency target ``latency_ms``: ms per input, whatever its length (suits 1 s keyword clips);
* a real-time factor ``rtf``: ms of compute per ms of audio, so an utterance of ``s`` seconds must
  finish in ``rtf * 1000 * s`` ms (suits speech recognition, whose inputs differ in length; RTF is
  the field's usual speed measure, processing time over audio duration).

A device's measured per-layer latency turns a latency target or an RTF into k. Both the controller
(which publishes policies) and the model (which runs them) use these functions, so a device and the
fleet always agree on what a budget means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Largest latency target a budget may name, in ms.
MAX_LATENCY_MS = 1e7
#: Largest real-time factor a budget may name (100 s of compute per second of audio).
MAX_RTF = 100.0


def check_budget(
    keep: float | None = None,
    latency_ms: float | None = None,
    rtf: float | None = None,
    percentile: float | None = None,
) -> None:
    """Exactly one of ``keep`` in (0, 1], ``latency_ms`` in (0, 1e7] and ``rtf`` in (0, 100]; a
    ``percentile`` in (0, 100) only with a latency target or an RTF. Raises ValueError with the reason.
    """
    given = [name for name, value in (("keep", keep), ("latency_ms", latency_ms), ("rtf", rtf)) if value is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one budget: keep (a fraction of the layers), latency_ms (ms per input) or rtf "
            "(ms of compute per ms of audio)" + (f"; got {' and '.join(given)}" if given else "")
        )
    if keep is not None and not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep fraction must be a number in (0, 1], got {keep!r}")
    if latency_ms is not None and not (math.isfinite(latency_ms) and 0.0 < latency_ms <= MAX_LATENCY_MS):
        raise ValueError(f"latency target must be a number of ms in (0, {MAX_LATENCY_MS:g}], got {latency_ms!r}")
    if rtf is not None and not (math.isfinite(rtf) and 0.0 < rtf <= MAX_RTF):
        raise ValueError(f"real-time factor must be a number in (0, {MAX_RTF:g}], got {rtf!r}")
    if percentile is not None:
        if keep is not None:
            raise ValueError("a percentile only goes with a latency target or a real-time factor")
        if not (math.isfinite(percentile) and 0.0 < percentile < 100.0):
            raise ValueError(f"percentile must be in (0, 100), got {percentile!r}")


def budget_text(
    keep: float | None = None,
    latency_ms: float | None = None,
    rtf: float | None = None,
    percentile: float | None = None,
) -> str:
    """A budget as people read it: ``keep 0.5``, ``latency 40 ms @p99``, ``RTF 0.05 @p90``."""
    if keep is not None:
        return f"keep {keep:g}"
    pct = f" @p{percentile:g}" if percentile is not None else ""
    if rtf is not None:
        return f"RTF {rtf:g}{pct}"
    return f"latency {latency_ms:g} ms{pct}"


def target_ms(latency_ms: float | None, rtf: float | None, seconds: float) -> float | None:
    """The latency in ms an input of ``seconds`` of audio must meet: ``latency_ms`` as it is, or
    ``rtf * 1000 * seconds``; None for a keep fraction (no target)."""
    if rtf is not None:
        return rtf * 1000.0 * seconds
    return latency_ms


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
