"""On-device inference with torch: one input at a time, k layers chosen by the selector, timed by part.

``predict`` is the single place where hidden states become answers (label names for keyword
spotting, transcripts for speech recognition); every torch code path of the edge runtime goes
through it, so the head decides what an answer is. ``TorchEngine`` gives the same ``Result`` as the onnxruntime host
runtime (``ldfleet.common.edge_runtime.EdgeModel``), so the governor, ``ldfleet infer`` and
``ldfleet serve`` treat both alike.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..edge_runtime import STRATEGIES, Result, check_length, next_layer_fits
from .checkpoint import load_model
from .dynamic import DynamicModel
from .heads import ClassificationHead, CTCHead

#: The strategy a device runs by default, and whose head answers: the input-conditioned selector.
DEVICE_STRATEGY = "selector"
DEVICE_STRATEGIES = STRATEGIES  # what a device can run (the host runtime's list)


def check_device_strategy(model: DynamicModel, strategy: str) -> None:
    """ValueError, with what to do, unless ``model`` can run ``strategy`` on a device."""
    if strategy not in DEVICE_STRATEGIES:
        raise ValueError(f"a device runs one of {', '.join(DEVICE_STRATEGIES)}, not {strategy!r}")
    if strategy == "adaptive" and not model.strategy("adaptive").chooser.is_fitted:
        raise ValueError("this run has no fitted depth chooser for adaptive: run `ldfleet train` on it again "
                         "(its depth stage fits it), or use --strategy selector")


def labels_of(model: DynamicModel) -> list[str]:
    """Class names of a keyword-spotting model; ValueError for other tasks."""
    head = model.head_for(DEVICE_STRATEGY)
    if getattr(head, "task", None) != "kws":
        raise ValueError(f"only a keyword model has labels; this run's task is {getattr(head, 'task', '?')!r}")
    return list(head.labels)


def device_task(model: DynamicModel) -> str:
    """``kws`` or ``asr``: the task a device runs this model for. ValueError for a head the device
    runtimes cannot serve: Whisper's decoder (a generation loop per token; ``ldfleet eval`` runs it)."""
    head = model.head_for(DEVICE_STRATEGY)
    if isinstance(head, CTCHead):
        return "asr"
    if isinstance(head, ClassificationHead):
        return "kws"
    raise ValueError(f"the device runtimes serve keyword (classification) and CTC speech-recognition heads, "
                     f"not {type(head).__name__}")


def head_logits(model: DynamicModel, hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
    """Head output ``[batch, classes]`` for last hidden states ``[batch, frames, dim]``."""
    return model.head_for(DEVICE_STRATEGY).logits(hidden, frame_mask)


def predict(model: DynamicModel, hidden: Tensor, frame_mask: Tensor | None) -> list[str]:
    """Answers (label names or transcripts, from the run's own head), one per example, from last
    hidden states ``[batch, frames, dim]`` (``frame_mask`` [batch, frames] bool or None)."""
    return model.head_for(DEVICE_STRATEGY).predict(hidden, frame_mask)


class TorchEngine:
    """A run folder on torch eager, batch 1, as a device runs it: ``strategy`` (one of
    ``DEVICE_STRATEGIES``) chooses the layers, the selector's head answers.

    ``task`` is ``kws`` (answers are label names, listed in ``labels``) or ``asr`` (answers are
    transcripts; ``labels`` is empty). Raises ValueError for a run the device cannot serve.
    """

    runtime = "torch"

    def __init__(self, run_dir: str | Path, threads: int = 0, strategy: str = DEVICE_STRATEGY):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(run_dir).eval()
        check_device_strategy(self.model, strategy)
        self.strategy = strategy
        self.task = device_task(self.model)
        self.labels = labels_of(self.model) if self.task == "kws" else []
        self.num_layers = self.model.num_layers

    def k_for(self, keep: float) -> int:
        return self.model.k_for(keep)

    @torch.inference_mode()
    def run(self, waveform: np.ndarray, k: int, budget_ms: float | None = None, max_layers: int | None = None) -> Result:
        """Prediction, layers run and ms (per part) for one waveform ``[samples]`` at 16 kHz, at k layers
        (``adaptive``: the depth chosen for this input at a mean of k), at most ``max_layers`` (the
        deepest that fits a latency target); with ``budget_ms`` the chosen layers stop early when the
        next would end past it (deadline guard)."""
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"k must be in [1, {self.num_layers}], got {k}")
        model, runner = self.model, self.model.runner
        wave = np.asarray(waveform, dtype=np.float32)
        check_length(wave)
        x = torch.from_numpy(wave).reshape(1, -1)
        t0 = time.perf_counter()
        front = model.front_end(x)
        t1 = time.perf_counter()
        cap = self.num_layers if max_layers is None else max(1, min(max_layers, self.num_layers))
        if k >= self.num_layers and cap >= self.num_layers:
            layers = list(range(self.num_layers))
        else:
            keep = model.choose(front, self.strategy, k, max_depth=cap)
            layers = keep[0].nonzero().flatten().tolist()
        t2 = time.perf_counter()
        chosen = len(layers)
        hidden = front.hidden
        mask, bias = runner._layer_context(hidden, None)
        layer_ms: list[float] = []
        for i in layers:
            if not next_layer_fits(t0, budget_ms, layer_ms):
                break
            s = time.perf_counter()
            hidden = runner._run_layer(i, hidden, mask, bias)
            layer_ms.append((time.perf_counter() - s) * 1000)
        layers = layers[:len(layer_ms)]
        t3 = time.perf_counter()
        answer = predict(model, runner._finish(hidden), None)[0]
        t4 = time.perf_counter()
        return Result(answer, k, layers, (t4 - t0) * 1000, (t1 - t0) * 1000, (t2 - t1) * 1000, layer_ms,
                      (t4 - t3) * 1000, chosen)
