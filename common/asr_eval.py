"""Evaluating every layer-choice strategy of a dynamic Whisper on a speech set, in one harness.

The front end (log-mel + convolutions) is the same for all strategies, so it runs once per batch
and its time is added to every row. Each (method, keep) row carries WER and CER (jiwer, after the
shared normaliser), the mean number of encoder layers run, encoder ms per clip (front end + kept
layers) and end-to-end ms per clip (encoder + greedy decoding), plus how often each layer ran and
how many distinct layer sets were used.

Whisper-only for now; the generic :mod:`ldfleet.common.evaluate` (which runs ``DynamicModel.predict``
and so would serve a ``WhisperDynamic`` too) is not used yet because it lacks what this harness
needs for Whisper and has what it lacks: to fold, ``evaluate`` needs a per-batch token budget for the
decoder, encoder-vs-end-to-end timing and ``SpeechItem`` input; this module needs the oracle rows,
MACs and per-condition usage ``evaluate`` has.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .data.transcribed import SpeechItem
from .metrics import score
from .model.whisper_dynamic import WhisperDynamic


@dataclass
class AsrRow:
    method: str
    keep: float
    k: int
    wer: float
    cer: float
    mean_layers: float
    encoder_ms: float  # per clip: front end + kept encoder layers
    ms_per_example: float  # per clip, end to end: encoder + greedy decoding
    distinct_layer_sets: int
    examples: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class AsrResult:
    rows: list[AsrRow]
    layer_usage: dict[str, dict[float, list[float]]]  # method -> keep -> share of clips running each layer
    predictions: dict[str, dict[float, list[str]]]

    def as_dict(self, with_predictions: bool = False) -> dict:
        out = {
            "rows": [r.as_dict() for r in self.rows],
            "layer_usage": {m: {str(k): v for k, v in per.items()} for m, per in self.layer_usage.items()},
        }
        if with_predictions:
            out["predictions"] = {m: {str(k): v for k, v in per.items()} for m, per in self.predictions.items()}
        return out


def token_budget(seconds: float) -> int:
    """Most tokens greedy decoding may emit for a clip: 10 + 6 per second, far above speech rates,
    so a decoder caught in a repetition loop (common with dropped layers) stops early."""
    return 10 + int(6 * seconds)


@torch.inference_mode()
def evaluate_asr(
    model: WhisperDynamic,
    items: Sequence[SpeechItem],
    methods: Sequence[str],
    keeps: Sequence[float],
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> AsrResult:
    """WER/CER, layers and time for each method at each keep ratio (``full`` only at 1.0)."""
    model.eval()
    for m in methods:
        model.strategy(m)
    combos = [(m, keep) for m in methods for keep in ([1.0] if m == "full" else keeps)]
    stats = {c: {"pred": [], "layers": 0.0, "enc_ms": 0.0, "dec_ms": 0.0, "sets": Counter(),
                 "usage": torch.zeros(model.num_layers)} for c in combos}
    gens = {c: torch.Generator().manual_seed(seed) for c in combos}
    front_ms = 0.0
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for b, batch in enumerate(batches):
        start = time.perf_counter()
        front = model.front_end([it.waveform for it in batch])
        max_new = token_budget(max(len(it.waveform) for it in batch) / 16000)
        front_ms += (time.perf_counter() - start) * 1000
        for combo in combos:
            s = stats[combo]
            start = time.perf_counter()
            hidden, keep = model.run(front, combo[0], model.k_for(combo[1]), gens[combo])
            mid = time.perf_counter()
            s["pred"] += model.head.predict(hidden, front.frame_mask, max_new_tokens=max_new)
            s["enc_ms"] += (mid - start) * 1000
            s["dec_ms"] += (time.perf_counter() - mid) * 1000
            s["layers"] += float(keep.sum())
            s["usage"] += keep.float().sum(0)
            s["sets"].update(tuple(i for i, x in enumerate(row) if x) for row in keep.tolist())
        if on_batch:
            on_batch(b + 1, len(batches))
    n = len(items)
    refs = [it.text for it in items]
    rows, usage, preds = [], {}, {}
    for method, keep in combos:
        s = stats[(method, keep)]
        metrics = score("asr", s["pred"], refs)
        encoder_ms = (front_ms + s["enc_ms"]) / n
        rows.append(AsrRow(method, keep, model.k_for(keep), metrics["wer"], metrics["cer"], s["layers"] / n,
                           encoder_ms, encoder_ms + s["dec_ms"] / n, len(s["sets"]), n))
        usage.setdefault(method, {})[keep] = (s["usage"] / n).tolist()
        preds.setdefault(method, {})[keep] = s["pred"]
    return AsrResult(rows, usage, preds)
