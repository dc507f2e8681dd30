"""Building a simulated fleet: corpus, per-device partitions, warm backbone, profiles, manifest.

Heavy products are cached across runs in a cache folder, keyed by the scenario sections they depend
on: ``corpus-<hash>/`` (the espeak-ng corpus, from ``data.corpus``) and ``warm-<hash>/`` (the warm
model, from ``data`` + ``warm``). A run folder then holds only what is its own:

```
RUN/fleet.json           manifest: devices, classes, state/cache folders, data indices
RUN/devices/<id>/        the agent's device_state.json, the client's cached front ends (fl-cache/)
```

Each device's clips are a partition of the corpus training split (whole speakers, or Dirichlet label
skew); a share of them is kept back as its local test split. The warm model is trained centrally on
the pooled training clips of all devices (never on their local test clips) plus the validation split
for model selection: the fleet's starting point. The report compares strategies on the corpus test
split, whose speakers no device has.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from ldfleet.common.learning import FleetManifest, ManifestDevice
from ldfleet.simulations.scenario import Scenario

log = logging.getLogger("ldfleet.sim.fleet")

LATENCY_FILE = "latency.json"


@dataclass
class FleetData:
    data_dir: Path
    manifest: FleetManifest
    warm_dir: Path


def prepare_corpus(scn: Scenario, cache_dir: Path, progress=None) -> Path:
    """The scenario's corpus: a given folder, or a cached espeak-ng corpus made on first use."""
    if scn.data.source != "synth":
        path = Path(scn.data.source).expanduser()
        if not path.exists() or (scn.task == "kws" and not path.is_dir()):
            raise FileNotFoundError(f"data.source {path} is not a folder (use 'synth' or a Speech Commands folder"
                                    + (", an audiofolder or a manifest)" if scn.task == "asr" else ")"))
        return path
    if scn.task == "asr":
        return prepare_asr_corpus(scn, cache_dir)
    from ldfleet.common.data.espeak import ENGLISH_VOICES
    from ldfleet.common.data.synth import SynthConfig, synthesize_corpus

    c = scn.data.corpus
    out = cache_dir / f"corpus-{_corpus_key(scn.data.corpus)}"
    if (out / "metadata.csv").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = SynthConfig(
        out=tmp, seed=c.seed, voices=ENGLISH_VOICES[: c.voices], variants_per_voice=c.variants_per_voice,
        clips_per_word=c.clips_per_word, unknown_per_speaker=c.unknown_per_speaker, silence_clips=c.silence_clips,
    )
    synthesize_corpus(cfg)
    tmp.replace(out)
    return out


def prepare_asr_corpus(scn: Scenario, cache_dir: Path) -> Path:
    """The cached espeak-ng phrase corpus (audiofolder) of a ``task: asr`` scenario, made on first use."""
    from ldfleet.common.data.espeak import ACCENT_VOICES, ENGLISH_VOICES
    from ldfleet.common.data.synth_asr import AsrSynthConfig, synthesize_asr_corpus

    c = scn.data.asr_corpus
    assert c is not None  # filled in by the scenario's validation
    out = cache_dir / f"asr-corpus-{_corpus_key(c)}"
    if (out / "metadata.csv").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = AsrSynthConfig(out=tmp, seed=c.seed, voices=(ENGLISH_VOICES + ACCENT_VOICES)[: c.voices],
                         variants_per_voice=c.variants_per_voice, utterances_per_speaker=c.utterances_per_speaker,
                         noise=c.noise)
    summary = synthesize_asr_corpus(cfg, progress=False)
    if summary.failures:
        log.warning("asr corpus: %d utterance(s) failed to render, e.g. %s", len(summary.failures), summary.failures[0])
    tmp.replace(out)
    return out


def _corpus_key(spec: BaseModel) -> str:
    """Cache key of a synthetic corpus: a hash of its spec (the keyword or the phrase corpus)."""
    import hashlib

    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:8]


