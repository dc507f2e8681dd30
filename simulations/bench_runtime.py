"""`ldfleet bench runtime`: device runtimes side by side, and the governor under a load step.

(a) ``runtimes``: torch eager, onnxruntime fp32 and onnxruntime int8 at each keep ratio, batch 1, on
held-out clips; the runtimes take turns clip by clip, so machine noise hits them alike. Rows:
``runtime, keep, k, ms_p50, ms_p99, accuracy`` for a keyword model, ``wer`` and ``cer`` (accuracy
null) for a speech-recognition model on held-out utterances (``--data`` an audiofolder or manifest).

(b) ``load_step``: a stream of requests with a latency target; for the middle third of the stream
CPU-spinning processes (one per core) compete with inference. Once with a fixed k (the policy's),
once with the governor choosing k per request (for the input's duration) under the same target in ms
for every request, and, for a speech-recognition model, once with a real-time-factor target
(``governor_rtf``: each utterance gets ``rtf x 1000 x`` its seconds, the RTF chosen so that the clips'
targets add up to the same total as the ms target's). Rows: ``mode, target_ms`` (the mean per-request
target), ``rtf, p50_ms, p99_ms, miss_rate`` (each request against its own target), ``accuracy`` or
``wer`` (+ ``mean_k``, ``interventions``). The target defaults to ``target_factor`` x the unloaded p50
at the policy's k, measured just before.

Without ``--run`` a small keyword model is trained once on a small synthetic corpus and cached in
``$LDFLEET_HOME/cache/bench-runtime`` (a few minutes the first time).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ldfleet.client.governor import Governor
from ldfleet.client.infer import open_engine, run_decided, warm_up
from ldfleet.client.profile import cpu_cores
from ldfleet.client.telemetry import percentile
from ldfleet.common.edge_runtime import SAMPLE_RATE
from ldfleet.common.metrics import score

Log = Callable[[str], None]


@dataclass
class RuntimeRow:
    runtime: str
    keep: float
    k: int
    ms_p50: float
    ms_p99: float
    accuracy: float | None  # keyword models
    examples: int
    wer: float | None = None  # speech-recognition models
    cer: float | None = None
    mean_layers: float | None = None  # layers run per input (adaptive: its depths average about k)


@dataclass
class LoadStepRow:
    mode: str
    target_ms: float
    p50_ms: float
    p99_ms: float
    miss_rate: float
    accuracy: float | None  # keyword models; a speech-recognition model has ``wer``
    mean_k: float
    interventions: int
    requests: int
    loaded_requests: int
    front_end_p99_ms: float  # the part no k can save
    misses_at_one_layer: int  # misses although a single layer ran: the front end alone was too slow
    wer: float | None = None
    rtf: float | None = None  # governor_rtf: the real-time factor each request was held to


# ---- the model and clips ------------------------------------------------------------------------

def default_model(cache: Path, log: Log) -> tuple[Path, Path]:
    """(run dir, corpus dir) of a small cached keyword model, trained here if missing."""
    from ldfleet.common.data.espeak import ENGLISH_VOICES
    from ldfleet.common.data.synth import METADATA, SynthConfig, synthesize_corpus
    from ldfleet.common.train import TrainConfig
    from ldfleet.common.trainer import Trainer
    from ldfleet.common.data.folder import load_splits

    data, run = cache / "synth", cache / "run"
    if not (data / METADATA).exists():
        log(f"synthesizing a small keyword corpus into {data} (espeak-ng, once)")
        synthesize_corpus(SynthConfig(out=data, voices=ENGLISH_VOICES[:6], variants_per_voice=4,
                                      clips_per_word=2, unknown_per_speaker=2, silence_clips=32, overwrite=True),
                          progress=False)
    if not (run / ".done").exists():
        log(f"training a tiny keyword model into {run} (once; a few minutes on 2 idle cores)")
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's spinning workers slow down many-fold on shared cores
        try:
            splits = load_splits(data, seed=0)
            cfg = TrainConfig(epochs=8, strategy_epochs=2, batch_size=16)
            Trainer(run, splits["train"], splits["val"], cfg, log=lambda _m: None).fit(lambda *_a: None)
        finally:
            torch.set_num_threads(threads)
        (run / ".done").touch()
    return run, data


def ensure_export(run: Path, out: Path, log: Log) -> Path:
    """An ONNX export of ``run`` (fp32 + int8) in ``out``, redone when the run's weights are newer."""
    from ldfleet.common.edge_runtime import MANIFEST
    from ldfleet.common.model.checkpoint import WEIGHTS
    from ldfleet.common.model.export import export_onnx

    manifest = out / MANIFEST
    if not manifest.exists() or manifest.stat().st_mtime < (run / WEIGHTS).stat().st_mtime:
        log(f"exporting {run} to ONNX in {out}")
        export_onnx(run, out, int8=True)
    return out


