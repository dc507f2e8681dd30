"""Device liveness from births and deaths, ordered as Sparkplug B orders them (``bdSeq``).

A status message carries ``boot_id`` (random per agent start), ``boot_seq`` (the agent's start
counter, kept in its state folder: it only goes up) and ``seq`` (the connection of that boot; a
connection's birth and its Last Will carry the same number). ``fold`` decides what one message does
to what the registry holds:

* same boot: a higher ``seq`` wins; the death of the current connection (same ``seq``, or ``seq`` 0
  from agents that predate per-connection wills) turns the device offline; a repeat or an older
  connection changes nothing (so a redelivered message is harmless);
* another boot: a death never turns a device offline unless its boot is newer (a retained death
  of an earlier boot arriving while the device is live is ignored); a birth of a newer or
  unnumbered boot takes over, remembering the boot it replaced;
* duplicates: a birth of the boot that was just replaced (A, B, A), or of an earlier boot while
  the later one is fresh, means two agents share one device id: ``duplicate_at`` is set (shown by
  ``ldfleet devices list``), and the earlier boot does not override the later one. An earlier boot
  coming back long after the later one went quiet is a device whose state folder was reset: it is
  accepted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ldfleet.common.schemas import Status
from ldfleet.server.registry.models import Device

log = logging.getLogger("ldfleet.liveness")

#: Two boots alternating within this many seconds are one device id used twice.
DUPLICATE_WINDOW_S = 600.0
#: ``ldfleet devices list`` flags a device as duplicate this long after the last evidence.
DUPLICATE_SHOWN_S = 3600.0


@dataclass(frozen=True)
class Liveness:
    """The liveness columns of one ``devices`` row."""

    online: bool = False
    boot_id: str | None = None
    boot_seq: int | None = None
    status_seq: int | None = None
    status_at: datetime | None = None
    replaced_boot_id: str | None = None
    replaced_at: datetime | None = None
    duplicate_at: datetime | None = None
    duplicate_boot_id: str | None = None


COLUMNS = tuple(Liveness.__dataclass_fields__)


def _recent(at: datetime | None, now: datetime, seconds: float = DUPLICATE_WINDOW_S) -> bool:
    return at is not None and now - at < timedelta(seconds=seconds)


def fold(cur: Liveness, msg: Status, now: datetime) -> tuple[Liveness, str | None]:
    """What one status message does to ``cur`` (received at ``now``, the controller's clock).

    Returns the new liveness (``cur`` itself when nothing changes) and a note for the log when the
    message was refused or revealed a duplicate.
    """
    accepted = replace(cur, online=msg.online, boot_id=msg.boot_id, boot_seq=msg.boot_seq, status_seq=msg.seq,
                       status_at=now)
    if cur.boot_id is None:
        return accepted, None
    if msg.boot_id == cur.boot_id:
        if msg.seq > (cur.status_seq or 0):
            return accepted, None
        death_of_current = not msg.online and cur.online and msg.seq in (cur.status_seq, 0)
        if death_of_current:
            return replace(accepted, status_seq=cur.status_seq), None
        return cur, None  # a repeat, or a message about an older connection
    newer = msg.boot_seq > (cur.boot_seq or 0)
    earlier = bool(msg.boot_seq) and bool(cur.boot_seq) and msg.boot_seq < (cur.boot_seq or 0)
    if not msg.online:
        if newer:
            return accepted, None
        return cur, f"ignored a death of boot {msg.boot_id} (#{msg.boot_seq}): the device is on boot {cur.boot_id} (#{cur.boot_seq})"
    if earlier and (cur.online or _recent(cur.status_at, now)):
        dup = replace(cur, duplicate_at=now, duplicate_boot_id=msg.boot_id)
        return dup, (f"birth of earlier boot {msg.boot_id} (#{msg.boot_seq}) while boot {cur.boot_id} (#{cur.boot_seq}) "
                     "is recent: two agents share this device id (duplicate); liveness keeps the later boot")
    taken = replace(accepted, replaced_boot_id=cur.boot_id, replaced_at=now)
    if msg.boot_id == cur.replaced_boot_id and _recent(cur.replaced_at, now):
        return replace(taken, duplicate_at=now, duplicate_boot_id=cur.boot_id), (
            f"boots {msg.boot_id} and {cur.boot_id} take turns: two agents share this device id (duplicate)")
    return taken, None


def is_duplicate(duplicate_at: datetime | None, now: datetime) -> bool:
    """Whether ``devices list`` shows the device as a duplicated id (recent evidence)."""
    return _recent(duplicate_at, now, DUPLICATE_SHOWN_S)


def load(s: Session, device_ids: list[str]) -> dict[str, Liveness]:
    """The stored liveness of these devices (absent ids: not in the registry yet)."""
    cols = [Device.device_id] + [getattr(Device, c) for c in COLUMNS]
    out: dict[str, Liveness] = {}
    for i in range(0, len(device_ids), 500):
        for row in s.execute(select(*cols).where(Device.device_id.in_(device_ids[i:i + 500]))):
            out[row[0]] = Liveness(*row[1:])
    return out


def updates(s: Session, statuses: list[tuple[Status, datetime]]) -> list[dict[str, Any]]:
    """Fold a batch of status messages (in arrival order) into update rows for ``devices``
    (``device_id`` + every liveness column, ``last_seen``); devices whose liveness did not change
    get no row. Devices not in the registry yet start from an empty liveness."""
    if not statuses:
        return []
    state = load(s, sorted({m.device_id for m, _ in statuses}))
    changed: dict[str, datetime] = {}
    for msg, now in statuses:
        cur = state.get(msg.device_id, Liveness())
        new, note = fold(cur, msg, now)
        if note:
            log.warning("device %s: %s", msg.device_id, note)
        if new != cur:
            state[msg.device_id] = new
            changed[msg.device_id] = now
    return [{"device_id": did, **asdict(state[did]), "last_seen": at} for did, at in changed.items()]
