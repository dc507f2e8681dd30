"""Reconciliation: bring back devices whose messages a burst lost, without becoming a burst itself.

A broker under a burst may drop a device's birth, profile, desired policy or ack (Mosquitto drops
past ``max_queued_messages`` per client), and nothing re-sends them by itself. Every
``interval_s`` the controller asks the registry for *lagging* devices:

* **no ack**: a desired version was published more than ``ack_bound_s`` ago and the device has not
  acknowledged it (neither applied nor rejected);
* **no profile**: the registry has seen the device (status or ack) for more than ``ack_bound_s`` but
  holds no profile.

Recovery is a rebirth request (``RebirthRequest``): the device re-publishes birth, profile and last
ack, so a lost ack arrives, and the controller answers the unchanged profile by sending the stored
desired policy again, so a lost desired message arrives too.

Only the end of a burst tells a lost message from a late one: while device messages keep arriving
(a birth, profile or ack arrived less than ``quiet_s`` ago or still waits in the intake queue;
telemetry does not count), a slow round is still being answered, and asking
its devices to re-announce would only add to the burst. So the bound is ``ack_bound_s`` once the
intake has been quiet for ``quiet_s``, and ``busy_bound_s`` while it is not.

Devices known to be offline (their last status said so) are left alone: their next birth brings
them back. Devices the registry has never heard of cannot be asked; they re-announce by themselves
with jittered backoff when no desired policy arrives (``common/reannounce.py``).

Several controllers (a shared group) split the lagging devices instead of each asking all of them:
each asks the devices of its own share (``server/group.py``). When a controller goes (its Last Will
says offline) the others take its share at their next run; while membership changes a device may be
asked twice or a run late, which is harmless: a rebirth request is idempotent.

Storm control: each device is retried with exponential backoff (``ack_bound_s``, then x2 up to
``backoff_max_s``, jittered), and a token bucket caps the requests at ``rate_per_s`` for the whole
fleet. A device's backoff is forgotten only once it has settled (acknowledged its desired version,
applied or rejected, or gone offline), not when it merely drops out of the lagging set because its
re-announcement had the desired policy sent again: a device that can never answer (an agent too old
to read the policy, which drops it) is asked ever more rarely instead of every few seconds.
Everything sent is idempotent: retained, versioned documents and re-announcements.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, not_, or_, select

from ldfleet.common import topics
from ldfleet.common.schemas import ControllerStatus, RebirthRequest, utcnow
from ldfleet.server.group import Group
from ldfleet.server.registry.models import Device
from ldfleet.server.registry.store import Registry

log = logging.getLogger("ldfleet.controller")


@dataclass
class ReconcileStats:
    runs: int = 0
    rebirth_requests: int = 0
    #: lagging devices left for a later run by the rate limit or their backoff
    deferred: int = 0


@dataclass
class _Retry:
    attempts: int = 0
    next_at: float = 0.0


@dataclass
class Reconciler:
    registry: Registry
    #: ``send(topic, payload)``: QoS 1, not retained (a rebirth request is a one-off question)
    send: Callable[[str, bytes], object]
    controller_id: str
    ack_bound_s: float = 10.0
    #: lag that counts as lost even while device messages keep arriving (a connect burst of 10 000
    #: devices took minutes here: asking earlier would feed the burst)
    busy_bound_s: float = 300.0
    quiet_s: float = 3.0
    interval_s: float = 2.0
    rate_per_s: float = 200.0
    backoff_max_s: float = 300.0
    stats: ReconcileStats = field(default_factory=ReconcileStats)
    _retry: dict[str, _Retry] = field(default_factory=dict)
    _last_run: float = 0.0
    _tokens: float = 0.0
    _rng: random.Random = field(default_factory=random.Random)
    #: the controllers sharing the fleet (``server/group.py``; made from ``controller_id`` when not
    #: given); the controller resolves its share of fleet-wide work by the same group
    group: Group | None = None
    #: this controller's boot id (tells a namesake controller's status from its own)
    boot_id: str | None = None

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = Group(self.controller_id, self.boot_id)

    @property
    def peers(self) -> dict[str, bool]:
        """controller id -> online, from the controllers' statuses."""
        return self.group.online

    def note_controller(self, status: ControllerStatus) -> None:
        """A controller's (retained) status: who shares the fleet's reconciliation."""
        self.group.note(status)

    def partition(self) -> Callable[[str], bool]:
        """-> ``mine(device_id)``: whether this controller asks that device (its share of the group)."""
        return self.group.share()

    def maybe_run(self, quiet_for_s: float = math.inf) -> int:
        """Run when ``interval_s`` has passed since the last run; ``quiet_for_s``: seconds since the
        last device message arrived (0 while the intake still holds one, ``Intake.quiet_for``). Returns the devices asked."""
        now = time.monotonic()
        if now - self._last_run < self.interval_s:
            return 0
        elapsed = now - self._last_run if self._last_run else self.interval_s
        self._last_run = now
        self._tokens = min(self._tokens + elapsed * self.rate_per_s, 2 * self.interval_s * self.rate_per_s)
        return self.run(now, self.ack_bound_s if quiet_for_s >= self.quiet_s else self.busy_bound_s)

    def run(self, now: float, bound_s: float) -> int:
        self.stats.runs += 1
        mine = self.partition()
        lagging = {did: v for did, v in self._lagging(bound_s).items() if mine(did)}
        for gone in self._settled(set(self._retry) - set(lagging)):  # answered or offline since: forget the backoff
            del self._retry[gone]
        due = [did for did in lagging if self._retry.get(did, _Retry()).next_at <= now]
        take = due[: int(self._tokens)]
        self.stats.deferred += len(lagging) - len(take)
        if not take:
            return 0
        self._tokens -= len(take)
        no_ack = [did for did in take if lagging[did] > 0]
        sent = utcnow()
        for did in take:
            req = RebirthRequest(
                device_id=did, reason="no-ack" if lagging[did] > 0 else "no-profile",
                desired_version=lagging[did], controller_id=self.controller_id[:64], sent_at=sent,
            )
            self.send(topics.rebirth(did), req.to_json())
            r = self._retry.setdefault(did, _Retry())
            r.attempts += 1
            wait = min(self.ack_bound_s * 2 ** r.attempts, self.backoff_max_s)
            r.next_at = now + wait * self._rng.uniform(0.75, 1.25)
        self.stats.rebirth_requests += len(take)
        log.info("reconciliation: asked %d lagging devices to re-announce (%d without an ack of their desired version)", len(take), len(no_ack))
        return len(take)

    def _settled(self, device_ids: set[str]) -> list[str]:
        """Those of ``device_ids`` that need no more asking: their desired version acknowledged
        (applied, or rejected after it was sent), known offline, or gone from the registry."""
        if not device_ids:
            return []
        waiting = and_(Device.desired_version > 0, Device.applied_version != Device.desired_version,
                       not_(self._answered()), not_(self._known_offline()))
        with self.registry.session() as s:
            still = set(s.scalars(select(Device.device_id).where(Device.device_id.in_(device_ids), waiting)))
        return sorted(device_ids - still)

    @staticmethod
    def _answered():
        """The device rejected its desired version (an answer: nothing to ask again). False, not
        NULL, for a device that never acked: NOT over a NULL would hide it from reconciliation."""
        return and_(Device.ack_status.is_not(None), Device.acked_at.is_not(None),
                    Device.ack_status == "rejected", Device.acked_at >= Device.desired_at)

    @staticmethod
    def _known_offline():
        return and_(Device.online.is_(False), Device.status_at.is_not(None))

    def _lagging(self, bound_s: float) -> dict[str, int]:
        """device id -> desired version waited for (0: no profile), oldest first."""
        before = utcnow() - timedelta(seconds=bound_s)
        no_ack = and_(
            Device.desired_version > 0, Device.applied_version != Device.desired_version,
            Device.desired_at < before, not_(self._answered()),
        )
        no_profile = and_(Device.profile.is_(None), Device.first_seen < before)
        q = (
            select(Device.device_id, Device.desired_version, Device.profile.is_(None))
            .where(or_(no_ack, no_profile), not_(self._known_offline()))
            .order_by(Device.desired_at, Device.device_id)
        )
        with self.registry.session() as s:
            return {did: (0 if missing else int(dver)) for did, dver, missing in s.execute(q)}
