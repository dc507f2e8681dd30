"""The controllers sharing one fleet (a shared group), and each one's share of the devices.

Every controller publishes a retained status on its own topic (``ldfleet/v1/ctl/status/{id}``, Last
Will: offline) and hears everyone's. A device belongs to the online controller at
``crc32(device id) mod n`` in the sorted list of the n online controller ids (this controller always
counts itself). Shares decide who does fleet-wide work that every member hears: resolving a class
after an operator's notice, re-resolving after an expiry or a (re)connect, asking lagging devices to
re-announce. Work that arrives through the shared subscription (one device's profile or ack) is done
by whoever received it.

Views of the group differ for a moment when a member comes or goes (statuses arrive one by one), so
a device may fall in two shares or in none. Two is harmless: versions are claimed in the registry
and rebirth requests are idempotent. None is repaired by the change itself: every change of the
group is reported once (``take_changed``), and the controller then re-resolves its new share of the
whole fleet, which publishes nothing where the policy is already in force.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

from ldfleet.common.schemas import ControllerStatus

log = logging.getLogger("ldfleet.controller")


class Group:
    """The group as one controller sees it. ``online``: controller id -> online, from statuses."""

    def __init__(self, controller_id: str, boot_id: str | None = None) -> None:
        self.controller_id = controller_id
        self.boot_id = boot_id  # this controller's boot: a status of its id from another boot is a namesake
        #: Called when a namesake's "offline" replaced this controller's retained status (a second
        #: controller with this id stopped): the controller says it is online again.
        self.on_overwritten: Callable[[], None] | None = None
        self.online: dict[str, bool] = {}
        self._changed = False
        self._namesakes: set[str] = set()

    def note(self, status: ControllerStatus) -> None:
        """A controller's (retained) status. A peer coming online or going offline is a change."""
        cid = status.controller_id
        if cid == self.controller_id and self.boot_id and status.boot_id != self.boot_id:
            if status.online and status.boot_id not in self._namesakes:
                self._namesakes.add(status.boot_id)
                log.warning("another controller says it runs as %r (boot %s): two controllers with one id overwrite each "
                            "other's status and Last Will; give each its own --controller-id (a status left by one that "
                            "crashed while the broker was down says this too, and is harmless)", cid, status.boot_id)
            if not status.online and self.on_overwritten is not None:
                self.on_overwritten()
            return  # this controller's own liveness is its own, whatever a namesake says
        before = self.online.get(cid, False)
        self.online[cid] = status.online
        if cid != self.controller_id and before != status.online:
            self._changed = True

    def take_changed(self) -> bool:
        """Whether the group changed since the last call (then the shares moved)."""
        changed, self._changed = self._changed, False
        return changed

    def share(self) -> Callable[[str], bool]:
        """-> ``mine(device_id)``: whether the device is in this controller's share."""
        live = sorted({c for c, up in self.online.items() if up} | {self.controller_id})
        if len(live) == 1:
            return lambda device_id: True
        me = live.index(self.controller_id)
        return lambda device_id: zlib.crc32(device_id.encode()) % len(live) == me
