"""Every control-plane payload as a versioned pydantic model, and the one way to parse them.

Each payload carries ``"schema": "ldfleet.<kind>/<major>"``. A receiver accepts exactly the major
version it knows; a new major means a new schema string (and, if needed, a new topic prefix).

Parsing rules (``parse_payload`` / ``decode``), applied to everything read from the network:

* the raw payload is refused before parsing when it exceeds ``MAX_PAYLOAD_BYTES`` (16 KiB; the
  largest legitimate payload, a 256-layer profile, is about 6 KiB);
* it must be a JSON object; the ``schema`` field must be present and equal the model's;
* a key given twice in one object is refused (a JSON parser keeps the last one silently, so two
  readers of the same bytes could disagree; RFC 8259 section 4 leaves duplicates undefined);
* unknown fields are refused (``extra="forbid"``), types are strict (no ``"1"`` for 1, no 1.5 for
  an int), floats must be finite (NaN/Infinity refused), ranges are checked;
* the ``device_id`` inside a device payload must equal the device id of the topic it came on.

``decode`` logs the reason of every refusal at WARNING and returns None: a subscriber drops the
message and carries on.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ldfleet.common.budget import MAX_LATENCY_MS, MAX_RTF, budget_text, check_budget
from ldfleet.common.topics import DEVICE_CLASS_PATTERN, DEVICE_ID_PATTERN

log = logging.getLogger("ldfleet.contracts")

#: Largest payload any control-plane subscriber will parse, in bytes (checked before parsing).
MAX_PAYLOAD_BYTES = 16 * 1024
#: Most encoder layers a profile or policy may describe.
MAX_LAYERS = 256

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
DeviceClass = Annotated[str, Field(pattern=DEVICE_CLASS_PATTERN)]
ShortText = Annotated[str, Field(min_length=1, max_length=128)]
Ms = Annotated[float, Field(ge=0.0, le=1e7)]
Version = Annotated[int, Field(ge=0, le=2**53)]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Payload(BaseModel):
    """Base of every wire payload: strict, closed, finite, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        populate_by_name=True,
        frozen=True,
    )
    SCHEMA: ClassVar[str] = ""

    def to_json(self) -> bytes:
        """Wire form (``schema`` spelled as such, UTF-8 JSON)."""
        return self.model_dump_json(by_alias=True).encode()


class DeviceProfile(Payload):
    """A device's compute profile, measured on the device at a reference input length."""

    SCHEMA: ClassVar[str] = "ldfleet.profile/1"
    schema_: Literal["ldfleet.profile/1"] = Field("ldfleet.profile/1", alias="schema")
    device_id: DeviceId
    device_class: DeviceClass
    revision: Version = 0
    cores: int = Field(ge=1, le=4096)
    memory_mb: int = Field(ge=0, le=1 << 30)
    accelerator: str | None = Field(None, max_length=64)
    model_id: str = Field(min_length=1, max_length=200)
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    front_end_ms: Ms = 0.0
    #: Measured per-layer latency (ms), one per encoder layer; empty when not measured.
    layer_ms: list[Ms] = Field(default_factory=list, max_length=MAX_LAYERS)
    reference_seconds: float = Field(1.0, gt=0.0, le=600.0)
    #: End-to-end latency at the 90th / 99th percentile divided by the median, when measured.
    latency_ratio_p90: float | None = Field(None, ge=1.0, le=100.0)
    latency_ratio_p99: float | None = Field(None, ge=1.0, le=100.0)
    battery: float | None = Field(None, ge=0.0, le=1.0)
    load: float | None = Field(None, ge=0.0, le=1e4)
    measured_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _layers_match(self) -> DeviceProfile:
        if self.layer_ms and len(self.layer_ms) != self.num_layers:
            raise ValueError(
                f"layer_ms has {len(self.layer_ms)} entries but num_layers is {self.num_layers}"
            )
        return self


class Status(Payload):
    """Birth (online) and death (offline, sent as the Last Will) of one device connection.

    Ordered as Sparkplug B orders births and deaths with ``bdSeq``: ``boot_seq`` counts the agent's
    starts on this device (kept in its state folder, so it only goes up), ``seq`` numbers the
    connections of one boot, and a connection's birth and its Last Will carry the same ``seq``.
    A receiver never lets a message of an earlier boot or connection override a later one
    (``ldfleet.server.liveness``). ``boot_seq`` 0: an agent that predates the counter.
    """

    SCHEMA: ClassVar[str] = "ldfleet.status/1"
    schema_: Literal["ldfleet.status/1"] = Field("ldfleet.status/1", alias="schema")
    device_id: DeviceId
    online: bool
    #: Random id of the agent process; changes when the device restarts.
    boot_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    #: Number of this boot on the device (1, 2, ...; 0 = unknown, an older agent).
    boot_seq: Version = 0
    #: Number of the connection of this boot that the message is about (1 = first connect).
    seq: Version = 0
    sent_at: AwareDatetime | None = None


