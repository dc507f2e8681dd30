"""Shared fixtures and helpers of the control-plane tests (import them into a test module).

Every test starts its own broker (a private Mosquitto on a free port), never the system one. For
PostgreSQL each test gets a fresh database ``ldfleet_test_<random>`` created through the ``test``
database and dropped afterwards; without a reachable server those tests skip, unless
``LDFLEET_REQUIRE_SERVICES=1`` (then they fail).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ldfleet.client.agent import DeviceAgent
from ldfleet.client.profile import synthetic_profile
from ldfleet.common.broker import EmbeddedBroker
from ldfleet.common.mqtt import parse_broker_url
from ldfleet.server.controller import Controller
from ldfleet.server.registry import Registry

REQUIRE_SERVICES = os.environ.get("LDFLEET_REQUIRE_SERVICES") == "1"
PG_ADMIN_DSN = os.environ.get("LDFLEET_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3")


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll until ``predicate()`` is truthy; False after ``timeout`` seconds (no timed assertions)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - e.g. a row not there yet
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_retained(url: str, topic: str, timeout: float = 5.0) -> bytes | None:
    """The retained message on ``topic`` as a fresh subscriber gets it (None if none within timeout)."""
    u = parse_broker_url(url)
    got: list[bytes] = []
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on_message(client, userdata, msg):
        got.append(bytes(msg.payload))
        done.set()

    c.on_message = on_message
    c.connect(u.host, u.port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    done.wait(timeout)
    c.disconnect()
    c.loop_stop()
    return got[0] if got else None


def _service_missing(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (LDFLEET_REQUIRE_SERVICES=1)")
    pytest.skip(f"{reason}; set LDFLEET_REQUIRE_SERVICES=1 to make this a failure")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """DSN of a PostgreSQL admin connection (the ``test`` database), or skip."""
    try:
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN_DSN)
        conn.close()
    except Exception as exc:  # noqa: BLE001
        _service_missing(f"PostgreSQL not reachable ({PG_ADMIN_DSN}): {str(exc).strip()}")
    yield PG_ADMIN_DSN


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import psycopg2

    name = f"ldfleet_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(pg_admin)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in pg_admin.split())
    user = params.get("user", "postgres")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    try:
        yield f"postgresql+psycopg2://{user}@{host}:{port}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry URL, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


class Fleet:
    """Starts controllers and agents for a test and stops them all at the end."""

    def __init__(self, broker: EmbeddedBroker, db_url: str, tmp_path: Path) -> None:
        self.broker = broker
        self.db_url = db_url
        self.tmp_path = tmp_path
        self.controllers: list[Controller] = []
        self.agents: dict[str, DeviceAgent] = {}
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.db_url)
        return self._registry

    def controller(self, **kw: Any) -> Controller:
        kw.setdefault("poll_interval_s", 0.5)
        kw.setdefault("reconnect_max_s", 2)
        ctl = Controller(self.broker.url, self.db_url, **kw).start()
        assert ctl.session.wait_connected(15), "controller did not connect"
        self.controllers.append(ctl)
        return ctl

    def agent(self, device_id: str, device_class: str, *, layer_ms: list[float] | float = 2.0, num_layers: int = 12,
              front_end_ms: float = 5.0, start: bool = True, **kw: Any) -> DeviceAgent:
        kw.setdefault("reconnect_max_s", 2)
        prof = synthetic_profile(device_id, device_class, num_layers=num_layers, layer_ms=layer_ms, front_end_ms=front_end_ms)
        ag = DeviceAgent(device_id, device_class, self.broker.url, prof, state_dir=self.tmp_path / "devices" / device_id, **kw)
        if start:
            ag.start()
        self.agents[device_id] = ag
        return ag

    def close(self) -> None:
        for ag in self.agents.values():
            try:
                ag.stop()
            except Exception:  # noqa: BLE001
                pass
        for ctl in self.controllers:
            try:
                ctl.stop()
            except Exception:  # noqa: BLE001
                pass
        if self._registry is not None:
            self._registry.close()


@pytest.fixture
def fleet(broker: EmbeddedBroker, db_url: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker, db_url, tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def sqlite_fleet(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker, f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    try:
        yield f
    finally:
        f.close()


def device_row(registry: Registry, device_id: str) -> Any:
    return registry.device(device_id)


def converged(registry: Registry, device_ids: list[str], version: int | None = None) -> bool:
    for did in device_ids:
        d = registry.device(did)
        if d is None or not d.converged:
            return False
        if version is not None and d.applied_version < version:
            return False
    return True
