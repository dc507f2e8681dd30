"""When a device announces itself again although nobody asked: jittered exponential backoff.

A device whose birth or profile was lost (the broker dropped it under a burst, the controller was
down) never gets a desired policy, and the controller may not even know it exists. So after each
(re)connect a device waits for a desired policy; if none arrives within the first delay it
re-publishes its birth status and profile, then waits twice as long, and so on up to ``max_s``.
Every delay is multiplied by a random factor in [1 - jitter, 1 + jitter] so that a whole fleet that
connected at once does not re-announce at once ("full jitter" would also do; a bounded factor keeps
the first retry from coming too early). The real agent (``client/agent.py``) and the simulated
devices (``simulations/sim_devices.py``) use the same schedule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: Seconds before the first re-announcement: far above a healthy fleet's time to a first policy
#: (well under a second per thousand devices here), so a healthy fleet never re-announces.
FIRST_S = 30.0
#: Longest wait between two re-announcements.
MAX_S = 300.0


@dataclass
class ReannounceBackoff:
    """``next_delay()`` -> seconds until the next re-announcement; ``reset()`` on a new connection."""

    first_s: float = FIRST_S
    max_s: float = MAX_S
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    _base: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not (0.0 < self.first_s <= self.max_s) or not (0.0 <= self.jitter < 1.0):
            raise ValueError("need 0 < first_s <= max_s and 0 <= jitter < 1")
        self.reset()

    def reset(self) -> None:
        self._base = self.first_s

    def next_delay(self) -> float:
        delay = self._base * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        self._base = min(self._base * 2.0, self.max_s)
        return delay
