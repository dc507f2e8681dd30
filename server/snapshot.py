"""A shared-group controller's one look at the devices' retained state after it connects.

MQTT 5 shared subscriptions deliver no retained messages (MQTT 5.0, 4.8.2), so a controller in a
shared group (``--shared-group``) hears a device only when the device publishes something. Devices
that announced before the controller listened (a controller started or restarted after its fleet,
a new registry) would otherwise stay unknown to it until their own re-announcement (30 s or more,
``common/reannounce.py``); the registry poll and reconciliation only reach devices the registry
already knows.

So after each connect such a controller opens a second, short-lived MQTT session with plain
subscriptions to the devices' retained channels (status, profile, reported policy), hands each
*retained* message to the intake as if it had come on the shared subscription, ignores live ones
(the shared subscription delivers those, to one member of the group), and disconnects once no
retained message has arrived for ``quiet_s`` seconds (or after ``max_s``). Everything it hands on is
idempotent in the intake: statuses are ordered by boot and connection, acks are stored once, an
unchanged profile only re-sends the stored desired policy. Each member of a group reads the whole
snapshot, so a group of n controllers reads it n times: the price of a (re)connect, like the
re-publication of every desired policy that follows every connect anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ldfleet.common import topics
from ldfleet.common.mqtt import BrokerURL, tls_context

log = logging.getLogger("ldfleet.controller")

#: The retained device channels a controller reads (telemetry is not retained; desired policies are its own).
CHANNELS = (topics.Channel.STATUS, topics.Channel.PROFILE, topics.Channel.POLICY_REPORTED)


def read_retained(
    url: BrokerURL,
    client_id: str,
    put: Callable[[str, bytes, bool], Any],
    *,
    quiet_s: float = 2.0,
    max_s: float = 120.0,
    stop: threading.Event | None = None,
    filters: list[str] | None = None,
) -> int:
    """Hand every retained device message (or every retained message on ``filters``) to ``put(topic,
    payload, True)`` (called in paho's network thread: keep it short); returns how many. Blocks until the broker has sent nothing retained for
    ``quiet_s`` s after the subscription was acknowledged, ``max_s`` s passed or ``stop`` is set.
    A broker that cannot be reached or refuses the session gives 0 (logged): the devices still
    re-announce by themselves."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if url.username is not None:
        c.username_pw_set(url.username, url.password)
    if url.tls:
        c.tls_set_context(tls_context(url))
    stop = stop or threading.Event()
    subscribed, refused = threading.Event(), threading.Event()
    got = [0, time.monotonic()]  # retained messages, when the last one (or the SUBACK) came

    def on_connect(client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("retained-state reader: broker refused the session: %s", rc)
            refused.set()
        else:
            client.subscribe([(f, 1) for f in filters] if filters else [(topics.all_devices(ch), 1) for ch in CHANNELS])

    def on_subscribe(client: paho.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        got[1] = time.monotonic()
        subscribed.set()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:  # retained: sent because we subscribed; live ones come on the shared subscription
            got[0] += 1
            got[1] = time.monotonic()
            put(msg.topic, msg.payload, True)

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    deadline = time.monotonic() + max_s
    try:
        c.connect(url.host, url.port, keepalive=30, clean_start=True)
    except (OSError, ValueError) as exc:
        log.warning("retained-state reader: cannot reach %s: %s", url, exc)
        return 0
    c.loop_start()
    try:
        while not stop.wait(0.1) and not refused.is_set() and time.monotonic() < deadline:
            if subscribed.is_set() and time.monotonic() - got[1] >= quiet_s:
                break
    finally:
        c.disconnect()
        c.loop_stop()
    log.debug("read %d retained messages", got[0])
    return got[0]


def start_reader(url: BrokerURL, client_id: str, put: Callable[[str, bytes, bool], Any], stop: threading.Event) -> threading.Thread:
    """``read_retained`` in a daemon thread (the caller is paho's network thread: it must not block)."""
    t = threading.Thread(target=read_retained, args=(url, client_id, put), kwargs={"stop": stop}, name="retained-reader", daemon=True)
    t.start()
    return t
