"""Contracts of the control plane: topics, payload parsing (incl. hypothesis fuzzing), broker URLs,
the device's policy decision, policy resolution, local device state."""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldfleet.client.agent import evaluate_policy
from ldfleet.client.profile import profile_from_json, synthetic_profile
from ldfleet.client.state import DeviceState, load_device_state, save_device_state, state_path
from ldfleet.common import topics
from ldfleet.common.budget import budget_text, check_budget, layers_for_latency, target_ms
from ldfleet.common.mqtt import parse_broker_url
from ldfleet.common.policy import k_for_budget, percentile_ratio, unmet_target
from ldfleet.common.schemas import (
    MAX_PAYLOAD_BYTES,
    BudgetPolicy,
    ControllerStatus,
    DeviceProfile,
    PayloadError,
    PolicyAck,
    PolicyChanged,
    RebirthRequest,
    Status,
    Telemetry,
    decode,
    parse_payload,
)

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _profile(**kw) -> DeviceProfile:
    return synthetic_profile("pi-01", "pi4", num_layers=kw.pop("num_layers", 12), layer_ms=kw.pop("layer_ms", 2.0), **kw)


def _policy(version: int = 1, **kw) -> BudgetPolicy:
    base = dict(device_id="pi-01", version=version, source="class", device_class="pi4", policy_version=1,
                keep=0.5, issued_at=NOW, issued_by="alice")
    base.update(kw)
    return BudgetPolicy(**base)


VALID = {
    DeviceProfile: lambda: _profile(),
    Status: lambda: Status(device_id="pi-01", online=True, boot_id="abc123", seq=1, sent_at=NOW),
    BudgetPolicy: lambda: _policy(k=6, num_layers=12),
    PolicyAck: lambda: PolicyAck(device_id="pi-01", version=3, applied_version=3, status="applied", effective_k=6),
    Telemetry: lambda: Telemetry(device_id="pi-01", load=0.5, layer_usage=[0.5, 1.0]),
    ControllerStatus: lambda: ControllerStatus(controller_id="controller", online=True, boot_id="x1"),
    PolicyChanged: lambda: PolicyChanged(device_class="pi4", policy_version=2),
    RebirthRequest: lambda: RebirthRequest(device_id="pi-01", reason="no-ack", desired_version=3, controller_id="controller"),
}


# -- topics ---------------------------------------------------------------------------------------
def test_topic_tree_round_trips():
    for ch in topics.Channel:
        t = topics.device_topic("pi-01", ch)
        assert t.startswith("ldfleet/v1/dev/pi-01/")
        parsed = topics.parse_device_topic(t)
        assert parsed == topics.DeviceTopic("pi-01", ch)
    assert topics.policy_desired("a.b_c-1") == "ldfleet/v1/dev/a.b_c-1/policy/desired"
    assert topics.all_devices(topics.Channel.POLICY_REPORTED) == "ldfleet/v1/dev/+/policy/reported"
    assert topics.ctl_status("controller-0") == "ldfleet/v1/ctl/status/controller-0"
    assert topics.parse_ctl_status("ldfleet/v1/ctl/status/controller-0") == "controller-0"
    assert topics.parse_ctl_status("ldfleet/v1/ctl/status") is None and topics.parse_ctl_status("ldfleet/v1/ctl/status/a/b") is None
    with pytest.raises(ValueError):
        topics.ctl_status("a/b")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "-lead", "x" * 65, "spa ce", "ü"])
def test_topic_refuses_ids_that_break_the_tree(bad):
    with pytest.raises(ValueError):
        topics.status(bad)
    assert topics.parse_device_topic(f"ldfleet/v1/dev/{bad}/status") is None


def test_parse_device_topic_ignores_foreign_topics():
    for t in ["other/v1/dev/x/status", "ldfleet/v1/dev/x", "ldfleet/v1/dev/x/unknown", "ldfleet/v1/ctl/status", "ldfleet/v2/dev/x/status"]:
        assert topics.parse_device_topic(t) is None


