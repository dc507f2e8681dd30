"""Learning-plane pieces without a Flower runtime: averaging, reply checks, checkpoints, budgets, resume.

Real parts throughout: Flower Message/ArrayRecord objects, a SQLite registry with its migrations, the
agent's device-state files.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from ldfleet.client.learning import read_budget
from ldfleet.client.state import DeviceState, save_device_state
from ldfleet.common import learning as L
from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, utcnow
from ldfleet.server.checkpoints import checkpoint_rounds, load_checkpoint, save_checkpoint
from ldfleet.server.registry.store import Registry
from ldfleet.server.rounds import discard_unfinished, finished_rounds, metric_rows
from ldfleet.server.strategy import DeviceInfo, FleetFedAvg, class_aggregates, DeviceResult, weighted_mean_per_key

from fleet_fixtures import flower_task_identity  # noqa: F401 - autouse fixture


TEMPLATE = {"strategies.selector.w": np.zeros((3, 2), np.float32), "heads.selector.b": np.zeros(4, np.float32)}


def test_weighted_mean_per_key_handles_partial_updates():
    a = {"strategies.selector.w": np.ones((3, 2), np.float32), "heads.selector.b": np.full(4, 2.0, np.float32)}
    b = {"strategies.selector.w": np.full((3, 2), 4.0, np.float32)}  # b did not send the head
    out = weighted_mean_per_key([(a, 1.0), (b, 3.0)], TEMPLATE)
    assert np.allclose(out["strategies.selector.w"], (1 * 1 + 4 * 3) / 4)
    # only a carries the head: its value, not a quarter of it (plain FedAvg would give 0.5)
    assert np.allclose(out["heads.selector.b"], 2.0)
    assert out["heads.selector.b"].dtype == np.float32
    # nobody sent a key: the previous value stays
    assert np.array_equal(weighted_mean_per_key([], TEMPLATE)["heads.selector.b"], TEMPLATE["heads.selector.b"])


def _request(node: int) -> Message:
    return Message(RecordDict({L.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(node: int, arrays: dict[str, np.ndarray] | None, examples: int = 5, device: str = "d1", device_class: str = "rpi4") -> Message:
    content = RecordDict({
        L.METRICS: MetricRecord({L.M_EXAMPLES: examples, L.M_ACCURACY: 0.5, L.M_MEAN_LAYERS: 2.0, L.M_K: 2,
                                 L.M_LAYER_USAGE: [1.0, 1.0, 0.0], L.M_POLICY_VERSION: 3}),
        L.DEVICE: ConfigRecord({L.NODE_DEVICE_ID: device, L.NODE_DEVICE_CLASS: device_class}),
    })
    if arrays is not None:
        content[L.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content, reply_to=_request(node))


def _strategy(tmp_path) -> FleetFedAvg:
    return FleetFedAvg(global_template=TEMPLATE, run_id="t", run_dir=str(tmp_path), num_layers=3)


def test_reply_checks_refuse_foreign_arrays_bad_shapes_and_errors(tmp_path):
    s = _strategy(tmp_path)
    good = {k: v + 1 for k, v in TEMPLATE.items()}
    res, why = s._check_reply(_reply(7, good), with_arrays=True)
    assert why is None and res.device == DeviceInfo("d1", "rpi4") and res.bytes_received == L.array_bytes(
        ArrayRecord({k: Array(v) for k, v in good.items()}))
    # the backbone must never come back
    res, why = s._check_reply(_reply(7, {**good, "runner.backbone.encoder.w": np.zeros(2, np.float32)}), with_arrays=True)
    assert res is None and "outside the selector/head" in why
    res, why = s._check_reply(_reply(7, {"heads.selector.b": np.zeros(5, np.float32)}), with_arrays=True)
    assert res is None and "shape" in why
    res, why = s._check_reply(_reply(7, {"heads.selector.b": np.full(4, np.nan, np.float32)}), with_arrays=True)
    assert res is None and "non-finite" in why
    res, why = s._check_reply(_reply(7, good, examples=0), with_arrays=True)
    assert res is None and "examples" in why
    err = Message(Error(code=0, reason="Exception ClientAppException occurred. Message: injected crash after 2/4 local steps"),
                  reply_to=_request(7))
    res, why = s._check_reply(err, with_arrays=True)
    assert res is None and why == "injected crash after 2/4 local steps"


def test_a_node_unavailable_error_is_charged_to_the_device_it_was_sent_to(tmp_path):
    """The SuperLink answers for a node that died with an error from its own id (1), replying to the
    message sent to the node: the failure is that device's, not a device called "node-1"."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    s = _strategy(tmp_path)
    s.devices = {7: DeviceInfo("ph-01", "phone"), 8: DeviceInfo("pi-01", "rpi4")}
    sent = [_request(7), _request(8)]
    for i, m in enumerate(sent):
        m.metadata.__dict__["_message_id"] = f"msg-{i}"  # what pushing a message sets
    s.nodes.asked = sent
    gone = create_message_error_unavailable_res_message(sent[0].metadata, "node_unavail")
    assert gone.metadata.src_node_id not in s.devices
    assert s.nodes.node_of(gone) == 7
    res, why = s._check_reply(gone, with_arrays=True)
    assert res is None and "Node Unavailable" in why
    failures = []
    s._record = lambda results, fails, phase: failures.extend(fails)
    s._collect([gone], [7], with_arrays=True, phase="train")
    assert [(f["device_id"], f["device_class"]) for f in failures] == [("ph-01", "phone")]


