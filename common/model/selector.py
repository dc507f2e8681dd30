"""The input-conditioned layer selector and the top-k machinery shared by learned strategies.

The selector looks at a cheap summary of the input — mean and standard deviation over time of the
projected CNN features, which the model computes anyway — and gives one score per encoder layer.
At run time the k best-scoring layers are kept, k coming from the budget, so one selector serves
every budget. In training, ``straight_through_topk`` turns scores into hard 0/1 gates in the
forward pass while letting gradients flow through a sigmoid relaxation around the k-th score;
Gumbel noise on the scores makes it explore other layer sets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_mean_std(x: Tensor, frame_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and std over time of [B, T, D] features, counting only real frames."""
    if frame_mask is None:
        return x.mean(1), x.std(1, unbiased=False)
    m = frame_mask.unsqueeze(-1).to(x.dtype)
    n = m.sum(1).clamp(min=1)
    mean = (x * m).sum(1) / n
    var = (((x - mean.unsqueeze(1)) * m) ** 2).sum(1) / n
    return mean, var.sqrt()


class LayerSelector(nn.Module):
    """Scores each encoder layer for one input from pooled front-end features.

    With ``budget=True`` the share of layers to keep (k / L) is a second input, so the kept sets
    of different budgets need not be nested (top-k of one ranking).

    ``prior`` is a fixed score per layer ([L], or [L + 1, L] per k with ``budget``) added to the
    MLP's: zeros unless set. ``start_from`` sets it to a static ranking and zeroes the MLP's output,
    so the selector starts as that ranking and learns per-input corrections to it. With ``budget``,
    ``corrected`` ([L + 1], 1 or 0 per k) says at which k those corrections apply: a fit that finds
    them no better than the ranking at some k on its validation table switches them off there
    (``set_fit.fit_from_tables``), and the selector keeps the ranking's set at that k.
    """

    def __init__(self, feature_dim: int, num_layers: int, hidden: int = 64, budget: bool = False):
        super().__init__()
        self.num_layers = num_layers
        self.hidden = hidden
        self.budget = budget
        self.norm = nn.LayerNorm(2 * feature_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * feature_dim + int(budget), hidden), nn.GELU(), nn.Linear(hidden, num_layers))
        self.register_buffer("prior", torch.zeros(num_layers + 1, num_layers) if budget else torch.zeros(num_layers))
        if budget:
            self.register_buffer("corrected", torch.ones(num_layers + 1))
        self.register_load_state_dict_pre_hook(_buffers_may_be_absent)

    @torch.no_grad()
    def start_from(self, scores: Tensor) -> None:
        """Become the static ranking ``scores`` (shaped like ``prior``): prior := scores, MLP output := 0."""
        if scores.shape != self.prior.shape:
            raise ValueError(f"prior scores {tuple(scores.shape)}: expected {tuple(self.prior.shape)}")
        self.prior.copy_(scores)
        if self.budget:
            self.corrected.fill_(1.0)  # a fit decides again where its corrections help
        last = self.mlp[-1]
        last.weight.zero_()
        last.bias.zero_()

    def uses_input(self, k: int) -> bool:
        """Whether the scores at ``k`` depend on the input (the MLP runs): False where a budget
        selector's corrections are switched off, and it costs nothing but a lookup."""
        return not self.budget or bool(self.corrected[k])

    def forward(self, features: Tensor, frame_mask: Tensor | None = None, k: int | None = None) -> Tensor:
        """Scores ``[B, L]`` from features ``[B, T, D]``; ``k`` (layers to keep) is needed with ``budget``."""
        return self.from_pooled(pooled_features(features, frame_mask), k)

    def from_pooled(self, pooled: Tensor, k: int | None = None) -> Tensor:
        """Scores [B, L] from pooled features [B, 2 * D] (see ``pooled_features``), so a trainer can
        cache the pooled summary of every clip instead of its frames."""
        if self.budget:
            if k is None:
                raise ValueError("a budget-conditioned selector needs k")
            if not self.uses_input(k):  # corrections switched off at this k: the ranking alone
                return self.prior[k].expand(pooled.shape[0], -1)
            x = self.norm(pooled)
            x = torch.cat([x, x.new_full((x.shape[0], 1), k / self.num_layers)], dim=-1)
            return self.mlp(x) + self.prior[k]
        return self.mlp(self.norm(pooled)) + self.prior


def _buffers_may_be_absent(module: LayerSelector, state_dict: dict, prefix: str, *args) -> None:
    """A state without this selector's prior or ``corrected`` (a run saved before selectors had them,
    or arrays from elsewhere) loads, also strictly, and the selector keeps the buffers it has: zeros
    and ones in a freshly built model, which is what such a run computed."""
    for name, buffer in module.named_buffers(recurse=False):
        state_dict.setdefault(prefix + name, buffer.clone())


def pooled_features(features: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """What the selector looks at: mean and std over real frames, concatenated, [B, 2 * D]."""
    mean, std = masked_mean_std(features, frame_mask)
    return torch.cat([mean, std], dim=-1)


class StaticScores(nn.Module):
    """One learned score per layer, the same for every input: the `static` baseline.

    With ``budget=True`` there is one score row per k (``scores`` [L + 1, L]), so the static sets of
    different budgets need not be nested either: the fair baseline for a budget-conditioned selector.
    """

    def __init__(self, num_layers: int, budget: bool = False):
        super().__init__()
        self.budget = budget
        self.scores = nn.Parameter(torch.zeros(num_layers + 1, num_layers) if budget else torch.zeros(num_layers))

    def forward(self, features: Tensor, frame_mask: Tensor | None = None, k: int | None = None) -> Tensor:
        return self.for_batch(features.shape[0], k)

    def for_batch(self, batch: int, k: int | None = None) -> Tensor:
        """The scores [batch, L] (every row the same) for budget k."""
        if not self.budget:
            return self.scores.unsqueeze(0).expand(batch, -1)
        if k is None:
            raise ValueError("a budget-conditioned static ranking needs k")
        return self.scores[k].unsqueeze(0).expand(batch, -1)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask [B, L] keeping the k highest scores per row."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    u = torch.rand(like.shape, generator=generator, device=like.device).clamp_(1e-6, 1 - 1e-6)
    return -torch.log(-torch.log(u))


def straight_through_topk(scores: Tensor, k: int, tau: float = 1.0, noise: Tensor | None = None) -> Tensor:
    """Hard top-k gates in the forward pass, sigmoid-relaxed gradients in the backward pass.

    The relaxation centres a sigmoid between the k-th and (k+1)-th perturbed score, so raising a
    layer's score pushes it into the kept set and lowering it pushes it out.
    """
    perturbed = scores if noise is None else scores + noise
    hard = topk_mask(perturbed.detach(), k).to(scores.dtype)
    num_layers = scores.shape[-1]
    if k >= num_layers:
        return torch.ones_like(scores)
    top = perturbed.detach().topk(k + 1, dim=-1).values
    threshold = 0.5 * (top[:, k - 1] + top[:, k])
    soft = torch.sigmoid((perturbed - threshold.unsqueeze(-1)) / tau)
    return hard + soft - soft.detach()
