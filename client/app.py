"""The device's Flower ClientApp: fine-tune the selector + head under the device's own budget.

Where the device is:

* deployment: ``flower-supernode --node-config "device-id='pi-01' device-class='rpi4' model-dir='...'
  data-dir='...' [state-dir='...'] [cache-dir='...']"``. ``state-dir`` defaults to the agent's
  (``$LDFLEET_HOME/devices/<id>``), so the ClientApp reads the budget the agent stored.
* simulation: Flower only gives ``partition-id``; the fleet manifest (``fleet.json``, passed to
  :func:`make_client_app` or as node config ``manifest``) maps it to a device.

Each message may run in a fresh process (deployment), so everything heavy is either cheap to load
(the model) or cached on disk (front ends, in ``cache-dir``); in simulation the per-process caches
make later rounds faster.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ldfleet.common import learning as L
from ldfleet.common.runtime import default_device_state_dir

log = logging.getLogger("ldfleet.client.app")


@dataclass(frozen=True)
class DeviceSetup:
    device_id: str
    device_class: str
    state_dir: str
    cache_dir: str
    model_dir: str
    allow_faults: bool
    datasets: Callable[[], tuple[object, object]]


_MANIFESTS: dict[str, tuple[float, L.FleetManifest]] = {}


def _manifest(path: str) -> L.FleetManifest:
    mtime = os.stat(path).st_mtime
    cached = _MANIFESTS.get(path)
    if cached is None or cached[0] != mtime:
        _MANIFESTS[path] = (mtime, L.FleetManifest.load(path))
    return _MANIFESTS[path][1]


def resolve_device(context: Context, manifest_path: str | None = None) -> DeviceSetup:
    """Which device this node is, where its state, data and model live."""
    nc = context.node_config
    manifest_path = manifest_path or (str(nc[L.NODE_MANIFEST]) if L.NODE_MANIFEST in nc else None)
    if L.NODE_DEVICE_ID in nc:
        device_id = str(nc[L.NODE_DEVICE_ID])
        missing = [k for k in (L.NODE_DEVICE_CLASS, L.NODE_MODEL_DIR, L.NODE_DATA_DIR) if k not in nc]
        if missing:
            raise ValueError(f"node config of {device_id!r} lacks {', '.join(missing)} (flower-supernode --node-config)")
        state_dir = str(nc.get(L.NODE_STATE_DIR) or default_device_state_dir(device_id))
        cache_dir = str(nc.get(L.NODE_CACHE_DIR) or Path(state_dir) / "fl-cache")
        data_dir = str(nc[L.NODE_DATA_DIR])

        def datasets() -> tuple[object, object]:
            from ldfleet.client.learning import folder_datasets

            return folder_datasets(data_dir, seed=zlib.crc32(device_id.encode()))

        return DeviceSetup(device_id, str(nc[L.NODE_DEVICE_CLASS]), state_dir, cache_dir, str(nc[L.NODE_MODEL_DIR]),
                           False, datasets)
    if manifest_path is None or L.NODE_PARTITION_ID not in nc:
        raise ValueError(
            "this node has no device-id in its node config and no fleet manifest: start it with "
            "`ldfleet client` or `flower-supernode --node-config \"device-id='...' device-class='...' ...\"`"
        )
    manifest = _manifest(manifest_path)
    dev = manifest.by_partition(int(nc[L.NODE_PARTITION_ID]))

    def pooled() -> tuple[object, object]:
        from ldfleet.client.learning import pooled_split

        pool = pooled_split(manifest.data_dir, manifest.split_seed, manifest.pool_split, manifest.task)
        return pool.subset(dev.train_indices), pool.subset(dev.test_indices)  # type: ignore[attr-defined]

    return DeviceSetup(dev.device_id, dev.device_class, dev.state_dir, dev.cache_dir, manifest.model_dir,
                       manifest.allow_faults, pooled)


def _device_record(dev: DeviceSetup) -> ConfigRecord:
    return ConfigRecord({L.NODE_DEVICE_ID: dev.device_id, L.NODE_DEVICE_CLASS: dev.device_class})


def _scores(result) -> dict[str, float | int]:
    """kws: ``accuracy``; asr: ``wer``, ``cer`` and the reference ``words`` (no accuracy)."""
    if result.wer is not None:
        return {L.M_WER: float(result.wer), L.M_CER: float(result.cer), L.M_WORDS: int(result.words)}
    return {L.M_ACCURACY: float(result.accuracy)}


def _metrics(result, budget, seconds: float) -> MetricRecord:
    return MetricRecord({
        L.M_EXAMPLES: int(result.num_examples),
        L.M_LOSS: float(result.loss) if np.isfinite(result.loss) else -1.0,
        **_scores(result),
        L.M_MEAN_LAYERS: float(result.mean_layers),
        L.M_LAYER_USAGE: [float(x) for x in result.layer_usage],
        L.M_LATENCY_MS: float(result.latency_ms),
        L.M_EXPECTED_LATENCY_MS: float(budget.expected_latency_ms) if budget.expected_latency_ms is not None else -1.0,
        L.M_POLICY_VERSION: int(budget.version),
        L.M_K: int(budget.k),
        L.M_NUM_LAYERS: int(budget.num_layers),
        L.M_SECONDS: float(seconds),
    })


def _prepare(msg: Message, context: Context, manifest: str | None):
    import torch

    from ldfleet.client.learning import frozen_model, load_global, local_data, read_budget

    torch.set_num_threads(1)  # many small steps, several clients per machine: one thread is fastest
    dev = resolve_device(context, manifest)
    model, fingerprint = frozen_model(dev.model_dir)
    budget = read_budget(dev.state_dir, model.num_layers)  # from the local device state, never the request
    if L.ARRAYS in msg.content.array_records:
        load_global(model, {k: v.numpy() for k, v in msg.content.array_records[L.ARRAYS].items()})
    data = local_data(model, fingerprint, dev.cache_dir, dev.datasets)  # type: ignore[arg-type]
    config = msg.content.config_records.get(L.CONFIG, ConfigRecord())
    return dev, model, budget, data, config


def make_client_app(manifest: str | None = None) -> ClientApp:
    """The ClientApp; ``manifest`` (a fleet.json path) is for simulated fleets."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from ldfleet.client.learning import read_budget

        dev = resolve_device(context, manifest)
        num_layers = int(msg.content.config_records.get(L.CONFIG, ConfigRecord()).get(L.M_NUM_LAYERS, 0) or 0)
        budget = read_budget(dev.state_dir, num_layers) if num_layers > 0 else None
        metrics = MetricRecord({
            L.M_POLICY_VERSION: int(budget.version) if budget else 0,
            L.M_K: int(budget.k) if budget else 0,
        })
        return Message(RecordDict({L.DEVICE: _device_record(dev), L.METRICS: metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from ldfleet.client.learning import train_selector, trained_arrays

        start = time.perf_counter()
        dev, model, budget, data, config = _prepare(msg, context, manifest)
        fault = str(config.get(L.CFG_FAULT, "")) if dev.allow_faults else ""
        delay = float(config.get(L.CFG_DELAY_S, 0.0)) if dev.allow_faults else 0.0
        rnd = int(config.get(L.CFG_ROUND, 0))
        seed = int(config.get(L.CFG_SEED, 0)) * 1_000_003 + rnd * 7919 + zlib.crc32(dev.device_id.encode()) % 100_000
        result = train_selector(
            model, data, budget.k,
            epochs=int(config.get(L.CFG_LOCAL_EPOCHS, 1)),
            batch_size=int(config.get(L.CFG_BATCH_SIZE, 16)),
            selector_lr=float(config.get(L.CFG_SELECTOR_LR, 3e-3)),
            head_lr=float(config.get(L.CFG_HEAD_LR, 2e-3)),
            seed=seed,
            crash_midway=fault == L.FAULT_CRASH,
        )
        arrays = ArrayRecord({k: Array(v) for k, v in trained_arrays(model).items()})
        metrics = _metrics(result, budget, time.perf_counter() - start)
        if delay > 0:  # a simulated straggler: its lateness is reported, not slept (no wall time wasted)
            metrics[L.M_SIMULATED_DELAY_S] = delay
        content = RecordDict({L.ARRAYS: arrays, L.METRICS: metrics, L.DEVICE: _device_record(dev)})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from ldfleet.client.learning import evaluate_selector

        start = time.perf_counter()
        dev, model, budget, data, _ = _prepare(msg, context, manifest)
        result = evaluate_selector(model, data, budget.k)
        content = RecordDict({
            L.METRICS: _metrics(result, budget, time.perf_counter() - start),
            L.DEVICE: _device_record(dev),
        })
        return Message(content, reply_to=msg)

    return app


#: The ClientApp of a real fleet (``clientapp = "ldfleet.client.app:app"``).
app = make_client_app()
