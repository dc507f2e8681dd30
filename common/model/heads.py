"""Task heads on top of the encoder's last hidden state.

A head maps ``[B, T, D]`` hidden states (plus the frame mask) to task outputs and knows its own
loss and prediction, so training and evaluation code does not care which task it serves. Keyword
spotting is utterance classification; a CTC head for ASR would return per-frame log-probs and
implement the same three methods.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .selector import masked_mean_std


class TaskHead(nn.Module):
    """Interface: ``forward(hidden, frame_mask) -> output``, ``loss(output, target)``, ``predict``."""

    def loss(self, output: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def predict(self, output: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ClassificationHead(TaskHead):
    """Mean-pooled hidden states -> class logits (keyword spotting)."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        pooled, _ = masked_mean_std(hidden, frame_mask)
        return self.proj(self.dropout(self.norm(pooled)))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, label_smoothing=0.05)

    def predict(self, output: Tensor) -> Tensor:
        return output.argmax(-1)


def copy_head(head: TaskHead) -> TaskHead:
    """An independent copy, so a strategy can fine-tune its own head from a shared start."""
    return copy.deepcopy(head)