def partition_devices(scn: Scenario, pool_speakers: list[str], pool_labels: list[int] | None = None
                      ) -> dict[str, tuple[list[int], list[int]]]:
    """device id -> (train indices, local test indices) into the pooled training split (``pool_labels``
    only for a Dirichlet partition)."""
    from ldfleet.common.data.partition import partition_by_speaker, partition_dirichlet

    devices = scn.device_ids()
    n = len(devices)
    part = scn.data.partition
    if part.kind == "voice":
        parts = partition_by_speaker(pool_speakers, n, seed=scn.data.split_seed + scn.seed)
    else:
        if pool_labels is None:
            raise ValueError("a dirichlet partition needs the clips' labels")
        parts = partition_dirichlet(pool_labels, n, part.alpha, seed=scn.data.split_seed + scn.seed, min_size=4)
    rng = np.random.default_rng(scn.seed + 17)
    # shuffle the device order so that a class does not get neighbouring speakers
    order = rng.permutation(n)
    out = {}
    for (device_id, _), p in zip(devices, (parts[i] for i in order)):
        idx = [int(i) for i in rng.permutation(p)]
        if len(idx) < 2:
            raise ValueError(f"device {device_id} got {len(idx)} clip(s); use a larger corpus or fewer devices")
        n_test = min(len(idx) - 1, max(1, int(round(scn.data.local_test_share * len(idx)))))
        out[device_id] = (sorted(idx[n_test:]), sorted(idx[:n_test]))
    return out


def prepare_warm(scn: Scenario, data_dir: Path, cache_dir: Path, train_indices: list[int], log_fn=None) -> Path:
    """The warm model (stage 1 + early-exit head; selector epochs as configured), cached and resumable."""
    import json

    import torch

    from ldfleet.client.learning import load_pool_splits
    from ldfleet.common.model.checkpoint import load_model
    from ldfleet.common.model.profiling import profile_runner
    from ldfleet.common.train import config_for
    from ldfleet.common.trainer import STATE_FILE, Trainer

    w = scn.warm
    out = cache_dir / f"warm-{warm_key(scn)}"
    state = out / STATE_FILE
    done = state.is_file() and json.loads(state.read_text()).get("done")
    if not done:
        splits = load_pool_splits(data_dir, scn.data.split_seed, scn.task)
        # set_table=0: the fleet learns the selector's scores (by gradient, on the devices), not a set table;
        # joint_epochs=0: the warm backbone is the stage-1 one the devices keep frozen; depth_clips=0: devices run
        # exactly their class's k layers (no adaptive depth chooser)
        cfg = config_for(scn.task, backbone=w.backbone, family=w.family, epochs=w.epochs, strategy_epochs=0,
                         batch_size=w.batch_size, seed=w.seed, lr=w.lr, layerdrop=w.layerdrop, set_table=0, joint_epochs=0,
                         depth_clips=0)
        train = splits["train"].subset(train_indices)
        # per-stage epochs: Trainer uses one strategy_epochs for all stage-2 strategies, so run it per stage
        trainer = Trainer(out, train, splits["val"], cfg, log=log_fn or (lambda *_: None))
        trainer.fit()
        for stage, epochs in (("early_exit", w.early_exit_epochs), ("static", w.static_epochs), ("selector", w.selector_epochs)):
            if epochs > 0:
                _train_stage(out, trainer, stage, epochs, w.seed, w.batch_size)
    if not (out / LATENCY_FILE).is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = load_model(out)
            lat = profile_runner(model.runner, seconds=1.0, repeats=7)
        finally:
            torch.set_num_threads(threads)
        (out / LATENCY_FILE).write_text(json.dumps({
            "model_id": lat.model_id, "num_layers": lat.num_layers, "front_end_ms": lat.front_end_ms,
            "layer_ms": lat.layer_ms, "seconds": lat.seconds, "threads": 1,
            "ratio_p90": lat.ratio_p90, "ratio_p99": lat.ratio_p99,
        }, indent=1))
    return out


def warm_key(scn: Scenario) -> str:
    """Cache key of the warm model: the data and warm sections (and the task, when not kws)."""
    key = scn.fingerprint("data", "warm")
    return key if scn.task == "kws" else f"{scn.task}-{key}"


def _train_stage(run: Path, trainer, stage: str, epochs: int, seed: int, batch_size: int) -> None:
    """Train one stage-2 strategy on the frozen warm backbone (its own epoch count), then save."""
    import json

    from ldfleet.common.model.checkpoint import save_model
    from ldfleet.common.front_cache import cache_front_ends
    from ldfleet.common.train import TrainConfig, strategy_optimizer, train_strategy_epoch

    marker = run / f"stage-{stage}.done"
    if marker.exists():
        return
    model = trainer.model
    cfg = TrainConfig(**{**trainer.cfg.__dict__, "strategy_epochs": epochs})
    cache = cache_front_ends(model, trainer.train_data)
    opt = strategy_optimizer(model, stage, cfg)
    history = []
    for epoch in range(epochs):
        history.append(train_strategy_epoch(model, stage, cache, opt, epochs, epoch, seed=seed, batch_size=batch_size))
    save_model(model, run, {"train_config": cfg.__dict__})
    marker.write_text(json.dumps(history))


