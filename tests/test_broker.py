"""The embedded broker: a private Mosquitto child process on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from control_fixtures import read_retained, wait_until
from ldfleet.common.broker import (
    BrokerNotInstalled,
    BrokerStartError,
    EmbeddedBroker,
    find_mosquitto,
    mosquitto_password_hash,
)
from ldfleet.common.process import port_open
from ldfleet.common.mqtt import parse_broker_url, publish_once


def test_embedded_broker_keeps_retained_messages_across_restarts():
    with EmbeddedBroker() as b:
        assert b.url == f"mqtt://127.0.0.1:{b.port}" and b.running
        conf = b.conf_path.read_text()
        assert f"listener {b.port} 127.0.0.1" in conf and "allow_anonymous true" in conf and "persistence true" in conf
        publish_once(parse_broker_url(b.url), [("ldfleet/v1/test/retained", b"kept", 1, True)])
        port = b.port
        b.stop()
        assert not b.running and not port_open("127.0.0.1", port)
        b.start()
        assert b.port == port
        assert read_retained(b.url, "ldfleet/v1/test/retained") == b"kept"
        data_dir = b.data_dir
    assert not data_dir.exists()  # close() removes the data directory it created


def test_missing_mosquitto_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("ldfleet.common.broker._SEARCH", ())
    with pytest.raises(BrokerNotInstalled, match="apt-get install mosquitto"):
        find_mosquitto()
    with pytest.raises(BrokerNotInstalled, match="apt-get install mosquitto"):
        EmbeddedBroker()


def test_a_broker_that_cannot_start_says_why():
    with EmbeddedBroker() as first:
        clash = EmbeddedBroker(first.port)
        with pytest.raises(BrokerStartError, match=str(first.port)):
            clash.start()
        clash.close()


def test_password_hash_matches_mosquitto_passwd(tmp_path):
    # mosquitto accepts our $7$ hashes (checked end to end in test_acl); the format is mosquitto_passwd's
    h = mosquitto_password_hash("secret", salt=b"0123456789ab")
    algo, iterations, salt, digest = h.split("$")[1:]
    assert (algo, iterations, len(digest)) == ("7", "101", 88)


def test_ldfleet_broker_command_runs_in_the_foreground(tmp_path):
    env = {**os.environ, "LDFLEET_HOME": str(tmp_path)}
    # a test run started in the background (`cmd &` in a non-interactive shell) inherits SIGINT
    # ignored, and Python then keeps it ignored: give the command the Ctrl-C a terminal would
    proc = subprocess.Popen([sys.executable, "-c", "from ldfleet.cli import app; app()", "broker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        info_file = tmp_path / "broker.json"
        assert wait_until(info_file.exists, 30), "ldfleet broker did not write its URL"
        info = json.loads(info_file.read_text())
        assert info["pid"] == proc.pid
        u = parse_broker_url(info["url"])
        assert u.host == "127.0.0.1" and port_open(u.host, u.port)
        # other commands default to it
        out = subprocess.run([sys.executable, "-c", "from ldfleet.common.runtime import default_broker_url; print(default_broker_url())"],
                             env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == info["url"]
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert "not a security boundary" in output
    assert not (tmp_path / "broker.json").exists()
    assert not port_open(u.host, u.port)
