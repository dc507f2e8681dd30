"""A real fleet on 127.0.0.1: flower-superlink, two flower-supernode processes, the project's ServerApp
and ClientApp through `ldfleet federate` (flwr run, one round: every message starts a fresh
`flwr-clientapp` process), with the control plane (Mosquitto, controller,
agents) deciding each device's budget. Checks the registry rows per device, and that a failed run is
reported as a failure (flwr run itself exits 0 on failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldfleet.common.process import free_port
from ldfleet.server.deploy import DeployError, SuperLink, write_cli_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_flwr_cli_works_in_this_environment():
    # typer < 0.19.2 breaks the flwr CLI (PITFALLS): it must at least print its help
    res = subprocess.run([str(BIN / "flwr"), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "run" in res.stdout


def test_insecure_is_refused_off_loopback(tmp_path):
    with pytest.raises(DeployError, match="loopback"):
        SuperLink("0.0.0.0", 9999, home=tmp_path, insecure=True)
    with pytest.raises(DeployError, match="TLS"):
        SuperLink("127.0.0.1", 9999, home=tmp_path)
    with pytest.raises(DeployError, match="loopback"):
        write_cli_config(tmp_path, "10.1.2.3:9093", insecure=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Model + two devices' clip folders (from the session's cached tiny corpus and warm model)."""
    from ldfleet.client.learning import pooled_split
    from ldfleet.simulations.fleet import build_fleet
    from ldfleet.simulations.scenario import parse_scenario

    from test_flower_simulation import TINY  # the same tiny fleet: corpus and warm model come from the cache

    cache = tmp_path_factory.getbasetemp() / "sim-cache"
    work = tmp_path_factory.mktemp("deploy")
    scn = parse_scenario(TINY, "tiny", base_dir=ROOT / "configs")
    data = build_fleet(scn, work, cache, "deploy", {}, say=lambda *_: None)
    pool = pooled_split(data.manifest.data_dir, data.manifest.split_seed, "train")
    folders = {}
    for dev in data.manifest.devices[:2]:
        folder = work / "clips" / dev.device_id
        for i in dev.train_indices + dev.test_indices:
            clip = pool.clips[i]
            (folder / clip.word).mkdir(parents=True, exist_ok=True)
            os.symlink(clip.path, folder / clip.word / clip.path.name)
        folders[dev.device_id] = folder
    return work, data.manifest.model_dir, folders


