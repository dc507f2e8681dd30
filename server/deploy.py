"""Running the learning plane on a real fleet: a Flower SuperLink, the Flower app, ``flwr run``.

* :class:`SuperLink` starts ``flower-superlink`` (one HTTP port for the Fleet, Control and Runtime
  APIs). TLS by default (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``), SuperNode
  authentication with ``--enable-supernode-auth``; ``insecure`` is refused unless the SuperLink
  listens on a loopback address.
* :func:`write_flower_app` writes the Flower app folder (``pyproject.toml`` only): its components
  are this package's ``ldfleet.server.app:app`` and ``ldfleet.client.app:app``, its run config the
  :class:`~ldfleet.server.app.ServerSettings` fields. Both sides must have ldfleet installed; runtime
  dependency installation is switched off (no network on devices, no surprise upgrades).
* :func:`submit_run` / :func:`wait_run`: ``flwr run`` exits 0 even when a run fails, so the run is
  followed with ``flwr ls --run-id ... --format json`` until it is finished, and anything but
  ``finished:completed`` is an error.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ldfleet.server.app import ServerSettings

APP_NAME = "ldfleet-fleet"
CONNECTION = "ldfleet"
FINISHED_OK = "finished:completed"


class DeployError(RuntimeError):
    pass


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DeployError(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our venv's bin first (flower-superexec is spawned by name)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: install flwr in this environment")
    return found


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class TLS:
    ca_certfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.ca_certfile and self.certfile and self.keyfile)


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except Exception:  # noqa: BLE001 - not Linux: rely on stop()
        return None


_PRCTL = _libc_prctl()  # resolved here, so the forked child only makes one plain C call


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (PR_SET_PDEATHSIG), so a
    killed `ldfleet server`/`client` never leaves a SuperLink or SuperNode behind."""
    if _PRCTL is not None:
        _PRCTL(1, 15)


class Process:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


class SuperLink(Process):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9093,
        *,
        home: Path,
        insecure: bool = False,
        tls: TLS | None = None,
        enable_supernode_auth: bool = False,
        database: str | None = None,
    ) -> None:
        tls = tls or TLS()
        if insecure and not is_loopback(host):
            raise DeployError(f"refusing an insecure SuperLink on {host}: insecure is only allowed on loopback; "
                              "give --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile")
        if not insecure and not tls.complete:
            raise DeployError("a SuperLink needs TLS (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile), "
                              "or --insecure on a loopback address")
        cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
        if insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(tls.ca_certfile), "--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile)]
        if enable_supernode_auth:
            cmd.append("--enable-supernode-auth")
        if database:
            cmd += ["--database", database]
        home.mkdir(parents=True, exist_ok=True)
        super().__init__(cmd, flower_env(home / "superlink"), home / "superlink.log")
        self.host, self.port = host, port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> SuperLink:  # type: ignore[override]
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise DeployError(f"flower-superlink exited at start-up:\n{self.log_tail()}")
            if port_open(self.host, self.port):
                return self
            time.sleep(0.2)
        self.stop()
        raise DeployError(f"flower-superlink did not open {self.address} within {timeout:.0f} s:\n{self.log_tail()}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_flower_app(folder: Path) -> Path:
    """The Flower app folder ``flwr run`` builds a FAB from (components point into this package)."""
    folder.mkdir(parents=True, exist_ok=True)
    defaults = {f.name.replace("_", "-"): (f.default if f.default is not MISSING else "") for f in fields(ServerSettings)}
    config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in defaults.items())
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "0.1.0"
description = "ldfleet: federated fine-tuning of the layer selector across a heterogeneous fleet"
license = "Apache-2.0"
dependencies = []  # ldfleet must be installed where the SuperLink and the SuperNodes run

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "ldfleet"

[tool.flwr.app.components]
serverapp = "ldfleet.server.app:app"
clientapp = "ldfleet.client.app:app"

[tool.flwr.app.config]
{config}
""")
    return folder


def write_cli_config(flwr_home: Path, address: str, *, insecure: bool = False, root_certificates: str | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (what ``flwr run/ls`` read)."""
    host, _ = split_address(address)
    if insecure and not is_loopback(host):
        raise DeployError(f"refusing an insecure connection to {address}: only loopback may be insecure")
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f"address = {json.dumps(address)}"]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _flwr(args: list[str], flwr_home: Path, timeout: float = 120.0) -> dict[str, Any]:
    proc = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=flower_env(flwr_home), capture_output=True,
                          text=True, timeout=timeout)
    text = proc.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if not data:
        raise DeployError(f"flwr {' '.join(args)} gave no JSON (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return data


def run_config_arg(settings: ServerSettings) -> str:
    return " ".join(f"{k.replace('_', '-')}={_toml_value(v)}" for k, v in settings.as_dict().items())


def submit_run(app_dir: Path, flwr_home: Path, settings: ServerSettings) -> str:
    """``flwr run``: returns the run id (raises when the SuperLink refuses it)."""
    data = _flwr(["run", str(app_dir), CONNECTION, "--run-config", run_config_arg(settings)], flwr_home)
    if not data.get("success") or not data.get("run-id"):
        raise DeployError(f"flwr run failed: {data.get('error-message', data)}")
    return str(data["run-id"])


def run_status(flwr_home: Path, run_id: str) -> dict[str, Any]:
    data = _flwr(["ls", CONNECTION, "--run-id", run_id], flwr_home)
    if data.get("success") is False:
        raise DeployError(f"flwr ls failed: {data.get('error-message', data)}")
    for run in data.get("runs", []):
        if str(run.get("run-id")) == run_id:
            return run
    raise DeployError(f"run {run_id} not listed by the SuperLink: {data.get('error-message', data)}")


def wait_run(flwr_home: Path, run_id: str, timeout: float, poll: float = 2.0) -> dict[str, Any]:
    """Poll until the run is finished; raise DeployError unless it finished:completed."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = run_status(flwr_home, run_id)
        if str(status.get("status", "")).startswith("finished"):
            if status["status"] != FINISHED_OK:
                raise DeployError(f"run {run_id} ended {status['status']}: {status.get('status-details')}")
            return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} not finished after {timeout:.0f} s (status {status.get('status')})")
