"""Local device state: the policy in force on this device, kept by the agent, read by everyone else.

One JSON file, ``<state dir>/device_state.json`` (default state dir
``$LDFLEET_HOME/devices/<device_id>/``), replaced atomically (temp file in the same folder, fsync,
``os.replace``, fsync of the folder), so a reader never sees a half-written file and a crash leaves
either the old or the new state. The Flower client and on-device inference call
``load_device_state(state_dir)`` and use ``state.effective_k``.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, utcnow

STATE_FILE = "device_state.json"
STATE_SCHEMA = "ldfleet.device-state/1"


class DeviceState(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(STATE_SCHEMA, alias="schema")
    device_id: str
    device_class: str
    #: Version of the policy in force (0: none received yet, run the full model).
    version: int = 0
    policy: BudgetPolicy | None = None
    #: Number of encoder layers to keep under the policy in force (None: all layers).
    effective_k: int | None = None
    expected_latency_ms: float | None = None
    profile: DeviceProfile | None = None
    updated_at: AwareDatetime = Field(default_factory=utcnow)
    #: Last desired version this device refused, with the reason (kept for diagnosis).
    last_rejected_version: int | None = None
    last_rejected_reason: str | None = None
    #: The rejection was about time (expiry): the same version is evaluated again when it comes back.
    last_rejected_retryable: bool = False
    #: How many times an agent started with this state folder, and the boot id of the latest start
    #: (birth/death ordering: ``ldfleet.common.schemas.Status``).
    boot_seq: int = Field(0, ge=0)
    boot_id: str | None = None

    @property
    def num_layers(self) -> int | None:
        return self.profile.num_layers if self.profile else None

    def policy_expired(self, now: datetime | None = None) -> bool:
        return self.policy is not None and self.policy.expired(now)


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_FILE


def load_device_state(state_dir: str | os.PathLike[str]) -> DeviceState | None:
    """The stored state, or None when the device has none yet. A corrupt file raises ValueError."""
    path = state_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return DeviceState.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(f"corrupt device state {path}: {exc.error_count()} error(s): {exc.errors()[0]['msg']}") from None


def save_device_state(state_dir: str | os.PathLike[str], state: DeviceState) -> Path:
    """Write ``state`` atomically: temp file + fsync + os.replace + fsync of the folder."""
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = state.model_dump_json(by_alias=True, indent=2).encode()
    fd, tmp = tempfile.mkstemp(prefix=".device_state.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems refuse fsync on a directory; the replace is still atomic
        pass
    return folder / STATE_FILE


def describe(state: DeviceState) -> dict:
    """A small JSON-able summary (for logs and `ldfleet agent` output)."""
    return json.loads(
        state.model_dump_json(include={"device_id", "device_class", "version", "effective_k", "expected_latency_ms"})
    )
