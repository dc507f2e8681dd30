"""Fitting ``static`` and ``selector`` on a table of layer-set losses, for any encoder.

A :class:`LossTable` holds, for some clips, the task loss of every layer set of each size k when only
that set runs (built by :func:`set_loss_table` here for the SSL encoders, by
``whisper_train.loss_table`` for Whisper). The scorers are then fitted to it:

1. Both strategies score layers; a set's score is the sum of its layers' scores, so top-k of the
   layer scores is exactly the best-scoring set of size k. :func:`fit_strategy` matches, per clip and
   k, the softmax of set scores to the softmax of the sets' negative losses (a listwise ranking loss,
   as in ListNet, Cao et al. 2007). The static ranking sees no input, so it learns the sets that are
   best on average; the selector can learn which clips need which layers, and may start as the fitted
   static ranking (``LayerSelector.start_from``: its MLP's output zeroed, the static scores a fixed
   prior) and learn per-clip corrections.
2. Model selection on a validation table: the epoch, or the starting state, whose chosen sets have
   the lowest mean loss over all k (ties go to the later epoch, fitted longer); a selector started
   from static then keeps its per-clip corrections only at the k where they beat static's set on
   that table (:func:`keep_corrections_that_help`).

For the SSL encoders this replaces how the default stage 2 learns layer scores: through
straight-through top-k gates, one sampled set per batch, and on the synthetic speech corpus settles on
worse sets than the best of 16 random ones (README, speech recognition); :func:`fit_from_tables`
chooses a per-k static exactly instead of listwise. The table is computed with the base head; the
trainer may then tune each strategy's head on its sets. Cost per clip: one pass of each distinct kept
prefix (``LayerRunner.run_layer_sets``), 255 layer passes for all 254 proper subsets of 8 layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .batching import INFERENCE, SAMPLES_PER_FRAME, rows_within
from .model.dynamic import DynamicModel
from .model.runner import FrontEnd
from .model.selector import LayerSelector, pooled_features

TABLE_STRATEGIES = ("static", "selector")


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
    def from_rows(cls, pooled: list[Tensor], rows: list[Tensor], sets: dict[int, Tensor]) -> "LossTable":
        """Per-clip pooled features [2D] and loss rows [sum of C(L, k)], the sets of each k in the order
        of ``sets`` (as ``torch.cat(list(sets.values()))`` runs them), split into one table per k."""
        table = torch.stack(rows)  # [N, sum of C(L, k)]
        losses = dict(zip(sets, table.split([len(s) for s in sets.values()], dim=1)))
        return cls(torch.stack(pooled), losses, sets)

    @classmethod
    def from_dict(cls, d: dict) -> "LossTable":
        return cls(d["pooled"], {int(k): v for k, v in d["losses"].items()}, {int(k): v for k, v in d["sets"].items()})


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


def fit_strategy(name: str, model, train: LossTable, val: LossTable, cfg: FitConfig,
                 log: Callable[[str], None] = print) -> dict:
    """Train ``static`` or ``selector`` of ``model`` (any model with ``strategy(name).scorer``) listwise
    on a loss table; keeps the epoch best on ``val``."""
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


def clip_loss_table(runner, clips: Iterable[tuple[FrontEnd, str]], count: int, sets: dict[int, Tensor],
                    set_losses: Callable[[Tensor, Tensor | None, list[str]], Tensor], chunk_rows: int = 8,
                    on_item: Callable[[int, int], None] | None = None) -> LossTable:
    """The loss of every set in ``sets`` (``{k: bool [C_k, L]}``) on each of ``count`` clips, one clip at a
    time: ``clips`` yields ``(front end of one clip, its transcript or label)``; the sets share their
    common prefixes (``LayerRunner.run_layer_sets``) and ``set_losses(hidden [C, T, D], frame_mask [C, T]
    or None, texts) -> [C]`` scores ``chunk_rows`` of them at a time, fewer on a clip too long for the
    :data:`~.batching.INFERENCE` memory budget."""
    every = torch.cat(list(sets.values()))
    pooled, rows = [], []
    for n, (front, text) in enumerate(clips):
        pooled.append(pooled_features(front.features, front.frame_mask)[0])
        at_once = rows_within(INFERENCE, front.hidden.shape[1] * SAMPLES_PER_FRAME, chunk_rows)
        hidden = runner.run_layer_sets(front, every, max_rows=at_once)  # [C, T, D]
        losses = []
        for chunk in hidden.split(at_once):
            mask = None if front.frame_mask is None else front.frame_mask.expand(chunk.shape[0], -1)
            losses.append(set_losses(chunk, mask, [text] * chunk.shape[0]))
        rows.append(torch.cat(losses))
        if on_item:
            on_item(n + 1, count)
    return LossTable.from_rows(pooled, rows, sets)


@torch.no_grad()  # not inference_mode: the fit's autograd reads the pooled features
def set_loss_table(model: DynamicModel, cache, rows: Tensor, ks: tuple[int, ...] | None = None,
                   on_item: Callable[[int, int], None] | None = None) -> LossTable:
    """Base-head loss of every layer set of each size in ``ks`` (default 1..L-1) for the cached clips
    ``rows`` of ``cache`` (a :class:`~.front_cache.FrontEndCache`): ``losses[k]`` is ``[len(rows), C(L, k)]``."""
    model.eval()
    ks = ks or tuple(range(1, model.num_layers))
    head = model.heads["base"]

    def clips():
        for i in rows.tolist():
            front, texts = cache.batch(torch.tensor([i]))
            yield front, texts[0]

    def set_losses(hidden: Tensor, mask: Tensor | None, texts: list[str]) -> Tensor:
        return head.example_losses(head.logits(hidden, mask), mask, head.targets(texts))

    sets = {k: layer_sets(model.num_layers, k) for k in ks}
    return clip_loss_table(model.runner, clips(), len(rows), sets, set_losses, chunk_rows=64, on_item=on_item)


def fit_from_tables(model: DynamicModel, name: str, train: LossTable, val: LossTable, seed: int = 0,
                    log: Callable[[str], None] = print) -> dict:
    """Fit ``name`` (static or selector) on ``train``, model selection on ``val``; returns the chosen
    sets' mean loss per k on both tables and the epoch kept (-1: the starting state).

    A per-k static takes, for each k, the set with the lowest mean loss on ``train`` (exact; a listwise
    fit would match the distribution of each clip's best set, whose mode need not be that set). A
    budget-conditioned selector then starts as that static ranking (``LayerSelector.start_from``) and
    learns per-clip corrections listwise; the epoch kept is the one best on ``val`` over all k, and
    then, per k, its corrections stay on only where its chosen sets lose less on ``val`` than the
    ranking's (:func:`keep_corrections_that_help`; returned as ``corrected``). A nested static or
    selector (one ranking for every k) is fitted listwise.
    """
    if name not in TABLE_STRATEGIES:
        raise ValueError(f"only {', '.join(TABLE_STRATEGIES)} are fitted from a set table, not {name!r}")
    static = model.strategy("static").scorer
    selector = model.strategy("selector").scorer
    from_static = name == "selector" and selector.budget and static.budget
    if name == "static" and static.budget:
        with torch.no_grad():
            for k, losses in train.losses.items():
                static.scores[k] = train.sets[k][int(losses.mean(0).argmin())].to(static.scores.dtype)
        cfg = FitConfig(seed=seed, epochs=0)  # nothing to fit: only the chosen losses are reported
    else:
        cfg = FitConfig(seed=seed)
        if from_static:
            selector.start_from(static.scores.detach().clone())
    with torch.enable_grad():
        fitted = fit_strategy(name, model, train, val, cfg, log=log)
    return {**fitted, **keep_corrections_that_help(selector, static, train, val)} if from_static else fitted


@torch.no_grad()
def keep_corrections_that_help(selector: LayerSelector, static, train: LossTable, val: LossTable) -> dict:
    """Switch a budget selector's per-clip corrections off (``selector.corrected[k] = 0``) at every k
    where its chosen sets do not lose less on ``val`` than the ranking it started from (``static``, a
    budget :class:`~.model.selector.StaticScores`): the model selection of :func:`fit_strategy` is over
    the mean of all k, so corrections that win at some k may lose at others. Returns ``corrected``
    ({k: bool}) and the chosen sets' loss per k on both tables after the switch."""
    def chosen(table: LossTable) -> dict[int, float]:
        return chosen_loss(lambda k: selector.from_pooled(table.pooled, k), table)

    start = chosen_loss(lambda k: static.for_batch(val.pooled.shape[0], k), val)
    for k, loss in chosen(val).items():
        selector.corrected[k] = float(loss < start[k])
    return {"corrected": {k: bool(selector.corrected[k]) for k in val.sets},
            "val_chosen_loss": chosen(val), "train_chosen_loss": chosen(train)}