def test_clips(data: Path, limit: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """Up to ``limit`` held-out inputs (waveform, answer): the test split, then validation, in order.
    A keyword corpus gives 1 s clips and label names; an audiofolder or manifest gives whole
    utterances and their transcripts."""
    from ldfleet.common.data.audio import load_clip
    from ldfleet.common.data.folder import load_splits
    from ldfleet.common.data.labels import LABELS
    from ldfleet.common.data.transcribed import is_transcribed, load_transcribed_splits, read_utterance

    if is_transcribed(data):
        splits = load_transcribed_splits(data, seed=seed, preload=False)
        held_out = [*splits["test"].items, *splits["val"].items][:limit]
        return [(read_utterance(u.path), u.text) for u in held_out]
    splits = load_splits(data, seed=seed, preload=False)
    clips = [*splits["test"].clips, *splits["val"].clips][:limit]
    return [(load_clip(c.path, trim=not c.is_silence, start=c.start, frames=c.frames), LABELS[c.label]) for c in clips]


def quality(task: str, predictions: list[str], references: list[str]) -> dict:
    """``accuracy`` (kws), or ``wer`` and ``cer`` (asr, jiwer via ``common.metrics``), the others None."""
    scores = score(task, predictions, references)
    return {"accuracy": scores.get("accuracy"), "wer": scores.get("wer"), "cer": scores.get("cer")}


# ---- (a) runtimes side by side --------------------------------------------------------------------

def bench_runtimes(run: Path, export: Path, clips, keeps=(0.25, 0.5, 1.0), threads: int = 1,
                   warmup: int = 5, log: Log = lambda _m: None, strategy: str = "selector") -> list[RuntimeRow]:
    engines = {name: open_engine(export if name.startswith("onnx") else run, name, threads, strategy)
               for name in ("torch", "onnx", "onnx-int8")}
    task = engines["torch"].task
    rows = []
    for keep in keeps:
        log(f"runtimes at keep {keep}")
        times = {name: [] for name in engines}
        answers = {name: [] for name in engines}
        depths = {name: [] for name in engines}
        for i, (wave, _answer) in enumerate([*clips[:warmup], *clips]):
            for name, engine in engines.items():
                r = engine.run(wave, engine.k_for(keep))
                if i >= warmup:
                    times[name].append(r.ms)
                    answers[name].append(r.prediction)
                    depths[name].append(len(r.layers))
        references = [answer for _wave, answer in clips]
        for name, engine in engines.items():
            rows.append(RuntimeRow(name, keep, engine.k_for(keep), statistics.median(times[name]),
                                   percentile(times[name], 99), examples=len(clips),
                                   mean_layers=statistics.mean(depths[name]), **quality(task, answers[name], references)))
    return rows


# ---- (b) the load step ------------------------------------------------------------------------------

def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(10_000):
            pass


class CpuHog:
    """``n`` processes spinning on the CPU between ``start()`` and ``stop()``."""

    def __init__(self, n: int):
        self.n = n
        self._stop = mp.Event()
        self._procs: list[mp.Process] = []

    def start(self) -> None:
        self._stop.clear()
        self._procs = [mp.Process(target=_spin, args=(self._stop,), daemon=True) for _ in range(self.n)]
        for p in self._procs:
            p.start()

    def stop(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self._procs = []


def load_step(engine, clips, mode: str, target_ms: float, requests: int, spinners: int,
              gap_ms: float = 2.0, rtf: float | None = None) -> LoadStepRow:
    """One stream of ``requests`` (clips cycled); spinners run for its middle third. ``mode``:
    ``fixed`` (k = L), ``governor`` (every request held to ``target_ms``) or ``governor_rtf`` (each
    held to ``rtf x 1000 x`` its seconds)."""
    L = engine.num_layers
    governor = Governor(L)
    if mode != "fixed":
        warm_up(engine, governor)  # as `serve` does: the stream's first request is planned too
    hog = CpuHog(spinners)
    lat, ks, fronts, answers, references, interventions, targets = [], [], [], [], [], 0, []
    lo, hi = requests // 3, 2 * requests // 3
    try:
        for i in range(requests):
            if i == lo:
                hog.start()
            if i == hi:
                hog.stop()
            wave, answer = clips[i % len(clips)]
            seconds = len(wave) / SAMPLE_RATE
            own = rtf * 1000 * seconds if mode == "governor_rtf" else target_ms  # type: ignore[operator]
            targets.append(own)
            decision = governor.decide(L, None if mode == "fixed" else own, seconds)
            start = time.perf_counter()
            r = run_decided(engine, wave, decision)
            r.ms = (time.perf_counter() - start) * 1000
            governor.observe(r, seconds)
            lat.append(r.ms)
            ks.append(len(r.layers))
            fronts.append(r.front_end_ms)
            answers.append(r.prediction)
            references.append(answer)
            interventions += decision.intervened or r.cut_short
            time.sleep(gap_ms / 1000)
    finally:
        hog.stop()
    scores = quality(engine.task, answers, references)
    missed = [t > own for t, own in zip(lat, targets)]
    return LoadStepRow(mode, statistics.mean(targets), statistics.median(lat), percentile(lat, 99),
                       sum(missed) / len(lat), scores["accuracy"], sum(ks) / len(ks),
                       interventions, len(lat), hi - lo, percentile(fronts, 99),
                       sum(m and k == 1 for m, k in zip(missed, ks)), scores["wer"], rtf if mode == "governor_rtf" else None)


def bench_load_step(export: Path, clips, runtime: str = "onnx", requests: int = 300, target_ms: float | None = None,
                    target_factor: float = 1.5, spinners: int = 0, threads: int = 1,
                    log: Log = lambda _m: None, strategy: str = "selector") -> list[LoadStepRow]:
    engine = open_engine(export, runtime, threads, strategy)
    if target_ms is None:
        base = [engine.run(clips[i % len(clips)][0], engine.num_layers).ms for i in range(40)]
        target_ms = target_factor * statistics.median(base[10:])
        log(f"unloaded p50 at k={engine.num_layers}: {statistics.median(base[10:]):.1f} ms; target {target_ms:.1f} ms")
    n = spinners or cpu_cores()
    seconds = [len(clips[i % len(clips)][0]) / SAMPLE_RATE for i in range(requests)]
    rtf = target_ms / (1000 * statistics.mean(seconds))  # the same total time over the stream as target_ms
    modes = ("fixed", "governor", "governor_rtf") if engine.task == "asr" else ("fixed", "governor")
    rows = []
    for mode in modes:
        log(f"load step ({mode}): {requests} requests, {n} spinning process(es) for the middle third"
            + (f"; RTF {rtf:.4f}" if mode == "governor_rtf" else ""))
        rows.append(load_step(engine, clips, mode, target_ms, requests, n, rtf=rtf))
    return rows


def as_json(runtimes: list[RuntimeRow], steps: list[LoadStepRow], conditions: dict) -> dict:
    return {"runtimes": [asdict(r) for r in runtimes], "load_step": [asdict(r) for r in steps], "conditions": conditions}