def test_a_class_pinned_in_the_registry_wins_over_the_one_a_device_reports(tmp_path):
    """`devices set-class ph-01 rpi4`, then the device restarts as `--device-class phone`: its round
    rows are under rpi4, as its budget is."""
    from ldfleet.server.nodes import NodeDirectory
    from ldfleet.server.registry.models import Device
    from ldfleet.server.registry.store import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        reg.add_class("phone")
        with reg.session() as s:
            s.merge(Device(device_id="ph-01", device_class="phone", desired_version=0, applied_version=0, online=True,
                           class_pinned=False))
        nodes = NodeDirectory(reg)
        assert nodes.class_of("ph-01", "phone") == "phone"
        reg.pin_class("ph-01", "rpi4", create_class=True)
        assert nodes.class_of("ph-01", "phone") == "phone"  # read once per round
        nodes.new_round()
        assert nodes.class_of("ph-01", "phone") == "rpi4" and nodes.class_of("pi-02", "rpi4") == "rpi4"
        s = FleetFedAvg(global_template=TEMPLATE, run_id="t", run_dir=str(tmp_path), num_layers=3, registry=reg)
        res, why = s._check_reply(_reply(7, {k: v + 1 for k, v in TEMPLATE.items()}, device="ph-01", device_class="phone"),
                                  with_arrays=True)
        assert why is None and res.device == DeviceInfo("ph-01", "rpi4")
    finally:
        reg.close()