class BudgetPolicy(Payload):
    """The desired policy of one device (the controller's resolution of override > class > default).

    ``version`` is per device and only goes up. Exactly one of ``keep``, ``latency_ms`` (ms per input)
    and ``rtf`` (real-time factor: ms of compute per ms of audio) is set (``ldfleet.common.budget``);
    ``k`` is the controller's resolution with the device's profile (None when it had no per-layer
    latency to resolve a target with; the device then resolves it itself). ``rtf`` is left out of the
    wire form when unset, so agents that predate it still read every other policy.
    """

    SCHEMA: ClassVar[str] = "ldfleet.policy/1"
    schema_: Literal["ldfleet.policy/1"] = Field("ldfleet.policy/1", alias="schema")
    device_id: DeviceId
    version: int = Field(ge=1, le=2**53)
    source: Literal["device", "class", "default"]
    device_class: DeviceClass | None = None
    #: Version of the registry policy this was resolved from (per class or per device; 0 = default).
    policy_version: Version = 0
    keep: float | None = Field(None, gt=0.0, le=1.0)
    latency_ms: float | None = Field(None, gt=0.0, le=MAX_LATENCY_MS)
    rtf: float | None = Field(None, gt=0.0, le=MAX_RTF)
    percentile: float | None = Field(None, gt=0.0, lt=100.0)
    k: int | None = Field(None, ge=1, le=MAX_LAYERS)
    num_layers: int | None = Field(None, ge=1, le=MAX_LAYERS)
    expected_latency_ms: Ms | None = None
    issued_at: AwareDatetime
    issued_by: ShortText
    expires_at: AwareDatetime | None = None
    #: Seconds this policy stays valid after it was sent (``expires_at`` minus the controller's clock
    #: at sending): a device counts it from its own receipt, so its clock need not be right.
    #: None: no expiry, or a controller that predates the field (then ``expires_at`` is compared
    #: with the device's clock).
    ttl_s: float | None = Field(None, ge=0.0, le=1e10)
    sent_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetPolicy:
        check_budget(self.keep, self.latency_ms, self.rtf, self.percentile)
        if self.k is not None and self.num_layers is not None and self.k > self.num_layers:
            raise ValueError(f"k={self.k} exceeds num_layers={self.num_layers}")
        return self

    def expired(self, now: datetime | None = None) -> bool:
        """Expired on arrival: ``ttl_s`` is 0 (the controller's clock), else ``expires_at`` has passed
        by ``now`` (the receiver's clock; only for documents without ``ttl_s``)."""
        if self.ttl_s is not None:
            return self.ttl_s <= 0.0
        return self.expires_at is not None and (now or utcnow()) >= self.expires_at

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude={"rtf"} if self.rtf is None else None).encode()

    def budget_text(self) -> str:
        """``keep 0.5``, ``latency 40 ms @p99`` or ``RTF 0.05``."""
        return budget_text(self.keep, self.latency_ms, self.rtf, self.percentile)

    def stamped(self, now: datetime) -> BudgetPolicy:
        """The document as sent at ``now`` (sender's clock): ``sent_at`` and the ``ttl_s`` left."""
        return self.model_copy(update={"sent_at": now, "ttl_s": ttl_left(self.expires_at, now)})


def ttl_left(expires_at: datetime | None, now: datetime) -> float | None:
    """Seconds from ``now`` to ``expires_at`` (ms resolution, never negative); None: no expiry."""
    return None if expires_at is None else max(0.0, round((expires_at - now).total_seconds(), 3))


class PolicyAck(Payload):
    """A device's answer to a desired policy (its reported state)."""

    SCHEMA: ClassVar[str] = "ldfleet.ack/1"
    schema_: Literal["ldfleet.ack/1"] = Field("ldfleet.ack/1", alias="schema")
    device_id: DeviceId
    #: The desired version this ack answers (0: a re-announcement with nothing new to answer).
    version: Version = 0
    #: The version in force on the device after this ack (0: none applied yet).
    applied_version: Version
    status: Literal["applied", "rejected"]
    #: Why it was rejected; on an applied policy, why its target will be missed (``unmet_target``).
    reason: str | None = Field(None, max_length=500)
    effective_k: int | None = Field(None, ge=1, le=MAX_LAYERS)
    expected_latency_ms: Ms | None = None
    acked_at: AwareDatetime | None = None


