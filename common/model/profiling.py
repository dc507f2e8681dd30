"""Measured latency of a model's parts on this machine: what a device advertises in its profile.

Wall time is what a latency budget is about, so each part is timed on the real hardware: the front
end once, then every encoder layer on its own, median of several repeats after a warm-up. Whole
passes are timed too, for the tail: p90/median and p99/median of the end-to-end time let a latency
target "at percentile P" be met by P% of inputs, not only by the median one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .backbone import describe, load_backbone
from .runner import LayerRunner

SAMPLE_RATE = 16000


@dataclass
class LatencyProfile:
    model_id: str
    num_layers: int
    front_end_ms: float
    layer_ms: list[float] = field(default_factory=list)
    seconds: float = 1.0
    threads: int = 1
    #: End-to-end latency at p90 / p99 over the median (>= 1); None when not measured.
    ratio_p90: float | None = None
    ratio_p99: float | None = None

    @property
    def full_ms(self) -> float:
        return self.front_end_ms + sum(self.layer_ms)


def _interleaved_medians_ms(parts: list, repeats: int) -> list[float]:
    """Median ms of each callable, timed round-robin so a burst of load hits all parts alike."""
    times: list[list[float]] = [[] for _ in parts]
    for _ in range(repeats):
        for i, fn in enumerate(parts):
            start = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def tail_ratios(times_ms: list[float]) -> tuple[float, float]:
    """(p90 / median, p99 / median) of a sample of latencies, each in [1, 100] (what a profile may carry)."""
    cuts = statistics.quantiles(times_ms, n=100, method="inclusive")
    median = statistics.median(times_ms)
    return min(100.0, max(1.0, cuts[89] / median)), min(100.0, max(1.0, cuts[98] / median))


@torch.inference_mode()
def profile_runner(runner: LayerRunner, seconds: float = 1.0, repeats: int = 5, model_id: str = "",
                   tail_repeats: int = 20) -> LatencyProfile:
    """Front-end and per-layer latency of one input of ``seconds`` seconds (medians of ``repeats``),
    and the tail of ``tail_repeats`` whole passes (0: not measured; with 20, p99 is close to the
    slowest pass: a cautious estimate)."""
    runner.eval()
    audio = torch.randn(1, int(round(seconds * SAMPLE_RATE)))
    # One-off costs (thread pools, kernel selection for these shapes) would otherwise land on
    # whichever part happens to be timed first: warm the whole model up before timing any part.
    for _ in range(3):
        runner.run_layers(runner.front_end(audio), None)
    front = runner.front_end(audio)
    mask, bias = runner._layer_context(front.hidden, front.frame_mask)
    parts = [lambda: runner.front_end(audio)]
    parts += [lambda i=i: runner._run_layer(i, front.hidden, mask, bias) for i in range(runner.num_layers)]
    front_end_ms, *layer_ms = _interleaved_medians_ms(parts, repeats)
    ratio_p90 = ratio_p99 = None
    if tail_repeats >= 2:
        whole = []
        for _ in range(tail_repeats):
            start = time.perf_counter()
            runner.run_layers(runner.front_end(audio), None)
            whole.append((time.perf_counter() - start) * 1000)
        ratio_p90, ratio_p99 = tail_ratios(whole)
    return LatencyProfile(
        model_id=model_id or describe(runner.backbone),
        num_layers=runner.num_layers,
        front_end_ms=front_end_ms,
        layer_ms=layer_ms,
        seconds=seconds,
        threads=torch.get_num_threads(),
        ratio_p90=ratio_p90,
        ratio_p99=ratio_p99,
    )


def measure_latency(family: str = "wavlm", size: str = "tiny", seconds: float = 1.0, repeats: int = 5) -> LatencyProfile:
    """Latency profile of a backbone given by size name (``tiny``/``base``), hub id or folder."""
    return profile_runner(LayerRunner(load_backbone(size, family)), seconds, repeats)