# -- payloads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(VALID))
def test_every_payload_round_trips_and_carries_its_schema(model):
    obj = VALID[model]()
    wire = obj.to_json()
    assert json.loads(wire)["schema"] == model.SCHEMA
    did = getattr(obj, "device_id", None) if model not in (PolicyChanged,) else None
    assert parse_payload(model, wire, topic_device_id=did) == obj


def _mutate(obj, **changes) -> bytes:
    d = json.loads(obj.to_json())
    for k, v in changes.items():
        if v is KeyError:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d).encode()


BAD_CASES = [
    ("malformed JSON", BudgetPolicy, b'{"schema": "ldfleet.policy/1", ', "Invalid JSON"),
    ("not an object", BudgetPolicy, b"[1, 2, 3]", "object"),
    ("empty", BudgetPolicy, b"", "empty"),
    ("binary", BudgetPolicy, b"\xff\xfe\x00", "Invalid JSON"),
    ("wrong schema", BudgetPolicy, _mutate(_policy(), schema="ldfleet.policy/2"), "schema"),
    ("other payload's schema", BudgetPolicy, PolicyAck(device_id="pi-01", applied_version=1, status="applied").to_json(), "schema"),
    ("missing schema", BudgetPolicy, _mutate(_policy(), schema=KeyError), "missing 'schema'"),
    ("missing field", BudgetPolicy, _mutate(_policy(), version=KeyError), "version"),
    ("extra field", BudgetPolicy, _mutate(_policy(), admin=True), "admin"),
    ("string for int", BudgetPolicy, _mutate(_policy(), version="2"), "version"),
    ("float for int", BudgetPolicy, _mutate(_policy(), version=2.5), "version"),
    ("bool for int", PolicyAck, _mutate(VALID[PolicyAck](), applied_version=True), "applied_version"),
    ("negative keep", BudgetPolicy, _mutate(_policy(), keep=-0.5), "keep"),
    ("keep above one", BudgetPolicy, _mutate(_policy(), keep=1.5), "keep"),
    ("zero version", BudgetPolicy, _mutate(_policy(), version=0), "version"),
    ("negative latency", BudgetPolicy, _mutate(_policy(), keep=None, latency_ms=-3), "latency_ms"),
    ("NaN keep", BudgetPolicy, _mutate(_policy()).replace(b'"keep": 0.5', b'"keep": NaN'), "keep"),
    ("Infinity latency", BudgetPolicy, _mutate(_policy(), keep=None).replace(b'"latency_ms": null', b'"latency_ms": Infinity'), "latency_ms"),
    ("two budgets", BudgetPolicy, _mutate(_policy(), latency_ms=50.0), "exactly one"),
    ("no budget", BudgetPolicy, _mutate(_policy(), keep=None), "exactly one"),
    ("latency target and RTF", BudgetPolicy, _mutate(_policy(), keep=None, latency_ms=50.0, rtf=0.1), "got latency_ms and rtf"),
    ("RTF above 100", BudgetPolicy, _mutate(_policy(), keep=None, rtf=500.0), "rtf"),
    ("percentile with a keep fraction", BudgetPolicy, _mutate(_policy(), percentile=90.0), "percentile"),
    ("k above layers", BudgetPolicy, _mutate(_policy(), k=13, num_layers=12), "exceeds"),
    ("unknown status", PolicyAck, _mutate(VALID[PolicyAck](), status="maybe"), "status"),
    ("layer count mismatch", DeviceProfile, _mutate(_profile(), num_layers=11), "num_layers"),
    ("negative layer ms", DeviceProfile, _mutate(_profile(), layer_ms=[-1.0] * 12), "layer_ms"),
    ("wildcard device id", DeviceProfile, _mutate(_profile(), device_id="pi/#"), "device_id"),
    ("naive timestamp", Status, _mutate(VALID[Status](), sent_at="2026-01-01T00:00:00"), "sent_at"),
    # two readers of the same bytes must not disagree: one keeping the first keep, one the last
    ("duplicate key", BudgetPolicy, _mutate(_policy()).replace(b'"keep": 0.5', b'"keep": 0.5, "keep": 0.9'), "'keep' given twice"),
    ("duplicate schema", BudgetPolicy, _mutate(_policy()).replace(b'{', b'{"schema": "ldfleet.policy/2", ', 1), "'schema' given twice"),
    ("oversized", Telemetry, b'{"schema": "ldfleet.telemetry/1", "device_id": "pi-01", "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}', "oversized"),
]


