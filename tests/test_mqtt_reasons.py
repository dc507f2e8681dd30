"""Why a connection was refused or closed, and what the agent does about it (issue 11, MQTT fleet).

The reason-code table and the backoff on their own, then real Mosquitto brokers: bad credentials and
anonymous clients stop the agent with the reason (no reconnect loop); two agents started with the
same device id notice each other, back off hard, one gives up, and `ldfleet devices list` shows the
device as a duplicate.
"""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from ldfleet.cli import app
from ldfleet.client.agent import DeviceAgent
from ldfleet.client.profile import synthetic_profile
from ldfleet.common.broker import EmbeddedBroker, write_password_file
from ldfleet.common.mqtt_reasons import REASONS, Action, ReconnectPolicy, reason_for

from control_fixtures import broker, sqlite_fleet, wait_until  # noqa: F401 - pytest fixtures

runner = CliRunner()


@pytest.mark.parametrize("code,action,words", [
    (0x86, Action.FATAL, "bad user name or password"),
    (0x87, Action.FATAL, "not authorised"),
    (0x84, Action.FATAL, "--mqtt-version 311"),
    (0x8A, Action.FATAL, "banned"),
    (0x8E, Action.TAKEOVER, "same client id"),
    (0x95, Action.BACKOFF, "packet too large"),
    (0x97, Action.BACKOFF, "quota exceeded"),
    (0x89, Action.BACKOFF, "server busy"),
    (0x80, Action.BACKOFF, "without a reason"),
])
def test_every_reason_code_has_an_action_and_a_plain_message(code, action, words):
    assert reason_for(code).action is action and words in reason_for(code).text
    v = ReconnectPolicy(rng=random.Random(0)).verdict(code)
    assert v.action is action and words in v.message
    if action is Action.FATAL:
        assert "not retrying" in v.message
    else:
        assert v.delay_s > 0 and "reconnecting in" in v.message


def test_unknown_codes_back_off_and_the_table_covers_mqtt5():
    assert reason_for(0xF3).action is Action.BACKOFF and "0xF3" in reason_for(0xF3).text
    assert reason_for(None) is REASONS[0x80] and reason_for(0) is REASONS[0x80]
    assert {0x86, 0x87, 0x89, 0x8E, 0x95, 0x97} <= set(REASONS)


def test_backoff_is_exponential_jittered_capped_and_reset_only_by_a_stable_connection():
    p = ReconnectPolicy(base_s=1.0, slow_base_s=5.0, cap_s=8.0, stable_s=60.0, rng=random.Random(1))
    delays = [p.verdict(0x80, connected_s=0.5).delay_s for _ in range(8)]
    ceilings = [min(8.0, 2.0 ** i) for i in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings)), delays
    assert len({round(d, 6) for d in delays[4:]}) > 1  # jitter: capped delays still differ
    # a connection that is accepted and closed at once does not reset the backoff ...
    assert p.verdict(0x80, connected_s=1.0).delay_s >= 4.0
    # ... one that stayed up does
    assert p.verdict(0x80, connected_s=120.0).delay_s <= 1.0
    slow = ReconnectPolicy(base_s=1.0, slow_base_s=5.0, rng=random.Random(2)).verdict(0x89)
    assert slow.delay_s >= 2.5  # server busy starts higher


def test_takeovers_back_off_hard_then_give_up():
    p = ReconnectPolicy(takeover_base_s=20.0, max_takeovers=3, rng=random.Random(3))
    first = p.verdict(0x8E, connected_s=2.0)
    assert first.action is Action.TAKEOVER and first.delay_s >= 10.0
    assert p.verdict(0x8E, connected_s=2.0).delay_s >= 20.0
    last = p.verdict(0x8E, connected_s=2.0)
    assert last.action is Action.FATAL and "giving up" in last.message


def test_an_unexplained_close_is_a_takeover_only_with_evidence_of_a_duplicate():
    p = ReconnectPolicy(rng=random.Random(4))
    assert p.verdict(0x80, connected_s=3.0).action is Action.BACKOFF
    p.duplicate_hint = "another agent uses device id 'x'"
    v = p.verdict(0x80, connected_s=3.0)
    assert v.action is Action.TAKEOVER and "another agent" in v.message
    assert p.verdict(0x80, connected_s=600.0).action is Action.BACKOFF  # a long connection: a plain drop


@pytest.fixture
def locked_broker(tmp_path):
    """Mosquitto with no anonymous access and one known user."""
    pw = write_password_file(tmp_path / "passwords", {"dev-a": "right-password"})
    with EmbeddedBroker(data_dir=tmp_path / "broker", config_lines=["allow_anonymous false", f"password_file {pw}"]) as b:
        yield b


