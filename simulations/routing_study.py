"""Study: routing among a few candidate layer sets per budget, each trained on the inputs sent to it.

Not product code: a measured experiment on a speech-recognition run, reproducible with one command.
The default selector fits per-clip corrections to a static ranking on a layer-set loss table; stage 3
then tunes the encoder on every set it chooses. Spread over many sets, each is tuned less than
static's single set, and the corrections rarely survive stage 3 (README, speech recognition). Here,
instead, the selector chooses among only R sets per k, so stage 3 trains each on its share of inputs.

Phases (of the run, only a cache of its tables is written into it):

1. tables: the run's front ends and its layer-set loss tables (the same clips as its stage 2;
   cached in RUN as ``routing-tables-N.pt``, N training clips: give the data the run was trained on);
2. candidates and router, per k: ``table``: R sets chosen greedily to minimise the mean over clips
   of the lowest loss among them (the first is static's set), and a small MLP fitted to predict each
   clip's best candidate (soft targets, the epoch kept by validation); ``cluster``: k-means of the
   pooled front-end features into R clusters, each with the set of lowest mean loss on its clips;
3. stage 3 as ``ldfleet train`` runs it (``common/joint_train.py``), the selector replaced by the
   router, so each candidate is fine-tuned on the inputs routed to it;
4. eval per clip on the test split (``common/evaluate.py``), rows and headroom to OUT/report.json.

Compare with the same run given the default stage 3: ``ldfleet train --task asr --data DATA --out
COPY --joint-epochs 6`` on a copy of RUN, then ``ldfleet eval --run COPY --data DATA --json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ldfleet.common.data.loading import load_task_data
from ldfleet.common.evaluate import evaluate
from ldfleet.common.joint_train import joint_optimizer, train_joint_epoch
from ldfleet.common.model.checkpoint import load_model
from ldfleet.common.model.selector import pooled_features
from ldfleet.common.model.strategies import LayerChoice
from ldfleet.common.set_fit import LossTable, set_loss_table
from ldfleet.common.front_cache import FrontEndCache, add_teacher, cache_front_ends
from ldfleet.common.train import TrainConfig
from ldfleet.common.trainer import set_table_rows, source_progress, strategies_trained

Route = Callable[[Tensor, int], Tensor]  # pooled features [B, 2D], k -> candidate index [B]


class RoutedChoice(LayerChoice):
    """The selector as a router: per input and k, one of the R candidate sets ``candidates[k]``
    (bool ``[R, L]``); every layer at k = L."""

    name = "selector"
    head = "selector"

    def __init__(self, num_layers: int, candidates: dict[int, Tensor], route: Route):
        super().__init__(num_layers)
        self.candidates, self.route = candidates, route

    def choose(self, front, k, generator=None):
        if k >= self.num_layers:
            return torch.ones(front.hidden.shape[0], self.num_layers, dtype=torch.bool)
        return self.candidates[k][self.route(pooled_features(front.features, front.frame_mask), k)]


def greedy_candidates(losses: Tensor, r: int) -> list[int]:
    """Columns of ``losses`` [clips, sets]: the set of lowest mean loss, then, one at a time, the set
    that most lowers the mean over clips of the lowest loss among those chosen."""
    chosen = [int(losses.mean(0).argmin())]
    while len(chosen) < min(r, losses.shape[1]):
        best_so_far = losses[:, chosen].min(1).values.unsqueeze(1)
        mean_if_added = torch.minimum(losses, best_so_far).mean(0)
        mean_if_added[chosen] = float("inf")
        chosen.append(int(mean_if_added.argmin()))
    return chosen


class TableRouter(nn.Module):
    """Logits over R candidates for each k from pooled features [B, 2D]; starts on candidate 0."""

    def __init__(self, dim: int, num_layers: int, r: int, hidden: int = 64):
        super().__init__()
        self.r, self.num_layers = r, num_layers
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, (num_layers + 1) * r))
        with torch.no_grad():
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()
            self.mlp[-1].bias.view(num_layers + 1, r)[:, 0] = 1.0

    def logits(self, pooled: Tensor, k: int) -> Tensor:
        return self.mlp(self.norm(pooled)).view(-1, self.num_layers + 1, self.r)[:, k]

    def forward(self, pooled: Tensor, k: int) -> Tensor:
        return self.logits(pooled, k).argmax(-1)


def fit_router(router: TableRouter, train: dict[int, tuple[Tensor, Tensor]], val: dict[int, tuple[Tensor, Tensor]],
               epochs: int = 300, temperature: float = 0.25, seed: int = 0) -> int:
    """Fit ``router`` to the candidates' losses (per k: pooled [N, 2D], losses [N, R]) by cross-entropy
    to softmax(-loss / temperature); keeps the epoch whose routed sets lose least on ``val`` (-1: the
    start, candidate 0 for every clip). Returns that epoch."""
    def val_loss() -> float:
        with torch.no_grad():
            return sum(float(loss.gather(1, router(pooled, k).unsqueeze(1)).mean()) for k, (pooled, loss) in val.items())

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(router.parameters(), lr=3e-3, weight_decay=1e-2)
    best = (val_loss(), {n: v.clone() for n, v in router.state_dict().items()}, -1)
    n = next(iter(train.values()))[0].shape[0]
    for epoch in range(epochs):
        for rows in torch.randperm(n, generator=gen).split(64):
            loss = sum(F.cross_entropy(router.logits(pooled[rows], k), F.softmax(-losses[rows] / temperature, -1))
                       for k, (pooled, losses) in train.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (v := val_loss()) <= best[0]:
            best = (v, {n: x.clone() for n, x in router.state_dict().items()}, epoch)
    router.load_state_dict(best[1])
    return best[2]


def kmeans(x: Tensor, r: int, iters: int = 50, seed: int = 0) -> Tensor:
    """Centroids [r, D] of ``x`` [N, D] (Lloyd's algorithm from r random points)."""
    centroids = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:r]].clone()
    for _ in range(iters):
        nearest = torch.cdist(x, centroids).argmin(1)
        for j in range(r):
            if (nearest == j).any():
                centroids[j] = x[nearest == j].mean(0)
    return centroids


