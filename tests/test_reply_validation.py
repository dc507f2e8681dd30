"""Federated rounds: every client reply is validated before it counts (issue 11).

Real Flower Message / RecordDict / ArrayRecord / MetricRecord objects, as FleetFedAvg receives them
from the Grid; a real SQLite registry with its migrations. A bad reply is a recorded failure with a
reason, never aborts the round and never reaches the global arrays, with or without a registry.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from ldfleet.common import learning as L
from ldfleet.server.registry.store import Registry
from ldfleet.server.rounds import metric_rows
from ldfleet.server.strategy import DeviceInfo, FleetFedAvg
from ldfleet.server.validate_reply import BadReply, check_examples

TEMPLATE = {"strategies.selector.w": np.zeros((3, 2), np.float32), "heads.selector.b": np.zeros(4, np.float32)}
GOOD = {k: np.full_like(v, 2.0) for k, v in TEMPLATE.items()}


from fleet_fixtures import flower_task_identity  # noqa: F401 - autouse fixture


def _reply(node: int, *, examples=5, arrays=None, metrics=None, raw_arrays: ArrayRecord | None = None) -> Message:
    request = Message(RecordDict({L.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
    m = {L.M_EXAMPLES: examples, L.M_ACCURACY: 0.5, L.M_LOSS: 1.0, L.M_K: 2, L.M_LAYER_USAGE: [1.0, 1.0, 0.0],
         L.M_POLICY_VERSION: 3, **(metrics or {})}
    content = RecordDict({L.METRICS: MetricRecord(m),
                          L.DEVICE: ConfigRecord({L.NODE_DEVICE_ID: f"d{node}", L.NODE_DEVICE_CLASS: "rpi4"})})
    if raw_arrays is not None:
        content[L.ARRAYS] = raw_arrays
    else:
        content[L.ARRAYS] = ArrayRecord({k: Array(v) for k, v in (GOOD if arrays is None else arrays).items()})
    return Message(content, reply_to=request)


# one bad reply of each kind: (reply builder, words its recorded reason must contain)
BAD = {
    "nan-examples": (lambda n: _reply(n, examples=float("nan")), "not a finite number"),
    "inf-examples": (lambda n: _reply(n, examples=float("inf")), "not a finite number"),
    "huge-examples": (lambda n: _reply(n, examples=1e308), "outside 1.."),
    "negative-examples": (lambda n: _reply(n, examples=-3), "outside 1.."),
    "zero-examples": (lambda n: _reply(n, examples=0), "outside 1.."),
    "fractional-examples": (lambda n: _reply(n, examples=2.5), "not a whole number"),
    "nan-metric": (lambda n: _reply(n, metrics={L.M_ACCURACY: float("nan")}), "metric 'accuracy' is not a finite"),
    "inf-usage": (lambda n: _reply(n, metrics={L.M_LAYER_USAGE: [1.0, math.inf, 0.0]}), "not a finite"),
    "nan-policy-version": (lambda n: _reply(n, metrics={L.M_POLICY_VERSION: float("nan")}), "not a finite"),
    "usage-length": (lambda n: _reply(n, metrics={L.M_LAYER_USAGE: [1.0, 0.5]}), "has 2 entries"),
    "nan-array": (lambda n: _reply(n, arrays={**GOOD, "heads.selector.b": np.full(4, np.nan, np.float32)}), "non-finite"),
    "inf-array": (lambda n: _reply(n, arrays={**GOOD, "heads.selector.b": np.full(4, np.inf, np.float32)}), "non-finite"),
    "shape": (lambda n: _reply(n, arrays={**GOOD, "heads.selector.b": np.zeros(5, np.float32)}), "shape [5], expected [4]"),
    "dtype": (lambda n: _reply(n, arrays={**GOOD, "heads.selector.b": np.zeros(4, np.float64)}), "dtype float64"),
    "foreign-name": (lambda n: _reply(n, arrays={**GOOD, "runner.backbone.w": np.zeros(2, np.float32)}), "outside the selector/head"),
    "no-arrays": (lambda n: _reply(n, raw_arrays=ArrayRecord()), "no arrays"),
}


@pytest.mark.parametrize("value,why", [
    (float("nan"), "finite"), (float("inf"), "finite"), (-float("inf"), "finite"), (1e308, "outside"),
    (-1, "outside"), (0, "outside"), (0.5, "whole"), (True, "not a number"), ("5", "not a number"),
    (10_000_001, "outside"),
])
def test_example_counts_outside_a_sane_range_are_refused(value, why):
    with pytest.raises(BadReply, match=why):
        check_examples(value)
    assert check_examples(7) == 7 and check_examples(7.0) == 7


@pytest.mark.parametrize("with_registry", [False, True], ids=["no-registry", "registry"])
def test_bad_replies_are_recorded_failures_and_never_reach_the_global_model(tmp_path, with_registry):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}") if with_registry else None
    s = FleetFedAvg(global_template=TEMPLATE, run_id="run-v", run_dir=str(tmp_path), num_layers=3, registry=reg)
    kinds = list(BAD)
    s.devices = {n: DeviceInfo(f"d{n}", "rpi4") for n in range(1, len(kinds) + 3)}
    s._sent = {n: 10 for n in s.devices}
    if reg is not None:
        s._round_id = reg.start_round("run-v", 1).id
    good_a, good_b = len(kinds) + 1, len(kinds) + 2
    replies = [BAD[k][0](n) for n, k in enumerate(kinds, start=1)]
    replies += [_reply(good_a, examples=1), _reply(good_b, examples=3.0, arrays={k: np.full_like(v, 6.0) for k, v in TEMPLATE.items()})]

    arrays, metrics = s.aggregate_train(1, replies)  # must not raise

    # only the two good replies count: (1 * 2 + 3 * 6) / 4 = 5, finite everywhere
    for key in TEMPLATE:
        value = arrays[key].numpy()
        assert np.all(np.isfinite(value)) and np.allclose(value, 5.0), key
        assert value.dtype == TEMPLATE[key].dtype
    assert metrics["examples"] == 4
    reasons = {f["device_id"]: f["reason"] for f in s._summary["failed"]}
    for n, kind in enumerate(kinds, start=1):
        assert BAD[kind][1] in reasons[f"d{n}"], (kind, reasons[f"d{n}"])
    assert f"d{good_a}" not in reasons and f"d{good_b}" not in reasons
    if reg is not None:
        rows = {r.device_id: r for r in metric_rows(reg, "run-v")}
        for n, kind in enumerate(kinds, start=1):
            row = rows[f"d{n}"]
            assert row.phase == "train-failed" and BAD[kind][1] in row.reason and row.num_examples is None
        assert rows[f"d{good_b}"].phase == "train" and rows[f"d{good_b}"].num_examples == 3
        reg.close()


def test_a_round_of_only_bad_replies_keeps_the_global_model(tmp_path):
    s = FleetFedAvg(global_template=TEMPLATE, run_id="run-w", run_dir=str(tmp_path), num_layers=3)
    s.devices = {1: DeviceInfo("d1", "rpi4"), 2: DeviceInfo("d2", "rpi4")}
    s._sent = {1: 10, 2: 10}
    arrays, metrics = s.aggregate_train(1, [BAD["nan-examples"][0](1), BAD["nan-array"][0](2)])
    assert arrays is None and metrics is None
    assert all(np.array_equal(s.current[k], TEMPLATE[k]) for k in TEMPLATE)


def test_evaluate_replies_are_validated_too(tmp_path):
    s = FleetFedAvg(global_template=TEMPLATE, run_id="run-e", run_dir=str(tmp_path), num_layers=3)
    s.devices = {1: DeviceInfo("d1", "rpi4"), 2: DeviceInfo("d2", "rpi4")}
    s._eval_sent = [1, 2]
    metrics = s.aggregate_evaluate(1, [_reply(1, examples=float("inf")), _reply(2, examples=4, metrics={L.M_ACCURACY: 0.75})])
    assert metrics["accuracy"] == pytest.approx(0.75) and metrics["examples"] == 4
    assert "not a finite number" in s._summary["failed"][0]["reason"]
