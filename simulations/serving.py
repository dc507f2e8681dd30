"""Simulated devices that also serve traffic: the scenario's ``serve`` option of `ldfleet simulate`.

After every round, each device of the fleet runs ``serve.requests_per_device`` requests, one clip at
a time, from its own held-out clips (``ManifestDevice.test_indices``, taken in turn round after
round) through the path `ldfleet infer` / `ldfleet serve` use (``client/infer.py``): the policy in
the device's agent state dir (so budget events apply from the next request on), the governor, the
torch runtime. The model is the warm model with the global selector and head of the round just
finished (its checkpoint). Each device's ``InferenceStats`` window is then published at once by its
own ``TelemetryPublisher`` (telemetry topic, QoS 0), and the controller folds it into the
``inference_rollups`` of that device and minute.

Limits: all devices share this machine, so latencies (and the governor's estimates) are this
machine's, not those of the class profile. RUN/serving.json keeps the requests sent per device;
``close`` waits until the registry has counted them all.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ldfleet.simulations.waits import wait_until

log = logging.getLogger("ldfleet.sim.serving")

SERVING_FILE = "serving.json"


class FleetServing:
    """Inference traffic of every simulated device, run from the round hooks (one thread)."""

    def __init__(self, manifest, broker_url: str, run_dir: Path, requests_per_device: int,
                 deadline_ms: float | None = None):
        self.manifest = manifest
        self.broker_url = broker_url
        self.path = Path(run_dir) / SERVING_FILE
        self.requests = requests_per_device
        self.deadline_ms = deadline_ms
        self.sent: dict[str, int] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.engine = None
        self.sessions: dict[str, object] = {}
        self.publishers: dict[str, object] = {}

    # ---- phases of one round's traffic

    def _load(self, run_dir: Path, rnd: int) -> None:
        """The warm model (once) with the global selector and head of round ``rnd``."""
        from ldfleet.client.infer import open_engine
        from ldfleet.client.learning import load_global
        from ldfleet.server.checkpoints import checkpoint_rounds, load_checkpoint

        if self.engine is None:
            self.engine = open_engine(self.manifest.model_dir, "torch", threads=0)
        if rnd in checkpoint_rounds(run_dir):
            load_global(self.engine.model, load_checkpoint(run_dir, rnd))

    def _device(self, dev):
        """The device's inference session and telemetry publisher (made on first use)."""
        from ldfleet.client.infer import InferenceSession, PolicySource
        from ldfleet.client.telemetry import TelemetryPublisher

        if dev.device_id not in self.sessions:
            session = InferenceSession(self.engine, PolicySource(self.engine.num_layers, dev.state_dir))
            session.warm_up(runs=2)  # the governor's estimates before the device's first request
            # published by hand after each round's batch: the periodic loop never fires in a run
            pub = TelemetryPublisher(dev.device_id, self.broker_url, session.stats, interval_s=3600.0).start()
            self.sessions[dev.device_id], self.publishers[dev.device_id] = session, pub
        return self.sessions[dev.device_id], self.publishers[dev.device_id]

    def _clips(self, dev, rnd: int) -> list:
        """``requests`` held-out waveforms ``[samples]`` (16 kHz) of the device, continuing round after round."""
        from ldfleet.client.learning import pooled_split

        pool = pooled_split(self.manifest.data_dir, self.manifest.split_seed, self.manifest.pool_split, self.manifest.task)
        idx = dev.test_indices or dev.train_indices
        start = (rnd - 1) * self.requests
        return [pool[idx[(start + j) % len(idx)]][0].numpy() for j in range(self.requests)]

    def serve_round(self, run_dir: Path, rnd: int) -> dict[str, float]:
        """Every device serves its requests and publishes them; returns {requests, mean_k, interventions, seconds}."""
        if self.requests <= 0:
            return {}
        t0 = time.perf_counter()
        self._load(run_dir, rnd)
        total = ks = interventions = 0
        for dev in self.manifest.devices:
            session, pub = self._device(dev)
            for wave in self._clips(dev, rnd):
                result, decision, _ = session.infer(wave, self.deadline_ms)
                ks += len(result.layers)
                interventions += int(decision.intervened)
            if not wait_until(lambda p=pub: p.session.connected, 10.0):
                log.warning("%s: telemetry connection not up; round %d's inference summary is not sent", dev.device_id, rnd)
                continue
            message = pub.publish_now()
            self.sent[dev.device_id] = self.sent.get(dev.device_id, 0) + message.inference.requests
            total += message.inference.requests
        self._save()
        return {"requests": total, "mean_k": ks / max(1, self.requests * len(self.manifest.devices)),
                "interventions": interventions, "seconds": time.perf_counter() - t0}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.sent, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def close(self, registry, timeout_s: float = 15.0) -> dict[str, int]:
        """Stop the publishers, then wait (``timeout_s``) until the registry's roll-ups count every request
        sent; returns the devices whose count still differs (device -> stored requests)."""
        from ldfleet.server.telemetry import usage

        for pub in self.publishers.values():
            pub.stop()
        if not self.sent:
            return {}

        def differs() -> dict[str, int]:
            stored = usage(registry)
            return {d: stored.get(d, {}).get("requests", 0) for d, n in self.sent.items()
                    if stored.get(d, {}).get("requests", 0) != n}

        wait_until(lambda: not differs(), timeout_s)
        late = differs()
        if late:
            log.warning("inference telemetry not (yet) in the registry for %d device(s): %s", len(late), late)
        return late

