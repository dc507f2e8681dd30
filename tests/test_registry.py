"""The registry on SQLite and PostgreSQL: migrations, policies (audit trail), devices, rounds."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from control_fixtures import db_url, pg_admin, pg_url  # noqa: F401 - fixtures
from ldfleet.server.registry import Base, Device, Registry, RegistryError
from ldfleet.server.registry.models import utcnow
from ldfleet.server.registry.store import make_engine, migrations_config, upgrade


def test_migrations_upgrade_an_empty_database_to_exactly_the_models(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
        upgrade(engine)
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"device_classes", "devices", "policies", "policy_acks", "rounds", "round_metrics", "alembic_version"} <= tables
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"migrations and models differ: {diff}"
        upgrade(engine)  # idempotent at head
        # and the way back
        with engine.begin() as conn:
            command.downgrade(migrations_config(conn), "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_sqlite_registry_uses_wal(tmp_path):
    with Registry(f"sqlite:///{tmp_path / 'sub' / 'registry.db'}") as reg:
        with reg.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_a_bare_postgresql_url_uses_the_installed_driver(pg_url):
    """`postgresql://` names no driver (SQLAlchemy 2.1 then assumes psycopg 3, which ldfleet does not
    ship): the registry takes the installed one; a URL whose driver is missing is a clear error."""
    bare = pg_url.replace("postgresql+psycopg2://", "postgresql://")
    assert bare.startswith("postgresql://")
    with Registry(bare) as reg:
        assert reg.backend == "postgresql" and reg.engine.url.drivername in ("postgresql+psycopg2", "postgresql+psycopg")
        reg.add_class("bare-url")
        assert "bare-url" in {c.name for c in reg.classes()}
    with pytest.raises(RegistryError, match="no_such_driver driver"):
        make_engine("postgresql+no_such_driver://u@127.0.0.1/db")


def test_policies_are_versioned_per_scope_with_an_audit_trail(db_url):
    with Registry(db_url) as reg:
        p1 = reg.set_policy("pi4", keep=0.5, issued_by="alice", create_class=True, comment="first")
        p2 = reg.set_policy("pi4", latency_ms=80.0, percentile=90.0, issued_by="bob")
        assert (p1.version, p2.version, p2.previous_id) == (1, 2, p1.id)
        with reg.session() as s:
            s.add(Device(device_id="pi-01", device_class="pi4"))
        o1 = reg.set_policy("pi4", keep=0.25, device_id="pi-01", issued_by="carol")
        assert (o1.version, o1.scope_key, o1.previous_id) == (1, "device:pi-01", None)
        p3 = reg.set_policy("pi4", rtf=0.05, percentile=99.0, issued_by="dave")
        active = reg.active_policies()
        assert active["class:pi4"].id == p3.id and active["device:pi-01"].id == o1.id
        assert (active["class:pi4"].rtf, active["class:pi4"].latency_ms, active["class:pi4"].keep) == (0.05, None, None)
        hist = reg.policy_history("pi4")
        assert [(h.scope, h.version, h.issued_by, h.budget_text()) for h in hist] == [
            ("class", 1, "alice", "keep 0.5"),
            ("class", 2, "bob", "latency 80 ms @p90"),
            ("device", 1, "carol", "keep 0.25"),
            ("class", 3, "dave", "RTF 0.05 @p99"),
        ]
        assert hist[0].comment == "first" and hist[0].issued_at.tzinfo is not None
        cleared = reg.clear_policy("pi4", device_id="pi-01", issued_by="carol")
        assert cleared.cleared and cleared.version == 2 and "device:pi-01" not in reg.active_policies()
        with pytest.raises(RegistryError, match="nothing to clear"):
            reg.clear_policy("pi4", device_id="pi-01")
        head, _ = reg.policy_head()
        assert head == cleared.id


@pytest.mark.parametrize(
    "kwargs,why",
    [
        (dict(keep=-0.5), "keep fraction"),
        (dict(keep=0.0), "keep fraction"),
        (dict(keep=1.5), "keep fraction"),
        (dict(keep=math.nan), "keep fraction"),
        (dict(latency_ms=-10.0), "latency target"),
        (dict(latency_ms=math.inf), "latency target"),
        (dict(latency_ms=math.nan), "latency target"),
        (dict(keep=0.5, latency_ms=10.0), "exactly one"),
        (dict(rtf=0.0), "real-time factor"),
        (dict(rtf=math.inf), "real-time factor"),
        (dict(rtf=0.1, latency_ms=10.0), "exactly one"),
        (dict(), "exactly one"),
        (dict(latency_ms=10.0, percentile=100.0), "percentile"),
        (dict(keep=0.5, percentile=90.0), "percentile"),
        (dict(keep=0.5, device_class="nope"), "unknown device class 'nope'"),
        (dict(keep=0.5, device_class="bad/class", create_class=True), "invalid device class"),
        (dict(keep=0.5, device_id="ghost"), "unknown device 'ghost'"),
        (dict(keep=0.5, device_id="other-class-dev"), "is in class 'x86'"),
        (dict(keep=0.5, expires_at=utcnow() - timedelta(seconds=1)), "in the past"),
    ],
)
def test_bad_policies_are_refused_and_leave_the_registry_unchanged(db_url, kwargs, why):
    with Registry(db_url) as reg:
        reg.set_policy("pi4", keep=0.75, issued_by="setup", create_class=True)
        reg.add_class("x86")
        with reg.session() as s:
            s.add(Device(device_id="other-class-dev", device_class="x86"))
        before = [(p.id, p.version) for p in reg.policy_history()]
        classes = [c.name for c in reg.classes()]
        kwargs = dict(kwargs)  # parametrized dicts are shared between the sqlite and postgresql runs
        device_class = kwargs.pop("device_class", "pi4")
        with pytest.raises(RegistryError, match=why):
            reg.set_policy(device_class, issued_by="mallory", **kwargs)
        assert [(p.id, p.version) for p in reg.policy_history()] == before
        assert [c.name for c in reg.classes()] == classes


def test_expired_policies_are_not_in_force(db_url):
    with Registry(db_url) as reg:
        reg.set_policy("pi4", keep=0.5, issued_by="a", create_class=True, expires_at=utcnow() + timedelta(seconds=30))
        assert "class:pi4" in reg.active_policies()
        assert "class:pi4" not in reg.active_policies(now=utcnow() + timedelta(seconds=31))
        _, nxt = reg.policy_head()
        assert nxt is not None and nxt > utcnow()


def test_devices_convergence_and_pinning(db_url):
    with Registry(db_url) as reg:
        reg.add_class("pi4")
        with reg.session() as s:
            s.add(Device(device_id="a", device_class="pi4", desired_version=3, applied_version=3))
            s.add(Device(device_id="b", device_class="pi4", desired_version=3, applied_version=2))
            s.add(Device(device_id="c", device_class=None))
        assert reg.convergence("pi4") == (1, 2)
        assert [d.device_id for d in reg.devices("pi4")] == ["a", "b"]
        assert reg.device("a").converged and not reg.device("b").converged and not reg.device("c").converged
        with pytest.raises(RegistryError, match="unknown device class"):
            reg.pin_class("c", "jetson")
        dev = reg.pin_class("c", "jetson", create_class=True)
        assert dev.class_pinned and reg.device("c").device_class == "jetson"


def test_rounds_and_per_device_metrics(db_url):
    with Registry(db_url) as reg:
        r1 = reg.start_round("run-1", 1, config={"budget": "keep 0.5"})
        reg.record_round_metric(r1.id, "pi-01", accuracy=0.8, loss=0.5, num_examples=100, layer_usage=[1.0, 0.5, 0.0],
                                mean_kept_layers=1.5, latency_ms=12.5, k=2, policy_version=3, device_class="pi4")
        reg.record_round_metric(r1.id, "pi-01", accuracy=0.85, loss=0.4, num_examples=100, layer_usage=[1.0, 1.0, 0.0])  # replaces
        reg.record_round_metric(r1.id, "pi-01", phase="evaluate", accuracy=0.7)
        reg.record_round_metric(r1.id, "pi-02", accuracy=0.6)
        reg.finish_round(r1.id, summary={"accuracy": 0.75})
        rows = reg.round_metrics("run-1", 1)
        assert sorted((m.device_id, m.phase, m.accuracy) for _, m in rows) == [
            ("pi-01", "evaluate", 0.7), ("pi-01", "train", 0.85), ("pi-02", "train", 0.6)]
        train = next(m for _, m in rows if m.device_id == "pi-01" and m.phase == "train")
        assert train.layer_usage == [1.0, 1.0, 0.0]
        assert rows[0][0].status == "finished" and rows[0][0].summary == {"accuracy": 0.75}
        with pytest.raises(RegistryError):
            reg.finish_round(9999)
