"""The MQTT topic tree of the control plane, defined once.

```
ldfleet/v1/dev/{device_id}/status           device -> retained QoS1: birth (online); Last Will: offline
ldfleet/v1/dev/{device_id}/profile          device -> retained QoS1: DeviceProfile
ldfleet/v1/dev/{device_id}/policy/desired   controller -> retained QoS0: BudgetPolicy (this device only; its ack confirms it)
ldfleet/v1/dev/{device_id}/policy/reported  device -> retained QoS1: PolicyAck
ldfleet/v1/dev/{device_id}/telemetry        device -> QoS0: Telemetry
ldfleet/v1/dev/{device_id}/rebirth          controller -> QoS1: RebirthRequest (device re-announces)
ldfleet/v1/ctl/status/{controller_id}       controller -> retained QoS1: ControllerStatus; Last Will: offline
ldfleet/v1/ctl/policy-changed               operator CLI -> QoS1: PolicyChanged (controller re-resolves)
```

Every device topic carries the device id as its fourth level; per-device ACLs use the same id as
the MQTT username (``pattern write ldfleet/v1/dev/%u/...``). Device ids and class names are
restricted to ``[A-Za-z0-9._-]`` so that they can never contain MQTT wildcards or separators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

PREFIX = "ldfleet/v1"
DEV_ROOT = f"{PREFIX}/dev"
CTL_ROOT = f"{PREFIX}/ctl"

#: A device id (also its MQTT username under the production ACL): 1-64 characters, no wildcards.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: A device class name: same alphabet as device ids.
DEVICE_CLASS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


class Channel(str, Enum):
    """The per-device sub-topics (the part after ``ldfleet/v1/dev/{device_id}/``)."""

    STATUS = "status"
    PROFILE = "profile"
    POLICY_DESIRED = "policy/desired"
    POLICY_REPORTED = "policy/reported"
    TELEMETRY = "telemetry"
    #: Controller -> device: "re-announce yourself" (the idea of Sparkplug B's rebirth request).
    REBIRTH = "rebirth"


CTL_STATUS_ROOT = f"{CTL_ROOT}/status"
#: Subscription filter for every controller's liveness topic (``ctl_status``).
ALL_CONTROLLERS = f"{CTL_STATUS_ROOT}/+"
CTL_POLICY_CHANGED = f"{CTL_ROOT}/policy-changed"


def is_valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID_RE.match(device_id))


def device_topic(device_id: str, channel: Channel) -> str:
    """The topic of one device's channel; refuses ids that could break the tree."""
    if not is_valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: must match {DEVICE_ID_PATTERN}")
    return f"{DEV_ROOT}/{device_id}/{channel.value}"


def status(device_id: str) -> str:
    return device_topic(device_id, Channel.STATUS)


def profile(device_id: str) -> str:
    return device_topic(device_id, Channel.PROFILE)


def policy_desired(device_id: str) -> str:
    return device_topic(device_id, Channel.POLICY_DESIRED)


def policy_reported(device_id: str) -> str:
    return device_topic(device_id, Channel.POLICY_REPORTED)


def telemetry(device_id: str) -> str:
    return device_topic(device_id, Channel.TELEMETRY)


def rebirth(device_id: str) -> str:
    return device_topic(device_id, Channel.REBIRTH)


def ctl_status(controller_id: str) -> str:
    """One controller's liveness topic: each controller has its own, so that the retained status and
    Last Will of one never overwrite another's. Controller ids follow the device-id rule (ValueError)."""
    if not is_valid_device_id(controller_id):
        raise ValueError(f"invalid controller id {controller_id!r}: must match {DEVICE_ID_PATTERN}")
    return f"{CTL_STATUS_ROOT}/{controller_id}"


def parse_ctl_status(topic: str) -> str | None:
    """The controller id of a ``ctl/status/{controller_id}`` topic; None for any other topic."""
    prefix = CTL_STATUS_ROOT + "/"
    cid = topic[len(prefix):] if topic.startswith(prefix) else ""
    return cid if is_valid_device_id(cid) else None


def all_devices(channel: Channel) -> str:
    """Subscription filter for one channel of every device (``ldfleet/v1/dev/+/...``)."""
    return f"{DEV_ROOT}/+/{channel.value}"


def shared(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription ``$share/{group}/{filter}``: the broker hands each message to one
    member of the group (several controllers share the fleet's traffic). Retained messages are
    never delivered on a shared subscription (MQTT 5.0, 4.8.2)."""
    if not _DEVICE_ID_RE.match(group):
        raise ValueError(f"invalid shared-subscription group {group!r}: must match {DEVICE_ID_PATTERN}")
    return f"$share/{group}/{topic_filter}"


@dataclass(frozen=True)
class DeviceTopic:
    device_id: str
    channel: Channel


_CHANNELS = {c.value: c for c in Channel}


def parse_device_topic(topic: str) -> DeviceTopic | None:
    """``ldfleet/v1/dev/pi-01/policy/reported`` -> DeviceTopic("pi-01", POLICY_REPORTED); None if foreign."""
    prefix = DEV_ROOT + "/"
    if not topic.startswith(prefix):
        return None
    rest = topic[len(prefix):]
    device_id, sep, channel = rest.partition("/")
    if not sep or not is_valid_device_id(device_id):
        return None
    ch = _CHANNELS.get(channel)
    if ch is None:
        return None
    return DeviceTopic(device_id, ch)
