"""Per-device ACL and TLS on a Mosquitto started with the shipped configs/mosquitto/ files.

Checked over MQTT 5 (a denied publish gets a PUBACK "Not authorized", a denied subscription a SUBACK
"Not authorized") and by the message never arriving: after the denied messages, a legitimate marker
goes out on the same connection, and once the marker has arrived the denied ones cannot still come.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from control_fixtures import Fleet, converged, wait_until
from ldfleet.common import topics
from ldfleet.common.broker import EmbeddedBroker, write_password_file
from ldfleet.common.process import free_port
from ldfleet.common.mqtt import parse_broker_url
from ldfleet.common.schemas import BudgetPolicy, PolicyAck, utcnow
from ldfleet.server.operator import set_budget

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "configs" / "mosquitto"
NOT_AUTHORIZED = 135
OK = "ok"  # any reason code below 0x80 (0 success, 16 no matching subscribers)
USERS = {"dev-a": "pw-a", "dev-b": "pw-b", "ldfleet-controller": "pw-ctl", "ldfleet-operator": "pw-op"}


class V5Client:
    """A bare MQTT 5 client that records reason codes and received messages."""

    def __init__(self, port: int, username: str | None, password: str | None, *, host: str = "127.0.0.1", tls_ca: Path | None = None):
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{username}-{time.monotonic_ns()}", protocol=paho.MQTTv5)
        if username is not None:
            self.c.username_pw_set(username, password)
        if tls_ca is not None:
            self.c.tls_set(ca_certs=str(tls_ca))
        self.connack: object | None = None
        self.connected = threading.Event()
        self.puback: dict[int, int] = {}
        self.suback: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.c.on_connect = self._on_connect
        self.c.on_publish = lambda c, u, mid, rc, props: self.puback.__setitem__(mid, rc.value)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.suback.__setitem__(mid, [r.value for r in rcs])
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.c.connect(host, port)
        self.c.loop_start()
        self.connected.wait(10)

    def _on_connect(self, c, u, flags, rc, props):
        self.connack = rc
        self.connected.set()

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure  # type: ignore[attr-defined]

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> int:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        assert wait_until(lambda: info.mid in self.puback, 10), f"no PUBACK for {topic}"
        rc = self.puback[info.mid]
        return OK if rc < 0x80 else rc

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=1))
        assert wait_until(lambda: mid in self.suback, 10), f"no SUBACK for {topic}"
        return self.suback[mid]

    def got(self, topic: str) -> list[bytes]:
        return [p for t, p in list(self.messages) if t == topic]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def acl_broker(tmp_path):
    """Mosquitto with no anonymous access, our password file and the shipped ACL file."""
    pwfile = write_password_file(tmp_path / "passwords", USERS)
    acl = tmp_path / "acl"
    shutil.copy(CONF_DIR / "acl", acl)
    lines = ["allow_anonymous false", f"password_file {pwfile}", f"acl_file {acl}"]
    with EmbeddedBroker(data_dir=tmp_path / "broker", config_lines=lines) as b:
        yield b


def test_devices_only_reach_their_own_topics(acl_broker):
    port = acl_broker.port
    anon = V5Client(port, None, None)
    wrong = V5Client(port, "dev-a", "not-the-password")
    assert not anon.accepted and not wrong.accepted
    anon.close(), wrong.close()

    ctl = V5Client(port, "ldfleet-controller", USERS["ldfleet-controller"])
    a = V5Client(port, "dev-a", USERS["dev-a"])
    b = V5Client(port, "dev-b", USERS["dev-b"])
    try:
        assert ctl.accepted and a.accepted and b.accepted
        for ch in (topics.Channel.PROFILE, topics.Channel.POLICY_REPORTED, topics.Channel.STATUS):
            assert ctl.subscribe(topics.all_devices(ch)) == [1]

        # dev-a may write its own topics ...
        assert a.publish(topics.profile("dev-a"), b"a-profile") == OK
        # ... but not dev-b's profile, ack or status, nor its own desired policy, nor controller topics
        assert a.publish(topics.profile("dev-b"), b"forged-profile") == NOT_AUTHORIZED
        assert a.publish(topics.policy_reported("dev-b"), b"forged-ack") == NOT_AUTHORIZED
        assert a.publish(topics.status("dev-b"), b"forged-status") == NOT_AUTHORIZED
        assert a.publish(topics.policy_desired("dev-a"), b"self-granted") == NOT_AUTHORIZED
        assert a.publish(topics.CTL_POLICY_CHANGED, b"notice") == NOT_AUTHORIZED
        assert a.publish(topics.policy_reported("dev-a"), b"marker") == OK
        assert wait_until(lambda: ctl.got(topics.policy_reported("dev-a")) == [b"marker"], 10)
        assert ctl.got(topics.profile("dev-a")) == [b"a-profile"]
        assert ctl.got(topics.profile("dev-b")) == [] and ctl.got(topics.policy_reported("dev-b")) == []
        assert ctl.got(topics.status("dev-b")) == []

        # the controller publishes each device's desired policy (retained)
        for dev in ("dev-a", "dev-b"):
            pol = BudgetPolicy(device_id=dev, version=1, source="default", keep=1.0, issued_at=utcnow(), issued_by="controller")
            assert ctl.publish(topics.policy_desired(dev), pol.to_json(), retain=True) == OK

        # dev-a cannot read dev-b's policy. Mosquitto 2.0 grants the subscription and filters every
        # delivery against the read ACL (later versions refuse it with 0x87): both are fine, what
        # matters is that nothing arrives. Retained messages of one SUBSCRIBE are sent before the
        # next SUBSCRIBE is handled, so once dev-a's own policy arrived, dev-b's could not follow.
        assert a.subscribe(topics.policy_desired("dev-b")) in ([NOT_AUTHORIZED], [1])
        assert a.subscribe(topics.all_devices(topics.Channel.POLICY_DESIRED)) in ([NOT_AUTHORIZED], [1])
        assert a.subscribe(topics.policy_desired("dev-a")) == [1]
        assert wait_until(lambda: len(a.got(topics.policy_desired("dev-a"))) >= 1, 10)
        # live messages too: the controller updates dev-b, then dev-a; dev-a sees only its own
        assert ctl.publish(topics.policy_desired("dev-b"), b"live-b", retain=True) == OK
        assert ctl.publish(topics.policy_desired("dev-a"), b"live-a", retain=True) == OK
        assert wait_until(lambda: b"live-a" in a.got(topics.policy_desired("dev-a")), 10)
        assert a.got(topics.policy_desired("dev-b")) == []
        # nor another device's acks
        assert a.subscribe(topics.all_devices(topics.Channel.POLICY_REPORTED)) in ([NOT_AUTHORIZED], [1])
        assert b.publish(topics.policy_reported("dev-b"), PolicyAck(device_id="dev-b", applied_version=1, status="applied").to_json()) == OK
        assert ctl.publish(topics.policy_desired("dev-a"), b"marker-a") == OK
        assert wait_until(lambda: b"marker-a" in a.got(topics.policy_desired("dev-a")), 10)
        assert a.got(topics.policy_reported("dev-b")) == []

        # operators may only send the notice
        op = V5Client(port, "ldfleet-operator", USERS["ldfleet-operator"])
        try:
            assert op.publish(topics.CTL_POLICY_CHANGED, b"{}") == OK
            assert op.publish(topics.policy_desired("dev-a"), b"x") == NOT_AUTHORIZED
        finally:
            op.close()
    finally:
        for c in (ctl, a, b):
            c.close()


def _make_certs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ldfleet-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_shipped_production_config_runs_the_control_plane_over_tls(tmp_path):
    """configs/mosquitto/mosquitto.conf + acl, paths and ports substituted: agents, controller and
    operator authenticate, the desired policy flows over mqtts://, the fleet converges."""
    etc = tmp_path / "etc"
    _make_certs(etc / "certs")
    write_password_file(etc / "passwords", USERS)
    shutil.copy(CONF_DIR / "acl", etc / "acl")
    tls_port, plain_port = free_port(), free_port()
    data = tmp_path / "broker"
    data.mkdir()
    conf = (CONF_DIR / "mosquitto.conf").read_text()
    for old, new in [
        ("/etc/mosquitto/ldfleet", str(etc)),
        ("listener 8883\n", f"listener {tls_port} 127.0.0.1\n"),
        ("listener 1883 127.0.0.1\n", f"listener {plain_port} 127.0.0.1\n"),
        ("persistence_location /var/lib/mosquitto/", f"persistence_location {data}/"),
        ("log_dest syslog", f"log_dest file {data / 'mosquitto.log'}\nlog_type information"),
    ]:
        assert old in conf, f"shipped config changed: {old!r} not found"
        conf = conf.replace(old, new)
    if os.geteuid() == 0:
        conf += "user root\n"
    with EmbeddedBroker(tls_port, data_dir=data, full_config=conf) as broker:
        ca = str(etc / "certs" / "ca.crt")

        def url(user: str) -> str:
            return f"mqtts://{user}:{USERS[user]}@localhost:{tls_port}"

        # plain TCP without credentials is refused on both listeners
        assert not V5Client(plain_port, None, None).accepted
        # TLS works with the CA; the certificate is checked
        good = V5Client(tls_port, "dev-a", USERS["dev-a"], host="localhost", tls_ca=etc / "certs" / "ca.crt")
        assert good.accepted
        good.close()

        f = Fleet(broker, f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
        try:
            from ldfleet.client.agent import DeviceAgent
            from ldfleet.client.profile import synthetic_profile
            from ldfleet.server.controller import Controller

            ctl = Controller(url("ldfleet-controller"), f.db_url, ca_file=ca, poll_interval_s=0.5).start()
            f.controllers.append(ctl)
            for dev in ("dev-a", "dev-b"):
                ag = DeviceAgent(dev, "pi4", url(dev), synthetic_profile(dev, "pi4"), state_dir=tmp_path / dev, ca_file=ca)
                f.agents[dev] = ag.start()
            assert wait_until(lambda: converged(f.registry, ["dev-a", "dev-b"], 1), 30), "initial policy did not converge over TLS"
            res = set_budget(f.registry, parse_broker_url(url("ldfleet-operator"), ca_file=ca), "pi4", keep=0.5, issued_by="op")
            assert res.notified, res.notify_error
            assert wait_until(lambda: converged(f.registry, ["dev-a", "dev-b"], 2), 30)
            assert all(f.agents[d].state.effective_k == 6 for d in ("dev-a", "dev-b"))
            # nothing the real components sent was refused or dropped on the way
            assert ctl.stats.dropped == 0
        finally:
            f.close()


def test_a_refused_publish_is_reported_by_the_session(acl_broker):
    """An ACL mistake must not fail silently: MQTT 5 tells the publisher, and the session logs it."""
    from ldfleet.common.mqtt import MqttSession

    url = parse_broker_url(f"mqtt://dev-a:{USERS['dev-a']}@127.0.0.1:{acl_broker.port}")
    session = MqttSession(url, "t-refused")
    session.start()
    try:
        assert session.wait_connected(10)
        session.publish(topics.profile("dev-b"), b"not mine")
        session.publish(topics.profile("dev-a"), b"mine")
        assert wait_until(lambda: session.refused_publishes == 1, 10)
    finally:
        session.stop()
