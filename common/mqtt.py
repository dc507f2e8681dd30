"""Broker URLs and the paho-mqtt session used by the device agent and the controller.

Broker URLs are parsed here once: ``mqtt://[user:pass@]host[:port]`` (plain TCP, default port 1883)
and ``mqtts://[user:pass@]host[:port]`` (TLS, default port 8883, verified against ``ca_file`` or the
system trust store). User name and password are percent-decoded.

``MqttSession`` wraps a paho 2.x client the way PITFALLS.md asks: callback API version 2,
``connect_async`` + ``loop_start``, subscriptions renewed in ``on_connect``, every user handler
wrapped so that an exception is logged instead of killing paho's network thread, bounded outgoing
queue. Every refusal or close is read through ``ldfleet.common.mqtt_reasons``: the reason is logged
plainly, a fatal one (bad credentials, not authorised...) stops the session and calls ``on_fatal``,
any other sets paho's next reconnect delay from the ``ReconnectPolicy`` (exponential, jitter, cap).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ldfleet.common.mqtt_reasons import Action, ReconnectPolicy, Verdict, reason_for

log = logging.getLogger("ldfleet.mqtt")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class _PahoNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR when its loop runs once more after a clean
    disconnect, and "failed to receive on socket" at ERROR when the broker goes away: noise, not
    errors (the session says that the connection was lost, and reconnects). The first is dropped,
    the second kept at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Client is not connected" in message:
            return False
        if record.levelno >= logging.ERROR and message.startswith(("failed to receive on socket", "failed to send")):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("ldfleet.mqtt.paho").isEnabledFor(logging.DEBUG)
        return True


_paho_log = logging.getLogger("ldfleet.mqtt.paho")
_paho_log.addFilter(_PahoNoise())


@dataclass(frozen=True)
class BrokerURL:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def redacted(self) -> str:
        """The URL with the password hidden (for logs and error messages)."""
        auth = ""
        if self.username is not None:
            auth = self.username + (":***" if self.password is not None else "") + "@"
        return f"{self.scheme}://{auth}{self.host}:{self.port}"

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        return replace(self, username=username, password=password)

    def __str__(self) -> str:  # never print a password by accident
        return self.redacted()


def parse_broker_url(
    url: str,
    *,
    ca_file: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> BrokerURL:
    """Parse ``mqtt://`` / ``mqtts://`` URLs; explicit ``username``/``password`` override the URL's.
    Raises ValueError naming the URL with its password hidden."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    shown = _hide_password(url.strip())
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {shown!r}")
    if not parts.hostname:
        raise ValueError(f"broker URL has no host: {shown!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        hint = "; a / ? or # in the password must be percent-encoded (%2F %3F %23)" if "@" in url else ""
        raise ValueError(f"broker URL must be scheme://[user:pass@]host[:port], got {shown!r}{hint}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"bad port in broker URL {shown!r}: {exc}") from None
    user = unquote(parts.username) if parts.username is not None else None
    pwd = unquote(parts.password) if parts.password is not None else None
    if ca_file and scheme != "mqtts":
        raise ValueError("--ca-file only makes sense with an mqtts:// broker URL")
    return BrokerURL(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        username=username if username is not None else user,
        password=password if password is not None else pwd,
        ca_file=ca_file,
    )


def _hide_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``. Read off the
    text itself, not ``urlsplit``'s parts: a password with an unencoded ``/``, ``?`` or ``#`` ends
    the URL's authority early, and ``urlsplit`` then sees no password at all."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{host}" if colon else url


def paho_protocol(mqtt_version: int) -> int:
    """paho's protocol constant for ``5`` (MQTT 5, the default: reason codes on refusals) or
    ``311`` (MQTT 3.1.1, for brokers that speak nothing newer; a refused publish is then silent)."""
    versions = {5: paho.MQTTv5, 311: paho.MQTTv311}
    if mqtt_version not in versions:
        raise ValueError(f"MQTT version must be 5 or 311, got {mqtt_version}")
    return versions[mqtt_version]


def tls_context(url: BrokerURL) -> ssl.SSLContext:
    """Client TLS context for an mqtts:// URL (server certificate and host name verified)."""
    ctx = ssl.create_default_context(cafile=url.ca_file)
    return ctx


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


MessageHandler = Callable[[str, bytes, bool], None]

#: Reconnect delay after a fatal verdict: never (the network thread is stopped meanwhile).
_NEVER_S = 10.0**9


class MqttSession:
    """A long-lived paho client that reconnects by itself and renews its subscriptions.

    ``on_message(topic, payload, retained)`` runs in paho's network thread: keep it short (the
    controller only enqueues). ``on_connected()`` runs after every successful (re)connect, after
    the subscriptions were sent: publish birth messages there.
    """

    def __init__(
        self,
        url: BrokerURL,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: MessageHandler | None = None,
        on_connected: Callable[[], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        will: Will | None = None,
        protocol: int = paho.MQTTv5,
        keepalive: int = 30,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        max_queued: int = 10_000,
        max_inflight: int = 100,
        policy: ReconnectPolicy | None = None,
        connect_properties: dict[str, int] | None = None,
    ) -> None:
        self.url = url
        #: MQTT 5 CONNECT properties by paho name, e.g. ``{"ReceiveMaximum": 65535}`` (ignored on 3.1.1)
        self.connect_properties = dict(connect_properties or {})
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_fatal = on_fatal
        self.policy = policy or ReconnectPolicy(base_s=reconnect_min_s, cap_s=reconnect_max_s)
        #: Why the session gave up for good (a fatal refusal or too many takeovers), else None.
        self.fatal: str | None = None
        self._connected_at: float | None = None
        self._protocol = protocol
        self._keepalive = keepalive
        self._connected = threading.Event()
        self._started = False
        self._stopping = False
        self.connect_count = 0
        self.last_connect_error: str | None = None
        #: QoS 1 publishes the broker refused (MQTT 5 PUBACK >= 0x80, e.g. "Not authorized" by an ACL)
        self.refused_publishes = 0
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        c.suppress_exceptions = True
        c.enable_logger(_paho_log)
        c.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
        c.on_connect_fail = self._handle_connect_fail
        c.max_queued_messages_set(max_queued)
        c.max_inflight_messages_set(max_inflight)
        if url.username is not None:
            c.username_pw_set(url.username, url.password)
        if url.tls:
            c.tls_set_context(tls_context(url))
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        self.client = c

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._stopping = False
        self.fatal = None
        kw: dict[str, Any] = {}
        if self._protocol == paho.MQTTv5:
            kw["clean_start"] = True
            if self.connect_properties:
                props = Properties(PacketTypes.CONNECT)
                for name, value in self.connect_properties.items():
                    setattr(props, name, value)
                kw["properties"] = props
        self.client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive, **kw)
        self.client.loop_start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: Sequence[tuple[str, bytes, int, bool]] = (), timeout: float = 5.0) -> str:
        """Publish ``final`` messages (if connected: an agent's or controller's retained offline status),
        disconnect cleanly, stop the network thread. Returns what became of ``final``, for the caller's
        "stopped" log line."""
        sent = self.connected
        said = "offline status published" if sent else f"not connected to {self.url}: no offline status sent"
        if not self._started:
            return said
        self._stopping = True
        if sent:
            for topic, payload, qos, retain in final:
                try:
                    info = self.client.publish(topic, payload, qos=qos, retain=retain)
                    info.wait_for_publish(timeout)
                except Exception as exc:  # noqa: BLE001 - shutting down anyway
                    log.debug("final publish to %s failed: %s", topic, exc)
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.client.loop_stop()
        self._connected.clear()
        self._started = False
        self._stopping = False
        return said

    def set_will(self, will: Will) -> None:
        """Replace the Last Will sent with the next CONNECT (call between connections, e.g. in
        ``on_disconnected``, so that each connection's death carries that connection's number)."""
        self.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        """Queue a message; QoS>0 messages published while disconnected go out after reconnect."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish to %s not queued: %s", topic, paho.error_string(info.rc))
        return info

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self.last_connect_error = str(reason_code)
                self._follow(self.policy.verdict(reason_code.value), "broker refused the connection")
                return
            self.connect_count += 1
            self.last_connect_error = None
            self._connected_at = time.monotonic()
            if self.subscriptions:
                if self._protocol == paho.MQTTv5:
                    subs = [(t, SubscribeOptions(qos=q)) for t, q in self.subscriptions]
                else:
                    subs = list(self.subscriptions)
                client.subscribe(subs)
            log.info("%s: connected to %s (connection #%d)", self.client_id, self.url, self.connect_count)
            self._connected.set()
            if self._on_connected is not None:
                self._on_connected()
        except Exception:  # noqa: BLE001 - never let paho's thread die
            log.exception("%s: on_connect handler failed", self.client_id)

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        v = self.policy.verdict(None)
        log.warning("%s: cannot reach broker %s; reconnecting in %.1f s", self.client_id, self.url, v.delay_s)
        self._set_delay(v.delay_s)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        up = time.monotonic() - self._connected_at if self._connected_at is not None else None
        self._connected_at = None
        if self._stopping or self.fatal is not None:
            log.debug("%s: disconnected from %s", self.client_id, self.url)
        elif up is not None:
            self._follow(self.policy.verdict(getattr(reason_code, "value", None), connected_s=up), "disconnected")
        try:
            if self._on_disconnected is not None:
                self._on_disconnected()
        except Exception:  # noqa: BLE001
            log.exception("%s: on_disconnect handler failed", self.client_id)

    def _set_delay(self, seconds: float) -> None:
        # paho waits min_delay before its next attempt after reconnect_delay_set (it resets its own doubling)
        self.client.reconnect_delay_set(min_delay=seconds, max_delay=seconds)  # type: ignore[arg-type]

    def _follow(self, v: Verdict, what: str) -> None:
        """Log a verdict plainly and act on it: stop for good, or wait ``v.delay_s`` before the next try."""
        if v.action is Action.FATAL:
            self.fatal = f"{what} by {self.url}: {v.message}"
            log.error("%s: %s", self.client_id, self.fatal)
            # paho would reconnect after this callback whatever we call here: make its next wait
            # endless, then end its network thread from outside it (loop_stop joins the thread)
            self._set_delay(_NEVER_S)
            threading.Thread(target=self.client.loop_stop, name=f"mqtt-stop-{self.client_id}", daemon=True).start()
            if self._on_fatal is not None:
                try:
                    self._on_fatal(self.fatal)
                except Exception:  # noqa: BLE001
                    log.exception("%s: on_fatal handler failed", self.client_id)
            return
        log.warning("%s: %s by %s: %s", self.client_id, what, self.url, v.message)
        self._set_delay(v.delay_s)

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self.refused_publishes += 1
            log.warning("%s: broker refused publish #%d: %s (check the ACL)", self.client_id, mid, reason_code)

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:  # noqa: BLE001 - one bad message never stops a subscriber
            log.exception("%s: handler failed on %s", self.client_id, msg.topic)


def new_id(prefix: str = "") -> str:
    """Short random id (boot ids, client id suffixes)."""
    return prefix + uuid.uuid4().hex[:12]


def publish_once(
    url: BrokerURL,
    messages: Sequence[tuple[str, bytes, int, bool]],
    *,
    client_id: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Connect, publish ``(topic, payload, qos, retain)`` messages, wait for their PUBACKs, disconnect.

    Used by the operator CLI to notify the controller. Raises ``ConnectionError`` when the broker
    cannot be reached or refuses the connection within ``timeout``.
    """
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or new_id("ldfleet-cli-"), protocol=paho.MQTTv5)
    if url.username is not None:
        c.username_pw_set(url.username, url.password)
    if url.tls:
        c.tls_set_context(tls_context(url))
    done = threading.Event()
    err: list[str] = []

    def on_connect(client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            err.append(f"{reason_for(rc.value).text} (reason code 0x{rc.value:02X})")
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(url.host, url.port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"cannot reach MQTT broker {url}: {exc}") from None
    c.loop_start()
    try:
        if not done.wait(timeout):
            raise ConnectionError(f"MQTT broker {url} did not answer within {timeout:.0f} s")
        if err:
            raise ConnectionError(f"MQTT broker {url} refused the connection: {err[0]}")
        infos = [c.publish(t, p, qos=q, retain=r) for t, p, q, r in messages]
        for info in infos:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise ConnectionError(f"MQTT broker {url} did not acknowledge a publish within {timeout:.0f} s")
    finally:
        c.disconnect()
        c.loop_stop()

