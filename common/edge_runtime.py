"""Torch-free host runtime for an exported dynamic model: numpy + onnxruntime, nothing else.

``ldfleet export RUN --format onnx --out DIR`` writes one ONNX graph per part of the model: the
front end (waveform -> hidden states and selector features), each encoder layer, the selector (one
graph per k when it was trained with the budget as an input) and the task head, with a
``manifest.json``. This module schedules them on the host: it runs the front end and the selector,
keeps the k best-scoring layers, runs only those layer graphs in order, then the head, and turns
its logits into the answer: a label (keyword spotting, ``task: kws``) or a transcript (speech
recognition, ``task: asr``: greedy CTC over the manifest's tokens).

With ``strategy="adaptive"`` (when the run's depth stage fitted it) the number of layers is chosen per
input first: ``depth.onnx`` predicts the input's errors at every depth d, and the input runs at the d
minimising ``errors[d] + lambda_k * d * frames / ref_frames`` (``lambda_k`` and ``ref_frames`` in the
manifest), so that inputs average k layers weighted by duration (``ldfleet.common.model.depth``); the
selector then chooses which d layers.

A dropped layer is a graph that is never called, so it costs nothing (per-layer graphs rather than
an ONNX ``If``: runtimes often lose the saving of control flow, see PITFALLS.md).

The module imports only the standard library, numpy and (when a model is opened) onnxruntime, so a
board installs ``numpy onnxruntime`` and copies the export folder (which holds a copy of this file
as ``edge_runtime.py``)::

    python3 edge_runtime.py EXPORT_DIR clip.wav --keep 0.5

Shapes: waveforms are float32 ``[batch, samples]`` at 16 kHz (1 s clips for keyword spotting, a whole
utterance for speech recognition); hidden states ``[batch, frames, dim]``; layer scores ``[batch,
layers]``; head logits ``[batch, classes]`` (kws) or ``[batch, frames, tokens]`` (asr). The batch is
run without padding (equal-length inputs).
"""

from __future__ import annotations

import json
import math
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "ldfleet.onnx-export/1"
SAMPLE_RATE = 16000
PRECISIONS = ("fp32", "int8")
#: What a device can run: the selector (exactly k layers per input) or ``adaptive`` (a depth per input
#: at a duration-weighted mean of k, the selector's set at that depth; needs the run's depth stage).
STRATEGIES = ("selector", "adaptive")
#: The shortest input the front end takes: the receptive field of the default wav2vec 2.0-family CNN
#: (kernels 10, 3, 3, 3, 3, 2, 2 at strides 5, 2, 2, 2, 2, 2, 2: the first frame needs 400 samples, 25 ms
#: at 16 kHz; then one frame per 320).
MIN_SAMPLES = 400


@dataclass
class Result:
    """One input's answer and what it cost: ``layers`` are the encoder layers that ran (0-based)."""

    prediction: str
    k: int
    layers: list[int]
    ms: float
    front_end_ms: float = 0.0
    selector_ms: float = 0.0
    layer_ms: list[float] = field(default_factory=list)  # one per layer that ran, in order
    head_ms: float = 0.0
    chosen: int | None = None  # layers chosen before the deadline guard (k, or adaptive's depth); None: len(layers)

    @property
    def cut_short(self) -> bool:
        """Whether the deadline guard stopped the chosen layers early."""
        return self.chosen is not None and len(self.layers) < self.chosen


def keep_to_k(keep: float, num_layers: int) -> int:
    """k for a keep fraction: round(keep * L), clamped to [1, L] (the same rule as ldfleet.common.budget)."""
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep fraction must be in (0, 1], got {keep!r}")
    return min(num_layers, max(1, round(keep * num_layers)))