# ---- the phases -----------------------------------------------------------------------------------


def tables_of(run: Path, model, cfg: TrainConfig, caches: dict[str, FrontEndCache]) -> tuple[LossTable, LossTable]:
    """The run's stage-2 tables: ``cfg.set_table`` training clips and a quarter as many validation
    clips, the trainer's draw (``set_table_rows``; cached in ``run``)."""
    cached = run / f"routing-tables-{cfg.set_table}.pt"
    if cached.exists():
        saved = torch.load(cached)
        return LossTable.from_dict(saved["train"]), LossTable.from_dict(saved["val"])
    rows = set_table_rows(len(caches["train"]), len(caches["val"]), cfg.set_table, cfg.seed)
    train, val = (set_loss_table(model, caches[s], rows[s]) for s in ("train", "val"))
    torch.save({"train": train.to_dict(), "val": val.to_dict()}, cached)
    return train, val


def table_routing(train: LossTable, val: LossTable, r: int, num_layers: int) -> tuple[dict[int, Tensor], Route, dict]:
    """Greedy candidates and a fitted :class:`TableRouter`."""
    picks = {k: greedy_candidates(losses, r) for k, losses in train.losses.items()}
    router = TableRouter(train.pooled.shape[1], num_layers, r)
    epoch = fit_router(router, {k: (train.pooled, train.losses[k][:, p]) for k, p in picks.items()},
                       {k: (val.pooled, val.losses[k][:, p]) for k, p in picks.items()})
    router.eval()
    return {k: train.sets[k][p] for k, p in picks.items()}, lambda pooled, k: router(pooled, k), {"router_epoch": epoch}


def cluster_routing(train: LossTable, r: int) -> tuple[dict[int, Tensor], Route, dict]:
    """k-means clusters of the standardised pooled features, each with its own lowest-loss set per k."""
    mean, std = train.pooled.mean(0), train.pooled.std(0) + 1e-6
    centroids = kmeans((train.pooled - mean) / std, r)

    def route(pooled: Tensor, k: int) -> Tensor:
        return torch.cdist((pooled - mean) / std, centroids).argmin(1)

    cluster = route(train.pooled, 1)
    candidates = {}
    for k, losses in train.losses.items():
        best = [int(losses[cluster == j].mean(0).argmin()) if (cluster == j).any() else int(losses.mean(0).argmin())
                for j in range(r)]
        candidates[k] = train.sets[k][best]
    return candidates, route, {"cluster_sizes": torch.bincount(cluster, minlength=r).tolist()}