@pytest.mark.parametrize("name,model,payload,why", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_payloads_are_refused_with_a_reason(name, model, payload, why, caplog):
    with pytest.raises(PayloadError) as exc:
        parse_payload(model, payload, topic_device_id="pi-01")
    assert why.lower() in str(exc.value).lower()
    with caplog.at_level(logging.WARNING, logger="ldfleet.contracts"):
        assert decode(model, payload, topic="ldfleet/v1/dev/pi-01/x", topic_device_id="pi-01") is None
    assert "dropped message on ldfleet/v1/dev/pi-01/x" in caplog.text
    assert why.lower() in caplog.text.lower()


def test_a_duplicate_key_is_refused_on_every_path():
    """The agent's "unknown fields" fallback must not read a payload the parser refused for a duplicate,
    and a payload only the schema's parser can read is refused."""
    from ldfleet.common.schemas import without_unknown_fields

    forged = _mutate(_policy(), newfield=True).replace(b'"version": ', b'"version": 99, "version": ', 1)
    with pytest.raises(PayloadError, match="'version' given twice"):
        parse_payload(BudgetPolicy, forged, topic_device_id="pi-01")
    assert without_unknown_fields(BudgetPolicy, forged, topic_device_id="pi-01") is None
    assert without_unknown_fields(BudgetPolicy, _mutate(_policy(), newfield=True), topic_device_id="pi-01")[1] == ["newfield"]
    with pytest.raises(PayloadError):  # Python's reader fails where the schema's would not: refused, not waved through
        parse_payload(BudgetPolicy, memoryview(_policy().to_json()))


def test_device_id_must_match_the_topic():
    wire = _profile().to_json()  # device_id pi-01
    with pytest.raises(PayloadError, match="does not match topic device 'pi-02'"):
        parse_payload(DeviceProfile, wire, topic_device_id="pi-02")
    assert parse_payload(DeviceProfile, wire, topic_device_id="pi-01").device_id == "pi-01"


def test_size_cap_is_checked_before_parsing():
    # a perfectly valid payload is still refused when it is over the cap
    wire = _profile().to_json()
    with pytest.raises(PayloadError, match="oversized"):
        parse_payload(DeviceProfile, wire, max_bytes=len(wire) - 1)
    # the largest legitimate payload (256 layers) fits comfortably
    big = synthetic_profile("x" * 64, "c" * 64, num_layers=256, layer_ms=[123.456789012] * 256).to_json()
    assert len(big) < MAX_PAYLOAD_BYTES / 2


# -- fuzzing ----------------------------------------------------------------------------------------
MODELS = list(VALID)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _parse_or_refuse(model, payload, device_id="pi-01"):
    try:
        obj = parse_payload(model, payload, topic_device_id=device_id if "device_id" in model.model_fields and model is not PolicyChanged else None)
    except PayloadError as exc:
        assert str(exc)  # always a reason
        return None
    # anything accepted is a valid, finite, re-encodable payload
    again = parse_payload(model, obj.to_json())
    assert again == obj
    for value in obj.model_dump().values():
        if isinstance(value, float):
            assert math.isfinite(value)
    return obj


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), payload=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_never_crash_the_parser(model, payload):
    _parse_or_refuse(model, payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), doc=st.dictionaries(st.text(max_size=15), json_values, max_size=8))
def test_fuzz_arbitrary_json_objects(model, doc):
    doc = dict(doc)
    doc.setdefault("schema", model.SCHEMA)
    _parse_or_refuse(model, json.dumps(doc, allow_nan=True).encode())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), data=st.data())
