"""Measuring a device's profile again while its agent runs.

A board's compute changes over time (thermal throttling, other work, a governor's frequency), and a
profile measured once at start can be taken at a bad moment: under a burst of load every layer
looks slow, and the controller then gives the device fewer layers than it can run for as long as
the agent lives. :class:`Reprofiler` measures again every ``every_s`` seconds and announces the new
profile only when the whole model's latency moved by more than ``tolerance`` (relative), so that
timing noise does not make the controller resolve the device again and again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI reads this module's limits without loading the schemas
    from ldfleet.common.schemas import DeviceProfile

log = logging.getLogger("ldfleet.agent")

#: Relative change of the whole model's latency that makes a new measurement worth announcing.
DEFAULT_TOLERANCE = 0.2
#: The longest interval between measurements (a week; threading's timeouts overflow near 1e10 s).
MAX_INTERVAL_S = 7 * 86400.0


def full_model_ms(profile: DeviceProfile) -> float:
    """Front end plus every encoder layer, in ms at the profile's reference input length."""
    return profile.front_end_ms + sum(profile.layer_ms)


def latency_change(old: DeviceProfile, new: DeviceProfile) -> float | None:
    """Relative change of the whole model's latency from ``old`` to ``new`` (0.25: 25% slower,
    -0.2: 20% faster); None when the two are not comparable (another model, layer count or
    reference length), which always counts as a change."""
    same_model = (old.model_id, old.num_layers, old.reference_seconds) == (new.model_id, new.num_layers, new.reference_seconds)
    before = full_model_ms(old)
    if not same_model or before <= 0:
        return None
    return full_model_ms(new) / before - 1.0


def under_load(profile: DeviceProfile) -> bool:
    """Whether the 1-minute load average when measured was at or above the number of cores, i.e.
    the timings probably include waiting for a core."""
    return profile.load is not None and profile.cores > 0 and profile.load >= profile.cores


class Reprofiler:
    """Every ``every_s`` seconds: ``measure()``, and when the latency moved by more than
    ``tolerance`` from the current profile (``current()``), ``announce(new)``. A failed measurement
    is logged and tried again at the next interval; it never stops the agent.

    Raises ValueError for ``every_s <= 0`` or a negative ``tolerance``.
    """

    def __init__(self, device_id: str, measure: Callable[[], DeviceProfile], current: Callable[[], DeviceProfile | None],
                 announce: Callable[[DeviceProfile], None], every_s: float, tolerance: float = DEFAULT_TOLERANCE) -> None:
        if not 0 < every_s <= MAX_INTERVAL_S:
            raise ValueError(f"re-measuring interval must be in (0, {MAX_INTERVAL_S:.0f}] s, got {every_s}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.device_id, self.every_s, self.tolerance = device_id, every_s, tolerance
        self._measure, self._current, self._announce = measure, current, announce
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Measurements taken and announced (for logs and tests).
        self.measured = self.announced = 0

    def start(self) -> Reprofiler:
        self._thread = threading.Thread(target=self._loop, name=f"reprofile-{self.device_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check_once()

    def check_once(self) -> bool:
        """Measure now; announce when the change is over the tolerance. Returns whether it announced."""
        try:
            new = self._measure()
        except Exception as exc:  # noqa: BLE001 - a measurement may fail (memory, a broken model file); try later
            log.warning("%s: re-measuring the profile failed (%s); next try in %.0f s", self.device_id, exc, self.every_s)
            return False
        self.measured += 1
        if self._stop.is_set():  # the agent stopped while this measurement ran: nothing to announce to
            return False
        old = self._current()
        change = None if old is None else latency_change(old, new)
        if change is not None and abs(change) <= self.tolerance:
            log.debug("%s: re-measured %.1f ms (%+.0f%%): within %.0f%%, profile kept", self.device_id,
                      full_model_ms(new), 100 * change, 100 * self.tolerance)
            return False
        what = "another model" if change is None else f"{100 * change:+.0f}%"
        load = f"; load {new.load:.2f} on {new.cores} cores" if new.load is not None else ""
        log.info("%s: re-measured %.1f ms for the whole model (%s%s): announcing the new profile",
                 self.device_id, full_model_ms(new), what, load)
        self._announce(new)
        self.announced += 1
        return True
