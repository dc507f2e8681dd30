"""A torch Dataset of 1 s clips that lives in memory.

A few thousand 1 s clips are a few hundred MB at most, and federated clients run many short
epochs: reading every file once up front keeps disk I/O and decoding out of the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .audio import load_clip
from .clip import Clip
from .labels import CLIP_SAMPLES, LABELS, label_counts


class ClipDataset(Dataset):
    """``(waveform: FloatTensor[16000], label: int)`` pairs, with the speaker of every clip kept.

    ``preload=False`` reads each clip on access instead: for corpora too big for memory
    (all of real Speech Commands is ~7 GB as float32).
    """

    label_names: tuple[str, ...] = LABELS

    def __init__(self, clips: Sequence[Clip], preload: bool = True, waveforms: torch.Tensor | None = None):
        self.clips: list[Clip] = list(clips)
        self.labels: list[int] = [c.label for c in self.clips]
        self.speakers: list[str] = [c.speaker for c in self.clips]
        if waveforms is not None:
            if waveforms.shape != (len(self.clips), CLIP_SAMPLES):
                raise ValueError(f"waveforms must be [{len(self.clips)}, {CLIP_SAMPLES}], got {tuple(waveforms.shape)}")
            self.waveforms: torch.Tensor | None = waveforms
        elif preload:
            buf = np.empty((len(self.clips), CLIP_SAMPLES), dtype=np.float32)
            for i, clip in enumerate(self.clips):
                buf[i] = self._read(clip)
            self.waveforms = torch.from_numpy(buf)
        else:
            self.waveforms = None

    @staticmethod
    def _read(clip: Clip) -> np.ndarray:
        # Silence is kept as recorded: trimming noise to its "loudest" part would make it speech-like.
        return load_clip(clip.path, trim=not clip.is_silence, start=clip.start, frames=clip.frames)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.waveforms is not None:
            return self.waveforms[index], self.labels[index]
        return torch.from_numpy(self._read(self.clips[index])), self.labels[index]

    def subset(self, indices: Sequence[int]) -> ClipDataset:
        """The clips at ``indices`` (e.g. one device's partition), sharing already-loaded audio."""
        idx = list(indices)
        if self.waveforms is None:
            return ClipDataset([self.clips[i] for i in idx], preload=False)
        return ClipDataset([self.clips[i] for i in idx], waveforms=self.waveforms[torch.as_tensor(idx, dtype=torch.long)])

    @staticmethod
    def join(parts: Sequence[ClipDataset]) -> ClipDataset:
        """One dataset of every clip of ``parts``, in order (e.g. all splits of a test corpus)."""
        clips = [c for part in parts for c in part.clips]
        if all(part.waveforms is not None for part in parts):
            return ClipDataset(clips, waveforms=torch.cat([part.waveforms for part in parts]))  # type: ignore[misc]
        return ClipDataset(clips, preload=False)

    def label_counts(self) -> dict[str, int]:
        return label_counts(self.labels)
