"""Opening the registry (SQLite with WAL by default, PostgreSQL by URL) and its operator-side API.

``Registry(url)`` creates the engine and runs the Alembic migrations up to head, so an empty
database (or a missing SQLite file) is ready to use. The controller owns the ``devices`` rows; the
operator CLI writes ``policies`` (append-only) and reads everything.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

# Alembic logs every plugin it loads and every migration context at INFO: too chatty for a CLI that
# opens the registry on each command. Leave a level someone set explicitly alone.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ldfleet.common.budget import check_budget
from ldfleet.common.runtime import default_registry_url
from ldfleet.common.topics import DEVICE_CLASS_PATTERN, DEVICE_ID_PATTERN
from ldfleet.server.registry.models import (
    Device,
    DeviceClass,
    Policy,
    PolicyAckRecord,
    Round,
    RoundMetric,
    utcnow,
)
from ldfleet.server.registry.retry import RegistryBusy, retry_write


log = logging.getLogger("ldfleet.registry")


class RegistryError(ValueError):
    """An operator request the registry refuses (unknown class, bad budget, ...)."""


def class_scope(device_class: str) -> str:
    return f"class:{device_class}"


def device_scope(device_id: str) -> str:
    return f"device:{device_id}"


def migrations_config(connection: Any | None = None) -> Config:
    """Alembic config pointing at the packaged migrations (works from a wheel or the source tree)."""
    pkg = resources.files("ldfleet.server.migrations")
    cfg = Config(str(pkg / "alembic.ini"))
    cfg.set_main_option("script_location", str(pkg))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


#: PostgreSQL advisory lock key held while migrating (processes opening one empty database take turns).
_MIGRATION_LOCK = 0x1DF1EE7


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (no-op when already there). One process migrates at a
    time (SQLite: an IMMEDIATE transaction; PostgreSQL: an advisory lock); the others then find
    the schema current."""
    cfg = migrations_config()
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if revision == "head" and current == head:
        return
    with engine.connect() as plain, plain.execution_options(**{_BEGIN: "IMMEDIATE"}).begin() as tx:
        conn = tx.connection
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        current = MigrationContext.configure(conn).get_current_revision()
        if revision == "head" and current == head:
            return
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    log.info("registry %s: schema upgraded from %s to %s", engine.url.render_as_string(hide_password=True), current or "empty", revision if revision != "head" else head)


#: Execution option naming the SQLite BEGIN mode of a transaction ("IMMEDIATE": take the write lock
#: at once, waiting up to the busy timeout, so that a read-then-write transaction never fails on a
#: stale snapshot).
_BEGIN = "ldfleet_sqlite_begin"


def _sqlite_begin(conn: Any) -> None:
    """SQLAlchemy's recipe for SQLite transactions: the driver's own BEGIN handling is off
    (``isolation_level = None``) and every transaction starts here."""
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(_BEGIN, '')}".strip())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


#: PostgreSQL drivers SQLAlchemy can use (each is also its module's name), in order of preference.
_PG_DRIVERS = ("psycopg", "psycopg2")


def _with_installed_driver(u: Any) -> Any:
    """A bare ``postgresql://`` URL names no driver and SQLAlchemy 2.1 then assumes psycopg 3;
    ldfleet ships psycopg2, so a bare URL takes whichever driver is installed. RegistryError when a
    URL's driver is missing."""
    import importlib.util

    if u.get_backend_name() != "postgresql":
        return u
    if u.drivername == "postgresql":
        for driver in _PG_DRIVERS:
            if importlib.util.find_spec(driver) is not None:
                return u.set(drivername=f"postgresql+{driver}")
        raise RegistryError("a PostgreSQL registry needs a driver: pip install psycopg2-binary (or psycopg)")
    driver = u.get_driver_name()  # the module of the same name (psycopg2, psycopg, pg8000, asyncpg)
    if importlib.util.find_spec(driver) is None:
        raise RegistryError(f"the registry URL asks for the {driver} driver, which is not installed "
                            f"(pip install {driver}, or use postgresql+psycopg2://)")
    return u


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Engine for a registry URL; SQLite gets WAL, a busy timeout and foreign keys on every connection.
    A bare ``postgresql://`` URL uses the installed PostgreSQL driver. Raises RegistryError when the
    URL's driver is not installed."""
    u = _with_installed_driver(make_url(url))
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(u, echo=echo, pool_pre_ping=True)


