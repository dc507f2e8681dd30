"""Resolving devices' desired policies and publishing them, safely with several controllers.

A resolution run takes the devices a ``Work`` names, in chunks of ``resolve_chunk``. For each chunk:

1. read the devices (profile, class, desired/applied versions, last desired document) and resolve
   them against the policies in force (``server/policy.py``);
2. *claim* the next version of every device whose policy changed: one
   ``INSERT INTO desired_policies ... ON CONFLICT (device_id, version) DO NOTHING RETURNING device_id``.
   The unique constraint decides: when two controllers resolve the same device at once, both try to
   insert version v+1 and exactly one row goes in (PostgreSQL makes the second insert wait for the
   first transaction, then skip). Only the winner goes on;
3. compare-and-set the winners' ``devices`` rows (``WHERE desired_version < v``: a version never
   goes down), commit;
4. publish the winners' documents (retained, QoS 0, one topic per device) -- after the commit, so
   that a published version is always in the registry. The first devices hear of a change while the
   rest are still being resolved.

A controller that lost a claim publishes nothing for that device: the winner does. Publishing the
same stored document twice (a reconnect, reconciliation) is harmless: devices ignore versions they
already have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ldfleet.common import topics
from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, utcnow
from ldfleet.server.policy import resolve, signature_of
from ldfleet.server.registry.desired import DesiredPolicyRecord
from ldfleet.server.registry.models import Device, Policy
from ldfleet.server.registry.store import Registry

log = logging.getLogger("ldfleet.controller")

#: ``publish(topic, payload)``: retained, QoS 0 (the controller's MQTT session; the device's ack confirms it).
Publish = Callable[[str, bytes], Any]

_DEVICES = Device.__table__
_DESIRED = DesiredPolicyRecord.__table__
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


@dataclass
class Work:
    """What the resolver is asked to do after a batch of messages or a registry poll."""

    devices: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    all: bool = False
    #: Also re-publish unchanged desired documents (after a (re)connect: the broker may have lost them).
    republish: bool = False
    #: Devices (also in ``devices``) whose unchanged desired document goes out again: they re-announced.
    resend: set[str] = field(default_factory=set)
    #: ``mine(device_id)``: limits the devices picked by ``classes`` or ``all`` to this controller's
    #: share of a shared group (``server/group.py``); ``devices`` are always resolved. None: all.
    share: Callable[[str], bool] | None = None

    def any(self) -> bool:
        return bool(self.devices or self.classes or self.all or self.republish)


class ProfileCache:
    """device id -> (``devices.profile_at`` of the stored profile, parsed DeviceProfile), so that a
    resolution reads and parses a device's profile JSON only when it changed."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[datetime | None, DeviceProfile]] = {}

    def put(self, device_id: str, stamp: datetime | None, profile: DeviceProfile) -> None:
        self._cache[device_id] = (stamp, profile)

    def get(self, device_id: str, stamp: datetime | None) -> DeviceProfile | None:
        cached = self._cache.get(device_id)
        return cached[1] if cached is not None and cached[0] == stamp else None

    def latest(self, device_id: str) -> DeviceProfile | None:
        cached = self._cache.get(device_id)
        return cached[1] if cached is not None else None

    def load(self, device_id: str, stamp: datetime | None, stored: dict[str, Any]) -> DeviceProfile | None:
        try:
            prof = DeviceProfile.model_validate(stored, strict=False)
        except Exception as exc:  # noqa: BLE001 - a stored profile from an older schema
            log.warning("device %s: stored profile unusable (%s); waiting for a new one", device_id, exc)
            return None
        self._cache[device_id] = (stamp, prof)
        return prof


@dataclass
class PublisherStats:
    published: int = 0
    resolutions: int = 0
    #: versions another controller claimed first (this one published nothing for them)
    lost_claims: int = 0


