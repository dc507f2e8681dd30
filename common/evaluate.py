"""Evaluating every layer-choice strategy at every budget on one test set, in one harness.

The front end is the same for all strategies, so it is computed once per batch and its time is
added to every row; each strategy then runs only its own layers. Rows carry accuracy, the mean
number of layers run, analytic MACs per example and measured ms per example.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .model.cost import cost_of
from .model.dynamic import DynamicModel
from .model.strategies import ScoredChoice


@dataclass
class EvalRow:
    method: str
    keep: float
    k: int
    accuracy: float
    mean_layers: float
    macs: float
    ms_per_example: float
    examples: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    rows: list[EvalRow]
    layer_usage: dict[str, dict[float, list[float]]]  # method -> keep -> share of inputs running each layer

    def as_dict(self) -> dict:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "layer_usage": {m: {str(k): v for k, v in per.items()} for m, per in self.layer_usage.items()},
        }


@torch.inference_mode()
def evaluate(
    model: DynamicModel,
    data: Dataset,
    methods: Sequence[str],
    keeps: Sequence[float],
    batch_size: int = 32,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    model.eval()
    for m in methods:
        model.strategy(m)  # clear error for an unknown method before any work
    cost = cost_of(model, seconds=data[0][0].shape[-1] / 16000)
    combos = [(m, keep) for m in methods for keep in ([1.0] if m == "full" else keeps)]
    stats = {c: {"correct": 0, "layers": 0.0, "ms": 0.0, "usage": torch.zeros(model.num_layers)} for c in combos}
    gens = {c: torch.Generator().manual_seed(seed) for c in combos}
    front_ms = 0.0
    seen = 0
    loader = DataLoader(data, batch_size=batch_size)
    for i, (wave, label) in enumerate(loader):
        start = time.perf_counter()
        front = model.front_end(wave)
        front_ms += (time.perf_counter() - start) * 1000
        for method, keep in combos:
            s = stats[(method, keep)]
            start = time.perf_counter()
            out = model.classify(front, method, model.k_for(keep), gens[(method, keep)])
            s["ms"] += (time.perf_counter() - start) * 1000
            s["correct"] += int((out.logits.argmax(-1) == label).sum())
            s["layers"] += float(out.keep.sum())
            s["usage"] += out.keep.float().sum(0)
        seen += len(label)
        if on_batch:
            on_batch(i + 1, len(loader))
    rows, usage = [], {}
    for method, keep in combos:
        s = stats[(method, keep)]
        mean_layers = s["layers"] / seen
        learned = isinstance(model.strategy(method), ScoredChoice)
        rows.append(
            EvalRow(
                method=method,
                keep=keep,
                k=model.k_for(keep),
                accuracy=s["correct"] / seen,
                mean_layers=mean_layers,
                macs=cost.total(mean_layers, with_selector=learned and method == "selector"),
                ms_per_example=(front_ms + s["ms"]) / seen,
                examples=seen,
            )
        )
        usage.setdefault(method, {})[keep] = (s["usage"] / seen).tolist()
    return EvalResult(rows, usage)
