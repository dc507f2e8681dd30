"""Where the control plane keeps things on this machine, and its zero-set-up defaults.

* ``LDFLEET_HOME`` (default ``~/.ldfleet``): the registry database, device state, broker URL file.
* ``LDFLEET_BROKER``: broker URL for every command that takes ``--broker``. Without it, the URL
  written by a running ``ldfleet broker`` (``$LDFLEET_HOME/broker.json``), else
  ``mqtt://127.0.0.1:1883``.
* ``LDFLEET_DB``: registry URL; default ``sqlite:///$LDFLEET_HOME/registry.db``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FALLBACK_BROKER_URL = "mqtt://127.0.0.1:1883"


def ldfleet_home() -> Path:
    return Path(os.environ.get("LDFLEET_HOME") or Path.home() / ".ldfleet").expanduser()


def broker_file() -> Path:
    return ldfleet_home() / "broker.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_broker_file(url: str, pid: int) -> Path:
    path = broker_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": pid}))
    os.replace(tmp, path)
    return path


def remove_broker_file(pid: int) -> None:
    path = broker_file()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def running_broker_url() -> str | None:
    """URL of an ``ldfleet broker`` still running on this machine, if any."""
    try:
        info = json.loads(broker_file().read_text())
        if _pid_alive(int(info["pid"])):
            return str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def default_broker_url() -> str:
    return os.environ.get("LDFLEET_BROKER") or running_broker_url() or FALLBACK_BROKER_URL


def default_registry_url() -> str:
    env = os.environ.get("LDFLEET_DB")
    if env:
        return env
    return f"sqlite:///{ldfleet_home() / 'registry.db'}"


def default_device_state_dir(device_id: str) -> Path:
    return ldfleet_home() / "devices" / device_id
