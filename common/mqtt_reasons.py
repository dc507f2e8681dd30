"""Why the broker refused or closed a connection, and what a client does about it.

One table, ``REASONS``: MQTT 5 reason code (CONNACK / DISCONNECT, OASIS MQTT 5.0 sections 3.2.2.2 and
3.14.2.1; paho maps MQTT 3.1.1 CONNACK return codes onto the same numbers) -> what to do and a
plain sentence for the log:

* ``FATAL``: retrying cannot help (bad user name or password, not authorised, banned, protocol
  version refused...): stop and say what to fix.
* ``BACKOFF``: transient (server busy, quota exceeded, packet too large, keep-alive timeout...):
  reconnect after an exponential delay with jitter, capped; ``slow`` codes start higher.
* ``TAKEOVER``: another client connected with the same client id (``0x8E`` Session taken over):
  for a device this means a second agent runs with the same device id. Back off hard; give up
  after a few.

A connection closed with no reason code (Mosquitto 2.0 closes a taken-over connection without
sending ``0x8E``; a network drop looks the same) counts as a takeover only when the agent has other
evidence of a duplicate (``ReconnectPolicy.duplicate_hint``); otherwise it is a plain backoff. The
attempt counter is reset only after a connection stayed up ``stable_s`` seconds, so a connection
that is accepted and then closed again at once backs off instead of looping every second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum


class Action(str, Enum):
    FATAL = "fatal"
    BACKOFF = "backoff"
    TAKEOVER = "takeover"


@dataclass(frozen=True)
class Reason:
    code: int
    action: Action
    text: str
    #: Start the backoff higher (the broker asked for less load).
    slow: bool = False


#: Closed without a reason code, or with 0x80 "Unspecified error" (socket closed, network drop).
UNSPECIFIED = 0x80
SESSION_TAKEN_OVER = 0x8E

_B, _F, _T = Action.BACKOFF, Action.FATAL, Action.TAKEOVER
REASONS: dict[int, Reason] = {r.code: r for r in (
    Reason(0x80, _B, "connection closed without a reason (network drop, broker restart, or the broker closed it)"),
    Reason(0x81, _B, "malformed packet"),
    Reason(0x82, _B, "protocol error"),
    Reason(0x83, _B, "implementation-specific error at the broker"),
    Reason(0x84, _F, "unsupported protocol version: try --mqtt-version 311"),
    Reason(0x85, _F, "client identifier not valid"),
    Reason(0x86, _F, "bad user name or password: check the credentials in the broker URL"),
    Reason(0x87, _F, "not authorised: the broker's ACL refuses this user"),
    Reason(0x88, _B, "server unavailable", slow=True),
    Reason(0x89, _B, "server busy", slow=True),
    Reason(0x8A, _F, "banned by the broker"),
    Reason(0x8B, _B, "server shutting down"),
    Reason(0x8C, _F, "bad authentication method"),
    Reason(0x8D, _B, "keep-alive timeout"),
    Reason(0x8E, _T, "session taken over: another client connected with the same client id"),
    Reason(0x8F, _B, "topic filter invalid"),
    Reason(0x90, _B, "topic name invalid"),
    Reason(0x93, _B, "receive maximum exceeded"),
    Reason(0x94, _B, "topic alias invalid"),
    Reason(0x95, _B, "packet too large: a message exceeded the broker's maximum packet size"),
    Reason(0x96, _B, "message rate too high", slow=True),
    Reason(0x97, _B, "quota exceeded", slow=True),
    Reason(0x98, _B, "closed by an administrative action"),
    Reason(0x99, _B, "payload format invalid"),
    Reason(0x9A, _F, "retained messages not supported by the broker (ldfleet needs them)"),
    Reason(0x9B, _F, "QoS not supported by the broker (ldfleet needs QoS 1)"),
    Reason(0x9C, _B, "broker asks to use another server"),
    Reason(0x9D, _B, "server moved"),
    Reason(0x9F, _B, "connection rate exceeded", slow=True),
    Reason(0xA2, _F, "wildcard subscriptions not supported by the broker (the controller needs them)"),
)}


def reason_for(code: int | None) -> Reason:
    """The table entry of ``code`` (None, 0 or an unknown failure code: the plain ``0x80`` backoff)."""
    if code is None or code == 0:
        return REASONS[UNSPECIFIED]
    return REASONS.get(code) or Reason(code, Action.BACKOFF, f"reason code 0x{code:02X}")


@dataclass(frozen=True)
class Verdict:
    """What to do after one refused or closed connection."""

    action: Action
    delay_s: float
    message: str


class ReconnectPolicy:
    """Exponential backoff with equal jitter (half fixed, half random), capped, per the table.

    ``delay = d/2 + uniform(0, d/2)`` with ``d = min(cap, base * 2**(attempt-1))``; ``base`` is
    ``base_s`` (``slow_base_s`` for slow codes, ``takeover_base_s`` for takeovers).
    ``max_takeovers`` takeovers without a stable connection in between make the verdict FATAL.
    """

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        slow_base_s: float = 5.0,
        takeover_base_s: float = 20.0,
        cap_s: float = 30.0,
        takeover_cap_s: float = 600.0,
        stable_s: float = 60.0,
        max_takeovers: int = 5,
        rng: random.Random | None = None,
    ) -> None:
        self.base_s = base_s
        self.slow_base_s = slow_base_s
        self.takeover_base_s = takeover_base_s
        self.cap_s = cap_s
        self.takeover_cap_s = max(cap_s, takeover_cap_s)
        self.stable_s = stable_s
        self.max_takeovers = max_takeovers
        self.rng = rng or random.Random()
        self.attempt = 0
        self.takeovers = 0
        #: Set by the owner when it has evidence of a duplicate client id (e.g. another boot of the
        #: same device announced itself): an unexplained close then counts as a takeover.
        self.duplicate_hint: str | None = None

    def connected_for(self, seconds: float) -> None:
        """A connection ended after ``seconds`` up: a stable one resets the counters."""
        if seconds >= self.stable_s:
            self.attempt = 0
            self.takeovers = 0

    def _delay(self, base: float, cap: float) -> float:
        d = min(cap, base * 2 ** max(0, self.attempt - 1))
        return d / 2 + self.rng.uniform(0, d / 2)

    def verdict(self, code: int | None, *, connected_s: float | None = None) -> Verdict:
        """Decide after a refusal (``connected_s`` None) or a close after ``connected_s`` seconds up."""
        if connected_s is not None:
            self.connected_for(connected_s)
        reason = reason_for(code)
        action = reason.action
        text = reason.text
        short = connected_s is not None and connected_s < self.stable_s
        if action is Action.BACKOFF and reason.code == UNSPECIFIED and short and self.duplicate_hint:
            action = Action.TAKEOVER
            text = f"connection closed {connected_s:.1f} s after connecting; {self.duplicate_hint}"
        if action is Action.FATAL:
            return Verdict(action, 0.0, f"{text} (reason code 0x{reason.code:02X}); not retrying")
        self.attempt += 1
        if action is Action.TAKEOVER:
            self.takeovers += 1
            if self.takeovers >= self.max_takeovers:
                return Verdict(Action.FATAL, 0.0, f"{text}; taken over {self.takeovers} times: giving up")
            delay = self._delay(self.takeover_base_s, self.takeover_cap_s)
            return Verdict(action, delay, f"{text} (takeover {self.takeovers} of at most {self.max_takeovers - 1}); "
                                          f"reconnecting in {delay:.1f} s")
        delay = self._delay(self.slow_base_s if reason.slow else self.base_s, self.cap_s)
        return Verdict(action, delay, f"{text} (reason code 0x{reason.code:02X}); reconnecting in {delay:.1f} s")
