"""Speed benchmark: does dropping layers save the time it should?

A base-size encoder (random weights: timing does not depend on them) runs under selector-chosen
masks — different layers for different examples in one batch, as in real use. Per keep ratio it
reports front-end, encoder-only, selector and total time, and encoder time as a share of the full
encoder; the ideal share equals the keep ratio. Every configuration is timed side by side in one
run, interleaved over repeats, so machine noise hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .backbone import load_backbone
from .dynamic import DynamicModel
from .heads import with_head
from .selector import topk_mask

SAMPLE_RATE = 16000


@dataclass
class SpeedRow:
    family: str
    seconds: float
    batch: int
    keep: float
    k: int
    front_end_ms: float
    encoder_ms: float
    selector_ms: float
    total_ms: float
    encoder_ratio: float  # encoder_ms / full encoder ms; ideal = keep

    def as_dict(self) -> dict:
        return asdict(self)


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


@torch.inference_mode()
def bench_speed(
    family: str = "wavlm",
    seconds: Sequence[float] = (1.0, 5.0),
    keeps: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    batches: Sequence[int] = (1, 8),
    repeats: int = 7,
    size: str = "base",
    seed: int = 0,
) -> list[SpeedRow]:
    torch.manual_seed(seed)
    model = DynamicModel(*with_head(load_backbone(size, family))).eval()
    selector = model.strategy("selector")
    rows = []
    for sec in seconds:
        for batch in batches:
            wave = torch.randn(batch, int(round(sec * SAMPLE_RATE)))
            front = model.front_end(wave)
            masks = {keep: topk_mask(selector.scores(front), model.k_for(keep)) for keep in keeps}
            samples = {key: [] for key in ["front", "selector", *[("enc", k) for k in keeps], ("enc", "full")]}
            model.runner.run_layers(front, None)  # warm-up
            for _ in range(repeats):
                samples["front"].append(_time_ms(lambda: model.front_end(wave)))
                samples["selector"].append(_time_ms(lambda: selector.scores(front)))
                samples[("enc", "full")].append(_time_ms(lambda: model.runner.run_layers(front, None)))
                for keep in keeps:
                    samples[("enc", keep)].append(_time_ms(lambda: model.runner.run_layers(front, masks[keep])))
            med = {key: statistics.median(v) for key, v in samples.items()}
            for keep in keeps:
                enc = med[("enc", keep)]
                rows.append(
                    SpeedRow(
                        family=family,
                        seconds=sec,
                        batch=batch,
                        keep=keep,
                        k=model.k_for(keep),
                        front_end_ms=med["front"],
                        encoder_ms=enc,
                        selector_ms=med["selector"],
                        total_ms=med["front"] + med["selector"] + enc,
                        encoder_ratio=enc / med[("enc", "full")],
                    )
                )
    return rows
