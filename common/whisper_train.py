"""Layer-set loss tables of a dynamic Whisper, and its encoder's skip maps.

Whisper-specific (not ``common.trainer.Trainer``, which trains the backbone under LayerDrop; folding
this in means a ``train --backbone WHISPER_DIR --task asr`` path; ``make real-bench`` calls this module
directly): the encoder and decoder stay frozen, and only the two learned strategies train, fitted by
:mod:`.set_fit` on the tables made here.

``loss_table``: for every training clip and every layer set of size k (k in ``ks``), the
teacher-forced decoder cross-entropy of the reference transcript when only that set runs. The sets of
one clip share their common prefixes (``LayerRunner.run_layer_sets``): the 35 sets for k = 3, 4 cost
49 layer passes, not 120. On the real-speech tables a selector started from the fitted static ranking
(``real_bench --selector-from-static``) and one started fresh reach the same validation loss (README,
real-speech table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .data.transcribed import SpeechItem
from .model.skip_maps import SkipMaps, fit_skip_maps
from .model.whisper_dynamic import WhisperDynamic
from .set_fit import LossTable, clip_loss_table, layer_sets


@torch.inference_mode()
def loss_table(model: WhisperDynamic, items: Sequence[SpeechItem], ks: Sequence[int],
               on_item: Callable[[int, int], None] | None = None, chunk_rows: int = 8) -> LossTable:
    """Teacher-forced cross-entropy of every layer set of each size in ``ks``, for every clip
    (``chunk_rows`` sets at a time, which bounds memory on 30 s windows)."""
    if not all(1 <= k <= model.num_layers for k in ks):
        raise ValueError(f"layer-set sizes {list(ks)}: each must be between 1 and {model.num_layers}")
    model.eval()
    clips = ((model.front_end([item.waveform]), item.text) for item in items)

    def set_losses(hidden, mask, texts):
        return model.head.per_example_loss(hidden, mask, model.head.targets(texts))

    sets = {k: layer_sets(model.num_layers, k) for k in ks}
    return clip_loss_table(model.runner, clips, len(items), sets, set_losses, chunk_rows=chunk_rows, on_item=on_item)


def fit_whisper_skip_maps(model: WhisperDynamic, items: Sequence[SpeechItem], batch_size: int = 4,
                          on_batch: Callable[[int, int], None] | None = None) -> SkipMaps:
    """Fit the encoder's skip maps on ``items`` (full-model states of their padded windows) and
    install them on ``model.runner``; every later table, fit and eval then uses them."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    fronts = (model.front_end([it.waveform for it in batch]) for batch in batches)
    maps = fit_skip_maps(model.runner, fronts, on_batch=(lambda n: on_batch(n, len(batches))) if on_batch else None)
    model.runner.skip_maps = maps
    return maps
