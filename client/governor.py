"""The governor: per request, how many encoder layers this device can afford right now.

The policy sets the ceiling (``policy_k``); the governor only ever lowers k, from live conditions:

* a latency target (the request's deadline, else the policy's ``latency_ms``): the largest k whose
  predicted latency fits ``safety * target``. The prediction is front end + overhead + k x per-layer
  time, each a running estimate on this device (a high percentile of the last ``window`` requests,
  so a burst of contention shows within a few requests). Inputs differ in length (an utterance, not a
  1 s keyword clip), so the front end and the layers are estimated per second of audio and scaled by
  the next input's duration: their cost grows about linearly with frames at these lengths (attention's
  quadratic term is small next to the feed-forward and projections below ~30 s);
* CPU contention (``/proc/stat``: busy share of all CPUs, and the CPU share a runnable task can
  expect from the number of runnable tasks): when it is worse than while the estimates were
  measured, the estimates are scaled up by the ratio, before any request has been slowed;
* battery (``/sys/class/power_supply/BAT*/capacity``, when present and not charging): below
  ``low_battery`` the keep share is capped at ``battery_keep``.

Each decision carries reason strings, e.g. ``"deadline 40.0 ms: predicted 52.3 ms at k=8 > 36.0 ms"``.

Under a latency target a decision also gives ``max_layers``, the deepest run that fits the target. The
selector runs ``k`` (never more than that); ``adaptive``, whose depth varies per input around a mean
of the policy's k, keeps its own depth unless it is deeper than ``max_layers`` (``ceiling``: the
policy's k after the battery cap, its mean budget).
"""

from __future__ import annotations

import glob
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("ldfleet.governor")


def read_proc_stat(path: str = "/proc/stat") -> tuple[int, int, int] | None:
    """(busy jiffies, all jiffies, runnable tasks now) from /proc/stat (``cpu`` and ``procs_running``
    lines); None if unreadable."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = lines[0].split() if lines else []
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    running = next((int(x.split()[1]) for x in lines if x.startswith("procs_running ")), 1)
    return sum(values) - idle, sum(values), running


class CpuMeter:
    """How contended the CPUs are, from /proc/stat.

    ``busy``: busy share of all CPUs (0 = idle, 1 = saturated) over the last ``min_jiffies`` or more
    (jiffies tick at about 100 Hz per CPU, so a share over a few ms would be 0 or 1; 20 jiffies are
    0.1 s on 2 CPUs). ``share``: the CPU share one runnable thread can expect right now,
    ``min(1, cores / runnable tasks)`` (``procs_running``, counted at this instant, this one included):
    it moves the moment a competing process starts, before any request has been slowed.
    """

    def __init__(self, reader: Callable[[], tuple[int, int, int] | None] = read_proc_stat, min_jiffies: int = 20,
                 cores: int | None = None):
        import os

        self.reader = reader
        self.min_jiffies = min_jiffies
        self.cores = cores or os.cpu_count() or 1
        self.last = reader()
        self.busy = 0.0
        self.share = 1.0

    def sample(self) -> float:
        """Renew the readings; returns ``busy``."""
        now = self.reader()
        if now is None:
            return self.busy
        self.share = min(1.0, self.cores / max(1, now[2]))
        if self.last is None:
            self.last = now
        elif now[1] - self.last[1] >= max(1, self.min_jiffies):
            self.busy = max(0.0, min(1.0, (now[0] - self.last[0]) / (now[1] - self.last[1])))
            self.last = now
        return self.busy


def read_battery(root: str = "/sys/class/power_supply") -> tuple[float, bool] | None:
    """(charge fraction, discharging) of the first battery, or None without one."""
    for cap in sorted(glob.glob(f"{root}/BAT*/capacity")):
        try:
            fraction = max(0.0, min(1.0, int(Path(cap).read_text().strip()) / 100))
        except (OSError, ValueError):
            continue
        try:
            status = (Path(cap).parent / "status").read_text().strip().lower()
        except OSError:
            status = "unknown"
        return fraction, status == "discharging"
    return None


def _percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Decision:
    """What the governor chose for one request and why (``reasons`` is empty when k = policy k)."""

    k: int
    policy_k: int
    target_ms: float | None
    predicted_ms: float | None
    cpu_busy: float
    reasons: list[str] = field(default_factory=list)
    #: The policy's k after the battery cap, before any lowering for the target.
    ceiling: int | None = None
    #: The deepest run predicted to fit the target (1..L); None: no target, or no estimates yet.
    max_layers: int | None = None

    @property
    def intervened(self) -> bool:
        """k lowered below the policy's, or the deadline guard stopped the layers early."""
        return self.k < self.policy_k or bool(self.reasons)

    def explain(self) -> str:
        return "; ".join(self.reasons) or f"policy k={self.policy_k}"


