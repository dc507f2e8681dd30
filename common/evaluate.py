"""Evaluating every layer-choice strategy at every budget on one test set, in one harness.

The front end is the same for all strategies, so it is computed once per batch and its time is
added to every row; each strategy then runs only its own layers. Rows carry the task's scores
(accuracy for kws; WER and CER for asr), the mean number of layers run, analytic MACs per
example and measured ms per example. Every method runs exactly k layers per input at a keep ratio,
except ``adaptive`` and ``confident_exit``, whose depth per input averages about k (their
``mean_layers`` is what they ran).

Two extra methods measure what input conditioning could win at most (``oracle_sets`` candidate
layer sets per budget, the same for all inputs, drawn with a fixed seed, all run with the base
head, which was trained under random layer dropping and so accepts any set):

* ``oracle``: per input, the candidate with the fewest errors (character edits for asr, wrong label
  for kws; ties go to the first candidate) — an upper bound no selector can beat among them;
* ``oracle_static``: the one candidate with the fewest errors over the whole test set — the best
  single set for all inputs, so ``oracle_static - oracle`` is the headroom of conditioning.

With the test set's conditions (asr: noise, channel, accent, speed) the headroom also gives, per
condition column, the error of the best candidate *per value* of that column (one set for the noisy
clips, one for the clean, ...): what a selector that could tell only that condition would win. Part of
the per-input oracle's gain is luck — the best of 16 draws on the very input it is scored on — and
these figures show how much of it follows from properties a selector can see.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import Dataset

from .batching import budgeted_loader
from .metrics import example_errors, score
from .model.cost import cost_of
from .model.dynamic import DynamicModel
from .model.runner import FrontEnd
from .model.selector import LayerSelector

ORACLE_METHODS = ("oracle", "oracle_static")


@dataclass
class EvalRow:
    method: str
    keep: float
    k: int
    scores: dict[str, float]  # accuracy (kws) or wer + cer (asr)
    mean_layers: float  # per clip
    macs: float  # per example, at the duration-weighted mean of layers (which ``adaptive`` may spend unevenly)
    ms_per_example: float | None  # None for the oracles (they are not a runnable method)
    examples: int
    distinct_sets: int = 0  # distinct layer sets used over the test inputs
    mean_layers_timed: float = 0.0  # mean layers weighted by clip duration: what compute follows

    def __getattr__(self, name: str) -> float:  # row.wer, row.accuracy, ...
        scores = self.__dict__.get("scores", {})
        if name in scores:
            return scores[name]
        raise AttributeError(name)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "scores"}, **d["scores"]}


@dataclass
class EvalResult:
    rows: list[EvalRow]
    layer_usage: dict[str, dict[float, list[float]]]  # method -> keep -> share of inputs running each layer
    # method -> keep -> condition column -> value -> per-layer share (asr data with metadata only)
    usage_by_condition: dict[str, dict[float, dict[str, dict[str, list[float]]]]] = field(default_factory=dict)
    # keep -> condition column -> scores of the best oracle candidate per value of that column
    best_set_by_condition: dict[float, dict[str, dict[str, float]]] = field(default_factory=dict)

    def headroom(self) -> list[dict]:
        """Per keep with oracle rows: the error rate (WER for asr, 1 - accuracy for kws) of the best
        single set (``oracle_static``), of the per-input oracle and of the selector; ``headroom``: the
        relative gain conditioning could win, ``(static - oracle) / static``; ``captured``: the share of
        it the selector won, ``(static - selector) / (static - oracle)`` (negative: worse than the best
        single set; None without headroom); ``by_condition``: condition column -> error of the best
        set per value of that column (empty without conditions)."""
        def error_of(scores: dict[str, float]) -> float:
            return scores["wer"] if "wer" in scores else 1.0 - scores["accuracy"]

        by = {(r.method, r.keep): r for r in self.rows}
        out = []
        for keep in sorted({r.keep for r in self.rows if r.method == "oracle"}):
            static, oracle, selector = (by.get((m, keep)) for m in ("oracle_static", "oracle", "selector"))
            if static is None or oracle is None:
                continue
            s, o = error_of(static.scores), error_of(oracle.scores)
            by_condition = {col: error_of(sc) for col, sc in self.best_set_by_condition.get(keep, {}).items()}
            entry = {"keep": keep, "best_single": s, "oracle": o, "headroom": (s - o) / s if s > 0 else 0.0,
                     "selector": None, "captured": None, "by_condition": by_condition}
            if selector is not None:
                entry["selector"] = error_of(selector.scores)
                entry["captured"] = (s - entry["selector"]) / (s - o) if s > o else None
            out.append(entry)
        return out

    def as_dict(self) -> dict:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "headroom": self.headroom(),
            "layer_usage": {m: {str(k): v for k, v in per.items()} for m, per in self.layer_usage.items()},
            "usage_by_condition": {m: {str(k): v for k, v in per.items()} for m, per in self.usage_by_condition.items()},
        }


def oracle_candidates(num_layers: int, k: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct random layer sets of size k (all of them when there are fewer), bool ``[n, L]``."""
    gen = torch.Generator().manual_seed(seed * 1009 + k)
    sets: dict[tuple[int, ...], None] = {}
    for _ in range(50 * n):
        if len(sets) >= n:
            break
        idx = tuple(sorted(torch.randperm(num_layers, generator=gen)[:k].tolist()))
        sets[idx] = None
    out = torch.zeros(len(sets), num_layers, dtype=torch.bool)
    for i, idx in enumerate(sets):
        out[i, list(idx)] = True
    return out


