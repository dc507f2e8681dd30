"""Layer-choice strategies behind one interface, so every comparison runs through the same harness.

A strategy turns the front-end output of a batch and a layer count ``k`` into a keep mask
``[B, L]``: exactly k layers per input, except ``adaptive`` and ``confident_exit``, which run a mean
of k. Learned strategies (``static``, ``selector``) also give straight-through gates for training. Each strategy
names the task head it is evaluated with: ``full`` and ``random`` use the base head trained with
random layer dropping; the others fine-tune their own head for their masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .depth import DepthChooser, exit_threshold, state_may_be_absent
from .runner import FrontEnd
from .selector import LayerSelector, StaticScores, gumbel_noise, pooled_features, straight_through_topk, topk_mask


class LayerChoice(nn.Module):
    """Base class: ``choose(front, k) -> bool mask [B, L]``."""

    name: str = ""
    head: str = "base"
    learned: bool = False

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers

    def choose(self, front: FrontEnd, k: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class FullModel(LayerChoice):
    """Every layer, every input: the reference."""

    name = "full"

    def choose(self, front, k, generator=None):
        return torch.ones(front.hidden.shape[0], self.num_layers, dtype=torch.bool, device=front.hidden.device)


class RandomDrop(LayerChoice):
    """k layers drawn at random for each input (LayerDrop-style)."""

    name = "random"

    def choose(self, front, k, generator=None):
        noise = torch.rand(front.hidden.shape[0], self.num_layers, generator=generator)
        return topk_mask(noise, k).to(front.hidden.device)


class EarlyExit(LayerChoice):
    """The first k layers, with a head trained on their output."""

    name = "early_exit"
    head = "early_exit"

    def choose(self, front, k, generator=None):
        mask = torch.zeros(front.hidden.shape[0], self.num_layers, dtype=torch.bool, device=front.hidden.device)
        mask[:, :k] = True
        return mask


class ScoredChoice(LayerChoice):
    """Keeps the top-k of per-layer scores from ``self.scorer``; trainable with straight-through gates."""

    learned = True
    scorer: nn.Module

    def scores(self, front: FrontEnd, k: int | None = None) -> Tensor:
        """Per-layer scores ``[B, L]``; ``k`` matters only to a budget-conditioned selector."""
        return self.scorer(front.features, front.frame_mask, k)

    def choose(self, front, k, generator=None):
        return topk_mask(self.scores(front, k), k)

    def gates(self, front: FrontEnd, k: int, tau: float = 1.0, noise_scale: float = 1.0) -> Tensor:
        """Straight-through top-k gates; Gumbel noise (scaled) makes training explore other sets."""
        scores = self.scores(front, k)
        noise = gumbel_noise(scores) * noise_scale if noise_scale > 0 else None
        return straight_through_topk(scores, k, tau=tau, noise=noise)


class StaticMask(ScoredChoice):
    """One learned layer ranking for all inputs."""

    name = "static"
    head = "static"

    def __init__(self, num_layers: int, budget: bool = False):
        super().__init__(num_layers)
        self.scorer = StaticScores(num_layers, budget)


class InputSelector(ScoredChoice):
    """The input-conditioned selector: a layer ranking per input."""

    name = "selector"
    head = "selector"

    def __init__(self, num_layers: int, feature_dim: int, hidden: int = 64, budget: bool = False):
        super().__init__(num_layers)
        self.scorer = LayerSelector(feature_dim, num_layers, hidden, budget)


class AdaptiveDepth(LayerChoice):
    """The selector with a depth per input: a mean of k layers over inputs instead of k on each.

    Its :class:`~.depth.DepthChooser` gives each input a depth d (1..L) from its pooled front-end
    features; the layers run at depth d are another strategy's (``sets_from``, the selector's) choice
    at d, with that strategy's head. It needs that strategy, so it runs through
    ``DynamicModel.choose``; ``choose`` alone raises TypeError.
    """

    name = "adaptive"
    head = "selector"
    sets_from = "selector"

    def __init__(self, num_layers: int, feature_dim: int):
        super().__init__(num_layers)
        self.chooser = DepthChooser(feature_dim, num_layers)

    def choose(self, front, k, generator=None):
        raise TypeError("adaptive depth takes its layer sets from the selector: use DynamicModel.choose")

    def choose_with(self, sets: LayerChoice, front: FrontEnd, k: int, generator: torch.Generator | None = None,
                    max_depth: int | None = None) -> Tensor:
        """Keep mask [B, L]: row i keeps ``sets``' choice at depth d_i, the chooser's depth for input i at
        a duration-weighted mean of ``k``, at most ``max_depth``. Raises ValueError when the chooser is
        unfitted."""
        depth = self.chooser.depths(pooled_features(front.features, front.frame_mask), k, front.lengths())
        if max_depth is not None:
            depth = depth.clamp(max=max(1, max_depth))
        keep = torch.zeros(front.hidden.shape[0], self.num_layers, dtype=torch.bool, device=front.hidden.device)
        for d in depth.unique().tolist():
            rows = (depth == d).nonzero().squeeze(1)
            keep[rows] = sets.choose(front.select(rows), d, generator)
        return keep


class ConfidentExit(LayerChoice):
    """Early exit by confidence: the first layers in order, stopping at the first exit where the
    early-exit head's confidence (:meth:`~.heads.TaskHead.confidence`) reaches a threshold — the
    field's variable-depth baseline (DeeBERT, Xin et al. 2020), beside ``adaptive``.

    ``thresholds`` [L + 1] (index k) are calibrated so that held-out clips' duration-weighted mean
    depth is at most k (``ldfleet train``'s depth stage); with ``fitted`` they are buffers, saved
    with the run (an older run loads with them unfitted). Its depth is known only while it runs, so
    it runs through ``DynamicModel.run``; ``choose`` raises TypeError.
    """

    name = "confident_exit"
    head = "early_exit"

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.register_buffer("thresholds", torch.zeros(num_layers + 1))
        self.register_buffer("fitted", torch.zeros(()))
        self.register_load_state_dict_pre_hook(state_may_be_absent)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def calibrate(self, confidence: Tensor, weights: Tensor | None = None) -> None:
        """``thresholds`` from held-out clips' early-exit confidence ``[N, L]`` (column d-1: after d
        layers) and their relative lengths ``[N]`` (None: all alike)."""
        for k in range(1, self.num_layers + 1):
            self.thresholds[k] = exit_threshold(confidence, float(k), weights)
        self.fitted.fill_(1.0)

    def threshold(self, k: int) -> float:
        """The exit threshold for a mean of ``k`` layers. Raises ValueError when never calibrated."""
        if not self.is_fitted:
            raise ValueError("this run has no calibrated confident exit: run `ldfleet train` on it again to add the depth stage")
        return float(self.thresholds[min(k, self.num_layers)])

    def choose(self, front, k, generator=None):
        raise TypeError("confident exit decides its depth while it runs: use DynamicModel.run")


STRATEGY_NAMES = ("full", "random", "early_exit", "static", "selector", "adaptive", "confident_exit")


def build_strategies(num_layers: int, feature_dim: int, selector_hidden: int = 64, selector_budget: bool = False,
                     static_budget: bool = False) -> nn.ModuleDict:
    """``selector_budget`` / ``static_budget``: that strategy's kept set depends on k (see the scorers)."""
    return nn.ModuleDict(
        {
            "full": FullModel(num_layers),
            "random": RandomDrop(num_layers),
            "early_exit": EarlyExit(num_layers),
            "static": StaticMask(num_layers, static_budget),
            "selector": InputSelector(num_layers, feature_dim, selector_hidden, selector_budget),
            "adaptive": AdaptiveDepth(num_layers, feature_dim),
            "confident_exit": ConfidentExit(num_layers),
        }
    )