#: Most requests one inference summary may count (about 1000 requests/s over a 10-minute window).
MAX_SUMMARY_REQUESTS = 600_000
Count = Annotated[int, Field(ge=0, le=MAX_SUMMARY_REQUESTS)]


class InferenceSummary(Payload):
    """What a device's inference service did in the last ``window_s`` seconds (issue 10).

    ``k_counts[j]``: requests run with k = j + 1 layers; ``layer_counts[i]``: requests that ran
    encoder layer i; ``p50_ms`` / ``p99_ms``: end-to-end latency percentiles of those requests;
    ``deadline_misses``: requests over their latency target; ``interventions``: requests the
    governor ran with fewer layers than the policy allowed. Values that cannot all be true together
    (layer counts above the request count, k counts not adding up, p50 > p99) are refused.
    """

    SCHEMA: ClassVar[str] = "ldfleet.inference-summary/1"
    schema_: Literal["ldfleet.inference-summary/1"] = Field("ldfleet.inference-summary/1", alias="schema")
    window_s: float = Field(gt=0.0, le=86_400.0)
    requests: Count
    errors: Count = 0
    k_counts: list[Count] = Field(max_length=MAX_LAYERS)
    layer_counts: list[Count] = Field(max_length=MAX_LAYERS)
    p50_ms: Ms | None = None
    p99_ms: Ms | None = None
    deadline_misses: Count = 0
    interventions: Count = 0

    @model_validator(mode="after")
    def _consistent(self) -> InferenceSummary:
        if len(self.k_counts) != len(self.layer_counts):
            raise ValueError(f"k_counts has {len(self.k_counts)} entries, layer_counts {len(self.layer_counts)}")
        if sum(self.k_counts) != self.requests:
            raise ValueError(f"k_counts add up to {sum(self.k_counts)}, not requests={self.requests}")
        if max(self.layer_counts, default=0) > self.requests:
            raise ValueError("a layer ran more often than there were requests")
        layers_run = sum((j + 1) * n for j, n in enumerate(self.k_counts))
        if sum(self.layer_counts) != layers_run:
            raise ValueError(f"layer_counts add up to {sum(self.layer_counts)}, k_counts imply {layers_run}")
        if max(self.deadline_misses, self.interventions) > self.requests:
            raise ValueError("more deadline misses or interventions than requests")
        if self.p50_ms is not None and self.p99_ms is not None and self.p50_ms > self.p99_ms:
            raise ValueError(f"p50_ms {self.p50_ms} > p99_ms {self.p99_ms}")
        if self.requests > max(1.0, self.window_s) * 1000:
            raise ValueError(f"{self.requests} requests in {self.window_s} s is over 1000 per second")
        return self


class Telemetry(Payload):
    """Occasional device measurements outside federated rounds (QoS 0, not retained); ``inference``
    when the device serves requests (``ldfleet serve``)."""

    SCHEMA: ClassVar[str] = "ldfleet.telemetry/1"
    schema_: Literal["ldfleet.telemetry/1"] = Field("ldfleet.telemetry/1", alias="schema")
    device_id: DeviceId
    sent_at: AwareDatetime | None = None
    load: float | None = Field(None, ge=0.0, le=1e4)
    battery: float | None = Field(None, ge=0.0, le=1.0)
    mean_kept_layers: float | None = Field(None, ge=0.0, le=MAX_LAYERS)
    layer_usage: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(None, max_length=MAX_LAYERS)
    accuracy: float | None = Field(None, ge=0.0, le=1.0)
    latency_ms: Ms | None = None
    inference: InferenceSummary | None = None


class ControllerStatus(Payload):
    """Controller liveness on ``ldfleet/v1/ctl/status/{controller_id}`` (retained; Last Will says offline)."""

    SCHEMA: ClassVar[str] = "ldfleet.ctl-status/1"
    schema_: Literal["ldfleet.ctl-status/1"] = Field("ldfleet.ctl-status/1", alias="schema")
    controller_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    online: bool
    boot_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    sent_at: AwareDatetime | None = None


class PolicyChanged(Payload):
    """Operator notice on ``ldfleet/v1/ctl/policy-changed``: re-resolve these devices now.

    Neither class nor device: re-resolve the whole fleet. The registry is the source of truth;
    the notice only says when to look (the controller also polls the registry as a safety net).
    """

    SCHEMA: ClassVar[str] = "ldfleet.policy-changed/1"
    schema_: Literal["ldfleet.policy-changed/1"] = Field("ldfleet.policy-changed/1", alias="schema")
    device_class: DeviceClass | None = None
    device_id: DeviceId | None = None
    policy_version: Version = 0
    issued_by: ShortText = "operator"
    sent_at: AwareDatetime | None = None