def test_fuzz_mutated_valid_payloads(model, data):
    doc = json.loads(VALID[model]().to_json())
    key = data.draw(st.sampled_from(sorted(doc)))
    action = data.draw(st.sampled_from(["drop", "replace", "add"]))
    if action == "drop":
        doc.pop(key)
    elif action == "replace":
        doc[key] = data.draw(json_values)
    else:
        doc[data.draw(st.text(min_size=1, max_size=10))] = data.draw(json_values)
    obj = _parse_or_refuse(model, json.dumps(doc, allow_nan=True).encode())
    if obj is not None and action == "add":
        # an added unknown key is always refused; a surviving "add" can only have overwritten a known key
        assert set(json.loads(obj.to_json())) == set(json.loads(VALID[model]().to_json()))


# -- broker URLs -----------------------------------------------------------------------------------
def test_broker_urls():
    u = parse_broker_url("mqtt://localhost")
    assert (u.scheme, u.host, u.port, u.tls, u.username) == ("mqtt", "localhost", 1883, False, None)
    u = parse_broker_url("mqtts://pi-01:p%40ss%3Aword@broker.example:9883", ca_file="/tmp/ca.crt")
    assert (u.host, u.port, u.tls, u.username, u.password, u.ca_file) == ("broker.example", 9883, True, "pi-01", "p@ss:word", "/tmp/ca.crt")
    assert "p@ss" not in str(u) and "***" in u.redacted()
    assert parse_broker_url("mqtts://h").port == 8883
    assert parse_broker_url("mqtt://u:x@h", username="v", password="y").username == "v"
    for bad in ["http://h", "h:1883", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "mqtt://h?x=1"]:
        with pytest.raises(ValueError):
            parse_broker_url(bad)
    with pytest.raises(ValueError, match="ca-file"):
        parse_broker_url("mqtt://h", ca_file="/tmp/ca.crt")


# -- budgets on a device ------------------------------------------------------------------------------
def test_k_for_budget_uses_the_shared_budget_maths():
    prof = _profile(layer_ms=[1.0 + i for i in range(12)], front_end_ms=5.0)
    assert k_for_budget(prof, keep=0.5) == (6, 5.0 + sum(range(7, 13)))
    k, expected = k_for_budget(prof, latency_ms=40.0)
    assert k == layers_for_latency(40.0, 5.0, prof.layer_ms)
    assert expected is not None and expected <= 40.0
    with pytest.raises(ValueError, match="per-layer latency"):
        k_for_budget(_profile(layer_ms=[]), latency_ms=40.0)


def test_an_rtf_is_a_latency_target_per_second_of_audio():
    assert target_ms(None, 0.05, 4.0) == pytest.approx(200.0)  # a 4 s utterance at RTF 0.05
    assert target_ms(40.0, None, 4.0) == 40.0 and target_ms(None, None, 4.0) is None
    prof = _profile(layer_ms=[1.0 + i for i in range(12)], front_end_ms=5.0)  # measured on 1 s of audio
    assert k_for_budget(prof, rtf=0.03) == k_for_budget(prof, latency_ms=30.0)
    two_s = prof.model_copy(update={"reference_seconds": 2.0})  # the same timings measured on 2 s
    assert k_for_budget(two_s, rtf=0.03) == k_for_budget(two_s, latency_ms=60.0)
    assert k_for_budget(two_s, rtf=0.03)[0] > k_for_budget(prof, rtf=0.03)[0]
    # the device resolves an RTF policy the controller could not resolve, like a latency target
    d = evaluate_policy(_policy(2, keep=None, rtf=0.03), _state(1), prof, now=NOW)
    assert d.ack.status == "applied" and d.state.effective_k == k_for_budget(prof, latency_ms=30.0)[0]
    with pytest.raises(ValueError, match="RTF 0.03 needs the device's measured per-layer latency"):
        k_for_budget(_profile(layer_ms=[]), rtf=0.03)
    assert budget_text(rtf=0.05, percentile=99) == "RTF 0.05 @p99" and budget_text(latency_ms=40) == "latency 40 ms"


