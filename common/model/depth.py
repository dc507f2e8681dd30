"""Depth per input under a mean budget: the ``adaptive`` strategy's depth chooser.

Every other strategy runs exactly k of the L encoder layers on every input. A device's budget is
compute over time, so an input-conditioned model may instead give each input the depth it needs —
few layers to a clean, slow utterance, all of them to a noisy one — at a mean of k layers.

:class:`DepthChooser` predicts, from the pooled front-end features the selector already computes
(``[B, 2D]``) and the input's length, its expected errors at every depth 1..L (word edits for speech
recognition, 0/1 for keyword spotting; Poisson rates from a small MLP). An input then runs at the depth ``d`` that
minimises ``predicted_errors[d] + lambda_k * d * w``, the Lagrangian relaxation of "fewest errors at a
mean of k layers" (Everett 1963), where ``w`` is the input's length in frames over the mean length of
the calibration clips: a layer costs compute in proportion to the frames it runs on, so the budget is
a mean of k layers *weighted by duration* (a long clip's extra layer costs more than a short one's).
``lambda_k`` is calibrated once per k on held-out clips, the smallest that keeps their
duration-weighted mean depth at most k, so a device decides one input at a time. Which layers run at
depth ``d`` is the selector's choice at ``d`` (:class:`~.strategies.AdaptiveDepth`).

The predictor is fitted after the strategies are trained (the ``depth`` stage of ``ldfleet train``) on
the selector's own errors at every depth. Adaptive computation time (Graves 2016) and confidence-based
early exit (DeeBERT, Xin et al. 2020) spend compute per input in the same spirit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class DepthChooser(nn.Module):
    """Predicted errors per depth from pooled features, and one calibrated lambda per mean depth k.

    ``lambdas`` [L + 1] (index k; column 0 unused), ``ref_frames`` (the calibration clips' mean length
    in frames) and ``fitted`` (1.0 once fitted) are buffers: they are saved with the model, and a run
    trained before this existed loads with the chooser unfitted.
    """

    def __init__(self, feature_dim: int, num_layers: int, hidden: int = 64):
        super().__init__()
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(2 * feature_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * feature_dim + 1, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, num_layers))
        self.register_buffer("lambdas", torch.zeros(num_layers + 1))
        self.register_buffer("ref_frames", torch.ones(()))
        self.register_buffer("fitted", torch.zeros(()))
        self.register_load_state_dict_pre_hook(state_may_be_absent)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def log_rate(self, pooled: Tensor, frames: Tensor) -> Tensor:
        """Log of the predicted errors ``[B, L]`` (column d-1: at depth d) from pooled features ``[B, 2D]``
        and lengths in frames ``[B]`` (seen as log(frames / 50): longer clips hold more words)."""
        length = (frames.to(pooled.device, pooled.dtype).clamp(min=1) / 50).log().unsqueeze(1)
        return self.mlp(torch.cat([self.norm(pooled), length], dim=1))

    def forward(self, pooled: Tensor, frames: Tensor) -> Tensor:
        """Predicted errors ``[B, L]`` from pooled features ``[B, 2D]`` and lengths in frames ``[B]``."""
        return self.log_rate(pooled, frames).exp()

    def macs(self) -> int:
        """Multiply-accumulates per input of the predictor's linear layers (the pooling is the selector's)."""
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))

    @torch.no_grad()
    def calibrate(self, pooled: Tensor, frames: Tensor) -> None:
        """Set ``lambdas`` from held-out clips (ones the predictor was not fitted on): pooled features
        ``[N, 2D]`` and lengths in frames ``[N]``; for each k, the smallest lambda whose depths keep
        these clips' duration-weighted mean depth at most k."""
        self.ref_frames.fill_(float(frames.float().mean()))
        predicted, weights = self(pooled, frames), frames.float() / self.ref_frames
        for k in range(1, self.num_layers + 1):
            self.lambdas[k] = calibrated_lambda(predicted, float(k), weights)
        self.fitted.fill_(1.0)

    @torch.no_grad()
    def depths(self, pooled: Tensor, k: int, frames: Tensor) -> Tensor:
        """Depth per input ``[B]`` (1..L) for a duration-weighted mean of ``k`` layers, from pooled
        features ``[B, 2D]`` and lengths in frames ``[B]``; all L at k >= L.

        Raises ValueError when the chooser was never fitted (a run trained without the depth stage)."""
        if not self.is_fitted:
            raise ValueError("this run has no fitted depth chooser: run `ldfleet train` on it again to add the depth stage")
        if k >= self.num_layers:
            return torch.full((pooled.shape[0],), self.num_layers, dtype=torch.long, device=pooled.device)
        return lagrange_depths(self(pooled, frames), float(self.lambdas[k]), frames.to(pooled.device).float() / self.ref_frames)


