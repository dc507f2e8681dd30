"""Which device each Flower node is, for the fleet's strategy.

A SuperNode is a number to Flower; ldfleet's records are per device. The directory asks each new
node once (a ``query`` message; the ClientApp answers with the device id and class it was started
with), takes a class an operator pinned in the registry (``ldfleet devices set-class``) over the
one the device reports, and traces every reply back to its node, including the errors the
SuperLink sends *from its own id* for a node that is gone ("Node Unavailable"), which answer the
message that was sent to that node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ldfleet.common import learning as L
from ldfleet.server.registry.store import Registry

log = logging.getLogger("ldfleet.server.strategy")


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    device_class: str


class NodeDirectory:
    """Node id -> :class:`DeviceInfo` (``devices``), the messages of the phase in flight, and the
    classes pinned in the registry (read once per round: :meth:`new_round`)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry
        self.devices: dict[int, DeviceInfo] = {}
        self.asked: list[Message] = []
        self._pinned: dict[str, str] | None = None

    def new_round(self) -> None:
        self._pinned = None  # an operator may have pinned a class since

    def identify(self, grid: Grid, *, num_layers: int, min_nodes: int, wait_nodes_s: float, timeout: float) -> dict[int, DeviceInfo]:
        """Wait up to ``wait_nodes_s`` s for ``min_nodes`` nodes, ask every node not yet known which
        device it is (at most ``timeout`` s for the answers: a node that died without the SuperLink
        noticing yet never answers), and return the known nodes that are still connected."""
        deadline = time.monotonic() + wait_nodes_s
        while len(list(grid.get_node_ids())) < min_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
        unknown = [n for n in grid.get_node_ids() if n not in self.devices]
        if unknown:
            cfg = ConfigRecord({L.M_NUM_LAYERS: num_layers})
            msgs = [Message(RecordDict({L.CONFIG: cfg}), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
            for reply in grid.send_and_receive(msgs, timeout=timeout):
                if reply.has_error() or L.DEVICE not in reply.content.config_records:
                    log.warning("node %d did not say which device it is: %s", reply.metadata.src_node_id,
                                reply.error.reason if reply.has_error() else "no device record")
                    continue
                rec = reply.content.config_records[L.DEVICE]
                did = str(rec[L.NODE_DEVICE_ID])
                self.devices[reply.metadata.src_node_id] = DeviceInfo(did, self.class_of(did, str(rec[L.NODE_DEVICE_CLASS])))
        live = set(grid.get_node_ids())
        return {n: d for n, d in self.devices.items() if n in live}

    def send(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Iterable[Message]:
        """``grid.send_and_receive``, remembering the messages: their ids (set as they are pushed)
        trace error replies back to their nodes."""
        self.asked = list(messages)
        return grid.send_and_receive(self.asked, timeout=timeout)

    def node_of(self, reply: Message) -> int:
        """The node a reply is about (see the module docstring for the SuperLink's own errors)."""
        node = reply.metadata.src_node_id
        if node in self.devices:
            return node
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in self.asked if m.metadata.message_id}
        return asked.get(reply.metadata.reply_to_message_id, node)

    def device_of(self, node: int) -> DeviceInfo:
        return self.devices.get(node, DeviceInfo(f"node-{node}", "unknown"))

    def class_of(self, device_id: str, reported: str) -> str:
        """The class pinned in the registry for ``device_id``, else the one it ``reported``."""
        if self.registry is None:
            return reported
        if self._pinned is None:
            try:
                self._pinned = {d.device_id: d.device_class for d in self.registry.devices() if d.class_pinned and d.device_class}
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not fail the round
                log.warning("cannot read pinned device classes: %s", exc)
                self._pinned = {}
        return self._pinned.get(device_id, reported)