def top_k_layers(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores of one row ``[layers]``, in layer order."""
    order = np.argsort(-scores, kind="stable")[:k]
    return sorted(int(i) for i in order)


def check_length(waveform: np.ndarray) -> None:
    """ValueError when an input is too short for the front end (fewer than ``MIN_SAMPLES``)."""
    if waveform.size < MIN_SAMPLES:
        raise ValueError(f"{waveform.size} samples at 16 kHz ({1000 * waveform.size / SAMPLE_RATE:.2f} ms) is too short: "
                         f"the model needs at least {MIN_SAMPLES} ({1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms at 16 kHz)")


def next_layer_fits(start: float, budget_ms: float | None, layer_ms: list[float], reserve_ms: float = 1.0) -> bool:
    """Whether one more layer (as slow as the slowest so far) and ``reserve_ms`` for the head still end
    within ``budget_ms`` of ``start`` (a ``time.perf_counter()``); always True without a budget or
    before the first layer (at least one layer runs)."""
    if budget_ms is None or not layer_ms:
        return True
    return (time.perf_counter() - start) * 1000 + max(layer_ms) + reserve_ms <= budget_ms


def decode(logits: np.ndarray, labels: list[str]) -> list[str]:
    """Label names from classification logits ``[batch, classes]`` (argmax)."""
    return [labels[int(i)] for i in np.asarray(logits).argmax(-1)]


def ctc_decode(logits: np.ndarray, tokens: list[str], unit: str) -> list[str]:
    """Transcripts from CTC logits ``[batch, frames, tokens]``: greedy (best token per frame, repeats
    collapsed, blanks dropped), as the torch head decodes. ``tokens[0]`` is the blank; with ``unit``
    ``char`` the tokens are characters and ``tokens[1]`` stands for the space, with ``word`` they are
    words."""
    out = []
    for best in np.asarray(logits).argmax(-1):
        ids = [int(t) for i, t in enumerate(best) if t != 0 and (i == 0 or t != best[i - 1])]
        if unit == "char":
            out.append("".join(tokens[i] for i in ids).replace(tokens[1], " ").strip())
        else:
            out.append(" ".join(tokens[i] for i in ids))
    return out


def read_wav(data: bytes | str | Path) -> np.ndarray:
    """A 16-bit PCM mono WAV at 16 kHz as float32 samples in [-1, 1] (stdlib ``wave``; raises ValueError)."""
    import io

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        with wave.open(src, "rb") as w:
            if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise ValueError(f"need 16-bit mono {SAMPLE_RATE} Hz, got {w.getsampwidth() * 8}-bit, "
                                 f"{w.getnchannels()} channel(s), {w.getframerate()} Hz")
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from None
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


class EdgeModel:
    """An exported model on onnxruntime. ``precision``: ``fp32`` or ``int8`` (if exported with int8);
    ``strategy``: ``selector`` (k layers per input) or ``adaptive`` (a depth per input at a mean of k).

    Raises FileNotFoundError when ``export_dir`` has no manifest, ValueError for an unknown format, a
    precision the export lacks, or ``adaptive`` on an export without a depth chooser.
    """

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int = 1, strategy: str = "selector"):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        path = self.dir / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{export_dir} is not an ONNX export (no {MANIFEST}); make one with `ldfleet export`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        graphs = self.manifest["graphs"][precision] if precision in self.manifest["graphs"] else None
        if graphs is None:
            raise ValueError(f"{export_dir} has no {precision} graphs (export with --int8)")
        self.precision = precision
        self.task: str = self.manifest.get("task", "kws")
        if self.task not in ("kws", "asr"):
            raise ValueError(f"{path}: task {self.task!r}, expected kws or asr")
        self.labels: list[str] = list(self.manifest.get("labels") or [])
        self.ctc: dict = self.manifest.get("ctc") or {}
        self.num_layers: int = int(self.manifest["num_layers"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(0, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def session(name: str):
            return ort.InferenceSession(str(self.dir / name), opts, providers=["CPUExecutionProvider"])

        self.front_end = session(graphs["front_end"])
        selector = graphs["selector"]  # one graph, or one per k = 1..L-1 (a budget-conditioned selector)
        self.selectors = [session(g) for g in selector] if isinstance(selector, list) else [session(selector)]
        self.layers = [session(g) for g in graphs["layers"]]
        self.head = session(graphs["head"])
        self.strategy = strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        adaptive = self.manifest.get("adaptive")
        if strategy == "adaptive" and not adaptive:
            raise ValueError(f"{export_dir} has no depth chooser (its run had no depth stage): use strategy selector")
        self.depth = session(adaptive["graph"]) if strategy == "adaptive" else None
        self.lambdas = np.asarray(adaptive["lambdas"], dtype=np.float32) if self.depth else None
        self.ref_frames = np.float32(adaptive["ref_frames"]) if self.depth else None

    def depth_for(self, features: np.ndarray, k: int) -> int:
        """The adaptive depth (1..L) of one input from its selector features ``[1, frames, dim]``, for a
        duration-weighted mean of k layers (k < L)."""
        errors = self.depth.run(None, {"features": features})[0][0].astype(np.float32)  # [L]
        depths = np.arange(1, self.num_layers + 1, dtype=np.float32)
        weight = np.float32(features.shape[1]) / self.ref_frames
        return int(np.argmin(errors + self.lambdas[k] * weight * depths)) + 1

    def choose_layers(self, features: np.ndarray, k: int, max_layers: int | None = None) -> list[int]:
        """The layers to run, in order, for one input's selector features ``[1, frames, dim]`` at k
        (adaptive: its depth at a mean of k), at most ``max_layers`` of them."""
        depth = self.depth_for(features, k) if self.depth is not None and k < self.num_layers else k
        if max_layers is not None:
            depth = max(1, min(depth, max_layers))
        if depth >= self.num_layers:
            return list(range(self.num_layers))
        return top_k_layers(self.selector_for(depth).run(None, {"features": features})[0][0], depth)

    def selector_for(self, k: int):
        """The selector graph that scores layers for budget k (1 <= k < L)."""
        return self.selectors[k - 1] if len(self.selectors) > 1 else self.selectors[0]

    def answers(self, logits: np.ndarray) -> list[str]:
        """The head's logits as answers: labels (kws) or transcripts (asr), one per example."""
        if self.task == "asr":
            return ctc_decode(logits, self.ctc["tokens"], self.ctc["unit"])
        return decode(logits, self.labels)

    def k_for(self, keep: float) -> int:
        return keep_to_k(keep, self.num_layers)

    def run_parts(self, waveform: np.ndarray, k: int, budget_ms: float | None = None,
                  max_layers: int | None = None) -> tuple[np.ndarray, Result]:
        """Logits (``[1, classes]``, or ``[1, frames, tokens]`` for asr) and timings for one waveform
        ``[samples]`` (or ``[1, samples]``) at k layers (adaptive: a depth at a mean of k), at most
        ``max_layers`` (the deepest that fits a latency target, from the device's governor).

        With ``budget_ms`` the chosen layers stop early when the next one would end past it (the
        deadline guard): ``Result.layers`` then lists fewer than were chosen."""
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"k must be in [1, {self.num_layers}], got {k}")
        x = np.ascontiguousarray(np.asarray(waveform, dtype=np.float32).reshape(1, -1))
        check_length(x)
        t0 = time.perf_counter()
        hidden, features = self.front_end.run(None, {"waveform": x})
        t1 = time.perf_counter()
        layers = self.choose_layers(features, k, max_layers)
        t2 = time.perf_counter()
        chosen = len(layers)
        layer_ms: list[float] = []
        for i in layers:
            if not next_layer_fits(t0, budget_ms, layer_ms):
                break
            s = time.perf_counter()
            hidden = self.layers[i].run(None, {"hidden": hidden})[0]
            layer_ms.append((time.perf_counter() - s) * 1000)
        layers = layers[:len(layer_ms)]
        t3 = time.perf_counter()
        logits = self.head.run(None, {"hidden": hidden})[0]
        t4 = time.perf_counter()
        result = Result(self.answers(logits)[0], k, layers, (t4 - t0) * 1000, (t1 - t0) * 1000,
                        (t2 - t1) * 1000, layer_ms, (t4 - t3) * 1000, chosen)
        return logits, result

    def run(self, waveform: np.ndarray, k: int, budget_ms: float | None = None, max_layers: int | None = None) -> Result:
        """Prediction, layers run and ms for one waveform at k layers (k = L runs every layer, no selector);
        ``budget_ms``, ``max_layers``: as in ``run_parts``."""
        return self.run_parts(waveform, k, budget_ms, max_layers)[1]


def main(argv: list[str] | None = None) -> int:
    """``python3 edge_runtime.py EXPORT_DIR WAV... [--keep F] [--int8]``: one JSON line per clip."""
    import argparse

    p = argparse.ArgumentParser(description="Run an ldfleet ONNX export on WAV files (16-bit mono 16 kHz).")
    p.add_argument("export_dir")
    p.add_argument("wavs", nargs="+")
    p.add_argument("--keep", type=float, default=1.0, help="share of encoder layers to run (0, 1]")
    p.add_argument("--int8", action="store_true", help="use the int8 graphs")
    p.add_argument("--strategy", choices=STRATEGIES, default="selector",
                   help="selector: k layers per input; adaptive: a depth per input at a mean of k")
    args = p.parse_args(argv)
    try:
        model = EdgeModel(args.export_dir, "int8" if args.int8 else "fp32", strategy=args.strategy)
        k = model.k_for(args.keep)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    failed = 0
    for path in args.wavs:
        try:
            r = model.run(read_wav(path), k)
        except (OSError, ValueError) as exc:  # one bad file is skipped, with the reason; the others still run
            print(f"skipped {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"input": path, "k": r.k, "layers": r.layers, "ms": round(r.ms, 3), "prediction": r.prediction}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
