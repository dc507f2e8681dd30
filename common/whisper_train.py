"""Training the layer-choice strategies of a dynamic Whisper from a table of layer-set losses.

Whisper-specific for now (not ``common.train.Trainer``, which trains the backbone under LayerDrop and
each strategy by gradient through the run; folding this in means a Trainer stage "listwise from a
layer-set table" and a ``train --backbone WHISPER_DIR --task asr`` path; ``make real-bench`` calls
this module directly): the encoder and decoder stay frozen, and only the two learned strategies train, ``static`` (one layer ranking,
or one per k) and ``selector`` (a ranking per clip from its pooled front-end features, and k if
budget-conditioned).

1. ``loss_table``: for every training clip and every layer set of size k (k in ``ks``), the
   teacher-forced decoder cross-entropy of the reference transcript when only that set runs. The
   sets of one clip share their common prefixes (``LayerRunner.run_layer_sets``): the 35 sets for
   k = 3, 4 cost 49 layer passes, not 120.
2. Both strategies score layers; a set's score is the sum of its layers' scores, and top-k of the
   layer scores is exactly the best-scoring set of size k. They learn by matching, per clip and k,
   the softmax of set scores to the softmax of the sets' negative losses (a listwise ranking loss,
   as in ListNet, Cao et al. 2007). The static ranking sees no input, so it learns the sets that
   are best on average; the selector can learn which clips need which layers.
   The selector may also start as the fitted static ranking (``LayerSelector.start_from``: its
   MLP's output zeroed, the static scores as a fixed prior) and learn per-clip corrections to it
   (``real_bench --selector-from-static``); on the real-speech tables both starts reach the same
   validation loss (README, real-speech table).
3. Model selection on the validation table: the epoch, or the starting state, whose chosen sets have
   the lowest mean loss (ties go to the later epoch, fitted longer: static's choices settle in the
   first epoch, the scale of its scores, which the selector may start from, only later).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .data.transcribed import SpeechItem
from .model.selector import LayerSelector, pooled_features
from .model.skip_maps import SkipMaps, fit_skip_maps
from .model.whisper_dynamic import WhisperDynamic


def layer_sets(num_layers: int, k: int) -> Tensor:
    """All sets of k layers as a bool matrix [C(L, k), L], in lexicographic order."""
    combos = list(itertools.combinations(range(num_layers), k))
    mask = torch.zeros(len(combos), num_layers, dtype=torch.bool)
    for i, c in enumerate(combos):
        mask[i, list(c)] = True
    return mask


@dataclass
class LossTable:
    """Per clip: pooled features [N, 2D] and, per k, set losses [N, C(L, k)] over ``sets[k]``."""

    pooled: Tensor
    losses: dict[int, Tensor]
    sets: dict[int, Tensor]

    def to_dict(self) -> dict:
        return {"pooled": self.pooled, "losses": self.losses, "sets": self.sets}

    @classmethod
    def from_dict(cls, d: dict) -> "LossTable":
        return cls(d["pooled"], {int(k): v for k, v in d["losses"].items()}, {int(k): v for k, v in d["sets"].items()})


@torch.inference_mode()
def loss_table(model: WhisperDynamic, items: Sequence[SpeechItem], ks: Sequence[int],
               on_item: Callable[[int, int], None] | None = None, chunk_rows: int = 8) -> LossTable:
    """Teacher-forced cross-entropy of every layer set of each size in ``ks``, for every clip
    (``chunk_rows`` sets at a time, which bounds memory on 30 s windows)."""
    if not all(1 <= k <= model.num_layers for k in ks):
        raise ValueError(f"layer-set sizes {list(ks)}: each must be between 1 and {model.num_layers}")
    model.eval()
    sets = {k: layer_sets(model.num_layers, k) for k in ks}
    every = torch.cat([sets[k] for k in ks])
    pooled, rows = [], []
    for i, item in enumerate(items):
        front = model.front_end([item.waveform])
        pooled.append(pooled_features(front.features, front.frame_mask)[0])
        hidden = model.runner.run_layer_sets(front, every, max_rows=chunk_rows)  # [C, T, D]
        losses = []
        for chunk in hidden.split(chunk_rows):
            mask = None if front.frame_mask is None else front.frame_mask.expand(chunk.shape[0], -1)
            targets = model.head.targets([item.text] * chunk.shape[0])
            losses.append(model.head.per_example_loss(chunk, mask, targets))
        rows.append(torch.cat(losses))
        if on_item:
            on_item(i + 1, len(items))
    table = torch.stack(rows)  # [N, sum of C(L, k)]
    losses, start = {}, 0
    for k in ks:
        losses[k] = table[:, start : start + sets[k].shape[0]]
        start += sets[k].shape[0]
    return LossTable(torch.stack(pooled), losses, sets)


Scores = Tensor | Callable[[int], Tensor]


def _at(scores: Scores, k: int) -> Tensor:
    """Layer scores [B, L] for budget k: the same tensor for every k, or a function of k
    (a budget-conditioned strategy)."""
    return scores(k) if callable(scores) else scores


def listwise_loss(scores: Scores, table: LossTable, rows: Tensor, temperature: float) -> Tensor:
    """Mean over k of KL(target || model) over layer sets; scores [B, L] for clips ``rows``."""
    total = 0.0
    for k, sets in table.sets.items():
        at_k = _at(scores, k)
        set_scores = at_k @ sets.to(at_k.dtype).T  # [B, C]
        target = F.softmax(-table.losses[k][rows] / temperature, dim=-1)
        total = total + F.kl_div(F.log_softmax(set_scores, -1), target, reduction="batchmean")
    return total / len(table.sets)


def chosen_loss(scores: Scores, table: LossTable) -> dict[int, float]:
    """Mean loss of the sets that top-k of ``scores`` [N, L] picks, per k."""
    out = {}
    for k, sets in table.sets.items():
        top = _at(scores, k).topk(k, dim=-1).indices
        chosen = torch.zeros(top.shape[0], sets.shape[1], dtype=torch.bool).scatter_(-1, top, True)
        index = (chosen.unsqueeze(1) == sets.unsqueeze(0)).all(-1).float().argmax(-1)  # [N]
        out[k] = float(table.losses[k].gather(1, index.unsqueeze(1)).mean())
    return out


@dataclass
class FitConfig:
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-2
    temperature: float = 0.25  # of the target softmax over set losses (nats per token)
    batch_size: int = 64
    seed: int = 0


def fit_strategy(name: str, model: WhisperDynamic, train: LossTable, val: LossTable, cfg: FitConfig,
                 log: Callable[[str], None] = print) -> dict:
    """Train ``static`` or ``selector`` on a loss table; keeps the epoch best on ``val``."""
    scorer = model.strategy(name).scorer
    gen = torch.Generator().manual_seed(cfg.seed)

    def scores_of(table: LossTable, rows: Tensor | None = None) -> Callable[[int], Tensor]:
        pooled = table.pooled if rows is None else table.pooled[rows]
        if isinstance(scorer, LayerSelector):
            return lambda k: scorer.from_pooled(pooled, k)
        return lambda k: scorer.for_batch(pooled.shape[0], k)

    def val_loss() -> float:
        scorer.eval()
        with torch.no_grad():
            val_chosen = chosen_loss(scores_of(val), val)
        return sum(val_chosen.values()) / len(val_chosen)

    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    snapshot = lambda: {k: v.clone() for k, v in scorer.state_dict().items()}  # noqa: E731
    best = (val_loss(), snapshot(), -1)  # epoch -1: the starting state (e.g. a selector started from static)
    n = train.pooled.shape[0]
    for epoch in range(cfg.epochs):
        scorer.train()
        for rows in torch.randperm(n, generator=gen).split(cfg.batch_size):
            loss = listwise_loss(scores_of(train, rows), train, rows, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        mean_val = val_loss()
        if mean_val <= best[0]:  # a tie on validation: keep the longer-fitted scores
            best = (mean_val, snapshot(), epoch)
    scorer.load_state_dict(best[1])
    scorer.eval()
    with torch.no_grad():
        result = {"best_epoch": best[2], "val_chosen_loss": chosen_loss(scores_of(val), val),
                  "train_chosen_loss": chosen_loss(scores_of(train), train)}
    log(f"{name}: epoch {best[2]} best; val loss of chosen sets {result['val_chosen_loss']}")
    return result


def fit_whisper_skip_maps(model: WhisperDynamic, items: Sequence[SpeechItem], batch_size: int = 4,
                          on_batch: Callable[[int, int], None] | None = None) -> SkipMaps:
    """Fit the encoder's skip maps on ``items`` (full-model states of their padded windows) and
    install them on ``model.runner``; every later table, fit and eval then uses them."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    fronts = (model.front_end([it.waveform for it in batch]) for batch in batches)
    maps = fit_skip_maps(model.runner, fronts, on_batch=(lambda n: on_batch(n, len(batches))) if on_batch else None)
    model.runner.skip_maps = maps
    return maps


def table_summary(table: LossTable) -> dict:
    """Reference points on a table: the best single set per k (best static), and the per-clip oracle."""
    out = {}
    for k, losses in table.losses.items():
        mean = losses.mean(0)
        best = int(mean.argmin())
        out[k] = {
            "best_static_set": [i for i, x in enumerate(table.sets[k][best].tolist()) if x],
            "best_static_loss": float(mean[best]),
            "oracle_loss": float(losses.min(1).values.mean()),
            "mean_loss": float(mean.mean()),
        }
    return out
