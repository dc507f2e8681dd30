"""A budget-aware FedAvg: Flower's FedAvg, per device, over only the selector and its head.

What it changes in FedAvg (``flwr.serverapp.strategy.FedAvg``):

* ``configure_train`` / ``configure_evaluate``: nodes are mapped to devices with a ``query``
  message; only *available* devices are sampled (online in the registry and not marked offline by
  the round plan); every node gets its own RecordDict (FedAvg shares one), so per-device settings
  (fault injection in simulations) never leak to others. No budget is sent: devices read theirs.
* ``aggregate_train``: a per-key weighted average over the replies that carry each key (FedAvg
  assumes every reply has every key). Every reply is validated first (``validate_reply``: example
  count, array names/shapes/dtypes, finite values and metrics); a refused one is a failure. Every
  device's metrics go to the registry, failures as ``train-failed`` rows (no metrics) with their
  reason (also in the round summary and the log); per-class aggregates and traffic go to the summary.
* ``start``: FedAvg's loop, plus the round lifecycle in the registry, a checkpoint of the global
  arrays after every round, resuming from a given round, hooks for simulations (events, progress),
  and a short wait for devices whose policy has not converged before a round starts.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from ldfleet.common import learning as L
from ldfleet.server.checkpoints import save_checkpoint
from ldfleet.server.nodes import DeviceInfo, NodeDirectory
from ldfleet.server.registry.store import Registry
from ldfleet.server.rounds import EVAL, TRAIN, device_status, failed_phase, unsettled_devices
from ldfleet.server.validate_reply import BadReply, check_reply

log = logging.getLogger("ldfleet.server.strategy")


@dataclass
class RoundPlan:
    """What a simulation wants of a round (a real fleet leaves it empty)."""

    offline: set[str] = field(default_factory=set)  # devices that do not show up this round
    crash: int = 0  # this many sampled devices crash half-way through local training
    crash_devices: set[str] = field(default_factory=set)
    delays: dict[str, float] = field(default_factory=dict)  # stragglers: device -> seconds late (simulated)


class RoundHooks(Protocol):
    def before_round(self, rnd: int) -> RoundPlan | None: ...

    def after_round(self, rnd: int, summary: dict[str, Any]) -> None: ...


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def weighted_mean_per_key(
    updates: list[tuple[dict[str, np.ndarray], float]], previous: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """FedAvg per key: each array is averaged over the updates that carry it (weights renormalised);
    keys nobody sent keep their previous value."""
    out: dict[str, np.ndarray] = {}
    for key, old in previous.items():
        parts = [(arrs[key], w) for arrs, w in updates if key in arrs]
        total = sum(w for _, w in parts)
        if not parts or total <= 0:
            out[key] = old
            continue
        acc = np.zeros(old.shape, dtype=np.float64)
        for value, w in parts:
            acc += value.astype(np.float64) * (w / total)
        out[key] = acc.astype(old.dtype)
    return out


def _scalar(metrics: MetricRecord, key: str, default: float | None = None) -> float | None:
    value = metrics.get(key, default)
    if value is None or isinstance(value, list):
        return default
    return float(value)


@dataclass
class DeviceResult:
    device: DeviceInfo
    node_id: int
    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray] | None = None
    bytes_received: int = 0


def class_aggregates(results: list[DeviceResult]) -> dict[str, dict[str, float]]:
    """Per device class: example-weighted accuracy (kws) or word-weighted WER and CER (asr), loss, mean
    layers, latency; device count."""
    groups: dict[str, list[DeviceResult]] = defaultdict(list)
    for r in results:
        groups[r.device.device_class].append(r)
    groups["(all)"] = list(results)
    out: dict[str, dict[str, float]] = {}
    for cls, rows in groups.items():
        n = sum(max(0.0, float(r.metrics.get(L.M_EXAMPLES, 0))) for r in rows)
        if not rows or n <= 0:
            continue

        def wmean(key: str) -> float:
            return sum(float(r.metrics.get(key, 0.0)) * float(r.metrics.get(L.M_EXAMPLES, 0)) for r in rows) / n

        usage_rows = [r.metrics.get(L.M_LAYER_USAGE) for r in rows if isinstance(r.metrics.get(L.M_LAYER_USAGE), list)]
        usage = None
        if usage_rows and len({len(u) for u in usage_rows}) == 1:
            weights = [float(r.metrics.get(L.M_EXAMPLES, 0)) for r in rows if isinstance(r.metrics.get(L.M_LAYER_USAGE), list)]
            tot = sum(weights) or 1.0
            usage = [sum(u[i] * w for u, w in zip(usage_rows, weights)) / tot for i in range(len(usage_rows[0]))]
        out[cls] = {
            "devices": len(rows), "examples": n, "loss": wmean(L.M_LOSS),
            "mean_layers": wmean(L.M_MEAN_LAYERS), "latency_ms": wmean(L.M_LATENCY_MS),
            "k_mean": sum(float(r.metrics.get(L.M_K, 0)) for r in rows) / len(rows),
        }
        scored = [r for r in rows if L.M_WER in r.metrics]
        if scored:  # speech recognition: the class's WER/CER over all its reference words
            out[cls].update(_error_rates(scored))
        if len(scored) < len(rows):
            out[cls]["accuracy"] = wmean(L.M_ACCURACY)
        if usage is not None:
            out[cls]["layer_usage"] = usage  # type: ignore[assignment]
    return out


def _error_rates(rows: list[DeviceResult]) -> dict[str, float]:
    """WER and CER of a group of asr devices: each device's rate weighted by its reference words
    (= summed edits / summed words), or by its examples when a reply has no word count."""
    words = [float(r.metrics.get(L.M_WORDS, 0) or 0) for r in rows]
    weights = words if all(w > 0 for w in words) else [float(r.metrics.get(L.M_EXAMPLES, 0)) for r in rows]
    total = sum(weights) or 1.0
    return {key: sum(float(r.metrics.get(m, 0.0)) * w for r, w in zip(rows, weights)) / total
            for key, m in (("wer", L.M_WER), ("cer", L.M_CER))}


class FleetFedAvg(FedAvg):
    """FedAvg over the selector + head of a heterogeneous fleet, with per-device records."""

    def __init__(
        self,
        *,
        global_template: dict[str, np.ndarray],
        run_id: str,
        run_dir: str,
        registry: Registry | None = None,
        num_layers: int,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        min_available_nodes: int = 1,
        train_settings: dict[str, Any] | None = None,
        seed: int = 0,
        round_timeout_s: float = 600.0,
        settle_timeout_s: float = 5.0,
        wait_nodes_s: float = 120.0,
        full_model_bytes: int = 0,
        hooks: RoundHooks | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes,
            weighted_by_key=L.M_EXAMPLES, arrayrecord_key=L.ARRAYS, configrecord_key=L.CONFIG,
        )
        self.template = {k: np.asarray(v) for k, v in global_template.items()}
        self.run_id = run_id
        self.run_dir = run_dir
        self.registry = registry
        self.num_layers = num_layers
        self.train_settings = dict(train_settings or {})
        self.seed = seed
        self.round_timeout_s = round_timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.wait_nodes_s = wait_nodes_s
        self.full_model_bytes = full_model_bytes
        self.hooks = hooks
        self.nodes = NodeDirectory(registry)
        self.current = {k: v.copy() for k, v in self.template.items()}
        self._plan = RoundPlan()
        self._round_id: int | None = None
        self._summary: dict[str, Any] = {}
        self._sent: dict[int, int] = {}
        self._eval_sent: list[int] = []
        self._crashing: set[str] = set()
        self._round = 0

    # -- nodes and devices ------------------------------------------------------------------
    @property
    def devices(self) -> dict[int, DeviceInfo]:
        """Node id -> device, as far as the nodes have said (:class:`~.nodes.NodeDirectory`)."""
        return self.nodes.devices

    @devices.setter
    def devices(self, value: dict[int, DeviceInfo]) -> None:
        self.nodes.devices = value

    def identify(self, grid: Grid, timeout: float | None = None) -> dict[int, DeviceInfo]:
        """The connected nodes' devices, asking new nodes which they are (at most ``timeout`` s,
        default the round timeout)."""
        return self.nodes.identify(grid, num_layers=self.num_layers, min_nodes=self.min_available_nodes,
                                   wait_nodes_s=self.wait_nodes_s, timeout=self.round_timeout_s if timeout is None else timeout)

    def available(self, grid: Grid) -> dict[int, DeviceInfo]:
        """Known nodes whose device is not offline (registry liveness, and the round plan)."""
        nodes = self.identify(grid)
        offline = set(self._plan.offline)
        if self.registry is not None:
            offline |= {d for d, st in device_status(self.registry).items() if not st["online"]}
        return {n: d for n, d in nodes.items() if d.device_id not in offline}

    def _sample(self, nodes: dict[int, DeviceInfo], fraction: float, minimum: int, salt: int) -> list[int]:
        if not nodes or fraction <= 0:
            return []
        size = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
        rng = random.Random(self.seed * 1_000_003 + self._round * 31 + salt)
        return sorted(rng.sample(sorted(nodes), size))

    def settle(self) -> int:
        """Wait (up to ``settle_timeout_s``) while online devices' budgets are changing: a policy the
        controller has not resolved yet, or one a device has not applied yet. A round then trains
        under the budgets the operator set before it started."""
        if self.registry is None or self.settle_timeout_s <= 0:
            return 0
        deadline = time.monotonic() + self.settle_timeout_s
        known = {d.device_id for d in self.devices.values()}
        while True:
            pending = unsettled_devices(self.registry, known)
            if not pending or time.monotonic() >= deadline:
                if pending:
                    log.warning("round %d starts with %d device(s) still changing budget: %s", self._round, len(pending),
                                sorted(pending)[:5])
                return len(pending)
            time.sleep(0.1)

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round = server_round
        nodes = self.available(grid)
        sampled = self._sample(nodes, self.fraction_train, self.min_train_nodes, salt=1)
        rng = random.Random(self.seed * 7_777 + server_round)
        sampled_ids = [nodes[n].device_id for n in sampled]
        crashing = set(self._plan.crash_devices) & set(sampled_ids)
        if self._plan.crash > 0:
            rest = [d for d in sampled_ids if d not in crashing]
            crashing |= set(rng.sample(rest, min(len(rest), self._plan.crash)))
        self._crashing = crashing
        self._summary.update({
            "available": len(nodes),
            "offline": sorted(d.device_id for n, d in self.identify(grid).items() if n not in nodes),
            "sampled": sampled_ids,
            "crash_injected": sorted(crashing),
        })
        size = L.array_bytes(arrays)
        messages = []
        for node in sampled:
            dev = nodes[node]
            cfg = ConfigRecord({**dict(config), **self.train_settings, L.CFG_ROUND: server_round, L.CFG_SEED: self.seed})
            if dev.device_id in crashing:
                cfg[L.CFG_FAULT] = L.FAULT_CRASH
            if dev.device_id in self._plan.delays:
                cfg[L.CFG_DELAY_S] = float(self._plan.delays[dev.device_id])
            self._sent[node] = size
            messages.append(Message(RecordDict({L.ARRAYS: arrays, L.CONFIG: cfg}), message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def _check_reply(self, reply: Message, with_arrays: bool, node: int | None = None) -> tuple[DeviceResult | None, str | None]:
        """A result, or the reason the reply does not count (``ldfleet.server.validate_reply``)."""
        node = self.nodes.node_of(reply) if node is None else node
        dev = self.nodes.device_of(node)
        if reply.has_error():
            return None, _error_reason(reply.error.reason)
        content = reply.content
        try:
            checked = check_reply(content, self.template, with_arrays=with_arrays, num_layers=self.num_layers)
        except BadReply as exc:
            return None, f"refused reply: {exc}"
        late = float(checked.metrics.get(L.M_SIMULATED_DELAY_S, 0.0) or 0.0)
        if late >= self.round_timeout_s:
            return None, f"no reply within {self.round_timeout_s:g} s (straggler, {late:g} s late)"
        if L.DEVICE in content.config_records:
            rec = content.config_records[L.DEVICE]
            did = str(rec.get(L.NODE_DEVICE_ID, dev.device_id))
            dev = DeviceInfo(did, self.nodes.class_of(did, str(rec.get(L.NODE_DEVICE_CLASS, dev.device_class))))
        result = DeviceResult(dev, node, checked.metrics, checked.arrays)
        result.metrics[L.M_EXAMPLES] = checked.num_examples
        if with_arrays:
            result.bytes_received = L.array_bytes(content.array_records[L.ARRAYS])
        return result, None

    def _collect(self, replies: Iterable[Message], sent: list[int], with_arrays: bool, phase: str) -> list[DeviceResult]:
        results: list[DeviceResult] = []
        failures: list[dict[str, Any]] = []
        answered = set()
        for reply in replies:
            node = self.nodes.node_of(reply)
            answered.add(node)
            try:
                result, reason = self._check_reply(reply, with_arrays, node)
            except Exception as exc:  # noqa: BLE001 - one unreadable reply never aborts the round
                result, reason = None, f"reply could not be read: {type(exc).__name__}: {exc}"
            if result is None:
                dev = self.nodes.device_of(node)
                log.warning("round %d %s: device %s does not count: %s", self._round, phase, dev.device_id, reason)
                failures.append({"device_id": dev.device_id, "device_class": dev.device_class, "phase": phase, "reason": reason})
            else:
                results.append(result)
        for node in sent:
            if node not in answered:
                dev = self.nodes.device_of(node)
                failures.append({"device_id": dev.device_id, "device_class": dev.device_class, "phase": phase,
                                 "reason": f"no reply within {self.round_timeout_s:g} s"})
        self._record(results, failures, phase)
        self._summary.setdefault("failed", []).extend(failures)
        return results

    def _record(self, results: list[DeviceResult], failures: list[dict[str, Any]], phase: str) -> None:
        if self.registry is None or self._round_id is None:
            return
        for r in results:
            m = r.metrics
            usage = m.get(L.M_LAYER_USAGE)
            self.registry.record_round_metric(
                self._round_id, r.device.device_id, phase=phase, device_class=r.device.device_class,
                policy_version=int(m.get(L.M_POLICY_VERSION, 0)), k=int(m.get(L.M_K, 0)) or None,
                accuracy=_scalar(m, L.M_ACCURACY), wer=_scalar(m, L.M_WER), cer=_scalar(m, L.M_CER),
                loss=_scalar(m, L.M_LOSS), num_examples=int(m[L.M_EXAMPLES]),
                layer_usage=[float(x) for x in usage] if isinstance(usage, list) else None,
                mean_kept_layers=_scalar(m, L.M_MEAN_LAYERS), latency_ms=_scalar(m, L.M_LATENCY_MS),
            )
        for f in failures:
            self.registry.record_round_metric(self._round_id, f["device_id"], phase=failed_phase(phase),
                                              device_class=f["device_class"], reason=f["reason"])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results = self._collect(replies, list(self._sent), with_arrays=True, phase=TRAIN)
        if not results:
            return None, None
        updates = [(r.arrays or {}, float(r.metrics[L.M_EXAMPLES])) for r in results]
        self.current = weighted_mean_per_key(updates, self.current)
        per_class = class_aggregates(results)
        self._summary["train"] = per_class
        self._summary["policy_versions"] = {r.device.device_id: int(r.metrics.get(L.M_POLICY_VERSION, 0)) for r in results}
        self._summary["k"] = {r.device.device_id: int(r.metrics.get(L.M_K, 0)) for r in results}
        self._summary["traffic"] = {
            "sent_bytes": {self.devices[n].device_id: b for n, b in self._sent.items() if n in self.devices},
            "received_bytes": {r.device.device_id: r.bytes_received for r in results},
            "full_model_bytes": self.full_model_bytes,
        }
        overall = per_class.get("(all)", {})
        metrics = MetricRecord({k: float(v) for k, v in overall.items() if isinstance(v, (int, float))})
        return to_record(self.current), metrics

    # -- evaluation ---------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0:
            return []
        nodes = self.available(grid)
        sampled = self._sample(nodes, self.fraction_evaluate, self.min_evaluate_nodes, salt=2)
        self._eval_sent = list(sampled)
        cfg = {**dict(config), L.CFG_ROUND: server_round}
        return [
            Message(RecordDict({L.ARRAYS: arrays, L.CONFIG: ConfigRecord(dict(cfg))}), message_type=MessageType.EVALUATE, dst_node_id=n)
            for n in sampled
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = self._collect(replies, self._eval_sent, with_arrays=False, phase=EVAL)
        if not results:
            return None
        per_class = class_aggregates(results)
        self._summary["eval"] = per_class
        overall = per_class.get("(all)", {})
        return MetricRecord({k: float(v) for k, v in overall.items() if isinstance(v, (int, float))})

    # -- the loop ---------------------------------------------------------------------------------
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
    ) -> Result:
        timeout = self.round_timeout_s if timeout is None else timeout
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        arrays = initial_arrays
        self.current = to_numpy(initial_arrays)
        self.identify(grid)
        for rnd in range(first_round, num_rounds + 1):
            t0 = time.monotonic()
            self._round = rnd
            self._summary = {"round": rnd}
            self._sent = {}
            self._eval_sent = []
            self.nodes.new_round()
            self._plan = (self.hooks.before_round(rnd) if self.hooks else None) or RoundPlan()
            self._summary["unsettled"] = self.settle()
            if self.registry is not None:
                row = self.registry.start_round(self.run_id, rnd, config={
                    "fraction_train": self.fraction_train, "fraction_evaluate": self.fraction_evaluate, **self.train_settings,
                })
                self._round_id = row.id
            replies = self.nodes.send(grid, self.configure_train(rnd, arrays, train_config, grid), timeout)
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            t_train = time.monotonic() - t0
            eval_replies = self.nodes.send(grid, self.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout)
            eval_metrics = self.aggregate_evaluate(rnd, eval_replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            if evaluate_fn is not None:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            save_checkpoint(self.run_dir, rnd, self.current, self.run_id)
            self._summary["seconds"] = {"train": t_train, "total": time.monotonic() - t0}
            self._summary["updated"] = new_arrays is not None
            if self.registry is not None and self._round_id is not None:
                self.registry.finish_round(self._round_id, status="finished", summary=_jsonable(self._summary))
            if self.hooks is not None:
                self.hooks.after_round(rnd, dict(self._summary))
        result.arrays = arrays
        return result


def _error_reason(text: str | None) -> str:
    """The useful line of a Flower error reply (simulation wraps the exception in a Ray traceback)."""
    if not text:
        return "error reply"
    marker = "Message: "
    if marker in text:
        text = text[text.rindex(marker) + len(marker):]
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "error reply")
    return line.rstrip("'>").strip()[:300]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
