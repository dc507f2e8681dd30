"""Batches whose memory stays bounded when inputs differ in length.

A batch is padded to its longest input, and an encoder layer's self-attention holds ``heads x rows x
frames^2`` scores, so one 60 s clip (3 000 frames) among 64 short ones asks for tens of GB where the
short ones alone need a few hundred MB. Every pass over a dataset therefore cuts its batches further
where ``rows x longest^2`` (attention) or ``rows x longest`` (the convolutional front end, in samples)
would exceed a :class:`MemoryBudget`. The cut keeps the inputs' order, so callers that concatenate
outputs need not change, and a batch within the budget is left as it is: on corpora of short clips
(the synthetic ones: at most 4 s) nothing is cut and results do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data.loading import pad_batch

#: Samples at 16 kHz per encoder frame of the SSL front ends (WavLM, HuBERT, wav2vec 2.0: stride 320,
#: 50 frames per second).
SAMPLES_PER_FRAME = 320


@dataclass(frozen=True)
class MemoryBudget:
    """Caps on one padded batch: ``attention`` on rows x (longest input in frames)^2, ``samples`` on
    rows x longest input in samples at 16 kHz."""

    attention: float
    samples: float

    def fits(self, rows: int, longest_samples: int) -> bool:
        frames = longest_samples / SAMPLES_PER_FRAME
        return rows <= 1 or (rows * frames**2 <= self.attention and rows * longest_samples <= self.samples)


#: Forward passes only (caches, teachers, tables, validation, evaluation): 128 inputs of 8 s, or 64 of
#: 6 s through the front end (its first convolution's output is ~2.5 GB then).
INFERENCE = MemoryBudget(attention=128 * (8 * 50) ** 2, samples=64 * 6 * 16000)
#: Training steps, which keep every layer's activations for the backward pass: 16 inputs of 8 s.
TRAINING = MemoryBudget(attention=16 * (8 * 50) ** 2, samples=16 * 8 * 16000)


def split_to_budget(rows: Tensor, lengths_samples: Tensor | Sequence[int], budget: MemoryBudget) -> list[Tensor]:
    """Cut ``rows`` (indices into ``lengths_samples``, in order) into consecutive pieces that each fit
    ``budget`` (greedy: each piece as long as it can be); an input too long to fit even alone gets a
    piece of its own. Returns ``[rows]`` itself when the whole batch fits."""
    lengths = torch.as_tensor(lengths_samples)
    sizes = lengths[rows].tolist()
    if budget.fits(len(sizes), max(sizes, default=0)):
        return [rows]
    pieces, start, longest = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and not budget.fits(i - start + 1, max(longest, size)):
            pieces.append(rows[start:i])
            start, longest = i, 0
        longest = max(longest, size)
    pieces.append(rows[start:])
    return pieces


def budgeted_batches(lengths_samples: Tensor | Sequence[int], batch_size: int, budget: MemoryBudget = INFERENCE,
                     rows: Tensor | None = None) -> list[Tensor]:
    """``rows`` (default: indices ``0..N-1``) in order, in batches of at most ``batch_size`` cut to ``budget``."""
    rows = torch.arange(len(lengths_samples)) if rows is None else rows
    return [piece for batch in rows.split(batch_size) for piece in split_to_budget(batch, lengths_samples, budget)]


def rows_within(budget: MemoryBudget, longest_samples: int, at_most: int) -> int:
    """How many rows of ``longest_samples`` fit ``budget`` (at least 1, at most ``at_most``)."""
    rows = at_most
    while rows > 1 and not budget.fits(rows, longest_samples):
        rows //= 2
    return rows


def budgeted_loader(data: Dataset, batch_size: int, budget: MemoryBudget = INFERENCE) -> DataLoader:
    """Batches of ``pad_batch`` in the data's order, cut to ``budget`` where the data know their
    lengths (``dataset.lengths``, samples at 16 kHz)."""
    lengths = getattr(data, "lengths", None)
    if lengths is None:
        return DataLoader(data, batch_size=batch_size, collate_fn=pad_batch)
    return DataLoader(data, batch_sampler=[b.tolist() for b in budgeted_batches(lengths, batch_size, budget)], collate_fn=pad_batch)
