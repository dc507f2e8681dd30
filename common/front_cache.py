"""The front end of a whole dataset, computed once: stages 2 and 3 train only encoder layers, heads and
scorers over a frozen front end, so they read it from this cache instead of running the CNN again.

The cache is packed (each input's real frames one after another) and padded per batch, so memory
follows the total length of the data, not its longest clip times its size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batching import SAMPLES_PER_FRAME, budgeted_batches, budgeted_loader
from .model.dynamic import DynamicModel
from .model.runner import FrontEnd, real_frames
from .model.selector import pooled_features


@dataclass
class FrontEndCache:
    """Front-end outputs of a whole (un-augmented) dataset: the frozen part, computed once.

    Stored packed: every input's real frames one after another, ``hidden`` ``[frames, D]`` and
    ``features`` ``[frames, F]``, input i at rows ``offsets[i]:offsets[i + 1]``. Memory follows the
    total length of the data; padding everything to the longest input would make one 60 s clip
    cost as much as a minute of audio for *every* input. :meth:`batch` pads a batch to its own
    longest input. ``texts`` are the N targets; ``teacher`` (optional, :func:`add_teacher`) the full
    model's head outputs, packed like ``hidden`` when per frame (CTC), else ``[N, classes]``.
    """

    hidden: Tensor
    features: Tensor
    offsets: Tensor
    texts: list[str]
    teacher: Tensor | None = None
    teacher_per_frame: bool = False

    @classmethod
    def pack(cls, hidden: Tensor, features: Tensor, frame_mask: Tensor | None, texts: list[str]) -> FrontEndCache:
        """From padded ``[N, T, ...]`` front ends and their ``frame_mask`` ``[N, T]`` (real frames
        first; None: nothing padded)."""
        lengths = real_frames(hidden, frame_mask)
        return cls(_packed(hidden, lengths), _packed(features, lengths), _offsets(lengths), list(texts))

    def lengths(self) -> Tensor:
        """Real frames of every cached input ``[N]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def sample_lengths(self) -> Tensor:
        """Every cached input's length in samples at 16 kHz (its frames x the front end's stride) ``[N]``:
        what batches are cut to a memory budget by."""
        return self.lengths() * SAMPLES_PER_FRAME

    def batch(self, rows: Tensor) -> tuple[FrontEnd, list[str]]:
        """The rows' front end ``[b, t, ...]``, padded (with zeros) to the longest of them; the mask
        is None when they all have t frames."""
        lengths = self.lengths()[rows]
        t = max(1, int(lengths.max()))
        mask = _mask(lengths, t)
        front = FrontEnd(self._padded(self.hidden, rows, t), self._padded(self.features, rows, t), mask)
        return front, [self.texts[i] for i in rows.tolist()]

    def pooled_features(self) -> Tensor:
        """What the selector sees of every input, ``[N, 2 * F]`` (:func:`~.model.selector.pooled_features`),
        over one batch of them all, as the depth chooser's calibration has always read them."""
        lengths = self.lengths()
        t = max(1, int(lengths.max())) if len(self) else 1
        return pooled_features(self._padded(self.features, torch.arange(len(self)), t), _mask(lengths, t))

    def _padded(self, packed: Tensor, rows: Tensor, t: int) -> Tensor:
        out = packed.new_zeros((len(rows), t, *packed.shape[1:]))
        for j, i in enumerate(rows.tolist()):
            start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
            out[j, : stop - start] = packed[start:stop]
        return out

    def teacher_logits(self, rows: Tensor, frames: int) -> Tensor | None:
        """The stored full-model outputs of ``rows``: ``[b, frames, V]`` per frame, or ``[b, C]``."""
        if self.teacher is None:
            return None
        return self._padded(self.teacher, rows, frames) if self.teacher_per_frame else self.teacher[rows]

    def distill_term(self, head, logits: Tensor, rows: Tensor, frame_mask: Tensor | None, weight: float) -> Tensor | float:
        """``weight`` x KL(full model || ``head``) of the cached ``rows``' outputs ``logits``; 0 when ``weight``
        is 0 or no full-model outputs are stored (:func:`add_teacher`)."""
        teacher = self.teacher_logits(rows, logits.shape[1]) if weight > 0 else None
        return 0.0 if teacher is None else weight * head.distill_loss(logits, teacher, frame_mask)

    def __len__(self) -> int:
        return len(self.texts)


def _mask(lengths: Tensor, t: int) -> Tensor | None:
    """``[b, t]`` real frames first, or None when every input has t frames (the fast path, as the
    front end gives it)."""
    return None if bool((lengths == t).all()) else torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)


def _offsets(lengths: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths.long().cpu(), 0)])


def _packed(padded: Tensor, lengths: Tensor) -> Tensor:
    """``[N, T, ...]`` -> ``[sum of lengths, ...]``: each input's first ``lengths[i]`` frames."""
    return torch.cat([padded[i, :n] for i, n in enumerate(lengths.tolist())]) if len(lengths) else padded.reshape(0, *padded.shape[2:])


@torch.inference_mode()
def cache_front_ends(model: DynamicModel, data: Dataset, batch_size: int = 64) -> FrontEndCache:
    """The front end of every input of ``data`` (un-augmented, in order), computed in batches of at most
    ``batch_size`` cut to the inference memory budget (:mod:`.batching`)."""
    model.eval()
    hidden, features, lengths, texts = [], [], [], []
    for wave, mask, batch_texts in budgeted_loader(data, batch_size):
        front = model.front_end(wave, mask)
        n = front.lengths().cpu()
        hidden.append(_packed(front.hidden, n))
        features.append(_packed(front.features, n))
        lengths.append(n)
        texts += batch_texts
    return FrontEndCache(torch.cat(hidden), torch.cat(features), _offsets(torch.cat(lengths)), texts)


@torch.inference_mode()
def add_teacher(model: DynamicModel, cache: FrontEndCache, batch_size: int = 64) -> None:
    """Store the full model's base-head outputs for every cached input (the distillation target):
    packed per frame (CTC), or ``[N, classes]``."""
    model.eval()
    parts, per_frame = [], False
    for rows in budgeted_batches(cache.sample_lengths(), batch_size):
        front, _ = cache.batch(rows)
        logits = model.heads["base"].logits(model.runner.run_layers(front, None), front.frame_mask)
        per_frame = logits.dim() == 3  # [b, t, V] (CTC) or [b, classes]
        parts.append(_packed(logits, front.lengths().cpu()) if per_frame else logits)
    cache.teacher, cache.teacher_per_frame = torch.cat(parts), per_frame