def reference_latency(warm_dir: Path) -> dict:
    import json

    return json.loads((warm_dir / LATENCY_FILE).read_text())


def device_profiles(scn: Scenario, latency: dict):
    """The DeviceProfile each simulated device advertises: reference latency x class slowdown x jitter."""
    from ldfleet.common.schemas import DeviceProfile, utcnow

    rng = np.random.default_rng(scn.seed + 101)
    out = {}
    for device_id, spec in scn.device_ids():
        prof = scn.profiles[spec.profile]
        factor = prof.slowdown * (1.0 + prof.jitter * float(rng.uniform(-1.0, 1.0)))
        out[device_id] = DeviceProfile(
            device_id=device_id, device_class=spec.name, cores=prof.cores, memory_mb=prof.memory_mb,
            accelerator=prof.accelerator, model_id=str(latency["model_id"])[:200], num_layers=int(latency["num_layers"]),
            front_end_ms=round(float(latency["front_end_ms"]) * factor, 4),
            layer_ms=[round(float(x) * factor, 4) for x in latency["layer_ms"]],
            reference_seconds=float(latency.get("seconds", 1.0)), measured_at=utcnow(),
            # the tail is a property of the machine; the reference one stands in for every class
            latency_ratio_p90=latency.get("ratio_p90"), latency_ratio_p99=latency.get("ratio_p99"),
        )
    return out


def build_fleet(scn: Scenario, run_dir: Path, cache_dir: Path, run_id: str, timings: dict[str, float], say=print) -> FleetData:
    """Corpus, partitions, warm model and the manifest of a new run (or the existing one when resuming)."""
    from ldfleet.client.learning import load_pool_splits

    run_dir = Path(run_dir)
    t = time.perf_counter()
    data_dir = prepare_corpus(scn, cache_dir)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    splits = load_pool_splits(data_dir, scn.data.split_seed, scn.task)
    pool = splits["train"]
    parts = partition_devices(scn, pool.speakers, getattr(pool, "labels", None))
    timings["partition"] = time.perf_counter() - t
    say(f"data{' (asr)' if scn.task == 'asr' else ''}: {data_dir} ({len(pool)} training clips over {len(parts)} devices, "
        f"{len(splits['test'])} held-out test clips) in {timings['data']:.0f} s")
    t = time.perf_counter()
    train_pool = sorted(i for tr, _ in parts.values() for i in tr)
    warm_dir = prepare_warm(scn, data_dir, cache_dir, train_pool, log_fn=lambda m: say(f"  warm-up: {m}"))
    timings["warm"] = time.perf_counter() - t
    say(f"warm model: {warm_dir} in {timings['warm']:.0f} s")
    devices = []
    for pid, (device_id, spec) in enumerate(scn.device_ids()):
        folder = run_dir / "devices" / device_id
        tr, te = parts[device_id]
        devices.append(ManifestDevice(
            device_id=device_id, device_class=spec.name, partition_id=pid, state_dir=str(folder.resolve()),
            cache_dir=str((folder / "fl-cache").resolve()), train_indices=tr, test_indices=te,
        ))
    manifest = FleetManifest(
        run_id=run_id, task=scn.task, data_dir=str(Path(data_dir).resolve()), split_seed=scn.data.split_seed, pool_split="train",
        model_dir=str(warm_dir.resolve()), allow_faults=True, devices=devices,
    )
    return FleetData(Path(data_dir), manifest, warm_dir)


def warm_device_caches(manifest: FleetManifest, timings: dict[str, float]) -> None:
    """Compute every device's front-end cache once, in this process, with the ClientApp's own code."""
    import torch

    from ldfleet.client.learning import frozen_model, local_data, pooled_split

    t = time.perf_counter()
    model, fingerprint = frozen_model(manifest.model_dir)
    pool = pooled_split(manifest.data_dir, manifest.split_seed, manifest.pool_split, manifest.task)
    threads = torch.get_num_threads()
    try:
        for dev in manifest.devices:
            local_data(model, fingerprint, dev.cache_dir,
                       lambda d=dev: (pool.subset(d.train_indices), pool.subset(d.test_indices)))  # type: ignore[attr-defined]
    finally:
        torch.set_num_threads(threads)
    timings["device_caches"] = time.perf_counter() - t