class RebirthRequest(Payload):
    """Controller -> one device on ``ldfleet/v1/dev/{id}/rebirth``: publish your birth status,
    profile and last ack again (Sparkplug B's "rebirth" idea). Sent by the controller's
    reconciliation when the registry lacks the device's state or its ack of the current version;
    rate-limited there, and harmless to repeat (everything re-announced is retained and versioned).
    """

    SCHEMA: ClassVar[str] = "ldfleet.rebirth/1"
    schema_: Literal["ldfleet.rebirth/1"] = Field("ldfleet.rebirth/1", alias="schema")
    device_id: DeviceId
    #: Why: the registry holds no profile, or no ack of the desired version within the bound.
    reason: Literal["no-profile", "no-ack"]
    #: The desired version the controller waits for an ack of (0 with ``no-profile``).
    desired_version: Version = 0
    controller_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sent_at: AwareDatetime | None = None


P = TypeVar("P", bound=Payload)


class PayloadError(ValueError):
    """A payload refused by ``parse_payload``; ``str(exc)`` is the reason."""


def _summarise(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "<payload>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts)


#: ``_duplicate_key``'s answer when it could not read the payload (the schema's parser says why, or,
#: should that parser read it, the payload is refused: a duplicate could not be ruled out).
UNCHECKED = object()


def _duplicate_key(payload: bytes | bytearray | str) -> str | None | object:
    """The first key that appears twice in one JSON object of ``payload`` (at any depth), None when
    none does, or ``UNCHECKED`` when Python's JSON reader cannot read the payload."""
    found: list[str] = []

    def check(pairs: list[tuple[str, object]]) -> None:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not found:
                found.append(key)
            seen.add(key)

    try:
        json.loads(payload, object_pairs_hook=check)
    except (ValueError, TypeError, RecursionError):  # RecursionError: thousands of nested brackets
        return UNCHECKED
    return found[0] if found else None


def parse_payload(
    model: type[P],
    payload: bytes | bytearray | str,
    *,
    topic_device_id: str | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> P:
    """Validate one wire payload; raise ``PayloadError`` with the reason if it is refused."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > max_bytes:
        raise PayloadError(f"oversized payload: {size} bytes > cap of {max_bytes}")
    if size == 0:
        raise PayloadError("empty payload")
    duplicate = _duplicate_key(payload)
    if isinstance(duplicate, str):
        raise PayloadError(f"invalid {model.SCHEMA}: key {duplicate!r} given twice in one object")
    try:
        obj = model.model_validate_json(payload)
    except ValidationError as exc:
        raise PayloadError(f"invalid {model.SCHEMA}: {_summarise(exc)}") from None
    if duplicate is UNCHECKED:  # read by the schema's parser, not by the duplicate check: fail closed
        raise PayloadError(f"invalid {model.SCHEMA}: its JSON could not be checked for duplicate keys")
    if "schema_" not in obj.model_fields_set:
        raise PayloadError(f"missing 'schema' field (expected {model.SCHEMA!r})")
    if topic_device_id is not None:
        payload_id = getattr(obj, "device_id", None)
        if payload_id != topic_device_id:
            raise PayloadError(
                f"device_id {payload_id!r} in payload does not match topic device {topic_device_id!r}"
            )
    return obj


def without_unknown_fields(model: type[P], payload: bytes | bytearray | str, *, topic_device_id: str | None = None,
                           max_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[P, list[str]] | None:
    """For a payload that ``parse_payload`` refused: when the only fault is fields ``model`` does not
    know (a newer sender added them), the payload parsed without them and their names; else None
    (bad JSON, a bad value, another device's). Lets a receiver answer "I cannot read this version"
    rather than drop a newer sender's message in silence; it must not *apply* the stripped
    message, whose meaning the unknown fields may change."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if not 0 < size <= max_bytes or _duplicate_key(payload) is not None:  # a duplicate: two readings, no answer
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return None
    if not isinstance(data, dict):
        return None
    known = {n for field_name, f in model.model_fields.items() for n in (field_name, f.alias) if n}
    unknown = sorted(k for k in data if k not in known)
    if not unknown:
        return None
    try:
        obj = parse_payload(model, json.dumps({k: v for k, v in data.items() if k in known}), topic_device_id=topic_device_id)
    except PayloadError:
        return None
    return obj, unknown


def decode(
    model: type[P],
    payload: bytes | bytearray | str,
    *,
    topic: str,
    topic_device_id: str | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    logger: logging.Logger | None = None,
) -> P | None:
    """``parse_payload`` for subscribers: a refused payload is logged with its reason, returns None."""
    try:
        return parse_payload(model, payload, topic_device_id=topic_device_id, max_bytes=max_bytes)
    except PayloadError as exc:
        (logger or log).warning("dropped message on %s: %s", topic, exc)
        return None