class _Proc:
    """An `ldfleet ...` command in its own process group, stopped with SIGTERM (it stops its children)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([str(BIN / "ldfleet"), *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2500:]


def test_server_client_federate_commands_run_rounds(tiny):
    """`ldfleet server` (controller + SuperLink), two `ldfleet client` (agent + SuperNode), `ldfleet federate`."""
    import time

    from ldfleet.client.state import load_device_state
    from ldfleet.common.broker import EmbeddedBroker
    from ldfleet.server.operator import set_budget
    from ldfleet.server.registry.store import Registry
    from ldfleet.server.rounds import finished_rounds, metric_rows

    work, model_dir, folders = tiny
    db = f"sqlite:///{work / 'registry.db'}"
    classes = {"pi-a": ("rpi4", 0.5, 4), "nano-b": ("jetson", 0.75, 6)}
    broker = EmbeddedBroker(data_dir=work / "broker").start()
    registry = Registry(db)
    procs: list[_Proc] = []
    try:
        for cls, keep, _ in classes.values():  # the operator sets the class budgets before devices exist
            set_budget(registry, broker.url, cls, keep=keep, create_class=True, issued_by="test")
        port = free_port()
        address = f"127.0.0.1:{port}"
        server = _Proc(["server", "--db", db, "--broker", broker.url, "--host", "127.0.0.1", "--port", str(port),
                        "--insecure", "--home", str(work / "link")], work / "server.log")
        procs.append(server)
        for (dev, (cls, _, _)), folder in zip(classes.items(), folders.values()):
            procs.append(_Proc(["client", "--device-id", dev, "--device-class", cls, "--superlink", address, "--broker", broker.url,
                                "--model", model_dir, "--data", str(folder), "--state-dir", str(work / "state" / dev),
                                "--insecure"], work / f"client-{dev}.log"))

        def applied() -> bool:
            devs = {d.device_id: d for d in registry.devices()}
            states = {d: load_device_state(work / "state" / d) for d in classes}
            return all(d in devs and devs[d].online and devs[d].converged and states[d] is not None
                       and states[d].effective_k == k for d, (_, _, k) in classes.items())

        deadline = time.monotonic() + 120
        while not applied():  # each agent stored its class budget (the controller saw the ack)
            assert all(p.alive() for p in procs), "\n".join(p.tail() for p in procs)
            assert time.monotonic() < deadline, "devices never applied their policies:\n" + "\n".join(p.tail() for p in procs)
            time.sleep(0.2)

        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        res = subprocess.run(
            [str(BIN / "ldfleet"), "federate", "--superlink", address, "--model", model_dir, "--out", str(work / "run"),
             "--db", db, "--rounds", "1", "--min-nodes", "2", "--insecure", "--round-timeout", "240", "--timeout", "500"],
            capture_output=True, text=True, timeout=560, env=env)
        logs = "\n".join(p.tail() for p in procs)
        assert res.returncode == 0, res.stdout + res.stderr + logs
        assert "finished:completed" in res.stdout

        assert finished_rounds(registry, "run") == [1]
        rows = metric_rows(registry, "run")
        for dev, (cls, _, k) in classes.items():
            mine = [m for m in rows if m.device_id == dev]
            assert {(m.round, m.phase) for m in mine} == {(1, "train"), (1, "eval")}, logs
            state = load_device_state(work / "state" / dev)
            for m in mine:
                assert m.device_class == cls and m.k == k and m.policy_version == state.version
                assert m.num_examples > 0 and 0 <= m.accuracy <= 1 and len(m.layer_usage) == 8
        assert sorted(p.name for p in (work / "run" / "checkpoints").iterdir()) == ["round-0001.safetensors"]
        # the run folder names its registry and run id for the registry commands (owner-only: a URL may hold a password)
        assert (work / "run" / "federate.json").stat().st_mode & 0o077 == 0
        assert f"ldfleet registry rounds --run {work / 'run'}" in res.stdout
        rounds = subprocess.run([str(BIN / "ldfleet"), "registry", "rounds", "--run", str(work / "run"), "--json"],
                                capture_output=True, text=True, timeout=60)
        assert rounds.returncode == 0 and [r["round"] for r in json.loads(rounds.stdout)["rounds"]] == [1], rounds.stdout + rounds.stderr
        report = subprocess.run([str(BIN / "ldfleet"), "report", str(work / "run")], capture_output=True, text=True, timeout=60)
        assert report.returncode == 2 and "is a `ldfleet federate` run" in report.stderr, report.stderr

        # a run that fails (no model where the ServerApp looks) must not be reported as a success
        res = subprocess.run(
            [str(BIN / "ldfleet"), "federate", "--superlink", address, "--model", str(work / "no-such-model"),
             "--out", str(work / "bad"), "--db", db, "--rounds", "1", "--min-nodes", "2", "--insecure", "--timeout", "300"],
            capture_output=True, text=True, timeout=360, env=env)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "finished:failed" in res.stdout + res.stderr
        assert finished_rounds(registry, "bad") == []

        # a run given up on (it waits for 5 SuperNodes; 2 are connected) is stopped on the SuperLink,
        # so it does not train later when more nodes connect
        import re

        from ldfleet.server.deploy import run_status

        res = subprocess.run(
            [str(BIN / "ldfleet"), "federate", "--superlink", address, "--model", model_dir, "--out", str(work / "stuck"),
             "--db", db, "--rounds", "1", "--min-nodes", "5", "--insecure", "--timeout", "20"],
            capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 1 and "stopped on the SuperLink" in res.stdout + res.stderr, res.stdout + res.stderr
        assert "it starts once 5 SuperNode(s) are connected" in res.stdout or "run status: running" in res.stdout
        rid = re.search(r"run (\d+) submitted", res.stdout).group(1)
        deadline = time.monotonic() + 30
        while not str(run_status(work / "stuck" / "flwr-cli", rid)["status"]).startswith("finished"):
            assert time.monotonic() < deadline, run_status(work / "stuck" / "flwr-cli", rid)
            time.sleep(1)

        # a device process killed outright takes its SuperNode with it (no orphans on a board)
        import signal

        node_of = lambda dev: subprocess.run(["pgrep", "-f", f"device-id='{dev}'"], capture_output=True,  # noqa: E731
                                             text=True).stdout.split()
        assert node_of("pi-a")
        os.kill(procs[1].proc.pid, signal.SIGKILL)
        procs[1].proc.wait(10)
        deadline = time.monotonic() + 20
        while node_of("pi-a") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not node_of("pi-a")
    finally:
        for p in reversed(procs):
            p.stop()
        registry.close()
        broker.close()
    # SIGTERM stopped every Flower process the commands started; grandchildren get their SIGTERM from
    # the kernel (PR_SET_PDEATHSIG) when their parent exits, so they may still be exiting for a moment
    left = _processes_mentioning(work, grace_s=15.0)
    assert not left, subprocess.run(["ps", "-fp", ",".join(left)], capture_output=True, text=True).stdout


def _processes_mentioning(text: Path, grace_s: float) -> list[str]:
    """PIDs whose command line mentions `text`, after waiting up to `grace_s` s for them to exit."""
    import time

    deadline = time.monotonic() + grace_s
    while True:
        left = subprocess.run(["pgrep", "-f", str(text)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_federate_command_line_is_documented():
    res = subprocess.run([str(BIN / "ldfleet"), "client", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0 and "--device-id" in res.stdout and "--superlink" in res.stdout


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (cryptography ships with Flower)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ldfleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_superlink_over_tls(tmp_path):
    """The SuperLink starts with TLS and the CLI reaches it with the CA certificate (and not without)."""
    from ldfleet.server.deploy import TLS, run_status

    ca, cert, key = _tls_files(tmp_path / "tls")
    link = SuperLink("127.0.0.1", free_port(), home=tmp_path / "link", tls=TLS(str(ca), str(cert), str(key))).start()
    try:
        home = tmp_path / "cli"
        write_cli_config(home, link.address, root_certificates=str(ca))
        with pytest.raises(DeployError, match="Run ID not found"):
            run_status(home, "123")  # the SuperLink answered over TLS: it simply has no such run
        plain = tmp_path / "cli-insecure"
        write_cli_config(plain, link.address, insecure=True)
        with pytest.raises(DeployError, match="flwr ls failed") as info:
            run_status(plain, "123")  # plaintext against a TLS SuperLink never reaches it
        assert "Run ID not found" not in str(info.value)
    finally:
        link.stop()


def test_a_restarted_superlink_keeps_its_supernodes_and_a_dead_supernode_is_started_again(tmp_path):
    """`ldfleet server` keeps the SuperLink's state in an SQLite file: after a restart the SuperNodes
    carry on (with the state in memory they were refused and exited). `ldfleet client` starts its
    SuperNode again when it exits for any other reason."""
    import signal
    import threading
    import time

    from ldfleet.client.node import SuperNode
    from ldfleet.commands.fleet import _supervise

    port = free_port()
    db = str(tmp_path / "superlink-state.db")
    link = SuperLink("127.0.0.1", port, home=tmp_path / "link", insecure=True, database=db).start()
    node = SuperNode(f"127.0.0.1:{port}", {"device-id": "pi-01"}, home=tmp_path / "node", insecure=True).start()
    stop = threading.Event()
    keeper = threading.Thread(target=_supervise, args=(stop, node, "pi-01"), kwargs={"max_delay_s": 1.0}, daemon=True)
    keeper.start()
    try:
        time.sleep(5)
        first = node.proc.pid
        link.stop()
        link = SuperLink("127.0.0.1", port, home=tmp_path / "link", insecure=True, database=db).start()
        time.sleep(20)  # without the state file the SuperNode exits within a few seconds
        assert node.running and node.proc.pid == first, node.log_tail()

        os.killpg(first, signal.SIGKILL)  # the device's SuperNode dies
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (node.running and node.proc.pid != first):
            time.sleep(0.5)
        assert node.running and node.proc.pid != first, "the SuperNode was not started again"
    finally:
        stop.set()
        keeper.join(10)
        node.stop()
        link.stop()


def test_server_refuses_a_taken_port_before_starting_anything(tmp_path):
    import socket

    from typer.testing import CliRunner

    from ldfleet.cli import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = CliRunner().invoke(app, ["server", "--insecure", "--port", str(port), "--home", str(tmp_path / "h"),
                                       "--broker", "mqtt://u:secret@127.0.0.1:1"])
    assert out.exit_code == 2 and f"127.0.0.1:{port} is already taken" in out.output
    bad = CliRunner().invoke(app, ["server", "--insecure", "--port", str(free_port()), "--home", str(tmp_path / "h"),
                                   "--broker", "http://u:secret@127.0.0.1:1"])
    assert bad.exit_code == 2 and "u:***@" in bad.output and "secret" not in bad.output and "Traceback" not in bad.output