class Governor:
    """Picks k <= policy k per request; learns this device's front-end and per-layer latency.

    ``observe`` must be called with each request's measured timings (``Result`` of the runtime).
    ``safety`` is the share of the target planned for (headroom for noise).
    """

    def __init__(self, num_layers: int, window: int = 16, quantile: float = 0.9, safety: float = 0.8,
                 low_battery: float = 0.2, battery_keep: float = 0.5, cpu: CpuMeter | None = None,
                 battery: Callable[[], tuple[float, bool] | None] = read_battery):
        self.num_layers = num_layers
        self.quantile, self.safety = quantile, safety
        self.low_battery, self.battery_keep = low_battery, battery_keep
        self.cpu = cpu or CpuMeter()
        self.battery = battery
        self.front_ms: deque[float] = deque(maxlen=window)  # front-end ms per second of audio
        self.layer_ms: deque[float] = deque(maxlen=window)  # mean per-layer ms per second of audio, each request
        self.other_ms: deque[float] = deque(maxlen=window)  # selector + head + glue (ms, whatever the length)
        self.busy_at: deque[float] = deque(maxlen=window)  # CPU busy share when each was measured
        self.share_at: deque[float] = deque(maxlen=window)  # CPU share per runnable task then
        self.decisions = 0
        self.interventions = 0

    # ---- estimates ---------------------------------------------------------------------------

    def observe(self, result, seconds: float = 1.0) -> None:
        """Learn from one finished request (a runtime ``Result``: ms, front_end_ms, layer_ms) on an
        input of ``seconds`` of audio."""
        seconds = max(seconds, 1e-3)
        self.front_ms.append(result.front_end_ms / seconds)
        if result.layer_ms:
            self.layer_ms.append(sum(result.layer_ms) / len(result.layer_ms) / seconds)
        self.other_ms.append(max(0.0, result.ms - result.front_end_ms - sum(result.layer_ms)))
        self.busy_at.append(self.cpu.busy)
        self.share_at.append(self.cpu.share)

    def predictor(self, slowdown: float = 1.0, seconds: float = 1.0) -> Callable[[int], float] | None:
        """k -> predicted latency in ms at k layers for an input of ``seconds`` of audio, from the
        current estimates (read once; None until a request has been observed)."""
        if not self.front_ms or not self.layer_ms:
            return None
        q = self.quantile
        front, layer, other = _percentile(self.front_ms, q), _percentile(self.layer_ms, q), _percentile(self.other_ms, q)
        return lambda k: ((front + k * layer) * seconds + other) * slowdown

    def predict_ms(self, k: int, slowdown: float = 1.0, seconds: float = 1.0) -> float | None:
        """Predicted latency in ms at k layers for an input of ``seconds`` of audio (None until a
        request has been observed)."""
        predict = self.predictor(slowdown, seconds)
        return None if predict is None else predict(k)

    def _slowdown(self, busy: float, share: float) -> float:
        """How much slower than its estimates this process will now run (1 = as measured, at most 4):
        the larger of the drops in idle CPU and in CPU share per runnable task since the estimates."""
        if not self.busy_at:
            return 1.0
        then_busy = sum(self.busy_at) / len(self.busy_at)
        by_busy = (1.0 - min(then_busy, 0.95)) / (1.0 - min(busy, 0.95))
        by_share = (sum(self.share_at) / len(self.share_at)) / max(share, 0.05)
        worst = max(by_busy, by_share)
        return min(4.0, worst) if worst > 1.1 else 1.0

    # ---- the decision --------------------------------------------------------------------------

    def decide(self, policy_k: int, deadline_ms: float | None = None, seconds: float = 1.0) -> Decision:
        """k for the next request (an input of ``seconds`` of audio) under ``policy_k`` and an optional
        latency target in ms."""
        policy_k = max(1, min(policy_k, self.num_layers))
        busy = self.cpu.sample()
        d = Decision(policy_k, policy_k, deadline_ms, None, busy)
        batt = self.battery() if self.battery else None
        if batt is not None and batt[1] and batt[0] < self.low_battery:
            cap = max(1, round(self.battery_keep * self.num_layers))
            if cap < d.k:
                d.reasons.append(f"battery {100 * batt[0]:.0f}% < {100 * self.low_battery:.0f}% and discharging: k<={cap}")
                d.k = cap
        d.ceiling = d.k
        if deadline_ms is not None:
            slowdown = self._slowdown(busy, self.cpu.share)
            budget = self.safety * deadline_ms
            predict = self.predictor(slowdown, seconds)  # the estimates' percentiles, once per request
            predicted = None if predict is None else predict(d.k)
            if predict is not None:
                d.max_layers = next((j for j in range(self.num_layers, 1, -1) if predict(j) <= budget), 1)
            if predicted is not None and predicted > budget:
                k = d.max_layers
                why = f"deadline {deadline_ms:.1f} ms: predicted {predicted:.1f} ms at k={d.k} > {budget:.1f} ms"
                if slowdown > 1.0:
                    why += (f" (CPU busy {100 * busy:.0f}%, {100 * self.cpu.share:.0f}% of a core per task,"
                            f" estimates x{slowdown:.2f})")
                d.reasons.append(why + f" -> k={k}")
                d.k = k
            d.predicted_ms = None if predict is None else predict(d.k)
        self.decisions += 1
        if d.intervened:
            self.interventions += 1
            log.debug("governor: k=%d (policy %d): %s", d.k, policy_k, d.explain())
        return d
