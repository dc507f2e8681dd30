"""Running a real device: its Flower SuperNode (``flower-supernode``) next to its MQTT agent.

The SuperNode passes the device's identity and folders to the ClientApp as node config
(``device-id``, ``device-class``, ``model-dir``, ``data-dir``, ``state-dir``, ``cache-dir``); the
ClientApp reads the budget from ``state-dir``, which the agent keeps. TLS by default
(``--root-certificates``), SuperNode authentication with ``--auth-supernode-private-key``;
``insecure`` is refused unless the SuperLink is on a loopback address.
"""

from __future__ import annotations

import time
from pathlib import Path

from ldfleet.common import learning as L
from ldfleet.common.process import ChildProcess, executable, flower_env, free_port, is_loopback


class NodeError(RuntimeError):
    pass


def node_config_arg(values: dict[str, str]) -> str:
    """``key='value' ...`` for ``--node-config`` (values must not contain quotes)."""
    for k, v in values.items():
        if "'" in str(v) or '"' in str(v):
            raise NodeError(f"node config value of {k} must not contain quotes: {v!r}")
    return " ".join(f"{k}='{v}'" for k, v in values.items())


def device_node_config(device_id: str, device_class: str, model_dir: str | Path, data_dir: str | Path,
                       state_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, str]:
    return {
        L.NODE_DEVICE_ID: device_id,
        L.NODE_DEVICE_CLASS: device_class,
        L.NODE_MODEL_DIR: str(Path(model_dir).resolve()),
        L.NODE_DATA_DIR: str(Path(data_dir).resolve()),
        L.NODE_STATE_DIR: str(Path(state_dir).resolve()),
        L.NODE_CACHE_DIR: str(Path(cache_dir or Path(state_dir) / "fl-cache").resolve()),
    }


class SuperNode(ChildProcess):
    """``flower-supernode`` for one device (its own FLWR_HOME and ClientApp I/O port)."""

    def __init__(
        self,
        superlink: str,
        node_config: dict[str, str],
        *,
        home: Path,
        port: int | None = None,
        insecure: bool = False,
        root_certificates: str | None = None,
        auth_private_key: str | None = None,
    ) -> None:
        host = superlink.rpartition(":")[0]
        if insecure and not is_loopback(host):
            raise NodeError(f"refusing an insecure connection to {superlink}: only a loopback SuperLink may be insecure; "
                            "give --root-certificates")
        if not insecure and not root_certificates:
            raise NodeError("a SuperNode needs --root-certificates (TLS), or --insecure with a loopback SuperLink")
        self.port = port or free_port()
        cmd = [executable("flower-supernode"), "--superlink", superlink, "--port", str(self.port),
               "--node-config", node_config_arg(node_config)]
        if insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(root_certificates)]
        if auth_private_key:
            cmd += ["--auth-supernode-private-key", str(auth_private_key)]
        self.home = home
        super().__init__(cmd, flower_env(home), home / "supernode.log")

    def start(self) -> SuperNode:  # type: ignore[override]
        super().start()
        time.sleep(0.5)
        if not self.running:
            self.stop()  # closes the log
            raise NodeError(f"flower-supernode exited at start-up:\n{self.log_tail()}")
        return self


def model_profile(device_id: str, device_class: str, model_dir: str | Path, repeats: int = 5):
    """This machine's DeviceProfile, timing the device's own model (front end and each layer, 1 thread)."""
    import torch

    from ldfleet.client.profile import system_info
    from ldfleet.common.model.checkpoint import load_model
    from ldfleet.common.model.profiling import profile_runner
    from ldfleet.common.schemas import DeviceProfile, utcnow

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lat = profile_runner(load_model(model_dir).runner, seconds=1.0, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    return DeviceProfile(
        device_id=device_id, device_class=device_class, model_id=str(lat.model_id)[:200], num_layers=lat.num_layers,
        front_end_ms=float(lat.front_end_ms), layer_ms=[float(x) for x in lat.layer_ms], reference_seconds=1.0,
        latency_ratio_p90=lat.ratio_p90, latency_ratio_p99=lat.ratio_p99, measured_at=utcnow(), **system_info(),
    )
