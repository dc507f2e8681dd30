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

import json
import subprocess
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ldfleet.common.process import ChildProcess, executable, flower_env, is_loopback, port_open
from ldfleet.server.app import ServerSettings

APP_NAME = "ldfleet-fleet"
CONNECTION = "ldfleet"
FINISHED_OK = "finished:completed"


class DeployError(RuntimeError):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DeployError(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class TLS:
    ca_certfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.ca_certfile and self.certfile and self.keyfile)


class SuperLink(ChildProcess):
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
        cmd = [executable("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
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
                self.stop()  # closes the log
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
    proc = subprocess.run([executable("flwr"), *args, "--format", "json"], env=flower_env(flwr_home), capture_output=True,
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


def stop_run(flwr_home: Path, run_id: str) -> None:
    """``flwr stop``: the SuperLink stops the run (a run left behind would go on training when nodes
    connect later). Raises DeployError when the SuperLink refuses."""
    data = _flwr(["stop", run_id, CONNECTION], flwr_home)
    if data.get("success") is False:
        raise DeployError(f"flwr stop {run_id} failed: {data.get('error-message', data)}")


def wait_run(flwr_home: Path, run_id: str, timeout: float, poll: float = 2.0,
             on_status: Any = None) -> dict[str, Any]:
    """Poll until the run is finished; raise DeployError unless it finished:completed.
    ``on_status(status)`` sees each poll's ``flwr ls`` entry (progress)."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = run_status(flwr_home, run_id)
        if on_status is not None:
            on_status(status)
        if str(status.get("status", "")).startswith("finished"):
            if status["status"] != FINISHED_OK:
                raise DeployError(f"run {run_id} ended {status['status']}: {status.get('status-details')}")
            return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} not finished after {timeout:.0f} s (status {status.get('status')})")