def _check_name(value: str, pattern: str, what: str) -> None:
    if not re.match(pattern, value):
        raise RegistryError(f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")


def validate_budget(
    keep: float | None, latency_ms: float | None, percentile: float | None, rtf: float | None = None
) -> None:
    """The operator-side checks of a budget (``ldfleet.common.budget.check_budget``, which
    BudgetPolicy enforces on the wire); RegistryError with the reason."""
    try:
        check_budget(keep, latency_ms, rtf, percentile)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


class Registry:
    """The fleet registry. ``with Registry(url) as reg: ...`` or ``reg.close()`` when done."""

    def __init__(self, url: str | None = None, *, migrate: bool = True, echo: bool = False) -> None:
        self.url = url or default_registry_url()
        self.engine = make_engine(self.url, echo=echo)
        if migrate:
            try:
                upgrade(self.engine)
            except Exception:  # noqa: BLE001 - another process (controller, CLI) migrating the same empty database
                time.sleep(1.0)
                upgrade(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def redacted_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction; ``write=True`` for read-then-write transactions (on SQLite it takes the
        write lock up front, waiting for other writers up to the busy timeout)."""
        s = self.Session()
        if write:
            s.connection(execution_options={_BEGIN: "IMMEDIATE"})
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- device classes --------------------------------------------------------------------
    def classes(self) -> list[DeviceClass]:
        with self.session() as s:
            return list(s.scalars(select(DeviceClass).order_by(DeviceClass.name)))

    def add_class(self, name: str, description: str | None = None) -> bool:
        """Create a class; False if it already existed."""
        _check_name(name, DEVICE_CLASS_PATTERN, "device class")
        with self.session(write=True) as s:  # read-then-write: take the write lock first
            if s.get(DeviceClass, name) is not None:
                return False
            s.add(DeviceClass(name=name, description=description))
        return True

    # -- policies (operator) -----------------------------------------------------------------
    def set_policy(
        self,
        device_class: str,
        *,
        keep: float | None = None,
        latency_ms: float | None = None,
        percentile: float | None = None,
        rtf: float | None = None,
        device_id: str | None = None,
        issued_by: str = "operator",
        expires_at: datetime | None = None,
        create_class: bool = False,
        comment: str | None = None,
        cleared: bool = False,
    ) -> Policy:
        """Append a policy for a class (or one device's override). Returns the new row.

        Refuses (RegistryError, nothing written) unknown classes unless ``create_class``, unknown
        devices, a device of another class, a bad budget, an expiry in the past.
        """
        _check_name(device_class, DEVICE_CLASS_PATTERN, "device class")
        if device_id is not None:
            _check_name(device_id, DEVICE_ID_PATTERN, "device id")
        if not cleared:
            validate_budget(keep, latency_ms, percentile, rtf)
        if not issued_by or len(issued_by) > 128:
            raise RegistryError("issued_by must be 1-128 characters")
        if expires_at is not None and expires_at <= utcnow():
            raise RegistryError(f"expiry {expires_at.isoformat()} is in the past")
        scope = device_scope(device_id) if device_id else class_scope(device_class)

        def write() -> Policy:
            with self.session(write=True) as s:
                if s.get(DeviceClass, device_class) is None:
                    if not create_class:
                        known = ", ".join(s.scalars(select(DeviceClass.name).order_by(DeviceClass.name))) or "none yet"
                        raise RegistryError(
                            f"unknown device class {device_class!r} (known: {known}); "
                            "pass --create-class to define it before any device of it connects"
                        )
                    s.add(DeviceClass(name=device_class))
                    s.flush()
                if device_id is not None:
                    dev = s.get(Device, device_id)
                    if dev is None:
                        raise RegistryError(f"unknown device {device_id!r}: it has not announced itself yet")
                    if dev.device_class != device_class:
                        raise RegistryError(
                            f"device {device_id!r} is in class {dev.device_class!r}, not {device_class!r}"
                        )
                prev = s.scalars(
                    select(Policy).where(Policy.scope_key == scope).order_by(Policy.version.desc()).limit(1)
                ).first()
                if cleared and (prev is None or prev.cleared):
                    raise RegistryError(f"nothing to clear: {scope} has no policy in force")
                row = Policy(
                    scope_key=scope,
                    device_class=device_class,
                    device_id=device_id,
                    version=(prev.version + 1) if prev else 1,
                    keep=None if cleared else keep,
                    latency_ms=None if cleared else latency_ms,
                    rtf=None if cleared else rtf,
                    percentile=None if cleared else percentile,
                    cleared=cleared,
                    issued_by=issued_by,
                    issued_at=utcnow(),
                    expires_at=expires_at,
                    previous_id=prev.id if prev else None,
                    comment=comment,
                )
                s.add(row)
            return row

        try:  # a concurrent writer may take the next version first: then take the one after it
            return retry_write(write, what=f"write a policy for {scope}", integrity=True)
        except RegistryBusy as exc:
            raise RegistryError(str(exc)) from None

    def clear_policy(self, device_class: str, *, device_id: str | None = None, issued_by: str = "operator") -> Policy:
        """Remove a class policy (devices fall back to the default) or a device override."""
        return self.set_policy(device_class, device_id=device_id, issued_by=issued_by, cleared=True)

    def active_policies(self, session: Session | None = None, now: datetime | None = None) -> dict[str, Policy]:
        """The policy in force per scope key (newest row of the scope, unless it clears or expired)."""
        now = now or utcnow()
        if session is None:
            with self.session() as s:
                return self.active_policies(s, now)
        newest = (
            select(Policy.scope_key, func.max(Policy.version).label("v")).group_by(Policy.scope_key).subquery()
        )
        rows = session.scalars(
            select(Policy).join(newest, (Policy.scope_key == newest.c.scope_key) & (Policy.version == newest.c.v))
        )
        return {
            p.scope_key: p
            for p in rows
            if not p.cleared and (p.expires_at is None or p.expires_at > now)
        }

    def policy_history(self, device_class: str | None = None) -> list[Policy]:
        """Every policy row (of one class: its class policy and its devices' overrides), oldest first."""
        with self.session() as s:
            q = select(Policy).order_by(Policy.id)
            if device_class is not None:
                q = q.where(Policy.device_class == device_class)
            return list(s.scalars(q))

    def policies_since(self, after_id: int) -> list[Policy]:
        """Policy rows newer than ``after_id`` (what the controller's poll re-resolves)."""
        with self.session() as s:
            return list(s.scalars(select(Policy).where(Policy.id > after_id).order_by(Policy.id)))

    def policy_head(self, session: Session | None = None) -> tuple[int, datetime | None]:
        """(newest policy id, earliest future expiry) -- what the controller polls."""
        if session is None:
            with self.session() as s:
                return self.policy_head(s)
        head = session.scalar(select(func.max(Policy.id))) or 0
        nxt = session.scalar(select(func.min(Policy.expires_at)).where(Policy.expires_at > utcnow()))
        return int(head), nxt

    # -- devices ----------------------------------------------------------------------------
    def devices(self, device_class: str | None = None) -> list[Device]:
        with self.session() as s:
            q = select(Device).order_by(Device.device_id)
            if device_class is not None:
                q = q.where(Device.device_class == device_class)
            return list(s.scalars(q))

    def device(self, device_id: str) -> Device | None:
        with self.session() as s:
            return s.get(Device, device_id)

    def convergence(self, device_class: str | None = None) -> tuple[int, int]:
        """(converged, total) over devices that have a desired policy (two COUNTs, no rows loaded)."""
        with self.session() as s:
            base = select(func.count()).select_from(Device).where(Device.desired_version > 0)
            if device_class is not None:
                base = base.where(Device.device_class == device_class)
            total = s.scalar(base) or 0
            done = s.scalar(base.where(Device.applied_version == Device.desired_version)) or 0
            return int(done), int(total)

    def pin_class(self, device_id: str, device_class: str, *, create_class: bool = False) -> Device:
        """Put a device into a class for good (its profiles no longer change the class)."""
        _check_name(device_class, DEVICE_CLASS_PATTERN, "device class")
        with self.session(write=True) as s:  # read-then-write: take the write lock first
            dev = s.get(Device, device_id)
            if dev is None:
                raise RegistryError(f"unknown device {device_id!r}")
            if s.get(DeviceClass, device_class) is None:
                if not create_class:
                    raise RegistryError(f"unknown device class {device_class!r}; pass --create-class to define it")
                s.add(DeviceClass(name=device_class))
                s.flush()
            dev.device_class = device_class
            dev.class_pinned = True
            return dev

    def acks(self, device_id: str | None = None, limit: int = 100) -> list[PolicyAckRecord]:
        with self.session() as s:
            q = select(PolicyAckRecord).order_by(PolicyAckRecord.id.desc()).limit(limit)
            if device_id is not None:
                q = q.where(PolicyAckRecord.device_id == device_id)
            return list(s.scalars(q))

    # -- federated rounds -------------------------------------------------------------------
    def start_round(self, run_id: str, number: int, config: dict[str, Any] | None = None) -> Round:
        with self.session() as s:
            r = Round(run_id=run_id, number=number, config=config, status="running", started_at=utcnow())
            s.add(r)
            s.flush()
            return r

    def finish_round(self, round_id: int, *, status: str = "finished", summary: dict[str, Any] | None = None) -> None:
        with self.session(write=True) as s:  # read-then-write: take the write lock first
            r = s.get(Round, round_id)
            if r is None:
                raise RegistryError(f"unknown round id {round_id}")
            r.status = status
            r.finished_at = utcnow()
            if summary is not None:
                r.summary = summary

    def record_round_metric(
        self,
        round_id: int,
        device_id: str,
        *,
        phase: str = "train",
        device_class: str | None = None,
        policy_version: int | None = None,
        k: int | None = None,
        accuracy: float | None = None,
        loss: float | None = None,
        num_examples: int | None = None,
        layer_usage: list[float] | None = None,
        mean_kept_layers: float | None = None,
        latency_ms: float | None = None,
        reason: str | None = None,
        wer: float | None = None,
        cer: float | None = None,
    ) -> RoundMetric:
        """Insert or replace one device's metrics of one round and phase (``reason``: why a failure
        row failed; ``accuracy`` for kws, ``wer``/``cer`` for asr)."""
        values = dict(
            device_class=device_class, policy_version=policy_version, k=k, accuracy=accuracy, wer=wer, cer=cer, loss=loss,
            num_examples=num_examples, layer_usage=list(layer_usage) if layer_usage is not None else None,
            mean_kept_layers=mean_kept_layers, latency_ms=latency_ms, reason=reason[:2000] if reason else None,
            recorded_at=utcnow(),
        )
        with self.session(write=True) as s:  # read-then-write: take the write lock first
            row = s.scalars(
                select(RoundMetric).where(
                    RoundMetric.round_id == round_id, RoundMetric.device_id == device_id, RoundMetric.phase == phase
                )
            ).first()
            if row is None:
                row = RoundMetric(round_id=round_id, device_id=device_id, phase=phase, **values)
                s.add(row)
            else:
                for key, value in values.items():
                    setattr(row, key, value)
            s.flush()
            return row

    def round_metrics(self, run_id: str | None = None, number: int | None = None) -> list[tuple[Round, RoundMetric]]:
        with self.session() as s:
            q = select(Round, RoundMetric).join(RoundMetric, RoundMetric.round_id == Round.id).order_by(Round.number, RoundMetric.device_id)
            if run_id is not None:
                q = q.where(Round.run_id == run_id)
            if number is not None:
                q = q.where(Round.number == number)
            return [(r, m) for r, m in s.execute(q).all()]