def state_may_be_absent(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A load hook: a run saved before ``module`` existed loads (also strictly) with it as built (unfitted)."""
    for name, value in module.state_dict().items():
        state_dict.setdefault(prefix + name, value.clone())


def lagrange_depths(cost: Tensor, lam: float, weights: Tensor | None = None) -> Tensor:
    """Per row of ``cost`` [N, L] (column d-1: cost at depth d) the depth d in 1..L minimising
    ``cost + lam * d * weight`` (``weights`` [N], e.g. relative lengths; 1 when None)."""
    ds = torch.arange(1, cost.shape[1] + 1, dtype=cost.dtype, device=cost.device)
    price = lam * ds if weights is None else lam * weights.to(cost.dtype).unsqueeze(1) * ds
    return (cost + price).argmin(1) + 1


def weighted_mean(depths: Tensor, weights: Tensor | None = None) -> float:
    """Mean of ``depths`` [N], weighted by ``weights`` [N] when given."""
    if weights is None:
        return float(depths.float().mean())
    return float((depths.float() * weights).sum() / weights.sum())


def calibrated_lambda(cost: Tensor, mean_layers: float, weights: Tensor | None = None) -> float:
    """The smallest lambda (bisected) at which :func:`lagrange_depths` keeps the (``weights``-weighted)
    mean depth of the rows of ``cost`` [N, L] at most ``mean_layers``."""
    def within(lam: float) -> bool:
        return weighted_mean(lagrange_depths(cost, lam, weights), weights) <= mean_layers

    inside = float(cost.max() - cost.min()) + 1.0  # every row at depth 1 once a layer costs more than any error it removes,
    while not within(inside):  # ... on the row of least weight too
        inside *= 2
    return bisect_edge(within, inside=inside, outside=0.0, steps=60)


def bisect_edge(within: Callable[[float], bool], inside: float, outside: float, steps: int) -> float:
    """Bisection between a value where ``within`` holds and one where it need not: the value nearest
    the edge, after ``steps`` halvings, at which it was seen to hold (``inside`` if never)."""
    for _ in range(steps):
        mid = (inside + outside) / 2
        inside, outside = (mid, outside) if within(mid) else (inside, mid)
    return inside


def first_confident(conf: Tensor, threshold: float) -> Tensor:
    """Per row of ``conf`` [N, L] (column d-1: confidence after d layers) the first depth whose confidence
    reaches ``threshold`` (L if none): where confidence-based early exit stops."""
    ok = conf >= threshold
    ok[:, -1] = True
    return ok.float().argmax(1) + 1


def exit_threshold(conf: Tensor, mean_layers: float, weights: Tensor | None = None) -> float:
    """The highest threshold (the latest exits) whose :func:`first_confident` depths keep the
    (``weights``-weighted) mean depth of ``conf``'s rows at most ``mean_layers`` (bisection; a higher
    threshold never exits earlier)."""
    def within(threshold: float) -> bool:
        return weighted_mean(first_confident(conf, threshold), weights) <= mean_layers

    return bisect_edge(within, inside=0.0, outside=1.0 + 1e-6, steps=40)


def fit_error_predictor(pooled: Tensor, frames: Tensor, errors: Tensor, hidden: int = 64, epochs: int = 200,
                        folds: int = 5, seed: int = 0) -> tuple[DepthChooser, dict]:
    """A :class:`DepthChooser`'s predictor fitted by Poisson likelihood to ``errors`` [N, L] (errors of
    each clip at every depth) from ``pooled`` [N, 2D] and ``frames`` [N]; the epoch count chosen by
    ``folds``-fold cross-validation on these clips, then one fit on all of them. Not calibrated
    (:meth:`DepthChooser.calibrate`). Returns it and ``{"epochs", "cv_loss", "cv_loss_first_epoch"}``
    (held-out Poisson NLL per clip and depth). Raises ValueError with fewer clips than folds."""
    if len(pooled) < folds:
        raise ValueError(f"{len(pooled)} clips: the depth predictor needs at least {folds}")

    def train(rows: Tensor, n_epochs: int, held: Tensor | None = None):
        torch.manual_seed(seed)  # under fork_rng (below): the caller's random state is left as it was
        net = DepthChooser(pooled.shape[1] // 2, errors.shape[1], hidden)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
        gen = torch.Generator().manual_seed(seed)
        curve = []
        for _ in range(n_epochs):
            net.train()
            for b in rows[torch.randperm(len(rows), generator=gen)].split(64):
                loss = nn.functional.poisson_nll_loss(net.log_rate(pooled[b], frames[b]), errors[b], log_input=True)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if held is not None:
                net.eval()
                with torch.no_grad():
                    curve.append(float(nn.functional.poisson_nll_loss(net.log_rate(pooled[held], frames[held]), errors[held], log_input=True)))
        net.eval()
        return net, curve

    order = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(seed))
    parts = order.tensor_split(folds)
    with torch.random.fork_rng(devices=[]):
        curves = [train(torch.cat([p for j, p in enumerate(parts) if j != i]), epochs, parts[i])[1] for i in range(folds)]
        mean_curve = torch.tensor(curves).mean(0)
        best = int(mean_curve.argmin()) + 1
        net, _ = train(order, best)
    return net, {"epochs": best, "cv_loss": float(mean_curve[best - 1]), "cv_loss_first_epoch": float(mean_curve[0])}