class PolicyPublisher:
    """Resolves and publishes desired policies (see the module docstring for the claim protocol)."""

    def __init__(
        self,
        registry: Registry,
        publish: Publish,
        *,
        controller_id: str,
        default_keep: float = 1.0,
        resolve_chunk: int = 200,
    ) -> None:
        insert_ignoring(registry.backend)  # refuses other backends early
        self.registry = registry
        self.publish = publish
        self.controller_id = controller_id
        self.default_keep = default_keep
        self.resolve_chunk = resolve_chunk
        self.profiles = ProfileCache()
        self.stats = PublisherStats()
        self._insert = insert_ignoring(registry.backend)
        #: newest ``policies.id`` the last resolution took into account
        self.covered_policy_id = 0
        #: device id -> (desired_version, signature of that desired document)
        self._signatures: dict[str, tuple[int, Any]] = {}

    def resolve_and_publish(self, work: Work) -> int:
        """Resolve what ``work`` names; returns how many documents were published."""
        ids = self._select(work)
        self.covered_policy_id = 0
        if not ids:
            return 0
        with self.registry.session() as s:
            # the newest policy row before reading the policies in force: every row up to it is
            # reflected in this resolution (the controller's registry poll skips them)
            self.covered_policy_id = int(s.scalar(select(func.max(Policy.id))) or 0)
            active = self.registry.active_policies(s)
        now = utcnow()
        total = changed = 0
        for part in chunks(ids, self.resolve_chunk):
            claims, unchanged = self._resolve_chunk(part, active, now, work.republish, work.resend)
            with self.registry.session(write=True) as s:
                won = self._claim(s, claims, now)
            out = [(did, doc) for did, doc in claims.items() if did in won] + unchanged
            for did, doc in out:
                self.publish(topics.policy_desired(did), doc.to_json())
            changed += len(won)
            total += len(out)
        self.stats.published += total
        if changed:
            log.info("published %d new desired policies", changed)
        return total

    # -- phases ----------------------------------------------------------------------------
    def _select(self, work: Work) -> list[str]:
        q = select(Device.device_id).where(Device.profile.is_not(None), Device.device_class.is_not(None))
        if not work.all:
            conds = []
            if work.devices:
                conds.append(Device.device_id.in_(sorted(work.devices)))
            if work.classes:
                conds.append(Device.device_class.in_(sorted(work.classes)))
            if not conds:
                return []
            q = q.where(or_(*conds))
        with self.registry.session() as s:
            ids = list(s.scalars(q.order_by(Device.device_id)))
        if work.share is None:
            return ids
        named = work.devices
        return [did for did in ids if did in named or work.share(did)]

    def _resolve_chunk(
        self, part: list[str], active: dict[str, Any], now: datetime, republish: bool, resend: set[str]
    ) -> tuple[dict[str, BudgetPolicy], list[tuple[str, BudgetPolicy]]]:
        """-> (new documents to claim by device, unchanged documents to re-publish).

        The JSON columns (profile, desired document) are read only for devices whose cached copy is
        stale: on a steady fleet a resolution reads a few small columns per device."""
        d = _DEVICES.c  # Core columns: no ORM result processing on the hot path
        cols = (d.device_id, d.device_class, d.profile_at, d.desired_version, d.applied_version)
        with self.registry.session() as s:
            rows = s.execute(select(*cols).where(d.device_id.in_(part))).all()
            stale = [
                did for did, _, stamp, dver, _ in rows
                if self.profiles.get(did, stamp) is None or republish or did in resend or self._signatures.get(did, (None,))[0] != dver
            ]
            docs = {}
            if stale:
                docs = {did: (prof, desired) for did, prof, desired in
                        s.execute(select(d.device_id, d.profile, d.desired).where(d.device_id.in_(stale)))}
        claims: dict[str, BudgetPolicy] = {}
        unchanged: list[tuple[str, BudgetPolicy]] = []
        for did, dclass, stamp, dver, aver in rows:
            stored, desired = docs.get(did, (None, None))
            prof = self.profiles.get(did, stamp) or (self.profiles.load(did, stamp, stored) if stored else None)
            if prof is None:
                continue
            if did in docs:
                self._signatures[did] = (dver, signature_of(desired))
            self.stats.resolutions += 1
            res = resolve(did, dclass, prof, active, default_keep=self.default_keep, now=now)
            if res.signature() != self._signatures[did][1] or aver > dver:
                claims[did] = res.to_policy(did, max(dver, aver) + 1, sent_at=now)  # ttl_s: expiry not read off the device's clock
                if res.note:
                    log.warning("device %s: %s (published without k; the device decides)", did, res.note)
                if res.unmet:
                    log.warning("device %s: %s", did, res.unmet)
            elif (republish or did in resend) and desired:
                unchanged.append((did, BudgetPolicy.model_validate(desired, strict=False).stamped(now)))
        return claims, unchanged

    def _claim(self, s: Session, claims: dict[str, BudgetPolicy], now: datetime) -> set[str]:
        """Insert the claimed versions (the unique constraint picks one controller per version),
        then compare-and-set the winners' device rows. Returns the devices this controller won."""
        if not claims:
            return set()
        docs = {did: doc.model_dump(mode="json", by_alias=True) for did, doc in claims.items()}
        rows = [
            {"device_id": did, "version": doc.version, "document": docs[did], "published_by": self.controller_id[:64], "published_at": now}
            for did, doc in sorted(claims.items())  # one insert order for every controller: no deadlock
        ]
        # executemany with RETURNING (SQLAlchemy's "insertmanyvalues": batched multi-row INSERTs from
        # one cached statement); ON CONFLICT DO NOTHING returns only the rows that went in.
        stmt = self._insert(_DESIRED).on_conflict_do_nothing(index_elements=["device_id", "version"]).returning(_DESIRED.c.device_id)
        won = set(s.scalars(stmt, rows))
        lost = len(claims) - len(won)
        if lost:
            self.stats.lost_claims += lost
            log.info("%d desired versions were claimed by another controller first", lost)
        if won:
            cas = (
                update(_DEVICES)
                .where(_DEVICES.c.device_id == bindparam("_id"), _DEVICES.c.desired_version < bindparam("_v"))
                .values(desired_version=bindparam("_v"), desired=bindparam("_doc"), desired_at=bindparam("_at"))
            )
            s.execute(cas, [{"_id": did, "_v": claims[did].version, "_doc": docs[did], "_at": now} for did in sorted(won)])
        for did in won:
            self._signatures[did] = (claims[did].version, signature_of(docs[did]))
        return won


def insert_ignoring(backend: str) -> Any:
    """The dialect's ``insert`` (it has ``on_conflict_do_nothing``); ValueError for other backends."""
    if backend not in _INSERTS:
        raise ValueError(f"the controller needs a SQLite or PostgreSQL registry, got {backend}")
    return _INSERTS[backend]


def chunks(items: list[str], size: int) -> Iterable[list[str]]:
    """Consecutive slices of at most ``size`` items (keeps IN lists and statements bounded)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
