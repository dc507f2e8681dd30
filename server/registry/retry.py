"""Registry writes that lose a race to a concurrent writer wait and try again, within a bounded time.

What counts as "lost a race" (anything else is raised at once):

* SQLite: "database is locked" / "busy" (the busy timeout of the connection ran out, or a WAL
  read snapshot went stale before the write);
* PostgreSQL, by SQLSTATE: ``40001`` serialization failure, ``40P01`` deadlock detected,
  ``55P03`` lock not available;
* optionally a unique-constraint violation (``IntegrityError``), for writes that pick the next
  number of a sequence (two writers chose the same version: the loser takes the next one).

Delays grow exponentially with equal jitter (half fixed, half random: writers that collided do not
collide again in step), capped at ``cap_s``; after ``deadline_s`` the last error is reported as a
``RegistryBusy`` with the number of attempts.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError

log = logging.getLogger("ldfleet.registry")

T = TypeVar("T")

#: PostgreSQL SQLSTATEs that mean "try the transaction again".
RETRY_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock detected", "55P03": "lock not available"}
_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")


class RegistryBusy(RuntimeError):
    """Concurrent writers kept a write from going through within the retry deadline."""


def transient_reason(exc: BaseException, *, integrity: bool = False) -> str | None:
    """Why ``exc`` is worth retrying, or None when it is not."""
    if isinstance(exc, IntegrityError):
        return "a concurrent writer took the same key" if integrity else None
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    if code in RETRY_SQLSTATES:
        return f"{RETRY_SQLSTATES[code]} (SQLSTATE {code})"
    text = str(orig).lower()
    if any(s in text for s in _SQLITE_BUSY):
        return "SQLite database busy"
    return None


def retry_write(
    fn: Callable[[], T],
    *,
    what: str,
    integrity: bool = False,
    deadline_s: float = 60.0,
    base_s: float = 0.01,
    cap_s: float = 0.5,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn`` (one whole transaction) until it succeeds, retrying transient failures.

    Raises ``RegistryBusy`` after ``deadline_s`` seconds of transient failures; any other error at once.
    """
    rng = rng or random.Random()
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except DBAPIError as exc:
            why = transient_reason(exc, integrity=integrity)
            if why is None:
                raise
            attempt += 1
            d = min(cap_s, base_s * 2 ** attempt)
            delay = d / 2 + rng.uniform(0, d / 2)
            if time.monotonic() - start + delay > deadline_s:
                raise RegistryBusy(f"could not {what} within {deadline_s:g} s: {why} ({attempt} attempts)") from None
            log.debug("%s: %s; retry %d in %.3f s", what, why, attempt, delay)
            time.sleep(delay)