def best_set_per_group(errs: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """Per input, the candidate with the fewest errors summed over the inputs of its group.

    ``errs`` ``[C, N]`` errors of C candidates on N inputs; ``groups`` N group names. Returns ``[N]``
    candidate indices (one per group; ties go to the first candidate).
    """
    choice = torch.empty(errs.shape[1], dtype=torch.long)
    for value in set(groups):
        rows = torch.tensor([j for j, g in enumerate(groups) if g == value])
        choice[rows] = int(errs[:, rows].sum(1).argmin())
    return choice


@dataclass
class _Acc:
    predictions: list[str] = field(default_factory=list)
    layers: float = 0.0
    ms: float = 0.0
    usage: torch.Tensor | None = None
    sets: Counter = field(default_factory=Counter)
    masks: list[torch.Tensor] = field(default_factory=list)

    def add(self, predictions: list[str], keep: torch.Tensor, ms: float) -> None:
        self.predictions += predictions
        self.layers += float(keep.sum())
        self.ms += ms
        self.usage = keep.float().sum(0) if self.usage is None else self.usage + keep.float().sum(0)
        self.sets.update(tuple(row) for row in keep.int().tolist())
        self.masks.append(keep.cpu())


def _selector_runs(model: DynamicModel, k: int) -> bool:
    """Whether the selector's network runs at k, so its MACs count (not where its per-input corrections
    are switched off, nor for a selector of another form, e.g. a study's router)."""
    scorer = getattr(model.strategy("selector"), "scorer", None)
    return isinstance(scorer, LayerSelector) and scorer.uses_input(k)


def _macs(model: DynamicModel, cost, method: str, k: int, masks: torch.Tensor, timed_layers: float) -> float:
    """Mean MACs per example of ``method``'s row: the layers it ran (``timed_layers``, the duration-weighted
    mean of ``masks`` [N, L]), the selector's network on the share of inputs where it runs (``selector``
    at k; ``adaptive`` at each input's own depth), adaptive's depth chooser, and confident exit's head
    at every exit it passed."""
    if method == "selector":
        share = float(_selector_runs(model, k))
    elif method == "adaptive":
        runs = {d: _selector_runs(model, d) for d in range(1, model.num_layers + 1)}
        share = sum(runs[int(d)] for d in masks.sum(1).tolist()) / max(1, len(masks))
    else:
        share = 0.0
    chooser = model.strategy("adaptive").chooser.macs() if method == "adaptive" else 0
    exits = (timed_layers - 1) * cost.head if method == "confident_exit" else 0.0  # the head at every exit passed
    return cost.total(timed_layers, with_selector=False) + share * cost.selector + chooser + exits


def _oracle_batch(model: DynamicModel, front: FrontEnd, texts: list[str], k: int, candidates: torch.Tensor):
    """Per candidate: predictions and per-example errors (base head)."""
    head = model.heads["base"]
    preds, errs = [], []
    for cand in candidates:
        keep = cand.unsqueeze(0).expand(front.hidden.shape[0], -1)
        p = head.predict(model.runner.run_layers(front, keep), front.frame_mask)
        preds.append(p)
        errs.append(example_errors(model.task, p, texts, unit="char"))
    return preds, torch.tensor(errs)  # [C, B]


@torch.inference_mode()
def evaluate(
    model: DynamicModel,
    data: Dataset,
    methods: Sequence[str],
    keeps: Sequence[float],
    batch_size: int = 32,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    oracle_sets: int = 16,
    conditions: dict[str, list[str]] | None = None,
) -> EvalResult:
    """Rows for every method at every keep ratio (``full`` at 1.0 only).

    ``methods`` may include ``oracle`` (and then ``oracle_static`` is added). ``conditions`` maps a
    metadata column to one value per example, for layer usage by condition.
    """
    model.eval()
    with_oracle = "oracle" in methods or "oracle_static" in methods
    plain = [m for m in methods if m not in ORACLE_METHODS]
    for m in plain:
        model.strategy(m)  # clear error for an unknown method before any work
    combos = [(m, keep) for m in plain for keep in ([1.0] if m == "full" else keeps)]
    acc = {c: _Acc() for c in combos}
    gens = {c: torch.Generator().manual_seed(seed) for c in combos}
    oracle_keeps = [keep for keep in keeps if model.k_for(keep) < model.num_layers] if with_oracle else []
    cands = {keep: oracle_candidates(model.num_layers, model.k_for(keep), oracle_sets, seed) for keep in oracle_keeps}
    cand_preds = {keep: [[] for _ in range(len(cands[keep]))] for keep in oracle_keeps}
    cand_errs = {keep: [] for keep in oracle_keeps}
    references: list[str] = []
    front_ms = 0.0
    clip_seconds: list[torch.Tensor] = []
    loader = budgeted_loader(data, batch_size)
    for i, (wave, mask, texts) in enumerate(loader):
        start = time.perf_counter()
        front = model.front_end(wave, mask)
        front_ms += (time.perf_counter() - start) * 1000
        clip_seconds.append((torch.full((len(texts),), wave.shape[1]) if mask is None else mask.sum(1)).float() / 16000)
        references += texts
        for method, keep in combos:
            start = time.perf_counter()
            preds, kept = model.predict(front, method, model.k_for(keep), gens[(method, keep)])
            acc[(method, keep)].add(preds, kept, (time.perf_counter() - start) * 1000)
        for keep in oracle_keeps:
            preds, errs = _oracle_batch(model, front, texts, model.k_for(keep), cands[keep])
            for c, p in enumerate(preds):
                cand_preds[keep][c] += p
            cand_errs[keep].append(errs)
        if on_batch:
            on_batch(i + 1, len(loader))
    n = len(references)
    durations = torch.cat(clip_seconds) if clip_seconds else torch.zeros(0)
    cost = cost_of(model, seconds=float(durations.sum()) / max(1, n))
    best_by_condition: dict[float, dict[str, dict[str, float]]] = {}
    for keep in oracle_keeps:
        errs = torch.cat(cand_errs[keep], dim=1)  # [C, N]

        def chosen(choice: torch.Tensor) -> list[str]:
            return [cand_preds[keep][int(c)][j] for j, c in enumerate(choice.tolist())]

        best = errs.argmin(0)  # per input (first on ties)
        best_static = int(errs.sum(1).argmin())
        for name, choice in (("oracle", best), ("oracle_static", torch.full((n,), best_static))):
            a = _Acc()
            a.add(chosen(choice), cands[keep][choice], 0.0)
            acc[(name, keep)] = a
        best_by_condition[keep] = {col: score(model.task, chosen(best_set_per_group(errs, vals)), references)
                                   for col, vals in (conditions or {}).items()}
    rows, usage, by_condition = [], {}, {}
    for (method, keep), a in acc.items():
        mean_layers = a.layers / n
        masks = torch.cat(a.masks).float()  # [N, L]
        timed = float((masks.sum(1) * durations).sum() / durations.sum().clamp(min=1e-9))
        rows.append(EvalRow(
            method=method, keep=keep, k=model.k_for(keep), scores=score(model.task, a.predictions, references),
            mean_layers=mean_layers, macs=_macs(model, cost, method, model.k_for(keep), masks, timed), mean_layers_timed=timed,
            ms_per_example=(front_ms + a.ms) / n if method not in ORACLE_METHODS else None,
            examples=n, distinct_sets=len(a.sets),
        ))
        usage.setdefault(method, {})[keep] = (a.usage / n).tolist()
        if conditions and method in ("selector", "adaptive", "oracle"):
            by_condition.setdefault(method, {})[keep] = {
                col: {v: masks[[j for j, x in enumerate(vals) if x == v]].mean(0).tolist() for v in sorted(set(vals))}
                for col, vals in conditions.items()
            }
    return EvalResult(rows, usage, by_condition, best_by_condition)

