"""Affine stand-ins for skipped encoder layers, fitted in closed form on the full model's states.

A pre-LN transformer layer adds a residual update to its input: ``h[i+1] = h[i] + f_i(h[i])``. Dropping
layer ``i`` normally means ``f_i = 0``. An encoder trained with LayerDrop tolerates that (stage 1 of
``common.train`` does this for the SSL families); a frozen pretrained one such as Whisper base does
not: its teacher-forced loss goes from ~1.2 nats/token with 6 of 6 layers to 3.5-17 with 3 or 4.

A skip map replaces ``f_i`` for a skipped layer by an affine map of the same input,
``h[i+1] = h[i] + [h[i], 1] @ W_i`` with ``W_i`` [D + 1, D], fitted by ridge regression of the
residual updates on the full model's states (every frame of every fitting clip is one sample), so no
gradient step and no change to the pretrained weights is needed. Cost per skipped layer and frame:
one D x D matmul (Whisper base: 0.26 M MACs against ~3.1 M for the layer's projections and FFN,
before attention).

The idea of standing in for removed layers with a small module trained to imitate them comes from
layer pruning of large language models (LLM-Streamline, Chen et al., 2024); here the module is
linear and solved exactly. Measured on Whisper base and real speech: see README, "A real pretrained
model on real human speech".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .runner import FrontEnd, LayerRunner


class SkipMaps(nn.Module):
    """``weight`` [L, D + 1, D]: layer i's stand-in is ``h + h @ weight[i, :D] + weight[i, D]``."""

    def __init__(self, weight: Tensor):
        super().__init__()
        if weight.dim() != 3 or weight.shape[1] != weight.shape[2] + 1:
            raise ValueError(f"skip maps must be [layers, D + 1, D], got {list(weight.shape)}")
        self.register_buffer("weight", weight.float().contiguous())

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def save(self, path: str | Path) -> None:
        save_file({"weight": self.weight.contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "SkipMaps":
        """Raises FileNotFoundError for a missing file, ValueError for a wrong shape."""
        return cls(load_file(str(path))["weight"])

    def forward(self, index: int, hidden: Tensor) -> Tensor:
        """hidden [B, T, D] -> the stand-in output of layer ``index`` [B, T, D]."""
        w = self.weight[index]
        return hidden + hidden @ w[:-1] + w[-1]


class _NormalEquations:
    """Running ``X^T X`` and ``X^T Y`` per layer (float64), X = [h, 1], Y = the residual update."""

    def __init__(self, layers: int, dim: int):
        self.xtx = torch.zeros(layers, dim + 1, dim + 1, dtype=torch.float64)
        self.xty = torch.zeros(layers, dim + 1, dim, dtype=torch.float64)
        self.frames = 0

    def add(self, index: int, inputs: Tensor, outputs: Tensor) -> None:
        x = torch.cat([inputs.double(), torch.ones(inputs.shape[0], 1, dtype=torch.float64)], 1)
        self.xtx[index] += x.T @ x
        self.xty[index] += x.T @ (outputs.double() - inputs.double())

    def solve(self, ridge: float) -> Tensor:
        """Ridge solution per layer; ``ridge`` is relative to the mean diagonal of X^T X."""
        eye = torch.eye(self.xtx.shape[1], dtype=torch.float64)
        out = [torch.linalg.solve(a + ridge * a.diagonal().mean() * eye, b) for a, b in zip(self.xtx, self.xty)]
        return torch.stack(out).float()


@torch.inference_mode()
def fit_skip_maps(runner: LayerRunner, fronts: Iterable[FrontEnd], ridge: float = 1e-2,
                  on_batch: Callable[[int], None] | None = None) -> SkipMaps:
    """Fit one affine stand-in per encoder layer on the full model's states.

    ``fronts``: front-end outputs of the fitting clips (``runner.front_end``); padded frames
    (``frame_mask`` False) are left out. Raises ValueError when no frame was seen.
    """
    runner.eval()
    eqs = _NormalEquations(runner.num_layers, runner.hidden_size)
    for n, front in enumerate(fronts, 1):
        hidden = front.hidden
        mask, bias = runner._layer_context(hidden, front.frame_mask)
        real = (torch.ones(hidden.shape[:2], dtype=torch.bool) if front.frame_mask is None else front.frame_mask.bool())
        for i in range(runner.num_layers):
            out = runner._run_layer(i, hidden, mask, bias)
            eqs.add(i, hidden[real], out[real])
            hidden = out
        eqs.frames += int(real.sum())
        if on_batch:
            on_batch(n)
    if eqs.frames == 0:
        raise ValueError("no frames to fit skip maps on")
    return SkipMaps(eqs.solve(ridge))