def test_aggregate_train_averages_only_good_replies_and_records_failures(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    s = FleetFedAvg(global_template=TEMPLATE, run_id="run-a", run_dir=str(tmp_path), num_layers=3, registry=reg)
    s.devices = {1: DeviceInfo("d1", "rpi4"), 2: DeviceInfo("d2", "rpi4"), 3: DeviceInfo("d3", "mcu"), 4: DeviceInfo("d4", "mcu")}
    s._round_id = reg.start_round("run-a", 1).id
    s._sent = {1: 100, 2: 100, 3: 100, 4: 100}
    ones = {k: np.ones_like(v) for k, v in TEMPLATE.items()}
    threes = {k: np.full_like(v, 3.0) for k, v in TEMPLATE.items()}
    bad = {"runner.x": np.zeros(1, np.float32)}
    # node 3 sends arrays outside the selector/head (refused, whatever its weight); node 4 never answers
    replies = [_reply(1, ones, 1, "d1"), _reply(2, threes, 3, "d2"), _reply(3, bad, 9, "d3")]
    arrays, metrics = s.aggregate_train(1, replies)
    assert np.allclose(arrays["heads.selector.b"].numpy(), (1 * 1 + 3 * 3) / 4)
    assert metrics["accuracy"] == pytest.approx(0.5)
    rows = metric_rows(reg, "run-a")
    assert {(r.device_id, r.phase) for r in rows} == {("d1", "train"), ("d2", "train"), ("d3", "train-failed"),
                                                     ("d4", "train-failed")}
    failed = next(r for r in rows if r.phase == "train-failed")
    assert failed.accuracy is None and failed.num_examples is None and failed.policy_version is None
    reasons = {f["device_id"]: f["reason"] for f in s._summary["failed"]}
    assert "no reply" in reasons["d4"] and "outside the selector/head" in reasons["d3"]
    assert s._summary["traffic"]["received_bytes"]["d1"] > 0
    reg.close()


def test_class_aggregates_weight_by_examples():
    mk = lambda d, c, n, acc: DeviceResult(DeviceInfo(d, c), 0, {L.M_EXAMPLES: n, L.M_ACCURACY: acc, L.M_LOSS: 1.0,  # noqa: E731
                                                               L.M_MEAN_LAYERS: 2.0, L.M_LATENCY_MS: 1.0, L.M_K: 2,
                                                               L.M_LAYER_USAGE: [1.0, 0.0]})
    agg = class_aggregates([mk("a", "x", 1, 1.0), mk("b", "x", 3, 0.0), mk("c", "y", 2, 0.5)])
    assert agg["x"]["accuracy"] == pytest.approx(0.25) and agg["x"]["devices"] == 2
    assert agg["(all)"]["accuracy"] == pytest.approx((1 + 0 + 1) / 6)
    assert agg["y"]["layer_usage"] == [1.0, 0.0]
    assert "wer" not in agg["x"]


def test_class_aggregates_of_asr_devices_give_wer_over_all_reference_words(tmp_path):
    """An asr class's WER is its devices' summed word edits over their summed reference words, not an
    example-weighted mean, and no accuracy is made up; the registry stores WER and CER per device."""
    mk = lambda d, n, wer, words: DeviceResult(DeviceInfo(d, "x"), 0, {  # noqa: E731
        L.M_EXAMPLES: n, L.M_WER: wer, L.M_CER: wer / 2, L.M_WORDS: words, L.M_LOSS: 1.0, L.M_MEAN_LAYERS: 2.0,
        L.M_LATENCY_MS: 1.0, L.M_K: 2})
    agg = class_aggregates([mk("a", 1, 1.5, 10), mk("b", 3, 0.1, 30)])  # 15 + 3 edits over 40 words
    assert agg["x"]["wer"] == pytest.approx(18 / 40) and agg["x"]["cer"] == pytest.approx(9 / 40)
    assert "accuracy" not in agg["x"] and agg["(all)"]["wer"] == pytest.approx(18 / 40)
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    rid = reg.start_round("run", 1).id
    reg.record_round_metric(rid, "a", phase="eval", device_class="x", k=2, wer=1.5, cer=0.75, num_examples=1)
    (row,) = metric_rows(reg, "run", "eval")
    assert (row.wer, row.cer, row.accuracy, row.device_class, row.k) == (1.5, 0.75, None, "x", 2)
    reg.close()


def test_reply_checks_refuse_negative_error_rates():
    from ldfleet.server.validate_reply import BadReply, check_metrics

    check_metrics({L.M_WER: 1.4, L.M_CER: 0.0, L.M_WORDS: 12})  # above 1 is a valid WER (long hypotheses)
    for bad in ({L.M_WER: -0.1}, {L.M_CER: [0.1]}, {L.M_WORDS: 2.5}, {L.M_WORDS: -1}):
        with pytest.raises(BadReply):
            check_metrics(bad)


def test_checkpoints_roundtrip(tmp_path):
    a = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) for k, v in TEMPLATE.items()}
    save_checkpoint(tmp_path, 1, a, "r")
    save_checkpoint(tmp_path, 12, a, "r")
    assert checkpoint_rounds(tmp_path) == [1, 12]
    back = load_checkpoint(tmp_path, 12)
    assert all(np.array_equal(back[k], a[k]) for k in a)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_discard_unfinished_keeps_finished_rounds_once(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    for n in (1, 2):
        rid = reg.start_round("run-b", n).id
        reg.record_round_metric(rid, "d1", accuracy=0.5, num_examples=3)
        reg.finish_round(rid)
    rid3 = reg.start_round("run-b", 3).id  # killed mid-round
    reg.record_round_metric(rid3, "d1", accuracy=0.1, num_examples=3)
    other = reg.start_round("run-c", 3).id  # another run is untouched
    assert discard_unfinished(reg, "run-b", keep_up_to=2) == [3]
    assert finished_rounds(reg, "run-b") == [1, 2]
    assert {r.round for r in metric_rows(reg, "run-b")} == {1, 2}
    assert reg.start_round("run-b", 3).id != rid3  # the round can be written again, once
    assert other
    reg.close()


def _policy(device: str, version: int, keep: float, k: int, num_layers: int = 8) -> BudgetPolicy:
    return BudgetPolicy(device_id=device, version=version, source="class", device_class="rpi4", policy_version=2,
                        keep=keep, k=k, num_layers=num_layers, issued_at=utcnow(), issued_by="test")


def test_read_budget_comes_from_the_local_device_state(tmp_path):
    assert read_budget(tmp_path / "none", 8).k == 8  # no state yet: every layer, version 0
    assert read_budget(None, 8).version == 0
    profile = DeviceProfile(device_id="pi-1", device_class="rpi4", cores=4, memory_mb=1024, model_id="m", num_layers=8)
    state = DeviceState(device_id="pi-1", device_class="rpi4", version=5, policy=_policy("pi-1", 5, 0.25, 2),
                        effective_k=2, expected_latency_ms=12.5, profile=profile)
    save_device_state(tmp_path / "pi-1", state)
    b = read_budget(tmp_path / "pi-1", 8)
    assert (b.k, b.version, b.keep, b.expected_latency_ms) == (2, 5, 0.25, 12.5)
    # a profile of another model: the keep fraction is re-applied to this model's L
    b12 = read_budget(tmp_path / "pi-1", 12)
    assert b12.k == 3 and b12.version == 5


def test_a_simulated_straggler_past_the_timeout_misses_the_round(tmp_path):
    s = FleetFedAvg(global_template=TEMPLATE, run_id="t", run_dir=str(tmp_path), num_layers=3, round_timeout_s=30)
    good = {k: v + 1 for k, v in TEMPLATE.items()}
    late = _reply(7, good)
    late.content[L.METRICS][L.M_SIMULATED_DELAY_S] = 45.0
    res, why = s._check_reply(late, with_arrays=True)
    assert res is None and "straggler" in why and "30 s" in why
    slow = _reply(7, good)
    slow.content[L.METRICS][L.M_SIMULATED_DELAY_S] = 10.0  # slow but in time: counted
    res, why = s._check_reply(slow, with_arrays=True)
    assert why is None and res is not None