def test_a_target_below_one_layer_is_applied_at_k1_and_said_to_be_unmet():
    """k never goes below one layer; where even that misses the target, the device's ack says so."""
    prof = _profile(layer_ms=[1.0 + i for i in range(12)], front_end_ms=5.0)  # k=1: 5 + 12 ms (the slowest layer)
    assert unmet_target(prof, 1, latency_ms=17.0) is None and unmet_target(prof, 1) is None  # no target: nothing to miss
    assert k_for_budget(prof, latency_ms=16.0)[0] == 1
    why = unmet_target(prof, 1, latency_ms=16.0)
    assert why == "latency 16 ms cannot be met on this device: k=1 is expected to take 17.0 ms, the target allows 16.0 ms"
    assert "at 2 s of audio" in unmet_target(prof.model_copy(update={"reference_seconds": 2.0}), 1, rtf=0.008)  # 16 ms per 2 s
    tail = prof.model_copy(update={"latency_ratio_p90": 1.5})  # at p90 the target allows 24 / 1.5 = 16 ms
    assert unmet_target(tail, 1, latency_ms=24.0) is None and unmet_target(tail, 1, latency_ms=24.0, percentile=90) is not None
    assert unmet_target(_profile(layer_ms=[]), 1, latency_ms=1.0) is None  # nothing measured: nothing to say
    d = evaluate_policy(_policy(2, keep=None, latency_ms=16.0), _state(1), prof, now=NOW)
    assert d.ack.status == "applied" and d.state.effective_k == 1 and d.ack.reason == why and why in d.note
    assert evaluate_policy(_policy(2, keep=None, latency_ms=17.0), _state(1), prof, now=NOW).ack.reason is None


def test_a_policy_without_rtf_leaves_it_off_the_wire():
    """Agents that predate the RTF refuse unknown fields: only a policy that uses it may carry it."""
    assert b"rtf" not in _policy().to_json()
    with_rtf = _policy(keep=None, rtf=0.05, percentile=90.0)
    assert parse_payload(BudgetPolicy, with_rtf.to_json(), topic_device_id="pi-01") == with_rtf
    for bad, why in [(dict(keep=0.5, rtf=0.1), "got keep and rtf"), (dict(rtf=float("nan")), "real-time factor"),
                     (dict(keep=0.5, percentile=50.0), "percentile")]:
        with pytest.raises(ValueError, match=why):
            check_budget(**bad)


def test_percentile_scales_a_latency_target_by_the_measured_tail():
    prof = _profile(layer_ms=[2.0] * 12, front_end_ms=0.0).model_copy(update={"latency_ratio_p90": 1.5, "latency_ratio_p99": 2.0})
    assert percentile_ratio(prof, 50) == 1.0
    assert percentile_ratio(prof, 90) == pytest.approx(1.5)
    assert percentile_ratio(prof, 99) == pytest.approx(2.0)
    assert k_for_budget(prof, latency_ms=24.0, percentile=50)[0] == 12
    assert k_for_budget(prof, latency_ms=24.0, percentile=99)[0] == 6
    assert percentile_ratio(_profile(), 99) == 1.0  # no tail measured: the median is all we know


# -- the device's decision ---------------------------------------------------------------------------
def _state(version: int = 0) -> DeviceState:
    return DeviceState(device_id="pi-01", device_class="pi4", version=version, profile=_profile())


def test_device_applies_newer_versions_only():
    prof = _profile()
    d = evaluate_policy(_policy(1, k=6, num_layers=12), _state(), prof, now=NOW)
    assert d.state is not None and d.state.version == 1 and d.state.effective_k == 6
    assert d.ack is not None and d.ack.status == "applied" and d.ack.applied_version == 1
    newer = evaluate_policy(_policy(2, keep=0.25), d.state, prof, now=NOW).state
    for old in (1, 2):
        same = evaluate_policy(_policy(old, keep=1.0), newer, prof, now=NOW)
        assert same.state is None and same.ack is None  # equal or lower: ignored, nothing acked
    stale = evaluate_policy(_policy(3, keep=0.25), _state(5), prof, now=NOW)
    assert stale.state is None and stale.ack is None


def test_device_resolves_k_itself_when_the_controller_could_not():
    prof = _profile(layer_ms=[3.0] * 12, front_end_ms=0.0)
    d = evaluate_policy(_policy(2, keep=None, latency_ms=18.0), _state(1), prof, now=NOW)
    assert d.ack.status == "applied" and d.state.effective_k == 6
    # a k computed for another model (different layer count) is recomputed for this one
    d = evaluate_policy(_policy(2, keep=0.5, k=3, num_layers=6), _state(1), prof, now=NOW)
    assert d.state.effective_k == 6


