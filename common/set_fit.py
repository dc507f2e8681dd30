"""Stage 2 for ``static`` and ``selector`` from a table of layer-set losses (SSL encoders).

The default stage 2 learns layer scores through straight-through top-k gates, one sampled set per
batch. On the synthetic speech corpus that settles on worse sets than the best of 16 random ones
(README, speech recognition). The alternative here is the one the Whisper path uses
(:mod:`.whisper_train`): score every layer set of each size k on each of some training clips with the
base head (its CTC or cross-entropy loss), then fit the scorers to those losses (see
:func:`fit_from_tables`), keeping the fit whose chosen sets have the lowest loss on a validation table.
The table is computed with the base head; the trainer may then tune each strategy's head on its sets.

Cost per clip: one pass of each distinct kept prefix (``LayerRunner.run_layer_sets``), 255 layer
passes for all 254 proper subsets of 8 layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .model.dynamic import DynamicModel
from .model.selector import pooled_features
from .whisper_train import FitConfig, LossTable, fit_strategy, layer_sets

TABLE_STRATEGIES = ("static", "selector")


@torch.no_grad()  # not inference_mode: the fit's autograd reads the pooled features
def set_loss_table(model: DynamicModel, cache, rows: Tensor, ks: tuple[int, ...] | None = None,
                   on_item: Callable[[int, int], None] | None = None) -> LossTable:
    """Base-head loss of every layer set of each size in ``ks`` (default 1..L-1) for the cached clips
    ``rows`` of ``cache`` (a :class:`~.train.FrontEndCache`): ``losses[k]`` is ``[len(rows), C(L, k)]``."""
    model.eval()
    ks = ks or tuple(range(1, model.num_layers))
    sets = {k: layer_sets(model.num_layers, k) for k in ks}
    every = torch.cat([sets[k] for k in ks])
    head = model.heads["base"]
    pooled, losses = [], []
    for n, i in enumerate(rows.tolist()):
        front, texts = cache.batch(torch.tensor([i]))
        pooled.append(pooled_features(front.features, front.frame_mask)[0])
        hidden = model.runner.run_layer_sets(front, every, max_rows=64)  # [C, T, D]
        mask = None if front.frame_mask is None else front.frame_mask.expand(hidden.shape[0], -1)
        logits = head.logits(hidden, mask)
        losses.append(head.example_losses(logits, mask, head.targets(texts * hidden.shape[0])))
        if on_item:
            on_item(n + 1, len(rows))
    table = torch.stack(losses)  # [N, sum of C(L, k)]
    per_k, start = {}, 0
    for k in ks:
        per_k[k] = table[:, start : start + len(sets[k])]
        start += len(sets[k])
    return LossTable(torch.stack(pooled), per_k, sets)


def fit_from_tables(model: DynamicModel, name: str, train: LossTable, val: LossTable, seed: int = 0,
                    log: Callable[[str], None] = print) -> dict:
    """Fit ``name`` (static or selector) on ``train``, model selection on ``val``; returns the chosen
    sets' mean loss per k on both tables and the epoch kept (-1: the starting state).

    A per-k static takes, for each k, the set with the lowest mean loss on ``train`` (exact; a listwise
    fit would match the distribution of each clip's best set, whose mode need not be that set). A
    budget-conditioned selector then starts as that static ranking (``LayerSelector.start_from``) and
    learns per-clip corrections listwise, kept only where they beat the start on ``val``. A nested
    static or selector (one ranking for every k) is fitted listwise.
    """
    if name not in TABLE_STRATEGIES:
        raise ValueError(f"only {', '.join(TABLE_STRATEGIES)} are fitted from a set table, not {name!r}")
    static = model.strategy("static").scorer
    if name == "static" and static.budget:
        with torch.no_grad():
            for k, losses in train.losses.items():
                static.scores[k] = train.sets[k][int(losses.mean(0).argmin())].to(static.scores.dtype)
        cfg = FitConfig(seed=seed, epochs=0)  # nothing to fit: only the chosen losses are reported
    else:
        cfg = FitConfig(seed=seed)
        selector = model.strategy("selector").scorer
        if name == "selector" and selector.budget and static.budget:
            selector.start_from(static.scores.detach().clone())
    with torch.enable_grad():
        return fit_strategy(name, model, train, val, cfg, log=log)
