"""The ``depth`` stage: fitting the ``adaptive`` strategy's depth chooser (:mod:`.model.depth`), and
calibrating ``confident_exit`` (:func:`calibrate_exits`), the field's variable-depth baseline.

After the strategies and the encoder are trained, in three phases on cached front ends:

1. depth table (:func:`depth_table`): up to ``depth_clips`` training clips, each run by the selector
   at every depth 1..L with its head: errors ``[N, L]`` (word edits for asr, 0/1 for kws), with the
   clips' pooled features and lengths;
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
from dataclasses import dataclass

import torch
from torch import Tensor

from .batching import INFERENCE, budgeted_batches
from .front_cache import FrontEndCache
from .metrics import example_errors
from .model.depth import fit_error_predictor
from .model.dynamic import DynamicModel
from .model.selector import pooled_features


@dataclass
class DepthTable:
    """One strategy run at every depth 1..L on N clips (row d-1 / column d-1: depth d)."""

    pooled: Tensor  # [N, 2D] pooled front-end features (the depth chooser's input)
    frames: Tensor  # [N] lengths in frames
    errors: Tensor  # [N, L] word edits (asr) or 0/1 (kws)
    confidence: Tensor  # [N, L] the head's confidence (TaskHead.confidence)
    sets: Tensor  # bool [N, L, L]: the layers kept at each depth


@torch.inference_mode()
def depth_table(model: DynamicModel, cache: FrontEndCache, rows: Tensor, strategy: str, batch_size: int = 64,
                on_step: Callable[[int, int], None] | None = None) -> DepthTable:
    """``strategy`` (with its head) on the cached clips ``rows`` [N] at every depth 1..L; ``on_step(i, n)``
    after each of n batches."""
    model.eval()
    head = model.head_for(strategy)
    pooled, errors, confidence, sets = [], [], [], []
    batches = budgeted_batches(cache.sample_lengths(), batch_size, INFERENCE, rows=rows)
    for i, batch in enumerate(batches):
        front, texts = cache.batch(batch)
        pooled.append(pooled_features(front.features, front.frame_mask))
        per_depth = [model.classify(front, strategy, d) for d in range(1, model.num_layers + 1)]
        errors.append(torch.tensor([example_errors(model.task, head.decode(out.logits, out.frame_mask), texts)
                                    for out in per_depth]).T)
        confidence.append(torch.stack([head.confidence(out.logits, out.frame_mask) for out in per_depth], 1))
        sets.append(torch.stack([out.keep.cpu() for out in per_depth], 1))
        if on_step:
            on_step(i + 1, len(batches))
    return DepthTable(torch.cat(pooled), cache.lengths()[rows], torch.cat(errors), torch.cat(confidence), torch.cat(sets))


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
    chooser = model.strategy("adaptive").chooser
    table = depth_table(model, train, rows, model.strategy("adaptive").sets_from, on_step=on_step)
    fitted, info = fit_error_predictor(table.pooled, table.frames, table.errors, folds=min(5, len(rows)), seed=seed)
    chooser.load_state_dict(fitted.state_dict())
    chooser.calibrate(val.pooled_features(), val.lengths())
    return {"clips": len(rows), **info, "lambdas": chooser.lambdas[1:].tolist()}


def calibrate_exits(model: DynamicModel, val: FrontEndCache, on_step: Callable[[int, int], None] | None = None) -> dict:
    """Calibrate ``model``'s ``confident_exit`` in place on the validation clips: their early-exit
    confidence at every depth, one threshold per mean depth k (duration-weighted, as ``adaptive``'s
    budget). Returns ``{"exit_thresholds"}`` [L]. Raises ValueError without validation clips."""
    if len(val) == 0:
        raise ValueError("no validation clips to calibrate confident exit on")
    exits = model.strategy("confident_exit")
    table = depth_table(model, val, torch.arange(len(val)), "early_exit", on_step=on_step)
    frames = table.frames.float()
    exits.calibrate(table.confidence, frames / frames.mean())
    return {"exit_thresholds": exits.thresholds[1:].tolist()}