def on_validation_table(val: LossTable, train: LossTable, candidates: dict[int, Tensor], route: Route) -> dict:
    """Per k, mean loss on the validation table of static's set, the routed sets, the best candidate
    per clip and the best set per clip; the share of clips routed to each candidate."""
    out = {}
    for k, losses in val.losses.items():
        columns = [int((val.sets[k] == c).all(1).float().argmax()) for c in candidates[k]]
        routed = route(val.pooled, k)
        out[k] = {"static": float(losses[:, int(train.losses[k].mean(0).argmin())].mean()),
                  "routed": float(losses[:, columns].gather(1, routed.unsqueeze(1)).mean()),
                  "best_candidate": float(losses[:, columns].min(1).values.mean()),
                  "oracle": float(losses.min(1).values.mean()),
                  "routed_share": (torch.bincount(routed, minlength=len(columns)) / len(routed)).tolist(),
                  "candidates": [c.nonzero().flatten().tolist() for c in candidates[k]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an asr run after stage 2 (`ldfleet train --task asr --joint-epochs 0`)")
    ap.add_argument("--data", type=Path, required=True, help="the data the run was trained on")
    ap.add_argument("--out", type=Path, required=True, help="folder for report.json")
    ap.add_argument("--router", choices=("table", "cluster"), default="table")
    ap.add_argument("--candidates", type=int, default=2, help="R: candidate layer sets per k")
    ap.add_argument("--joint-epochs", type=int, default=6, help="stage-3 epochs (0: evaluate the router on the stage-2 encoder)")
    ap.add_argument("--keep", default="0.25,0.5,0.75")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="the router's initialisation and stage 3's dropout")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    try:
        saved, state = source_progress(args.run)
    except ValueError as exc:
        ap.error(str(exc))
    stage3_begun = any(h.get("stage") == "joint" for h in state.history)  # (a --joint-epochs 0 run ends at stage "joint")
    if saved.get("task") != "asr" or stage3_begun or not strategies_trained(saved, state):
        ap.error(f"{args.run}: give an asr run at the end of stage 2 (`ldfleet train --task asr --joint-epochs 0`)")
    if not saved.get("set_table"):
        ap.error(f"{args.run} was trained without a set table (--set-table 0): the candidates are chosen on one")
    cfg = replace(TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}), joint_epochs=args.joint_epochs)
    model = load_model(args.run)
    try:
        splits = load_task_data("asr", args.data, seed=cfg.seed).splits
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        ap.error(f"cannot load {args.data}: {exc}")
    caches = {s: cache_front_ends(model, splits[s]) for s in ("train", "val")}
    train, val = tables_of(args.run, model, cfg, caches)
    say("phase 1: front ends and tables")

    if args.router == "table":
        candidates, route, info = table_routing(train, val, args.candidates, model.num_layers)
    else:
        candidates, route, info = cluster_routing(train, args.candidates)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, **info,
              "validation_table": on_validation_table(val, train, candidates, route)}
    for k, row in report["validation_table"].items():
        say(f"k={k}: val loss static {row['static']:.3f}, routed {row['routed']:.3f}, best candidate "
            f"{row['best_candidate']:.3f}, oracle {row['oracle']:.3f}; routed shares {row['routed_share']}")
    model.strategies["selector"] = RoutedChoice(model.num_layers, candidates, route)

    if args.joint_epochs:
        if cfg.distill > 0:
            add_teacher(model, caches["train"])
        optimizer = joint_optimizer(model, cfg)
        for epoch in range(args.joint_epochs):
            stats = train_joint_epoch(model, caches["train"], optimizer, cfg, epoch)
            say(f"phase 3: joint epoch {epoch + 1}/{args.joint_epochs}: loss {stats['loss']:.3f}")

    keeps = [float(x) for x in args.keep.split(",")]
    result = evaluate(model, splits["test"], ["full", "random", "early_exit", "static", "selector", "oracle"], keeps)
    report["eval"] = result.as_dict()
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    for row in result.rows:
        say(f"{row.method:14s} keep {row.keep:.2f}: WER {100 * row.scores['wer']:.2f}%, {row.distinct_sets} distinct sets")


if __name__ == "__main__":
    main()
