"""Study: spending a keep ratio as a *mean* over inputs, each input given the depth it needs.

Not product code: a measured experiment on a trained speech-recognition run, reproducible with one
command. Every other strategy in ldfleet runs exactly k = keep x L layers on every input. A device's
budget is compute over time, though, so an input-conditioned model may also choose *how many* layers
an input gets: few for a clean, slow utterance, all of them for a noisy one, at the same mean.
Adaptive computation time (Graves 2016) and confidence-based early exit (e.g. DeeBERT, Xin et al.
2020) spend compute this way; here the kept sets stay the trained selector's (its top-k at each k).

Phases:

1. per-clip table, on the validation and test splits: for each method (``selector``, ``static``,
   ``early_exit``) and every k = 1..L, the word edits of each clip, the mean over frames of the
   CTC head's top posterior (its confidence) and the layers kept (``common/depth_fit.depth_table``);
   the reference word count; pooled front-end features; the same for the selector alone on the
   training split (cached in OUT: the slow phase);
2. allocations at each keep (mean layers = keep x L), each reported as WER and the mean layers it ran:
   * ``fixed``: k = keep x L for every clip (what ``ldfleet eval`` reports);
   * ``allocated_oracle``: depths chosen (:func:`allocate`) on the test clips' own edits: what a
     perfect depth predictor could win (and some luck: the best k of each clip on that clip);
   * ``allocated_val`` / ``allocated_train``: the same with edits predicted from pooled features by a
     small MLP (the ``adaptive`` strategy's :class:`~ldfleet.common.model.depth.DepthChooser`) fitted on the validation clips (speaker-disjoint from the test clips) or on the
     training clips (many more, but the model has seen them, so their edits are few);
   * ``confident_exit`` (early exit only): the first k whose confidence reaches a threshold, set to
     the budget — the field's standard variable-depth baseline;
   * ``cascade_K1_K2`` (early exit) / ``cascade_bound_K1_K2`` (selector, static): every clip runs the
     strategy's set at K1, the least confident of them go on to K2 (as many as the budget allows;
     K1, K2 chosen on the validation clips). Costed as if the K2 run continued the K1 run, which
     only nested sets allow: exact for early exit; for the selector's and static's per-k sets, whose
     K2 run would start again, an optimistic bound for confidence-driven depth;
   except for ``allocated_oracle``, allocations and thresholds are set on the test clips' features or
   confidences (never their transcripts), all of them at once, so they fit the budget exactly; a
   device would instead use a lambda or threshold calibrated beforehand, as
   ``allocated_train_lambda_val`` does (each clip's k = argmin of predicted edits + lambda * k, lambda
   set on the validation clips, so its mean depth on the test clips may miss the budget a little);
   ``allocated_train_lambda_val_timed`` is the form the product took as the ``adaptive`` strategy
   (``ldfleet train``'s stage 4, ``ldfleet eval``): a layer priced by the clip's length, the budget a
   duration-weighted mean (every row also reports that mean, ``mean_layers_timed``);
   * ``adaptive_escalated`` (selector): that ``adaptive`` form at a smaller budget, then the clips
     least confident at their depth run again with every layer, reusing the hidden state of the
     layers their first set shares with the full set's prefix (:func:`escalation`): a deployable
     confidence cascade whose cost counts every layer run, the first run's included (the
     ``cascade_bound`` rows' continuation is free); the smaller budget and the confidence threshold are
     chosen on the validation clips, then applied clip by clip;
3. OUT/report.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from ldfleet.common.data.loading import load_task_data
from ldfleet.common.depth_fit import depth_table
from ldfleet.common.metrics import error_counts
from ldfleet.common.model.checkpoint import load_model
from ldfleet.common.model.depth import (bisect_edge, calibrated_lambda, exit_threshold, first_confident, fit_error_predictor,
                                        lagrange_depths, weighted_mean)
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.front_cache import cache_front_ends
from ldfleet.common.trainer import source_progress, strategies_trained

METHODS = ("selector", "static", "early_exit")


def clip_table(model: DynamicModel, data, methods=METHODS) -> dict:
    """Per clip: ``edits[method]`` and ``conf[method]`` [N, L] (column k-1: k layers), ``sets[method]``
    bool [N, L, L] (row k-1: the layers kept at k), ``words`` [N], ``pooled`` [N, 2D], ``frames`` [N] (lengths)."""
    cache = cache_front_ends(model, data)
    rows = torch.arange(len(cache))
    tables = {m: depth_table(model, cache, rows, m) for m in methods}
    first = tables[methods[0]]
    return {"edits": {m: t.errors for m, t in tables.items()}, "conf": {m: t.confidence for m, t in tables.items()},
            "sets": {m: t.sets for m, t in tables.items()},
            "words": torch.tensor([float(error_counts([t], [t])["words"]) for t in cache.texts]),
            "pooled": first.pooled, "frames": first.frames}


def allocate(cost: Tensor, mean_layers: float) -> Tensor:
    """Depths k [N] (1..L) for the rows of ``cost`` [N, L] (column k-1: a clip's cost at k layers) with
    a low total cost and a mean k of at most ``mean_layers``: every clip starts at one layer, then,
    while layers are left and some step lowers a cost, the step of the best cost drop per layer
    (from a clip's depth to any deeper one) is taken — the greedy rule for a multiple-choice knapsack.
    It sees every row at once, so it suits a study of a test set, not one input at a time.
    Raises ValueError for a budget under one layer."""
    if mean_layers < 1:
        raise ValueError(f"a mean of {mean_layers} layers: every clip runs at least one")
    n, num_layers = cost.shape
    k = torch.ones(n, dtype=torch.long)
    spare = int(mean_layers * n + 1e-6) - n
    depths = torch.arange(1, num_layers + 1)
    while spare > 0:
        steps = depths.unsqueeze(0) - k.unsqueeze(1)  # [N, L] layers a move to each depth adds
        gain = (cost.gather(1, (k - 1).unsqueeze(1)) - cost) / steps.clamp(min=1)
        gain[(steps <= 0) | (steps > spare)] = -float("inf")
        best = int(gain.argmax())
        i, j = divmod(best, num_layers)
        if gain[i, j] <= 0:
            break
        spare -= int(steps[i, j])
        k[i] = j + 1
    return k


def shared_prefix(a: Tensor, b: Tensor) -> Tensor:
    """Per row of keep masks ``a``, ``b`` [N, L]: the layers the two runs share before they first differ,
    [N] — how much of a run of ``a`` a later run of ``b`` on the same input can reuse (its hidden state
    after them is the same)."""
    num_layers = a.shape[1]
    differ = a != b
    first = torch.where(differ.any(1), differ.float().argmax(1), torch.full((len(a),), num_layers))
    return (a & (torch.arange(num_layers) < first.unsqueeze(1))).sum(1)


def escalation(depths: Tensor, conf: Tensor, sets: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Each clip runs its set at ``depths`` [N]; one whose confidence there (``conf`` [N, L]) is under
    ``threshold`` runs again with every layer, reusing the layers its first set shares with the full
    set's prefix (``sets`` [N, L, L]). Returns the final depths [N] and the layers run per clip [N]
    (float: the first run plus the second's new layers)."""
    num_layers = sets.shape[1]
    rows = torch.arange(len(depths))
    first = sets[rows, depths - 1]
    go = (conf[rows, depths - 1] < threshold) & (depths < num_layers)
    extra = num_layers - shared_prefix(first, sets[rows, num_layers - 1])
    return torch.where(go, num_layers, depths), depths.float() + go.float() * extra


def escalation_threshold(depths: Tensor, conf: Tensor, sets: Tensor, weights: Tensor, mean_layers: float) -> float:
    """The highest confidence threshold whose :func:`escalation` keeps the ``weights``-weighted mean of
    the layers run at most ``mean_layers`` (bisection; a higher threshold never sends fewer clips on)."""
    def within(threshold: float) -> bool:
        return weighted_mean(escalation(depths, conf, sets, threshold)[1], weights) <= mean_layers

    return bisect_edge(within, inside=0.0, outside=1.0 + 1e-6, steps=40)


def adaptive_escalation(pred: tuple[Tensor, Tensor], val: dict, test: dict, w: tuple[Tensor, Tensor],
                        mean_layers: float, m: str = "selector", step: float = 0.25) -> tuple[Tensor, Tensor, dict]:
    """The ``adaptive`` depths for a smaller budget b, then :func:`escalation` of the least confident
    clips to every layer with what is left: b and the threshold chosen on the validation clips (lowest
    WER), then applied clip by clip to the test clips. ``pred``: predicted edits [N, L] on (val, test);
    ``w``: relative lengths on (val, test). Returns test depths, layers run and {base, threshold}."""
    best = None
    for i in range(int(2 / step) + 1):
        base = mean_layers - i * step
        if base < 1:
            break
        lam = calibrated_lambda(pred[0], base, w[0])
        d_val = lagrange_depths(pred[0], lam, w[0])
        t = escalation_threshold(d_val, val["conf"][m], val["sets"][m], w[0], mean_layers)
        k_val, _ = escalation(d_val, val["conf"][m], val["sets"][m], t)
        score = wer_of(val["edits"][m], val["words"], k_val)
        if best is None or score < best[0]:
            best = (score, base, lam, t)
    _, base, lam, t = best
    k, run = escalation(lagrange_depths(pred[1], lam, w[1]), test["conf"][m], test["sets"][m], t)
    return k, run, {"base": base, "threshold": t}


def cascade(conf: Tensor, mean_layers: float, k1: int, k2: int) -> Tensor:
    """Depths [N]: k1 for every clip, k2 for the least confident at k1 (``conf`` [N, L]), as many as
    bring the mean depth to ``mean_layers`` (k1 < mean_layers < k2)."""
    n = int((mean_layers - k1) / (k2 - k1) * len(conf) + 1e-6)
    k = torch.full((len(conf),), k1, dtype=torch.long)
    k[conf[:, k1 - 1].argsort()[:n]] = k2
    return k


def best_cascade(edits: Tensor, conf: Tensor, words: Tensor, mean_layers: float) -> tuple[int, int] | None:
    """The (k1, k2) of the :func:`cascade` with the lowest WER on these clips; None when no pair
    brackets the budget (one layer or fewer, all of them or more)."""
    pairs = [(k1, k2) for k1 in range(1, int(mean_layers) + 1) for k2 in range(k1 + 1, edits.shape[1] + 1)
             if k1 < mean_layers < k2]
    return min(pairs, key=lambda p: wer_of(edits, words, cascade(conf, mean_layers, *p)), default=None)


def wer_of(edits: Tensor, words: Tensor, k: Tensor) -> float:
    return float(edits.gather(1, (k - 1).unsqueeze(1)).sum() / words.sum())


def study(tables: dict[str, dict], keeps: list[float], num_layers: int) -> dict:
    """Phase 2 on the clip tables (``val``, ``test``, optionally ``train`` with the selector only):
    rows {method, allocation, keep, wer, mean_layers, mean_layers_timed (weighted by clip length), depths}."""
    val, test = tables["val"], tables["test"]
    ref = val["frames"].float().mean()  # lengths relative to the validation clips' mean, as the product's chooser
    w_val, w_test = val["frames"].float() / ref, test["frames"].float() / ref
    predictors = {(m, "val"): fit_error_predictor(val["pooled"], val["frames"], val["edits"][m]) for m in METHODS if m != "early_exit"}
    if "train" in tables:
        predictors[("selector", "train")] = fit_error_predictor(tables["train"]["pooled"], tables["train"]["frames"], tables["train"]["edits"]["selector"])
    with torch.no_grad():  # predicted edits [N, L] on the validation and test clips, per predictor
        predicted = {key: (net(val["pooled"], val["frames"]), net(test["pooled"], test["frames"])) for key, (net, _) in predictors.items()}
    rows, escalations = [], {}
    for keep in keeps:
        budget = keep * num_layers
        for m in METHODS:
            e, words = test["edits"][m], test["words"]
            plans = {"fixed": torch.full((len(words),), round(budget), dtype=torch.long)}
            if m == "early_exit":
                plans["confident_exit"] = first_confident(test["conf"][m], exit_threshold(test["conf"][m], budget))
            else:
                plans["allocated_oracle"] = allocate(e, budget)
            if pair := best_cascade(val["edits"][m], val["conf"][m], val["words"], budget):
                name = "cascade" if m == "early_exit" else "cascade_bound"
                plans[f"{name}_{pair[0]}_{pair[1]}"] = cascade(test["conf"][m], budget, *pair)
            run = {}  # layers run per clip where a plan runs more than its final depth
            for (pm, fitted_on), (on_val, on_test) in predicted.items():
                if pm == m:
                    plans[f"allocated_{fitted_on}"] = allocate(on_test, budget)
                    if fitted_on == "train":  # the deployable form: lambda from the validation clips
                        plans["allocated_train_lambda_val"] = lagrange_depths(on_test, calibrated_lambda(on_val, budget))
                        # ... and the product's (the adaptive strategy): a layer priced by the clip's length
                        plans["allocated_train_lambda_val_timed"] = lagrange_depths(
                            on_test, calibrated_lambda(on_val, budget, w_val), w_test)
                        # ... with the least confident clips sent on to every layer
                        k, run["adaptive_escalated"], chosen = adaptive_escalation((on_val, on_test), val, test, (w_val, w_test), budget, m)
                        plans["adaptive_escalated"] = k
                        escalations[keep] = chosen
            for name, k in plans.items():
                cost = run.get(name, k)
                rows.append({"method": m, "allocation": name, "keep": keep, "wer": wer_of(e, words, k),
                             "mean_layers": float(cost.float().mean()), "mean_layers_timed": weighted_mean(cost, w_test),
                             "depths": torch.bincount(k - 1, minlength=num_layers).tolist()})
    return {"rows": rows, "escalations": escalations, "predictors": {f"{m}/{on}": info for (m, on), (_, info) in predictors.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an asr run past stage 2 (`ldfleet train --task asr`)")
    ap.add_argument("--data", type=Path, required=True, help="the data the run was trained on")
    ap.add_argument("--out", type=Path, required=True, help="folder for report.json (the clip tables are cached there)")
    ap.add_argument("--keep", default="0.25,0.5,0.75")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        saved, state = source_progress(args.run)
    except ValueError as exc:
        ap.error(str(exc))
    if saved.get("task") != "asr" or not strategies_trained(saved, state):
        ap.error(f"{args.run}: give an asr run past stage 2 (`ldfleet train --task asr`)")
    model = load_model(args.run)
    try:
        keeps = [float(x) for x in args.keep.split(",")]
    except ValueError:
        ap.error(f"--keep {args.keep!r}: comma-separated keep ratios")
    if not all(1 <= keep * model.num_layers < model.num_layers for keep in keeps):
        ap.error(f"--keep {args.keep}: each must leave at least one of {model.num_layers} layers and drop one")
    cached = args.out / "clip-tables.pt"  # phase 1 is the slow part; phase 2 may be re-run on it
    tables = torch.load(cached) if cached.exists() else {}
    made_from = {"run": str(args.run.resolve()), "state": (args.run / "train_state.json").read_text(),
                 "data": str(args.data.resolve()), "tables": 3}  # a run trained further, other data or older tables: again
    if tables.get("made_from") != made_from:
        try:
            splits = load_task_data("asr", args.data, seed=saved.get("seed", 0)).splits
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            ap.error(f"cannot load {args.data}: {exc}")
        tables = {s: clip_table(model, splits[s]) for s in ("val", "test")}
        tables["train"] = clip_table(model, splits["train"], methods=("selector",))
        tables["made_from"] = made_from
        torch.save(tables, cached)
    print(f"[{time.perf_counter() - start:.0f} s] phase 1: clip tables", flush=True)
    report = study(tables, keeps, model.num_layers)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    for r in report["rows"]:
        print(f"{r['method']:11s} {r['allocation']:32s} keep {r['keep']:.2f}: WER {100 * r['wer']:5.2f}%  "
              f"mean layers {r['mean_layers']:.2f} (by duration {r['mean_layers_timed']:.2f})  depths {r['depths']}")
    print(json.dumps(report["predictors"]))


if __name__ == "__main__":
    main()
