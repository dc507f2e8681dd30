"""Operator actions: write a policy into the registry (the audit trail), then tell the controller.

The registry is the source of truth. After the row is committed, a ``PolicyChanged`` notice goes to
``ldfleet/v1/ctl/policy-changed`` (QoS 1, not retained) so that a running controller re-resolves the
class (or device) at once; if the broker cannot be reached, the change still takes effect within the
controller's registry poll interval (2 s by default), and the caller is told.
"""

from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from ldfleet.common import topics
from ldfleet.common.mqtt import BrokerURL, new_id, parse_broker_url, publish_once
from ldfleet.common.schemas import DeviceProfile, PolicyChanged, utcnow
from ldfleet.server.policy import Resolution, pick_policy, resolve
from ldfleet.server.registry.models import Device, Policy
from ldfleet.server.registry.store import Registry

log = logging.getLogger("ldfleet.operator")


@dataclass
class ChangeResult:
    policy: Policy
    notified: bool
    notify_error: str | None = None
    #: Controllers whose retained status says online when the notice went out (None: not looked).
    controllers: list[str] | None = None


def default_operator() -> str:
    try:
        return getpass.getuser()[:128] or "operator"
    except Exception:  # noqa: BLE001
        return "operator"


def notify_controller(
    broker: str | BrokerURL,
    *,
    device_class: str | None = None,
    device_id: str | None = None,
    policy_version: int = 0,
    issued_by: str = "operator",
    timeout: float = 5.0,
) -> None:
    """Publish a PolicyChanged notice (raises ConnectionError when the broker is unreachable)."""
    url = broker if isinstance(broker, BrokerURL) else parse_broker_url(broker)
    notice = PolicyChanged(
        device_class=device_class, device_id=device_id, policy_version=policy_version,
        issued_by=issued_by[:128] or "operator", sent_at=utcnow(),
    )
    publish_once(url, [(topics.CTL_POLICY_CHANGED, notice.to_json(), 1, False)], timeout=timeout)


def _notify(broker: str | BrokerURL | None, row: Policy) -> tuple[bool, str | None]:
    if broker is None:
        return False, "no broker given"
    try:
        notify_controller(
            broker, device_class=row.device_class, device_id=row.device_id,
            policy_version=row.version, issued_by=row.issued_by,
        )
        return True, None
    except (ConnectionError, OSError, ValueError) as exc:
        log.info("policy stored, but the controller was not notified: %s", exc)
        return False, str(exc)


def set_budget(
    registry: Registry,
    broker: str | BrokerURL | None,
    device_class: str,
    *,
    keep: float | None = None,
    latency_ms: float | None = None,
    percentile: float | None = None,
    rtf: float | None = None,
    device_id: str | None = None,
    issued_by: str | None = None,
    expires_in_s: float | None = None,
    create_class: bool = False,
    comment: str | None = None,
    look_for_controllers: bool = False,
) -> ChangeResult:
    """Append a policy (refused with RegistryError when invalid; nothing written) and notify; with
    ``look_for_controllers``, also say which controllers are online to act on it (``controllers_online``,
    up to a few hundred ms more)."""
    expires_at: datetime | None = None
    if expires_in_s is not None:
        expires_at = utcnow() + timedelta(seconds=expires_in_s)
    row = registry.set_policy(
        device_class, keep=keep, latency_ms=latency_ms, percentile=percentile, rtf=rtf, device_id=device_id,
        issued_by=issued_by or default_operator(), expires_at=expires_at, create_class=create_class,
        comment=comment,
    )
    notified, err = _notify(broker, row)
    return ChangeResult(row, notified, err, controllers_online(broker) if notified and look_for_controllers else None)


def controllers_online(broker: str | BrokerURL, quiet_s: float = 0.3, max_s: float = 3.0) -> list[str]:
    """Ids of the controllers whose retained status (``ldfleet/v1/ctl/status/{id}``) says online: who
    will act on a notice now. A controller that died without its Last Will reaching the broker still
    looks online; one that stopped or lost its connection does not. Blocks up to ``max_s`` seconds."""
    from ldfleet.common.schemas import ControllerStatus, decode
    from ldfleet.server.snapshot import read_retained

    url = broker if isinstance(broker, BrokerURL) else parse_broker_url(broker)
    online: dict[str, bool] = {}

    def put(topic: str, payload: bytes, _retained: bool) -> None:
        status = decode(ControllerStatus, payload, topic=topic, logger=log)
        if status is not None and topics.parse_ctl_status(topic) == status.controller_id:
            online[status.controller_id] = status.online

    read_retained(url, f"ldfleet-operator-{new_id()[:8]}", put, quiet_s=quiet_s, max_s=max_s, filters=[topics.ALL_CONTROLLERS])
    return sorted(c for c, up in online.items() if up)


def preview_budget(registry: Registry, device_class: str, device_id: str | None = None) -> dict[str, tuple[Resolution, DeviceProfile]]:
    """What the budget in force for ``device_class`` (or ``device_id``'s override) resolves to on each
    device it covers, from the profiles in the registry: the controller's own ``resolve``, so ``budget
    set`` can say at once which k each device will run and where a target cannot be met
    (``Resolution.unmet``); with the profile each was resolved on. Devices with an override of their
    own, or no stored profile, are left out.
    """
    active = registry.active_policies()
    devices = [registry.device(device_id)] if device_id else registry.devices(device_class)
    out: dict[str, tuple[Resolution, DeviceProfile]] = {}
    for d in devices:
        if d is None or not d.profile:
            continue
        try:
            profile = DeviceProfile.model_validate(d.profile, strict=False)
        except ValueError:  # a profile stored by an older schema: the controller skips it too
            continue
        res = resolve(d.device_id, d.device_class, profile, active)
        if res.source == ("device" if device_id else "class"):
            out[d.device_id] = (res, profile)
    return out


def pending_policies(devices: list[Device], active: dict[str, Policy]) -> dict[str, int]:
    """Devices whose published desired policy comes from an older operator policy than the one in
    force for them now: no controller has resolved the change yet (none running, or not yet polled).
    Device id -> the registry policy version it should follow (0: the controller's default).

    Their ``converged`` (applied == desired) is true of a stale desired document, so it is not
    reported as converged. Devices without a desired document yet are left out.
    """
    out: dict[str, int] = {}
    for d in devices:
        if not d.desired:
            continue
        want = pick_policy(d.device_id, d.device_class, active)
        source, version = ("default", 0) if want is None else ("device" if want.device_id else "class", want.version)
        if (d.desired.get("source"), d.desired.get("policy_version", 0)) != (source, version):
            out[d.device_id] = version
    return out


def clear_budget(
    registry: Registry,
    broker: str | BrokerURL | None,
    device_class: str,
    *,
    device_id: str | None = None,
    issued_by: str | None = None,
) -> ChangeResult:
    row = registry.clear_policy(device_class, device_id=device_id, issued_by=issued_by or default_operator())
    notified, err = _notify(broker, row)
    return ChangeResult(row, notified, err)