@pytest.mark.parametrize("credentials,words", [
    ("dev-a:wrong-password@", ("bad user name or password", "not authorised")),
    ("", ("not authorised", "bad user name or password")),
], ids=["bad-password", "anonymous"])
def test_a_refused_agent_stops_with_the_reason_instead_of_looping(locked_broker, tmp_path, credentials, words):
    url = f"mqtt://{credentials}127.0.0.1:{locked_broker.port}"
    ag = DeviceAgent("dev-a", "pi4", url, synthetic_profile("dev-a", "pi4", num_layers=4, layer_ms=1.0),
                     state_dir=tmp_path / "state", reconnect_max_s=1).start()
    try:
        assert wait_until(lambda: ag.fatal is not None, 20), "a refused agent did not stop"
        assert any(w in ag.fatal for w in words), ag.fatal
        assert "not retrying" in ag.fatal and ag._stop.is_set()
        # paho's network loop has ended: no reconnect attempts follow
        assert wait_until(lambda: ag.session.client._thread is None or not ag.session.client._thread.is_alive(), 10)
        assert ag.session.connect_count == 0
    finally:
        ag.stop()


def test_two_agents_with_one_device_id_back_off_give_up_and_show_as_duplicate(sqlite_fleet, caplog):
    fleet = sqlite_fleet
    fleet.controller()
    fast = dict(base_s=0.2, takeover_base_s=0.6, cap_s=1.0, takeover_cap_s=2.0, stable_s=30.0, max_takeovers=3)
    a = fleet.agent("twin", "pi4", policy=ReconnectPolicy(**fast, rng=random.Random(5)))
    # a second agent with the same device id, on another state folder (another machine)
    b = DeviceAgent("twin", "pi4", fleet.broker.url, synthetic_profile("twin", "pi4", num_layers=12, layer_ms=2.0),
                    state_dir=fleet.tmp_path / "devices" / "twin-second", policy=ReconnectPolicy(**fast, rng=random.Random(6)))
    fleet.agents["twin-second"] = b
    b.start()
    # both say plainly what is wrong; at least one gives up after a few takeovers
    assert wait_until(lambda: a.fatal or b.fatal, 60), "neither agent gave up"
    quitter = a if a.fatal else b
    survivor = b if quitter is a else a
    assert "same device id" in quitter.fatal and "giving up" in quitter.fatal
    assert survivor.session.policy.duplicate_hint and "duplicate device id" in survivor.session.policy.duplicate_hint
    assert "duplicate device id" in caplog.text
    # the survivor keeps the device id and is connected
    assert wait_until(lambda: survivor.session.connected, 20)
    # the controller saw two boots taking turns: `devices list` flags the duplicate
    assert wait_until(lambda: fleet.registry.device("twin").duplicate_at is not None, 20)
    out = runner.invoke(app, ["devices", "list", "--json", "--db", fleet.db_url])
    assert out.exit_code == 0, out.output
    row = next(d for d in json.loads(out.output) if d["device_id"] == "twin")
    assert row["duplicate"] is True and row["duplicate_boot_id"] in (a.boot_id, b.boot_id)
    table = runner.invoke(app, ["devices", "list", "--db", fleet.db_url])
    assert "duplicate device id" in table.output and "twin (boots" in table.output
    assert "the flag stays 60 min" in " ".join(table.output.split()) and "flagged until" in " ".join(table.output.split())


def test_a_refused_controller_stops_with_the_reason(locked_broker, tmp_path):
    from ldfleet.server.controller import Controller

    ctl = Controller(f"mqtt://ldfleet-controller:nope@127.0.0.1:{locked_broker.port}", f"sqlite:///{tmp_path / 'r.db'}",
                     reconnect_max_s=1).start()
    try:
        assert wait_until(lambda: ctl.session.fatal is not None, 20)
        assert "not retrying" in ctl.session.fatal and ctl._stop.is_set()  # run_forever returns, the CLI exits 1
    finally:
        ctl.stop()


def test_pahos_socket_noise_is_not_logged_as_an_error(caplog):
    """A broker going away makes paho log "failed to receive on socket" at ERROR; the session
    reports the lost connection itself, so that line is kept at DEBUG only."""
    import logging

    import ldfleet.common.mqtt  # noqa: F401 - installs the filter

    paho = logging.getLogger("ldfleet.mqtt.paho")
    with caplog.at_level(logging.INFO, logger="ldfleet.mqtt.paho"):
        paho.error("failed to receive on socket: [Errno 104] Connection reset by peer")
        paho.error("Client is not connected")
        paho.error("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_a_broker_url_error_never_shows_the_password():
    """Whatever makes a URL unusable (scheme, port, a / ? # in the password that was not
    percent-encoded), the error names it with the password hidden."""
    from ldfleet.common.mqtt import parse_broker_url

    for url in ("http://dev:s3cret@127.0.0.1:1883", "mqtt://dev:s3cret@h:port", "mqtt://dev:s3/cret@127.0.0.1:1883",
                "mqtt://dev:s3#cret@h", "mqtt://dev:s3?cret@h:1"):
        with pytest.raises(ValueError) as exc:
            parse_broker_url(url)
        assert "s3" not in str(exc.value) and "dev:***@" in str(exc.value), str(exc.value)
    with pytest.raises(ValueError, match="percent-encoded"):
        parse_broker_url("mqtt://dev:a/b@h")
    assert parse_broker_url("mqtt://dev:a%2Fb@h").password == "a/b"