@pytest.mark.parametrize(
    "policy,why",
    [
        (_policy(2, expires_at=NOW - timedelta(seconds=1)), "expired"),
        (_policy(2, k=20), "exceeds"),
        (_policy(2, keep=None, latency_ms=10.0), "per-layer latency"),
    ],
)
def test_device_rejects_policies_it_cannot_run(policy, why):
    state = _state(1).model_copy(update={"effective_k": 12})
    prof = _profile(layer_ms=[]) if why == "per-layer latency" else _profile()
    d = evaluate_policy(policy, state, prof, now=NOW)
    assert d.ack.status == "rejected" and why in d.ack.reason
    assert d.ack.applied_version == 1 and d.ack.effective_k == 12  # the old policy stays in force
    assert d.state.version == 1 and d.state.last_rejected_version == 2
    again = evaluate_policy(policy, d.state, prof, now=NOW).ack
    if why == "expired":  # a rejection about time is evaluated again (the device's clock may be fixed by then)
        assert d.state.last_rejected_retryable and again is not None and again.status == "rejected"
    else:
        assert again is None  # the same version is answered once


def test_policy_for_another_device_is_ignored():
    d = evaluate_policy(_policy(2).model_copy(update={"device_id": "pi-02"}), _state(1), _profile(), now=NOW)
    assert d.state is None and d.ack is None


# -- local device state -------------------------------------------------------------------------------
def test_device_state_is_written_atomically(tmp_path):
    assert load_device_state(tmp_path) is None
    d = evaluate_policy(_policy(4, k=6, num_layers=12), _state(), _profile(), now=NOW)
    path = save_device_state(tmp_path, d.state)
    assert path == state_path(tmp_path)
    loaded = load_device_state(tmp_path)
    assert loaded == d.state and loaded.effective_k == 6 and loaded.policy.version == 4 and loaded.num_layers == 12
    assert sorted(os.listdir(tmp_path)) == ["device_state.json"]  # no temp files left behind
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt device state"):
        load_device_state(tmp_path)


def test_profile_from_json_accepts_a_latency_profile(tmp_path):
    f = tmp_path / "lat.json"
    f.write_text(json.dumps({"model_id": "wavlm-8x128", "front_end_ms": 3.5, "layer_ms": [1.0, 2.0, 3.0]}))
    prof = profile_from_json(f, "pi-09", "pi4")
    assert (prof.device_id, prof.device_class, prof.num_layers, prof.layer_ms) == ("pi-09", "pi4", 3, [1.0, 2.0, 3.0])
    assert prof.cores >= 1 and prof.memory_mb > 0


def test_server_resolution_order_override_class_default(tmp_path):
    from ldfleet.server.policy import resolve, signature_of
    from ldfleet.server.registry import Registry

    with Registry(f"sqlite:///{tmp_path / 'r.db'}") as reg:
        prof = _profile(layer_ms=[2.0] * 12, front_end_ms=4.0)
        assert resolve("pi-01", "pi4", prof, reg.active_policies(), default_keep=1.0).k == 12
        reg.set_policy("pi4", keep=0.5, create_class=True, issued_by="alice")
        r = resolve("pi-01", "pi4", prof, reg.active_policies())
        assert (r.source, r.k, r.policy_version) == ("class", 6, 1)
        from ldfleet.server.registry.models import Device

        with reg.session() as s:
            s.add(Device(device_id="pi-01", device_class="pi4"))
        reg.set_policy("pi4", latency_ms=12.0, device_id="pi-01", issued_by="bob")
        r = resolve("pi-01", "pi4", prof, reg.active_policies())
        assert (r.source, r.k, r.expected_latency_ms) == ("device", 4, 12.0)
        assert resolve("pi-02", "pi4", prof, reg.active_policies()).source == "class"
        doc = r.to_policy("pi-01", 7)
        assert signature_of(doc.model_dump(mode="json")) == r.signature()
