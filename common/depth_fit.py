"""The ``depth`` stage: fitting the ``adaptive`` strategy's depth chooser (:mod:`.model.depth`).

After the strategies and the encoder are trained, in three phases on cached front ends:

1. errors table: up to ``depth_clips`` training clips, each run by the selector at every depth
   1..L with its head (word edits for asr, 0/1 for kws): ``[N, L]``, with the clips' pooled features;
2. fit: the chooser's predictor on that table (Poisson likelihood, epochs by cross-validation);
3. calibrate: one lambda per mean depth k on the validation clips' pooled features and lengths, so
   their duration-weighted mean depth is at most k (clips the predictor never saw; the test speakers
   are never used).

Measured on the default speech-recognition corpus (README, "The adaptive strategy"): at a
duration-weighted mean of 6 / 4 / 2 of 8 layers the selector's WER went from 5.97 / 8.50 / 18.99%
(exactly k on every clip) to 5.32 / 8.19 / 19.20% on held-out speakers; refits moved it by up to 0.3 points.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .metrics import example_errors
from .model.depth import fit_error_predictor
from .model.dynamic import DynamicModel
from .model.selector import pooled_features
from .train import FrontEndCache


@torch.inference_mode()
def errors_table(model: DynamicModel, cache: FrontEndCache, rows: Tensor, batch_size: int = 64,
                 on_step: Callable[[int, int], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled features ``[N, 2D]``, lengths in frames ``[N]`` and errors ``[N, L]`` (column d-1: the
    selector at depth d) of the cached clips ``rows`` [N]."""
    model.eval()
    sets_from = model.strategy("adaptive").sets_from  # the strategy whose sets (and head) adaptive runs
    head = model.head_for(sets_from)
    pooled, errors = [], []
    batches = rows.split(batch_size)
    for i, batch in enumerate(batches):
        front, texts = cache.batch(batch)
        pooled.append(pooled_features(front.features, front.frame_mask))
        per_depth = []
        for d in range(1, model.num_layers + 1):
            hidden, _ = model.run(front, sets_from, d)
            per_depth.append(example_errors(model.task, head.predict(hidden, front.frame_mask), texts))
        errors.append(torch.tensor(per_depth).T)
        if on_step:
            on_step(i + 1, len(batches))
    return torch.cat(pooled), cache.lengths()[rows], torch.cat(errors)


def fit_depth(model: DynamicModel, train: FrontEndCache, val: FrontEndCache, clips: int, seed: int = 0,
              on_step: Callable[[int, int], None] | None = None) -> dict:
    """Fit and calibrate ``model``'s ``adaptive`` depth chooser in place (the module docstring's phases)
    on at most ``clips`` random training clips; returns what to log: ``{"clips", "epochs", "cv_loss",
    "cv_loss_first_epoch", "lambdas"}``. Raises ValueError with fewer than 2 training clips (or no
    validation clips)."""
    if min(len(train), clips) < 2 or len(val) == 0:
        raise ValueError(f"{min(len(train), clips)} training and {len(val)} validation clips: too few to fit a depth chooser")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(train), generator=gen)[:clips]
    pooled, frames, errors = errors_table(model, train, rows, on_step=on_step)
    fitted, info = fit_error_predictor(pooled, frames, errors, folds=min(5, len(rows)), seed=seed)
    chooser = model.strategy("adaptive").chooser
    chooser.load_state_dict(fitted.state_dict())
    chooser.calibrate(pooled_features(val.features, val.frame_mask), val.lengths())
    return {"clips": len(rows), **info, "lambdas": chooser.lambdas[1:].tolist()}
