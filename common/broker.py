"""The zero-set-up broker: a private Mosquitto child process on a free loopback port.

``EmbeddedBroker`` writes a generated ``mosquitto.conf`` into its own data directory (listener on
127.0.0.1 only, anonymous clients allowed, persistence on so that ``stop()`` + ``start()`` on the same
port keeps retained messages), starts ``mosquitto -c`` and waits until the port accepts connections.
``ldfleet broker`` runs one in the foreground; ``simulate``, the benchmark and the tests start their own.

It is NOT a security boundary: anyone who can open a socket on this machine can read and write every
topic. For a real fleet run Mosquitto with ``configs/mosquitto/`` (no anonymous clients, password
file, per-device ``%u`` ACL, TLS) and pass its URL with ``--broker``.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from ldfleet.common.process import die_with_parent, free_port, port_open, raise_fd_limit, stop_process

log = logging.getLogger("ldfleet.broker")

INSTALL_HINT = (
    "Mosquitto is not installed: the embedded broker runs it as a child process. Install it with "
    "`sudo apt-get install mosquitto` (Debian/Ubuntu; `make setup` does it), or point --broker at an "
    "existing MQTT broker."
)
_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto", "/usr/local/opt/mosquitto/sbin/mosquitto")


#: Queue and in-flight limits of the embedded broker, sized for a fleet of up to ~10 000 devices on one
#: broker (README, "Control plane capacity"). Mosquitto's limits are per client; the client that needs
#: them is the controller, which hears from every device: on a fleet reboot a birth, a profile and an
#: ack each. The controller asks for a receive maximum of 65 535 (MQTT 5), so the broker has that
#: many messages in flight to it and queues only beyond that; these limits are the second line, for a
#: controller on MQTT 3.1.1 (in flight: ``max_inflight_messages``) or one that falls behind.
SIZING = (
    # 10 000 devices x (birth + profile + ack), with headroom; above it Mosquitto drops and logs
    # "Outgoing messages are being dropped" (the controller's reconciliation then recovers them).
    "max_queued_messages 50000",
    # bytes are the sharper bound: ldfleet payloads are <= 16 KiB, typically ~1 KiB (profiles)
    "max_queued_bytes 268435456",
    # the in-flight window of clients that do not set a receive maximum (MQTT 3.1.1 devices get
    # one or two messages per change, so this only matters to a 3.1.1 controller)
    "max_inflight_messages 1000",
)


class BrokerNotInstalled(RuntimeError):
    pass


class BrokerStartError(RuntimeError):
    pass


def find_mosquitto(explicit: str | None = None) -> str:
    """Path of the mosquitto binary (``$LDFLEET_MOSQUITTO``, PATH, the usual sbin folders)."""
    for cand in (explicit, os.environ.get("LDFLEET_MOSQUITTO")):
        if cand:
            if os.access(cand, os.X_OK):
                return cand
            raise BrokerNotInstalled(f"{cand} is not an executable mosquitto binary. {INSTALL_HINT}")
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in _SEARCH:
        if os.access(cand, os.X_OK):
            return cand
    raise BrokerNotInstalled(INSTALL_HINT)


def mosquitto_password_hash(password: str, *, iterations: int = 101, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash (``$7$``: PBKDF2-HMAC-SHA512), as ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: str | os.PathLike[str], users: dict[str, str]) -> Path:
    """Write a Mosquitto password file for ``{username: password}`` (mode 0600)."""
    path = Path(path)
    lines = [f"{user}:{mosquitto_password_hash(pw)}" for user, pw in users.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _child_setup() -> None:  # runs in the forked child before exec
    die_with_parent()  # no orphaned brokers after a crash
    raise_fd_limit()  # one socket per device


_LIVE: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for b in list(_LIVE):
        try:
            b.close()
        except Exception:  # noqa: BLE001
            pass


class EmbeddedBroker:
    """A private Mosquitto on a loopback port.

    >>> with EmbeddedBroker() as broker:      # doctest: +SKIP
    ...     run_things(broker.url)            # mqtt://127.0.0.1:<port>

    ``stop()`` keeps the data directory (retained messages survive ``start()`` on the same port);
    ``close()`` (and leaving the ``with`` block) also removes a data directory it created.
    ``config_lines`` replace the default ``allow_anonymous true`` part of the config (listener and
    persistence stay), e.g. ``["allow_anonymous false", "password_file ...", "acl_file ..."]``;
    ``full_config`` replaces the whole file (it must log to ``log_path``: readiness is read there).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        config_lines: Sequence[str] | None = None,
        full_config: str | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.binary = find_mosquitto(binary)
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="ldfleet-broker-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_lines = list(config_lines) if config_lines is not None else ["allow_anonymous true"]
        self.full_config = full_config
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        _LIVE.add(self)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config_text(self) -> str:
        if self.full_config is not None:
            return self.full_config
        lines = [
            "# generated by ldfleet (common/broker.py) -- local use only, NOT a security boundary",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            *self.config_lines,
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 10",
            *SIZING,
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto would switch to user "mosquitto", which cannot write our
            # private data directory. It only ever listens on loopback here.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        if port_open(self.host, self.port):
            raise BrokerStartError(f"port {self.port} on {self.host} is already in use")
        self.conf_path.write_text(self.config_text())
        try:
            log_offset = self.log_path.stat().st_size
        except OSError:
            log_offset = 0
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_child_setup,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise BrokerStartError(
                    f"mosquitto exited at start-up (port {self.port}): {err.strip()}\n{self.log_tail()}".strip()
                )
            if self._logged_running(log_offset) and port_open(self.host, self.port):
                log.info("embedded mosquitto (pid %d) listening on %s", self.proc.pid, self.url)
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"mosquitto did not open port {self.port} within {self.start_timeout:.0f} s\n{self.log_tail()}")

    def _logged_running(self, offset: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return b" running" in f.read()
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM: it saves retained messages first); the data directory stays."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc, timeout)
        if proc.stderr:
            proc.stderr.close()
        # wait until the port is really free so that a restart on it succeeds
        deadline = time.monotonic() + timeout
        while port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> EmbeddedBroker:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        _LIVE.discard(self)

    def wait(self) -> int:
        """Block until the broker exits (foreground use); returns its exit code."""
        if self.proc is None:
            return 0
        return self.proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
