"""Waiting for the fleet's control plane: devices registered, desired policies applied.

Used by `ldfleet simulate` between its phases and around scheduled budget events; all waits poll
the registry (or any predicate) and give up after a timeout, returning what is still pending.
"""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    """Poll ``predicate`` every ``step`` s until it holds or ``timeout`` s pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def wait_registered(registry, device_ids: set[str], timeout: float) -> set[str]:
    """Devices whose profile the controller has registered; returns those still missing."""
    def missing() -> set[str]:
        known = {d.device_id for d in registry.devices() if d.profile is not None}
        return device_ids - known

    wait_until(lambda: not missing(), timeout)
    return missing()


def wait_converged(registry, device_ids: set[str], timeout: float, device_class: str | None = None,
                   policy_version: int | None = None) -> set[str]:
    """Devices that have not applied their desired policy (optionally: at least a class policy version).

    Every simulated agent stays connected, so a device not yet seen online (its birth message can
    trail its profile) is pending too."""
    def pending() -> set[str]:
        out = set()
        devices = registry.devices(device_class)
        out |= device_ids - {d.device_id for d in devices} if device_class is None else set()
        for d in devices:
            if d.device_id not in device_ids:
                continue
            if not d.online:
                out.add(d.device_id)
                continue
            if d.desired_version == 0 or d.applied_version != d.desired_version:
                out.add(d.device_id)
            elif policy_version is not None and (d.desired or {}).get("source") == "class" \
                    and int((d.desired or {}).get("policy_version", 0)) < policy_version:
                out.add(d.device_id)
        return out

    wait_until(lambda: not pending(), timeout)
    return pending()
