"""The keyword-spotting data layer: an espeak-ng corpus, a Speech Commands folder loader,
speaker-disjoint splits and per-device partitions.

Names are imported lazily so that ``import ldfleet.common.data.labels`` (or the CLI's --help)
does not pay for torch; ``from ldfleet.common.data import load_splits`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KEYWORDS": "labels", "UNKNOWN": "labels", "SILENCE": "labels", "LABELS": "labels", "NUM_CLASSES": "labels",
    "SAMPLE_RATE": "labels", "CLIP_SAMPLES": "labels", "UNKNOWN_WORDS": "labels", "label_id": "labels",
    "load_clip": "audio", "write_wav": "audio", "mix_at_snr": "audio",
    "SynthConfig": "synth", "SynthSummary": "synth", "synthesize_corpus": "synth",
    "Clip": "clip", "scan_folder": "folder", "load_splits": "folder", "describe": "folder",
    "ClipDataset": "dataset", "split_by_speaker": "splits", "assign_splits": "splits",
    "partition_by_speaker": "partition", "partition_dirichlet": "partition", "label_skew": "partition",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
